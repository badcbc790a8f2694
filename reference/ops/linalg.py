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

``db`` is None when there is no bias.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from reference.errors import ShapeError

from .elementwise import unbroadcast

__all__ = ["matmul_forward", "matmul_backward", "linear_forward", "linear_backward"]


def _swap_last(m: np.ndarray) -> np.ndarray:
    """Transpose the last two axes: (..., p, q) -> (..., q, p)."""
    return np.swapaxes(m, -1, -2)  # (..., p, q) -> (..., q, p)


class MatmulCache(NamedTuple):
    a: np.ndarray
    b: np.ndarray


def matmul_forward(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, MatmulCache]:
    """``a @ b`` for (..., m, k) and (..., k, n) with broadcast batch axes (equation (1))."""
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(
            f"matmul expects a of shape (..., m, k) and b of shape (..., k, n), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(
            f"matmul: inner sizes differ, a is {tuple(a.shape)} (k={a.shape[-1]}) "
            f"and b is {tuple(b.shape)} (k={b.shape[-2]})"
        )
    return np.matmul(a, b), MatmulCache(a, b)


def matmul_backward(dy: np.ndarray, cache: MatmulCache) -> tuple[np.ndarray, np.ndarray]:
    a, b = cache
    da = unbroadcast(np.matmul(dy, _swap_last(b)), tuple(a.shape))  # (2)
    db = unbroadcast(np.matmul(_swap_last(a), dy), tuple(b.shape))  # (3)
    return da.astype(a.dtype, copy=False), db.astype(b.dtype, copy=False)


class LinearCache(NamedTuple):
    x: np.ndarray
    w: np.ndarray
    b_dtype: Any  # the bias's dtype, None when there is no bias


def linear_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None
) -> tuple[np.ndarray, LinearCache]:
    """``x @ w.T + b`` for x (..., in), w (out, in), b (out,) or None (equation (4))."""
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeError(
            f"linear expects x of shape (..., in) and w of shape (out, in), "
            f"got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ShapeError(f"linear expects a bias of shape ({w.shape[0]},), got {tuple(b.shape)}")
    y = np.matmul(x, w.T)  # w: (out, in) -> (in, out)
    if b is not None:
        y = y + b
    return y, LinearCache(x, w, None if b is None else b.dtype)


def linear_backward(dy: np.ndarray, cache: LinearCache):
    x, w, b_dtype = cache
    n_out, n_in = w.shape
    dy_rows = dy.reshape(-1, n_out)  # (..., out) -> (M, out)
    x_rows = x.reshape(-1, n_in)  # (..., in) -> (M, in)
    dx = np.matmul(dy, w)  # (5)
    dw = np.matmul(dy_rows.T, x_rows)  # (6)  dy_rows.T: (M, out) -> (out, M)
    db = None if b_dtype is None else dy_rows.sum(axis=0).astype(b_dtype, copy=False)  # (7)
    return dx.astype(x.dtype, copy=False), dw.astype(w.dtype, copy=False), db
