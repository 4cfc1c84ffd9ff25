"""Base-model checkpoints: one .safetensors file or a sharded directory, read lazily.

A sharded checkpoint is a directory with ``model.safetensors.index.json`` (or another single
``*.safetensors.index.json``) whose ``weight_map`` names the shard of every tensor, as
transformers writes it. A directory holding exactly one ``.safetensors`` file and no index is
read as that file. Tensors come out as read-only memory-mapped views, so streaming over a
checkpoint never holds more than the tensor in hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import LoraError
from ..formats._common import read_json, refuse_pickle
from ..io.safetensors_io import FileRange, SafetensorsFile, TensorInfo

__all__ = ["Checkpoint", "INDEX_NAME", "MODULE_PREFIXES", "match_modules"]

INDEX_NAME = "model.safetensors.index.json"

# Prefixes tried, one at a time (added or stripped), when "<module>.weight" is not in the base:
# PEFT's wrapper, the transformers model wrapper, and VLM / diffusion sub-models.
MODULE_PREFIXES = ("base_model.model.", "model.", "language_model.", "model.language_model.",
                   "transformer.", "unet.", "text_encoder.", "text_model.")


class Checkpoint:
    """Read-only access to the tensors of a checkpoint (a file or a sharded directory).

    >>> with Checkpoint("model.safetensors") as ckpt:  # doctest: +SKIP
    ...     w = ckpt.get("model.layers.0.self_attn.q_proj.weight", copy=False)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise LoraError("no such file or directory", file=self.path)
        refuse_pickle(self.path)
        self.index_path: Path | None = None
        self.index: dict | None = None
        self._open: dict[str, SafetensorsFile] = {}
        self._shard_of: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        if self.path.is_dir():
            self.directory = self.path
            indexes = sorted(self.path.glob("*.safetensors.index.json"))
            preferred = self.path / INDEX_NAME
            if preferred.exists():
                indexes = [preferred]
            if len(indexes) > 1:
                raise LoraError(f"several index files {[p.name for p in indexes]}; expected one",
                                file=self.path)
            if indexes:
                self._read_index(indexes[0])
            else:
                files = sorted(p.name for p in self.path.iterdir() if p.suffix == ".safetensors")
                if not files:
                    raise LoraError("no .safetensors file and no index: not a checkpoint", file=self.path)
                if len(files) > 1:
                    raise LoraError(f"several .safetensors files {files[:6]} but no {INDEX_NAME} "
                                    "saying which tensor is in which", file=self.path)
                self.shards = files
        else:
            self.directory = self.path.parent
            self.shards = [self.path.name]
        if self.index is None:
            for shard in self.shards:
                for name, info in self._file(shard).tensors.items():
                    self._shard_of[name] = shard
                    self._infos[name] = info

    def _read_index(self, index_path: Path) -> None:
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoraError("expected a non-empty object 'weight_map' (tensor name → shard file)",
                            file=index_path, key="weight_map")
        shards: list[str] = []
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise LoraError(f"expected a shard file name in this directory, found {shard!r}",
                                file=index_path, key=name)
            if shard not in shards:
                shards.append(shard)
        self.index_path, self.index, self.shards = index_path, index, shards
        for shard in shards:
            if not (self.directory / shard).is_file():
                raise LoraError(f"the index names shard {shard!r}, which does not exist",
                                file=index_path, key=shard)
            tensors = self._file(shard).tensors
            for name in tensors:
                if weight_map.get(name) != shard:
                    raise LoraError(f"tensor {name!r} is in shard {shard!r} but the index maps it to "
                                    f"{weight_map.get(name)!r}", file=self.directory / shard, key=name)
            for name, info in tensors.items():
                self._shard_of[name] = shard
                self._infos[name] = info
        missing = [n for n in weight_map if n not in self._infos]
        if missing:
            raise LoraError(f"the index lists tensors no shard holds: {missing[:8]}",
                            file=index_path, key=missing[0])

    # -- access ---------------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    def _file(self, shard: str) -> SafetensorsFile:
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = SafetensorsFile(self.directory / shard)
        return f

    def keys(self) -> list[str]:
        """Every tensor name, shard by shard in the order of each file."""
        return [name for shard in self.shards for name in self.keys_in(shard)]

    def keys_in(self, shard: str) -> list[str]:
        return self._file(shard).keys()

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise LoraError("no such tensor in the checkpoint", file=self.path, key=name) from None

    def shard_of(self, name: str) -> str:
        self.info(name)
        return self._shard_of[name]

    def shard_path(self, shard: str) -> Path:
        return self.directory / shard

    def metadata(self, shard: str) -> dict[str, str]:
        return dict(self._file(shard).metadata)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        """The tensor ``name``; a read-only memory-mapped view when ``copy`` is False."""
        return self._file(self.shard_of(name)).get(name, copy=copy)

    def read_into(self, name: str, buffer: Any, offset: int = 0) -> None:
        """Fill ``buffer`` with ``name``'s bytes from ``offset`` on (no memory map)."""
        self._file(self.shard_of(name)).read_into(name, buffer, offset)

    def file_range(self, name: str) -> FileRange:
        """``name``'s bytes in its shard, for a writer to copy file to file."""
        return self._file(self.shard_of(name)).file_range(name)

    def module_names(self) -> list[str]:
        """``<module>`` for every ``<module>.weight`` tensor: the module list of the model."""
        return [k[: -len(".weight")] for k in self.keys() if k.endswith(".weight")]

    def release(self, name: str) -> None:
        """Drop the memory-mapped pages of ``name`` (see :meth:`SafetensorsFile.release`)."""
        shard = self._shard_of.get(name)
        f = self._open.get(shard) if shard else None
        if f is not None:
            f.release(name)

    def close_shard(self, shard: str) -> None:
        f = self._open.pop(shard, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        for shard in list(self._open):
            self.close_shard(shard)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


def _candidates(module: str, prefixes: Sequence[str]) -> list[str]:
    out = []
    for p in prefixes:
        out.append(f"{p}{module}.weight")
        if module.startswith(p) and len(module) > len(p):
            out.append(f"{module[len(p):]}.weight")
    return out


def match_modules(modules: Iterable[str], keys: Iterable[str], *,
                  prefixes: Sequence[str] = MODULE_PREFIXES) -> tuple[dict[str, str], dict[str, str]]:
    """Base tensor of each module: ``({module: key}, {module: why unmatched})``.

    ``<module>.weight`` when present; otherwise one prefix of ``prefixes`` added or stripped,
    accepted only when exactly one such key exists (ambiguity is reported, never guessed).
    """
    keyset = set(keys)
    matched: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    for module in modules:
        exact = f"{module}.weight"
        if exact in keyset:
            matched[module] = exact
            continue
        found = sorted({k for k in _candidates(module, prefixes) if k in keyset})
        if len(found) == 1:
            matched[module] = found[0]
        elif found:
            unmatched[module] = f"ambiguous: {exact!r} is absent and several keys fit: {found}"
        else:
            unmatched[module] = f"no tensor {exact!r}, with or without a common prefix"
    owners: dict[str, str] = {}
    for module, key in matched.items():
        if key in owners:
            raise LoraError(f"modules {owners[key]!r} and {module!r} both patch {key!r}", key=key)
        owners[key] = module
    return matched, unmatched
