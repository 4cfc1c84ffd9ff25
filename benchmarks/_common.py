"""Shared benchmark plumbing: timing (median of interleaved repeats), rows, tables, environment.

Every comparison times ours and its peers in the same process, interleaved sample by sample
(ours, peer, ours, peer, ...), so a machine that slows down mid-run slows all of them alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

# -- settings ------------------------------------------------------------------------------------


@dataclass
class Settings:
    """How long to time: ``min_sample_s`` per sample, ``repeats`` samples, median reported."""

    quick: bool = True
    device: str = "cpu"
    min_sample_s: float = 0.02
    repeats: int = 5
    warmup: int = 3

    @classmethod
    def for_mode(cls, quick: bool, device: str) -> "Settings":
        if device == "cuda":
            return cls(quick=quick, device=device, min_sample_s=0.01, repeats=9 if not quick else 5, warmup=5)
        if quick:
            return cls(quick=True, device=device, min_sample_s=0.02, repeats=5, warmup=3)
        return cls(quick=False, device=device, min_sample_s=0.05, repeats=7, warmup=3)


# -- timing -----------------------------------------------------------------------------------------

def _sync_for(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _sample(fn: Callable[[], Any], n: int, device: str, sync: Callable[[], None]) -> float:
    """Seconds per call over ``n`` back-to-back calls (CUDA: events around the loop)."""
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    _block(out)
    return (time.perf_counter() - t0) / n


def _block(out: Any) -> None:
    # lazy frameworks (MLX, JAX) compute only when asked: the timed call must finish its work
    if out is None:
        return
    evaluate = getattr(out, "block_until_ready", None)
    if evaluate is not None:
        evaluate()
        return
    if type(out).__module__.startswith("mlx"):
        import mlx.core as mx

        mx.eval(out)


def compare(fns: dict[str, Callable[[], Any]], settings: Settings) -> dict[str, float]:
    """Median seconds per call of each function, sampled interleaved; warm-up first.

    Each function is calibrated to a call count whose sample lasts ``min_sample_s``; then
    ``repeats`` rounds run every function once each, in turn.
    """
    sync = _sync_for(settings.device)
    counts = {}
    for name, fn in fns.items():
        for _ in range(settings.warmup):
            _block(fn())
        sync()
        n = 1
        while True:
            took = _sample(fn, n, settings.device, sync) * n
            if took >= settings.min_sample_s or n >= 1 << 20:
                break
            n = max(n * 2, int(n * settings.min_sample_s / max(took, 1e-9) * 1.2))
        counts[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(settings.repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, counts[name], settings.device, sync))
    return {name: statistics.median(v) for name, v in samples.items()}


def time_once(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall seconds of ``repeats`` single calls (for calls that take seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- results ---------------------------------------------------------------------------------------

@dataclass
class Row:
    """One table row: ``case`` names the configuration, ``values`` the measured columns."""

    section: str
    case: str
    values: dict[str, Any]
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Results:
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # left out on purpose (time budget, work limit)
    failed: list[str] = field(default_factory=list)   # sections that raised

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def to_json(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "environment": self.environment,
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped, "failed": self.failed}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def format_row(row: Row) -> str:
    values = "  ".join(f"{k}={_fmt(v)}" for k, v in row.values.items())
    verdict = "" if row.met is None else ("  [met]" if row.met else "  [NOT MET]")
    return f"[{row.section}] {row.case}: {values}{verdict}"


def markdown_tables(results: Results) -> str:
    """One Markdown table per section, columns in first-seen order, plus target verdicts."""
    out = []
    sections: dict[str, list[Row]] = {}
    for row in results.rows:
        sections.setdefault(row.section, []).append(row)
    for section, rows in sections.items():
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row.values if c not in columns]
        has_target = any(r.target for r in rows)
        head = ["case"] + columns + (["target", "met"] if has_target else [])
        out.append(f"### {section}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for row in rows:
            cells = [row.case] + [_fmt(row.values.get(c, "")) for c in columns]
            if has_target:
                cells += [row.target, "" if row.met is None else ("yes" if row.met else "**no**")]
            out.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
        if notes:
            out.append("")
            out.extend(notes)
        out.append("")
    return "\n".join(out)


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "python": sys.version.split()[0], "platform": platform.platform(),
                           "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    names = ["numpy", "torch", "peft", "transformers", "safetensors", "array_api_compat", "ml_dtypes",
             "portable_lora"]
    if device == "cpu":  # never initialise JAX next to a CUDA run
        names += ["jax", "flax", "mlx", "mlx_lm"]
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
                continue
        version = getattr(module, "__version__", None)
        if version is None and name == "mlx":
            import mlx.core

            version = mlx.core.__version__
        versions[name] = version or "?"
    env["versions"] = versions
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = props.name
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["cuda"] = torch.version.cuda
    return env


def write_json(results: Results, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(results.to_json(), indent=2, default=str) + "\n")
    return path


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
