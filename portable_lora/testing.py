"""Cross-backend equivalence: the same adapter gives the same numbers everywhere.

:func:`check_equivalence` runs the unmerged forward and the merge of an adapter on every
installed array namespace (NumPy, array_api_strict, PyTorch, JAX, MLX) in each dtype, and
reports the largest error of each against a float64 NumPy reference. Use it on your own
adapters and base weights::

    from portable_lora import testing, examples
    adapter = examples.random_adapter()
    report = testing.check_equivalence(adapter)
    print(report.table())
    assert report.ok

Backends are imported only when this runs. :data:`BACKENDS` describes how arrays move in and
out of each; the test suite uses the same table.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from . import core
from .adapter import Adapter

__all__ = ["Namespace", "BACKENDS", "TOLERANCE", "load_namespace", "installed_backends",
           "relative_error", "EquivalenceRow", "EquivalenceReport", "check_equivalence"]

# Largest allowed error, relative to the reference's largest magnitude, by computation dtype.
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Namespace:
    """An array namespace under test: moving float64 NumPy arrays in and out, its dtypes."""

    name: str
    xp: Any
    to: Callable[[np.ndarray, str], Any]  # (numpy array, dtype name) -> native array
    back: Callable[[Any], np.ndarray]     # native array -> numpy float64
    dtypes: tuple[str, ...]
    asarray_int: Callable[[np.ndarray], Any]

    def __repr__(self) -> str:
        return self.name


def _numpy() -> Namespace:
    table = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    return Namespace("numpy", np, lambda a, d: np.asarray(a).astype(table[d]),
                     lambda x: np.asarray(x).astype(np.float64), ("float64", "float32", "bfloat16"),
                     np.asarray)


def _strict() -> Namespace:
    import array_api_strict as xp

    return Namespace("array_api_strict", xp, lambda a, d: xp.asarray(np.asarray(a, dtype=d)),
                     lambda x: np.asarray(x, dtype=np.float64), ("float64", "float32"), xp.asarray)


def _torch() -> Namespace:
    import torch
    from array_api_compat import torch as xp

    return Namespace("torch", xp,
                     lambda a, d: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(getattr(torch, d)),
                     lambda x: x.detach().to(torch.float64).cpu().numpy(), ("float64", "float32", "bfloat16"),
                     lambda a: torch.from_numpy(np.asarray(a)))


def _jax() -> Namespace:
    import jax.numpy as jnp

    # float64 needs jax_enable_x64; without it JAX silently computes in float32
    import jax

    dtypes = ("float64", "float32", "bfloat16") if jax.config.jax_enable_x64 else ("float32", "bfloat16")
    return Namespace("jax", jnp, lambda a, d: jnp.asarray(np.asarray(a, dtype=np.float32 if d != "float64" else np.float64), dtype=getattr(jnp, d)),
                     lambda x: np.asarray(x.astype(jnp.float32)).astype(np.float64) if x.dtype != jnp.float64 else np.asarray(x),
                     dtypes, jnp.asarray)


def _mlx() -> Namespace:
    import mlx.core as mx

    from .core._mlx_compat import namespace

    return Namespace("mlx", namespace(),
                     lambda a, d: mx.array(np.asarray(a, dtype=np.float32)).astype(getattr(mx, d)),
                     lambda x: np.asarray(x.astype(mx.float32)).astype(np.float64), ("float32", "bfloat16"),
                     mx.array)


BACKENDS: dict[str, Callable[[], Namespace]] = {
    "numpy": _numpy, "array_api_strict": _strict, "torch": _torch, "jax": _jax, "mlx": _mlx,
}
_MODULE_OF = {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch",
              "jax": "jax", "mlx": "mlx"}


def installed_backends() -> list[str]:
    """Backends whose package is installed (found without importing it)."""
    return [n for n in BACKENDS if importlib.util.find_spec(_MODULE_OF[n]) is not None]


def load_namespace(name: str) -> Namespace:
    """The :class:`Namespace` for ``name``; raises ImportError if its package is missing."""
    return BACKENDS[name]()


def relative_error(actual: Any, expected: np.ndarray) -> float:
    """max|actual − expected| / max|expected| (0 for empty arrays)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(actual - expected))) / scale


def _is_worse(a: float, b: float) -> bool:
    """``a > b``, with NaN (a non-finite result) worse than any number."""
    return (math.isnan(a) and not math.isnan(b)) or a > b


def _worse(a: float, b: float) -> float:
    return a if _is_worse(a, b) else b


@dataclass
class EquivalenceRow:
    backend: str
    dtype: str
    forward_error: float
    merge_error: float
    tolerance: float
    worst_module: str

    @property
    def ok(self) -> bool:
        return self.forward_error <= self.tolerance and self.merge_error <= self.tolerance


@dataclass
class EquivalenceReport:
    rows: list[EquivalenceRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every row within tolerance, and at least one row: a run that checked nothing (every
        backend or dtype skipped) agrees with nothing."""
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "skipped": self.skipped,
                "rows": [{"backend": r.backend, "dtype": r.dtype, "forward_error": r.forward_error,
                          "merge_error": r.merge_error, "tolerance": r.tolerance, "ok": r.ok,
                          "worst_module": r.worst_module} for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'backend':<17} {'dtype':<9} {'forward err':>12} {'merge err':>12} {'tolerance':>10}  result"]
        for r in self.rows:
            lines.append(f"{r.backend:<17} {r.dtype:<9} {r.forward_error:>12.3e} {r.merge_error:>12.3e} "
                         f"{r.tolerance:>10.0e}  {'ok' if r.ok else 'DIFFERS (' + r.worst_module + ')'}")
        for name, why in self.skipped.items():
            lines.append(f"{name:<17} not checked: {why}")
        return "\n".join(lines)


def _reference(adapter: Adapter, weights: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]):
    out = {}
    for name, m in adapter.items():
        A = m.A.astype(np.float64)
        B = m.B.astype(np.float64)
        W = np.asarray(weights[name], dtype=np.float64)
        mag = None if m.magnitude is None else m.magnitude.astype(np.float64)
        merged = np.asarray(core.merge_into(W, A, B, m.scale, m.kind, magnitude=mag))
        forward = None
        if m.kind == "linear":
            forward = inputs[name] @ merged.T
        elif m.kind == "embedding":
            forward = merged[inputs[name]]
        out[name] = (merged, forward)
    return out


def _run(ns: Namespace, dtype: str, m, W: np.ndarray, x: np.ndarray | None):
    to = ns.to
    A, B, w = to(m.A.astype(np.float64), dtype), to(m.B.astype(np.float64), dtype), to(W, dtype)
    mag = None if m.magnitude is None else to(m.magnitude.astype(np.float64), dtype)
    merged = core.merge_into(w, A, B, m.scale, m.kind, magnitude=mag)
    forward = None
    if m.kind == "linear":
        xs = to(x, dtype)
        if mag is None:
            forward = core.linear_forward(xs, w, A, B, m.scale)
        else:
            forward = core.dora_forward(xs, w, A, B, m.scale, mag)
    elif m.kind == "embedding":
        ids = ns.asarray_int(x)
        forward = ns.xp.take(w, ids, axis=0) + core.embedding_lora_output(ids, A, B, m.scale)
    return merged, forward


def check_equivalence(adapter: Adapter, weights: Mapping[str, np.ndarray] | None = None, *,
                      backends: Iterable[str] | None = None,
                      dtypes: Iterable[str] = ("float32", "bfloat16"), tokens: int = 4,
                      seed: int = 0) -> EquivalenceReport:
    """Forward and merge of every module on every backend × dtype, against float64 NumPy.

    ``weights`` maps module names to base weights (random ones are made when omitted). Inputs
    of each dtype are first rounded to that dtype, so the reference sees the same numbers.
    Conv modules are checked through the merge only (the array API has no convolution). A
    backend that is unknown or not importable, and a dtype a backend lacks, are listed in the
    report's ``skipped``; a report with no row at all is not ``ok``.
    """
    from .examples import random_weights
    from .errors import LoraError

    dtypes = tuple(dtypes)
    unknown = [d for d in dtypes if d not in TOLERANCE]
    if unknown:
        raise LoraError(f"unknown dtypes {unknown}; expected some of {', '.join(TOLERANCE)}", key="dtypes")

    rng = np.random.default_rng(seed)
    weights = dict(weights) if weights is not None else random_weights(adapter, dtype=np.float64, seed=seed + 1)
    missing = [n for n in adapter if n not in weights]
    if missing:
        raise LoraError(f"no base weight given for modules {missing[:10]}", key="weights")
    inputs = {}
    for name, m in adapter.items():
        if m.kind == "linear":
            inputs[name] = rng.standard_normal((tokens, m.in_features))
        elif m.kind == "embedding":
            inputs[name] = rng.integers(0, m.in_features, size=(tokens,))
    report = EquivalenceReport()
    names = list(backends) if backends is not None else installed_backends()
    for bname in names:
        try:
            ns = load_namespace(bname)
        except KeyError:
            report.skipped[bname] = f"unknown backend; known: {', '.join(BACKENDS)}"
            continue
        except ImportError as exc:
            report.skipped[bname] = f"not importable ({exc})"
            continue
        for dtype in dtypes:
            if dtype not in ns.dtypes:
                report.skipped[f"{bname} {dtype}"] = f"{bname} here has {', '.join(ns.dtypes)}"
                continue
            tol = TOLERANCE[dtype]
            worst_f = worst_m = 0.0
            worst_name = ""
            rounded = _round_adapter(adapter, weights, inputs, dtype)
            ref = _reference(*rounded)
            r_adapter, r_weights, r_inputs = rounded
            for name, m in r_adapter.items():
                merged, forward = _run(ns, dtype, m, r_weights[name], r_inputs.get(name))
                em = relative_error(ns.back(merged), ref[name][0])
                ef = 0.0 if forward is None else relative_error(ns.back(forward), ref[name][1])
                if _is_worse(_worse(em, ef), _worse(worst_m, worst_f)):
                    worst_name = name
                worst_m, worst_f = _worse(worst_m, em), _worse(worst_f, ef)
            report.rows.append(EquivalenceRow(bname, dtype, worst_f, worst_m, tol, worst_name))
    return report


def _round_adapter(adapter: Adapter, weights, inputs, dtype: str):
    """The adapter, weights and inputs rounded to ``dtype`` and widened back to float64."""
    np_dtype = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]

    def r(a):
        return np.asarray(a).astype(np_dtype).astype(np.float64)

    rounded = Adapter()
    for name, m in adapter.items():
        mod = m.copy()
        mod.A, mod.B = r(m.A), r(m.B)
        if m.magnitude is not None:
            mod.magnitude = r(m.magnitude)
        rounded[name] = mod
    r_inputs = {n: (r(x) if np.asarray(x).dtype.kind == "f" else x) for n, x in inputs.items()}
    return rounded, {n: r(w) for n, w in weights.items()}, r_inputs
