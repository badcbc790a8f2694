"""Batch normalisation on the GPU: the twin of ``reference.ops.norm``.

Equation numbers are those of ``reference.ops.norm`` (not derived again here):
(1) mean, (2) biased variance, (3) ``s = (var + eps)^(-1/2)``, (4) ``xhat``,
(5) ``y = gamma xhat + beta``; backward (6) ``dbeta``, (7) ``dgamma``,
(8) ``dxhat = gamma dy``, (9) ``dx`` in evaluation mode and (10) ``dx`` in
training mode, evaluated as ``gamma s (dy - dbeta/n - xhat dgamma/n)``.

``x`` is (N, C, ...) with the statistics per channel over the ``n = N * inner``
entries of that channel (``inner = H * W``, or 1 for (N, C) input).

Kernels (one launch each, no host synchronisation anywhere):

Training forward
    1. ``norm_stats_partial`` (raw): the ``n`` entries of each channel are cut
       into ``splits`` chunks; block (c, s) reduces chunk s of channel c to its
       mean and its sum of squared deviations from that mean, two passes over
       the chunk (the second one from cache), accumulated in double and
       reduced over the block by ``block_sum`` (:data:`gpu.kernels.BLOCK_REDUCE`). Splitting
       keeps every SM busy when C is small and N*H*W large (ResNet's stem).
    2. ``norm_stats_finalize`` (raw): one thread per channel merges the chunks
       with the exact pairwise update of Chan et al. (count, mean, M2) and
       writes the mean (1), the biased variance (2) and ``s`` (3), rounded to
       x's dtype.
    3. ``norm_affine`` (elementwise): ``xhat`` (4) and ``y`` (5) in one pass;
       ``norm_affine_y`` writes ``y`` alone when the cache keeps no ``xhat``.

Evaluation forward: ``norm_eval_stats`` casts the running statistics and forms
``s`` (3) in double, then ``norm_affine`` as above.

Backward
    1. ``norm_sums_partial`` / ``norm_sums_finalize`` (raw): per channel
       ``dbeta = sum dy`` (6) and ``dgamma = sum dy xhat`` (7) in double, the
       same chunked layout, plus their means ``/ n`` rounded to x's dtype;
       only (6) when no ``xhat`` was kept. Skipped when no gradient reads them.
    2. ``norm_backward_train`` (10) or ``norm_backward_eval`` (9), elementwise,
       only when ``dx`` is wanted.

dtype: as in the reference, every sum accumulates in float64 and the results
are cast back, so float32 input gives float32 output, statistics and gradients.
The raw kernels need C-contiguous (N, C, ...) arrays; a non-contiguous ``x`` or
``dy`` is copied once.

The cache is the reference's :class:`reference.caches.BatchNormCache`, filled
by the same rules: ``xhat`` only when ``dgamma`` or the training ``dx`` reads
it, a None dtype for every gradient nobody wants (``needs_input_grad``), which
is then neither computed nor returned (``mean`` and ``var`` are (C,) device
arrays that :func:`reference.functional.batch_norm` reads to move the running
statistics).
"""

from __future__ import annotations

import math
from typing import Any

import cupy
import numpy as np

from gpu.kernels import BLOCK_REDUCE, elementwise, raw
from reference.caches import BatchNormCache, grad_flags
from reference.contracts import batch_norm_channels
from reference.errors import ShapeError

__all__ = ["batch_norm_forward", "batch_norm_backward"]

_THREADS = 256  # threads per block of the partial kernels (NORM_THREADS in the source)
_FINALIZE_THREADS = 128  # channels per block of the finalize kernels
_MIN_CHUNK = 4096  # entries per block below which a channel is not split further
_MAX_SPLITS = 64  # at most this many chunks (blocks) per channel

# ------------------------------------------------------------------------------------------- kernels
_CHANNEL_SOURCE = r"""
#define NORM_THREADS 256

// Walks the entries of channel c of a C-contiguous (N, C, inner) array in the order of their
// per-channel index j = n * inner + k, advancing by a fixed step without a division per entry.
struct NormCursor {
  long long n, k, step_n, step_k, inner;
  __device__ NormCursor(long long j, long long step, long long inner_)
      : n(j / inner_), k(j % inner_), step_n(step / inner_), step_k(step % inner_), inner(inner_) {}
  __device__ long long offset(long long channels, long long c) const {
    return (n * channels + c) * inner + k;  // flat index of x[n, c, k]
  }
  __device__ void advance() {
    n += step_n;
    k += step_k;
    if (k >= inner) { k -= inner; ++n; }
  }
};

// Chunk s = blockIdx.y of channel c = blockIdx.x covers entries [s * chunk, min((s + 1) * chunk, count)).
__device__ void norm_chunk(long long chunk, long long count, long long* begin, long long* end) {
  *begin = (long long)blockIdx.y * chunk;
  const long long stop = *begin + chunk;
  *end = stop < count ? stop : count;
}

// Statistics, pass 1 of 2: each chunk's own mean and sum of squared deviations (M2), in double.
// part_mean, part_m2: (C, splits).
extern "C" __global__ void norm_stats_partial(
    const ${T}* x, double* part_mean, double* part_m2,
    long long channels, long long inner, long long count, long long chunk) {
  __shared__ double buf[33];  // for block_sum (gpu.kernels.BLOCK_REDUCE)
  const long long c = blockIdx.x;
  long long begin, end;
  norm_chunk(chunk, count, &begin, &end);
  const long long len = end > begin ? end - begin : 0;

  double acc = 0.0;
  NormCursor cur(begin + threadIdx.x, NORM_THREADS, inner);
  for (long long j = begin + threadIdx.x; j < end; j += NORM_THREADS) {
    acc += (double)x[cur.offset(channels, c)];
    cur.advance();
  }
  const double total = block_sum(acc, buf);
  const double mean = len > 0 ? total / (double)len : 0.0;  // the chunk's mean, cf. (1)

  double acc2 = 0.0;
  NormCursor cur2(begin + threadIdx.x, NORM_THREADS, inner);
  for (long long j = begin + threadIdx.x; j < end; j += NORM_THREADS) {
    const double d = (double)x[cur2.offset(channels, c)] - mean;
    acc2 += d * d;
    cur2.advance();
  }
  const double m2 = block_sum(acc2, buf);  // the chunk's sum of squares, cf. (2)
  if (threadIdx.x == 0) {
    part_mean[c * gridDim.y + blockIdx.y] = mean;
    part_m2[c * gridDim.y + blockIdx.y] = m2;
  }
}

// Statistics, pass 2 of 2: one thread per channel merges its chunks (Chan et al.'s pairwise
// update, exact in exact arithmetic) and writes (1), (2) and (3) in x's dtype.
extern "C" __global__ void norm_stats_finalize(
    const double* part_mean, const double* part_m2,
    ${T}* mean, ${T}* var, ${T}* inv_std,
    long long channels, long long count, long long chunk, long long splits, double eps) {
  const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double n_a = 0.0, mean_a = 0.0, m2_a = 0.0;
  for (long long s = 0; s < splits; ++s) {
    const long long left = count - s * chunk;
    const long long len = left < chunk ? left : chunk;
    if (len <= 0) break;
    const double n_b = (double)len;
    const double n_ab = n_a + n_b;
    const double delta = part_mean[c * splits + s] - mean_a;
    mean_a += delta * (n_b / n_ab);
    m2_a += part_m2[c * splits + s] + delta * delta * (n_a * n_b / n_ab);
    n_a = n_ab;
  }
  const double v = m2_a / (double)count;  // (2), biased
  mean[c] = (${T})mean_a;                  // (1)
  var[c] = (${T})v;                        // (2)
  inv_std[c] = (${T})(1.0 / sqrt(v + eps));  // (3)
}

// Backward, pass 1 of 2: each chunk's sums of dy (6) and dy xhat (7), in double. Without xhat
// (with_xhat = 0: no gradient reads (7), and xhat was not kept) only (6) is summed, and xhat is
// never read (the caller passes dy in its place).
extern "C" __global__ void norm_sums_partial(
    const ${T}* dy, const ${T}* xhat, double* part_dy, double* part_dyxhat,
    long long channels, long long inner, long long count, long long chunk, int with_xhat) {
  __shared__ double buf[33];  // for block_sum (gpu.kernels.BLOCK_REDUCE)
  const long long c = blockIdx.x;
  long long begin, end;
  norm_chunk(chunk, count, &begin, &end);

  double acc_dy = 0.0, acc_dyxhat = 0.0;
  NormCursor cur(begin + threadIdx.x, NORM_THREADS, inner);
  for (long long j = begin + threadIdx.x; j < end; j += NORM_THREADS) {
    const long long at = cur.offset(channels, c);
    const double g = (double)dy[at];
    acc_dy += g;                                         // (6)
    if (with_xhat) acc_dyxhat += g * (double)xhat[at];   // (7)
    cur.advance();
  }
  const double sum_dy = block_sum(acc_dy, buf);
  const double sum_dyxhat = block_sum(acc_dyxhat, buf);
  if (threadIdx.x == 0) {
    part_dy[c * gridDim.y + blockIdx.y] = sum_dy;
    part_dyxhat[c * gridDim.y + blockIdx.y] = sum_dyxhat;
  }
}

// Backward, pass 2 of 2: one thread per channel adds its chunks: dbeta (6) and dgamma (7) in
// double and in x's dtype, and their means dbeta / n and dgamma / n in x's dtype for (10).
extern "C" __global__ void norm_sums_finalize(
    const double* part_dy, const double* part_dyxhat,
    double* sum_dy, double* sum_dyxhat, ${T}* dbeta, ${T}* dgamma, ${T}* mean_dy, ${T}* mean_dyxhat,
    long long channels, long long count, long long splits) {
  const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0.0, b = 0.0;
  for (long long s = 0; s < splits; ++s) {
    a += part_dy[c * splits + s];
    b += part_dyxhat[c * splits + s];
  }
  sum_dy[c] = a;
  sum_dyxhat[c] = b;
  dbeta[c] = (${T})a;   // (6)
  dgamma[c] = (${T})b;  // (7)
  mean_dy[c] = (${T})(a / (double)count);
  mean_dyxhat[c] = (${T})(b / (double)count);
}
"""

_channel_kernels = raw("norm_channel_reductions", BLOCK_REDUCE + _CHANNEL_SOURCE)

# (C,) running statistics -> mean, var and s (3) in x's dtype; s is formed in double as in the reference.
_eval_stats = elementwise(
    "norm_eval_stats",
    "R running_mean, V running_var, float64 eps",
    "T mean, T var, T inv_std",
    """
    mean = running_mean;
    var = running_var;
    inv_std = (T)(1.0 / sqrt((double)running_var + eps));  // (3)
    """,
)

# xhat (4) and y (5); mean, inv_std, gamma and beta are (1, C, 1, ...) views or scalars (gamma = 1,
# beta = 0 when absent, which leaves y exactly as the reference's). For a cache that keeps xhat.
_affine = elementwise(
    "norm_affine",
    "T x, T mean, T inv_std, T gamma, T beta",
    "T y, T xhat",
    """
    const T centred = x - mean;
    const T normed = centred * inv_std;  // (4)
    xhat = normed;
    y = normed * gamma + beta;           // (5)
    """,
)

# y (5) alone, rounded as norm_affine rounds it: for a cache that keeps no xhat.
_affine_y = elementwise(
    "norm_affine_y",
    "T x, T mean, T inv_std, T gamma, T beta",
    "T y",
    """
    const T centred = x - mean;
    const T normed = centred * inv_std;  // (4)
    y = normed * gamma + beta;           // (5)
    """,
)

# dx in training mode (10): gamma s (dy - dbeta/n - xhat dgamma/n), the per-channel means precomputed.
_backward_train = elementwise(
    "norm_backward_train",
    "T dy, T xhat, T mean_dy, T mean_dyxhat, T gamma, T inv_std",
    "T dx",
    """
    const T scale = gamma * inv_std;           // gamma s, (8)
    const T bracket = (dy - xhat * mean_dyxhat) - mean_dy;
    dx = bracket * scale;                      // (10)
    """,
)

# dx in evaluation mode (9): gamma s dy.
_backward_eval = elementwise(
    "norm_backward_eval",
    "T dy, T gamma, T inv_std",
    "T dx",
    """
    const T scale = gamma * inv_std;  // gamma s, (8)
    dx = dy * scale;                  // (9)
    """,
)


# ------------------------------------------------------------------------------------------- helpers
def _per_channel(v: Any, ndim: int) -> Any:
    """A (C,) vector shaped to broadcast against x: (C,) -> (1, C, 1, ..., 1)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _affine_arg(v: Any, dtype: Any, ndim: int, absent: float) -> Any:
    """gamma or beta for the elementwise kernels: a (1, C, 1, ...) view in x's dtype, or a scalar."""
    if v is None:
        return dtype.type(absent)
    return _per_channel(cupy.asarray(v).astype(dtype, copy=False), ndim)


def _split(count: int) -> tuple[int, int]:
    """``(splits, chunk)``: how the ``count`` entries of a channel are cut across blocks."""
    splits = max(1, min(_MAX_SPLITS, count // _MIN_CHUNK))
    chunk = -(-count // splits)
    return -(-count // chunk), chunk


def _layout(x: Any) -> tuple[int, int, int]:
    """``(C, inner, count)`` of an (N, C, ...) array: count = N * inner entries per channel."""
    channels = x.shape[1]
    inner = math.prod(x.shape[2:])
    return channels, inner, x.shape[0] * inner


def _batch_statistics(x: Any, eps: float) -> tuple[Any, Any, Any]:
    """(1), (2) and (3) of a C-contiguous x with at least one entry per channel, two launches."""
    channels, inner, count = _layout(x)
    splits, chunk = _split(count)
    part_mean = cupy.empty((channels, splits), dtype=np.float64)
    part_m2 = cupy.empty((channels, splits), dtype=np.float64)
    _channel_kernels.launch(
        "norm_stats_partial", x.dtype, grid=(channels, splits), block=(_THREADS,),
        args=(x, part_mean, part_m2, np.int64(channels), np.int64(inner), np.int64(count), np.int64(chunk)),
    )  # fmt: skip
    mean = cupy.empty(channels, dtype=x.dtype)
    var = cupy.empty(channels, dtype=x.dtype)
    inv_std = cupy.empty(channels, dtype=x.dtype)
    _channel_kernels.launch(
        "norm_stats_finalize", x.dtype, grid=(-(-channels // _FINALIZE_THREADS),), block=(_FINALIZE_THREADS,),
        args=(part_mean, part_m2, mean, var, inv_std, np.int64(channels), np.int64(count), np.int64(chunk),
              np.int64(splits), np.float64(eps)),
    )  # fmt: skip
    return mean, var, inv_std


def _channel_sums(dy: Any, xhat: Any | None) -> tuple[Any, ...]:
    """Per channel (6) and (7): in float64, the same in x's dtype, and both divided by n in x's dtype.

    Without ``xhat`` only (6) is summed; the results of (7) are then zeros, and unused.
    """
    channels, inner, count = _layout(dy)
    dtype = dy.dtype
    splits, chunk = _split(count)
    part_dy = cupy.empty((channels, splits), dtype=np.float64)
    part_dyxhat = cupy.empty((channels, splits), dtype=np.float64)
    _channel_kernels.launch(
        "norm_sums_partial", dtype, grid=(channels, splits), block=(_THREADS,),
        args=(dy, dy if xhat is None else xhat, part_dy, part_dyxhat, np.int64(channels), np.int64(inner),
              np.int64(count), np.int64(chunk), np.int32(xhat is not None)),
    )  # fmt: skip
    sum_dy = cupy.empty(channels, dtype=np.float64)
    sum_dyxhat = cupy.empty(channels, dtype=np.float64)
    dbeta, dgamma, mean_dy, mean_dyxhat = (cupy.empty(channels, dtype=dtype) for _ in range(4))
    _channel_kernels.launch(
        "norm_sums_finalize", dtype, grid=(-(-channels // _FINALIZE_THREADS),), block=(_FINALIZE_THREADS,),
        args=(part_dy, part_dyxhat, sum_dy, sum_dyxhat, dbeta, dgamma, mean_dy, mean_dyxhat,
              np.int64(channels), np.int64(count), np.int64(splits)),
    )  # fmt: skip
    return sum_dy, sum_dyxhat, dbeta, dgamma, mean_dy, mean_dyxhat


# ------------------------------------------------------------------------------------------------ ops
def batch_norm_forward(
    x: Any,
    gamma: Any | None,
    beta: Any | None,
    running_mean: Any | None,
    running_var: Any | None,
    training: bool,
    eps: float = 1e-5,
    needs_input_grad=None,
) -> tuple[Any, BatchNormCache]:
    """Batch norm of ``x`` (N, C, ...) per channel; ``running_*`` are read only in evaluation.

    The cache keeps ``xhat`` (4) only when a gradient reads it: ``dgamma`` (7),
    or ``dx`` in training (10); evaluation's ``dx`` (9) and ``dbeta`` (6) do not.
    """
    need_x, need_gamma, need_beta = grad_flags("batch_norm", needs_input_grad, 5)[:3]
    channels = batch_norm_channels(x, gamma, beta, running_mean, running_var, training)

    dtype = x.dtype
    count = x.size // channels if channels else 0
    if training:
        if count < 1:
            raise ShapeError(
                f"batch_norm in training mode needs at least one entry per channel, got {tuple(x.shape)}"
            )
        x = cupy.ascontiguousarray(x)  # the raw kernels walk (N, C, inner) in place
        mean, var, inv_std = _batch_statistics(x, float(eps))  # (1), (2), (3)
    else:
        mean = cupy.empty(channels, dtype=dtype)
        var = cupy.empty(channels, dtype=dtype)
        inv_std = cupy.empty(channels, dtype=dtype)
        _eval_stats(
            cupy.asarray(running_mean), cupy.asarray(running_var), float(eps), mean, var, inv_std
        )  # (3)

    ndim = x.ndim
    keep_xhat = BatchNormCache.keeps_xhat(need_x, need_gamma and gamma is not None, training)
    args = (x, _per_channel(mean, ndim), _per_channel(inv_std, ndim))
    args += (_affine_arg(gamma, dtype, ndim, 1.0), _affine_arg(beta, dtype, ndim, 0.0))
    if keep_xhat:
        y, xhat = _affine(*args)  # (4), (5)
    else:
        y, xhat = _affine_y(*args), None  # (4), (5)
    needs = (need_x, need_gamma, need_beta)
    cache = BatchNormCache.keep(xhat, inv_std, gamma, beta, mean, var, training, count, dtype, ndim, needs)
    return y, cache


def batch_norm_backward(dy: Any, cache: BatchNormCache):
    xhat, inv_std, gamma, _, _, training, count, x_dtype, gamma_dtype, beta_dtype, ndim = cache
    dtype = inv_std.dtype  # x's dtype
    channels = inv_std.shape[0]
    dy = cupy.ascontiguousarray(dy.astype(dtype, copy=False))  # the raw kernels walk (N, C, inner)

    # (10) reads dbeta and dgamma (xhat is kept then); (9) reads neither
    need_sums = beta_dtype is not None or gamma_dtype is not None or (training and x_dtype is not None)
    sum_dy = sum_dyxhat = dbeta_t = dgamma_t = mean_dy = mean_dyxhat = None
    if need_sums:
        if count > 0:
            sum_dy, sum_dyxhat, dbeta_t, dgamma_t, mean_dy, mean_dyxhat = _channel_sums(dy, xhat)  # (6), (7)
        else:  # evaluation with N = 0: every sum is 0
            sum_dy, sum_dyxhat = (cupy.zeros(channels, dtype=np.float64) for _ in range(2))
            dbeta_t, dgamma_t = (cupy.zeros(channels, dtype=dtype) for _ in range(2))

    dx = None
    if x_dtype is not None:
        gamma_arg = _affine_arg(gamma, dtype, ndim, 1.0)  # gamma of (8); 1 when absent
        s_arg = _per_channel(inv_std, ndim)
        if training:
            dx = _backward_train(
                dy, xhat, _per_channel(mean_dy, ndim), _per_channel(mean_dyxhat, ndim), gamma_arg, s_arg
            )  # (10)
        else:
            dx = _backward_eval(dy, gamma_arg, s_arg)  # (9)

    dgamma = dbeta = None
    if gamma_dtype is not None:  # (7), in gamma's dtype (from the float64 sum when it is not x's)
        dgamma = dgamma_t if gamma_dtype == dtype else sum_dyxhat.astype(gamma_dtype)
    if beta_dtype is not None:  # (6), in beta's dtype
        dbeta = dbeta_t if beta_dtype == dtype else sum_dy.astype(beta_dtype)
    return dx, dgamma, dbeta, None, None
