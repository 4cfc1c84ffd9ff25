"""``resize``: lower the rank of every module above ``rank`` by the best approximation of its ΔW.

:func:`portable_lora.core.resize_rank` truncates the SVD of s · B @ A without forming it. A
resized module carries its scale in the factors: alpha = rank, rule ``alpha/rank`` (s = 1).
Modules already at or below ``rank`` are kept as they are. DoRA magnitudes are kept; the
reported error is that of ΔW (the direction update), measured after rounding to the factors'
dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .. import core, formats
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ._util import (check_output, check_save_target, collect_warnings, fmt_err, fmt_pct, format_table, human_bytes,
                    load_adapter, path_bytes, source_name)

__all__ = ["resize", "resize_adapter", "ResizeReport"]


@dataclass
class ResizeReport:
    src: str
    out: str | None
    format: str | None
    rank: int
    rows: list[dict[str, Any]]
    bytes: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        resized = [r for r in self.rows if r["status"] == "resized"]
        return {"ok": True, "src": self.src, "out": self.out, "format": self.format, "rank": self.rank,
                "resized": len(resized), "kept": len(self.rows) - len(resized),
                "max_relative_error": max((r["relative_error"] for r in self.rows), default=None),
                "modules": self.rows, "bytes": self.bytes, "warnings": self.warnings}

    def table(self) -> str:
        j = self.to_json()
        lines = [f"{self.src}: {j['resized']} modules resized to rank {self.rank}, {j['kept']} kept"]
        if self.out:
            lines.append(f"  wrote {self.out} ({self.format}, {human_bytes(self.bytes)})")
        rows = [[r["module"], r["old_rank"], r["new_rank"], fmt_pct(r["energy_kept"]),
                 fmt_err(r["relative_error"]), r["status"]] for r in self.rows]
        lines.append(format_table(["module", "rank", "new", "energy kept", "rel error", "status"], rows,
                                  indent="  "))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def resize_adapter(adapter: Adapter, rank: int) -> tuple[Adapter, list[dict[str, Any]]]:
    """A copy of ``adapter`` with every module above ``rank`` reduced to it, and one report row each."""
    rank = core.check_rank(rank)
    result = Adapter(base_model=adapter.base_model, provenance=dict(adapter.provenance))
    result.provenance["resized_to_rank"] = rank
    rows = []
    for name, m in adapter.items():
        if m.rank <= rank:
            result[name] = m.copy()
            rows.append({"module": name, "old_rank": m.rank, "new_rank": m.rank, "energy_kept": 1.0,
                         "relative_error": 0.0, "status": "kept"})
            continue
        acc = np.float64 if m.A.dtype == np.float64 else np.float32
        # the effective scale goes into B before the SVD, so the new factors carry it (s = 1);
        # NaN/inf in a factor is refused there, naming <module>.lora_A or .lora_B
        lr = core.resize_rank(m.A.astype(acc), m.B.astype(acc) * acc(m.scale), rank, name=name)
        new = LoraModule(np.asarray(lr.A).astype(m.A.dtype), np.asarray(lr.B).astype(m.B.dtype),
                         alpha=float(rank), rule=core.ALPHA_OVER_RANK, kind=m.kind,
                         magnitude=None if m.magnitude is None else m.magnitude.copy())
        before = np.asarray(m.delta_weight(np.float64))
        after = np.asarray(new.delta_weight(np.float64))
        norm = float(np.linalg.norm(before))
        err = float(np.linalg.norm(after - before)) / norm if norm > 0 else 0.0
        result[name] = new
        rows.append({"module": name, "old_rank": m.rank, "new_rank": rank, "energy_kept": lr.energy_kept,
                     "relative_error": err, "svd_relative_error": lr.relative_error, "status": "resized"})
    return result, rows


def resize(adapter: Any, out: str | os.PathLike, *, rank: int, to: str | None = None,
           format: str | None = None, convention: str | None = None, force: bool = False,
           options: Mapping[str, Any] | None = None,
           save_options: Mapping[str, Any] | None = None) -> ResizeReport:
    """Resize ``adapter`` (a path in any format, or an Adapter) to ``rank`` and save it.

    ``to`` defaults to the source's format (``portable`` for an in-memory adapter). The output
    (path, layout, ``save_options`` names) is checked before any SVD; a factor with NaN or
    infinity is an error naming it (``<module>.lora_A``).

    >>> resize("adapter_peft", "small_peft", rank=4).to_json()["max_relative_error"]  # doctest: +SKIP
    """
    core.check_rank(rank)
    if to is not None:  # a given format is checked before the adapter is even read
        check_save_target(out, to, force=force, options=save_options)
    out_path = check_output(out, force)
    src = source_name(adapter)
    seen: list[str] = []
    with collect_warnings(seen):
        lora = load_adapter(adapter, format=format, convention=convention, options=options)
        if not len(lora):
            raise LoraError("the adapter has no modules", file=src)
        target = to or lora.provenance.get("source_format")
        if target not in formats.FORMATS:
            target = "portable"
        out_path = check_save_target(out, target, force=force, options=save_options)
        try:
            resized, rows = resize_adapter(lora, rank)
        except LoraError as exc:  # the core names the tensor; the file is known here
            if exc.file is not None:
                raise
            raise exc.with_file(src) from exc
        formats.save(resized, out_path, format=target, overwrite=force, **dict(save_options or {}))
    return ResizeReport(src=source_name(adapter), out=str(out_path), format=target, rank=rank, rows=rows,
                        bytes=path_bytes(out_path), warnings=seen)
