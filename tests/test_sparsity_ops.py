"""The sparsity kernels beyond the generic op table: kinks, properties, dtypes, settings, wrappers.

The generic checks (oracle, VJP, finite difference) run from
``tests/opcases/sparsity.py`` in ``tests/test_ops.py``. Here:

- each kink convention, pinned at the kink itself;
- the properties the papers rely on (STR prunes exactly ``|w| <= g`` and
  shrinks survivors by exactly ``g``; ``s = -3200`` is the identity in float32;
  LTP's L0 is invariant to ``W -> aW, tau -> a^2 tau, T -> a^2 T``; SCP's
  deactivation probability and masks move the right way in ``beta`` and
  ``gamma``);
- the LTP approximate gradient, which is not the forward's derivative and so
  lives outside the table (its own oracle, and the formula ``dW = G m``);
- float32 in, float32 out; bad settings raise ValueError naming the value;
- the Tensor-level wrappers, ``batch_norm(update_mask=...)`` and the
  composition ``ltp_mask + lambda ltp_l0`` reproducing METHODS (5)-(6).
"""

import math
import re

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.functional as F
from reference.autodiff import Tensor
from reference.ops import (
    abs_backward,
    abs_forward,
    ltp_l0_backward,
    ltp_l0_forward,
    ltp_mask_backward,
    ltp_mask_forward,
    scp_channel_mask_backward,
    scp_channel_mask_forward,
    str_threshold_backward,
    str_threshold_forward,
)
from reference.ops import sparsity as sparsity_ops
from tests.harness import away_from_zero, check_backward, check_forward, rng_from
from tests.opcases.sparsity import LTP_APPROX_CASE

FLOATS = [np.float32, np.float64]
SCP = {"k": 20.0, "c0": 0.95, "t": 0.5, "eps": 0.05}  # the official CIFAR-10 settings


def _sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _shape(data, min_dims=1, max_dims=4, max_side=5):
    return data.draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side), label="shape")


# ----------------------------------------------------------------- kinks, pinned
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_str_weight_at_threshold_is_pruned_with_zero_gradient(dtype, per_channel):
    # s = 0 gives g = 1/2 exactly, so +-0.5 sit exactly on |w| = g.
    w = np.array([[0.5, -0.5, 0.75], [-0.25, 1.0, -0.5]], dtype)
    tie = np.abs(w) == 0.5
    s = np.zeros(2, dtype) if per_channel else np.zeros((), dtype)
    y, cache = str_threshold_forward(w, s)
    assert np.all(cache.threshold == 0.5)
    assert np.all(y[tie] == 0)
    dy = np.random.default_rng(0).standard_normal(w.shape).astype(dtype)
    dw, ds = str_threshold_backward(dy, cache)
    assert np.all(dw[tie] == 0)  # strict mask: the tie counts as pruned
    # a tie adds nothing to ds: changing its upstream gradient leaves ds as it was
    dy_changed = np.where(tie, dtype(7.0), dy)
    _, ds_changed = str_threshold_backward(dy_changed, cache)
    np.testing.assert_array_equal(ds_changed, ds)
    expected_ds = -0.25 * np.where(tie | (np.abs(w) < 0.5), 0.0, dy * np.sign(w))
    expected_ds = expected_ds.sum(axis=1) if per_channel else expected_ds.sum()
    np.testing.assert_allclose(ds, expected_ds, rtol=1e-6)


def _soft_mask(cache):
    """``(m, q)`` of (6) as the LTP backward recomputes them from its cache."""
    return sparsity_ops._ltp_sigmoid(cache.w, cache.tau, cache.temperature)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ltp_at_threshold_mask_is_half_and_gradients_follow_the_formula(dtype):
    # w^2 == tau exactly: z = 0, m = 1/2, q = 1/4.
    w = np.array([0.5, -0.5, 0.5], dtype)
    tau, temperature = np.asarray(0.25, dtype), 0.3
    dy = np.array([0.7, -1.3, 0.4], dtype)
    y, cache = ltp_mask_forward(w, tau, temperature)
    m, q = _soft_mask(cache)
    assert np.all(m == 0.5) and np.all(q == 0.25)
    np.testing.assert_array_equal(y, w / 2)
    dw, dtau, dtemperature = ltp_mask_backward(dy, cache)
    assert dtemperature is None
    np.testing.assert_allclose(dw, dy * (0.5 + 2 * 0.25 * 0.25 / temperature), rtol=1e-6)
    np.testing.assert_allclose(dtau, -(1 / temperature) * np.sum(0.25 * dy * w), rtol=1e-6)

    l0, cache = ltp_l0_forward(w, tau, temperature)
    assert l0 == 1.5
    dw, dtau, _ = ltp_l0_backward(np.asarray(2.0, dtype), cache)
    np.testing.assert_allclose(dw, 2.0 * 2 * w * 0.25 / temperature, rtol=1e-6)
    np.testing.assert_allclose(dtau, -2.0 / temperature * 0.75, rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOATS)
def test_scp_gamma_zero_uses_the_subgradient_sign_zero(dtype):
    # beta = eps - 2^-27 puts u = (eps - beta) / (|gamma| + 1e-8) near 0.75 at gamma = 0, where phi(u)
    # is far from 0: a subgradient sign(0) = +-1 would give a large dgamma; sign(0) = 0 gives 0.
    # eps = 2^-4 and beta are exact in float32 and float64.
    eps = 2.0**-4
    gamma = np.array([0.0, -0.0, 1e-3], dtype)
    beta = np.array([eps - 2.0**-27, eps - 2.0**-27, eps - 1e-3], dtype)
    noise = np.array([0.0, 0.5, -0.5], dtype)
    settings = {"k": 1.0, "t": 1.0, "c0": 0.5, "eps": eps}  # keep m away from saturation
    m, cache = scp_channel_mask_forward(gamma, beta, noise, training=True, **settings)
    dy = np.array([1.0, -2.0, 0.5], dtype)
    dgamma, dbeta, dnoise = scp_channel_mask_backward(dy, cache)
    assert dnoise is None
    assert dgamma[0] == 0 and dgamma[1] == 0
    assert dgamma[2] != 0  # the same point off the kink has a gradient
    # dbeta at gamma = 0 follows (20) with a = 1e-8 (rounded to the dtype)
    a = float(dtype(1e-8))
    u = 2.0**-27 / a
    prob = 0.5 * (1 + math.erf(u / math.sqrt(2)))
    mm = _sigmoid64((settings["k"] * (settings["c0"] - prob) + noise[0]) / settings["t"])
    dp = -(settings["k"] / settings["t"]) * mm * (1 - mm) * dy[0]
    expected = -dp * math.exp(-u * u / 2) / math.sqrt(2 * math.pi) / a
    np.testing.assert_allclose(dbeta[0], expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", FLOATS)
def test_abs_gradient_at_zero_is_zero(dtype):
    x = np.array([0.0, -0.0, 1.5, -2.0], dtype)
    y, cache = abs_forward(x)
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.5, 2.0])
    (dx,) = abs_backward(np.array([3.0, 3.0, 3.0, 3.0], dtype), cache)
    np.testing.assert_array_equal(dx, [0.0, 0.0, 3.0, -3.0])
    assert y.dtype == dx.dtype == dtype


# ------------------------------------------------------------------------- STR
@pytest.mark.parametrize("dtype", FLOATS)
@given(data=st.data())
def test_str_prunes_exactly_the_small_weights_keeps_signs_and_shrinks_by_g(dtype, data):
    shape = _shape(data)
    per_channel = data.draw(st.booleans(), label="per_channel")
    rng = rng_from(data)
    s = rng.uniform(-4.0, 1.0, (shape[0],) if per_channel else ()).astype(dtype)
    w = (rng.standard_normal(shape) * 0.6).astype(dtype)
    y, cache = str_threshold_forward(w, np.asarray(s))
    g = cache.threshold
    assert g.dtype == dtype
    np.testing.assert_allclose(g, _sigmoid64(s), rtol=1e-6 if dtype == np.float32 else 1e-14)
    g_w = g.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else g  # (O,) -> (O, 1, ..., 1)
    pruned = np.abs(w) <= g_w
    assert np.all(y[pruned] == 0)
    kept = ~pruned
    assert np.all(np.sign(y[kept]) == np.sign(w[kept]))
    shrink = np.broadcast_to(g_w, w.shape)
    np.testing.assert_array_equal(np.abs(y[kept]), np.abs(w[kept]) - shrink[kept])  # bit-exact
    np.testing.assert_array_equal(y != 0, kept)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("s_dtype", FLOATS)
@given(data=st.data())
def test_str_s_minus_3200_in_float32_is_the_identity_with_zero_ds(per_channel, s_dtype, data):
    shape = _shape(data)
    rng = rng_from(data)
    w = away_from_zero(rng, shape, 1e-6, 3.0).astype(np.float32)
    s = np.full((shape[0],) if per_channel else (), -3200.0, s_dtype)
    y, cache = str_threshold_forward(w, s)
    assert np.all(cache.threshold == 0)  # g computed in w's dtype (float32) is exactly 0
    assert y.dtype == np.float32 and y.tobytes() == w.tobytes()
    dy = rng.standard_normal(shape).astype(np.float32)
    dw, ds = str_threshold_backward(dy, cache)
    assert dw.tobytes() == dy.tobytes()
    assert ds.dtype == s_dtype and ds.shape == s.shape and np.all(ds == 0)


def test_str_rejects_s_of_the_wrong_shape():
    w = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"\(\) or \(3,\)"):
        str_threshold_forward(w, np.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        str_threshold_forward(w, np.zeros((3, 1)))


# ------------------------------------------------------------------------- LTP
@given(data=st.data())
def test_ltp_approx_case_matches_its_own_oracle(data):
    check_forward(LTP_APPROX_CASE, data)
    check_backward(LTP_APPROX_CASE, data)


@given(data=st.data())
def test_ltp_approx_weight_gradient_is_g_times_mask_and_tau_gradient_stays_exact(data):
    shape = _shape(data)
    rng = rng_from(data)
    w = rng.standard_normal(shape)
    tau, temperature = np.asarray(rng.uniform(0.05, 1.0)), float(rng.uniform(0.05, 1.0))
    dy = rng.standard_normal(shape)
    y_approx, approx = ltp_mask_forward(w, tau, temperature, exact_grad=False)
    y_exact, exact = ltp_mask_forward(w, tau, temperature, exact_grad=True)
    np.testing.assert_array_equal(y_approx, y_exact)
    dw_approx, dtau_approx, _ = ltp_mask_backward(dy, approx)
    dw_exact, dtau_exact, _ = ltp_mask_backward(dy, exact)
    m = _sigmoid64((w * w - tau) / temperature)
    np.testing.assert_allclose(dw_approx, dy * m, rtol=1e-12, atol=1e-15)  # (9)
    np.testing.assert_array_equal(dtau_approx, dtau_exact)
    q = m * (1 - m)
    np.testing.assert_allclose(dw_exact - dw_approx, dy * 2 * w * w * q / temperature, rtol=1e-9, atol=1e-12)


@given(data=st.data())
def test_ltp_l0_and_mask_are_invariant_to_joint_rescaling(data):
    shape = _shape(data)
    rng = rng_from(data)
    w = rng.standard_normal(shape)
    tau, temperature = np.asarray(rng.uniform(0.05, 1.0)), float(rng.uniform(0.05, 1.0))
    l0, cache = ltp_l0_forward(w, tau, temperature)

    # any a: equal up to rounding
    a = float(rng.uniform(0.05, 20.0))
    l0_a, cache_a = ltp_l0_forward(a * w, a * a * tau, a * a * temperature)
    np.testing.assert_allclose(l0_a, l0, rtol=1e-12)
    np.testing.assert_allclose(_soft_mask(cache_a)[0], _soft_mask(cache)[0], rtol=1e-12, atol=1e-15)

    # a power of two: scaling commutes with rounding, so equality is exact
    a = 2.0 ** data.draw(st.integers(-6, 6), label="log2 a")
    l0_a, cache_a = ltp_l0_forward(a * w, a * a * tau, a * a * temperature)
    assert l0_a == l0
    np.testing.assert_array_equal(_soft_mask(cache_a)[0], _soft_mask(cache)[0])
    y, _ = ltp_mask_forward(w, tau, temperature)
    y_a, _ = ltp_mask_forward(a * w, a * a * tau, a * a * temperature)
    np.testing.assert_array_equal(y_a, a * y)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ltp_l0_without_weight_grad_sends_nothing_to_the_weights(dtype):
    w = np.array([0.3, -1.2, 0.8], dtype)
    _, cache = ltp_l0_forward(w, np.asarray(0.5, dtype), 0.2, weight_grad=False)
    dw, dtau, dtemperature = ltp_l0_backward(np.asarray(1.0, dtype), cache)
    assert dw is None and dtemperature is None
    assert dtau.dtype == dtype and dtau.shape == () and dtau < 0


# ------------------------------------------------------------------------- SCP
def _increasing(rng, n, low, step):
    """n strictly increasing values, consecutive ones at least ``step`` apart."""
    return low + np.cumsum(rng.uniform(step, 3 * step, n))


@given(data=st.data())
def test_scp_prob_falls_as_beta_rises_so_lower_beta_is_pruned(data):
    n = data.draw(st.integers(2, 12), label="n")
    rng = rng_from(data)
    gamma = np.full(n, rng.uniform(0.1, 2.0) * rng.choice([-1.0, 1.0]))
    beta = _increasing(rng, n, -3.0, 0.1)
    noise = np.full(n, rng.uniform(-2.0, 2.0))  # one noise value shared: only beta varies
    m_train, cache = scp_channel_mask_forward(gamma, beta, noise, training=True, **SCP)
    prob = cache.prob
    assert np.all(np.diff(prob) <= 0)
    inside = (prob[:-1] > 1e-12) & (prob[:-1] < 1 - 1e-12)
    assert np.all(np.diff(prob)[inside] < 0)
    assert np.all(np.diff(m_train) >= 0)  # the keep probability rises with beta
    m_eval, _ = scp_channel_mask_forward(gamma, beta, None, training=False, **SCP)
    assert np.all(np.diff(m_eval) >= 0)  # once pruned, every lower beta is pruned too
    # far below eps (in units of |gamma|) is pruned; far above is kept
    a = np.abs(gamma[:2]) + 1e-8
    extremes = np.array([SCP["eps"] - 10 * a[0], SCP["eps"] + 10 * a[1]])
    m_far, _ = scp_channel_mask_forward(gamma[:2], extremes, None, training=False, **SCP)
    np.testing.assert_array_equal(m_far, [0.0, 1.0])


@given(data=st.data())
def test_scp_prob_versus_gamma_depends_on_the_side_of_eps(data):
    # dP/d|gamma| = -phi(u) u / a: for beta < eps (u > 0) P rises as |gamma| falls; for beta > eps
    # (u < 0) P falls as |gamma| falls; at beta = eps, P = 1/2 for every gamma. The sign of gamma
    # does not matter.
    n = data.draw(st.integers(2, 12), label="n")
    rng = rng_from(data)
    magnitude = _increasing(rng, n, 0.05, 0.05)
    gamma = magnitude * rng.choice([-1.0, 1.0], n)
    eps = SCP["eps"]
    offset = rng.uniform(0.05, 1.0)
    settings = {**SCP, "c0": float(rng.uniform(0.05, 0.95))}

    _, below = scp_channel_mask_forward(gamma, np.full(n, eps - offset), None, training=False, **settings)
    _, above = scp_channel_mask_forward(gamma, np.full(n, eps + offset), None, training=False, **settings)
    _, at = scp_channel_mask_forward(gamma, np.full(n, eps), None, training=False, **settings)
    assert np.all(np.diff(below.prob) < 0) and np.all(below.prob > 0.5)
    assert np.all(np.diff(above.prob) > 0) and np.all(above.prob < 0.5)
    np.testing.assert_array_equal(at.prob, 0.5)
    _, flipped = scp_channel_mask_forward(-gamma, np.full(n, eps - offset), None, training=False, **settings)
    np.testing.assert_array_equal(flipped.prob, below.prob)

    # the evaluation mask follows P: a channel with a larger P is never kept when a smaller one is pruned
    beta = eps + rng.uniform(-1.0, 1.0, n)
    m, cache = scp_channel_mask_forward(gamma, beta, None, training=False, **settings)
    order = np.argsort(cache.prob)
    assert np.all(np.diff(m[order]) <= 0)
    np.testing.assert_array_equal(m, (cache.prob <= settings["c0"]).astype(float))


@pytest.mark.parametrize("dtype", FLOATS)
def test_scp_eval_gradients_are_zeros(dtype):
    gamma, beta = np.array([0.5, -1.0], dtype), np.array([0.2, -3.0], dtype)
    m, cache = scp_channel_mask_forward(gamma, beta, None, training=False, **SCP)
    np.testing.assert_array_equal(m, [1.0, 0.0])
    dgamma, dbeta, dnoise = scp_channel_mask_backward(np.ones(2, dtype), cache)
    assert dnoise is None
    for d in (dgamma, dbeta):
        assert d.dtype == dtype
        np.testing.assert_array_equal(d, 0.0)


# ---------------------------------------------------------------- dtype, settings
def test_every_new_kernel_keeps_float32():
    rng = np.random.default_rng(3)
    f32 = np.float32
    w = rng.standard_normal((4, 3, 2, 2)).astype(f32)
    dy = rng.standard_normal(w.shape).astype(f32)

    y, cache = abs_forward(w)
    assert y.dtype == f32 and abs_backward(dy, cache)[0].dtype == f32
    for s in (np.asarray(0.0, f32), np.full(4, -1.0, f32)):
        y, cache = str_threshold_forward(w, s)
        dw, ds = str_threshold_backward(dy, cache)
        assert y.dtype == dw.dtype == ds.dtype == f32 and ds.shape == s.shape
    tau = np.asarray(0.3, f32)
    for exact in (True, False):
        for temperature in (0.2, np.asarray(0.2, f32)):
            y, cache = ltp_mask_forward(w, tau, temperature, exact_grad=exact)
            dw, dtau, _ = ltp_mask_backward(dy, cache)
            assert y.dtype == dw.dtype == dtau.dtype == f32
    l0, cache = ltp_l0_forward(w, tau, 0.2)
    dw, dtau, _ = ltp_l0_backward(np.asarray(1.0, np.float64), cache)  # even a float64 cotangent
    assert l0.dtype == dw.dtype == dtau.dtype == f32 and l0.shape == dtau.shape == ()
    gamma, beta = rng.standard_normal(5).astype(f32), rng.standard_normal(5).astype(f32)
    noise = rng.logistic(size=5).astype(f32)
    for training in (True, False):
        m, cache = scp_channel_mask_forward(gamma, beta, noise, training=training, **SCP)
        dgamma, dbeta, _ = scp_channel_mask_backward(np.ones(5, f32), cache)
        assert m.dtype == dgamma.dtype == dbeta.dtype == f32


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), np.asarray(-0.5)])
@pytest.mark.parametrize("forward", [ltp_mask_forward, ltp_l0_forward])
def test_ltp_rejects_a_non_positive_temperature(forward, temperature):
    with pytest.raises(ValueError, match=r"temperature .*" + re.escape(str(float(temperature)))):
        forward(np.ones(3), np.asarray(0.1), temperature)


@pytest.mark.parametrize(
    "name, value",
    [("k", 0.0), ("k", -2.0), ("t", 0.0), ("t", -0.5), ("c0", 0.0), ("c0", 1.0), ("c0", 1.5), ("c0", -0.1)],
)
@pytest.mark.parametrize("training", [True, False])
def test_scp_rejects_bad_settings(name, value, training):
    settings = {**SCP, name: value}
    with pytest.raises(ValueError, match=rf"{name} .*{re.escape(str(value))}"):
        scp_channel_mask_forward(np.ones(2), np.zeros(2), np.zeros(2), training=training, **settings)


# --------------------------------------------------------------------- wrappers
def test_functional_wrappers_record_the_kernels():
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((3, 4))
    c = rng.standard_normal((3, 4))

    w, s = Tensor(w0.copy(), requires_grad=True), Tensor(np.full(3, -1.0), requires_grad=True)
    F.sum(F.mul(F.str_threshold(w, s), c)).backward()
    _, cache = str_threshold_forward(w0, np.full(3, -1.0))
    dw, ds = str_threshold_backward(c, cache)
    np.testing.assert_array_equal(w.grad, dw)
    np.testing.assert_array_equal(s.grad, ds)

    x = Tensor(w0.copy(), requires_grad=True)
    F.sum(F.mul(F.abs(x), c)).backward()
    np.testing.assert_array_equal(x.grad, c * np.sign(w0))

    gamma = Tensor(rng.standard_normal(4), requires_grad=True)
    beta = Tensor(rng.standard_normal(4) * 0.1, requires_grad=True)
    noise = rng.logistic(size=4)
    m = F.scp_channel_mask(gamma, beta, noise, training=True, **SCP)
    F.sum(F.mul(m, c[0])).backward()
    _, cache = scp_channel_mask_forward(gamma.data, beta.data, noise, training=True, **SCP)
    dgamma, dbeta, _ = scp_channel_mask_backward(c[0], cache)
    np.testing.assert_array_equal(gamma.grad, dgamma)
    np.testing.assert_array_equal(beta.grad, dbeta)
    m_eval = F.scp_channel_mask(gamma.data, beta.data, None, training=False, **SCP)
    assert m_eval.shape == (4,) and not m_eval.requires_grad


@given(data=st.data())
def test_ltp_mask_plus_lambda_l0_reproduces_the_exact_ltp_gradients(data):
    # METHODS section 2, (5)-(6): L = sum(G * W_eff) + lambda * L0
    shape = _shape(data, max_dims=3)
    rng = rng_from(data)
    w0 = rng.standard_normal(shape)
    tau0, temperature, lam = rng.uniform(0.05, 1.0), float(rng.uniform(0.05, 1.0)), rng.uniform(0.1, 2.0)
    g = rng.standard_normal(shape)
    w, tau = Tensor(w0.copy(), requires_grad=True), Tensor(np.asarray(tau0), requires_grad=True)
    temp = Tensor(np.asarray(temperature), requires_grad=True)
    task = F.sum(F.mul(F.ltp_mask(w, tau, temp), g))
    (task + F.mul(F.ltp_l0(w, tau, temp), lam)).backward()
    m = _sigmoid64((w0 * w0 - tau0) / temperature)
    q = m * (1 - m)
    np.testing.assert_allclose(
        w.grad,
        g * (m + 2 * w0 * w0 * q / temperature) + lam * 2 * w0 * q / temperature,
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        tau.grad, -(1 / temperature) * np.sum(q * (g * w0 + lam)), rtol=1e-9, atol=1e-12
    )
    assert temp.grad is None  # the temperature is a constant


def _bn_inputs(rng, spatial):
    shape = (4, 3, 2, 2) if spatial else (5, 3)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0) + 0.3
    return (
        x,
        rng.uniform(0.5, 2.0, 3),
        rng.standard_normal(3),
        rng.standard_normal(3),
        rng.uniform(0.5, 2.0, 3),
    )


@pytest.mark.parametrize("spatial", [False, True])
@given(data=st.data())
def test_batch_norm_update_mask_freezes_exactly_the_masked_channels(spatial, data):
    rng = rng_from(data)
    x, gamma, beta, mean0, var0 = _bn_inputs(rng, spatial)
    mask = data.draw(hnp.arrays(bool, 3), label="update_mask")
    mean_free, var_free = mean0.copy(), var0.copy()
    y_free = F.batch_norm(Tensor(x), Tensor(gamma), Tensor(beta), mean_free, var_free, True, momentum=0.3)
    mean_masked, var_masked = mean0.copy(), var0.copy()
    y_masked = F.batch_norm(
        Tensor(x), Tensor(gamma), Tensor(beta), mean_masked, var_masked, True, momentum=0.3, update_mask=mask
    )
    np.testing.assert_array_equal(y_masked.data, y_free.data)
    for masked, free, old in ((mean_masked, mean_free, mean0), (var_masked, var_free, var0)):
        np.testing.assert_array_equal(masked[mask], free[mask])  # bit-exact, as without a mask
        np.testing.assert_array_equal(masked[~mask], old[~mask])  # untouched
    # evaluation mode updates nothing, mask or not
    F.batch_norm(Tensor(x), Tensor(gamma), Tensor(beta), mean_masked, var_masked, False, update_mask=mask)
    np.testing.assert_array_equal(mean_masked[~mask], mean0[~mask])


@pytest.mark.parametrize("bad", [np.ones(3), np.ones(2, bool), np.ones((3, 1), bool)])
def test_batch_norm_rejects_a_bad_update_mask(bad):
    x, gamma, beta, mean, var = _bn_inputs(np.random.default_rng(1), True)
    with pytest.raises(ValueError, match="update_mask"):
        F.batch_norm(Tensor(x), Tensor(gamma), Tensor(beta), mean, var, True, update_mask=bad)
