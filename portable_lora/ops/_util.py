"""Helpers shared by the operations: loading with hints, overwrite checks, warnings, progress,
JSON conversion and plain-text tables. No math lives here."""

from __future__ import annotations

import contextlib
import inspect as _pyinspect
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from .. import formats
from ..adapter import Adapter
from ..errors import LoraError
from ..formats._common import check_replaceable

__all__ = ["load_adapter", "check_output", "collect_warnings", "progress_bar", "jsonable",
           "format_table", "parse_dtype", "path_bytes", "fmt_err", "fmt_pct", "DTYPE_NAMES",
           "check_save_target", "check_format_options", "format_options"]

DTYPE_NAMES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "float64": np.dtype(np.float64),
}


def parse_dtype(name: str | None, *, field: str = "dtype") -> np.dtype | None:
    """``float32`` / ``float16`` / ``bfloat16`` / ``float64`` as a NumPy dtype (None passes)."""
    if name is None:
        return None
    if isinstance(name, np.dtype):
        return name
    key = str(name).lower().replace("fp", "float").replace("bf16", "bfloat16")
    key = {"f32": "float32", "f16": "float16", "f64": "float64", "float": "float32"}.get(key, key)
    if key not in DTYPE_NAMES:
        raise LoraError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}", key=field)
    return DTYPE_NAMES[key]


def _loader_accepts(format_name: str, option: str) -> bool:
    """Whether the format's ``load`` names ``option`` as a parameter (so a hint may be passed)."""
    return option in (format_options(format_name, "load") or ())


def load_adapter(source: Any, *, format: str | None = None, convention: str | None = None,
                 options: Mapping[str, Any] | None = None,
                 modules: Sequence[str] | None = None) -> Adapter:
    """An :class:`Adapter` from a path (any format) or an Adapter (returned as is).

    ``modules`` is a hint (the base model's module names): passed as ``modules=`` only to a
    loader that declares that parameter (kohya names need it to restore dots), unless the
    caller's ``options`` already give one.
    """
    if isinstance(source, Adapter):
        return source
    path = Path(source)
    reason = None
    if format is None:
        format, reason = formats.detect(path)
    opts = dict(options or {})
    if modules is not None and "modules" not in opts and _loader_accepts(format, "modules"):
        opts["modules"] = list(modules)
    adapter = formats.load(path, format=format, convention=convention, **opts)
    if reason is not None:
        adapter.provenance["detected_because"] = reason
    return adapter


def source_name(source: Any) -> str:
    if isinstance(source, Adapter):
        return str(source.provenance.get("source_path", "<in-memory adapter>"))
    return str(source)


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output without ``force``, and an output whose parent is missing."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not force:
        raise LoraError("already exists (pass --force, or force=True, to overwrite)", file=p)
    if not p.parent.exists():
        raise LoraError("the parent directory does not exist", file=p)
    return p


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def holds(directory: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``directory`` is a directory above ``path`` (replacing it would delete ``path``)."""
    try:
        return Path(directory).resolve() in Path(path).resolve().parents
    except OSError:
        return False


@contextlib.contextmanager
def collect_warnings(into: list[str]) -> Iterator[None]:
    """Record user-facing warnings (UserWarning and subclasses) into ``into``; others pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, UserWarning):
            text = str(w.message)
            if text not in into:
                into.append(text)
        else:  # library deprecations and the like are not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "B") -> Any:
    """A tqdm bar on stderr when ``enabled`` and tqdm is installed, else a no-op object."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (the ``cli`` extra)
        return _NoBar()
    scaled = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
                leave=False, file=sys.stderr, dynamic_ncols=True)


def default_progress() -> bool:
    """Progress bars only when stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, NumPy scalars as Python ones, paths as strings."""
    if hasattr(value, "to_json") and not isinstance(value, type):
        return jsonable(value.to_json())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (Path, np.dtype)):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, allow_nan=False)


def path_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or the total size of the files under a directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return "0" if x == 0 else f"{x:.2e}"


def fmt_pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.3g}%"


def fmt_num(x: float) -> str:
    return f"{x:g}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, indent: str = "") -> str:
    """A plain-text table: text columns left-aligned, numeric-looking columns right-aligned."""
    body = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def numeric(col: int) -> bool:
        cells = [r[col] for r in body if r[col] not in ("", "-")]
        return bool(cells) and all(_looks_numeric(c) for c in cells)

    right = [numeric(i) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in body])


def _looks_numeric(text: str) -> bool:
    t = text.replace(",", "").rstrip("%").replace("×", "")
    try:
        float(t)
    except ValueError:
        return False
    return True


def dtype_str(dtype: Any) -> str:
    return str(np.dtype(dtype))


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- what can be checked about an output before the work that produces it ----------------------

def format_options(fmt: str, kind: str) -> list[str] | None:
    """The option names format ``fmt``'s ``save`` (``kind="save"``) or ``load`` takes: its
    keyword-only parameters (``convention`` excluded, it is an argument of its own). None when
    the function cannot be introspected."""
    function = getattr(formats.get_format(fmt), kind)
    try:
        params = _pyinspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "convention"]


def check_format_options(fmt: str, kind: str, options: Iterable[str] | None, *,
                         file: str | os.PathLike | None = None) -> None:
    """Refuse option names that format ``fmt``'s writer (``kind="save"``) or reader
    (``kind="load"``) does not take, listing those it does."""
    given = list(options or ())
    if not given:
        return
    known = format_options(fmt, kind)
    if known is None:  # not introspectable: the format itself judges
        return
    unknown = sorted(k for k in given if k not in known)
    if "convention" in unknown and kind == "load":
        raise LoraError("'convention' is not a loader option: pass convention= (--convention on the "
                        "command line)", file=file, key="convention")
    if unknown:
        role = "writer" if kind == "save" else "reader"
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise LoraError(f"unknown options for the {fmt} format's {role}: {unknown}; {takes}", file=file)


def check_save_target(out: str | os.PathLike, fmt: str, *, force: bool,
                      options: Mapping[str, Any] | None = None) -> Path:
    """What can be known about writing format ``fmt`` at ``out`` before the adapter exists,
    checked so that a long computation does not end in a refusal: the format, the output
    (:func:`check_output`), its layout (a directory format needs a directory path, a file
    format a file path) and the writer's option names. Returns the path."""
    module = formats.get_format(fmt)
    p = formats.check_destination(check_output(out, force), fmt)
    layout = getattr(module, "LAYOUT", None)
    if layout == "directory":
        if p.suffix == ".safetensors":
            raise LoraError(f"a {fmt} adapter is a directory (weights and a JSON config), not one "
                            ".safetensors file; give the directory's path", file=p)
        check_replaceable(p, module.REPLACEABLE, fmt=fmt)
    elif layout == "file" and p.is_dir() and not p.is_symlink():
        raise LoraError(f"is a directory; a {fmt} adapter is one .safetensors file", file=p)
    check_format_options(fmt, "save", (options or {}).keys(), file=p)
    return p
