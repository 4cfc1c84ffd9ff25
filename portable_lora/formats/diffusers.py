"""diffusers LoRA files: one ``.safetensors`` with PEFT keys under component prefixes.

Keys ``<component>.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``.lora_B.weight``
(out, r[, 1, 1]); embeddings ``.lora_embedding_A`` (r, num) / ``.lora_embedding_B`` (dim, r);
DoRA ``.lora_magnitude_vector`` (out,). Components: ``unet``, ``transformer``,
``text_encoder``, ``text_encoder_2``, ... Module names keep the prefix
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).

Scale, as diffusers' loaders compute it (``loaders/peft.py``, ``utils/peft_utils.py``):

* with the header metadata entry ``lora_adapter_metadata`` (JSON of each component's
  ``LoraConfig`` fields, keys prefixed ``<component>.``: ``unet.r``, ``unet.lora_alpha``,
  ``unet.rank_pattern``, ``unet.alpha_pattern``, ``unet.use_rslora``, ...): PEFT's rule, per
  module r and α from the patterns (PEFT's ``get_pattern_key`` matching against the module
  name inside its component); a component that the metadata does not mention gets
  ``LoraConfig``'s defaults (r 8, α 8), as in diffusers;
* without it: α = r for every module (scale 1).

Save writes the keys and ``lora_adapter_metadata`` with ``r`` / ``lora_alpha`` the most common
values of each component and exact, anchored ``rank_pattern`` / ``alpha_pattern`` entries for
the rest, so diffusers reproduces every module's scale with B bit-exact. ``fold=True`` instead
folds each scale into B (one rounding) and writes α = r everywhere: the choice for tools that
ignore the metadata (ComfyUI reads these keys at scale 1; so does diffusers' own
``load_lora_adapter(path)`` unless given ``use_safetensors=True`` or a ``weight_name``, while
``load_lora_weights`` reads it). Text-encoder configs name modules without CLIP's
``text_model.`` wrapper (gone in transformers 5, where diffusers strips it from the keys only);
their pattern keys accept it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter
from ..errors import LoraError
from ..io.safetensors_io import write_safetensors
from ._common import (PROVENANCE_KEY, parse_json, peek_safetensors, fold_scale, module_from, pattern_key, provenance_metadata,
                      read_tensors, require, stored_provenance)

NAME = "diffusers"
LAYOUT = "file"  # one .safetensors
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2",
              "text_encoder_3", "prior")
_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
          ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude",
          ".lora_magnitude_vector.weight": "magnitude"}
_PEFT_DEFAULT_R = 8  # LoraConfig defaults: what diffusers uses for a component missing from the metadata
_PEFT_DEFAULT_ALPHA = 8


def _split(key: str) -> tuple[str, str] | None:
    for suffix in sorted(_PARTS, key=len, reverse=True):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def detect(path: Path) -> str | None:
    peeked = peek_safetensors(path)
    if peeked is None:
        return None
    keys, metadata = peeked
    lora_keys = [k for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if not lora_keys:
        return None
    if METADATA_KEY in metadata:
        return f"PEFT-style keys and a {METADATA_KEY!r} header entry"
    prefixed = [k for k in lora_keys if k.split(".", 1)[0] in COMPONENTS]
    if prefixed:
        return f"PEFT-style keys under a diffusers component prefix, such as {prefixed[0]!r}"
    return None


def _component(name: str) -> tuple[str | None, str]:
    head, _, tail = name.partition(".")
    return (head, tail) if head in COMPONENTS and tail else (None, name)


def _configs(raw: str, path: Path) -> dict[str | None, dict[str, Any]]:
    flat = parse_json(raw, file=path, key=METADATA_KEY)
    configs: dict[str | None, dict[str, Any]] = {}
    for key, value in flat.items():
        head, _, field = key.partition(".")
        component = head if field and head in COMPONENTS else None
        configs.setdefault(component, {})[field if component else key] = value
    return configs


def _module_scale(config: Mapping[str, Any] | None, tail: str, rank: int, *, key: str,
                  file: Path) -> tuple[float, str]:
    """``(alpha, rule)`` of one module under a component's LoraConfig fields."""
    if config is None:  # no metadata: diffusers mirrors each rank into alpha
        return core.alpha_for_scale(1.0, rank, core.ALPHA_OVER_RANK), core.ALPHA_OVER_RANK
    where = METADATA_KEY
    r = require(config, "r", int, file=file, default=_PEFT_DEFAULT_R)
    alpha = require(config, "lora_alpha", float, file=file, default=_PEFT_DEFAULT_ALPHA)
    rank_pattern = require(config, "rank_pattern", dict, file=file, default={}, allow_none=True) or {}
    alpha_pattern = require(config, "alpha_pattern", dict, file=file, default={}, allow_none=True) or {}
    rslora = require(config, "use_rslora", bool, file=file, default=False)
    if require(config, "fan_in_fan_out", bool, file=file, default=False):
        raise LoraError("fan_in_fan_out=True (transposed base weights) is not a diffusers layout",
                        file=file, key=where)
    r = rank_pattern.get(pattern_key(rank_pattern, tail), r)
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, tail), alpha)
    for label, value, types in (("r", r, int), ("lora_alpha", alpha, (int, float))):
        if isinstance(value, bool) or not isinstance(value, types):
            raise LoraError(f"{label} for {tail!r} must be a number, found {value!r}", file=file, key=where)
    if r != rank:
        raise LoraError(f"the metadata gives {tail!r} rank {r} but the tensor has rank {rank}: "
                        "diffusers would fail to load it", file=file, key=key)
    return float(alpha), core.ALPHA_OVER_SQRT_RANK if rslora else core.ALPHA_OVER_RANK


def load(path: Path, *, convention: str | None = None, **options: Any) -> Adapter:
    if options:
        raise LoraError(f"unknown options for the diffusers format: {sorted(options)}", file=path)
    if convention is not None:
        raise LoraError("diffusers files define their scale (lora_adapter_metadata, or alpha = rank "
                        "without it); a convention cannot be imposed", file=path, key="convention")
    tensors, metadata = read_tensors(path)
    parts: dict[str, dict[str, str]] = {}
    for key in tensors:
        split = _split(key)
        if split is None:
            if key.endswith(".lora_B.bias"):
                raise LoraError("a LoRA bias (lora_bias=True) is not supported", file=path, key=key)
            raise LoraError("not a diffusers LoRA tensor: expected <component>.<module>.lora_A.weight, "
                            ".lora_B.weight, .lora_embedding_A/B or .lora_magnitude_vector", file=path, key=key)
        module, suffix = split
        role = _PARTS[suffix]
        if role in parts.get(module, {}):
            raise LoraError(f"module {module!r} has two {role} tensors", file=path, key=key)
        parts.setdefault(module, {})[role] = key
    if not parts:
        raise LoraError("the file has no LoRA tensors", file=path)
    configs = _configs(metadata[METADATA_KEY], path) if METADATA_KEY in metadata else None
    stored = stored_provenance(metadata, path, NAME)
    adapter = Adapter(base_model=stored.get("base_model"), provenance=stored.get("provenance") or {})
    for name, roles in parts.items():
        for needed in ("A", "B"):
            if needed not in roles:
                present = next(iter(roles.values()))
                raise LoraError(f"incomplete LoRA pair: {present!r} has no lora_{needed} partner",
                                file=path, key=present)
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        embedding = roles["A"].endswith("lora_embedding_A")
        kind = "embedding" if embedding else "conv" if A.ndim == 4 else "linear"
        component, tail = _component(name)
        config = None if configs is None else configs.get(component, {})
        rank = int(A.shape[0]) if A.ndim else 0
        alpha, rule = _module_scale(config, tail, rank, key=roles["A"], file=path)
        magnitude = tensors[roles["magnitude"]] if "magnitude" in roles else None
        if config is not None and require(config, "use_dora", bool, file=path, default=False) != (magnitude is not None):
            # diffusers would build DoRA from the base weights' norms, or drop the magnitude
            raise LoraError(f"use_dora in {METADATA_KEY} disagrees with the presence of a "
                            "lora_magnitude_vector for this module", file=path, key=roles["A"])
        if magnitude is not None and kind == "conv" and magnitude.shape == (1, B.shape[0], 1, 1):
            magnitude = magnitude.reshape(-1)  # PEFT's conv DoRA magnitude is (1, out, 1, 1)
        adapter[name] = module_from(A, B, alpha=alpha, rule=rule, kind=kind, magnitude=magnitude,
                                    name=name, file=path)
    adapter.provenance.setdefault("source_format", NAME)
    if configs is None:
        adapter.provenance.update({"convention": core.ALPHA_OVER_RANK, "convention_reason":
                                   f"no {METADATA_KEY}: diffusers' loader uses alpha = rank for every "
                                   "module (scale 1)"})
    else:
        adapter.provenance.update({"convention": "peft", "convention_reason":
                                   f"{METADATA_KEY} (LoraConfig per component: r, lora_alpha, "
                                   "rank_pattern, alpha_pattern, use_rslora)"})
    return adapter


# transformers 5 dropped CLIPTextModel's ``text_model`` wrapper: diffusers strips it from the
# tensor keys of a text-encoder LoRA, not from the config, so the config names modules without
# it (PEFT's suffix rule still finds ``text_model.<name>`` under transformers 4)
_OPTIONAL_WRAPPER = "text_model."


def _config_name(tail: str, text_encoder: bool) -> tuple[str, str]:
    """(target_modules entry, pattern key) for the module ``tail`` of one component."""
    if text_encoder and tail.startswith(_OPTIONAL_WRAPPER):
        rest = tail[len(_OPTIONAL_WRAPPER):]
        return rest, f"^(?:{re.escape(_OPTIONAL_WRAPPER)})?{re.escape(rest)}"
    return tail, f"^{re.escape(tail)}"


def _component_config(tails: dict[str, Any], fold: bool, text_encoder: bool = False
                      ) -> tuple[dict[str, Any], dict[str, float]]:
    """LoraConfig fields reproducing each module's scale; ``{tail: factor folded into B}``."""
    mods = list(tails.values())
    rslora = not fold and all(m.rule == core.ALPHA_OVER_SQRT_RANK for m in mods)
    rule = core.ALPHA_OVER_SQRT_RANK if rslora else core.ALPHA_OVER_RANK
    alphas: dict[str, float] = {}
    folds: dict[str, float] = {}
    for tail, m in tails.items():
        if fold:
            alphas[tail], folds[tail] = float(m.rank), m.scale
        elif m.rule == rule:
            alphas[tail] = float(m.alpha)
        else:
            alphas[tail] = core.alpha_for_scale(m.scale, m.rank, rule)
    r = Counter(m.rank for m in mods).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = {t: _config_name(t, text_encoder) for t in tails}
    config = {
        "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "rank_pattern": {names[t][1]: m.rank for t, m in tails.items() if m.rank != r},
        "alpha_pattern": {names[t][1]: a for t, a in alphas.items() if a != alpha},
        "target_modules": sorted(n for n, _ in names.values()), "use_dora": any(m.is_dora for m in mods),
        "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
    }
    return config, folds


def save(adapter: Adapter, path: Path, *, fold: bool = False, **options: Any) -> None:
    if options:
        raise LoraError(f"unknown options for the diffusers format: {sorted(options)}; expected fold",
                        file=path)
    if not adapter:
        raise LoraError("the adapter has no modules", file=path)
    by_component: dict[str, dict[str, Any]] = {}
    for name, m in adapter.items():
        component, tail = _component(name)
        if component is None:
            raise LoraError(f"module {name!r} has no diffusers component prefix ({', '.join(COMPONENTS)}); "
                            "rename the modules first, e.g. adapter.rename(lambda n: 'unet.' + n)",
                            file=path, key=name)
        by_component.setdefault(component, {})[tail] = m
    tensors: dict[str, np.ndarray] = {}
    flat: dict[str, Any] = {}
    for component, tails in by_component.items():
        dora = {m.is_dora for m in tails.values()}
        if len(dora) > 1:
            raise LoraError(f"component {component!r} mixes DoRA and plain LoRA modules; diffusers' "
                            "use_dora applies to a whole component", file=path, key=component)
        config, folds = _component_config(tails, fold, text_encoder=component.startswith("text_encoder"))
        for field, value in config.items():
            flat[f"{component}.{field}"] = value
        for tail, m in tails.items():
            stem = f"{component}.{tail}"
            B = fold_scale(m.B, folds[tail], name=stem, file=path) if tail in folds else m.B
            a_key, b_key = ((".lora_embedding_A", ".lora_embedding_B") if m.kind == "embedding"
                            else (".lora_A.weight", ".lora_B.weight"))
            tensors[stem + a_key] = m.A
            tensors[stem + b_key] = B
            if m.magnitude is not None:
                mag = m.magnitude.reshape(1, -1, 1, 1) if m.kind == "conv" else m.magnitude
                tensors[stem + ".lora_magnitude_vector"] = mag
    for field, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise LoraError(f"{field} is {value}: not representable in JSON", file=path, key=field)
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True, allow_nan=False),
                PROVENANCE_KEY: provenance_metadata(adapter)}
    write_safetensors(path, tensors, metadata)
