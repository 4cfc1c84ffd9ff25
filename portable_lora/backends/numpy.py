"""NumPy: the reference path, over a state dict ``{key: array}``.

Every number is computed by :mod:`portable_lora.core`. :func:`merge` and :func:`unmerge`
return a new dict (arrays not touched by the adapter are shared, never modified);
:func:`delta_state_dict` gives ΔW per key. bfloat16 weights (``ml_dtypes.bfloat16``) are
accumulated in float32 and rounded once.

Keys: module ``"m"`` → ``"m.weight"`` (PyTorch state-dict naming) unless ``key_for`` says
otherwise: a dict ``{name: key}`` (names not in it keep the default) or a function
``name -> key`` (``None``: no match). Weights are in PyTorch layout: linear (out, in), conv
(out, in, kh, kw), embedding (num_embeddings, dim). ``transposed`` names linear weights
stored (in, out) (GPT-2 ``Conv1D``, Keras and Flax kernels): a collection of module names or
keys, a function ``name -> bool``, or ``True`` for all.

>>> import numpy as np, portable_lora as pl
>>> from portable_lora import numpy as pln
>>> adapter = pl.examples.random_adapter({"proj": (3, 4)}, rank=2)
>>> weights = {"proj.weight": np.zeros((3, 4), np.float32), "proj.bias": np.zeros(3, np.float32)}
>>> merged = pln.merge(weights, adapter)
>>> bool(np.allclose(merged["proj.weight"], adapter.delta_weight("proj")))
True
>>> bool(np.allclose(pln.unmerge(merged, adapter)["proj.weight"], 0, atol=1e-6))
True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError

__all__ = ["merge", "unmerge", "delta_state_dict", "dora_weight_norms"]

KeyFor = Mapping[str, str] | Callable[[str], "str | None"] | None
Transposed = Collection[str] | Callable[[str], bool] | bool | None


def _key_for(name: str, key_for: KeyFor) -> str | None:
    if key_for is None:
        return f"{name}.weight"
    if isinstance(key_for, Mapping):
        return key_for.get(name, f"{name}.weight")
    if callable(key_for):
        return key_for(name)
    raise LoraError(f"key_for must be a dict or a function name -> key, found {type(key_for).__name__}")


def _is_transposed(name: str, key: str, module: LoraModule, transposed: Transposed) -> bool:
    if transposed is None or transposed is False:
        flag = False
    elif transposed is True:
        flag = True
    elif callable(transposed):
        flag = bool(transposed(name))
    else:
        flag = name in transposed or key in transposed
    if flag and module.kind != "linear":
        raise LoraError(f"module {name!r}: only linear weights can be transposed, this one is "
                        f"{module.kind}", key=key)
    return flag


def _check_adapter(adapter: object) -> Adapter:
    if not isinstance(adapter, Adapter):
        raise LoraError(f"expected a portable_lora.Adapter, found {type(adapter).__name__}")
    return adapter


def _targets(state_dict: Mapping[str, Any], adapter: Adapter, key_for: KeyFor,
             transposed: Transposed) -> list[tuple[str, LoraModule, str, np.ndarray, bool]]:
    """[(name, module, key, weight, transposed)]; unmatched modules and bad shapes raise."""
    if not isinstance(state_dict, Mapping):
        raise LoraError(f"expected a state dict (a mapping of key -> array), found {type(state_dict).__name__}")
    _check_adapter(adapter)
    found, unmatched, seen = [], [], {}
    for name, module in adapter.items():
        key = _key_for(name, key_for)
        if key is None or key not in state_dict:
            unmatched.append(f"{name} -> {key}")
            continue
        if key in seen:
            raise LoraError(f"modules {seen[key]!r} and {name!r} both map to {key!r}", key=key)
        seen[key] = name
        flag = _is_transposed(name, key, module, transposed)
        weight = np.asarray(state_dict[key])
        expected = tuple(module.weight_shape)
        if flag:
            expected = expected[::-1]
        if tuple(weight.shape) != expected:
            layout = "(in, out)" if flag else "(out, in, ...)" if module.kind != "embedding" else "(num, dim)"
            raise LoraError(f"module {name!r}: the adapter needs a {module.kind} weight of shape "
                            f"{list(expected)} {layout}, found {list(weight.shape)}", key=key)
        if weight.dtype.kind != "f" and weight.dtype.name != "bfloat16":
            raise LoraError(f"module {name!r}: the weight must be floating point, found {weight.dtype}",
                            key=key)
        found.append((name, module, key, weight, flag))
    if unmatched:
        raise LoraError(f"{len(unmatched)} adapter module(s) match no key in the state dict: "
                        + "; ".join(unmatched))
    return found


def merge(state_dict: Mapping[str, Any], adapter: Adapter, *, strength: float = 1.0,
          key_for: KeyFor = None, transposed: Transposed = None) -> dict[str, Any]:
    """A new state dict with ``strength`` × the adapter merged into its weights (DoRA too)."""
    strength = core.check_strength(strength)
    out = dict(state_dict)
    for name, module, key, weight, flag in _targets(state_dict, adapter, key_for, transposed):
        out[key] = core.merge_into(weight, module.A, module.B, module.scale * strength, module.kind,
                                   magnitude=module.magnitude, transposed=flag)
    return out


def unmerge(state_dict: Mapping[str, Any], adapter: Adapter, *, strength: float = 1.0,
            key_for: KeyFor = None, transposed: Transposed = None,
            weight_norms: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The inverse of :func:`merge`. DoRA modules need ``weight_norms``, taken by
    :func:`dora_weight_norms` on the state dict before merging."""
    strength = core.check_strength(strength)
    norms = weight_norms or {}
    out = dict(state_dict)
    for name, module, key, weight, flag in _targets(state_dict, adapter, key_for, transposed):
        if module.is_dora and name not in norms:
            raise LoraError(f"module {name!r}: unmerging DoRA needs the weight norm taken before "
                            "merging (pass weight_norms=dora_weight_norms(...))", key=key)
        out[key] = core.unmerge_from(weight, module.A, module.B, module.scale * strength, module.kind,
                                     magnitude=module.magnitude, weight_norm=norms.get(name),
                                     transposed=flag)
    return out


def dora_weight_norms(state_dict: Mapping[str, Any], adapter: Adapter, *, strength: float = 1.0,
                      key_for: KeyFor = None, transposed: Transposed = None) -> dict[str, np.ndarray]:
    """``{name: ‖W + ΔW‖}`` for the DoRA modules of ``adapter``: what unmerging them needs."""
    strength = core.check_strength(strength)
    return {name: core.dora_weight_norm(weight, module.A, module.B, module.scale * strength,
                                        module.kind, transposed=flag)
            for name, module, _, weight, flag in _targets(state_dict, adapter, key_for, transposed)
            if module.is_dora}


def delta_state_dict(adapter: Adapter, *, strength: float = 1.0, key_for: KeyFor = None,
                     transposed: Transposed = None, dtype: Any = None) -> dict[str, np.ndarray]:
    """``{key: ΔW}`` in each weight's layout: what :func:`merge` adds.

    ``dtype`` rounds once from the accumulation dtype (default: float32, or float64 for
    float64 factors). DoRA has no ΔW independent of the base weight: it raises.
    """
    strength = core.check_strength(strength)
    out: dict[str, np.ndarray] = {}
    for name, module in _check_adapter(adapter).items():
        key = _key_for(name, key_for)
        if key is None:
            raise LoraError(f"module {name!r}: key_for gives it no key", key=name)
        if module.is_dora:
            raise LoraError(f"module {name!r}: DoRA has no ΔW without the base weight; use merge()",
                            key=name)
        if key in out:
            raise LoraError(f"two modules map to {key!r}", key=key)
        delta = core.delta_weight(module.A, module.B, module.scale * strength, module.kind)
        if _is_transposed(name, key, module, transposed):
            delta = delta.T
        out[key] = delta if dtype is None else delta.astype(dtype)
    return out
