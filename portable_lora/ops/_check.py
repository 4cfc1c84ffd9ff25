"""``check``: the same adapter gives the same numbers on every installed backend.

A thin layer over :func:`portable_lora.testing.check_equivalence` (forward and merge on
NumPy, array_api_strict, PyTorch, JAX and MLX against a float64 NumPy reference), for a file,
an Adapter, or the built-in example (:func:`example_adapter`: linear modules of mixed ranks
and alphas, a DoRA module, an embedding and a convolution).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import examples
from ..adapter import Adapter
from ..errors import LoraError
from ..testing import BACKENDS, TOLERANCE, EquivalenceReport, check_equivalence
from ..validation import check_finite
from ._checkpoint import Checkpoint, match_modules
from ._merge import base_layouts, base_shape
from ._util import collect_warnings, load_adapter, source_name

__all__ = ["check", "CheckReport", "example_adapter"]

BUILTIN = "built-in example"


def example_adapter(seed: int = 0) -> Adapter:
    """A small adapter touching every code path: mixed ranks/alphas, DoRA, embedding, conv."""
    shapes = examples.llama_module_shapes(layers=1, hidden=32, intermediate=48)
    names = list(shapes)
    ranks = {n: (4, 8, 2)[i % 3] for i, n in enumerate(names)}
    alphas = {n: (8.0, 4.0, 16.0)[i % 3] for i, n in enumerate(names)}
    linear = examples.random_adapter(shapes, rank=ranks, alpha=alphas, seed=seed)
    dora = examples.random_adapter({"model.layers.1.self_attn.q_proj": (32, 32)}, rank=4, alpha=8.0,
                                   dora=True, seed=seed + 1)
    rs = examples.random_adapter({"model.layers.1.self_attn.v_proj": (32, 32)}, rank=8, alpha=4.0,
                                 rule="alpha/sqrt(rank)", seed=seed + 2)
    emb = examples.random_adapter({"model.embed_tokens": (50, 32)}, rank=4, kind="embedding", seed=seed + 3)
    conv = examples.random_adapter({"unet.conv_in": (8, 4, 3, 3)}, rank=2, kind="conv", seed=seed + 4)
    out = Adapter(base_model="tiny example (random)",
                  provenance={"source_format": "memory", "created_by": "portable_lora.ops.example_adapter"})
    for part in (linear, dora, rs, emb, conv):
        for name, m in part.items():
            out[name] = m
    return out


@dataclass
class CheckReport:
    adapter: str
    modules: int
    report: EquivalenceReport
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok and bool(self.report.rows)

    def to_json(self) -> dict[str, Any]:
        j = self.report.to_json()
        j.update(ok=self.ok, adapter=self.adapter, modules=self.modules, warnings=self.warnings,
                 tolerances=dict(TOLERANCE))
        return j

    def table(self) -> str:
        lines = [f"{self.adapter}: {self.modules} modules, forward and merge vs a float64 NumPy reference "
                 "(error relative to the largest value)", self.report.table()]
        if not self.report.rows:
            lines.append("no backend could be checked")
        lines.append("all backends agree" if self.ok else "BACKENDS DISAGREE")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def check(adapter: Any = None, *, dtypes: Sequence[str] = ("float32", "bfloat16"),
          backends: Iterable[str] | None = None, base: str | os.PathLike | None = None,
          format: str | None = None, convention: str | None = None,
          options: Mapping[str, Any] | None = None) -> CheckReport:
    """Run :func:`~portable_lora.testing.check_equivalence` on every installed backend.

    ``adapter``: a path (any format), an Adapter, or None for :func:`example_adapter`.
    ``base``: a checkpoint to take the base weights from (random weights otherwise).

    >>> check().ok  # doctest: +SKIP
    True
    """
    dtypes = list(dtypes)
    if not dtypes:
        raise LoraError(f"no dtypes given; expected some of {', '.join(TOLERANCE)}", key="dtypes")
    unknown = [d for d in dtypes if d not in TOLERANCE]
    if unknown:
        raise LoraError(f"unknown dtypes {unknown}; expected some of {', '.join(TOLERANCE)}", key="dtypes")
    names = None if backends is None else list(backends)
    if names is not None:
        bad = [b for b in names if b not in BACKENDS]
        if bad:
            raise LoraError(f"unknown backends {bad}; expected some of {', '.join(BACKENDS)}", key="backends")
    seen: list[str] = []
    with collect_warnings(seen):
        if adapter is None:
            lora, label = example_adapter(), BUILTIN
        else:
            modules = None
            if base is not None:
                with Checkpoint(base) as ckpt:
                    modules = ckpt.module_names()
            lora, label = load_adapter(adapter, format=format, convention=convention, options=options,
                                       modules=modules), source_name(adapter)
        if not len(lora):
            raise LoraError("the adapter has no modules", file=label)
        check_finite(lora, file=label)  # NaN compares unequal to itself: no agreement to check
        weights = _base_weights(lora, base) if base is not None else None
        report = check_equivalence(lora, weights, backends=names, dtypes=tuple(dtypes))
    return CheckReport(label, len(lora), report, seen)


def _base_weights(adapter: Adapter, base: str | os.PathLike) -> dict[str, np.ndarray]:
    with Checkpoint(base) as ckpt:
        matched, unmatched = match_modules(adapter, ckpt.keys())
        if unmatched:
            first = next(iter(unmatched))
            raise LoraError(f"{len(unmatched)} modules match no base tensor, e.g. {first}: "
                            f"{unmatched[first]}", file=base, key=first)
        layouts = base_layouts(adapter, ckpt, matched)
        weights = {}
        for module, key in matched.items():
            m = adapter[module]
            w = ckpt.get(key)
            transposed = layouts[module]
            if tuple(w.shape) != base_shape(m, transposed):
                raise LoraError(f"shape {list(w.shape)}, the adapter needs {list(base_shape(m, transposed))}",
                                file=base, key=key)
            # check_equivalence takes weights in the (out, in) layout ΔW is in
            weights[module] = (w.T if transposed and m.kind == "linear" else w).astype(np.float64)
        return weights
