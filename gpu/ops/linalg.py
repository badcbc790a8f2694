"""Matmul with broadcast batch axes, and the fully connected layer, on cuBLAS: the twin of ``reference.ops.linalg``.

The equations are the reference's, cited by number: (1) the batched product, (2) and (3) its
gradients summed over broadcast batch axes, (4) the linear layer ``y = x @ w^T + b``, (5)-(7) its
gradients. Every product goes through :func:`gpu.blas.gemm` or :func:`gpu.blas.gemm_batched` (an
explicit cuBLAS compute type, see :mod:`gpu.runtime`), never ``cupy.matmul``.

How batch axes map onto cuBLAS. With ``batch`` the broadcast of the two operands' batch axes and
``B = prod(batch)``, each operand is viewed as one of:

- shared: its batch axes are all 1 (or absent), so it is one 2-D matrix for every batch index;
- stacked: a C-contiguous (B, r, c) array (a view when its batch already has B entries; otherwise a
  ``broadcast_to`` copy).

A shared right operand folds the batch into the rows of one 2-D GEMM ((B*m, k) @ (k, n)); otherwise
``gemm_batched`` runs with a shared 2-D operand broadcast at stride 0. In the backward pass, the
gradient of a shared right operand is one GEMM over the stacked rows, ``sum_i a_i^T dy_i =
A^T DY`` with ``A`` (B*m, k) and ``DY`` (B*m, n), which is (3) with the batch sum done inside the
GEMM; every other broadcast gradient is the batched product summed by ``unbroadcast``.

Operands of different floating dtypes are promoted as NumPy's matmul does; gradients come back in
their input's dtype, as in the reference. The caches are the reference's (:mod:`reference.caches`):
each keeps an operand only for the other's gradient, and a gradient nobody wants
(``needs_input_grad``) is None and is not computed.
"""

from __future__ import annotations

import math

import cupy as cp
import numpy as np

from gpu.blas import gemm, gemm_batched
from reference import contracts
from reference.caches import LinearCache, MatmulCache, grad_flags

from .elementwise import _sum, unbroadcast

__all__ = ["matmul_forward", "matmul_backward", "linear_forward", "linear_backward"]


def _batch_shape(a_batch: tuple[int, ...], b_batch: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of two batch shapes (ValueError, as NumPy's matmul, when they do not broadcast)."""
    return tuple(np.broadcast_shapes(a_batch, b_batch))


def _batch_view(x: cp.ndarray, batch: tuple[int, ...], count: int) -> cp.ndarray:
    """``x`` (..., r, c) as a shared (r, c) matrix or a C-contiguous stacked (count, r, c) array."""
    rows, cols = x.shape[-2:]
    lead = x.shape[:-2]
    if math.prod(lead) == 1:  # batch axes all 1: one matrix serves every batch index
        return x.reshape(rows, cols)
    if math.prod(lead) == count and count > 0:  # no axis repeated: the data is already in batch order
        return cp.ascontiguousarray(x).reshape(count, rows, cols)
    full = cp.broadcast_to(x, (*batch, rows, cols))  # (..., r, c) -> (*batch, r, c), stride 0 views
    return cp.ascontiguousarray(full).reshape(count, rows, cols)


def matmul_forward(a: cp.ndarray, b: cp.ndarray, needs_input_grad=None) -> tuple[cp.ndarray, MatmulCache]:
    """``a @ b`` for (..., m, k) and (..., k, n) with broadcast batch axes (equation (1)).

    The cache keeps ``b`` only for ``da`` (2) and ``a`` only for ``db`` (3).
    """
    need_a, need_b = grad_flags("matmul", needs_input_grad, 2)
    contracts.matmul_shapes(a, b)
    cache = MatmulCache.keep(a, b, need_a, need_b)
    dtype = cp.result_type(a, b)
    a_t, b_t = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if a.ndim == 2 and b.ndim == 2:
        return gemm(a_t, b_t), cache  # (1)
    batch = _batch_shape(a.shape[:-2], b.shape[:-2])
    count = math.prod(batch)
    (m, k), n = a.shape[-2:], b.shape[-1]
    a_v, b_v = _batch_view(a_t, batch, count), _batch_view(b_t, batch, count)
    if b_v.ndim == 2:
        y = gemm(a_v.reshape(math.prod(a_v.shape[:-1]), k), b_v)  # (1)  (B*m, k) @ (k, n), or (m, k) @ (k, n)
    else:
        y = gemm_batched(a_v, b_v)  # (1)  (B, m, k) @ (B, k, n), a 2-D a at stride 0
    return y.reshape(*batch, m, n), cache


def matmul_backward(dy: cp.ndarray, cache: MatmulCache):
    a, b, a_shape, b_shape, a_dtype, b_dtype = cache
    # An unwanted operand's shape is still needed for the batch layout: the other operand's gradient
    # reads that operand, so it is in the cache.
    a_full = a_shape if a_shape is not None else tuple(a.shape)
    b_full = b_shape if b_shape is not None else tuple(b.shape)
    dtype = cp.result_type(dy.dtype, a_dtype, b_dtype)
    dy_t = dy.astype(dtype, copy=False)
    a_t = None if a is None else a.astype(dtype, copy=False)
    b_t = None if b is None else b.astype(dtype, copy=False)
    da = db = None
    if len(a_full) == 2 and len(b_full) == 2:
        if a_shape is not None:
            da = gemm(dy_t, b_t, trans_b=True).astype(a_dtype, copy=False)  # (2)  (m, n) @ (n, k)
        if b_shape is not None:
            db = gemm(a_t, dy_t, trans_a=True).astype(b_dtype, copy=False)  # (3)  (k, m) @ (m, n)
        return da, db

    batch = tuple(dy.shape[:-2])
    count = math.prod(batch)
    (m, k), n = a_full[-2:], b_full[-1]
    b_shared = math.prod(b_full[:-2]) == 1  # b is one matrix for every batch index (_batch_view)
    dy_rows = cp.ascontiguousarray(dy_t).reshape(count * m, n)  # (..., m, n) -> (B*m, n)

    if a_shape is not None:
        b_v = _batch_view(b_t, batch, count)
        if b_shared:  # dy @ b^T for every batch index is one GEMM over the stacked rows
            g_a = gemm(dy_rows, b_v, trans_b=True)  # (2)  (B*m, n) @ (n, k)
        else:
            g_a = gemm_batched(dy_rows.reshape(count, m, n), b_v, trans_b=True)  # (2)  (B, m, n) @ (B, n, k)
        da = unbroadcast(g_a.reshape(*batch, m, k), a_shape)  # (2)  sum over a's broadcast axes
        da = da.astype(a_dtype, copy=False)

    if b_shape is not None:
        a_v = _batch_view(a_t, batch, count)
        if b_shared:  # b's gradient sums over every batch index, A^T DY in one GEMM
            a_rows = a_v.reshape(count * m, k)  # (B, m, k) -> (B*m, k); b and a both shared means B = 1
            db = gemm(a_rows, dy_rows, trans_a=True).reshape(b_shape)  # (3)  (k, B*m) @ (B*m, n)
        else:
            g_b = gemm_batched(a_v, dy_rows.reshape(count, m, n), trans_a=True)  # (3)  (B, k, m) @ (B, m, n)
            db = unbroadcast(g_b.reshape(*batch, k, n), b_shape)  # (3)  sum over b's broadcast axes
        db = db.astype(b_dtype, copy=False)
    return da, db


def linear_forward(
    x: cp.ndarray, w: cp.ndarray, b: cp.ndarray | None = None, needs_input_grad=None
) -> tuple[cp.ndarray, LinearCache]:
    """``x @ w.T + b`` for x (..., in), w (out, in), b (out,) or None (equation (4)).

    The cache keeps ``w`` only for ``dx`` (5) and ``x`` only for ``dw`` (6).
    """
    need_x, need_w, need_b = grad_flags("linear", needs_input_grad, 3)
    contracts.linear_shapes(x, w, b)
    n_out, n_in = w.shape
    rows = math.prod(x.shape[:-1])
    dtype = cp.result_type(x, w)
    x_rows = x.astype(dtype, copy=False).reshape(rows, n_in)  # (..., in) -> (M, in)
    y = gemm(x_rows, w.astype(dtype, copy=False), trans_b=True)  # (4)  (M, in) @ (in, out)
    if b is not None:
        if b.dtype == y.dtype:
            y += b  # (4)  (M, out) + (out,), in place on the fresh product
        else:
            y = y + b  # (4)  promoted as in the reference
    cache = LinearCache(
        x if need_w else None,
        w if need_x else None,
        x.dtype if need_x else None,
        w.dtype if need_w else None,
        b.dtype if b is not None and need_b else None,
        (n_out, n_in),
    )
    return y.reshape(*x.shape[:-1], n_out), cache


def linear_backward(dy: cp.ndarray, cache: LinearCache):
    x, w, x_dtype, w_dtype, b_dtype, (n_out, n_in) = cache
    rows = math.prod(dy.shape[:-1])
    dtype = cp.result_type(dy.dtype, *(v.dtype for v in (x, w) if v is not None))
    dy_rows = dy.astype(dtype, copy=False).reshape(rows, n_out)  # (..., out) -> (M, out)
    dx = dw = db = None
    if x_dtype is not None:
        w_t = w.astype(dtype, copy=False)
        dx = (
            gemm(dy_rows, w_t).reshape(*dy.shape[:-1], n_in).astype(x_dtype, copy=False)
        )  # (5)  (M, out) @ (out, in)
    if w_dtype is not None:
        x_rows = x.astype(dtype, copy=False).reshape(rows, n_in)  # (..., in) -> (M, in)
        dw = gemm(dy_rows, x_rows, trans_a=True).astype(w_dtype, copy=False)  # (6)  (out, M) @ (M, in)
    if b_dtype is not None:
        db = _sum(dy_rows, (0,), False).astype(b_dtype, copy=False)  # (7)
    return dx, dw, db
