"""Softmax cross-entropy with integer labels and label smoothing, in two kernels: the twin of ``reference.ops.loss``.

The equations are the reference's, cited by number: (1) the row maximum, (2) the log-sum-exp,
(3) the log-softmax, (4) the smoothed target, (5) the mean loss, (6) the gradient
``dz = dy (p - t) / N``.

Forward (raw kernel ``loss_xent``, two functions, no host synchronisation):

- ``loss_xent_rows``: one thread block per row of the (N, K) logits. Block reductions (the
  shared ``block_reduce`` of :data:`gpu.kernels.BLOCK_REDUCE`) give the row maximum (1) and
  ``sum_k exp(z_ik - m_i)`` (2), accumulated in double; the block then writes the row's softmax
  probabilities ``p = exp(logp)`` (3) in the logits' dtype, and thread 0 writes the row's loss
  ``-(1 - e) logp_{i, c_i} - (e / K) sum_k logp_ik`` (4), (5) in double.
- ``loss_xent_mean``: one block sums the N row losses in double (a fixed-order tree, so the result
  is the same on every run) and writes ``sum / N`` in the logits' dtype (5), as the reference's
  float64 sum does.

Backward: one elementwise kernel, ``loss_xent_backward``, computes (6) from the cached
probabilities and labels.

Validation. The shapes and dtypes of the inputs and the label smoothing are checked with the
reference's error classes and messages. On the GPU the label range is not checked: reading
``labels.min()``/``labels.max()`` would synchronise the host with the device on every step (only
K = 0, where no label can be valid, raises the reference's range error). A label
outside [0, K) never reads or writes out of bounds: its row's loss is NaN (so a training loop that
checks for a non-finite loss stops), and in the backward pass no column of that row counts as the
label.

The loss is a 0-d CuPy array of the logits' dtype; the labels get no gradient (None).
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from gpu.kernels import BLOCK_REDUCE, elementwise, raw
from reference.caches import SoftmaxCrossEntropyCache, grad_flags
from reference.contracts import cross_entropy_shapes
from reference.errors import ShapeError

__all__ = ["softmax_cross_entropy_forward", "softmax_cross_entropy_backward"]

# ------------------------------------------------------------------------------------------- kernels
_ROWS_SOURCE = r"""
__device__ __forceinline__ double loss_xent_max(double a, double b) {
  // NaN-propagating maximum, as NumPy's max: keep a NaN already found, take a NaN offered.
  return (a != a || b <= a) ? a : b;
}

struct LossXentMaxOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return loss_xent_max(a, b); }
};

// The NaN-propagating maximum of v over the block (block_reduce of gpu.kernels.BLOCK_REDUCE).
__device__ __forceinline__ double loss_xent_block_max(double v, double* buf) {
  return block_reduce(v, LossXentMaxOp(), -__longlong_as_double(0x7ff0000000000000LL), buf);
}

// One block per row i of z (N, K): probs[i, :] = softmax(z[i, :]) and rows[i] = the row's loss.
extern "C" __global__ void loss_xent_rows(const ${T}* __restrict__ z, const long long* __restrict__ labels,
                                          ${T}* __restrict__ probs, double* __restrict__ rows,
                                          const long long n, const int k, const double e) {
  __shared__ double buf[33];
  const long long row = blockIdx.x;
  if (row >= n) return;  // the grid has exactly n blocks; a whole block leaves together
  const ${T}* zr = z + row * k;
  ${T}* pr = probs + row * k;

  double m = -__longlong_as_double(0x7ff0000000000000LL);  // (1)  m_i = max_k z_ik
  for (int j = threadIdx.x; j < k; j += blockDim.x) m = loss_xent_max(m, (double)zr[j]);
  m = loss_xent_block_max(m, buf);
  const ${T} mt = (${T})m;  // exact: m is one of the row's values

  double s = 0.0;  // (2)  sum_k exp(z_ik - m_i)
  for (int j = threadIdx.x; j < k; j += blockDim.x) s += (double)exp(zr[j] - mt);
  s = block_sum(s, buf);
  const ${T} log_norm = (${T})log(s);  // (2)  lse_i - m_i

  double sum_logp = 0.0;  // (3)  logp = (z - m) - (lse - m); p = exp(logp)
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const ${T} logp = (zr[j] - mt) - log_norm;
    pr[j] = exp(logp);
    sum_logp += (double)logp;
  }
  if (e != 0.0) sum_logp = block_sum(sum_logp, buf);  // e is uniform over the block

  if (threadIdx.x == 0) {
    const long long c = labels[row];
    double loss;
    if (c < 0 || c >= k) {
      loss = __longlong_as_double(0x7ff8000000000000LL);  // a label outside [0, K): NaN, never read out of bounds
    } else {
      const ${T} logp_c = (zr[c] - mt) - log_norm;
      loss = -(1.0 - e) * (double)logp_c;  // (4), (5)
      if (e != 0.0) loss -= (e / k) * sum_logp;  // (4), (5)
    }
    rows[row] = loss;
  }
}

// One block: loss[0] = sum_i rows[i] / n, summed in double (5).
extern "C" __global__ void loss_xent_mean(const double* __restrict__ rows, ${T}* __restrict__ loss,
                                          const long long n) {
  __shared__ double buf[33];
  double s = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) s += rows[i];
  s = block_sum(s, buf);
  if (threadIdx.x == 0) loss[0] = (${T})(s / (double)n);  // (5)
}
"""

_xent = raw("loss_xent", BLOCK_REDUCE + _ROWS_SOURCE)

# Backward (6): dz = (p - e/K - (1 - e)[k == c_i]) * (dy / N), in the reference's order of operations.
_xent_backward = elementwise(
    "loss_xent_backward",
    "T p, T dy, raw int64 labels, int64 n_classes, float64 off_target, float64 on_target, int64 n_rows",
    "T dz",
    "const long long col = i % n_classes; "
    "const long long c = labels[i / n_classes]; "
    "T g = p - (T)off_target; "
    "if (col == c) g -= (T)on_target; "
    "dz = g * (dy / (T)n_rows)",
)

_MEAN_THREADS = 256


def _row_threads(k: int) -> int:
    """Threads per row block: a multiple of 32 covering K, at most 256 (each thread strides over K)."""
    return min(256, 32 * ((k + 31) // 32))


def softmax_cross_entropy_forward(
    logits: cp.ndarray, labels: cp.ndarray, label_smoothing: float = 0.0, needs_input_grad=None
) -> tuple[cp.ndarray, SoftmaxCrossEntropyCache]:
    """Mean softmax cross-entropy of (N, K) ``logits`` against (N,) integer ``labels`` (equation (5)).

    The cache holds ``p = exp(logp)`` (N, K) in the logits' dtype and the labels as (N,) int64.
    """
    grad_flags("softmax_cross_entropy", needs_input_grad, 2)
    labels = cp.asarray(labels)  # a host array is copied to the device; a device array is kept
    n, k = cross_entropy_shapes(logits, labels)
    # The label range is not checked (it would synchronise; see the module docstring), except that
    # with K = 0 no label can be valid: the reference's error, reading min/max on this failing path only.
    if k == 0:
        raise ShapeError(
            f"softmax_cross_entropy: labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")

    z = cp.ascontiguousarray(logits)
    labels = cp.ascontiguousarray(labels.astype(cp.int64, copy=False))
    probs = cp.empty_like(z)  # (N, K)
    rows = cp.empty(n, dtype=cp.float64)  # (N,) per-row losses
    loss = cp.empty((), dtype=z.dtype)
    e = float(label_smoothing)  # a host number (the static setting), never a device value
    args = (z, labels, probs, rows, np.int64(n), np.int32(k), np.float64(e))
    _xent.launch("loss_xent_rows", z.dtype, (n,), (_row_threads(k),), args)  # (1)-(5) per row
    _xent.launch("loss_xent_mean", z.dtype, (1,), (_MEAN_THREADS,), (rows, loss, np.int64(n)))  # (5)
    return loss, SoftmaxCrossEntropyCache(probs, labels, e)


def softmax_cross_entropy_backward(dy: cp.ndarray, cache: SoftmaxCrossEntropyCache):
    probs, labels, e = cache
    n, k = probs.shape
    dy = cp.asarray(dy, dtype=probs.dtype)  # 0-d, stays on the device; broadcast over (N, K) by the kernel
    dlogits = _xent_backward(probs, dy, labels, k, e / k, 1.0 - e, n)  # (4), (6)
    return dlogits, None
