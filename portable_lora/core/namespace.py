"""Namespace resolution, in one place.

Core functions find the array namespace of their arguments here and nowhere else. Libraries
are recognised through ``array_api_compat`` (which looks at ``sys.modules`` and never imports
a framework to check). MLX is standard-compliant except for a few functions; the gaps are
filled by :mod:`portable_lora.core._mlx_compat`, so no other module branches on MLX.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

__all__ = ["array_namespace", "namespace_family"]


def _is_mlx_array(x: Any) -> bool:
    return type(x).__module__.startswith("mlx")


def array_namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (``None`` entries are ignored)."""
    present = [a for a in arrays if a is not None]
    if present and _is_mlx_array(present[0]):
        from . import _mlx_compat

        return _mlx_compat.namespace()
    return array_api_compat.array_namespace(*present)


def namespace_family(xp: Any) -> str:
    """A short name for the library behind ``xp``: numpy, torch, jax, mlx, array_api_strict, ..."""
    name = getattr(xp, "__name__", type(xp).__name__)
    for family in ("array_api_strict", "numpy", "torch", "jax", "mlx", "cupy", "dask"):
        if family in name:
            return family
    return name
