"""The public equivalence suite (portable_lora.testing) on every installed backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

import portable_lora as pl
from portable_lora import testing
from portable_lora.examples import llama_module_shapes

NAMES = [b.name for b in BACKENDS]


def _mixed_adapter(**kw):
    shapes = llama_module_shapes(layers=1)
    ranks = {n: r for n, r in zip(shapes, [2, 4, 8, 3, 5, 6, 1])}
    alphas = {n: a for n, a in zip(shapes, [1.0, 16.0, 3.5, 8.0, 2.0, 64.0, 0.5])}
    return pl.examples.random_adapter(shapes, rank=ranks, alpha=alphas, **kw)


@pytest.mark.parametrize("case", ["linear", "dora", "conv", "embedding", "rslora", "raw"])
def test_same_numbers_on_every_backend(case):
    if case == "linear":
        adapter = _mixed_adapter()
    elif case == "dora":
        adapter = _mixed_adapter(dora=True)
    elif case == "rslora":
        adapter = _mixed_adapter(rule="alpha/sqrt(rank)")
    elif case == "raw":
        adapter = _mixed_adapter(rule="raw")
    elif case == "conv":
        adapter = pl.examples.random_adapter({"down.0": (8, 4, 3, 3), "down.1": (6, 8, 1, 1)}, kind="conv", rank=3)
    else:
        adapter = pl.examples.random_adapter({"embed_tokens": (40, 16)}, kind="embedding", rank=4)
    report = testing.check_equivalence(adapter, backends=NAMES, dtypes=("float32", "bfloat16"))
    assert {r.backend for r in report.rows} == set(NAMES)
    assert report.ok, report.table()
    # skipped: only the dtypes a namespace lacks (array_api_strict has no bfloat16)
    lacking = {f"{b} {d}" for b in NAMES for d in ("float32", "bfloat16") if d not in testing.load_namespace(b).dtypes}
    assert set(report.skipped) == lacking


def test_a_wrong_backend_is_caught(monkeypatch):
    """The suite can fail: a namespace that transposes square factors is reported."""
    real = testing.BACKENDS["numpy"]

    def broken():
        ns = real()
        return testing.Namespace("numpy", ns.xp, lambda a, d: ns.to(a.T if a.ndim == 2 and a.shape[0] == a.shape[1] else a, d),
                                 ns.back, ns.dtypes, ns.asarray_int)

    monkeypatch.setitem(testing.BACKENDS, "numpy", broken)
    adapter = pl.examples.random_adapter({"q": (16, 16)}, rank=4)
    report = testing.check_equivalence(adapter, backends=["numpy"], dtypes=("float32",))
    assert not report.ok
    assert "DIFFERS (q)" in report.table()


def test_missing_backend_is_reported_not_hidden():
    report = testing.check_equivalence(pl.examples.random_adapter({"q": (4, 4)}, rank=2),
                                       backends=["numpy", "no_such_backend"], dtypes=("float32",))
    assert "no_such_backend" in report.skipped


def test_a_run_that_checks_nothing_is_not_ok():
    adapter = pl.examples.random_adapter({"q": (4, 4)}, rank=2)
    report = testing.check_equivalence(adapter, backends=["no_such_backend"], dtypes=("float32",))
    assert not report.rows and not report.ok
    with pytest.raises(pl.LoraError, match="unknown dtypes"):
        testing.check_equivalence(adapter, backends=["numpy"], dtypes=("float16",))
    report = testing.check_equivalence(adapter, backends=["array_api_strict"], dtypes=("bfloat16",))
    assert not report.ok and "array_api_strict bfloat16" in report.skipped


def test_user_weights_are_used():
    adapter = pl.examples.random_adapter({"q": (4, 6)}, rank=2)
    with pytest.raises(pl.LoraError, match="no base weight"):
        testing.check_equivalence(adapter, {"other": np.zeros((4, 6))}, backends=["numpy"])
    report = testing.check_equivalence(adapter, {"q": np.ones((4, 6))}, backends=["numpy"], dtypes=("float32",))
    assert report.ok and report.to_json()["rows"][0]["backend"] == "numpy"
