"""PEFT LoRA adapters: a directory with ``adapter_model.safetensors`` and ``adapter_config.json``.

What the files mean (Hugging Face PEFT, read from ``peft/tuners/lora`` and
``peft/utils/save_and_load.py``):

* tensors ``base_model.model.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``.lora_B.weight``
  (out, r[, 1, 1]); embeddings ``<module>.lora_embedding_A`` (r, num_embeddings) and
  ``.lora_embedding_B`` (dim, r); DoRA ``<module>.lora_magnitude_vector`` (out,), or
  (1, out, 1, 1) for convolutions. Some tools keep the adapter name (``lora_A.default.weight``):
  accepted on load.
* scale = ``lora_alpha / r`` (``alpha/sqrt(rank)`` with ``use_rslora``); ``rank_pattern`` and
  ``alpha_pattern`` override r and alpha per module. A pattern key matches a module when
  ``re.match(rf"(.*\\.)?({key})$", name)`` does, the first matching key in file order wins
  (PEFT's ``get_pattern_key``).
* ``fan_in_fan_out`` (GPT-2 ``Conv1D``): A and B keep their layout, only the base weight is
  stored (in, out). It is kept in ``adapter.provenance["fan_in_fan_out"]`` and written back on
  save; ΔW stays (out, in) inside this library (merge with ``transposed=True`` for such weights).

Module names are the base model's (``model.layers.0.self_attn.q_proj``): the
``base_model.model.`` prefix is stripped on load and added on save.

>>> import portable_lora as pl
>>> adapter = pl.load("my-peft-adapter")                      # doctest: +SKIP
>>> pl.save(adapter, "out-dir", format="peft")                # doctest: +SKIP

Saving writes what ``PeftModel.from_pretrained(model, dir)`` loads: ``r`` is the most common
rank, ``lora_alpha`` the most common alpha, and ``rank_pattern`` / ``alpha_pattern`` hold
exact full module names for the rest (ordered so that no shorter key captures a longer name);
``target_modules`` lists every module. PEFT has one scaling rule per adapter: modules under the
other rule (or ``raw``) are written with the alpha that gives their scale, and their original
alpha and rule are kept in the safetensors header (``portable_lora_provenance`` metadata) so that
loading the directory back restores them. That entry sits in the header rather than in
``adapter_config.json`` because PEFT warns about unknown config keys ("upgrade PEFT").
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..io.atomic import atomic_directory
from ..io.safetensors_io import write_safetensors
from ._common import (PROVENANCE_KEY, carried_provenance, check_replaceable, parse_json, convention_provenance, module_from, pattern_key,
                      read_json, read_tensors, require)

__all__ = ["NAME", "CONFIG_NAME", "WEIGHTS_NAME", "REPLACEABLE", "PREFIX", "detect", "load", "save", "pattern_key"]

NAME = "peft"
LAYOUT = "directory"  # weights and a JSON config side by side
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# not "portable_lora": that header entry marks a file of the portable format itself
METADATA_KEY = PROVENANCE_KEY
REPLACEABLE = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}  # what save may replace in an existing directory

# <module>.<part>[.<adapter name>][.weight|.bias]: PEFT strips the adapter name on save, some
# tools (DiffSynth, hand-made exports) keep "default".
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                  r"lora_magnitude_vector)(?:\.default)?(?:\.(?P<leaf>weight|bias))?$")
_LEAF_OF = {"lora_A": ("weight",), "lora_B": ("weight",), "lora_embedding_A": (None,),
            "lora_embedding_B": (None,), "lora_magnitude_vector": (None, "weight")}

# LoraConfig fields whose variants change the forward pass beyond ΔW = s·B@A (or the model's
# structure): honoured by nothing else, so refused instead of dropped.
_UNSUPPORTED = {
    "alora_invocation_tokens": "aLoRA activates the adapter only after invocation tokens",
    "arrow_config": "Arrow routes between several adapters at run time",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "velora_config": "VeLoRA changes the forward pass",
    "monteclora_config": "MonteCLoRA samples the factors at run time",
    "kasa_config": "KaSA adds a singular-value term",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) has no module weight layout here",
    "layer_replication": "layer replication changes the model's layer list",
    "lora_bias": "lora_bias adds a trainable bias to lora_B",
    "trainable_token_indices": "trainable tokens store embedding rows, not LoRA factors",
}


def _find(path: Path) -> tuple[Path, Path] | None:
    """(config, weights) for a PEFT directory or a weights file whose sibling config exists."""
    if path.is_dir():
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent / CONFIG_NAME, path
    return None


def detect(path: Path) -> str | None:
    found = _find(path)
    if found is None or not found[0].is_file():
        return None
    try:
        config = read_json(found[0])
    except LoraError:
        return None
    if "peft_type" not in config:
        return None
    where = "directory" if path.is_dir() else "safetensors file beside"
    return f"{where} with {CONFIG_NAME} whose peft_type is {config['peft_type']!r}"


# -- load ------------------------------------------------------------------------------------

def _pattern(config: Mapping[str, Any], key: str, value_type: type, file: Path) -> dict[str, Any]:
    pattern = require(config, key, dict, file=file, default=None, allow_none=True) or {}
    for k in pattern:
        require(pattern, k, value_type, file=file)
        try:
            re.compile(k)
        except re.error as exc:
            raise LoraError(f"{key} key {k!r} is not a valid regular expression ({exc})",
                            file=file, key=key) from None
    return pattern


def _check_unsupported(config: Mapping[str, Any], file: Path) -> None:
    for field, why in _UNSUPPORTED.items():
        value = config.get(field)
        if value not in (None, False, [], {}, ""):
            raise LoraError(f"{field}={value!r} is not supported: {why}, which no other format "
                            "can express", file=file, key=field)


def _split_keys(tensors: Mapping[str, np.ndarray], file: Path, extra_tensors: str
                ) -> tuple[dict[str, dict[str, np.ndarray]], bool, list[str]]:
    """``{module: {part: tensor}}``, whether keys carried PEFT's prefix, and ignored keys."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    prefixed = [k.startswith(PREFIX) for k in tensors]
    if any(prefixed) and not all(prefixed):
        odd = [k for k, p in zip(tensors, prefixed) if not p][:5]
        raise LoraError(f"some tensor names start with {PREFIX!r} and some do not, e.g. {odd}",
                        file=file)
    for key, value in tensors.items():
        match = _KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else key)
        if match is None:
            unknown.append(key)
            continue
        part, leaf = match["part"], match["leaf"]
        if part == "lora_B" and leaf == "bias":
            raise LoraError("lora_B has a bias (PEFT lora_bias=True): a bias term is not LoRA "
                            "and is not supported", file=file, key=key)
        if leaf not in _LEAF_OF[part]:
            unknown.append(key)
            continue
        slot = parts.setdefault(match["module"], {})
        if part in slot:
            raise LoraError(f"two tensors give {part} of module {match['module']!r} (with and "
                            "without the adapter name 'default')", file=file, key=key)
        slot[part] = value
    ignored: list[str] = []
    if unknown:
        if extra_tensors != "ignore":
            raise LoraError(f"{len(unknown)} tensors are not LoRA tensors (modules_to_save, saved "
                            f"embedding or bias weights, other PEFT methods): {unknown[:12]}"
                            f"{' ...' if len(unknown) > 12 else ''}. Pass extra_tensors='ignore' "
                            "to load only the LoRA part", file=file)
        ignored = unknown
    return parts, all(prefixed) and bool(prefixed), ignored


def _restore_entry(adapter_modules: dict[str, LoraModule], entry: Any, notes: list[str]
                   ) -> dict[str, Any]:
    """Apply our own header entry: original alpha and rule of modules PEFT could not express."""
    if not isinstance(entry, dict):
        notes.append("the portable_lora header entry is not an object: ignored")
        return {}
    originals = entry.get("modules", {})
    if isinstance(originals, dict):
        for name, spec in originals.items():
            module = adapter_modules.get(name)
            if module is None or not isinstance(spec, dict):
                continue
            alpha, rule = spec.get("alpha"), spec.get("rule")
            try:
                original = core.effective_scale(alpha, module.rank, rule)
            except LoraError:
                notes.append(f"{name}: unreadable original alpha/rule in the header: ignored")
                continue
            # only when the file still means what we wrote (nobody edited the config since)
            if math.isclose(original, module.scale, rel_tol=1e-12, abs_tol=0.0):
                module.alpha, module.rule = float(alpha), rule
            else:
                notes.append(f"{name}: the header's original scale {original} differs from the "
                             f"config's {module.scale}: the config wins")
    provenance = entry.get("provenance")
    if not isinstance(provenance, dict):
        return {}
    # what the earlier writer knew about its own input; where this file lies is told anew
    return carried_provenance(provenance, NAME)


def load(path: Path, *, convention: str | None = None, extra_tensors: str = "error",
         **options: Any) -> Adapter:
    """Read a PEFT LoRA adapter (a directory, or its ``adapter_model.safetensors``).

    ``convention`` overrides the rule the config states (recorded in provenance).
    ``extra_tensors="ignore"`` skips tensors that are not LoRA factors (e.g. the embedding
    base weights PEFT saves beside an embedding LoRA), listing them in provenance.
    """
    if options:
        raise LoraError(f"unknown options for the peft format: {sorted(options)}; it reads "
                        "convention and extra_tensors ('error' or 'ignore')", file=path)
    if extra_tensors not in ("error", "ignore"):
        raise LoraError(f"extra_tensors must be 'error' or 'ignore', found {extra_tensors!r}",
                        key="extra_tensors")
    found = _find(path)
    if found is None:
        raise LoraError(f"expected a PEFT adapter directory or its {WEIGHTS_NAME}", file=path)
    config_path, weights_path = found
    if not config_path.is_file():
        raise LoraError(f"no {CONFIG_NAME} in {config_path.parent} (a PEFT adapter keeps one beside "
                        "its weights)", file=path)
    if not weights_path.is_file():
        raise LoraError(f"no {WEIGHTS_NAME} (pickled adapter_model.bin files are refused)",
                        file=weights_path.parent)
    config = read_json(config_path)
    peft_type = require(config, "peft_type", str, file=config_path)
    if peft_type != "LORA":
        raise LoraError(f"peft_type {peft_type!r} is not supported: only LORA adapters are "
                        "low-rank B @ A pairs", file=config_path, key="peft_type")
    _check_unsupported(config, config_path)
    r = require(config, "r", int, file=config_path, default=8)
    if r <= 0:
        raise LoraError(f"r must be a positive integer, found {r}", file=config_path, key="r")
    lora_alpha = require(config, "lora_alpha", float, file=config_path, default=8)
    use_rslora = require(config, "use_rslora", bool, file=config_path, default=False)
    use_dora = require(config, "use_dora", bool, file=config_path, default=False)
    fan_in_fan_out = require(config, "fan_in_fan_out", bool, file=config_path, default=False)
    rank_pattern = _pattern(config, "rank_pattern", int, config_path)
    alpha_pattern = _pattern(config, "alpha_pattern", float, config_path)
    base_model = require(config, "base_model_name_or_path", str, file=config_path, default=None,
                         allow_none=True)
    file_rule = core.ALPHA_OVER_SQRT_RANK if use_rslora else core.ALPHA_OVER_RANK
    rule = file_rule if convention is None else core.check_rule(convention)

    tensors, metadata = read_tensors(weights_path)
    parts, prefixed, ignored = _split_keys(tensors, weights_path, extra_tensors)
    if not parts:
        raise LoraError("the file holds no LoRA tensors", file=weights_path)

    modules: dict[str, LoraModule] = {}
    for name, slot in parts.items():
        if "lora_embedding_A" in slot or "lora_embedding_B" in slot:
            kind, a_key, b_key = "embedding", "lora_embedding_A", "lora_embedding_B"
            if "lora_A" in slot or "lora_B" in slot:
                raise LoraError("module has both linear and embedding LoRA tensors", file=weights_path,
                                key=name)
        else:
            kind, a_key, b_key = "linear", "lora_A", "lora_B"
        for needed in (a_key, b_key):
            if needed not in slot:
                raise LoraError(f"incomplete LoRA pair: module {name!r} has no {needed}",
                                file=weights_path, key=name)
        A, B = slot[a_key], slot[b_key]
        if kind == "linear" and A.ndim == 4:
            kind = "conv"
        elif kind == "linear" and A.ndim != 2:
            raise LoraError(f"lora_A with {A.ndim} dimensions {list(A.shape)}: only linear, "
                            "embedding and 2-D convolution LoRA are supported", file=weights_path,
                            key=f"{name}.lora_A")
        magnitude = slot.get("lora_magnitude_vector")
        if magnitude is not None and not use_dora:
            raise LoraError("a lora_magnitude_vector is present but use_dora is false",
                            file=weights_path, key=name)
        if magnitude is None and use_dora:
            raise LoraError("use_dora is true but this module has no lora_magnitude_vector",
                            file=weights_path, key=name)
        if magnitude is not None and kind == "conv" and magnitude.ndim == 4:
            magnitude = magnitude.reshape(-1)  # PEFT keeps conv magnitudes as (1, out, 1, 1)
        r_key = pattern_key(rank_pattern, name)
        expected = rank_pattern.get(r_key, r)
        if A.shape[0] != expected:
            source = f"rank_pattern[{r_key!r}]" if r_key in rank_pattern else "r"
            raise LoraError(f"the config gives rank {expected} ({source}) but {a_key} has rank "
                            f"{A.shape[0]} {list(A.shape)}", file=weights_path, key=f"{name}.{a_key}")
        alpha = float(alpha_pattern.get(pattern_key(alpha_pattern, name), lora_alpha))
        modules[name] = module_from(A, B, alpha=alpha, rule=rule, kind=kind, magnitude=magnitude,
                                    name=name, file=weights_path)

    notes: list[str] = []
    carried: dict[str, Any] = {}
    if METADATA_KEY in metadata and convention is None:
        entry = parse_json(metadata[METADATA_KEY], file=weights_path, key=METADATA_KEY)
        carried = _restore_entry(modules, entry, notes)

    provenance: dict[str, Any] = {}
    provenance.update(carried)
    provenance.update(convention_provenance(
        convention, file_rule, f"{CONFIG_NAME}: use_rslora is {str(use_rslora).lower()}, so PEFT "
        f"scales by {'lora_alpha / sqrt(r)' if use_rslora else 'lora_alpha / r'}"))
    provenance["fan_in_fan_out"] = fan_in_fan_out
    provenance["peft"] = {k: config[k] for k in ("task_type", "peft_version", "revision",
                                                 "init_lora_weights")
                          if k in config and isinstance(config[k], (str, bool, type(None)))}
    provenance["peft"]["key_prefix"] = PREFIX if prefixed else ""
    if ignored:
        provenance["ignored_tensors"] = ignored
        # what the ignored tensors were for: the config fields that made PEFT save them
        for field in ("bias", "modules_to_save"):
            if config.get(field) not in (None, "none", []):
                provenance["peft"][field] = config[field]
    if notes:
        provenance["notes"] = notes
    provenance["source_format"] = NAME
    return Adapter(modules, base_model=base_model, provenance=provenance)


# -- save ------------------------------------------------------------------------------------

def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def explicit_patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """A PEFT pattern dict under which every module in ``values`` resolves to its value.

    Keys are exact module names, longest first; a module whose default would be captured by
    a shorter key (its name ends with ``.<key>``) gets its own entry.
    """
    # what a key can match under PEFT's rule: a module name's tail that starts at a dot, by length
    tails: dict[int, set[str]] = {}
    for other in values:
        parts = other.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            tails.setdefault(len(tail), set()).add(tail)

    def key(name: str) -> str:
        # PEFT reads keys as regular expressions: names with other characters are escaped, and
        # so are names whose dots (any character, read so) would also match another module's
        # tail of the same length (a tail equal to the name is a capture the loop below repairs)
        if not re.fullmatch(r"[\w.]+", name):
            return re.escape(name)
        loose = re.compile(name)
        if any(tail != name and loose.fullmatch(tail) for tail in tails.get(len(name), ())):
            return re.escape(name)
        return name

    def ordered(p):
        return dict(sorted(p.items(), key=lambda kv: (-len(kv[0]), kv[0])))

    pattern = ordered({key(n): v for n, v in values.items() if v != default})
    for _ in range(len(values) + 1):
        wrong = [n for n, v in values.items() if pattern.get(pattern_key(pattern, n), default) != v]
        if not wrong:
            return pattern
        for n in wrong:
            pattern[key(n)] = values[n]
        pattern = ordered(pattern)
    raise LoraError("cannot express the per-module values as a PEFT pattern")  # unreachable


def save(adapter: Adapter, path: Path, *, fan_in_fan_out: bool | None = None,
         task_type: str | None = None, **options: Any) -> None:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained(model, path)`` loads.

    ``fan_in_fan_out`` defaults to the adapter's provenance (True for GPT-2 ``Conv1D`` adapters);
    ``task_type`` (e.g. ``"CAUSAL_LM"``) to the one a PEFT source recorded.
    """
    if options:
        raise LoraError(f"unknown options for the peft format: {sorted(options)}", file=path)
    if not adapter:
        raise LoraError("the adapter has no modules", file=path)
    if path.suffix == ".safetensors":
        raise LoraError("a PEFT adapter is a directory (adapter_model.safetensors and "
                        "adapter_config.json); give the directory's path", file=path)
    check_replaceable(path, REPLACEABLE, fmt=NAME)
    dora = {m.is_dora for m in adapter.values()}
    if len(dora) > 1:
        mixed = [n for n, m in adapter.items() if not m.is_dora][:5]
        raise LoraError(f"PEFT's use_dora is one flag per adapter; these modules are not DoRA "
                        f"while others are: {mixed}", file=path)
    use_dora = dora.pop()
    if fan_in_fan_out is None:
        fan_in_fan_out = bool(adapter.provenance.get("fan_in_fan_out", False))
    peft_info = adapter.provenance.get("peft") if isinstance(adapter.provenance.get("peft"), dict) else {}
    if task_type is None and isinstance(peft_info.get("task_type"), str):
        task_type = peft_info["task_type"]

    # PEFT has one rule: keep the one most modules use; others get the alpha giving their scale
    native = Counter(m.rule for m in adapter.values() if m.rule != core.RAW)
    use_rslora = native.get(core.ALPHA_OVER_SQRT_RANK, 0) > native.get(core.ALPHA_OVER_RANK, 0)
    peft_rule = core.ALPHA_OVER_SQRT_RANK if use_rslora else core.ALPHA_OVER_RANK
    alphas: dict[str, float] = {}
    originals: dict[str, dict[str, Any]] = {}
    for name, m in adapter.items():
        if m.rule == peft_rule:
            alphas[name] = m.alpha
        else:
            alphas[name] = core.alpha_for_scale(m.scale, m.rank, peft_rule)
            originals[name] = {"alpha": m.alpha, "rule": m.rule}
    ranks = {n: m.rank for n, m in adapter.items()}
    r = _most_common(ranks.values())
    lora_alpha = _most_common(alphas.values())

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": _json_number(lora_alpha),
        "use_rslora": use_rslora,
        "rank_pattern": explicit_patterns(ranks, r),
        "alpha_pattern": {k: _json_number(v) for k, v in explicit_patterns(alphas, lora_alpha).items()},
        "target_modules": list(adapter),
        "use_dora": use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        # modules PEFT wraps beyond ours (a target name is also a suffix match) start at ΔW = 0
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    tensors: dict[str, np.ndarray] = {}
    for name, m in adapter.items():
        key = PREFIX + name
        if m.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = m.A
            tensors[f"{key}.lora_embedding_B"] = m.B
        else:
            tensors[f"{key}.lora_A.weight"] = m.A
            tensors[f"{key}.lora_B.weight"] = m.B
        if m.magnitude is not None:
            mag = m.magnitude.reshape(1, -1, 1, 1) if m.kind == "conv" else m.magnitude
            tensors[f"{key}.lora_magnitude_vector"] = mag
    entry = {"format": NAME, "version": 1, "base_model": adapter.base_model,
             "provenance": adapter.provenance, "modules": originals}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps(entry, allow_nan=False, default=str)}
    text = json.dumps(config, indent=2, allow_nan=False)
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
