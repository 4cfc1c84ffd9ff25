"""The portable format, version 1: one .safetensors file, weights and config together.

Specification: docs/FORMAT.md. Tensors ``<module>.lora_A`` (r, in, ...), ``<module>.lora_B``
(out, r, ...) and, for DoRA, ``<module>.magnitude`` (out,), stored as they are (no arithmetic,
so every dtype round-trips bit-exactly). The header metadata key ``portable_lora`` holds a JSON
config: format version, base model, provenance, and per module rank, alpha, rule, effective
scale, kind, and whether it is DoRA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import LoraError
from ..io.safetensors_io import SafetensorsFile, write_safetensors
from ._common import module_from, parse_json, peek_safetensors, require

NAME = "portable"
LAYOUT = "file"  # one .safetensors
METADATA_KEY = "portable_lora"
FORMAT_VERSION = 1
_SUFFIXES = {"lora_A": "A", "lora_B": "B", "magnitude": "magnitude"}


def detect(path: Path) -> str | None:
    peeked = peek_safetensors(path)
    if peeked is not None and METADATA_KEY in peeked[1]:
        return f"the safetensors header metadata has a {METADATA_KEY!r} entry"
    return None


def _config(adapter: Adapter) -> dict[str, Any]:
    return {
        "format": "portable-lora",
        "format_version": FORMAT_VERSION,
        "base_model": adapter.base_model,
        "provenance": adapter.provenance,
        "modules": {
            name: {"rank": m.rank, "alpha": m.alpha, "rule": m.rule, "scale": m.scale,
                   "kind": m.kind, "dora": m.is_dora}
            for name, m in adapter.items()
        },
    }


def save(adapter: Adapter, path: Path, **options: Any) -> None:
    if options:
        raise LoraError(f"unknown options for the portable format: {sorted(options)}", file=path)
    tensors = {}
    for name, m in adapter.items():
        tensors[f"{name}.lora_A"] = m.A
        tensors[f"{name}.lora_B"] = m.B
        if m.magnitude is not None:
            tensors[f"{name}.magnitude"] = m.magnitude
    try:
        config = json.dumps(_config(adapter), sort_keys=False, allow_nan=False, default=str)
    except ValueError as exc:  # NaN or infinity somewhere in the provenance
        raise LoraError(f"the config cannot be written as JSON: {exc}", file=path, key="provenance") from None
    write_safetensors(path, tensors, {METADATA_KEY: config})


def load(path: Path, *, convention: str | None = None, **options: Any) -> Adapter:
    if options:
        raise LoraError(f"unknown options for the portable format: {sorted(options)}", file=path)
    if convention is not None:
        raise LoraError("the portable format records its own rule per module; a convention "
                        "cannot be imposed on it", file=path, key="convention")
    with SafetensorsFile(path) as f:
        if METADATA_KEY not in f.metadata:
            raise LoraError(f"no {METADATA_KEY!r} metadata entry: not a portable-lora file", file=path)
        config = parse_json(f.metadata[METADATA_KEY], file=path, key=METADATA_KEY)
        marker = require(config, "format", str, file=path)
        if marker != "portable-lora":
            raise LoraError(f"expected 'portable-lora', found {marker!r}", file=path, key="format")
        version = require(config, "format_version", int, file=path)
        if version != FORMAT_VERSION:
            raise LoraError(f"format_version {version} is not supported; this library reads "
                            f"version {FORMAT_VERSION}", file=path, key="format_version")
        modules = require(config, "modules", dict, file=path)
        tensors: dict[str, dict[str, Any]] = {}
        for key in f.keys():
            module, _, suffix = key.rpartition(".")
            if suffix not in _SUFFIXES or not module:
                raise LoraError("not an adapter tensor: expected <module>.lora_A, .lora_B or "
                                ".magnitude", file=path, key=key)
            if module not in modules:
                raise LoraError("tensor of a module the config does not list", file=path, key=key)
            tensors.setdefault(module, {})[_SUFFIXES[suffix]] = f.get(key)
        adapter = Adapter(base_model=require(config, "base_model", str, file=path, default=None,
                                             allow_none=True),
                          provenance=require(config, "provenance", dict, file=path, default={}))
        for name, spec in modules.items():
            if not isinstance(spec, dict):
                raise LoraError("module config must be an object", file=path, key=name)
            parts = tensors.get(name, {})
            for needed in ("A", "B"):
                if needed not in parts:
                    raise LoraError(f"the config lists this module but the file has no "
                                    f"{name}.lora_{needed}", file=path, key=name)
            module = module_from(parts["A"], parts["B"],
                                 alpha=require(spec, "alpha", float, file=path, context=name),
                                 rule=require(spec, "rule", str, file=path, context=name),
                                 kind=require(spec, "kind", str, file=path, context=name, default="linear"),
                                 magnitude=parts.get("magnitude"), name=name, file=path)
            rank = require(spec, "rank", int, file=path, context=name)
            if rank != module.rank:
                raise LoraError(f"the config says rank {rank} but lora_A has rank {module.rank}",
                                file=path, key=f"{name}.lora_A")
            if require(spec, "dora", bool, file=path, context=name, default=False) != module.is_dora:
                raise LoraError("the config's dora flag disagrees with the presence of a magnitude",
                                file=path, key=name)
            stored = require(spec, "scale", float, file=path, context=name, default=None, allow_none=True)
            if stored is not None and not math.isclose(stored, module.scale, rel_tol=1e-12):
                raise LoraError(f"the config's scale {stored} disagrees with {module.rule} of "
                                f"alpha {module.alpha} and rank {module.rank} ({module.scale})",
                                file=path, key=name)
            adapter[name] = module
        adapter.provenance.setdefault("source_format", NAME)
        return adapter
