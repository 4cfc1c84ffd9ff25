"""LoRA on NumPy state dicts, the reference path: ``from portable_lora import numpy as pln``.

Imports only NumPy; see :mod:`portable_lora.backends.numpy`.
"""

from .backends.numpy import *  # noqa: F401,F403
from .backends.numpy import __all__  # noqa: F401
