"""Synchronised batch norm's two kernels on the GPU: the twin of ``reference.ops.sync_norm``.

Equation numbers are the reference's: (1) the local sums ``(sum x, sum x^2)``,
(2)-(5) normalising with the global sums and count, (6)-(11) the backward of
``elemt``, (12) the backward of ``sums``.

Kernels (no host synchronisation anywhere; every per-channel sum in double):

- ``sync_norm_sum`` (reduction): ``sum_i x_i`` over every axis but the
  channel's, written as float64: the first row of (1) and ``dbeta`` (6).
- ``sync_norm_dot`` (reduction): ``sum_i u_i (v_i - m) s`` with per-channel
  ``m`` and ``s``: the second row of (1) (``u = v = x``, ``m = 0``, ``s = 1``)
  and ``dgamma`` (7) (``u = dy``, ``v = x``, ``m = mu``, ``s`` of (4)).
- ``sync_norm_affine`` (elementwise): ``out_i = (v_i - m) s g + b`` in double,
  written in ``v``'s dtype, with per-channel ``m, s, g, b``: ``y`` of (5)
  (``m = mu``), ``dx`` of (8) (``v = dy``, ``m = 0``, ``s = gamma s``,
  ``g = 1``, ``b = 0``) and ``dx`` of (12) (``v = x``, ``m = 0``,
  ``s = 2 dS2``, ``g = 1``, ``b = dS1``; ``2 x dS2 = x (2 dS2)`` exactly).

The per-channel values (2)-(4) and (9)-(11) are (C,) double arrays formed with
CuPy's array arithmetic.

Where this differs from the reference: the cache keeps ``x`` itself and
``dgamma`` recomputes ``xhat`` inside ``sync_norm_dot``, where the reference
keeps a float64 ``xhat``; the full-size float64 array is not worth its memory
on the GPU, and the two agree to the rounding of one subtraction and one
product per entry.
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from gpu.kernels import elementwise, reduction
from reference.caches import SyncNormElemtCache, SyncNormSumsCache, grad_flags
from reference.errors import ShapeError

__all__ = [
    "sync_batch_norm_sums_forward",
    "sync_batch_norm_sums_backward",
    "sync_batch_norm_elemt_forward",
    "sync_batch_norm_elemt_backward",
]

# ------------------------------------------------------------------------------------------- kernels
# sum_i x_i per channel in double: (1) first row, (6).
_sum = reduction(
    "sync_norm_sum",
    "T x",
    "float64 y",
    map_expr="(double)x",
    reduce_expr="a + b",
    post_map_expr="y = a",
    identity="0",
    reduce_type="double",
)

# sum_i u_i (v_i - m) s per channel in double: (1) second row, (7).
_dot = reduction(
    "sync_norm_dot",
    "T u, T v, float64 m, float64 s",
    "float64 y",
    map_expr="(double)u * (((double)v - m) * s)",
    reduce_expr="a + b",
    post_map_expr="y = a",
    identity="0",
    reduce_type="double",
)

# (v - m) s g + b in double, written in v's type: (5), (8), (12).
_affine = elementwise(
    "sync_norm_affine",
    "T v, float64 m, float64 s, float64 g, float64 b",
    "T out",
    "out = (T)((((double)v - m) * s) * g + b)",
)


def _axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def _per_channel(v: Any, ndim: int) -> Any:
    return v.reshape((1, -1) + (1,) * (ndim - 2))  # (C,) -> (1, C, 1, ..., 1)


def _check_x(op: str, x: Any) -> int:
    if not hasattr(x, "ndim") or x.ndim < 2 or x.dtype.kind != "f":
        got = f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        raise ShapeError(f"{op} expects a floating array of shape (N, C, ...), got {got}")
    return int(x.shape[1])


def _const(value: float, c: int, ndim: int) -> Any:
    return _per_channel(cp.full(c, value, dtype=np.float64), ndim)


def sync_batch_norm_sums_forward(x: Any, needs_input_grad=None) -> tuple[Any, SyncNormSumsCache]:
    """(1): ``(sum x, sum x^2)`` per channel as a (2, C) float64 array."""
    (need_x,) = grad_flags("sync_batch_norm_sums", needs_input_grad, 1)
    c = _check_x("sync_batch_norm_sums", x)
    axes = _axes(x.ndim)
    zero, one = _const(0.0, c, x.ndim), _const(1.0, c, x.ndim)
    sums = cp.stack([_sum(x, axis=axes), _dot(x, x, zero, one, axis=axes)])  # (1): (2, C)
    return sums, SyncNormSumsCache(x if need_x else None)


def sync_batch_norm_sums_backward(dy: Any, cache: SyncNormSumsCache):
    """(12) as one affine pass: ``x (2 dS2) + dS1``."""
    x = cache.x
    if x is None:
        return (None,)
    c, ndim = x.shape[1], x.ndim
    ds = dy.astype(np.float64)
    zero, one = _const(0.0, c, ndim), _const(1.0, c, ndim)
    return (_affine(x, zero, _per_channel(2.0 * ds[1], ndim), one, _per_channel(ds[0], ndim)),)  # (12)


def sync_batch_norm_elemt_forward(
    x: Any,
    gamma: Any,
    beta: Any,
    sums: Any,
    count: Any,
    eps: float = 1e-5,
    needs_input_grad=None,
) -> tuple[Any, SyncNormElemtCache]:
    """(2)-(5), with the reference's checks and cache (``x`` kept instead of ``xhat``)."""
    need_x, need_gamma, need_beta, need_sums, _ = grad_flags("sync_batch_norm_elemt", needs_input_grad, 5)
    c = _check_x("sync_batch_norm_elemt", x)
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None and tuple(v.shape) != (c,):
            raise ShapeError(f"sync_batch_norm_elemt expects {name} of shape ({c},), got {tuple(v.shape)}")
    if tuple(sums.shape) != (2, c) or tuple(count.shape) != (1,):
        raise ShapeError(
            f"sync_batch_norm_elemt expects sums of shape (2, {c}) and count of shape (1,), "
            f"got {tuple(sums.shape)} and {tuple(count.shape)}"
        )
    ndim = x.ndim
    n = count.astype(np.float64)  # (1,): stays on the device (no read of the count)
    s64 = sums.astype(np.float64)
    mean = s64[0] / n  # (2)
    var = cp.maximum(s64[1] / n - mean * mean, 0.0)  # (3)
    inv = 1.0 / cp.sqrt(var + eps)  # (4)
    g = _const(1.0, c, ndim) if gamma is None else _per_channel(gamma.astype(np.float64), ndim)
    b = _const(0.0, c, ndim) if beta is None else _per_channel(beta.astype(np.float64), ndim)
    y = _affine(x, _per_channel(mean, ndim), _per_channel(inv, ndim), g, b)  # (5)
    keep = need_x or need_gamma or need_sums
    cache = SyncNormElemtCache(
        xhat=None,
        x=x if keep else None,
        mean=mean,
        inv_std=inv,
        count=n,
        gamma=gamma,
        x_dtype=x.dtype if need_x else None,
        gamma_dtype=gamma.dtype if (need_gamma and gamma is not None) else None,
        beta_dtype=beta.dtype if (need_beta and beta is not None) else None,
        sums_dtype=sums.dtype if need_sums else None,
        mean_out=mean.astype(x.dtype),
        var_out=var.astype(x.dtype),
    )
    return y, cache


def sync_batch_norm_elemt_backward(dy: Any, cache: SyncNormElemtCache):
    """(6)-(11): ``(dx (8), dgamma (7), dbeta (6), dsums (11, 10), None)``; None where not wanted."""
    ndim = dy.ndim
    c = dy.shape[1]
    axes = _axes(ndim)
    g64 = cp.ones(c, dtype=np.float64) if cache.gamma is None else cache.gamma.astype(np.float64)
    dbeta = _sum(dy, axis=axes)  # (6)
    dgamma = None
    if cache.x is not None and (cache.gamma_dtype is not None or cache.sums_dtype is not None):
        dgamma = _dot(
            dy, cache.x, _per_channel(cache.mean, ndim), _per_channel(cache.inv_std, ndim), axis=axes
        )  # (7)
    dx = None
    if cache.x_dtype is not None:
        zero, one = _const(0.0, c, ndim), _const(1.0, c, ndim)
        dx = _affine(dy, zero, _per_channel(g64 * cache.inv_std, ndim), one, zero)  # (8)
    dsums = None
    if cache.sums_dtype is not None:
        dmu = -g64 * cache.inv_std * dbeta
        dvar = -0.5 * g64 * cache.inv_std**2 * dgamma  # (9)
        ds2 = dvar / cache.count  # (10)
        ds1 = (dmu - 2.0 * cache.mean * dvar) / cache.count  # (11)
        dsums = cp.stack([ds1, ds2]).astype(cache.sums_dtype)  # (2, C)
    dg = None if cache.gamma_dtype is None else dgamma.astype(cache.gamma_dtype)  # (7)
    db = None if cache.beta_dtype is None else dbeta.astype(cache.beta_dtype)  # (6)
    return dx, dg, db, dsums, None
