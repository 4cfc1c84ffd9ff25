"""The LoRA math, written once against the array API.

Canonical orientation everywhere: ``A`` is (r, in, ...), ``B`` is (out, r, ...). Every function
takes arrays of any compliant namespace and returns arrays of the caller's namespace. ``scale``
is the effective scale (see :mod:`.scale`), already multiplied by any user strength.

Kinds of layer:

* ``linear``: A (r, in), B (out, r), ΔW (out, in) = s · B @ A.
* ``conv``: A (r, in, kh, kw) (a real convolution), B (out, r, 1, 1) (a 1×1 convolution),
  ΔW (out, in, kh, kw) = s · (B.reshape(out, r) @ A.reshape(r, -1)).reshape(...).
* ``embedding``: A (r, num_embeddings), B (dim, r) (PEFT's layout); ΔW is returned in the
  layout of the embedding table it merges into, (num_embeddings, dim) = s · (B @ A)ᵀ.
"""

from __future__ import annotations

from typing import Any

from .capabilities import (add_matmul, add_matmul_, add_matmul_many_, add_matmul_stacked_, linear_lora, scaled_matmul,
                           stop_gradient)
from .namespace import array_namespace

__all__ = ["KINDS", "accumulation_dtype", "delta_weight", "lora_output", "add_lora_output",
           "linear_forward", "embedding_lora_output", "merge_into", "merge_into_many", "merge_into_stacked",
           "unmerge_from", "dora_weight_norm", "dora_factor", "dora_forward"]

KINDS = ("linear", "conv", "embedding")


def accumulation_dtype(xp: Any, dtype: Any) -> Any:
    """float64 for float64 inputs, float32 for everything else (bf16, fp16, fp32)."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def _as(xp: Any, x: Any, dtype: Any) -> Any:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def delta_weight(A: Any, B: Any, scale: float, kind: str = "linear", *, dtype: Any = None,
                 xp: Any = None) -> Any:
    """ΔW = scale · B @ A in the layout of the weight it merges into (see module docstring).

    Computed in ``dtype`` (default: the accumulation dtype of the factors, float32 unless
    they are float64).
    """
    xp = array_namespace(A, B) if xp is None else xp
    if dtype is None:
        dtype = accumulation_dtype(xp, xp.result_type(A.dtype, B.dtype))
    a = _as(xp, A, dtype)
    b = _as(xp, B, dtype)
    scale = float(scale)
    if kind == "linear":
        return (b @ a) * scale
    if kind == "conv":
        rank = a.shape[0]
        out = b.shape[0]
        flat = xp.reshape(b, (out, rank)) @ xp.reshape(a, (rank, -1))
        return xp.reshape(flat * scale, (out, *a.shape[1:]))
    if kind == "embedding":
        return (b @ a).T * scale
    raise ValueError(f"unknown LoRA kind {kind!r}; expected one of {KINDS}")


def lora_output(x: Any, A: Any, B: Any, scale: float) -> Any:
    """The unmerged LoRA term ``scale · (x @ Aᵀ) @ Bᵀ``; ΔW is never materialised.

    The scale multiplies the rank-sized intermediate, the cheapest place for it (the product in
    float16, where the intermediate could overflow: :func:`~.capabilities.scaled_matmul`).
    """
    return scaled_matmul(array_namespace(x, A), x @ A.T, B.T, float(scale))


def add_lora_output(base_out: Any, x: Any, A: Any, B: Any, scale: float, *, fused: bool = True,
                    xp: Any = None, overwrite: bool = False) -> Any:
    """``base_out + scale · (x @ Aᵀ) @ Bᵀ``; uses a fused add-matmul where the framework has one.

    The plain path scales the rank-sized intermediate, as :func:`lora_output` does; the fused
    path (``torch.addmm``, ``mx.addmm``) passes the scale as the product's ``alpha``, one
    kernel less. ``xp``: the namespace, when the caller resolved it once already (hot paths).
    ``overwrite``: ``base_out`` is the caller's temporary, which the fused path may write the
    sum into (see :func:`~portable_lora.core.capabilities.add_matmul`).
    """
    xp = array_namespace(base_out, x) if xp is None else xp
    return add_matmul(xp, base_out, x @ A.T, B.T, scale=float(scale), fused=fused, overwrite=overwrite)


def linear_forward(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, *,
                   fused: bool = True, xp: Any = None) -> Any:
    """``x @ Wᵀ + bias + scale · (x @ Aᵀ) @ Bᵀ`` with W (out, in).

    ``fused``: one fused call where the framework has one for these operands (torch: a Triton
    kernel for 16-bit CUDA inference, see ``capabilities.linear_lora``), else the base product
    then :func:`add_lora_output`.
    """
    xp = array_namespace(x, W) if xp is None else xp
    if fused:
        out = linear_lora(xp, x, W, A, B, scale=scale, bias=bias)
        if out is not None:
            return out
    base = x @ W.T
    if bias is not None:
        base = base + bias
    # ``base`` is this function's own temporary: the LoRA term may be added into it
    return add_lora_output(base, x, A, B, scale, fused=fused, xp=xp, overwrite=True)


def embedding_lora_output(ids: Any, A: Any, B: Any, scale: float, *, xp: Any = None) -> Any:
    """The LoRA term of an embedding lookup: ``scale · A[:, ids]ᵀ @ Bᵀ``, shape (*ids.shape, dim)."""
    xp = array_namespace(A, B) if xp is None else xp
    flat = xp.reshape(ids, (-1,))
    rows = xp.take(A.T, flat, axis=0)
    out = scaled_matmul(xp, rows, B.T, float(scale))
    return xp.reshape(out, (*tuple(ids.shape), B.shape[0]))


def _oriented(delta: Any, transposed: bool) -> Any:
    # ``transposed`` weights are stored (in, out): GPT-2 Conv1D (fan_in_fan_out), Flax kernels.
    return delta.T if transposed else delta


def dora_weight_norm(W: Any, A: Any, B: Any, scale: float, kind: str = "linear", *,
                     transposed: bool = False, xp: Any = None) -> Any:
    """‖W + ΔW‖ per output channel (over every other axis), in the accumulation dtype, detached.

    This is the norm of PEFT's and mlx-lm's DoRA; it never carries gradients.
    """
    xp = array_namespace(W, A, B) if xp is None else xp
    acc = accumulation_dtype(xp, W.dtype)
    w = _as(xp, W, acc)
    if transposed:
        w = w.T
    combined = w + delta_weight(A, B, scale, kind, dtype=acc, xp=xp)
    flat = xp.reshape(combined, (combined.shape[0], -1))
    return stop_gradient(xp, xp.linalg.vector_norm(flat, axis=1))


def dora_factor(W: Any, A: Any, B: Any, scale: float, magnitude: Any, kind: str = "linear", *,
                transposed: bool = False, xp: Any = None) -> Any:
    """``magnitude / ‖W + ΔW‖`` per output channel: the DoRA rescaling, shape (out,)."""
    xp = array_namespace(W, magnitude) if xp is None else xp
    norm = dora_weight_norm(W, A, B, scale, kind, transposed=transposed, xp=xp)
    return _as(xp, magnitude, norm.dtype) / norm


def dora_forward(x: Any, W: Any, A: Any, B: Any, scale: float, magnitude: Any, bias: Any = None, *,
                 fused: bool = True, xp: Any = None) -> Any:
    """DoRA linear forward: ``(m / ‖W + ΔW‖) ⊙ (x @ Wᵀ + scale · (x @ Aᵀ) @ Bᵀ) + bias``."""
    xp = array_namespace(x, W) if xp is None else xp
    factor = _as(xp, dora_factor(W, A, B, scale, magnitude, xp=xp), x.dtype)
    out = add_lora_output(x @ W.T, x, A, B, scale, fused=fused, xp=xp) * factor
    return out if bias is None else out + bias


def _reshape_factor(xp: Any, factor: Any, ndim: int) -> Any:
    return xp.reshape(factor, (factor.shape[0],) + (1,) * (ndim - 1))


def _in_place_product(W: Any, A: Any, B: Any, kind: str, transposed: bool) -> tuple[Any, Any] | None:
    """``(a, b)`` with ``ΔW = scale · a @ b`` in W's own layout, where an in-place merge
    applies (linear and embedding LoRA on a 2-D weight), else ``None``."""
    if kind not in ("linear", "embedding") or W.ndim != 2:
        return None
    # ΔW is s·B@A for a linear weight (out, in); its transpose s·Aᵀ@Bᵀ for a table (num, dim)
    # or a transposed weight (in, out), and a transposed table is a plain (dim, num) product
    if (kind == "embedding") != bool(transposed):
        return A.T, B.T
    return B, A


def _merge_in_place(xp: Any, W: Any, A: Any, B: Any, scale: float, kind: str, transposed: bool) -> Any:
    """``W += scale · ΔW`` through the in-place fused capability, or ``None`` where there is none.

    Only for linear and embedding LoRA with factors in W's dtype: the framework's fused call
    accumulates the rank-r product in float32 and rounds the sum once, as the plain path does.
    """
    product = _in_place_product(W, A, B, kind, transposed)
    return None if product is None else add_matmul_(xp, W, *product, scale=float(scale))


def merge_into(W: Any, A: Any, B: Any, scale: float, kind: str = "linear", *,
               magnitude: Any = None, transposed: bool = False, inplace: bool = False,
               xp: Any = None) -> Any:
    """The merged weight ``W + ΔW`` (or DoRA's ``m · (W + ΔW)/‖W + ΔW‖``), as a new array.

    Accumulates in float32 (float64 for float64 weights) and rounds once to ``W.dtype``.
    ``transposed`` means W is stored (in, out). ``inplace=True`` lets a framework with an
    in-place fused add-matmul (torch's ``addmm_``) write a plain LoRA merge into ``W`` itself,
    one pass over the weight, and return ``W``; elsewhere a new array comes back as usual, so
    a caller writes ``merged = merge_into(W, ..., inplace=True)`` and copies only when
    ``merged is not W``. ``xp``: the namespace, when the caller resolved it already.
    """
    xp = array_namespace(W, A, B) if xp is None else xp
    if inplace and magnitude is None:
        done = _merge_in_place(xp, W, A, B, scale, kind, transposed)
        if done is not None:
            return done
    acc = accumulation_dtype(xp, W.dtype)
    w = _as(xp, W, acc)
    delta = delta_weight(A, B, scale, kind, dtype=acc)
    if magnitude is None:
        return _as(xp, w + _oriented(delta, transposed), W.dtype)
    combined = (w.T if transposed else w) + delta
    norm = xp.linalg.vector_norm(xp.reshape(combined, (combined.shape[0], -1)), axis=1)
    factor = _as(xp, magnitude, acc) / norm
    merged = combined * _reshape_factor(xp, factor, combined.ndim)
    return _as(xp, _oriented(merged, transposed), W.dtype)


def merge_into_many(items: list[tuple], *, inplace: bool = False, xp: Any = None) -> list[Any]:
    """:func:`merge_into` for many plain-LoRA weights: ``items`` are ``(W, A, B, scale, kind,
    transposed)`` tuples; returns the merged arrays in order, as :func:`merge_into` would.

    With ``inplace=True`` a framework that batches in-place merges (torch on CUDA: one Triton
    launch for all 16-bit weights of one shape, see ``capabilities.add_matmul_many_``) writes
    them into their ``W`` and returns ``W`` itself for those; every other item goes through
    :func:`merge_into` one by one (so copy where ``merged is not W``, as there). The same
    arithmetic either way: float32 sums, one rounding. ``xp``: the namespace of every item.
    """
    if not items:
        return []
    xp = array_namespace(items[0][0]) if xp is None else xp
    merged: list[Any] = [None] * len(items)
    if inplace:
        batch, where = [], []
        for i, (W, A, B, _, kind, transposed) in enumerate(items):
            product = _in_place_product(W, A, B, kind, transposed)
            if product is not None:
                batch.append((W, *product))
                where.append(i)
        if len(batch) > 1:
            done = add_matmul_many_(xp, [t[0] for t in batch], [t[1] for t in batch], [t[2] for t in batch],
                                    scales=[float(items[i][3]) for i in where])
            for i, ok in zip(where, done):
                if ok:
                    merged[i] = items[i][0]
    for i, (W, A, B, scale, kind, transposed) in enumerate(items):
        if merged[i] is None:
            merged[i] = merge_into(W, A, B, scale, kind, transposed=transposed, inplace=inplace, xp=xp)
    return merged


def merge_into_stacked(Ws: list, A: Any, B: Any, scales: list, *, inplace: bool = False,
                       xp: Any = None) -> list[Any]:
    """:func:`merge_into_many` for plain linear LoRA whose factors come stacked: ``Ws[i]``
    (out, in) merged with ``A[i]`` and ``B[i]`` at ``scales[i]``, ``A`` of shape (count, r, in)
    and ``B`` (count, out, r), one array each (as a merge uploads a group of same-shaped
    layers: one block, no array per factor). Returns the merged arrays in order, as
    :func:`merge_into_many` does (``inplace=True``: ``Ws[i]`` itself where written in place).

    With ``inplace=True`` a framework that merges stacked factors in one call (torch on
    CUDA, 16-bit weights: one Triton launch, see ``capabilities.add_matmul_stacked_``) does
    so; else each item goes through :func:`merge_into_many`. The same arithmetic either way.
    """
    if not Ws:
        return []
    xp = array_namespace(Ws[0]) if xp is None else xp
    if len(Ws) != A.shape[0] or len(Ws) != B.shape[0] or len(scales) != len(Ws):
        raise ValueError(f"merge_into_stacked: {len(Ws)} weights, {len(scales)} scales, factors stacked "
                         f"{A.shape[0]} (A) and {B.shape[0]} (B) deep; expected one of each per weight")
    scales = [float(s) for s in scales]
    if inplace and add_matmul_stacked_(xp, Ws, B, A, scales=scales):
        return list(Ws)
    return merge_into_many([(W, A[i, ...], B[i, ...], s, "linear", False) for i, (W, s) in enumerate(zip(Ws, scales))],
                           inplace=inplace, xp=xp)


def unmerge_from(W: Any, A: Any, B: Any, scale: float, kind: str = "linear", *,
                 magnitude: Any = None, weight_norm: Any = None, transposed: bool = False,
                 inplace: bool = False, xp: Any = None) -> Any:
    """The inverse of :func:`merge_into` (``inplace`` as there).

    DoRA cannot be undone from the merged weight alone: pass ``weight_norm``, the
    :func:`dora_weight_norm` taken before merging.
    """
    if magnitude is None:  # W − s·BA is W + (−s)·BA, bit for bit
        return merge_into(W, A, B, -float(scale), kind, transposed=transposed, inplace=inplace, xp=xp)
    xp = array_namespace(W, A, B) if xp is None else xp
    acc = accumulation_dtype(xp, W.dtype)
    w = _as(xp, W, acc)
    delta = delta_weight(A, B, scale, kind, dtype=acc)
    if weight_norm is None:
        raise ValueError("unmerging DoRA needs the weight_norm taken before the merge")
    combined = w.T if transposed else w
    factor = _as(xp, magnitude, acc) / _as(xp, weight_norm, acc)
    original = combined / _reshape_factor(xp, factor, combined.ndim) - delta
    return _as(xp, _oriented(original, transposed), W.dtype)
