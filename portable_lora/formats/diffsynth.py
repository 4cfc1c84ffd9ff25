"""DiffSynth-Studio LoRA files: one ``.safetensors`` of PEFT-like keys and no alpha.

Keys ``<module>.lora_A.default.weight`` = A (r, in) and ``<module>.lora_B.default.weight`` = B
(out, r) (``.lora_A.weight`` without ``default`` and a leading ``diffusion_model.`` are accepted
and stripped, as DiffSynth's ``GeneralLoRALoader`` does). Module names are the model's own
(``blocks.0.self_attn.q``).

Scale: the file stores none. DiffSynth trains through PEFT with ``lora_alpha`` = rank, so its
adapters are at scale 1, and its 1.x loader adds ``alpha · up @ down`` with the user's
``alpha`` (default 1, no division by rank). Load options:

* default: scale 1 (rule ``raw``, alpha 1.0), recorded in the provenance with the reason;
* ``alpha=a`` (``convention="raw"`` or none): scale ``a``, DiffSynth 1.x's ``alpha`` argument;
* ``convention="alpha/rank"`` with ``alpha=a``: scale ``a / r`` (2.x's folding of α/r);
  without ``alpha``: α = r, scale 1. ``convention="alpha/sqrt(rank)"`` likewise with √r.

Files with per-module ``<module>.alpha`` tensors (written by other trainers; DiffSynth saves
none) are read as DiffSynth 2.x's ``GeneralLoRALoader`` reads them: scale ``α / r`` times the
user's ``alpha`` (default 1), rule ``alpha/rank``; a module without one is at scale 1 there.
DiffSynth 1.x ignored those tensors: ``convention="raw"`` reads the file that way (scale = the
user's ``alpha``). Either reading is recorded in the provenance.

Save: no alpha can be stored, so each module's scale is folded into **B** (one rounding, in
B's dtype, with :class:`~portable_lora.formats._common.UnderflowWarning` if entries flush to
zero); **A is written bit-exact**. Only linear and 1×1 conv LoRA (DiffSynth squeezes conv
factors to matrices); no DoRA, no embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import core
from ..adapter import Adapter
from ..errors import LoraError
from ..io.safetensors_io import write_safetensors
from ._common import (PROVENANCE_KEY, peek_safetensors, fold_scale, module_from, provenance_metadata, read_tensors,
                      stored_provenance)
from .kohya import read_alpha

NAME = "diffsynth"
LAYOUT = "file"  # one .safetensors
_SUFFIXES = {".lora_A.default.weight": "A", ".lora_B.default.weight": "B",
             ".lora_A.weight": "A", ".lora_B.weight": "B"}
_CONFIG_KEYS = ("lora_adapter_metadata", "portable_lora")


def detect(path: Path) -> str | None:
    peeked = peek_safetensors(path)
    if peeked is None:
        return None
    keys, metadata = peeked
    hits = [k for k in keys if k.endswith((".lora_A.default.weight", ".lora_B.default.weight"))]
    if not hits or any(k in metadata for k in _CONFIG_KEYS):
        return None
    if any(k.endswith(".alpha") for k in keys):
        return (f"PEFT-like keys with the adapter name 'default', per-module alpha tensors and no "
                f"config, such as {hits[0]!r}")
    return f"PEFT-like keys with the adapter name 'default' and no alpha or config, such as {hits[0]!r}"


def _module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    return name[len("diffusion_model."):] if name.startswith("diffusion_model.") else name


def load(path: Path, *, convention: str | None = None, alpha: float | None = None,
         **options: Any) -> Adapter:
    if options:
        raise LoraError(f"unknown options for the DiffSynth format: {sorted(options)}; expected alpha",
                        file=path)
    rule = core.check_rule(convention) if convention is not None else core.RAW
    if alpha is not None:
        alpha = core.check_alpha(alpha, module="alpha")
    tensors, metadata = read_tensors(path)
    parts: dict[str, dict[str, str]] = {}
    file_alphas: dict[str, str] = {}  # module → its .alpha tensor's key
    for key in tensors:
        if key.endswith(".alpha") and len(key) > len(".alpha"):
            file_alphas[_module_name(key, ".alpha")] = key
            continue
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix) and len(key) > len(suffix):
                name = _module_name(key, suffix)
                if role in parts.get(name, {}):
                    raise LoraError(f"two lora_{role} tensors for the module {name!r} (with and "
                                    "without 'default' or 'diffusion_model.')", file=path, key=key)
                parts.setdefault(name, {})[role] = key
                break
        else:
            raise LoraError("not a DiffSynth LoRA tensor: expected <module>.lora_A.default.weight or "
                            "<module>.lora_B.default.weight", file=path, key=key)
    if not parts:
        raise LoraError("the file has no LoRA tensors", file=path)
    stray = sorted(set(file_alphas) - set(parts))
    if stray:
        raise LoraError("an alpha tensor of a module with no LoRA factors", file=path, key=file_alphas[stray[0]])
    # 2.x's reading of a file's own alphas, unless the user asks for 1.x's (raw: they are ignored)
    by_file = bool(file_alphas) and convention != core.RAW
    if by_file:
        rule = convention or core.ALPHA_OVER_RANK
    stored = stored_provenance(metadata, path, NAME)
    adapter = Adapter(base_model=stored.get("base_model"), provenance=stored.get("provenance") or {})
    for name, roles in parts.items():
        for needed, other in (("A", "B"), ("B", "A")):
            if needed not in roles:
                raise LoraError(f"incomplete LoRA pair: {roles[other]!r} has no lora_{needed} partner",
                                file=path, key=roles[other])
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        rank = int(A.shape[0]) if A.ndim else 1
        if by_file:
            stated = (read_alpha(tensors[file_alphas[name]], key=file_alphas[name], file=path)
                      if name in file_alphas else None)
            base = stated if stated else core.alpha_for_scale(1.0, rank, rule)  # none or 0: scale 1
            module_alpha = base * (alpha if alpha is not None else 1.0)
        else:
            module_alpha = alpha if alpha is not None else core.alpha_for_scale(1.0, rank, rule)
        adapter[name] = module_from(A, B, alpha=module_alpha, rule=rule,
                                    kind="conv" if A.ndim == 4 else "linear", name=name, file=path)
    adapter.provenance.setdefault("source_format", NAME)
    if by_file:
        adapter.provenance.update({"convention": rule, "convention_reason":
                                   "the file's per-module alpha tensors, read as DiffSynth 2.x reads them "
                                   "(alpha / rank" + (f", times the user's alpha {alpha})" if alpha is not None
                                                      else ")") + "; 1.x ignored them (convention='raw')"})
    elif file_alphas:
        adapter.provenance.update({"convention": core.RAW, "convention_reason":
                                   "given by the user: the file's alpha tensors ignored, as DiffSynth 1.x did"
                                   + (f", the user's alpha {alpha} as its multiplier" if alpha is not None else "")})
    elif convention is None and alpha is None:
        adapter.provenance.update({"convention": core.RAW, "convention_reason":
                                   "DiffSynth saves no alpha; its adapters are trained at scale 1 "
                                   "(lora_alpha = rank), which its 1.x loader applies at alpha=1"})
    elif convention is None:
        adapter.provenance.update({"convention": core.RAW, "convention_reason":
                                   f"the user's alpha {alpha} as DiffSynth 1.x's raw multiplier"})
    else:
        adapter.provenance.update({"convention": rule, "convention_reason": "given by the user"
                                   + (f", with alpha {alpha}" if alpha is not None else ", alpha = scale 1")})
    if alpha is not None:
        adapter.provenance["user_alpha"] = alpha
    return adapter


def save(adapter: Adapter, path: Path, **options: Any) -> None:
    if options:
        raise LoraError(f"unknown options for the DiffSynth format: {sorted(options)}", file=path)
    if not adapter:
        raise LoraError("the adapter has no modules", file=path)
    tensors = {}
    for name, m in adapter.items():
        if m.is_dora:
            raise LoraError("DiffSynth files have no DoRA", file=path, key=name)
        if m.kind == "embedding":
            raise LoraError("DiffSynth's loader patches weights as up @ down; an embedding LoRA's "
                            "table layout would be transposed", file=path, key=name)
        if m.kind == "conv" and tuple(m.A.shape[2:]) != (1, 1):
            raise LoraError(f"DiffSynth squeezes conv factors to matrices, so only 1×1 conv LoRA can be "
                            f"written; this one has a {m.A.shape[2]}×{m.A.shape[3]} kernel",
                            file=path, key=name)
        tensors[f"{name}.lora_A.default.weight"] = m.A
        tensors[f"{name}.lora_B.default.weight"] = fold_scale(m.B, m.scale, name=name, file=path)
    write_safetensors(path, tensors, {PROVENANCE_KEY: provenance_metadata(adapter)})
