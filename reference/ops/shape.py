"""Reshape (flatten is a reshape).

y = reshape(x, shape)        dx = reshape(dy, x.shape)                   (1)
"""

from __future__ import annotations

from reference.caches import ReshapeCache, grad_flags

__all__ = ["reshape_forward", "reshape_backward"]


def reshape_forward(x, shape, needs_input_grad=None):
    grad_flags("reshape", needs_input_grad, 1)
    return x.reshape(shape), ReshapeCache(tuple(x.shape))


def reshape_backward(dy, cache: ReshapeCache):
    return (dy.reshape(cache.x_shape),)  # (1)
