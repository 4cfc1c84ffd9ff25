"""Adapter file formats: one module per format, one registry, detection with reasons.

Every format module defines:

* ``NAME``: the format's name (``peft``, ``mlx-lm``, ...);
* ``LAYOUT``: ``"file"`` (one .safetensors) or ``"directory"`` (weights and a JSON config);
  a directory format also defines ``REPLACEABLE``, the files its ``save`` may replace in an
  existing directory;
* ``detect(path) -> str | None``: why ``path`` looks like this format, or None;
* ``load(path, *, convention=None, **options) -> Adapter``;
* ``save(adapter, path, **options) -> None`` (atomic; see :mod:`portable_lora.io.atomic`).

Formats are imported on first use, so a missing optional piece never breaks the others.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..io.atomic import durable_writes
from ..adapter import Adapter
from ..core import RULES
from ..errors import LoraError
from ._common import PICKLE_SUFFIXES, read_json, refuse_pickle

__all__ = ["FORMATS", "get_format", "detect", "load", "save", "check_destination"]

# Detection order: the most specific signatures first.
FORMATS: dict[str, str] = {
    "portable": "portable",
    "peft": "peft",
    "diffusers": "diffusers",
    "mlx-lm": "mlx_lm",
    "mlx-vlm": "mlx_vlm",
    "kohya": "kohya",
    "diffsynth": "diffsynth",
}


def get_format(name: str) -> ModuleType:
    """The module implementing format ``name``."""
    if name not in FORMATS:
        raise LoraError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}", key="format")
    return importlib.import_module(f".{FORMATS[name]}", __name__)


def _available() -> list[tuple[str, ModuleType]]:
    found = []
    for name, module in FORMATS.items():
        try:
            found.append((name, importlib.import_module(f".{module}", __name__)))
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                continue  # a format not written yet
            raise
    return found


def _describe_contents(path: Path) -> str:
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        return f"a directory holding {names[:12]}{' ...' if len(names) > 12 else ''}"
    try:
        from ..io.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            keys = f.keys()
            meta = sorted(f.metadata)
        return f"a safetensors file with keys {keys[:8]}{' ...' if len(keys) > 8 else ''} and metadata {meta}"
    except LoraError as exc:
        where = f" [{exc.key}]" if exc.key else ""
        return f"a file that is not valid safetensors ({exc.detail}){where}"


def detect(path: str | os.PathLike) -> tuple[str, str]:
    """``(format, reason)`` for ``path``; an error listing what was seen when nothing matches."""
    p = Path(path)
    if not p.exists():
        raise LoraError("no such file or directory", file=p)
    refuse_pickle(p)
    for name, module in _available():
        reason = module.detect(p)
        if reason:
            return name, reason
    raise LoraError(f"unknown adapter layout: found {_describe_contents(p)}; expected one of "
                    f"{', '.join(FORMATS)}{_config_trouble(p)}", file=p)


# PEFT and mlx-lm both keep their config under this name; mlx-vlm's legacy layout too
_CONFIG_NAME = "adapter_config.json"


def _config_trouble(p: Path) -> str:
    """Why an adapter config beside ``p`` made no format match (the likeliest cause), or ''."""
    config = (p if p.is_dir() else p.parent) / _CONFIG_NAME
    if not config.is_file():
        return ""
    try:
        fields = read_json(config)
    except LoraError as exc:
        return f"; its {_CONFIG_NAME} cannot be read: {exc.detail}"
    if "peft_type" not in fields and "lora_parameters" not in fields:
        return (f"; its {_CONFIG_NAME} has neither 'peft_type' (PEFT) nor 'lora_parameters' (mlx-lm), "
                f"found the fields {sorted(fields)[:12]}")
    return f" (its {_CONFIG_NAME} reads; name the format (--format, format=) to be told what else is missing)"


def load(path: str | os.PathLike, format: str | None = None, convention: str | None = None,
         **options: Any) -> Adapter:
    """Read an adapter in any supported format.

    ``format`` defaults to detection; the choice and its reason are kept in
    ``adapter.provenance``. ``convention`` (``raw``, ``alpha/rank``, ``alpha/sqrt(rank)``)
    says what a file's alpha means: needed where the file cannot say it itself, an override
    (recorded as given by the user) where it does; the portable format refuses it.
    """
    p = Path(path)
    if convention is not None and convention not in RULES:
        raise LoraError(f"unknown convention {convention!r}; expected one of {', '.join(RULES)}",
                        key="convention")
    if format is None:
        format, reason = detect(p)
    else:
        if not p.exists():
            raise LoraError("no such file or directory", file=p)
        refuse_pickle(p)
        reason = "given by the caller"
        if get_format(format).LAYOUT == "file" and p.is_dir():
            raise LoraError(f"a {format} adapter is one .safetensors file; this is a directory "
                            f"({_describe_contents(p)})", file=p)
    adapter = get_format(format).load(p, convention=convention, **options)
    previous = adapter.provenance.get("source_format")
    if previous and previous != format:
        adapter.provenance["origin_format"] = previous
    adapter.provenance["source_format"] = format
    adapter.provenance["source_path"] = str(p)
    adapter.provenance["detected_because"] = reason
    return adapter


def check_destination(path: str | os.PathLike, format: str, *, overwrite: bool = True) -> Path:
    """Refuse, before any work, a destination :func:`save` would refuse; returns it as a Path."""
    get_format(format)
    p = Path(path)
    if not overwrite and (p.exists() or p.is_symlink()):
        raise LoraError("already exists (pass overwrite=True, or --force on the command line)", file=p)
    if not p.parent.exists():
        raise LoraError("the parent directory does not exist", file=p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"a {p.suffix} name marks a pickled checkpoint, which every reader of this "
                        "library refuses; the file would be safetensors: name it .safetensors "
                        "(or a directory, for peft / mlx-lm / mlx-vlm)", file=p)
    return p


def save(adapter: Adapter, path: str | os.PathLike, format: str = "portable", *,
         overwrite: bool = True, durable: bool | None = None, **options: Any) -> None:
    """Write ``adapter`` in ``format``, atomically (see :mod:`portable_lora.io.atomic`);
    ``durable=True`` also fsyncs (default: :func:`~portable_lora.io.atomic.is_durable`)."""
    p = check_destination(path, format, overwrite=overwrite)
    with durable_writes(durable):
        get_format(format).save(adapter, p, **options)
