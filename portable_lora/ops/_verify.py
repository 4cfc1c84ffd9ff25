"""``verify``: do two adapters (any formats) change the model in the same way?

ΔW is compared module by module in float64. A module matches when

    max|ΔW_a − ΔW_b| <= atol + rtol · max(max|ΔW_a|, max|ΔW_b|)

so the tolerance is relative to the module's largest change, not elementwise. With no
``rtol`` given it is picked from the lower-precision factor dtype of the two modules
(:data:`AUTO_RTOL`): a conversion that folds a scale into a factor rounds each entry once, an
error of at most half an ulp of the factor dtype per entry. ``atol`` defaults to 0. DoRA
magnitudes are compared the same way. ``atol`` and ``rtol`` must be finite and >= 0. A ΔW
(or magnitude) holding NaN or infinity never matches: its row has the status ``not finite``
and a NaN relative error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ._util import collect_warnings, fmt_err, format_table, load_adapter, source_name

__all__ = ["verify", "VerifyReport", "AUTO_RTOL", "compare_modules"]

#: rtol by the lower-precision dtype of the compared factors (a few units of rounding each)
AUTO_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
_FALLBACK_RTOL = 1e-1  # float8 and anything coarser


def _auto_rtol(*modules: LoraModule) -> tuple[float, str]:
    worst, worst_name = 0.0, "float64"
    for m in modules:
        for arr in (m.A, m.B) + ((m.magnitude,) if m.magnitude is not None else ()):
            name = np.dtype(arr.dtype).name
            rtol = AUTO_RTOL.get(name, _FALLBACK_RTOL)
            if rtol > worst:
                worst, worst_name = rtol, name
    return worst, worst_name


def check_tolerance(value: Any, name: str) -> float | None:
    """``value`` as a float that is finite and >= 0 (None passes: the default applies)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{name} must be a number, found {value!r}", key=name) from None
    if not math.isfinite(number) or number < 0:
        raise LoraError(f"{name} must be a finite number >= 0, found {value!r}", key=name)
    return number


def _nonfinite_sides(x: np.ndarray, y: np.ndarray) -> list[str]:
    return [side for side, v in (("A", x), ("B", y)) if v.size and not np.isfinite(v).all()]


def _compare(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(max abs difference, reference magnitude) in float64; NaN for both when either side
    holds NaN or infinity (no tolerance can judge those)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return 0.0, 0.0
    if _nonfinite_sides(x, y):
        return math.nan, math.nan
    err = float(np.max(np.abs(x - y)))
    ref = max(float(np.max(np.abs(x))), float(np.max(np.abs(y))))
    return err, ref


def _relative(err: float, ref: float) -> float:
    if math.isnan(err) or math.isnan(ref):
        return math.nan
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)


def compare_modules(name: str, a: LoraModule | None, b: LoraModule | None, *,
                    atol: float | None = None, rtol: float | None = None) -> dict[str, Any]:
    """One row of a :class:`VerifyReport` (see the module docstring for the criterion)."""
    row: dict[str, Any] = {"module": name, "status": "match", "max_abs_error": None, "max_abs": None,
                           "relative_error": None, "rtol": None, "atol": None, "dtype": None,
                           "magnitude_error": None}
    if a is None or b is None:
        row["status"] = "only in A" if b is None else "only in B"
        return row
    rtol, atol = check_tolerance(rtol, "rtol"), check_tolerance(atol, "atol")
    auto, dtype = _auto_rtol(a, b)
    rt = auto if rtol is None else rtol
    at = 0.0 if atol is None else atol
    row.update(rtol=rt, atol=at, dtype=dtype)
    if tuple(a.weight_shape) != tuple(b.weight_shape):
        row["status"] = f"shape {list(a.weight_shape)} vs {list(b.weight_shape)}"
        return row
    with np.errstate(all="ignore"):  # NaN/inf are reported in the row, not warned about
        da = np.asarray(a.delta_weight(np.float64))
        db = np.asarray(b.delta_weight(np.float64))
    bad = _nonfinite_sides(da, db)
    err, ref = _compare(da, db)
    row.update(max_abs_error=err, max_abs=ref, relative_error=_relative(err, ref))
    ok = not bad and err <= at + rt * ref
    if a.is_dora != b.is_dora:
        row["status"] = "DoRA on one side only"
        return row
    if a.is_dora:
        ma = np.asarray(a.magnitude, dtype=np.float64)
        mb = np.asarray(b.magnitude, dtype=np.float64)
        bad += [side for side in _nonfinite_sides(ma, mb) if side not in bad]
        merr, mref = _compare(ma, mb)
        row["magnitude_error"] = merr / mref if mref > 0 else merr  # NaN stays NaN
        ok = ok and not bad and merr <= at + rt * mref
    if bad:
        row["status"] = f"not finite (NaN/inf in {' and '.join(sorted(bad))})"
    elif not ok:
        row["status"] = "differs"
    return row


@dataclass
class VerifyReport:
    """Module-by-module ΔW comparison of two adapters."""

    a: str
    b: str
    format_a: str | None
    format_b: str | None
    rows: list[dict[str, Any]]
    atol: float | None
    rtol: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["status"] == "match" for r in self.rows)

    @property
    def max_relative_error(self) -> float | None:
        """The largest relative error; NaN when a module's ΔW is not finite."""
        errs = [r["relative_error"] for r in self.rows if r["relative_error"] is not None]
        if any(math.isnan(e) for e in errs):
            return math.nan
        return max(errs) if errs else None

    def differing(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "match"]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "a": self.a, "b": self.b, "format_a": self.format_a, "format_b": self.format_b,
                "modules": len(self.rows), "matching": sum(r["status"] == "match" for r in self.rows),
                "max_relative_error": self.max_relative_error,
                "tolerance": {"atol": 0.0 if self.atol is None else self.atol, "rtol": self.rtol,
                              "auto_rtol": AUTO_RTOL},
                "differing": self.differing(), "rows": self.rows, "warnings": self.warnings}

    def table(self, *, verbose: bool = False) -> str:
        lines = [f"A: {self.a} ({self.format_a})", f"B: {self.b} ({self.format_b})"]
        tol = f"rtol {'auto (by dtype)' if self.rtol is None else self.rtol}, atol {self.atol or 0}"
        n = len(self.rows)
        if self.ok:
            lines.append(f"all {n} modules match: max relative error {fmt_err(self.max_relative_error)} ({tol})")
        elif not self.rows:
            lines.append("neither adapter has any module")
        else:
            lines.append(f"{len(self.differing())} of {n} modules differ ({tol}):")
        shown = self.rows if verbose else self.differing()
        if shown:
            rows = [[r["module"], r["status"], fmt_err(r["max_abs_error"]), fmt_err(r["relative_error"]),
                     "-" if r["rtol"] is None else f"{r['rtol']:g}"] for r in shown]
            lines.append(format_table(["module", "status", "max abs err", "rel err", "rtol"], rows, indent="  "))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def verify(a: Any, b: Any, *, atol: float | None = None, rtol: float | None = None,
           format_a: str | None = None, format_b: str | None = None,
           convention_a: str | None = None, convention_b: str | None = None,
           options_a: Mapping[str, Any] | None = None, options_b: Mapping[str, Any] | None = None,
           modules: list[str] | None = None) -> VerifyReport:
    """Compare the ΔW of two adapters (paths in any format, or :class:`Adapter` objects).

    ``modules`` is a module-name hint for loaders that need one (kohya).

    >>> verify("adapter_peft", "adapter.safetensors").ok  # doctest: +SKIP
    True
    """
    atol, rtol = check_tolerance(atol, "atol"), check_tolerance(rtol, "rtol")
    seen: list[str] = []
    with collect_warnings(seen):
        left = load_adapter(a, format=format_a, convention=convention_a, options=options_a, modules=modules)
        right = load_adapter(b, format=format_b, convention=convention_b, options=options_b, modules=modules)
        names = list(left) + [n for n in right if n not in left]
        rows = [compare_modules(n, left.modules.get(n), right.modules.get(n), atol=atol, rtol=rtol)
                for n in names]
    return VerifyReport(source_name(a), source_name(b), left.provenance.get("source_format"),
                        right.provenance.get("source_format"), rows, atol, rtol, seen)


def verify_adapters(left: Adapter, right: Adapter, **kw: Any) -> VerifyReport:
    """:func:`verify` for two in-memory adapters."""
    return verify(left, right, **kw)
