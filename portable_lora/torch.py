"""LoRA for PyTorch: ``from portable_lora import torch as plt``.

Imports PyTorch (and no other framework); see :mod:`portable_lora.backends.torch`.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("portable_lora.torch needs PyTorch: pip install 'portable-lora[torch]'") from exc

from .backends.torch import *  # noqa: F401,F403,E402
from .backends.torch import __all__  # noqa: F401,E402
