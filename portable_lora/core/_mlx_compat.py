"""The few array-API functions MLX lacks, and nothing else.

``namespace()`` returns an object that forwards every attribute to ``mlx.core`` except the
ones defined here. Linear-algebra decompositions run on MLX's CPU stream because MLX
implements them only there.
"""

from __future__ import annotations

import functools
import types
from typing import Any


class _Linalg:
    def __init__(self, mx: Any):
        self._mx = mx

    def vector_norm(self, x, /, *, axis=None, keepdims=False, ord=2):
        mx = self._mx
        if ord != 2:
            raise NotImplementedError("only the 2-norm is provided for MLX")
        return mx.sqrt(mx.sum(x * x, axis=axis, keepdims=keepdims))

    def svd(self, x, /, *, full_matrices=True):
        mx = self._mx
        if full_matrices:
            raise NotImplementedError("MLX svd returns reduced factors only")
        u, s, vt = mx.linalg.svd(x, compute_uv=True, stream=mx.cpu)
        k = s.shape[-1]
        return types.SimpleNamespace(U=u[..., :, :k], S=s, Vh=vt[..., :k, :])

    def qr(self, x, /, *, mode="reduced"):
        mx = self._mx
        q, r = mx.linalg.qr(x, stream=mx.cpu)
        return types.SimpleNamespace(Q=q, R=r)

    def __getattr__(self, name):
        return getattr(self._mx.linalg, name)


class _MLXNamespace:
    __name__ = "mlx.core"

    def __init__(self, mx: Any):
        self._mx = mx
        self.linalg = _Linalg(mx)

    def device(self, x):
        return self._mx.default_device()

    def __getattr__(self, name):
        return getattr(self._mx, name)


@functools.lru_cache(maxsize=1)
def namespace() -> _MLXNamespace:
    import mlx.core as mx

    return _MLXNamespace(mx)
