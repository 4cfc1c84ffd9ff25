"""Strict safetensors reading and writing with NumPy (bfloat16 and float8 through ml_dtypes).

Why our own reader: the ``safetensors`` package accepts a header that names a tensor twice
(the last one wins) and ``safetensors.numpy`` cannot read bf16. This reader checks every
structural rule of the format and raises :class:`~portable_lora.errors.LoraError` naming the
file and the tensor:

* the 8-byte length prefix is present, and the header fits in the file and under 100 MB;
* the header is a JSON object with no repeated key and no tensor named ``__metadata__``
  other than the string-to-string metadata map;
* every entry has a known dtype, a shape of non-negative integers, and data offsets whose
  length matches dtype × shape;
* the data regions tile the data section exactly: no overlap, no gap, nothing after;
* the file does not change size between validation and mapping.

Tensors are read through a memory map; :meth:`SafetensorsFile.get` copies (the default) or
returns a read-only view; :meth:`SafetensorsFile.read_into` reads a byte range of a tensor into
a caller's buffer (``pread``, no mapping: resident memory stays at the buffer).

The writer refuses, before writing a byte, what it could not write faithfully (names or
metadata that are not strings or not encodable as UTF-8, a tensor named ``__metadata__``, a
dtype safetensors cannot name, a header over the cap) and writes atomically
(:mod:`portable_lora.io.atomic`). docs/SECURITY.md lists what the tests show.

Streaming: a :class:`LazyTensor` is produced only when the writer reaches it, as one array or
as an iterator of chunks (arrays whose bytes, in order, are the tensor's; or a
:class:`FileRange`, copied file-to-file by the kernel where it can). Large outputs are written
by a background thread, so producing the next chunk overlaps writing the last.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Union

import ml_dtypes
import numpy as np

from ..errors import LoraError
from .atomic import atomic_file

__all__ = ["SafetensorsFile", "TensorInfo", "LazyTensor", "FileRange", "read_safetensors",
           "write_safetensors", "DTYPES", "dtype_name", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000  # the cap of the reference implementation

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a NumPy dtype (``F32``, ``BF16``, ...)."""
    try:
        # by its native-order twin: a big-endian array is written byte-swapped (_as_bytes)
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except (KeyError, TypeError):
        raise LoraError(f"dtype {dtype} cannot be stored in safetensors; expected one of "
                        f"{', '.join(str(d) for d in _NAMES)}") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(path: Path) -> Callable[[list[tuple[str, Any]]], dict]:
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise LoraError(f"the header names {key!r} more than once", file=path, key=key)
            seen[key] = value
        return seen
    return hook


_MAX_DIMS = 64  # NumPy's limit on an array's dimensions
_MAX_BYTES = 2 ** 62  # below NumPy's limit on an array's size (its zero dimensions aside)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_header(path: Path, raw: bytes, data_len: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraError(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})", file=path) from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except LoraError:
        raise
    except (ValueError, RecursionError) as exc:
        raise LoraError(f"the header is not valid JSON: {exc}", file=path) from None
    if not isinstance(header, dict):
        raise LoraError(f"the header must be a JSON object, found {type(header).__name__}", file=path)
    metadata_raw = header.pop("__metadata__", None)
    if metadata_raw is None:  # mx.save_safetensors writes "__metadata__": null
        metadata_raw = {}
    if not isinstance(metadata_raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()):
        raise LoraError("__metadata__ must map strings to strings (a tensor may not be named "
                        "__metadata__)", file=path, key="__metadata__")
    # JSON's \ud800 escapes parse, but are no UTF-8 text (which safetensors requires)
    for name in header:
        if not _is_utf8(name):
            raise LoraError("the tensor name holds an unpaired UTF-16 surrogate: not UTF-8 text",
                            file=path, key=name.encode("utf-8", "backslashreplace").decode())
    if not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata_raw.items()):
        raise LoraError("an entry holds an unpaired UTF-16 surrogate: not UTF-8 text", file=path,
                        key="__metadata__")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise LoraError("expected an entry with exactly dtype, shape and data_offsets, found "
                            f"{entry!r:.200}", file=path, key=name)
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise LoraError(f"unknown dtype {entry['dtype']!r}; expected one of {', '.join(DTYPES)}",
                            file=path, key=name)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise LoraError(f"shape must be a list of non-negative integers, found {shape!r}",
                            file=path, key=name)
        # NumPy cannot make such an array even when a 0 leaves it empty
        if len(shape) > _MAX_DIMS:
            raise LoraError(f"shape has {len(shape)} dimensions, at most {_MAX_DIMS} are possible",
                            file=path, key=name)
        if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_BYTES:
            raise LoraError(f"shape {shape!r:.120} spans more than 2**62 bytes without its zeros: no "
                            "array can have it", file=path, key=name)
        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise LoraError(f"data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}",
                            file=path, key=name)
        expected = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise LoraError(f"data_offsets span {offsets[1] - offsets[0]} bytes but dtype "
                            f"{entry['dtype']} × shape {shape} needs {expected}", file=path, key=name)
        if offsets[1] > data_len:
            raise LoraError(f"data ends at byte {offsets[1]} of the data section, past its end "
                            f"({data_len} bytes): the file is truncated", file=path, key=name)
        infos[name] = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    cursor = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin < cursor:
            raise LoraError(f"data bytes [{info.begin}, {info.end}) overlap the previous tensor "
                            f"(which ends at {cursor})", file=path, key=info.name)
        if info.begin > cursor:
            raise LoraError(f"a gap of {info.begin - cursor} bytes precedes this tensor's data",
                            file=path, key=info.name)
        cursor = info.end
    if cursor != data_len:
        raise LoraError(f"{data_len - cursor} bytes after the last tensor belong to no tensor",
                        file=path)
    return dict(metadata_raw), infos


class SafetensorsFile:
    """An open, validated safetensors file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise LoraError(f"cannot open: {exc.strerror}", file=self.path) from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            prefix = self._file.read(8)
            if len(prefix) < 8:
                raise LoraError(f"the file has {size} bytes, fewer than the 8-byte header length "
                                "prefix: it is truncated or not safetensors", file=self.path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise LoraError(f"the header length prefix says {header_len} bytes, over the "
                                f"{MAX_HEADER_BYTES}-byte cap", file=self.path)
            if 8 + header_len > size:
                raise LoraError(f"the header length prefix says {header_len} bytes but only "
                                f"{size - 8} follow: the file is truncated", file=self.path)
            raw = self._file.read(header_len)
            self.data_start = 8 + header_len
            self.metadata, self.tensors = _parse_header(self.path, raw, size - self.data_start)
            mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            if len(mapped) != size:
                # someone truncated or appended to the file in place while we validated it
                # (our own writers never do: they replace files whole)
                found = len(mapped)
                mapped.close()
                raise LoraError(f"the file changed size while being read ({size} bytes, then "
                                f"{found})", file=self.path)
            self._map: mmap.mmap | None = mapped
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        """The tensor ``name`` as a NumPy array (a read-only memory-mapped view if not ``copy``)."""
        info = self.tensors.get(name)
        if info is None:
            raise LoraError("no such tensor in the file", file=self.path, key=name)
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, dtype=info.dtype)
        view = np.frombuffer(self._map, dtype=info.dtype, count=count,
                             offset=self.data_start + info.begin).reshape(info.shape)
        return view.copy() if copy else view

    def read_into(self, name: str, buffer: Any, offset: int = 0) -> None:
        """Fill ``buffer`` (a writable C-contiguous array or buffer) with the bytes of ``name``
        from byte ``offset`` of its data on; ``pread`` where the OS has it, so nothing is
        mapped into this process."""
        info = self.tensors.get(name)
        if info is None:
            raise LoraError("no such tensor in the file", file=self.path, key=name)
        if isinstance(buffer, np.ndarray):
            if not buffer.flags.c_contiguous:
                raise ValueError("read_into needs a C-contiguous buffer")
            buffer = buffer.reshape(-1).view(np.uint8)  # bf16 and float8 have no buffer format
        view = memoryview(buffer).cast("B")
        if offset < 0 or offset + view.nbytes > info.nbytes:
            raise ValueError(f"bytes [{offset}, {offset + view.nbytes}) lie outside {name!r}'s "
                             f"{info.nbytes} bytes")
        start = self.data_start + info.begin + offset
        done = 0
        if hasattr(os, "preadv"):
            while done < view.nbytes:
                got = os.preadv(self._file.fileno(), [view[done:]], start + done)
                if got <= 0:
                    raise LoraError(f"the file ended while reading {name!r} (it changed on disk?)",
                                    file=self.path, key=name)
                done += got
            return
        view[:] = self._map[start:start + view.nbytes]  # type: ignore[index]

    def file_range(self, name: str) -> "FileRange":
        """``name``'s bytes as a :class:`FileRange`, for a writer to copy without reading them."""
        info = self.tensors.get(name)
        if info is None:
            raise LoraError("no such tensor in the file", file=self.path, key=name)
        return FileRange(self._file, self.data_start + info.begin, info.nbytes)

    def release(self, name: str) -> None:
        """Drop the memory-mapped pages of ``name`` from this process (they stay in the OS page
        cache), so a pass over a large file keeps resident memory near one tensor. Views already
        taken stay valid: the pages are read again if touched."""
        info = self.tensors.get(name)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if info is None or self._map is None or advice is None or not hasattr(self._map, "madvise"):
            return
        start = self.data_start + info.begin
        end = self.data_start + info.end
        aligned = start - start % mmap.PAGESIZE
        if end > aligned:
            try:
                self._map.madvise(advice, aligned, end - aligned)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        # a memory-mapped view still alive keeps the map open; it is released with the view
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor (copied) and the metadata of a safetensors file, validated."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name) for name in f.keys()}, dict(f.metadata)


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of an open file from ``offset`` on: a chunk copied file to file."""
    file: BinaryIO
    offset: int
    length: int


Chunk = Union[np.ndarray, FileRange]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor produced on demand while writing (streaming): dtype, shape and a producer.

    ``produce()`` returns the whole array, or an iterator of chunks: C-contiguous arrays (any
    shape and dtype) and :class:`FileRange` s whose bytes, in order, make the tensor's data.
    The writer checks their total against dtype × shape.
    """
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Union[np.ndarray, Iterable[Chunk]]]


def _encodable(text: str, what: str, path: Any) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LoraError(f"{what} {text!r} cannot be written as UTF-8 ({exc.reason} at "
                        f"character {exc.start})", file=path, key=text) from None


def _header_bytes(entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                  metadata: Mapping[str, str] | None, path: Any = None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise LoraError(f"metadata must map strings to strings, found {key!r}: "
                                f"{type(value).__name__}", file=path, key="__metadata__")
            _encodable(key, "the metadata key", path)
            _encodable(value, f"the metadata value of {key!r}", path)
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if not isinstance(name, str):  # json.dumps would silently turn 1 into "1"
            raise LoraError(f"tensor names must be strings, found {name!r} "
                            f"({type(name).__name__})", file=path)
        if name == "__metadata__":
            raise LoraError("a tensor may not be named __metadata__", file=path, key=name)
        _encodable(name, "the tensor name", path)
        try:
            stored = dtype_name(dtype)
        except LoraError as exc:
            raise LoraError(exc.detail, file=path, key=name) from None
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": stored, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise LoraError(f"the header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte "
                        "cap readers enforce", file=path)
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference does
    return struct.pack("<Q", len(raw)) + raw


#: outputs at least this large are written by a background thread
_BACKGROUND_MIN_BYTES = 32 << 20
_QUEUE_DEPTH = 3  # chunks in flight (each at most a few MB): bounds the memory the thread holds


class _Sink:
    """Writes chunks to ``out`` in order: inline, or from a background thread."""

    def __init__(self, out: BinaryIO, background: bool):
        self.out = out
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=_QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                            name="portable-lora-writer", daemon=True)
            self._thread.start()

    def _write(self, chunk: Any) -> None:
        if isinstance(chunk, FileRange):
            _copy_range(chunk, self.out)
        else:
            self.out.write(chunk)

    def _run(self, chunks: queue.Queue) -> None:
        while True:
            chunk = chunks.get()
            if chunk is None:
                return
            if self._error is None:
                try:
                    self._write(chunk)
                except BaseException as exc:  # handed to the producing thread
                    self._error = exc

    def put(self, chunk: Any) -> None:
        if self._queue is None:
            self._write(chunk)
            return
        if self._error is not None:
            self._raise()
        self._queue.put(chunk)

    def _raise(self) -> None:
        error, self._error = self._error, None
        self.close(check=False)
        raise error  # type: ignore[misc]

    def close(self, check: bool = True) -> None:
        if self._queue is None:
            return
        q, self._queue = self._queue, None
        if not check:  # abandon what is queued
            self._error = self._error or _Abandoned()
        q.put(None)
        self._thread.join()
        if check and self._error is not None:
            error, self._error = self._error, None
            raise error


class _Abandoned(Exception):
    pass


_NO_COPY_RANGE = {getattr(errno, name) for name in ("EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP",
                                                    "ENOTSUP", "EBADF", "EPERM") if hasattr(errno, name)}


def _copy_range(chunk: FileRange, out: BinaryIO) -> None:
    """Copy ``chunk`` to ``out``'s current position: in the kernel (``copy_file_range``) where
    it can, else through an 8 MB buffer."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    if copy is not None and hasattr(out, "fileno"):
        out.flush()
        try:
            while done < chunk.length:
                got = copy(chunk.file.fileno(), out.fileno(), chunk.length - done, chunk.offset + done)
                if got <= 0:
                    break
                done += got
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:  # else: this file system cannot; copy by hand
                raise
    buffer = bytearray(min(8 << 20, max(1, chunk.length - done)))
    view = memoryview(buffer)
    while done < chunk.length:
        n = min(len(buffer), chunk.length - done)
        got = os.preadv(chunk.file.fileno(), [view[:n]], chunk.offset + done) if hasattr(os, "preadv") \
            else _pread_fallback(chunk.file, view[:n], chunk.offset + done)
        if got <= 0:
            raise OSError(f"the source file ended {chunk.length - done} bytes early")
        out.write(view[:got])
        done += got


def _pread_fallback(file: BinaryIO, view: memoryview, offset: int) -> int:
    file.seek(offset)
    return file.readinto(view)  # type: ignore[attr-defined]


def _chunks(value: Any) -> tuple[bool, Iterator[Chunk]]:
    """(whether the tensor came in chunks, its chunks)."""
    produced = value.produce() if isinstance(value, LazyTensor) else value
    if isinstance(produced, (np.ndarray, np.generic)) or not isinstance(produced, Iterable):
        return False, iter([np.asarray(produced)])
    return True, iter(produced)


def _as_bytes(array: np.ndarray) -> Any:
    array = np.require(array, requirements="C")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8).data if array.size else b""


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray | LazyTensor],
                      metadata: Mapping[str, str] | None = None, *,
                      on_tensor: Callable[[str, int], None] | None = None,
                      durable: bool | None = None, background: bool | None = None) -> None:
    """Write ``tensors`` (in the given order) atomically; lazy tensors are produced one at a time.

    ``on_tensor(name, nbytes)`` is called after each tensor is handed to the writer (progress
    reporting). ``durable`` as in :func:`~portable_lora.io.atomic.atomic_file`.
    ``background`` writes from a second thread, overlapping production with writing (default:
    for outputs of 32 MB or more). Then a chunk must not change once produced; pass
    ``background=False`` for producers that reuse their buffers (each chunk is then written
    before the next is asked for).
    """
    entries = []
    for name, value in tensors.items():
        if isinstance(value, LazyTensor):
            entries.append((name, np.dtype(value.dtype), tuple(value.shape)))
        else:
            entries.append((name, np.asarray(value).dtype, tuple(np.shape(value))))
    header = _header_bytes(entries, metadata, path)
    total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)
    with atomic_file(path, durable=durable) as out:
        out.write(header)
        sink = _Sink(out, background=total >= _BACKGROUND_MIN_BYTES if background is None else background)
        try:
            for (name, dtype, shape), value in zip(entries, tensors.values()):
                expected = math.prod(shape) * dtype.itemsize
                written = 0
                chunked, chunks = _chunks(value)
                for chunk in chunks:
                    if isinstance(chunk, FileRange):
                        size = chunk.length
                    else:
                        chunk = np.asarray(chunk)
                        if chunk.dtype != dtype or (not chunked and tuple(chunk.shape) != shape):
                            what = "a chunk of " if chunked else ""
                            raise LoraError(f"produced {what}{chunk.dtype}{list(chunk.shape)}, announced "
                                            f"{dtype}{list(shape)}", file=path, key=name)
                        size = chunk.nbytes
                        chunk = _as_bytes(chunk)
                    written += size
                    if written > expected:
                        break
                    sink.put(chunk)
                if written != expected:
                    raise LoraError(f"produced {written} bytes, announced {dtype}{list(shape)} "
                                    f"({expected} bytes)", file=path, key=name)
                if on_tensor is not None:
                    on_tensor(name, expected)
            sink.close()
        except BaseException:
            sink.close(check=False)
            raise
