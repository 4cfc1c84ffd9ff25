"""Small deterministic example adapters (for the demo, the docs and tests)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .adapter import Adapter, LoraModule

__all__ = ["LLAMA_PROJECTIONS", "llama_module_shapes", "random_adapter", "random_weights"]

LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_module_shapes(layers: int = 2, hidden: int = 64, intermediate: int = 128,
                        kv_hidden: int | None = None,
                        projections: Iterable[str] = LLAMA_PROJECTIONS) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` for a Llama-style model named as in Hugging Face transformers."""
    kv = hidden if kv_hidden is None else kv_hidden
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate)}
    return {f"model.layers.{i}.{p}": dims[p] for i in range(layers) for p in projections}


def random_adapter(shapes: dict[str, tuple[int, ...]] | None = None, *, rank: int | dict[str, int] = 8,
                   alpha: float | dict[str, float] = 16.0, rule: str = "alpha/rank",
                   dtype=np.float32, seed: int = 0, dora: bool = False, kind: str = "linear",
                   base_model: str | None = "tiny-llama (random)") -> Adapter:
    """An adapter with random, non-zero A and B (so ΔW is not zero and tests prove something).

    ``shapes`` maps module names to weight shapes: (out, in) for linear, (out, in, kh, kw) for
    conv, (num_embeddings, dim) for embedding. Ranks and alphas may be given per module.
    """
    rng = np.random.default_rng(seed)
    shapes = llama_module_shapes() if shapes is None else shapes
    adapter = Adapter(base_model=base_model, provenance={"source_format": "memory",
                                                         "created_by": "portable_lora.examples"})
    for name, shape in shapes.items():
        r = rank[name] if isinstance(rank, dict) else rank
        a_ = alpha[name] if isinstance(alpha, dict) else alpha
        if kind == "embedding":
            num, dim = shape
            A, B = rng.standard_normal((r, num)), rng.standard_normal((dim, r))
        elif kind == "conv":
            out, cin, kh, kw = shape
            A, B = rng.standard_normal((r, cin, kh, kw)) / np.sqrt(cin * kh * kw), rng.standard_normal((out, r, 1, 1)) * 0.1
        else:
            out, cin = shape
            A, B = rng.standard_normal((r, cin)) / np.sqrt(cin), rng.standard_normal((out, r)) * 0.1
        mag = (1.0 + 0.1 * rng.standard_normal(shape[0])).astype(dtype) if dora else None
        adapter[name] = LoraModule(A.astype(dtype), B.astype(dtype), alpha=a_, rule=rule, kind=kind,
                                   magnitude=mag)
    return adapter


def random_weights(adapter: Adapter, *, dtype=np.float32, seed: int = 1) -> dict[str, np.ndarray]:
    """Base weights ``{module: W}`` matching every module of ``adapter`` (W in its weight layout)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(m.weight_shape) / np.sqrt(max(m.in_features, 1))).astype(dtype)
            for name, m in adapter.items()}
