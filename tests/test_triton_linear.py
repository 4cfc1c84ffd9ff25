"""The fused Triton LoRA linear forward (``core._triton_linear``, the torch entry of the
``linear_lora`` capability): ``y = x @ Wᵀ + bias + s · (x @ Aᵀ) @ Bᵀ`` in one launch, float32
sums, one rounding of y.

Each case is checked against the float64 result (the repo's bfloat16 tolerance, and, stricter:
equal to the float64 result rounded once for all but a few elements, and every element within
float32 accuracy of it, as ``test_triton_merge`` checks the merge) and against the
existing unfused path (``F.linear`` + the LoRA GEMMs, as ``LoraLinear`` runs it with the kernel
off), which must agree. On the CPU the kernel runs under Triton's interpreter, in a subprocess
(``TRITON_INTERPRET=1`` has to be set before triton is imported); on CUDA, in this process.

Triton missing: skipped, except where the run requires every backend
(``PORTABLE_LORA_REQUIRE_BACKENDS=all``, as CI sets) on Linux x86_64, where the dev extra
installs it: there a missing triton fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from portable_lora.testing import TOLERANCE, relative_error  # noqa: E402

from triton_worker import HAVE_TRITON, measure_cases, run_interpreted  # noqa: E402

# (name, dtype, T tokens, in K, out N, rank r, bias, scale, layout of x)
CASES = []
_RANKS = (1, 4, 16, 20, 64)
for _dt in ("bfloat16", "float16"):
    for _i, _t in enumerate((1, 5, 16, 33)):
        for _j, _r in enumerate(_RANKS):
            _bias = (_i + _j) % 2 == 0
            CASES.append((f"{_dt}-T{_t}-r{_r}-{'bias' if _bias else 'nobias'}", _dt, _t, 37, 53, _r, _bias,
                          1.75, "2d"))
CASES += [
    ("bfloat16-K300-odd", "bfloat16", 5, 300, 129, 16, True, 2.0, "2d"),  # a tail of K
    ("float16-K512-even", "float16", 1, 512, 70, 20, False, 0.5, "2d"),  # K in whole blocks
    ("bfloat16-3d", "bfloat16", 16, 64, 96, 8, True, 1.0, "3d"),  # (2, T/2, K)
    ("bfloat16-x-strided", "bfloat16", 5, 40, 33, 4, False, -1.25, "strided"),  # a column slice
    ("float16-x-transposed", "float16", 16, 48, 50, 16, True, 2.0, "transposed"),  # x = (K, T).T
    ("bfloat16-r128", "bfloat16", 16, 64, 40, 128, True, 0.25, "2d"),  # the largest rank taken
    ("bfloat16-T256", "bfloat16", 256, 64, 80, 16, True, 1.0, "2d"),  # MAX_TOKENS
]
NAMES = [c[0] for c in CASES]

# elements of y off the float64 result rounded once: the interpreter's float32 sums are
# sequential; on a GPU the tensor cores' float32 sums drop low bits, and at K = 4096 that moved
# 0.3 % (bfloat16) to 1.7 % (float16, elements that cancel) of elements by an ulp or a few,
# each still within float32 accuracy of the exact result (the "unexplained" check)
MAX_WRONG_SHARE = {"cpu": 2e-3, "cuda": 3e-2}


def allowed(n: int, device: str) -> float:
    """Elements of a 16-bit y that may be off the exact result rounded once (at least 4)."""
    return max(MAX_WRONG_SHARE[device] * n, 4)


def make_case(torch, case, device):
    """x (in its layout), W, A, B, bias, scale for one case, from a seed fixed by its name."""
    name, dt, t, k, n, r, has_bias, scale, layout = case
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if layout == "strided":
        x = torch.randn(t, k + 7, generator=g).to(dtype).to(device)[:, 3:3 + k]
    elif layout == "transposed":
        x = torch.randn(k, t, generator=g).to(dtype).to(device).T
    elif layout == "3d":
        x = torch.randn(2, t // 2, k, generator=g).to(dtype).to(device)
    else:
        x = torch.randn(t, k, generator=g).to(dtype).to(device)
    W = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    A = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype).to(device)
    B = (torch.randn(n, r, generator=g) * (0.5 / r ** 0.5)).to(dtype).to(device)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(device) if has_bias else None
    return x, W, A, B, bias, scale


def unfused(torch, x, W, A, B, bias, scale):
    """The existing path of ``LoraLinear.forward`` with the kernel off: F.linear, then the
    core's add of the LoRA term (x @ Aᵀ, then addmm / add)."""
    import torch.nn.functional as F

    from portable_lora import core
    from portable_lora.backends.torch import _XP

    return core.add_lora_output(F.linear(x, W, bias), x, A, B, scale, xp=_XP)


def measure(torch, case, device) -> dict:
    """Run the kernel and the unfused path on one case; the numbers :func:`problems` judges."""
    from portable_lora.core import _triton_linear

    x, W, A, B, bias, scale = make_case(torch, case, device)
    inputs = [t for t in (x, W, A, B, bias) if t is not None]
    before = [t.clone() for t in inputs]
    with torch.inference_mode():
        assert _triton_linear.available(x) and _triton_linear.supports(x, W, A, B, bias), case[0]
        got = _triton_linear.lora_linear(x, W, A, B, scale, bias)
        via = _triton_linear.try_lora_linear(x, W, A, B, scale, bias)  # the hot path: the same launch
        plain = unfused(torch, x, W, A, B, bias, scale)
    stats = {"inputs_untouched": all(torch.equal(a, b) for a, b in zip(inputs, before)),
             "shape": list(got.shape), "want_shape": [*x.shape[:-1], W.shape[0]],
             "dtype_ok": got.dtype == x.dtype and plain.dtype == x.dtype,
             "hot_path_same": via is not None and bool(torch.equal(via, got))}
    x64, W64, A64, B64 = x.double(), W.double(), A.double(), B.double()
    exact = x64 @ W64.T + scale * ((x64 @ A64.T) @ B64.T)
    if bias is not None:
        exact = exact + bias.double()
    rounded = exact.to(x.dtype)
    # the error bound of float32 sums in any order (doubled: tensor cores may truncate inside
    # their sums), |err| <= 2 (K + r + 4) 2^-24 (|x||W|ᵀ + |s| |x||A|ᵀ |B|ᵀ + |bias|), plus
    # s·xa's split into two 16-bit parts (2^-17 of the LoRA term's magnitude)
    lora_mag = abs(scale) * ((x64.abs() @ A64.abs().T) @ B64.abs().T)
    mag = x64.abs() @ W64.abs().T + lora_mag + (0 if bias is None else bias.double().abs())
    k, r = W.shape[1], A.shape[0]
    bound = 2 * (k + r + 4) * 2.0 ** -24 * mag + 2.0 ** -17 * lora_mag
    lo, hi = (exact - bound).to(x.dtype), (exact + bound).to(x.dtype)
    ulp = torch.finfo(x.dtype).eps * rounded.double().abs().clamp_min(torch.finfo(x.dtype).tiny)
    for label, res in (("kernel", got), ("plain", plain)):
        stats[label] = {
            "rel_err": relative_error(res.double().cpu().numpy(), exact.cpu().numpy()),
            "wrong": int((res != rounded).sum()),
            "max_ulp": float(((res.double() - rounded.double()).abs() / ulp).max()),
            # outside every rounding of a float32-accurate result: a real error
            "unexplained": int(((res < lo) | (res > hi)).sum()),
        }
    stats["vs_plain_rel"] = relative_error(got.double().cpu().numpy(), plain.double().cpu().numpy())
    stats["n"] = got.numel()
    stats["device"] = device
    return stats


def problems(case, stats) -> list[str]:
    """What is wrong with one case's numbers (empty: it passes)."""
    out = []
    if not stats["inputs_untouched"]:
        out.append("an input changed")
    if stats["shape"] != stats["want_shape"] or not stats["dtype_ok"]:
        out.append(f"shape {stats['shape']} (want {stats['want_shape']}) or dtype wrong")
    if not stats["hot_path_same"]:
        out.append("try_lora_linear did not give the kernel's result")
    tol = TOLERANCE["bfloat16"]
    for label in ("kernel", "plain"):
        if not stats[label]["rel_err"] <= tol:
            out.append(f"{label}: relative error {stats[label]['rel_err']:.3g} > {tol}")
    k = stats["kernel"]
    if k["wrong"] > allowed(stats["n"], stats["device"]):
        out.append(f"kernel: {k['wrong']}/{stats['n']} elements off the exact result rounded once")
    if k["wrong"] > stats["plain"]["wrong"] + 4:
        out.append(f"kernel: {k['wrong']} elements off the exact result rounded once, the unfused "
                   f"path {stats['plain']['wrong']}")
    if k["unexplained"]:
        out.append(f"kernel: {k['unexplained']} elements beyond float32 accuracy (max {k['max_ulp']:.2f} ulp)")
    # the project rule: the fused path and the plain path agree
    if not stats["vs_plain_rel"] <= tol:
        out.append(f"kernel vs unfused: relative difference {stats['vs_plain_rel']:.3g} > {tol}")
    return out


def layer_check(torch, device) -> dict:
    """``plt.apply`` on 16-bit ``nn.Linear`` layers: in inference mode the layer's forward is the
    kernel's result bit for bit; with gradients wanted (training) it takes the unfused ops;
    with ``PORTABLE_LORA_TRITON=0``, too; each agrees with the others. And the core's
    ``linear_forward``: the kernel through the capability, close to its plain path."""
    from portable_lora import examples
    from portable_lora import torch as plt
    from portable_lora.core import _triton_linear

    out = {}
    for dt in ("bfloat16", "float16"):
        dtype = getattr(torch, dt)
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 30, bias=False))
        model = model.to(device=device, dtype=dtype)
        adapter = examples.random_adapter({"0": (24, 40), "1": (30, 24)}, rank=4, seed=2)
        model = plt.apply(model, adapter, strength=0.8)
        x = torch.randn(3, 40).to(device=device, dtype=dtype)
        with torch.inference_mode():
            fused = model(x)
            layer = model[0]
            direct = _triton_linear.lora_linear(x, layer.base.weight, layer.lora_A, layer.lora_B,
                                                layer.scale, layer.base.bias)
            first = model[0](x)
            os.environ["PORTABLE_LORA_TRITON"] = "0"
            try:
                plain = model(x)
            finally:
                del os.environ["PORTABLE_LORA_TRITON"]
            # the core's linear_forward: through the capability (the kernel) and the plain path
            from portable_lora import core

            args = (x, layer.base.weight, layer.lora_A, layer.lora_B, layer.scale, layer.base.bias)
            core_fused = core.linear_forward(*args)
            core_plain = core.linear_forward(*args, fused=False)
        trained = model(x)  # gradients on: lora_A/B require grad, the unfused ops record them
        trained.float().sum().backward()
        out[dt] = {
            "core_fused_is_kernel": bool(torch.equal(core_fused, direct)),
            "core_fused_vs_plain": relative_error(core_fused.double().cpu().numpy(),
                                                  core_plain.double().cpu().numpy()),
            "layer_is_kernel": bool(torch.equal(first, direct)),
            "fused_vs_plain": relative_error(fused.double().cpu().numpy(), plain.double().cpu().numpy()),
            "train_vs_plain": relative_error(trained.detach().double().cpu().numpy(),
                                             plain.double().cpu().numpy()),
            "grad_ok": model[0].lora_A.grad is not None and bool(torch.isfinite(model[0].lora_A.grad).all()),
            "train_has_grad_fn": trained.grad_fn is not None,
        }
    return out


def declines(torch, device) -> dict:
    """Operands the kernel does not take: ``try_lora_linear`` returns None (no launch)."""
    from portable_lora.core import _triton_linear as tlin

    dt = torch.bfloat16
    x, W = torch.ones(3, 8, dtype=dt, device=device), torch.ones(6, 8, dtype=dt, device=device)
    A, B = torch.ones(2, 8, dtype=dt, device=device), torch.ones(6, 2, dtype=dt, device=device)
    big = torch.ones(tlin.MAX_TOKENS + 1, 8, dtype=dt, device=device)
    r_big = torch.ones(tlin.MAX_RANK + 1, 8, dtype=dt, device=device)
    cases = {
        "float32": (x.float(), W.float(), A.float(), B.float(), None),
        "mixed dtypes": (x, W, A.float(), B.float(), None),
        "shapes that do not chain": (x, W, A, B[:, :1], None),
        "bias of the wrong size": (x, W, A, B, torch.ones(5, dtype=dt, device=device)),
        "too many tokens": (big, W, A, B, None),
        "rank above MAX_RANK": (x, W, r_big, torch.ones(6, tlin.MAX_RANK + 1, dtype=dt, device=device), None),
        "no tokens": (x[:0], W, A, B, None),
    }
    out = {}
    with torch.inference_mode():
        for label, (xx, ww, aa, bb, bias) in cases.items():
            out[label] = tlin.try_lora_linear(xx, ww, aa, bb, 1.0, bias) is None
    leaf = A.clone().requires_grad_()
    out["grad wanted"] = tlin.try_lora_linear(x, W, leaf, B, 1.0, None) is None
    with torch.no_grad():
        out["no_grad takes it"] = tlin.try_lora_linear(x, W, leaf, B, 1.0, None) is not None
    os.environ["PORTABLE_LORA_TRITON"] = "0"
    try:
        with torch.inference_mode():
            out["PORTABLE_LORA_TRITON=0"] = tlin.try_lora_linear(x, W, A, B, 1.0, None) is None
    finally:
        del os.environ["PORTABLE_LORA_TRITON"]
    return out


def compile_check(torch, device) -> dict:
    """Under ``torch.compile(fullgraph=True)`` the layer traces with no graph break into one
    ``portable_lora::linear_lora`` op (inference), which gives the eager layer's result bit for
    bit (the kernel's). Compiled with inductor and ``dynamic=True``, one graph serves T = 2 to
    MAX_TOKENS (a Python op; a triton_op: one per tile config) and one more the longer inputs
    (unfused ops, equal to the eager unfused path within rounding: inductor's, or, for a
    triton_op, the eager path's inside the op). With autograd to record, the graph keeps the unfused ops and gradients
    reach the factors."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from portable_lora import examples
    from portable_lora import torch as plt
    from portable_lora.core import _triton_linear

    torch._dynamo.reset()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12)).to(device=device, dtype=torch.bfloat16)
    model = plt.apply(model, examples.random_adapter({"0": (12, 16)}, rank=4, seed=1))
    layer = model[0]
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def ops(gm):
        return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})

    out: dict = {"op_registered": _triton_linear._OP is not None, "op_kind": _triton_linear._OP_STATE.get("kind")}
    # torch.library's own checks of the op: schema, fake (shapes and strides against the real
    # kernel's output), autograd registration, and AOT dispatch with dynamic shapes
    opcheck = {}
    bf16 = {"device": device, "dtype": torch.bfloat16}
    Wc, Ac, Bc, bc = (torch.randn(12, 16).to(**bf16), torch.randn(4, 16).to(**bf16),
                      torch.randn(12, 4).to(**bf16), torch.randn(12).to(**bf16))
    for label, args in (("2d bias", (torch.randn(3, 16).to(**bf16), Wc, Ac, Bc, 2.0, bc)),
                        ("3d", (torch.randn(3, 1, 16).to(**bf16), Wc, Ac, Bc, 0.5, None)),
                        ("unfused T300", (torch.randn(300, 16).to(**bf16), Wc, Ac, Bc, 1.0, None))):
        results = torch.library.opcheck(_triton_linear._OP, args)
        opcheck[label] = sorted(k for k, v in results.items() if v != "SUCCESS")
    out["opcheck_failures"] = opcheck
    x = torch.randn(2, 16).to(device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(x)
        out["graph_breaks"] = explanation.graph_break_count
        got = torch.compile(model, fullgraph=True, backend=capture)(x)
        out["traced_ops"] = ops(graphs[-1])
        out["equal_eager"] = bool(torch.equal(got, model(x)))
        out["eager_is_kernel"] = bool(torch.equal(model(x), _triton_linear.lora_linear(
            x, layer.base.weight, layer.lora_A, layer.lora_B, layer.scale, layer.base.bias)))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True, dynamic=True)  # inductor
        equal, frames = [], []
        for shape in ((2, 16), (7, 16), (256, 16), (3, 5, 16)):
            xs = torch.randn(*shape).to(device=device, dtype=torch.bfloat16)
            equal.append(bool(torch.equal(compiled(xs), model(xs))))
            frames.append(int(counters["stats"]["unique_graphs"]))
        out["inductor_equal_eager"] = equal
        # a 3-D x is a graph of its own; a triton_op picks its tile config at trace time, so
        # T = 256 (64-row tiles) is a graph apart from T <= 16 (16-row tiles)
        out["inductor_frames"] = frames
        # above MAX_TOKENS: a graph of the unfused ops (a Python op), or the op running them
        graphs.clear()
        xl = torch.randn(300, 16).to(device=device, dtype=torch.bfloat16)
        long_out = torch.compile(model, fullgraph=True, dynamic=True, backend=capture)(xl)
        out["long_traced_ops_have_linear_lora"] = any("linear_lora" in o for o in ops(graphs[-1]))
        out["long_vs_unfused"] = float(((long_out.double() - unfused(
            torch, xl, layer.base.weight, layer.lora_A, layer.lora_B, layer.base.bias, layer.scale).double()).abs().max()
            / long_out.double().abs().max()))
    # training: the op has no backward, so the traced graph keeps the unfused ops
    torch._dynamo.reset()
    graphs.clear()
    xg = x.clone().requires_grad_(True)
    y = torch.compile(model, fullgraph=True, backend=capture)(xg)
    out["train_ops_have_linear_lora"] = any("linear_lora" in o for o in ops(graphs[-1]))
    y.float().sum().backward()
    out["train_grad"] = layer.lora_B.grad is not None and bool(torch.isfinite(layer.lora_B.grad).all())
    out["train_equal_unfused"] = bool(torch.equal(y.detach(), unfused(
        torch, x, layer.base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
        layer.base.bias.detach(), layer.scale)))
    return out


# -- the interpreter on the CPU, in a subprocess ---------------------------------------------------

def _interpreter_worker() -> None:
    """``python tests/test_triton_linear.py --interpret-worker``: every case, JSON on stdout."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    import torch

    results = measure_cases(measure, CASES, torch)
    for label, fn in (("layer", layer_check), ("declines", declines), ("compile", compile_check)):
        try:
            results[label] = fn(torch, "cpu")
        except Exception as exc:  # noqa: BLE001
            results[label] = {"error": repr(exc)}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=NAMES)
def test_kernel_under_the_interpreter(interpreted, case):
    stats = interpreted[case[0]]
    assert "error" not in stats, stats.get("error")
    assert not problems(case, stats), (problems(case, stats), stats)


def _check_layer(stats):
    assert "error" not in stats, stats.get("error")
    for dt, s in stats.items():
        assert s["layer_is_kernel"] and s["core_fused_is_kernel"], (dt, s)
        assert s["core_fused_vs_plain"] <= TOLERANCE["bfloat16"], (dt, s)
        assert s["fused_vs_plain"] <= TOLERANCE["bfloat16"], (dt, s)
        assert s["train_vs_plain"] <= TOLERANCE["bfloat16"], (dt, s)
        assert s["grad_ok"] and s["train_has_grad_fn"], (dt, s)


def _check_declines(stats):
    assert "error" not in stats, stats.get("error")
    assert all(stats.values()), stats


def _check_compile(stats):
    assert "error" not in stats, stats.get("error")
    assert stats["op_registered"] and stats["graph_breaks"] == 0, stats
    assert stats["opcheck_failures"] == {"2d bias": [], "3d": [], "unfused T300": []}, stats
    assert stats["traced_ops"] == ["portable_lora.linear_lora.default"], stats
    assert stats["equal_eager"] and stats["eager_is_kernel"], stats
    frames = [1, 1, 2, 3] if stats["op_kind"] == "triton_op" else [1, 1, 1, 2]
    assert stats["inductor_equal_eager"] == [True] * 4 and stats["inductor_frames"] == frames, stats
    # above MAX_TOKENS a Python op is left out of the graph (inductor's unfused ops); a
    # triton_op stays in it and runs the eager unfused path inside
    assert stats["long_traced_ops_have_linear_lora"] == (stats["op_kind"] == "triton_op"), stats
    assert stats["long_vs_unfused"] < 1e-2, stats
    assert not stats["train_ops_have_linear_lora"] and stats["train_grad"], stats
    assert stats["train_equal_unfused"], stats


def test_layer_under_the_interpreter(interpreted):
    _check_layer(interpreted["layer"])


def test_declines_under_the_interpreter(interpreted):
    _check_declines(interpreted["declines"])


def test_compile_under_the_interpreter(interpreted):
    _check_compile(interpreted["compile"])


# -- CUDA, in this process ---------------------------------------------------------------------------

def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda_triton = pytest.mark.skipif(not (HAVE_TRITON and _cuda_available()),
                                       reason="needs triton and a CUDA device")

CUDA_CASES = CASES + [
    ("bfloat16-1000x768-r16", "bfloat16", 16, 768, 1000, 16, True, 2.0, "2d"),
    ("float16-4096x4096-r64-T1", "float16", 1, 4096, 4096, 64, False, 2.0, "2d"),
    ("bfloat16-4096x4096-r64-T256", "bfloat16", 256, 4096, 4096, 64, True, 2.0, "2d"),
    ("bfloat16-4096to1000-r16-T33", "bfloat16", 33, 4096, 1000, 16, False, 2.0, "2d"),
]


@needs_cuda_triton
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_kernel_on_cuda(case):
    import torch

    stats = measure(torch, case, "cuda")
    assert not problems(case, stats), (problems(case, stats), stats)


@needs_cuda_triton
def test_layer_on_cuda():
    import torch

    _check_layer(layer_check(torch, "cuda"))


@needs_cuda_triton
def test_declines_on_cuda():
    import torch

    _check_declines(declines(torch, "cuda"))


@needs_cuda_triton
def test_compile_on_cuda():
    import torch

    _check_compile(compile_check(torch, "cuda"))


@needs_cuda_triton
def test_cuda_graph_replays_the_kernel():
    """Captured in a CUDA graph (the direct launch on the capture stream), replayed on new
    inputs written into the captured buffer: the kernel's result for those inputs."""
    import torch

    from portable_lora.core import _triton_linear

    x, W, A, B, bias, scale = make_case(torch, CUDA_CASES[-1], "cuda")
    with torch.inference_mode():
        _triton_linear.lora_linear(x, W, A, B, scale, bias)  # compiled and cached first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = _triton_linear.try_lora_linear(x, W, A, B, scale, bias)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, _triton_linear.lora_linear(x, W, A, B, scale, bias))


@needs_cuda_triton
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # where the capture declines
def test_wide_ranks_at_many_tokens_take_the_kernel_only_eagerly_in_small_layers():
    """r > WIDE_RANK and WIDE_MAX_TOKENS < T <= MAX_TOKENS: the kernel eagerly in a small
    layer, the unfused path inside CUDA graph capture and in a layer of more than two waves of
    64 x 64 tiles (where it is faster); up to WIDE_MAX_TOKENS: the kernel everywhere."""
    import torch

    from portable_lora.core import _triton_linear as tlin

    g = torch.Generator().manual_seed(7)
    r, k = tlin.WIDE_RANK + 8, 256
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, t, eager, in_graph in ((192, tlin.WIDE_MAX_TOKENS + 1, True, False),
                                  (192, tlin.WIDE_MAX_TOKENS, True, True),
                                  (64 * (sms + 1), tlin.WIDE_MAX_TOKENS + 1, False, False),
                                  (64 * (sms + 1), tlin.WIDE_MAX_TOKENS, True, True)):
        W = (torch.randn(n, k, generator=g) / 16).to(torch.bfloat16).cuda()
        A = (torch.randn(r, k, generator=g) / 16).to(torch.bfloat16).cuda()
        B = (torch.randn(n, r, generator=g) / 8).to(torch.bfloat16).cuda()
        x = torch.randn(t, k, generator=g).to(torch.bfloat16).cuda()
        with torch.inference_mode():
            assert (tlin.try_lora_linear(x, W, A, B, 1.0) is not None) == eager, (n, t)
            tlin.lora_linear(x, W, A, B, 1.0)  # compiled before the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = tlin.try_lora_linear(x, W, A, B, 1.0)
        assert (got is not None) == in_graph, (n, t)


# -- no kernel run: any machine with torch --------------------------------------------------------

def test_importing_the_package_imports_neither_torch_nor_triton():
    code = "import portable_lora, sys; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_the_capability_declines_on_the_cpu(monkeypatch):
    """Without the interpreter a CPU tensor never reaches triton; the layer runs unfused."""
    torch = pytest.importorskip("torch")
    from portable_lora.backends.torch import _XP
    from portable_lora.core import capabilities

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert capabilities.fused_available("linear_lora", _XP)
    assert not capabilities.fused_available("linear_lora", np)
    x, W = torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16)
    A, B = torch.ones(1, 4, dtype=torch.bfloat16), torch.ones(3, 1, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert capabilities.linear_lora(_XP, x, W, A, B, scale=1.0) is None
    assert capabilities.linear_lora(np, np.ones((2, 4)), np.ones((3, 4)), np.ones((1, 4)),
                                    np.ones((3, 1))) is None


def test_a_failing_kernel_falls_back_once(monkeypatch):
    torch = pytest.importorskip("torch")
    from portable_lora.core import _triton_linear as tlin

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C compiler for the launcher")

    state = {"kernel": object(), "torch": torch, "dtypes": (torch.bfloat16, torch.float16),
             "bf16": torch.bfloat16, "interpreted": True}
    monkeypatch.setattr(tlin, "_STATE", state)  # the failure flag stays in this test
    monkeypatch.setattr(tlin, "_torch", torch)
    monkeypatch.setattr(tlin, "_INTERPRET_AT_IMPORT", True)  # CPU tensors reach the (broken) launch
    monkeypatch.setattr(tlin, "_launch", broken)
    x, W = torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16)
    A, B = torch.ones(1, 4, dtype=torch.bfloat16), torch.ones(3, 1, dtype=torch.bfloat16)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="Triton LoRA linear kernel failed"):
            assert tlin.try_lora_linear(x, W, A, B, 1.0, None) is None
        assert tlin.try_lora_linear(x, W, A, B, 1.0, None) is None  # no retry
    assert len(calls) == 1


def _cuda_report() -> None:
    """``python tests/test_triton_linear.py --cuda-report``: every CUDA case's numbers and
    problems, one line each (for a GPU run that cannot wait for pytest's summary)."""
    import torch

    for case in CUDA_CASES:
        try:
            stats = measure(torch, case, "cuda")
            found = problems(case, stats)
        except Exception as exc:  # noqa: BLE001
            stats, found = {}, [repr(exc)]
        print(("FAIL " if found else "ok   ") + case[0], found,
              {k: v for k, v in stats.items() if k in ("kernel", "plain", "vs_plain_rel", "n")}, flush=True)


if __name__ == "__main__" and "--interpret-worker" in sys.argv:
    _interpreter_worker()
elif __name__ == "__main__" and "--cuda-report" in sys.argv:
    _cuda_report()
