"""The in-place 16-bit merge ``W += s · B @ A`` on one GPU: the fused Triton kernel against a
device copy of the same bytes, the old two-launch path, and PEFT's bf16 merge.

    python3 benchmarks/bench_triton_merge.py --out DIR            # CUDA, ~30-60 s
    python3 benchmarks/bench_triton_merge.py --out DIR --sweep    # + the kernel's tile configs
    python3 benchmarks/bench_triton_merge.py --interpret-smoke    # CPU, Triton's interpreter

Methods, each on a bfloat16 W of shape (out, in), B (out, r), A (r, in) in bfloat16, s = 2:

* ``copy``: ``dst.copy_(src)``, the same bytes as the merge (one read and one write of W);
* ``old``: the capability's path without triton (``PORTABLE_LORA_TRITON=0``): the float32
  product by ``torch.mm(..., out_dtype=float32)``, then ``W.add_(product, alpha=s)``;
* ``triton``: the capability's path with triton (``capabilities._torch_add_matmul_``: the
  fused kernel, one read and one write of W, exact products, float32 sums, one rounding);
* ``peft``: ``W += (B @ A) * s`` in bfloat16, as PEFT merges (rounds the product first).

Bandwidth is ``2 · W.nbytes / time`` for every method (the copy's traffic). Timing: CUDA
events around ``INNER`` back-to-back calls, median of ``--repeats`` samples after warm-up, the
methods interleaved sample by sample; the calls rotate over enough copies of W (≥ 256 MB in
all) that W is never L2-resident, for the copy as for the merges. That is the time a caller
sees, host launch cost included (printed as ``host`` µs per call: where it exceeds the
kernel's time, as for a 1024 x 4096 weight, the GPU waits on Python). ``kernel alone``: the
same calls captured in a CUDA graph and replayed, copy and triton, which shows the kernel's
own bandwidth. Accuracy: each method once on a fresh W against the float64 sum rounded once
to bfloat16: the share of elements that differ, the largest error in ulp
(``eps · max(|exact|, tiny)``, as ``precision_check.py``: large only where the sum cancels),
and ``unexplained``, elements beyond float32 accuracy (must be 0); plus the share where
triton and old differ. The exit status is 1 where the kernel fails those checks. Table on
stdout, JSON (and the table) to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# one Llama-3-8B decoder layer: (name, out_features, in_features)
LLAMA8B_LAYER = [
    ("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
    ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336),
]
RANKS = (16, 64)
METHODS = ("copy", "old", "triton", "peft")
SCALE = 2.0
INNER = 10  # calls per timed sample
ROTATE_BYTES = 256 << 20  # W copies per method: > 2x an H100's 50 MB L2
# the kernel's tile configs --sweep times (BLOCK_M, BLOCK_N, num_warps, num_stages), kernel alone
SWEEP = [(64, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2), (128, 64, 4, 2), (128, 128, 8, 2),
         (64, 256, 8, 2), (32, 128, 4, 2)]


def _set_triton(enabled: bool) -> None:
    if enabled:
        os.environ.pop("PORTABLE_LORA_TRITON", None)
    else:
        os.environ["PORTABLE_LORA_TRITON"] = "0"


def make_inputs(torch, out_f: int, in_f: int, rank: int, device: str, seed: int = 0, factor_dtype=None):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16
    fdt = factor_dtype or dtype
    W = (torch.randn(out_f, in_f, generator=g) / 64).to(dtype).to(device)
    A = (torch.randn(rank, in_f, generator=g) / 64).to(fdt).to(device)
    B = (torch.randn(out_f, rank, generator=g) * 0.1).to(fdt).to(device)
    return W, A, B


def method_fns(torch, capabilities, triton_merge, A, B):
    """name -> fn(W, src) doing one call on W (``src``: the copy's source, same shape)."""

    def old(W, _src):
        _set_triton(False)
        try:
            capabilities._torch_add_matmul_(W, B, A, SCALE)
        finally:
            _set_triton(True)

    def fused(W, _src):
        if W.is_cuda:
            capabilities._torch_add_matmul_(W, B, A, SCALE)  # the real path, with triton
        else:  # the interpreter smoke: the capability keeps CPU weights off triton
            triton_merge.fused_add_matmul_(W, B, A, SCALE)

    def peft(W, _src):
        W += (B @ A) * SCALE

    return {"copy": lambda W, src: W.copy_(src), "old": old, "triton": fused, "peft": peft}


def accuracy(torch, fns, W0, A, B) -> dict:
    """Per method, against the float64 sum rounded once to W's dtype: the share of elements
    that differ, the largest error in ulp (``eps · max(|exact|, tiny)``, as precision_check.py:
    large only where the sum cancels), and ``unexplained``: elements outside every rounding of
    a float32-accurate sum (|error| > 2 (K + 2) 2^-24 (|w| + s |B| |A|) before rounding), which
    must be none for a path that keeps the contract. Plus the share where triton and old differ."""
    w64, a64, b64 = W0.double(), B.double(), A.double()
    exact64 = w64 + SCALE * (a64 @ b64)
    bound = 2 * (A.shape[0] + 2) * 2.0 ** -24 * (w64.abs() + SCALE * (a64.abs() @ b64.abs()))
    lo, hi = (exact64 - bound).to(W0.dtype), (exact64 + bound).to(W0.dtype)
    exact = exact64.to(W0.dtype)
    del w64, a64, b64, exact64, bound
    ulp = torch.finfo(W0.dtype).eps * exact.double().abs().clamp_min(torch.finfo(W0.dtype).tiny)
    out, results = {}, {}
    for name in ("old", "triton", "peft"):
        W = W0.clone()
        fns[name](W, None)
        results[name] = W
        out[name] = {"wrong_share": (W != exact).double().mean().item(),
                     "max_ulp": ((W.double() - exact.double()).abs() / ulp).max().item(),
                     "unexplained": int(((W < lo) | (W > hi)).sum().item())}
    out["triton_vs_old_differ_share"] = (results["triton"] != results["old"]).double().mean().item()
    return out


class Timer:
    """Seconds per call: CUDA events around ``inner`` calls, or wall clock on the CPU."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda = torch, device == "cuda"

    def sample(self, fn, inner: int) -> tuple[float, float]:
        """(device seconds per call, host seconds per call to issue it)."""
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for i in range(inner):
                fn(i)
            host = (time.perf_counter() - t0) / inner
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner, host
        t0 = time.perf_counter()
        for i in range(inner):
            fn(i)
        host = (time.perf_counter() - t0) / inner
        return host, host


def time_methods(torch, timer, fns, W0, methods, repeats: int, warmup: int, inner: int, host=None) -> dict:
    """Median seconds per call of each method, the methods interleaved sample by sample (and,
    into ``host`` where given, the median host time to issue a call)."""
    copies = max(2, -(-ROTATE_BYTES // max(1, W0.nbytes)))
    Ws = [W0.clone() for _ in range(copies)]
    src = W0.clone()
    calls = {m: (lambda i, f=fns[m]: f(Ws[i % copies], src)) for m in methods}
    for m in methods:
        for i in range(warmup):
            calls[m](i)
    samples = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            samples[m].append(timer.sample(calls[m], inner))
    del Ws, src
    if host is not None:
        host.update({m: statistics.median(h for _, h in v) for m, v in samples.items()})
    return {m: statistics.median(d for d, _ in v) for m, v in samples.items()}


def time_graphs(torch, fns, W0, methods, repeats: int, inner: int) -> dict:
    """Median seconds per call with the host out of the way: ``inner`` calls captured in one
    CUDA graph, replayed ``repeats`` times (the kernel's own bandwidth; CUDA only)."""
    copies = max(2, -(-ROTATE_BYTES // max(1, W0.nbytes)))
    Ws = [W0.clone() for _ in range(copies)]
    src = W0.clone()
    out = {}
    for m in methods:
        f = fns[m]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) off the capture
            for i in range(3):
                f(Ws[i % copies], src)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                f(Ws[i % copies], src)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        out[m] = statistics.median(times)
        del graph
    del Ws, src
    return out


def run_case(torch, capabilities, triton_merge, timer, out_f, in_f, rank, device, args, factor_dtype=None) -> dict:
    W0, A, B = make_inputs(torch, out_f, in_f, rank, device, factor_dtype=factor_dtype)
    fns = method_fns(torch, capabilities, triton_merge, A, B)
    if device == "cuda":  # the capability must really take the kernel (bit-identical results)
        direct, via = W0.clone(), W0.clone()
        triton_merge.fused_add_matmul_(direct, B, A, SCALE)
        fns["triton"](via, None)
        assert torch.equal(direct, via), "the capability did not take the Triton kernel"
    acc = accuracy(torch, fns, W0, A, B)
    host = {}
    secs = time_methods(torch, timer, fns, W0, METHODS, args.repeats, args.warmup, args.inner, host)
    nbytes = 2 * W0.nbytes
    row = {"out": out_f, "in": in_f, "rank": rank, "bytes": nbytes,
           "factor_dtype": str(A.dtype).replace("torch.", ""),
           "seconds": secs, "gbps": {m: nbytes / s / 1e9 for m, s in secs.items()},
           "vs_copy": {m: secs["copy"] / s for m, s in secs.items()}, "accuracy": acc,
           "host_seconds": host}
    if device == "cuda":  # the kernel alone, host launch cost hidden by a CUDA graph
        g = time_graphs(torch, {"copy": fns["copy"], "triton": fns["triton"]}, W0, ("copy", "triton"),
                        args.repeats, 2 * args.inner)
        row["graph_seconds"] = g
        row["graph_vs_copy"] = g["copy"] / g["triton"]
    return row


def sweep(torch, triton_merge, timer, device, args) -> list:
    rows = []
    shapes = [(4096, 4096), (14336, 4096)] if not args.interpret_smoke else [(96, 160)]
    for out_f, in_f in shapes:
        for rank in RANKS:
            W0, A, B = make_inputs(torch, out_f, in_f, rank, device)
            fns = {"copy": lambda W, src: W.copy_(src)}
            for bm, bn, nw, ns in SWEEP:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
                fns[f"{bm}x{bn}/w{nw}/s{ns}"] = (
                    lambda W, _src, c=cfg: triton_merge.fused_add_matmul_(W, B, A, SCALE, config=c))
            if device == "cuda":  # the kernel alone: the host's launch cost would hide the differences
                secs = time_graphs(torch, fns, W0, list(fns), args.repeats, 2 * args.inner)
            else:
                secs = time_methods(torch, timer, fns, W0, list(fns), args.repeats, args.warmup, args.inner)
            for name, s in secs.items():
                rows.append({"out": out_f, "in": in_f, "rank": rank, "config": name, "seconds": s,
                             "vs_copy": secs["copy"] / s, "gbps": 2 * W0.nbytes / s / 1e9})
            print(f"sweep {out_f}x{in_f} r{rank}: " + ", ".join(
                f"{n} {secs['copy'] / s:.2f}x" for n, s in secs.items() if n != "copy"), flush=True)
    return rows


def table(rows) -> str:
    lines = ["| W (out x in) | rank | factors | copy GB/s | old GB/s (x copy) | triton GB/s (x copy) "
             "| peft GB/s (x copy) | triton kernel alone (x copy, CUDA graph) "
             "| wrong share old / triton / peft | max ulp old / triton / peft | unexplained old / triton "
             "| triton vs old differ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, v, a = r["gbps"], r["vs_copy"], r["accuracy"]
        graph = f"{r['graph_vs_copy']:.2f}x" if "graph_vs_copy" in r else "-"
        lines.append(
            f"| {r.get('label', '')}{r['out']}x{r['in']} | {r['rank']} | {r['factor_dtype']} | {g['copy']:.0f} | "
            + " | ".join(f"{g[m]:.0f} ({v[m]:.2f}x)" for m in ("old", "triton", "peft"))
            + f" | {graph} | " + " / ".join(f"{a[m]['wrong_share']:.1e}" for m in ("old", "triton", "peft"))
            + " | " + " / ".join(f"{a[m]['max_ulp']:.0f}" for m in ("old", "triton", "peft"))
            + f" | {a['old']['unexplained']} / {a['triton']['unexplained']}"
            + f" | {a['triton_vs_old_differ_share']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="folder for the JSON (and the table)")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inner", type=int, default=INNER)
    p.add_argument("--sweep", action="store_true", help="also time the kernel's tile configs")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="CPU, Triton's interpreter, tiny shapes: the script's logic, not its timings")
    args = p.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        args.repeats, args.warmup, args.inner = 2, 1, 1
    t_start = time.perf_counter()

    import torch

    from portable_lora.core import _triton_merge as triton_merge
    from portable_lora.core import capabilities

    device = "cpu" if args.interpret_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --interpret-smoke on a CPU)", file=sys.stderr)
        return 2
    probe = torch.zeros(1, 1, device=device, dtype=torch.bfloat16)
    if not triton_merge.available(probe):
        print("the Triton kernel is not available here (triton missing?)", file=sys.stderr)
        return 2
    timer = Timer(torch, device)
    torch.manual_seed(0)

    if args.interpret_smoke:  # tiny stand-ins with the real shapes' proportions
        cases = [("layer.q ", 64, 64), ("layer.k ", 16, 64), ("layer.gate ", 224, 64), ("layer.down ", 64, 224)]
        ranks, counts = (4, 20), {"layer.q ": 2, "layer.k ": 2, "layer.gate ": 2, "layer.down ": 1}
    else:  # the layer's 7 projections in 4 shapes (q = o, k = v, gate = up)
        by_shape = {}
        for name, out_f, in_f in LLAMA8B_LAYER:
            by_shape.setdefault((out_f, in_f), []).append(name)
        cases = [(f"layer.{'/'.join(names)} ", o, i) for (o, i), names in by_shape.items()]
        ranks = RANKS
        counts = {f"layer.{'/'.join(names)} ": len(names) for names in by_shape.values()}

    rows = []
    for rank in ranks:
        for label, out_f, in_f in cases:
            row = run_case(torch, capabilities, triton_merge, timer, out_f, in_f, rank, device, args)
            row["label"] = label
            rows.append(row)
            print(f"{label}{out_f}x{in_f} r{rank}: " + ", ".join(
                f"{m} {row['gbps'][m]:.0f} GB/s ({row['vs_copy'][m]:.2f}x, host {row['host_seconds'][m] * 1e6:.0f} us)"
                for m in METHODS), flush=True)
    # float32 factors (the ieee FMA dot inside the kernel), one square case per rank
    for rank in ranks[:1]:
        out_f, in_f = cases[0][1], cases[0][2]
        row = run_case(torch, capabilities, triton_merge, timer, out_f, in_f, rank, device, args,
                       factor_dtype=torch.float32)
        row["label"] = "fp32 factors "
        rows.append(row)

    # the whole layer: the 7 projections' bytes over the sum of their times
    layer = []
    for rank in ranks:
        parts = [r for r in rows if r["rank"] == rank and r["label"] in counts]
        total_bytes = sum(counts[r["label"]] * r["bytes"] for r in parts)
        secs = {m: sum(counts[r["label"]] * r["seconds"][m] for r in parts) for m in METHODS}
        layer.append({"rank": rank, "bytes": total_bytes, "seconds": secs,
                      "gbps": {m: total_bytes / s / 1e9 for m, s in secs.items()},
                      "vs_copy": {m: secs["copy"] / s for m, s in secs.items()}})

    sweep_rows = sweep(torch, triton_merge, timer, device, args) if args.sweep else []

    text = table(rows) + "\n\nWhole Llama-8B layer (7 projections):\n\n| rank | " + " | ".join(
        f"{m} GB/s (x copy)" for m in METHODS) + " |\n|---|" + "---|" * len(METHODS) + "\n" + "\n".join(
        f"| {L['rank']} | " + " | ".join(f"{L['gbps'][m]:.0f} ({L['vs_copy'][m]:.2f}x)" for m in METHODS) + " |"
        for L in layer)
    print()
    print(text)

    # the kernel keeps the contract: every element within float32 accuracy of the exact sum
    # (rounded once), few off the exact sum rounded once, and it agrees with the old path
    bad = [(r["label"], r["out"], r["in"], r["rank"], r["accuracy"]) for r in rows
           if r["accuracy"]["triton"]["unexplained"] or r["accuracy"]["triton"]["wrong_share"] > 1e-3
           or r["accuracy"]["triton_vs_old_differ_share"] > 1e-3]
    for b in bad:
        print("ACCURACY FAIL (triton):", b, file=sys.stderr)

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
           "triton": getattr(triton_merge._STATE.get("triton"), "__version__", None),
           "configs": triton_merge._CONFIGS, "repeats": args.repeats, "inner": args.inner,
           "wall_s": time.perf_counter() - t_start}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"env": env, "rows": rows, "layer": layer, "sweep": sweep_rows, "accuracy_failures": bad}
        (args.out / "bench_triton_merge.json").write_text(json.dumps(result, indent=1))
        (args.out / "bench_triton_merge.md").write_text(text + "\n")
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['wall_s']:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
