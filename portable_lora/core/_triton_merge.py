"""The in-place 16-bit LoRA merge ``W += scale · (a @ b)`` as one Triton kernel (CUDA).

Why a kernel: for a bfloat16/float16 ``W`` the sum must be formed in float32 and rounded once
(a 16-bit ``addmm_`` rounds the product to 16 bits first; see ``capabilities``), and torch can
only do that in two passes: the float32 product written out, then ``W.add_(product)``, which
reads and writes ``W`` and reads the product (~0.26x copy bandwidth on an H100). The kernel
reads each tile of ``W`` once, forms the rank-K product for that tile in registers, adds, and
writes the tile once: the traffic of a copy.

Arithmetic (the plain path's, tile by tile):

* products exact and sums in float32: 16-bit factors of one dtype go through ``tl.dot`` in
  that dtype with a float32 accumulator (the product of two 16-bit numbers is exact in
  float32); any other mix (float32 factors, or two different 16-bit dtypes) is widened to
  float32 in registers and multiplied with ``input_precision="ieee"`` (never TF32);
* ``w_f32 + scale · acc`` in float32, rounded once to ``W``'s dtype, round-to-nearest-even.

K (the rank) is any size ≥ 1: one block of 16, 32 or 64 up to rank 64, else unrolled blocks
of 64 (of 16 for float32 factors), the tail masked to zeros. ``W`` may be any 2-D strided view without internal overlap (a row slice, a
transpose: a column-major ``W`` is merged as ``Wᵀ += scale · bᵀ @ aᵀ`` so its tiles stay
coalesced); offsets are 64-bit. Nothing here imports torch or triton at import time: the
first :func:`available` call imports triton (once; the result is cached). The import, the
switches and the low-overhead launch of the compiled kernel are ``_triton_launch``'s, shared
with the fused linear forward (``_triton_linear``).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel also runs on CPU
tensors through Triton's interpreter, for tests. Two interpreter gaps are worked around there
only, with the same arithmetic: its ``tl.dot`` multiplies bfloat16 operands as their raw bit
patterns (so 16-bit operands are widened to float32 first: exact, as on the GPU), and its
float32 -> bfloat16 cast truncates (so the round-to-nearest-even is done with integer ops).
"""

from __future__ import annotations

from typing import Any

from . import _triton_launch

__all__ = ["available", "supports", "fused_add_matmul_", "try_fused_add_matmul_", "try_fused_add_matmul_many_",
           "try_fused_add_matmul_stacked_", "config_for"]

# Tile choice: fixed, by the factors' kind (no autotuning pass on the first call). The merge
# is memory-bound: each W element is read and written once (4 bytes of traffic per bf16
# element) against 2·K flops, so a tile has to coalesce, amortise the (L2-resident) factor
# tiles, and leave enough programs to fill every SM many times over (a 4096 x 4096 weight is
# 2048 programs of 64 x 128 on 132 SMs). Kernel time alone on an H100 (CUDA graphs, bf16 W,
# against a copy of the same bytes; 4096 x 4096 / 14336 x 4096), from
# benchmarks/bench_triton_merge.py --sweep and the experiments behind it:
# * 16-bit factors, K <= 64 (one K block): 64 x 128, 8 warps: 0.98x / 0.99x at rank 16,
#   0.96x / 0.96x at 64 (4 warps: 0.89x-0.93x at 64; 128 x 128 or 64 x 256: 0.74x-0.82x);
# * 16-bit factors, K > 64 (two or more K blocks): 64 x 128, 4 warps: ~0.70x at rank 100,
#   ~0.50x at 256 (8 warps: 0.38x / 0.42x);
# * float32 factors (FMA dot, ieee): 32 x 128, 4 warps, K blocks of 16: 0.80x-0.83x at rank
#   16, ~0.35x at 64 (64 x 128 / 8 warps: 0.71x-0.74x at 16; K blocks of 32: slower).
_CONFIGS = {
    "16-bit": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "16-bit, K > 64": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    "float32": {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "BLOCK_K": 16},
}


def config_for(k: int, factors_16bit: bool) -> dict:
    """The launch config for rank ``k`` (see the table above)."""
    if not factors_16bit:
        return _CONFIGS["float32"]
    return _CONFIGS["16-bit"] if k <= 64 else _CONFIGS["16-bit, K > 64"]


_STATE: dict[str, Any] = {}  # "triton": module or False; "kernel": the jitted kernel

_interpret_env = _triton_launch.interpret_env
_disabled_env = _triton_launch.disabled_env


def _load():
    """The jitted kernel, or ``None`` where triton does not import (cached either way)."""
    if "kernel" in _STATE:
        return _STATE["kernel"]
    global tl, _rtne_bf16
    triton = _triton_launch.load()
    if triton is None:  # not installed, or a broken install: the plain path takes over
        _STATE["kernel"] = None
        return None
    import torch

    tl = triton.language
    _rtne_bf16 = _triton_launch.rtne_bf16()
    _STATE["triton"] = triton
    _STATE["torch"] = torch
    _STATE["bf16"] = torch.bfloat16
    _STATE["interpreted"] = _triton_launch.interpreted()  # fixed when triton was loaded
    _STATE["tl_types"] = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    kernel = _triton_launch.jit(_add_matmul_kernel)
    _STATE["launcher"] = _triton_launch.Launcher(kernel, _NAMES)
    _STATE["kernel"] = kernel
    return kernel


def available(base: Any) -> bool:
    """Whether the kernel can run on ``base``'s device here: triton imports and ``base`` is a
    CUDA tensor, or ``TRITON_INTERPRET=1`` and ``base`` is on the CPU (tests)."""
    if _disabled_env():
        return False
    device = getattr(getattr(base, "device", None), "type", None)
    if device not in ("cuda", "cpu"):
        return False
    if device == "cpu" and not _interpret_env():
        return False  # cheap exit, before importing triton, for the common CPU case
    if _load() is None or "failed" in _STATE:
        return False
    if device == "cpu":
        return bool(_STATE["interpreted"])
    return True


def _layout(t) -> str | None:
    """``"rows"`` (the columns' stride the smaller: tiles run along rows), ``"cols"`` (the
    transpose) or ``None`` (overlapping strides: an expanded view; the plain path decides)."""
    (m, n), (sm, sn) = t.shape, t.stride()
    if (m > 1 and sm <= 0) or (n > 1 and sn <= 0):
        return None
    if m <= 1 or n <= 1:
        return "rows"
    if sm >= sn:
        return "rows" if sm >= sn * n else None
    return "cols" if sn >= sm * m else None


_DTYPES: tuple = ()  # torch's bfloat16, float16, float32, once torch is imported


def _check(base: Any, a: Any, b: Any) -> str | None:
    """:func:`supports`, returning ``base``'s layout (see :func:`_layout`) or ``None``."""
    global _DTYPES
    if getattr(base, "ndim", None) != 2 or getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
        return None
    import torch

    if not _DTYPES:
        _DTYPES = (torch.bfloat16, torch.float16, torch.float32)
    if base.dtype not in _DTYPES or a.dtype not in _DTYPES or b.dtype not in _DTYPES:
        return None
    (m, n), (ma, k), (kb, nb) = base.shape, a.shape, b.shape
    if ma != m or nb != n or kb != k:
        return None
    device = base.device
    if a.device != device or b.device != device:
        return None
    if torch.is_grad_enabled() and (base.requires_grad or a.requires_grad or b.requires_grad):
        return None  # the kernel writes behind autograd's back; add_ records or refuses
    return _layout(base)


def supports(base: Any, a: Any, b: Any) -> bool:
    """Whether :func:`fused_add_matmul_` takes these operands (the device is :func:`available`'s
    business): 2-D, ``(M, K) @ (K, N)`` into ``(M, N)``, float16/bfloat16/float32 throughout,
    one device, no autograd to record, ``base`` without overlapping strides."""
    return _check(base, a, b) is not None


def _block_k(k: int) -> int:
    # 16-bit factors: one K block up to rank 64 (16 is the least tl.dot takes), then blocks of
    # 64 (unrolled; float32 factors set their own, in their config)
    return 16 if k <= 16 else 32 if k <= 32 else 64


def fused_add_matmul_(base: Any, a: Any, b: Any, scale: float = 1.0, *, config: dict | None = None) -> Any:
    """``base += scale · (a @ b)`` in one pass over ``base``; returns ``base``.

    ``base`` (M, N) bfloat16/float16/float32, ``a`` (M, K), ``b`` (K, N) float16/bfloat16/
    float32 in any mix. Exact products, float32 sums, one round-to-nearest-even into ``base``.
    Raises ``RuntimeError`` where triton is missing and ``ValueError`` for operands it does
    not take (check :func:`available` and :func:`supports` first). ``config`` overrides
    :func:`config_for`'s choice, key by key (benchmarks).
    """
    kernel = _load()
    if kernel is None:
        raise RuntimeError("triton is not available")
    layout = _check(base, a, b)
    if layout is None:
        raise ValueError("fused_add_matmul_: unsupported operands "
                         f"{tuple(base.shape)} {base.dtype} += {tuple(a.shape)} {a.dtype} @ {tuple(b.shape)} {b.dtype}")
    _launch(kernel, base, a, b, scale, config, layout)
    return base


def try_fused_add_matmul_(base: Any, a: Any, b: Any, scale: float) -> bool:
    """:func:`fused_add_matmul_` where it can run; ``False`` (``base`` untouched) where not.

    A kernel that fails to compile or launch (no C compiler for triton's launcher, a GPU
    triton does not support, ...) fails before it writes anything: that failure is reported
    once as a ``RuntimeWarning`` and the kernel is not tried again in this process.
    """
    if not available(base):
        return False
    layout = _check(base, a, b)
    if layout is None:
        return False
    try:
        _launch(_STATE["kernel"], base, a, b, scale, None, layout)
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure: the plain path
        _STATE["failed"] = repr(exc)
        import warnings

        warnings.warn(f"portable_lora: the Triton merge kernel failed ({exc!r}); using the "
                      "unfused merge from now on", RuntimeWarning, stacklevel=3)
        return False
    return True


_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_K", "WIDEN", "RTNE_BF16_BY_HAND", "GROUPED", "W_TY",
          "A_TY", "B_TY")


def _launch(kernel, base, a, b, scale, config, layout) -> None:
    w = base
    if layout == "cols":  # Wᵀ (row-major) += s · bᵀ @ aᵀ
        w, a, b = base.T, b.T, a.T
    if w.shape[0] == 0 or w.shape[1] == 0 or a.shape[1] == 0:
        return  # w + s·0 rounds to w itself
    aligned = (w.data_ptr() % 16 == 0, a.data_ptr() % 16 == 0, b.data_ptr() % 16 == 0)
    _run(w, a, b, (w, a, b, w, float(scale)), 1, aligned, config)


def plan(w, a, b, groups: int = 1, config: dict | None = None) -> tuple:
    """``(grid, sizes, constexprs, cfg)`` of a launch over ``groups`` weights shaped like ``w``
    (factors like ``a``, ``b``): the kernel's runtime arguments after its four pointers are
    ``*sizes, scale``, its constexprs ``constexprs`` in :data:`_NAMES` order, ``cfg`` the tile
    config with its warps and stages. Also what ``_triton_linear`` launches through
    ``wrap_triton`` (the forward's add under ``torch.compile``)."""
    m, n = w.shape
    k = a.shape[1]
    factors_16bit = a.dtype == b.dtype and a.element_size() == 2
    cfg = config_for(k, factors_16bit)
    if config is not None:
        cfg = dict(cfg, **config)
    interpreted = _STATE["interpreted"]
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_k = cfg.get("BLOCK_K") or _block_k(k)
    tiles = ((m + block_m - 1) // block_m) * ((n + block_n - 1) // block_n)
    grid = (tiles, groups) if groups > 1 else (tiles,)
    sw0, sw1 = w.stride()
    sa0, sa1 = a.stride()
    sb0, sb1 = b.stride()
    sizes = (m, n, k, sw0, sw1, sa0, sa1, sb0, sb1)
    grouped = groups > 1
    types = _STATE["tl_types"]
    constexprs = (block_m, block_n, block_k, (k + block_k - 1) // block_k,
                  interpreted or not factors_16bit,  # WIDEN
                  interpreted and w.dtype == _STATE["bf16"],  # RTNE_BF16_BY_HAND
                  grouped,
                  types[w.dtype] if grouped else None, types[a.dtype] if grouped else None,
                  types[b.dtype] if grouped else None)
    return grid, sizes, constexprs, cfg


def _run(w, a, b, pointers, groups, aligned, config) -> None:
    """Launch over ``groups`` weights shaped like ``w`` (factors like ``a``, ``b``);
    ``pointers``: (w, a, b, scale table, scale) as the kernel takes them, tensors or tables."""
    grid, sizes, constexprs, cfg = plan(w, a, b, groups, config)
    *tensors, scale = pointers
    args = (*tensors, *sizes, scale)
    # the direct launch's key (see _triton_launch): everything triton specialises on
    int_class = _triton_launch.int_class
    key = (constexprs, cfg["num_warps"], cfg["num_stages"], w.dtype, a.dtype, b.dtype, *aligned,
           *[int_class(v) for v in sizes])
    _STATE["launcher"](grid, args, constexprs, cfg["num_warps"], cfg["num_stages"], key,
                       None if _STATE["interpreted"] else w.device.index)


def try_fused_add_matmul_many_(bases: list, as_: list, bs: list, scales: list, *,
                                grouped: bool = False) -> bool:
    """Every ``bases[i] += scales[i] · (as_[i] @ bs[i])`` in one launch; ``True`` when done.

    For many weights of one shape (an 8B model's projections come in four shapes): one launch
    instead of one per weight, whose host time (~30-60 µs each on a slow host) would
    otherwise exceed the kernels' GPU time. Takes them where the kernel takes each one
    (:func:`supports`), with row-major tiles, and all of them have the same shapes, strides,
    dtypes and device, every address 16-byte aligned and no two weights overlapping in
    memory (tied weights: the launch would race); else ``False`` and nothing changes (the
    caller merges them one by one). Same arithmetic as :func:`fused_add_matmul_`, bit for bit.
    ``grouped=True``: the caller grouped them by shapes, strides, dtypes and device already
    (the capability does), and that test is not repeated per weight.
    """
    count = len(bases)
    if count == 0 or not (len(as_) == len(bs) == len(scales) == count) or not available(bases[0]):
        return False
    w, a, b = bases[0], as_[0], bs[0]
    if _check(w, a, b) != "rows":
        return False
    grad = _STATE["torch"].is_grad_enabled()
    as_ptrs, bs_ptrs = [], []  # the addresses, read once
    factors = (a.shape, a.stride(), a.dtype, b.shape, b.stride(), b.dtype)
    for ai, bi in zip(as_, bs):
        if not grouped and (ai.shape, ai.stride(), ai.dtype, bi.shape, bi.stride(), bi.dtype) != factors:
            return False
        if grad and (ai.requires_grad or bi.requires_grad):
            return False
        as_ptrs.append(ai.data_ptr())
        bs_ptrs.append(bi.data_ptr())
    ws = _weight_addresses(bases, grouped, grad)
    if ws is None or any((pa | pb) % 16 for pa, pb in zip(as_ptrs, bs_ptrs)):
        return False
    return _launch_table(w, a, b, ws, as_ptrs, bs_ptrs, scales)


def try_fused_add_matmul_stacked_(bases: list, a: Any, b: Any, scales: list) -> bool:
    """Every ``bases[i] += scales[i] · (a[i] @ b[i])`` in one launch, the factors stacked:
    ``a`` (count, M, K) and ``b`` (count, K, N), one tensor each (a merge uploads a group of
    same-shaped layers' factors as one block). :func:`try_fused_add_matmul_many_`'s launch,
    without a view or a check per factor: the stack is checked once (each member 16-byte
    aligned), the weights one by one (same shape, strides, dtype and device, aligned, not
    overlapping). ``False`` and nothing changes where the kernel does not take them."""
    count = len(bases)
    if (count == 0 or len(scales) != count or getattr(a, "ndim", None) != 3 or getattr(b, "ndim", None) != 3
            or a.shape[0] != count or b.shape[0] != count or not available(bases[0])):
        return False
    w, a0, b0 = bases[0], a[0], b[0]
    if _check(w, a0, b0) != "rows":
        return False
    grad = _STATE["torch"].is_grad_enabled()
    if grad and (a.requires_grad or b.requires_grad):
        return False
    step_a, step_b = a.stride(0) * a.element_size(), b.stride(0) * b.element_size()
    if (a.data_ptr() | b.data_ptr() | step_a | step_b) % 16:
        return False
    ws = _weight_addresses(bases, False, grad)
    if ws is None:
        return False
    import numpy as np

    steps = np.arange(count, dtype=np.int64)
    return _launch_table(w, a0, b0, ws, a.data_ptr() + step_a * steps, b.data_ptr() + step_b * steps, scales)


def _weight_addresses(bases: list, grouped: bool, grad: bool) -> list[int] | None:
    """The weights' addresses, or ``None`` where one launch cannot take them all: shapes,
    strides, dtype or device that differ from the first's (unless ``grouped``: the caller
    grouped them by those), one that autograd records, one not 16-byte aligned, or two
    that share memory (tied weights: one launch would race, one by one keeps them in order)."""
    w = bases[0]
    signature = (w.shape, w.stride(), w.dtype, w.device)
    ws = []
    for wi in bases:
        if not grouped and (wi.shape, wi.stride(), wi.dtype, wi.device) != signature:
            return None
        if grad and wi.requires_grad:
            return None
        pw = wi.data_ptr()
        if pw % 16:
            return None
        ws.append(pw)
    starts = sorted(ws)
    extent = ((w.shape[0] - 1) * w.stride(0) + (w.shape[1] - 1) * w.stride(1) + 1) * w.element_size()
    if any(hi - lo < extent for lo, hi in zip(starts, starts[1:])):
        return None
    return ws


def _launch_table(w, a, b, ws, as_ptrs, bs_ptrs, scales) -> bool:
    """One grouped launch over ``len(ws)`` weights shaped like ``w`` (factors like ``a``,
    ``b``), from their addresses; ``False`` where the kernel fails to compile or launch."""
    count = len(ws)
    if w.numel() == 0 or a.shape[1] == 0:
        return True  # w + s·0 rounds to w itself
    import numpy as np

    torch = _STATE["torch"]
    device = w.device
    # one table, one upload: rows of the weights', A's and B's addresses, then the float32
    # scales (rows of an even length: each row 16-byte aligned)
    width = count + count % 2
    host = np.zeros((4, width), dtype=np.int64)
    host[0, :count], host[1, :count], host[2, :count] = ws, as_ptrs, bs_ptrs
    host[3].view(np.float32)[:count] = scales
    table = torch.from_numpy(host)
    if device.type == "cuda":
        # pinned, and copied without waiting: the host does not stall on the GPU's queue
        table = table.pin_memory().to(device, non_blocking=True)
    scale_table = table[3].view(torch.float32)
    try:
        _run(w, a, b, (table[0], table[1], table[2], scale_table, 1.0), count, (True, True, True), None)
    except Exception as exc:  # noqa: BLE001 - a compile/launch failure: one by one instead
        _STATE["failed"] = repr(exc)
        import warnings

        warnings.warn(f"portable_lora: the Triton merge kernel failed ({exc!r}); using the "
                      "unfused merge from now on", RuntimeWarning, stacklevel=4)
        return False
    return True


tl: Any = None  # triton.language, bound by _load() before the kernel is jitted
_rtne_bf16: Any = None  # _triton_launch.rtne_bf16(), bound by _load() before the kernel is jitted


def _add_matmul_kernel(
    w_ptr, a_ptr, b_ptr, scale_ptr, M, N, K,
    stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
    WIDEN: tl.constexpr, RTNE_BF16_BY_HAND: tl.constexpr, GROUPED: tl.constexpr,
    W_TY: tl.constexpr, A_TY: tl.constexpr, B_TY: tl.constexpr,
):
    if GROUPED:
        # many weights of one shape, one per program_id(1): w_ptr, a_ptr and b_ptr are tables
        # of their addresses (each 16-byte aligned, which the host checked), scale_ptr of
        # their float32 scales
        g = tl.program_id(1).to(tl.int64)
        w_ptr = tl.multiple_of(tl.load(w_ptr + g).to(tl.pointer_type(W_TY)), 16)
        a_ptr = tl.multiple_of(tl.load(a_ptr + g).to(tl.pointer_type(A_TY)), 16)
        b_ptr = tl.multiple_of(tl.load(b_ptr + g).to(tl.pointer_type(B_TY)), 16)
        scale = tl.load(scale_ptr + g)
    # one program per BLOCK_M x BLOCK_N tile of W, column tiles fastest (neighbouring programs
    # stream neighbouring parts of the same rows)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = rm < M
    in_n = rn < N
    rm64 = rm.to(tl.int64)  # 64-bit offsets: a weight of more than 2**31 elements, or a view
    rn64 = rn.to(tl.int64)
    w_ptrs = w_ptr + rm64[:, None] * stride_wm + rn64[None, :] * stride_wn
    w_mask = in_m[:, None] & in_n[None, :]
    # the tile of W first: the one load that goes to DRAM, in flight while the product forms
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K in NUM_K blocks, unrolled (NUM_K = cdiv(K, BLOCK_K) is 1 for ranks up to 64): a loop
    # with a runtime bound measured 2x slower as a while loop (no pipelining), and Triton's
    # interpreter cannot take a runtime bound in range() with numpy >= 2.4
    for kb in tl.static_range(NUM_K):
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        in_k = rk < K  # the tail of K reads zeros: they add nothing to the sums
        x = tl.load(a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        y = tl.load(b_ptr + rk[:, None] * stride_bk + rn64[None, :] * stride_bn,
                    mask=in_k[:, None] & in_n[None, :], other=0.0)
        if WIDEN:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        # 16-bit x 16-bit: exact products, float32 accumulator; float32: ieee, never TF32
        acc = tl.dot(x, y, acc, input_precision="ieee")

    out = w.to(tl.float32) + scale * acc
    if RTNE_BF16_BY_HAND:
        res = _rtne_bf16(out)  # interpreter only: its float32 -> bfloat16 cast truncates
    else:
        # the hardware conversion: round to nearest even (Triton's default for narrowing)
        res = out.to(w_ptr.dtype.element_ty)
    tl.store(w_ptrs, res, mask=w_mask)
