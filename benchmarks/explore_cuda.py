"""Measurements behind the library's CUDA decisions (not part of run.py's tables; see
benchmarks/NOTES.md §13-15). One GPU, bfloat16, CUDA graphs unless said otherwise:

* ``add``: the unfused forward's LoRA add at 256-4096 tokens, cuBLAS ``addmm_`` against the
  Triton in-place add (``capabilities._triton_add_``), eager and in CUDA graphs, per layer
  against the plain linear: where ``_TRITON_ADD_MIN_ELEMENTS`` comes from;
* ``tiles``: the fused forward kernel (``_triton_linear``) at 64-256 tokens over tile
  configs, against the plain linear: where ``config_for``'s choices come from;
* ``merge``: ``plt.merge`` + ``plt.unmerge`` of an 8B model's projections (rank 16, factors in
  host memory) against a device copy of the weights, over the upload's packing threads and
  chunk sizes, without grouped launches, grouped from per-factor views, and from stacked
  factors (the default), planning first or interleaved, and a host-time line of one merge;
* ``compiled``: ``torch.compile`` of our layer with the custom op and without it (the unfused
  ops compiled by inductor), against the compiled plain linear and our eager layer;
* ``accumulate``: the unfused forward with the LoRA term computed first and the base GEMM
  accumulated into it, against the library's path and the fused kernel (not kept).

    python3 benchmarks/explore_cuda.py --out DIR [--only add,tiles,merge]   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_torch as bt  # noqa: E402
from _common import Settings, compare  # noqa: E402

SIZES = [(4096, 4096), (4096, 14336)]
RANKS = (16, 64)


def layer_sets(gen):
    """(label, layers, factors) per size and rank: enough bias-free bf16 layers in rotation that
    the weights do not sit in L2 (as bench_torch does), each with its own rank-r factors."""
    for in_f, out_f in SIZES:
        n = bt._layer_count(in_f * out_f * 2, "cuda")
        bases = [bt.make_linear(in_f, out_f, torch.bfloat16, "cuda", gen) for _ in range(n)]
        for r in RANKS:
            factors = [tuple(t.cuda() for t in bt.make_factors(in_f, out_f, r, torch.bfloat16, gen))
                       for _ in range(n)]
            yield f"{in_f}->{out_f} r{r}", [(b.weight, A, B) for b, (A, B) in zip(bases, factors)]
        del bases


def rotation(parts, one):
    """fn() calling ``one(W, A, B)`` for every layer of the rotation (the last result back)."""
    def run():
        out = None
        for W, A, B in parts:
            out = one(W, A, B)
        return out
    return run


def add(out: dict, settings) -> None:
    from portable_lora.core import capabilities

    rows = []
    for label, parts in layer_sets(torch.Generator().manual_seed(0)):
        for T in (256, 512, 1024, 4096):
            x = torch.randn(T, parts[0][0].shape[1], device="cuda", dtype=torch.bfloat16)

            def addmm(W, A, B):
                return F.linear(x, W).addmm_(x @ A.T, B.T, alpha=2.0)

            def triton(W, A, B):
                y = F.linear(x, W)
                assert capabilities._triton_add_(y, x @ A.T, B.T, 2.0, min_elements=0)
                return y

            fns = {"linear": rotation(parts, lambda W, A, B: F.linear(x, W)),
                   "addmm": rotation(parts, addmm), "triton": rotation(parts, triton)}
            graphs = compare({k: bt._cuda_graph(f) for k, f in fns.items()}, settings)
            eager = compare(fns, settings)
            row = {"case": f"{label} T{T}", "linear_us": graphs["linear"] / len(parts) * 1e6}
            for mode, t in (("graphs", graphs), ("eager", eager)):
                for k in ("addmm", "triton"):
                    row[f"{mode} {k}/linear"] = round(t[k] / t["linear"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["add"] = rows


TILES = [(64, 64, 128, 4, 3), (64, 64, 64, 4, 4), (64, 32, 128, 4, 4), (64, 32, 256, 4, 3),
         (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 32, 128, 4, 4),
         (128, 128, 64, 8, 3), (256, 32, 64, 8, 3), (256, 64, 64, 8, 3), (128, 32, 64, 4, 5)]


def tiles(out: dict, settings) -> None:
    from portable_lora.core import _triton_linear

    rows = []
    for label, parts in layer_sets(torch.Generator().manual_seed(0)):
        for T in (64, 128, 256):
            x = torch.randn(T, parts[0][0].shape[1], device="cuda", dtype=torch.bfloat16)
            fns = {"linear": bt._cuda_graph(rotation(parts, lambda W, A, B: F.linear(x, W))),
                   "default": bt._cuda_graph(rotation(parts, lambda W, A, B: _triton_linear.lora_linear(x, W, A, B, 2.0)))}
            for bm, bn, bk, nw, ns in TILES:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                try:
                    fns[f"{bm}x{bn}x{bk}/w{nw}/s{ns}"] = bt._cuda_graph(rotation(
                        parts, lambda W, A, B, cfg=cfg: _triton_linear.lora_linear(x, W, A, B, 2.0, config=cfg)))
                except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory)
                    print(f"  {cfg}: {str(exc)[:80]}", flush=True)
            t = compare(fns, settings)
            ranked = sorted((round(v / t["linear"], 3), k) for k, v in t.items() if k != "linear")
            row = {"case": f"{label} T{T}", "linear_us": t["linear"] / len(parts) * 1e6,
                   "default/linear": round(t["default"] / t["linear"], 3),
                   "default": _triton_linear.config_for(T, parts[0][0].shape[0], parts[0][0].shape[1],
                                                        parts[0][1].shape[0]),
                   "best": ranked[:3]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["tiles"] = rows


def merge(out: dict, settings) -> None:
    import concurrent.futures as futures

    import portable_lora as pl
    import portable_lora.torch as plt
    from portable_lora import core
    from portable_lora.backends import torch as backend
    from portable_lora.core import capabilities

    gen = torch.Generator().manual_seed(1)
    shapes = pl.examples.llama_module_shapes(layers=32, hidden=4096, intermediate=14336, kv_hidden=1024)
    model = bt._model_from_shapes(shapes, torch.bfloat16, "cuda", gen)
    adapter = bt._adapter_for(shapes, 16, torch.bfloat16, gen)
    weights = [model.get_submodule(n).weight for n in shapes]
    targets = [torch.empty_like(w) for w in weights]

    def best_ms(fn, n=5):
        best = 1e9
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def pair():
        plt.merge(model, adapter)
        plt.unmerge(model, adapter)

    def copy():
        for d, w in zip(targets, weights):
            d.copy_(w)

    pair()
    res = {"copy_ms": best_ms(copy)}
    defaults = backend._PACK_THREADS, backend._FIRST_CHUNK_BYTES, backend._CHUNK_BYTES
    # without the grouped launches: every layer its own launch; then grouped, but from a view
    # per factor (merge_into_many: the path before stacked uploads)
    grouped = {k: capabilities.CAPABILITIES[k].pop("torch") for k in ("add_matmul_many_", "add_matmul_stacked_")}
    res["ungrouped pair ms"] = best_ms(pair)
    capabilities.CAPABILITIES["add_matmul_many_"]["torch"] = grouped["add_matmul_many_"]
    res["grouped, views per factor pair ms"] = best_ms(pair)
    capabilities.CAPABILITIES["add_matmul_stacked_"]["torch"] = grouped["add_matmul_stacked_"]
    res["stacked (default) pair ms"] = best_ms(pair)
    # planning and merging interleaved (the default) or every layer planned first, A/B/A/B
    for label in ("planned first", "interleaved", "planned first", "interleaved"):
        backend._INTERLEAVE = label == "interleaved"
        res.setdefault(f"{label} pair ms", []).append(best_ms(pair))
    backend._INTERLEAVE = True
    for threads in (0, 2, 4, 8):
        for first, chunk in ((1 << 20, 8 << 20), (2 << 20, 16 << 20), (4 << 20, 32 << 20)):
            backend._PACK_THREADS, backend._FIRST_CHUNK_BYTES, backend._CHUNK_BYTES = threads, first, chunk
            res[f"threads {threads}, chunks {first >> 20}/{chunk >> 20} MB: pair ms"] = best_ms(pair)
    backend._PACK_THREADS, backend._FIRST_CHUNK_BYTES, backend._CHUNK_BYTES = defaults
    for k, v in res.items():
        for t in (v if isinstance(v, list) else [v]):
            print(f"{k}: {t:.2f}" + ("" if k == "copy_ms" else f"  (per verb vs copy {2 * res['copy_ms'] / t:.3f})"),
                  flush=True)

    # a host-time line of one merge: when each phase started on the calling thread (packing:
    # on the pack threads) and how long it took
    marks, start = [], [0.0]
    patched = []

    def timed(owner, name, label):
        fn = getattr(owner, name)
        patched.append((owner, name, fn))

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                marks.append(((t0 - start[0]) * 1e3, label, (time.perf_counter() - t0) * 1e3))
        setattr(owner, name, wrapper)

    timed(backend, "_upload_chunk", "upload")
    timed(core, "merge_into_many", "merge launches")
    timed(core, "merge_into_stacked", "stacked launches")
    timed(futures.Future, "result", "wait for packing")
    timed(backend._Chunk, "pack", "pack (thread)")
    try:
        torch.cuda.synchronize()
        start[0] = time.perf_counter()
        plt.merge(model, adapter)
        host = (time.perf_counter() - start[0]) * 1e3
        torch.cuda.synchronize()
        total = (time.perf_counter() - start[0]) * 1e3
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
    plt.unmerge(model, adapter)
    print(f"one merge: host {host:.2f} ms, done on the GPU {total:.2f} ms")
    for at, label, took in sorted(marks):
        print(f"  {at:7.2f} ms  {label:18s} {took:6.2f} ms")
    res["line"] = sorted(marks)

    # where the calling thread's time goes: cProfile over 5 merge + unmerge pairs
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        pair()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue(), flush=True)
    res["profile"] = text.getvalue()
    out["merge"] = res


def compiled(out: dict, settings) -> None:
    """torch.compile (inductor, dynamic=True, fullgraph=True) of our layer with the custom op
    (``torch.ops.portable_lora.linear_lora``) and without it (the unfused ops inductor
    compiles: ``_triton_linear._OP`` set to None around its calls), against the compiled plain
    linear and our eager layer; then the GPU's kernels of one compiled call at 4096 tokens."""
    import torch._dynamo

    from portable_lora.core import _triton_linear

    torch._dynamo.config.recompile_limit = 64  # (this exploration only: variants side by side)
    op = _triton_linear._OP
    gen = torch.Generator().manual_seed(0)
    rows = []
    for (in_f, out_f), rank in zip(SIZES, RANKS):
        n = bt._layer_count(in_f * out_f * 2, "cuda")
        bases = [bt.make_linear(in_f, out_f, torch.bfloat16, "cuda", gen) for _ in range(n)]
        factors = [tuple(t.cuda() for t in bt.make_factors(in_f, out_f, rank, torch.bfloat16, gen))
                   for _ in range(n)]
        ours = [bt.ours_wrap(b, A, B, 2.0 * rank) for b, (A, B) in zip(bases, factors)]
        lin_c = [torch.compile(m, fullgraph=True, dynamic=True) for m in bases]
        ours_c = [torch.compile(m, fullgraph=True, dynamic=True) for m in ours]
        for T in (16, 256, 4096):
            x = torch.randn(1, T, in_f, generator=gen).to(device="cuda", dtype=torch.bfloat16)

            def calls(ms, with_op=True):
                def run():
                    _triton_linear._OP = op if with_op else None
                    try:
                        for m in ms:
                            y = m(x)
                    finally:
                        _triton_linear._OP = op
                    return y
                return run

            parts = [(m.base.weight, m.lora_A, m.lora_B, m.scale) for m in ours]

            def op_eager(fn):
                def run():
                    for W, A, B, s in parts:
                        y = fn(x, W, A, B, s, None)
                    return y
                return run

            fns = {"linear_c": calls(lin_c), "ours_eager": calls(ours), "ours_c_op": calls(ours_c),
                   "ours_c_unfused": calls(ours_c, False), "op_called_eagerly": op_eager(op),
                   "op_impl_direct": op_eager(_triton_linear._op_impl)}
            want = fns["ours_eager"]()
            for k in ("ours_c_op", "ours_c_unfused"):
                err = bt._rel_err(fns[k](), want)
                assert err < 1e-2, (k, T, err)
            t = compare(fns, settings)
            row = {"case": f"{in_f}->{out_f} r{rank} T{T}", "linear_c_us": round(t["linear_c"] / n * 1e6, 1)}
            for k in ("ours_eager", "ours_c_op", "ours_c_unfused", "op_called_eagerly", "op_impl_direct"):
                row[f"{k}/linear_c"] = round(t[k] / t["linear_c"], 3)
            # the GPU's own time per layer call (CUDA events over 20 rotations), to tell host from GPU
            for k in ("linear_c", "ours_c_op", "ours_c_unfused"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(20):
                    fns[k]()
                end.record()
                torch.cuda.synchronize()
                row[f"{k} wall_us(GPU-timed)"] = round(start.elapsed_time(end) * 1e3 / 20 / n, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if T == 4096:
                from torch.profiler import ProfilerActivity, profile

                for k in ("ours_c_op", "ours_eager"):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        fns[k]()
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=6)
                    print(f"# kernels of {k}, {in_f}->{out_f} T4096, {n} layers:\n{table}", flush=True)
                    out.setdefault("compiled_kernels", {})[f"{k} {in_f}->{out_f}"] = table
        del bases, ours, lin_c, ours_c
    out["compiled"] = rows


def accumulate(out: dict, settings) -> None:
    """The unfused forward with the LoRA term computed first and the base GEMM accumulated
    into it (``C = s·(x@Aᵀ)@Bᵀ``, then ``C.addmm_(x, Wᵀ)``: cuBLAS reads C in its epilogue,
    beta = 1) against the library's path (``F.linear``, then the LoRA term added into its
    output: a read and a write of the output more) and the fused kernel, 256-4096 tokens,
    CUDA graphs and eager; then each variant's kernels at 4096 tokens (4096², r = 16)."""
    from portable_lora import core
    from portable_lora.core import _triton_linear

    zero = torch.zeros((), device="cuda", dtype=torch.bfloat16)
    rows = []
    for label, parts in layer_sets(torch.Generator().manual_seed(0)):
        bias = torch.randn(parts[0][0].shape[0], device="cuda", dtype=torch.bfloat16)
        for T in (256, 1024, 4096):
            x = torch.randn(T, parts[0][0].shape[1], device="cuda", dtype=torch.bfloat16)

            def current(W, A, B):
                return core.add_lora_output(F.linear(x, W), x, A, B, 2.0, overwrite=True)

            def first_alpha(W, A, B):
                return torch.addmm(zero, x @ A.T, B.T, beta=0, alpha=2.0).addmm_(x, W.T)

            def first_mul(W, A, B):
                return ((x @ A.T).mul_(2.0) @ B.T).addmm_(x, W.T)

            def first_bias(W, A, B):
                return torch.addmm(bias, x @ A.T, B.T, alpha=2.0).addmm_(x, W.T)

            fns = {"linear": lambda W, A, B: F.linear(x, W), "current": current,
                   "first_alpha": first_alpha, "first_mul": first_mul,
                   "linear_bias": lambda W, A, B: F.linear(x, W, bias), "first_bias": first_bias}
            if T <= 256:
                fns["fused"] = lambda W, A, B: _triton_linear.lora_linear(x, W, A, B, 2.0)
            W, A, B = parts[0]
            want = (x.double() @ W.double().T + 2.0 * (x.double() @ A.double().T) @ B.double().T)
            errs = {}
            for k in ("current", "first_alpha", "first_mul") + (("fused",) if T <= 256 else ()):
                got = fns[k](W, A, B).double()
                errs[k] = float((got - want).abs().max() / want.abs().max())
            got = first_bias(W, A, B).double()
            errs["first_bias"] = float((got - want - bias.double()).abs().max() / want.abs().max())
            runs = {k: rotation(parts, f) for k, f in fns.items()}
            graphs = compare({k: bt._cuda_graph(f) for k, f in runs.items()}, settings)
            eager = compare(runs, settings)
            row = {"case": f"{label} T{T}", "linear_us": round(graphs["linear"] / len(parts) * 1e6, 1),
                   "max_err/max|y|": {k: f"{v:.2e}" for k, v in errs.items()}}
            for mode, t in (("graphs", graphs), ("eager", eager)):
                for k in fns:
                    if k in ("linear", "linear_bias"):
                        continue
                    ref = t["linear_bias"] if k == "first_bias" else t["linear"]
                    row[f"{mode} {k}/linear"] = round(t[k] / ref, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if T == 4096 and label == "4096->4096 r16":
                from torch.profiler import ProfilerActivity, profile

                for k in ("linear", "current", "first_alpha"):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        runs[k]()
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=6)
                    print(f"# kernels of {k}, {label} T4096, {len(parts)} layers:\n{table}", flush=True)
    out["accumulate"] = rows


SECTIONS = {"add": add, "tiles": tiles, "merge": merge, "compiled": compiled, "accumulate": accumulate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args()
    settings = Settings(quick=True, device="cuda", min_sample_s=0.01, repeats=5, warmup=3)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for name in args.only.split(","):
            t0 = time.perf_counter()
            SECTIONS[name](out, settings)
            print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            (args.out / "explore.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
