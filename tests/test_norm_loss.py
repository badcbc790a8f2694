"""Targeted properties of batch norm, softmax cross-entropy and the matrix products.

The table-driven tests in test_ops.py check each kernel against its oracle;
these pin the behaviour around the kernels: running statistics, invariances,
numerical range and dtypes.
"""

import numpy as np
import pytest

from reference import functional as F
from reference.autodiff import Tensor
from reference.ops import (
    batch_norm_backward,
    batch_norm_forward,
    linear_backward,
    linear_forward,
    matmul_backward,
    matmul_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)

SHAPES = [(6, 3), (4, 3, 2, 5)]  # (N, C) and (N, C, H, W)


def _axes(x):
    return (0, *range(2, x.ndim))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _log_softmax(z):
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


# ------------------------------------------------------------------ batch norm


@pytest.mark.parametrize("shape", SHAPES)
def test_functional_batch_norm_updates_running_stats_in_training(shape):
    rng = _rng(1)
    c, momentum = shape[1], 0.3
    x = 2.0 * rng.standard_normal(shape) + 1.0
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    old_mean, old_var = running_mean.copy(), running_var.copy()
    gamma, beta = Tensor(np.ones(c)), Tensor(np.zeros(c))
    F.batch_norm(Tensor(x), gamma, beta, running_mean, running_var, training=True, momentum=momentum)
    batch_mean = x.mean(axis=_axes(x))
    batch_var = x.var(axis=_axes(x), ddof=1)  # unbiased, as PyTorch
    np.testing.assert_allclose(running_mean, (1 - momentum) * old_mean + momentum * batch_mean, rtol=1e-12)
    np.testing.assert_allclose(running_var, (1 - momentum) * old_var + momentum * batch_var, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_functional_batch_norm_leaves_running_stats_alone_in_eval(shape):
    rng = _rng(2)
    c = shape[1]
    x = rng.standard_normal(shape)
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    old_mean, old_var = running_mean.copy(), running_var.copy()
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    y = F.batch_norm(Tensor(x), Tensor(gamma), Tensor(beta), running_mean, running_var, training=False)
    np.testing.assert_array_equal(running_mean, old_mean)
    np.testing.assert_array_equal(running_var, old_var)
    bshape = (1, c) + (1,) * (x.ndim - 2)  # (C,) -> (1, C, 1, ..., 1)
    expected = (x - old_mean.reshape(bshape)) / np.sqrt(old_var.reshape(bshape) + 1e-5)
    np.testing.assert_allclose(y.data, gamma.reshape(bshape) * expected + beta.reshape(bshape), rtol=1e-12)


@pytest.mark.parametrize("shape", [*SHAPES, (3, 2, 8, 9)])  # rows of 10 and of 72 entries (see _SHORT_ROW)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_output_is_standardised_per_channel(shape, dtype):
    rng = _rng(3)
    c = shape[1]
    # A large offset and unequal scales per channel: float32 must still standardise.
    scales, offsets = rng.uniform(0.5, 3.0, c), rng.uniform(-1e3, 1e3, c)
    bshape = (1, c) + (1,) * (len(shape) - 2)  # (C,) -> (1, C, 1, ..., 1)
    x = (rng.standard_normal(shape) * scales.reshape(bshape) + offsets.reshape(bshape)).astype(dtype)
    y, cache = batch_norm_forward(x, np.ones(c, dtype), np.zeros(c, dtype), None, None, training=True)
    tol = 1e-8 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(y.mean(axis=_axes(x), dtype=np.float64), 0.0, atol=tol)
    # var(y) = var / (var + eps), not exactly 1.
    np.testing.assert_allclose(y.var(axis=_axes(x), dtype=np.float64), 1.0, atol=max(tol, 1e-4))
    np.testing.assert_allclose(cache.mean, x.astype(np.float64).mean(axis=_axes(x)), rtol=1e-6)
    np.testing.assert_allclose(cache.var, x.astype(np.float64).var(axis=_axes(x)), rtol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_training_backward_is_orthogonal_to_per_channel_constants(shape):
    rng = _rng(4)
    c = shape[1]
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    y, cache = batch_norm_forward(x, gamma, beta, None, None, training=True)
    dx, dgamma, dbeta, d_rm, d_rv = batch_norm_backward(rng.standard_normal(y.shape), cache)
    np.testing.assert_allclose(dx.sum(axis=_axes(x)), 0.0, atol=1e-12)
    assert d_rm is None and d_rv is None
    assert dgamma.shape == dbeta.shape == (c,)


@pytest.mark.parametrize("shape", [(5, 3, 2, 2), (5, 3, 4, 4), (5, 3, 9, 8)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False])
def test_short_and_long_rows_give_one_batch_norm(monkeypatch, shape, dtype, training):
    """Per-channel sums down the batch first (short rows) or along each row first, and per-channel
    vectors repeated over the row or broadcast: the same batch norm, forward and backward, either
    way (to rounding: the sums are added in another order)."""
    from reference.ops import norm

    rng = _rng(15)
    c = shape[1]
    x = (3.0 * rng.standard_normal(shape) + 10.0).astype(dtype)
    g, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2.0, c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for short_row in (0, 10**6):  # every row long, every row short
        monkeypatch.setattr(norm, "_SHORT_ROW", short_row)
        y, cache = batch_norm_forward(x, g, b, rm, rv, training=training)
        results.append((y, cache.mean, cache.var, *batch_norm_backward(dy, cache)[:3]))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for long_rows, short_rows in zip(*results):
        assert long_rows.dtype == short_rows.dtype == dtype
        np.testing.assert_allclose(short_rows, long_rows, rtol=tol, atol=tol)


def test_batch_norm_all_ones_cotangent_gives_zero_dx():
    # Why gradient tests must use random cotangents: with gamma = 1 and dy = 1, dx vanishes.
    x = _rng(5).standard_normal((4, 3, 2, 2))
    y, cache = batch_norm_forward(x, np.ones(3), np.zeros(3), None, None, training=True)
    dx = batch_norm_backward(np.ones_like(y), cache)[0]
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)


# ------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("e", [0.0, 0.1])
def test_cross_entropy_of_zero_logits_is_log_k(e):
    n, k = 5, 7
    loss, _ = softmax_cross_entropy_forward(np.zeros((n, k)), np.arange(n) % k, label_smoothing=e)
    np.testing.assert_allclose(loss, np.log(k), rtol=1e-12)


@pytest.mark.parametrize("e", [0.0, 0.2])
def test_cross_entropy_is_invariant_to_a_per_row_constant(e):
    rng = _rng(6)
    logits, labels = rng.standard_normal((4, 5)), rng.integers(0, 5, 4)
    shifted = logits + 100.0 * rng.standard_normal((4, 1))
    loss_a, cache_a = softmax_cross_entropy_forward(logits, labels, e)
    loss_b, cache_b = softmax_cross_entropy_forward(shifted, labels, e)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-10)
    dy = np.asarray(rng.standard_normal())
    np.testing.assert_allclose(
        softmax_cross_entropy_backward(dy, cache_a)[0],
        softmax_cross_entropy_backward(dy, cache_b)[0],
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_of_huge_logits_is_finite(dtype):
    rng = _rng(7)
    logits = (1e4 * rng.standard_normal((6, 4))).astype(dtype)
    labels = rng.integers(0, 4, 6)
    loss, cache = softmax_cross_entropy_forward(logits, labels, label_smoothing=0.1)
    dlogits, _ = softmax_cross_entropy_backward(np.asarray(1.0, dtype), cache)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    # Confident and right costs nothing; confident and wrong costs the margin.
    two = np.array([[1e4, 0.0], [1e4, 0.0]], dtype)
    loss, _ = softmax_cross_entropy_forward(two, np.array([0, 1]))
    np.testing.assert_allclose(loss, 1e4 / 2, rtol=1e-6)


def test_zero_smoothing_is_plain_one_hot_cross_entropy():
    rng = _rng(8)
    logits, labels = 3.0 * rng.standard_normal((7, 5)), rng.integers(0, 5, 7)
    loss, _ = softmax_cross_entropy_forward(logits, labels, label_smoothing=0.0)
    plain = -_log_softmax(logits)[np.arange(7), labels].mean()
    np.testing.assert_allclose(loss, plain, rtol=1e-12)


def test_smoothing_mixes_one_hot_and_uniform_cross_entropy():
    rng = _rng(9)
    e, logits, labels = 0.3, rng.standard_normal((7, 5)), rng.integers(0, 5, 7)
    logp = _log_softmax(logits)
    expected = (1 - e) * -logp[np.arange(7), labels].mean() + e * -logp.mean()
    loss, _ = softmax_cross_entropy_forward(logits, labels, label_smoothing=e)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)


@pytest.mark.parametrize("e", [0.0, 0.25])
def test_cross_entropy_gradient_rows_sum_to_zero(e):
    rng = _rng(10)
    logits, labels = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    _, cache = softmax_cross_entropy_forward(logits, labels, label_smoothing=e)
    dlogits, dlabels = softmax_cross_entropy_backward(np.asarray(rng.standard_normal()), cache)
    assert dlabels is None
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-12)


def test_cross_entropy_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        softmax_cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]))


# ---------------------------------------------------------------------- dtypes


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_keeps_float32(training):
    rng = _rng(11)
    x, g, b, rm = _f32(rng, 4, 3, 2, 2), _f32(rng, 3), _f32(rng, 3), _f32(rng, 3)
    rv = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    y, cache = batch_norm_forward(x, g, b, rm, rv, training=training)
    assert y.dtype == cache.mean.dtype == cache.var.dtype == np.float32
    grads = batch_norm_backward(_f32(rng, *y.shape), cache)[:3]
    assert all(gr.dtype == np.float32 for gr in grads)


def test_cross_entropy_keeps_float32():
    rng = _rng(12)
    loss, cache = softmax_cross_entropy_forward(_f32(rng, 4, 5), rng.integers(0, 5, 4), label_smoothing=0.1)
    assert loss.dtype == np.float32 and loss.shape == ()
    assert softmax_cross_entropy_backward(np.asarray(1.0, np.float32), cache)[0].dtype == np.float32


def test_matmul_and_linear_keep_float32():
    rng = _rng(13)
    y, cache = matmul_forward(_f32(rng, 2, 1, 3, 4), _f32(rng, 5, 4, 2))
    assert y.dtype == np.float32 and y.shape == (2, 5, 3, 2)
    da, db = matmul_backward(_f32(rng, *y.shape), cache)
    assert da.dtype == db.dtype == np.float32 and da.shape == (2, 1, 3, 4) and db.shape == (5, 4, 2)
    y, cache = linear_forward(_f32(rng, 2, 3, 4), _f32(rng, 5, 4), _f32(rng, 5))
    assert y.dtype == np.float32 and y.shape == (2, 3, 5)
    assert all(g.dtype == np.float32 for g in linear_backward(_f32(rng, *y.shape), cache))


def test_functional_wrappers_run_end_to_end():
    # The tape through linear -> batch_norm -> cross-entropy reaches every leaf.
    rng = _rng(14)
    x = Tensor(rng.standard_normal((8, 4)))
    w, b = Tensor(rng.standard_normal((3, 4)), True), Tensor(rng.standard_normal(3), True)
    gamma, beta = Tensor(np.ones(3), True), Tensor(np.zeros(3), True)
    h = F.batch_norm(F.linear(x, w, b), gamma, beta, np.zeros(3), np.ones(3), training=True)
    loss = F.softmax_cross_entropy(h, rng.integers(0, 3, 8), label_smoothing=0.1)
    loss.backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (w, b, gamma, beta))
    # The bias is cancelled by the batch mean, so its gradient vanishes.
    np.testing.assert_allclose(b.grad, 0.0, atol=1e-12)
