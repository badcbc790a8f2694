"""Batch norm whose statistics come from outside: the two kernels of synchronised batch norm.

With several processes each holding a shard ``x^(r)`` (N_r, C, ...) of one
global batch, synchronised batch norm normalises every shard with the
statistics of the whole batch. Per channel, with ``n`` the number of entries
of that channel over all shards::

    S1 = sum_r sum_i x_i^(r)          S2 = sum_r sum_i (x_i^(r))^2          (1)
    mu  = S1 / n                                                            (2)
    var = S2 / n - mu^2       (biased; clamped at 0)                        (3)
    s   = (var + eps)^(-1/2)                                                (4)
    xhat_i = (x_i - mu) s,    y_i = gamma xhat_i + beta                     (5)

The sum over the processes (an all-reduce) is not a kernel: the kernels are

- ``sync_batch_norm_sums``: one process's part of (1), ``(sum x, sum x^2)``
  per channel, as a (2, C) float64 array;
- ``sync_batch_norm_elemt``: (2)-(5) from the global ``(S1, S2)`` (2, C) and
  the global count ``n`` (a (1,) float64 array, not differentiated).

:func:`reference.functional.sync_batch_norm` chains them with the all-reduce
between, and the backward of that all-reduce sums the cotangent of ``(S1, S2)``
over the processes.

Backward of ``elemt``, with ``dy`` the local upstream gradient. From (5)::

    dbeta  = sum_i dy_i                                                     (6)
    dgamma = sum_i dy_i xhat_i                                              (7)
    dx_i  (through (5) alone, mu and s held) = gamma s dy_i                 (8)

Through ``mu`` and ``s``: d y_i / d mu = -gamma s and d y_i / d s = gamma (x_i - mu), so::

    dmu = -gamma s dbeta,     ds = gamma sum_i dy_i (x_i - mu) = gamma dgamma / s
    dvar = ds d s / d var = -(1/2) s^3 ds = -(1/2) gamma s^2 dgamma         (9)

and through (3) and (2), ``d var / d S2 = 1/n``, ``d var / d mu = -2 mu``, ``d mu / d S1 = 1/n``::

    dS2 = dvar / n                                                          (10)
    dS1 = (dmu - 2 mu dvar) / n                                             (11)

Backward of ``sums``: ``d S1 / d x_i = 1``, ``d S2 / d x_i = 2 x_i``, so::

    dx_i = dS1 + 2 x_i dS2                                                  (12)

The whole synchronised batch norm. The all-reduce's backward makes ``dS1``
and ``dS2`` the sums of (11) and (10) over the processes; each process then
adds (12) to (8). With ``DB = sum_r dbeta^(r)`` and ``DG = sum_r dgamma^(r)``,
(9)-(12) give ``dS1 + 2 x_j dS2 = -gamma s DB / n + 2 (x_j - mu) dvar / n``
and ``2 (x_j - mu) dvar / n = -gamma s xhat_j DG / n``, so::

    dx_j = gamma s (dy_j - DB / n - xhat_j DG / n)                          (13)

which is the one-process batch-norm gradient (``reference.ops.norm`` (10))
with the sums taken over the whole batch: the synchronised forward and
backward compute what one process computes on the global batch. The parameter
gradients (6) and (7) stay local; the data-parallel gradient sum adds them.

Numerics: (1) is accumulated in float64 and kept in float64, because (3)
subtracts two nearly equal numbers when ``|mu|`` is large against the spread:
its relative error is about ``1e-16 mu^2 / var``, negligible for
batch-norm inputs. (2)-(5) are evaluated in float64 per channel and ``y`` is
written in ``x``'s dtype; every gradient comes back in its input's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.caches import SyncNormElemtCache, SyncNormSumsCache, grad_flags
from reference.errors import ShapeError

__all__ = [
    "sync_batch_norm_sums_forward",
    "sync_batch_norm_sums_backward",
    "sync_batch_norm_elemt_forward",
    "sync_batch_norm_elemt_backward",
]

_ACC = np.float64


def _axes(ndim: int) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0, *range(2, ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))  # (C,) -> (1, C, 1, ..., 1)


def _check_x(op: str, x: Any) -> int:
    if not hasattr(x, "ndim") or x.ndim < 2 or x.dtype.kind != "f":
        got = f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        raise ShapeError(f"{op} expects a floating array of shape (N, C, ...), got {got}")
    return int(x.shape[1])


def sync_batch_norm_sums_forward(
    x: np.ndarray, needs_input_grad=None
) -> tuple[np.ndarray, SyncNormSumsCache]:
    """This process's ``(sum x, sum x^2)`` per channel (1): (N, C, ...) -> (2, C) float64."""
    (need_x,) = grad_flags("sync_batch_norm_sums", needs_input_grad, 1)
    _check_x("sync_batch_norm_sums", x)
    axes = _axes(x.ndim)
    x64 = x.astype(_ACC)
    sums = np.stack([x64.sum(axis=axes), np.square(x64).sum(axis=axes)])  # (1): (2, C)
    return sums, SyncNormSumsCache(x if need_x else None)


def sync_batch_norm_sums_backward(dy: np.ndarray, cache: SyncNormSumsCache):
    """(12): ``dx = dS1 + 2 x dS2``, with ``dy`` = ``(dS1, dS2)`` (2, C)."""
    x = cache.x
    if x is None:
        return (None,)
    ds1, ds2 = _per_channel(dy[0], x.ndim), _per_channel(dy[1], x.ndim)
    return ((ds1 + 2.0 * x.astype(_ACC) * ds2).astype(x.dtype),)  # (12)


def sync_batch_norm_elemt_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    sums: np.ndarray,
    count: np.ndarray,
    eps: float = 1e-5,
    needs_input_grad=None,
) -> tuple[np.ndarray, SyncNormElemtCache]:
    """(2)-(5): ``x`` normalised with the global ``sums`` (2, C) over ``count`` (1,) entries per channel.

    The cache's ``mean`` and ``var`` (C,) in ``x``'s dtype are (2) and (3), for
    the running statistics.
    """
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
    n = count.astype(_ACC)[0]
    if not n >= 1:
        raise ShapeError(f"sync_batch_norm_elemt needs a positive count, got {n}")
    mean64 = sums[0].astype(_ACC) / n  # (2)
    var64 = np.maximum(sums[1].astype(_ACC) / n - mean64 * mean64, 0.0)  # (3)
    inv64 = 1.0 / np.sqrt(var64 + eps)  # (4)
    xhat = (x.astype(_ACC) - _per_channel(mean64, x.ndim)) * _per_channel(inv64, x.ndim)  # (5)
    y64 = xhat
    if gamma is not None:
        y64 = y64 * _per_channel(gamma.astype(_ACC), x.ndim)
    if beta is not None:
        y64 = y64 + _per_channel(beta.astype(_ACC), x.ndim)
    y = y64.astype(x.dtype)
    keep = need_x or need_gamma or need_sums
    cache = SyncNormElemtCache(
        xhat=xhat if keep else None,
        x=None,
        mean=mean64,
        inv_std=inv64,
        count=n,
        gamma=gamma,
        x_dtype=x.dtype if need_x else None,
        gamma_dtype=gamma.dtype if (need_gamma and gamma is not None) else None,
        beta_dtype=beta.dtype if (need_beta and beta is not None) else None,
        sums_dtype=sums.dtype if need_sums else None,
        mean_out=mean64.astype(x.dtype),
        var_out=var64.astype(x.dtype),
    )
    return y, cache


def sync_batch_norm_elemt_backward(dy: np.ndarray, cache: SyncNormElemtCache):
    """(6)-(11): ``(dx (8), dgamma (7), dbeta (6), dsums (11, 10), None)``; None where not wanted."""
    ndim = dy.ndim
    axes = _axes(ndim)
    dy64 = dy.astype(_ACC)
    g64 = np.ones_like(cache.inv_std) if cache.gamma is None else cache.gamma.astype(_ACC)
    dbeta = dy64.sum(axis=axes)  # (6)
    dgamma = (dy64 * cache.xhat).sum(axis=axes) if cache.xhat is not None else None  # (7)
    dx = None
    if cache.x_dtype is not None:
        dx = (_per_channel(g64 * cache.inv_std, ndim) * dy64).astype(cache.x_dtype)  # (8)
    dsums = None
    if cache.sums_dtype is not None:
        dmu = -g64 * cache.inv_std * dbeta
        dvar = -0.5 * g64 * cache.inv_std**2 * dgamma  # (9)
        ds2 = dvar / cache.count  # (10)
        ds1 = (dmu - 2.0 * cache.mean * dvar) / cache.count  # (11)
        dsums = np.stack([ds1, ds2]).astype(cache.sums_dtype)  # (2, C)
    dg = None if cache.gamma_dtype is None else dgamma.astype(cache.gamma_dtype)  # (7)
    db = None if cache.beta_dtype is None else dbeta.astype(cache.beta_dtype)  # (6)
    return dx, dg, db, dsums, None
