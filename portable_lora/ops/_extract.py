"""``extract``: a LoRA from the difference of two checkpoints (tuned − base), by truncated SVD.

Every 2-D weight (and 4-D convolution) that differs becomes a module of rank at most ``rank``
(:func:`portable_lora.core.low_rank`), stored with alpha = rank under ``alpha/rank`` (s = 1).
1-D tensors (norms, biases), unchanged tensors and tensors that exist on one side only are
skipped and reported. A 2-D weight whose module name looks like an embedding (``embed``,
``wte``, ``wpe``) becomes an embedding module, so PEFT-style formats write it as one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .. import core, formats
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ._checkpoint import Checkpoint
from ._util import (check_save_target, collect_warnings, fmt_err, fmt_pct, format_table, human_bytes,
                    parse_dtype, path_bytes, progress_bar)

__all__ = ["extract", "ExtractReport"]

_EMBEDDING_NAME = re.compile(r"(^|[._])(embed\w*|wte|wpe)$")


@dataclass
class ExtractReport:
    base: str
    tuned: str
    out: str
    format: str
    rank: int
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        return {"ok": True, "base": self.base, "tuned": self.tuned, "out": self.out, "format": self.format,
                "rank": self.rank, "extracted": len(self.rows), "modules": self.rows,
                "skipped": self.skipped, "skipped_by_reason": reasons,
                "max_relative_error": max((r["relative_error"] for r in self.rows), default=None),
                "bytes": self.bytes, "warnings": self.warnings}

    def table(self) -> str:
        j = self.to_json()
        lines = [f"extracted {len(self.rows)} modules at rank <= {self.rank} from {self.tuned} − {self.base}",
                 f"  wrote {self.out} ({self.format}, {human_bytes(self.bytes)})"]
        if self.rows:
            rows = [[r["module"], r["kind"], "×".join(map(str, r["shape"])), r["rank"],
                     fmt_pct(r["energy_kept"]), fmt_err(r["relative_error"])] for r in self.rows]
            lines.append(format_table(["module", "kind", "shape", "rank", "energy kept", "rel error"],
                                      rows, indent="  "))
        if self.skipped:
            parts = ", ".join(f"{n} {why}" for why, n in j["skipped_by_reason"].items())
            lines.append(f"  skipped {len(self.skipped)} tensors: {parts}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _module_kind(module: str, ndim: int) -> str:
    if ndim == 4:
        return "conv"
    return "embedding" if _EMBEDDING_NAME.search(module) else "linear"


def _nonfinite(array: np.ndarray) -> int:
    values = array if array.dtype.kind == "f" else array.astype(np.float32)  # bf16: via float32
    return int(array.size - np.count_nonzero(np.isfinite(values)))


def _check_delta(delta: np.ndarray, tw: np.ndarray, bw: np.ndarray, *, key: str, base: Any,
                 tuned: Any) -> None:
    """Refuse a ΔW with NaN or infinity before its SVD, naming the checkpoint that holds them."""
    if np.isfinite(delta).all():
        return
    for array, name, path in ((tw, "tuned", tuned), (bw, "base", base)):
        bad = _nonfinite(array)
        if bad:
            raise LoraError(f"non-finite values found: {bad} of {array.size} values of the {name} "
                            "weight are NaN or infinite; a low-rank factorisation (SVD) needs finite "
                            "values", file=path, key=key)
    raise LoraError(f"non-finite values found: tuned − base overflows {delta.dtype} (both weights are "
                    "finite); a low-rank factorisation (SVD) needs finite values", file=tuned, key=key)


def _nothing_extracted(base: Any, tuned: Any, names: list[str], base_names: list[str], common: int,
                       candidates: list[str], matching: int, pattern: str | None,
                       skipped: list[dict[str, str]]) -> LoraError:
    """Why no module came out: the real cause, most basic first."""
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    summary = ", ".join(f"{n} {why}" for why, n in reasons.items())
    if not names:
        return LoraError("the checkpoint holds no tensors: nothing to extract", file=tuned)
    if common == 0:
        return LoraError(f"no tensor name is in both checkpoints: {tuned} has {len(names)} tensors "
                         f"(e.g. {names[0]!r}), {base} has {len(base_names)}"
                         + (f" (e.g. {base_names[0]!r})" if base_names else "")
                         + f"; is {base} the checkpoint {tuned} was fine-tuned from?", file=tuned)
    if not candidates:
        return LoraError(f"no 2-D or 4-D floating-point '<module>.weight' tensor of the same shape is "
                         f"in both checkpoints ({common} names in common; skipped: {summary}): "
                         "nothing to extract", file=tuned)
    if pattern is not None and matching == 0:
        shown = ", ".join(candidates[:5]) + (f" and {len(candidates) - 5} more" if len(candidates) > 5 else "")
        return LoraError(f"the pattern {pattern!r} matches none of the {len(candidates)} modules that "
                         f"could be extracted ({shown}): nothing to extract", key="modules")
    excluded = reasons.get("excluded by the module pattern", 0)
    also = f", {excluded} more excluded by the module pattern" if excluded else ""
    return LoraError(f"no 2-D or 4-D weight differs between the base and {tuned}: all {matching} "
                     f"compared weights are equal{also}; nothing to extract", file=tuned)


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *, rank: int,
            to: str = "portable", modules: str | None = None, dtype: str = "float32",
            force: bool = False, progress: bool = False,
            save_options: Mapping[str, Any] | None = None) -> ExtractReport:
    """Extract a rank-``rank`` LoRA of ``tuned − base`` and save it as format ``to``.

    ``modules`` is a regular expression (``re.search``) a module name must match.
    ``dtype`` is the factors' dtype (float32 by default). The output (format, path, layout and
    ``save_options`` names) is checked before the first SVD. A weight with NaN or infinity is
    an error naming it.

    >>> extract("base.safetensors", "tuned.safetensors", "lora.safetensors", rank=16)  # doctest: +SKIP
    """
    core.check_rank(rank, module=None)
    out_path = check_save_target(out, to, force=force, options=save_options)
    factor_dtype = parse_dtype(dtype)
    pattern = None
    if modules is not None:
        try:
            pattern = re.compile(modules)
        except re.error as exc:
            raise LoraError(f"not a valid regular expression: {exc}", key="modules") from None
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seen: list[str] = []
    candidates: list[str] = []  # modules that could be extracted, before the pattern
    matching = common = 0
    adapter = Adapter(base_model=str(base), provenance={
        "source_format": "extracted", "created_by": "portable-lora extract",
        "extracted_from": {"base": str(base), "tuned": str(tuned), "rank": rank}})
    with collect_warnings(seen), Checkpoint(base) as b, Checkpoint(tuned) as t:
        names = t.keys()
        bar = progress_bar(len(names), "extracting", progress, unit="tensor")
        try:
            for key in names:
                bar.update(1)
                info = t.info(key)
                if key not in b:
                    skipped.append({"key": key, "reason": "not in base"})
                    continue
                common += 1
                binfo = b.info(key)
                if tuple(binfo.shape) != tuple(info.shape):
                    skipped.append({"key": key, "reason": "shape differs from base"})
                    continue
                floating = all(d.kind == "f" or d.name == "bfloat16" for d in (info.dtype, binfo.dtype))
                if not floating:
                    skipped.append({"key": key, "reason": "not floating point"})
                    continue
                if len(info.shape) not in (2, 4):
                    skipped.append({"key": key, "reason": f"{len(info.shape)}-D (norm, bias or other)"})
                    continue
                if not key.endswith(".weight"):
                    skipped.append({"key": key, "reason": "not a <module>.weight tensor"})
                    continue
                module = key[: -len(".weight")]
                candidates.append(module)
                if pattern is not None and not pattern.search(module):
                    skipped.append({"key": key, "reason": "excluded by the module pattern"})
                    continue
                matching += 1
                tw, bw = t.get(key, copy=False), b.get(key, copy=False)
                if np.array_equal(tw, bw):
                    skipped.append({"key": key, "reason": "unchanged"})
                    continue
                acc = np.float64 if np.float64 in (info.dtype, binfo.dtype) else np.float32
                with np.errstate(over="ignore", invalid="ignore"):  # reported by _check_delta
                    delta = tw.astype(acc) - bw.astype(acc)
                _check_delta(delta, tw, bw, key=key, base=base, tuned=tuned)
                t.release(key)
                b.release(key)
                kind = _module_kind(module, delta.ndim)
                if kind == "embedding":
                    # the table's ΔW is (B @ A)ᵀ, A (r, num), B (dim, r): factor ΔWᵀ to get them
                    delta = delta.T
                r = min(rank, delta.shape[0], int(np.prod(delta.shape[1:])))
                lr = core.low_rank(delta, r, name=key)
                A, B = np.asarray(lr.A), np.asarray(lr.B)
                lora = LoraModule(A.astype(factor_dtype), B.astype(factor_dtype), alpha=float(r),
                                  rule=core.ALPHA_OVER_RANK, kind=kind)
                target = delta.T if kind == "embedding" else delta
                got = np.asarray(lora.delta_weight(np.float64))
                norm = float(np.linalg.norm(target))
                err = float(np.linalg.norm(got - target)) / norm if norm > 0 else 0.0
                adapter[module] = lora
                rows.append({"module": module, "key": key, "kind": kind, "shape": list(info.shape),
                             "rank": r, "energy_kept": lr.energy_kept, "relative_error": err,
                             "svd_relative_error": lr.relative_error})
        finally:
            bar.close()
        if not len(adapter):
            raise _nothing_extracted(base, tuned, names, b.keys(), common, candidates, matching,
                                     modules, skipped)
        formats.save(adapter, out_path, format=to, overwrite=force, **dict(save_options or {}))
    return ExtractReport(base=str(base), tuned=str(tuned), out=str(out_path), format=to, rank=rank,
                         rows=rows, skipped=skipped, bytes=path_bytes(out_path), warnings=seen)
