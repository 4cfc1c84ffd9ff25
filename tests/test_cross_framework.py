"""One adapter, one tiny model, four frameworks: the framework adapters agree with each other.

The same weights are loaded into a PyTorch, an MLX and a Flax NNX model (embedding → linear →
tanh → linear), the same adapter (mixed ranks and per-module scales; LoRA or DoRA on the
linears, LoRA on the embedding) is applied unmerged with each framework's ``apply`` and merged
with each framework's ``merge``, and every output is compared with a float64 NumPy reference
(the NumPy backend's merge).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import portable_lora as pl
import portable_lora.numpy as pln

V, D, H = 32, 16, 24
NAMES = {b.name for b in BACKENDS}
FRAMEWORKS = [f for f in ("torch", "mlx", "jax") if f in NAMES]


def _weights(seed=3):
    rng = np.random.default_rng(seed)
    return {"embed.weight": rng.standard_normal((V, D)),
            "up.weight": rng.standard_normal((H, D)) / 4, "up.bias": rng.standard_normal(H) / 4,
            "down.weight": rng.standard_normal((D, H)) / 5, "down.bias": rng.standard_normal(D) / 5}


def _adapter(dora: bool, dtype) -> pl.Adapter:
    lin = pl.examples.random_adapter({"up": (H, D), "down": (D, H)}, rank={"up": 3, "down": 6},
                                     alpha={"up": 12.0, "down": 2.0}, dtype=dtype, dora=dora, seed=5)
    emb = pl.examples.random_adapter({"embed": (V, D)}, rank=4, alpha=2.0, kind="embedding",
                                     dtype=dtype, seed=6)
    return pl.Adapter({**emb.modules, **lin.modules})


def _reference(weights, adapter, ids):
    w64 = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    a64 = pl.Adapter({n: pl.LoraModule(m.A.astype(np.float64), m.B.astype(np.float64), m.alpha, m.rule,
                                       m.kind, None if m.magnitude is None else m.magnitude.astype(np.float64))
                      for n, m in adapter.items()})
    merged = pln.merge(w64, a64)
    h = np.tanh(merged["embed.weight"][ids] @ merged["up.weight"].T + merged["up.bias"])
    return h @ merged["down.weight"].T + merged["down.bias"]


def _torch_model(weights, dtype):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.up, self.down = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, ids):
            return self.down(torch.tanh(self.up(self.embed(ids))))

    net = Net()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    net = net.to(getattr(torch, dtype))
    return net, lambda ids: net(torch.from_numpy(ids)).detach().to(torch.float64).numpy()


def _mlx_model(weights, dtype):
    import mlx.core as mx
    import mlx.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.up, self.down = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, D)

        def __call__(self, ids):
            return self.down(mx.tanh(self.up(self.embed(ids))))

    net = Net()
    net.load_weights([(k, mx.array(np.asarray(v, np.float32))) for k, v in weights.items()])
    net.set_dtype(getattr(mx, dtype))
    return net, lambda ids: np.asarray(net(mx.array(ids)).astype(mx.float32)).astype(np.float64)


def _jax_model(weights, dtype):
    import jax.numpy as jnp
    from flax import nnx

    dt = getattr(jnp, dtype)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs, param_dtype=dt, dtype=dt)
            self.up = nnx.Linear(D, H, rngs=rngs, param_dtype=dt, dtype=dt)
            self.down = nnx.Linear(H, D, rngs=rngs, param_dtype=dt, dtype=dt)

        def __call__(self, ids):
            return self.down(jnp.tanh(self.up(self.embed(ids))))

    net = Net(nnx.Rngs(0))
    net.embed.embedding[...] = jnp.asarray(weights["embed.weight"], dtype=dt)
    for name in ("up", "down"):
        layer = getattr(net, name)
        layer.kernel[...] = jnp.asarray(weights[f"{name}.weight"].T, dtype=dt)
        layer.bias[...] = jnp.asarray(weights[f"{name}.bias"], dtype=dt)
    return net, lambda ids: np.asarray(net(jnp.asarray(ids)).astype(jnp.float32)).astype(np.float64)


BUILD = {"torch": _torch_model, "mlx": _mlx_model, "jax": _jax_model}


def _verbs(framework):
    import importlib

    return importlib.import_module(f"portable_lora.{framework}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_apply_and_merge_agree_across_frameworks(framework, dora, dtype):
    import ml_dtypes

    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    weights = {k: np.asarray(v).astype(np_dtype).astype(np.float64) for k, v in _weights().items()}
    adapter = _adapter(dora, np_dtype)
    ids = np.array([[0, 5, 31, 7], [2, 2, 9, 30]])
    expect = _reference(weights, adapter, ids)
    verbs = _verbs(framework)

    model, run = BUILD[framework](weights, dtype)
    base_out = run(ids)
    verbs.apply(model, adapter)
    assert_close(run(ids), expect, dtype, what=f"{framework} apply")
    assert np.max(np.abs(run(ids) - base_out)) > 1e-2  # the adapter changes the output

    model, run = BUILD[framework](weights, dtype)
    verbs.merge(model, adapter)
    assert_close(run(ids), expect, dtype, what=f"{framework} merge")
    verbs.unmerge(model, adapter)
    assert_close(run(ids), base_out, dtype, what=f"{framework} unmerge")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_stacked_adapters_unmerge_in_reverse_order_in_every_framework(framework, dora):
    """merge(A), merge(B): unmerge(A) is refused with the same error in every framework, even
    where A and B have the same ranks and kinds (the check that used to pass there would have
    undone A with B's records), and leaves the model as it was; B then A gives the base back.
    An adapter loaded again (a copy) unmerges its own merge."""
    weights = _weights()
    first = _adapter(dora, np.float32)
    second = pl.Adapter({n: pl.LoraModule(m.A[::-1].copy(), m.B * 0.5, m.alpha * 2, m.rule, m.kind, m.magnitude)
                         for n, m in first.items()})
    ids = np.array([[0, 5, 31, 7]])
    verbs = _verbs(framework)
    model, run = BUILD[framework](weights, "float32")
    base_out = run(ids)
    verbs.merge(model, first)
    verbs.merge(model, second)
    stacked = run(ids)
    with pytest.raises(pl.LoraError, match="is not this adapter's; unmerge adapters in the reverse order"):
        verbs.unmerge(model, first)
    np.testing.assert_array_equal(run(ids), stacked)
    verbs.unmerge(model, second)
    verbs.unmerge(model, pl.Adapter({n: m.copy() for n, m in first.items()}))
    assert_close(run(ids), base_out, "float32", what=f"{framework} unmerged in reverse order")


def test_the_frameworks_under_test_are_the_required_ones():
    from conftest import required_backends

    missing = {"torch", "mlx", "jax"} & required_backends() - set(FRAMEWORKS)
    assert not missing
