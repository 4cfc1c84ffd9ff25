"""Framework capabilities beyond the array API, in one small named table.

Two things the standard cannot say:

* ``stop_gradient``: DoRA's weight norm is detached from the graph (PEFT, mlx-lm);
* ``add_matmul``: ``base + a @ b`` as one fused call (``torch.addmm``, ``mx.addmm``), a speed
  path only: the plain array-API expression is the fallback and gives the same result.

Each entry maps a namespace family (see :func:`namespace_family`) to a function. A family not
in the table uses the fallback. Nothing here imports a framework at import time.
"""

from __future__ import annotations

from typing import Any, Callable

from .namespace import namespace_family

__all__ = ["stop_gradient", "add_matmul", "CAPABILITIES", "fused_available"]


def _torch_stop_gradient(x):
    return x.detach()


def _jax_stop_gradient(x):
    import jax

    return jax.lax.stop_gradient(x)


def _mlx_stop_gradient(x):
    import mlx.core as mx

    return mx.stop_gradient(x)


def _torch_add_matmul(base, a, b):
    import torch

    if a.ndim == 2 and base.ndim == 2:
        return torch.addmm(base, a, b)
    return torch.baddbmm(base, a, b) if a.ndim == 3 and b.ndim == 3 else base + a @ b


def _mlx_add_matmul(base, a, b):
    import mlx.core as mx

    return mx.addmm(base, a, b)


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


def add_matmul(xp: Any, base: Any, a: Any, b: Any, *, fused: bool = True) -> Any:
    """``base + a @ b``, through the framework's fused call when ``fused`` and available."""
    fn = _lookup("add_matmul", xp) if fused else None
    if fn is None:
        return base + a @ b
    return fn(base, a, b)
