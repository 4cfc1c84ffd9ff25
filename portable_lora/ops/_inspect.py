"""``inspect``: what an adapter file holds, and (with a base) how strong it is under each rule.

The strength of a module is ‖ΔW‖_F / ‖W‖_F. Under another scaling rule only the effective
scale changes, so the ratio under rule R is |s_R| · ‖B @ A‖_F / ‖W‖_F: reading the same file
under each rule side by side shows which reading is sane. A trained adapter typically moves W
by a fraction of a percent to a few percent; :data:`WEAK` and :data:`STRONG` bound the
plausible range.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter
from ..errors import LoraError
from ._checkpoint import Checkpoint, match_modules
from ._merge import base_layouts, base_shape
from ._util import (collect_warnings, fmt_num, fmt_pct, format_table, load_adapter, source_name)

__all__ = ["inspect", "InspectReport", "BaseComparison", "WEAK", "STRONG"]

#: below this ‖ΔW‖/‖W‖ an adapter barely changes the model: likely read with too small a scale
WEAK = 1e-3
#: above this ‖ΔW‖/‖W‖ an adapter rivals the weight itself: likely read with too large a scale
STRONG = 0.5

_ROW_BLOCK_BYTES = 32 << 20


def _verdict(ratio: float | None) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "unknown"
    if ratio < WEAK:
        return "weak"
    if ratio > STRONG:
        return "strong"
    return "plausible"


@dataclass
class BaseComparison:
    """‖ΔW‖/‖W‖ per module against a base checkpoint, under the file's rule and every other."""

    path: str
    modules: list[dict[str, Any]] = field(default_factory=list)
    unmatched: list[dict[str, str]] = field(default_factory=list)

    @property
    def file_rules(self) -> list[str]:
        return sorted({m["rule"] for m in self.modules})

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rule in core.RULES:
            values = [m["ratios"][rule] for m in self.modules if m["ratios"][rule] is not None]
            if not values:
                out[rule] = {"median": None, "min": None, "max": None, "verdict": "unknown",
                             "file_rule": rule in self.file_rules}
                continue
            median = statistics.median(values)
            out[rule] = {"median": median, "min": min(values), "max": max(values),
                         "verdict": _verdict(median), "file_rule": rule in self.file_rules}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "thresholds": {"weak": WEAK, "strong": STRONG},
                "file_rules": self.file_rules, "rules": self.summary(), "modules": self.modules,
                "unmatched": self.unmatched}


@dataclass
class InspectReport:
    """What :func:`inspect` found; ``to_json()`` gives the stable fields, ``table()`` the text."""

    path: str
    format: str | None
    detected_because: str | None
    description: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    base: BaseComparison | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.description
        groups = d["groups"]
        ranks = sorted({g["rank"] for g in groups})
        kinds: dict[str, int] = {}
        for g in groups:
            kinds[g["kind"]] = kinds.get(g["kind"], 0) + g["count"]
        prov = d["provenance"]
        return {
            "path": self.path,
            "format": self.format,
            "detected_because": self.detected_because,
            "modules": d["modules"],
            "parameters": d["parameters"],
            "base_model": d["base_model"],
            "ranks": ranks,
            "dtypes": sorted({g["dtype"] for g in groups}),
            "kinds": kinds,
            "dora_modules": sum(g["count"] for g in groups if g["dora"]),
            "convention": prov.get("convention"),
            "convention_reason": prov.get("convention_reason"),
            "groups": groups,
            "provenance": prov,
            "warnings": list(self.warnings),
            "base": None if self.base is None else self.base.to_json(),
        }

    def table(self, *, verbose: bool = False) -> str:
        j = self.to_json()
        lines = [f"{self.path}"]
        fmt = j["format"] or "?"
        lines.append(f"  format:      {fmt}" + (f" ({j['detected_because']})" if j["detected_because"] else ""))
        lines.append(f"  modules:     {j['modules']} ({j['parameters']:,} parameters)"
                     + (f", base model {j['base_model']}" if j["base_model"] else ""))
        kinds = ", ".join(f"{n} {k}" for k, n in j["kinds"].items())
        lines.append(f"  kinds:       {kinds}; DoRA: {j['dora_modules'] or 'none'}; dtype: {', '.join(j['dtypes'])}")
        if j["convention"]:
            lines.append(f"  convention:  {j['convention']}"
                         + (f" ({j['convention_reason']})" if j["convention_reason"] else ""))
        origin = j["provenance"].get("origin_format")
        if origin and origin != "memory":
            lines.append(f"  origin:      {origin}")
        lines.append("")
        rows = []
        for g in j["groups"]:
            first = g["modules"][0] + (f" (+{g['count'] - 1})" if g["count"] > 1 else "")
            extra = g["kind"] + (", DoRA" if g["dora"] else "")
            rows.append([g["count"], g["rank"], fmt_num(g["alpha"]), g["rule"], f"{g['scale']:.6g}",
                         extra, g["dtype"], first])
        lines.append(format_table(["count", "rank", "alpha", "rule", "scale", "kind", "dtype", "modules"],
                                  rows, indent="  "))
        if self.base is not None:
            lines.append("")
            b = self.base
            n = len(b.modules)
            lines.append(f"  against base {b.path}: ‖ΔW‖/‖W‖ over {n} matched modules "
                         f"(plausible between {fmt_pct(WEAK)} and {fmt_pct(STRONG)})")
            rows = []
            for rule, s in b.summary().items():
                mark = "*" if s["file_rule"] else " "
                rows.append([f"{mark} {rule}", fmt_pct(s["median"]), fmt_pct(s["min"]), fmt_pct(s["max"]),
                             s["verdict"]])
            lines.append(format_table(["  rule", "median", "min", "max", "verdict"], rows, indent="  "))
            lines.append("  (* the rule the file states or the loader chose)")
            flagged = [m for m in b.modules if m["flag"]]
            shown = b.modules if verbose else flagged
            if shown:
                lines.append("")
                lines.append("  per module:" if verbose else f"  {len(flagged)} module(s) outside the plausible range:")
                rows = [[m["module"], m["rule"], fmt_pct(m["ratio"])]
                        + [fmt_pct(m["ratios"][r]) for r in core.RULES] + [m["flag"] or ""]
                        for m in shown[: None if verbose else 20]]
                lines.append(format_table(["module", "rule", "ratio", *core.RULES, "flag"], rows, indent="    "))
                if not verbose and len(flagged) > 20:
                    lines.append(f"    ... and {len(flagged) - 20} more (--json or --verbose lists all)")
            if b.unmatched:
                lines.append(f"  {len(b.unmatched)} module(s) not matched in the base:")
                for u in b.unmatched[:10]:
                    lines.append(f"    {u['module']}: {u['reason']}")
                if len(b.unmatched) > 10:
                    lines.append(f"    ... and {len(b.unmatched) - 10} more")
        if self.warnings:
            lines.append("")
            lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _weight_norm(ckpt: Checkpoint, key: str) -> float:
    """‖W‖_F accumulated in float64 over row blocks of the memory-mapped tensor."""
    w = ckpt.get(key, copy=False)
    if w.size == 0:
        return 0.0
    row_bytes = max(1, w[0].size * 8)
    step = max(1, _ROW_BLOCK_BYTES // row_bytes)
    total = 0.0
    for start in range(0, w.shape[0], step):
        block = w[start:start + step].astype(np.float64)
        total += float(np.sum(block * block))
    ckpt.release(key)
    return math.sqrt(total)


def compare_with_base(adapter: Adapter, base: str | os.PathLike) -> BaseComparison:
    """‖ΔW‖_F/‖W‖_F of every module under its own rule and under each rule in ``core.RULES``."""
    result = BaseComparison(str(base))
    with Checkpoint(base) as ckpt:
        matched, unmatched = match_modules(adapter, ckpt.keys())
        for module, reason in unmatched.items():
            result.unmatched.append({"module": module, "reason": reason})
        layouts = base_layouts(adapter, ckpt, matched)
        for module, key in matched.items():
            m = adapter[module]
            info = ckpt.info(key)
            expected = base_shape(m, layouts[module])
            if tuple(info.shape) != expected:
                result.unmatched.append({"module": module, "reason": f"{key!r} has shape "
                                         f"{list(info.shape)}, the adapter needs {list(expected)}"})
                continue
            if info.dtype.kind != "f" and info.dtype.name != "bfloat16":
                result.unmatched.append({"module": module, "reason": f"{key!r} is {info.dtype}, not floating point"})
                continue
            w_norm = _weight_norm(ckpt, key)
            # ‖B @ A‖ at scale 1; each rule's ratio is then |its scale| times this
            unit = float(np.linalg.norm(np.asarray(core.delta_weight(m.A, m.B, 1.0, m.kind), dtype=np.float64)))
            ratios = {}
            for rule in core.RULES:
                s = abs(core.effective_scale(m.alpha, m.rank, rule))
                ratios[rule] = (s * unit / w_norm) if w_norm > 0 else None
            ratio = ratios[m.rule]
            flag = None if ratio is None else {"weak": "weak", "strong": "strong"}.get(_verdict(ratio))
            result.modules.append({"module": module, "weight": key, "rule": m.rule, "alpha": m.alpha,
                                   "rank": m.rank, "scale": m.scale, "weight_norm": w_norm,
                                   "ratio": ratio, "ratios": ratios, "flag": flag})
    return result


def inspect(path: Any, *, format: str | None = None, convention: str | None = None,
            base: str | os.PathLike | None = None, options: Mapping[str, Any] | None = None) -> InspectReport:
    """Describe an adapter (any format); with ``base``, measure ‖ΔW‖/‖W‖ under every rule.

    >>> report = inspect("adapter_dir", base="model.safetensors")  # doctest: +SKIP
    >>> report.to_json()["base"]["rules"]["raw"]["median"]          # doctest: +SKIP
    """
    warnings_seen: list[str] = []
    with collect_warnings(warnings_seen):
        modules_hint = None
        if base is not None:
            with Checkpoint(base) as ckpt:
                modules_hint = ckpt.module_names()
        adapter = load_adapter(path, format=format, convention=convention, options=options,
                               modules=modules_hint)
        if not len(adapter):
            raise LoraError("the adapter has no modules", file=source_name(path))
        comparison = compare_with_base(adapter, base) if base is not None else None
    return InspectReport(path=source_name(path), format=adapter.provenance.get("source_format"),
                         detected_because=adapter.provenance.get("detected_because"),
                         description=adapter.describe(), warnings=warnings_seen, base=comparison)
