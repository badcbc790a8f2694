"""Elementwise arithmetic with broadcasting, ReLU, absolute value, and the sum and mean reductions.

Broadcasting. For ``y = f(a, b)`` with ``a`` and ``b`` broadcast to ``y.shape``,
the chain rule sums over every axis along which an input was repeated::

    da = unbroadcast(dy * df/da, a.shape)                                   (1)

where ``unbroadcast`` sums the leading axes that broadcasting added and the
axes where ``a`` had length 1 (keeping them, with length 1).

Arithmetic, with ``dy`` the upstream gradient:

    add:  y = a + b       da = dy            db = dy                         (2)
    sub:  y = a - b       da = dy            db = -dy                        (3)
    mul:  y = a * b       da = dy * b        db = dy * a                     (4)
    div:  y = a / b       da = dy / b        db = -dy * a / b**2             (5)

ReLU, with the subgradient at the kink fixed to 0 (as in PyTorch)::

    y = max(x, 0)         dx = dy * [x > 0]                                  (6)

Reductions::

    sum:  y = sum_A x     dx = broadcast(dy, x.shape)                        (7)
    mean: y = sum_A x / n dx = broadcast(dy, x.shape) / n,  n = prod(x.shape[A])   (8)

Absolute value, with the subgradient at the kink fixed to ``sign(0) = 0``::

    y = |x|               dx = dy * sign(x)                                  (9)

A Python scalar operand gets no gradient (its slot in the result is None).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "unbroadcast",
    "add_forward",
    "add_backward",
    "sub_forward",
    "sub_backward",
    "mul_forward",
    "mul_backward",
    "div_forward",
    "div_backward",
    "relu_forward",
    "relu_backward",
    "sum_forward",
    "sum_backward",
    "mean_forward",
    "mean_backward",
    "abs_forward",
    "abs_backward",
]


def unbroadcast(g: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray | None:
    """Sum ``g`` down to ``shape``, undoing NumPy broadcasting (equation (1)).

    ``shape`` None means the operand was a Python scalar: no gradient.
    """
    if shape is None:
        return None
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if hasattr(x, "shape") else None


class BinaryCache(NamedTuple):
    a: Any
    b: Any
    a_shape: tuple[int, ...] | None
    b_shape: tuple[int, ...] | None


def add_forward(a, b):
    return a + b, BinaryCache(None, None, _shape(a), _shape(b))


def add_backward(dy, cache: BinaryCache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(dy, cache.b_shape)  # (2)


def sub_forward(a, b):
    return a - b, BinaryCache(None, None, _shape(a), _shape(b))


def sub_backward(dy, cache: BinaryCache):
    db = None if cache.b_shape is None else unbroadcast(-dy, cache.b_shape)  # (3)
    return unbroadcast(dy, cache.a_shape), db


def mul_forward(a, b):
    return a * b, BinaryCache(a, b, _shape(a), _shape(b))


def mul_backward(dy, cache: BinaryCache):
    da = None if cache.a_shape is None else unbroadcast(dy * cache.b, cache.a_shape)  # (4)
    db = None if cache.b_shape is None else unbroadcast(dy * cache.a, cache.b_shape)  # (4)
    return da, db


def div_forward(a, b):
    return a / b, BinaryCache(a, b, _shape(a), _shape(b))


def div_backward(dy, cache: BinaryCache):
    da = None if cache.a_shape is None else unbroadcast(dy / cache.b, cache.a_shape)  # (5)
    db = None
    if cache.b_shape is not None:
        db = unbroadcast(-dy * cache.a / (cache.b * cache.b), cache.b_shape)  # (5)
    return da, db


class ReluCache(NamedTuple):
    positive: np.ndarray  # [x > 0], the subgradient 0 at x == 0


def relu_forward(x):
    positive = x > 0
    return x * positive, ReluCache(positive)


def relu_backward(dy, cache: ReluCache):
    return (dy * cache.positive,)  # (6)


class ReduceCache(NamedTuple):
    x_shape: tuple[int, ...]
    axis: tuple[int, ...]
    keepdims: bool
    count: int


def _reduce_cache(x, axis, keepdims) -> ReduceCache:
    if axis is None:
        axes = tuple(range(x.ndim))
    else:
        axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    count = 1
    for a in axes:
        count *= x.shape[a]
    return ReduceCache(tuple(x.shape), axes, keepdims, count)


def _expand(dy, cache: ReduceCache):
    if not cache.keepdims:
        # (reduced shape) -> (x.shape with 1 at every reduced axis)
        dy = dy.reshape([1 if i in cache.axis else n for i, n in enumerate(cache.x_shape)])
    return dy


def sum_forward(x, axis=None, keepdims: bool = False):
    cache = _reduce_cache(x, axis, keepdims)
    return x.sum(axis=cache.axis, keepdims=keepdims), cache


def sum_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache)
    return (np.broadcast_to(dy, cache.x_shape).copy(),)  # (7)


def mean_forward(x, axis=None, keepdims: bool = False):
    cache = _reduce_cache(x, axis, keepdims)
    return x.mean(axis=cache.axis, keepdims=keepdims), cache


def mean_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache) / cache.count
    return (np.broadcast_to(dy, cache.x_shape).copy(),)  # (8)


class AbsCache(NamedTuple):
    sign: np.ndarray  # sign(x), 0 at x == 0: the subgradient of (9)


def abs_forward(x):
    return np.abs(x), AbsCache(np.sign(x))


def abs_backward(dy, cache: AbsCache):
    return (dy * cache.sign,)  # (9)
