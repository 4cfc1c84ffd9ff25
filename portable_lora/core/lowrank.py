"""Low-rank factorisation: SVD extraction, rank resizing and zero-padding.

All functions keep the canonical orientation (A (r, in, ...), B (out, r, ...)) and return the
caller's namespace. ``relative_error`` is ‖ΔW − B'A'‖_F / ‖ΔW‖_F (0 for a zero ΔW), and
``energy_kept`` is the fraction of Σσ² kept.

An SVD of a matrix holding NaN or infinity does not converge (or returns NaN factors), so
every input is checked first: a non-finite value is a :class:`~portable_lora.errors.LoraError`
naming the tensor (``name`` with ``.lora_A`` / ``.lora_B`` for :func:`resize_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LoraError
from .lora import accumulation_dtype
from .namespace import array_namespace

__all__ = ["LowRank", "low_rank", "resize_rank", "pad_rank"]


@dataclass(frozen=True)
class LowRank:
    A: Any
    B: Any
    relative_error: float
    energy_kept: float


def _check_finite(xp, x, key: str | None, what: str) -> None:
    """Refuse ``x`` if it holds NaN or ±inf (an SVD of it would not converge)."""
    finite = xp.isfinite(x)
    if bool(xp.all(finite)):
        return
    bad = int(xp.sum(xp.astype(xp.logical_not(finite), xp.int64)))
    size = 1
    for n in x.shape:
        size *= int(n)
    raise LoraError(f"non-finite values found: {bad} of {size} values of {what} are NaN or "
                    "infinite; a low-rank factorisation (SVD) needs finite values", key=key)


def _split(xp, u, s, vh, rank, out_tail, in_tail):
    k = min(rank, s.shape[0])
    root = xp.sqrt(s[:k])
    b = u[:, :k] * root
    a = root[:, None] * vh[:k, :]
    if k < rank:  # the matrix has lower rank than asked for: pad with exact zeros
        a, b = pad_rank(a, b, rank)
    total = float(xp.sum(s * s))
    kept = float(xp.sum(s[:k] * s[:k]))
    dropped = float(xp.sum(s[k:] * s[k:])) if k < s.shape[0] else 0.0  # no cancellation
    err = 0.0 if total == 0.0 else (dropped / total) ** 0.5
    energy = 1.0 if total == 0.0 else kept / total
    a = xp.reshape(a, (rank, *in_tail))
    b = xp.reshape(b, (b.shape[0], rank, *out_tail))
    return a, b, err, energy


def low_rank(delta: Any, rank: int, *, name: str | None = None) -> LowRank:
    """Best rank-``rank`` factors of ΔW (out, in) or conv ΔW (out, in, kh, kw), scale 1.

    The singular values are split evenly (√σ into each factor), so B @ A ≈ ΔW. ``name`` (the
    tensor's, e.g. ``<module>.weight``) is the key of the error for a non-finite ΔW.
    """
    xp = array_namespace(delta)
    acc = accumulation_dtype(xp, delta.dtype)
    d = xp.astype(delta, acc)
    _check_finite(xp, d, name, "ΔW")
    out = d.shape[0]
    flat = xp.reshape(d, (out, -1))
    svd = xp.linalg.svd(flat, full_matrices=False)
    in_tail = tuple(d.shape[1:])
    out_tail = (1,) * (d.ndim - 2)
    a, b, err, energy = _split(xp, svd.U, svd.S, svd.Vh, rank, out_tail, in_tail)
    return LowRank(a, b, err, energy)


def resize_rank(A: Any, B: Any, rank: int, *, name: str | None = None) -> LowRank:
    """Best rank-``rank`` approximation of ``B @ A`` without forming it.

    QR of both factors reduces the problem to an r×r SVD, so the cost is O((in + out)·r²).
    ``name`` (the module's) keys the error for a non-finite factor: ``<name>.lora_A`` or
    ``<name>.lora_B``.
    """
    xp = array_namespace(A, B)
    acc = accumulation_dtype(xp, xp.result_type(A.dtype, B.dtype))
    r = A.shape[0]
    in_tail = tuple(A.shape[1:])
    out_tail = tuple(B.shape[2:])
    a = xp.reshape(xp.astype(A, acc), (r, -1))
    b = xp.reshape(xp.astype(B, acc), (B.shape[0], r))
    for x, part in ((a, "A"), (b, "B")):
        _check_finite(xp, x, f"{name}.lora_{part}" if name else None, f"the factor {part}")
    qb = xp.linalg.qr(b)
    qa = xp.linalg.qr(a.T)
    core = qb.R @ qa.R.T
    if not bool(xp.all(xp.isfinite(core))):
        raise LoraError(f"non-finite values found: the factors are finite but B @ A overflows "
                        f"{acc}; a low-rank factorisation (SVD) needs finite values", key=name)
    svd = xp.linalg.svd(core, full_matrices=False)
    u = qb.Q @ svd.U
    vh = svd.Vh @ qa.Q.T
    new_a, new_b, err, energy = _split(xp, u, svd.S, vh, rank, out_tail, in_tail)
    return LowRank(new_a, new_b, err, energy)


def pad_rank(A: Any, B: Any, rank: int) -> tuple[Any, Any]:
    """Zero-pad A with rows and B with columns up to ``rank``; B @ A is unchanged."""
    xp = array_namespace(A, B)
    r = A.shape[0]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if rank == r:
        return A, B
    extra = rank - r
    # zeros_like keeps the factors' device (xp.zeros would make them on the default one)
    a = xp.concat([A, xp.broadcast_to(xp.zeros_like(A[:1, ...]), (extra, *A.shape[1:]))], axis=0)
    b = xp.concat([B, xp.broadcast_to(xp.zeros_like(B[:, :1, ...]), (B.shape[0], extra, *B.shape[2:]))], axis=1)
    return a, b
