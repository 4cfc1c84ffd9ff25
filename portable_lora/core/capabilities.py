"""Framework capabilities beyond the array API, in one small named table.

Two things the standard cannot say:

* ``stop_gradient``: DoRA's weight norm is detached from the graph (PEFT, mlx-lm);
* ``add_matmul``: ``base + scale · (a @ b)`` as one fused call (``torch.addmm``, ``mx.addmm``,
  the scale as their ``alpha``), a speed path only: the plain array-API expression
  ``base + (a · scale) @ b`` is the fallback and gives the same result up to rounding;
* ``add_matmul_``: the same, written into ``base`` in place: one pass over ``base``, the
  merge fast path (torch: ``addmm_`` for float32/float64; for 16-bit weights on CUDA a fused
  Triton kernel where triton imports (``_triton_merge``: one read and one write of ``base``),
  else the product in float32 by row blocks, added with one rounding). The fallback is the
  out-of-place result, which the caller copies.
* ``add_matmul_many_``: ``add_matmul_`` for many operand triples at once (a model's merge):
  torch, for 16-bit CUDA weights of one shape, one Triton launch for all of them (the host's
  time per launch, not the GPU's, bounds a model's merge otherwise); every item it leaves
  takes ``add_matmul_`` one by one.
* ``add_matmul_stacked_``: the same for operands stacked along a leading axis (``a`` of shape
  (count, m, k), ``b`` (count, k, n), one array each) into ``count`` separate bases, all or
  nothing: a model's merge uploads each group of same-shaped layers' factors as one block,
  and the launch is built from the stack's addresses, without a view per factor.
* ``linear_lora``: the whole LoRA linear forward ``x @ Wᵀ + bias + scale · (x @ Aᵀ) @ Bᵀ``
  in one call, inference only (torch: a fused Triton kernel, ``_triton_linear``, for 16-bit
  CUDA tensors with no autograd to record, up to ``_triton_linear.MAX_TOKENS`` tokens; while
  ``torch.compile`` traces, one custom op that runs that kernel where it applies). It returns
  ``None`` wherever it does not apply, and the caller takes the plain path: ``x @ Wᵀ (+ bias)``
  then :func:`add_matmul`.

Each entry maps a namespace family (see :func:`namespace_family`) to a function. A family not
in the table uses the fallback. Nothing here imports a framework at import time.
"""

from __future__ import annotations

from typing import Any, Callable

from . import _triton_linear
from .namespace import namespace_family

__all__ = ["stop_gradient", "add_matmul", "scaled_matmul", "add_matmul_", "add_matmul_many_", "add_matmul_stacked_", "linear_lora",
           "CAPABILITIES",
           "fused_available", "resolve"]


def _torch_stop_gradient(x):
    return x.detach()


def _jax_stop_gradient(x):
    import jax

    return jax.lax.stop_gradient(x)


def _mlx_stop_gradient(x):
    import mlx.core as mx

    return mx.stop_gradient(x)


def _torch_add_matmul(base, a, b, scale, overwrite=False):
    if b.ndim != 2 or a.ndim != base.ndim or a.dtype != b.dtype or a.dtype != base.dtype:
        # batched b, broadcasting or mixed dtypes: addmm takes none of them
        return base + (a * scale) @ b
    # overwrite: base is the caller's own temporary, so the sum may go into it (addmm_):
    # out-of-place addmm first copies base into a new output, a read and a write of it more
    # (an H100, 4096 tokens x 14336: ~80 us of a 900 us layer)
    overwrite = overwrite and base.is_contiguous()
    if overwrite and base.is_cuda and _triton_add_(base, a, b, scale):
        return base
    if a.ndim == 2:
        return base.addmm_(a, b, alpha=scale) if overwrite else base.addmm(a, b, alpha=scale)
    if base.numel() < _FLATTEN_MIN_ELEMENTS:
        # (..., n, k) @ (k, m), small: matmul folds the leading axes in C++ and add takes the
        # scale; three Python-level reshapes around addmm cost more on the host than the
        # extra elementwise kernel (measured: a 16-wide layer's core call 2x cheaper)
        return base.add_(a @ b, alpha=scale) if overwrite else base.add(a @ b, alpha=scale)
    # large: addmm's fused epilogue saves a pass over the output (CPU, T=256 x 1024: 30 %)
    flat = base.reshape(-1, base.shape[-1])
    a2 = a.reshape(-1, a.shape[-1])
    flat = flat.addmm_(a2, b, alpha=scale) if overwrite else flat.addmm(a2, b, alpha=scale)
    return flat.view(base.shape)


_FLATTEN_MIN_ELEMENTS = 1 << 14
# 16-bit CUDA outputs from this many elements (2048 tokens x 4096 features) take the Triton
# in-place add (``_triton_merge``'s kernel: one read and one write of base, the product in
# registers): cuBLAS's addmm_ at K = r runs at about half the copy bandwidth there. An H100,
# the forward's add alone, 4096 tokens x 4096, r = 16: 40 us against ~22 us for a read and a
# write; the whole layer in CUDA graphs, 4096 tokens: 1.26 -> 1.20x the plain linear (4096²),
# 1.21 -> 1.12x (4096 -> 14336); at 512-1024 tokens the two are within a few % either way,
# and eagerly below that the Triton launch's host time loses (benchmarks/NOTES.md §13).
_TRITON_ADD_MIN_ELEMENTS = 1 << 23


def _triton_add_(base, a, b, scale, min_elements: int = _TRITON_ADD_MIN_ELEMENTS) -> bool:
    """``base += scale · (a @ b)`` by the Triton merge kernel: 16-bit ``base`` of at least
    ``min_elements`` on CUDA (2-D ``a`` or leading axes flattened), outside ``torch.compile``
    tracing; ``False`` (``base`` untouched) where it does not run. Same arithmetic as a 16-bit
    addmm_: exact products, float32 sums, the sum with ``base`` in float32, one
    round-to-nearest-even."""
    import torch

    # tracing first: under torch.compile the size test would become a guard on the traced
    # shapes (a recompile each time it flips, and fullgraph compiles hit the recompile limit)
    if torch.compiler.is_compiling() or base.element_size() != 2 or base.numel() < min_elements:
        return False
    from . import _triton_merge

    n = base.shape[-1]
    return _triton_merge.try_fused_add_matmul_(base.view(-1, n), a.reshape(-1, a.shape[-1]), b, scale)


def _torch_add_matmul_(base, a, b, scale):
    if a.ndim != 2 or b.ndim != 2 or base.ndim != 2:
        return None
    if base.element_size() < 4:
        return _torch_add_matmul_widened_(base, a, b, scale)
    if not (base.dtype == a.dtype == b.dtype):
        return None
    # float32 / float64: addmm_ computes in base's own precision, one rounding
    return base.addmm_(a, b, alpha=scale)


# float32 working set per row block. CPU: small enough to stay in cache between the steps.
# GPU: large (an 8B model's biggest projection in one block), because each block costs host
# launches and a float32 product that fits in L2 saved less than the launches cost (H100:
# 0.33 ms for a 14336x4096 bf16 weight in one block, 0.36 ms in 32 MB blocks)
_WIDE_BLOCK_BYTES = 4 << 20
_WIDE_BLOCK_BYTES_GPU = 256 << 20


def _torch_add_matmul_widened_(base, a, b, scale):
    # A 16-bit base must not go through a 16-bit addmm_: cuBLAS rounds the product to 16 bits
    # before adding it (measured on an H100: 27 % of bf16 elements off, up to 128 ulp), and
    # 16-bit CPU GEMMs run at 0.1 GB/s without AMX. So the sum is formed in float32, one row
    # block at a time, and rounded once into base: the plain path's arithmetic, in place.
    # GPU: the block's product in float32, then base.add_(product, alpha), which computes in
    # float32 (two launches a block; ~0.25x copy bandwidth on an H100, where the 16-bit
    # addmm_ reaches 0.65x, wrongly). CPU: widen the block into a reused buffer, addmm_ there,
    # copy back (a mixed-dtype add_ measured 2x slower there).
    if not base.is_cpu:
        # CUDA with triton: one fused kernel, the same arithmetic (exact products, float32
        # sums, one round-to-nearest-even) with one read and one write of base (~copy speed).
        # Without triton, or where the kernel cannot run, the two-launch path below.
        from . import _triton_merge

        if _triton_merge.try_fused_add_matmul_(base, a, b, scale):
            return base
        rows = max(1, _WIDE_BLOCK_BYTES_GPU // (4 * max(1, base.shape[1])))
        for start in range(0, base.shape[0], rows):
            stop = min(start + rows, base.shape[0])
            base[start:stop].add_(_mm_float32(a[start:stop], b), alpha=scale)
        return base
    import torch

    a, b = a.float(), b.float()
    rows = max(1, _WIDE_BLOCK_BYTES // (4 * max(1, base.shape[1])))
    buffer = base.new_empty((min(rows, base.shape[0]), base.shape[1]), dtype=torch.float32)
    for start in range(0, base.shape[0], rows):
        stop = min(start + rows, base.shape[0])
        block, target = buffer[: stop - start], base[start:stop]
        block.copy_(target)
        block.addmm_(a[start:stop], b, alpha=scale)
        target.copy_(block)
    return base


def _torch_add_matmul_many_(bases, as_, bs, scales):
    # CUDA 16-bit weights of one shape: one Triton launch for all of them (_triton_merge);
    # the host's time per launch, not the GPU's, bounds a model's merge otherwise. Items are
    # grouped by everything the launch needs to share; a group of one, or one the kernel
    # does not take, is left to the caller's one-by-one path.
    done = [False] * len(bases)
    groups: dict[tuple, list[int]] = {}
    for i, (base, a, b) in enumerate(zip(bases, as_, bs)):
        if base.ndim != 2 or a.ndim != 2 or b.ndim != 2 or base.element_size() != 2:
            continue  # (the kernel's own test turns CPU tensors away, but under its interpreter)
        key = (base.shape, base.stride(), base.dtype, a.shape, a.stride(), a.dtype, b.shape, b.stride(),
               b.dtype, base.device)
        groups.setdefault(key, []).append(i)
    if not groups:
        return done
    from . import _triton_merge

    for members in groups.values():
        if len(members) > 1 and _triton_merge.try_fused_add_matmul_many_(
                [bases[i] for i in members], [as_[i] for i in members], [bs[i] for i in members],
                [scales[i] for i in members], grouped=True):
            for i in members:
                done[i] = True
    return done


def _torch_add_matmul_stacked_(bases, a, b, scales):
    # CUDA 16-bit weights (or the kernel's interpreter in tests): one Triton launch
    if not bases or bases[0].ndim != 2 or bases[0].element_size() != 2:
        return False
    from . import _triton_merge

    return _triton_merge.try_fused_add_matmul_stacked_(bases, a, b, scales)


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) works here (cleared on the first failure)


def _mm_float32(a, b):
    """``a @ b`` accumulated and returned in float32; 16-bit operands read as they are where
    torch can (``out_dtype``, torch ≥ 2.8 on CUDA: exact products, float32 sums, as widening
    first, without the widened copies)."""
    import torch

    if _MM_OUT_DTYPE[0] and a.dtype == b.dtype and a.element_size() == 2:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return torch.mm(a.float(), b.float())


def _mlx_add_matmul(base, a, b, scale, overwrite=False):
    import mlx.core as mx

    return mx.addmm(base, a, b, alpha=scale)


CAPABILITIES: dict[str, dict[str, Callable[..., Any]]] = {
    "stop_gradient": {
        "torch": _torch_stop_gradient,
        "jax": _jax_stop_gradient,
        "mlx": _mlx_stop_gradient,
    },
    "add_matmul": {
        "torch": _torch_add_matmul,
        "mlx": _mlx_add_matmul,
    },
    "add_matmul_": {
        "torch": _torch_add_matmul_,
    },
    "add_matmul_many_": {
        "torch": _torch_add_matmul_many_,
    },
    "add_matmul_stacked_": {
        "torch": _torch_add_matmul_stacked_,
    },
    "linear_lora": {
        # (x, W, A, B, scale, bias) -> y or None: the kernel's own tests decide, cheapest
        # first, and it declines under torch.compile tracing (no graph break)
        "torch": _triton_linear.try_lora_linear,
    },
}


def _lookup(capability: str, xp: Any):
    return CAPABILITIES[capability].get(namespace_family(xp))


def resolve(capability: str, xp: Any) -> Callable[..., Any] | None:
    """``xp``'s native implementation of ``capability``, or ``None``: for hot paths that
    resolve it once (a layer's forward) instead of on every call."""
    return _lookup(capability, xp)


def fused_available(capability: str, xp: Any) -> bool:
    """Whether ``xp`` has a native implementation of ``capability`` in the table."""
    return _lookup(capability, xp) is not None


def stop_gradient(xp: Any, x: Any) -> Any:
    """``x`` with gradients stopped; the identity where the library has no autograd."""
    fn = _lookup("stop_gradient", xp)
    return x if fn is None else fn(x)


def add_matmul(xp: Any, base: Any, a: Any, b: Any, *, scale: float = 1.0, fused: bool = True,
               overwrite: bool = False) -> Any:
    """``base + scale · (a @ b)``, through the framework's fused call when ``fused`` and available.

    ``a`` may have leading batch axes (``(..., n, k) @ (k, m)``); the plain path scales ``a``
    (put the smaller operand first) and the fused path passes ``scale`` as ``alpha``.
    ``overwrite=True`` says ``base`` is a temporary of the caller's: the fused path may write
    the result into it (torch: ``addmm_``) instead of into a new array. Either way, use the
    returned array.

    >>> import numpy as np
    >>> add_matmul(np, np.zeros((1, 2)), np.ones((1, 3)), np.ones((3, 2)), scale=0.5)
    array([[1.5, 1.5]])
    """
    fn = _lookup("add_matmul", xp) if fused else None
    if fn is None:
        return base + scaled_matmul(xp, a, b, scale)
    return fn(base, a, b, scale, overwrite)


def scaled_matmul(xp: Any, a: Any, b: Any, scale: float) -> Any:
    """``scale · (a @ b)``, the scale applied to ``a`` (put the smaller operand first).

    In float16 (largest value 65504) an intermediate may overflow where the result fits: with
    ``|scale| > 1`` it is ``a · scale`` (a LoRA's rank-sized ``x @ Aᵀ`` is the activations'
    size), so the product is scaled instead; with ``|scale| ≤ 1`` it would be the unscaled
    product, so ``a`` is. Either way no intermediate exceeds the inputs or the result.
    """
    if scale == 1.0:
        return a @ b
    half = getattr(xp, "float16", None)  # not in the standard (array_api_strict lacks it)
    if half is not None and a.dtype == half and abs(scale) > 1.0:
        return (a @ b) * scale
    return (a * scale) @ b


def add_matmul_(xp: Any, base: Any, a: Any, b: Any, *, scale: float = 1.0, fused: bool = True) -> Any:
    """``base + scale · (a @ b)``, written into ``base`` where the framework can do it in place.

    Returns ``base`` itself when it was updated in place (2-D operands of ``base``'s dtype, on
    a framework with an in-place fused call: torch), else ``None``: the caller then takes the
    out-of-place path. Never changes ``base`` when it returns ``None``.
    """
    fn = _lookup("add_matmul_", xp) if fused else None
    return None if fn is None else fn(base, a, b, scale)


def add_matmul_many_(xp: Any, bases: list, as_: list, bs: list, *, scales: list, fused: bool = True) -> list[bool]:
    """:func:`add_matmul_` for many operand triples at once, batched where the framework can.

    Returns one flag per item: ``True`` where ``bases[i]`` now holds ``bases[i] + scales[i] ·
    (as_[i] @ bs[i])`` (written in place), ``False`` where it was left untouched: the caller
    then takes :func:`add_matmul_` (or the out-of-place path) for that item.
    """
    fn = _lookup("add_matmul_many_", xp) if fused else None
    return [False] * len(bases) if fn is None else fn(bases, as_, bs, scales)


def add_matmul_stacked_(xp: Any, bases: list, a: Any, b: Any, *, scales: list, fused: bool = True) -> bool:
    """Every ``bases[i] + scales[i] · (a[i] @ b[i])`` written into ``bases[i]``, the operands
    stacked (``a`` (count, m, k), ``b`` (count, k, n)), where the framework does them all at
    once; ``True`` when done, ``False`` with every base untouched: the caller then takes
    :func:`add_matmul_many_` (or one by one) on ``a[i]``, ``b[i]``."""
    fn = _lookup("add_matmul_stacked_", xp) if fused else None
    return False if fn is None else bool(fn(bases, a, b, scales))


def linear_lora(xp: Any, x: Any, W: Any, A: Any, B: Any, *, scale: float = 1.0, bias: Any = None,
                fused: bool = True) -> Any:
    """``x @ Wᵀ + bias + scale · (x @ Aᵀ) @ Bᵀ`` in one fused call where the framework has one
    that takes these operands (see the module docstring), else ``None``: the caller then takes
    the plain path (:func:`portable_lora.core.linear_forward` does both)."""
    fn = _lookup("linear_lora", xp) if fused else None
    return None if fn is None else fn(x, W, A, B, float(scale), bias)
