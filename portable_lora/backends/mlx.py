"""MLX adapter: put an :class:`~portable_lora.Adapter` on an ``mlx.nn`` model, or fold it in.

The same verbs as every framework module::

    apply(model, adapter, *, strength=1.0) -> model   # wrap layers: unmerged, trainable LoRA
    merge(model, adapter, *, strength=1.0)            # fold ΔW into the base weights
    unmerge(model, adapter)                           # undo a merge (see below)
    remove(model)                                     # unwrap every applied LoRA
    extract(model) -> Adapter                         # the applied (possibly trained) LoRA
    set_strength(model, strength)                     # rescale every applied LoRA

Module names are the dotted paths of ``model.named_modules()``, e.g.
``model.layers.0.self_attn.q_proj`` in an mlx-lm Llama. Layers: ``nn.Linear``,
``nn.QuantizedLinear``, ``nn.Embedding``, ``nn.QuantizedEmbedding`` (a tied output head
through ``as_linear`` included). All the math is :mod:`portable_lora.core`'s.

:func:`unmerge` gives a quantized layer back its original, bit for bit; a float layer's
weight comes back as W + ΔW − ΔW, each sum rounded once to the weight's dtype: to within a
rounding of the merged weight, not bit for bit. :func:`merge` refuses a float layer that the
model also reaches under another name which :func:`apply` would leave alone (one layer in two
places), unless ``allow_shared=True``; two adapter modules never map to one layer.

>>> import mlx.nn as nn
>>> from portable_lora import examples
>>> from portable_lora.mlx import apply, extract
>>> model = nn.Sequential(nn.Linear(8, 4))
>>> adapter = examples.random_adapter({"layers.0": (4, 8)}, rank=2)
>>> model = apply(model, adapter)          # base frozen, lora_A / lora_B trainable
>>> sorted(extract(model)) == ["layers.0"]
True

Factors keep the adapter's dtype (float64 becomes float32: MLX has float64 on the CPU only)
unless ``apply(..., dtype=...)`` says otherwise; each wrapper returns the dtype its base layer
returns. ``strength`` multiplies ΔW (for DoRA inside the norm: the magnitude stays). It is
a Python float, so a function already traced by ``mx.compile`` keeps the strength it was
traced with: compile again after :func:`set_strength`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..core._mlx_compat import namespace as _mlx_namespace
from ..errors import LoraError
from . import _merged

_XP = _mlx_namespace()  # resolved once: the hot path passes it to the core

__all__ = ["apply", "merge", "unmerge", "remove", "extract", "set_strength", "LoraLinear",
           "LoraEmbedding", "RequantizationWarning", "to_mlx", "to_numpy"]

_LINEAR = (nn.Linear, nn.QuantizedLinear)
_EMBEDDING = (nn.Embedding, nn.QuantizedEmbedding)
_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
_LAYERS = {"linear": _LINEAR, "embedding": _EMBEDDING}


class RequantizationWarning(UserWarning):
    """Re-quantizing a merged layer erased part of ΔW.

    ``erased`` maps module names to ‖W'_q − (W + ΔW)‖ / ‖ΔW‖ (0 = kept, 1 = all of it lost).
    """

    def __init__(self, message: str, erased: dict[str, float]):
        super().__init__(message)
        self.erased = erased


# -- arrays across the boundary ------------------------------------------------------------

def to_mlx(array: np.ndarray, dtype: Any = None) -> mx.array:
    """A NumPy array as an ``mx.array``: bfloat16 stays bfloat16, float64 becomes float32."""
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    out = mx.array(array)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


def to_numpy(array: mx.array) -> np.ndarray:
    """An ``mx.array`` as NumPy, exactly (bfloat16 as ``ml_dtypes.bfloat16``)."""
    if array.dtype == mx.bfloat16:
        # NumPy cannot read MLX's bf16 buffer; bf16 → f32 → bf16 is exact
        return np.array(array.astype(mx.float32)).astype(ml_dtypes.bfloat16)
    return np.array(array)


# -- layers ---------------------------------------------------------------------------------

def _weight_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, (num_embeddings, dim) of an embedding; unpacks quantized."""
    rows, cols = layer.weight.shape
    if isinstance(layer, _QUANTIZED):
        cols = cols * 32 // layer.bits  # packed into uint32
    return int(rows), int(cols)


def _dense_weight(layer: nn.Module) -> mx.array:
    if isinstance(layer, _QUANTIZED):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return layer.weight


def _as_dtype(x: mx.array, dtype: Any) -> mx.array:
    # factors in another dtype than the base (float32 LoRA on a bf16 model) promote the sum;
    # the wrapper returns what the base layer alone would
    return x if x.dtype == dtype else x.astype(dtype)


class _LoraLayer(nn.Module):
    """A frozen ``base`` layer plus trainable ``lora_A`` (r, in), ``lora_B`` (out, r).

    The canonical orientation, unlike mlx-lm's ``lora_a`` (in, r) / ``lora_b`` (r, out): the
    names differ so that the two layouts are never confused. ``alpha`` and ``rule`` are the
    adapter's; ``scale`` is their effective scale times ``strength``.
    """

    kind = "linear"

    def __init__(self, base: nn.Module, module: LoraModule, *, strength: float = 1.0,
                 dtype: Any = None):
        super().__init__()
        self.base = base
        self.lora_A = to_mlx(module.A, dtype)
        self.lora_B = to_mlx(module.B, dtype)
        if module.magnitude is not None:
            self.magnitude = to_mlx(module.magnitude, dtype)
        self.alpha = float(module.alpha)
        self.rule = module.rule
        self.set_strength(strength)

    @property
    def lora_keys(self) -> list[str]:
        """The trainable parameters of this layer."""
        return [k for k in ("lora_A", "lora_B", "magnitude") if k in self]

    def set_strength(self, strength: float) -> None:
        """Scale ΔW by ``strength`` (the stored alpha and rule are unchanged)."""
        self.strength = core.check_strength(strength)
        # the rank is fixed for the life of the layer, so the scale is computed once here
        self.scale = core.effective_scale(self.alpha, int(self.lora_A.shape[0]), self.rule) * self.strength

    def to_module(self) -> LoraModule:
        """The current factors as a :class:`LoraModule` (strength not folded in)."""
        magnitude = to_numpy(self.magnitude) if "magnitude" in self else None
        return LoraModule(to_numpy(self.lora_A), to_numpy(self.lora_B), alpha=self.alpha,
                          rule=self.rule, kind=self.kind, magnitude=magnitude)

    def _extra_repr(self) -> str:
        return (f"rank={self.lora_A.shape[0]}, alpha={self.alpha:g}, rule={self.rule!r}, "
                f"strength={self.strength:g}{', dora' if 'magnitude' in self else ''}")


class LoraLinear(_LoraLayer):
    """LoRA (or DoRA, with ``magnitude``) on an ``nn.Linear`` or ``nn.QuantizedLinear``.

    The base runs as it is (quantized matmul included); DoRA needs the dense weight and
    dequantizes a quantized base on each call, as mlx-lm's ``DoRALinear`` does.
    """

    kind = "linear"

    def __call__(self, x: mx.array) -> mx.array:
        if "magnitude" not in self:
            base_out = self.base(x)
            out = core.add_lora_output(base_out, x, self.lora_A, self.lora_B, self.scale, xp=_XP)
            return _as_dtype(out, base_out.dtype)
        weight = _dense_weight(self.base)
        out = core.dora_forward(x, weight, self.lora_A, self.lora_B, self.scale, self.magnitude,
                                self.base.get("bias"), xp=_XP)
        return _as_dtype(out, mx.result_type(x, weight))


class LoraEmbedding(_LoraLayer):
    """LoRA on an ``nn.Embedding`` / ``nn.QuantizedEmbedding``: A (r, num_embeddings), B (dim, r).

    ``as_linear`` (a tied output head) uses the same ΔW, so lookup and head stay consistent.
    """

    kind = "embedding"

    def __call__(self, ids: mx.array) -> mx.array:
        base_out = self.base(ids)
        out = base_out + core.embedding_lora_output(ids, self.lora_A, self.lora_B, self.scale, xp=_XP)
        return _as_dtype(out, base_out.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        base_out = self.base.as_linear(x)
        # x @ (W + ΔW)ᵀ with ΔWᵀ = s·B@A (dim, num): a linear LoRA whose down projection is
        # Bᵀ (r, dim) and whose up projection is Aᵀ (num, r)
        out = core.add_lora_output(base_out, x, self.lora_B.T, self.lora_A.T, self.scale, xp=_XP)
        return _as_dtype(out, base_out.dtype)


_WRAPPERS = {"linear": LoraLinear, "embedding": LoraEmbedding}


# -- the model tree -------------------------------------------------------------------------

def _parent(root: nn.Module, name: str) -> tuple[Any, str]:
    """The container holding module ``name`` (a Module, dict or list) and its key there."""
    *path, last = name.split(".")
    parent = root
    for part in path:
        parent = parent[int(part)] if isinstance(parent, (list, tuple)) else parent[part]
    if isinstance(parent, tuple):
        raise LoraError(f"module {name!r} sits in a tuple, which cannot be changed in place; "
                        "hold the layers in a list", key=name)
    return parent, last


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, last = _parent(root, name)
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        parent[last] = new


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise LoraError(f"expected an mlx.nn.Module, found {type(model).__name__}", key="model")
    return model


def _applied(model: nn.Module) -> Iterator[tuple[str, _LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, _LoraLayer):
            yield name, module


def _lora_layers(model: nn.Module, verb: str) -> list[tuple[str, _LoraLayer]]:
    found = list(_applied(_check_model(model)))
    if not found:
        raise LoraError(f"{verb}: the model has no LoRA applied (apply() puts one on)", key="model")
    return found


def _targets(model: nn.Module, adapter: Adapter, verb: str) -> list[tuple[str, nn.Module, LoraModule]]:
    """(name, layer, module) for every adapter module, all checked before anything changes."""
    _check_model(model)
    if not isinstance(adapter, Adapter):
        raise LoraError(f"{verb}: expected a portable_lora.Adapter, found {type(adapter).__name__}",
                        key="adapter")
    layers = dict(model.named_modules())
    missing = [n for n in adapter if n not in layers]
    if missing:
        eligible = [n for n, m in layers.items() if isinstance(m, _LINEAR + _EMBEDDING)]
        shown = ", ".join(repr(n) for n in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise LoraError(f"{verb}: {len(missing)} adapter module(s) match no layer of the model: "
                        f"{shown}; the model's LoRA-able layers are named like "
                        f"{eligible[:4] or 'nothing (it has no Linear or Embedding layer)'}",
                        key=missing[0])
    wrapped = [n for n, m in layers.items() if isinstance(m, _LoraLayer)]
    out, seen = [], {}
    for name, module in adapter.items():
        layer = layers[name]
        first = seen.setdefault(id(layer), name)
        if first != name:  # as the NumPy and JAX backends: one module per layer
            raise LoraError(f"{verb}: modules {first!r} and {name!r} both map to one "
                            f"{type(layer).__name__} (a layer held under both names); an adapter "
                            "names each layer once", key=name)
        inside = [w for w in wrapped if name == w or name.startswith(w + ".")]
        if inside:
            raise LoraError(f"{verb}: module {name!r} already has a LoRA applied at {inside[0]!r}; "
                            "call remove(model) first (extract(model) keeps its weights)", key=name)
        accepted = _LAYERS.get(module.kind)
        if accepted is None:
            raise LoraError(f"{verb}: module {name!r} is a {module.kind} LoRA; the MLX adapter "
                            "supports linear and embedding LoRA", key=name)
        if not isinstance(layer, accepted):
            raise LoraError(f"{verb}: module {name!r} is a {module.kind} LoRA, which needs one of "
                            f"{', '.join('nn.' + t.__name__ for t in accepted)}; the model's layer "
                            f"is {type(layer).__name__}", key=name)
        found = _weight_shape(layer)
        if tuple(module.weight_shape) != found:
            raise LoraError(f"{verb}: module {name!r}: the adapter patches a weight of shape "
                            f"{list(module.weight_shape)} (A {list(module.A.shape)}, B "
                            f"{list(module.B.shape)}); the model's {type(layer).__name__} weight "
                            f"is {list(found)}", key=name)
        _parent(model, name)  # a layer that cannot be replaced fails here, before any change
        out.append((name, layer, module))
    return out


# -- apply / remove / extract / set_strength -------------------------------------------------

@dataclass
class _Applied:
    # what extract() reports besides the factors (the applied adapter's description), and
    # the weights apply() froze, which remove() unfreezes
    base_model: str | None
    provenance: dict[str, Any]
    froze: list[tuple[nn.Module, list[str]]] = field(default_factory=list)


def _trainable_weights(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """(module, its own trainable array keys) for every module that has some."""
    out = []
    for _, module in model.named_modules():
        trainable = module.trainable_parameters()
        keys = [k for k, v in module.items() if isinstance(v, mx.array) and k in trainable]
        if keys:
            out.append((module, keys))
    return out


def apply(model: nn.Module, adapter: Adapter, *, strength: float = 1.0, dtype: Any = None) -> nn.Module:
    """Wrap every layer named in ``adapter`` with an unmerged LoRA; returns ``model``.

    The model is frozen (``model.freeze()``) and only the LoRA parameters (``lora_A``,
    ``lora_B``, DoRA's ``magnitude``, of every applied LoRA) are unfrozen, as mlx-lm does
    for training; :func:`remove` unfreezes what this froze.
    ``dtype`` (an ``mx.Dtype``) converts the factors; by default they keep the adapter's.
    Nothing changes when any module fails its checks.
    """
    strength = core.check_strength(strength)
    if dtype is not None and not isinstance(dtype, mx.Dtype):
        raise LoraError(f"apply: dtype must be an mlx.core.Dtype such as mx.float32, found {dtype!r}",
                        key="dtype")
    targets = _targets(model, adapter, "apply")
    trainable = _trainable_weights(model)
    for name, layer, module in targets:
        _set_child(model, name, _WRAPPERS[module.kind](layer, module, strength=strength, dtype=dtype))
    model.freeze()
    for _, wrapper in _applied(model):  # a LoRA applied earlier stays trainable too
        wrapper.unfreeze(keys=wrapper.lora_keys, recurse=False)
    record = vars(model).get("_portable_lora_applied")
    if record is None:
        model._portable_lora_applied = _Applied(adapter.base_model, dict(adapter.provenance), trainable)
    else:  # a second adapter on other layers: the first one's description stays
        record.froze.extend(trainable)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Put every wrapped layer's base back (the same objects); returns ``model``.

    Weights that :func:`apply` froze are unfrozen; those frozen before stay frozen.
    """
    for name, wrapper in _lora_layers(model, "remove"):
        _set_child(model, name, wrapper.base)
    record = vars(model).pop("_portable_lora_applied", None)
    for module, keys in record.froze if record is not None else ():
        module.unfreeze(keys=keys, recurse=False)
    return model


def extract(model: nn.Module) -> Adapter:
    """The LoRA applied to ``model`` (trained or not) as an :class:`Adapter`, factors exact.

    Alpha and rule are those applied; the strength is not folded in.
    """
    layers = _lora_layers(model, "extract")
    applied = vars(model).get("_portable_lora_applied") or _Applied(None, {})
    provenance = {"source_format": "mlx", "created_by": "portable_lora.mlx.extract"}
    if applied.provenance:
        provenance["applied_from"] = applied.provenance
    return Adapter({name: wrapper.to_module() for name, wrapper in layers},
                   base_model=applied.base_model, provenance=provenance)


def set_strength(model: nn.Module, strength: float) -> nn.Module:
    """Set the strength of every applied LoRA: ΔW is multiplied by ``strength``.

    0 gives the base model's output for LoRA. For DoRA the magnitude still applies (as with
    PEFT's scale), so strength 0 gives ``m · W/‖W‖``, not W: use :func:`remove` for the base.
    """
    strength = core.check_strength(strength)
    for _, wrapper in _lora_layers(model, "set_strength"):
        wrapper.set_strength(strength)
    return model


# -- merge / unmerge --------------------------------------------------------------------------

@dataclass
class _Merged:
    identity: _merged.Identity     # which adapter module, under which name
    strength: float
    weight_norm: mx.array | None   # DoRA: ‖W + ΔW‖ before the merge, needed to undo it
    original: nn.Module | None     # a quantized layer replaced by the merge, restored as it was


@dataclass
class _MergeLog:
    # a plain object, so that mlx.nn.Module does not take the records for parameters
    entries: list[_Merged] = field(default_factory=list)


def _log(layer: nn.Module) -> _MergeLog:
    log = vars(layer).get("_portable_lora_merges")
    if log is None:
        log = _MergeLog()
        layer._portable_lora_merges = log
    return log


def _factors(module: LoraModule) -> tuple[mx.array, mx.array, mx.array | None]:
    magnitude = None if module.magnitude is None else to_mlx(module.magnitude)
    return to_mlx(module.A), to_mlx(module.B), magnitude


def _float_layer(quantized: nn.Module, weight: mx.array) -> nn.Module:
    rows, cols = weight.shape
    if isinstance(quantized, nn.QuantizedEmbedding):
        layer = nn.Embedding(rows, cols)
    else:
        layer = nn.Linear(cols, rows, bias="bias" in quantized)
        if "bias" in quantized:
            layer.bias = quantized.bias
    layer.weight = weight
    trainable = quantized.trainable_parameters()  # a quantized weight is frozen: keep it so
    layer.freeze(keys=[k for k in ("weight", "bias") if k in layer and k not in trainable],
                 recurse=False)
    return layer


def _requantized(layer: nn.Module, like: nn.Module) -> nn.Module:
    if isinstance(like, nn.QuantizedEmbedding):
        return nn.QuantizedEmbedding.from_embedding(layer, like.group_size, like.bits, mode=like.mode)
    return nn.QuantizedLinear.from_linear(layer, like.group_size, like.bits, mode=like.mode)


def _norm(x: mx.array) -> float:
    return float(mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)))))


def _through(model: nn.Module, path: str, parent: Any, key: str) -> bool:
    """Whether the module path ``path`` goes through ``parent[key]``, the slot that
    :func:`apply` (and the merge of a quantized layer) replaces."""
    node = model
    for part in path.split("."):
        if node is parent and part == key:
            return True
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return False


def _check_unshared(model: nn.Module, targets: list[tuple[str, nn.Module, LoraModule]], verb: str) -> None:
    """Refuse to merge into a float layer that the model also reaches under another name which
    :func:`apply` would not change (the layer held in two places): the merged weight would
    show there too. (A quantized layer is replaced in its slot, as apply() replaces it.)"""
    floats = {id(layer): name for name, layer, _ in targets if not isinstance(layer, _QUANTIZED)}
    if not floats:
        return
    names: dict[int, list[str]] = {}
    for path, layer in model.named_modules():
        if id(layer) in floats:
            names.setdefault(id(layer), []).append(path)
    for key, found in names.items():
        if len(found) < 2:
            continue
        name = floats[key]
        parent, last = _parent(model, name)
        others = [p for p in found if not _through(model, p, parent, last)]
        if others:
            raise _merged.shared_weight_error(f"{verb}:", name, others[0])


def merge(model: nn.Module, adapter: Adapter, *, strength: float = 1.0,
          requantize: bool = False, allow_shared: bool = False) -> nn.Module:
    """Fold ΔW (times ``strength``) into the base weights of ``model``; returns ``model``.

    Float layers are updated in place, accumulating in float32 and rounding once. A quantized
    layer is dequantized (``mx.dequantize``) into a float ``nn.Linear`` / ``nn.Embedding``;
    with ``requantize=True`` it is quantized again with the same group size, bits and mode,
    and a :class:`RequantizationWarning` says how much of ΔW that erased. :func:`unmerge`
    undoes a merge: a quantized layer gets its original back, bit for bit; a float layer's
    weight comes back to within a rounding of the merged one.

    A float layer that the model also holds under another name which :func:`apply` would
    leave alone (``model.a = model.b = layer``, the adapter naming ``a``) is refused, naming
    both, and nothing changes: merging would change ``b`` too. ``allow_shared=True`` merges
    into it anyway, so every name sees the merged weight.
    """
    strength = core.check_strength(strength)
    targets = _targets(model, adapter, "merge")
    if not allow_shared:
        _check_unshared(model, targets, "merge")
    erased: dict[str, float] = {}
    described: dict[str, str] = {}
    for name, layer, module in targets:
        A, B, magnitude = _factors(module)
        scale = module.scale * strength
        weight = _dense_weight(layer)
        norm = None if magnitude is None else core.dora_weight_norm(weight, A, B, scale, module.kind)
        merged = core.merge_into(weight, A, B, scale, module.kind, magnitude=magnitude)
        quantized = isinstance(layer, _QUANTIZED)
        if quantized:
            target = _float_layer(layer, merged)
            if requantize:
                target = _requantized(target, layer)
                change = _norm(merged.astype(mx.float32) - weight.astype(mx.float32))
                lost = _norm(_dense_weight(target).astype(mx.float32) - merged.astype(mx.float32))
                erased[name] = lost / change if change > 0 else 0.0
                described[name] = f"{layer.bits}-bit, group size {layer.group_size}"
            _set_child(model, name, target)
        else:
            layer.weight = merged
            target = layer
        mx.eval(target.parameters())  # materialise now, releasing the old weight's graph
        _log(target).entries.append(_Merged(_merged.Identity(name, module), strength, norm,
                                            layer if quantized else None))
    if requantize and not erased:
        warnings.warn("merge(requantize=True): none of the merged layers was quantized, so "
                      "nothing was re-quantized", UserWarning, stacklevel=2)
    if erased:
        worst = max(erased, key=erased.__getitem__)
        total = sum(erased.values()) / len(erased)
        warnings.warn(RequantizationWarning(
            f"re-quantizing {len(erased)} merged layer(s) erased on average {total:.1%} of the "
            f"adapter's change (‖W'_q − (W+ΔW)‖/‖ΔW‖); worst {worst!r} ({described[worst]}): "
            f"{erased[worst]:.1%}. merge without requantize keeps the adapter exact in a float "
            "layer", erased), stacklevel=2)
    return model


def unmerge(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Undo :func:`merge` of ``adapter`` (merged last into each of its layers); returns ``model``.

    Uses the strength (and, for DoRA, the weight norm) recorded at merge time. A quantized
    layer gets its original back, bit for bit; a float weight comes back to within a rounding
    of the merged one. A model whose merge was not done by :func:`merge` in this process
    cannot be unmerged: the record is gone.
    """
    targets = _targets(model, adapter, "unmerge")
    for name, layer, module in targets:
        entries = _log(layer).entries
        if not entries:
            raise LoraError(f"unmerge: module {name!r} has no LoRA merged by portable_lora.mlx.merge "
                            "(never merged, already unmerged, or merged in another process)", key=name)
        _merged.check_last(entries[-1].identity, name, module)  # the reverse order of merging
    for name, layer, module in targets:
        record = _log(layer).entries.pop()
        if record.original is not None:
            _set_child(model, name, record.original)
            continue
        A, B, magnitude = _factors(module)
        layer.weight = core.unmerge_from(layer.weight, A, B, module.scale * record.strength,
                                         module.kind, magnitude=magnitude,
                                         weight_norm=record.weight_norm)
        mx.eval(layer.weight)
    return model
