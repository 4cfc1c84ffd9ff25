"""portable-lora benchmarks: one runner for CPU (``--quick`` or full) and CUDA (``--device cuda``).

    .venv/bin/python benchmarks/run.py --quick              # ./run bench: about a minute on CPU
    .venv/bin/python benchmarks/run.py                      # full CPU sizes (minutes)
    python3 benchmarks/run.py --device cuda --out "$OUT"    # every CUDA measurement (see cuda_run.sh)
    .venv/bin/python benchmarks/run.py --quick --only forward,merge

Each row times ours and its peers in the same run (median of interleaved repeats, warm-up
first) and reports their ratio, and where a target applies, whether it is met. The table is
printed as it goes and again as Markdown at the end; the JSON goes to ``benchmarks/out/``
(or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the library from this checkout, installed or not

from _common import Results, Settings, environment, markdown_tables, write_json  # noqa: E402

SECTIONS = ("forward", "forward_mlx", "forward_jax", "merge", "convert", "dispatch", "stream")
MODES = ("eager", "cudagraph", "compiled", "compiled-cg")


def _plan(quick: bool, device: str) -> dict:
    """Sizes per mode. CUDA always runs the full set; CPU full mode skips T=4096 (minutes per call).

    ``mlx_max_work``: MLX's CPU matmul runs at a few GFLOP/s here, so MLX rows keep to
    ``T·in·out`` at most this (the T=256 row of a 4096-wide layer alone would take minutes).
    """
    if device == "cuda":
        return {"sizes": [(4096, 4096), (4096, 14336)], "ranks": [16, 64], "tokens": [1, 16, 256, 4096],
                "modes": ["eager", "cudagraph", "compiled"], "merge_layers": 32, "stream_mb": 0,
                "cpu_sizes": [], "mlx_max_work": 0}
    if quick:
        return {"sizes": [(1024, 1024)], "ranks": [16], "tokens": [1, 16, 256], "modes": ["eager", "compiled"],
                "merge_layers": 1, "stream_mb": 200, "cpu_sizes": [(1024, 1024)],
                "mlx_max_work": 2**24}
    return {"sizes": [(4096, 4096), (4096, 14336)], "ranks": [16, 64], "tokens": [1, 16, 256],
            "modes": ["eager", "compiled"], "merge_layers": 2, "stream_mb": 2048,
            "cpu_sizes": [(4096, 4096), (4096, 14336)], "mlx_max_work": 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced CPU sizes (about a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--out", default=str(HERE / "out"), help="folder for the JSON and Markdown")
    parser.add_argument("--tiny", action="store_true",
                        help="smallest sizes in every section (to test the CUDA script's logic on CPU)")
    parser.add_argument("--modes", default="",
                        help="comma-separated forward modes to run instead of the plan's: eager, cudagraph, "
                             "compiled, compiled-cg (torch.compile mode='reduce-overhead')")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new forward configurations after this many seconds")
    args = parser.parse_args(argv)

    wanted = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    unknown = set(wanted) - set(SECTIONS) | (set(filter(None, args.skip.split(","))) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    wanted = [s for s in wanted if s not in args.skip.split(",")]

    settings = Settings.for_mode(args.quick, args.device)
    plan = _plan(args.quick, args.device)
    if args.modes:
        modes = [m for m in args.modes.split(",") if m]
        bad = set(modes) - set(MODES)
        if bad:
            parser.error(f"unknown mode(s) {sorted(bad)}; choose from {MODES}")
        plan["modes"] = modes
    if args.tiny:
        plan.update(sizes=[(256, 512)], ranks=[8], tokens=[1, 16], merge_layers=1, stream_mb=16,
                    cpu_sizes=[(256, 512)])
        settings.min_sample_s, settings.repeats = 0.005, 3
    results = Results(settings)
    started = time.perf_counter()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    results.environment = environment(args.device)
    print(f"# portable-lora benchmarks: device={args.device} quick={args.quick} tiny={args.tiny} "
          f"torch threads={torch.get_num_threads()}", flush=True)
    print(f"# {results.environment}", flush=True)

    ceil = None
    deadline = started + args.budget_s
    stem = f"{args.device}-{'tiny' if args.tiny else 'quick' if args.quick else 'full'}-" \
           f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(args.out)

    def run(name, fn):
        if name not in wanted:
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            results.failed.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"# section {name} FAILED: {exc}", flush=True)
        print(f"# section {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        write_json(results, out_dir, stem)  # what is done so far survives a later kill

    import bench_torch

    def forward(modes):
        def go():
            nonlocal ceil
            if ceil is None:
                ceil = bench_torch.ceilings(settings, dtype)
                results.environment["ceilings"] = ceil
                print(f"# ceilings: {ceil}", flush=True)
            bench_torch.forward(results, settings, sizes=plan["sizes"], ranks=plan["ranks"],
                                tokens=plan["tokens"], dtype=dtype, modes=modes, ceil=ceil, deadline=deadline)
        return go

    # compiling is the slow part: the compiled pass runs last, after everything else is safe
    eager_modes = [m for m in plan["modes"] if not m.startswith("compiled")]
    run("forward", forward(eager_modes))
    run("dispatch", lambda: (bench_torch.dispatch(results, settings), bench_torch.dispatch_core(results, settings)))
    run("merge", lambda: bench_torch.merge(results, settings, dtype=dtype, layers=plan["merge_layers"]))
    if args.device == "cpu":
        def forward_mlx():
            import bench_mlx
            bench_mlx.forward(results, settings, sizes=plan["cpu_sizes"], ranks=plan["ranks"],
                              tokens=plan["tokens"], max_work=plan["mlx_max_work"])
            bench_mlx.dispatch(results, settings)

        def forward_jax():
            import bench_jax
            bench_jax.forward(results, settings, sizes=plan["cpu_sizes"], ranks=plan["ranks"], tokens=plan["tokens"])
            bench_jax.dispatch(results, settings)

        def convert():
            import bench_io
            bench_io.convert(results, settings, tiny=args.tiny)

        def stream():
            import bench_io
            bench_io.stream(results, settings, total_mb=plan["stream_mb"])

        run("forward_mlx", forward_mlx)
        run("forward_jax", forward_jax)
        run("convert", convert)
        run("stream", stream)
    for mode in plan["modes"]:
        if mode.startswith("compiled"):
            run("forward", forward([mode]))  # (it empties dynamo's cache per size and rank)

    results.environment["seconds"] = round(time.perf_counter() - started, 1)
    path = write_json(results, out_dir, stem)
    tables = markdown_tables(results)
    (out_dir / f"{stem}.md").write_text(
        f"Command: `{' '.join([Path(sys.executable).name, 'benchmarks/run.py', *(argv or sys.argv[1:])])}`\n\n"
        f"Environment: {results.environment}\n\n{tables}")
    print("\n" + tables)
    if results.skipped:
        print("# left out: " + "; ".join(results.skipped))
    if results.failed:
        print("# sections that FAILED: " + "; ".join(results.failed))
    not_met = [r for r in results.rows if r.met is False]
    print(f"# {len(results.rows)} rows, {len(not_met)} not at target; wrote {path} "
          f"({results.environment['seconds']}s)")
    return 1 if results.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
