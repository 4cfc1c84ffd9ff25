"""JAX / Flax NNX (CPU here): ours (``portable_lora.jax.apply`` on an ``nnx.Linear``) vs Flax's
own ``nnx.LoRALinear``, both called through ``nnx.jit`` (the target's row) and through
``jax.jit`` of the split state (columns ``jax.jit ...``), float32. ``nnx.LoRALinear`` has no
scale, so the peer's ``lora_b`` holds ``s · Bᵀ``; the base kernels and factors are equal and
the outputs are compared before timing. Every timed call blocks until its result is ready."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import portable_lora as pl
from portable_lora import jax as plj
from portable_lora.adapter import LoraModule

from _common import Results, Row, Settings, compare, ratio

ALPHA_PER_RANK = 2.0


class Holder(nnx.Module):
    def __init__(self, proj):
        self.proj = proj

    def __call__(self, x):
        return self.proj(x)


def _layers(in_f: int, out_f: int, rank: int, rng: np.random.Generator):
    W = (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(np.float32)
    A = (rng.standard_normal((rank, in_f)) / math.sqrt(in_f)).astype(np.float32)
    B = (rng.standard_normal((out_f, rank)) * 0.1).astype(np.float32)
    alpha = ALPHA_PER_RANK * rank
    s = alpha / rank

    def base():
        layer = nnx.Linear(in_f, out_f, use_bias=False, rngs=nnx.Rngs(0))
        layer.kernel[...] = jnp.asarray(W.T)
        return layer

    adapter = pl.Adapter()
    adapter["proj"] = LoraModule(A, B, alpha=alpha)
    ours = plj.apply(Holder(base()), adapter)

    peer = nnx.LoRALinear(in_f, out_f, lora_rank=rank, use_bias=False, rngs=nnx.Rngs(0))
    peer.kernel[...] = jnp.asarray(W.T)
    peer.lora.lora_a[...] = jnp.asarray(A.T)
    peer.lora.lora_b[...] = jnp.asarray(s * B.T)
    return Holder(base()), Holder(peer), ours, (W, A, B, s)


@nnx.jit
def _call(model, x):
    return model(x)


def _pure(model, x):
    """The model as a training loop calls it: ``jax.jit`` of the pure function of its state
    (NNX's per-call graph bookkeeping left out)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    return lambda: fn(state, x).block_until_ready()


def _check(ours, peer, x, ref, what):
    for name, model in (("ours", ours), ("flax", peer)):
        got = np.asarray(_call(model, x))
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if not err < 1e-4:
            raise AssertionError(f"{what}: {name} differs from the float64 reference by {err:.2e}")


def forward(results: Results, settings: Settings, *, sizes, ranks, tokens) -> None:
    rng = np.random.default_rng(0)
    for in_f, out_f in sizes:
        for rank in ranks:
            plain, peer, ours, (W, A, B, s) = _layers(in_f, out_f, rank, rng)
            for T in tokens:
                xn = rng.standard_normal((1, T, in_f)).astype(np.float32)
                x = jnp.asarray(xn)
                x64 = xn.astype(np.float64)
                ref = x64 @ W.T.astype(np.float64) + s * (x64 @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
                _check(ours, peer, x, ref, f"jax {in_f}->{out_f} r{rank} T{T}")
                fns = {name: (lambda m=m: _call(m, x).block_until_ready())
                       for name, m in (("linear", plain), ("flax", peer), ("ours", ours))}
                fns.update({f"pure {name}": _pure(m, x) for name, m in (("flax", peer), ("ours", ours))})
                us = {k: v * 1e6 for k, v in compare(fns, settings).items()}
                values = {"linear_us": us["linear"], "flax_nnx_us": us["flax"], "ours_us": us["ours"],
                          "ours/flax": ratio(us["ours"], us["flax"]), "ours/linear": ratio(us["ours"], us["linear"]),
                          "jax.jit flax_us": us["pure flax"], "jax.jit ours_us": us["pure ours"],
                          "jax.jit ours/flax": ratio(us["pure ours"], us["pure flax"])}
                results.add(Row("forward jax cpu float32 nnx.jit", f"{in_f}->{out_f} r{rank} T{T}", values,
                                "≤1.05× Flax NNX", values["ours/flax"] <= 1.05))


def dispatch(results: Results, settings: Settings) -> None:
    """µs per call at 16→16, T=1 through nnx.jit (NNX's per-call graph bookkeeping included),
    and through ``jax.jit`` of the pure function of the split state (what a training loop does)."""
    rng = np.random.default_rng(1)
    plain, peer, ours, _ = _layers(16, 16, 4, rng)
    x = jnp.asarray(rng.standard_normal((1, 16)).astype(np.float32))
    fns = {f"nnx.jit {k}": (lambda m=m: _call(m, x).block_until_ready())
           for k, m in (("linear", plain), ("flax", peer), ("ours", ours))}
    for name, model in (("linear", plain), ("flax", peer), ("ours", ours)):
        fns[f"jax.jit {name}"] = _pure(model, x)
    us = {k: v * 1e6 for k, v in compare(fns, settings).items()}
    values = {f"{k}_us": v for k, v in us.items()}
    values["nnx.jit ours/flax"] = ratio(us["nnx.jit ours"], us["nnx.jit flax"])
    values["jax.jit ours/flax"] = ratio(us["jax.jit ours"], us["jax.jit flax"])
    results.add(Row("dispatch jax cpu", "16->16 r4 T1 float32", values))
