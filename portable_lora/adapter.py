"""The Adapter model: module name → LoRA weights, plus metadata and provenance.

Factors are NumPy arrays (bfloat16 through ``ml_dtypes``) in the library's one orientation:
A (r, in, ...), B (out, r, ...). Framework modules convert at their boundary.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from . import core
from ._version import __version__
from .errors import LoraError

__all__ = ["LoraModule", "Adapter"]

_FACTOR_NDIM = {"linear": (2, 2), "embedding": (2, 2), "conv": (4, 4)}
# what kind "f" (and ml_dtypes' bfloat16) admits; float8 and integer factors are not LoRA factors here
_FACTOR_DTYPES = "floating point (float16, bfloat16, float32 or float64)"


@dataclass
class LoraModule:
    """One module's LoRA: ΔW = scale · B @ A, with scale = effective_scale(alpha, rank, rule).

    ``magnitude`` (out,) makes it DoRA. ``kind`` is ``linear``, ``conv`` or ``embedding``.
    """

    A: np.ndarray
    B: np.ndarray
    alpha: float
    rule: str = core.ALPHA_OVER_RANK
    kind: str = "linear"
    magnitude: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.A = np.asarray(self.A)
        self.B = np.asarray(self.B)
        if self.magnitude is not None:
            self.magnitude = np.asarray(self.magnitude)

    # -- derived quantities -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """The effective scale: the number that multiplies B @ A."""
        return core.effective_scale(self.alpha, self.rank, self.rule)

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def dtype(self) -> np.dtype:
        return self.A.dtype

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module patches (the layout ΔW is returned in)."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        return (self.out_features, *self.A.shape[1:])

    def delta_weight(self, dtype: Any = None) -> np.ndarray:
        """ΔW with the scale applied (float32 unless the factors are float64, or ``dtype``)."""
        return core.delta_weight(self.A, self.B, self.scale, self.kind, dtype=dtype)

    def validate(self, name: str | None = None) -> "LoraModule":
        """Check kinds, ranks, alpha, rule and shapes; raise :class:`LoraError` naming ``name``."""
        where = f"module {name!r}: " if name else ""
        if self.kind not in _FACTOR_NDIM:
            raise LoraError(f"{where}unknown kind {self.kind!r}; expected one of {', '.join(core.KINDS)}",
                            key=name)
        core.check_rule(self.rule, module=name)
        core.check_alpha(self.alpha, module=name)
        for label, array in (("A", self.A), ("B", self.B)):
            if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
                raise LoraError(f"{where}{label} must be {_FACTOR_DTYPES}, found {array.dtype}", key=name)
        want_a, want_b = _FACTOR_NDIM[self.kind]
        if self.A.ndim != want_a or self.B.ndim != want_b:
            raise LoraError(f"{where}{self.kind} LoRA needs A with {want_a} and B with {want_b} "
                            f"dimensions, found A {list(self.A.shape)} and B {list(self.B.shape)}",
                            key=name)
        core.check_rank(int(self.A.shape[0]), module=name)
        if self.B.shape[1] != self.A.shape[0]:
            raise LoraError(f"{where}A and B disagree on the rank: A {list(self.A.shape)} has rank "
                            f"{self.A.shape[0]}, B {list(self.B.shape)} has rank {self.B.shape[1]}",
                            key=name)
        if self.kind == "conv" and tuple(self.B.shape[2:]) != (1, 1):
            raise LoraError(f"{where}conv LoRA up/B must be 1×1, found {list(self.B.shape)}", key=name)
        if self.magnitude is not None:
            if self.kind == "embedding":
                raise LoraError(f"{where}DoRA on embeddings is not supported (PEFT and mlx-lm "
                                "disagree on the magnitude's axis)", key=name)
            if self.magnitude.dtype.kind != "f" and self.magnitude.dtype.name != "bfloat16":
                raise LoraError(f"{where}DoRA magnitude must be {_FACTOR_DTYPES}, found "
                                f"{self.magnitude.dtype}", key=name)
            if self.magnitude.shape != (self.out_features,):
                raise LoraError(f"{where}DoRA magnitude must have shape [{self.out_features}], "
                                f"found {list(self.magnitude.shape)}", key=name)
        return self

    def copy(self) -> "LoraModule":
        return _copy.deepcopy(self)


class Adapter(Mapping[str, LoraModule]):
    """A LoRA adapter: an ordered mapping of module names to :class:`LoraModule`.

    >>> import numpy as np
    >>> a = Adapter({"q_proj": LoraModule(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), alpha=4)})
    >>> a.delta_weight("q_proj").shape
    (3, 4)
    """

    def __init__(self, modules: Mapping[str, LoraModule] | None = None, *,
                 base_model: str | None = None, provenance: Mapping[str, Any] | None = None):
        self.modules: dict[str, LoraModule] = {}
        self.base_model = base_model
        self.provenance: dict[str, Any] = {"library_version": __version__}
        if provenance:
            self.provenance.update(provenance)
        for name, module in (modules or {}).items():
            self[name] = module

    # -- mapping protocol -----------------------------------------------------------------
    def __getitem__(self, name: str) -> LoraModule:
        try:
            return self.modules[name]
        except KeyError:
            raise KeyError(f"no module {name!r} in this adapter") from None

    def __setitem__(self, name: str, module: LoraModule) -> None:
        if not isinstance(name, str) or not name:
            raise LoraError(f"module names must be non-empty strings, found {name!r}")
        if not isinstance(module, LoraModule):
            raise LoraError(f"module {name!r}: expected a LoraModule, found {type(module).__name__}",
                            key=name)
        self.modules[name] = module.validate(name)

    def __delitem__(self, name: str) -> None:
        del self.modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        return f"Adapter({len(self)} modules, source={self.provenance.get('source_format', 'memory')!r})"

    # -- math -------------------------------------------------------------------------------
    def delta_weight(self, name: str, dtype: Any = None) -> np.ndarray:
        """ΔW of ``name`` with the scale applied, in the layout of the weight it patches."""
        return self[name].delta_weight(dtype)

    def copy(self) -> "Adapter":
        return Adapter({n: m.copy() for n, m in self.items()}, base_model=self.base_model,
                       provenance=_copy.deepcopy(self.provenance))

    def rename(self, mapping: Mapping[str, str] | Any) -> "Adapter":
        """A copy whose module names pass through ``mapping`` (a dict or a function)."""
        out = Adapter(base_model=self.base_model, provenance=_copy.deepcopy(self.provenance))
        for name, module in self.items():
            new = mapping.get(name, name) if isinstance(mapping, Mapping) else mapping(name)
            if new in out:
                raise LoraError(f"renaming maps two modules to {new!r}", key=name)
            out[new] = module.copy()
        return out

    # -- description ------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.items()}

    @property
    def scales(self) -> dict[str, float]:
        return {n: m.scale for n, m in self.items()}

    def num_parameters(self) -> int:
        total = 0
        for m in self.values():
            total += m.A.size + m.B.size + (0 if m.magnitude is None else m.magnitude.size)
        return total

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: groups of modules sharing rank, alpha, rule, scale and kind."""
        groups: dict[tuple, list[str]] = {}
        for name, m in self.items():
            key = (m.rank, m.alpha, m.rule, m.scale, m.kind, m.is_dora, str(m.dtype))
            groups.setdefault(key, []).append(name)
        return {
            "modules": len(self),
            "parameters": self.num_parameters(),
            "base_model": self.base_model,
            "provenance": dict(self.provenance),
            "groups": [
                {"rank": k[0], "alpha": k[1], "rule": k[2], "scale": k[3], "kind": k[4],
                 "dora": k[5], "dtype": k[6], "count": len(v), "modules": v}
                for k, v in groups.items()
            ],
        }

    def summary(self) -> str:
        """A short human-readable summary (what ``portable-lora inspect`` prints)."""
        d = self.describe()
        lines = [f"{d['modules']} modules, {d['parameters']:,} parameters"
                 + (f", base model {d['base_model']}" if d["base_model"] else "")]
        src = self.provenance.get("source_format")
        if src:
            lines.append(f"source format: {src}")
        conv = self.provenance.get("convention")
        if conv:
            lines.append(f"convention: {conv} ({self.provenance.get('convention_reason', '')})")
        for g in d["groups"]:
            extras = [g["kind"], g["dtype"]] + (["DoRA"] if g["dora"] else [])
            lines.append(f"  {g['count']:>4} × rank {g['rank']}, alpha {g['alpha']:g}, rule {g['rule']}, "
                         f"scale {g['scale']:.6g} ({', '.join(extras)})")
        return "\n".join(lines)


