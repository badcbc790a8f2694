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

A Python scalar operand gets no gradient (its slot in the result is None),
and neither does an input that the caller marked as needing none
(``needs_input_grad``, see :mod:`reference.ops`); the caches keep only what
the wanted gradients read (``mul`` keeps ``b`` for ``da`` and ``a`` for
``db``; ReLU keeps its output, not a mask).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.caches import AbsCache, BinaryCache, ReduceCache, ReluCache, grad_flags

from .parallel import batch_parts, run_parts

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


def _shape(x: Any, needed: bool = True) -> tuple[int, ...] | None:
    """``x``'s shape, or None when ``x`` gets no gradient (a Python scalar, or not needed)."""
    return tuple(x.shape) if needed and hasattr(x, "shape") else None


def _binary_flags(op: str, needs_input_grad) -> tuple[bool, bool]:
    need_a, need_b = grad_flags(op, needs_input_grad, 2)
    return need_a, need_b


def add_forward(a, b, needs_input_grad=None):
    """``a + b`` (2); two arrays of one shape (a residual connection) are added on parts of the batch."""
    need_a, need_b = _binary_flags("add", needs_input_grad)
    cache = BinaryCache(None, None, _shape(a, need_a), _shape(b, need_b))
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.ndim):
        return a + b, cache
    y = np.empty(a.shape, dtype=np.result_type(a, b))
    run_parts(lambda rows: np.add(a[rows], b[rows], out=y[rows]), _rows_of(y), blas=False)
    return y, cache


def add_backward(dy, cache: BinaryCache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(dy, cache.b_shape)  # (2)


def sub_forward(a, b, needs_input_grad=None):
    need_a, need_b = _binary_flags("sub", needs_input_grad)
    return a - b, BinaryCache(None, None, _shape(a, need_a), _shape(b, need_b))


def sub_backward(dy, cache: BinaryCache):
    db = None if cache.b_shape is None else unbroadcast(-dy, cache.b_shape)  # (3)
    return unbroadcast(dy, cache.a_shape), db


def mul_forward(a, b, needs_input_grad=None):
    """``a * b``; the cache keeps ``b`` only for ``da`` and ``a`` only for ``db`` (4)."""
    a_shape, b_shape = (_shape(v, need) for v, need in zip((a, b), _binary_flags("mul", needs_input_grad)))
    keep_a = a if b_shape is not None else None
    keep_b = b if a_shape is not None else None
    return a * b, BinaryCache(keep_a, keep_b, a_shape, b_shape)


def mul_backward(dy, cache: BinaryCache):
    da = None if cache.a_shape is None else unbroadcast(dy * cache.b, cache.a_shape)  # (4)
    db = None if cache.b_shape is None else unbroadcast(dy * cache.a, cache.b_shape)  # (4)
    return da, db


def div_forward(a, b, needs_input_grad=None):
    """``a / b``; ``da`` reads ``b``, ``db`` reads ``a`` and ``b`` (5)."""
    a_shape, b_shape = (_shape(v, need) for v, need in zip((a, b), _binary_flags("div", needs_input_grad)))
    keep_a = a if b_shape is not None else None
    keep_b = b if a_shape is not None or b_shape is not None else None
    return a / b, BinaryCache(keep_a, keep_b, a_shape, b_shape)


def div_backward(dy, cache: BinaryCache):
    da = None if cache.a_shape is None else unbroadcast(dy / cache.b, cache.a_shape)  # (5)
    db = None
    if cache.b_shape is not None:
        db = unbroadcast(-dy * cache.a / (cache.b * cache.b), cache.b_shape)  # (5)
    return da, db


def relu_forward(x, needs_input_grad=None):
    """``max(x, 0)`` (6); the cache is the output itself: ``[y > 0] = [x > 0]``.

    Run on parts of the batch (:mod:`.parallel`), as is its backward.
    """
    grad_flags("relu", needs_input_grad, 1)
    y = np.empty_like(x)
    # (6): one pass, where x * (x > 0) takes two and a mask; NaN stays NaN
    run_parts(lambda rows: np.maximum(x[rows], 0, out=y[rows]), _rows_of(x), blas=False)
    return y, ReluCache(y)


def relu_backward(dy, cache: ReluCache):
    if dy.shape != cache.y.shape:
        return (dy * (cache.y > 0),)  # (6), broadcast
    dx = np.empty_like(dy)

    def part(rows):
        np.multiply(dy[rows], cache.y[rows] > 0, out=dx[rows])  # (6)

    run_parts(part, _rows_of(dx), blas=False)
    return (dx,)  # 0 at the kink x == 0 (y == 0)


def _rows_of(x) -> list:
    """The batch parts of an array with a batch axis; the whole (``...``) of a 0-d one."""
    return batch_parts(x.shape[0], elements=x.size) if x.ndim else [...]


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


def sum_forward(x, axis=None, keepdims: bool = False, needs_input_grad=None):
    grad_flags("sum", needs_input_grad, 1)
    cache = _reduce_cache(x, axis, keepdims)
    return x.sum(axis=cache.axis, keepdims=keepdims), cache


def sum_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache)
    return (np.broadcast_to(dy, cache.x_shape).copy(),)  # (7)


def mean_forward(x, axis=None, keepdims: bool = False, needs_input_grad=None):
    grad_flags("mean", needs_input_grad, 1)
    cache = _reduce_cache(x, axis, keepdims)
    return x.mean(axis=cache.axis, keepdims=keepdims), cache


def mean_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache) / cache.count
    return (np.broadcast_to(dy, cache.x_shape).copy(),)  # (8)


def abs_forward(x, needs_input_grad=None):
    """``|x|`` (9); the cache is ``x`` itself, ``sign(x)`` is recomputed in the backward."""
    grad_flags("abs", needs_input_grad, 1)
    return np.abs(x), AbsCache(x)


def abs_backward(dy, cache: AbsCache):
    return (dy * np.sign(cache.x),)  # (9)
