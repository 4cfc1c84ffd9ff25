"""The capability table's fast paths (fused add-matmul, in-place merge) give the plain
array-API result on every backend, and never change an input they do not own."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, assert_close, backend_dtype_params

from portable_lora import core
from portable_lora.core import capabilities

PARAMS = backend_dtype_params()
RNG = np.random.default_rng(99)


def rand(*shape, scale=1.0):
    return RNG.standard_normal(shape) * scale


def test_the_table_names_the_fused_calls():
    names = {b.name: b.xp for b in BACKENDS}
    if "torch" in names:
        assert capabilities.fused_available("add_matmul", names["torch"])
        assert capabilities.fused_available("add_matmul_", names["torch"])
        assert capabilities.fused_available("add_matmul_many_", names["torch"])
        assert capabilities.fused_available("add_matmul_stacked_", names["torch"])
    if "mlx" in names:
        assert capabilities.fused_available("add_matmul", names["mlx"])
    for plain in ("numpy", "array_api_strict", "jax"):
        if plain in names:
            assert not capabilities.fused_available("add_matmul", names[plain])
            assert not capabilities.fused_available("add_matmul_", names[plain])
            assert not capabilities.fused_available("add_matmul_many_", names[plain])
            # without a fused call, nothing is done in place: every item is left to the caller
            assert capabilities.add_matmul_many_(names[plain], [None, None], [None, None], [None, None],
                                                 scales=[1.0, 2.0]) == [False, False]
            assert not capabilities.fused_available("add_matmul_stacked_", names[plain])
            assert capabilities.add_matmul_stacked_(names[plain], [None, None], None, None, scales=[1.0, 2.0]) is False


# (leading axes, rows, columns): 2-D; batched and small (torch: matmul + add); batched and
# large enough for torch's flattened addmm
SHAPES = {"2d": ((), 5, 7), "batched": ((2, 3), 5, 7), "batched-large": ((2,), 64, 160)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_add_matmul_fused_equals_plain(backend, dtype, shape):
    lead, n, m = SHAPES[shape]
    base, a, b = rand(*lead, n, m), rand(*lead, n, 4), rand(4, m)
    expect = base + 0.75 * (a @ b)
    t = backend.to
    fused = capabilities.add_matmul(backend.xp, t(base, dtype), t(a, dtype), t(b, dtype), scale=0.75)
    plain = capabilities.add_matmul(backend.xp, t(base, dtype), t(a, dtype), t(b, dtype), scale=0.75,
                                    fused=False)
    assert tuple(fused.shape) == tuple(plain.shape) == (*lead, n, m)
    assert fused.dtype == plain.dtype  # (NumPy's bfloat16 matmul promotes to float32, on both paths)
    assert_close(backend.back(fused), expect, dtype, what="fused")
    assert_close(backend.back(plain), expect, dtype, what="plain")
    assert_close(backend.back(fused), backend.back(plain), dtype, what="fused vs plain")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_add_matmul_overwrite_equals_plain(backend, dtype, shape):
    """``overwrite=True``: the same values; torch writes them into the caller's temporary."""
    lead, n, m = SHAPES[shape]
    base, a, b = rand(*lead, n, m), rand(*lead, n, 4), rand(4, m)
    t = backend.to
    plain = capabilities.add_matmul(backend.xp, t(base, dtype), t(a, dtype), t(b, dtype), scale=0.75,
                                    fused=False)
    temporary = t(base, dtype)
    got = capabilities.add_matmul(backend.xp, temporary, t(a, dtype), t(b, dtype), scale=0.75, overwrite=True)
    assert tuple(got.shape) == (*lead, n, m) and got.dtype == plain.dtype
    assert_close(backend.back(got), backend.back(plain), dtype, what="overwrite vs plain")
    if backend.name == "torch":
        assert got.data_ptr() == temporary.data_ptr()  # no new output: the sum went into base


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_add_lora_output_fused_equals_plain(backend, dtype):
    x, base, A, B = rand(2, 3, 12), rand(2, 3, 10), rand(4, 12), rand(10, 4)
    expect = base + 1.5 * (x @ A.T) @ B.T
    args = [backend.to(v, dtype) for v in (base, x, A, B)]
    xp = backend.xp
    for fused in (True, False):
        for given_xp in (None, xp):  # resolved per call, or once by the caller
            got = core.add_lora_output(*args, 1.5, fused=fused, xp=given_xp)
            assert_close(backend.back(got), expect, dtype, what=f"fused={fused} xp={given_xp is not None}")


MERGE_CASES = {
    # kind, transposed, W shape, A shape, B shape
    "linear": ("linear", False, (10, 12), (4, 12), (10, 4)),
    "linear-transposed": ("linear", True, (12, 10), (4, 12), (10, 4)),
    "embedding": ("embedding", False, (20, 6), (4, 20), (6, 4)),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_inplace_merge_equals_plain_merge(backend, dtype, case):
    kind, transposed, w_shape, a_shape, b_shape = MERGE_CASES[case]
    W, A, B = rand(*w_shape), rand(*a_shape, scale=0.3), rand(*b_shape, scale=0.3)
    t = backend.to
    plain = core.merge_into(t(W, dtype), t(A, dtype), t(B, dtype), 2.0, kind, transposed=transposed)
    w = t(W, dtype)
    before = backend.back(w).copy()
    got = core.merge_into(w, t(A, dtype), t(B, dtype), 2.0, kind, transposed=transposed, inplace=True)
    assert got.dtype == w.dtype and tuple(got.shape) == w_shape
    assert_close(backend.back(got), backend.back(plain), dtype, what=f"{case} in place vs plain")
    if capabilities.fused_available("add_matmul_", backend.xp):
        assert got is w  # written in place: one pass, no new weight
    else:
        assert got is not w
        np.testing.assert_array_equal(backend.back(w), before)  # the input is untouched
    restored = core.unmerge_from(got, t(A, dtype), t(B, dtype), 2.0, kind, transposed=transposed, inplace=True)
    assert_close(backend.back(restored), before, dtype, what=f"{case} unmerged in place")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.name == "torch"], ids=lambda b: b.name)
def test_inplace_merge_with_mixed_dtypes(backend):
    import torch

    W, A, B = rand(10, 12), rand(4, 12), rand(10, 4)
    # float32 factors on a bfloat16 weight: the sum is formed in float32 either way, so the
    # in-place path takes them and gives the plain path's result
    w = backend.to(W, "bfloat16")
    plain = core.merge_into(w, backend.to(A, "float32"), backend.to(B, "float32"), 2.0)
    got = core.merge_into(w, backend.to(A, "float32"), backend.to(B, "float32"), 2.0, inplace=True)
    assert got is w and torch.equal(got, plain)
    # bfloat16 factors on a float32 weight: addmm_ cannot mix dtypes, so the plain path runs
    # and W is left alone
    w = backend.to(W, "float32")
    before = w.clone()
    got = core.merge_into(w, backend.to(A, "bfloat16"), backend.to(B, "bfloat16"), 2.0, inplace=True)
    assert got is not w and torch.equal(w, before)
    assert got.dtype == torch.float32
    assert_close(backend.back(got), W + 2.0 * backend.back(backend.to(B, "bfloat16")) @ backend.back(
        backend.to(A, "bfloat16")), "float32")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.name == "torch"], ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cpu_16bit_inplace_merge_is_the_plain_merge(backend, dtype, monkeypatch):
    import torch

    # small blocks, so the widened CPU path runs over several row blocks and a ragged last one
    monkeypatch.setattr(capabilities, "_WIDE_BLOCK_BYTES", 3 * 12 * 4)
    W, A, B = rand(10, 12), rand(4, 12, scale=0.3), rand(10, 4, scale=0.3)
    to = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    w, a, b = (torch.from_numpy(v).to(to) for v in (W, A, B))
    plain = core.merge_into(w, a, b, 2.0)
    got = core.merge_into(w, a, b, 2.0, inplace=True)
    assert got is w
    # the same float32 arithmetic, rounded once: the same bits
    assert torch.equal(got, plain)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_fused_paths_equal_plain_paths(dtype):
    import torch

    to = getattr(torch, dtype)
    W, A, B = rand(64, 48), rand(8, 48, scale=0.3), rand(64, 8, scale=0.3)
    w, a, b = (torch.from_numpy(v).to("cuda", to) for v in (W, A, B))
    xp = core.array_namespace(w)
    plain = core.merge_into(w, a, b, 2.0)
    got = core.merge_into(w, a, b, 2.0, inplace=True)
    assert got is w
    # 16-bit weights: the in-place path forms the sum in float32 and rounds once, like the
    # plain path (a 16-bit addmm_ would round the product first: a quarter of the elements
    # off, measured); float32: cuBLAS may sum in another order
    tolerance = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}[dtype]
    exact = (torch.from_numpy(W).to(to).double() + 2.0 * (b.double().cpu() @ a.double().cpu())).to(to)
    if dtype == "float32":
        assert_close(got.double().cpu().numpy(), plain.double().cpu().numpy(), tolerance, what="cuda in place")
    else:
        wrong = (got.cpu() != exact).double().mean().item()
        assert wrong < 1e-3, f"{wrong:.1%} of the merged elements are not the correctly rounded sum"
        assert (got.cpu() != plain.cpu()).double().mean().item() < 1e-3
    x, base = rand(2, 3, 48), rand(2, 3, 64)
    xs, bs = (torch.from_numpy(v).to("cuda", to) for v in (x, base))
    fused = core.add_lora_output(bs, xs, a, b, 1.5, xp=xp)
    unfused = core.add_lora_output(bs, xs, a, b, 1.5, fused=False, xp=xp)
    assert_close(fused.double().cpu().numpy(), unfused.double().cpu().numpy(), tolerance, what="cuda fused")
