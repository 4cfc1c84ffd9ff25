"""The LoRA linear forward on one GPU: the fused Triton kernel (one launch) against the plain
linear, a hand-written LoRA, our unfused path and PEFT, eager and in CUDA graphs.

    python3 benchmarks/bench_triton_linear.py --out DIR            # CUDA, about a minute
    python3 benchmarks/bench_triton_linear.py --out DIR --sweep    # + the kernel's tile configs
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_triton_linear.py --smoke   # CPU logic check

Each case is a bias-free ``nn.Linear`` (in -> out, bfloat16, N(0, 1/in) weights) with a rank-r
LoRA (bfloat16 factors, alpha = 2r: s = 2), T tokens as a (1, T, in) input. Four (4096²) or two
(4096 -> 14336) layers are called in rotation so W never sits in the 50 MB L2 (as
``bench_torch.py``); times are per layer call. Variants:

* ``linear``: the plain ``nn.Linear`` (what the targets divide by); ``F.linear``: the bare call
  (eager only: in a CUDA graph the two are the same kernel);
* ``hand``: ``F.linear(x, W) + F.linear(F.linear(x, A) · s, B)``;
* ``unfused``: our ``LoraLinear`` with the fused capability off (F.linear, x@Aᵀ, addmm/add);
* ``fused``: our ``LoraLinear`` as shipped: the Triton kernel up to ``MAX_TOKENS`` tokens,
  the unfused path above;
* ``kernel``: ``_triton_linear.lora_linear`` called directly at any T (CUDA graphs only; shows
  what the kernel would do above the threshold);
* ``peft``: PEFT's ``lora.Linear`` with the same bf16 factors, where peft imports (eager).

Timing: ``_common.compare`` (CUDA events around back-to-back calls, calibrated to 10 ms
samples, medians of interleaved repeats after warm-up), inside ``torch.inference_mode``. Eager
includes the host's time to issue the calls (at small T every variant is host-bound on a slow
host); CUDA graphs capture each variant's rotation once and replay it. Accuracy: the fused and
unfused outputs of the first layer against float64 (max |err| / max |ref|, and the share of
elements equal to the float64 result rounded once to bf16). ``--sweep`` times the kernel alone
(CUDA graphs) over tile configs per case. Tables on stdout, JSON and Markdown to DIR.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

SIZES = [(4096, 4096), (4096, 14336)]
RANKS = (16, 64)
TOKENS = (1, 16, 256, 4096)

# --sweep: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per token count
SWEEP = {
    "small": [(16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 32, 128, 4, 5), (16, 64, 256, 4, 3),
              (16, 64, 128, 4, 4), (16, 128, 128, 4, 3)],
    "mid": [(16, 32, 256, 4, 4), (16, 128, 128, 4, 3), (32, 32, 256, 4, 4), (32, 64, 128, 4, 4),
            (32, 128, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3),
            (128, 128, 64, 8, 3)],
    "large": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)],
}


def _bucket(t: int) -> str:
    return "small" if t <= 16 else "mid" if t <= 256 else "large"  # (--sweep's config lists)


def build(torch, in_f, out_f, rank, n_layers, device, gen, peft_ok):
    """The layers of one case: every variant shares the same base weights and factor values."""
    import bench_torch as bt

    dtype = torch.bfloat16
    alpha = 2.0 * rank
    bases = [bt.make_linear(in_f, out_f, dtype, device, gen) for _ in range(n_layers)]
    factors = [bt.make_factors(in_f, out_f, rank, dtype, gen) for _ in range(n_layers)]
    factors = [(A.to(device), B.to(device)) for A, B in factors]
    layers = {
        "linear": bases,
        "hand": [bt.HandLora(b.weight, A.clone(), B.clone(), alpha / rank) for b, (A, B) in zip(bases, factors)],
        "ours": [bt.ours_wrap(b, A, B, alpha) for b, (A, B) in zip(bases, factors)],
    }
    if peft_ok:
        layers["peft"] = [bt.peft_wrap(b, A, B, alpha) for b, (A, B) in zip(bases, factors)]
    return layers


def variants(torch, layers, x, graphs: bool):
    """name -> fn() running every layer of the rotation once."""
    import torch.nn.functional as F

    from portable_lora.backends import torch as backend
    from portable_lora.core import _triton_linear

    def rotation(ms):
        def run():
            out = None
            for m in ms:
                out = m(x)
            return out
        return run

    fused_fn = backend._LINEAR_LORA
    ours = layers["ours"]

    def unfused():
        backend._LINEAR_LORA = None  # the capability off for these calls only
        try:
            out = None
            for m in ours:
                out = m(x)
            return out
        finally:
            backend._LINEAR_LORA = fused_fn

    fns = {"linear": rotation(layers["linear"])}
    if not graphs:
        weights = [m.weight for m in layers["linear"]]

        def flinear():
            out = None
            for w in weights:
                out = F.linear(x, w)
            return out
        fns["F.linear"] = flinear
    fns["hand"] = rotation(layers["hand"])
    fns["unfused"] = unfused
    fns["fused"] = rotation(ours)
    if graphs:
        parts = [(m.base.weight, m.lora_A, m.lora_B, m.scale) for m in ours]

        def kernel():
            out = None
            for w, A, B, s in parts:
                out = _triton_linear.lora_linear(x, w, A, B, s)
            return out
        fns["kernel"] = kernel
    if "peft" in layers and not graphs:
        fns["peft"] = rotation(layers["peft"])
    return fns


def accuracy(torch, layers, x) -> dict:
    """First layer: fused and unfused against float64 (and whether fused took the kernel)."""
    from portable_lora.backends import torch as backend
    from portable_lora.core import _triton_linear

    layer = layers["ours"][0]
    W, A, B, s = layer.base.weight, layer.lora_A, layer.lora_B, layer.scale
    x64 = x.double()
    exact = x64 @ W.double().T + s * ((x64 @ A.double().T) @ B.double().T)
    rounded = exact.to(x.dtype)
    fused = layer(x)
    saved, backend._LINEAR_LORA = backend._LINEAR_LORA, None
    try:
        unfused = layer(x)
    finally:
        backend._LINEAR_LORA = saved
    kernel = _triton_linear.lora_linear(x, W, A, B, s)
    scale = exact.abs().max().item()
    out = {"took_kernel": bool(torch.equal(fused, kernel))}
    for name, y in (("fused", fused), ("unfused", unfused), ("kernel", kernel)):
        out[f"{name}_err"] = (y.double() - exact).abs().max().item() / scale
        out[f"{name}_exact_share"] = (y == rounded).double().mean().item()
    return out


def cuda_graph(torch, run):
    import bench_torch as bt

    return bt._cuda_graph(run)


def sweep_case(torch, layers, x, t, settings) -> dict:
    """Kernel alone over tile configs (CUDA graphs), against the plain linear."""
    from _common import compare

    from portable_lora.core import _triton_linear

    parts = [(m.base.weight, m.lora_A, m.lora_B, m.scale) for m in layers["ours"]]
    both = variants(torch, layers, x, graphs=True)
    fns = {"linear": cuda_graph(torch, both["linear"]), "unfused": cuda_graph(torch, both["unfused"]),
           "default": cuda_graph(torch, both["kernel"])}
    for bm, bn, bk, nw, ns in SWEEP[_bucket(t)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}

        def run(cfg=cfg):
            out = None
            for w, A, B, s in parts:
                out = _triton_linear.lora_linear(x, w, A, B, s, config=cfg)
            return out
        try:
            fns[f"{bm}x{bn}x{bk}/w{nw}/s{ns}"] = cuda_graph(torch, run)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory)
            print(f"  config {cfg} failed: {str(exc)[:120]}", flush=True)
    secs = compare(fns, settings)
    return {name: s / len(parts) * 1e6 for name, s in secs.items()}


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def table(rows, columns) -> str:
    lines = ["| case | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile configs")
    parser.add_argument("--sweep-only", action="store_true", help="only the tile configs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU under TRITON_INTERPRET=1 (the script's logic)")
    parser.add_argument("--tokens", default="", help="comma-separated T (default 1,16,256,4096)")
    args = parser.parse_args(argv)

    import torch

    from _common import Settings, compare

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    settings = Settings.for_mode(True, "cuda" if device == "cuda" else "cpu")
    if args.smoke:
        settings.min_sample_s, settings.repeats, settings.warmup = 0.002, 3, 1
    sizes = [(64, 96)] if args.smoke else SIZES
    ranks = (4,) if args.smoke else RANKS
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else ((1, 16, 40) if args.smoke else TOKENS)
    try:
        import peft  # noqa: F401
        peft_ok = True
    except Exception:  # noqa: BLE001
        peft_ok = False
    from portable_lora.core import _triton_linear

    import bench_torch as bt

    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    eager_rows, graph_rows, acc_rows, sweep_rows = [], [], [], []
    for in_f, out_f in sizes:
        n_layers = bt._layer_count(in_f * out_f * 2, "cuda") if device == "cuda" else 1
        for rank in ranks:
            layers = build(torch, in_f, out_f, rank, n_layers, device, gen, peft_ok and not args.sweep_only)
            for t in tokens:
                case = f"{in_f}->{out_f} r{rank} T{t}"
                x = torch.randn(1, t, in_f, generator=gen).to(device=device, dtype=torch.bfloat16)
                with torch.inference_mode():
                    acc = accuracy(torch, layers, x)
                    acc_rows.append({"case": case, **acc})
                    if args.sweep or args.sweep_only:
                        if device == "cuda":
                            us = sweep_case(torch, layers, x, t, settings)
                            best = min((k for k in us if k not in ("linear", "unfused")), key=us.get)
                            sweep_rows.append({"case": case, "linear_us": us["linear"],
                                               "unfused/linear": us["unfused"] / us["linear"],
                                               "default/linear": us["default"] / us["linear"], "best": best,
                                               "best_us": us[best], "best/linear": us[best] / us["linear"],
                                               "all_us": us})
                            print(f"sweep {case}: linear {us['linear']:.1f} us; " + ", ".join(
                                f"{k} {v / us['linear']:.2f}x" for k, v in us.items() if k != "linear"), flush=True)
                    if args.sweep_only:
                        continue
                    eager = compare(variants(torch, layers, x, graphs=False), settings)
                    eager = {k: v / n_layers * 1e6 for k, v in eager.items()}
                    row = {"case": case, **{f"{k}_us": v for k, v in eager.items()}}
                    row["fused/linear"] = eager["fused"] / eager["linear"]
                    row["unfused/linear"] = eager["unfused"] / eager["linear"]
                    row["fused/unfused"] = eager["fused"] / eager["unfused"]
                    if "peft" in eager:
                        row["fused/peft"] = eager["fused"] / eager["peft"]
                        row["unfused/peft"] = eager["unfused"] / eager["peft"]
                        row["target ≤0.4× peft"] = ("met" if row["fused/peft"] <= 0.4 else "no") if t <= 256 else "-"
                    eager_rows.append(row)
                    print("eager", {k: fmt(v) for k, v in row.items()}, flush=True)
                    if device == "cuda":
                        fns = {k: cuda_graph(torch, f) for k, f in variants(torch, layers, x, graphs=True).items()}
                        g = compare(fns, settings)
                        g = {k: v / n_layers * 1e6 for k, v in g.items()}
                        row = {"case": case, **{f"{k}_us": v for k, v in g.items()}}
                        for k in ("hand", "unfused", "fused", "kernel"):
                            row[f"{k}/linear"] = g[k] / g["linear"]
                        bound = 1.15 if t <= 256 else 1.20
                        row["target"] = f"≤{bound:.2f}×: {'met' if row['fused/linear'] <= bound else 'no'}"
                        graph_rows.append(row)
                        print("graph", {k: fmt(v) for k, v in row.items()}, flush=True)
                        del fns
            del layers
            if device == "cuda":
                torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = []
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
           "peft": peft_ok, "max_tokens": _triton_linear.MAX_TOKENS,
           "wide_max_tokens_wide_rank": [_triton_linear.WIDE_MAX_TOKENS, _triton_linear.WIDE_RANK],
           "configs": {f"T{t} N{n} r{r}": _triton_linear.config_for(t, n, in_f, r)
                       for in_f, n in sizes for r in ranks for t in tokens},
           "seconds": time.perf_counter() - started}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    md.append(f"environment: {json.dumps(env, default=str)}\n")
    if eager_rows:
        cols = [c for c in eager_rows[0] if c != "case"]
        md += ["### eager (torch.inference_mode; host time included), µs per layer call\n", table(eager_rows, cols), ""]
    if graph_rows:
        cols = [c for c in graph_rows[0] if c != "case"]
        md += ["### CUDA graphs (each variant's rotation captured once, replayed), µs per layer call\n",
               table(graph_rows, cols), ""]
    if acc_rows:
        cols = [c for c in acc_rows[0] if c != "case"]
        md += ["### accuracy (first layer) vs float64: max|err| / max|ref|; share equal to the float64 result "
               "rounded once\n", table(acc_rows, cols), ""]
    if sweep_rows:
        md += ["### sweep: the kernel alone (CUDA graphs), best tile config per case\n",
               table(sweep_rows, ["linear_us", "unfused/linear", "default/linear", "best", "best_us",
                                  "best/linear"]), ""]
    text = "\n".join(md)
    print("\n" + text)
    (out / "bench_triton_linear.md").write_text(text)
    (out / "bench_triton_linear.json").write_text(json.dumps(
        {"environment": env, "eager": eager_rows, "graphs": graph_rows, "accuracy": acc_rows,
         "sweep": sweep_rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
