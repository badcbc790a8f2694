"""Softmax cross-entropy with integer labels and optional label smoothing.

For logits ``z`` of shape (N, K), integer labels ``c_i`` in [0, K) and a
smoothing ``e`` in [0, 1], each row is shifted by its maximum before
exponentiating (softmax is unchanged by a per-row constant, and the shifted
exponentials lie in (0, 1], so nothing overflows)::

    m_i      = max_k z_ik                                                   (1)
    lse_i    = m_i + log sum_k exp(z_ik - m_i)                              (2)
    logp_ik  = z_ik - lse_i          (log softmax)                          (3)
    t_ik     = (1 - e) [k == c_i] + e / K                                   (4)
    loss     = -(1/N) sum_i sum_k t_ik logp_ik                              (5)

Since each target row sums to one, (5) per row is
``-(1 - e) logp_{i, c_i} - (e / K) sum_k logp_ik``, which needs no (N, K)
target array in the forward pass.

Backward. With ``p = softmax(z) = exp(logp)`` and ``sum_k t_ik = 1``,
d(-sum_k t_ik logp_ik)/d z_ij = sum_k t_ik p_ij - t_ij = p_ij - t_ij, so
for the scalar upstream gradient ``dy``::

    dz_ij = dy (p_ij - t_ij) / N                                            (6)

Each row of (6) sums to zero. The labels get no gradient (None).
"""

from __future__ import annotations

import numpy as np

from reference.caches import SoftmaxCrossEntropyCache, grad_flags
from reference.contracts import cross_entropy_shapes
from reference.errors import ShapeError

__all__ = ["softmax_cross_entropy_forward", "softmax_cross_entropy_backward"]


def softmax_cross_entropy_forward(
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0, needs_input_grad=None
) -> tuple[np.ndarray, SoftmaxCrossEntropyCache]:
    """Mean softmax cross-entropy of (N, K) ``logits`` against (N,) integer ``labels`` (equation (5))."""
    grad_flags("softmax_cross_entropy", needs_input_grad, 2)
    labels = np.asarray(labels)
    n, k = cross_entropy_shapes(logits, labels)
    if labels.min() < 0 or labels.max() >= k:
        raise ShapeError(
            f"softmax_cross_entropy: labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")

    shifted = logits - logits.max(axis=1, keepdims=True)  # (1)  z - m
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (2)  lse - m
    logp = shifted - log_norm  # (3)
    rows = -(1.0 - label_smoothing) * logp[np.arange(n), labels]  # (4), (5)
    if label_smoothing:
        rows = rows - (label_smoothing / k) * logp.sum(axis=1)  # (4), (5)
    loss = np.asarray(rows.sum(dtype=np.float64) / n, dtype=logits.dtype)  # (5)
    return loss, SoftmaxCrossEntropyCache(np.exp(logp), labels, float(label_smoothing))


def softmax_cross_entropy_backward(dy: np.ndarray, cache: SoftmaxCrossEntropyCache):
    probs, labels, e = cache
    n, k = probs.shape
    dlogits = probs - e / k  # (4), (6)  p - e/K everywhere
    dlogits[np.arange(n), labels] -= 1.0 - e  # (4), (6)  and - (1 - e) at the label
    dlogits *= np.asarray(dy, dtype=probs.dtype) / n  # (6)
    return dlogits.astype(probs.dtype, copy=False), None
