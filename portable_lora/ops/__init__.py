"""The operations behind the ``portable-lora`` command line, as a Python API.

Each function takes paths (any adapter format, detected) or in-memory
:class:`~portable_lora.adapter.Adapter` objects and returns a report with ``to_json()`` (the
stable fields the CLI's ``--json`` prints) and ``table()`` (the human-readable text). Bad
input raises :class:`~portable_lora.errors.LoraError`; outputs are written atomically and
never over an existing path unless ``force=True``.

>>> from portable_lora import ops
>>> report = ops.inspect("adapter_dir", base="model.safetensors")        # doctest: +SKIP
>>> ops.convert("adapter_dir", "adapter.safetensors", to="kohya")         # doctest: +SKIP
>>> ops.merge("model.safetensors", "adapter_dir", "merged.safetensors")   # doctest: +SKIP
>>> ops.verify("adapter_dir", "adapter.safetensors").ok                   # doctest: +SKIP
"""

from ._check import CheckReport, check, example_adapter
from ._checkpoint import INDEX_NAME, Checkpoint, match_modules
from ._convert import ConvertReport, convert
from ._demo import DemoReport, demo
from ._extract import ExtractReport, extract
from ._inspect import STRONG, WEAK, BaseComparison, InspectReport, inspect
from ._merge import MERGE_METADATA_KEY, MergeReport, merge, merge_tensor
from ._resize import ResizeReport, resize, resize_adapter
from ._verify import AUTO_RTOL, VerifyReport, verify

__all__ = [
    "inspect", "convert", "merge", "extract", "resize", "verify", "check", "demo",
    "InspectReport", "BaseComparison", "ConvertReport", "MergeReport", "ExtractReport",
    "ResizeReport", "VerifyReport", "CheckReport", "DemoReport",
    "Checkpoint", "match_modules", "merge_tensor", "resize_adapter", "example_adapter",
    "WEAK", "STRONG", "AUTO_RTOL", "INDEX_NAME", "MERGE_METADATA_KEY",
]
