"""kohya sd-scripts / LyCORIS LoRA (LoCon) files: one ``.safetensors`` with a per-module alpha.

Keys ``<kohya name>.lora_down.weight`` = A (r, in[, kh, kw]), ``.lora_up.weight`` = B
(out, r[, 1, 1]) and ``.alpha`` (a 0-dim tensor). A 4-D down makes a conv LoRA (kind ``conv``).
Module names: ``lora_unet_<path with "_">``, ``lora_te_`` / ``lora_te1_`` (text_encoder),
``lora_te2_`` (text_encoder_2), ``lora_te3_``, ``lora_transformer_``; they become diffusers
component-prefixed names (``unet.down_blocks.0...``) through :mod:`.kohya_names`.

Scale: α/r with r = ``lora_down.shape[0]``; α = 0 or missing means α = r (scale 1). The
``ss_network_dim`` and ``ss_network_alpha`` metadata are informational only and never used for
the scale. (LyCORIS's ``rs_lora`` option trains at α/√r and stores α·√r, so the default α/r
reading gives the training-time scale; pass ``convention=`` only for a file whose writer stored
an α meant for another rule.)

Load options: ``modules=[...]``, ``modules_from=<base checkpoint>``, ``naming="sd1"|"sd2"|"sdxl"``
(see :func:`.kohya_names.resolve_names`); ``convention=`` (``raw``, ``alpha/rank``,
``alpha/sqrt(rank)``) for files trained with another rule (default ``alpha/rank``; a missing
α still means scale 1).

LyCORIS LoHa / LoKr / Tucker files are not LoRA: :func:`load` explains and points to
:func:`portable_lora.formats.lycoris.read_lycoris_deltas` and
:func:`~portable_lora.formats.lycoris.lycoris_to_lora`.

Save writes per-module float32 alphas with α/r equal to the module's scale (a raw-rule module
with scale s gets α = s·r), ``ss_network_dim`` / ``ss_network_alpha`` (the most common rank and
alpha), and the adapter's provenance under ``portable_lora_provenance``. ``te1=True`` writes
``lora_te1_`` for ``text_encoder`` (the default when the adapter also has ``text_encoder_2``,
as kohya does for SDXL).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import core
from ..adapter import Adapter, LoraModule
from ..errors import LoraError
from ..io.safetensors_io import write_safetensors
from ._common import (PROVENANCE_KEY, peek_safetensors, convention_provenance, module_from, provenance_metadata,
                      read_tensors, stored_provenance)
from .kohya_names import KOHYA_PREFIXES, kohya_name, resolve_names

NAME = "kohya"
LAYOUT = "file"  # one .safetensors
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
# LyCORIS parts that are not plain LoRA: suffix → the algorithm that writes it
NOT_LORA = {
    **{s: "LoHa" for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{s: "LoKr" for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                           "lokr_t1", "lokr_t2")},
    "lora_mid.weight": "Tucker-decomposed LoCon (lora_mid)",
    "diff": "LyCORIS full (diff)", "diff_b": "LyCORIS full (diff)",
}
_INFO_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                  "ss_base_model_version", "ss_sd_model_name", "ss_v2")


def split_key(key: str) -> tuple[str, str]:
    """``(module, suffix)``: kohya module names have no dots, so the first dot splits."""
    module, _, suffix = key.partition(".")
    return module, suffix


def not_lora_reason(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(algorithm, key)`` for the first LyCORIS key that is not plain LoRA, or None."""
    for key in keys:
        for suffix, algo in NOT_LORA.items():
            if key.endswith("." + suffix):
                return algo, key
    return None


def detect(path: Path) -> str | None:
    peeked = peek_safetensors(path)
    if peeked is None:
        return None
    keys = peeked[0]
    found = not_lora_reason(keys)
    if found:
        return f"LyCORIS {found[0]} keys such as {found[1]!r} (not LoRA; see portable_lora.formats.lycoris)"
    for key in keys:
        if key.endswith(".lora_down.weight") or key.endswith(".lora_up.weight"):
            return f"kohya LoRA keys such as {key!r}"
    for key in keys:
        if key.startswith(tuple(KOHYA_PREFIXES)) and key.endswith(".alpha"):
            return f"kohya alpha keys such as {key!r}"
    return None


def _not_lora_error(algo: str, key: str, path: Path) -> LoraError:
    return LoraError(f"this is a LyCORIS {algo} file, not LoRA: its ΔW has no B @ A form, so it "
                     "cannot be loaded as an adapter. Read its exact ΔW with "
                     "portable_lora.formats.lycoris.read_lycoris_deltas(path), or convert it to LoRA "
                     "by SVD (with the error reported) with "
                     "portable_lora.formats.lycoris.lycoris_to_lora(path, rank)", file=path, key=key)


def read_alpha(value: np.ndarray, *, key: str, file: Any) -> float:
    """The float of a kohya ``.alpha`` tensor: one finite, non-negative number."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.ndim > 1:
        raise LoraError(f"alpha must be a single number (a 0-dim tensor), found shape {list(arr.shape)}",
                        file=file, key=key)
    if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
        raise LoraError(f"alpha must be a number, found dtype {arr.dtype}", file=file, key=key)
    alpha = float(arr.astype(np.float64).reshape(()))
    if not math.isfinite(alpha):
        raise LoraError(f"alpha must be finite, found {alpha}", file=file, key=key)
    if alpha < 0:
        raise LoraError(f"alpha must not be negative, found {alpha}", file=file, key=key)
    return alpha


def group_keys(keys: Iterable[str], *, file: Any) -> dict[str, dict[str, str]]:
    """``{kohya module: {suffix: key}}`` for a plain kohya LoRA file; other keys are errors."""
    groups: dict[str, dict[str, str]] = {}
    keys = list(keys)
    found = not_lora_reason(keys)
    if found:
        raise _not_lora_error(*found, file)
    for key in keys:
        module, suffix = split_key(key)
        if suffix == "dora_scale":
            raise LoraError("LyCORIS DoRA (dora_scale) is not supported: its magnitude is per input "
                            "channel or per output channel depending on the trainer's settings, "
                            "which the file does not record", file=file, key=key)
        if suffix not in LORA_SUFFIXES or not module:
            raise LoraError("not a kohya LoRA tensor: expected <name>.lora_down.weight, "
                            "<name>.lora_up.weight or <name>.alpha", file=file, key=key)
        groups.setdefault(module, {})[suffix] = key
    for module, parts in groups.items():
        for needed, other in (("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight")):
            if needed not in parts:
                present = parts.get(other) or parts["alpha"]
                raise LoraError(f"incomplete LoRA pair: {present!r} has no {module}.{needed} partner",
                                file=file, key=present)
    return groups


def load(path: Path, *, convention: str | None = None, modules: Any = None, modules_from: Any = None,
         naming: str | None = None, **options: Any) -> Adapter:
    if options:
        raise LoraError(f"unknown options for the kohya format: {sorted(options)}; expected "
                        "modules, modules_from, naming", file=path)
    if convention is not None:
        core.check_rule(convention)
    tensors, metadata = read_tensors(path)
    groups = group_keys(tensors, file=path)
    if not groups:
        raise LoraError("the file has no LoRA tensors", file=path)
    names, index = resolve_names(groups, file=path, modules=modules, modules_from=modules_from,
                                 naming=naming, keys={m: p["lora_down.weight"] for m, p in groups.items()})
    rule = convention or core.ALPHA_OVER_RANK
    stored = stored_provenance(metadata, path, NAME)
    adapter = Adapter(base_model=stored.get("base_model") or metadata.get("ss_sd_model_name")
                      or metadata.get("ss_base_model_version"),
                      provenance=stored.get("provenance") or {})
    defaulted = []
    for kname, parts in groups.items():
        name = names[kname]
        A, B = tensors[parts["lora_down.weight"]], tensors[parts["lora_up.weight"]]
        rank = int(A.shape[0]) if A.ndim else 0
        alpha = read_alpha(tensors[parts["alpha"]], key=parts["alpha"], file=path) if "alpha" in parts else 0.0
        if alpha == 0.0:  # kohya: missing or zero alpha means alpha = rank (scale 1)
            defaulted.append(name)
            alpha = core.alpha_for_scale(1.0, rank, rule) if rank > 0 else 1.0
        adapter[name] = module_from(A, B, alpha=alpha, rule=rule, kind="conv" if A.ndim == 4 else "linear",
                                    name=name, file=path)
        _check_shape(adapter[name], index.shape(name), path, parts["lora_down.weight"])
    if convention is None:
        _restore_exact(adapter, stored.get("modules"), names.values())
    adapter.provenance.setdefault("source_format", NAME)
    adapter.provenance.update(convention_provenance(
        convention, core.ALPHA_OVER_RANK,
        "kohya sd-scripts and LyCORIS scale by alpha / rank (rank = lora_down.shape[0])"))
    if defaulted:
        adapter.provenance["alpha_defaulted_to_rank"] = defaulted
    info = {k: metadata[k] for k in _INFO_METADATA if k in metadata}
    if info:
        adapter.provenance["kohya_metadata"] = info
    return adapter


def _check_shape(m: LoraModule, shape: tuple[int, ...] | None, path: Path, key: str) -> None:
    """The module's ΔW against the weight the module list (``modules_from``) recorded for it.

    Equal element counts pass: kohya trains a 1×1 convolution (SD1's ``proj_in``) with 2-D or
    4-D factors alike, and the merge reshapes.
    """
    if shape is None:
        return
    mine = tuple(m.weight_shape)
    if shape[0] != mine[0] or math.prod(shape) != math.prod(mine):
        raise LoraError(f"the factors make a ΔW of shape {list(mine)}, but the module's weight in the "
                        f"module list has shape {list(shape)} (a LoRA for another model?)", file=path, key=key)


def _restore_exact(adapter: Adapter, written: Any, names: Iterable[str]) -> None:
    """Give modules back the α and rule our writer recorded, where the file still means them.

    A kohya α is a float32 tensor read under α/r: α = 0.1, or an rsLoRA module, comes back
    within float32's rounding of its scale. Our writer records each module's own α and rule;
    they are taken back only when the file's scale agrees with them to that rounding (nobody
    retrained or edited the file since), so a hand-edited alpha tensor always wins.
    """
    if not isinstance(written, dict):
        return
    for name in names:
        entry = written.get(name)
        if not isinstance(entry, dict) or name not in adapter:
            continue
        alpha, rule = entry.get("alpha"), entry.get("rule")
        try:  # a hand-edited header may hold anything: only a plain positive finite α is taken
            alpha = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None
        except OverflowError:
            alpha = None
        if alpha is not None and math.isfinite(alpha) and alpha > 0 and rule in core.RULES:
            m = adapter[name]
            exact = core.effective_scale(float(alpha), m.rank, rule)
            if math.isclose(exact, m.scale, rel_tol=2 ** -23, abs_tol=0.0):
                m.alpha, m.rule = alpha, rule


def _most_common(values: Iterable[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def save(adapter: Adapter, path: Path, *, te1: bool | None = None, **options: Any) -> None:
    if options:
        raise LoraError(f"unknown options for the kohya format: {sorted(options)}; expected te1", file=path)
    if not adapter:
        raise LoraError("the adapter has no modules", file=path)
    if te1 is None:
        te1 = any(name.startswith("text_encoder_2.") for name in adapter)
    tensors: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}
    alphas: list[float] = []
    exact: dict[str, dict[str, Any]] = {}  # each module's own α and rule, for _restore_exact
    for name, m in adapter.items():
        if m.kind == "embedding":
            raise LoraError("kohya files have no embedding LoRA", file=path, key=name)
        if m.is_dora:
            raise LoraError("kohya files have no DoRA (LyCORIS dora_scale has another layout)",
                            file=path, key=name)
        try:
            kname = kohya_name(name, te1=te1)
        except LoraError as exc:
            raise exc.with_file(path) from None
        if kname in owners:
            raise LoraError(f"the modules {owners[kname]!r} and {name!r} both become the kohya "
                            f"name {kname!r}", file=path, key=name)
        owners[kname] = name
        A, B, alpha = m.A, m.B, _kohya_alpha(m)
        if alpha > 0 and m.alpha > 0:
            exact[name] = {"alpha": float(m.alpha), "rule": m.rule}
        if alpha < 0:  # kohya readers take α as given, ours refuses a negative α: move the sign into B
            alpha, B = -alpha, -B
        if alpha == 0:  # α = 0 would read as α = r: keep ΔW = 0 with zero B instead
            alpha, B = float(m.rank), np.zeros_like(B)
        alpha32 = np.float32(alpha)
        if not math.isfinite(float(alpha32)):
            raise LoraError(f"alpha {alpha} does not fit a float32 alpha tensor", file=path, key=name)
        tensors[f"{kname}.alpha"] = np.asarray(alpha32)
        tensors[f"{kname}.lora_down.weight"] = A
        tensors[f"{kname}.lora_up.weight"] = B
        alphas.append(float(alpha32))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(m.rank for m in adapter.values())),
        "ss_network_alpha": repr(_most_common(alphas)),
        PROVENANCE_KEY: provenance_metadata(adapter, modules=exact),
    }
    write_safetensors(path, tensors, metadata)


def _kohya_alpha(m) -> float:
    """α with α / r equal to the module's scale (the stored α itself for alpha/rank modules)."""
    if m.rule == core.ALPHA_OVER_RANK:
        return float(m.alpha)
    return core.alpha_for_scale(m.scale, m.rank, core.ALPHA_OVER_RANK)
