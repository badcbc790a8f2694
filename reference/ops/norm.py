"""Batch normalisation, per channel, in training and evaluation mode.

``x`` is (N, C, H, W) or (N, C) (more generally (N, C, ...)); every statistic
is per channel ``c``, over the ``n = N * H * W`` entries ``x_i`` of that
channel (``n = N`` for 2-D input). ``gamma`` and ``beta`` have shape (C,);
either may be None (no affine scale or shift), and then gets no gradient.

Training mode normalises with the batch statistics (the biased variance)::

    mu   = (1/n) sum_i x_i                                                  (1)
    var  = (1/n) sum_i (x_i - mu)^2                                         (2)
    s    = (var + eps)^(-1/2)                                               (3)
    xhat_i = (x_i - mu) s                                                   (4)
    y_i  = gamma xhat_i + beta                                              (5)

The kernel does not touch the running statistics: the cache exposes ``mean``
(1) and ``var`` (2) and :func:`reference.functional.batch_norm` moves the
running averages toward them.

Evaluation mode uses (4) and (5) with ``mu`` and ``var`` replaced by the
given ``running_mean`` and ``running_var``, which are constants.

Backward. With ``dy`` the upstream gradient, (5) gives, in both modes::

    dbeta  = sum_i dy_i                                                     (6)
    dgamma = sum_i dy_i xhat_i                                              (7)
    dxhat_i = gamma dy_i                                                    (8)

In evaluation mode ``mu`` and ``s`` do not depend on ``x``, so::

    dx_i = gamma s dy_i                                                     (9)

In training mode ``mu`` and ``s`` depend on every ``x_j`` of the channel.
From (1), d mu / d x_j = 1/n. From (2), d var / d x_j = (2/n)(x_j - mu) (the
term through ``mu`` is (2/n) sum_i (x_i - mu) (-1/n) = 0). From (3),
d s / d x_j = -(1/2) s^3 d var / d x_j = -(s / n) xhat_j. Then (4) gives::

    d xhat_i / d x_j = s (delta_ij - 1/n) + (x_i - mu) d s / d x_j
                     = (s / n) (n delta_ij - 1 - xhat_i xhat_j)

and summing against (8)::

    dx_j = sum_i dxhat_i d xhat_i / d x_j
         = (gamma s / n) (n dy_j - sum_i dy_i - xhat_j sum_i dy_i xhat_i)
         = (gamma s / n) (n dy_j - dbeta - xhat_j dgamma)                   (10)

The code evaluates (10) divided through by ``n`` inside the bracket,
``gamma s (dy_j - dbeta/n - xhat_j dgamma/n)``, which avoids forming ``n dy``.
Since ``sum_j xhat_j = 0``, (10) gives ``sum_j dx_j = 0`` per channel: the
output ignores a per-channel shift of ``x`` (a test checks it).

dtype: each per-channel sum is formed in two stages, a sum over the spatial
entries of one sample and channel in ``x``'s dtype (contiguous, so NumPy sums it
pairwise, with an error growing like log(H W)), then a sum of those ``N``
partial sums in float64; on feature maps of fewer than ``_SHORT_ROW`` entries
(4x4, 2x2) the batch is summed first instead, all in float64. The variance
takes two passes (the mean first), its squares summed by a dot product per
sample and channel in ``x``'s dtype (no array of squares), then across the
batch in float64; ``dgamma`` (7) likewise.
The results are cast back, so float32 input gives float32 output, statistics
and gradients.

Passes over full-size arrays, the cost of this op: the forward reads ``x`` for
(1), writes ``x - mu`` and reads it for (2), scales it in place to ``xhat`` (4)
and writes ``y`` (5) in two passes (scale, then shift); the backward reads ``dy``
for (6), ``dy`` and ``xhat`` for (7), and evaluates (10) in four passes over
one new buffer.
"""

from __future__ import annotations

import math

import numpy as np

from reference.caches import BatchNormCache, grad_flags
from reference.contracts import batch_norm_channels
from reference.errors import ShapeError

from .parallel import batch_parts, run_parts, sum_in_order

__all__ = ["batch_norm_forward", "batch_norm_backward"]

_ACC = np.float64  # accumulator dtype for the per-channel sums


def _channel_axes(ndim: int) -> tuple[int, ...]:
    """Every axis but the channel axis 1: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)."""
    return (0, *range(2, ndim))


_SHORT_ROW = 64  # rows (entries per sample and channel) shorter than this are summed down the batch


def _per_channel(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A (C,) vector shaped to broadcast against an array of ``shape`` (N, C, ...).

    (1, C, 1, ..., 1) in general. For short rows (a 4x4 or 2x2 feature map) the
    vector is repeated over the spatial axes into (1, C, ...): NumPy's inner loop
    then runs over all C L entries of a sample instead of restarting every L
    entries, several times faster and the same values.
    """
    per_channel = v.reshape((1, -1) + (1,) * (len(shape) - 2))  # (C,) -> (1, C, 1, ..., 1)
    if len(shape) > 2 and math.prod(shape[2:]) < _SHORT_ROW:
        return np.ascontiguousarray(np.broadcast_to(per_channel, (1, *shape[1:])))  # (1, C, H, W)
    return per_channel


def _rows(v: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (N, C, L) with L the entries per sample and channel (1 for 2-D input)."""
    return v.reshape(v.shape[0], v.shape[1], -1)


def _channel_sum(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Per-channel sum over ``axes``: (N, C, ...) -> (C,) in float64.

    Each sample's contiguous row of ``L`` entries is summed in ``v``'s dtype
    (pairwise, and several times faster than a reduction that casts every entry
    to float64), then the ``N`` row sums are accumulated in float64. Rows shorter
    than ``_SHORT_ROW`` are summed the other way round, down the batch first and
    all in float64: one reduction over N rows of C L entries, where one per row
    of L entries would cost more in loop overhead than in arithmetic.
    """
    if len(axes) == 1:
        return v.sum(axis=0, dtype=_ACC)  # (N, C) -> (C,)
    rows = _rows(v)
    if rows.shape[2] < _SHORT_ROW:
        return rows.sum(axis=0, dtype=_ACC).sum(axis=1)  # (N, C, L) -> (C, L) -> (C,)
    return rows.sum(axis=2).sum(axis=0, dtype=_ACC)  # (N, C, L) -> (N, C) -> (C,)


def _channel_dot(u: np.ndarray, v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Per-channel ``sum_i u_i v_i`` over ``axes``: (N, C, ...) twice -> (C,) in float64.

    One dot product per sample and channel row (no full-size product array),
    then the ``N`` row results accumulated in float64, as :func:`_channel_sum`.
    """
    if len(axes) == 1:
        return np.einsum("nc,nc->c", u, v, dtype=_ACC)  # (N, C) -> (C,)
    per_row = np.einsum("ncl,ncl->nc", _rows(u), _rows(v))  # (N, C, L) -> (N, C)
    return per_row.sum(axis=0, dtype=_ACC)  # (N, C) -> (C,)


def batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    training: bool,
    eps: float = 1e-5,
    needs_input_grad=None,
) -> tuple[np.ndarray, BatchNormCache]:
    """Batch norm of ``x`` (N, C, ...) per channel; ``running_*`` are read only in evaluation.

    The cache keeps ``xhat`` (4) only when a gradient reads it: ``dgamma`` (7),
    or ``dx`` in training (10); evaluation's ``dx`` (9) and ``dbeta`` (6) do not.
    Each pass runs on parts of the batch (:mod:`.parallel`); a per-channel sum
    is the sum of the parts' float64 sums.
    """
    need_x, need_gamma, need_beta = grad_flags("batch_norm", needs_input_grad, 5)[:3]
    channels = batch_norm_channels(x, gamma, beta, running_mean, running_var, training)

    dtype = x.dtype
    axes = _channel_axes(x.ndim)
    count = x.size // channels if channels else 0
    parts = batch_parts(x.shape[0], elements=x.size)
    xhat = np.empty_like(x)  # x - mu, scaled to xhat in place below
    if training:
        if count < 1:
            raise ShapeError(
                f"batch_norm in training mode needs at least one entry per channel, got {tuple(x.shape)}"
            )
        total = sum_in_order(run_parts(lambda rows: _channel_sum(x[rows], axes), parts, blas=False))
        mean = (total / count).astype(dtype)  # (1)
        mu = _per_channel(mean, x.shape)

        def centre(rows: slice) -> np.ndarray:
            np.subtract(x[rows], mu, out=xhat[rows])
            return _channel_dot(xhat[rows], xhat[rows], axes)  # (2), second pass

        var64 = sum_in_order(run_parts(centre, parts, blas=False)) / count  # (2)
        var = var64.astype(dtype)
        inv_std = (1.0 / np.sqrt(var64 + eps)).astype(dtype)  # (3)
    else:
        mean = np.asarray(running_mean).astype(dtype)
        mu = _per_channel(mean, x.shape)
        var = np.asarray(running_var).astype(dtype)
        inv_std = (1.0 / np.sqrt(np.asarray(running_var, dtype=_ACC) + eps)).astype(dtype)  # (3)

    y = np.empty_like(xhat)
    s = _per_channel(inv_std, x.shape)
    scale = None if gamma is None else _per_channel(gamma.astype(dtype, copy=False), x.shape)
    shift = None if beta is None else _per_channel(beta.astype(dtype, copy=False), x.shape)

    def normalise(rows: slice) -> None:
        if not training:
            np.subtract(x[rows], mu, out=xhat[rows])
        xhat[rows] *= s  # (4), in place: full-size temporaries are the cost here
        if scale is not None:
            np.multiply(xhat[rows], scale, out=y[rows])  # (5)
        else:
            y[rows] = xhat[rows]
        if shift is not None:
            y[rows] += shift  # (5)

    run_parts(normalise, parts, blas=False)
    needs = (need_x, need_gamma, need_beta)
    cache = BatchNormCache.keep(xhat, inv_std, gamma, beta, mean, var, training, count, dtype, x.ndim, needs)
    return y, cache


def batch_norm_backward(dy: np.ndarray, cache: BatchNormCache):
    """``(dx, dgamma, dbeta, None, None)``: (6), (7), and (9) or (10), on parts of the batch."""
    xhat, inv_std, gamma, _, _, training, count, x_dtype, gamma_dtype, beta_dtype, ndim = cache
    dtype = dy.dtype
    axes = _channel_axes(ndim)
    parts = batch_parts(dy.shape[0], elements=dy.size)

    need_dbeta = beta_dtype is not None or (training and x_dtype is not None)  # (10) reads dbeta

    def sums(rows: slice):
        dbeta_part = _channel_sum(dy[rows], axes) if need_dbeta else None  # (6)
        dgamma_part = None if xhat is None else _channel_dot(dy[rows], xhat[rows], axes)  # (7)
        return dbeta_part, dgamma_part

    partial = run_parts(sums, parts, blas=False) if need_dbeta or xhat is not None else [(None, None)]
    dbeta64 = sum_in_order([b for b, _ in partial])
    dgamma64 = sum_in_order([g for _, g in partial])
    dx = None
    if x_dtype is not None:
        scale = inv_std if gamma is None else gamma.astype(dtype, copy=False) * inv_std  # gamma s, (8)
        scale = _per_channel(scale, dy.shape)
        dx = np.empty(dy.shape, dtype=x_dtype)
        if training:
            dy_mean = _per_channel((dbeta64 / count).astype(dtype), dy.shape)
            dyxhat_mean = _per_channel((dgamma64 / count).astype(dtype), dy.shape)

            def input_gradient(rows: slice) -> None:
                # (10), evaluated in place in the rows of dx
                out = dx[rows]
                np.multiply(xhat[rows], dyxhat_mean, out=out)
                np.subtract(dy[rows], out, out=out)
                out -= dy_mean
                out *= scale
        else:

            def input_gradient(rows: slice) -> None:
                np.multiply(dy[rows], scale, out=dx[rows])  # (9)

        run_parts(input_gradient, parts, blas=False)

    dgamma = None if gamma_dtype is None else dgamma64.astype(gamma_dtype)
    dbeta = None if beta_dtype is None else dbeta64.astype(beta_dtype)
    return dx, dgamma, dbeta, None, None
