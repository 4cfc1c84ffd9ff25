"""``demo``: the library's main job on a small embedded example, end to end.

1. Build a tiny Llama-shaped base checkpoint (two shards and an index, as transformers writes
   them) and a PEFT adapter with mixed ranks and alphas
   (deterministic: the same bytes every run).
2. Inspect the adapter against the base (‖ΔW‖/‖W‖ under every scaling rule).
3. Convert it to every registered format that can express it; formats whose module names
   need a prefix (mlx-vlm's ``language_model.``, the diffusion formats' component) get the
   adapter renamed, as a user would, and renamed back when read.
4. Read every conversion back and verify ΔW module by module against the original.
5. Check the adapter on every installed backend (forward and merge vs float64 NumPy).

With ``out``, an existing directory is reused: the demo replaces its own outputs there
(``base/``, ``adapter-source-peft/``, ``adapter-<format>/`` or ``adapter-<format>.safetensors``)
and leaves every other file alone. A name it writes that is taken by something else (a file
where it writes a directory, a directory holding other files, a directory where it writes a
file) stops it before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import examples, formats
from ..adapter import Adapter
from ..errors import LoraError
from ..io.safetensors_io import write_safetensors
from ._check import CheckReport, check
from ._checkpoint import INDEX_NAME
from ._inspect import InspectReport, inspect
from ._util import collect_warnings, fmt_err, format_table, load_adapter, path_bytes
from ._verify import verify

__all__ = ["demo", "DemoReport", "demo_adapter", "demo_base"]

# where each format's save writes: a directory or one .safetensors file
# a prefix the format's module names need (the demo's model plays a text encoder / VLM text tower)
_RENAME_FOR = {"mlx-vlm": "language_model.", "kohya": "text_encoder.", "diffusers": "text_encoder."}

_B_SHRINK = 0.05
_PROJ_RANK = {"self_attn.q_proj": 8, "self_attn.k_proj": 4, "self_attn.v_proj": 4, "self_attn.o_proj": 8,
              "mlp.gate_proj": 16, "mlp.up_proj": 16, "mlp.down_proj": 12}
_PROJ_ALPHA = {"self_attn.q_proj": 16.0, "self_attn.k_proj": 4.0, "self_attn.v_proj": 8.0,
               "self_attn.o_proj": 8.0, "mlp.gate_proj": 32.0, "mlp.up_proj": 16.0, "mlp.down_proj": 6.0}


def demo_adapter(layers: int = 2) -> Adapter:
    """The demo's adapter: Llama projections with mixed ranks (4–16) and alphas."""
    shapes = examples.llama_module_shapes(layers=layers, hidden=64, intermediate=128)
    proj = {n: n.split(".", 3)[3] for n in shapes}
    adapter = examples.random_adapter(shapes, rank={n: _PROJ_RANK[p] for n, p in proj.items()},
                                      alpha={n: _PROJ_ALPHA[p] for n, p in proj.items()}, seed=7,
                                      base_model="tiny-llama (random, portable-lora demo)")
    for m in adapter.values():  # a trained adapter moves W by a few percent, not by a third
        m.B = (m.B * np.float32(_B_SHRINK)).astype(m.B.dtype)
    adapter.provenance["created_by"] = "portable-lora demo"
    return adapter


def demo_base(adapter: Adapter, layers: int = 2, hidden: int = 64, vocab: int = 256) -> dict[str, np.ndarray]:
    """Base weights of a tiny Llama: every projection the adapter patches, norms, embeddings."""
    rng = np.random.default_rng(11)
    weights = {f"{n}.weight": w for n, w in examples.random_weights(adapter, seed=3).items()}
    weights["model.embed_tokens.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden, np.float32)
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    weights["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) / 8).astype(np.float32)
    return dict(sorted(weights.items()))


def _shard_name(i: int, shards: int) -> str:
    return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"


def write_sharded_checkpoint(directory: Path, weights: dict[str, np.ndarray], shards: int = 2) -> None:
    """A transformers-style checkpoint: ``model-0000i-of-0000n.safetensors``, the index, a config."""
    directory.mkdir(exist_ok=True)
    names = list(weights)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        shard = _shard_name(i, shards)
        part = names[i * per:(i + 1) * per]
        write_safetensors(directory / shard, {n: weights[n] for n in part}, {"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 256, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@dataclass
class DemoReport:
    out: str | None
    source: str
    source_format: str
    inspection: InspectReport
    conversions: list[dict[str, Any]]
    check: CheckReport
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (all(c["status"] in ("verified", "skipped") for c in self.conversions)
                and any(c["status"] == "verified" for c in self.conversions) and self.check.ok)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "out": self.out, "source": self.source, "source_format": self.source_format,
                "inspect": self.inspection.to_json(), "conversions": self.conversions,
                "check": self.check.to_json(), "warnings": self.warnings}

    def table(self) -> str:
        ins = self.inspection.to_json()
        lines = [f"portable-lora demo: a {ins['modules']}-module {self.source_format} adapter "
                 f"(ranks {', '.join(map(str, ins['ranks']))}) on a tiny Llama base"
                 + (f", files in {self.out}" if self.out else " (temporary files, deleted)"), ""]
        lines.append("1. inspect")
        lines.append("\n".join(("   " + line).rstrip() for line in self.inspection.table().splitlines()[1:]))
        lines.append("")
        lines.append("2. convert to every format, read back, compare ΔW with the original")
        rows = []
        for c in self.conversions:
            rows.append([c["format"], c["file"] or "-", "-" if c["bytes"] is None else f"{c['bytes']:,}",
                         c["status"], fmt_err(c["max_relative_error"]), c["note"] or ""])
        lines.append(format_table(["format", "file", "bytes", "result", "max rel err", "note"], rows,
                                  indent="   "))
        lines.append("")
        lines.append("3. the same adapter on every installed backend")
        lines.append("\n".join(("   " + line).rstrip() for line in self.check.table().splitlines()))
        lines.append("")
        verified = sum(c["status"] == "verified" for c in self.conversions)
        skipped = sum(c["status"] == "skipped" for c in self.conversions)
        lines.append(("OK" if self.ok else "FAILED") + f": {verified} formats verified, {skipped} skipped, "
                     f"backends {'agree' if self.check.ok else 'DISAGREE'}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


_BASE_SHARDS = 2
_SOURCE_DIR, _SOURCE_FILE = "adapter-source-peft", "adapter-source.safetensors"


def _occupied(path: Path, what: str, detail: str) -> LoraError:
    return LoraError(f"{detail}; the demo writes {what} there and replaces only its own outputs: "
                     "move it, or choose another --out directory", file=path)


def _check_directory(path: Path, what: str, own: set[str]) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise _occupied(path, f"{what} (a directory)", "exists and is not a directory")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in own)
        if others:
            raise _occupied(path, what, f"the directory holds other files {others[:8]}")


def check_demo_targets(root: Path) -> None:
    """Refuse, before anything is written, a name in ``root`` the demo writes that something
    else occupies (see the module docstring)."""
    own_base = {_shard_name(i, _BASE_SHARDS) for i in range(_BASE_SHARDS)} | {INDEX_NAME, "config.json"}
    _check_directory(root / "base", "its base checkpoint", own_base)
    targets = [(root / _SOURCE_DIR, "peft", "the source adapter"),
               (root / _SOURCE_FILE, "portable", "the source adapter")]
    targets += [(None, fmt, f"its {fmt} adapter") for fmt in formats.FORMATS]
    for path, fmt, what in targets:
        try:
            module = formats.get_format(fmt)
        except ModuleNotFoundError:  # reported as skipped by the run itself
            continue
        path = path or _target(root, fmt)
        if module.LAYOUT == "directory":
            _check_directory(path, what, module.REPLACEABLE)
        elif path.is_dir() or path.is_symlink():
            raise _occupied(path, f"{what} (one .safetensors file)",
                            "is a directory" if path.is_dir() else "is a symbolic link")


def _target(out: Path, fmt: str) -> Path:
    stem = f"adapter-{fmt}"
    return out / stem if formats.get_format(fmt).LAYOUT == "directory" else out / f"{stem}.safetensors"


def _convert_one(adapter: Adapter, fmt: str, out: Path, modules: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"format": fmt, "file": None, "bytes": None, "status": "skipped",
                           "max_relative_error": None, "note": None}
    try:
        formats.get_format(fmt)
    except ModuleNotFoundError:
        row["note"] = "format module not available in this installation"
        return row
    try:
        return _convert_and_verify(adapter, fmt, out, modules, row)
    except Exception as exc:  # a bug in one format must not hide the others: report it, go on
        row.update(status="FAILED", note=f"internal error: {type(exc).__name__}: {exc}")
        return row


def _convert_and_verify(adapter: Adapter, fmt: str, out: Path, modules: list[str],
                        row: dict[str, Any]) -> dict[str, Any]:
    dst = _target(out, fmt)
    prefix = None
    try:
        formats.save(adapter, dst, format=fmt)
    except LoraError as first:
        prefix = _RENAME_FOR.get(fmt)
        if prefix is None:
            row["note"] = f"cannot express it: {first.detail}"
            return row
        try:
            formats.save(adapter.rename(lambda n: prefix + n), dst, format=fmt)
        except LoraError as second:
            row["note"] = f"cannot express it: {second.detail}"
            return row
        row["note"] = f"modules named {prefix}<module>"
    row["file"] = dst.name
    row["bytes"] = path_bytes(dst)
    try:
        back = load_adapter(dst, format=fmt, modules=[prefix + m for m in modules] if prefix else modules)
        if prefix:
            back = back.rename(lambda n: n[len(prefix):] if n.startswith(prefix) else n)
        report = verify(adapter, back)
    except LoraError as exc:
        row["status"] = "FAILED"
        row["note"] = f"reading it back: {exc}"
        return row
    row["max_relative_error"] = report.max_relative_error
    row["status"] = "verified" if report.ok else "DIFFERS"
    if not report.ok:
        bad = report.differing()
        row["note"] = f"{len(bad)} modules differ, e.g. {bad[0]['module']} ({bad[0]['status']})"
    return row


def demo(out: str | os.PathLike | None = None, *, backends: Iterable[str] | None = None) -> DemoReport:
    """Run the demo; files go to ``out`` (created if needed; an existing directory is reused,
    see the module docstring) or to a deleted temporary directory.

    >>> demo().ok  # doctest: +SKIP
    True
    """
    keep = out is not None
    root = Path(out) if keep else Path(tempfile.mkdtemp(prefix="portable-lora-demo-"))
    seen: list[str] = []
    try:
        if keep:
            if root.exists() and not root.is_dir():
                raise LoraError("exists and is not a directory", file=root)
            check_demo_targets(root)
            root.mkdir(parents=True, exist_ok=True)
        with collect_warnings(seen):
            adapter = demo_adapter()
            base_path = root / "base"
            weights = demo_base(adapter)
            write_sharded_checkpoint(base_path, weights, shards=_BASE_SHARDS)
            modules = [k[: -len(".weight")] for k in weights if k.endswith(".weight")]
            try:
                source_format = "peft"
                source = root / _SOURCE_DIR
                formats.save(adapter, source, format="peft")
            except ModuleNotFoundError:  # the PEFT format module is not installed: start portable
                source_format = "portable"
                source = root / _SOURCE_FILE
                formats.save(adapter, source, format="portable")
            inspection = inspect(source, base=base_path)
            original = load_adapter(source)
            rows = [_convert_one(original, fmt, root, modules) for fmt in formats.FORMATS]
            checked = check(original, backends=backends)
        label = str(source.relative_to(root))
        inspection.path = checked.adapter = label
        if inspection.base is not None:
            inspection.base.path = str(base_path.relative_to(root))
        return DemoReport(out=str(root) if keep else None, source=label, source_format=source_format,
                          inspection=inspection, conversions=rows, check=checked, warnings=seen)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
