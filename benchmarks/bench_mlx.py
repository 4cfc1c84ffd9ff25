"""MLX (CPU here): ours (``portable_lora.mlx.apply``) vs mlx-lm's ``LoRALinear``, eager and
``mx.compile``-d, float32. Both wrap equal base weights and equal factors (mlx-lm's layout is
``lora_a`` (in, r), ``lora_b`` (r, out), its ``scale`` the effective scale), and their outputs are
compared before timing. Every timed call ends with ``mx.eval`` of its output (MLX is lazy)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import portable_lora as pl
from portable_lora import mlx as plm
from portable_lora.adapter import LoraModule

from _common import Results, Row, Settings, compare, ratio

ALPHA_PER_RANK = 2.0


class Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def __call__(self, x):
        return self.proj(x)


def _pair(in_f: int, out_f: int, rank: int, rng: np.random.Generator):
    W = (rng.standard_normal((out_f, in_f)) / math.sqrt(in_f)).astype(np.float32)
    A = (rng.standard_normal((rank, in_f)) / math.sqrt(in_f)).astype(np.float32)
    B = (rng.standard_normal((out_f, rank)) * 0.1).astype(np.float32)
    alpha = ALPHA_PER_RANK * rank

    def base():
        layer = nn.Linear(in_f, out_f, bias=False)
        layer.weight = mx.array(W)
        return layer

    adapter = pl.Adapter()
    adapter["proj"] = LoraModule(A, B, alpha=alpha)
    ours = plm.apply(Holder(base()), adapter).proj

    from mlx_lm.tuner.lora import LoRALinear

    peer = LoRALinear.from_base(base(), r=rank, scale=alpha / rank)
    peer.lora_a = mx.array(A.T)
    peer.lora_b = mx.array(B.T)
    plain = base()
    return plain, peer, ours, (W, A, B, alpha / rank)


def _check(ours, peer, x, ref, what):
    for name, layer in (("ours", ours), ("mlx-lm", peer)):
        got = np.array(layer(x))
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if not err < 1e-4:
            raise AssertionError(f"{what}: {name} differs from the float64 reference by {err:.2e}")


def _timed(layer):
    def call(x):
        return layer(x)
    return call


def forward(results: Results, settings: Settings, *, sizes, ranks, tokens, max_work: int) -> None:
    rng = np.random.default_rng(0)
    for in_f, out_f in sizes:
        for rank in ranks:
            plain, peer, ours, (W, A, B, s) = _pair(in_f, out_f, rank, rng)
            for T in tokens:
                if T * in_f * out_f > max_work:
                    results.skipped.append(f"forward mlx {in_f}->{out_f} r{rank} T{T}: over the MLX CPU "
                                           "work limit (its matmul runs at a few GFLOP/s here)")
                    continue
                xn = rng.standard_normal((1, T, in_f)).astype(np.float32)
                x = mx.array(xn)
                x64 = xn.astype(np.float64)
                ref = x64 @ W.T.astype(np.float64) + s * (x64 @ A.T.astype(np.float64)) @ B.T.astype(np.float64)
                _check(ours, peer, x, ref, f"mlx {in_f}->{out_f} r{rank} T{T}")
                for mode in ("eager", "compiled"):
                    fns = {name: _timed(layer) for name, layer in
                           (("linear", plain), ("mlx-lm", peer), ("ours", ours))}
                    if mode == "compiled":
                        fns = {k: mx.compile(f) for k, f in fns.items()}
                    timed = {k: (lambda f=f: mx.eval(f(x))) for k, f in fns.items()}
                    us = {k: v * 1e6 for k, v in compare(timed, settings).items()}
                    values = {"linear_us": us["linear"], "mlx-lm_us": us["mlx-lm"], "ours_us": us["ours"],
                              "ours/mlx-lm": ratio(us["ours"], us["mlx-lm"]),
                              "ours/linear": ratio(us["ours"], us["linear"])}
                    compiled = mode == "compiled"
                    results.add(Row(f"forward mlx cpu float32 {mode}", f"{in_f}->{out_f} r{rank} T{T}", values,
                                    "≤1.05× mlx-lm" if compiled else "",
                                    values["ours/mlx-lm"] <= 1.05 if compiled else None))


def dispatch(results: Results, settings: Settings) -> None:
    """µs per call at 16→16, T=1, eager and compiled (each call evaluated)."""
    rng = np.random.default_rng(1)
    plain, peer, ours, _ = _pair(16, 16, 4, rng)
    x = mx.array(rng.standard_normal((1, 16)).astype(np.float32))
    values = {}
    for mode in ("eager", "compiled"):
        fns = {name: _timed(layer) for name, layer in (("nn.Linear", plain), ("mlx-lm", peer), ("ours", ours))}
        if mode == "compiled":
            fns = {k: mx.compile(f) for k, f in fns.items()}
        us = {k: v * 1e6 for k, v in compare({k: (lambda f=f: mx.eval(f(x))) for k, f in fns.items()},
                                            settings).items()}
        values.update({f"{mode} {k}_us": v for k, v in us.items()})
        values[f"{mode} ours/mlx-lm"] = ratio(us["ours"], us["mlx-lm"])
    results.add(Row("dispatch mlx cpu", "16->16 r4 T1 float32", values))
