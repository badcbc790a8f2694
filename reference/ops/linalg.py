"""Matrix products: batched matmul with broadcasting, and the fully connected layer.

Matmul. For ``a`` of shape (..., m, k) and ``b`` of shape (..., k, n), the
batch axes (everything before the last two) broadcast as in NumPy, and for each
batch index::

    y_ij = sum_l a_il b_lj                                                  (1)

so, with ``dy`` of shape (..., m, n) and ``T`` swapping the last two axes,
each input's gradient is the batched product, summed back over the batch axes
that broadcasting repeated it along (``unbroadcast``, elementwise (1))::

    da = unbroadcast(dy @ b^T, a.shape)                                     (2)
    db = unbroadcast(a^T @ dy, b.shape)                                     (3)

Linear (``torch.nn.Linear``'s convention). For ``x`` of shape (..., in),
``w`` of shape (out, in) and an optional bias ``b`` of shape (out,)::

    y = x @ w^T + b                                                         (4)

Flattening the leading axes of ``x`` and ``dy`` into one batch axis of
length ``M`` (``X`` is (M, in), ``DY`` is (M, out)), every row contributes to
the shared weight and bias, so their gradients sum over the rows::

    dx = dy @ w                                                             (5)
    dw = DY^T @ X                                                           (6)
    db = sum_rows DY                                                        (7)

``db`` is None when there is no bias. A gradient that the caller does not
need (``needs_input_grad``) is None and is not computed, and the cache keeps
only the operands the wanted gradients read.
"""

from __future__ import annotations

import numpy as np

from reference import contracts
from reference.caches import LinearCache, MatmulCache, grad_flags

from .elementwise import unbroadcast

__all__ = ["matmul_forward", "matmul_backward", "linear_forward", "linear_backward"]


def _swap_last(m: np.ndarray) -> np.ndarray:
    """Transpose the last two axes: (..., p, q) -> (..., q, p)."""
    return np.swapaxes(m, -1, -2)  # (..., p, q) -> (..., q, p)


def matmul_forward(a: np.ndarray, b: np.ndarray, needs_input_grad=None) -> tuple[np.ndarray, MatmulCache]:
    """``a @ b`` for (..., m, k) and (..., k, n) with broadcast batch axes (equation (1)).

    The cache keeps ``b`` only for ``da`` (2) and ``a`` only for ``db`` (3).
    """
    need_a, need_b = grad_flags("matmul", needs_input_grad, 2)
    contracts.matmul_shapes(a, b)
    cache = MatmulCache.keep(a, b, need_a, need_b)
    return np.matmul(a, b), cache


def matmul_backward(dy: np.ndarray, cache: MatmulCache):
    a, b, a_shape, b_shape, a_dtype, b_dtype = cache
    da = db = None
    if a_shape is not None:
        da = unbroadcast(np.matmul(dy, _swap_last(b)), a_shape).astype(a_dtype, copy=False)  # (2)
    if b_shape is not None:
        db = unbroadcast(np.matmul(_swap_last(a), dy), b_shape).astype(b_dtype, copy=False)  # (3)
    return da, db


def linear_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, needs_input_grad=None
) -> tuple[np.ndarray, LinearCache]:
    """``x @ w.T + b`` for x (..., in), w (out, in), b (out,) or None (equation (4)).

    The cache keeps ``w`` only for ``dx`` (5) and ``x`` only for ``dw`` (6).
    """
    need_x, need_w, need_b = grad_flags("linear", needs_input_grad, 3)
    contracts.linear_shapes(x, w, b)
    y = np.matmul(x, w.T)  # w: (out, in) -> (in, out)
    if b is not None:
        y = y + b
    cache = LinearCache(
        x if need_w else None,
        w if need_x else None,
        x.dtype if need_x else None,
        w.dtype if need_w else None,
        b.dtype if b is not None and need_b else None,
        tuple(w.shape),
    )
    return y, cache


def linear_backward(dy: np.ndarray, cache: LinearCache):
    x, w, x_dtype, w_dtype, b_dtype, (n_out, n_in) = cache
    dy_rows = dy.reshape(-1, n_out)  # (..., out) -> (M, out)
    dx = dw = db = None
    if x_dtype is not None:
        dx = np.matmul(dy, w).astype(x_dtype, copy=False)  # (5)
    if w_dtype is not None:
        x_rows = x.reshape(-1, n_in)  # (..., in) -> (M, in)
        dw = np.matmul(dy_rows.T, x_rows).astype(w_dtype, copy=False)  # (6)  dy_rows.T: (M, out) -> (out, M)
    if b_dtype is not None:
        db = dy_rows.sum(axis=0).astype(b_dtype, copy=False)  # (7)
    return dx, dw, db
