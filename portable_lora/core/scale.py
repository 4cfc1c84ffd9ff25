"""Effective scale: what a stored (alpha, rank) pair means under each tool's rule.

=================  =====================  =============================================
rule               effective scale        used by
=================  =====================  =============================================
``alpha/rank``     alpha / rank           PEFT, kohya/LyCORIS, Keras 3, diffusers
``alpha/sqrt(rank)`` alpha / sqrt(rank)   rsLoRA (PEFT ``use_rslora``)
``raw``            alpha                  mlx-lm ``scale``, DiffSynth 1.x, legacy mlx-vlm
=================  =====================  =============================================
"""

from __future__ import annotations

import math
import numbers

from ..errors import LoraError

__all__ = ["RULES", "ALPHA_OVER_RANK", "ALPHA_OVER_SQRT_RANK", "RAW", "effective_scale",
           "check_rank", "check_alpha", "check_rule", "alpha_for_scale", "check_strength"]

ALPHA_OVER_RANK = "alpha/rank"
ALPHA_OVER_SQRT_RANK = "alpha/sqrt(rank)"
RAW = "raw"
RULES = (ALPHA_OVER_RANK, ALPHA_OVER_SQRT_RANK, RAW)


def _where(module: str | None) -> str:
    return f"module {module!r}: " if module else ""


def check_rule(rule: object, *, module: str | None = None) -> str:
    if rule not in RULES:
        raise LoraError(f"{_where(module)}unknown scaling rule {rule!r}; expected one of {', '.join(RULES)}",
                        key=module)
    return rule  # type: ignore[return-value]


def check_rank(rank: object, *, module: str | None = None) -> int:
    """``rank`` as an int; a bool, a float, or a value <= 0 is an error."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise LoraError(f"{_where(module)}rank must be a positive integer, found {rank!r} "
                        f"({type(rank).__name__})", key=module)
    if rank <= 0:
        raise LoraError(f"{_where(module)}rank must be a positive integer, found {rank}", key=module)
    return int(rank)


def check_alpha(alpha: object, *, module: str | None = None) -> float:
    """``alpha`` as a finite float; a bool, a non-number, NaN or infinity is an error."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise LoraError(f"{_where(module)}alpha must be a finite real number, found {alpha!r} "
                        f"({type(alpha).__name__})", key=module)
    try:
        value = float(alpha)
    except OverflowError:
        raise LoraError(f"{_where(module)}alpha {str(alpha)[:20]}... is too large", key=module) from None
    if not math.isfinite(value):
        raise LoraError(f"{_where(module)}alpha must be finite, found {value}", key=module)
    return value


def effective_scale(alpha: float, rank: int, rule: str = ALPHA_OVER_RANK, *,
                    module: str | None = None) -> float:
    """The number that multiplies ``B @ A``.

    >>> effective_scale(16, 8)
    2.0
    >>> effective_scale(16, 4, "alpha/sqrt(rank)")
    8.0
    >>> effective_scale(20.0, 8, "raw")
    20.0
    """
    rule = check_rule(rule, module=module)
    rank = check_rank(rank, module=module)
    alpha = check_alpha(alpha, module=module)
    if rule == ALPHA_OVER_RANK:
        return alpha / rank
    if rule == ALPHA_OVER_SQRT_RANK:
        return alpha / math.sqrt(rank)
    return alpha


def alpha_for_scale(scale: float, rank: int, rule: str) -> float:
    """The alpha that gives ``scale`` at ``rank`` under ``rule`` (inverse of effective_scale)."""
    rule = check_rule(rule)
    rank = check_rank(rank)
    if rule == ALPHA_OVER_RANK:
        return scale * rank
    if rule == ALPHA_OVER_SQRT_RANK:
        return scale * math.sqrt(rank)
    return scale


def check_strength(strength: object) -> float:
    """A user strength multiplier as a finite float (bools and non-numbers are errors)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise LoraError(f"strength must be a finite real number, found {strength!r} "
                        f"({type(strength).__name__})", key="strength")
    try:
        value = float(strength)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise LoraError(f"strength must be a finite real number, found {value}", key="strength")
    return value
