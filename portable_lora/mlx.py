"""LoRA on MLX models: ``apply``, ``merge``, ``unmerge``, ``remove``, ``extract``, ``set_strength``.

>>> from portable_lora.mlx import apply, merge  # doctest: +SKIP

See :mod:`portable_lora.backends.mlx` for the details. Importing this module imports MLX.
"""

try:
    import mlx.core  # noqa: F401
    import mlx.nn  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("portable_lora.mlx needs MLX, which is not installed: "
                      "pip install 'portable-lora[mlx]' (on Linux that installs mlx[cpu])") from exc

from .backends.mlx import (LoraEmbedding, LoraLinear, RequantizationWarning, apply, extract, merge,
                           remove, set_strength, to_mlx, to_numpy, unmerge)

__all__ = ["apply", "merge", "unmerge", "remove", "extract", "set_strength", "LoraLinear",
           "LoraEmbedding", "RequantizationWarning", "to_mlx", "to_numpy"]
