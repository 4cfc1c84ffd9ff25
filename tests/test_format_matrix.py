"""Every (source, target) format pair: ΔW is kept, and A → B → A is bit-exact.

Adapters are drawn by hypothesis (ranks, α, dtypes). Each format gets names it can express:
diffusion formats need a component prefix (``unet.``), mlx-vlm needs ``language_model.``.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portable_lora as pl
from portable_lora.formats import get_format


# name families, and the formats that can hold each
FAMILIES = {
    "diffusion": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                  "unet.mid_block.attentions.0.proj_in",
                  "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"],
    "llm": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.1.mlp.down_proj"],
    "vlm": ["language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.1.mlp.up_proj"],
}
SUPPORTS = {
    "diffusion": ["portable", "peft", "mlx-lm", "kohya", "diffusers", "diffsynth"],
    "llm": ["portable", "peft", "mlx-lm"],
    "vlm": ["portable", "peft", "mlx-lm", "mlx-vlm"],
}
PAIRS = sorted({(fam, a, b) for fam, fmts in SUPPORTS.items() for a, b in itertools.permutations(fmts, 2)})


def _path(root: Path, fmt: str, tag: str) -> Path:
    return root / (f"{tag}.safetensors" if get_format(fmt).LAYOUT == "file" else tag)


def _save_load(adapter: pl.Adapter, fmt: str, root: Path, tag: str) -> pl.Adapter:
    path = _path(root, fmt, tag)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an underflow warning would mean arithmetic happened
        pl.save(adapter, path, format=fmt)
    options = {"modules": list(adapter)} if fmt == "kohya" else {}
    loaded = pl.load(path, format=fmt, **options)
    assert loaded.provenance["source_format"] == fmt
    return loaded


@st.composite
def adapters(draw, family: str, unit_scale: bool):
    names = FAMILIES[family]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]))
    rank = draw(st.integers(1, 6))
    # one scale for all modules: formats with one global scale then need no folding
    alpha = float(rank) if unit_scale else draw(st.sampled_from([1.0, 4.0, 16.0, 0.5 * rank]))
    shapes = {n: (int(rng.integers(2, 9)), int(rng.integers(2, 9))) for n in names}
    return pl.examples.random_adapter(shapes, rank=rank, alpha=alpha, dtype=dtype,
                                      seed=int(rng.integers(0, 2**31)))


def _assert_same(a: pl.Adapter, b: pl.Adapter, *, bits: bool) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.kind == y.kind and x.rank == y.rank, name
        assert y.scale == pytest.approx(x.scale, rel=1e-12), name
        if bits:
            assert x.A.dtype == y.A.dtype and x.B.dtype == y.B.dtype, name
            assert x.A.tobytes() == y.A.tobytes() and x.B.tobytes() == y.B.tobytes(), name
        np.testing.assert_allclose(y.delta_weight(np.float64), x.delta_weight(np.float64),
                                   rtol=1e-6, atol=1e-6 * float(np.max(np.abs(x.delta_weight(np.float64)))))


@pytest.mark.parametrize("family,source,target", PAIRS, ids=[f"{f}:{a}->{b}" for f, a, b in PAIRS])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_to_b_to_a_is_bit_exact(family, source, target, data):
    unit = "diffsynth" in (source, target)  # DiffSynth stores no α: only s = 1 needs no folding
    adapter = data.draw(adapters(family, unit))
    root = Path(tempfile.mkdtemp())
    try:
        a = _save_load(adapter, source, root, "a")
        b = _save_load(a, target, root, "b")
        _assert_same(a, b, bits=True)      # A -> B keeps every factor bit
        again = _save_load(b, source, root, "c")
        _assert_same(a, again, bits=True)  # and back to A
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("target", ["mlx-lm", "diffsynth"])
def test_mixed_scales_fold_within_one_rounding(tmp_path, target):
    """Formats with one scale (or none) keep ΔW by folding s_m / s into B: one rounding."""
    names = FAMILIES["diffusion"][:3]
    adapter = pl.examples.random_adapter({n: (8, 6) for n in names}, rank={names[0]: 2, names[1]: 4, names[2]: 3},
                                         alpha={names[0]: 1.0, names[1]: 16.0, names[2]: 6.0})
    out = _path(tmp_path, target, "x")
    pl.save(adapter, out, format=target)
    back = pl.load(out, format=target)
    for name in adapter:
        np.testing.assert_allclose(back.delta_weight(name), adapter.delta_weight(name), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", list(pl.FORMATS))
def test_every_format_module_has_the_interface(fmt):
    module = get_format(fmt)
    assert module.NAME == fmt
    assert module.LAYOUT in ("file", "directory")
    assert all(callable(getattr(module, verb)) for verb in ("detect", "load", "save"))
