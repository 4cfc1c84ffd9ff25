"""The mlx-lm and mlx-vlm formats against mlx-lm's own layers, loader and fuse."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import core
from portable_lora.examples import llama_module_shapes, random_adapter
from portable_lora.formats import mlx_lm as mlx_lm_format
from portable_lora.formats import mlx_vlm as mlx_vlm_format
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

pytestmark = pytest.mark.peer

ARGS = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128,
            tie_word_embeddings=False)
IDS = [[1, 5, 9, 33, 100, 7, 2, 64, 127, 0]]


def tiny_mlx(seed: int = 0):
    """The tiny Llama in mlx-lm (same seed, same weights)."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**ARGS))
    mx.eval(model.parameters())
    return model


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS))).astype(np.float64)


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def weights_of(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def merged_model(adapter, seed: int = 0):
    """The base model with ``adapter`` merged into its weights by the core (float64 NumPy)."""
    model = tiny_mlx(seed)
    weights = weights_of(model)
    updates = []
    for name, m in adapter.items():
        W = weights[f"{name}.weight"].astype(np.float64)
        mag = None if m.magnitude is None else m.magnitude.astype(np.float64)
        merged = core.merge_into(W, m.A.astype(np.float64), m.B.astype(np.float64), m.scale, m.kind,
                                 magnitude=mag)
        updates.append((f"{name}.weight", mx.array(np.asarray(merged, np.float32))))
    model.load_weights(updates, strict=False)
    return model


def mixed_adapter(dora: bool = False, embedding: bool = True):
    """Mixed ranks, alphas and rules on every Llama projection (plus the embedding and head)."""
    shapes = llama_module_shapes(layers=2, kv_hidden=32)
    names = list(shapes)
    adapter = random_adapter(shapes, rank={n: [2, 4, 8][i % 3] for i, n in enumerate(names)},
                             alpha={n: [16.0, 3.5, 8.0, 1.0][i % 4] for i, n in enumerate(names)},
                             dora=dora, seed=3)
    for i, name in enumerate(names):
        adapter[name].rule = ["alpha/rank", "raw", "alpha/sqrt(rank)"][i % 3]
    if embedding and not dora:
        adapter["model.embed_tokens"] = random_adapter({"model.embed_tokens": (128, 64)}, kind="embedding",
                                                       rank=3, alpha=6.0, seed=4)["model.embed_tokens"]
        adapter["lm_head"] = random_adapter({"lm_head": (128, 64)}, rank=5, alpha=2.0, seed=5)["lm_head"]
    return adapter


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_loads_what_we_write(tmp_path, dora):
    adapter = mixed_adapter(dora=dora)
    pl.save(adapter, tmp_path / "a", format="mlx-lm")
    model = load_adapters(tiny_mlx(), str(tmp_path / "a"))
    modules = dict(model.named_modules())
    for name, m in adapter.items():
        wanted = DoRALinear if dora else (LoRAEmbedding if m.kind == "embedding" else LoRALinear)
        assert isinstance(modules[name], wanted), name
    assert rel(mlx_logits(model), mlx_logits(merged_model(adapter))) < 1e-5
    # and back: the same ΔW, ranks, rules and kinds
    again = pl.load(tmp_path / "a")
    assert again.provenance["source_format"] == "mlx-lm"
    for name, m in adapter.items():
        assert (again[name].rank, again[name].rule, again[name].kind) == (m.rank, m.rule, m.kind)
        assert rel(again.delta_weight(name, np.float64), m.delta_weight(np.float64)) < 1e-6


def test_num_layers_reaches_the_lowest_block(tmp_path):
    shapes = {k: v for k, v in llama_module_shapes(layers=2, kv_hidden=32).items() if ".1." in k}
    adapter = random_adapter(shapes, rank=4, alpha=8.0)
    pl.save(adapter, tmp_path / "a", format="mlx-lm", num_hidden_layers=2)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["num_layers"] == 1
    assert "self_attn.q_proj" in config["lora_parameters"]["keys"]
    model = load_adapters(tiny_mlx(), str(tmp_path / "a"))
    assert isinstance(model.model.layers[1].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert rel(mlx_logits(model), mlx_logits(merged_model(adapter))) < 1e-5
    with pytest.raises(pl.LoraError, match="num_hidden_layers is 1 but .* block 1"):
        pl.save(adapter, tmp_path / "b", format="mlx-lm", num_hidden_layers=1)


def _train_like_mlx_lm(tmp_path: Path, *, dora: bool, seed: int = 7):
    """An adapter made and saved the way mlx_lm.lora does it, with random non-zero lora_b / m."""
    model = tiny_mlx()
    model.freeze()
    params = {"rank": 4, "scale": 2.5, "dropout": 0.0,
              "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
              + ([] if dora else ["model.embed_tokens"])}
    linear_to_lora_layers(model, 2, params, use_dora=dora)
    mx.random.seed(seed)
    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            updates.append((name, 0.1 * mx.random.normal(value.shape)))
        elif name.endswith(".m"):
            updates.append((name, value * (1 + 0.1 * mx.random.normal(value.shape))))
    model.load_weights(updates, strict=False)
    out = tmp_path / "mlx_adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": "tiny-llama", "fine_tune_type": "dora" if dora else "lora", "num_layers": 2,
                 "lora_parameters": params, "adapter_path": str(out), "iters": 1, "batch_size": 1},
                out / "adapter_config.json")
    return model, out


@pytest.mark.parametrize("dora", [False, True])
def test_read_what_mlx_lm_writes(tmp_path, dora):
    model, out = _train_like_mlx_lm(tmp_path, dora=dora)
    assert pl.detect(out)[0] == "mlx-lm"
    adapter = pl.load(out)
    modules = dict(model.named_modules())
    assert set(adapter) == {n for n, m in modules.items()
                            if isinstance(m, (LoRALinear, DoRALinear, LoRAEmbedding))}
    for name, m in adapter.items():
        layer = modules[name]
        assert m.rule == "raw" and m.scale == 2.5 and m.rank == 4
        base = np.array(layer.embedding.weight if m.kind == "embedding" else layer.linear.weight)
        fused = np.array(layer.fuse().weight).astype(np.float64)  # mlx-lm's own merge
        mag = None if m.magnitude is None else m.magnitude.astype(np.float64)
        ours = core.merge_into(base.astype(np.float64), m.A.astype(np.float64), m.B.astype(np.float64),
                               m.scale, m.kind, magnitude=mag)
        assert rel(ours, fused) < 1e-5, name
        if m.kind == "embedding":
            assert name == "model.embed_tokens"
            assert adapter.provenance["embedding_modules"] == [name]
    assert adapter.provenance["mlx_lm"]["num_layers"] == 2
    assert adapter.provenance["mlx_lm"]["keys"][0] == "self_attn.q_proj"


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact_without_folding(tmp_path, dtype):
    """Ranks 2/4/8 under three rules, all with scale 2: padded on the way out, trimmed back."""
    shapes = llama_module_shapes(layers=1, kv_hidden=32)
    names = list(shapes)
    ranks = {n: [2, 4, 8][i % 3] for i, n in enumerate(names)}
    adapter = random_adapter(shapes, rank=ranks, alpha={n: 2.0 * ranks[n] for n in names}, dtype=dtype)
    adapter[names[1]].rule, adapter[names[1]].alpha = "raw", 2.0
    adapter[names[2]].rule, adapter[names[2]].alpha = "alpha/sqrt(rank)", 2.0 * np.sqrt(8)
    assert len({m.scale for m in adapter.values()}) == 1
    pl.save(adapter, tmp_path / "a", format="mlx-lm")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 2.0
    again = pl.load(tmp_path / "a")
    for name, m in adapter.items():
        b = again[name]
        assert (b.rank, b.alpha, b.rule, b.kind, b.dtype) == (m.rank, m.alpha, m.rule, m.kind, m.dtype)
        assert b.A.tobytes() == m.A.tobytes() and b.B.tobytes() == m.B.tobytes()


def test_folding_keeps_delta_and_rule(tmp_path):
    adapter = random_adapter({"q": (8, 8), "k": (4, 8)}, rank={"q": 2, "k": 4}, alpha={"q": 4.0, "k": 1.0})
    pl.save(adapter, tmp_path / "a", format="mlx-lm", scale=2.0)
    again = pl.load(tmp_path / "a")
    for name, m in adapter.items():
        assert again[name].rank == m.rank and again[name].rule == "alpha/rank"
        assert again[name].scale == pytest.approx(2.0, rel=1e-15)
        assert rel(again.delta_weight(name), m.delta_weight()) < 1e-6


def test_padding_that_is_no_longer_zero_is_kept(tmp_path):
    adapter = random_adapter({"q": (8, 8), "k": (8, 8)}, rank={"q": 2, "k": 4}, alpha={"q": 4.0, "k": 8.0})
    pl.save(adapter, tmp_path / "a", format="mlx-lm")
    path = tmp_path / "a" / "adapters.safetensors"
    tensors, meta = read_safetensors(path)
    tensors["q.lora_a"][:, 3] = 1.0  # someone trained the padded rank further
    tensors["q.lora_b"][3, :] = 1.0
    write_safetensors(path, tensors, meta)
    again = pl.load(tmp_path / "a")
    assert again["q"].rank == 4
    assert any("padding" in n for n in again.provenance["notes"])
    expected = 2.0 * tensors["q.lora_b"].T.astype(np.float64) @ tensors["q.lora_a"].T
    assert rel(again.delta_weight("q", np.float64), expected) < 1e-12


# -- strictness ---------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Path:
    pl.save(random_adapter({"model.layers.0.self_attn.q_proj": (8, 8)}, rank=2, alpha=4.0),
            tmp_path / "s", format="mlx-lm")
    return tmp_path / "s"


def _edit_config(directory: Path, edit) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit, name: str = "adapters.safetensors") -> None:
    tensors, metadata = read_safetensors(directory / name)
    write_safetensors(directory / name, edit(tensors), metadata)


def test_bad_config(small):
    _edit_config(small, lambda c: c["lora_parameters"].update(scale="20"))
    with pytest.raises(pl.LoraError, match=r"adapter_config.json \[scale\]: expected a number"):
        pl.load(small)
    _edit_config(small, lambda c: c["lora_parameters"].update(scale=2.0, rank=4))
    with pytest.raises(pl.LoraError, match=r"lora_parameters.rank is 4 but lora_a is \[8, 2\]"):
        pl.load(small)
    _edit_config(small, lambda c: c.update(fine_tune_type="full") or c["lora_parameters"].update(rank=2))
    with pytest.raises(pl.LoraError, match="fully fine-tuned"):
        pl.load(small)
    _edit_config(small, lambda c: c.update(fine_tune_type="dora"))
    with pytest.raises(pl.LoraError, match="has no DoRA magnitude"):
        pl.load(small)


def test_bad_tensors(small):
    _edit_tensors(small, lambda t: {**t, "model.norm.weight": np.ones(8, np.float32)})
    with pytest.raises(pl.LoraError, match=r"not adapter tensors.*model.norm.weight"):
        pl.load(small)
    _edit_tensors(small, lambda t: {"moe.switch.lora_a": np.zeros((4, 2, 8), np.float32),
                                    "moe.switch.lora_b": np.zeros((4, 8, 2), np.float32)})
    with pytest.raises(pl.LoraError, match="LoRASwitchLinear"):
        pl.load(small)


def test_convention_override_is_recorded(small):
    adapter = pl.load(small, convention="alpha/rank")
    assert adapter.provenance["convention_reason"] == "given by the user"
    assert adapter["model.layers.0.self_attn.q_proj"].scale == 1.0  # scale 2 read as alpha over rank 2


def test_save_refusals(tmp_path):
    conv = random_adapter({"c": (4, 3, 3, 3)}, kind="conv", rank=2)
    with pytest.raises(pl.LoraError, match="no convolution LoRA"):
        pl.save(conv, tmp_path / "c", format="mlx-lm")
    mixed = random_adapter({"q": (4, 4), "k": (4, 4)}, rank=2, dora=True)
    mixed["k"].magnitude = None
    with pytest.raises(pl.LoraError, match="fine_tune_type is one for the whole adapter"):
        pl.save(mixed, tmp_path / "m", format="mlx-lm")


# -- mlx-vlm --------------------------------------------------------------------------------------

def test_mlx_vlm_current_format(tmp_path):
    adapter = mixed_adapter(embedding=False).rename(lambda n: "language_model." + n)
    pl.save(adapter, tmp_path / "v", format="mlx-vlm")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["num_layers"] == -1
    assert config["lora_parameters"]["keys"] == list(adapter)  # full names, as mlx-vlm lists them
    assert pl.detect(tmp_path / "v")[0] == "mlx-vlm"
    again = pl.load(tmp_path / "v")
    assert list(again) == list(adapter)
    for name, m in adapter.items():
        assert rel(again.delta_weight(name, np.float64), m.delta_weight(np.float64)) < 1e-6
    # the text model's adapter after the documented rename, loaded by mlx-lm itself
    text = again.rename(lambda n: n.removeprefix("language_model."))
    pl.save(text, tmp_path / "t", format="mlx-lm")
    model = load_adapters(tiny_mlx(), str(tmp_path / "t"))
    assert rel(mlx_logits(model), mlx_logits(merged_model(text))) < 1e-5
    with pytest.raises(pl.LoraError, match="must start with the VLM's top-level module"):
        pl.save(text, tmp_path / "w", format="mlx-vlm")


def _vlm_files(directory: Path, config: dict, tensors: dict, name: str = "adapters.safetensors") -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    # as mlx-vlm saves: mx.save_safetensors (its header says "__metadata__": null)
    mx.save_safetensors(str(directory / name), {k: mx.array(v) for k, v in tensors.items()})
    return directory


def test_mlx_vlm_files_are_told_apart_from_mlx_lm(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"language_model.model.layers.0.self_attn.q_proj.lora_a": rng.standard_normal((8, 2)).astype(np.float32),
               "language_model.model.layers.0.self_attn.q_proj.lora_b": rng.standard_normal((2, 8)).astype(np.float32)}
    params = {"rank": 2, "dropout": 0.0, "scale": 2.0, "keys": ["language_model.model.layers.0.self_attn.q_proj"]}
    # what mlx-vlm's get_peft_model records: no "model" field
    vlm = _vlm_files(tmp_path / "vlm", {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": params},
                     tensors, name="weights.safetensors")
    assert pl.detect(vlm)[0] == "mlx-vlm"
    assert pl.detect(vlm / "weights.safetensors")[0] == "mlx-vlm"
    assert mlx_lm_format.detect(vlm) is None
    # mlx-lm's trainer writes its whole command line: a wrapped VLM text model is still mlx-lm
    lm = _vlm_files(tmp_path / "lm", {"model": "gemma-3", "fine_tune_type": "lora", "num_layers": 4,
                                      "lora_parameters": params}, tensors)
    assert pl.detect(lm)[0] == "mlx-lm"
    assert mlx_vlm_format.detect(lm) is None


@pytest.mark.parametrize("convention,scale", [(None, 8.0 / 4), ("raw", 8.0)])
def test_mlx_vlm_legacy(tmp_path, convention, scale):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 4)).astype(np.float32)   # LoRaLayer.A (in, r)
    B = rng.standard_normal((4, 12)).astype(np.float32)   # LoRaLayer.B (r, out)
    name = "language_model.model.layers.0.mlp.up_proj"
    d = _vlm_files(tmp_path / "legacy", {"rank": 4, "alpha": 8.0, "dropout": 0.1},
                   {f"{name}.A": A, f"{name}.B": B})
    assert pl.detect(d) == ("mlx-vlm", mlx_vlm_format.detect(d))
    assert "legacy" in pl.detect(d)[1]
    adapter = pl.load(d, convention=convention)
    # LoRaLayer: y = x W^T + scale · (x @ A) @ B, so ΔW (out, in) = scale · (A @ B)^T
    expected = scale * (A.astype(np.float64) @ B).T
    assert rel(adapter.delta_weight(name, np.float64), expected) < 1e-6
    if convention is None:
        assert adapter.provenance["convention"] == "alpha/rank"
        assert "PR 846" in adapter.provenance["convention_reason"]
    else:
        assert adapter.provenance["convention_reason"] == "given by the user"


def test_mlx_vlm_legacy_default_alpha_and_bad_rank(tmp_path):
    name = "language_model.q"
    d = _vlm_files(tmp_path / "l", {"rank": 2}, {f"{name}.A": np.ones((4, 2), np.float32),
                                                 f"{name}.B": np.ones((2, 3), np.float32)})
    adapter = pl.load(d)
    assert adapter[name].alpha == 0.1 and adapter.provenance["mlx_vlm"]["alpha_given"] is False
    _edit_config(d, lambda c: c.update(rank=3))
    with pytest.raises(pl.LoraError, match=r"rank is 3 but A is \[4, 2\]"):
        pl.load(d)


def test_real_mlx_vlm_loads_and_writes(tmp_path):
    """mlx-vlm's own loader (optional: mlx-vlm is not a dependency; run with it installed)."""
    vlm_utils = pytest.importorskip("mlx_vlm.trainer.peft.utils",
                                    reason="mlx-vlm is not installed: its own loader is not checked")
    import mlx.nn as nn

    class Vlm(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = tiny_mlx()

        def __call__(self, x):
            return self.language_model(x)

    text = mixed_adapter(embedding=False)
    pl.save(text.rename(lambda n: "language_model." + n), tmp_path / "v", format="mlx-vlm")
    model = vlm_utils.load_adapters(Vlm(), tmp_path / "v")
    assert rel(mlx_logits(model), mlx_logits(merged_model(text))) < 1e-5
    # a legacy LoRaLayer adapter made and saved by mlx-vlm itself
    legacy = Vlm()
    vlm_utils.get_peft_model(legacy, rank=4, alpha=8.0, dropout=0.0, legacy=True, verbose=False)
    mx.random.seed(5)
    legacy.load_weights([(n, 0.1 * mx.random.normal(p.shape))
                         for n, p in tree_flatten(legacy.trainable_parameters()) if n.endswith(".B")],
                        strict=False)
    vlm_utils.save_adapter(legacy, tmp_path / "l" / "adapters.safetensors")
    adapter = pl.load(tmp_path / "l").rename(lambda n: n.removeprefix("language_model."))
    assert rel(mlx_logits(legacy), mlx_logits(merged_model(adapter))) < 1e-5
