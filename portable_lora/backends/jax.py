"""JAX and Flax NNX: LoRA on parameter pytrees (pure functions) and on NNX modules (in place).

Every number is computed by :mod:`portable_lora.core`; this module only finds weights,
moves arrays across the boundary and transposes Flax layouts.

**Parameter pytrees** (nested dicts as in Flax linen, ``nnx.State``, ``nnx.to_pure_dict``):
:func:`merge_params` and :func:`unmerge_params` return new trees; :func:`lora_params` gives
the factors as ``jnp`` arrays to train; :func:`lora_dense`, :func:`dora_dense` and
:func:`lora_embed` are forward helpers for a hand-written ``apply_fn``. All are pure and work
under ``jax.jit`` and ``jax.grad``.

**Flax NNX modules**: :func:`apply` swaps ``nnx.Linear`` / ``nnx.Embed`` submodules for
:class:`LoraLinear` / :class:`LoraEmbed`, which hold the base module and the factors as
``nnx.LoRAParam`` (so ``nnx.DiffState(0, nnx.LoRAParam)`` trains only them); :func:`merge`,
:func:`unmerge`, :func:`remove`, :func:`extract` and :func:`set_strength` act in place.
:func:`unmerge` brings a weight back to within a rounding of the merged one (W + ΔW − ΔW,
each sum rounded once to the weight's dtype), not bit for bit. :func:`merge` refuses a weight
that the model also reaches under another name which :func:`apply` would leave alone (one
module in two places, one ``nnx.Param`` in two modules), unless ``allow_shared=True``.

Layouts at this boundary are Flax's: a Dense/Linear ``kernel`` is (in, out), the transpose of
the canonical (out, in); an ``embedding`` table is (num_embeddings, dim), the layout ΔW of an
embedding already has; a 2-D conv ``kernel`` is (kh, kw, in, out). The factors keep the
canonical orientation A (r, in), B (out, r).

Module names become paths by splitting on dots: ``"layers.0.attn.q"`` →
``("layers", "0", "attn", "q")``, where a digit matches a list index or an integer key. Pass
``mapping``, a dict ``{name: path}`` (names not in it keep the default) or a function
``name -> path`` (``None``: no match), to change that. In a pytree the path names the
module's sub-tree (the leaf ``kernel`` or ``embedding`` is then added) or the leaf itself.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import portable_lora as pl
>>> from portable_lora import jax as plj
>>> class Tiny(nnx.Module):
...     def __init__(self):
...         self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
>>> adapter = pl.examples.random_adapter({"proj": (3, 4)}, rank=2)
>>> model = plj.apply(Tiny(), adapter)
>>> model.proj(jnp.ones((1, 4))).shape
(1, 3)
>>> sorted(plj.extract(model))
['proj']
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from . import _merged

__all__ = [
    # NNX modules, in place
    "apply", "merge", "unmerge", "remove", "extract", "set_strength", "LoraLinear", "LoraEmbed",
    "DoraNorm",
    # parameter pytrees, pure
    "merge_params", "unmerge_params", "dora_weight_norms", "lora_params", "lora_dense",
    "dora_dense", "lora_embed",
]

PathMapping = Mapping[str, Any] | Callable[[str], Any] | None

# the leaf a module's sub-tree keeps its weight under, by LoRA kind (Flax names)
_LEAF = {"linear": "kernel", "conv": "kernel", "embedding": "embedding"}
# Flax 2-D conv kernel (kh, kw, in, out) <-> canonical (out, in, kh, kw)
_CONV_TO_CANONICAL = (3, 2, 0, 1)
_CONV_FROM_CANONICAL = (2, 3, 1, 0)


# -- shared helpers ----------------------------------------------------------------------------

def _path_for(name: str, mapping: PathMapping) -> tuple | None:
    """The path ``mapping`` gives ``name`` (a tuple of str/int), or None for no match."""
    if mapping is None:
        raw = name
    elif isinstance(mapping, Mapping):
        raw = mapping.get(name, name)
    elif callable(mapping):
        raw = mapping(name)
    else:
        raise LoraError(f"mapping must be a dict or a function name -> path, found "
                        f"{type(mapping).__name__}")
    if raw is None:
        return None
    path = tuple(raw.split(".")) if isinstance(raw, str) else tuple(raw)
    return path or None


def _show(path: tuple | None) -> str:
    return "no path" if path is None else ".".join(str(p) for p in path)


def _flax_shape(module: LoraModule) -> tuple[int, ...]:
    """The shape of the weight ``module`` patches, in Flax's layout."""
    if module.kind == "linear":
        return (module.in_features, module.out_features)
    if module.kind == "conv":
        out, cin, kh, kw = module.weight_shape
        return (kh, kw, cin, out)
    return tuple(module.weight_shape)


def _as_jnp(array: Any, dtype: Any = None) -> jax.Array:
    return jnp.asarray(array, dtype=dtype)


def _factors(name: str, module: LoraModule, lora: Mapping | None) -> tuple[Any, Any, Any]:
    """(A, B, magnitude) as JAX arrays: the adapter's, or the traced ones in ``lora``."""
    if lora is None:
        mag = None if module.magnitude is None else _as_jnp(module.magnitude)
        return _as_jnp(module.A), _as_jnp(module.B), mag
    if name not in lora:
        raise LoraError(f"module {name!r}: no factors for it in `lora` (it has "
                        f"{sorted(lora)[:5]}{'...' if len(lora) > 5 else ''})", key=name)
    entry = lora[name]
    out = []
    for label, want in (("A", module.A), ("B", module.B), ("magnitude", module.magnitude)):
        value = entry.get(label) if want is not None else None
        if want is not None:
            if value is None:
                raise LoraError(f"module {name!r}: `lora` has no {label!r}", key=name)
            if tuple(value.shape) != tuple(want.shape):
                raise LoraError(f"module {name!r}: `lora` {label} has shape {list(value.shape)}, "
                                f"the adapter's has {list(want.shape)}", key=name)
            value = _as_jnp(value)  # NumPy input too; a tracer passes through
        out.append(value)
    return tuple(out)


def _canonical(W: Any, name: str, module: LoraModule) -> jax.Array:
    """``W`` (Flax layout) checked against the adapter, as a JAX array the core can take
    (conv kernels moved to (out, in, kh, kw); linear kernels stay (in, out), ``transposed``)."""
    expected = _flax_shape(module)
    if tuple(W.shape) != expected:
        raise LoraError(f"module {name!r}: a {module.kind} LoRA of this adapter needs a weight of "
                        f"shape {list(expected)} (Flax layout), found {list(W.shape)}", key=name)
    W = _as_jnp(W)
    return jnp.transpose(W, _CONV_TO_CANONICAL) if module.kind == "conv" else W


def _patched(W: Any, name: str, module: LoraModule, factors: tuple, scale: float, *,
             undo: bool = False, weight_norm: Any = None) -> jax.Array:
    """``W`` (Flax layout) with the LoRA merged in (or taken out, ``undo``), through the core."""
    A, B, magnitude = factors
    W = _canonical(W, name, module)
    transposed = module.kind == "linear"  # Flax kernels are (in, out)
    if undo:
        if magnitude is not None and weight_norm is None:
            raise LoraError(f"module {name!r}: unmerging DoRA needs the weight norm taken before "
                            "merging (pass weight_norms=dora_weight_norms(...))", key=name)
        out = core.unmerge_from(W, A, B, scale, module.kind, magnitude=magnitude,
                                weight_norm=weight_norm, transposed=transposed)
    else:
        out = core.merge_into(W, A, B, scale, module.kind, magnitude=magnitude, transposed=transposed)
    return jnp.transpose(out, _CONV_FROM_CANONICAL) if module.kind == "conv" else out


# -- parameter pytrees ---------------------------------------------------------------------

def _key_name(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _normal_path(keypath: tuple) -> tuple[str, ...]:
    parts = tuple(str(_key_name(e)) for e in keypath)
    # an nnx.State leaf sits inside a Variable: its trailing `.value` is not part of the name
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return parts


def _targets(params: Any, adapter: Adapter, mapping: PathMapping) -> dict[tuple[str, ...], str]:
    """{normalised leaf path: module name}, raising for modules that match no leaf."""
    leaves = {_normal_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    found: dict[tuple[str, ...], str] = {}
    unmatched = []
    for name, module in adapter.items():
        path = _path_for(name, mapping)
        if path is None:
            unmatched.append(f"{name} ({_show(path)})")
            continue
        path = tuple(str(p) for p in path)
        with_leaf = path + (_LEAF[module.kind],)
        leaf = with_leaf if with_leaf in leaves else path if path in leaves else None
        if leaf is None:
            unmatched.append(f"{name} (looked for {_show(with_leaf)} and {_show(path)})")
            continue
        if leaf in found:
            raise LoraError(f"modules {found[leaf]!r} and {name!r} both map to {_show(leaf)}", key=name)
        found[leaf] = name
    if unmatched:
        raise LoraError(f"{len(unmatched)} adapter module(s) match no parameter in the tree: "
                        + "; ".join(unmatched))
    return found


def _map_params(params: Any, adapter: Adapter, mapping: PathMapping, fn: Callable) -> Any:
    if not isinstance(adapter, Adapter):
        raise LoraError(f"expected a portable_lora.Adapter, found {type(adapter).__name__}")
    targets = _targets(params, adapter, mapping)

    def visit(keypath, leaf):
        name = targets.get(_normal_path(keypath))
        return leaf if name is None else fn(name, adapter[name], leaf)

    return jax.tree_util.tree_map_with_path(visit, params)


def merge_params(params: Any, adapter: Adapter, *, strength: float = 1.0, mapping: PathMapping = None,
                 lora: Mapping | None = None) -> Any:
    """A new parameter tree with ``strength`` × the adapter merged into its weights.

    ``lora`` (the shape of :func:`lora_params`) replaces the adapter's factors, e.g. by traced
    ones to differentiate through the merge; the adapter still gives names, kinds and scales.
    Weights are accumulated in float32 (float64 for float64 weights) and rounded once.

    >>> import jax.numpy as jnp, portable_lora as pl
    >>> adapter = pl.examples.random_adapter({"dense": (3, 4)}, rank=2)
    >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
    >>> merged = merge_params(params, adapter)
    >>> bool(jnp.allclose(merged["dense"]["kernel"], adapter.delta_weight("dense").T))
    True
    """
    strength = core.check_strength(strength)
    return _map_params(params, adapter, mapping, lambda name, m, W: _patched(
        W, name, m, _factors(name, m, lora), m.scale * strength))


def unmerge_params(params: Any, adapter: Adapter, *, strength: float = 1.0, mapping: PathMapping = None,
                   lora: Mapping | None = None, weight_norms: Mapping[str, Any] | None = None) -> Any:
    """The inverse of :func:`merge_params` (same arguments); DoRA needs ``weight_norms``,
    taken by :func:`dora_weight_norms` before merging."""
    strength = core.check_strength(strength)
    norms = weight_norms or {}
    return _map_params(params, adapter, mapping, lambda name, m, W: _patched(
        W, name, m, _factors(name, m, lora), m.scale * strength, undo=True,
        weight_norm=norms.get(name)))


def dora_weight_norms(params: Any, adapter: Adapter, *, strength: float = 1.0,
                      mapping: PathMapping = None, lora: Mapping | None = None) -> dict[str, jax.Array]:
    """``{name: ‖W + ΔW‖}`` for the DoRA modules of ``adapter``: what unmerging them needs."""
    strength = core.check_strength(strength)
    norms: dict[str, jax.Array] = {}

    def record(name, module, W):
        if module.is_dora:
            A, B, _ = _factors(name, module, lora)
            norms[name] = core.dora_weight_norm(_canonical(W, name, module), A, B,
                                                module.scale * strength, module.kind,
                                                transposed=module.kind == "linear")
        return W

    _map_params(params, adapter, mapping, record)
    return norms


def lora_params(adapter: Adapter, *, dtype: Any = None) -> dict[str, dict[str, jax.Array]]:
    """The adapter's factors as a pytree ``{name: {"A", "B"[, "magnitude"]}}`` of JAX arrays.

    Canonical orientation (A (r, in), B (out, r)); ``dtype`` converts (default: as stored).
    """
    out = {}
    for name, module in adapter.items():
        entry = {"A": _as_jnp(module.A, dtype), "B": _as_jnp(module.B, dtype)}
        if module.magnitude is not None:
            entry["magnitude"] = _as_jnp(module.magnitude, dtype)
        out[name] = entry
    return out


def lora_dense(x: Any, kernel: Any, A: Any, B: Any, scale: float, bias: Any = None) -> jax.Array:
    """A Flax Dense layer with LoRA: ``x @ kernel + bias + scale · (x @ Aᵀ) @ Bᵀ``.

    ``kernel`` is Flax's (in, out); A (r, in), B (out, r). ``scale`` must be a Python number
    (the module's ``scale`` times any strength).
    """
    return core.linear_forward(x, kernel.T, A, B, scale, bias, xp=jnp)


def dora_dense(x: Any, kernel: Any, A: Any, B: Any, scale: float, magnitude: Any, bias: Any = None) -> jax.Array:
    """A Flax Dense layer with DoRA (see :func:`portable_lora.core.dora_forward`)."""
    return core.dora_forward(x, kernel.T, A, B, scale, magnitude, bias, xp=jnp)


def lora_embed(ids: Any, embedding: Any, A: Any, B: Any, scale: float) -> jax.Array:
    """An embedding lookup with LoRA; ``embedding`` (num, dim), A (r, num), B (dim, r)."""
    return jnp.take(embedding, ids, axis=0) + core.embedding_lora_output(ids, A, B, scale, xp=jnp)


# -- Flax NNX modules ----------------------------------------------------------------------

class DoraNorm(nnx.Variable):
    """‖W + ΔW‖ per output, kept while a DoRA module is merged: unmerging needs it (W is not
    determined by W' and the factors alone)."""


class _LoraWrapper(nnx.Module):
    """A base module plus one module's LoRA: the factors are ``nnx.LoRAParam``, canonical layout."""

    _weight_name = ""
    _transposed = False

    def __init__(self, base: nnx.Module, module: LoraModule, name: str, *, strength: float = 1.0,
                 dtype: Any = None):
        self.base = base
        self.adapter_name = name
        self.kind = module.kind
        self.alpha = float(module.alpha)
        self.rule = module.rule
        self.strength = core.check_strength(strength)
        self.A = nnx.LoRAParam(_as_jnp(module.A, dtype))
        self.B = nnx.LoRAParam(_as_jnp(module.B, dtype))
        self.magnitude = (nnx.LoRAParam(_as_jnp(module.magnitude, dtype)) if module.is_dora
                          else nnx.data(None))
        self.merged = False
        self.weight_norm = nnx.data(None)

    @property
    def rank(self) -> int:
        return int(self.A[...].shape[0])

    @property
    def scale(self) -> float:
        """The effective scale times the strength: the number that multiplies B @ A."""
        return core.effective_scale(self.alpha, self.rank, self.rule, module=self.adapter_name) * self.strength

    def _weight(self) -> nnx.Variable:
        return getattr(self.base, self._weight_name)

    def _lora_arrays(self) -> tuple[Any, Any, Any]:
        mag = None if self.magnitude is None else self.magnitude[...]
        return self.A[...], self.B[...], mag

    def merge(self) -> None:
        """Fold the LoRA into the base weight in place (accumulated in float32, rounded once)."""
        if self.merged:
            raise LoraError(f"module {self.adapter_name!r} is already merged", key=self.adapter_name)
        weight = self._weight()
        W = weight[...]
        A, B, magnitude = self._lora_arrays()
        if magnitude is not None:
            self.weight_norm = DoraNorm(core.dora_weight_norm(W, A, B, self.scale, self.kind,
                                                              transposed=self._transposed))
        weight[...] = core.merge_into(W, A, B, self.scale, self.kind, magnitude=magnitude,
                                      transposed=self._transposed)
        self.merged = True

    def unmerge(self) -> None:
        """Take the LoRA back out of the base weight (the inverse of :meth:`merge`)."""
        if not self.merged:
            raise LoraError(f"module {self.adapter_name!r} is not merged", key=self.adapter_name)
        weight = self._weight()
        A, B, magnitude = self._lora_arrays()
        norm = None if self.weight_norm is None else self.weight_norm[...]
        weight[...] = core.unmerge_from(weight[...], A, B, self.scale, self.kind, magnitude=magnitude,
                                        weight_norm=norm, transposed=self._transposed)
        self.weight_norm = None
        self.merged = False

    def to_lora_module(self) -> LoraModule:
        """The current factors (trained or not) as a NumPy :class:`LoraModule`."""
        A, B, magnitude = self._lora_arrays()
        return LoraModule(np.asarray(A), np.asarray(B), alpha=self.alpha, rule=self.rule, kind=self.kind,
                          magnitude=None if magnitude is None else np.asarray(magnitude))


class LoraLinear(_LoraWrapper):
    """``nnx.Linear`` with LoRA (or DoRA): ``base(x) + scale · (x @ Aᵀ) @ Bᵀ``, via the core.

    Input, kernel, bias and factors are promoted together by the base's own ``promote_dtype``:
    to its ``dtype`` if set, else to their common type (as ``nnx.LoRALinear`` does), so a
    bfloat16 base with float32 factors computes in float32 unless ``apply(dtype=...)``.
    """

    _weight_name = "kernel"
    _transposed = True  # kernel (in, out)

    def __call__(self, x: jax.Array) -> jax.Array:
        base = self.base
        if self.merged:
            return base(x)
        A, B, magnitude = self._lora_arrays()
        bias = None if base.bias is None else base.bias[...]
        x, kernel, bias, A, B = base.promote_dtype((x, base.kernel[...], bias, A, B), dtype=base.dtype)
        if magnitude is None:
            return core.linear_forward(x, kernel.T, A, B, self.scale, bias, xp=jnp)
        return core.dora_forward(x, kernel.T, A, B, self.scale, magnitude, bias, xp=jnp)


class LoraEmbed(_LoraWrapper):
    """``nnx.Embed`` with LoRA: ``base(ids) + scale · A[:, ids]ᵀ @ Bᵀ``; ``attend`` too."""

    _weight_name = "embedding"

    def __call__(self, ids: jax.Array) -> jax.Array:
        out = self.base(ids)
        if self.merged:
            return out
        A, B, _ = self._lora_arrays()
        A, B = self.base.promote_dtype((A, B), dtype=out.dtype)
        return out + core.embedding_lora_output(ids, A, B, self.scale, xp=jnp)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query @ (E + ΔW)ᵀ`` without materialising ΔW (tied output embeddings)."""
        out = self.base.attend(query)
        if self.merged:
            return out
        A, B, _ = self._lora_arrays()
        query, A, B = self.base.promote_dtype((query, A, B), dtype=out.dtype)
        # ΔW = s·(B @ A)ᵀ, so query @ ΔWᵀ = s·(query @ B) @ A: the LoRA term with roles swapped
        return out + core.lora_output(query, B.T, A.T, self.scale)


_WRAPPERS = {"linear": LoraLinear, "embedding": LoraEmbed}
_NNX_TYPES = {"linear": nnx.Linear, "embedding": nnx.Embed, "conv": nnx.Conv}
_MISSING = object()


def _check_model(model: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise LoraError(f"expected a flax.nnx.Module, found {type(model).__name__}; for parameter "
                        "pytrees use merge_params / unmerge_params")


def _child(node: Any, part: Any) -> tuple[Any, Any]:
    """(key, child) one step down from ``node``, or (None, _MISSING)."""
    if isinstance(node, Sequence) and not isinstance(node, str):
        try:
            index = int(part)
        except (TypeError, ValueError):
            return None, _MISSING
        return (index, node[index]) if 0 <= index < len(node) else (None, _MISSING)
    if isinstance(node, Mapping):
        for key in (part, int(part) if str(part).isdigit() else _MISSING, str(part)):
            if key is not _MISSING and key in node:
                return key, node[key]
        return None, _MISSING
    return str(part), getattr(node, str(part), _MISSING)


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, (MutableSequence, MutableMapping)) or (
            isinstance(parent, (nnx.List, nnx.Dict))):
        parent[key] = value
    elif isinstance(parent, (tuple, Sequence, Mapping)):
        raise LoraError(f"cannot replace item {key!r} of an immutable {type(parent).__name__}")
    else:
        setattr(parent, key, value)


def _locate(model: nnx.Module, path: tuple | None) -> tuple[Any, Any, Any] | None:
    """(parent, key, module) at ``path`` below ``model``, or None."""
    if not path:
        return None
    parent, key, node = None, None, model
    for part in path:
        step, child = _child(node, part)
        if child is _MISSING:
            return None
        parent, key, node = node, step, child
    return parent, key, node


def _resolve(model: nnx.Module, adapter: Adapter, mapping: PathMapping) -> list[tuple]:
    """[(name, module, parent, key, target)] for every adapter module; unmatched ones raise."""
    if not isinstance(adapter, Adapter):
        raise LoraError(f"expected a portable_lora.Adapter, found {type(adapter).__name__}")
    found, unmatched, seen = [], [], {}
    for name, module in adapter.items():
        path = _path_for(name, mapping)
        where = _locate(model, path)
        if where is None:
            unmatched.append(f"{name} ({_show(path)})")
            continue
        if id(where[2]) in seen:
            raise LoraError(f"modules {seen[id(where[2])]!r} and {name!r} both map to {_show(path)}", key=name)
        seen[id(where[2])] = name
        found.append((name, module, *where))
    if unmatched:
        raise LoraError(f"{len(unmatched)} adapter module(s) match nothing in the "
                        f"{type(model).__name__}: " + "; ".join(unmatched))
    return found


def _check_target(name: str, module: LoraModule, target: Any, *, wrapping: bool) -> None:
    if isinstance(target, _LoraWrapper):
        hint = "call remove() first" if wrapping else "merge it with merge(model) (no adapter)"
        raise LoraError(f"module {name!r} already has a LoRA applied ({type(target).__name__}); {hint}",
                        key=name)
    if isinstance(target, nnx.LoRALinear):
        raise LoraError(f"module {name!r} is a Flax nnx.LoRALinear, which has its own LoRA; "
                        "use a plain nnx.Linear", key=name)
    if wrapping and module.kind not in _WRAPPERS:
        raise LoraError(f"module {name!r}: {module.kind} LoRA cannot be applied to NNX modules "
                        "(only linear and embedding); merge it with merge(model, adapter)", key=name)
    want = _NNX_TYPES[module.kind]
    if not isinstance(target, want):
        raise LoraError(f"module {name!r}: a {module.kind} LoRA needs an nnx.{want.__name__}, found "
                        f"{type(target).__name__}", key=name)
    weight = getattr(target, _LEAF[module.kind])[...]
    if tuple(weight.shape) != _flax_shape(module):
        raise LoraError(f"module {name!r}: the adapter needs an nnx.{want.__name__} with "
                        f"{_LEAF[module.kind]} of shape {list(_flax_shape(module))}, found "
                        f"{list(weight.shape)}", key=name)


def _wrappers(model: nnx.Module) -> list[tuple[tuple, _LoraWrapper]]:
    _check_model(model)
    found = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, _LoraWrapper)]
    if not found:
        raise LoraError(f"no LoRA modules in this {type(model).__name__}: apply() an adapter first")
    return found


def apply(model: nnx.Module, adapter: Adapter, *, strength: float = 1.0, mapping: PathMapping = None,
          dtype: Any = None) -> nnx.Module:
    """Replace the adapter's target ``nnx.Linear`` / ``nnx.Embed`` submodules by
    :class:`LoraLinear` / :class:`LoraEmbed`, in place; returns ``model``.

    Nothing changes unless every module matches a submodule of the right type and shape.
    ``dtype`` converts the factors (default: the adapter's dtype).
    """
    _check_model(model)
    strength = core.check_strength(strength)
    targets = _resolve(model, adapter, mapping)
    for name, module, _, _, target in targets:
        _check_target(name, module, target, wrapping=True)
    for name, module, parent, key, target in targets:
        wrapper = _WRAPPERS[module.kind](target, module, name, strength=strength, dtype=dtype)
        _set_child(parent, key, wrapper)
    return model


# every merge of this process, numbered: of two modules holding one nnx.Param, which one had
# the last merge into it
_MERGE_ORDER = itertools.count()


@dataclass
class _MergeRecord:
    """What unmerging a merge(model, adapter) needs: the scale used, DoRA's ‖W + ΔW‖, which
    adapter module was merged under which name, and when."""

    scale: float
    weight_norm: Any
    identity: _merged.Identity
    order: int = field(default_factory=lambda: next(_MERGE_ORDER))


# merges into plain modules, per module object (kept outside the module: NNX would treat
# arrays in an attribute as graph data)
_MERGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# -- weights held in more than one place ---------------------------------------------------

_Steps = tuple  # ((node, key), ...): a path from the model down to a node


def _paths_to(model: nnx.Module, wanted: set[int]) -> dict[int, list[_Steps]]:
    """Every path from ``model`` to each variable in ``wanted`` (by id): a node held in more
    than one place is followed along each of its paths."""
    found: dict[int, list[_Steps]] = {}

    def visit(node: Any, steps: _Steps, active: frozenset) -> None:
        for key, child in nnx.iter_children(node):
            path = steps + ((node, key),)
            if id(child) in wanted:
                found.setdefault(id(child), []).append(path)
            if not isinstance(child, nnx.Variable) and id(child) not in active:
                visit(child, path, active | {id(child)})

    visit(model, (), frozenset((id(model),)))
    return found


def _held_once(model: nnx.Module, weights: set[int]) -> bool:
    """Whether each variable in ``weights`` (ids) is reached along one path only (almost every
    model): then no weight is shared, and the path search below is not needed.

    JAX's pytree flattening of an NNX module lists a variable once per place that holds it
    (a tied weight, a layer registered twice) and costs a few ms where a walk of the graph in
    Python costs tens; if it does not list every weight asked about (another flax version),
    the walk decides.
    """
    try:
        leaves = jax.tree_util.tree_leaves(model, is_leaf=lambda x: isinstance(x, nnx.Variable))
    except Exception:  # a model pytree flattening cannot take: walk it
        return _walked_once(model)
    seen: set[int] = set()
    for leaf in leaves:
        if id(leaf) in weights:
            if id(leaf) in seen:
                return False
            seen.add(id(leaf))
    return seen == weights or _walked_once(model)


def _walked_once(model: nnx.Module) -> bool:
    """Whether every module and variable below ``model`` is reached along one path only."""
    seen, stack = {id(model)}, [model]
    while stack:
        node = stack.pop()
        for _, child in nnx.iter_children(node):
            if id(child) in seen:
                return False
            seen.add(id(child))
            if not isinstance(child, nnx.Variable):
                stack.append(child)
    return True


def _check_unshared(model: nnx.Module, items: list[tuple[str, Any, Any, nnx.Variable]]) -> None:
    """Refuse to merge into a weight that the model also reaches under another name which
    :func:`apply` would not change: ``items`` are (name, parent, key, weight), ``parent[key]``
    the slot apply() replaces. The merged model would differ from the applied one there."""
    wanted = {id(weight) for *_, weight in items}
    if _held_once(model, wanted):
        return
    paths = _paths_to(model, wanted)
    for name, parent, key, weight in items:
        for path in paths.get(id(weight), ()):
            if not any(node is parent and str(k) == str(key) for node, k in path):
                other = ".".join(str(k) for _, k in path[:-1])
                raise _merged.shared_weight_error("merge:", name, other)


def _check_one_per_weight(targets: list[tuple], verb: str) -> None:
    """Two adapter modules on two modules that hold one nnx.Param: refused, one per weight."""
    seen: dict[int, str] = {}
    for name, module, _, _, target in targets:
        weight = getattr(target, _LEAF[module.kind], None)  # None: _check_target says what is wrong
        first = name if weight is None else seen.setdefault(id(weight), name)
        if first != name:
            raise LoraError(f"{verb}: modules {first!r} and {name!r} both map to one weight (one "
                            f"{_LEAF[module.kind]} held by both); {verb} them one at a time", key=name)


def _merge_plain(model: nnx.Module, adapter: Adapter, strength: float, mapping: PathMapping,
                 allow_shared: bool) -> nnx.Module:
    strength = core.check_strength(strength)
    targets = _resolve(model, adapter, mapping)
    for name, module, _, _, target in targets:
        _check_target(name, module, target, wrapping=False)
    _check_one_per_weight(targets, "merge")
    if not allow_shared:
        _check_unshared(model, [(name, parent, key, getattr(target, _LEAF[module.kind]))
                                for name, module, parent, key, target in targets])
    for name, module, _, _, target in targets:
        weight = getattr(target, _LEAF[module.kind])
        scale = module.scale * strength
        factors = _factors(name, module, None)
        norm = None
        if module.is_dora:
            norm = core.dora_weight_norm(_canonical(weight[...], name, module), factors[0], factors[1],
                                         scale, module.kind, transposed=module.kind == "linear")
        weight[...] = _patched(weight[...], name, module, factors, scale)
        _MERGES.setdefault(target, []).append(_MergeRecord(scale, norm, _merged.Identity(name, module)))
    return model


def _unmerge_plain(model: nnx.Module, adapter: Adapter, mapping: PathMapping) -> nnx.Module:
    targets = _resolve(model, adapter, mapping)
    _check_one_per_weight(targets, "unmerge")
    for name, module, _, _, target in targets:
        _check_target(name, module, target, wrapping=False)
        records = _MERGES.get(target)
        if not records:
            raise LoraError(f"module {name!r} has no LoRA merged by merge(model, adapter) (never "
                            "merged, already unmerged, or the module object was rebuilt)", key=name)
        _merged.check_last(records[-1].identity, name, module)  # the reverse order of merging
    wanted = {id(getattr(target, _LEAF[module.kind])) for _, module, _, _, target in targets}
    paths = {} if _held_once(model, wanted) else _paths_to(model, wanted)
    for name, module, _, _, target in targets:  # the reverse order per weight, across its holders
        mine = _MERGES[target][-1].order
        for path in paths.get(id(getattr(target, _LEAF[module.kind])), ()):
            holder = path[-1][0]
            records = _MERGES.get(holder) if holder is not target else None
            if records and records[-1].order > mine:
                other = ".".join(str(k) for _, k in path[:-1])
                raise _merged.later_merge_error("unmerge:", name, other)
    for name, module, _, _, target in targets:
        weight = getattr(target, _LEAF[module.kind])
        record = _MERGES[target].pop()
        weight[...] = _patched(weight[...], name, module, _factors(name, module, None), record.scale,
                               undo=True, weight_norm=record.weight_norm)
    return model


def merge(model: nnx.Module, adapter: Adapter | None = None, *, strength: float = 1.0,
          mapping: PathMapping = None, allow_shared: bool = False) -> nnx.Module:
    """Merge LoRA into base weights in place (float32 accumulation, one rounding); returns ``model``.

    With ``adapter`` (as in the other frameworks): merges ``strength`` × it straight into the
    plain ``nnx.Linear`` / ``nnx.Embed`` / ``nnx.Conv`` weights it names, remembering what
    :func:`unmerge` needs. Without: every applied :class:`LoraLinear` / :class:`LoraEmbed`
    folds its LoRA into its base weight at its own strength (see :func:`set_strength`) and
    forwards through the base alone until :func:`unmerge`.

    Either way, a weight that the model also holds under another name which :func:`apply`
    would leave alone (``model.b = model.a``, or ``model.b.kernel = model.a.kernel``, the
    adapter naming ``a``) is refused, naming both, and nothing changes: merging would change
    ``b`` too. ``allow_shared=True`` merges into the shared weight anyway, so every module
    holding it changes. (A tied output head through ``nnx.Embed.attend`` is one module: no
    sharing.)
    """
    _check_model(model)
    if adapter is not None:
        return _merge_plain(model, adapter, strength, mapping, allow_shared)
    if strength != 1.0 or mapping is not None:
        raise LoraError("strength and mapping apply only with an adapter; applied modules merge at "
                        "their own strength (set_strength)")
    wrappers = _wrappers(model)
    done = [w.adapter_name for _, w in wrappers if w.merged]
    if done:
        raise LoraError(f"already merged: {', '.join(done)}")
    if not allow_shared:
        _check_unshared(model, [(w.adapter_name, *_locate(model, path)[:2], w._weight()) for path, w in wrappers])
    for _, wrapper in wrappers:
        wrapper.merge()
    return model


def unmerge(model: nnx.Module, adapter: Adapter | None = None, *, mapping: PathMapping = None) -> nnx.Module:
    """The inverse of :func:`merge`: with ``adapter``, undoes the last merge of it into each
    module (same strength; DoRA from the norm recorded then); without, unmerges every applied
    module. Weights come back to within a rounding of the merged ones, not bit for bit."""
    _check_model(model)
    if adapter is not None:
        return _unmerge_plain(model, adapter, mapping)
    if mapping is not None:
        raise LoraError("mapping applies only with an adapter")
    wrappers = _wrappers(model)
    pending = [w.adapter_name for _, w in wrappers if not w.merged]
    if pending:
        raise LoraError(f"not merged: {', '.join(pending)}")
    for _, wrapper in wrappers:
        wrapper.unmerge()
    return model


def remove(model: nnx.Module) -> nnx.Module:
    """Put every applied module's base module back, in place; returns ``model``.

    The base weights are left as they are: a merged module's LoRA stays in them (merge then
    remove bakes the adapter in), an unmerged one's is dropped.
    """
    for path, wrapper in _wrappers(model):
        parent, key, _ = _locate(model, path)
        _set_child(parent, key, wrapper.base)
    return model


def extract(model: nnx.Module) -> Adapter:
    """The applied LoRA as a NumPy :class:`~portable_lora.Adapter` (trained factors included),
    named as it was applied; strength is not part of it."""
    adapter = Adapter(provenance={"source_format": "flax-nnx"})
    for _, wrapper in _wrappers(model):
        adapter[wrapper.adapter_name] = wrapper.to_lora_module()
    return adapter


def set_strength(model: nnx.Module, strength: float = 1.0) -> nnx.Module:
    """Set the strength (multiplier of every effective scale) of all applied modules.

    Merged modules must be unmerged first. Under ``nnx.jit`` a new strength retraces once.
    """
    strength = core.check_strength(strength)
    wrappers = _wrappers(model)
    merged = [w.adapter_name for _, w in wrappers if w.merged]
    if merged:
        raise LoraError(f"cannot change the strength of merged modules ({', '.join(merged)}); "
                        "unmerge first")
    for _, wrapper in wrappers:
        wrapper.strength = strength
    return model
