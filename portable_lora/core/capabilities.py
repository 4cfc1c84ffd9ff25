"""Framework capabilities beyond the array API, in one small named table.

Two things the standard cannot say:

* ``stop_gradient``: DoRA's weight norm is detached from the graph (PEFT, mlx-lm);
* ``add_matmul``: ``base + scale · (a @ b)`` as one fused call (``torch.addmm``, ``mx.addmm``,
  the scale as their ``alpha``), a speed path only: the plain array-API expression
  ``base + (a · scale) @ b`` is the fallback and gives the same result up to rounding;
* ``add_matmul_``: the same, written into ``base`` in place (``Tensor.addmm_``): one pass over
  ``base``, the merge fast path. The fallback is the out-of-place result, which the caller
  copies.

Each entry maps a namespace family (see :func:`namespace_family`) to a function. A family not
in the table uses the fallback. Nothing here imports a framework at import time.
"""

from __future__ import annotations

from typing import Any, Callable

from .namespace import namespace_family

__all__ = ["stop_gradient", "add_matmul", "add_matmul_", "CAPABILITIES", "fused_available"]


def _torch_stop_gradient(x):
    return x.detach()


def _jax_stop_gradient(x):
    import jax

    return jax.lax.stop_gradient(x)


def _mlx_stop_gradient(x):
    import mlx.core as mx

    return mx.stop_gradient(x)


def _torch_add_matmul(base, a, b, scale):
    if b.ndim != 2 or a.ndim != base.ndim or a.dtype != b.dtype or a.dtype != base.dtype:
        # batched b, broadcasting or mixed dtypes: addmm takes none of them
        return base + (a * scale) @ b
    if a.ndim == 2:
        return base.addmm(a, b, alpha=scale)
    # (..., n, k) @ (k, m): flatten the leading axes (views of contiguous activations)
    flat = base.reshape(-1, base.shape[-1]).addmm(a.reshape(-1, a.shape[-1]), b, alpha=scale)
    return flat.view(base.shape)


def _torch_add_matmul_(base, a, b, scale):
    if a.ndim != 2 or b.ndim != 2 or not (base.dtype == a.dtype == b.dtype):
        return None
    return base.addmm_(a, b, alpha=scale)


def _mlx_add_matmul(base, a, b, scale):
    import mlx.core as mx

    return mx.addmm(base, a, b, alpha=scale)


CAPABILITIES: dict[str, dict[str, Callable[..., Any]]] = {
    "stop_gradient": {
        "torch": _torch_stop_gradient,
        "jax": _jax_stop_gradient,
        "mlx": _mlx_stop_gradient,
    },
    "add_matmul": {
        "torch": _torch_add_matmul,
        "mlx": _mlx_add_matmul,
    },
    "add_matmul_": {
        "torch": _torch_add_matmul_,
    },
}


def _lookup(capability: str, xp: Any):
    return CAPABILITIES[capability].get(namespace_family(xp))


def fused_available(capability: str, xp: Any) -> bool:
    """Whether ``xp`` has a native implementation of ``capability`` in the table."""
    return _lookup(capability, xp) is not None


def stop_gradient(xp: Any, x: Any) -> Any:
    """``x`` with gradients stopped; the identity where the library has no autograd."""
    fn = _lookup("stop_gradient", xp)
    return x if fn is None else fn(x)


def add_matmul(xp: Any, base: Any, a: Any, b: Any, *, scale: float = 1.0, fused: bool = True) -> Any:
    """``base + scale · (a @ b)``, through the framework's fused call when ``fused`` and available.

    ``a`` may have leading batch axes (``(..., n, k) @ (k, m)``); the plain path scales ``a``
    (put the smaller operand first) and the fused path passes ``scale`` as ``alpha``.

    >>> import numpy as np
    >>> add_matmul(np, np.zeros((1, 2)), np.ones((1, 3)), np.ones((3, 2)), scale=0.5)
    array([[1.5, 1.5]])
    """
    fn = _lookup("add_matmul", xp) if fused else None
    if fn is None:
        return base + (a * scale if scale != 1.0 else a) @ b
    return fn(base, a, b, scale)


def add_matmul_(xp: Any, base: Any, a: Any, b: Any, *, scale: float = 1.0, fused: bool = True) -> Any:
    """``base + scale · (a @ b)``, written into ``base`` where the framework can do it in place.

    Returns ``base`` itself when it was updated in place (2-D operands of ``base``'s dtype, on
    a framework with an in-place fused call: torch), else ``None``: the caller then takes the
    out-of-place path. Never changes ``base`` when it returns ``None``.
    """
    fn = _lookup("add_matmul_", xp) if fused else None
    return None if fn is None else fn(base, a, b, scale)
