"""``merge``: fold an adapter into base weights, streaming tensor by tensor.

The base is a .safetensors file or a sharded directory. Every merged tensor is read in row
blocks (``pread`` into reused buffers, nothing memory-mapped), merged by worker threads and
written block by block as the writer reaches it
(:class:`~portable_lora.io.safetensors_io.LazyTensor`); tensors the adapter does not touch are
copied file to file. Peak memory is a few blocks per thread plus the adapter, whatever the
checkpoint's size.

Everything is checked before the first byte is written: every module must match a base
tensor ``<module>.weight`` of the right shape, the factors must be finite, and DoRA cannot be
unmerged (its pre-merge weight norm is not stored). A merged tensor that overflows (an
infinity in float16) aborts the write. The output is written atomically: a file, or a
directory with the same shards, the same ``weight_map`` and an index whose
``metadata.total_size`` is recomputed; the base directory's other files (config, tokenizer)
are copied along.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..formats._common import PICKLE_SUFFIXES
from ..io.atomic import atomic_directory, durable_writes
from ..io.safetensors_io import LazyTensor, write_safetensors
from ..validation import check_finite
from ._checkpoint import MODULE_PREFIXES, Checkpoint, match_modules
from ._util import (check_output, collect_warnings, human_bytes, load_adapter, parse_dtype,
                    progress_bar, holds, same_path, source_name)

__all__ = ["merge", "MergeReport", "merge_tensor", "merge_blocks", "MERGE_METADATA_KEY", "fan_in_fan_out", "base_layouts", "base_shape"]

#: safetensors metadata entry recording what was merged into each output shard
MERGE_METADATA_KEY = "portable_lora.merge"
_BLOCK_BYTES = 1 << 20  # float32 working set per row block: in L2 (measured best at 1-4 MB here)
_COPY_BLOCK_BYTES = 8 << 20  # untouched tensors cast to another dtype, per block


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _finite(array: np.ndarray) -> np.ndarray:
    return np.isfinite(array if array.dtype.kind == "f" else array.astype(np.float32))


def _overflow_bound(target: np.dtype) -> float | None:
    """The smallest magnitude that rounds to infinity in ``target`` (its largest finite value
    plus half an ulp there, exact in float32), or None where the check is done after rounding."""
    if target == np.float16:
        return 65520.0
    if target.name == "bfloat16":
        return float(np.float32(2.0 - 2.0 ** -8) * np.float32(2.0 ** 127))
    if target in (np.float32, np.float64):
        return float("inf")
    return None


def merge_blocks(read_rows: Callable[[int, int, np.ndarray], None], shape: tuple[int, ...], dtype: Any,
                 module: LoraModule, scale: float, *, out_dtype: Any = None, unmerge: bool = False,
                 allow_nonfinite: bool = False, name: str = "", transposed: bool = False,
                 block_bytes: int | None = None, threads: int = 1) -> Iterator[np.ndarray]:
    """The merged weight as row blocks of ``out_dtype``, reading ``W`` by rows.

    Each yielded block is valid until the next one is asked for (buffers are reused): copy or
    write it before that.

    ``read_rows(start, stop, buffer)`` fills ``buffer`` (``dtype``, rows ``start:stop`` of the
    weight of ``shape``). Each block of output rows needs only its rows of B (of A's columns for
    an embedding, whose table rows are A's columns, and for a ``transposed`` weight stored
    (in, out)): ΔW comes from the core's :func:`~portable_lora.core.delta_weight`, added in
    float32 (float64 for float64 weights) and rounded once. Working memory is a few row blocks
    of ``block_bytes``; a DoRA merge of a transposed weight normalises over W's rows, so it is
    merged whole (:func:`~portable_lora.core.merge_into`). ``threads`` > 1 computes blocks
    in that many threads (``read_rows`` must then be thread-safe; NumPy releases the GIL).
    """
    src = np.dtype(dtype)
    target = np.dtype(out_dtype) if out_dtype is not None else src
    block_bytes = _BLOCK_BYTES if block_bytes is None else block_bytes
    if unmerge and module.magnitude is not None:
        raise LoraError("unmerging DoRA needs the weight norm from before the merge, which no "
                        "adapter file stores", key=name)
    if math.prod(shape) == 0:
        yield np.empty(shape, dtype=target)
        return
    if transposed and module.magnitude is not None:
        W = np.empty(shape, dtype=src)
        read_rows(0, shape[0], W)
        merged = np.asarray(core.merge_into(W, module.A, module.B, scale, module.kind,
                                            magnitude=module.magnitude, transposed=True))
        yield _checked(merged.astype(target, copy=False), merged, target, allow_nonfinite, name, 0, shape[0])
        return
    acc = np.dtype(np.float64 if np.float64 in (src, target) else np.float32)
    A = np.asarray(module.A).astype(acc, copy=False)  # widened once per tensor, not per block
    B = np.asarray(module.B).astype(acc, copy=False)
    magnitude = None if module.magnitude is None else np.asarray(module.magnitude)
    signed = -float(scale) if unmerge else float(scale)
    row_shape = tuple(shape[1:])
    step = min(shape[0], max(1, block_bytes // (max(1, math.prod(row_shape)) * acc.itemsize)))
    # the common case, a plain (out, in) linear weight: ΔW's rows computed exactly as
    # core.delta_weight does ((B @ A) · s, in acc), into a reused buffer (no page faults of
    # fresh allocations; tests/test_ops.py checks the bits against core.merge_into)
    plain = magnitude is None and module.kind == "linear" and not transposed
    post_scale: float | None = signed
    if plain:
        A, post_scale = _prescaled(A, signed)
    block_shape = (step, *row_shape)

    def compute(start: int) -> tuple[np.ndarray, np.ndarray]:
        stop = min(start + step, shape[0])
        n = stop - start
        raw = _scratch("raw", block_shape, src)[:n]
        read_rows(start, stop, raw)
        w = raw if src == acc else _scratch("work", block_shape, acc)[:n]
        if w is not raw:
            np.copyto(w, raw, casting="unsafe")  # exact: every float format widens into float32
        if module.kind == "embedding" or transposed:
            a, b = A[:, start:stop], B
        else:
            a, b = A, B[start:stop]
        if plain:
            d = _scratch("delta", block_shape, acc)[:n]
            np.matmul(b, a, out=d)
            if post_scale is not None:
                np.multiply(d, post_scale, out=d)
            np.add(w, d, out=w)
            merged = w
        else:  # embeddings, transposed weights, convs and DoRA (each row's norm is its own)
            rows = None if magnitude is None else magnitude[start:stop]
            merged = np.asarray(core.merge_into(w, a, b, signed, module.kind, magnitude=rows,
                                                transposed=transposed))
        buffer = _OUTPUT.get(merged.size * target.itemsize)
        block = buffer[:merged.size * target.itemsize].view(target).reshape(merged.shape)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is _checked's to report
            np.copyto(block, merged, casting="unsafe")  # the one rounding
        try:
            return _checked(block, merged, target, allow_nonfinite, name, start, stop), buffer
        except BaseException:
            _OUTPUT.put(buffer)
            raise

    results = _in_order(compute, range(0, shape[0], step), threads)
    try:
        for block, buffer in results:
            yield block
            _OUTPUT.put(buffer)  # the consumer is done with it
    finally:
        results.close()


def _prescaled(A: np.ndarray, scale: float) -> tuple[np.ndarray, float | None]:
    """(A', s'): B @ A' · s' (s' None: no multiply) equals (B @ A) · s bit for bit.

    A power-of-two scale (α/r is one for most adapters) commutes exactly with every product
    and sum, so it is applied to A once instead of to every element of ΔW, unless that would
    make an entry of A subnormal or infinite (then it stays a multiply of ΔW).
    """
    if scale == 1.0:
        return A, None
    if scale != 0.0 and math.isfinite(scale) and math.frexp(abs(scale))[0] == 0.5:
        with np.errstate(over="ignore", under="ignore"):
            scaled = A * A.dtype.type(scale)
        magnitude = np.abs(scaled[scaled != 0])
        if magnitude.size == 0 or (np.isfinite(magnitude).all()
                                   and magnitude.min() >= np.finfo(A.dtype).tiny
                                   and np.abs(A[A != 0]).min() >= np.finfo(A.dtype).tiny):
            return scaled, None
    return A, scale


# Buffers are reused, across blocks and tensors: a fresh allocation of a block costs a page
# fault per 4 KB on first touch (measured: 40 % of a merge's time went to the kernel)
_LOCAL = threading.local()


def _scratch(key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """This thread's reusable buffer ``key``, viewed as ``shape`` × ``dtype``."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    nbytes = math.prod(shape) * dtype.itemsize
    flat = buffers.get(key)
    if flat is None or flat.size < nbytes:
        flat = buffers[key] = np.empty(max(nbytes, 1), dtype=np.uint8)
    return flat[:nbytes].view(dtype).reshape(shape)


class _FreeList:
    """Output blocks handed to a consumer and taken back when it is done with them."""

    def __init__(self, keep: int = 32):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._keep = keep

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, flat in enumerate(self._free):
                if flat.size >= nbytes:
                    return self._free.pop(i)
        return np.empty(max(nbytes, 1), dtype=np.uint8)

    def put(self, flat: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(flat)


_OUTPUT = _FreeList()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads,
                                                        thread_name_prefix="portable-lora-merge")
        return pool


def _in_order(fn: Callable[[int], Any], items: range, threads: int) -> Iterator[Any]:
    """``fn`` over ``items``, results in order; up to ``threads`` running at once and at most
    ``2 × threads`` done ahead (memory stays a few blocks per thread)."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    pool = _pool(threads)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for future in pending:  # let running ones finish before their buffers are reused
            if not future.cancelled():
                try:
                    _OUTPUT.put(future.result()[1])
                except BaseException:
                    pass


def _checked(block: np.ndarray, wide: np.ndarray, target: np.dtype, allow_nonfinite: bool, name: str,
             start: int, stop: int) -> np.ndarray:
    if allow_nonfinite:
        if not _finite(block).all():  # written as asked, and said so (once per tensor)
            warnings.warn(f"{name}: the merged tensor holds non-finite values (NaN or ±inf, "
                          f"{target}); written anyway, as allow_nonfinite asks", UserWarning, stacklevel=2)
        return block
    # the bound is exact for float32 working values; float64 ones are judged after rounding
    bound = _overflow_bound(target) if wide.dtype == np.float32 else None
    if bound is not None:
        if wide.size == 0 or (float(wide.max()) < bound and float(wide.min()) > -bound):
            return block
    elif _finite(block).all():
        return block
    bad = int(np.size(block) - np.count_nonzero(_finite(block)))
    raise LoraError(f"merging produced {bad} non-finite values in rows {start}-{stop - 1} "
                    f"({target}); overflow? (--allow-nonfinite writes them anyway)", key=name)


def merge_tensor(W: np.ndarray, module: LoraModule, scale: float, *, out_dtype: Any = None,
                 unmerge: bool = False, allow_nonfinite: bool = False, name: str = "",
                 transposed: bool = False, block_bytes: int | None = None) -> np.ndarray:
    """``W`` with ``module`` merged (or unmerged) at ``scale``, computed in row blocks
    (:func:`merge_blocks`), as one array."""
    target = np.dtype(out_dtype) if out_dtype is not None else W.dtype
    out = np.empty(W.shape, dtype=target)
    if W.size == 0:
        return out

    def read_rows(start: int, stop: int, buffer: np.ndarray) -> None:
        buffer[...] = W[start:stop]

    row = 0
    for block in merge_blocks(read_rows, W.shape, W.dtype, module, scale, out_dtype=target, unmerge=unmerge,
                              allow_nonfinite=allow_nonfinite, name=name, transposed=transposed,
                              block_bytes=block_bytes):
        out[row:row + block.shape[0]] = block
        row += block.shape[0]
    return out


@dataclass
class MergeReport:
    base: str
    adapter: str
    out: str
    strength: float
    unmerge: bool
    dtype: str | None
    modules: dict[str, str]
    tensors: int
    bytes: int
    shards: list[str]
    sharded: bool
    copied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "base": self.base, "adapter": self.adapter, "out": self.out,
                "strength": self.strength, "unmerge": self.unmerge, "dtype": self.dtype,
                "merged_modules": len(self.modules), "modules": self.modules, "tensors": self.tensors,
                "bytes": self.bytes, "shards": self.shards, "sharded": self.sharded,
                "copied_files": self.copied, "warnings": self.warnings}

    def table(self) -> str:
        verb = "unmerged from" if self.unmerge else "merged into"
        lines = [f"{self.adapter} {verb} {self.base} at strength {self.strength:g}",
                 f"  wrote {self.out}: {self.tensors} tensors ({len(self.modules)} changed), "
                 f"{human_bytes(self.bytes)}, {len(self.shards)} shard(s)"
                 + (f", dtype {self.dtype}" if self.dtype else "")]
        if self.copied:
            lines.append(f"  copied from the base directory: {', '.join(self.copied)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _check_plan(adapter: Adapter, ckpt: Checkpoint, *, source: str, unmerge: bool,
                allow_nonfinite: bool) -> tuple[dict[str, str], dict[str, bool]]:
    """The base tensor each module patches, and whether that tensor is stored (in, out)."""
    matched, unmatched = match_modules(adapter, ckpt.keys())
    if unmatched:
        names = list(unmatched)
        listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        ambiguous = [m for m in names if unmatched[m].startswith("ambiguous")]
        why = f"; {unmatched[ambiguous[0]]}" if ambiguous else ""
        raise LoraError(f"{len(names)} of {len(adapter)} adapter modules match no tensor of the base "
                        f"{ckpt.path} ('<module>.weight', also tried with a prefix from "
                        f"{', '.join(MODULE_PREFIXES)} added or stripped): {listing}{why}",
                        file=source, key=names[0])
    layouts = base_layouts(adapter, ckpt, matched)
    for module, key in matched.items():
        m = adapter[module]
        info = ckpt.info(key)
        expected = base_shape(m, layouts[module])
        if tuple(info.shape) != expected:
            layout = " (stored (in, out), as GPT-2's Conv1D)" if layouts[module] and m.kind == "linear" else ""
            raise LoraError(f"the base tensor {key!r} has shape {list(info.shape)}; the adapter's "
                            f"{m.kind} module needs {list(expected)}{layout}", file=source, key=module)
        if not _is_float(info.dtype):
            raise LoraError(f"the base tensor {key!r} is {info.dtype}; only floating-point weights can "
                            "be merged into (dequantize first)", file=source, key=module)
        if unmerge and m.is_dora:
            raise LoraError("unmerging DoRA needs the weight norm from before the merge, which no "
                            "adapter file stores", file=source, key=module)
    check_finite({m: adapter[m] for m in matched}, file=source, allow_nonfinite=allow_nonfinite)
    return matched, layouts


def fan_in_fan_out(adapter: Adapter) -> bool:
    """Whether the adapter says its base weights are stored (in, out) (PEFT ``fan_in_fan_out``, GPT-2).

    Only a hint: :func:`base_layouts` decides from the base's own shapes where they tell.
    """
    return bool(adapter.provenance.get("fan_in_fan_out", False))


def base_layouts(adapter: Adapter, ckpt: Checkpoint, matched: Mapping[str, str]) -> dict[str, bool]:
    """For each module of ``matched`` (module → its tensor in ``ckpt``): is that weight stored (in, out)?

    The layout belongs to the base checkpoint, not to the adapter: Hugging Face's GPT-2 stores
    its ``Conv1D`` weights (in, out), mlx-lm's GPT-2 the same weights (out, in), and one adapter
    applies to both; one checkpoint may hold both layouts (a ViT encoder of ``nn.Linear``
    under a GPT-2 decoder). A non-square linear weight tells its layout by its shape. A square
    one cannot: it takes the layout its siblings (the tensors beside it, under the same parent)
    tell: the patched non-square linear weights there, and GPT-2's ``c_attn`` / ``c_fc``
    (output 3× / 4× the input: their shape tells, patched or not). Where the siblings tell
    nothing, or disagree, the adapter's own hint decides: PEFT's ``fan_in_fan_out`` flag
    (:func:`fan_in_fan_out`). Non-linear modules are never transposed; a shape that fits
    neither layout gets the hint, for the caller's shape check to report.

    Hugging Face GPT-2, ``c_attn`` stored (768, 2304) beside the square ``c_proj``::

    >>> base_layouts(adapter, ckpt, {"h.0.attn.c_proj": "h.0.attn.c_proj.weight"})  # doctest: +SKIP
    {'h.0.attn.c_proj': True}
    """
    hint = fan_in_fan_out(adapter)
    layouts: dict[str, bool] = {}
    square: list[str] = []
    told: dict[str, set[bool]] = {}  # parent of a tensor → the layouts its tensors tell
    for module, key in matched.items():
        m, shape = adapter[module], tuple(ckpt.info(key).shape)
        out_in = tuple(m.weight_shape)
        if m.kind != "linear":
            layouts[module] = False
        elif out_in[0] == out_in[1]:
            square.append(module)
        elif shape in (out_in, out_in[::-1]):
            layouts[module] = shape != out_in
            told.setdefault(_parent(key), set()).add(layouts[module])
        else:
            layouts[module] = hint
    if square:
        keys = set(ckpt.keys())
        for module in square:
            parent = _parent(matched[module])
            seen = set(told.get(parent, ())) | _wide_projection_layouts(ckpt, parent, keys)
            layouts[module] = next(iter(seen)) if len(seen) == 1 else hint
    return layouts


def _parent(key: str) -> str:
    """``h.0.attn`` for the tensor ``h.0.attn.c_proj.weight``."""
    return key.rsplit(".", 2)[0] if key.count(".") >= 2 else ""


# GPT-2's family (gpt2, openai-gpt, imagegpt, decision_transformer: the Hugging Face models with
# Conv1D projections) names its widening projections c_attn (out = 3 × in) and c_fc (4 × in),
# each beside a c_proj (the attention's square, the MLP's not).
_WIDE_PROJECTIONS = ("c_attn", "c_fc")


def _wide_projection_layouts(ckpt: Checkpoint, parent: str, keys: set[str]) -> set[bool]:
    """The layouts (True: (in, out)) of the c_attn / c_fc weights beside ``parent``'s tensors."""
    layouts = set()
    for name in _WIDE_PROJECTIONS:
        key = f"{parent}.{name}.weight" if parent else f"{name}.weight"
        if key in keys:
            shape = tuple(ckpt.info(key).shape)
            if len(shape) == 2 and shape[0] != shape[1]:
                layouts.add(shape[0] < shape[1])
    return layouts


def base_shape(module: LoraModule, transposed: bool) -> tuple[int, ...]:
    """The shape of the base tensor ``module`` patches; (in, out) for a transposed linear."""
    shape = tuple(module.weight_shape)
    return shape[::-1] if transposed and module.kind == "linear" else shape


def _shard_metadata(base_meta: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, str]:
    meta = dict(base_meta)
    meta[MERGE_METADATA_KEY] = json.dumps(record, sort_keys=True)
    return meta


def merge(base: str | os.PathLike, adapter: Any, out: str | os.PathLike, *, strength: float = 1.0,
          dtype: str | None = None, unmerge: bool = False, format: str | None = None,
          convention: str | None = None, allow_nonfinite: bool = False, force: bool = False,
          progress: bool = False, options: Mapping[str, Any] | None = None, threads: int | None = None,
          durable: bool | None = None) -> MergeReport:
    """Merge ``adapter`` (a path in any format, or an Adapter) into ``base``, writing ``out``.

    ``strength`` multiplies every module's effective scale. ``dtype`` (float32, float16,
    bfloat16) casts every floating-point output tensor; by default each keeps its dtype.
    ``unmerge`` subtracts instead (not for DoRA). ``allow_nonfinite`` lets NaN/Inf factors and
    overflowing results through. Nothing is written when a check fails. ``threads`` (default:
    the usable cores, at most 8) compute row blocks in parallel, with BLAS held to one thread
    each meanwhile (threadpoolctl); a background thread writes. ``durable`` fsyncs the output
    (see :mod:`portable_lora.io.atomic`).

    >>> merge("model.safetensors", "adapter_peft", "merged.safetensors")  # doctest: +SKIP
    """
    strength = float(strength)
    if not math.isfinite(strength):
        raise LoraError(f"strength must be finite, found {strength}", key="strength")
    out_dtype = parse_dtype(dtype)
    threads = _threads(threads)
    out_path = check_output(out, force)
    inputs = [("base", base)] + ([("adapter", adapter)] if isinstance(adapter, (str, os.PathLike)) else [])
    for role, path in inputs:
        if same_path(out_path, path):
            raise LoraError(f"the output would replace the {role} being read; choose another path", file=out_path)
        if holds(out_path, path):
            raise LoraError(f"the output is a directory holding the {role} being read ({path}): "
                            "replacing it would delete it; choose another path", file=out_path)
    seen: list[str] = []
    with collect_warnings(seen), Checkpoint(base) as ckpt, durable_writes(durable), _blas_threads(threads):
        src = source_name(adapter)
        lora = load_adapter(adapter, format=format, convention=convention, options=options,
                            modules=ckpt.module_names())
        if not len(lora):
            raise LoraError("the adapter has no modules", file=src)
        plan, layouts = _check_plan(lora, ckpt, source=src, unmerge=unmerge, allow_nonfinite=allow_nonfinite)
        owner = {key: module for module, key in plan.items()}
        record = {"adapter": src, "strength": strength, "unmerge": unmerge,
                  "modules": len(plan), "tool": "portable-lora merge"}

        def out_dtype_of(name: str) -> np.dtype:
            info = ckpt.info(name)
            return out_dtype if (out_dtype is not None and _is_float(info.dtype)) else info.dtype

        def producer(name: str) -> Callable[[], Any]:
            def produce() -> Any:
                info = ckpt.info(name)
                target = out_dtype_of(name)
                module = owner.get(name)
                if module is None:
                    if target == info.dtype:
                        return [ckpt.file_range(name)]  # copied file to file, never read here
                    return _naming_shard(_cast_blocks(ckpt, name, target, allow_nonfinite),
                                         ckpt.shard_path(ckpt.shard_of(name)))
                m = lora[module]

                def read_rows(start: int, stop: int, buffer: np.ndarray) -> None:
                    ckpt.read_into(name, buffer, start * (info.nbytes // max(1, info.shape[0])))

                blocks = merge_blocks(read_rows, tuple(info.shape), info.dtype, m, m.scale * strength,
                                      out_dtype=target, unmerge=unmerge, allow_nonfinite=allow_nonfinite,
                                      name=name, transposed=layouts[module] and m.kind == "linear",
                                      threads=threads)
                return _naming_shard(blocks, ckpt.shard_path(ckpt.shard_of(name)))
            return produce

        def lazy(names: list[str]) -> dict[str, LazyTensor]:
            return {n: LazyTensor(out_dtype_of(n), tuple(ckpt.info(n).shape), producer(n)) for n in names}

        sizes = {n: math.prod(ckpt.info(n).shape) * out_dtype_of(n).itemsize for n in ckpt.keys()}
        total = sum(sizes.values())
        bar = progress_bar(total, "merging", progress)

        def written(name: str, nbytes: int) -> None:
            bar.update(nbytes)

        copied: list[str] = []
        try:
            if ckpt.path.is_file():
                shard = ckpt.shards[0]
                write_safetensors(out_path, lazy(ckpt.keys_in(shard)),
                                  _shard_metadata(ckpt.metadata(shard), record), on_tensor=written,
                                  background=False)
            else:
                with atomic_directory(out_path) as tmp:
                    for shard in ckpt.shards:
                        write_safetensors(tmp / shard, lazy(ckpt.keys_in(shard)),
                                          _shard_metadata(ckpt.metadata(shard), record), on_tensor=written,
                                          background=False)
                        ckpt.close_shard(shard)
                    if ckpt.index is not None:
                        index = dict(ckpt.index)
                        meta = dict(index.get("metadata") or {})
                        meta["total_size"] = total
                        index["metadata"] = meta
                        (tmp / ckpt.index_path.name).write_text(json.dumps(index, indent=2) + "\n",
                                                                encoding="utf-8")
                    copied = _copy_side_files(ckpt, tmp)
        finally:
            bar.close()
    return MergeReport(base=str(base), adapter=src, out=str(out_path), strength=strength, unmerge=unmerge,
                       dtype=None if out_dtype is None else str(out_dtype), modules=plan,
                       tensors=len(sizes), bytes=total, shards=list(ckpt.shards), sharded=ckpt.is_sharded,
                       copied=copied, warnings=seen)


def _threads(threads: int | None) -> int:
    if threads is None:
        try:
            usable = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            usable = os.cpu_count() or 1
        return max(1, min(8, usable))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LoraError(f"threads must be a positive integer, found {threads!r}", key="threads")
    return threads


@contextlib.contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """BLAS at one thread while ``threads`` > 1 of ours run GEMMs (else both oversubscribe the
    cores: measured 2 threads x 2 BLAS threads no faster than 1 x 2 on 2 cores, 1.8x with 2 x 1)."""
    if threads <= 1:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _naming_shard(blocks: Iterator[np.ndarray], shard: Path) -> Iterator[np.ndarray]:
    try:
        yield from blocks
    except LoraError as exc:
        raise exc.with_file(shard) from None


def _cast_blocks(ckpt: Checkpoint, name: str, target: np.dtype, allow_nonfinite: bool) -> Iterator[np.ndarray]:
    """An untouched tensor cast to ``target`` (``--dtype``), by row blocks, checked as merged
    tensors are: a finite value that the cast turns to ±inf is refused unless ``allow_nonfinite``."""
    info = ckpt.info(name)
    if not info.shape or info.nbytes == 0:
        yield _cast_checked(ckpt.get(name), target, allow_nonfinite, name, 0)
        return
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    step = max(1, _COPY_BLOCK_BYTES // row_bytes)
    buffer = np.empty((min(step, info.shape[0]), *info.shape[1:]), dtype=info.dtype)
    for start in range(0, info.shape[0], step):
        n = min(step, info.shape[0] - start)
        ckpt.read_into(name, buffer[:n], start * row_bytes)
        yield _cast_checked(buffer[:n], target, allow_nonfinite, name, start)


def _cast_checked(block: np.ndarray, target: np.dtype, allow_nonfinite: bool, name: str, start: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        cast = block.astype(target)
    lost = int(np.count_nonzero(~_finite(cast) & _finite(block))) if cast.size else 0
    if lost and not allow_nonfinite:
        raise LoraError(f"casting to {target} turns {lost} finite values to ±inf (rows from {start}; "
                        f"largest |value| {float(np.max(np.abs(block.astype(np.float64)))):.4g}); choose "
                        "a wider --dtype (--allow-nonfinite writes them anyway)", key=name)
    if lost:
        warnings.warn(f"{name}: casting to {target} turned finite values to ±inf; written anyway, as "
                      "allow_nonfinite asks", UserWarning, stacklevel=2)
    return cast


def _copy_side_files(ckpt: Checkpoint, into: Path) -> list[str]:
    """Copy the base directory's other files (config, tokenizer), never pickles or hidden files."""
    copied = []
    skip = set(ckpt.shards) | ({ckpt.index_path.name} if ckpt.index_path else set())
    for entry in sorted(ckpt.directory.iterdir()):
        if (entry.name in skip or entry.name.startswith(".") or not entry.is_file()
                or entry.suffix == ".safetensors" or entry.suffix.lower() in PICKLE_SUFFIXES):
            continue
        shutil.copy2(entry, into / entry.name)
        copied.append(entry.name)
    return copied
