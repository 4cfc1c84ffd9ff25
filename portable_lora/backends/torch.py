"""PyTorch: LoRA on ``torch.nn`` models, unmerged (wrapped layers) or merged into the weights.

Every number is computed by :mod:`portable_lora.core`; this module only finds layers, moves
arrays across the NumPy/torch boundary and runs the convolutions that are torch's own.

Verbs (the same in :mod:`portable_lora.jax` and :mod:`portable_lora.mlx`):

* :func:`apply` swaps each targeted layer for a :class:`LoraLayer` wrapper whose forward adds
  the unmerged LoRA term; the factors are trainable ``nn.Parameter`` s.
* :func:`merge` / :func:`unmerge` write ΔW into plain layers' weights in place, and take it out.
* :func:`remove` puts the original layers back; :func:`extract` reads the (trained) factors
  back as an :class:`~portable_lora.Adapter`; :func:`set_strength` rescales without re-wrapping.

Module names are the model's ``named_modules()`` names, exactly (``"model.layers.0.self_attn.q_proj"``);
prefixes such as PEFT's ``base_model.model.`` are the formats layer's business.

Layers: ``nn.Linear`` and ``nn.Conv2d`` (DoRA on both), ``nn.Embedding``, and transformers'
GPT-2 ``Conv1D`` (weight stored (in, out), merged with ``transposed=True``). A conv LoRA's A is
a real convolution run with the base layer's stride, padding, dilation and padding mode (so
the unmerged forward equals the merged one); B is 1×1.

Dtype and device: the factors are created on the base weight's device, in the base weight's
dtype unless ``apply(..., dtype=torch.float32)`` says otherwise (e.g. float32 factors on a
bfloat16 model for training; the input is then cast to the factors' dtype for the LoRA term and
the term back to the output's dtype). Forward reads the factors' dtype on each call, so
factors cast after :func:`apply` (``p.data = p.data.float()``) work the same way.

Shared weights: :func:`merge` refuses to write into a weight that the model also reaches under
another name which :func:`apply` would leave alone (a tied input embedding and output head, a
layer registered twice), since the merged model would then differ from the applied one;
``merge(..., allow_shared=True)`` merges into the shared weight anyway. Two adapter modules
never map to one layer, nor (merge, unmerge) to one weight.

``torch.compile(model, fullgraph=True)`` traces through the wrappers with no graph break: every
core call gets the torch namespace, resolved once at import, as ``xp=``, so a compiled graph
holds only torch ops, and for a 16-bit CUDA ``nn.Linear`` layer in inference (where triton is
installed) one op of this library's, ``torch.ops.portable_lora.linear_lora``: the fused Triton
forward the eager layer runs (see :mod:`portable_lora.core._triton_linear`).

>>> import torch
>>> import portable_lora as pl
>>> from portable_lora import torch as plt
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> adapter = pl.examples.random_adapter({"0": (3, 4)}, rank=2)
>>> model = plt.apply(model, adapter)
>>> model(torch.ones(1, 4)).shape
torch.Size([1, 3])
>>> sorted(plt.extract(model))
['0']
>>> plt.remove(model)[0]
Linear(in_features=4, out_features=3, bias=True)
"""

from __future__ import annotations

import collections
import difflib
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..adapter import Adapter, LoraModule
from ..core import _triton_linear
from ..core import namespace as _namespace
from ..errors import LoraError
from . import _merged

__all__ = ["apply", "merge", "unmerge", "remove", "extract", "set_strength", "LoraLayer",
           "LoraLinear", "LoraConv1D", "LoraConv2d", "LoraEmbedding", "to_torch", "to_numpy"]

# plain attributes kept on models and layers (never in a state_dict)
_FROZEN_ATTR = "_portable_lora_frozen"   # on the root model: parameters apply() froze
_MERGES_ATTR = "_portable_lora_merges"   # on a merged layer: a stack of _MergeRecord


# -- the NumPy <-> torch boundary ----------------------------------------------------------------

def to_torch(array: Any, *, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A NumPy array (bfloat16 through ``ml_dtypes`` included) as a torch tensor (a copy)."""
    array = np.asarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        # torch cannot read ml_dtypes' bfloat16: move the same 16 bits through int16
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.to(device=device, dtype=dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as a NumPy array in the same dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


# the core's namespace for torch tensors, resolved once: hot paths pass it as ``xp=`` instead of
# looking it up on every call (a few µs each, and a call dynamo cannot trace on nn.Parameter)
_XP = _namespace.array_namespace(torch.empty(0))

# the core's fused LoRA linear forward for torch (capabilities.linear_lora), resolved once:
# called with (x, W, A, B, scale, bias), it returns the layer's output, or None where it does
# not apply (then the unfused path runs)
_LINEAR_LORA = core.capabilities.resolve("linear_lora", _XP)

# the process-wide module hooks nn.Module.__call__ honours (dicts, mutated in place)
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks"))


def _runs_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer(x)`` would run exactly ``F.linear(x, layer.weight, layer.bias)``.

    A plain ``nn.Linear`` (not a subclass such as a quantized layer), with no hooks of its
    own or global ones and no per-instance ``forward`` (accelerate's offload hooks replace
    it): calling ``F.linear`` directly then skips ``nn.Module.__call__``, which costs more on
    the host than the whole LoRA term at small T.
    """
    return (type(layer) is nn.Linear and "forward" not in layer.__dict__
            and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks or any(_GLOBAL_HOOKS)))


# -- torch.compile support ---------------------------------------------------------------------------

# torch.ops.portable_lora.linear_lora: under torch.compile the fused forward is one opaque op in
# the graph (it runs the Triton kernel where the eager layer would, the unfused ops elsewhere);
# defined here, with torch already imported, so that no trace ever has to define it (a no-op
# where triton is not installed or PORTABLE_LORA_TRITON=0)
_triton_linear.register_op()

# -- the wrapper layers ---------------------------------------------------------------------------------

class LoraLayer(nn.Module):
    """A base layer plus trainable LoRA factors; forward adds the unmerged LoRA term.

    Parameters: ``lora_A`` (r, in, ...), ``lora_B`` (out, r, ...), and ``lora_magnitude``
    (out,) for DoRA (else ``None``); the base layer is ``base``. ``scale`` is the effective
    scale of (``alpha``, rank, ``rule``) times ``strength``: change it with
    :func:`set_strength`. Subclasses say which layers they wrap and how the term is computed.
    """

    kind = "linear"

    def __init__(self, base: nn.Module, module: LoraModule, *, strength: float = 1.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        weight = base.weight
        factor_dtype = weight.dtype if dtype is None else dtype
        self.lora_A = nn.Parameter(to_torch(module.A, device=weight.device, dtype=factor_dtype))
        self.lora_B = nn.Parameter(to_torch(module.B, device=weight.device, dtype=factor_dtype))
        magnitude = None
        if module.magnitude is not None:
            magnitude = nn.Parameter(to_torch(module.magnitude, device=weight.device, dtype=factor_dtype))
        self.register_parameter("lora_magnitude", magnitude)
        self.alpha = module.alpha
        self.rule = module.rule
        self.set_strength(strength)

    # -- state ---------------------------------------------------------------------------
    def set_strength(self, strength: float) -> None:
        """Scale the LoRA term by ``strength`` without touching the factors.

        0 turns the LoRA term off; a DoRA layer still rescales by ``m / ‖W‖`` then.
        """
        self.strength = core.check_strength(strength)
        self.scale = core.effective_scale(self.alpha, self.lora_A.shape[0], self.rule) * self.strength

    def lora_module(self) -> LoraModule:
        """The current factors as a :class:`LoraModule` (NumPy, in the factors' dtype)."""
        magnitude = None if self.lora_magnitude is None else to_numpy(self.lora_magnitude)
        return LoraModule(to_numpy(self.lora_A), to_numpy(self.lora_B), alpha=self.alpha,
                          rule=self.rule, kind=self.kind, magnitude=magnitude)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return (f"rank={self.lora_A.shape[0]}, alpha={self.alpha:g}, rule={self.rule!r}, "
                f"strength={self.strength:g}{dora}")

    # -- what subclasses provide -----------------------------------------------------------
    def weight_oi(self) -> torch.Tensor:
        """The base weight in the canonical layout ΔW has: (out, in, ...)."""
        return self.base.weight

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """``scale · B(A(x))`` in the factors' dtype."""
        return core.lora_output(x, self.lora_A, self.lora_B, self.scale)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------------
    def _factor_input(self, x: torch.Tensor) -> torch.Tensor:
        # the factors' dtype now, not at apply time: they may have been cast since (float32
        # factors on a bfloat16 model for training)
        dtype = self.lora_A.dtype
        return x if x.dtype is dtype else x.to(dtype)

    def _dora(self, x: torch.Tensor) -> torch.Tensor:
        # m/‖W + ΔW‖ from the core; the layer's own ops give x·W and the LoRA term
        factor = core.dora_factor(self.weight_oi(), self.lora_A, self.lora_B, self.scale,
                                  self.lora_magnitude, self.kind, xp=_XP)
        out = self.base_without_bias(x)
        out = out + self.lora_term(self._factor_input(x)).to(out.dtype)
        out = out * factor.to(out.dtype).reshape(self._channel_shape(out))
        bias = self.base.bias
        return out if bias is None else out + bias.reshape(self._channel_shape(out))

    def _channel_shape(self, out: torch.Tensor) -> tuple[int, ...]:
        return (-1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None:
            return self._dora(x)
        out = self.base(x)
        return out + self.lora_term(self._factor_input(x)).to(out.dtype)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear``: ``base(x) + scale · (x Aᵀ) Bᵀ`` through the core's fused add."""

    def base_without_bias(self, x):
        return F.linear(x, self.base.weight)

    def forward(self, x):
        # parameters and the base straight from nn.Module's dicts: each attribute that goes
        # through nn.Module.__getattr__ costs about a µs on the host, as much as a kernel
        # launch, and this path reads seven of them
        params = self._parameters
        A, B, magnitude = params["lora_A"], params["lora_B"], params["lora_magnitude"]
        # the dtypes as they are now (factors may be cast after apply): the ops below take
        # one dtype; factors in another go through LoraLayer.forward, which casts around them
        dtype = x.dtype
        if A.dtype is dtype and B.dtype is dtype and (magnitude is None or magnitude.dtype is dtype):
            base = self._modules["base"]
            if magnitude is None:
                if _runs_plain_linear(base):
                    weights = base._parameters
                    weight, bias = weights["weight"], weights["bias"]
                    if _LINEAR_LORA is not None:
                        # the whole layer in one fused call where it applies (16-bit CUDA
                        # inference: one kernel launch), else None and the unfused ops below
                        out = _LINEAR_LORA(x, weight, A, B, self.scale, bias)
                        if out is not None:
                            return out
                    # F.linear's output is ours alone: the LoRA term may be added into it
                    return core.add_lora_output(F.linear(x, weight, bias), x, A, B, self.scale, xp=_XP,
                                                overwrite=True)
                return core.add_lora_output(base(x), x, A, B, self.scale, xp=_XP)
            return core.dora_forward(x, self.weight_oi(), A, B, self.scale, magnitude, base.bias, xp=_XP)
        return super().forward(x)


class LoraConv1D(LoraLinear):
    """LoRA on transformers' GPT-2 ``Conv1D``, whose weight is stored (in, out)."""

    def weight_oi(self):
        return self.base.weight.T

    def base_without_bias(self, x):
        return x @ self.base.weight


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a convolution with the base's geometry, B a 1×1 convolution."""

    kind = "conv"

    def base_without_bias(self, x):
        return self.base._conv_forward(x, self.base.weight, None)

    def lora_term(self, x):
        # the base's _conv_forward applies its stride, padding, dilation and padding mode
        hidden = self.base._conv_forward(x, self.lora_A, None) * self.scale
        return F.conv2d(hidden, self.lora_B)

    def _channel_shape(self, out):
        return (1, -1) + (1,) * (out.ndim - 2)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: the base lookup unchanged, plus ``scale · A[:, ids]ᵀ Bᵀ``.

    The base keeps its ``padding_idx``/``max_norm`` semantics. As in PEFT, A's ``padding_idx``
    column gets no gradient; unlike PEFT, ``max_norm`` does not renormalise A in place. A
    scaled embedding (an ``embed_scale`` attribute: a tensor in Gemma, a Python float in
    BART, M2M100, BioGPT, Blenderbot) scales the LoRA term too, as it scales the merged table.
    """

    kind = "embedding"

    def __init__(self, base, module, *, strength=1.0, dtype=None):
        super().__init__(base, module, strength=strength, dtype=dtype)
        pad = base.padding_idx
        keep = None
        if pad is not None:
            keep = torch.ones(1, base.num_embeddings, dtype=torch.bool, device=base.weight.device)
            keep[0, pad] = False
        self.register_buffer("trainable_columns", keep, persistent=False)

    def lora_term(self, ids):
        A = self.lora_A
        if self.trainable_columns is not None and A.requires_grad and torch.is_grad_enabled():
            A = torch.where(self.trainable_columns, A, A.detach())
        out = core.embedding_lora_output(ids, A, self.lora_B, self.scale, xp=_XP)
        embed_scale = getattr(self.base, "embed_scale", None)
        if embed_scale is None:
            return out
        if isinstance(embed_scale, torch.Tensor):
            embed_scale = embed_scale.to(out.dtype)
        return out * embed_scale

    def forward(self, ids):
        out = self.base(ids)
        return out + self.lora_term(ids).to(out.dtype)


# -- which wrapper fits which layer (first match wins) ----------------------------------------------------

def _is_transformers_conv1d(layer: nn.Module) -> bool:
    # look in sys.modules, never import transformers to check
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(layer, utils.Conv1D)


# (predicate, wrapper, layer description, weight shape in the layout ΔW has)
_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer], str,
                      Callable[[nn.Module], tuple[int, ...]]]] = [
    (lambda m: isinstance(m, nn.Linear), LoraLinear, "Linear", lambda m: tuple(m.weight.shape)),
    (_is_transformers_conv1d, LoraConv1D, "transformers Conv1D", lambda m: tuple(m.weight.shape)[::-1]),
    (lambda m: isinstance(m, nn.Conv2d), LoraConv2d, "Conv2d", lambda m: tuple(m.weight.shape)),
    (lambda m: isinstance(m, nn.Embedding), LoraEmbedding, "Embedding", lambda m: tuple(m.weight.shape)),
]

_SUPPORTED = "nn.Linear, nn.Conv2d, nn.Embedding or transformers' Conv1D"


def _dispatch(name: str, layer: nn.Module, module: LoraModule):
    """The wrapper class for ``layer``, after checking the module's kind and shapes fit it."""
    for matches, wrapper, description, weight_shape in _DISPATCH:
        if not matches(layer):
            continue
        if module.kind != wrapper.kind:
            raise LoraError(f"module {name!r}: the adapter has a {module.kind!r} LoRA but the layer "
                            f"is a {description}, which takes kind {wrapper.kind!r}", key=name)
        expected = weight_shape(layer)
        if tuple(module.weight_shape) != expected:
            raise LoraError(f"module {name!r}: the {description} weight is {list(expected)} (out, in, ...) "
                            f"but the adapter's A {list(module.A.shape)} and B {list(module.B.shape)} "
                            f"give ΔW {list(module.weight_shape)}", key=name)
        if wrapper is LoraConv2d and layer.groups != 1:
            raise LoraError(f"module {name!r}: grouped convolutions (groups={layer.groups}) are not "
                            "supported", key=name)
        return wrapper
    raise LoraError(f"module {name!r} is a {type(layer).__name__}; LoRA applies to {_SUPPORTED}",
                    key=name)


# -- finding layers ----------------------------------------------------------------------------------------

def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _submodule(model: nn.Module, name: str, walked: dict[str, nn.Module]) -> nn.Module | None:
    """``model.get_submodule(name)`` or ``None``, remembering every prefix on the way in ``walked``.

    The adapters of a model share their prefixes ("model.layers.3.self_attn."), so a merge of
    hundreds of modules walks each prefix once, through ``_modules`` (``get_submodule`` costs a
    few µs per level); anything ``_modules`` does not hold goes to ``get_submodule``.
    """
    parent, _, child = name.rpartition(".")
    holder = walked.get(parent)
    if holder is None and parent:
        holder = _submodule(model, parent, walked)
    if holder is None:
        return None
    layer = holder._modules.get(child)
    if layer is None:
        try:
            layer = holder.get_submodule(child) if child else holder
        except AttributeError:
            return None
    walked[name] = layer
    return layer


def _resolve(model: nn.Module, adapter: Adapter, verb: str) -> dict[str, nn.Module]:
    """``{name: layer}`` for every adapter module, or one LoraError naming all that match nothing."""
    if not isinstance(model, nn.Module):
        raise LoraError(f"{verb}() needs a torch.nn.Module, found {type(model).__name__}")
    if not isinstance(adapter, Adapter):
        raise LoraError(f"{verb}() needs a portable_lora.Adapter, found {type(adapter).__name__}")
    if len(adapter) == 0:
        raise LoraError(f"{verb}(): the adapter has no modules")
    found, missing, seen = {}, [], {}
    walked: dict[str, nn.Module] = {"": model}
    for name in adapter:
        layer = _submodule(model, name, walked)
        if layer is None:
            missing.append(name)
            continue
        first = seen.setdefault(id(layer), name)
        if first != name:  # as the NumPy and JAX backends: one module per layer
            raise LoraError(f"{verb}(): modules {first!r} and {name!r} both map to one "
                            f"{type(layer).__name__} (a layer registered under both names); "
                            "an adapter names each layer once", key=name)
        found[name] = layer
    if missing:
        known = [n for n, _ in model.named_modules() if n]
        hint = difflib.get_close_matches(missing[0], known, n=1)
        hint_text = f" (did you mean {hint[0]!r} for {missing[0]!r}?)" if hint else ""
        raise LoraError(f"{len(missing)} adapter module(s) match no layer of the model: "
                        f"{', '.join(repr(m) for m in missing)}{hint_text}", key=missing[0])
    for name, layer in found.items():
        parent = walked[_split(name)[0]]
        if isinstance(layer, LoraLayer) or isinstance(parent, LoraLayer):
            raise LoraError(f"module {name!r} already has a LoRA applied; call remove(model) first",
                            key=name)
    return found


def _wrappers(model: nn.Module, verb: str) -> list[tuple[str, LoraLayer]]:
    if not isinstance(model, nn.Module):
        raise LoraError(f"{verb}() needs a torch.nn.Module, found {type(model).__name__}")
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not wrapped:
        raise LoraError(f"{verb}(): the model has no LoRA layers (apply() an adapter first)")
    return wrapped


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, child = _split(name)
    setattr(model.get_submodule(parent), child, layer)


# -- the verbs ------------------------------------------------------------------------------------------------

def apply(model: nn.Module, adapter: Adapter, *, strength: float = 1.0, freeze_base: bool = True,
          dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap every layer ``adapter`` names so its forward adds the unmerged LoRA; returns ``model``.

    ``freeze_base`` (default) sets ``requires_grad=False`` on every parameter of the model
    that is not a LoRA parameter, so an optimizer over ``model.parameters()`` trains only the
    factors; :func:`remove` restores the flags it changed. ``dtype`` is the factors' dtype
    (default: each base weight's dtype). Every module is checked before any layer changes.
    """
    strength = core.check_strength(strength)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoraError(f"dtype must be a floating torch.dtype, found {dtype!r}")
    layers = _resolve(model, adapter, "apply")
    wrappers = {name: _dispatch(name, layer, adapter[name]) for name, layer in layers.items()}
    for name, layer in layers.items():
        _replace(model, name, wrappers[name](layer, adapter[name], strength=strength, dtype=dtype))
    if freeze_base:
        lora = {id(p) for _, w in _wrappers(model, "apply") for p in _lora_parameters(w)}
        frozen = model.__dict__.setdefault(_FROZEN_ATTR, [])
        for parameter in model.parameters():
            if id(parameter) not in lora and parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen.append(parameter)
    return model


def _lora_parameters(wrapper: LoraLayer) -> Iterable[nn.Parameter]:
    return [p for p in (wrapper.lora_A, wrapper.lora_B, wrapper.lora_magnitude) if p is not None]


def remove(model: nn.Module) -> nn.Module:
    """Put back every layer :func:`apply` wrapped (the same objects) and unfreeze what it froze."""
    for name, wrapper in _wrappers(model, "remove"):
        _replace(model, name, wrapper.base)
    for parameter in model.__dict__.pop(_FROZEN_ATTR, []):
        parameter.requires_grad_(True)
    return model


def set_strength(model: nn.Module, strength: float) -> nn.Module:
    """Set the strength of every LoRA layer (0: no LoRA term, 2: twice the term).

    Under ``torch.compile`` a new strength is picked up by a recompile (the scale is traced
    as a constant).
    """
    strength = core.check_strength(strength)
    for _, wrapper in _wrappers(model, "set_strength"):
        wrapper.set_strength(strength)
    return model


def extract(model: nn.Module) -> Adapter:
    """The LoRA layers' current factors as an :class:`Adapter` (names, alpha and rule kept)."""
    return Adapter({name: wrapper.lora_module() for name, wrapper in _wrappers(model, "extract")},
                   base_model=None, provenance={"source_format": "torch",
                                                "created_by": "portable_lora.torch.extract"})


# every merge of this process, numbered: of two layers holding one (tied) weight, which one
# had the last merge into it
_MERGE_ORDER = itertools.count()


class _MergeRecord:
    """What :func:`unmerge` needs: the scale used, DoRA's ‖W + ΔW‖ taken before the merge,
    which adapter module was merged under which name (``_merged.Identity``), and when."""

    __slots__ = ("scale", "weight_norm", "identity", "order")

    def __init__(self, scale: float, weight_norm: torch.Tensor | None, name: str, module: LoraModule):
        self.scale, self.weight_norm, self.identity = scale, weight_norm, _merged.Identity(name, module)
        self.order = next(_MERGE_ORDER)


def _check_last(layer: nn.Module, name: str, module: LoraModule) -> None:
    # merges come back in the reverse order of merging, each by its own adapter
    records = layer.__dict__.get(_MERGES_ATTR)
    _merged.check_last(records[-1].identity if records else None, name, module)


# -- weights the model holds in more than one place ----------------------------------------------------

def _weight_holders(model: nn.Module, weights: set[int]) -> tuple[bool, dict[int, list[nn.Module]]]:
    """One pass over the model's modules, each once (about 0.3 ms for a 32-layer Llama on the
    host): whether any module is registered in more than one place, and for each weight in
    ``weights`` (ids) the modules whose parameters hold it."""
    holders: dict[int, list[nn.Module]] = {}
    seen, stack, registered_twice = {id(model)}, [model], False
    while stack:
        module = stack.pop()
        for child in module._modules.values():
            if child is None:
                continue
            if id(child) in seen:
                registered_twice = True
                continue
            seen.add(id(child))
            stack.append(child)
        for parameter in module._parameters.values():
            if parameter is not None and id(parameter) in weights:
                holders.setdefault(id(parameter), []).append(module)
    return registered_twice, holders


def _through(model: nn.Module, path: str, parent: nn.Module, child: str) -> bool:
    """Whether the module path ``path`` goes through ``parent``'s child ``child``, the slot that
    :func:`apply` replaces."""
    node = model
    for part in path.split(".") if path else ():
        if node is parent and part == child:
            return True
        node = node._modules[part]
    return False


def _check_unshared(model: nn.Module, layers: dict[str, nn.Module], verb: str) -> None:
    """Refuse to merge into a weight that the model also reaches under another name which
    :func:`apply` would not change (a tied embedding and output head, a layer registered twice):
    the merged model would differ from the applied one there."""
    weights = {id(layer.weight) for layer in layers.values()}
    registered_twice, holders = _weight_holders(model, weights)
    if not registered_twice and all(len(found) == 1 for found in holders.values()):
        return  # each weight held once, by one module reachable one way (almost every model)
    paths: dict[int, list[str]] = {}  # each target weight's holders, by every name
    for path, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None and id(parameter) in weights:
                paths.setdefault(id(parameter), []).append(path)
    for name, layer in layers.items():
        parent, child = _split(name)
        parent_module = model.get_submodule(parent)
        others = [p for p in paths.get(id(layer.weight), ()) if not _through(model, p, parent_module, child)]
        if others:
            raise _merged.shared_weight_error(f"{verb}():", name, others[0])


def _check_one_per_weight(layers: dict[str, nn.Module], verb: str) -> None:
    """Refuse two adapter modules on one weight (two layers holding a tied weight): as the
    NumPy and JAX backends, one module per weight."""
    seen: dict[int, str] = {}
    for name, layer in layers.items():
        first = seen.setdefault(id(layer.weight), name)
        if first != name:
            hint = ("one merge cannot give them different ΔW: untie the weights, or merge one of them "
                    "(allow_shared=True)" if verb == "merge" else
                    "unmerge them one at a time, in the reverse order of merging")
            raise LoraError(f"{verb}(): modules {first!r} and {name!r} both map to one weight (tied "
                            f"weights); {hint}", key=name)


def _check_last_of_weight(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Refuse to unmerge from a layer whose weight another layer holds too (tied) when that
    other layer had a LoRA merged into the weight after it: the reverse order of merging holds
    per weight, whichever layer each merge went through."""
    _, holders = _weight_holders(model, {id(layer.weight) for layer in layers.values()})
    for name, layer in layers.items():
        mine = layer.__dict__[_MERGES_ATTR][-1].order  # checked: the layer has this merge
        for other in holders.get(id(layer.weight), ()):
            records = other.__dict__.get(_MERGES_ATTR) if other is not layer else None
            if records and records[-1].order > mine:
                other_name = next(n for n, m in model.named_modules(remove_duplicate=False) if m is other)
                raise _merged.later_merge_error("unmerge():", name, other_name)


def _upload(array: Any, device: torch.device) -> torch.Tensor:
    # non_blocking: a copy from pageable host memory is staged before the call returns (the
    # host copy may go), but the host does not wait for the device's queue, so the next
    # layer's Python overlaps this layer's GPU work instead of waiting for it
    return to_torch(array).to(device, non_blocking=True)


_UPLOAD_ALIGN = 256  # bytes: every factor's slice of a bulk upload starts aligned
# CUDA uploads go in chunks of layers: the first small (the GPU starts merging soon), the rest
# larger (fewer copies and events); each chunk's copy overlaps the merges of the chunk before
_FIRST_CHUNK_BYTES = 2 << 20
_CHUNK_BYTES = 16 << 20
# host threads packing chunks into pinned memory, a chunk each (0: the calling thread). On an
# H100 host (16 vCPUs; 84 MB of factors, an 8B model at rank 16) a merge + unmerge took 45 ms
# with the caller packing, 33 ms with 4 threads; splitting each chunk between the threads, or
# packing with torch.cat, measured slower (numpy releases the GIL per copy only, and the
# caller's Python holds it in between)
_PACK_THREADS = 4
# chunks go up and merge as soon as they are packed, while later layers are still planned
# (the first chunk packed by the caller); False: every layer planned first
_INTERLEAVE = True
_COPY_STREAMS: dict[int, Any] = {}  # device index -> the side stream factor uploads run on


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _UPLOAD_ALIGN) * _UPLOAD_ALIGN


class _Chunk:
    """Consecutive layers' factors for one CUDA device, packed into one pinned buffer.

    Layers of one stack key (plain linear LoRA, the same weight shape and factor shapes and
    dtypes: an 8B model's 32 layers have four) go in as two blocks, their A's back to back,
    then their B's: one device view each, and one launch for the group
    (``core.merge_into_stacked``), without a view or a check per factor. Every other layer's
    factors go in one by one.
    """

    def __init__(self, device: torch.device):
        self.device, self.nbytes, self.host, self.staging = device, 0, None, None
        self.layers: list[tuple[str, tuple | None, list[np.ndarray]]] = []  # (name, stack key, arrays)
        self.items: list[tuple[np.ndarray, int]] = []  # (array, offset): what pack() copies
        # (names, (offset, first A), (offset, first B)): a group's stacked blocks
        self.stacks: list[tuple[list[str], tuple[int, np.ndarray], tuple[int, np.ndarray]]] = []
        self.singles: list[tuple[str, list[tuple[np.ndarray, int]]]] = []  # (name, [(array, offset)])

    def add(self, name: str, key: tuple | None, arrays: list[np.ndarray]) -> None:
        self.layers.append((name, key, arrays))
        self.nbytes += sum(_aligned(array.nbytes) for array in arrays)  # layout() makes it exact

    def layout(self) -> None:
        """Every array's offset in the buffer: each stack key of two or more layers as its two
        blocks, then the other layers' arrays, every block and array 256-byte aligned."""
        groups: dict[tuple, list[tuple[str, list[np.ndarray]]]] = {}
        for name, key, arrays in self.layers:
            if key is not None:
                groups.setdefault(key, []).append((name, arrays))
        offset, stacked = 0, set()
        for members in groups.values():
            if len(members) < 2:
                continue
            blocks = []
            for slot in (0, 1):
                first = members[0][1][slot]
                blocks.append((offset, first))
                for _, arrays in members:
                    self.items.append((arrays[slot], offset))
                    offset += first.nbytes
                offset = _aligned(offset)
            names = [name for name, _ in members]
            self.stacks.append((names, blocks[0], blocks[1]))
            stacked.update(names)
        for name, _, arrays in self.layers:
            if name in stacked:
                continue
            placed = []
            for array in arrays:
                placed.append((array, offset))
                offset = _aligned(offset + array.nbytes)
            self.items.extend(placed)
            self.singles.append((name, placed))
        self.nbytes = offset

    def pack(self) -> None:
        """Copy the chunk's factors into ``staging`` (its pinned buffer) at their offsets."""
        staging = self.staging
        for array, offset in self.items:
            staging[offset:offset + array.nbytes] = array.reshape(-1).view(np.uint8)


def _stack_key(layer: nn.Module, module: LoraModule, arrays: list[np.ndarray]) -> tuple | None:
    """What layers must share to merge from stacked factors (``core.merge_into_stacked``):
    plain linear LoRA on a 2-D (out, in) weight of one shape, strides, dtype and device, and
    factors of one shape and dtype; ``None`` for every other layer."""
    if module.magnitude is not None or module.kind != "linear" or _is_transformers_conv1d(layer):
        return None
    weight = layer.weight
    if weight.ndim != 2:
        return None
    A, B = arrays
    return (weight.shape, weight.stride(), weight.dtype, weight.device, A.shape, A.dtype, B.shape, B.dtype)


def _device_factors(layers: dict[str, nn.Module], adapter: Adapter):
    """Per uploaded chunk (and per layer off CUDA), the layers' factors on their weight's
    device, every layer once, in order: ``(singles, stacks)``, ``singles`` a list of ``(name,
    layer, (A, B, magnitude))`` (``magnitude`` ``None`` for plain LoRA) and ``stacks`` a list
    of ``(members, A, B)``: ``members`` ``(name, layer)`` pairs, ``A`` and ``B`` their factors
    stacked (count, r, in) and (count, out, r) (see :class:`_Chunk`).

    To CUDA, factors do not go one copy each (two per layer: on an H100 host an 8B model's 448
    pageable uploads cost ~35 ms against ~10 ms of merge kernels). Consecutive layers' factors
    are packed into pinned chunks (by :data:`_PACK_THREADS` threads, from the moment a chunk
    is planned), and each chunk goes up with one asynchronous copy on a side stream. The
    current stream waits for a chunk's copy only before that chunk's layers are yielded, so
    the merges of one chunk run on the GPU while later chunks are packed and copied. With
    :data:`_INTERLEAVE`, planning and merging interleave: the first (small) chunk is packed by
    the caller and yielded as soon as the next chunk starts, and every chunk whose packing is
    done goes before the next layer is planned, so the GPU starts while most of a big model
    is still being planned. Elsewhere each factor is converted on its own.
    """
    pending: collections.deque = collections.deque()  # (name, None) or ("", chunk), in order
    chunks: list[_Chunk] = []
    packing: dict[int, Any] = {}
    pool = None
    threads = min(_PACK_THREADS, os.cpu_count() or 1)

    def close(chunk: _Chunk, last: bool = False) -> None:
        nonlocal pool
        chunk.layout()
        # the caching host allocator keeps a pinned buffer until every copy from it has run
        chunk.host = torch.empty(chunk.nbytes, dtype=torch.uint8, pin_memory=True)
        chunk.staging = chunk.host.numpy()
        if threads < 1 or (last and pool is None) or (_INTERLEAVE and chunk is chunks[0]):
            # nothing to overlap with (a single chunk), or the first, small chunk: the GPU
            # starts on it at once while the rest is planned and packed
            chunk.pack()
            return
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="portable-lora-pack")
        packing[id(chunk)] = pool.submit(chunk.pack)

    def ready(entry: tuple[str, _Chunk | None]) -> bool:
        chunk = entry[1]
        if chunk is None:
            return True
        future = packing.get(id(chunk))
        return chunk.staging is not None and (future is None or future.done())

    def emit(entry: tuple[str, _Chunk | None]):
        name, chunk = entry
        if chunk is None:
            layer = layers[name]
            return [(name, layer, _factors_one_by_one(layer, adapter[name]))], []
        future = packing.pop(id(chunk), None)
        if future is not None:
            future.result()
        singles, stacks = _upload_chunk(chunk)
        return ([(name, layers[name], factors) for name, factors in singles],
                [([(name, layers[name]) for name in names], A, B) for names, A, B in stacks])

    try:
        chunk = None  # the chunk being filled: consecutive CUDA layers of one device
        for name, layer in layers.items():
            module = adapter[name]
            device = layer.weight.device
            if device.type != "cuda":
                if chunk is not None:
                    close(chunk)
                chunk = None
                pending.append((name, None))
            else:
                limit = _FIRST_CHUNK_BYTES if len(chunks) == 1 else _CHUNK_BYTES
                if chunk is None or chunk.device != device or chunk.nbytes >= limit:
                    if chunk is not None:
                        close(chunk)
                    chunk = _Chunk(device)
                    chunks.append(chunk)
                    pending.append(("", chunk))
                arrays = [np.ascontiguousarray(module.A), np.ascontiguousarray(module.B)]
                key = None
                if module.magnitude is None:
                    key = _stack_key(layer, module, arrays)
                else:
                    arrays.append(np.ascontiguousarray(module.magnitude))
                chunk.add(name, key, arrays)
            # what is packed goes up and merges now, while the rest is planned (in order)
            while _INTERLEAVE and pending and ready(pending[0]):
                yield emit(pending.popleft())
        if chunk is not None:
            close(chunk, last=True)
        while pending:
            yield emit(pending.popleft())
    finally:
        if pool is not None:
            for future in packing.values():
                future.cancel()
            pool.shutdown(wait=True)


def _factors_one_by_one(layer: nn.Module, module: LoraModule) -> tuple:
    device = layer.weight.device
    magnitude = None if module.magnitude is None else _upload(module.magnitude, device)
    return _upload(module.A, device), _upload(module.B, device), magnitude


def _upload_chunk(chunk: _Chunk) -> tuple[list, list]:
    """One asynchronous copy of the chunk's bytes on the device's side stream; the current
    stream waits for it. Returns views into the copy: ``[(name, (A, B, magnitude))]`` for the
    single layers and ``[(names, A, B)]`` for the stacked groups (``A`` (count, r, in))."""
    device = chunk.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COPY_STREAMS.get(index)
    if stream is None:
        stream = _COPY_STREAMS[index] = torch.cuda.Stream(index)
    current = torch.cuda.current_stream(index)
    with torch.cuda.stream(stream):
        # allocated on the side stream and recorded as used by the current one: the caching
        # allocator reuses it only once both streams are done with it
        flat = torch.empty(chunk.nbytes, dtype=torch.uint8, device=device)
        flat.copy_(chunk.host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    flat.record_stream(current)
    current.wait_event(done)
    chunk.host = chunk.staging = None
    return _chunk_views(chunk, flat)


def _chunk_views(chunk: _Chunk, flat: torch.Tensor) -> tuple[list, list]:
    """The chunk's factors as views into ``flat``, its packed bytes (uint8): see
    :func:`_upload_chunk`."""
    typed: dict[Any, torch.Tensor] = {}  # flat seen as each factor dtype (offsets stay aligned)

    def view(array: np.ndarray, offset: int, count: int | None = None) -> torch.Tensor:
        dtype = _torch_dtype(array.dtype)
        flat_typed = typed.get(dtype)
        if flat_typed is None:
            flat_typed = typed[dtype] = flat.view(dtype)
        strides = tuple(s // array.itemsize for s in array.strides)
        shape = array.shape
        if count is not None:  # count arrays like this one, back to back
            shape, strides = (count, *shape), (array.size, *strides)
        return flat_typed.as_strided(shape, strides, offset // array.itemsize)

    singles = []
    for name, placed in chunk.singles:
        factors = [view(array, offset) for array, offset in placed]
        singles.append((name, (factors[0], factors[1], factors[2] if len(factors) > 2 else None)))
    stacks = [(names, view(A, a_at, len(names)), view(B, b_at, len(names)))
              for names, (a_at, A), (b_at, B) in chunk.stacks]
    return singles, stacks


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    found = _TORCH_DTYPES.get(dtype)
    if found is None:
        found = torch.bfloat16 if dtype == ml_dtypes.bfloat16 else torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        _TORCH_DTYPES[dtype] = found
    return found


def _merge_inputs(layer: nn.Module, uploaded: tuple):
    A, B, magnitude = uploaded
    return layer.weight, [A, B], magnitude, _is_transformers_conv1d(layer)


def merge(model: nn.Module, adapter: Adapter, *, strength: float = 1.0,
          allow_shared: bool = False) -> nn.Module:
    """Add ΔW (or DoRA's rescaled weight) into each named layer's weight, in place.

    The sum is taken in float32 (float64 for float64 weights) and rounded once to the weight's
    dtype (:func:`core.merge_into`). Each layer remembers what :func:`unmerge` needs. Layers
    must be plain (not wrapped by :func:`apply`): to merge trained factors, ``a = extract(m);
    remove(m); merge(m, a)``. On CUDA the factors go up in pinned chunks on a side stream
    while earlier chunks merge (one launch per group of same-shaped 16-bit weights); as with
    any CUDA operation, the call returns with that work queued on the current stream.

    A weight that the model also holds under another name which :func:`apply` would leave
    alone (``tie_word_embeddings``: ``lm_head.weight`` is ``model.embed_tokens.weight``; one
    layer registered twice) is refused, naming both modules, and nothing changes: merging
    would change the other module too. ``allow_shared=True`` merges into the shared weight
    anyway, so every module holding it changes (the tied input embedding with the head);
    :func:`unmerge` takes it out again. Two adapter modules never go into one weight.

    >>> import torch, portable_lora as pl
    >>> model = torch.nn.Module()
    >>> model.embed = torch.nn.Embedding(5, 3)
    >>> model.head = torch.nn.Linear(3, 5, bias=False)
    >>> model.head.weight = model.embed.weight  # tied
    >>> adapter = pl.examples.random_adapter({"head": (5, 3)}, rank=2)
    >>> merge(model, adapter)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    portable_lora.errors.LoraError: [head]: merge(): module 'head' holds its weight together with 'embed' ...
    >>> model = merge(model, adapter, allow_shared=True)  # the embedding changes as well
    """
    strength = core.check_strength(strength)
    layers = _resolve(model, adapter, "merge")
    for name, layer in layers.items():
        _dispatch(name, layer, adapter[name])
    _check_one_per_weight(layers, "merge")
    if not allow_shared:
        _check_unshared(model, layers, "merge")
    with torch.no_grad():
        for batch, stacks in _device_factors(layers, adapter):
            for members, A, B in stacks:  # same-shaped plain linear layers: one launch where it can
                scales = [adapter[name].scale * strength for name, _ in members]
                weights = [layer.weight for _, layer in members]
                merged = core.merge_into_stacked(weights, A, B, scales, inplace=True, xp=_XP)
                for (name, layer), weight, scale, new in zip(members, weights, scales, merged):
                    if new is not weight:
                        weight.copy_(new)
                    layer.__dict__.setdefault(_MERGES_ATTR, []).append(_MergeRecord(scale, None, name, adapter[name]))
            plain = []  # plain LoRA: merged together, batched where the core can
            for name, layer, factors in batch:
                module = adapter[name]
                scale = module.scale * strength
                weight, (A, B), magnitude, transposed = _merge_inputs(layer, factors)
                if magnitude is None:
                    plain.append((layer, (weight, A, B, scale, module.kind, transposed), module, name))
                    continue
                norm = core.dora_weight_norm(weight, A, B, scale, module.kind, transposed=transposed, xp=_XP)
                merged = core.merge_into(weight, A, B, scale, module.kind, magnitude=magnitude,
                                         transposed=transposed, xp=_XP)
                weight.copy_(merged)
                layer.__dict__.setdefault(_MERGES_ATTR, []).append(_MergeRecord(scale, norm, name, module))
            # in place (one pass over each weight) where the core has a fused in-place path
            for (layer, item, module, name), merged in zip(plain, core.merge_into_many([p[1] for p in plain],
                                                                                        inplace=True, xp=_XP)):
                if merged is not item[0]:
                    item[0].copy_(merged)
                layer.__dict__.setdefault(_MERGES_ATTR, []).append(_MergeRecord(item[3], None, name, module))
    return model


def _pop_record(layer: nn.Module, record: _MergeRecord) -> None:
    records = layer.__dict__[_MERGES_ATTR]
    records.remove(record)
    if not records:
        del layer.__dict__[_MERGES_ATTR]


def unmerge(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Undo :func:`merge` of ``adapter``, which must be the last merged into each of its
    weights (stacked adapters come back in the reverse order of merging; a tied weight's
    merges too, whichever of its layers each went through); the scale and, for DoRA, the
    weight norm are the ones recorded at merge time. The weights come back to within a
    rounding of the merged ones (W + ΔW − ΔW, each sum rounded once to the weight's dtype),
    not bit for bit."""
    layers = _resolve(model, adapter, "unmerge")
    for name, layer in layers.items():
        _dispatch(name, layer, adapter[name])
    _check_one_per_weight(layers, "unmerge")
    for name, layer in layers.items():  # every layer checked before any changes
        _check_last(layer, name, adapter[name])
    _check_last_of_weight(model, layers)
    with torch.no_grad():
        for batch, stacks in _device_factors(layers, adapter):
            for members, A, B in stacks:  # W + (−s)·BA, one launch where it can
                records = [layer.__dict__[_MERGES_ATTR][-1] for _, layer in members]  # checked above
                weights = [layer.weight for _, layer in members]
                originals = core.merge_into_stacked(weights, A, B, [-record.scale for record in records],
                                                    inplace=True, xp=_XP)
                for (_, layer), weight, record, original in zip(members, weights, records, originals):
                    if original is not weight:
                        weight.copy_(original)
                    _pop_record(layer, record)
            plain = []  # plain LoRA: W + (−s)·BA, batched where the core can
            for name, layer, factors in batch:
                module = adapter[name]
                record = layer.__dict__[_MERGES_ATTR][-1]  # checked above: this module's merge
                weight, (A, B), magnitude, transposed = _merge_inputs(layer, factors)
                if magnitude is None:
                    plain.append((layer, record, (weight, A, B, -record.scale, module.kind, transposed)))
                    continue
                original = core.unmerge_from(weight, A, B, record.scale, module.kind, magnitude=magnitude,
                                             weight_norm=record.weight_norm, transposed=transposed, xp=_XP)
                weight.copy_(original)
                _pop_record(layer, record)
            for (layer, record, item), original in zip(plain, core.merge_into_many([p[2] for p in plain],
                                                                                    inplace=True, xp=_XP)):
                if original is not item[0]:
                    item[0].copy_(original)
                _pop_record(layer, record)
    return model
