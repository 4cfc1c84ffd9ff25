"""portable_lora.numpy: merges over state dicts, against a float64 reference and PEFT's own
``merge_and_unload`` on a real PyTorch model."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

import portable_lora as pl
from portable_lora import numpy as pln
from portable_lora.adapter import Adapter
from portable_lora.errors import LoraError
from reference import random_module, ref_dora, ref_module_delta as ref_delta

RNG = np.random.default_rng(11)
NP_DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def module(kind, shape, rank=3, alpha=6.0, rule="alpha/rank", dora=False, dtype=np.float32):
    return random_module(RNG, kind, shape, rank, alpha, rule, dora, dtype)


def state_and_adapter(dtype):
    dt = NP_DTYPES[dtype]
    state = {
        "emb.weight": rand(11, 6).astype(dt),
        "lin.weight": rand(5, 6).astype(dt),
        "lin.bias": rand(5).astype(dt),
        "conv.weight": rand(4, 2, 3, 3).astype(dt),
        "c1d.weight": rand(6, 7).astype(dt),  # GPT-2 Conv1D: (in, out)
        "dora.weight": rand(5, 6).astype(dt),
        "other.weight": rand(3, 3).astype(dt),
    }
    adapter = Adapter({
        "emb": module("embedding", (11, 6), dtype=dt),
        "lin": module("linear", (5, 6), rule="alpha/sqrt(rank)", dtype=dt),
        "conv": module("conv", (4, 2, 3, 3), rank=2, dtype=dt),
        "c1d": module("linear", (7, 6), rule="raw", alpha=0.5, dtype=dt),
        "dora": module("linear", (5, 6), dora=True, dtype=dt),
    })
    return state, adapter


def f64(x):
    return np.asarray(x).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_merge_matches_reference_and_is_pure(dtype):
    state, adapter = state_and_adapter(dtype)
    snapshot = {k: v.copy() for k, v in state.items()}
    merged = pln.merge(state, adapter, strength=0.75, transposed={"c1d"})
    expect = {
        "emb.weight": f64(state["emb.weight"]) + ref_delta(adapter["emb"], 0.75),
        "lin.weight": f64(state["lin.weight"]) + ref_delta(adapter["lin"], 0.75),
        "conv.weight": f64(state["conv.weight"]) + ref_delta(adapter["conv"], 0.75),
        "c1d.weight": f64(state["c1d.weight"]) + ref_delta(adapter["c1d"], 0.75).T,
        "dora.weight": ref_dora(f64(state["dora.weight"]), adapter["dora"], 0.75),
    }
    for key, want in expect.items():
        assert merged[key].dtype == state[key].dtype, key
        assert_close(f64(merged[key]), want, dtype, what=key)
    assert merged is not state and merged["other.weight"] is state["other.weight"]
    assert merged["lin.bias"] is state["lin.bias"]
    for key, value in state.items():
        np.testing.assert_array_equal(value, snapshot[key])
    norms = pln.dora_weight_norms(state, adapter, strength=0.75, transposed={"c1d"})
    assert sorted(norms) == ["dora"]
    restored = pln.unmerge(merged, adapter, strength=0.75, transposed={"c1d"}, weight_norms=norms)
    for key, value in state.items():
        assert_close(f64(restored[key]), f64(value), dtype, what=f"unmerge {key}")


def test_bf16_merge_rounds_once():
    W = rand(16, 24).astype(ml_dtypes.bfloat16)
    m = module("linear", (16, 24), rank=4, dtype=ml_dtypes.bfloat16)
    got = pln.merge({"w.weight": W}, Adapter({"w": m}))["w.weight"]
    assert got.dtype == ml_dtypes.bfloat16
    once = (W.astype(np.float32) + pl.core.delta_weight(m.A, m.B, m.scale, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, once)
    # rounding ΔW to bf16 before the add (PEFT's bf16 merge) gives a different, worse result
    twice = (W.astype(np.float32) + pl.core.delta_weight(m.A, m.B, m.scale, dtype=np.float32)
             .astype(ml_dtypes.bfloat16).astype(np.float32)).astype(ml_dtypes.bfloat16)
    exact = f64(W) + ref_delta(m)
    assert np.abs(f64(got) - exact).sum() < np.abs(f64(twice) - exact).sum()


def test_delta_state_dict_layouts_keys_and_dtype():
    _, adapter = state_and_adapter("float32")
    del adapter["dora"]
    deltas = pln.delta_state_dict(adapter, transposed=lambda name: name == "c1d",
                                  key_for={"emb": "embed_tokens.weight"})
    assert sorted(deltas) == ["c1d.weight", "conv.weight", "embed_tokens.weight", "lin.weight"]
    assert_close(deltas["c1d.weight"], ref_delta(adapter["c1d"]).T, "float32")
    assert_close(deltas["conv.weight"], ref_delta(adapter["conv"]), "float32")
    assert_close(deltas["embed_tokens.weight"], ref_delta(adapter["emb"]), "float32")
    bf16 = pln.delta_state_dict(adapter, dtype=ml_dtypes.bfloat16, transposed={"c1d"}, strength=2.0)
    assert bf16["lin.weight"].dtype == ml_dtypes.bfloat16
    assert_close(f64(bf16["lin.weight"]), ref_delta(adapter["lin"], 2.0), "bfloat16")
    with pytest.raises(LoraError, match="'dora'.*DoRA has no ΔW"):
        pln.delta_state_dict(Adapter({"dora": module("linear", (5, 6), dora=True)}))


def test_key_for_and_transposed_forms():
    W = rand(6, 5).astype(np.float32)  # (in, out)
    m = module("linear", (5, 6))
    want = f64(W) + ref_delta(m).T
    adapter = Adapter({"model.q": m})
    state = {"params/q/kernel": W}
    for key_for in ({"model.q": "params/q/kernel"}, lambda n: "params/" + n.split(".")[-1] + "/kernel"):
        for transposed in (True, {"model.q"}, {"params/q/kernel"}, lambda n: n.endswith("q")):
            got = pln.merge(state, adapter, key_for=key_for, transposed=transposed)["params/q/kernel"]
            assert_close(f64(got), want, "float32", what=f"{key_for!r} {transposed!r}")
    with pytest.raises(LoraError, match="'c'.*only linear weights can be transposed"):
        pln.merge({"c.weight": rand(4, 2, 3, 3)}, Adapter({"c": module("conv", (4, 2, 3, 3))}), transposed=True)


def test_errors_name_modules_keys_and_shapes():
    state = {"a.weight": rand(5, 6), "ids.weight": np.zeros((5, 6), np.int64)}
    with pytest.raises(LoraError, match=r"2 adapter module.*b -> b\.weight.*c -> None"):
        pln.merge(state, Adapter({"a": module("linear", (5, 6)), "b": module("linear", (5, 6)),
                                  "c": module("linear", (5, 6))}), key_for=lambda n: None if n == "c" else f"{n}.weight")
    with pytest.raises(LoraError, match=r"\[a\.weight\].*'a'.*shape \[6, 5\] \(in, out\), found \[5, 6\]"):
        pln.merge(state, Adapter({"a": module("linear", (5, 6))}), transposed=True)
    with pytest.raises(LoraError, match="'ids'.*floating point"):
        pln.merge(state, Adapter({"ids": module("linear", (5, 6))}))
    with pytest.raises(LoraError, match="'a'.*both map"):
        pln.merge(state, Adapter({"a": module("linear", (5, 6)), "b": module("linear", (5, 6))}),
                  key_for=lambda n: "a.weight")
    with pytest.raises(LoraError, match="'d'.*weight norm"):
        pln.unmerge({"d.weight": rand(5, 6)}, Adapter({"d": module("linear", (5, 6), dora=True)}))
    with pytest.raises(LoraError, match="expected a state dict"):
        pln.merge([("a.weight", rand(5, 6))], Adapter({"a": module("linear", (5, 6))}))


# -- peer: PEFT merge_and_unload on a real PyTorch model ---------------------------------------

@pytest.mark.peer
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_matches_peft_merge_and_unload(dora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.lin = torch.nn.Linear(6, 5)
            self.conv = torch.nn.Conv2d(2, 4, 3)
            self.c1d = Conv1D(7, 6)  # GPT-2 layout: weight (in, out) = (6, 7)

    torch.manual_seed(0)
    net = Net()
    base = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rank, alpha = 3, 6.0
    targets = ["lin", "c1d"] if dora else ["emb", "lin", "conv", "c1d"]
    shapes = {"emb": (11, 6), "lin": (5, 6), "conv": (4, 2, 3, 3), "c1d": (7, 6)}
    kinds = {"emb": "embedding", "conv": "conv"}
    adapter = Adapter({n: module(kinds.get(n, "linear"), shapes[n], rank=rank, alpha=alpha, dora=dora)
                       for n in targets})
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets it for Conv1D itself
        peft_model = get_peft_model(net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                    use_dora=dora))
    with torch.no_grad():
        for name in targets:
            layer = peft_model.base_model.model.get_submodule(name)
            m = adapter[name]
            if name == "emb":
                layer.lora_embedding_A["default"].copy_(torch.from_numpy(m.A))
                layer.lora_embedding_B["default"].copy_(torch.from_numpy(m.B))
            else:
                layer.lora_A["default"].weight.copy_(torch.from_numpy(m.A))
                layer.lora_B["default"].weight.copy_(torch.from_numpy(m.B))
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m.magnitude))
    peer = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours = pln.merge(base, adapter, transposed={"c1d"})
    assert sorted(peer) == sorted(ours)
    for key in ours:
        np.testing.assert_allclose(ours[key], peer[key], rtol=1e-5, atol=1e-5, err_msg=key)
        if key.removesuffix(".weight") in targets:
            assert not np.allclose(ours[key], base[key])  # the adapter really changed it


def test_import_imports_only_numpy():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", "import sys, portable_lora.numpy; print(sorted(m for m in "
                           "('jax', 'flax', 'torch', 'mlx', 'keras', 'tensorflow') if m in sys.modules))"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
