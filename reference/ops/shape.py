"""Reshape (flatten is a reshape).

y = reshape(x, shape)        dx = reshape(dy, x.shape)                   (1)
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["reshape_forward", "reshape_backward"]


class ReshapeCache(NamedTuple):
    x_shape: tuple[int, ...]


def reshape_forward(x, shape):
    return x.reshape(shape), ReshapeCache(tuple(x.shape))


def reshape_backward(dy, cache: ReshapeCache):
    return (dy.reshape(cache.x_shape),)  # (1)
