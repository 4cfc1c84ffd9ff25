"""File work: adapter conversion (PEFT → mlx-lm, PEFT → portable) and the streaming merge.

Conversion: a 448-tensor, ~84 MB bf16 PEFT adapter (rank 16 on every projection of an
8B-Llama-shaped model), converted with :func:`portable_lora.ops.convert`, against
``safetensors.torch.load_file`` + ``save_file`` of the same file.

Streaming merge: :func:`portable_lora.ops.merge` of a rank-16 adapter into a generated,
sharded bf16 checkpoint, run in a fresh subprocess that reports its time and peak RSS;
against ``shutil.copyfile`` of the same shards. Both read the base from the page cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

import portable_lora as pl
from portable_lora import formats, ops

from _common import Results, Row, Settings, ratio

BENCH_TMP = os.environ.get("PORTABLE_LORA_BENCH_TMP") or tempfile.gettempdir()


def _best_of(fn, repeats: int, cleanup) -> float:
    times = []
    for _ in range(repeats):
        cleanup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    cleanup()
    return float(np.median(times))


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# -- conversion ----------------------------------------------------------------------------------------

def convert(results: Results, settings: Settings, *, tiny: bool = False) -> None:
    layers, hidden, inter, kv = (2, 256, 512, 64) if tiny else (32, 4096, 14336, 1024)
    shapes = pl.examples.llama_module_shapes(layers=layers, hidden=hidden, intermediate=inter, kv_hidden=kv)
    adapter = pl.examples.random_adapter(shapes, rank=16, dtype=ml_dtypes.bfloat16)
    repeats = 3 if settings.quick else 5
    with tempfile.TemporaryDirectory(dir=BENCH_TMP) as tmp:
        tmp = Path(tmp)
        src = tmp / "peft"
        formats.save(adapter, src, format="peft")
        weights = src / "adapter_model.safetensors"
        size = weights.stat().st_size
        import safetensors.torch as st

        copy_out = tmp / "copy.safetensors"
        t_ls = _best_of(lambda: st.save_file(st.load_file(weights), copy_out), repeats, lambda: _rm(copy_out))

        def load_save_fsync():
            # the same, made as durable as our atomic writes (file and directory fsync'd)
            st.save_file(st.load_file(weights), copy_out)
            with open(copy_out, "rb+") as f:
                os.fsync(f.fileno())
            directory = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

        t_lsf = _best_of(load_save_fsync, repeats, lambda: _rm(copy_out))
        for target, out in (("mlx-lm", tmp / "mlx"), ("portable", tmp / "adapter.safetensors")):
            ops.convert(src, out, to=target)  # warm-up (imports), and proof that it works
            back = formats.load(out)
            if sorted(back) != sorted(adapter):
                raise AssertionError(f"convert to {target}: modules changed")
            t = _best_of(lambda: ops.convert(src, out, to=target), repeats, lambda o=out: _rm(o))
            t_d = _best_of(lambda: ops.convert(src, out, to=target, durable=True), repeats, lambda o=out: _rm(o))
            values = {"tensors": 2 * len(adapter), "MB": size / 1e6, "load+save_ms": t_ls * 1e3,
                      "ours_ms": t * 1e3, "ours/load+save": ratio(t, t_ls),
                      "durable: load+save+fsync_ms": t_lsf * 1e3, "durable: ours_ms": t_d * 1e3,
                      "durable: ours/load+save+fsync": ratio(t_d, t_lsf)}
            results.add(Row("conversion", f"PEFT -> {target} ({2 * len(adapter)} tensors, bf16)", values,
                            "≤2× load+save", t / t_ls <= 2.0,
                            note="ours writes atomically (temporary + rename), not fsynced by default, as "
                                 "safetensors' save_file; durable = ops.convert(durable=True), which fsyncs "
                                 "the files and their directory, against load + save + the same fsyncs"))


# -- streaming merge --------------------------------------------------------------------------------

# VmHWM (this process's peak RSS) and not ru_maxrss, which Linux carries over from the parent
# across fork + exec
_CHILD = r"""
import json, sys, time
def hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])
sys.path.insert(0, sys.argv[4])
from portable_lora import ops
base_rss = hwm_kb()
if sys.argv[5].startswith("merge"):
    t0 = time.perf_counter()
    ops.merge(sys.argv[1], sys.argv[2], sys.argv[3], durable=sys.argv[5] == "merge-durable")
    seconds = time.perf_counter() - t0
else:
    seconds = 0.0
print(json.dumps({"seconds": seconds, "base_rss_kb": base_rss, "peak_rss_kb": hwm_kb()}))
"""


def _make_checkpoint(root: Path, *, layers: int, hidden: int, inter: int, kv: int, vocab: int,
                     seed: int = 0) -> tuple[Path, dict[str, tuple[int, int]], int, int]:
    """A sharded bf16 Llama-shaped checkpoint (one shard per layer, embeddings in the first)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = pl.examples.llama_module_shapes(layers=layers, hidden=hidden, intermediate=inter, kv_hidden=kv)
    weight_map, total, largest = {}, 0, 0
    for i in range(layers):
        tensors = {}
        if i == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16)
        for name, (out_f, in_f) in shapes.items():
            if name.startswith(f"model.layers.{i}."):
                tensors[name + ".weight"] = (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(torch.bfloat16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(root / shard), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = shard
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                  "num_hidden_layers": layers}))
    return root, shapes, total, largest


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merge subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stream(results: Results, settings: Settings, *, total_mb: int) -> None:
    """``total_mb`` of base weights: Llama-8B widths when ≥ 1 GB, else a 1024-wide model."""
    if total_mb >= 1000:
        dims = {"hidden": 4096, "inter": 14336, "kv": 1024, "vocab": 32000}
        per_layer = 218e6 * 2
    else:
        dims = {"hidden": 1024, "inter": 3584, "kv": 256, "vocab": 8192}
        per_layer = (2 * 1024 * 1024 + 2 * 256 * 1024 + 3 * 1024 * 3584) * 2
    if total_mb < 50:  # --tiny
        dims = {"hidden": 256, "inter": 512, "kv": 64, "vocab": 1024}
        per_layer = (2 * 256 * 256 + 2 * 64 * 256 + 3 * 256 * 512) * 2
    layers = max(1, round(total_mb * 1e6 / per_layer))
    library_root = str(Path(pl.__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(dir=BENCH_TMP) as tmp:
        tmp = Path(tmp)
        base, shapes, total, largest = _make_checkpoint(tmp / "base", layers=layers, **dims)
        adapter = pl.examples.random_adapter(shapes, rank=16, dtype=ml_dtypes.bfloat16)
        adapter_dir = tmp / "adapter"
        formats.save(adapter, adapter_dir, format="peft")
        adapter_bytes = sum(m.A.nbytes + m.B.nbytes for m in adapter.values())
        out = tmp / "merged"
        copy_dir = tmp / "copy"

        def copy_files():
            copy_dir.mkdir()
            for f in sorted(base.iterdir()):
                shutil.copyfile(f, copy_dir / f.name)

        def copy_files_durable():
            copy_files()
            for f in sorted(copy_dir.iterdir()):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        # the page cache holds the base for both (it was just written); warm it once more.
        # Copy and merge alternate (copy, merge, copy, merge, ...) so that both see the same
        # state of the machine (dirty-page writeback made a copy measured alone vary 1-3 GB/s)
        copy_files()
        _rm(copy_dir)
        idle = _child([str(base), str(adapter_dir), str(out), library_root, "idle"])
        runs, copies = [], []
        for _ in range(3 if settings.quick else 5):
            copies.append(_best_of(copy_files, 1, lambda: _rm(copy_dir)))
            _rm(out)
            runs.append(_child([str(base), str(adapter_dir), str(out), library_root, "merge"]))
        t_copy = float(np.median(copies))
        # durable: every output fsynced, against a copy fsynced the same way
        t_copy_durable = _best_of(copy_files_durable, 1, lambda: _rm(copy_dir))
        _rm(out)
        durable = _child([str(base), str(adapter_dir), str(out), library_root, "merge-durable"])
        # the merge is checked: one merged projection equals W + s·B@A rounded once
        _check_merged(base, out, adapter, shapes)
        _rm(out)
        t_merge = float(np.median([r["seconds"] for r in runs]))
        peak = max(r["peak_rss_kb"] for r in runs) * 1024
        base_rss = idle["peak_rss_kb"] * 1024
        budget = 2 * largest + adapter_bytes
        values = {"base_MB": total / 1e6, "shards": layers, "largest_tensor_MB": largest / 1e6,
                  "copy_MBps": total / t_copy / 1e6, "ours_MBps": total / t_merge / 1e6,
                  "ours/copy": ratio(total / t_merge, total / t_copy),
                  "copy_min_max_MBps": f"{total / max(copies) / 1e6:.0f}-{total / min(copies) / 1e6:.0f}",
                  "durable: copy+fsync_MBps": total / t_copy_durable / 1e6,
                  "durable: ours_MBps": total / durable["seconds"] / 1e6,
                  "durable: ours/copy": ratio(t_copy_durable, durable["seconds"]),
                  "peak_rss_MB": peak / 1e6, "import_rss_MB": base_rss / 1e6,
                  "merge_rss_MB": (peak - base_rss) / 1e6, "rss_budget_MB": budget / 1e6}
        met = values["ours/copy"] >= 0.5 and (peak - base_rss) <= budget
        results.add(Row("streaming merge cpu", f"{total / 1e6:.0f} MB bf16, {layers} shards, r16", values,
                        "≥0.5× copy; RSS ≤ 2×largest+adapter", met,
                        note="merge_rss = peak RSS of the merge subprocess minus that of the same "
                             "subprocess after its imports (Python, NumPy, the library); copy and merge "
                             "alternate, medians; durable = every file fsynced (ops.merge(durable=True) "
                             "against the copy followed by an fsync of each file)"))


def _check_merged(base: Path, out: Path, adapter, shapes) -> None:
    from portable_lora.ops import Checkpoint

    name = next(iter(shapes))
    module = adapter[name]
    with Checkpoint(base) as ckpt:
        W = ckpt.get(name + ".weight", copy=True).astype(np.float32)
    with Checkpoint(out) as merged:
        got = merged.get(name + ".weight", copy=True).astype(np.float32)
    delta = (module.B.astype(np.float32) @ module.A.astype(np.float32)) * module.scale
    want = (W + delta).astype(ml_dtypes.bfloat16).astype(np.float32)
    err = np.linalg.norm(got - want) / np.linalg.norm(delta)
    if not (np.abs(delta).max() > 0 and err < 1e-2):
        raise AssertionError(f"merged {name} is off: |got - (W + ΔW)| / |ΔW| = {err:.2e}")
