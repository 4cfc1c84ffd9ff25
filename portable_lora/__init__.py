"""portable-lora: LoRA adapters that mean the same thing in every framework and format.

``import portable_lora`` imports NumPy and no framework. Framework support lives in
``portable_lora.torch``, ``portable_lora.jax``, ``portable_lora.mlx`` and
``portable_lora.numpy``, each importing only its own framework.

>>> import portable_lora as pl
>>> adapter = pl.examples.random_adapter(seed=0)
>>> pl.save(adapter, "/tmp/example.safetensors")
>>> pl.load("/tmp/example.safetensors").delta_weight("model.layers.0.self_attn.q_proj").shape
(64, 64)
"""

from . import core, examples
from ._version import __version__
from .adapter import Adapter, LoraModule
from .core import RULES, effective_scale
from .errors import LoraError
from .formats import FORMATS, detect, load, save

__all__ = ["Adapter", "LoraModule", "LoraError", "load", "save", "detect", "FORMATS", "RULES",
           "effective_scale", "core", "examples", "__version__"]
