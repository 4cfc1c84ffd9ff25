"""mlx-lm adapters: a directory with ``adapters.safetensors`` and ``adapter_config.json``.

What the files mean (``mlx_lm/tuner/lora.py``, ``dora.py`` and ``utils.py``):

* tensors ``<module>.lora_a`` (in, r) = Aᵀ and ``<module>.lora_b`` (r, out) = Bᵀ, the
  transpose of this library's orientation; embeddings the same way (``lora_a``
  (num_embeddings, r), ``lora_b`` (r, dim)); DoRA ``<module>.m`` (out,). Module names are the
  model's (``model.layers.0.self_attn.q_proj``), used as they are.
* ``adapter_config.json``: ``fine_tune_type`` (``lora`` / ``dora``), ``num_layers`` (how many
  blocks, counted from the last, get LoRA layers; -1 = all) and ``lora_parameters``
  ``{rank, scale, dropout, keys}``: one rank and one **raw** scale for every module (rule
  ``raw``, alpha = scale). ``keys`` are module paths inside each block (``self_attn.q_proj``)
  or full module names.

Orientation comes from the format, never from shapes. Which modules are embeddings cannot be
read from the tensors: names ending in a known embedding name (``embed_tokens``, ``wte``, ...)
are taken as embeddings unless ``embedding_modules=`` says otherwise.

Saving folds each module's scale into its B (``_common.to_uniform``: exact where the scale
already equals the global one, one rounding otherwise, with a warning if low-precision values
underflow) and zero-pads ranks to the largest, so every ΔW is kept. The config's
``portable_lora`` entry keeps each module's original rank, alpha, rule and kind: loading our
own output restores them (padding is trimmed only where it is still exactly zero), so
portable → mlx-lm → portable is bit-exact when no scale had to be folded.

>>> import portable_lora as pl
>>> pl.save(pl.load("peft-dir"), "mlx-dir", format="mlx-lm")    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..io.atomic import atomic_directory
from ..io.safetensors_io import LazyTensor, SafetensorsFile, write_safetensors
from ._common import (carried_provenance, check_replaceable, convention_provenance, module_from, read_json, read_tensors,
                      require, to_uniform, transposed)

__all__ = ["NAME", "CONFIG_NAME", "WEIGHTS_NAME", "REPLACEABLE", "ENTRY", "EMBEDDING_NAMES", "detect", "load", "save"]

NAME = "mlx-lm"
LAYOUT = "directory"  # weights and a JSON config side by side
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
REPLACEABLE = {CONFIG_NAME, WEIGHTS_NAME}  # what save may replace in an existing directory
ENTRY = "portable_lora"  # our own entry in adapter_config.json (both mlx tools ignore it)
ENTRY_VERSION = 1
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "embedding")
# top-level modules of mlx-vlm models: a tensor outside them is not an mlx-vlm name
VLM_TOP_LEVEL = ("language_model.", "vision_tower.", "vision_model.", "multi_modal_projector.",
                 "mm_projector.", "aligner.", "connector.", "audio_tower.", "embed_audio.",
                 "embed_vision.")
_LEAVES = ("lora_a", "lora_b", "m")
_BLOCK = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


# -- finding and telling mlx-lm from mlx-vlm --------------------------------------------------

def find_files(path: Path, weights_names: tuple[str, ...]) -> tuple[Path, Path] | None:
    """(config, weights) for an adapter directory, or a weights file with the config beside it."""
    if path.is_dir():
        config = path / CONFIG_NAME
        for name in weights_names:
            if (path / name).is_file():
                return config, path / name
        return config, path / weights_names[0]
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent / CONFIG_NAME, path
    return None


def read_mlx_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of an adapter file, validated by the strict reader."""
    return read_tensors(path)[0]


def _tensor_names(weights: Path) -> list[str]:
    try:
        with SafetensorsFile(weights) as f:
            return list(f.keys())
    except LoraError:
        return []


def flavour(config: Mapping[str, Any], weights: Path) -> str | None:
    """``mlx-lm``, ``mlx-vlm``, ``mlx-vlm-legacy`` or None (not an mlx adapter config).

    mlx-vlm writes only ``fine_tune_type``, ``num_layers`` and ``lora_parameters`` and names
    tensors from the VLM's root (``language_model.``); mlx-lm's trainer writes its whole
    command line, ``model`` included.
    """
    if "peft_type" in config:
        return None
    entry = config.get(ENTRY)
    if isinstance(entry, dict) and entry.get("format") in ("mlx-lm", "mlx-vlm"):
        return entry["format"]
    if "lora_parameters" not in config:
        return "mlx-vlm-legacy" if "rank" in config else None
    if not isinstance(config["lora_parameters"], dict):
        return None
    names = _tensor_names(weights) if weights.is_file() else []
    if ("model" not in config and names and all(n.startswith(VLM_TOP_LEVEL) for n in names)
            and any(n.startswith("language_model.") for n in names)):
        return "mlx-vlm"
    return "mlx-lm"


def sniff(path: Path, weights_names: Iterable[str]) -> tuple[str | None, tuple[Path, Path]] | None:
    """``(flavour, (config, weights))`` for an mlx adapter at ``path``; None when it is not one
    (for ``detect``: never raises)."""
    found = find_files(path, tuple(weights_names))
    if found is None or not found[0].is_file() or not found[1].is_file():
        return None
    try:
        config = read_json(found[0])
    except LoraError:
        return None
    return flavour(config, found[1]), found


def detect(path: Path) -> str | None:
    sniffed = sniff(path, (WEIGHTS_NAME,))
    if sniffed is None or sniffed[0] != NAME:
        return None
    found = sniffed[1]
    return f"{CONFIG_NAME} with lora_parameters (rank, scale) and {found[1].name} (mlx-lm layout)"


# -- load ------------------------------------------------------------------------------------

def _embedding_names(names: Iterable[str], embedding_modules: Iterable[str] | None) -> set[str]:
    if embedding_modules is not None:
        return set(embedding_modules)
    return {n for n in names if n.rsplit(".", 1)[-1] in EMBEDDING_NAMES}


def _restore(name: str, module: LoraModule, spec: Any, global_scale: float,
             notes: list[str]) -> LoraModule:
    """Undo our own padding and rule change where the file still holds what we wrote."""
    if not isinstance(spec, dict):
        return module
    try:
        rank0 = core.check_rank(spec.get("rank"))
        alpha0 = core.check_alpha(spec.get("alpha"))
        rule0 = core.check_rule(spec.get("rule"))
        kind0 = spec.get("kind", module.kind)
    except LoraError:
        notes.append(f"{name}: unreadable entry in {ENTRY}: ignored")
        return module
    A, B, mag = module.A, module.B, module.magnitude
    if kind0 in ("linear", "embedding"):
        kind = kind0
    else:
        notes.append(f"{name}: {ENTRY} names kind {kind0!r}: ignored")
        kind = module.kind
    if rank0 < module.rank:
        if not np.any(A[rank0:]) and not np.any(B[:, rank0:]):
            A, B = A[:rank0].copy(), B[:, :rank0].copy()
        else:
            notes.append(f"{name}: the rank padding beyond {rank0} is no longer zero: kept")
    elif rank0 > module.rank:
        notes.append(f"{name}: {ENTRY} says rank {rank0} but the file has {module.rank}: ignored")
    rank = A.shape[0]
    if rank == rank0 and core.effective_scale(alpha0, rank0, rule0) == global_scale:
        alpha, rule = alpha0, rule0  # nothing was folded: the original numbers, bit for bit
    else:
        # the file's B carries s_m / s; keep it and express the global scale in the original rule
        alpha, rule = core.alpha_for_scale(global_scale, rank, rule0), rule0
    return LoraModule(A, B, alpha=alpha, rule=rule, kind=kind, magnitude=mag)


def load_layout(config_path: Path, weights_path: Path, *, fmt: str, convention: str | None,
                embedding_modules: Iterable[str] | None) -> Adapter:
    """Read the mlx-lm layout (shared by mlx-lm and the current mlx-vlm format)."""
    if not config_path.is_file():
        raise LoraError(f"no {CONFIG_NAME} in {config_path.parent} (an {fmt} adapter keeps one "
                        "beside its weights)", file=weights_path)
    if not weights_path.is_file():
        held = sorted(q.name for q in weights_path.parent.iterdir())[:12] if weights_path.parent.is_dir() else []
        raise LoraError(f"no {weights_path.name} (the {fmt} weights) in {weights_path.parent}; it holds "
                        f"{held}", file=weights_path.parent)
    config = read_json(config_path)
    fine_tune_type = require(config, "fine_tune_type", str, file=config_path, default="lora")
    if fine_tune_type == "full":
        raise LoraError("fine_tune_type 'full': the file holds fully fine-tuned weights, not an "
                        "adapter", file=config_path, key="fine_tune_type")
    if fine_tune_type not in ("lora", "dora"):
        raise LoraError(f"unknown fine_tune_type {fine_tune_type!r}; expected 'lora' or 'dora'",
                        file=config_path, key="fine_tune_type")
    params = require(config, "lora_parameters", dict, file=config_path)
    rank = require(params, "rank", int, file=config_path)
    scale = float(require(params, "scale", float, file=config_path))
    if rank <= 0 or not math.isfinite(scale):
        raise LoraError(f"lora_parameters needs a positive rank and a finite scale, found rank "
                        f"{rank} and scale {scale}", file=config_path, key="lora_parameters")
    keys = require(params, "keys", list, file=config_path, default=None, allow_none=True)
    num_layers = require(config, "num_layers", int, file=config_path, default=None, allow_none=True)

    tensors = read_mlx_tensors(weights_path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES or not module:
            unknown.append(key)
            continue
        parts.setdefault(module, {})[leaf] = value
    if unknown:
        raise LoraError(f"{len(unknown)} tensors are not adapter tensors (expected <module>.lora_a, "
                        f".lora_b or .m): {unknown[:12]}{' ...' if len(unknown) > 12 else ''}",
                        file=weights_path)
    if not parts:
        raise LoraError("the file holds no LoRA tensors", file=weights_path)

    rule = core.RAW if convention is None else core.check_rule(convention)
    embeddings = _embedding_names(parts, embedding_modules)
    modules: dict[str, LoraModule] = {}
    for name, slot in parts.items():
        for leaf in ("lora_a", "lora_b"):
            if leaf not in slot:
                raise LoraError(f"incomplete LoRA pair: module {name!r} has no {leaf}",
                                file=weights_path, key=name)
        lora_a, lora_b = slot["lora_a"], slot["lora_b"]
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise LoraError(f"lora_a {list(lora_a.shape)} / lora_b {list(lora_b.shape)}: only 2-D "
                            "factors are supported (3-D ones are mlx-lm's mixture-of-experts "
                            "LoRASwitchLinear)", file=weights_path, key=f"{name}.lora_a")
        if lora_a.shape[1] != rank or lora_b.shape[0] != rank:
            raise LoraError(f"lora_parameters.rank is {rank} but lora_a is {list(lora_a.shape)} "
                            f"and lora_b {list(lora_b.shape)} (expected (in, {rank}) and "
                            f"({rank}, out))", file=weights_path, key=f"{name}.lora_a")
        magnitude = slot.get("m")
        if (magnitude is not None) != (fine_tune_type == "dora"):
            raise LoraError(f"fine_tune_type is {fine_tune_type!r} but this module "
                            f"{'has' if magnitude is not None else 'has no'} DoRA magnitude 'm'",
                            file=weights_path, key=name)
        # the format stores the transposes: A = lora_aᵀ (r, in), B = lora_bᵀ (out, r)
        A = transposed(lora_a)
        B = transposed(lora_b)
        kind = "embedding" if name in embeddings else "linear"
        modules[name] = module_from(A, B, alpha=scale, rule=rule, kind=kind, magnitude=magnitude,
                                    name=name, file=weights_path)

    notes: list[str] = []
    provenance: dict[str, Any] = {}
    base_model = None
    entry = config.get(ENTRY)
    if isinstance(entry, dict) and convention is None:
        if entry.get("scale") != scale:
            notes.append(f"the {ENTRY} entry was written for scale {entry.get('scale')!r}, the "
                         f"config now says {scale!r}: entry ignored")
        else:
            specs = entry.get("modules") if isinstance(entry.get("modules"), dict) else {}
            for name in modules:
                if name in specs:
                    m = _restore(name, modules[name], specs[name], scale, notes)
                    modules[name] = module_from(m.A, m.B, alpha=m.alpha, rule=m.rule, kind=m.kind,
                                                magnitude=m.magnitude, name=name, file=weights_path)
            carried = entry.get("provenance")
            if isinstance(carried, dict):
                provenance.update(carried_provenance(carried, fmt))
            if isinstance(entry.get("base_model"), str):
                base_model = entry["base_model"]
    provenance.update(convention_provenance(
        convention, core.RAW, f"{CONFIG_NAME}: {fmt} multiplies B @ A by lora_parameters.scale as is"))
    provenance[fmt.replace("-", "_")] = {"num_layers": num_layers, "keys": keys,
                                         "fine_tune_type": fine_tune_type, "rank": rank,
                                         "scale": scale}
    guessed = sorted(n for n in embeddings if n in modules)
    if guessed and embedding_modules is None and not isinstance(entry, dict):
        provenance["embedding_modules"] = guessed
        notes.append("modules taken as embeddings by their names: " + ", ".join(guessed))
    if notes:
        provenance["notes"] = notes
    provenance["source_format"] = fmt
    return Adapter(modules, base_model=base_model, provenance=provenance)


def load(path: Path, *, convention: str | None = None,
         embedding_modules: Iterable[str] | None = None, **options: Any) -> Adapter:
    """Read an mlx-lm adapter (a directory, or its ``adapters.safetensors``).

    ``convention`` reinterprets ``lora_parameters.scale`` under another rule (recorded);
    ``embedding_modules`` names the modules that are embeddings (default: by name).
    """
    if options:
        raise LoraError(f"unknown options for the mlx-lm format: {sorted(options)}", file=path)
    found = find_files(path, (WEIGHTS_NAME,))
    if found is None:
        raise LoraError(f"expected an mlx-lm adapter directory or its {WEIGHTS_NAME}", file=path)
    return load_layout(*found, fmt=NAME, convention=convention, embedding_modules=embedding_modules)


# -- save ------------------------------------------------------------------------------------

def block_keys(names: Iterable[str], num_hidden_layers: int | None) -> tuple[list[str], int]:
    """mlx-lm ``keys`` and ``num_layers`` that wrap every named module.

    Modules inside numbered blocks (``<container>.<i>.<path>``, one container) become the
    block-relative ``<path>`` keys mlx-lm matches in each of the last ``num_layers`` blocks;
    ``num_layers`` reaches the lowest block used (-1, all blocks, unless ``num_hidden_layers``
    is known). Blocks wrapped without tensors in the file keep lora_b = 0: ΔW = 0 there.
    Other modules (or blocks in several containers) are keyed by full name.
    """
    names = list(names)
    matches = {n: _BLOCK.match(n) for n in names}
    containers = {m["container"] for m in matches.values() if m}
    if len(containers) != 1:
        return names, -1
    keys: list[str] = []
    low, high = None, None
    for name, m in matches.items():
        key = m["rest"] if m else name
        if key not in keys:
            keys.append(key)
        if m:
            index = int(m["index"])
            low = index if low is None else min(low, index)
            high = index if high is None else max(high, index)
    if num_hidden_layers is None or low is None:
        return keys, -1
    if high >= num_hidden_layers:
        raise LoraError(f"num_hidden_layers is {num_hidden_layers} but the adapter has a module in "
                        f"block {high}", key="num_hidden_layers")
    return keys, num_hidden_layers - low


def save_layout(adapter: Adapter, path: Path, *, fmt: str, keys: list[str] | None, num_layers: int,
                scale: float | None, weights_name: str = WEIGHTS_NAME) -> None:
    """Write the mlx-lm layout: one rank, one raw scale, transposed factors, our entry."""
    if not adapter:
        raise LoraError("the adapter has no modules", file=path)
    if path.suffix == ".safetensors":
        raise LoraError(f"an {fmt} adapter is a directory ({weights_name} and {CONFIG_NAME}); give "
                        "the directory's path", file=path)
    check_replaceable(path, {CONFIG_NAME, weights_name}, fmt=fmt)
    for name, m in adapter.items():
        if m.kind == "conv":
            raise LoraError(f"{fmt} has no convolution LoRA", file=path, key=name)
    dora = {m.is_dora for m in adapter.values()}
    if len(dora) > 1:
        mixed = [n for n, m in adapter.items() if not m.is_dora][:5]
        raise LoraError(f"{fmt}'s fine_tune_type is one for the whole adapter; these modules are "
                        f"not DoRA while others are: {mixed}", file=path)
    use_dora = dora.pop()
    factors, rank, global_scale = to_uniform(adapter, scale=scale, file=path)
    tensors: dict[str, np.ndarray | LazyTensor] = {}
    for name, (A, B) in factors.items():
        # transposed as the writer reaches them: one factor's copy alive at a time, whose
        # freed memory the next reuses (fresh pages for all of them cost a fault each)
        tensors[f"{name}.lora_a"] = LazyTensor(A.dtype, A.shape[::-1], partial(transposed, A))  # (in, r)
        tensors[f"{name}.lora_b"] = LazyTensor(B.dtype, B.shape[::-1], partial(transposed, B))  # (r, out)
        if adapter[name].magnitude is not None:
            tensors[f"{name}.m"] = adapter[name].magnitude
    entry = {
        "format": fmt, "version": ENTRY_VERSION, "scale": global_scale,
        "base_model": adapter.base_model, "provenance": adapter.provenance,
        "modules": {n: {"rank": m.rank, "alpha": m.alpha, "rule": m.rule, "kind": m.kind}
                    for n, m in adapter.items()},
    }
    params: dict[str, Any] = {"rank": rank, "scale": global_scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    config = {"fine_tune_type": "dora" if use_dora else "lora", "num_layers": num_layers,
              "lora_parameters": params, ENTRY: entry}
    text = json.dumps(config, indent=4, allow_nan=False, default=str)
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / weights_name, tensors)
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")


def save(adapter: Adapter, path: Path, *, scale: float | None = None,
         num_hidden_layers: int | None = None, **options: Any) -> None:
    """Write an mlx-lm adapter directory that ``mlx_lm.tuner.utils.load_adapters`` loads.

    ``scale`` is the one global scale (default: the most common module scale, so nothing is
    folded in the common case). ``num_hidden_layers`` (the model's depth) lets ``num_layers``
    stop at the lowest block with LoRA instead of wrapping every block.
    """
    if options:
        raise LoraError(f"unknown options for the mlx-lm format: {sorted(options)}", file=path)
    keys, num_layers = block_keys(adapter, num_hidden_layers)
    save_layout(adapter, path, fmt=NAME, keys=keys, num_layers=num_layers, scale=scale)
