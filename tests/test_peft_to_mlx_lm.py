"""Cross-tool: a PEFT adapter runs in mlx-lm, and an mlx-lm adapter runs in PEFT, same logits.

The same tiny Llama exists twice, in transformers (PyTorch) and in mlx-lm, with the same base
weights. The only thing between the two tools is portable_lora.load / portable_lora.save.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_lora as pl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

pytestmark = pytest.mark.peer

IDS = [[1, 5, 9, 33, 100, 7, 2, 64, 127, 0, 42, 17]]
TOLERANCE = 1e-4  # float32 end to end, two frameworks


def hf_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def mlx_llama():
    """The same model in mlx-lm, holding the transformers model's weights."""
    hf = hf_llama()
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=hf.config.rms_norm_eps,
                           vocab_size=128, tie_word_embeddings=False, rope_theta=10000.0)
    model = llama.Model(args)
    weights = model.sanitize({k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.double().numpy()


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS))).astype(np.float64)


def rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_base_models_agree():
    """Without this, a logits mismatch below could be the models, not the adapters."""
    assert rel(mlx_logits(mlx_llama()), hf_logits(hf_llama())) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_runs_in_mlx_lm(tmp_path, dora):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=not dora, use_dora=dora, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"v_proj": 8, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"o_proj": 3, "model.layers.0.self_attn.q_proj": 20})
    model = peft.get_peft_model(hf_llama(), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    expected = hf_logits(model)
    assert rel(expected, hf_logits(hf_llama())) > 1e-3  # the adapter does change the output

    adapter = pl.load(tmp_path / "peft")
    assert len({m.scale for m in adapter.values()}) > 1  # so mlx-lm's one scale needs folding
    pl.save(adapter, tmp_path / "mlx", format="mlx-lm")
    mlx_model = load_adapters(mlx_llama(), str(tmp_path / "mlx"))
    assert rel(mlx_logits(mlx_model), expected) < TOLERANCE


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_adapter_runs_in_peft(tmp_path, dora):
    model = mlx_llama()
    model.freeze()
    params = {"rank": 4, "scale": 2.5, "dropout": 0.0,
              "keys": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, params, use_dora=dora)
    mx.random.seed(3)
    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            updates.append((name, 0.05 * mx.random.normal(value.shape)))
        elif name.endswith(".m"):
            updates.append((name, value * (1 + 0.1 * mx.random.normal(value.shape))))
    model.load_weights(updates, strict=False)
    out = tmp_path / "mlx"
    out.mkdir()
    # saved the way mlx_lm.lora saves: trainable parameters, and its arguments as the config
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": "tiny-llama", "fine_tune_type": "dora" if dora else "lora", "num_layers": 2,
                 "lora_parameters": params, "adapter_path": str(out), "iters": 1}, out / "adapter_config.json")
    expected = mlx_logits(model)
    assert rel(expected, hf_logits(hf_llama())) > 1e-3

    adapter = pl.load(out)
    pl.save(adapter, tmp_path / "peft", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = peft.PeftModel.from_pretrained(hf_llama(), tmp_path / "peft").eval()
    assert rel(hf_logits(loaded), expected) < TOLERANCE
    # and the PEFT directory goes back to mlx-lm with the original numbers
    back = pl.load(tmp_path / "peft")
    for name, m in adapter.items():
        assert (back[name].rank, back[name].alpha, back[name].rule) == (4, 2.5, "raw")
        assert np.array_equal(back[name].B, m.B)
