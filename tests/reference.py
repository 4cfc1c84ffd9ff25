"""Float64 NumPy references shared by the tests (written independently of the core)."""

from __future__ import annotations

import numpy as np

from portable_lora.adapter import LoraModule


def ref_delta(A, B, scale, kind="linear"):
    """ΔW in float64, in the layout of the weight it patches."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    if kind == "linear":
        return scale * B @ A
    if kind == "conv":
        return scale * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])
    return scale * (B @ A).T


def ref_module_delta(m: LoraModule, strength=1.0):
    return ref_delta(m.A, m.B, m.scale * strength, m.kind)


def ref_dora(W, m: LoraModule, strength=1.0):
    """DoRA's merged weight m · (W + ΔW) / ‖W + ΔW‖ (norm per output row)."""
    combined = W + ref_module_delta(m, strength)
    return m.magnitude.astype(np.float64)[:, None] * combined / np.linalg.norm(combined, axis=1, keepdims=True)


def random_module(rng, kind, shape, rank=3, alpha=6.0, rule="alpha/rank", dora=False, dtype=np.float32):
    """A LoraModule with random non-zero factors for a weight of canonical ``shape``."""
    def rand(*s, scale=1.0):
        return rng.standard_normal(s) * scale

    if kind == "embedding":
        A, B = rand(rank, shape[0]), rand(shape[1], rank)
    elif kind == "conv":
        A, B = rand(rank, *shape[1:], scale=0.3), rand(shape[0], rank, 1, 1, scale=0.3)
    else:
        A, B = rand(rank, shape[1], scale=0.5), rand(shape[0], rank, scale=0.5)
    mag = (1 + 0.1 * rand(shape[0])).astype(dtype) if dora else None
    return LoraModule(A.astype(dtype), B.astype(dtype), alpha=alpha, rule=rule, kind=kind, magnitude=mag)
