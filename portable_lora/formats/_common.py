"""Helpers shared by the format modules: strict config reading, pickle refusal, scale folding.

Formats call these instead of re-implementing them; the math itself stays in the core.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..io.safetensors_io import SafetensorsFile

__all__ = ["refuse_pickle", "read_json", "read_tensors", "require", "UnderflowWarning",
           "fold_scale", "to_uniform", "PICKLE_SUFFIXES", "safetensors_files",
           "pair_keys", "convention_provenance", "module_from", "check_replaceable",
           "PROVENANCE_KEY", "pattern_key", "stored_provenance", "carried_provenance", "STALE_PROVENANCE", "provenance_metadata",
           "peek_safetensors", "parse_json"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UnderflowWarning(UserWarning):
    """Folding a scale into low-precision factors turned non-zero values into zeros."""


def refuse_pickle(path: Path) -> None:
    """Pickled checkpoints run code when loaded: refused, always."""
    candidates = [path] if path.is_file() else list(path.iterdir()) if path.is_dir() else []
    for p in candidates:
        if p.suffix.lower() in PICKLE_SUFFIXES:
            if path.is_dir() and any(q.suffix == ".safetensors" for q in candidates):
                continue  # a directory that also has safetensors: the pickle is simply ignored
            raise LoraError(f"pickled checkpoints ({p.suffix}) are refused: loading one can run "
                            "arbitrary code. Convert it to .safetensors with the tool that made it.",
                            file=p)


def safetensors_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors") if path.is_dir() else [path]


def parse_json(text: str, *, file: Any = None, key: str | None = None) -> dict[str, Any]:
    """A JSON object from ``text``, strictly: a repeated key, bad JSON, nesting too deep for
    the parser, or a non-object is a :class:`LoraError` naming ``file`` and ``key``."""
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise LoraError(f"the key {k!r} appears more than once", file=file, key=key or k)
            out[k] = v
        return out

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except LoraError:
        raise
    except RecursionError:
        raise LoraError("the JSON is nested too deeply to read", file=file, key=key) from None
    except ValueError as exc:
        raise LoraError(f"not valid JSON: {exc}", file=file, key=key) from None
    if not isinstance(data, dict):
        raise LoraError(f"expected a JSON object, found {type(data).__name__}", file=file, key=key)
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from the file ``path`` (see :func:`parse_json`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LoraError(f"cannot read: {exc.strerror}", file=path) from None
    except UnicodeDecodeError:
        raise LoraError("not UTF-8 text", file=path) from None
    return parse_json(text, file=path)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
               list: "a list", dict: "an object"}


def require(config: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, file: Path,
            default: Any = ..., allow_none: bool = False, context: str | None = None) -> Any:
    """``config[key]`` checked against ``types`` (bools are never numbers), or ``default``.

    Errors name the field as ``context.key`` when ``context`` is given (e.g. the module).
    """
    field = f"{context}.{key}" if context else key
    if key not in config:
        if default is ...:
            raise LoraError(f"the required field {key!r} is missing", file=file, key=field)
        return default
    value = config[key]
    if value is None and allow_none:
        return None
    types_t = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types_t) and not (isinstance(value, bool) and bool not in types_t)
    if float in types_t and isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            raise LoraError(f"the number {str(value)[:20]}... is too large", file=file, key=field) from None
        ok = True
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types_t)
        raise LoraError(f"expected {wanted}, found {value!r} ({type(value).__name__})", file=file, key=field)
    return value


def peek_safetensors(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """``(keys, metadata)`` of a valid safetensors file, or None (for ``detect``: never raises)."""
    if not path.is_file():
        return None
    try:
        with SafetensorsFile(path) as f:
            return f.keys(), dict(f.metadata)
    except LoraError:
        return None


_MAPPED_READS: contextvars.ContextVar[bool] = contextvars.ContextVar("portable_lora_mapped_reads", default=False)


@contextlib.contextmanager
def mapped_reads() -> Iterator[None]:
    """Within the block, loaders return read-only memory-mapped views instead of copies: for a
    load that is written out at once (conversion), where a copy of every tensor would be
    made only to be thrown away (each fresh page costs a fault: 47 ms per 84 MB measured)."""
    token = _MAPPED_READS.set(True)
    try:
        yield
    finally:
        _MAPPED_READS.reset(token)


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, validated strictly; copies, or
    read-only mapped views inside :func:`mapped_reads`."""
    copy = not _MAPPED_READS.get()
    with SafetensorsFile(path) as f:
        return {name: f.get(name, copy=copy) for name in f.keys()}, dict(f.metadata)


def fold_scale(B: np.ndarray, factor: float, *, name: str, file: Any = None) -> np.ndarray:
    """``factor · B`` in B's dtype: the product taken in float64, then rounded to B's dtype.

    Warns with :class:`UnderflowWarning` when entries that were non-zero become zero; raises
    :class:`LoraError` when finite entries overflow B's dtype (the file would hold infinities).
    """
    if factor == 1.0:
        return B
    if factor == 0.0:  # a module switched off: its ΔW is zero on purpose, nothing underflowed
        return np.zeros_like(B)
    wide = B.astype(np.float64) * np.float64(factor)
    with np.errstate(over="ignore"):
        folded = wide.astype(B.dtype)
    overflowed = int(np.count_nonzero(~np.isfinite(folded) & np.isfinite(wide)))
    if overflowed:
        raise LoraError(f"folding scale {factor:g} into {B.dtype} B overflows {overflowed} of {B.size} "
                        f"entries (largest |scale·B| {np.max(np.abs(wide[np.isfinite(wide)])):.4g}, "
                        f"the dtype's limit {float(ml_dtypes.finfo(B.dtype).max):.4g}); save with another global "
                        "scale or in a wider dtype", file=file, key=name)
    lost = int(np.count_nonzero((folded == 0) & (B != 0)))
    if lost:
        frac = lost / max(B.size, 1)
        warnings.warn(f"{file or 'output'} [{name}]: folding scale {factor:g} into {B.dtype} "
                      f"turned {lost} of {B.size} entries ({frac:.2%}) to zero", UnderflowWarning,
                      stacklevel=3)
    return folded


def to_uniform(adapter: Adapter, *, scale: float | None = None, file: Any = None,
               pad: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, float]:
    """Factors for a format with one rank and one scale: ``({name: (A, B)}, rank, scale)``.

    Each module's ``s_m / scale`` is folded into its B and ranks are zero-padded to the
    largest, so every ΔW is kept (exactly where no folding is needed). ``scale`` defaults to
    the most common non-zero module scale (so the common case folds nothing; modules switched
    off with scale 0 get a zero B), 1 when every module is at 0.
    """
    if not adapter:
        raise LoraError("the adapter has no modules", file=file)
    if scale is None:
        counts: dict[float, int] = {}
        for m in adapter.values():
            if m.scale != 0 and math.isfinite(m.scale):
                counts[m.scale] = counts.get(m.scale, 0) + 1
        scale = max(counts, key=lambda s: (counts[s], -abs(s))) if counts else 1.0
    if scale == 0 or not math.isfinite(scale):
        raise LoraError(f"a global scale of {scale} cannot carry the adapter", file=file)
    rank = max(m.rank for m in adapter.values()) if pad else None
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, m in adapter.items():
        b = fold_scale(m.B, m.scale / scale, name=name, file=file)
        a = m.A
        if pad and m.rank != rank:
            a, b = core.pad_rank(a, b, rank)
        out[name] = (a, b)
    return out, (rank if rank is not None else -1), scale


PROVENANCE_KEY = "portable_lora_provenance"  # not "portable_lora": that key means the portable format


def pattern_key(patterns: Iterable[str], name: str) -> str:
    """The key of a PEFT ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name``.

    PEFT's own rule (``peft.utils.other.get_pattern_key``): the first key, in order, for which
    ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds; ``name`` itself when none does, so
    ``pattern.get(pattern_key(pattern, name), default)`` is the value PEFT uses.

    >>> pattern_key(["v_proj", "model.layers.1.mlp.down_proj"], "model.layers.0.self_attn.v_proj")
    'v_proj'
    """
    for key in patterns:
        if _pattern_regex(key).match(name):
            return key
    return name


@functools.lru_cache(maxsize=16384)
def _pattern_regex(key: str) -> re.Pattern:
    # compiled once per key: re's own cache holds 512, and a per-module rank pattern (kohya's
    # dynamic resize) has more keys than that, each matched against every module
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        raise LoraError(f"pattern {key!r} is not a valid regular expression: {exc}", key=str(key)) from None


# Provenance an earlier writer recorded that a later reader must not take over: where that
# file lay and how it was recognised (told anew by every load), and PEFT's ``fan_in_fan_out``,
# which describes the Hugging Face checkpoint a PEFT config was written for (GPT-2's Conv1D
# stores (in, out)), not the adapter: a file of another format applies to that format's own
# models, which store (out, in) (mlx-lm's GPT-2 transposes those weights when it loads them).
# ``user_alpha`` is the alpha one DiffSynth load was given: a later load tells its own.
STALE_PROVENANCE = ("source_path", "detected_because", "source_format", "fan_in_fan_out", "user_alpha")


def carried_provenance(provenance: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """What a file of format ``fmt`` carries over from the provenance an earlier writer stored."""
    carried = {k: v for k, v in provenance.items() if k not in STALE_PROVENANCE}
    if provenance.get("source_format") not in (None, fmt):
        carried["origin_format"] = provenance["source_format"]
    return carried


def stored_provenance(metadata: Mapping[str, str], path: Path, fmt: str) -> dict[str, Any]:
    """The JSON object our writers keep under :data:`PROVENANCE_KEY` ({} when absent), its
    ``provenance`` reduced to what carries over (:func:`carried_provenance`)."""
    raw = metadata.get(PROVENANCE_KEY)
    if raw is None:
        return {}
    stored = parse_json(raw, file=path, key=PROVENANCE_KEY)
    if not isinstance(stored.get("provenance", {}), dict):
        raise LoraError("expected a JSON object with a 'provenance' object", file=path, key=PROVENANCE_KEY)
    return {**stored, "provenance": carried_provenance(stored.get("provenance") or {}, fmt)}


def provenance_metadata(adapter: Adapter, **extra: Any) -> str:
    """The JSON our writers keep under :data:`PROVENANCE_KEY`: base model, provenance, extras."""
    return json.dumps({"base_model": adapter.base_model, "provenance": adapter.provenance, **extra},
                      allow_nan=False, default=str)


def check_replaceable(path: Path, allowed: Iterable[str], *, fmt: str) -> None:
    """Refuse to replace a directory holding anything but a previous adapter of this layout.

    Directory formats are written whole (io.atomic.atomic_directory replaces the directory), so
    saving into a folder with other files would delete them.
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise LoraError(f"exists and is not a directory; {fmt} adapters are directories", file=path)
    if path.is_dir():
        allowed = set(allowed)
        others = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if others:
            raise LoraError(f"the directory holds other files {others[:8]}: writing the adapter "
                            "would replace them; choose a new or empty directory", file=path)


def pair_keys(keys: Iterable[str], suffixes: tuple[str, str], *, file: Path) -> dict[str, tuple[str, str]]:
    """``{module: (a_key, b_key)}`` for keys ending in the two suffixes; an unpaired key is an error."""
    a_suffix, b_suffix = suffixes
    a_keys, b_keys = {}, {}
    for key in keys:
        if key.endswith(a_suffix):
            a_keys[key[: -len(a_suffix)]] = key
        elif key.endswith(b_suffix):
            b_keys[key[: -len(b_suffix)]] = key
    for module in a_keys.keys() - b_keys.keys():
        raise LoraError(f"incomplete LoRA pair: {a_keys[module]!r} has no {b_suffix!r} partner",
                        file=file, key=a_keys[module])
    for module in b_keys.keys() - a_keys.keys():
        raise LoraError(f"incomplete LoRA pair: {b_keys[module]!r} has no {a_suffix!r} partner",
                        file=file, key=b_keys[module])
    return {m: (a_keys[m], b_keys[m]) for m in a_keys}


def convention_provenance(convention: str | None, default: str, default_reason: str) -> dict[str, str]:
    """Provenance entries for the convention used: the user's, or the format's documented one."""
    if convention is not None:
        return {"convention": convention, "convention_reason": "given by the user"}
    return {"convention": default, "convention_reason": default_reason}


def module_from(A: np.ndarray, B: np.ndarray, *, alpha: float, rule: str, kind: str = "linear",
                magnitude: np.ndarray | None = None, name: str, file: Path) -> LoraModule:
    """A validated module; validation errors are re-raised naming ``file``."""
    try:
        return LoraModule(A, B, alpha=alpha, rule=rule, kind=kind, magnitude=magnitude).validate(name)
    except LoraError as exc:
        raise exc.with_file(file) from None




_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transposed(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``x.T`` (2-D), fast for LoRA factors' skinny shapes.

    The bytes move as unsigned integers of the same width (NumPy's own copy loops; bfloat16's
    are 1.5-3x slower), and a (r, n) factor with few rows is written column by column (r
    strided copies of n elements, 2x faster than one transposed copy at r = 16).
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.itemsize not in _UINT or x.dtype.kind == "O":
        return np.ascontiguousarray(x.T)
    bits = x.view(_UINT[x.dtype.itemsize]) if x.flags.c_contiguous or x.flags.f_contiguous else \
        np.ascontiguousarray(x).view(_UINT[x.dtype.itemsize])
    rows, cols = bits.shape
    if rows <= 64 < cols:
        out = np.empty((cols, rows), dtype=bits.dtype)
        for j in range(rows):
            out[:, j] = bits[j]
    else:
        out = np.ascontiguousarray(bits.T)
    return out.view(x.dtype)
