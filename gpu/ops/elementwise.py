"""Elementwise arithmetic, ReLU, |x|, sum and mean on the GPU: the twin of ``reference.ops.elementwise``.

The equations are the reference's, cited by number:

- (1) ``unbroadcast``: a broadcast input's gradient sums over the axes it was repeated along;
- (2)-(5) add, sub, mul, div;
- (6) ReLU, subgradient 0 at the kink;
- (7), (8) sum and mean;
- (9) |x|, subgradient ``sign(0) = 0``.

What the GPU changes:

- ReLU forward writes ``y`` and the mask ``[x > 0]`` in one pass, and its backward is one kernel.
- |x| forward writes ``|x|`` and ``sign(x)`` in one pass.
- mul and div backward compute both input gradients in one kernel (inputs broadcast inside the
  kernel), when both operands are arrays of one floating dtype; otherwise (a Python scalar operand,
  mixed dtypes) they fall back to plain CuPy expressions with the reference's type promotion.
- Sums (``sum``, ``mean`` and every ``unbroadcast``) of float32/float64 arrays run in one reduction
  kernel that accumulates in float64 (CuPy's tree reduction: per-thread strided partial sums, then a
  shared-memory tree) and writes the input's dtype. The reference sums in the input dtype with NumPy's
  pairwise summation, so float32 results agree to float32 rounding and float64 results to a few ulps.

A Python scalar operand gets no gradient (None), as in the reference. Nothing here reads a device
value on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cupy as cp

from gpu.kernels import elementwise, reduction

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

# ReLU forward (6): y = x * [x > 0] (as the reference: NaN stays NaN) and the mask, one pass.
_relu_forward_kernel = elementwise(
    "elementwise_relu_forward",
    "T x",
    "T y, bool positive",
    "positive = x > (T)0; y = x * (T)positive",
)

# ReLU backward (6): dx = dy * [x > 0].
_relu_backward_kernel = elementwise(
    "elementwise_relu_backward",
    "T dy, bool positive",
    "T dx",
    "dx = dy * (T)positive",
)

# |x| forward (9): y = |x| and sign(x) (0 at 0, NaN at NaN, as np.sign), one pass.
_abs_forward_kernel = elementwise(
    "elementwise_abs_forward",
    "T x",
    "T y, T sign",
    "y = fabs(x); sign = x > (T)0 ? (T)1 : (x < (T)0 ? (T)-1 : x)",
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


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if hasattr(x, "shape") else None


class BinaryCache(NamedTuple):
    a: Any
    b: Any
    a_shape: tuple[int, ...] | None
    b_shape: tuple[int, ...] | None


# -------------------------------------------------------------------------------------------- arithmetic
def add_forward(a, b):
    return a + b, BinaryCache(None, None, _shape(a), _shape(b))


def add_backward(dy, cache: BinaryCache):
    return unbroadcast(dy, cache.a_shape), unbroadcast(dy, cache.b_shape)  # (2)


def sub_forward(a, b):
    return a - b, BinaryCache(None, None, _shape(a), _shape(b))


def sub_backward(dy, cache: BinaryCache):
    # The sum of -dy is minus the sum of dy exactly (negation is exact), so reduce first, negate after.
    db = None if cache.b_shape is None else -unbroadcast(dy, cache.b_shape)  # (3)
    return unbroadcast(dy, cache.a_shape), db  # (3)


def mul_forward(a, b):
    return a * b, BinaryCache(a, b, _shape(a), _shape(b))


def mul_backward(dy, cache: BinaryCache):
    a, b = cache.a, cache.b
    if _floating(dy, a, b):
        da_full, db_full = _mul_backward_kernel(dy, a, b)  # (4)  both at dy's shape, one pass
        return unbroadcast(da_full, cache.a_shape), unbroadcast(db_full, cache.b_shape)  # (1)
    da = None if cache.a_shape is None else unbroadcast(dy * b, cache.a_shape)  # (4)
    db = None if cache.b_shape is None else unbroadcast(dy * a, cache.b_shape)  # (4)
    return da, db


def div_forward(a, b):
    return a / b, BinaryCache(a, b, _shape(a), _shape(b))


def div_backward(dy, cache: BinaryCache):
    a, b = cache.a, cache.b
    if _floating(dy, a, b):
        da_full, db_full = _div_backward_kernel(dy, a, b)  # (5)  both at dy's shape, one pass
        return unbroadcast(da_full, cache.a_shape), unbroadcast(db_full, cache.b_shape)  # (1)
    da = None if cache.a_shape is None else unbroadcast(dy / b, cache.a_shape)  # (5)
    db = None
    if cache.b_shape is not None:
        db = unbroadcast(-dy * a / (b * b), cache.b_shape)  # (5)
    return da, db


# ------------------------------------------------------------------------------------------------ ReLU
class ReluCache(NamedTuple):
    positive: Any  # bool [x > 0], the subgradient 0 at x == 0


def relu_forward(x):
    if not _floating(x):
        positive = x > 0
        return x * positive, ReluCache(positive)
    y, positive = _relu_forward_kernel(x)
    return y, ReluCache(positive)


def relu_backward(dy, cache: ReluCache):
    if not _floating(dy):
        return (dy * cache.positive,)  # (6)
    return (_relu_backward_kernel(dy, cache.positive),)  # (6)


# ------------------------------------------------------------------------------------------ reductions
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
    return _sum(x, cache.axis, keepdims), cache


def sum_backward(dy, cache: ReduceCache):
    dy = _expand(dy, cache)
    return (cp.broadcast_to(dy, cache.x_shape).copy(),)  # (7)  a fresh C-contiguous array


def mean_forward(x, axis=None, keepdims: bool = False):
    cache = _reduce_cache(x, axis, keepdims)
    if not _floating(x):
        return x.mean(axis=cache.axis, keepdims=keepdims), cache
    return _mean_kernel(x, axis=cache.axis, keepdims=keepdims), cache


def mean_backward(dy, cache: ReduceCache):
    # dy / n elementwise is the same whether divided before or after broadcasting: one pass, new array.
    dy = _expand(dy, cache)
    return (cp.broadcast_to(dy, cache.x_shape) / cache.count,)  # (8)


# -------------------------------------------------------------------------------------- absolute value
class AbsCache(NamedTuple):
    sign: Any  # sign(x), 0 at x == 0: the subgradient of (9)


def abs_forward(x):
    if not _floating(x):
        return cp.abs(x), AbsCache(cp.sign(x))
    y, sign = _abs_forward_kernel(x)
    return y, AbsCache(sign)


def abs_backward(dy, cache: AbsCache):
    return (dy * cache.sign,)  # (9)
