"""The Adapter model and the portable format v1."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import portable_lora as pl
from portable_lora import LoraError, LoraModule
from portable_lora.io.safetensors_io import SafetensorsFile, read_safetensors, write_safetensors

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]


def _bits(a: np.ndarray) -> bytes:
    return a.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_is_bit_exact(tmp_path, dtype):
    a = pl.examples.random_adapter(dtype=dtype, rank={n: 4 + (i % 3) for i, n in enumerate(pl.examples.llama_module_shapes())},
                                   dora=True)
    path = tmp_path / "a.safetensors"
    pl.save(a, path)
    b = pl.load(path)
    assert list(a) == list(b)
    for name in a:
        for attr in ("A", "B", "magnitude"):
            x, y = getattr(a[name], attr), getattr(b[name], attr)
            assert x.dtype == y.dtype and x.shape == y.shape and _bits(x) == _bits(y), (name, attr)
        assert (a[name].alpha, a[name].rule, a[name].kind) == (b[name].alpha, b[name].rule, b[name].kind)
    assert b.provenance["source_format"] == "portable"
    assert b.base_model == a.base_model


def test_conv_and_embedding_round_trip(tmp_path):
    conv = pl.examples.random_adapter({"unet.conv_in": (8, 4, 3, 3)}, kind="conv", rank=2)
    emb = pl.examples.random_adapter({"model.embed_tokens": (32, 8)}, kind="embedding", rank=2)
    both = pl.Adapter({**conv.modules, **emb.modules})
    pl.save(both, tmp_path / "x.safetensors")
    back = pl.load(tmp_path / "x.safetensors")
    assert back["unet.conv_in"].kind == "conv" and back["model.embed_tokens"].kind == "embedding"
    np.testing.assert_array_equal(back.delta_weight("unet.conv_in"), both.delta_weight("unet.conv_in"))
    assert back.delta_weight("model.embed_tokens").shape == (32, 8)


def test_config_is_readable_without_the_library(tmp_path):
    a = pl.examples.random_adapter(rule="alpha/sqrt(rank)", alpha=8.0, rank=4)
    path = tmp_path / "a.safetensors"
    pl.save(a, path)
    with SafetensorsFile(path) as f:
        config = json.loads(f.metadata["portable_lora"])
    assert config["format_version"] == 1
    spec = config["modules"]["model.layers.0.self_attn.q_proj"]
    assert spec == {"rank": 4, "alpha": 8.0, "rule": "alpha/sqrt(rank)", "scale": 4.0,
                    "kind": "linear", "dora": False}
    # the reference safetensors package reads our files
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.lora_A"],
                                  a["model.layers.0.self_attn.q_proj"].A)


def test_delta_weight_scale_applied():
    A = np.arange(6, dtype=np.float32).reshape(2, 3)
    B = np.ones((4, 2), np.float32)
    a = pl.Adapter({"m": LoraModule(A, B, alpha=4.0)})
    np.testing.assert_allclose(a.delta_weight("m"), 2.0 * B @ A)


@pytest.mark.parametrize("make,match", [
    (lambda: LoraModule(np.ones((2, 3)), np.ones((4, 5)), alpha=1), "disagree on the rank"),
    (lambda: LoraModule(np.ones((2, 3)), np.ones((4, 2)), alpha=float("nan")), "alpha must be finite"),
    (lambda: LoraModule(np.ones((2, 3)), np.ones((4, 2)), alpha=1, rule="alpha*r"), "unknown scaling rule"),
    (lambda: LoraModule(np.ones((0, 3)), np.ones((4, 0)), alpha=1), "rank must be a positive integer"),
    (lambda: LoraModule(np.ones((2, 3)), np.ones((4, 2)), alpha=1, kind="conv"), "conv LoRA needs"),
    (lambda: LoraModule(np.ones((2, 3)), np.ones((4, 2)), alpha=1, magnitude=np.ones(3)), "magnitude must have shape"),
    (lambda: LoraModule(np.ones((2, 3), np.int32), np.ones((4, 2)), alpha=1), "floating point"),
])
def test_bad_modules_name_the_module(make, match):
    with pytest.raises(LoraError, match=f"q_proj.*{match}"):
        pl.Adapter({"q_proj": make()})


def test_lora_error_is_value_error():
    assert issubclass(LoraError, ValueError)


def test_portable_config_rank_mismatch_is_an_error(tmp_path):
    a = pl.examples.random_adapter(rank=4)
    path = tmp_path / "a.safetensors"
    pl.save(a, path)
    tensors, meta = read_safetensors(path)
    config = json.loads(meta["portable_lora"])
    config["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 5
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, {"portable_lora": json.dumps(config)})
    with pytest.raises(LoraError, match=r"bad.safetensors.*rank 5 but lora_A has rank 4"):
        pl.load(bad)


def test_unknown_layout_lists_what_was_seen(tmp_path):
    path = tmp_path / "weird.safetensors"
    write_safetensors(path, {"foo.bar": np.zeros(3, np.float32)})
    with pytest.raises(LoraError, match=r"weird.safetensors.*unknown adapter layout.*foo.bar"):
        pl.load(path)


def test_summary_and_describe():
    a = pl.examples.random_adapter(rank=8, alpha=16)
    text = a.summary()
    assert "14 × rank 8, alpha 16, rule alpha/rank, scale 2" in text
    d = a.describe()
    assert d["modules"] == 14 and d["groups"][0]["count"] == 14
