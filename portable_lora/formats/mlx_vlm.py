"""mlx-vlm adapters: the mlx-lm layout named from the vision-language model's root.

Current format (``mlx_vlm/trainer/peft/utils.py``): ``adapter_config.json`` holds only
``fine_tune_type``, ``num_layers`` (-1) and ``lora_parameters`` ``{rank, dropout, scale,
keys}`` where ``scale`` is α/r computed at training time (used raw) and ``keys`` are full
module names; tensors ``language_model.model.layers.0.self_attn.q_proj.lora_a`` (in, r) /
``.lora_b`` (r, out) / ``.m``, read exactly as mlx-lm's (see :mod:`.mlx_lm`). The weights file
is ``adapters.safetensors`` (or ``weights.safetensors``, or any file with the config beside it).

Module names keep the ``language_model.`` prefix, so an mlx-vlm adapter becomes an mlx-lm or
PEFT adapter of the text model only after a rename, and the other way round::

    text_only = adapter.rename(lambda n: n.removeprefix("language_model."))
    for_vlm = adapter.rename(lambda n: "language_model." + n)

Legacy ``LoRaLayer`` files (top-level ``rank``, ``alpha`` and ``dropout`` in the config;
tensors ``<module>.A`` (in, r) and ``<module>.B`` (r, out)) are read too. Their alpha meant the
raw scale before mlx-vlm's fix (issue 845 / PR 846, April 2026) and alpha/rank after; nothing
in the file says which. Without ``convention=`` the current meaning (alpha/rank) is used and
the choice is recorded in provenance; ``convention="raw"`` restores the old behaviour. A
missing alpha is 0.1, as mlx-vlm's loader assumes. Saving writes the current format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import core
from ..adapter import Adapter
from ..errors import LoraError
from ._common import convention_provenance, module_from, read_json, require, transposed
from .mlx_lm import (CONFIG_NAME, REPLACEABLE, VLM_TOP_LEVEL, find_files, flavour, load_layout, read_mlx_tensors,
                     save_layout, sniff)

__all__ = ["NAME", "WEIGHTS_NAMES", "REPLACEABLE", "LEGACY_DEFAULT_ALPHA", "detect", "load", "save"]

NAME = "mlx-vlm"
LAYOUT = "directory"  # weights and a JSON config side by side
WEIGHTS_NAMES = ("adapters.safetensors", "weights.safetensors")
LEGACY_DEFAULT_ALPHA = 0.1  # mlx-vlm's fallback for a legacy config without alpha
_LEGACY_REASON = ("legacy mlx-vlm LoRaLayer file: its alpha meant the raw scale before mlx-vlm "
                  "PR 846 (April 2026) and alpha/rank after, and nothing in the file says which; "
                  "read with the current meaning. Pass convention='raw' for adapters trained "
                  "before the fix")


def _files(path: Path) -> tuple[Path, Path] | None:
    return find_files(path, WEIGHTS_NAMES)


def detect(path: Path) -> str | None:
    sniffed = sniff(path, WEIGHTS_NAMES)
    if sniffed is None:
        return None
    kind, found = sniffed
    if kind == "mlx-vlm-legacy":
        return f"{CONFIG_NAME} with top-level rank and alpha (legacy mlx-vlm LoRaLayer)"
    if kind == NAME:
        return (f"{CONFIG_NAME} with lora_parameters and tensor names from the model root "
                "('language_model.'): mlx-vlm")
    return None


def _load_legacy(config_path: Path, weights_path: Path, convention: str | None) -> Adapter:
    config = read_json(config_path)
    rank = require(config, "rank", int, file=config_path)
    if rank <= 0:
        raise LoraError(f"rank must be a positive integer, found {rank}", file=config_path, key="rank")
    alpha = float(require(config, "alpha", float, file=config_path, default=LEGACY_DEFAULT_ALPHA))
    rule = core.ALPHA_OVER_RANK if convention is None else core.check_rule(convention)
    tensors = read_mlx_tensors(weights_path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("A", "B") or not module:
            unknown.append(key)
            continue
        parts.setdefault(module, {})[leaf] = value
    if unknown:
        raise LoraError(f"{len(unknown)} tensors are not legacy LoRaLayer tensors (expected "
                        f"<module>.A or .B): {unknown[:12]}", file=weights_path)
    if not parts:
        raise LoraError("the file holds no LoRA tensors", file=weights_path)
    provenance = convention_provenance(convention, core.ALPHA_OVER_RANK, _LEGACY_REASON)
    provenance["mlx_vlm"] = {"legacy": True, "rank": rank, "alpha": alpha,
                             "alpha_given": "alpha" in config}
    provenance["source_format"] = NAME
    adapter = Adapter(provenance=provenance)
    for name, slot in parts.items():
        for leaf in ("A", "B"):
            if leaf not in slot:
                raise LoraError(f"incomplete LoRA pair: module {name!r} has no {leaf}",
                                file=weights_path, key=name)
        a, b = slot["A"], slot["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise LoraError(f"rank is {rank} but A is {list(a.shape)} and B {list(b.shape)} "
                            f"(expected (in, {rank}) and ({rank}, out))", file=weights_path,
                            key=f"{name}.A")
        # LoRaLayer computes (x @ A) @ B: A is (in, r) = our Aᵀ, B is (r, out) = our Bᵀ
        adapter[name] = module_from(transposed(a), transposed(b),
                                    alpha=alpha, rule=rule, name=name, file=weights_path)
    return adapter


def load(path: Path, *, convention: str | None = None,
         embedding_modules: Iterable[str] | None = None, **options: Any) -> Adapter:
    """Read an mlx-vlm adapter, current or legacy (see the module docstring for ``convention``)."""
    if options:
        raise LoraError(f"unknown options for the mlx-vlm format: {sorted(options)}", file=path)
    found = _files(path)
    if found is None:
        raise LoraError("expected an mlx-vlm adapter directory or its .safetensors file", file=path)
    config_path, weights_path = found
    if not config_path.is_file():
        raise LoraError(f"no {CONFIG_NAME} in {config_path.parent} (an mlx-vlm adapter keeps one "
                        "beside its weights)", file=weights_path)
    if not weights_path.is_file():
        raise LoraError(f"no adapter weights ({' or '.join(WEIGHTS_NAMES)})", file=path)
    if flavour(read_json(config_path), weights_path) == "mlx-vlm-legacy":
        return _load_legacy(config_path, weights_path, convention)
    return load_layout(config_path, weights_path, fmt=NAME, convention=convention,
                       embedding_modules=embedding_modules)


def save(adapter: Adapter, path: Path, *, scale: float | None = None, **options: Any) -> None:
    """Write the current mlx-vlm format: every module listed by full name, ``num_layers`` -1.

    Names must be the VLM's (``language_model.…``): mlx-vlm loads weights non-strictly, so a
    name without the prefix would be skipped silently there. Rename first (module docstring).
    """
    if options:
        raise LoraError(f"unknown options for the mlx-vlm format: {sorted(options)}", file=path)
    outside = [n for n in adapter if not n.startswith(VLM_TOP_LEVEL)]
    if outside:
        raise LoraError(f"module names must start with the VLM's top-level module (e.g. "
                        f"'language_model.'); found {outside[:5]}. Rename with "
                        "adapter.rename(lambda n: 'language_model.' + n)", file=path)
    for name, m in adapter.items():
        if m.kind != "linear":
            raise LoraError(f"mlx-vlm puts LoRA on linear layers only, this module is {m.kind}",
                            file=path, key=name)
    save_layout(adapter, path, fmt=NAME, keys=list(adapter), num_layers=-1, scale=scale)
