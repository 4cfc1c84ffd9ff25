"""Property tests (hypothesis) of the core on every installed namespace, and of the format."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import BACKENDS, assert_close, backend_dtype_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import portable_lora as pl
from portable_lora import core

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def lora_case(draw):
    rank = draw(st.integers(1, 6))
    out = draw(st.integers(1, 9))
    inp = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(-4, 4, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((out, inp)), rng.standard_normal((rank, inp)),
            rng.standard_normal((out, rank)), rng.standard_normal((3, inp)), scale)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float32", "bfloat16")))
@SETTINGS
@given(case=lora_case())
def test_merge_then_unmerge_returns_w(backend, dtype, case):
    W, A, B, _, s = case
    w, a, b = (backend.to(t, dtype) for t in (W, A, B))
    restored = core.unmerge_from(core.merge_into(w, a, b, s), a, b, s)
    # two roundings to the weight dtype: the error is at most a few ulps of W + ΔW
    bound = np.abs(backend.back(w)) + np.abs(s * backend.back(b) @ backend.back(a))
    ulp = {"float32": 2.0**-23, "bfloat16": 2.0**-7}[dtype]
    assert np.all(np.abs(backend.back(restored) - backend.back(w)) <= 2 * ulp * bound + 1e-30)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float64", "float32")))
@SETTINGS
@given(case=lora_case())
def test_merged_forward_equals_unmerged(backend, dtype, case):
    W, A, B, x, s = case
    w, a, b, xs = (backend.to(t, dtype) for t in (W, A, B, x))
    merged = core.merge_into(w, a, b, s)
    assert_close(backend.back(xs @ merged.T), backend.back(core.linear_forward(xs, w, a, b, s)), dtype)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float64", "float32")))
@SETTINGS
@given(case=lora_case(), extra=st.integers(0, 5))
def test_zero_padding_rank_leaves_delta_unchanged(backend, dtype, case, extra):
    _, A, B, _, s = case
    a, b = backend.to(A, dtype), backend.to(B, dtype)
    pa, pb = core.pad_rank(a, b, A.shape[0] + extra)
    assert_close(backend.back(core.delta_weight(pa, pb, s)), backend.back(core.delta_weight(a, b, s)), dtype)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]),
       rule=st.sampled_from(pl.RULES), alpha=st.floats(-64, 64, allow_nan=False, allow_infinity=False),
       dora=st.booleans())
def test_save_then_load_is_bit_exact(tmp_path_factory, seed, dtype, rule, alpha, dora):
    rng = np.random.default_rng(seed)
    shapes = {f"layers.{i}.proj": (int(rng.integers(1, 7)), int(rng.integers(1, 7))) for i in range(3)}
    ranks = {n: int(rng.integers(1, 5)) for n in shapes}
    a = pl.examples.random_adapter(shapes, rank=ranks, alpha=alpha, rule=rule, dtype=dtype, seed=seed, dora=dora)
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    pl.save(a, path)
    b = pl.load(path)
    for name in a:
        assert a[name].A.tobytes() == b[name].A.tobytes() and a[name].B.tobytes() == b[name].B.tobytes()
        assert b[name].A.dtype == np.dtype(dtype)
        assert (b[name].alpha, b[name].rule) == (a[name].alpha, a[name].rule)
        if dora:
            assert a[name].magnitude.tobytes() == b[name].magnitude.tobytes()


def test_every_requested_backend_is_present():
    from conftest import required_backends

    assert required_backends() <= {b.name for b in BACKENDS}
