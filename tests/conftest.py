"""One source of test parameters: namespace × dtype, each compared to a float64 NumPy reference.

``PORTABLE_LORA_REQUIRE_BACKENDS`` (comma-separated, or ``all``) names backends the run was
asked for: if one of them fails to import, the whole run fails at collection instead of
skipping. CI sets it to ``all``. Without it, backends that are not installed are skipped.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "mlx")


def required_backends() -> set[str]:
    raw = os.environ.get("PORTABLE_LORA_REQUIRE_BACKENDS", "").strip()
    if raw == "all":
        return set(ALL_BACKENDS)
    return {b.strip() for b in raw.split(",") if b.strip()}


@dataclass(frozen=True)
class Backend:
    """A namespace under test: how to move NumPy arrays in and out, and its dtypes."""

    name: str
    xp: Any
    to: Callable[[np.ndarray, str], Any]  # (float64 numpy array, dtype name) -> native array
    back: Callable[[Any], np.ndarray]     # native array -> numpy float64
    dtypes: tuple[str, ...]

    def __repr__(self) -> str:
        return self.name


def _numpy() -> Backend:
    np_dtypes = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    return Backend("numpy", np, lambda a, d: np.asarray(a).astype(np_dtypes[d]),
                   lambda x: np.asarray(x).astype(np.float64), ("float64", "float32", "bfloat16"))


def _strict() -> Backend:
    import array_api_strict as xp

    return Backend("array_api_strict", xp,
                   lambda a, d: xp.asarray(np.asarray(a, dtype=d)),
                   lambda x: np.asarray(x, dtype=np.float64), ("float64", "float32"))


def _torch() -> Backend:
    import torch
    from array_api_compat import torch as xp  # noqa: F401  (the compat-wrapped namespace)

    return Backend("torch", xp,
                   lambda a, d: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(getattr(torch, d)),
                   lambda x: x.detach().to(torch.float64).cpu().numpy(), ("float64", "float32", "bfloat16"))


def _jax() -> Backend:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return Backend("jax", jnp, lambda a, d: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=getattr(jnp, d)),
                   lambda x: np.asarray(x.astype(jnp.float64)), ("float64", "float32", "bfloat16"))


def _mlx() -> Backend:
    import mlx.core as mx

    from portable_lora.core._mlx_compat import namespace

    def to(a, d):
        return mx.array(np.asarray(a, dtype=np.float32)).astype(getattr(mx, d))

    def back(x):
        return np.asarray(x.astype(mx.float32)).astype(np.float64)

    return Backend("mlx", namespace(), to, back, ("float32", "bfloat16"))


_FACTORIES = {"numpy": _numpy, "array_api_strict": _strict, "torch": _torch, "jax": _jax, "mlx": _mlx}


def load_backends() -> list[Backend]:
    required = required_backends()
    unknown = required - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"PORTABLE_LORA_REQUIRE_BACKENDS names unknown backends {sorted(unknown)}")
    found = []
    for name in ALL_BACKENDS:
        try:
            found.append(_FACTORIES[name]())
        except ImportError as exc:
            if name in required:
                raise pytest.UsageError(
                    f"backend {name!r} was required (PORTABLE_LORA_REQUIRE_BACKENDS) but failed to "
                    f"import: {exc}") from exc
    return found


BACKENDS = load_backends()

# relative tolerances by dtype (of the result's scale, see assert_close)
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2}


def backend_dtype_params(dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16")):
    """pytest params (backend, dtype) for every installed backend and each dtype it supports."""
    return [pytest.param(b, d, id=f"{b.name}-{d}") for b in BACKENDS for d in dtypes if d in b.dtypes]


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, *, what: str = "") -> None:
    """Max-abs error relative to the reference's max magnitude, within the dtype tolerance."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), 1e-30) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]} ({dtype})"


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
def backend(request) -> Backend:
    return request.param


def pytest_report_header(config):
    names = ", ".join(b.name for b in BACKENDS)
    return f"portable-lora backends: {names}; required: {sorted(required_backends()) or 'none'}"
