"""The MLX adapter: against float64 NumPy references, mlx-lm's own LoRA layers and a tiny Llama."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close, required_backends

from portable_lora import Adapter, LoraError, LoraModule, core, examples
from portable_lora.testing import relative_error

if "mlx" in required_backends():
    import mlx.core as mx
else:
    mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from portable_lora.mlx import (LoraEmbedding, LoraLinear, RequantizationWarning, apply,  # noqa: E402
                               extract, merge, remove, set_strength, to_mlx, to_numpy, unmerge)

MX = {"float32": mx.float32, "bfloat16": mx.bfloat16}
NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
RNG = np.random.default_rng(7)


def mlx_lm():
    if "mlx" in required_backends():  # a run that requires MLX requires its peer too
        import mlx_lm as module
        return module
    return pytest.importorskip("mlx_lm")


def f64(x) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(a).astype(NP[dtype]).astype(np.float64)


class Net(nn.Module):
    """One layer under the name ``proj`` (``as_linear`` for embeddings via ``head``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def __call__(self, x):
        return self.proj(x)


def linear_net(out=10, cin=12, *, dtype="float32", bias=True) -> Net:
    layer = nn.Linear(cin, out, bias=bias)
    layer.weight = to_mlx(RNG.standard_normal((out, cin)) / np.sqrt(cin), MX[dtype])
    if bias:
        layer.bias = to_mlx(RNG.standard_normal(out), MX[dtype])
    return Net(layer)


def lora(rows, cols, *, rank=4, dtype="float32", dora=False, alpha=8.0, kind="linear") -> LoraModule:
    """A random module patching a (rows, cols) weight: (out, in), or (num, dim) for embeddings."""
    adapter = examples.random_adapter({"m": (rows, cols)}, rank=rank, alpha=alpha, dtype=NP[dtype],
                                      dora=dora, kind=kind, seed=int(RNG.integers(1 << 30)))
    return adapter["m"]


def reference_weight(W, module: LoraModule, strength=1.0) -> np.ndarray:
    mag = None if module.magnitude is None else module.magnitude.astype(np.float64)
    return np.asarray(core.merge_into(np.asarray(W, np.float64), module.A.astype(np.float64),
                                      module.B.astype(np.float64), module.scale * strength,
                                      module.kind, magnitude=mag))


# -- single layers against a float64 reference -------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_apply_merge_unmerge(dtype, dora):
    net = linear_net(dtype=dtype)
    W, bias = f64(net.proj.weight), f64(net.proj.bias)
    module = lora(10, 12, dtype=dtype, dora=dora)
    adapter = Adapter({"proj": module})
    x = rounded(RNG.standard_normal((2, 3, 12)), dtype)
    expected = x @ reference_weight(W, module).T + bias

    apply(net, adapter)
    assert isinstance(net.proj, LoraLinear)
    out = net(to_mlx(x, MX[dtype]))
    assert out.dtype == MX[dtype]
    assert_close(f64(out), expected, dtype, what="unmerged forward")

    remove(net)
    assert mx.array_equal(net.proj.weight, to_mlx(W, MX[dtype])).item()
    merge(net, adapter)
    assert type(net.proj) is nn.Linear and net.proj.weight.dtype == MX[dtype]
    assert_close(f64(net.proj.weight), reference_weight(W, module), dtype, what="merged weight")
    assert_close(f64(net(to_mlx(x, MX[dtype]))), expected, dtype, what="merged forward")
    unmerge(net, adapter)
    assert_close(f64(net.proj.weight), W, dtype, what="unmerged weight")


def test_mixed_precision_keeps_adapter_exact_and_output_in_base_dtype():
    net = linear_net(dtype="bfloat16")
    module = lora(10, 12, dtype="float32")
    apply(net, Adapter({"proj": module}))
    assert net.proj.lora_A.dtype == mx.float32
    x = rounded(RNG.standard_normal((4, 12)), "bfloat16")
    out = net(to_mlx(x, mx.bfloat16))
    assert out.dtype == mx.bfloat16
    expected = x @ reference_weight(f64(net.proj.base.weight), module).T + f64(net.proj.base.bias)
    assert_close(f64(out), expected, "bfloat16")
    back = extract(net)["proj"]
    assert back.A.dtype == np.float32
    assert np.array_equal(back.A, module.A) and np.array_equal(back.B, module.B)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_lookup_and_tied_head(dtype):
    table = rounded(RNG.standard_normal((20, 6)), dtype)
    layer = nn.Embedding(20, 6)
    layer.weight = to_mlx(table, MX[dtype])
    net = Net(layer)
    module = lora(20, 6, dtype=dtype, kind="embedding")
    merged = reference_weight(table, module)
    ids = np.array([[0, 5, 19], [3, 3, 7]])
    x = rounded(RNG.standard_normal((2, 6)), dtype)

    apply(net, Adapter({"proj": module}))
    assert isinstance(net.proj, LoraEmbedding)
    assert_close(f64(net(mx.array(ids))), merged[ids], dtype, what="lookup")
    assert_close(f64(net.proj.as_linear(to_mlx(x, MX[dtype]))), x @ merged.T, dtype, what="as_linear")
    remove(net)
    merge(net, Adapter({"proj": module}))
    assert_close(f64(net.proj.weight), merged, dtype, what="merged table")


# -- quantized bases ---------------------------------------------------------------------------

def quantized_net(bits=4, group_size=32) -> tuple[Net, np.ndarray]:
    net = linear_net(16, 64)
    net.proj = nn.QuantizedLinear.from_linear(net.proj, group_size, bits)
    return net, f64(mx.dequantize(net.proj.weight, net.proj.scales, net.proj.biases,
                                  group_size=group_size, bits=bits))


def test_quantized_linear_apply_and_merge():
    net, W = quantized_net()
    original = net.proj
    module = lora(16, 64)
    adapter = Adapter({"proj": module})
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    expected = x @ reference_weight(W, module).T + f64(original.bias)

    apply(net, adapter)  # the quantized matmul stays the base
    assert net.proj.base is original
    assert_close(f64(net(mx.array(x))), expected, "float32", what="unmerged on quantized base")
    remove(net)

    merge(net, adapter)  # dequantized into a float layer: exact
    assert type(net.proj) is nn.Linear and "weight" not in net.proj.trainable_parameters()
    assert_close(f64(net.proj.weight), reference_weight(W, module), "float32")
    assert_close(f64(net(mx.array(x))), expected, "float32")
    unmerge(net, adapter)
    assert net.proj is original  # the quantized layer comes back bit for bit


def test_requantize_warns_how_much_of_the_adapter_was_erased():
    net, W = quantized_net(bits=4)
    original = net.proj
    module = lora(16, 64)
    # a small adapter, as trained ones are: most of it falls inside one 4-bit step
    adapter = Adapter({"proj": LoraModule(module.A, module.B * 0.02, alpha=module.alpha)})
    with pytest.warns(RequantizationWarning, match="erased") as caught:
        merge(net, adapter, requantize=True)
    assert isinstance(net.proj, nn.QuantizedLinear)
    assert (net.proj.bits, net.proj.group_size, net.proj.mode) == (4, 32, "affine")
    wanted = reference_weight(W, adapter["proj"])
    requantized = f64(mx.dequantize(net.proj.weight, net.proj.scales, net.proj.biases,
                                    group_size=32, bits=4))
    erased = np.linalg.norm(requantized - wanted) / np.linalg.norm(wanted - W)
    reported = caught[0].message.erased["proj"]
    assert reported == pytest.approx(erased, rel=1e-3)
    assert reported > 0.3  # the known failure mode, made visible
    unmerge(net, adapter)
    assert net.proj is original


def test_quantized_embedding_apply_matches_merge():
    layer = nn.Embedding(32, 64)
    layer.weight = to_mlx(RNG.standard_normal((32, 64)))
    net = Net(nn.QuantizedEmbedding.from_embedding(layer, 32, 8))
    module = lora(32, 64, kind="embedding")
    ids = mx.array([1, 2, 31])
    apply(net, Adapter({"proj": module}))
    unmerged = f64(net(ids))
    remove(net)
    merge(net, Adapter({"proj": module}))
    assert type(net.proj) is nn.Embedding
    assert_close(unmerged, f64(net(ids)), "float32")


# -- a tiny mlx-lm Llama ----------------------------------------------------------------------

def tiny_llama(seed=0):
    from mlx_lm.models import llama

    mlx_lm()
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=128)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def llama_adapter(model, *, dora=False, embedding=True, dtype=np.float32) -> Adapter:
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(shapes) == 14
    adapter = examples.random_adapter(shapes, rank=4, alpha=8.0, dora=dora, dtype=dtype, seed=3)
    if embedding:  # tied: the lookup and the output head both see it
        emb = examples.random_adapter({"model.embed_tokens": (128, 64)}, kind="embedding", rank=4,
                                      dtype=dtype, seed=4)["model.embed_tokens"]
        adapter["model.embed_tokens"] = LoraModule((emb.A * 0.05).astype(dtype), emb.B, alpha=emb.alpha,
                                                   kind="embedding")
    return adapter


IDS = mx.array([[3, 14, 15, 92, 65, 35]])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_llama_apply_matches_merge_and_everything_restores(dora):
    model = tiny_llama()
    adapter = llama_adapter(model, dora=dora)
    base = f64(model(IDS))

    apply(model, adapter)
    applied = f64(model(IDS))
    assert relative_error(applied, base) > 1e-3  # the adapter does something
    back = extract(model)
    assert list(back) == list(adapter) or sorted(back) == sorted(adapter)
    for name, module in adapter.items():  # exact round trip
        got = back[name]
        assert np.array_equal(got.A, module.A) and np.array_equal(got.B, module.B), name
        assert (got.alpha, got.rule, got.kind) == (module.alpha, module.rule, module.kind)
        assert (got.magnitude is None) == (module.magnitude is None)
        if module.magnitude is not None:
            assert np.array_equal(got.magnitude, module.magnitude)

    set_strength(model, 0.0)
    zero = f64(model(IDS))
    if not dora:
        assert np.array_equal(zero, base)
    set_strength(model, 0.5)
    half = f64(model(IDS))
    remove(model)
    assert np.array_equal(f64(model(IDS)), base)

    merge(model, adapter)
    assert_close(f64(model(IDS)), applied, "float32", what="merged vs unmerged")
    unmerge(model, adapter)
    assert_close(f64(model(IDS)), base, "float32", what="unmerged")
    for strength, unmerged in ((0.5, half), (0.0, zero)):
        merge(model, adapter, strength=strength)
        assert_close(f64(model(IDS)), unmerged, "float32", what=f"strength {strength}")
        unmerge(model, adapter)
    # DoRA's magnitude stays at strength 0 (PEFT's scale behaves the same): m·W/‖W‖ is not W
    assert (relative_error(zero, base) > 1e-3) == dora


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_llama_quantized_apply_matches_merge(dora):
    model = tiny_llama()
    adapter = llama_adapter(model, dora=dora)
    nn.quantize(model, group_size=32, bits=4)
    apply(model, adapter)
    applied = f64(model(IDS))
    remove(model)
    merge(model, adapter)
    assert_close(f64(model(IDS)), applied, "float32")


def test_llama_bfloat16_matches_float32_reference():
    model = tiny_llama()
    model.set_dtype(mx.bfloat16)
    adapter = llama_adapter(model, dtype=ml_dtypes.bfloat16)
    reference = copy.deepcopy(model)
    reference.set_dtype(mx.float32)  # the same bf16 numbers, computed in float32
    merge(reference, adapter)
    apply(model, adapter)
    out = model(IDS)
    assert out.dtype == mx.bfloat16
    assert_close(f64(out), f64(reference(IDS)), "bfloat16")


# -- training: compile, gradients, optimizer ------------------------------------------------------

def _loss(model, ids, targets):
    return nn.losses.cross_entropy(model(ids), targets).mean()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_compile_matches_eager(dora):
    model = apply(tiny_llama(), llama_adapter(tiny_llama(), dora=dora))
    eager = model(IDS)
    compiled = mx.compile(lambda ids: model(ids))(IDS)
    assert_close(f64(compiled), f64(eager), "float32")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_reach_only_the_lora_parameters(dora):
    adapter = llama_adapter(tiny_llama(), dora=dora)
    model = apply(tiny_llama(), adapter)
    _, grads = nn.value_and_grad(model, _loss)(model, IDS[:, :-1], IDS[:, 1:])
    flat = dict(tree_flatten(grads))
    keys = ["lora_A", "lora_B"] + (["magnitude"] if dora else [])
    expected = {f"{name}.{k}" for name, m in adapter.items() for k in keys
                if k != "magnitude" or m.kind == "linear"}
    assert set(flat) == expected
    for key, grad in flat.items():
        assert float(mx.abs(grad).max()) > 0, f"zero gradient for {key}"


@pytest.mark.parametrize("optimizer", [lambda: optim.SGD(learning_rate=0.1),
                                       lambda: optim.Adam(learning_rate=1e-2)], ids=["sgd", "adam"])
def test_optimizer_step_changes_lora_and_nothing_else(optimizer):
    adapter = llama_adapter(tiny_llama())
    model = apply(tiny_llama(), adapter)
    before = dict(tree_flatten(model.parameters()))
    opt = optimizer()
    state = [model.state, opt.state]

    @lambda f: mx.compile(f, inputs=state, outputs=state)  # a compiled step, the mlx-lm way
    def step(ids, targets):
        loss, grads = nn.value_and_grad(model, _loss)(model, ids, targets)
        opt.update(model, grads)
        return loss

    step(IDS[:, :-1], IDS[:, 1:])
    mx.eval(state)
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    lora_keys = {k for k in before if k.endswith((".lora_A", ".lora_B"))}
    assert changed == lora_keys and len(lora_keys) == 30
    trained = extract(model)["model.layers.0.self_attn.q_proj"]
    assert not np.array_equal(trained.A, adapter["model.layers.0.self_attn.q_proj"].A)


def test_remove_unfreezes_only_what_apply_froze():
    model = tiny_llama()
    model.model.norm.freeze()  # the user's own choice, kept
    before = {k for k, _ in tree_flatten(model.trainable_parameters())}
    first, second = llama_adapter(model, embedding=False), llama_adapter(model)
    apply(model, Adapter({k: m for k, m in first.items() if ".0." in k}))
    apply(model, Adapter({k: m for k, m in second.items() if ".0." not in k}))  # other layers
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert len(trainable) == 2 * 15 and all(k.endswith((".lora_A", ".lora_B")) for k in trainable)
    remove(model)
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == before
    assert "model.norm.weight" not in before


# -- peers: mlx-lm's LoRALinear, DoRALinear, LoRAEmbedding ---------------------------------------

def _peer_linear(quantized: bool, bias: bool):
    net = linear_net(32, 64, bias=bias)
    if quantized:
        net.proj = nn.QuantizedLinear.from_linear(net.proj, 32, 8)
    return net


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_peer_mlx_lm_lora_linear(quantized, bias):
    from mlx_lm.tuner.lora import LoRALinear

    mlx_lm()
    net = _peer_linear(quantized, bias)
    module = lora(32, 64, rank=4, alpha=16.0)  # scale 4
    theirs = LoRALinear.from_base(net.proj, r=4, scale=module.scale)
    theirs.lora_a, theirs.lora_b = to_mlx(module.A.T), to_mlx(module.B.T)  # mlx-lm's (in, r), (r, out)
    x = mx.array(RNG.standard_normal((2, 5, 64)).astype(np.float32))
    expected_out = theirs(x)
    expected_weight = theirs.fuse(dequantize=True).weight

    apply(net, Adapter({"proj": module}))
    assert_close(f64(net(x)), f64(expected_out), "float32", what="forward vs LoRALinear")
    remove(net)
    merge(net, Adapter({"proj": module}))
    assert_close(f64(net.proj.weight), f64(expected_weight), "float32", what="merge vs fuse()")


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_peer_mlx_lm_dora_linear(quantized):
    from mlx_lm.tuner.dora import DoRALinear

    mlx_lm()
    net = _peer_linear(quantized, bias=True)
    module = lora(32, 64, rank=4, alpha=16.0, dora=True)
    theirs = DoRALinear.from_base(net.proj, r=4, scale=module.scale)
    theirs.lora_a, theirs.lora_b = to_mlx(module.A.T), to_mlx(module.B.T)
    theirs.m = to_mlx(module.magnitude)
    x = mx.array(RNG.standard_normal((2, 5, 64)).astype(np.float32))
    expected_out, expected_weight = theirs(x), theirs.fuse(dequantize=True).weight

    apply(net, Adapter({"proj": module}))
    assert_close(f64(net(x)), f64(expected_out), "float32", what="forward vs DoRALinear")
    remove(net)
    merge(net, Adapter({"proj": module}))
    assert_close(f64(net.proj.weight), f64(expected_weight), "float32", what="merge vs fuse()")


def test_peer_mlx_lm_lora_embedding():
    from mlx_lm.tuner.lora import LoRAEmbedding

    mlx_lm()
    layer = nn.Embedding(40, 16)
    net = Net(layer)
    module = lora(40, 16, rank=4, alpha=8.0, kind="embedding")
    theirs = LoRAEmbedding.from_base(layer, r=4, scale=module.scale)
    theirs.lora_a, theirs.lora_b = to_mlx(module.A.T), to_mlx(module.B.T)  # (num, r), (r, dim)
    ids, x = mx.array([[0, 7, 39]]), mx.array(RNG.standard_normal((3, 16)).astype(np.float32))
    expected = theirs(ids), theirs.as_linear(x), theirs.fuse().weight

    apply(net, Adapter({"proj": module}))
    assert_close(f64(net(ids)), f64(expected[0]), "float32", what="lookup vs LoRAEmbedding")
    assert_close(f64(net.proj.as_linear(x)), f64(expected[1]), "float32", what="as_linear")
    remove(net)
    merge(net, Adapter({"proj": module}))
    assert_close(f64(net.proj.weight), f64(expected[2]), "float32", what="merge vs fuse()")


# -- bad input ----------------------------------------------------------------------------------

def test_unmatched_modules_are_listed():
    net = linear_net()
    adapter = Adapter({"proj": lora(10, 12), "nope.q_proj": lora(10, 12),
                       "also.missing": lora(10, 12)})
    listed = r"2 adapter module\(s\) match no layer of the model: 'nope.q_proj', 'also.missing'"
    with pytest.raises(LoraError, match=listed):
        apply(net, adapter)
    assert type(net.proj) is nn.Linear  # nothing changed


def test_shape_mismatch_names_module_expected_and_found():
    with pytest.raises(LoraError, match=r"'proj'.*\[10, 16\].*weight is \[10, 12\]"):
        apply(linear_net(), Adapter({"proj": lora(10, 16)}))
    with pytest.raises(LoraError, match=r"'proj'.*\[12, 10\].*weight is \[10, 12\]"):
        merge(linear_net(), Adapter({"proj": lora(12, 10)}))  # transposed: caught, not guessed


def test_kind_must_fit_the_layer():
    with pytest.raises(LoraError, match="'proj' is a embedding LoRA.*nn.Embedding.*Linear"):
        apply(linear_net(), Adapter({"proj": lora(12, 10, kind="embedding")}))
    conv = examples.random_adapter({"proj": (10, 12, 3, 3)}, kind="conv", rank=2)
    with pytest.raises(LoraError, match="'proj' is a conv LoRA.*linear and embedding"):
        apply(linear_net(), conv)


def test_dtype_option_converts_the_factors():
    net = apply(linear_net(), Adapter({"proj": lora(10, 12)}), dtype=mx.bfloat16)
    assert net.proj.lora_A.dtype == mx.bfloat16 and net(mx.ones((1, 12))).dtype == mx.float32
    with pytest.raises(LoraError, match="dtype must be an mlx.core.Dtype"):
        apply(linear_net(), Adapter({"proj": lora(10, 12)}), dtype=np.float16)


def test_applying_twice_and_merging_an_applied_model_are_refused():
    net = apply(linear_net(), Adapter({"proj": lora(10, 12)}))
    with pytest.raises(LoraError, match="already has a LoRA applied.*remove"):
        apply(net, Adapter({"proj": lora(10, 12)}))
    with pytest.raises(LoraError, match="already has a LoRA applied"):
        merge(net, Adapter({"proj": lora(10, 12)}))
    with pytest.raises(LoraError, match="already has a LoRA applied"):
        apply(net, Adapter({"proj.base": lora(10, 12)}))


def test_unmerge_needs_a_matching_merge():
    net = linear_net()
    first, second = Adapter({"proj": lora(10, 12)}), Adapter({"proj": lora(10, 12)})
    with pytest.raises(LoraError, match="no LoRA merged"):
        unmerge(net, first)
    merge(net, first)
    merge(net, second)
    with pytest.raises(LoraError, match="reverse order"):
        unmerge(net, first)
    unmerge(net, second)
    unmerge(net, first)


class TwoNames(nn.Module):
    """One layer held as ``a`` and as ``b``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.a = layer
        self.b = layer

    def __call__(self, x):
        return self.a(x) + self.b(x)


def test_a_layer_under_two_names_is_one_module_and_merges_only_when_allowed():
    """An adapter naming both names of one float layer is refused by every verb, as by the NumPy
    and JAX backends (merging both, then unmerging, was refused halfway before), and nothing
    changes. Naming `a` alone, merge is refused (it would change `b`, which apply() leaves
    alone) unless allow_shared=True; merges through `a` and `b` then come back in the reverse
    order, each with its own scale, restoring the weight to within a rounding."""
    net = TwoNames(linear_net(bias=False).proj)
    shared = net.a
    W = f64(shared.weight)
    first, second = lora(10, 12, rank=2, alpha=2.0), lora(10, 12, rank=4, alpha=32.0)
    both = Adapter({"a": first, "b": second})
    for verb in (apply, merge, lambda m, a: merge(m, a, allow_shared=True), unmerge):
        with pytest.raises(LoraError, match="modules 'a' and 'b' both map to one Linear") as info:
            verb(net, both)
        assert info.value.key == "b"
        assert net.a is shared and net.b is shared and np.array_equal(f64(shared.weight), W)
    with pytest.raises(LoraError, match=r"module 'a' holds its weight together with 'b' \(tied or shared "
                                        r"weights\).*allow_shared=True"):
        merge(net, Adapter({"a": first}))
    assert np.array_equal(f64(shared.weight), W)
    merge(net, Adapter({"a": first}), allow_shared=True)
    merge(net, Adapter({"b": second}), allow_shared=True)
    assert_close(f64(net.b.weight), reference_weight(reference_weight(W, first), second), "float32")
    with pytest.raises(LoraError, match="reverse order"):
        unmerge(net, Adapter({"a": first}))
    unmerge(net, Adapter({"b": second}))  # b's own scale (8), not a's (1)
    assert_close(f64(shared.weight), reference_weight(W, first), "float32", what="b unmerged")
    unmerge(net, Adapter({"a": first}))
    assert_close(f64(shared.weight), W, "float32", what="both unmerged")


def test_a_quantized_layer_under_two_names_merges_in_its_slot_as_apply():
    """A quantized layer merges into a new float layer in the named slot only, as apply()
    wraps that slot only: not refused, and merged equals applied."""
    quantized, _ = quantized_net()
    net = TwoNames(quantized.proj)
    adapter = Adapter({"a": lora(16, 64)})
    x = mx.array(RNG.standard_normal((3, 64)).astype(np.float32))
    applied = f64(apply(net, adapter)(x))
    remove(net)
    merge(net, adapter)
    assert type(net.a) is nn.Linear and net.b is quantized.proj
    assert_close(f64(net(x)), applied, "float32", what="merged vs applied")
    unmerge(net, adapter)
    assert net.a is quantized.proj


def test_verbs_on_a_model_without_lora_and_bad_arguments():
    for verb in (remove, extract, lambda m: set_strength(m, 1.0)):
        with pytest.raises(LoraError, match="no LoRA applied"):
            verb(linear_net())
    with pytest.raises(LoraError, match="strength"):
        apply(linear_net(), Adapter({"proj": lora(10, 12)}), strength=float("nan"))
    with pytest.raises(LoraError, match="mlx.nn.Module"):
        apply(object(), Adapter({"proj": lora(10, 12)}))
    with pytest.raises(LoraError, match="Adapter"):
        apply(linear_net(), {"proj": lora(10, 12)})
    with pytest.warns(UserWarning, match="none of the merged layers was quantized"):
        merge(linear_net(), Adapter({"proj": lora(10, 12)}), requantize=True)


def test_missing_mlx_names_the_extra():
    code = ("import sys; sys.modules['mlx'] = None\n"
            "try:\n    import portable_lora.mlx\nexcept ImportError as e:\n    print(e)")
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert "pip install 'portable-lora[mlx]'" in out.stdout
