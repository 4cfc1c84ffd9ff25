"""The PEFT format against the real PEFT: what PEFT writes we read, what we write PEFT loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import portable_lora as pl
from portable_lora import core
from portable_lora.examples import llama_module_shapes, random_adapter
from portable_lora.formats import peft as peft_format
from portable_lora.io.safetensors_io import read_safetensors, write_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.peer

IDS = [[1, 5, 9, 33, 100, 7, 2, 64, 127, 0]]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    """The tiny Llama of the brief: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.double().numpy()


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def peft_model(config, seed: int = 0):
    """A PEFT model with random non-zero factors (init_lora_weights=False), and its adapters."""
    model = peft.get_peft_model(tiny_llama(), config)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: move m away from ‖W‖ so it matters
                param.mul_(1 + 0.1 * torch.randn_like(param))
    return model.eval()


def peft_layers(model):
    """{module name: PEFT LoraLayer} with names as in the base model."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def merged_logits(adapter, transposed: bool = False) -> np.ndarray:
    """Logits of the base model with ``adapter`` merged by the core (NumPy, float64)."""
    model = tiny_llama()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in adapter.items():
            target = modules[name]
            W = target.weight.detach().double().numpy()
            mag = None if m.magnitude is None else m.magnitude.astype(np.float64)
            merged = core.merge_into(W, m.A.astype(np.float64), m.B.astype(np.float64), m.scale,
                                     m.kind, magnitude=mag, transposed=transposed)
            target.weight.copy_(torch.from_numpy(np.asarray(merged)))
    return logits(model)


RSLORA = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=PROJECTIONS,
              rank_pattern={"v_proj": 8, "model.layers.1.mlp.down_proj": 2},
              alpha_pattern={"o_proj": 3, "model.layers.0.self_attn.q_proj": 20},
              init_lora_weights=False)


@pytest.mark.parametrize("case", ["rslora-patterns", "dora", "plain"])
def test_read_what_peft_writes(tmp_path, case):
    kwargs = dict(RSLORA)
    if case == "dora":
        kwargs.update(use_dora=True, use_rslora=False)
    elif case == "plain":
        kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft_model(peft.LoraConfig(**kwargs))
    model.save_pretrained(tmp_path / "a")
    adapter = pl.load(tmp_path / "a")
    assert adapter.provenance["source_format"] == "peft"
    layers = peft_layers(model)
    assert set(adapter) == set(layers)
    for name, layer in layers.items():
        ours = adapter[name]
        assert ours.rank == layer.r["default"]
        assert ours.scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        expected = layer.get_delta_weight("default").detach().double().numpy()
        assert rel(ours.delta_weight(np.float64), expected) < 1e-6, name
        if case == "dora":
            mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
            assert np.array_equal(ours.magnitude, mag)
    if case == "rslora-patterns":
        assert adapter["model.layers.0.self_attn.v_proj"].rank == 8
        assert adapter["model.layers.1.mlp.down_proj"].rank == 2
        assert adapter["model.layers.0.self_attn.q_proj"].alpha == 20
        assert adapter["model.layers.1.self_attn.o_proj"].alpha == 3
        assert adapter["model.layers.0.self_attn.k_proj"].rule == "alpha/sqrt(rank)"
        assert adapter.provenance["convention"] == "alpha/sqrt(rank)"
    # our reading merged into the base weights gives PEFT's own logits
    assert rel(merged_logits(adapter), logits(model)) < 1e-5


@pytest.mark.parametrize("case", ["rslora-patterns", "dora"])
def test_peft_loads_what_we_write(tmp_path, case):
    kwargs = dict(RSLORA)
    if case == "dora":
        kwargs.update(use_dora=True)
    model = peft_model(peft.LoraConfig(**kwargs))
    model.save_pretrained(tmp_path / "a")
    expected = logits(model)
    adapter = pl.load(tmp_path / "a")
    pl.save(adapter, tmp_path / "b", format="peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    # our config has no key PEFT does not know, and every tensor finds its parameter
    complaints = [str(w.message) for w in caught
                  if "Unexpected keyword" in str(w.message) or "missing adapter keys" in str(w.message)
                  or "unexpected" in str(w.message).lower()]
    assert not complaints
    assert rel(logits(loaded), expected) < 1e-5
    for name, layer in peft_layers(loaded).items():
        assert layer.r["default"] == adapter[name].rank
        assert layer.scaling["default"] == pytest.approx(adapter[name].scale, rel=1e-15)
    again = pl.load(tmp_path / "b")
    for name, m in adapter.items():
        assert np.array_equal(again[name].A, m.A) and np.array_equal(again[name].B, m.B)
        assert (again[name].alpha, again[name].rule) == (m.alpha, m.rule)


def test_every_rule_is_expressed_exactly(tmp_path):
    """raw, alpha/rank and rsLoRA modules in one adapter: PEFT computes each module's scale."""
    shapes = llama_module_shapes(layers=2, kv_hidden=32)
    names = list(shapes)
    adapter = random_adapter(shapes, rank={n: [2, 4, 8][i % 3] for i, n in enumerate(names)},
                             alpha={n: [1.0, 16.0, 3.5, 7.0][i % 4] for i, n in enumerate(names)})
    for i, name in enumerate(names):
        adapter[name].rule = ["raw", "alpha/rank", "alpha/sqrt(rank)"][i % 3]
    pl.save(adapter, tmp_path / "p", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    layers = peft_layers(loaded)
    assert set(layers) == set(adapter)
    for name, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(adapter[name].scale, rel=1e-14), name
        got = layer.get_delta_weight("default").detach().double().numpy()
        assert rel(got, adapter.delta_weight(name, np.float64)) < 1e-6, name
    assert rel(logits(loaded), merged_logits(adapter)) < 1e-5
    # the header entry gives back each module's own alpha and rule, bit for bit
    again = pl.load(tmp_path / "p")
    for name, m in adapter.items():
        assert (again[name].alpha, again[name].rule, again[name].rank) == (m.alpha, m.rule, m.rank)
        assert np.array_equal(again[name].B, m.B)


class _Nested(torch.nn.Module):
    """Module names where one is a '.'-suffix of another: a.q and x.a.q."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Module()
        self.a.q = torch.nn.Linear(6, 5)
        self.x = torch.nn.Module()
        self.x.a = torch.nn.Module()
        self.x.a.q = torch.nn.Linear(6, 5)
        self.x.a.k = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.a.q(x) + self.x.a.q(x) + self.x.a.k(x)


def test_patterns_never_capture_another_module(tmp_path):
    shapes = {"a.q": (5, 6), "x.a.q": (5, 6), "x.a.k": (5, 6)}
    adapter = random_adapter(shapes, rank={"a.q": 3, "x.a.q": 2, "x.a.k": 2},
                             alpha={"a.q": 5.0, "x.a.q": 1.0, "x.a.k": 1.0})
    pl.save(adapter, tmp_path / "n", format="peft")
    config = json.loads((tmp_path / "n" / "adapter_config.json").read_text())
    # "a.q" would also match "x.a.q" under PEFT's rule: x.a.q gets its own, earlier, entry
    assert list(config["rank_pattern"])[0] == "x.a.q"
    loaded = peft.PeftModel.from_pretrained(_Nested(), tmp_path / "n")
    for name, layer in peft_layers(loaded).items():
        assert layer.r["default"] == adapter[name].rank
        assert layer.scaling["default"] == adapter[name].scale
    assert peft_format.pattern_key(config["rank_pattern"], "x.a.q") == "x.a.q"


class _DotOrUnderscore(torch.nn.Module):
    """Module names that differ only by '.' against '_': a.b and a_b."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Module()
        self.a.b = torch.nn.Linear(6, 5)
        self.a_b = torch.nn.Linear(6, 5)
        self.c = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.a.b(x) + self.a_b(x) + self.c(x)


def test_pattern_dots_are_literal_where_they_would_match_another_name(tmp_path):
    """PEFT reads pattern keys as regexes: the key "a.b" would also give "a_b" its rank."""
    shapes = {"a.b": (5, 6), "a_b": (5, 6), "c": (5, 6)}
    adapter = random_adapter(shapes, rank={"a.b": 4, "a_b": 2, "c": 2}, alpha={"a.b": 3.0, "a_b": 1.0, "c": 1.0})
    pl.save(adapter, tmp_path / "d", format="peft")
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert list(config["rank_pattern"]) == [r"a\.b"]
    loaded = peft.PeftModel.from_pretrained(_DotOrUnderscore(), tmp_path / "d")
    layers = peft_layers(loaded)
    assert sorted(layers) == sorted(shapes)
    for name, layer in layers.items():
        assert layer.r["default"] == adapter[name].rank
        assert layer.scaling["default"] == adapter[name].scale
    back = pl.load(tmp_path / "d")
    for name in shapes:
        assert np.array_equal(back[name].B, adapter[name].B) and back[name].scale == adapter[name].scale


def test_gpt2_fan_in_fan_out(tmp_path):
    """GPT-2 Conv1D weights are (in, out): A and B keep PEFT's layout, ΔW maps transposed."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                          fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "g")
    adapter = pl.load(tmp_path / "g")
    assert adapter.provenance["fan_in_fan_out"] is True
    layer = peft_layers(model)["transformer.h.0.attn.c_attn"]
    peft_delta = layer.get_delta_weight("default").detach().double().numpy()  # (in, out)
    assert rel(adapter.delta_weight("transformer.h.0.attn.c_attn", np.float64).T, peft_delta) < 1e-6
    pl.save(adapter, tmp_path / "g2", format="peft")
    assert json.loads((tmp_path / "g2" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel(config).eval(), tmp_path / "g2")
    ids = torch.tensor([[1, 2, 3, 40, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dora", [False, True])
def test_conv(tmp_path, dora):
    torch.manual_seed(0)
    model = peft.get_peft_model(_Conv(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv"],
                                                         use_dora=dora, init_lora_weights=False))
    model.save_pretrained(tmp_path / "c")
    adapter = pl.load(tmp_path / "c")
    m = adapter["conv"]
    assert m.kind == "conv" and m.A.shape == (2, 3, 3, 3) and m.B.shape == (5, 2, 1, 1)
    layer = peft_layers(model)["conv"]
    assert rel(m.delta_weight(np.float64), layer.get_delta_weight("default").detach().double().numpy()) < 1e-6
    if dora:
        assert m.magnitude.shape == (5,)
    pl.save(adapter, tmp_path / "c2", format="peft")
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(_Conv(), tmp_path / "c2")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_embedding_lora_and_its_saved_base_weights(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                           init_lora_weights=False))
        model.save_pretrained(tmp_path / "e")  # PEFT also saves embed_tokens.base_layer.weight
    with pytest.raises(pl.LoraError, match="embed_tokens.base_layer.weight.*extra_tensors='ignore'"):
        pl.load(tmp_path / "e")
    adapter = pl.load(tmp_path / "e", extra_tensors="ignore")
    assert adapter.provenance["ignored_tensors"] == ["base_model.model.model.embed_tokens.base_layer.weight"]
    emb = adapter["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.weight_shape == (128, 64)
    layer = peft_layers(model)["model.embed_tokens"]
    assert rel(emb.delta_weight(np.float64), layer.get_delta_weight("default").detach().double().numpy()) < 1e-6
    assert rel(merged_logits(adapter), logits(model)) < 1e-5
    pl.save(adapter, tmp_path / "e2", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "e2").eval()
    assert rel(logits(loaded), logits(model)) < 1e-5


# -- strictness ---------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Path:
    adapter = random_adapter({"model.layers.0.self_attn.q_proj": (8, 8),
                              "model.layers.0.self_attn.v_proj": (8, 8)}, rank=2, alpha=4.0)
    pl.save(adapter, tmp_path / "s", format="peft")
    return tmp_path / "s"


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    tensors, metadata = read_safetensors(path)
    write_safetensors(path, edit(tensors), metadata)


@pytest.mark.parametrize("field,value,match", [
    ("r", "8", r"adapter_config.json \[r\]: expected an integer, found '8'"),
    ("r", 0, r"adapter_config.json \[r\]: r must be a positive integer, found 0"),
    ("lora_alpha", "16", r"\[lora_alpha\]: expected a number"),
    ("alpha_pattern", {"q_proj": float("nan")}, r"alpha must be finite"),
    ("use_rslora", "yes", r"\[use_rslora\]: expected a boolean"),
    ("rank_pattern", {"q_proj": 2.5}, r"\[q_proj\]: expected an integer"),
    ("rank_pattern", ["q_proj"], r"\[rank_pattern\]: expected an object"),
    ("peft_type", "LOHA", r"peft_type 'LOHA' is not supported"),
    ("use_bdlora", {"a": 1}, r"use_bdlora=.*not supported"),
    ("lora_bias", True, r"lora_bias=True is not supported"),
    ("target_parameters", ["mlp.experts"], r"target_parameters=.*not supported"),
])
def test_bad_config_names_file_and_field(small, field, value, match):
    _edit_config(small, **{field: value})
    with pytest.raises(pl.LoraError, match=match):
        pl.load(small)


def test_rank_inconsistent_with_config(small):
    _edit_config(small, rank_pattern={"v_proj": 4})
    with pytest.raises(pl.LoraError, match=r"rank 4 \(rank_pattern\['v_proj'\]\) but lora_A has rank 2"):
        pl.load(small)
    _edit_config(small, rank_pattern={}, r=3)
    with pytest.raises(pl.LoraError, match=r"rank 3 \(r\)"):
        pl.load(small)


def test_unknown_and_bias_tensors_are_refused(small):
    _edit_tensors(small, lambda t: {**t, "base_model.model.score.weight": np.zeros((2, 8), np.float32)})
    with pytest.raises(pl.LoraError, match=r"not LoRA tensors.*score.weight"):
        pl.load(small)
    _edit_tensors(small, lambda t: {**{k: v for k, v in t.items() if "score" not in k},
                                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias":
                                        np.zeros(8, np.float32)})
    with pytest.raises(pl.LoraError, match=r"lora_B has a bias"):
        pl.load(small)


def test_missing_partner_and_stray_magnitude(small):
    _edit_tensors(small, lambda t: {k: v for k, v in t.items() if "v_proj.lora_B" not in k})
    with pytest.raises(pl.LoraError, match=r"v_proj.*has no lora_B"):
        pl.load(small)


def test_default_adapter_name_and_bare_file_are_accepted(small):
    original = pl.load(small)
    _edit_tensors(small, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    via_file = pl.load(small / "adapter_model.safetensors")
    assert set(via_file) == set(original)
    for name in original:
        assert np.array_equal(via_file[name].B, original[name].B)


def test_convention_overrides_and_is_recorded(small):
    adapter = pl.load(small, convention="raw")
    assert adapter.provenance["convention"] == "raw"
    assert adapter.provenance["convention_reason"] == "given by the user"
    assert all(m.scale == 4.0 for m in adapter.values())


def test_detection(small, tmp_path):
    assert pl.detect(small)[0] == "peft"
    assert pl.detect(small / "adapter_model.safetensors")[0] == "peft"
    assert peft_format.detect(tmp_path) is None
    pl.save(random_adapter({"q": (4, 4)}, rank=2), tmp_path / "m", format="mlx-lm")
    assert peft_format.detect(tmp_path / "m") is None


def test_save_refusals(tmp_path):
    adapter = random_adapter({"q": (4, 4), "k": (4, 4)}, rank=2, dora=True)
    adapter["k"].magnitude = None
    with pytest.raises(pl.LoraError, match="use_dora is one flag"):
        pl.save(adapter, tmp_path / "x", format="peft")
    adapter["k"].magnitude = np.ones(4, np.float32)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(pl.LoraError, match="holds other files"):
        pl.save(adapter, tmp_path / "busy", format="peft")
    assert (tmp_path / "busy" / "model.safetensors").read_bytes() == b"precious"
    pl.save(adapter, tmp_path / "ok", format="peft")
    pl.save(adapter, tmp_path / "ok", format="peft")  # replacing our own output is fine


def test_bfloat16_factors_round_trip_bit_exactly(tmp_path):
    import ml_dtypes

    adapter = random_adapter({"q": (8, 8), "k": (4, 8)}, rank={"q": 2, "k": 4}, dtype=ml_dtypes.bfloat16)
    pl.save(adapter, tmp_path / "b", format="peft")
    again = pl.load(tmp_path / "b")
    for name, m in adapter.items():
        assert again[name].A.dtype == ml_dtypes.bfloat16
        assert np.array_equal(again[name].A.view(np.uint16), m.A.view(np.uint16))
        assert np.array_equal(again[name].B.view(np.uint16), m.B.view(np.uint16))


def test_ignored_extras_keep_the_config_fields_that_made_them(tmp_path):
    """bias='lora_only' saves base biases; ignoring them keeps why, for whoever reads provenance."""
    model = peft_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias="lora_only",
                                       init_lora_weights=False))
    for layer in peft_layers(model).values():  # the tiny Llama has no biases: give PEFT some to save
        layer.base_layer.bias = torch.nn.Parameter(torch.zeros(layer.base_layer.out_features))
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(pl.LoraError, match="not LoRA tensors"):
        pl.load(tmp_path / "b")
    adapter = pl.load(tmp_path / "b", extra_tensors="ignore")
    assert adapter.provenance["peft"]["bias"] == "lora_only"
    assert all(k.endswith("base_layer.bias") for k in adapter.provenance["ignored_tensors"])
