"""LyCORIS adapters that are not LoRA (LoHa, LoKr, Tucker LoCon, full): exact ΔW, and LoRA by SVD.

These files store ΔW in forms with no ``B @ A`` factorisation, so they cannot be an
:class:`~portable_lora.adapter.Adapter` as they are. :func:`read_lycoris_deltas` materialises
each module's exact ΔW; :func:`lycoris_to_lora` turns it into LoRA factors of a chosen rank by
an explicit SVD (:func:`portable_lora.core.low_rank`) and reports each module's relative error.

Formulas (r the rank, s = α/r; α = 0 or missing means s = 1), as LyCORIS, PEFT, diffusers and
ComfyUI compute them:

* LoRA / LoCon ``lora_down`` (r, in[, kh, kw]), ``lora_up`` (out, r[, 1, 1]): ΔW = s · up @ down
  (through :func:`portable_lora.core.delta_weight`); with ``lora_mid`` (r, r, kh, kw) (Tucker):
  ΔW[o, i, …] = s · Σ up[o, a] · mid[a, b, …] · down[b, i], r = ``lora_down.shape[0]``.
* LoHa ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``:
  ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b), r = ``hada_w1_b.shape[0]``; with ``hada_t1``/``hada_t2``
  (r, r, kh, kw) (Tucker, w_a (r, out), w_b (r, in)): each factor is
  W[o, i, …] = Σ t[a, b, …] · w_a[a, o] · w_b[b, i].
* LoKr ``lokr_w1`` (or ``lokr_w1_a @ lokr_w1_b``), ``lokr_w2`` (or ``lokr_w2_a @ lokr_w2_b``, or
  Tucker with ``lokr_t2`` as for LoHa): ΔW = s · kron(w1, w2); r = ``lokr_w2_b.shape[0]`` when w2
  is decomposed, else ``lokr_w1_b.shape[0]``; s = 1 when both factors are full matrices.
* full ``diff``: ΔW = diff.

LoHa and LoKr convolutions without Tucker store the kernel axes flattened into ``in``; ΔW has
the shape (out, in·kh·kw) unless the weight shape is known (``modules={name: shape}`` or
``modules_from=<base checkpoint>``), when it is reshaped to the weight's shape.

Module names: kohya names (``lora_unet_...``) are restored as in :mod:`.kohya` (``modules``,
``modules_from``, ``naming``); dotted names (``transformer.blocks.0.attn.to_q``) are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ._common import read_tensors
from .kohya import read_alpha
from .kohya_names import ModuleIndex, resolve_names, split_kohya_name

__all__ = ["read_lycoris_deltas", "lycoris_to_lora", "ALGORITHMS"]

_PARTS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
ALGORITHMS = tuple(_PARTS)
_SUFFIXES = {s: algo for algo, parts in _PARTS.items() for s in parts}
_SUFFIXES["alpha"] = None
_SUFFIXES["dora_scale"] = None


def _group(keys: list[str], path: Path) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix in sorted(_SUFFIXES, key=len, reverse=True):
            if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
                groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = key
                break
        else:
            raise LoraError(f"not a LyCORIS tensor: expected <module>.<part> with a part among "
                            f"{', '.join(_SUFFIXES)}", file=path, key=key)
    return groups


def _algorithm(module: str, parts: Mapping[str, str], path: Path) -> str:
    if "dora_scale" in parts:
        raise LoraError("LyCORIS DoRA (dora_scale) is not supported: its norm axis depends on "
                        "trainer settings the file does not record", file=path, key=parts["dora_scale"])
    algos = {_SUFFIXES[s] for s in parts if _SUFFIXES[s] is not None}
    if len(algos) != 1:
        what = "only an alpha" if not algos else f"parts of {sorted(algos)}"
        raise LoraError(f"module {module!r} has {what}; expected the parts of one algorithm",
                        file=path, key=next(iter(parts.values())))
    return algos.pop()


def _need(parts: Mapping[str, str], tensors: Mapping[str, np.ndarray], module: str, path: Path,
          *names: str) -> list[np.ndarray]:
    out = []
    for n in names:
        if n not in parts:
            raise LoraError(f"incomplete module: {n!r} is missing (has {sorted(parts)})", file=path,
                            key=f"{module}.{n}")
        out.append(np.asarray(tensors[parts[n]], dtype=np.float64))
    return out


def _opt(parts, tensors, name):
    return np.asarray(tensors[parts[name]], dtype=np.float64) if name in parts else None


def _scale(alpha: float | None, rank: int | None) -> float:
    if rank is None or not alpha:  # no decomposed factor, or α missing / 0: scale 1
        return 1.0
    return core.effective_scale(alpha, rank, core.ALPHA_OVER_RANK)


def _tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    # W[o, i, ...] = Σ_ab t[a, b, ...] wa[a, o] wb[b, i]  (LyCORIS rebuild_tucker / PEFT make_weight_cp)
    return np.einsum("ab...,ao,bi->oi...", t, wa, wb)


def _delta(algo: str, module: str, parts: Mapping[str, str], tensors: Mapping[str, np.ndarray],
           alpha: float | None, path: Path) -> np.ndarray:
    """ΔW of one module in float64 (the file's own shape: see the module docstring)."""
    if algo == "full":
        if "diff_b" in parts:
            raise LoraError("a bias delta (diff_b) cannot be represented; only weight deltas are read",
                            file=path, key=parts["diff_b"])
        return _need(parts, tensors, module, path, "diff")[0]
    if algo == "lora":
        down, up = _need(parts, tensors, module, path, "lora_down.weight", "lora_up.weight")
        rank = int(down.shape[0])
        scale = _scale(alpha, rank)
        mid = _opt(parts, tensors, "lora_mid.weight")
        if mid is None:
            kind = "conv" if down.ndim == 4 else "linear"
            return np.asarray(core.delta_weight(down, up, scale, kind, dtype=np.float64))
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        return _tucker(mid, up2.T, down2) * scale
    if algo == "loha":
        w1a, w1b, w2a, w2b = _need(parts, tensors, module, path, "hada_w1_a", "hada_w1_b",
                                   "hada_w2_a", "hada_w2_b")
        t1, t2 = _opt(parts, tensors, "hada_t1"), _opt(parts, tensors, "hada_t2")
        rank = int(w1b.shape[0])
        if (t1 is None) != (t2 is None):
            missing = "hada_t2" if t2 is None else "hada_t1"
            raise LoraError(f"Tucker LoHa needs both hada_t1 and hada_t2; {missing} is missing",
                            file=path, key=f"{module}.{missing}")
        if t1 is not None:
            return _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b) * _scale(alpha, rank)
        delta = (w1a @ w1b.reshape(rank, -1)) * (w2a @ w2b.reshape(w2b.shape[0], -1)) * _scale(alpha, rank)
        return delta.reshape(delta.shape[0], *w1b.shape[1:])  # a 4-D w1b keeps its kernel axes
    # LoKr
    if "lokr_t1" in parts:
        raise LoraError("lokr_t1 (a Tucker w1) is written by no known trainer and not supported",
                        file=path, key=parts["lokr_t1"])
    w1, w2 = _opt(parts, tensors, "lokr_w1"), _opt(parts, tensors, "lokr_w2")
    rank1 = rank2 = None
    if w1 is None:
        w1a, w1b = _need(parts, tensors, module, path, "lokr_w1_a", "lokr_w1_b")
        rank1 = int(w1b.shape[0])
        w1 = w1a @ w1b
    if w2 is None:
        w2a, w2b = _need(parts, tensors, module, path, "lokr_w2_a", "lokr_w2_b")
        t2 = _opt(parts, tensors, "lokr_t2")
        rank2 = int(w2b.shape[0])
        if t2 is not None:
            w2 = _tucker(t2, w2a, w2b)
        else:  # w2b is (r, in2) or (r, in2·kh·kw) or (r, in2, kh, kw)
            w2 = (w2a @ w2b.reshape(rank2, -1)).reshape(w2a.shape[0], *w2b.shape[1:])
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise LoraError(f"lokr_w1_b has rank {rank1} but lokr_w2_b has rank {rank2}: LyCORIS scales "
                        "by the first, diffusers and ComfyUI by the second", file=path,
                        key=parts["lokr_w2_b"])
    rank = rank2 if rank2 is not None else rank1
    w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - w1.ndim))
    return np.kron(w1, w2) * _scale(alpha, rank)


def _read(path: Path, modules: Any, modules_from: Any, naming: str | None) -> tuple[dict[str, np.ndarray], np.dtype, dict[str, str]]:
    path = Path(path)
    tensors, _ = read_tensors(path)
    groups = _group(list(tensors), path)
    if not groups:
        raise LoraError("the file has no tensors", file=path)
    kohya = [m for m in groups if "." not in m and split_kohya_name(m) is not None]
    names = {m: m for m in groups if m not in kohya}
    index: ModuleIndex | None = None
    if kohya:
        resolved, index = resolve_names(kohya, file=path, modules=modules, modules_from=modules_from,
                                        naming=naming, keys={m: next(iter(groups[m].values())) for m in kohya})
        names.update(resolved)
    elif modules is not None or modules_from is not None:
        _, index = resolve_names([], file=path, modules=modules, modules_from=modules_from)
    if len(set(names.values())) != len(names):
        seen: dict[str, str] = {}
        for m, n in names.items():
            if n in seen:
                raise LoraError(f"the modules {seen[n]!r} and {m!r} both map to {n!r}", file=path,
                                key=next(iter(groups[m].values())))
            seen[n] = m
    deltas: dict[str, np.ndarray] = {}
    float64 = True
    for module, parts in groups.items():
        algo = _algorithm(module, parts, path)
        alpha = read_alpha(tensors[parts["alpha"]], key=parts["alpha"], file=path) if "alpha" in parts else None
        float64 &= all(tensors[k].dtype == np.float64 for s, k in parts.items() if s != "alpha")
        try:
            delta = _delta(algo, module, parts, tensors, alpha, path)
        except ValueError as exc:
            if isinstance(exc, LoraError):
                raise
            raise LoraError(f"{algo} factors of incompatible shapes "
                            f"({ {s: list(tensors[k].shape) for s, k in parts.items()} }): {exc}",
                            file=path, key=next(iter(parts.values()))) from None
        name = names[module]
        shape = index.shape(name) if index is not None else None
        if shape is not None and tuple(delta.shape) != tuple(shape):
            if delta.size != int(np.prod(shape)):
                raise LoraError(f"ΔW has shape {list(delta.shape)} but the module's weight has shape "
                                f"{list(shape)}", file=path, key=next(iter(parts.values())))
            delta = delta.reshape(shape)
        deltas[name] = delta
    return deltas, np.dtype(np.float64 if float64 else np.float32), {n: _algorithm(m, groups[m], path) for m, n in names.items()}


def read_lycoris_deltas(path: str | Path, modules: Any = None, *, modules_from: Any = None,
                        naming: str | None = None) -> dict[str, np.ndarray]:
    """``{module: ΔW}`` of a LyCORIS (or kohya) file, exactly, with α/r applied.

    ΔW is float32 (float64 when every factor is float64), in the layout of the weight it is
    added to. ``modules`` is a list of module names or a mapping name → weight shape.

    >>> deltas = read_lycoris_deltas("loha.safetensors", naming="sdxl")   # doctest: +SKIP
    >>> deltas["unet.down_blocks.1.attentions.0.proj_in"].shape           # doctest: +SKIP
    (640, 640)
    """
    deltas, dtype, _ = _read(Path(path), modules, modules_from, naming)
    return {n: d.astype(dtype) for n, d in deltas.items()}


def lycoris_to_lora(path: str | Path, rank: int, modules: Any = None, *, modules_from: Any = None,
                    naming: str | None = None) -> tuple[Adapter, dict[str, float]]:
    """LoRA factors of rank ``rank`` for every module, by SVD of its exact ΔW.

    Returns the adapter (scale 1: alpha = rank, rule alpha/rank; float32 factors, float64 for a
    float64 file) and ``{module: relative error}``, ‖ΔW − B·A‖_F / ‖ΔW‖_F measured after the
    factors were rounded to their dtype. A 4-D ΔW becomes a conv LoRA.
    """
    rank = core.check_rank(rank, module="rank")
    p = Path(path)
    deltas, dtype, algos = _read(p, modules, modules_from, naming)
    adapter = Adapter(provenance={"source_format": "lycoris", "source_path": str(p),
                                  "conversion": f"SVD of the exact ΔW to rank {rank}",
                                  "lycoris_algorithms": sorted(set(algos.values()))})
    errors: dict[str, float] = {}
    for name, delta in deltas.items():
        if delta.ndim not in (2, 4):
            raise LoraError(f"ΔW has {delta.ndim} dimensions; LoRA covers 2-D (linear) and 4-D (conv) "
                            "weights", file=p, key=name)
        kind = "conv" if delta.ndim == 4 else "linear"
        try:
            factors = core.low_rank(delta, rank, name=name)
        except LoraError as exc:  # NaN/inf in the file's factors: the core names the module
            raise exc.with_file(p) from None
        A, B = np.asarray(factors.A).astype(dtype), np.asarray(factors.B).astype(dtype)
        module = LoraModule(A, B, alpha=float(rank), rule=core.ALPHA_OVER_RANK, kind=kind)
        approx = np.asarray(core.delta_weight(A, B, 1.0, kind, dtype=np.float64))
        total = float(np.linalg.norm(delta))
        errors[name] = 0.0 if total == 0.0 else float(np.linalg.norm(delta - approx)) / total
        adapter[name] = module
    adapter.provenance["max_relative_error"] = max(errors.values(), default=0.0)
    return adapter, errors
