"""The LoRA linear forward ``y = x @ Wᵀ + bias + scale · (x @ Aᵀ) @ Bᵀ`` as one Triton kernel
(CUDA, 16-bit, inference).

Why a kernel: the unfused forward is the base GEMM plus two skinny, dependent LoRA GEMMs
(``x @ Aᵀ`` with N = r, then ``+ s · xa @ Bᵀ`` with K = r). At T ≤ 256 tokens the base GEMM
is memory-bound on W and the LoRA GEMMs add ~10 µs of their own on an H100 (1.3-1.7x the
plain linear in CUDA graphs), and in eager mode each of the three launches costs host time.
Here each program owns a ``BLOCK_M x BLOCK_N`` tile of y (tokens x output features) and, in
one K loop, accumulates both ``x @ W_tileᵀ`` and ``x @ Aᵀ`` (A is small and L2-resident,
read by every program), then adds ``s · xa @ B_tileᵀ`` and the bias in float32 and rounds once.
W is read once from DRAM: the time of the plain linear plus the L2 reads of A.

Arithmetic: 16-bit operands of one dtype (bfloat16 or float16) through ``tl.dot`` with float32
accumulators (exact products, float32 sums); ``xa`` is kept in float32 and enters the second
product as two 16-bit parts (``hi = fl16(s·xa)``, ``lo = fl16(s·xa - hi)``, two tensor-core
dots: ~16 significant bits of ``s·xa``, where the unfused path rounds ``xa`` to 16 bits); the
bias is added in float32; one round-to-nearest-even into y's dtype. So it is at least as
accurate as the unfused path (which rounds ``x @ Wᵀ + bias`` and ``xa`` to 16 bits first), and
the two differ by an ulp of y in some elements.

Where it runs (:func:`try_lora_linear`, else ``None`` and the caller takes the unfused path):
CUDA tensors of one device and one 16-bit dtype, W (N, K), A (r, K), B (N, r), bias (N,) or
none, x (..., K) (any strides; reshaped to (M, K)), r ≤ 128, 1 ≤ M ≤ :data:`MAX_TOKENS` (and,
for r > :data:`WIDE_RANK`, M ≤ :data:`WIDE_MAX_TOKENS` in a layer of more than two waves of
64 x 64 output tiles or while a CUDA graph is being captured), no autograd to record (grad
mode off, or nothing requires grad), and ``PORTABLE_LORA_TRITON`` not ``0``.

Under ``torch.compile``: where :func:`register_op` has run (``portable_lora.torch`` does it at
import) and triton is installed, a traced call with operands the kernel may take (one 16-bit
dtype, CUDA, 2-D factors, r ≤ 128, no autograd to record) becomes one opaque custom op,
``torch.ops.portable_lora.linear_lora``, in the graph. With a CUDA build of torch the op is a
``torch.library.triton_op`` (:func:`_op_triton`): inductor launches the kernels from its own
generated code, and the op decides while it is traced, on the traced token count (guards: a
graph per token range), what the eager layer decides at run time: the fused kernel with the
eager call's tile config up to :data:`MAX_TOKENS` tokens (for r > :data:`WIDE_RANK` above
:data:`WIDE_MAX_TOKENS` only in small layers and outside CUDA graphs), elsewhere the eager
unfused path (``F.linear``, ``x @ Aᵀ``, the LoRA term
added into the output by ``_triton_merge``'s kernel). A compiled call then costs the host about
what the compiled plain linear does. Elsewhere (a CPU build; Triton's interpreter in the tests)
the op is a Python kernel behind the dispatcher that takes the kernel where the eager call
would, used up to those token counts (a guard on T), inductor's unfused ops above. A graph
saved with ``torch.export`` then holds the op too: import ``portable_lora.torch`` before
loading it, or export with ``PORTABLE_LORA_TRITON=0`` (set before that import) to keep plain
ATen ops only. With more tokens the layer is compute-bound, cuBLAS's GEMM beats a Triton GEMM,
and recomputing ``x @ Aᵀ`` in every column tile costs r/BLOCK_N extra MMA work: the unfused
path is faster there (measured: see the tile table below).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel runs on CPU tensors
through Triton's interpreter, for tests, with the interpreter's gaps worked around (as in
``_triton_merge``): 16-bit operands widened to float32 before ``tl.dot`` (its bfloat16 dot
multiplies bit patterns), ``xa`` kept whole in float32, the float32 -> bfloat16 rounding done
with integer ops (its cast truncates), and the K loop unrolled over a constant trip count (its
``range`` takes no runtime bound with numpy >= 2.4); ``TRITON_INTERPRET`` is read when this
module is imported. Nothing here imports torch or triton at import time.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _triton_launch, _triton_merge

__all__ = ["MAX_TOKENS", "MAX_RANK", "WIDE_RANK", "WIDE_MAX_TOKENS", "available", "supports",
           "config_for", "lora_linear", "try_lora_linear", "register_op"]

MAX_RANK = 128  # xa's float32 accumulator (BLOCK_M x r) stays in registers up to here
MAX_TOKENS = 256  # above this, the unfused path: cuBLAS's GEMM beats this kernel (see below)
# ranks above WIDE_RANK, above WIDE_MAX_TOKENS tokens: the kernel only in small layers (at most
# two waves of 64 x 64 output tiles) and outside CUDA graph capture (see try_lora_linear)
WIDE_RANK = 32
WIDE_MAX_TOKENS = 128

# Tiles (no autotuning pass on the first call), from benchmarks/bench_triton_linear.py --sweep
# on an H100 (the kernel alone in CUDA graphs, bf16, 4096->4096 and 4096->14336, r 16 and 64,
# against the plain linear and our unfused path):
# * up to 16 tokens: one 16-row tile of tokens (mma.sync), and column tiles as narrow as keeps
#   them to one wave on the SMs (4096 columns: 32 wide, 128 programs; 14336: 128 wide, 112
#   programs): each program streams its rows of W once, and a narrow tile re-reads A (r x K,
#   from L2) more often (r / BLOCK_N of W's bytes), a wide one leaves SMs idle. Kernel alone
#   vs the linear, T = 1 and 16: 0.98-1.07x (4096²), 1.05-1.09x (4096->14336), where the
#   unfused path takes 1.66-1.67x / 1.26-1.28x; other widths 1.13-2.8x;
# * 17-256 tokens: 64 x 64 tiles (wgmma), K blocks of 128 (r <= 32) or 64, while that makes at
#   most two waves; else 64 x 128 (r <= 32, if that makes at most two waves) or 128 x 128 (8
#   warps). Where 64 x 64 tiles would not fill the SMs once (at most half of them, or all of
#   them for r <= 32), 64 x 32 tiles, K blocks of 128, 4 stages: 4096², the kernel alone at
#   T = 64: 1.16x the linear at r 16 (64 x 64: 1.44x), 1.32x at r 64 (1.61x); T = 128, r 16:
#   1.36x (1.47x); at T = 128, r 64 (1.59x) and at T = 256 they measured slower (session 3). Every program recomputes x @ Aᵀ for its rows: r / BLOCK_N more MMA work, which is
#   what loses at large T and r. Kernel alone vs the linear (unfused): 4096², r 16: 1.45-1.49x
#   (1.69-1.75x) at T 32-256; r 64: 1.57-1.62x (1.72-1.76x) at T 32-128, 1.82x (1.65x) at T 256;
#   4096->14336, r 16: 1.02-1.08x (1.27-1.34x) at T 32-128, 1.32x (1.43x) at 256; r 64:
#   1.07-1.30x (1.27-1.35x) at T 32-128, 2.0-2.2x (1.42x) at 256. Hence r > 32 at T > 128 takes
#   the kernel only eagerly (outside CUDA graph capture) in layers of at most two waves of
#   64 x 64 tiles, where the host's time for the two launches it saves outweighs its longer GPU
#   time (eager, r 64, T 256: 4096², 36 µs against 69 µs unfused; 4096->14336, GPU-bound, 118
#   µs against 80 µs: the unfused path there);
# * above 256 tokens (lora_linear() only): 128 x 128 tiles; at T = 4096, 1.39-1.40x the linear
#   at r 16 (unfused 1.37-1.41x) and 2.4-2.5x at r 64: the unfused path there.
_SMALL_M = 16
_SMALL = {16: (256, 4, 4), 32: (256, 4, 4), 64: (256, 4, 3), 128: (128, 4, 3)}  # BLOCK_N -> K, warps, stages
_SMS_DEFAULT = 132  # an H100's SMs (the interpreter's stand-in for the device's count)
_SMEM_LIMIT = 220 * 1024  # bytes of shared memory a config may plan for (an H100 has 227 KB)


def config_for(m: int, n: int, k: int, r: int, sms: int = _SMS_DEFAULT) -> dict:
    """The tile config for ``m`` tokens (``n``, ``k``, ``r``: the layer's sizes; ``sms``: the
    device's multiprocessors); see the table above."""
    if m <= _SMALL_M:
        widths = sorted(_SMALL)
        bn = next((w for w in widths if -(-n // w) <= sms), widths[-1])
        bk, nw, ns = _SMALL[bn]
        cfg = (_SMALL_M, bn, bk, nw, ns)
    elif (tiles := -(-m // 64) * -(-n // 64)) <= 2 * sms:
        if 2 * tiles <= sms or (r <= WIDE_RANK and tiles <= sms):
            cfg = (64, 32, 128, 4, 4)  # under a wave of 64 x 64 tiles: narrower ones fill the SMs
        else:
            cfg = (64, 64, 128, 4, 3) if r <= WIDE_RANK else (64, 64, 64, 4, 4)
    elif r <= WIDE_RANK and -(-m // 64) * -(-n // 128) <= 2 * sms:
        cfg = (64, 128, 64, 4, 4)
    else:
        cfg = (128, 128, 64, 8, 3)
    bm, bn, bk, nw, ns = cfg
    # shared memory: a buffer of the x, W and A tiles per stage (stages - 1 of them with
    # mma.sync's 16-row tiles; an upper bound of what triton allocates). The largest ranks
    # would overflow it with the tiles above: fewer stages, then shorter K blocks
    br = _block_r(r)

    def smem(ns, bk):
        return (ns if bm >= 64 else ns - 1) * (bm + bn + br) * bk * 2

    while ns > 2 and smem(ns, bk) > _SMEM_LIMIT:
        ns -= 1
    while bk > 32 and smem(ns, bk) > _SMEM_LIMIT:
        bk //= 2
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}


_STATE: dict[str, Any] = {}  # "kernel", "launcher", "torch", "dtypes", "interpreted", "failed"
_torch: Any = None  # torch, once the kernel is loaded (the hot path's first test)
# TRITON_INTERPRET=1 when this module was imported: only then may a CPU tensor reach the kernel
# (the interpreter, for tests; it has to be set before triton is imported anyway), and the hot
# path turns every other CPU tensor away at its first test
_INTERPRET_AT_IMPORT = _triton_launch.interpret_env()


def _load():
    """The jitted kernel, or ``None`` where triton does not import (cached either way)."""
    global tl, _torch, _rtne_bf16
    if "kernel" in _STATE:
        return _STATE["kernel"]
    triton = _triton_launch.load()
    if triton is None:
        _STATE["kernel"] = None
        return None
    import torch

    tl = triton.language
    _rtne_bf16 = _triton_launch.rtne_bf16()
    kernel = _triton_launch.jit(_lora_linear_kernel)
    _STATE.update(torch=torch, dtypes=(torch.bfloat16, torch.float16), bf16=torch.bfloat16,
                  interpreted=_triton_launch.interpreted(), launcher=_triton_launch.Launcher(kernel, _NAMES))
    _STATE["kernel"] = kernel
    _torch = torch
    return kernel


def available(x: Any) -> bool:
    """Whether the kernel can run on ``x``'s device here: triton imports and ``x`` is a CUDA
    tensor, or ``TRITON_INTERPRET=1`` and ``x`` is on the CPU (tests)."""
    if _triton_launch.disabled_env():
        return False
    device = getattr(getattr(x, "device", None), "type", None)
    if device == "cpu" and not _triton_launch.interpret_env():
        return False  # cheap exit, before importing triton, for the common CPU case
    if device not in ("cuda", "cpu") or _load() is None or "failed" in _STATE:
        return False
    return (device == "cpu") == bool(_STATE["interpreted"])


def _shapes(x, W, A, B, bias, max_tokens: int | None = MAX_TOKENS) -> tuple[int, int, int, int] | None:
    """(M, N, K, r) where the operands chain and the kernel takes them (at most ``max_tokens``
    tokens: ``None``, any number), else ``None``. (The hot path: cheapest tests first.)"""
    dt = x.dtype
    if W.dtype is not dt or A.dtype is not dt or B.dtype is not dt or dt not in _STATE["dtypes"]:
        return None
    wshape, ashape, bshape, xshape = W.shape, A.shape, B.shape, x.shape
    if len(wshape) != 2 or len(ashape) != 2 or len(bshape) != 2 or not xshape:
        return None
    n, k = wshape
    r = ashape[0]
    if xshape[-1] != k or ashape[1] != k or bshape[0] != n or bshape[1] != r:
        return None
    if not 1 <= r <= MAX_RANK or k == 0 or n == 0:
        return None
    m = x.numel() // k
    if m < 1 or (max_tokens is not None and m > max_tokens):
        return None
    device = x.get_device()
    if W.get_device() != device or A.get_device() != device or B.get_device() != device:
        return None
    if bias is not None:
        if bias.dtype is not dt or bias.shape != (n,) or bias.get_device() != device:
            return None
        if bias.requires_grad and _STATE["torch"].is_grad_enabled():
            return None
    if _STATE["torch"].is_grad_enabled() and (x.requires_grad or W.requires_grad or A.requires_grad
                                              or B.requires_grad):
        return None  # the kernel has no backward: autograd records the unfused ops
    return m, n, k, r


def supports(x: Any, W: Any, A: Any, B: Any, bias: Any = None) -> bool:
    """Whether :func:`lora_linear` takes these operands (the device is :func:`available`'s
    business; :func:`try_lora_linear` also wants at most :data:`MAX_TOKENS` tokens)."""
    if _load() is None:
        return False
    return _shapes(x, W, A, B, bias, None) is not None


def lora_linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, *,
                config: dict | None = None) -> Any:
    """``x @ Wᵀ + bias + scale · (x @ Aᵀ) @ Bᵀ`` in one launch, shape ``(..., N)``, x's dtype.

    Any number of tokens (the :data:`MAX_TOKENS` threshold is :func:`try_lora_linear`'s
    policy). Raises ``RuntimeError`` where triton is missing and ``ValueError`` for operands
    it does not take (check :func:`available` and :func:`supports`). ``config`` overrides
    :func:`config_for`'s choice, key by key (benchmarks).
    """
    if _load() is None:
        raise RuntimeError("triton is not available")
    sizes = _shapes(x, W, A, B, bias, None)
    if sizes is None:
        raise ValueError(f"lora_linear: unsupported operands x {tuple(x.shape)} {x.dtype}, W {tuple(W.shape)} "
                         f"{W.dtype}, A {tuple(A.shape)}, B {tuple(B.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    return _launch(x, W, A, B, scale, bias, sizes, config)


def try_lora_linear(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None) -> Any:
    """:func:`lora_linear` where it applies (see the module docstring), else ``None``.

    The hot path of a LoRA layer's forward: its tests are ordered cheapest first, and the
    one that holds under ``torch.compile`` tracing (``is_compiling``) comes before anything
    dynamo would not trace. A kernel that fails to compile or launch fails before it writes
    anything: that failure is reported once as a ``RuntimeWarning`` and the kernel is not
    tried again in this process.
    """
    if not x.is_cuda and not _INTERPRET_AT_IMPORT:
        return None  # the common CPU case: nothing else to test, nothing imported
    # tracing first, and by a test that does not change once the kernel is loaded (a guard
    # on _torch would recompile the graph after the op's first run loaded it)
    if _IS_COMPILING is not None and _IS_COMPILING():
        return _traced_call(x, W, A, B, scale, bias)  # the op, or None: the unfused ops
    torch = _torch
    if torch is None:
        return _first_call(x, W, A, B, scale, bias)
    if _IS_COMPILING is None and torch.compiler.is_compiling():
        return None  # no op registered: a compiled graph keeps the unfused ops
    if not x.is_cuda and not (_STATE["interpreted"] and x.device.type == "cpu"):
        return None
    if "failed" in _STATE or _triton_launch.disabled_env():
        return None
    sizes = _shapes(x, W, A, B, bias)
    if sizes is None:
        return None
    m, n, r = sizes[0], sizes[1], sizes[3]
    if m > WIDE_MAX_TOKENS and r > WIDE_RANK and x.is_cuda and _wide_declines(
            m, n, x.get_device(), torch.cuda.is_current_stream_capturing):
        return None  # the unfused path is faster here (see the tile table)
    try:
        return _launch(x, W, A, B, scale, bias, sizes, None)
    except Exception as exc:  # noqa: BLE001 - any compile/launch failure: the unfused path
        _STATE["failed"] = repr(exc)
        import warnings

        warnings.warn(f"portable_lora: the Triton LoRA linear kernel failed ({exc!r}); using the "
                      "unfused forward from now on", RuntimeWarning, stacklevel=3)
        return None


def _first_call(x, W, A, B, scale, bias):
    import torch

    if torch.compiler.is_compiling():
        # (triton is loaded outside tracing only: the op loads it when it first runs)
        return _traced_call(x, W, A, B, scale, bias)
    if not available(x):
        return None  # (a CPU tensor never loads triton)
    return try_lora_linear(x, W, A, B, scale, bias)


# -- torch.compile: the layer as one opaque custom op ------------------------------------------------

_OP: Any = None  # torch.ops.portable_lora.linear_lora.default, once register_op() has run
_IS_COMPILING: Any = None  # torch.compiler.is_compiling, once register_op() has run
# "kind": "triton_op" or "python" (see register_op); "library": the torch.library.Library that
# owns a Python op; "torch", "dtypes", "xp"
_OP_STATE: dict[str, Any] = {}


def _traced_call(x, W, A, B, scale, bias):
    """While ``torch.compile`` traces: the custom op, where it may take these operands, else
    ``None`` (the unfused ops). Only tests that hold for every size: dtypes, devices, ranks,
    autograd (which dynamo guards on anyway); the op tests the sizes when it runs."""
    op = _OP
    if op is None:
        return None
    dt = x.dtype
    if dt not in _OP_STATE["dtypes"] or W.dtype != dt or A.dtype != dt or B.dtype != dt:
        return None
    if not (x.is_cuda or _INTERPRET_AT_IMPORT) or not (W.is_cuda == A.is_cuda == B.is_cuda == x.is_cuda):
        return None
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2 or x.dim() == 0 or not 1 <= A.shape[0] <= MAX_RANK:
        return None
    # a Python op (see register_op): the token count, a guard under dynamic shapes: above the
    # kernel's range the graph keeps the unfused ops (inductor compiles them). Run by a Python
    # op, that path measured up to 1.5x slower on an H100 than inductor's own graph at 4096
    # tokens (idle GPU between the calls, not slower kernels), where the eager call of the op
    # was not (benchmarks/NOTES.md §14). At most three graphs per layer shape: T = 1 (which
    # dynamo specialises anyway), 2..limit, and above; r > WIDE_RANK: a limit of
    # WIDE_MAX_TOKENS (the eager call takes the kernel up to MAX_TOKENS in small layers only).
    # A triton_op decides inside, while it is traced (_op_triton)
    if _OP_STATE["kind"] != "triton_op":
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if m > (MAX_TOKENS if A.shape[0] <= WIDE_RANK else WIDE_MAX_TOKENS):
            return None
    if bias is not None and (bias.dtype != dt or bias.dim() != 1):
        return None
    if _OP_STATE["torch"].is_grad_enabled() and (
            x.requires_grad or W.requires_grad or A.requires_grad or B.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None  # the op has no backward: autograd records the unfused ops
    return op(x, W, A, B, float(scale), bias)


def _op_impl(x, W, A, B, scale, bias):
    """The op at run time: the kernel where :func:`try_lora_linear` takes the operands, else
    the unfused forward (``F.linear``, then the LoRA term added into its output), as the eager
    layer runs them. Always contiguous, as the op's fake says."""
    out = try_lora_linear(x, W, A, B, scale, bias)
    if out is None:
        from . import lora

        torch = _OP_STATE["torch"]
        out = lora.add_lora_output(torch.nn.functional.linear(x, W, bias), x, A, B, scale,
                                   xp=_OP_STATE["xp"], overwrite=True)
    return out if out.is_contiguous() else out.contiguous()


def _op_fake(x, W, A, B, scale, bias):
    return x.new_empty((*x.shape[:-1], W.shape[0]))


def _op_triton(x, W, A, B, scale, bias):
    """The op as a ``torch.library.triton_op`` (CUDA builds of torch): inductor sees the
    kernels through :func:`torch.library.wrap_triton` and launches them from its own generated
    code. Decided while it is traced, on the traced sizes (its thresholds become guards, a
    graph per token range), as the eager layer decides: up to :data:`MAX_TOKENS` tokens (for
    r > :data:`WIDE_RANK` above :data:`WIDE_MAX_TOKENS` only in small layers and outside CUDA
    graphs, :func:`_wide_declines`) the fused kernel with the tile config the eager call
    takes (:func:`config_for`); with more tokens the eager unfused path,
    ``F.linear`` and ``x @ Aᵀ``, then ``s · xa @ Bᵀ`` added into the output by the merge kernel
    (from 2**23 output elements, else ``addmm_``). Operands the kernel does not take (only a
    direct call passes them: the traced forward emits the op where it does) go through the
    unfused ops."""
    torch = _OP_STATE["torch"]
    sizes = _shapes(x, W, A, B, bias, None) if "failed" not in _STATE else None
    if sizes is not None:
        m, n, k, r = sizes
        if m <= MAX_TOKENS and not (m > WIDE_MAX_TOKENS and r > WIDE_RANK
                                    and _wide_declines(m, n, x.get_device(), _inductor_cudagraphs)):
            has_bias = bias is not None
            grid, constexprs, num_warps, num_stages = _plan(m, n, k, r, x.dtype, has_bias, None, x.get_device())
            x2 = x.reshape(m, k)
            y = x.new_empty((*x.shape[:-1], n))
            wrap_triton(_KERNEL)[grid](
                x2, W, A, B, bias if has_bias else y, y, m, n, k, r, x2.stride(0), x2.stride(1), W.stride(0),
                W.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), bias.stride(0) if has_bias else 0,
                n, scale, **dict(zip(_NAMES, constexprs)), num_warps=num_warps, num_stages=num_stages)
            return y
    y = torch.nn.functional.linear(x, W, bias)
    from . import capabilities, lora

    large = y.numel() >= capabilities._TRITON_ADD_MIN_ELEMENTS
    if sizes is not None and large and _MERGE_KERNEL is not None and "failed" not in _triton_merge._STATE:
        _add_into(y.view(m, n), x.reshape(m, k) @ A.T, B.T, scale)
        return y
    # below the merge kernel's size, into F.linear's output as eagerly (addmm_); above it out of
    # place: the capability's in-place Triton add reads addresses, which a traced tensor has not
    return lora.add_lora_output(y, x, A, B, scale, xp=_OP_STATE["xp"], overwrite=not large)


def _wide_declines(m: int, n: int, device: int, graphed) -> bool:
    """For r > WIDE_RANK above WIDE_MAX_TOKENS tokens (see the tile table): whether the
    unfused path runs instead of the kernel, in a layer of more than two waves of 64 x 64
    tiles, or where ``graphed()`` says the launch will be replayed from a CUDA graph (eagerly:
    a capture in progress; under ``torch.compile``: inductor's cudagraphs)."""
    return -(-m // 64) * -(-n // 64) > 2 * _sms(device) or bool(graphed())


def _inductor_cudagraphs() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.triton.cudagraphs)


def _add_into(base, a, b, scale):
    """``base += scale · a @ b`` (16-bit, ``base`` row-major, ``a`` (M, r), ``b`` (r, N)) by
    the merge kernel through ``wrap_triton``, planned as ``capabilities._triton_add_``'s
    launch is (``_triton_merge.plan``)."""
    grid, sizes, constexprs, cfg = _triton_merge.plan(base, a, b)
    wrap_triton(_MERGE_KERNEL)[grid](base, a, b, base, *sizes, scale, **dict(zip(_triton_merge._NAMES, constexprs)),
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# where the op is a triton_op: the jitted kernel and torch.library.wrap_triton, module globals
# called by these names (torch finds the op's kernels in its source: their code is part of the
# compiled-graph caches' keys)
_KERNEL: Any = None
_MERGE_KERNEL: Any = None  # _triton_merge's in-place add, for the unfused path above the range
wrap_triton: Any = None


def register_op() -> bool:
    """Define ``torch.ops.portable_lora.linear_lora(x, W, A, B, scale, bias)`` (once per
    process) and let traced forwards use it (see the module docstring). Nothing is defined,
    and ``False`` is returned, where triton is not installed (the op would only ever run the
    unfused ops, which inductor compiles better) or ``PORTABLE_LORA_TRITON=0``.

    With a CUDA build of torch (and ``torch.library.triton_op``), the op is a triton_op
    (:func:`_op_triton`; triton is imported here): inductor launches the kernel from its own
    generated code. A compiled call then costs the host about what the compiled plain linear
    does (H100, one explore run: 1.00-1.18x it at 1-256 tokens, against 1.21-1.47x for a Python
    op; benchmark runs on noisier hosts 1.01-1.38x; benchmarks/NOTES.md §15). Elsewhere (a
    CPU build, or Triton's interpreter in the tests) a Python kernel behind the dispatcher
    (:func:`_op_impl`), which imports nothing until it first runs."""
    global _OP, _IS_COMPILING, _KERNEL, _MERGE_KERNEL, wrap_triton
    if _OP is not None:
        return True
    import importlib.util

    if _triton_launch.disabled_env() or importlib.util.find_spec("triton") is None:
        return False
    import torch

    from .namespace import array_namespace

    _OP_STATE.update(torch=torch, dtypes=(torch.bfloat16, torch.float16), xp=array_namespace(torch.empty(0)))
    schema = "(Tensor x, Tensor W, Tensor A, Tensor B, float scale, Tensor? bias) -> Tensor"
    triton_op = getattr(torch.library, "triton_op", None)
    if (triton_op is not None and torch.backends.cuda.is_built() and not _triton_launch.interpret_env()
            and _load() is not None):
        _KERNEL = _STATE["kernel"]
        _MERGE_KERNEL = _triton_merge._load()
        wrap_triton = torch.library.wrap_triton
        _OP_STATE["kind"] = "triton_op"
        # the schema from real annotations (this module's are strings)
        _op_triton.__annotations__ = {"x": torch.Tensor, "W": torch.Tensor, "A": torch.Tensor, "B": torch.Tensor,
                                      "scale": float, "bias": Optional[torch.Tensor], "return": torch.Tensor}
        triton_op("portable_lora::linear_lora", _op_triton, mutates_args=())
    else:
        lib = torch.library.Library("portable_lora", "FRAGMENT")
        lib.define("linear_lora" + schema)
        # one Python kernel for every device (the CPU: the interpreter's tests, and the
        # unfused ops for anything else): the dispatcher calls it directly, no wrapper
        lib.impl("linear_lora", _op_impl, "CompositeExplicitAutograd")
        torch.library.register_fake("portable_lora::linear_lora", _op_fake, lib=lib)
        _OP_STATE.update(library=lib, kind="python")
    _OP = torch.ops.portable_lora.linear_lora.default
    _IS_COMPILING = torch.compiler.is_compiling
    return True


_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "NUM_K", "EVEN_K", "HAS_BIAS", "WIDEN",
          "RTNE_BF16_BY_HAND")


def _block_r(r: int) -> int:
    return 16 if r <= 16 else 32 if r <= 32 else 64 if r <= 64 else 128


_PLANS: dict = {}  # the launch plan per call signature (see _launch)


def _sms(device: int) -> int:
    """The device's multiprocessor count (cached; the default under the interpreter)."""
    sms = _STATE.setdefault("sms", {})
    if device not in sms:
        sms[device] = (_STATE["torch"].cuda.get_device_properties(device).multi_processor_count
                       if device >= 0 else _SMS_DEFAULT)
    return sms[device]


def _plan(m, n, k, r, dtype, has_bias, config, device):
    """(grid, constexprs, num_warps, num_stages) for one call signature."""
    cfg = config_for(m, n, k, r, _sms(device))
    if config is not None:
        cfg = dict(cfg, **config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    interpreted = _STATE["interpreted"]
    constexprs = (bm, bn, bk, _block_r(r),
                  -(-k // bk) if interpreted else 0,  # NUM_K: the unrolled trip count (interpreter)
                  bool(k % bk == 0),  # EVEN_K (a guard where k is a traced size)
                  has_bias,
                  interpreted,  # WIDEN
                  interpreted and dtype is _STATE["bf16"])  # RTNE_BF16_BY_HAND
    grid = (-(-m // bm) * -(-n // bn),)
    return grid, constexprs, cfg["num_warps"], cfg["num_stages"]


def _launch(x, W, A, B, scale, bias, sizes, config):
    m, n, k, r = sizes
    if x.is_contiguous():
        x2, sxm, sxk = x, k, 1  # rows of x, flattened over its leading axes
    else:
        x2 = x if x.dim() == 2 else x.reshape(m, k)  # a view where it can, else a copy
        sxm, sxk = x2.stride()
    y = x.new_empty((*x.shape[:-1], n))  # contiguous: (m, n) rows, stride n
    swn, swk = W.stride()
    sar, sak = A.stride()
    sbn, sbr = B.stride()
    has_bias = bias is not None
    sbias = bias.stride(0) if has_bias else 0
    dtype = x.dtype
    # the call signature: the layer's sizes and strides (fixed per layer), the token count
    # (at most MAX_TOKENS values on the hot path), the dtype; it fixes the tile plan and
    # every specialisation triton makes but the pointers' alignment
    # (beyond MAX_TOKENS, lora_linear() only: the token count by the class triton
    # specialises it by, and the plan, whose tiles and grid depend on it, made afresh)
    mkey = m if m <= MAX_TOKENS else -_triton_launch.int_class(m)
    device = y.get_device()
    key = (mkey, n, k, r, sxm, sxk, swn, swk, sar, sak, sbn, sbr, sbias, dtype, has_bias, device,
           None if config is None else tuple(sorted(config.items())))
    plan = _PLANS.get(key) if m <= MAX_TOKENS else None
    if plan is None:
        plan = _plan(m, n, k, r, dtype, has_bias, config, device)
        if m <= MAX_TOKENS:
            _PLANS[key] = plan
    grid, constexprs, nw, ns = plan
    launcher = _STATE["launcher"]
    pointers = (x2.data_ptr(), W.data_ptr(), A.data_ptr(), B.data_ptr(),
                bias.data_ptr() if has_bias else 0, y.data_ptr())
    # all 16-byte aligned (y, fresh from the caching allocator, is): the direct launch;
    # otherwise triton's ordinary launch (it specialises on the alignment itself)
    aligned = (pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4]) % 16 == 0
    lkey = (key, constexprs, nw, ns) if aligned else None
    entry = launcher.cached(lkey, device) if aligned else None
    scalars = (m, n, k, r, sxm, sxk, swn, swk, sar, sak, sbn, sbr, sbias, n, float(scale))
    if entry is not None:
        launcher.launch_cached(entry, grid, device, pointers + scalars, constexprs)
    else:
        tensors = (x2, W, A, B, bias if has_bias else y, y)
        launcher(grid, tensors + scalars, constexprs, nw, ns, lkey, device)
    return y


tl: Any = None  # triton.language, bound by _load() before the kernel is jitted
_rtne_bf16: Any = None  # _triton_launch.rtne_bf16(), bound by _load() before the kernel is jitted


def _lora_linear_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_bias, stride_ym,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, WIDEN: tl.constexpr,
    RTNE_BF16_BY_HAND: tl.constexpr,
):
    # one program per BLOCK_M x BLOCK_N tile of y, token tiles fastest: the programs that
    # share a tile of W run together, so W comes from DRAM once and from L2 after that
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    in_m = rm < M
    in_n = rn < N
    in_r = rr < R
    rm64 = rm.to(tl.int64)  # 64-bit offsets: big weights, and views with big strides
    rn64 = rn.to(tl.int64)
    x_ptrs = x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + rn64[:, None] * stride_wn + rk[None, :] * stride_wk  # (BN, BK)
    a_ptrs = a_ptr + rr[:, None].to(tl.int64) * stride_ar + rk[None, :] * stride_ak  # (BR, BK)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x @ W_tileᵀ (then everything)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # x @ Aᵀ, the whole rank
    # the K loop: a runtime trip count on the GPU (pipelined), a constant one under the
    # interpreter (NUM_K > 0), whose range() takes no runtime bound (and inline: the
    # interpreter turns every assigned value into a tensor)
    for i in range(NUM_K if NUM_K > 0 else tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=in_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=in_n[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=in_r[:, None], other=0.0)
        else:
            in_k = rk < K - i * BLOCK_K  # the tail of K reads zeros: they add nothing
            x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_n[:, None] & in_k[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=in_r[:, None] & in_k[None, :], other=0.0)
        if WIDEN:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        xa = tl.dot(x, tl.trans(a), xa, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    # + s · xa @ B_tileᵀ: B's tile read transposed, (BR, BN)
    bt = tl.load(b_ptr + rr[:, None] * stride_br + rn64[None, :] * stride_bn,
                 mask=in_r[:, None] & in_n[None, :], other=0.0)
    xa = xa * scale
    if WIDEN:
        acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision="ieee")
    else:
        # s·xa in two 16-bit parts, each an exact tensor-core product with B
        hi = xa.to(bt.dtype)
        lo = (xa - hi.to(tl.float32)).to(bt.dtype)
        acc = tl.dot(hi, bt, acc)
        acc = tl.dot(lo, bt, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn64 * stride_bias, mask=in_n, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]

    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn64[None, :]
    y_mask = in_m[:, None] & in_n[None, :]
    if RTNE_BF16_BY_HAND:
        res = _rtne_bf16(acc)  # interpreter only: its float32 -> bfloat16 cast truncates
    else:
        # the hardware conversion: round to nearest even (Triton's default for narrowing)
        res = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, res, mask=y_mask)
