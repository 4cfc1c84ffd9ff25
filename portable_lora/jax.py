"""LoRA for JAX and Flax NNX: ``from portable_lora import jax as plj``.

Imports JAX and Flax (and no other framework); see :mod:`portable_lora.backends.jax`.
"""

try:
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("portable_lora.jax needs JAX and Flax: pip install 'portable-lora[jax]' "
                      f"({exc})") from exc

from .backends.jax import *  # noqa: F401,F403,E402
from .backends.jax import __all__  # noqa: F401,E402
