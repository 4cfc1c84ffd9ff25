"""Checks on loaded adapters that do not belong in the pure math core.

Loading an adapter whose factors hold NaN or infinity is allowed (inspecting it, or converting
it bit-exactly, is useful), but merging one would poison every weight it touches. Merge paths
call :func:`check_finite` first; their ``allow_nonfinite`` switch turns the refusal into a
warning.

>>> import numpy as np, portable_lora as pl
>>> adapter = pl.examples.random_adapter({"q": (4, 3)}, rank=2)
>>> check_finite(adapter)
{}
>>> adapter["q"].B[0, 0] = np.nan
>>> check_finite(adapter)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
portable_lora.errors.LoraError: [q.lora_B]: 1 of 8 values are NaN or infinite (module 'q'); ...
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

import numpy as np

from .adapter import LoraModule
from .errors import LoraError

__all__ = ["check_finite", "nonfinite_counts", "NonFiniteWarning"]


class NonFiniteWarning(UserWarning):
    """An adapter with NaN or infinite values is being used because the caller allowed it."""


def _tensors(module: LoraModule) -> list[tuple[str, np.ndarray]]:
    out = [("lora_A", module.A), ("lora_B", module.B)]
    if module.magnitude is not None:
        out.append(("magnitude", module.magnitude))
    return out


def nonfinite_counts(adapter: Mapping[str, LoraModule]) -> dict[str, tuple[int, int]]:
    """``{"<module>.<tensor>": (non-finite count, size)}`` for every tensor holding NaN or ±inf."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in adapter.items():
        for label, array in _tensors(module):
            array = np.asarray(array)
            if array.dtype.kind in "iub":
                continue  # integers cannot be NaN
            # float32 is exact for every narrower float (bf16, f16, f8), which NumPy's
            # isfinite may not know natively
            values = array if array.dtype.kind == "f" else array.astype(np.float32)
            bad = int(array.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                found[f"{name}.{label}"] = (bad, int(array.size))
    return found


def check_finite(adapter: Mapping[str, LoraModule], *, file: str | os.PathLike | None = None,
                 allow_nonfinite: bool = False) -> dict[str, tuple[int, int]]:
    """Refuse an adapter with NaN or infinite factors or magnitudes before it is merged.

    Raises :class:`LoraError` naming ``file``, the first bad tensor (``<module>.lora_A``,
    ``.lora_B`` or ``.magnitude``) and how many of its values are not finite, plus how many
    tensors are affected in all. With ``allow_nonfinite=True`` it warns with
    :class:`NonFiniteWarning` instead. Returns :func:`nonfinite_counts` (empty when all is
    finite).
    """
    found = nonfinite_counts(adapter)
    if not found:
        return found
    key, (bad, size) = next(iter(found.items()))
    module = key.rsplit(".", 1)[0]
    more = f" ({len(found) - 1} more tensors too)" if len(found) > 1 else ""
    detail = (f"{bad} of {size} values are NaN or infinite (module {module!r}){more}; merging "
              "would write them into the base weights")
    if allow_nonfinite:
        where = f"{file} " if file is not None else ""
        warnings.warn(f"{where}[{key}]: {detail}; merging anyway because non-finite values were "
                      "allowed", NonFiniteWarning, stacklevel=2)
        return found
    raise LoraError(f"{detail}. Pass allow_nonfinite=True (--allow-nonfinite on the command "
                    "line) to merge anyway.", file=file, key=key)
