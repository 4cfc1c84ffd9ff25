"""One source of test parameters: namespace × dtype, each compared to a float64 NumPy reference.

``PORTABLE_LORA_REQUIRE_BACKENDS`` (comma-separated, or ``all``) names backends the run was
asked for: if one of them fails to import, the whole run fails at collection instead of
skipping. CI sets it to ``all``. Without it, backends that are not installed are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from portable_lora.testing import TOLERANCE, Namespace, load_namespace, relative_error

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "mlx")


def required_backends() -> set[str]:
    raw = os.environ.get("PORTABLE_LORA_REQUIRE_BACKENDS", "").strip()
    if raw == "all":
        return set(ALL_BACKENDS)
    return {b.strip() for b in raw.split(",") if b.strip()}


def _enable_jax_x64() -> None:
    # float64 references on JAX need x64; set before any JAX array exists
    import jax

    jax.config.update("jax_enable_x64", True)


Backend = Namespace


def load_backends() -> list[Backend]:
    required = required_backends()
    unknown = required - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"PORTABLE_LORA_REQUIRE_BACKENDS names unknown backends {sorted(unknown)}")
    found = []
    for name in ALL_BACKENDS:
        try:
            if name == "jax":
                _enable_jax_x64()
            found.append(load_namespace(name))
        except ImportError as exc:
            if name in required:
                raise pytest.UsageError(
                    f"backend {name!r} was required (PORTABLE_LORA_REQUIRE_BACKENDS) but failed to "
                    f"import: {exc}") from exc
    return found


BACKENDS = load_backends()



def backend_dtype_params(dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16")):
    """pytest params (backend, dtype) for every installed backend and each dtype it supports."""
    return [pytest.param(b, d, id=f"{b.name}-{d}") for b in BACKENDS for d in dtypes if d in b.dtypes]


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, *, what: str = "") -> None:
    """Max-abs error relative to the reference's max magnitude, within the dtype tolerance."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]} ({dtype})"


@pytest.fixture(params=[pytest.param(b, id=b.name) for b in BACKENDS])
def backend(request) -> Backend:
    return request.param


def pytest_report_header(config):
    names = ", ".join(b.name for b in BACKENDS)
    return f"portable-lora backends: {names}; required: {sorted(required_backends()) or 'none'}"
