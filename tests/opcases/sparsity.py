"""Cases for the sparsity kernels (STR, LTP, SCP) and the absolute value.

Oracles follow the papers' formulas in ``autograd.numpy``; every kinked piece
(``|x|``, ``max(., 0)``, ``[P <= c0]``) is built with ``anp.where``.

Inputs stay away from kinks by construction:

- STR: the threshold ``g`` is drawn first, then each ``|w|`` either in
  ``[g + 0.05, g + 1.5]`` (survives) or in ``[0, g - 0.05]`` (pruned), so no
  weight is within 0.05 of ``|w| = g``.
- abs: ``|x| >= 0.1``.
- SCP: ``|gamma| >= 0.1``; in evaluation ``P`` is drawn at least 0.05 away from
  ``c0`` (``beta`` is solved from it), so the hard mask does not flip under the
  finite difference.

LTP and the SCP training mask are smooth; they need no such care.

The LTP approximate weight gradient (``exact_grad=False``) is not the
derivative of the forward, so it cannot pass the finite-difference check that
every entry of ``CASES`` runs. :data:`LTP_APPROX_CASE` is therefore kept out of
``CASES``; ``tests/test_sparsity_ops.py`` runs the forward and VJP checks on it
against its own oracle, which holds the sigmoid constant for the weight path
only (``getval`` on ``w`` inside the mask, the custom-gradient trick), plus a
direct check against the formula ``dW = G m``.
"""

import autograd.numpy as anp
import hypothesis.extra.numpy as hnp
import numpy as np
from autograd.scipy.special import erf
from autograd.tracer import getval
from hypothesis import strategies as st
from scipy.special import ndtri

from tests.harness import OpCase, away_from_zero, rng_from

_MARGIN = 0.05  # distance of every STR weight from |w| = g


# ----------------------------------------------------------------------- abs
def _abs_draw(data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=5), label="shape")
    return (away_from_zero(rng_from(data), shape),), {}


def _abs_oracle(x):
    return anp.where(x >= 0, x, -x)


# ----------------------------------------------------------------------- STR
def _logit(g):
    return np.log(g) - np.log1p(-g)


def _str_weights(rng, g, shape):
    """Weights of ``shape`` with every |w| at least _MARGIN away from its threshold ``g`` (broadcast)."""
    g = np.broadcast_to(g, shape)
    can_prune = g > 2 * _MARGIN
    survive = (rng.uniform(size=shape) < 0.5) | ~can_prune
    kept = rng.uniform(size=shape) * 1.45 + g + _MARGIN  # [g + 0.05, g + 1.5]
    pruned = rng.uniform(size=shape) * np.maximum(g - _MARGIN, 0.0)  # [0, g - 0.05]
    magnitude = np.where(survive, kept, pruned)
    return magnitude * rng.choice([-1.0, 1.0], size=shape)


def _str_draw(per_channel: bool, strongly_negative: bool):
    def draw(data):
        shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), label="shape")
        rng = rng_from(data)
        s_shape = (shape[0],) if per_channel else ()
        if strongly_negative:
            s = rng.uniform(-40.0, -10.0, s_shape)  # g = sigmoid(s) below 5e-5: nothing is pruned
        else:
            s = _logit(rng.uniform(0.02, 0.75, s_shape))  # s in about (-3.9, 1.1), around 0
        g = 1.0 / (1.0 + np.exp(-s))
        g_w = g.reshape((-1,) + (1,) * (len(shape) - 1)) if per_channel else g  # (O,) -> (O, 1, ...)
        return (_str_weights(rng, g_w, shape), np.asarray(s)), {}

    return draw


def _str_oracle(w, s):
    g = 1.0 / (1.0 + anp.exp(-s))  # (1)
    if anp.ndim(s) == 1:
        g = anp.reshape(g, (-1,) + (1,) * (anp.ndim(w) - 1))  # (O,) -> (O, 1, ..., 1)
    magnitude = anp.where(w >= 0, w, -w)
    shrunk = magnitude - g
    return anp.sign(w) * anp.where(shrunk > 0, shrunk, 0.0)  # (2): sign(W) max(|W| - g, 0)


# ----------------------------------------------------------------------- LTP
def _ltp_draw(static_key: str, flag: bool, array_temperature: bool = False):
    def draw(data):
        shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), label="shape")
        rng = rng_from(data)
        w = rng.standard_normal(shape)
        tau = np.asarray(rng.uniform(0.05, 1.0))
        temperature = float(rng.uniform(0.05, 1.0))
        if array_temperature:
            temperature = np.asarray(temperature)
        return (w, tau, temperature), {static_key: flag}

    return draw


def _soft_mask(w, tau, temperature):
    return 1.0 / (1.0 + anp.exp(-(w * w - tau) / temperature))


def _ltp_mask_oracle(w, tau, temperature, exact_grad=True):
    return w * _soft_mask(w, tau, temperature)


def _ltp_mask_approx_oracle(w, tau, temperature, exact_grad=False):
    """W m with m held constant along the weight path only: dW = G m, tau's gradient exact."""
    return w * _soft_mask(getval(w), tau, temperature)


def _ltp_l0_oracle(w, tau, temperature, weight_grad=True):
    return anp.sum(_soft_mask(w, tau, temperature))


# ----------------------------------------------------------------------- SCP
def _phi_cdf(u):
    return 0.5 * (1.0 + erf(u / np.sqrt(2.0)))


def _scp_settings(rng):
    return {
        "k": float(rng.uniform(1.0, 20.0)),
        "c0": float(rng.uniform(0.3, 0.95)),
        "t": float(rng.uniform(0.5, 2.0)),
        "eps": float(rng.uniform(0.0, 0.1)),
    }


def _scp_draw(training: bool):
    def draw(data):
        c = data.draw(st.integers(1, 8), label="C")
        rng = rng_from(data)
        static = _scp_settings(rng)
        gamma = away_from_zero(rng, (c,), 0.1, 2.0)
        a = np.abs(gamma) + 1e-8
        if training:
            u = rng.normal(0.0, 1.5, c)
            noise_u = rng.uniform(0.01, 0.99, c)
            noise = np.log(noise_u) - np.log1p(-noise_u)  # logistic
        else:
            c0 = static["c0"]
            below = rng.uniform(0.001, c0 - _MARGIN, c)  # kept: P <= c0 - 0.05
            gap = 1.0 - c0  # pruned: P in the upper half of (c0, 1), at least 0.025 above c0
            above = rng.uniform(c0 + gap / 2, 1.0 - gap / 10, c)
            u = ndtri(np.where(rng.uniform(size=c) < 0.5, below, above))
            noise = None
        beta = static["eps"] - u * a  # so that (eps - beta) / a = u
        return (gamma, beta, noise), {**static, "training": training}

    return draw


def _scp_oracle(gamma, beta, noise, k, c0, t, eps, training):
    a = anp.where(gamma >= 0, gamma, -gamma) + 1e-8
    prob = _phi_cdf((eps - beta) / a)  # (1)
    if not training:
        # (3); adding 0 * prob keeps the output on autograd's tape, so the VJP is an
        # explicit zero rather than a "seems independent of input" warning
        return anp.where(prob <= c0, 1.0, 0.0) + 0.0 * prob
    return 1.0 / (1.0 + anp.exp(-(k * (c0 - prob) + noise) / t))  # (2)


LTP_APPROX_CASE = OpCase(
    "ltp_mask", _ltp_draw("exact_grad", False), _ltp_mask_approx_oracle, wrt=(0, 1), label="approx"
)

CASES = [
    OpCase("abs", _abs_draw, _abs_oracle, wrt=(0,)),
    OpCase("str_threshold", _str_draw(False, False), _str_oracle, wrt=(0, 1), label="layer"),
    OpCase("str_threshold", _str_draw(True, False), _str_oracle, wrt=(0, 1), label="channel"),
    OpCase("str_threshold", _str_draw(False, True), _str_oracle, wrt=(0, 1), label="layer-s-negative"),
    OpCase("str_threshold", _str_draw(True, True), _str_oracle, wrt=(0, 1), label="channel-s-negative"),
    OpCase("ltp_mask", _ltp_draw("exact_grad", True), _ltp_mask_oracle, wrt=(0, 1), label="exact"),
    OpCase(
        "ltp_mask",
        _ltp_draw("exact_grad", True, array_temperature=True),
        _ltp_mask_oracle,
        wrt=(0, 1),
        label="exact-array-T",
    ),
    OpCase("ltp_l0", _ltp_draw("weight_grad", True), _ltp_l0_oracle, wrt=(0, 1), label="weight-grad"),
    OpCase("ltp_l0", _ltp_draw("weight_grad", False), _ltp_l0_oracle, wrt=(1,), label="tau-only"),
    OpCase("scp_channel_mask", _scp_draw(True), _scp_oracle, wrt=(0, 1), label="train"),
    # Evaluation: the hard mask's VJP is zero, which the kernel's zeros must match.
    OpCase("scp_channel_mask", _scp_draw(False), _scp_oracle, wrt=(0, 1), label="eval"),
]
