"""The math core on every installed namespace against a float64 NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close, backend_dtype_params

from portable_lora import core
from portable_lora.errors import LoraError
from reference import ref_delta

PARAMS = backend_dtype_params()
RNG = np.random.default_rng(1234)


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


FACTORS = {
    "linear": lambda r: (rand(r, 12), rand(10, r)),
    "conv": lambda r: (rand(r, 3, 3, 3), rand(5, r, 1, 1)),
    "embedding": lambda r: (rand(r, 20), rand(6, r)),
}


@pytest.mark.parametrize("rule,expected", [("alpha/rank", 2.0), ("alpha/sqrt(rank)", 16 / math.sqrt(8)),
                                           ("raw", 16.0)])
def test_effective_scale_rules(rule, expected):
    assert core.effective_scale(16, 8, rule) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8", None])
def test_bad_rank_names_module(bad):
    with pytest.raises(LoraError, match="q_proj.*rank"):
        core.effective_scale(16, bad, module="q_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "16", True])
def test_bad_alpha_names_module(bad):
    with pytest.raises(LoraError, match="q_proj.*alpha"):
        core.effective_scale(bad, 8, module="q_proj")


def test_unknown_rule():
    with pytest.raises(LoraError, match="unknown scaling rule 'alpha\\*rank'"):
        core.effective_scale(1, 8, "alpha*rank", module="m")


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_delta_weight(backend, dtype, kind):
    A, B = FACTORS[kind](4)
    got = core.delta_weight(backend.to(A, dtype), backend.to(B, dtype), 0.75, kind)
    assert isinstance(got, type(backend.to(A, dtype)))
    assert_close(backend.back(got), ref_delta(backend.back(backend.to(A, dtype)),
                                              backend.back(backend.to(B, dtype)), 0.75, kind), dtype)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_linear_forward_unmerged(backend, dtype):
    x, W, A, B, bias = rand(3, 5, 12), rand(10, 12), rand(4, 12), rand(10, 4), rand(10)
    expect = x @ W.T + bias + 1.5 * (x @ A.T) @ B.T
    for fused in (True, False):  # the fused capability and the plain array-API path agree
        got = core.linear_forward(*(backend.to(a, dtype) for a in (x, W, A, B)), 1.5,
                                  backend.to(bias, dtype), fused=fused)
        assert_close(backend.back(got), expect, dtype, what=f"fused={fused}")


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_embedding_lora_output(backend, dtype):
    A, B = rand(4, 20), rand(6, 4)
    ids = np.array([[0, 3, 19], [7, 7, 1]])
    xp = backend.xp
    got = core.embedding_lora_output(xp.asarray(ids), backend.to(A, dtype), backend.to(B, dtype), 0.5)
    expect = ref_delta(A, B, 0.5, "embedding")[ids]
    assert_close(backend.back(got), expect, dtype)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_merge_equals_forward_and_unmerge_restores(backend, dtype):
    x, W, A, B = rand(7, 12), rand(10, 12), rand(4, 12), rand(10, 4)
    w, a, b = (backend.to(t, dtype) for t in (W, A, B))
    merged = core.merge_into(w, a, b, 2.0)
    assert merged.dtype == w.dtype
    xw = backend.to(x, dtype)
    assert_close(backend.back(xw @ merged.T), backend.back(core.linear_forward(xw, w, a, b, 2.0)), dtype)
    restored = core.unmerge_from(merged, a, b, 2.0)
    assert_close(backend.back(restored), backend.back(w), dtype)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_merge_transposed_weight(backend, dtype):
    W, A, B = rand(12, 10), rand(4, 12), rand(10, 4)  # W stored (in, out): Conv1D / Flax kernel
    got = core.merge_into(backend.to(W, dtype), backend.to(A, dtype), backend.to(B, dtype), 0.5,
                          transposed=True)
    assert_close(backend.back(got), W + 0.5 * (B @ A).T, dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_merge_into_many_equals_merge_into_one_by_one(backend, dtype, inplace):
    """Same-shaped linear weights (the batched case), a transposed one, an embedding table and
    a conv: each result equals merge_into's, and the inputs of the out-of-place call stay."""
    shapes = [("linear", (10, 12), False), ("linear", (10, 12), False), ("linear", (10, 12), False),
              ("linear", (12, 10), True), ("embedding", (20, 6), False), ("conv", (5, 3, 3, 3), False)]
    items, expect = [], []
    for kind, wshape, transposed in shapes:
        A, B = FACTORS[kind](4)
        if transposed:
            A, B = rand(4, 12), rand(10, 4)
        W = rand(*wshape)
        t = [backend.to(v, dtype) for v in (W, A, B)]
        expect.append(core.merge_into(*t, 0.5, kind, transposed=transposed))
        items.append((backend.to(W, dtype), t[1], t[2], 0.5, kind, transposed))
    originals = [backend.back(item[0]) for item in items]
    got = core.merge_into_many(items, inplace=inplace)
    assert len(got) == len(items)
    for item, g, e, original in zip(items, got, expect, originals):
        assert_close(backend.back(g), backend.back(e), dtype, what=item[4])
        if not inplace or g is not item[0]:
            np.testing.assert_array_equal(backend.back(item[0]), original)  # untouched
    assert core.merge_into_many([]) == []


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_merge_into_stacked_equals_merge_into_one_by_one(backend, dtype, inplace):
    """Factors stacked (count, r, in) and (count, out, r), as a merge uploads a group of
    same-shaped layers: each result equals merge_into's with that member's factors and scale,
    and the inputs of the out-of-place call stay."""
    count, r = 3, 4
    A, B = rand(count, r, 12), rand(count, 10, r)
    Ws = [rand(10, 12) for _ in range(count)]
    scales = [0.5, -1.25, 2.0]
    expect = [W + s * (B[i] @ A[i]) for i, (W, s) in enumerate(zip(Ws, scales))]
    targets = [backend.to(W, dtype) for W in Ws]
    got = core.merge_into_stacked(targets, backend.to(A, dtype), backend.to(B, dtype), scales, inplace=inplace)
    assert len(got) == count
    for i, (g, e) in enumerate(zip(got, expect)):
        assert_close(backend.back(g), e, dtype, what=f"member {i}")
        if not inplace or g is not targets[i]:
            np.testing.assert_array_equal(backend.back(targets[i]), backend.back(backend.to(Ws[i], dtype)))
    assert core.merge_into_stacked([], A, B, []) == []
    with pytest.raises(ValueError, match="2 weights, 2 scales, factors stacked 3 \\(A\\) and 3 \\(B\\)"):
        core.merge_into_stacked(targets[:2], backend.to(A, dtype), backend.to(B, dtype), scales[:2])


def ref_dora_weight(W, A, B, s, m):
    comb = W + s * B @ A
    return m[:, None] * comb / np.linalg.norm(comb, axis=1, keepdims=True)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_dora_forward_and_merge(backend, dtype):
    x, W, A, B, m, bias = rand(3, 12), rand(10, 12), rand(4, 12), rand(10, 4), 1 + 0.1 * rand(10), rand(10)
    t = backend.to
    expect_w = ref_dora_weight(W, A, B, 0.5, m)
    got = core.dora_forward(t(x, dtype), t(W, dtype), t(A, dtype), t(B, dtype), 0.5, t(m, dtype), t(bias, dtype))
    assert_close(backend.back(got), x @ expect_w.T + bias, dtype)
    merged = core.merge_into(t(W, dtype), t(A, dtype), t(B, dtype), 0.5, magnitude=t(m, dtype))
    assert_close(backend.back(merged), expect_w, dtype)
    norm = core.dora_weight_norm(t(W, dtype), t(A, dtype), t(B, dtype), 0.5)
    restored = core.unmerge_from(merged, t(A, dtype), t(B, dtype), 0.5, magnitude=t(m, dtype), weight_norm=norm)
    assert_close(backend.back(restored), backend.back(t(W, dtype)), dtype)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float64", "float32")))
def test_low_rank_extraction(backend, dtype):
    U = rand(16, 3)
    V = rand(3, 20)
    delta = U @ V + 1e-3 * rand(16, 20)
    lr = core.low_rank(backend.to(delta, dtype), 3)
    approx = backend.back(lr.B) @ backend.back(lr.A)
    s = np.linalg.svd(delta, compute_uv=False)
    expect_err = np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())
    assert lr.relative_error == pytest.approx(expect_err, rel=1e-3)
    assert np.linalg.norm(approx - delta) / np.linalg.norm(delta) == pytest.approx(expect_err, rel=1e-3)
    assert 0.99 < lr.energy_kept <= 1.0


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float64", "float32")))
def test_low_rank_conv_shapes(backend, dtype):
    delta = rand(5, 3, 3, 3)
    lr = core.low_rank(backend.to(delta, dtype), 27)  # full rank: exact
    assert tuple(lr.A.shape) == (27, 3, 3, 3) and tuple(lr.B.shape) == (5, 27, 1, 1)
    back = core.delta_weight(lr.A, lr.B, 1.0, "conv")
    assert_close(backend.back(back), delta, dtype)
    assert lr.relative_error < 1e-5


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(("float64", "float32")))
def test_resize_rank(backend, dtype):
    A, B = rand(8, 30), rand(20, 8)
    full = B @ A
    lr = core.resize_rank(backend.to(A, dtype), backend.to(B, dtype), 4)
    s = np.linalg.svd(full, compute_uv=False)
    best = np.linalg.norm(s[4:]) / np.linalg.norm(s)
    approx = backend.back(lr.B) @ backend.back(lr.A)
    assert np.linalg.norm(approx - full) / np.linalg.norm(full) == pytest.approx(best, rel=1e-3)
    assert lr.relative_error == pytest.approx(best, rel=1e-3)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_pad_rank_keeps_delta(backend, dtype):
    A, B = rand(3, 12), rand(10, 3)
    a, b = core.pad_rank(backend.to(A, dtype), backend.to(B, dtype), 8)
    assert tuple(a.shape) == (8, 12) and tuple(b.shape) == (10, 8)
    # the padded terms are exact zeros; BLAS may still sum in another order, so one rounding
    assert not np.any(backend.back(a)[3:]) and not np.any(backend.back(b)[:, 3:])
    assert_close(backend.back(core.delta_weight(a, b, 1.0)),
                 backend.back(core.delta_weight(backend.to(A, dtype), backend.to(B, dtype), 1.0)), dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_float16_lora_term_does_not_overflow_where_the_result_fits(backend, fused):
    """x @ Aᵀ = 20000 fits float16 (max 65504), ·4 would not; the true output, 800, does.
    With a scale below 1 it is the unscaled product that must not be formed."""
    xp = backend.xp
    if getattr(xp, "float16", None) is None:
        pytest.skip(f"{backend.name} has no float16 (not in the array API standard)")

    def half(a):
        return xp.astype(backend.to(a, "float32"), xp.float16)

    x, A, B, W = np.full((2, 100), 10.0), np.full((1, 100), 20.0), np.full((3, 1), 0.01), np.zeros((3, 100))
    expected = x @ W.T + 4.0 * (x @ A.T) @ B.T
    got = core.linear_forward(half(x), half(W), half(A), half(B), 4.0, fused=fused)
    np.testing.assert_allclose(backend.back(got), expected, rtol=2e-3)
    np.testing.assert_allclose(backend.back(core.lora_output(half(x), half(A), half(B), 4.0)), expected, rtol=2e-3)
    # and with a scale below 1 the unscaled product is what would overflow (80000, ·0.25 = 20000)
    B4 = np.full((3, 1), 4.0)
    got = core.linear_forward(half(x), half(W), half(A), half(B4), 0.25, fused=fused)
    np.testing.assert_allclose(backend.back(got), 0.25 * (x @ A.T) @ B4.T, rtol=2e-3)
    ids = backend.asarray_int(np.array([0, 1]))
    table = half(np.full((1, 2), 20000.0))  # embedding A (r, vocab): rows of 20000
    got = core.embedding_lora_output(ids, table, half(B), 4.0)
    np.testing.assert_allclose(backend.back(got), np.full((2, 3), 800.0), rtol=2e-3)


def test_pad_rank_and_low_rank_keep_the_factors_device():
    """The padding zeros are made where the factors live (array_api_strict's second device)."""
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    A, B = (xp.asarray(np.asarray(f), device=device) for f in FACTORS["linear"](4))
    a, b = core.pad_rank(A, B, 8)
    assert a.device == device and b.device == device and a.shape == (8, 12) and b.shape == (10, 8)
    np.testing.assert_allclose(np.asarray(xp.asarray(b @ a, device=xp.Device("CPU_DEVICE"))),
                               np.asarray(xp.asarray(B @ A, device=xp.Device("CPU_DEVICE"))), rtol=1e-12)
    up = core.low_rank(B @ A, 12)  # above min(out, in) = 10: the factors are zero-padded
    assert up.A.device == device and up.A.shape[0] == 12
