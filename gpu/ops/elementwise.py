"""Elementwise arithmetic, ReLU, |x|, sum and mean on the GPU: the twin of ``reference.ops.elementwise``.

The equations are the reference's, cited by number:

- (1) ``unbroadcast``: a broadcast input's gradient sums over the axes it was repeated along;
- (2)-(5) add, sub, mul, div;
- (6) ReLU, subgradient 0 at the kink;
- (7), (8) sum and mean;
- (9) |x|, subgradient ``sign(0) = 0``.

The caches are the reference's (:mod:`reference.caches`) and keep what it keeps: ReLU its output,
|x| its input, mul and div only the operands the wanted gradients read (``needs_input_grad``); a
gradient nobody wants is None and is not computed.

What the GPU changes:

- ReLU's backward is one kernel, ``dy * [y > 0]`` read from the cached output.
- |x| backward is one kernel that forms ``sign(x)`` from the cached input as it multiplies.
- mul and div backward compute both input gradients in one kernel (inputs broadcast inside the
  kernel), when both are wanted and both operands are arrays of one floating dtype; otherwise (one
  gradient wanted, a Python scalar operand, mixed dtypes) each wanted gradient is a plain CuPy
  expression with the reference's type promotion.
- Sums (``sum``, ``mean`` and every ``unbroadcast``) of float32/float64 arrays run in one reduction
  kernel that accumulates in float64 (CuPy's tree reduction: per-thread strided partial sums, then a
  shared-memory tree) and writes the input's dtype. The reference sums in the input dtype with NumPy's
  pairwise summation, so float32 results agree to float32 rounding and float64 results to a few ulps.

A Python scalar operand gets no gradient (None), as in the reference. Nothing here reads a device
value on the host.
"""

from __future__ import annotations

from typing import Any

import cupy as cp

from gpu.kernels import elementwise, reduction
from reference.caches import AbsCache, BinaryCache, ReduceCache, ReluCache, grad_flags

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

# ------------------------------------------------------------------------------------------- kernels
# Sum over the reduced axes, accumulated in double, written in the input's type (equations (1), (7)).
_sum_kernel = reduction(
    "elementwise_sum",
    "T x",
    "T y",
    map_expr="x",
    reduce_expr="a + b",
    post_map_expr="y = (T)a",
    identity="0",
    reduce_type="double",
)

# Mean: the same double sum divided by the number of reduced elements, n = in size / out size (8).
_mean_kernel = reduction(
    "elementwise_mean",
    "T x",
    "T y",
    map_expr="x",
    reduce_expr="a + b",
    post_map_expr="y = (T)(a / (double)(_in_ind.size() / _out_ind.size()))",
    identity="0",
    reduce_type="double",
)

# mul backward (4): both gradients at the broadcast shape in one pass.
_mul_backward_kernel = elementwise(
    "elementwise_mul_backward",
    "T dy, T a, T b",
    "T da, T db",
    "da = dy * b; db = dy * a",
)

# div backward (5): da = dy / b, db = -dy * a / b^2, in the reference's order of operations.
_div_backward_kernel = elementwise(
    "elementwise_div_backward",
    "T dy, T a, T b",
    "T da, T db",
    "da = dy / b; db = (-dy * a) / (b * b)",
)

# ReLU forward (6): y = x * [x > 0] (as the reference: NaN stays NaN).
_relu_forward_kernel = elementwise(
    "elementwise_relu_forward",
    "T x",
    "T y",
    "y = x * (T)(x > (T)0)",
)

# ReLU backward (6): dx = dy * [y > 0], the cached output's sign standing for [x > 0].
_relu_backward_kernel = elementwise(
    "elementwise_relu_backward",
    "T dy, T y",
    "T dx",
    "dx = dy * (T)(y > (T)0)",
)

# |x| backward (9): dx = dy * sign(x), sign(0) = 0 and sign(NaN) = NaN as np.sign.
_abs_backward_kernel = elementwise(
    "elementwise_abs_backward",
    "T dy, T x",
    "T dx",
    "dx = dy * (x > (T)0 ? (T)1 : (x < (T)0 ? (T)-1 : x))",
)


def _floating(*arrays: Any) -> bool:
    """Whether every argument is a CuPy array of one dtype, float32 or float64 (a kernel can take them)."""
    first = arrays[0]
    return (
        all(isinstance(x, cp.ndarray) for x in arrays)
        and first.dtype in (cp.float32, cp.float64)
        and all(x.dtype == first.dtype for x in arrays)
    )


def _sum(x, axis, keepdims: bool):
    """``x.sum(axis, keepdims)`` with float64 accumulation for float32/float64 arrays."""
    if not _floating(x):
        return x.sum(axis=axis, keepdims=keepdims)
    return _sum_kernel(x, axis=axis, keepdims=keepdims)


# --------------------------------------------------------------------------------------- broadcasting
def unbroadcast(g, shape: tuple[int, ...] | None):
    """Sum ``g`` down to ``shape``, undoing broadcasting (equation (1)); None for a Python scalar."""
    if shape is None:
        return None
    if tuple(g.shape) == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return _sum(g, axes, True).reshape(shape)  # (1)


def _shape(x: Any, needed: bool = True) -> tuple[int, ...] | None:
    """``x``'s shape, or None when ``x`` gets no gradient (a Python scalar, or not needed)."""
    return tuple(x.shape) if needed and hasattr(x, "shape") else None


def _binary_shapes(op: str, a, b, needs_input_grad) -> tuple[Any, Any]:
    """``(a_shape, b_shape)`` of the cache: None for an operand that gets no gradient."""
    need_a, need_b = grad_flags(op, needs_input_grad, 2)
    return _shape(a, need_a), _shape(b, need_b)


# -------------------------------------------------------------------------------------------- arithmetic
def add_forward(a, b, needs_input_grad=None):
    return a + b, BinaryCache(None, None, *_binary_shapes("add", a, b, needs_input_grad))


def add_backward(dy, cache: BinaryCache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(dy, cache.b_shape)  # (2)


def sub_forward(a, b, needs_input_grad=None):
    return a - b, BinaryCache(None, None, *_binary_shapes("sub", a, b, needs_input_grad))


def sub_backward(dy, cache: BinaryCache):
    # The sum of -dy is minus the sum of dy exactly (negation is exact), so reduce first, negate after.
    db = None if cache.b_shape is None else -unbroadcast(dy, cache.b_shape)  # (3)
    return unbroadcast(dy, cache.a_shape), db  # (3)


def mul_forward(a, b, needs_input_grad=None):
    """``a * b``; the cache keeps ``b`` only for ``da`` and ``a`` only for ``db`` (4)."""
    a_shape, b_shape = _binary_shapes("mul", a, b, needs_input_grad)
    keep_a = a if b_shape is not None else None
    keep_b = b if a_shape is not None else None
    return a * b, BinaryCache(keep_a, keep_b, a_shape, b_shape)


def mul_backward(dy, cache: BinaryCache):
    a, b = cache.a, cache.b
    if cache.a_shape is not None and cache.b_shape is not None and _floating(dy, a, b):
        da_full, db_full = _mul_backward_kernel(dy, a, b)  # (4)  both at dy's shape, one pass
        return unbroadcast(da_full, cache.a_shape), unbroadcast(db_full, cache.b_shape)  # (1)
    da = None if cache.a_shape is None else unbroadcast(dy * b, cache.a_shape)  # (4)
    db = None if cache.b_shape is None else unbroadcast(dy * a, cache.b_shape)  # (4)
    return da, db


def div_forward(a, b, needs_input_grad=None):
    """``a / b``; ``da`` reads ``b``, ``db`` reads ``a`` and ``b`` (5)."""
    a_shape, b_shape = _binary_shapes("div", a, b, needs_input_grad)
    keep_a = a if b_shape is not None else None
    keep_b = b if a_shape is not None or b_shape is not None else None
    return a / b, BinaryCache(keep_a, keep_b, a_shape, b_shape)


def div_backward(dy, cache: BinaryCache):
    a, b = cache.a, cache.b
    if cache.a_shape is not None and cache.b_shape is not None and _floating(dy, a, b):
        da_full, db_full = _div_backward_kernel(dy, a, b)  # (5)  both at dy's shape, one pass
        return unbroadcast(da_full, cache.a_shape), unbroadcast(db_full, cache.b_shape)  # (1)
    da = None if cache.a_shape is None else unbroadcast(dy / b, cache.a_shape)  # (5)
    db = None
    if cache.b_shape is not None:
        db = unbroadcast(-dy * a / (b * b), cache.b_shape)  # (5)
    return da, db


# ------------------------------------------------------------------------------------------------ ReLU
def relu_forward(x, needs_input_grad=None):
    """``max(x, 0)`` (6); the cache is the output itself: ``[y > 0] = [x > 0]``."""
    grad_flags("relu", needs_input_grad, 1)
    y = _relu_forward_kernel(x) if _floating(x) else x * (x > 0)  # (6)
    return y, ReluCache(y)


def relu_backward(dy, cache: ReluCache):
    if not _floating(dy, cache.y):
        return (dy * (cache.y > 0),)  # (6)
    return (_relu_backward_kernel(dy, cache.y),)  # (6)  0 at the kink x == 0 (y == 0)


# ------------------------------------------------------------------------------------------ reductions
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
    return _sum(x, cache.axis, keepdims), cache


def sum_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache)
    return (cp.broadcast_to(dy, cache.x_shape).copy(),)  # (7)  a fresh C-contiguous array


def mean_forward(x, axis=None, keepdims: bool = False, needs_input_grad=None):
    grad_flags("mean", needs_input_grad, 1)
    cache = _reduce_cache(x, axis, keepdims)
    if not _floating(x):
        return x.mean(axis=cache.axis, keepdims=keepdims), cache
    return _mean_kernel(x, axis=cache.axis, keepdims=keepdims), cache


def mean_backward(dy, cache: ReduceCache):
    # dy / n elementwise is the same whether divided before or after broadcasting: one pass, new array.
    dy = _expand(dy, cache)
    return (cp.broadcast_to(dy, cache.x_shape) / cache.count,)  # (8)


# -------------------------------------------------------------------------------------- absolute value
def abs_forward(x, needs_input_grad=None):
    """``|x|`` (9); the cache is ``x`` itself, ``sign(x)`` is recomputed in the backward."""
    grad_flags("abs", needs_input_grad, 1)
    return cp.abs(x), AbsCache(x)


def abs_backward(dy, cache: AbsCache):
    if not _floating(dy, cache.x):
        return (dy * cp.sign(cache.x),)  # (9)
    return (_abs_backward_kernel(dy, cache.x),)  # (9)  sign(0) = 0
