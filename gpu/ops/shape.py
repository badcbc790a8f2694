"""Reshape on the GPU: the twin of ``reference.ops.shape``.

Equation (1) of the reference::

    y = reshape(x, shape)        dx = reshape(dy, x.shape)                   (1)

A reshape of a C-contiguous CuPy array is a view (no kernel); a non-contiguous one is copied first,
by CuPy, exactly as NumPy does. No kernel of its own is needed.
"""

from __future__ import annotations

import cupy as cp

from reference.caches import ReshapeCache, grad_flags

__all__ = ["reshape_forward", "reshape_backward"]


def reshape_forward(x: cp.ndarray, shape, needs_input_grad=None):
    grad_flags("reshape", needs_input_grad, 1)
    return x.reshape(shape), ReshapeCache(tuple(x.shape))


def reshape_backward(dy: cp.ndarray, cache: ReshapeCache):
    return (dy.reshape(cache.x_shape),)  # (1)
