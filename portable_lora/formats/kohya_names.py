"""kohya / LyCORIS module names ↔ diffusers component-prefixed module names.

kohya writes ``lora_unet_<path with "_" for ".">`` (and ``lora_te_``, ``lora_te1_``,
``lora_te2_``, ``lora_te3_``, ``lora_transformer_``). Writing is mechanical; reading must
restore the dots, which needs the target's module names because module names themselves
contain underscores (``to_q``, ``transformer_blocks``). Sources of names, in order:

1. ``modules=[...]``: module names, component-prefixed (``unet.down_blocks.0...``) or bare
   (then they serve every component);
2. ``modules_from=``: a base checkpoint (``.safetensors`` file, several files, or a diffusers
   pipeline folder with ``unet/``, ``text_encoder/``... subfolders) whose ``<module>.weight``
   keys give the names;
3. the built-in table (``data/kohya_names.json.gz``) of Stable Diffusion 1.x, 2.x and SDXL
   UNet and text-encoder names, including the original (LDM/"sgm") UNet names that kohya
   writes for SDXL (``lora_unet_input_blocks_4_1_...``), mapped to diffusers names.

A name that two modules could claim is an error, never a guess; so is a name none can claim.

>>> kohya_name("unet.down_blocks.0.attentions.0.proj_in")
'lora_unet_down_blocks_0_attentions_0_proj_in'
>>> split_kohya_name("lora_te2_text_model_encoder_layers_0_mlp_fc1")
('text_encoder_2', 'text_model_encoder_layers_0_mlp_fc1')
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import LoraError

__all__ = ["KOHYA_PREFIXES", "COMPONENTS", "split_kohya_name", "kohya_name", "ModuleIndex",
           "resolve_names", "module_index", "builtin_models", "TABLE_PATH"]

# kohya prefix → diffusers component ("" = a bare model whose names carry no component).
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",
    "lycoris_": "",  # LyCORIS wrapping a whole model (no component)
}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_WRITE_PREFIX = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_",
                 "transformer": "lora_transformer_"}

TABLE_PATH = Path(__file__).parent / "data" / "kohya_names.json.gz"


def split_kohya_name(name: str) -> tuple[str, str] | None:
    """``(component, underscored tail)`` of a kohya module name, or None for an unknown prefix."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix) and len(name) > len(prefix):
            return KOHYA_PREFIXES[prefix], name[len(prefix):]
    return None


def _split_component(name: str) -> tuple[str | None, str]:
    head, _, tail = name.partition(".")
    if head in COMPONENTS and tail:
        return head, tail
    return None, name


def kohya_name(module: str, *, te1: bool = False) -> str:
    """The kohya name of a component-prefixed module name (``te1``: SDXL's ``lora_te1_``)."""
    component, tail = _split_component(module)
    if component is None:
        raise LoraError(f"module {module!r} has no diffusers component prefix ({', '.join(COMPONENTS)}"
                        "): kohya names need one (rename the adapter's modules first, e.g. "
                        "adapter.rename(lambda n: 'unet.' + n))", key=module)
    prefix = ("lora_te1_" if te1 else "lora_te_") if component == "text_encoder" else _WRITE_PREFIX[component]
    return prefix + tail.replace(".", "_")


class ModuleIndex:
    """Dotted module names indexed by (component, underscored name).

    ``names`` maps module names to their weight shapes (or None); names with a component
    prefix answer only for that component, bare names for every component.
    ``aliases`` adds extra underscored spellings (the LDM names of the UNet).
    """

    def __init__(self, names: Mapping[str, Any] | Iterable[str], *, source: str,
                 aliases: Mapping[tuple[str, str], str] | None = None):
        self.source = source
        self.shapes: dict[str, Any] = {}
        self._index: dict[tuple[str | None, str], set[str]] = {}
        items = names.items() if isinstance(names, Mapping) else ((n, None) for n in names)
        for name, shape in items:
            if not isinstance(name, str) or not name:
                raise LoraError(f"module names must be non-empty strings, found {name!r}", key="modules")
            component, tail = _split_component(name)
            self._index.setdefault((component, tail.replace(".", "_")), set()).add(tail)
            self.shapes[name] = None if shape is None else tuple(shape)
        for (component, underscored), tail in (aliases or {}).items():
            self._index.setdefault((component, underscored), set()).add(tail)

    def candidates(self, component: str, tail: str) -> set[str]:
        """Every adapter name the kohya (component, tail) could stand for."""
        if not component:  # a bare model: only bare names answer
            return set(self._index.get((None, tail), ()))
        out = {f"{component}.{t}" for t in self._index.get((component, tail), ())}
        return out | {f"{component}.{t}" for t in self._index.get((None, tail), ())}

    def shape(self, adapter_name: str) -> tuple[int, ...] | None:
        """The weight shape recorded for ``adapter_name`` (its bare name also counts)."""
        if adapter_name in self.shapes:
            return self.shapes[adapter_name]
        return self.shapes.get(_split_component(adapter_name)[1])


# -- names from a base checkpoint ---------------------------------------------------------------
def _weights_of(path: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    from ..io.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        return {prefix + k[: -len(".weight")]: info.shape for k, info in f.tensors.items()
                if k.endswith(".weight")}


def names_from_checkpoint(source: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """``{module: weight shape}`` from ``<module>.weight`` keys of base checkpoint files.

    ``source`` is a ``.safetensors`` file, a list of them, a folder of them, or a diffusers
    pipeline folder (then names get the subfolder as component prefix: ``unet.``...).
    """
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    names: dict[str, tuple[int, ...]] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise LoraError("modules_from: no such file or directory", file=p, key="modules_from")
        if p.is_file():
            names.update(_weights_of(p))
            continue
        found = False
        for f in sorted(p.glob("*.safetensors")):
            names.update(_weights_of(f))
            found = True
        for component in COMPONENTS:
            for f in sorted((p / component).glob("*.safetensors")) if (p / component).is_dir() else ():
                names.update(_weights_of(f, component + "."))
                found = True
        if not found:
            raise LoraError("modules_from: the folder holds no .safetensors file (nor unet/, "
                            "text_encoder/... subfolders with one)", file=p, key="modules_from")
    return names


# -- the built-in table ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    with gzip.open(TABLE_PATH, "rt", encoding="utf-8") as f:
        return json.load(f)


def builtin_models() -> tuple[str, ...]:
    """Names of the base models in the built-in table (``sd1``, ``sd2``, ``sdxl``)."""
    return tuple(_table()["models"])


@functools.lru_cache(maxsize=None)
def module_index(model: str) -> ModuleIndex:
    """The :class:`ModuleIndex` of a built-in base model."""
    table = _table()
    if model not in table["models"]:
        raise LoraError(f"unknown base model {model!r} for kohya names; the built-in table has "
                        f"{', '.join(table['models'])}", key="naming")
    names: list[str] = []
    aliases: dict[tuple[str, str], str] = {}
    for component, group in table["models"][model].items():
        listed = table["names"][group]
        names += [f"{component}.{n}" for n in listed]
        ldm = table["ldm"].get(group)
        if ldm:
            for diffusers_name, ldm_name in zip(listed, ldm):
                if ldm_name:
                    aliases[(component, ldm_name.replace(".", "_"))] = diffusers_name
    return ModuleIndex(names, source=f"the built-in {model} table", aliases=aliases)


def _resolve_with(index: ModuleIndex, parsed: Mapping[str, tuple[str, str]], *, file: Any,
                  keys: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """``({kohya: adapter name}, first unresolved kohya name)``; ambiguity raises."""
    out, missing = {}, None
    for kname, (component, tail) in parsed.items():
        found = index.candidates(component, tail)
        if len(found) > 1:
            raise LoraError(f"the kohya name {kname!r} is ambiguous in {index.source}: it could be "
                            f"any of {sorted(found)}", file=file, key=keys.get(kname, kname))
        if found:
            out[kname] = found.pop()
        elif missing is None:
            missing = kname
    return out, missing


def resolve_names(kohya_names: Iterable[str], *, file: Any = None, modules: Any = None,
                  modules_from: Any = None, naming: str | None = None,
                  keys: Mapping[str, str] | None = None) -> tuple[dict[str, str], ModuleIndex]:
    """``{kohya name: adapter module name}`` for every name, and the index that resolved them.

    ``keys`` maps a kohya name to a tensor key to name in errors. See the module docstring
    for where names come from; ``naming`` picks a built-in base model (``sd1``, ``sd2``, ``sdxl``).
    """
    keys = dict(keys or {})
    parsed: dict[str, tuple[str, str]] = {}
    for kname in kohya_names:
        split = split_kohya_name(kname)
        if split is None:
            raise LoraError(f"unknown kohya module prefix in {kname!r}: expected one of "
                            f"{', '.join(KOHYA_PREFIXES)}", file=file, key=keys.get(kname, kname))
        parsed[kname] = split

    if modules is not None or modules_from is not None:
        if naming is not None:
            raise LoraError("give either a module list (modules=/modules_from=) or a built-in "
                            "naming table (naming=), not both", file=file, key="naming")
        names: dict[str, Any] = {}
        if modules is not None:
            if isinstance(modules, str) or not isinstance(modules, Iterable):
                raise LoraError(f"modules= must be a list of module names (or a mapping name → "
                                f"weight shape), found {type(modules).__name__}", key="modules")
            names.update(modules.items() if isinstance(modules, Mapping) else ((m, None) for m in modules))
        if modules_from is not None:
            names.update(names_from_checkpoint(modules_from))
        index = ModuleIndex(names, source="the given module list")
        mapping, missing = _resolve_with(index, parsed, file=file, keys=keys)
        if missing is not None:
            raise LoraError(f"the kohya name {missing!r} matches no module of the given module list "
                            f"({len(index.shapes)} names)", file=file, key=keys.get(missing, missing))
        return _check_unique(mapping, file, keys), index

    candidates = [naming] if naming is not None else list(builtin_models())
    complete: list[tuple[str, dict[str, str], ModuleIndex]] = []
    best: tuple[int, str | None, str] = (-1, None, "")
    for model in candidates:
        index = module_index(model)
        mapping, missing = _resolve_with(index, parsed, file=file, keys=keys)
        if missing is None:
            complete.append((model, mapping, index))
        elif len(mapping) > best[0]:
            best = (len(mapping), missing, model)
    if not complete:
        missing = best[1]
        tables = naming or ", ".join(candidates)
        raise LoraError(f"cannot restore the module name of {missing!r}: it is not in the built-in "
                        f"table ({tables}); pass modules=[...] (the model's module names) or "
                        "modules_from=<base checkpoint .safetensors>", file=file,
                        key=keys.get(missing, missing))
    model, mapping, index = complete[0]
    for other, other_mapping, _ in complete[1:]:
        for kname, name in mapping.items():
            if other_mapping[kname] != name:
                raise LoraError(f"the kohya name {kname!r} means {name!r} in {model} but "
                                f"{other_mapping[kname]!r} in {other}: pass naming='{model}' or "
                                f"naming='{other}' (or modules=/modules_from=)", file=file,
                                key=keys.get(kname, kname))
    return _check_unique(mapping, file, keys), index


def _check_unique(mapping: dict[str, str], file: Any, keys: Mapping[str, str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for kname, name in mapping.items():
        if name in seen:
            raise LoraError(f"two kohya modules map to the module {name!r}: {seen[name]!r} and "
                            f"{kname!r}", file=file, key=keys.get(kname, kname))
        seen[name] = kname
    return mapping


# -- offline generation of the table (needs torch, diffusers, transformers) ---------------------
SD_UNET = {  # the structure of the SD 1.x / 2.x UNet (channel sizes do not change names)
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64,
}
SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
}
CLIP_TEXT = {  # (class, layers, hidden, heads, intermediate, projection)
    "clip-l": ("CLIPTextModel", 12, 768, 12, 3072, None),
    "openclip-h": ("CLIPTextModel", 23, 1024, 16, 4096, None),
    "openclip-bigg": ("CLIPTextModelWithProjection", 32, 1280, 20, 5120, 1280),
}
MODELS = {
    "sd1": {"unet": "sd-unet", "text_encoder": "clip-l"},
    "sd2": {"unet": "sd-unet", "text_encoder": "openclip-h"},
    "sdxl": {"unet": "sdxl-unet", "text_encoder": "clip-l", "text_encoder_2": "openclip-bigg"},
}


def _ldm_unet_name(name: str, config: Mapping[str, Any]) -> str:
    """The original (LDM / sgm) name of a diffusers UNet module (the inverse of diffusers'
    ``convert_ldm_unet_checkpoint``, checked against it by :func:`generate_table`)."""
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if name in top:
        return top[name]
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
              ("conv_shortcut", "skip_connection")]
    per = config["layers_per_block"]
    parts = name.split(".")

    def inner(rest: list[str]) -> str:
        joined = ".".join(rest)
        for new, old in resnet:
            if joined == new:
                return old
        return joined

    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(per + 1) * (block + 1)}.0.op"
        layer = int(parts[3])
        sub = 0 if kind == "resnets" else 1
        rest = parts[4:]
        return f"input_blocks.{(per + 1) * block + layer + 1}.{sub}." + (inner(rest) if sub == 0 else ".".join(rest))
    if parts[0] == "mid_block":
        kind, layer, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * layer}." + inner(rest)
        return "middle_block.1." + ".".join(rest)
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        has_attn = config["up_block_types"][block].startswith("CrossAttn")
        if kind == "upsamplers":
            return f"output_blocks.{(per + 1) * block + per}.{2 if has_attn else 1}." + ".".join(parts[4:])
        layer = int(parts[3])
        sub = 0 if kind == "resnets" else 1
        rest = parts[4:]
        return f"output_blocks.{(per + 1) * block + layer}.{sub}." + (inner(rest) if sub == 0 else ".".join(rest))
    return ""  # no LDM counterpart


def generate_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """Build the built-in name table from diffusers / transformers configs (no download).

    Models are instantiated on the meta device, so no memory is spent on weights. Each LDM
    name is checked by running diffusers' own LDM→diffusers UNet conversion on it.
    """
    import torch
    import transformers
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names: dict[str, list[str]] = {}
    ldm: dict[str, list[str]] = {}
    for group, config in (("sd-unet", SD_UNET), ("sdxl-unet", SDXL_UNET)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        keys = list(unet.state_dict())
        listed = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
        names[group] = listed
        full = dict(unet.config)
        ldm[group] = [_ldm_unet_name(n, full) for n in listed]
        # check: diffusers' converter must send every LDM key back where it came from
        checkpoint = {}
        for k in keys:
            module, _, param = k.rpartition(".")
            old = _ldm_unet_name(module, full)
            if old:
                checkpoint[f"model.diffusion_model.{old}.{param}"] = k
        converted = convert_ldm_unet_checkpoint(checkpoint, full)
        wrong = {new: old for new, old in converted.items() if new != old}
        if wrong or len(converted) != len(checkpoint):
            raise RuntimeError(f"LDM names of {group} disagree with diffusers: {list(wrong.items())[:5]}, "
                               f"{len(converted)} of {len(checkpoint)} keys converted")
    for group, (cls_name, layers, hidden, heads, inter, proj) in CLIP_TEXT.items():
        config = transformers.CLIPTextConfig(num_hidden_layers=layers, hidden_size=hidden,
                                             num_attention_heads=heads, intermediate_size=inter,
                                             projection_dim=proj or 768)
        with torch.device("meta"):
            model = getattr(transformers, cls_name)(config)
        listed = [k[: -len(".weight")] for k in model.state_dict() if k.endswith(".weight")]
        # transformers 5 dropped CLIPTextModel's ``text_model`` wrapper from its module tree; the
        # checkpoints on disk, kohya's names and diffusers' conversions all keep it
        names[group] = [n if n.startswith(("text_model.", "text_projection")) else "text_model." + n
                         for n in listed]
    for group, listed in names.items():  # the underscored spellings must be unique
        seen: dict[str, str] = {}
        for n in listed + [x for x in ldm.get(group, []) if x]:
            u = n.replace(".", "_")
            if u in seen and seen[u] != n:
                raise RuntimeError(f"{group}: {n!r} and {seen[u]!r} share the kohya name {u!r}")
            seen[u] = n
    table = {"version": 1, "models": MODELS, "names": names, "ldm": ldm}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write(json.dumps(table, separators=(",", ":")).encode("utf-8"))
    _table.cache_clear()
    module_index.cache_clear()
    return table


if __name__ == "__main__":  # python -m portable_lora.formats.kohya_names
    generated = generate_table()
    print(f"wrote {TABLE_PATH} ({TABLE_PATH.stat().st_size} bytes): "
          + ", ".join(f"{g} {len(v)}" for g, v in generated["names"].items()))
