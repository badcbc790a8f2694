"""Learnable-sparsity kernels: STR soft thresholding, LTP soft masks and L0, SCP channel masks.

Notation: ``dy`` is the upstream gradient of the op's output (``G`` in the
equations), ``sigmoid(x) = 1 / (1 + exp(-x))`` and ``sigmoid'(x) =
sigmoid(x) (1 - sigmoid(x))``. Every op computes in the dtype of its first
input (float32 in training) and returns that dtype; sums over many weights
accumulate in float64 and are cast back.

The sigmoid is evaluated without overflow for any ``|x|``: with
``e = exp(-|x|)`` (never above 1)::

    sigmoid(x)  = 1 / (1 + e)       for x >= 0,   e / (1 + e)   for x < 0   (0)
    sigmoid'(x) = e / (1 + e)^2     for every x

The slope is formed from ``e`` rather than as ``s (1 - s)``, which loses all
its digits once ``sigmoid(x)`` rounds to 1. In float32, ``x = -3200`` gives
``e = 0`` and so a sigmoid and a slope of exactly 0.

STR: soft threshold weight reparameterization (METHODS section 1)
------------------------------------------------------------------

``s`` is one threshold logit per layer (shape ``()``) or per output channel
(shape ``(O,)``, broadcast over the trailing axes of ``w`` of shape
``(O, ...)``)::

    g     = sigmoid(s)                      (in w's dtype)                   (1)
    W_eff = sign(W) max(|W| - g, 0)
          = M (W - sign(W) g),   M = [|W| > g]                              (2)

Both forms of (2) agree everywhere, at ``|W| = g`` included (both give 0);
the code uses the second, which gives a clean +0 for every pruned weight.

Backward. Inside ``M`` (2) is ``W - sign(W) g`` with derivative 1 in ``W``
and ``-sign(W)`` in ``g``; outside it is the constant 0::

    dW = G M                                                                (3)
    ds = -sigmoid'(s) sum(G sign(W) M)          per layer, a scalar          (4)
    ds_o = -sigmoid'(s_o) sum_{i in channel o} G_i sign(W_i) M_i            (5)

Kink: at ``|W| = g`` the map is not differentiable. The mask is strict, so
such a weight counts as pruned: ``W_eff = 0``, ``dW = 0`` and it adds nothing
to ``ds``: the derivative on the pruned side (``|W| < g`` in ``W``, ``g > |W|`` in ``g``).
A test pins this.
``sign(0) = 0`` never matters: ``W = 0`` is always outside ``M``.

LTP: learned threshold pruning (METHODS section 2)
--------------------------------------------------

``tau`` (shape ``()``) thresholds the squared weight; the temperature ``T``
is a positive constant (no gradient)::

    z = (W^2 - tau) / T,   m = sigmoid(z),   q = sigmoid'(z) = m (1 - m)   (6)
    W_eff = W m                                                             (7)

With ``dz/dW = 2W/T`` and ``dz/dtau = -1/T``, (7) gives::

    dW   = G (m + 2 W^2 q / T)                  exact_grad=True              (8)
    dW   = G m                                  exact_grad=False             (9)
    dtau = -(1/T) sum(q G W)                    both                        (10)

(9) is the approximation ``dW_eff/dW ~ m`` (the sigmoid held constant for
the weight gradient only); ``tau`` always gets its exact gradient (10).

The differentiable L0 count and its gradient (``dy`` a scalar)::

    L0   = sum(m)                                                           (11)
    dW   = dy 2 W q / T                         weight_grad=True             (12)
    dW   = None (no gradient)                   weight_grad=False            (13)
    dtau = -(dy / T) sum(q)                                                 (14)

With ``L = L_task + lambda L0`` (METHODS (3)), the mask op's backward fed
``G`` plus this op's backward fed ``dy = lambda`` sum to METHODS (5)-(6):
(8) + lambda (12) is (5) and (10) + lambda (14) is (6). ``weight_grad=False``
drops the L0 term's weight gradient, one reading of the paper.

LTP has no kink: (6)-(14) are smooth in ``W`` and ``tau``. At ``W^2 = tau``,
``m = 1/2`` and ``q = 1/4`` (a test pins the gradients there).

Tiny temperatures. The kernels divide by ``T_w``, the temperature rounded to
w's dtype (``T`` itself unless it is a subnormal of that dtype). A ``T`` that
rounds to 0 (below about 7e-46 in float32) is rejected with a ConfigError
naming it: (6) would be ``0 / 0 = NaN`` at ``W^2 = tau``. Every other finite
``T > 0`` is accepted, so the backward never forms ``1/T`` or ``2/T``: those
overflow once ``T < 2 / max(dtype)`` (about 5.9e-39 in float32), and a
weight outside the band (``q = 0``) would then get ``0 * inf = NaN``. Each
term of (8), (10), (12) and (14) is instead a numerator that carries the
factor ``q``, divided by ``T_w`` last, and the result saturates::

    sat(x) = min(max(x, -F), F),   F the largest finite value of x's dtype  (23)
    dW   = sat(G m + (2 G (W q) W) / T_w)          (8), as evaluated
    dtau = sat(-sum(q G W) / T_w)                  (10), as evaluated
    dW   = sat((2 dy) (W q) / T_w)                 (12), as evaluated
    dtau = sat(-(dy sum(q)) / T_w)                 (14), as evaluated

These are (8)-(14) with ``2/T`` and ``1/T`` moved to the end: the same values
wherever nothing overflows. Where ``q = 0`` the numerator is exactly 0
(``W q`` is formed first, so a ``W^2`` that would overflow meets the 0
first) and ``0 / T_w = 0``: (8) is exactly ``G m`` and (12) exactly 0, the
derivative of the forward as computed, whose ``m`` is flat there (exactly 0
or 1). Where ``q > 0`` the true value can exceed the dtype: at ``W^2 = tau``
(``q = 1/4``), (8) is ``G (1/2 + tau / (2 T))``, beyond ``F`` once ``T`` falls
below about ``tau |G| / (2 F)``. (23) then gives ``sign(G) F``, the
largest value the dtype holds, in the direction of the true derivative,
instead of ``inf``; it is a convention (a test pins it), chosen so that one
such weight cannot turn an optimizer's arithmetic into ``inf`` and then NaN.
NaN in stays NaN out. The weight gradients are evaluated in w's dtype, the
sums of (10) and (14) in float64 (``T_w`` is exact in float64), and (23) is
applied in the dtype of the result (w's for ``dW``, tau's for ``dtau``).

SCP: operation-aware soft channel pruning (METHODS section 3)
-------------------------------------------------------------

Per channel ``c`` (``gamma``, ``beta``, ``noise`` all of shape ``(C,)``), with
``Phi`` and ``phi`` the standard normal CDF and pdf and ``a = |gamma| + 1e-8``::

    u = (eps - beta) / a,   P = Phi(u)                                      (15)
    training:   m = sigmoid(z),  z = (k (c0 - P) + L) / t                   (16)
    evaluation: m = [P <= c0]   (1.0 keep / 0.0 prune, gamma's dtype)       (17)

``L = log U - log(1 - U)`` is the logistic noise, drawn by the caller and
held fixed (no gradient); evaluation ignores it (it may be None).

Backward in training, from (16) and (15), with ``du/dbeta = -1/a`` and
``du/dgamma = -(u / a) d|gamma|/dgamma``::

    dz     = G sigmoid'(z)                                                  (18)
    dP     = -(k / t) dz                                                    (19)
    dbeta  = -dP phi(u) / a                                                 (20)
    dgamma = -dP phi(u) u sign(gamma) / a                                   (21)

Kink: ``|gamma|`` is not differentiable at 0; (21) uses the subgradient
``sign(0) = 0``, so ``gamma = 0`` gets ``dgamma = 0`` (a test pins it).

Evaluation: (17) is piecewise constant in ``gamma`` and ``beta``; its
backward returns zeros of their shapes and dtypes (its derivative wherever
``P != c0``; at ``P = c0`` the zero is a choice)::

    dgamma = 0,   dbeta = 0                                                 (22)

Settings are checked: ``T > 0`` (and not 0 in w's dtype), ``k > 0``,
``t > 0`` and ``0 < c0 < 1``; anything else raises
:class:`reference.errors.ConfigError` (a ValueError) naming the value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import ndtr

from reference.caches import LtpCache, ScpCache, StrCache, grad_flags
from reference.contracts import check_scp_settings, ltp_temperature
from reference.errors import ShapeError

__all__ = [
    "str_threshold_forward",
    "str_threshold_backward",
    "ltp_mask_forward",
    "ltp_mask_backward",
    "ltp_l0_forward",
    "ltp_l0_backward",
    "scp_channel_mask_forward",
    "scp_channel_mask_backward",
]

_ACC = np.float64  # accumulator dtype for sums over many weights
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GAMMA_FLOOR = 1e-8  # a = |gamma| + 1e-8 in (15)


# --------------------------------------------------------------------- helpers
def _sigmoid(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmoid(x), sigmoid'(x))`` in x's dtype, stable for any ``|x|`` (equation (0))."""
    e = np.exp(-np.abs(x))
    one_plus = 1 + e
    sig = np.where(x >= 0, 1 / one_plus, e / one_plus)
    slope = e / (one_plus * one_plus)
    return sig, slope


def _float_array(op: str, name: str, x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise ShapeError(f"{op} expects {name} as a floating-point NumPy array, got {got}")
    return x


def _scalar_input(op: str, name: str, x: Any, dtype) -> tuple[Any, Any]:
    """A shape-() input as ``dtype``, and its own dtype (None for a Python number: no gradient)."""
    if isinstance(x, (np.ndarray, np.generic)):
        if x.shape != ():
            raise ShapeError(f"{op} expects {name} of shape (), got {x.shape}")
        return np.asarray(x, dtype=dtype), x.dtype
    if isinstance(x, (int, float)):
        return np.asarray(x, dtype=dtype), None
    raise ShapeError(f"{op} expects {name} as a number or a 0-d array, got {type(x).__name__}")


def _saturate(x: Any, dtype) -> Any:
    """(23): ``x`` clipped to the finite range of ``dtype`` (NaN stays NaN), as ``dtype``."""
    big = np.finfo(dtype).max
    return np.clip(x, -big, big).astype(dtype, copy=False)


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-output-channel (O,) vector shaped to broadcast against a weight of ``ndim`` axes."""
    return v.reshape((-1,) + (1,) * (ndim - 1))  # (O,) -> (O, 1, ..., 1)


# ------------------------------------------------------------------------- STR
def str_threshold_forward(w: np.ndarray, s: Any, needs_input_grad=None) -> tuple[np.ndarray, StrCache]:
    """STR soft threshold (2) of ``w`` with ``g = sigmoid(s)``; ``s`` of shape () or (w.shape[0],).

    The cache keeps ``w`` itself and ``g``; the mask ``M`` is recomputed in the backward.
    """
    op = "str_threshold"
    need_w, need_s = grad_flags(op, needs_input_grad, 2)
    w = _float_array(op, "w", w)
    dtype = w.dtype
    if isinstance(s, (np.ndarray, np.generic)):
        s_dtype = s.dtype
        s_arr = np.asarray(s, dtype=dtype)
    elif isinstance(s, (int, float)):
        s_dtype = None
        s_arr = np.asarray(s, dtype=dtype)
    else:
        raise ShapeError(f"{op} expects s as a number or an array, got {type(s).__name__}")
    per_channel = s_arr.ndim == 1
    if s_arr.ndim > 1 or (per_channel and (w.ndim == 0 or s_arr.shape[0] != w.shape[0])):
        expected = "()" if w.ndim == 0 else f"() or ({w.shape[0]},)"
        raise ShapeError(f"{op} expects s of shape {expected} for w of shape {w.shape}, got {s_arr.shape}")

    g, slope = _sigmoid(s_arr)  # (1), in w's dtype
    g_w = _channel_view(g, w.ndim) if per_channel else g
    mask = np.abs(w) > g_w  # (2), strict: |W| == g is pruned
    w_eff = np.where(mask, w - np.sign(w) * g_w, dtype.type(0))  # (2)
    cache = StrCache(w, g, slope, dtype if need_w else None, s_dtype if need_s else None, per_channel)
    return w_eff.astype(dtype, copy=False), cache


def str_threshold_backward(dy: np.ndarray, cache: StrCache):
    w, g, slope, w_dtype, s_dtype, per_channel = cache
    mask = np.abs(w) > (_channel_view(g, w.ndim) if per_channel else g)  # M of (2), recomputed from w
    dw = None if w_dtype is None else (dy * mask).astype(w_dtype, copy=False)  # (3)
    ds = None
    if s_dtype is not None:
        signed = np.where(mask, dy * np.sign(w), 0)  # G sign(W) M
        if per_channel:
            # (O, ...) -> (O, prod(...)), summed per channel
            total = signed.reshape(signed.shape[0], -1).sum(axis=1, dtype=_ACC)
            ds = (-slope.astype(_ACC) * total).astype(s_dtype)  # (5)
        else:
            total = signed.sum(dtype=_ACC)
            ds = np.asarray(-float(slope) * total, dtype=s_dtype)  # (4)
    return dw, ds


# ------------------------------------------------------------------------- LTP
def _ltp_sigmoid(w: np.ndarray, tau_arr: np.ndarray, temp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(m, q)`` of (6) in w's dtype; the forward computes them and the backward again, from ``w``."""
    dtype = w.dtype
    with np.errstate(over="ignore"):  # a tiny T sends z to +-inf: m is then exactly 0 or 1, q 0
        z = (w * w - tau_arr) / dtype.type(temp)  # (6)
    m, q = _sigmoid(z)  # (6)
    return m.astype(dtype, copy=False), q.astype(dtype, copy=False)


def _ltp_soft_mask(op: str, w, tau, temperature, flag: bool, needs_input_grad) -> tuple[np.ndarray, LtpCache]:
    """``m`` of (6) and a cache holding ``w`` itself (not ``m`` or ``q``: the backward recomputes them)."""
    need_w, need_tau, _ = grad_flags(op, needs_input_grad, 3)
    w = _float_array(op, "w", w)
    dtype = w.dtype
    temp = ltp_temperature(op, temperature, dtype)  # finite, > 0, and not 0 in w's dtype
    tau_arr, tau_dtype = _scalar_input(op, "tau", tau, dtype)
    m, _ = _ltp_sigmoid(w, tau_arr, temp)  # (6)
    cache = LtpCache(w, tau_arr, temp, bool(flag), dtype if need_w else None, tau_dtype if need_tau else None)
    return m, cache


def ltp_mask_forward(
    w: np.ndarray, tau: Any, temperature: Any, exact_grad: bool = True, needs_input_grad=None
):
    """LTP soft-masked weight ``W sigmoid((W^2 - tau) / T)`` (7); ``temperature`` gets no gradient."""
    m, cache = _ltp_soft_mask("ltp_mask", w, tau, temperature, exact_grad, needs_input_grad)
    return cache.w * m, cache  # (7)


def ltp_mask_backward(dy: np.ndarray, cache: LtpCache):
    w, tau, temp, exact_grad, w_dtype, tau_dtype = cache
    m, q = _ltp_sigmoid(w, tau, temp)  # (6), recomputed from w
    dtype = w.dtype
    t_w = dtype.type(temp)  # T_w: T in w's dtype, as the forward divides by it
    dw = None
    with np.errstate(over="ignore"):  # an overflow saturates (23)
        if w_dtype is not None:
            dw = dy * m  # (9)
            if exact_grad:
                dw = _saturate(dw + (2 * dy * (w * q) * w) / t_w, dtype)  # (8), T_w last, (23)
            dw = dw.astype(dtype, copy=False)
        dtau = None
        if tau_dtype is not None:
            total = np.sum(q * dy * w, dtype=_ACC)
            dtau = np.asarray(_saturate(-total / float(t_w), tau_dtype), dtype=tau_dtype)  # (10), (23)
    return dw, dtau, None


def ltp_l0_forward(
    w: np.ndarray, tau: Any, temperature: Any, weight_grad: bool = True, needs_input_grad=None
):
    """LTP differentiable L0 count ``sum(m)`` (11), a 0-d array of w's dtype."""
    m, cache = _ltp_soft_mask("ltp_l0", w, tau, temperature, weight_grad, needs_input_grad)
    return np.asarray(np.sum(m, dtype=_ACC), dtype=cache.w.dtype), cache  # (11)


def ltp_l0_backward(dy: Any, cache: LtpCache):
    w, tau, temp, weight_grad, w_dtype, tau_dtype = cache
    _, q = _ltp_sigmoid(w, tau, temp)  # (6), recomputed from w
    weight_grad = weight_grad and w_dtype is not None
    dtype = w.dtype
    t_w = dtype.type(temp)  # T_w: T in w's dtype, as the forward divides by it
    g = float(dy)  # the upstream gradient of a scalar
    dw = dtau = None  # (13)
    with np.errstate(over="ignore"):  # an overflow saturates (23)
        if weight_grad:
            dw = _saturate((w * q) * dtype.type(2.0 * g) / t_w, dtype)  # (12), T_w last, (23)
        if tau_dtype is not None:
            total = np.sum(q, dtype=_ACC)
            dtau = np.asarray(_saturate(-(g * total) / float(t_w), tau_dtype), dtype=tau_dtype)  # (14), (23)
    return dw, dtau, None


# ------------------------------------------------------------------------- SCP
def scp_channel_mask_forward(gamma, beta, noise, k, c0, t, eps, training, needs_input_grad=None):
    """SCP channel mask: the relaxed sample (16) in training, the hard mask (17) in evaluation."""
    op = "scp_channel_mask"
    need_gamma, need_beta, _ = grad_flags(op, needs_input_grad, 3)
    check_scp_settings(k, c0, t, eps)
    gamma = _float_array(op, "gamma", gamma)
    beta = _float_array(op, "beta", beta)
    if gamma.ndim != 1 or beta.shape != gamma.shape:
        raise ShapeError(f"{op} expects gamma and beta of one shape (C,), got {gamma.shape} and {beta.shape}")
    if training:
        noise = _float_array(op, "noise", noise)
        if noise.shape != gamma.shape:
            raise ShapeError(f"{op} expects noise of shape {gamma.shape}, got {noise.shape}")
    dtype = gamma.dtype

    a = np.abs(gamma) + dtype.type(_GAMMA_FLOOR)
    u = (dtype.type(eps) - beta.astype(dtype, copy=False)) / a  # (15)
    prob = ndtr(u).astype(dtype, copy=False)  # (15)
    sign_gamma = np.sign(gamma)  # sign(0) = 0
    if training:
        z = (float(k) * (float(c0) - prob) + noise.astype(dtype, copy=False)) / dtype.type(t)  # (16)
        m, slope = _sigmoid(z.astype(dtype, copy=False))  # (16)
    else:
        m, slope = (prob <= dtype.type(c0)).astype(dtype), None  # (17)
    cache = ScpCache(
        prob,
        u,
        a,
        sign_gamma,
        slope,
        float(k) / float(t),
        bool(training),
        gamma.dtype if need_gamma else None,
        beta.dtype if need_beta else None,
    )
    return m.astype(dtype, copy=False), cache


def scp_channel_mask_backward(dy: np.ndarray, cache: ScpCache):
    _, u, a, sign_gamma, slope, k_over_t, training, gamma_dtype, beta_dtype = cache
    if not training:
        dgamma = None if gamma_dtype is None else np.zeros(u.shape, gamma_dtype)  # (22)
        dbeta = None if beta_dtype is None else np.zeros(u.shape, beta_dtype)  # (22)
        return dgamma, dbeta, None
    dtype = u.dtype
    dz = dy * slope  # (18)
    dp = dz * dtype.type(-k_over_t)  # (19)
    with np.errstate(over="ignore"):  # u^2 may overflow for gamma ~ 0; exp(-inf) = 0 is right
        density = np.exp(-0.5 * u * u) * dtype.type(_INV_SQRT_2PI)  # phi(u)
    dp_phi_over_a = dp * density / a
    dbeta = None if beta_dtype is None else (-dp_phi_over_a).astype(beta_dtype, copy=False)  # (20)
    dgamma = None
    if gamma_dtype is not None:
        dgamma = (-dp_phi_over_a * u * sign_gamma).astype(gamma_dtype, copy=False)  # (21)
    return dgamma, dbeta, None
