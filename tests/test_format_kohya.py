"""kohya / LyCORIS: round trips, the naming table, diffusers' kohya loader, and LoHa/LoKr vs PEFT."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import Adapter, LoraError, LoraModule
from portable_lora.formats import kohya, kohya_names
from portable_lora.formats.lycoris import lycoris_to_lora, read_lycoris_deltas
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

RNG = np.random.default_rng(7)


def rand(*shape, scale=0.2, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def write(path, tensors, meta=None):
    """A safetensors file; floats become float32 unless already a float array of another dtype."""
    out = {}
    for k, v in tensors.items():
        v = np.asarray(v)
        out[k] = v if v.dtype != np.float64 else v.astype(np.float32)
    write_safetensors(path, out, meta or {})
    return path


SD_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # in SD 1.x and SDXL
SD1_CONV = "unet.down_blocks.0.resnets.0.conv1"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
TE2_FC = "text_encoder_2.text_model.encoder.layers.31.mlp.fc1"


# -- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
def test_round_trip_bit_exact(tmp_path, dtype):
    adapter = Adapter(base_model="sdxl (tiny)", provenance={"note": "kept"})
    adapter[SD_Q] = LoraModule(rand(4, 16, dtype=dtype), rand(12, 4, dtype=dtype), alpha=8)
    adapter[SD1_CONV] = LoraModule(rand(2, 6, 3, 3, dtype=dtype), rand(5, 2, 1, 1, dtype=dtype), alpha=1,
                                   kind="conv")
    adapter[TE_Q] = LoraModule(rand(2, 8, dtype=dtype), rand(8, 2, dtype=dtype), alpha=3.0, rule="raw")
    adapter[TE2_FC] = LoraModule(rand(4, 8, dtype=dtype), rand(9, 4, dtype=dtype), alpha=4,
                                 rule="alpha/sqrt(rank)")
    path = tmp_path / "k.safetensors"
    pl.save(adapter, path, format="kohya")
    tensors, meta = read_safetensors(path)
    # SDXL naming because text_encoder_2 is present; alphas are float32 0-dim with α/r = scale
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    for name, m in adapter.items():
        kname = kohya_names.kohya_name(name, te1=True)
        alpha = tensors[kname + ".alpha"]
        assert alpha.shape == () and alpha.dtype == np.float32
        assert float(alpha) / m.rank == pytest.approx(m.scale, rel=1e-7)
    assert meta["ss_network_dim"] in ("2", "4") and "ss_network_alpha" in meta
    assert pl.detect(path)[0] == "kohya"
    back = pl.load(path)  # names restored from the built-in SDXL table
    assert back.base_model == "sdxl (tiny)" and back.provenance["note"] == "kept"
    assert back.provenance["convention"] == "alpha/rank"
    assert set(back) == set(adapter)
    for name, m in adapter.items():
        assert np.array_equal(back[name].A, m.A) and np.array_equal(back[name].B, m.B)
        assert back[name].A.dtype == m.A.dtype and back[name].kind == m.kind
        assert back[name].scale == pytest.approx(m.scale, rel=1e-7)


def test_sd1_names_use_lora_te(tmp_path):
    adapter = Adapter({TE_Q: LoraModule(rand(2, 8), rand(8, 2), alpha=2)})
    pl.save(adapter, tmp_path / "k.safetensors", format="kohya")
    tensors, _ = read_safetensors(tmp_path / "k.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors


def test_negative_and_zero_scales_survive(tmp_path):
    adapter = Adapter({SD_Q: LoraModule(rand(2, 8), rand(8, 2), alpha=-3.0),
                       TE_Q: LoraModule(rand(2, 8), rand(8, 2), alpha=0.0)})
    pl.save(adapter, tmp_path / "k.safetensors", format="kohya")
    back = pl.load(tmp_path / "k.safetensors")
    for name in adapter:
        np.testing.assert_array_equal(back.delta_weight(name), adapter.delta_weight(name))


# -- scale rules ------------------------------------------------------------------------------------
def kohya_file(path, alpha=None, *, rank=4, name="lora_unet_down_blocks_0_attentions_0_proj_in", extra=None):
    t = {f"{name}.lora_down.weight": rand(rank, 8), f"{name}.lora_up.weight": rand(8, rank)}
    if alpha is not None:
        t[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    t.update(extra or {})
    return write(path, t)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_missing_or_zero_alpha_means_scale_one(tmp_path, alpha):
    a = pl.load(kohya_file(tmp_path / "k.safetensors", alpha))
    m = a["unet.down_blocks.0.attentions.0.proj_in"]
    assert m.alpha == 4 and m.scale == 1.0
    assert a.provenance["alpha_defaulted_to_rank"] == ["unet.down_blocks.0.attentions.0.proj_in"]


@pytest.mark.parametrize("convention,scale", [(None, 0.5), ("alpha/rank", 0.5), ("raw", 2.0),
                                              ("alpha/sqrt(rank)", 1.0)])
def test_convention(tmp_path, convention, scale):
    a = pl.load(kohya_file(tmp_path / "k.safetensors", 2.0), convention=convention)
    assert a["unet.down_blocks.0.attentions.0.proj_in"].scale == scale
    assert a.provenance["convention"] == (convention or "alpha/rank")
    assert a.provenance["convention_reason"] == ("given by the user" if convention else
                                                 a.provenance["convention_reason"])


def test_bf16_alpha(tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", extra={
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.asarray(6, dtype=ml_dtypes.bfloat16)})
    assert pl.load(p)["unet.down_blocks.0.attentions.0.proj_in"].scale == 1.5


# -- names ------------------------------------------------------------------------------------------
def test_sdxl_ldm_names_map_to_diffusers(tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", 4.0,
                   name="lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k")
    a = pl.load(p)  # transformer_blocks_1 exists only in SDXL
    assert list(a) == ["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"]
    p2 = kohya_file(tmp_path / "k2.safetensors", 4.0, name="lora_unet_output_blocks_2_2_conv")
    assert list(pl.load(p2)) == ["unet.up_blocks.0.upsamplers.0.conv"]
    with pytest.raises(LoraError, match="output_blocks_2_2_conv"):
        pl.load(p2, naming="sd1")  # SD 1.x has its upsampler at output_blocks.2.1


def test_unknown_name_without_module_list(tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", 4.0, name="lora_unet_double_blocks_0_img_attn_qkv")
    with pytest.raises(LoraError, match="modules_from") as exc:
        pl.load(p)
    assert exc.value.key == "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
    a = pl.load(p, modules=["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj"])
    assert list(a) == ["unet.double_blocks.0.img_attn.qkv"]


def test_ambiguous_name_is_an_error(tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", 4.0, name="lora_unet_a_b_c")
    with pytest.raises(LoraError, match="ambiguous"):
        pl.load(p, modules=["unet.a.b_c", "unet.a_b.c"])
    assert list(pl.load(p, modules=["unet.a.b_c", "unet.x_b.c"])) == ["unet.a.b_c"]


def test_modules_from_checkpoint_folder(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    write(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors",
          {"blocks.0.attn.to_q.weight": np.zeros((8, 8)), "blocks.0.attn.to_q.bias": np.zeros(8)})
    p = kohya_file(tmp_path / "k.safetensors", 4.0, name="lora_unet_blocks_0_attn_to_q")
    assert list(pl.load(p, modules_from=tmp_path / "pipe")) == ["unet.blocks.0.attn.to_q"]


def test_modules_from_refuses_a_lora_of_another_shape(tmp_path):
    """The base's weight shapes are known: a LoRA for another model fails at load, naming it."""
    write(tmp_path / "base.safetensors", {"blocks.0.attn.to_q.weight": np.zeros((16, 8)),
                                          "blocks.0.attn.to_k.weight": np.zeros((8, 8, 1, 1))})
    p = kohya_file(tmp_path / "k.safetensors", 4.0, name="lora_unet_blocks_0_attn_to_q")
    with pytest.raises(LoraError, match=r"shape \[8, 8\].*module list has shape \[16, 8\]") as info:
        pl.load(p, modules_from=tmp_path / "base.safetensors")
    assert info.value.key == "lora_unet_blocks_0_attn_to_q.lora_down.weight"
    # a 1×1 convolution trained with 2-D factors (kohya does both) has ΔW's elements: accepted
    k = kohya_file(tmp_path / "c.safetensors", 4.0, name="lora_unet_blocks_0_attn_to_k")
    assert list(pl.load(k, modules_from=tmp_path / "base.safetensors")) == ["unet.blocks.0.attn.to_k"]


def test_duplicate_after_mapping(tmp_path):
    name = "text_model_encoder_layers_0_self_attn_q_proj"
    t = {}
    for prefix in ("lora_te_", "lora_te1_"):
        t[f"{prefix}{name}.lora_down.weight"] = rand(2, 8)
        t[f"{prefix}{name}.lora_up.weight"] = rand(8, 2)
    with pytest.raises(LoraError, match="two kohya modules map to"):
        pl.load(write(tmp_path / "k.safetensors", t))


def test_table_is_current():
    """The shipped table lists the names diffusers/transformers give SD 1.x and SDXL today."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**kohya_names.SDXL_UNET)
    names = {k[: -len(".weight")] for k in unet.state_dict() if k.endswith(".weight")}
    index = kohya_names.module_index("sdxl")
    assert {n for n in index.shapes if n.startswith("unet.")} == {"unet." + n for n in names}


@pytest.mark.peer
def test_sdxl_ldm_names_agree_with_diffusers_kohya_loader():
    """Every SDXL LoRA target named the kohya (sgm) way: diffusers' SDXL loader and our table agree."""
    import types

    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_unet_state_dict_to_peft

    index = kohya_names.module_index("sdxl")
    table = kohya_names._table()
    pairs = [(n, ldm) for n, ldm in zip(table["names"]["sdxl-unet"], table["ldm"]["sdxl-unet"])
             if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                            "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", ".conv"))]
    state = {}
    for _, ldm in pairs:
        kname = "lora_unet_" + ldm.replace(".", "_")
        state[kname + ".lora_down.weight"] = torch.zeros(1, 1)
        state[kname + ".lora_up.weight"] = torch.zeros(1, 1)
    state = _maybe_map_sgm_blocks_to_diffusers(state, types.SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    peft_keys = convert_unet_state_dict_to_peft(converted)
    theirs = {k.rsplit(".lora_A", 1)[0] for k in peft_keys if ".lora_A" in k}
    ours = {kohya_names.resolve_names(["lora_unet_" + ldm.replace(".", "_")], naming="sdxl")[0].popitem()[1]
            for _, ldm in pairs}
    assert len(pairs) > 700 and theirs == ours
    assert all(index.candidates("unet", ldm.replace(".", "_")) == {"unet." + n} for n, ldm in pairs)


# -- diffusers' kohya loader -------------------------------------------------------------------------
UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, sample_size=8, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def tiny_unet():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    def make():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()

    state = {k: v.detach().numpy().copy() for k, v in make().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g))
    return make, state, inputs


def unet_adapter(state, alphas):
    adapter = Adapter()
    names = [k[: -len(".weight")] for k in state if k.endswith(".weight") and ".attn" in k and ".to_" in k]
    names.append("down_blocks.0.resnets.0.conv1")
    for i, name in enumerate(names):
        W = state[name + ".weight"]
        r = (2, 4)[i % 2]
        if W.ndim == 4:
            module = LoraModule(rand(r, *W.shape[1:], scale=0.1), rand(W.shape[0], r, 1, 1, scale=0.1),
                                alpha=alphas[i % len(alphas)], kind="conv")
        else:
            module = LoraModule(rand(r, W.shape[1]), rand(W.shape[0], r), alpha=alphas[i % len(alphas)])
        adapter["unet." + name] = module
    return adapter


def outputs(tiny_unet, adapter, path):
    import torch
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    make, state, inputs = tiny_unet
    merged = {k: v.copy() for k, v in state.items()}
    for name, m in adapter.items():
        key = name[len("unet."):] + ".weight"
        merged[key] = (merged[key].astype(np.float64) + m.delta_weight(np.float64)).astype(np.float32)
    ref = make()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    sd, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    unet = make()
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=network_alphas)
    with torch.no_grad():
        return unet(*inputs).sample.numpy(), ref(*inputs).sample.numpy(), make()(*inputs).sample.numpy()


@pytest.mark.peer
def test_diffusers_reads_our_kohya_file(tmp_path, tiny_unet):
    adapter = unet_adapter(tiny_unet[1], alphas=(4.0,))  # ranks 2 and 4: scales 2 and 1
    path = tmp_path / "k.safetensors"
    pl.save(adapter, path, format="kohya")
    got, expected, base = outputs(tiny_unet, adapter, path)
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(got - expected)) / scale < 2e-5
    assert np.max(np.abs(base - expected)) / scale > 1e-2
    # and back, restoring dots from a base checkpoint of the same UNet
    ckpt = tmp_path / "unet.safetensors"
    write_safetensors(ckpt, tiny_unet[1])
    back = pl.load(path, modules_from=ckpt)
    assert set(back) == set(adapter)
    for name, m in adapter.items():
        assert np.array_equal(back[name].A, m.A) and np.array_equal(back[name].B, m.B)


@pytest.mark.peer
@pytest.mark.xfail(reason="diffusers 0.42 builds kohya alpha_pattern keys from '...to_q_lora.down.weight' "
                          "names that match no module, so only a uniform alpha is applied right",
                   strict=False)
def test_diffusers_with_mixed_alphas(tmp_path, tiny_unet):
    adapter = unet_adapter(tiny_unet[1], alphas=(1.0, 3.0, 8.0))
    path = tmp_path / "k.safetensors"
    pl.save(adapter, path, format="kohya")
    got, expected, _ = outputs(tiny_unet, adapter, path)
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 2e-5


@pytest.mark.peer
@pytest.mark.parametrize("projections", [
    ("mlp.fc1", "mlp.fc2"),
    ("self_attn.q_proj", "self_attn.out_proj"),
    pytest.param(("self_attn.q_proj", "mlp.fc1"), marks=pytest.mark.xfail(
        reason="diffusers 0.42 converts kohya text-encoder keys with one naming scheme per file: "
               "with both attention ('to_q_lora') and MLP ('lora_linear_layer') keys, the attention "
               "ones are dropped as unexpected", strict=False)),
], ids=["mlp", "attention", "both"])
def test_diffusers_text_encoder(tmp_path, projections):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=2)

    def make():
        torch.manual_seed(0)
        return transformers.CLIPTextModelWithProjection(config).eval()

    state = {k: v.detach().numpy().copy() for k, v in make().state_dict().items()}
    adapter = Adapter()
    for layer in range(2):
        for proj in projections:
            name = f"text_model.encoder.layers.{layer}.{proj}"
            W = state[name + ".weight"]
            adapter["text_encoder." + name] = LoraModule(rand(4, W.shape[1]), rand(W.shape[0], 4), alpha=8)
    path = tmp_path / "te.safetensors"
    pl.save(adapter, path, format="kohya")
    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    model = make()
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, model)
    merged = dict(state)
    for name, m in adapter.items():
        key = name[len("text_encoder."):] + ".weight"
        merged[key] = (merged[key].astype(np.float64) + m.delta_weight(np.float64)).astype(np.float32)
    ref = make()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        got, expected = model(ids).text_embeds.numpy(), ref(ids).text_embeds.numpy()
        base = make()(ids).text_embeds.numpy()
    assert np.max(np.abs(base - expected)) / np.max(np.abs(expected)) > 1e-2
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 2e-5
    # the built-in SD 1.x table restores these names without a module list
    assert set(pl.load(path)) == set(adapter)


# -- bad input ---------------------------------------------------------------------------------------
NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.mark.parametrize("drop", ["lora_up.weight", "lora_down.weight"])
def test_incomplete_pair(tmp_path, drop):
    t = {f"{NAME}.lora_down.weight": rand(2, 8), f"{NAME}.lora_up.weight": rand(8, 2),
         f"{NAME}.alpha": np.float32(2)}
    del t[f"{NAME}.{drop}"]
    p = write(tmp_path / "k.safetensors", t)
    with pytest.raises(LoraError, match=f"incomplete LoRA pair.*{drop}") as exc:
        pl.load(p)
    assert exc.value.file == str(p)


def test_alpha_without_pair(tmp_path):
    p = write(tmp_path / "k.safetensors", {f"{NAME}.alpha": np.float32(2)})
    with pytest.raises(LoraError, match="incomplete") as exc:
        pl.load(p, format="kohya")
    assert exc.value.key == f"{NAME}.alpha"


@pytest.mark.parametrize("alpha,match", [(np.nan, "finite"), (np.inf, "finite"), (-1.0, "negative"),
                                         (np.ones(2), "single number")])
def test_bad_alpha(tmp_path, alpha, match):
    p = kohya_file(tmp_path / "k.safetensors", extra={f"{NAME}.alpha": np.asarray(alpha, np.float32)})
    with pytest.raises(LoraError, match=match) as exc:
        pl.load(p)
    assert exc.value.key == f"{NAME}.alpha"


@pytest.mark.parametrize("key,match", [(f"{NAME}.lora_down.bias", "not a kohya LoRA tensor"),
                                       (f"{NAME}.dora_scale", "DoRA"),
                                       (f"{NAME}.hada_w1_a", "read_lycoris_deltas"),
                                       (f"{NAME}.lora_mid.weight", "lycoris_to_lora")])
def test_unknown_or_unsupported_keys(tmp_path, key, match):
    p = kohya_file(tmp_path / "k.safetensors", 2.0, extra={key: rand(2, 2)})
    with pytest.raises(LoraError, match=match) as exc:
        pl.load(p, format="kohya")
    assert exc.value.key == key


def test_unknown_prefix(tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", 2.0, name="lora_vae_decoder_conv")
    with pytest.raises(LoraError, match="unknown kohya module prefix"):
        pl.load(p, format="kohya")


def test_unknown_option(tmp_path):
    with pytest.raises(LoraError, match="unknown options"):
        pl.load(kohya_file(tmp_path / "k.safetensors", 2.0), format="kohya", network_dim=4)


def test_save_errors(tmp_path):
    m = LoraModule(rand(2, 8), rand(8, 2), alpha=2)
    with pytest.raises(LoraError, match="component prefix"):
        pl.save(Adapter({"model.layers.0.q_proj": m}), tmp_path / "x.safetensors", format="kohya")
    with pytest.raises(LoraError, match="both become"):
        pl.save(Adapter({"unet.a.b_c": m, "unet.a_b.c": m.copy()}), tmp_path / "x.safetensors", format="kohya")
    e = LoraModule(rand(2, 10), rand(8, 2), alpha=2, kind="embedding")
    with pytest.raises(LoraError, match="embedding"):
        pl.save(Adapter({"text_encoder.emb": e}), tmp_path / "x.safetensors", format="kohya")
    d = LoraModule(rand(2, 8), rand(8, 2), alpha=2, magnitude=np.ones(8, np.float32))
    with pytest.raises(LoraError, match="DoRA"):
        pl.save(Adapter({"unet.a": d}), tmp_path / "x.safetensors", format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


# -- LyCORIS: LoHa / LoKr / Tucker LoCon -------------------------------------------------------------
def _peft_model(config):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 24)
            self.conv = torch.nn.Conv2d(32, 64, 3)
            self.small = torch.nn.Conv2d(8, 16, 3)

    torch.manual_seed(0)
    return peft.get_peft_model(Net().double(), config)


def _lycoris_file(path, model, alpha, algo):
    """The PEFT model's factors as a LyCORIS file (kohya-style names, one alpha per module)."""
    tensors = {}
    for key, value in model.state_dict().items():
        if f".{algo}_" not in key:
            continue
        module, part = key.split("base_model.model.")[1].rsplit(".default", 1)[0].split(".", 1)
        tensors[f"lycoris_{module}.{part}"] = value.detach().numpy()
        tensors[f"lycoris_{module}.alpha"] = np.asarray(alpha, np.float32)
    write(path, {k: v for k, v in tensors.items()})
    return {name: getattr(model.base_model.model, name) for name in ("lin", "conv", "small")}


SHAPES = {"lin": (24, 32), "conv": (64, 32, 3, 3), "small": (16, 8, 3, 3)}


@pytest.mark.peer
@pytest.mark.parametrize("effective_conv", [False, True], ids=["flat-conv", "tucker"])
def test_loha_matches_peft(tmp_path, effective_conv):
    from peft import LoHaConfig

    model = _peft_model(LoHaConfig(r=2, alpha=6, target_modules=["lin", "conv", "small"], init_weights=False,
                                   use_effective_conv2d=effective_conv))
    layers = _lycoris_file(tmp_path / "loha.safetensors", model, 6, "hada")
    assert pl.detect(tmp_path / "loha.safetensors")[0] == "kohya"
    with pytest.raises(LoraError, match="LoHa.*read_lycoris_deltas.*lycoris_to_lora"):
        pl.load(tmp_path / "loha.safetensors", modules=list(SHAPES))
    deltas = read_lycoris_deltas(tmp_path / "loha.safetensors", modules=SHAPES)
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(deltas[name], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    if not effective_conv:  # without the weight shapes, a flat conv ΔW keeps the file's layout
        flat = read_lycoris_deltas(tmp_path / "loha.safetensors", modules=list(SHAPES))
        assert flat["conv"].shape == (64, 32 * 9)


@pytest.mark.peer
@pytest.mark.parametrize("kwargs", [{}, {"use_effective_conv2d": True}, {"decompose_both": True}],
                         ids=["plain", "tucker", "decompose-both"])
def test_lokr_matches_peft(tmp_path, kwargs):
    from peft import LoKrConfig

    model = _peft_model(LoKrConfig(r=2, alpha=6, target_modules=["lin", "conv", "small"], init_weights=False,
                                   **kwargs))
    layers = _lycoris_file(tmp_path / "lokr.safetensors", model, 6, "lokr")
    deltas = read_lycoris_deltas(tmp_path / "lokr.safetensors", modules=SHAPES)
    tensors, _ = read_safetensors(tmp_path / "lokr.safetensors")
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default").detach().numpy()
        if f"lycoris_{name}.lokr_w2" in tensors and f"lycoris_{name}.lokr_w1" in tensors:
            # both factors full: LyCORIS, diffusers and ComfyUI apply no alpha (PEFT still scales)
            expected = expected / layer.scaling["default"]
        np.testing.assert_allclose(deltas[name], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.peer
def test_lokr_full_factors_ignore_alpha_like_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_

    w1, w2 = rand(2, 4, dtype=np.float64), rand(3, 5, dtype=np.float64)
    sd = {"m.lokr_w1": torch.from_numpy(w1), "m.lokr_w2": torch.from_numpy(w2), "m.alpha": torch.tensor(7.0)}
    _bake_lokr_alpha_(sd)  # diffusers drops the alpha of full-factor modules
    write(tmp_path / "f.safetensors", {"lycoris_m.lokr_w1": w1, "lycoris_m.lokr_w2": w2,
                                       "lycoris_m.alpha": np.float32(7)})
    delta = read_lycoris_deltas(tmp_path / "f.safetensors", modules=["m"])["m"]
    np.testing.assert_allclose(delta, np.kron(sd["m.lokr_w1"].numpy(), sd["m.lokr_w2"].numpy()), rtol=1e-6)


def test_tucker_locon_equals_its_three_convolutions(tmp_path):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    down, mid, up = rand(3, 6, 1, 1), rand(3, 3, 3, 3), rand(5, 3, 1, 1)
    write(tmp_path / "t.safetensors", {f"{NAME}.lora_down.weight": down, f"{NAME}.lora_mid.weight": mid,
                                       f"{NAME}.lora_up.weight": up, f"{NAME}.alpha": np.float32(1.5)})
    delta = read_lycoris_deltas(tmp_path / "t.safetensors", naming="sd1")["unet.down_blocks.0.attentions.0.proj_in"]
    x = torch.randn(1, 6, 7, 7)
    # LyCORIS bypass forward: up(mid(down(x))) · α/r
    chained = F.conv2d(F.conv2d(F.conv2d(x, torch.from_numpy(down)), torch.from_numpy(mid)),
                       torch.from_numpy(up)) * 0.5
    direct = F.conv2d(x, torch.from_numpy(delta))
    np.testing.assert_allclose(direct.numpy(), chained.numpy(), rtol=1e-4, atol=1e-5)


def test_lycoris_to_lora_reports_the_error(tmp_path):
    w1a, w1b, w2a, w2b = rand(12, 2), rand(2, 10), rand(12, 2), rand(2, 10)
    write(tmp_path / "h.safetensors", {f"{NAME}.hada_w1_a": w1a, f"{NAME}.hada_w1_b": w1b,
                                       f"{NAME}.hada_w2_a": w2a, f"{NAME}.hada_w2_b": w2b,
                                       f"{NAME}.alpha": np.float32(1)})
    name = "unet.down_blocks.0.attentions.0.proj_in"
    exact = read_lycoris_deltas(tmp_path / "h.safetensors")[name]
    np.testing.assert_allclose(exact, (w1a @ w1b) * (w2a @ w2b) * 0.5, rtol=1e-6)
    full, errors = lycoris_to_lora(tmp_path / "h.safetensors", 4)  # a Hadamard of two rank-2: rank ≤ 4
    assert errors[name] < 1e-6
    np.testing.assert_allclose(full.delta_weight(name), exact, atol=1e-5)
    low, errors = lycoris_to_lora(tmp_path / "h.safetensors", 1)
    actual = np.linalg.norm(low.delta_weight(name, np.float64) - exact) / np.linalg.norm(exact)
    assert errors[name] == pytest.approx(actual, rel=1e-4) and errors[name] > 1e-3
    assert low[name].scale == 1.0 and low.provenance["max_relative_error"] == errors[name]


@pytest.mark.parametrize("tensors,match", [
    ({"lycoris_m.hada_w1_a": np.ones((3, 2)), "lycoris_m.hada_w1_b": np.ones((2, 4)),
      "lycoris_m.hada_w2_a": np.ones((3, 2))}, "hada_w2_b"),
    ({"lycoris_m.hada_w1_a": np.ones((2, 3)), "lycoris_m.hada_w1_b": np.ones((2, 4)),
      "lycoris_m.hada_w2_a": np.ones((2, 3)), "lycoris_m.hada_w2_b": np.ones((2, 4)),
      "lycoris_m.hada_t1": np.ones((2, 2, 3, 3))}, "hada_t2"),
    ({"lycoris_m.lokr_w1_a": np.ones((2, 2)), "lycoris_m.lokr_w1_b": np.ones((2, 2)),
      "lycoris_m.lokr_w2_a": np.ones((3, 1)), "lycoris_m.lokr_w2_b": np.ones((1, 3))}, "rank"),
    ({"lycoris_m.lokr_w1": np.ones((2, 2)), "lycoris_m.hada_w1_a": np.ones((2, 2))}, "one algorithm"),
    ({"lycoris_m.lokr_w1": np.ones((2, 2)), "lycoris_m.oft_blocks": np.ones((2, 2))}, "not a LyCORIS tensor"),
    ({"lycoris_m.hada_w1_a": np.ones((3, 2)), "lycoris_m.hada_w1_b": np.ones((5, 4)),
      "lycoris_m.hada_w2_a": np.ones((3, 2)), "lycoris_m.hada_w2_b": np.ones((2, 4))}, "incompatible shapes"),
])
def test_lycoris_bad_input(tmp_path, tensors, match):
    p = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LoraError, match=match) as exc:
        read_lycoris_deltas(p, modules=["m"])
    assert exc.value.file == str(p)


def test_lycoris_shape_mismatch_with_module_list(tmp_path):
    p = write(tmp_path / "f.safetensors", {"lycoris_m.diff": np.ones((3, 4))})
    with pytest.raises(LoraError, match="weight has shape"):
        read_lycoris_deltas(p, modules={"m": (4, 4)})
    assert read_lycoris_deltas(p, modules={"m": (3, 2, 2)})["m"].shape == (3, 2, 2)


def test_our_files_keep_each_modules_alpha_and_rule_exactly(tmp_path):
    """A kohya α is a float32 read under α/r: our writer records the module's own α and rule."""
    adapter = Adapter({
        "unet.a": LoraModule(rand(3, 8), rand(6, 3), alpha=0.1, rule="alpha/rank"),
        "unet.b": LoraModule(rand(4, 8), rand(6, 4), alpha=8.0, rule="alpha/sqrt(rank)"),
        "unet.c": LoraModule(rand(2, 8), rand(6, 2), alpha=5.0, rule="raw"),
    })
    pl.save(adapter, tmp_path / "k.safetensors", format="kohya")
    back = pl.load(tmp_path / "k.safetensors", modules=list(adapter))
    for name, m in adapter.items():
        assert (back[name].alpha, back[name].rule, back[name].scale) == (m.alpha, m.rule, m.scale), name
    # an alpha tensor edited since (here: doubled) wins over the recorded one
    tensors, meta = read_safetensors(tmp_path / "k.safetensors")
    key = next(k for k in tensors if k.endswith(".alpha") and "_b." in k)
    tensors[key] = tensors[key] * np.float32(2)
    write_safetensors(tmp_path / "edited.safetensors", tensors, meta)
    edited = pl.load(tmp_path / "edited.safetensors", modules=list(adapter))
    assert edited["unet.b"].rule == "alpha/rank"
    assert edited["unet.b"].scale == pytest.approx(2 * adapter["unet.b"].scale, rel=1e-6)
    assert (edited["unet.a"].alpha, edited["unet.a"].rule) == (0.1, "alpha/rank")
