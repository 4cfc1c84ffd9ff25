"""PyTorch benchmarks: one LoRA linear layer's forward, merge bandwidth, dispatch overhead.

Peers: the plain ``nn.Linear``; PEFT's ``lora.Linear`` (unmerged, through ``get_peft_model``
on a one-layer module, adapter kept in the base dtype: ``autocast_adapter_dtype=False``, so
both sides compute the LoRA term in the same dtype); and a hand-written module computing
``x @ Wᵀ + (s · (x @ Aᵀ)) @ Bᵀ`` (the scale on the rank-sized intermediate, the cheapest place).

All four share the same base ``nn.Linear`` objects and the same factor values, and their
outputs are checked against a float32 reference before anything is timed.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch._dynamo  # noqa: F401 - torch._dynamo.reset() between compiled configurations
import torch.nn.functional as F
from torch import nn

import portable_lora as pl
from portable_lora import torch as plt
from portable_lora.adapter import LoraModule

from _common import Results, Row, Settings, compare, ratio

ALPHA_PER_RANK = 2.0  # alpha = 2r: scale 2, as many recipes use


# -- building blocks ---------------------------------------------------------------------------------

class Holder(nn.Module):
    """A one-layer model: PEFT and ``plt.apply`` both wrap ``proj`` in place."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class HandLora(nn.Module):
    """The hand-written peer: ``x @ Wᵀ + (s · (x @ Aᵀ)) @ Bᵀ`` with W shared with the base."""

    def __init__(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.weight, self.A, self.B = weight, nn.Parameter(A), nn.Parameter(B)
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.A) * self.scale, self.B)


def _numpy_factor(t: torch.Tensor) -> np.ndarray:
    return plt.to_numpy(t)


_DEVICE_GENERATORS: dict[str, torch.Generator] = {}


def make_linear(in_f: int, out_f: int, dtype, device, generator) -> nn.Linear:
    """A bias-free Linear with N(0, 1/in) weights, drawn on ``device`` (fast for big models)."""
    with torch.device("meta"):
        layer = nn.Linear(in_f, out_f, bias=False)
    layer = layer.to_empty(device=device).to(dtype)
    device = str(device)
    if device not in _DEVICE_GENERATORS:
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        _DEVICE_GENERATORS[device] = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(out_f, in_f, generator=_DEVICE_GENERATORS[device], device=device, dtype=dtype)
        layer.weight.copy_(w.mul_(1 / math.sqrt(in_f)))
    return layer.requires_grad_(False)


def make_factors(in_f: int, out_f: int, rank: int, dtype, generator) -> tuple[torch.Tensor, torch.Tensor]:
    A = (torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)).to(dtype)
    B = (torch.randn(out_f, rank, generator=generator) * 0.1).to(dtype)
    return A, B


def peft_wrap(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float, *,
              autocast: bool = False) -> nn.Module:
    """PEFT's ``lora.Linear`` around ``base`` with the given factors.

    ``autocast=False``: the factors in the base dtype, the same arithmetic as ours.
    ``autocast=True``: ``get_peft_model``'s default, float32 factors on a 16-bit base.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(Holder(base), config, autocast_adapter_dtype=autocast)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def ours_wrap(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float) -> nn.Module:
    adapter = pl.Adapter()
    adapter["proj"] = LoraModule(_numpy_factor(A), _numpy_factor(B), alpha=alpha)
    holder = plt.apply(Holder(base), adapter)
    return holder.proj


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


# -- ceilings ---------------------------------------------------------------------------------------

def ceilings(settings: Settings, dtype) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s) measured here, now."""
    device = settings.device
    n = (1 << 28) if device == "cuda" else (1 << 25)  # elements: 512 MB / 128 MB in fp32
    src = torch.randn(n, device=device, dtype=torch.float32)
    t = compare({"copy": lambda: src.clone()}, settings)["copy"]
    bw = 2 * src.numel() * src.element_size() / t / 1e9
    del src
    m = 8192 if device == "cuda" else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t = compare({"mm": lambda: a @ b}, settings)["mm"]
    return {"copy_GBps": bw, "matmul_TFLOPs": 2 * m**3 / t / 1e12}


def _floor_us(in_f, out_f, rank, tokens, itemsize, ceil) -> float:
    nbytes = (in_f * out_f + rank * (in_f + out_f) + tokens * (in_f + out_f)) * itemsize
    flops = 2 * tokens * (in_f * out_f + rank * (in_f + out_f))
    return max(nbytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12)) * 1e6


# -- forward ------------------------------------------------------------------------------------------

def _layer_count(weight_bytes: int, device: str) -> int:
    # rotate through enough layers that the weights do not sit in the last-level cache
    cache = 50e6 if device == "cuda" else 32e6
    return max(1, min(4, math.ceil(3 * cache / weight_bytes)))


def _cuda_graph(run: Callable[[], Any]) -> Callable[[], Any]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def forward(results: Results, settings: Settings, *, sizes, ranks, tokens, dtype, modes, ceil,
            deadline: float = float("inf")) -> None:
    """Time one LoRA linear layer: ours vs nn.Linear, PEFT and hand-written, per mode.

    Configurations not started by ``deadline`` (a ``time.perf_counter()`` value) are skipped
    and listed in ``results.skipped``.
    """
    device = settings.device
    gen = torch.Generator().manual_seed(0)
    tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for in_f, out_f in sizes:
        n_layers = _layer_count(in_f * out_f * itemsize, device)
        bases = [make_linear(in_f, out_f, dtype, device, gen) for _ in range(n_layers)]
        for rank in ranks:
            alpha = ALPHA_PER_RANK * rank
            factors = [make_factors(in_f, out_f, rank, dtype, gen) for _ in range(n_layers)]
            factors = [(A.to(device), B.to(device)) for A, B in factors]
            variants = {
                "linear": bases,
                "hand": [HandLora(b.weight, A.clone(), B.clone(), alpha / rank) for b, (A, B) in zip(bases, factors)],
                "peft": [peft_wrap(b, A, B, alpha) for b, (A, B) in zip(bases, factors)],
                "ours": [ours_wrap(b, A, B, alpha) for b, (A, B) in zip(bases, factors)],
            }
            if dtype != torch.float32:
                variants["peft_default"] = [peft_wrap(b, A, B, alpha, autocast=True)
                                            for b, (A, B) in zip(bases, factors)]
            for mode in modes:
                if time.perf_counter() > deadline:
                    results.skipped.append(f"forward {mode} {in_f}->{out_f} r{rank}: past the time budget")
                    continue
                layers = variants
                if mode.startswith("compiled"):
                    # fullgraph=True for ours and the simple peers; PEFT's forward has Python
                    # branches that dynamo may split, so it gets the default (graph breaks allowed).
                    # dynamic=True: one dynamic graph per variant serves every T > 1 (T = 1 is
                    # specialised; ours splits once more above the fused kernel's token range).
                    # Each layer shape is a graph of its own (parameter shapes are static), and
                    # dynamo's recompile limit (8 per code object: here every layer of a variant
                    # shares its forward) counts them all: its cache is emptied per size and rank.
                    # "compiled-cg": mode="reduce-overhead", inductor's CUDA graphs
                    torch._dynamo.reset()
                    options = {"mode": "reduce-overhead"} if mode == "compiled-cg" else {}
                    layers = {name: [torch.compile(m, fullgraph=not name.startswith("peft"), dynamic=True,
                                                   **options) for m in ms]
                              for name, ms in variants.items() if name != "peft_default"}
                for T in tokens:
                    x = torch.randn(1, T, in_f, generator=gen).to(device=device, dtype=dtype)
                    with torch.inference_mode():
                        _check(layers, bases, factors, x, alpha / rank, tol, f"{mode} {in_f}->{out_f} r{rank} T{T}")
                        fns = {}
                        for name, ms in layers.items():
                            def run(ms=ms):
                                out = None
                                for m in ms:
                                    out = m(x)
                                return out
                            fns[name] = _cuda_graph(run) if mode == "cudagraph" else run
                        if mode == "cudagraph":
                            try:
                                fns.update(_lora_floor_variants(variants["ours"], x))
                            except Exception as exc:  # noqa: BLE001 - reference rows only
                                results.skipped.append(f"lora floor variants {in_f}->{out_f} T{T}: {exc}")
                        times = compare(fns, settings)
                    us = {k: v / n_layers * 1e6 for k, v in times.items()}
                    _forward_row(results, settings, mode, in_f, out_f, rank, T, us, dtype,
                                 _floor_us(in_f, out_f, rank, T, itemsize, ceil), n_layers)
            del variants
            if device == "cuda":
                torch.cuda.empty_cache()


def _lora_floor_variants(ours: list, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """CUDA-graph references for what the LoRA term costs, not library code paths.

    ``lora_only``: ours' LoRA term alone, added into a base output computed beforehand: the
    time two dependent small matmuls take, the part a separate-kernel LoRA adds to the linear.
    ``two_stream``: ours' arithmetic with ``x @ Aᵀ`` on a side stream, overlapping the base
    GEMM (what graph-level concurrency could save; the library does not do this).
    """
    from portable_lora import core
    from portable_lora.backends.torch import _XP

    parts = [(layer.base.weight, layer.lora_A, layer.lora_B, layer.scale) for layer in ours]
    bases = [F.linear(x, w) for w, *_ in parts]

    def lora_only():
        out = None
        for base, (_, A, B, s) in zip(bases, parts):
            out = core.add_lora_output(base, x, A, B, s, xp=_XP)
        return out

    side, main = torch.cuda.Stream(), torch.cuda.current_stream()

    def two_stream():
        out = None
        for w, A, B, s in parts:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                hidden = x @ A.T
            base = F.linear(x, w)
            torch.cuda.current_stream().wait_stream(side)
            out = base.add(hidden @ B.T, alpha=s)
        return out

    del main
    return {"lora_only": _cuda_graph(lora_only), "two_stream": _cuda_graph(two_stream)}


def _check(layers, bases, factors, x, scale, tol, what) -> None:
    (A, B), W = factors[0], bases[0].weight
    xf = x.float()
    base = F.linear(xf, W.float())
    want = base + F.linear(F.linear(xf, A.float()) * scale, B.float())
    for name, ms in layers.items():
        err = _rel_err(ms[0](x), base if name == "linear" else want)
        if not err < tol:
            raise AssertionError(f"{what}: {name} differs from the float32 reference by {err:.2e} (> {tol})")


def _forward_row(results, settings, mode, in_f, out_f, rank, T, us, dtype, floor, n_layers) -> None:
    cuda = settings.device == "cuda"
    values = {"linear_us": us["linear"], "hand_us": us["hand"], "peft_us": us["peft"]}
    if "peft_default" in us:
        values["peft_fp32_us"] = us["peft_default"]  # get_peft_model's default: float32 factors
    values.update({"ours_us": us["ours"], "ours/hand": ratio(us["ours"], us["hand"]),
                   "ours/peft": ratio(us["ours"], us["peft"])})
    if "peft_default" in us:
        values["ours/peft_fp32"] = ratio(us["ours"], us["peft_default"])
    values.update({"ours/linear": ratio(us["ours"], us["linear"]), "floor_us": floor})
    if "lora_only" in us:
        values["lora_only_us"] = us["lora_only"]
        values["two_stream_us"] = us["two_stream"]
        values["two_stream/linear"] = ratio(us["two_stream"], us["linear"])
    target, met = "", None
    if cuda and mode == "eager":
        hand_ok = values["ours/hand"] <= 1.05
        peft_ok = values["ours/peft"] <= 0.4 if T <= 256 else True
        target = "≤1.05× hand" + ("; ≤0.4× PEFT" if T <= 256 else "")
        met = hand_ok and peft_ok
    elif cuda and mode in ("compiled", "compiled-cg", "cudagraph"):
        bound = 1.15 if T <= 256 else 1.20
        target, met = f"≤{bound:.2f}× linear", values["ours/linear"] <= bound
    dt = str(dtype).replace("torch.", "")
    results.add(Row(f"forward torch {settings.device} {dt} {mode}", f"{in_f}->{out_f} r{rank} T{T}", values,
                    target, met, note=""))


# -- merge ----------------------------------------------------------------------------------------------

def _add_at(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` under ``root``, making the parents on the way."""
    parent = root
    parts = name.split(".")
    for part in parts[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(parts[-1], module)


def _model_from_shapes(shapes: dict[str, tuple[int, int]], dtype, device, gen) -> nn.Module:
    """A module tree with one bias-free Linear at each dotted name."""
    root = nn.Module()
    for name, (out_f, in_f) in shapes.items():
        _add_at(root, name, make_linear(in_f, out_f, dtype, device, gen))
    return root


def _adapter_for(shapes, rank, dtype, gen) -> pl.Adapter:
    adapter = pl.Adapter()
    for name, (out_f, in_f) in shapes.items():
        A, B = make_factors(in_f, out_f, rank, dtype, gen)
        adapter[name] = LoraModule(_numpy_factor(A), _numpy_factor(B), alpha=ALPHA_PER_RANK * rank)
    return adapter


def merge(results: Results, settings: Settings, *, dtype, layers: int, rank: int = 16) -> None:
    """Merge bandwidth: one 4096² layer and a ``layers``-layer Llama-8B projection set."""
    from peft import LoraConfig, get_peft_model

    device = settings.device
    gen = torch.Generator().manual_seed(1)
    cases = [("one 4096x4096 layer", {"proj": (4096, 4096)}),
             (f"{layers}-layer Llama-8B projections", pl.examples.llama_module_shapes(
                 layers=layers, hidden=4096, intermediate=14336, kv_hidden=1024))]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for label, shapes in cases:
        model = _model_from_shapes(shapes, dtype, device, gen)
        adapter = _adapter_for(shapes, rank, dtype, gen)
        weights = [model.get_submodule(n).weight for n in shapes]
        w_bytes = sum(w.numel() for w in weights) * itemsize
        f_bytes = sum(m.A.nbytes + m.B.nbytes for m in adapter.values())
        # correctness first: our merge vs W + s·B@A in float32
        check_name = next(iter(shapes))
        before = weights[0].detach().clone()
        plt.merge(model, adapter)
        m0 = adapter[check_name]
        delta = (plt.to_torch(m0.B, device=device).float() @ plt.to_torch(m0.A, device=device).float()) * m0.scale
        err = _rel_err(weights[0] - before, delta.to(dtype))
        plt.unmerge(model, adapter)
        if not err < 5e-2:
            raise AssertionError(f"merge {label}: ΔW off by {err:.2e}")

        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank,
                                                      target_modules=sorted({n.split(".")[-1] for n in shapes}),
                                                      init_lora_weights=False),
                                    autocast_adapter_dtype=False)
        bare = peft_model.base_model.model  # the same module tree, its Linears wrapped by PEFT

        plain = _PlainView(bare, shapes)

        def ours_pair():
            # our verbs act on plain layers: the same Linears, seen past PEFT's wrappers
            plt.merge(plain, adapter)
            plt.unmerge(plain, adapter)

        def peft_pair():
            peft_model.merge_adapter()
            peft_model.unmerge_adapter()

        def clone():
            return [w.clone() for w in weights]

        # the same bytes copied into buffers allocated beforehand: no page faults, the stronger
        # baseline (a fresh clone pays for first-touching its memory)
        targets = [torch.empty_like(w) for w in weights]

        def copy_into():
            for dst, w in zip(targets, weights):
                dst.copy_(w)

        # references, not the library's API: the core's in-place merge alone (factors already on
        # the device: no module lookup, no upload), and ours with blocking factor uploads
        from portable_lora import core
        from portable_lora.backends import torch as backend

        on_device = [(w, backend.to_torch(adapter[n].A, device=device), backend.to_torch(adapter[n].B, device=device),
                      adapter[n].scale) for n, w in zip(shapes, weights)]

        def core_pair():
            with torch.no_grad():
                for w, A, B, s in on_device:
                    core.merge_into(w, A, B, s, inplace=True)
                for w, A, B, s in on_device:
                    core.unmerge_from(w, A, B, s, inplace=True)

        upload = backend._upload

        def ours_blocking_pair():
            backend._upload = lambda array, dev: backend.to_torch(array, device=dev)
            try:
                ours_pair()
            finally:
                backend._upload = upload

        fns = {"clone": clone, "copy_": copy_into, "ours": ours_pair, "peft": peft_pair, "core": core_pair,
               "ours_blocking": ours_blocking_pair}
        fast = settings.__class__(**{**settings.__dict__, "min_sample_s": 0.0, "warmup": 1,
                                     "repeats": 3 if settings.quick else 5})
        times = compare(fns, fast)
        differing, ulps = _inplace_vs_plain(on_device[0])
        del targets, on_device
        t_copy = min(times["clone"], times["copy_"])
        t_ours, t_peft = times["ours"] / 2, times["peft"] / 2
        copy_gbs = 2 * w_bytes / t_copy / 1e9
        ours_gbs = (2 * w_bytes + f_bytes) / t_ours / 1e9
        peft_gbs = (2 * w_bytes + f_bytes) / t_peft / 1e9
        values = {"weights_GB": w_bytes / 1e9, "clone_ms": times["clone"] * 1e3, "copy__ms": times["copy_"] * 1e3,
                  "ours_ms": t_ours * 1e3, "peft_ms": t_peft * 1e3, "copy_GBps": copy_gbs, "ours_GBps": ours_gbs,
                  "peft_GBps": peft_gbs, "ours/copy_bw": ours_gbs / copy_gbs, "ours_speedup_vs_peft": t_peft / t_ours,
                  "core_only_ms": times["core"] / 2 * 1e3,
                  "core_only/copy_bw": t_copy / (times["core"] / 2),
                  "ours_blocking_upload_ms": times["ours_blocking"] / 2 * 1e3,
                  "inplace_vs_plain_differing": differing, "inplace_vs_plain_max_ulp_of_W": ulps}
        dt = str(dtype).replace("torch.", "")
        results.add(Row(f"merge torch {device} {dt}", f"{label} r{rank}", values, "≥0.8× copy bandwidth",
                        ours_gbs / copy_gbs >= 0.8,
                        note="ours = (plt.merge + plt.unmerge)/2, PEFT = (merge_adapter + unmerge_adapter)/2; "
                             "copy = the faster of clone() and copy_() into a buffer allocated beforehand; "
                             "core_only = core.merge_into(inplace=True) with the factors already on the device; "
                             "inplace_vs_plain = the share of elements where the in-place merge and core.merge_into's "
                             "plain path differ, and the largest difference in units in the last place of W"))
        del model, peft_model, bare, plain, weights
        if device == "cuda":
            torch.cuda.empty_cache()


def _inplace_vs_plain(case) -> tuple[float, float]:
    """Share of elements where the fused in-place merge and the plain path of
    ``core.merge_into`` differ, and the largest difference in units in the last place of the
    weight's own elements (differences where W + ΔW cancels to near zero stay small in this
    unit, where they would be huge relative to the tiny result)."""
    from portable_lora import core

    w, A, B, s = case
    with torch.no_grad():
        plain = core.merge_into(w, A, B, s)
        fused = core.merge_into(w.clone(), A, B, s, inplace=True)
    diff = (fused.double() - plain.double()).abs()
    scale = torch.maximum(plain.double().abs(), w.double().abs()).clamp_min(torch.finfo(w.dtype).tiny)
    return float((diff > 0).double().mean()), float((diff / (torch.finfo(w.dtype).eps * scale)).max())


class _PlainView(nn.Module):
    """The base Linears under PEFT's wrappers, under their original names (no copies)."""

    def __init__(self, wrapped: nn.Module, shapes):
        super().__init__()
        for name in shapes:
            layer = wrapped.get_submodule(name)
            _add_at(self, name, getattr(layer, "base_layer", layer))


# -- dispatch ------------------------------------------------------------------------------------------

def dispatch(results: Results, settings: Settings) -> None:
    """µs per call at 16→16, T=1: the fixed cost of the layer, not its arithmetic."""
    device = settings.device
    gen = torch.Generator().manual_seed(2)
    base = make_linear(16, 16, torch.float32, device, gen)
    A, B = make_factors(16, 16, 4, torch.float32, gen)
    A, B = A.to(device), B.to(device)
    x = torch.randn(1, 16, generator=gen).to(device)
    W = base.weight
    hand_mod = HandLora(W, A.clone(), B.clone(), 2.0)
    peft = peft_wrap(base, A, B, 8.0)
    ours = ours_wrap(base, A, B, 8.0)

    def functional():
        return F.linear(x, W) + F.linear(F.linear(x, A) * 2.0, B)

    with torch.inference_mode():
        times = compare({"nn.Linear": lambda: base(x), "F.linear+hand LoRA": functional,
                         "hand module": lambda: hand_mod(x), "peft": lambda: peft(x), "ours": lambda: ours(x)},
                        settings)
    us = {k: v * 1e6 for k, v in times.items()}
    values = {f"{k}_us": v for k, v in us.items()}
    values["ours/hand module"] = ratio(us["ours"], us["hand module"])
    values["ours/F.linear+hand"] = ratio(us["ours"], us["F.linear+hand LoRA"])
    values["ours/peft"] = ratio(us["ours"], us["peft"])
    results.add(Row(f"dispatch torch {device}", "16->16 r4 T1 float32", values))


def dispatch_core(results: Results, settings: Settings) -> None:
    """The core's add_lora_output alone: namespace resolved per call vs passed as xp=."""
    from portable_lora import core

    gen = torch.Generator().manual_seed(3)
    A, B = make_factors(16, 16, 4, torch.float32, gen)
    x = torch.randn(1, 16, generator=gen).to(settings.device)
    A, B = A.to(settings.device), B.to(settings.device)
    base_out = torch.zeros(1, 16, device=settings.device)
    xp = core.array_namespace(x)
    with torch.inference_mode():
        times = compare({
            "per-call namespace": lambda: core.add_lora_output(base_out, x, A, B, 2.0),
            "xp= passed": lambda: core.add_lora_output(base_out, x, A, B, 2.0, xp=xp),
            "array_namespace alone": lambda: core.array_namespace(base_out, x),
        }, settings)
    values = {f"{k}_us": v * 1e6 for k, v in times.items()}
    results.add(Row(f"dispatch core torch {settings.device}", "add_lora_output 16x16 r4", values))
