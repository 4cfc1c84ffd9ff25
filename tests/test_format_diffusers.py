"""The diffusers format against the real diffusers: its loaders read our files, we read its files."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import Adapter, LoraError, LoraModule
from portable_lora.formats import diffusers as dfmt
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.peer

UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, sample_size=8, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONV = "down_blocks.0.resnets.0.conv1"


def make_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


@pytest.fixture(scope="module")
def unet_state():
    return {k: v.detach().numpy().copy() for k, v in make_unet().state_dict().items()}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]),
            torch.randn(1, 5, 32, generator=g))


def attention_modules(state):
    return [k[: -len(".weight")] for k in state
            if k.endswith(".weight") and (".attn1.to_" in k or ".attn2.to_" in k)]


def random_unet_adapter(state, *, seed=0, dora=False, dtype=np.float32, conv=True, alphas=(1.0, 3.0, 8.0)):
    """Random LoRA on every attention projection (ranks 2/4, mixed alphas) and one conv."""
    rng = np.random.default_rng(seed)
    adapter = Adapter()
    names = attention_modules(state) + ([CONV] if conv else [])
    for i, name in enumerate(names):
        W = state[name + ".weight"]
        r = (2, 4)[i % 2]
        if W.ndim == 4:
            A = rng.standard_normal((r, *W.shape[1:])) * 0.1
            B = rng.standard_normal((W.shape[0], r, 1, 1)) * 0.1
        else:
            A = rng.standard_normal((r, W.shape[1])) * 0.2
            B = rng.standard_normal((W.shape[0], r)) * 0.2
        mag = (np.linalg.norm(W.reshape(W.shape[0], -1), axis=1) * (1 + 0.1 * rng.standard_normal(W.shape[0]))
               if dora else None)
        adapter["unet." + name] = LoraModule(A.astype(dtype), B.astype(dtype), alpha=alphas[i % len(alphas)],
                                             kind="conv" if W.ndim == 4 else "linear",
                                             magnitude=None if mag is None else mag.astype(dtype))
    return adapter


def merged_output(state, adapter, inputs):
    """The UNet output with every module merged by our core (float64 accumulation)."""
    from portable_lora import core

    merged = {k: v.copy() for k, v in state.items()}
    for name, m in adapter.items():
        key = name[len("unet."):] + ".weight"
        merged[key] = np.asarray(core.merge_into(merged[key].astype(np.float64), m.A.astype(np.float64),
                                                 m.B.astype(np.float64), m.scale, m.kind,
                                                 magnitude=None if m.magnitude is None
                                                 else m.magnitude.astype(np.float64))).astype(np.float32)
    unet = make_unet()
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    with torch.no_grad():
        return unet(*inputs).sample.numpy()


def diffusers_output(path, inputs):
    """The UNet output after diffusers' own loader read ``path`` (metadata included)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    unet = make_unet()
    unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas or None, metadata=metadata)
    with torch.no_grad():
        return unet(*inputs).sample.numpy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("fold", [False, True], ids=["patterns", "folded"])
def test_diffusers_loads_our_file(tmp_path, unet_state, inputs, fold):
    adapter = random_unet_adapter(unet_state)
    path = tmp_path / "lora.safetensors"
    pl.save(adapter, path, format="diffusers", fold=fold)
    expected = merged_output(unet_state, adapter, inputs)
    got = diffusers_output(path, inputs)
    assert rel_err(got, expected) < 2e-5
    base = make_unet()
    with torch.no_grad():
        assert rel_err(base(*inputs).sample.numpy(), expected) > 1e-2  # the adapter matters
    if not fold:  # patterns keep B bit-exact
        tensors, _ = read_safetensors(path)
        for name, m in adapter.items():
            assert np.array_equal(tensors[name + ".lora_B.weight"], m.B)


def test_diffusers_loads_our_dora(tmp_path, unet_state, inputs):
    adapter = random_unet_adapter(unet_state, dora=True, conv=False)
    path = tmp_path / "dora.safetensors"
    pl.save(adapter, path, format="diffusers")
    assert rel_err(diffusers_output(path, inputs), merged_output(unet_state, adapter, inputs)) < 2e-5
    back = pl.load(path)
    for name, m in adapter.items():
        assert np.array_equal(back[name].magnitude, m.magnitude)


@pytest.mark.parametrize("rslora", [False, True])
def test_we_read_what_diffusers_writes(tmp_path, rslora):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    unet = make_unet()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1"],
                                rank_pattern={"to_v": 2}, alpha_pattern={q: 3},
                                init_lora_weights=False, use_rslora=rslora))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert pl.detect(path)[0] == "diffusers"
    adapter = pl.load(path)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(adapter) == {"unet." + n for n in layers}
    assert adapter["unet." + q].alpha == 3
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(adapter.delta_weight("unet." + name), expected, rtol=1e-6, atol=1e-7)
        assert adapter["unet." + name].scale == pytest.approx(layer.scaling["default"], rel=1e-15)


def test_without_metadata_scale_is_one(tmp_path, unet_state, inputs):
    adapter = random_unet_adapter(unet_state, alphas=(5.0,))
    path = tmp_path / "bare.safetensors"
    pl.save(adapter, path, format="diffusers")
    tensors, _ = read_safetensors(path)
    write_safetensors(path, tensors)  # drop every metadata entry
    back = pl.load(path)
    assert back.provenance["source_format"] == "diffusers"
    assert "alpha = rank" in back.provenance["convention_reason"]
    assert all(m.scale == 1.0 for m in back.values())
    # diffusers agrees: the bare file is applied at scale 1
    assert rel_err(diffusers_output(path, inputs), merged_output(unet_state, back, inputs)) < 2e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
def test_round_trip_bit_exact(tmp_path, dtype):
    rng = np.random.default_rng(3)
    adapter = Adapter(base_model="tiny", provenance={"note": "x"})
    adapter["unet.a.to_q"] = LoraModule(rng.standard_normal((4, 8)).astype(dtype),
                                        rng.standard_normal((6, 4)).astype(dtype), alpha=16)
    adapter["unet.a.to_k"] = LoraModule(rng.standard_normal((2, 8)).astype(dtype),
                                        rng.standard_normal((6, 2)).astype(dtype), alpha=20.0, rule="raw")
    adapter["text_encoder.m.q_proj"] = LoraModule(rng.standard_normal((3, 8)).astype(dtype),
                                                  rng.standard_normal((8, 3)).astype(dtype), alpha=5,
                                                  rule="alpha/sqrt(rank)")
    adapter["text_encoder.m.tok"] = LoraModule(rng.standard_normal((2, 11)).astype(dtype),
                                               rng.standard_normal((8, 2)).astype(dtype), alpha=2,
                                               kind="embedding")
    path = tmp_path / "rt.safetensors"
    pl.save(adapter, path, format="diffusers")
    back = pl.load(path)
    assert back.base_model == "tiny" and back.provenance["note"] == "x"
    for name, m in adapter.items():
        assert np.array_equal(back[name].A, m.A) and np.array_equal(back[name].B, m.B)
        assert back[name].A.dtype == m.A.dtype
        assert back[name].kind == m.kind
        assert back[name].scale == pytest.approx(m.scale, rel=1e-15)


def test_peft_pattern_matching_matches_peft():
    from portable_lora.formats._common import pattern_key
    from peft.utils.other import get_pattern_key

    patterns = {"to_v": 2, "^down_blocks\\.0\\.attn\\.to_q": 3, "blocks.1.*": 5}
    for name in ["down_blocks.0.attn.to_q", "up_blocks.0.attn.to_q", "x.to_v", "blocks.1.ff", "to_vv"]:
        assert pattern_key(patterns, name) == get_pattern_key(list(patterns), name)


# -- bad input ------------------------------------------------------------------------------------
def _write(path, tensors, meta=None):
    write_safetensors(path, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, meta)
    return path


def test_incomplete_pair(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4))})
    with pytest.raises(LoraError, match="incomplete LoRA pair") as exc:
        pl.load(p, format="diffusers")
    assert exc.value.key == "unet.a.lora_A.weight" and exc.value.file == str(p)


def test_rank_disagrees_with_metadata(tmp_path):
    meta = {dfmt.METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2))}, meta)
    with pytest.raises(LoraError, match="rank 4 but the tensor has rank 2"):
        pl.load(p)


def test_missing_component_gets_peft_defaults(tmp_path):
    # as in diffusers: metadata present but silent about text_encoder → LoraConfig() (r 8, α 8)
    meta = {dfmt.METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 4})}
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2)),
                                            "text_encoder.q.lora_A.weight": np.ones((8, 4)),
                                            "text_encoder.q.lora_B.weight": np.ones((3, 8))}, meta)
    a = pl.load(p)
    assert a["unet.a"].scale == 2.0 and a["text_encoder.q"].scale == 1.0


@pytest.mark.parametrize("key,match", [("unet.a.lora_B.bias", "bias"), ("unet.a.weird", "not a diffusers")])
def test_unknown_keys(tmp_path, key, match):
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2)), key: np.ones(3)})
    with pytest.raises(LoraError, match=match) as exc:
        pl.load(p, format="diffusers")
    assert exc.value.key == key


def test_bad_metadata_json(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2))},
               {dfmt.METADATA_KEY: "{not json"})
    with pytest.raises(LoraError, match="not valid JSON") as exc:
        pl.load(p)
    assert exc.value.key == dfmt.METADATA_KEY


def test_convention_refused(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2))})
    with pytest.raises(LoraError, match="convention"):
        pl.load(p, format="diffusers", convention="raw")


def test_save_needs_component_and_uniform_dora(tmp_path):
    m = LoraModule(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), alpha=2)
    with pytest.raises(LoraError, match="component prefix"):
        pl.save(Adapter({"model.layers.0.q_proj": m}), tmp_path / "x.safetensors", format="diffusers")
    d = LoraModule(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), alpha=2,
                   magnitude=np.ones(3, np.float32))
    with pytest.raises(LoraError, match="mixes DoRA"):
        pl.save(Adapter({"unet.a": m, "unet.b": d}), tmp_path / "x.safetensors", format="diffusers")


def test_detection(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"transformer.a.lora_A.weight": np.ones((2, 4)),
                                            "transformer.a.lora_B.weight": np.ones((3, 2))})
    fmt, reason = pl.detect(p)
    assert fmt == "diffusers" and "transformer.a.lora_A.weight" in reason
    q = _write(tmp_path / "y.safetensors", {"blocks.a.lora_A.default.weight": np.ones((2, 4)),
                                            "blocks.a.lora_B.default.weight": np.ones((3, 2))})
    assert dfmt.detect(q) is None


def test_use_dora_must_match_magnitudes(tmp_path):
    meta = {dfmt.METADATA_KEY: json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": True})}
    p = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 4)),
                                            "unet.a.lora_B.weight": np.ones((3, 2))}, meta)
    with pytest.raises(LoraError, match="use_dora") as exc:
        pl.load(p)
    assert exc.value.key == "unet.a.lora_A.weight"


@pytest.mark.parametrize("fold", [False, True])
def test_diffusers_loads_our_text_encoder_file_with_clips_text_model_names(tmp_path, fold):
    """kohya's lora_te_ names become text_encoder.text_model.<...> (CLIP's wrapper); transformers
    5 dropped that wrapper and diffusers strips it from the keys only: the config must not
    name it, or PEFT finds no module."""
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    cfg = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                      eos_token_id=2)

    def clip():
        torch.manual_seed(0)
        return transformers.CLIPTextModel(cfg).eval()

    state = {k: v.detach().numpy().copy() for k, v in clip().state_dict().items()}
    names = [k[:-len(".weight")] for k in state if k.endswith(".weight") and ("_proj" in k or ".fc" in k)]
    rng = np.random.default_rng(0)
    adapter = pl.Adapter()
    for i, n in enumerate(names):  # mixed ranks and alphas: patterns are written
        W = state[n + ".weight"]
        r = (4, 4, 2)[i % 3]
        adapter["text_encoder.text_model." + n] = LoraModule(
            (rng.standard_normal((r, W.shape[1])) * 0.3).astype(np.float32),
            (rng.standard_normal((W.shape[0], r)) * 0.3).astype(np.float32), alpha=(4.0, 4.0, 1.0)[i % 3])
    pl.save(adapter, tmp_path / "te.safetensors", format="diffusers", fold=fold)
    merged = dict(state)
    for name, m in adapter.items():
        key = name[len("text_encoder.text_model."):] + ".weight"
        merged[key] = (state[key] + m.delta_weight(np.float64)).astype(np.float32)
    ref = clip()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    sd, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "te.safetensors"),
                                                                       return_lora_metadata=True)
    loaded = clip()
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas or None, loaded, prefix="text_encoder",
                                                              metadata=meta)
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        assert rel_err(loaded(ids).last_hidden_state.numpy(), ref(ids).last_hidden_state.numpy()) < 1e-5
    back = pl.load(tmp_path / "te.safetensors")
    for name, m in adapter.items():  # fold=True moves each scale into B: ΔW is what must agree
        assert rel_err(back[name].delta_weight(np.float64), m.delta_weight(np.float64)) < 1e-6, name
