"""portable_lora.jax: parameter pytrees and Flax NNX modules, against a float64 NumPy
reference and the real peers (Flax ``nnx.LoRALinear``, Keras 3 ``Dense.enable_lora``)."""

from __future__ import annotations

import os
import subprocess
import sys

if "keras" not in sys.modules:  # Keras picks its backend once, at import
    os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close
from flax import nnx

import portable_lora as pl
from portable_lora import jax as plj
from portable_lora.adapter import Adapter
from portable_lora.errors import LoraError
from reference import random_module, ref_dora, ref_module_delta as ref_delta

RNG = np.random.default_rng(7)
DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def module(kind, shape, rank=3, alpha=6.0, rule="alpha/rank", dora=False, dtype=np.float64):
    return random_module(RNG, kind, shape, rank, alpha, rule, dora, dtype)


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


# -- parameter pytrees -----------------------------------------------------------------------

def tree_and_adapter(dtype):
    """A Flax-linen-style tree: Dense kernels (in, out), an embedding, a conv (kh, kw, in, out)."""
    dt = DTYPES[dtype]
    params = {"params": {
        "embed": {"embedding": jnp.asarray(rand(11, 6), dt)},
        "layers": [{"attn": {"q": {"kernel": jnp.asarray(rand(6, 5), dt), "bias": jnp.asarray(rand(5), dt)}}},
                   {"attn": {"q": {"kernel": jnp.asarray(rand(6, 5), dt), "bias": jnp.asarray(rand(5), dt)}}}],
        "conv": {"kernel": jnp.asarray(rand(3, 3, 2, 4), dt)},
    }}
    adapter = Adapter({
        "params.embed": module("embedding", (11, 6)),
        "params.layers.1.attn.q": module("linear", (5, 6), rule="alpha/sqrt(rank)"),
        "params.conv": module("conv", (4, 2, 3, 3), rank=2),
    })
    return params, adapter


def expected_merged(params, adapter, strength=1.0):
    p = params["params"]
    emb = f64(p["embed"]["embedding"]) + ref_delta(adapter["params.embed"], strength)
    q = f64(p["layers"][1]["attn"]["q"]["kernel"]) + ref_delta(adapter["params.layers.1.attn.q"], strength).T
    conv = f64(p["conv"]["kernel"]) + ref_delta(adapter["params.conv"], strength).transpose(2, 3, 1, 0)
    return emb, q, conv


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_merge_params_matches_reference_and_is_pure(dtype):
    params, adapter = tree_and_adapter(dtype)
    before = jax.tree_util.tree_map(np.asarray, params)
    merged = plj.merge_params(params, adapter, strength=0.5)
    emb, q, conv = expected_merged(params, adapter, 0.5)
    m = merged["params"]
    assert_close(f64(m["embed"]["embedding"]), emb, dtype, what="embedding")
    assert_close(f64(m["layers"][1]["attn"]["q"]["kernel"]), q, dtype, what="linear kernel")
    assert_close(f64(m["conv"]["kernel"]), conv, dtype, what="conv kernel")
    assert m["layers"][1]["attn"]["q"]["kernel"].dtype == DTYPES[dtype]
    # untouched leaves are the same objects; the input tree is unchanged
    assert m["layers"][0]["attn"]["q"]["kernel"] is params["params"]["layers"][0]["attn"]["q"]["kernel"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params), before)
    restored = plj.unmerge_params(merged, adapter, strength=0.5)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        assert_close(f64(got), f64(want), dtype, what="unmerge")


def test_merge_params_bf16_rounds_once():
    params, adapter = tree_and_adapter("bfloat16")
    merged = plj.merge_params(params, adapter)
    kernel = params["params"]["layers"][1]["attn"]["q"]["kernel"]
    m = adapter["params.layers.1.attn.q"]
    once = (np.asarray(kernel).astype(np.float32)
            + pl.core.delta_weight(m.A, m.B, m.scale, dtype=np.float32).T).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged["params"]["layers"][1]["attn"]["q"]["kernel"]), once)


def test_merge_params_dora_and_unmerge_with_norms():
    W = rand(6, 5)  # Flax (in, out)
    params = {"dense": {"kernel": jnp.asarray(W)}}
    adapter = Adapter({"dense": module("linear", (5, 6), dora=True)})
    norms = plj.dora_weight_norms(params, adapter)
    merged = plj.merge_params(params, adapter)
    assert_close(f64(merged["dense"]["kernel"]), ref_dora(W.T, adapter["dense"]).T, "float64")
    with pytest.raises(LoraError, match="dense.*weight norm"):
        plj.unmerge_params(merged, adapter)
    restored = plj.unmerge_params(merged, adapter, weight_norms=norms)
    assert_close(f64(restored["dense"]["kernel"]), W, "float64")


def test_merge_params_under_jit_equals_eager():
    params, adapter = tree_and_adapter("float32")
    eager = plj.merge_params(params, adapter)
    jitted = jax.jit(lambda p: plj.merge_params(p, adapter))(params)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_grad_through_merge_params_matches_formula():
    # L = Σ G ⊙ merged_kernel, merged = K + s·(B A)ᵀ  ⇒  ∂L/∂A = s·Bᵀ Gᵀ, ∂L/∂B = s·Gᵀ Aᵀ
    params = {"dense": {"kernel": jnp.asarray(rand(6, 5))}}
    adapter = Adapter({"dense": module("linear", (5, 6))})
    G = rand(6, 5)
    lora = plj.lora_params(adapter)

    def loss(lora):
        return jnp.sum(plj.merge_params(params, adapter, lora=lora)["dense"]["kernel"] * G)

    grads = jax.jit(jax.grad(loss))(lora)
    m = adapter["dense"]
    np.testing.assert_allclose(np.asarray(grads["dense"]["A"]), m.scale * m.B.T @ G.T, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grads["dense"]["B"]), m.scale * G.T @ m.A.T, rtol=1e-10)
    assert np.abs(np.asarray(grads["dense"]["A"])).max() > 0


def test_lora_dense_grad_matches_formula_and_finite_difference():
    x, kernel, bias, G = rand(4, 6), rand(6, 5), rand(5), rand(4, 5)
    A, B, s = rand(3, 6), rand(5, 3), 0.7

    def loss(A, B):
        return jnp.sum(plj.lora_dense(jnp.asarray(x), jnp.asarray(kernel), A, B, s, jnp.asarray(bias)) * G)

    out = plj.lora_dense(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(A), jnp.asarray(B), s, jnp.asarray(bias))
    assert_close(np.asarray(out), x @ kernel + bias + s * (x @ A.T) @ B.T, "float64")
    gA, gB = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(A), jnp.asarray(B))
    # y = xK + b + s·(x Aᵀ) Bᵀ  ⇒  ∂L/∂B = s·Gᵀ (x Aᵀ), ∂L/∂A = s·(G B)ᵀ x
    np.testing.assert_allclose(np.asarray(gB), s * G.T @ (x @ A.T), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(gA), s * (G @ B).T @ x, rtol=1e-10)
    eps, dA = 1e-6, np.zeros_like(A)
    dA[1, 2] = eps
    fd = (loss(jnp.asarray(A + dA), jnp.asarray(B)) - loss(jnp.asarray(A - dA), jnp.asarray(B))) / (2 * eps)
    assert float(fd) == pytest.approx(float(gA[1, 2]), rel=1e-6)


def test_dora_dense_and_lora_embed_match_reference():
    x, kernel, bias = rand(4, 6), rand(6, 5), rand(5)
    m = module("linear", (5, 6), dora=True)
    got = plj.dora_dense(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(m.A), jnp.asarray(m.B), m.scale,
                         jnp.asarray(m.magnitude), jnp.asarray(bias))
    assert_close(np.asarray(got), x @ ref_dora(kernel.T, m).T + bias, "float64")
    table, e = rand(11, 6), module("embedding", (11, 6))
    ids = np.array([[0, 4, 10], [4, 4, 1]])
    got = plj.lora_embed(jnp.asarray(ids), jnp.asarray(table), jnp.asarray(e.A), jnp.asarray(e.B), e.scale)
    assert_close(np.asarray(got), (table + ref_delta(e))[ids], "float64")


def test_mappings_dict_function_leaf_path_and_nnx_state():
    kernel = rand(6, 5)
    m = module("linear", (5, 6))
    want = kernel + ref_delta(m).T
    tree = {"model": {"blocks": {"0": {"q_proj": {"kernel": jnp.asarray(kernel)}}}}}
    hf = Adapter({"model.layers.0.self_attn.q_proj": m})
    by_dict = plj.merge_params(tree, hf, mapping={"model.layers.0.self_attn.q_proj": ("model", "blocks", "0", "q_proj")})
    by_fn = plj.merge_params(tree, hf, mapping=lambda n: n.replace("layers", "blocks").replace("self_attn.", ""))
    to_leaf = plj.merge_params(tree, hf, mapping=lambda n: "model.blocks.0.q_proj.kernel")
    for out in (by_dict, by_fn, to_leaf):
        assert_close(f64(out["model"]["blocks"]["0"]["q_proj"]["kernel"]), want, "float64")
    # an nnx.State: leaves sit inside Variables, integer keys for list items
    model = Stack(np.float32)
    state = nnx.state(model)
    adapter = Adapter({"layers.1.q": module("linear", (8, 8), dtype=np.float32)})
    merged = plj.merge_params(state, adapter)
    expect = f64(model.layers[1].q.kernel[...]) + ref_delta(adapter["layers.1.q"]).T
    nnx.update(model, merged)
    assert_close(f64(model.layers[1].q.kernel[...]), expect, "float32")


def test_pytree_errors_name_modules_and_shapes():
    params = {"a": {"kernel": jnp.zeros((6, 5))}}
    two_missing = Adapter({"a": module("linear", (5, 6)), "b": module("linear", (5, 6)),
                           "c.d": module("linear", (5, 6))})
    with pytest.raises(LoraError, match="2 adapter module.*b .*c\\.d"):
        plj.merge_params(params, two_missing)
    with pytest.raises(LoraError, match=r"'a'.*shape \[6, 4\].*found \[6, 5\]"):
        plj.merge_params(params, Adapter({"a": module("linear", (4, 6))}))
    with pytest.raises(LoraError, match="'a'.*no factors"):
        plj.merge_params(params, Adapter({"a": module("linear", (5, 6))}), lora={})
    with pytest.raises(LoraError, match="strength"):
        plj.merge_params(params, Adapter({"a": module("linear", (5, 6))}), strength=float("nan"))


# -- Flax NNX modules --------------------------------------------------------------------------

class Block(nnx.Module):
    def __init__(self, dtype, rngs):
        self.q = nnx.Linear(8, 8, param_dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(8, 6, use_bias=False, param_dtype=dtype, rngs=rngs)


class Stack(nnx.Module):
    """Embedding → two blocks → tied output (``attend``)."""

    def __init__(self, dtype=np.float32, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(12, 8, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(dtype, rngs), Block(dtype, rngs)])
        self.head = nnx.Linear(6, 8, param_dtype=dtype, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer.q(x)
        x = self.head(self.layers[1].v(x))
        return self.embed.attend(x)


def stack_adapter(dtype=np.float32, dora=False):
    return Adapter({
        "embed": module("embedding", (12, 8), dtype=dtype),
        "layers.0.q": module("linear", (8, 8), dtype=dtype, dora=dora),
        "layers.1.v": module("linear", (6, 8), rule="raw", alpha=0.5, dtype=dtype),
        "head": module("linear", (8, 6), rank=2, dtype=dtype, dora=dora),
    })


def reference_forward(model: Stack, adapter: Adapter, ids, strength=1.0):
    """The forward of ``model`` with ``adapter`` merged, in float64 NumPy."""
    def weight(name, W):
        m = adapter[name] if name in adapter else None
        if m is None:
            return W
        if m.magnitude is not None:
            return ref_dora(W, m, strength)
        return W + ref_delta(m, strength)

    def dense(name, lin, x):
        W = weight(name, f64(lin.kernel[...]).T)
        return x @ W.T + (0 if lin.bias is None else f64(lin.bias[...]))

    table = weight("embed", f64(model.embed.embedding[...]))
    x = table[ids]
    x = dense("layers.0.q", model.layers[0].q, x)
    x = dense("layers.1.q", model.layers[1].q, x)
    x = dense("head", model.head, dense("layers.1.v", model.layers[1].v, x))
    return x @ table.T


IDS = np.array([[1, 5, 11], [0, 5, 2]])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_apply_forward_merge_unmerge_remove(dora):
    model = Stack()
    adapter = stack_adapter(dora=dora)
    base_out = np.asarray(model(IDS))
    assert plj.apply(model, adapter) is model
    assert isinstance(model.layers[0].q, plj.LoraLinear) and isinstance(model.embed, plj.LoraEmbed)
    assert isinstance(model.layers[0].v, nnx.Linear)  # not in the adapter: untouched
    out = np.asarray(model(IDS))
    assert_close(out, reference_forward(model_base(model), adapter, IDS), "float32", what="applied")
    plj.merge(model)
    assert_close(np.asarray(model(IDS)), out, "float32", what="merged")
    plj.unmerge(model)
    assert_close(np.asarray(model(IDS)), out, "float32", what="unmerged")
    plj.remove(model)
    assert type(model.layers[0].q) is nnx.Linear and type(model.embed) is nnx.Embed
    assert_close(np.asarray(model(IDS)), base_out, "float32", what="removed")


def model_base(model: Stack) -> Stack:
    """A view of ``model`` with each wrapper's base module (for the reference forward)."""
    class View:
        pass

    def base(m):
        return m.base if isinstance(m, (plj.LoraLinear, plj.LoraEmbed)) else m

    view = View()
    view.embed = base(model.embed)
    view.head = base(model.head)
    view.layers = []
    for layer in model.layers:
        item = View()
        item.q, item.v = base(layer.q), base(layer.v)
        view.layers.append(item)
    return view


def test_strength_extract_and_merge_then_remove_bakes_in():
    model = Stack()
    adapter = stack_adapter()
    plj.apply(model, adapter, strength=0.25)
    assert_close(np.asarray(model(IDS)), reference_forward(model_base(model), adapter, IDS, 0.25), "float32")
    plj.set_strength(model, 1.5)
    assert_close(np.asarray(model(IDS)), reference_forward(model_base(model), adapter, IDS, 1.5), "float32")
    extracted = plj.extract(model)
    assert sorted(extracted) == sorted(adapter)
    for name, m in adapter.items():
        got = extracted[name]
        assert (got.alpha, got.rule, got.kind) == (m.alpha, m.rule, m.kind)
        np.testing.assert_array_equal(got.A, m.A)
        np.testing.assert_array_equal(got.B, m.B)
    plj.set_strength(model, 1.0)
    expect = reference_forward(model_base(model), adapter, IDS)
    plj.merge(model)
    with pytest.raises(LoraError, match="merged.*unmerge first"):
        plj.set_strength(model, 2.0)
    plj.remove(model)
    assert type(model.head) is nnx.Linear
    assert_close(np.asarray(model(IDS)), expect, "float32", what="merged then removed")


def test_nnx_jit_and_grad_reach_the_factors():
    model = Stack()
    adapter = stack_adapter()
    plj.apply(model, adapter)
    G = rand(2, 3, 12)

    def loss(model, ids):
        return jnp.sum(model(ids) * G)

    eager = loss(model, IDS)
    assert float(nnx.jit(loss)(model, IDS)) == pytest.approx(float(eager), rel=1e-5)
    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model, IDS)
    assert float(value) == pytest.approx(float(eager), rel=1e-5)
    flat = dict(nnx.to_flat_state(grads))
    assert {p[-1] for p in flat} == {"A", "B"}  # only the factors
    assert len(flat) == 2 * len(adapter)
    for path, grad in flat.items():
        assert float(jnp.abs(grad[...]).max()) > 0, path
    # the gradient of the head's A against a central finite difference of the eager loss
    head = model.head
    g = np.asarray(grads["head"]["A"][...])
    A0 = np.asarray(head.A[...])
    eps, (i, j) = 1e-2, (1, 3)
    bump = np.zeros_like(A0)
    bump[i, j] = eps
    head.A[...] = jnp.asarray(A0 + bump)
    up = float(loss(model, IDS))
    head.A[...] = jnp.asarray(A0 - bump)
    down = float(loss(model, IDS))
    head.A[...] = jnp.asarray(A0)
    assert (up - down) / (2 * eps) == pytest.approx(float(g[i, j]), rel=2e-2)
    # one SGD step changes exactly the factors, and extract() returns the trained ones
    kernel_before = np.asarray(model.layers[0].q.base.kernel[...])
    nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g,
                                             nnx.state(model, nnx.LoRAParam), grads))
    np.testing.assert_array_equal(np.asarray(model.layers[0].q.base.kernel[...]), kernel_before)
    trained = plj.extract(model)
    assert not np.array_equal(trained["head"].A, adapter["head"].A)


def test_merge_adapter_into_plain_modules_including_conv():
    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(3)
            self.conv = nnx.Conv(2, 4, kernel_size=(3, 3), param_dtype=np.float32, rngs=rngs)
            self.dense = nnx.Linear(5, 4, param_dtype=np.float32, rngs=rngs)

    net = Net()
    conv0, dense0 = np.asarray(net.conv.kernel[...]), np.asarray(net.dense.kernel[...])
    adapter = Adapter({"conv": module("conv", (4, 2, 3, 3), dtype=np.float32),
                       "dense": module("linear", (4, 5), dtype=np.float32, dora=True)})
    with pytest.raises(LoraError, match="'conv'.*conv LoRA cannot be applied"):
        plj.apply(net, adapter)
    assert type(net.dense) is nnx.Linear  # nothing changed: all checks run first
    with pytest.raises(LoraError, match="'conv' has no LoRA merged"):
        plj.unmerge(net, adapter)
    plj.merge(net, adapter, strength=0.5)
    assert_close(f64(net.conv.kernel[...]), conv0 + ref_delta(adapter["conv"], 0.5).transpose(2, 3, 1, 0),
                 "float32")
    assert_close(f64(net.dense.kernel[...]), ref_dora(dense0.T.astype(np.float64), adapter["dense"], 0.5).T,
                 "float32")
    other = Adapter({"conv": module("conv", (4, 2, 3, 3), rank=5, dtype=np.float32)})
    with pytest.raises(LoraError, match="'conv'.*last merge was a rank 3 LoRA.*rank 5"):
        plj.unmerge(net, other)
    plj.unmerge(net, adapter)  # the strength and DoRA's norm were recorded by merge
    assert_close(f64(net.conv.kernel[...]), conv0, "float32")
    assert_close(f64(net.dense.kernel[...]), dense0, "float32")
    with pytest.raises(LoraError, match="'conv' has no LoRA merged"):
        plj.unmerge(net, adapter)


class Shared(nnx.Module):
    """`a` and `b` one nnx.Linear; `c` another Linear holding `a`'s kernel (a tied weight)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.a = nnx.Linear(6, 4, param_dtype=np.float32, rngs=rngs)
        self.b = self.a
        self.c = nnx.Linear(6, 4, use_bias=False, param_dtype=np.float32, rngs=rngs)
        self.c.kernel = self.a.kernel


@pytest.fixture(params=["tree_leaves", "graph_walk"])
def sharing_check(request, monkeypatch):
    """Sharing is found by pytree flattening, or by walking the graph where flattening fails."""
    if request.param == "graph_walk":
        from portable_lora.backends import jax as backend

        def unflattenable(*args, **kwargs):
            raise TypeError("not a pytree here")

        monkeypatch.setattr(backend.jax.tree_util, "tree_leaves", unflattenable)
    return request.param


def test_shared_weights_merge_only_when_allowed_and_unmerge_per_weight(sharing_check):
    """As the torch and MLX backends: merging into a weight that another name holds, which
    apply() would leave alone, is refused (naming both, nothing changed) unless allow_shared;
    two adapter modules never map to one weight; a tied weight's merges come back in the
    reverse order, whichever module each went through."""
    model = Shared()
    W = f64(model.a.kernel[...])
    first = module("linear", (4, 6), rank=2, alpha=2.0, dtype=np.float32)
    second = module("linear", (4, 6), rank=4, alpha=32.0, dtype=np.float32)
    with pytest.raises(LoraError, match="modules 'a' and 'b' both map to"):
        plj.merge(model, Adapter({"a": first, "b": second}), allow_shared=True)
    for verb in (lambda m, a: plj.merge(m, a, allow_shared=True), plj.unmerge):
        with pytest.raises(LoraError, match="modules 'a' and 'c' both map to one weight"):
            verb(model, Adapter({"a": first, "c": second}))
    with pytest.raises(LoraError, match=r"module 'a' holds its weight together with 'b' \(tied or shared "
                                        r"weights\).*allow_shared=True") as info:
        plj.merge(model, Adapter({"a": first}))
    assert info.value.key == "a"
    with pytest.raises(LoraError, match="module 'c' holds its weight together with 'a'"):
        plj.merge(model, Adapter({"c": second}))
    assert np.array_equal(f64(model.a.kernel[...]), W)
    plj.merge(model, Adapter({"a": first}), allow_shared=True)
    plj.merge(model, Adapter({"c": second}), allow_shared=True)
    assert_close(f64(model.c.kernel[...]), W + ref_delta(first).T + ref_delta(second).T, "float32")
    with pytest.raises(LoraError, match="'a' shares its weight with 'c', which had a LoRA merged into it after"):
        plj.unmerge(model, Adapter({"a": first}))
    plj.unmerge(model, Adapter({"c": second}))
    plj.unmerge(model, Adapter({"a": first}))
    assert_close(f64(model.a.kernel[...]), W, "float32", what="both unmerged")


def test_merging_applied_modules_checks_shared_weights_too():
    model = Shared()
    W = f64(model.a.kernel[...])
    adapter = Adapter({"a": module("linear", (4, 6), dtype=np.float32)})
    plj.apply(model, adapter)
    assert type(model.b) is nnx.Linear  # apply() changes `a` only
    with pytest.raises(LoraError, match="module 'a' holds its weight together with 'b'"):
        plj.merge(model)
    assert not model.a.merged and np.array_equal(f64(model.b.kernel[...]), W)
    plj.merge(model, allow_shared=True)
    assert_close(f64(model.b.kernel[...]), W + ref_delta(adapter["a"]).T, "float32")
    plj.unmerge(model)
    assert_close(f64(model.b.kernel[...]), W, "float32")


def test_nnx_errors():
    model = Stack()
    with pytest.raises(LoraError, match=r"2 adapter module.*layers\.5\.q.*nope"):
        plj.apply(model, Adapter({"layers.5.q": module("linear", (8, 8)), "nope": module("linear", (8, 8)),
                                  "head": module("linear", (8, 6))}))
    assert type(model.head) is nnx.Linear
    with pytest.raises(LoraError, match=r"'head'.*kernel of shape \[7, 8\], found \[6, 8\]"):
        plj.apply(model, Adapter({"head": module("linear", (8, 7))}))
    with pytest.raises(LoraError, match="'embed'.*needs an nnx.Linear, found Embed"):
        plj.apply(model, Adapter({"embed": module("linear", (8, 12))}))
    with pytest.raises(LoraError, match="no LoRA modules"):
        plj.merge(model)
    plj.apply(model, Adapter({"head": module("linear", (8, 6))}))
    with pytest.raises(LoraError, match="'head' already has a LoRA applied.*remove"):
        plj.apply(model, Adapter({"head": module("linear", (8, 6))}))
    with pytest.raises(LoraError, match="not merged"):
        plj.unmerge(model)
    plj.merge(model)
    with pytest.raises(LoraError, match="already merged"):
        plj.merge(model)
    with pytest.raises(LoraError, match="flax.nnx.Module.*merge_params"):
        plj.apply({"head": {"kernel": jnp.zeros((6, 8))}}, Adapter({"head": module("linear", (8, 6))}))


# -- peers -------------------------------------------------------------------------------------

class OneLinear(nnx.Module):
    def __init__(self, kernel, bias):
        self.proj = nnx.Linear(kernel.shape[0], kernel.shape[1], param_dtype=np.float32, rngs=nnx.Rngs(0))
        self.proj.kernel[...] = jnp.asarray(kernel, jnp.float32)
        self.proj.bias[...] = jnp.asarray(bias, jnp.float32)


@pytest.mark.peer
@pytest.mark.parametrize("alpha,rule", [(1.0, "raw"), (12.0, "alpha/rank")], ids=["scale1", "scale3-folded"])
def test_flax_nnx_lora_linear_peer(alpha, rule):
    kernel, bias, x = rand(6, 5).astype(np.float32), rand(5).astype(np.float32), rand(3, 6).astype(np.float32)
    m = module("linear", (5, 6), rank=4, alpha=alpha, rule=rule, dtype=np.float32)
    peer = nnx.LoRALinear(6, 5, lora_rank=4, param_dtype=np.float32, rngs=nnx.Rngs(1))
    peer.kernel[...] = jnp.asarray(kernel)
    peer.bias[...] = jnp.asarray(bias)
    # Flax stores lora_a (in, r) = Aᵀ and lora_b (r, out) = Bᵀ with no scale: fold s into B
    peer.lora.lora_a[...] = jnp.asarray(m.A.T)
    peer.lora.lora_b[...] = jnp.asarray((m.scale * m.B.astype(np.float64)).T.astype(np.float32))
    ours = plj.apply(OneLinear(kernel, bias), Adapter({"proj": m}))
    np.testing.assert_allclose(np.asarray(ours.proj(jnp.asarray(x))), np.asarray(peer(jnp.asarray(x))),
                               rtol=1e-5, atol=1e-5)
    merged = plj.merge_params({"proj": {"kernel": jnp.asarray(kernel)}}, Adapter({"proj": m}))
    peer_merged = peer.kernel[...] + peer.lora.lora_a[...] @ peer.lora.lora_b[...]
    np.testing.assert_allclose(np.asarray(merged["proj"]["kernel"]), np.asarray(peer_merged),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.peer
def test_keras_dense_enable_lora_peer():
    import keras

    rank, alpha = 4, 8.0
    kernel, bias, x = rand(6, 5).astype(np.float32), rand(5).astype(np.float32), rand(3, 6).astype(np.float32)
    m = module("linear", (5, 6), rank=rank, alpha=alpha, dtype=np.float32)
    layer = keras.layers.Dense(5, dtype="float32")
    layer.build((None, 6))
    layer.enable_lora(rank, lora_alpha=alpha)
    layer._kernel.assign(kernel)  # the base kernel; `layer.kernel` is the merged one
    layer.bias.assign(bias)
    layer.lora_kernel_a.assign(m.A.T)  # Keras: lora_kernel_a (in, r) = Aᵀ, lora_kernel_b (r, out) = Bᵀ
    layer.lora_kernel_b.assign(m.B.T)
    peer_out = keras.ops.convert_to_numpy(layer(x))
    ours = plj.apply(OneLinear(kernel, bias), Adapter({"proj": m}))
    np.testing.assert_allclose(np.asarray(ours.proj(jnp.asarray(x))), peer_out, rtol=1e-5, atol=1e-5)
    reference = pl.core.linear_forward(x, kernel.T, m.A, m.B, m.scale, bias)
    np.testing.assert_allclose(reference, peer_out, rtol=1e-5, atol=1e-5)
    merged = plj.merge_params({"proj": {"kernel": jnp.asarray(kernel)}}, Adapter({"proj": m}))
    np.testing.assert_allclose(np.asarray(merged["proj"]["kernel"]), keras.ops.convert_to_numpy(layer.kernel),
                               rtol=1e-5, atol=1e-5)


# -- import hygiene ------------------------------------------------------------------------

def run_python(code: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)


def test_import_imports_only_jax_and_flax():
    done = run_python("import sys, portable_lora.jax; "
                      "print(sorted(m for m in ('torch', 'mlx', 'tensorflow', 'keras') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_without_jax_names_the_extra():
    done = run_python("import sys; sys.modules['jax'] = None\n"
                      "try:\n    import portable_lora.jax\nexcept ImportError as e:\n    print(e)")
    assert done.returncode == 0, done.stderr
    assert "pip install 'portable-lora[jax]'" in done.stdout
