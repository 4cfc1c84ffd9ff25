"""``merge``: fold an adapter into base weights, streaming tensor by tensor.

The base (a .safetensors file or a sharded directory) is memory-mapped; every output tensor
is produced only when it is written (:class:`~portable_lora.io.safetensors_io.LazyTensor`),
merged in row blocks, and its input pages are released after it is written. Peak memory is
about one output tensor plus the adapter, whatever the checkpoint's size.

Everything is checked before the first byte is written: every module must match a base
tensor ``<module>.weight`` of the right shape, the factors must be finite, and DoRA cannot be
unmerged (its pre-merge weight norm is not stored). A merged tensor that overflows (an
infinity in float16) aborts the write. The output is written atomically: a file, or a
directory with the same shards, the same ``weight_map`` and an index whose
``metadata.total_size`` is recomputed; the base directory's other files (config, tokenizer)
are copied along.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..formats._common import PICKLE_SUFFIXES
from ..io.atomic import atomic_directory
from ..io.safetensors_io import LazyTensor, write_safetensors
from ..validation import check_finite
from ._checkpoint import MODULE_PREFIXES, Checkpoint, match_modules
from ._util import (check_output, collect_warnings, human_bytes, load_adapter, parse_dtype,
                    progress_bar, same_path, source_name)

__all__ = ["merge", "MergeReport", "merge_tensor", "MERGE_METADATA_KEY", "fan_in_fan_out", "base_shape"]

#: safetensors metadata entry recording what was merged into each output shard
MERGE_METADATA_KEY = "portable_lora.merge"
_BLOCK_BYTES = 1 << 20  # float32 working set per row block (three temporaries)


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _finite(array: np.ndarray) -> np.ndarray:
    return np.isfinite(array.astype(np.float32) if array.dtype.name == "bfloat16" else array)


def merge_tensor(W: np.ndarray, module: LoraModule, scale: float, *, out_dtype: Any = None,
                 unmerge: bool = False, allow_nonfinite: bool = False, name: str = "",
                 transposed: bool = False, block_bytes: int = _BLOCK_BYTES) -> np.ndarray:
    """``W`` with ``module`` merged (or unmerged) at ``scale``, computed in row blocks.

    Each block of output rows needs only its rows of B (of A's columns for an embedding,
    whose table rows are A's columns, and for a ``transposed`` weight stored (in, out)), so no
    full-size float32 temporary is made. The core's :func:`~portable_lora.core.merge_into`
    does the math on each block and rounds once. DoRA on a transposed weight normalises over
    W's rows, so it is merged whole.
    """
    target = np.dtype(out_dtype) if out_dtype is not None else W.dtype
    # a dtype change widens W first (exact), so the result is rounded once, to ``target``
    work = None if target == W.dtype else (np.float64 if W.dtype == np.float64 else np.float32)
    out = np.empty(W.shape, dtype=target)
    if W.size == 0:
        return out
    row_elems = max(1, W[0].size)
    whole = transposed and module.magnitude is not None
    step = W.shape[0] if whole else max(1, block_bytes // (row_elems * 4 * 3))
    for start in range(0, W.shape[0], step):
        rows = slice(start, min(start + step, W.shape[0]))
        w = W[rows] if work is None else W[rows].astype(work)
        if whole:
            A, B, mag = module.A, module.B, module.magnitude
        elif module.kind == "embedding" or transposed:
            A, B, mag = module.A[:, rows], module.B, None
        else:
            A, B = module.A, module.B[rows]
            mag = None if module.magnitude is None else module.magnitude[rows]
        if unmerge:
            block = core.unmerge_from(w, A, B, scale, module.kind, transposed=transposed)
        else:
            block = core.merge_into(w, A, B, scale, module.kind, magnitude=mag, transposed=transposed)
        block = np.asarray(block)
        if block.dtype != target:
            block = block.astype(target)
        if not allow_nonfinite and not _finite(block).all():
            bad = int(np.size(block) - np.count_nonzero(_finite(block)))
            raise LoraError(f"merging produced {bad} non-finite values in rows {rows.start}-{rows.stop - 1} "
                            f"({target}); overflow? (--allow-nonfinite writes them anyway)", key=name)
        out[rows] = block
    return out


@dataclass
class MergeReport:
    base: str
    adapter: str
    out: str
    strength: float
    unmerge: bool
    dtype: str | None
    modules: dict[str, str]
    tensors: int
    bytes: int
    shards: list[str]
    sharded: bool
    copied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "base": self.base, "adapter": self.adapter, "out": self.out,
                "strength": self.strength, "unmerge": self.unmerge, "dtype": self.dtype,
                "merged_modules": len(self.modules), "modules": self.modules, "tensors": self.tensors,
                "bytes": self.bytes, "shards": self.shards, "sharded": self.sharded,
                "copied_files": self.copied, "warnings": self.warnings}

    def table(self) -> str:
        verb = "unmerged from" if self.unmerge else "merged into"
        lines = [f"{self.adapter} {verb} {self.base} at strength {self.strength:g}",
                 f"  wrote {self.out}: {self.tensors} tensors ({len(self.modules)} changed), "
                 f"{human_bytes(self.bytes)}, {len(self.shards)} shard(s)"
                 + (f", dtype {self.dtype}" if self.dtype else "")]
        if self.copied:
            lines.append(f"  copied from the base directory: {', '.join(self.copied)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _check_plan(adapter: Adapter, ckpt: Checkpoint, *, source: str, unmerge: bool,
                allow_nonfinite: bool) -> dict[str, str]:
    matched, unmatched = match_modules(adapter, ckpt.keys())
    if unmatched:
        names = list(unmatched)
        listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        ambiguous = [m for m in names if unmatched[m].startswith("ambiguous")]
        why = f"; {unmatched[ambiguous[0]]}" if ambiguous else ""
        raise LoraError(f"{len(names)} of {len(adapter)} adapter modules match no tensor of the base "
                        f"{ckpt.path} ('<module>.weight', also tried with a prefix from "
                        f"{', '.join(MODULE_PREFIXES)} added or stripped): {listing}{why}",
                        file=source, key=names[0])
    transposed = fan_in_fan_out(adapter)
    for module, key in matched.items():
        m = adapter[module]
        info = ckpt.info(key)
        expected = base_shape(m, transposed)
        if tuple(info.shape) != expected:
            layout = " (fan_in_fan_out: stored (in, out))" if transposed and m.kind == "linear" else ""
            raise LoraError(f"the base tensor {key!r} has shape {list(info.shape)}; the adapter's "
                            f"{m.kind} module needs {list(expected)}{layout}", file=source, key=module)
        if not _is_float(info.dtype):
            raise LoraError(f"the base tensor {key!r} is {info.dtype}; only floating-point weights can "
                            "be merged into (dequantize first)", file=source, key=module)
        if unmerge and m.is_dora:
            raise LoraError("unmerging DoRA needs the weight norm from before the merge, which no "
                            "adapter file stores", file=source, key=module)
    check_finite({m: adapter[m] for m in matched}, file=source, allow_nonfinite=allow_nonfinite)
    return matched


def fan_in_fan_out(adapter: Adapter) -> bool:
    """Whether the adapter's base weights are stored (in, out) (PEFT ``fan_in_fan_out``, GPT-2)."""
    return bool(adapter.provenance.get("fan_in_fan_out", False))


def base_shape(module: LoraModule, transposed: bool) -> tuple[int, ...]:
    """The shape of the base tensor ``module`` patches; (in, out) for a transposed linear."""
    shape = tuple(module.weight_shape)
    return shape[::-1] if transposed and module.kind == "linear" else shape


def _shard_metadata(base_meta: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, str]:
    meta = dict(base_meta)
    meta[MERGE_METADATA_KEY] = json.dumps(record, sort_keys=True)
    return meta


def merge(base: str | os.PathLike, adapter: Any, out: str | os.PathLike, *, strength: float = 1.0,
          dtype: str | None = None, unmerge: bool = False, format: str | None = None,
          convention: str | None = None, allow_nonfinite: bool = False, force: bool = False,
          progress: bool = False, options: Mapping[str, Any] | None = None) -> MergeReport:
    """Merge ``adapter`` (a path in any format, or an Adapter) into ``base``, writing ``out``.

    ``strength`` multiplies every module's effective scale. ``dtype`` (float32, float16,
    bfloat16) casts every floating-point output tensor; by default each keeps its dtype.
    ``unmerge`` subtracts instead (not for DoRA). ``allow_nonfinite`` lets NaN/Inf factors and
    overflowing results through. Nothing is written when a check fails.

    >>> merge("model.safetensors", "adapter_peft", "merged.safetensors")  # doctest: +SKIP
    """
    strength = float(strength)
    if not math.isfinite(strength):
        raise LoraError(f"strength must be finite, found {strength}", key="strength")
    out_dtype = parse_dtype(dtype)
    out_path = check_output(out, force)
    if same_path(out_path, base):
        raise LoraError("the output would replace the base being read; choose another path", file=out_path)
    seen: list[str] = []
    with collect_warnings(seen), Checkpoint(base) as ckpt:
        src = source_name(adapter)
        lora = load_adapter(adapter, format=format, convention=convention, options=options,
                            modules=ckpt.module_names())
        if not len(lora):
            raise LoraError("the adapter has no modules", file=src)
        plan = _check_plan(lora, ckpt, source=src, unmerge=unmerge, allow_nonfinite=allow_nonfinite)
        owner = {key: module for module, key in plan.items()}
        transposed = fan_in_fan_out(lora)
        record = {"adapter": src, "strength": strength, "unmerge": unmerge,
                  "modules": len(plan), "tool": "portable-lora merge"}

        def out_dtype_of(name: str) -> np.dtype:
            info = ckpt.info(name)
            return out_dtype if (out_dtype is not None and _is_float(info.dtype)) else info.dtype

        def producer(name: str) -> Callable[[], np.ndarray]:
            def produce() -> np.ndarray:
                view = ckpt.get(name, copy=False)
                module = owner.get(name)
                if module is None:
                    target = out_dtype_of(name)
                    return view if view.dtype == target else view.astype(target)
                m = lora[module]
                try:
                    return merge_tensor(view, m, m.scale * strength, out_dtype=out_dtype_of(name),
                                        unmerge=unmerge, allow_nonfinite=allow_nonfinite, name=name,
                                        transposed=transposed and m.kind == "linear")
                except LoraError as exc:
                    raise exc.with_file(ckpt.shard_path(ckpt.shard_of(name))) from None
            return produce

        def lazy(names: list[str]) -> dict[str, LazyTensor]:
            return {n: LazyTensor(out_dtype_of(n), tuple(ckpt.info(n).shape), producer(n)) for n in names}

        sizes = {n: math.prod(ckpt.info(n).shape) * out_dtype_of(n).itemsize for n in ckpt.keys()}
        total = sum(sizes.values())
        bar = progress_bar(total, "merging", progress)

        def written(name: str, nbytes: int) -> None:
            ckpt.release(name)
            bar.update(nbytes)

        copied: list[str] = []
        try:
            if ckpt.path.is_file():
                shard = ckpt.shards[0]
                write_safetensors(out_path, lazy(ckpt.keys_in(shard)),
                                  _shard_metadata(ckpt.metadata(shard), record), on_tensor=written)
            else:
                with atomic_directory(out_path) as tmp:
                    for shard in ckpt.shards:
                        write_safetensors(tmp / shard, lazy(ckpt.keys_in(shard)),
                                          _shard_metadata(ckpt.metadata(shard), record), on_tensor=written)
                        ckpt.close_shard(shard)
                    if ckpt.index is not None:
                        index = dict(ckpt.index)
                        meta = dict(index.get("metadata") or {})
                        meta["total_size"] = total
                        index["metadata"] = meta
                        (tmp / ckpt.index_path.name).write_text(json.dumps(index, indent=2) + "\n",
                                                                encoding="utf-8")
                    copied = _copy_side_files(ckpt, tmp)
        finally:
            bar.close()
    return MergeReport(base=str(base), adapter=src, out=str(out_path), strength=strength, unmerge=unmerge,
                       dtype=None if out_dtype is None else str(out_dtype), modules=plan,
                       tensors=len(sizes), bytes=total, shards=list(ckpt.shards), sharded=ckpt.is_sharded,
                       copied=copied, warnings=seen)


def _copy_side_files(ckpt: Checkpoint, into: Path) -> list[str]:
    """Copy the base directory's other files (config, tokenizer), never pickles or hidden files."""
    copied = []
    skip = set(ckpt.shards) | ({ckpt.index_path.name} if ckpt.index_path else set())
    for entry in sorted(ckpt.directory.iterdir()):
        if (entry.name in skip or entry.name.startswith(".") or not entry.is_file()
                or entry.suffix == ".safetensors" or entry.suffix.lower() in PICKLE_SUFFIXES):
            continue
        shutil.copy2(entry, into / entry.name)
        copied.append(entry.name)
    return copied
