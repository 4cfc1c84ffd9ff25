"""What the Triton kernels here share: the lazy import, the switches, jitting, and the
low-overhead launch of a compiled kernel (``_triton_merge``, ``_triton_linear``).

Nothing here imports torch or triton at import time: :func:`load` imports both, once, and
caches the result (``None`` where triton does not import). ``TRITON_INTERPRET=1`` must be set
before that first call for the kernels to run through Triton's interpreter (CPU tensors,
tests); it is read once, then fixed for the process.

The launch (:class:`Launcher`): Triton's own ``kernel[grid](...)`` re-derives the kernel's
specialisation from every argument on each call (~30 us of host time on an H100's host, more
than a memory-bound kernel takes on a 4096 x 4096 weight). A :class:`Launcher` keeps each
compiled kernel under that same specialisation, as a key its caller computes directly (per
pointer its dtype and 16-byte alignment, per integer :func:`int_class`, plus the constexprs and
launch options), and launches it as ``triton.runtime.jit`` does (triton 3.6; other versions,
the interpreter, and any installed launch hook take the ordinary launch).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["interpret_env", "disabled_env", "load", "jit", "rtne_bf16", "int_class", "Launcher"]

_SHARED: dict[str, Any] = {}  # "triton": module or None; "torch"; "interpreted"; "fast": bool


def interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# os.environ's own bytes dict on POSIX (what os.environ reads and writes through): a lookup
# there costs ~0.05 us against ~1 us for os.environ.get, and the fused forward reads the
# switch on every call
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_BYTES, dict):
    _ENV_BYTES = None


def disabled_env() -> bool:
    # escape hatch (and the tests' way to reach the plain paths): PORTABLE_LORA_TRITON=0
    if _ENV_BYTES is not None:
        return _ENV_BYTES.get(b"PORTABLE_LORA_TRITON") == b"0"
    return os.environ.get("PORTABLE_LORA_TRITON", "1") == "0"


def load():
    """``triton``, or ``None`` where it does not import (cached either way)."""
    if "triton" in _SHARED:
        return _SHARED["triton"]
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: the plain paths take over
        _SHARED["triton"] = None
        return None
    import torch

    _SHARED.update(triton=triton, torch=torch, interpreted=interpret_env(), fast=False)
    # the direct launch: only where its calling convention is the one read here, and never
    # under the interpreter
    if not _SHARED["interpreted"] and triton.__version__.split(".")[:2] == ["3", "6"]:
        try:
            from triton import knobs
            from triton.compiler import CompiledKernel

            _SHARED.update(fast=True, knobs=knobs, compiled_type=CompiledKernel,
                           stream=triton.runtime.driver.active.get_current_stream)
        except Exception:  # noqa: BLE001 - the ordinary launch
            _SHARED["fast"] = False
    return triton


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (fixed at :func:`load`)."""
    return bool(_SHARED.get("interpreted"))


def jit(fn):
    """``triton.jit(fn)`` for a kernel written with ``tl.constexpr`` annotations.

    The annotations are strings until triton is here (no import at module load); the JIT
    accepts them, the interpreter compares with the real object: give it that.
    """
    triton = load()
    tl = triton.language
    fn.__annotations__ = {name: tl.constexpr for name, ty in fn.__annotations__.items()
                          if "constexpr" in str(ty)}
    return triton.jit(fn)


tl: Any = None  # triton.language, bound by rtne_bf16() before its helper is jitted


def _rtne_bf16(x):
    # float32 -> bfloat16, round to nearest even, on the bit pattern; NaN stays (quiet) NaN
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).to(tl.uint16)
    nan = ((bits >> 16) | 0x0040).to(tl.uint16)
    return tl.where(x != x, nan, rounded).to(tl.bfloat16, bitcast=True)


def rtne_bf16():
    """The kernels' jitted float32 -> bfloat16 rounding for Triton's interpreter, whose own
    cast truncates (on the GPU the kernels use the hardware's round-to-nearest-even cast). A
    kernel module binds it to a global of its own before jitting its kernel, which calls it."""
    global tl
    if "rtne_bf16" not in _SHARED:
        triton = load()
        tl = triton.language
        _SHARED["rtne_bf16"] = triton.jit(_rtne_bf16)
    return _SHARED["rtne_bf16"]


def int_class(v: int) -> int:
    """How triton specialises an integer argument: 1 (baked in), or multiple of 16 and beyond
    32 bits, as a small int for a cache key."""
    return 1 if v == 1 else (v % 16 == 0) + 2 * (v >= 0x80000000) + 4


def _hooked(hook) -> bool:
    # a launch hook someone installed (a profiler): triton's own launch path calls it
    return hook is not None and bool(getattr(hook, "calls", True))  # 3.6: an empty HookChain


class Launcher:
    """Launches one jitted kernel; ``names``: its constexpr parameters, in signature order,
    after every runtime argument.

    ``launcher(grid, args, constexprs, num_warps, num_stages, key, device)`` launches (and,
    the first time for ``key``, compiles and caches) the kernel; a hot path may look the
    cached kernel up itself (:meth:`cached`) and launch it with :meth:`launch_cached`, with
    plain integers for the pointers (their ``data_ptr()``: the launcher then skips a Python
    call and a driver query per pointer).
    """

    def __init__(self, kernel, names: tuple[str, ...]):
        self.kernel, self.names = kernel, names
        self.compiled: dict | None = {} if _SHARED.get("fast") else None
        if self.compiled is not None:
            torch = _SHARED["torch"]
            self._current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
            self._runtime = _SHARED["knobs"].runtime
            self._stream = _SHARED["stream"]

    def cached(self, key: tuple, device: int):
        """The cached launch entry for ``key`` on ``device``, or ``None`` (not compiled yet, a
        launch hook installed, or no direct launch here)."""
        compiled = self.compiled
        if compiled is None:
            return None
        entry = compiled.get((device, key))
        if entry is None:
            return None
        runtime = self._runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            return None
        return entry

    def launch_cached(self, entry, grid: tuple, device: int, args: tuple, constexprs: tuple) -> None:
        """Launch ``entry`` (from :meth:`cached`) on ``device``'s current stream."""
        if device != self._current_device():
            torch = _SHARED["torch"]
            with torch.cuda.device(device):
                return self.launch_cached(entry, grid, device, args, constexprs)
        launch, function, metadata, coop, pdl = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if coop is None:  # through the compiled kernel's own runner (it allocates scratch)
            launch(grid[0], g1, g2, self._stream(device), function, metadata, None, None, None,
                   *args, *constexprs)
        else:  # straight into the C launcher: what the runner calls, less its Python frame
            launch(grid[0], g1, g2, self._stream(device), function, coop, pdl, None, None, metadata,
                   None, None, None, *args, *constexprs)

    def __call__(self, grid: tuple, args: tuple, constexprs: tuple, num_warps: int, num_stages: int,
                 key: tuple | None = None, device: int | None = None) -> None:
        """``kernel[grid](*args, **constexprs)``; ``key`` (with the launch options and
        constexprs already in it) identifies the specialisation, ``device`` the tensors' CUDA
        device index: both needed for the direct launch."""
        if self.compiled is None or key is None:
            self.kernel[grid](*args, **dict(zip(self.names, constexprs)), num_warps=num_warps,
                              num_stages=num_stages)
            return
        entry = self.cached(key, device)
        if entry is not None:
            return self.launch_cached(entry, grid, device, args, constexprs)
        if device != self._current_device():
            torch = _SHARED["torch"]
            with torch.cuda.device(device):
                return self(grid, args, constexprs, num_warps, num_stages, key, device)
        compiled = self.kernel[grid](*args, **dict(zip(self.names, constexprs)), num_warps=num_warps,
                                     num_stages=num_stages)
        if isinstance(compiled, _SHARED["compiled_type"]) and not (
                _hooked(self._runtime.launch_enter_hook) or _hooked(self._runtime.launch_exit_hook)):
            self.compiled[(device, key)] = _entry(compiled)


def _entry(compiled) -> tuple:
    """(launch, function, packed metadata, cooperative flag, PDL flag) of a compiled kernel:
    its C launcher where the kernel needs no scratch memory (coop/pdl ints), else its runner
    (coop None)."""
    run = compiled.run
    launch = getattr(run, "launch", None)
    if (launch is not None and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0
            and isinstance(getattr(run, "launch_cooperative_grid", None), (bool, int))
            and isinstance(getattr(run, "launch_pdl", None), (bool, int))):
        return (launch, compiled.function, compiled.packed_metadata, run.launch_cooperative_grid,
                run.launch_pdl)
    return (run, compiled.function, compiled.packed_metadata, None, None)
