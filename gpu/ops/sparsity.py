"""Learnable-sparsity kernels on the GPU: the twin of ``reference.ops.sparsity``.

Equation numbers are those of ``reference.ops.sparsity`` (cited, not derived
again): the stable sigmoid (0); STR (1)-(5); LTP (6)-(14); SCP (15)-(22).
Every op computes in the dtype of its first input and returns that dtype; sums
over many weights accumulate in double inside the reduction kernels and are
cast once at the end, as in the reference.

The sigmoid helper (0) is the same as the reference's: ``e = exp(-|x|)``,
``sigmoid = 1 / (1 + e)`` or ``e / (1 + e)`` by the sign of ``x``, and the
slope ``e / (1 + e)^2``, evaluated in the op's dtype. In float32,
``x = -3200`` gives ``e = 0``: a threshold and a slope of exactly 0.

Kernels, one launch each (no op reads a device value back to the host):

- STR: ``str_sigmoid`` forms ``g`` (1) and ``sigmoid'(s)`` on ``s``'s shape;
  ``str_threshold_forward`` writes ``W_eff`` and the strict mask ``M`` (2);
  ``str_threshold_backward_dw`` is (3); ``str_threshold_ds`` reduces
  ``-sigmoid'(s) G sign(W) M`` in double, over everything (4) or over the
  trailing axes of each output channel (5). The factor ``-sigmoid'(s)``
  (constant per reduction) multiplies each term rather than the sum: the
  same value up to the last bit of a double.
- LTP: ``ltp_mask_forward`` writes ``W_eff`` (7), ``m`` and ``q`` (6);
  ``ltp_soft_mask`` writes ``m`` and ``q`` for the L0 count, which
  ``ltp_l0_count`` sums (11); ``ltp_mask_backward_dw`` is (8) or (9),
  ``ltp_mask_dtau`` is (10), ``ltp_l0_backward_dw`` is (12), ``ltp_l0_dtau``
  is (14). As with STR, the constants ``1/T`` and ``dy/T`` multiply each
  term of the double sums.
- SCP: ``scp_mask_train`` forms (15) and (16) for all channels in one pass,
  ``scp_mask_eval`` forms (15) and (17), ``scp_mask_backward`` is (18)-(21);
  ``Phi`` is CUDA's ``normcdf`` evaluated in double and rounded to the op's
  dtype (as SciPy's ``ndtr`` is), ``phi`` is ``exp(-u^2/2) / sqrt(2 pi)`` in
  the op's dtype as in the reference.

Differences from the reference, all about values that live on the device:

- ``tau`` and ``s`` may be CuPy arrays (as parameters on the GPU are); they go
  into the kernels as device arrays, never read to the host. A Python or
  NumPy number is accepted as in the reference.
- ``temperature`` may be a Python number, a NumPy scalar or 0-d array, or a 0-d
  CuPy array. Host values are validated exactly as in the reference (same
  errors, same messages). A 0-d CuPy array has its shape checked but not its
  value (that would need a device-to-host copy and a synchronisation); it is
  cast to float64 on the device and passed into the kernels, where the
  reference uses the Python float. ``LtpCache.temperature`` therefore holds
  either a Python float or that 0-d float64 device array.
- ``ltp_l0_backward`` takes ``dy`` as a 0-d device array (the gradient of the
  count) or a host number and uses it on the device, without ``float(dy)``.
- The array-type check names CuPy: ``... as a floating-point CuPy array, got
  ...`` where the reference says NumPy. Every other validation error is the
  reference's class and message.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import cupy
import numpy as np

from gpu.kernels import elementwise, reduction
from reference.contracts import check_scp_settings
from reference.errors import ConfigError, ShapeError

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

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GAMMA_FLOOR = 1e-8  # a = |gamma| + 1e-8 in (15)

# (0): sigmoid(x) and sigmoid'(x) in x's type, with no overflow for any |x|.
_SIGMOID = r"""
template <typename F>
__device__ __forceinline__ void sparsity_sigmoid(const F x, F& sig, F& slope) {
  const F e = exp(-fabs(x));  // in [0, 1]
  const F one_plus = F(1) + e;
  sig = x >= F(0) ? F(1) / one_plus : e / one_plus;
  slope = e / (one_plus * one_plus);
}
"""

# ------------------------------------------------------------------------------------------- STR
# s (already in w's dtype, shape () or (O,)) -> g = sigmoid(s) (1) and sigmoid'(s), same shape.
_str_sigmoid = elementwise(
    "str_sigmoid", "T s", "T g, T slope", "sparsity_sigmoid(s, g, slope);  // (1)", preamble=_SIGMOID
)

# W_eff and M of (2); g is a 0-d array (per layer) or an (O, 1, ..., 1) view (per channel).
_str_forward = elementwise(
    "str_threshold_forward",
    "T w, T g",
    "T w_eff, bool mask",
    """
    const bool keep = fabs(w) > g;                       // M = [|W| > g], strict: |W| == g is pruned
    mask = keep;
    w_eff = keep ? (w > T(0) ? w - g : w + g) : T(0);    // (2): M (W - sign(W) g), +0 when pruned
    """,
)

# (3): dW = G M.
_str_backward_dw = elementwise(
    "str_threshold_backward_dw", "T dy, bool mask", "T dw", "dw = dy * (mask ? T(1) : T(0));  // (3)"
)

# (4)/(5): ds = -sigmoid'(s) sum(G sign(W) M), summed in double over the reduced axes; slope is
# sigmoid'(s) broadcast (0-d per layer, (O, 1, ..., 1) per channel).
_str_ds = reduction(
    "str_threshold_ds",
    "T dy, T w, bool mask, T slope",
    "S ds",
    map_expr="mask ? -(double)slope * (w > T(0) ? (double)dy : -(double)dy) : 0.0",
    reduce_expr="a + b",
    post_map_expr="ds = a",
    identity="0",
    reduce_type="double",
)

# ------------------------------------------------------------------------------------------- LTP
_LTP_SOFT_MASK = """
    const T z = (w * w - tau) / (T)temp;  // (6)
    T sig, slope;
    sparsity_sigmoid(z, sig, slope);      // (6): m = sigmoid(z), q = sigmoid'(z)
    m = sig;
    q = slope;
"""

# (6) and (7): W_eff = W m, with m and q for the backward.
_ltp_mask_forward = elementwise(
    "ltp_mask_forward",
    "T w, T tau, float64 temp",
    "T w_eff, T m, T q",
    _LTP_SOFT_MASK + "    w_eff = w * sig;  // (7)\n",
    preamble=_SIGMOID,
)

# (6) alone, for the L0 count.
_ltp_soft_mask = elementwise(
    "ltp_soft_mask", "T w, T tau, float64 temp", "T m, T q", _LTP_SOFT_MASK, preamble=_SIGMOID
)

# (11): L0 = sum(m) in double, cast to m's dtype. (Long, distinct names: CuPy's CUB path for
# one-input reductions renames the parameters by text substitution.)
_ltp_l0_count = reduction(
    "ltp_l0_count",
    "T soft_mask",
    "T soft_count",
    map_expr="(double)soft_mask",
    reduce_expr="a + b",
    post_map_expr="soft_count = (T)a",
    identity="0",
    reduce_type="double",
)

# (8) with exact, else (9).
_ltp_mask_backward_dw = elementwise(
    "ltp_mask_backward_dw",
    "T dy, T w, T m, T q, float64 temp, bool exact",
    "T dw",
    """
    T grad = dy * m;                                          // (9)
    if (exact) grad = grad + dy * (w * w * q) * (T)(2.0 / temp);  // (8)
    dw = grad;
    """,
)

# (10): dtau = -(1/T) sum(q G W), each term divided by T, summed in double.
_ltp_mask_dtau = reduction(
    "ltp_mask_dtau",
    "T dy, T w, T q, float64 temp",
    "S dtau",
    map_expr="(double)q * (double)dy * (double)w / temp",
    reduce_expr="a + b",
    post_map_expr="dtau = -a",
    identity="0",
    reduce_type="double",
)

# (12): dW = dy 2 W q / T, with dy (g here) and T in double as the reference's Python floats.
_ltp_l0_backward_dw = elementwise(
    "ltp_l0_backward_dw",
    "T w, T q, float64 g, float64 temp",
    "T dw",
    "dw = w * q * (T)(2.0 * g / temp);  // (12)",
)

# (14): dtau = -(dy / T) sum(q), each term scaled by dy / T, summed in double.
_ltp_l0_dtau = reduction(
    "ltp_l0_dtau",
    "T q, float64 g, float64 temp",
    "S dtau",
    map_expr="(double)q * (g / temp)",
    reduce_expr="a + b",
    post_map_expr="dtau = -a",
    identity="0",
    reduce_type="double",
)

# ------------------------------------------------------------------------------------------- SCP
_SCP_PROBABILITY = f"""
    const T a_ = fabs(gamma) + T({_GAMMA_FLOOR!r});  // a = |gamma| + 1e-8
    const T u_ = (eps - beta) / a_;                 // (15)
    const T p_ = (T)normcdf((double)u_);            // (15): P = Phi(u)
    a = a_;
    u = u_;
    prob = p_;
    sign_gamma = gamma > T(0) ? T(1) : (gamma < T(0) ? T(-1) : T(0));  // sign(0) = 0
"""

# Training: (15) and the relaxed keep sample (16), per channel; k, c0, t, eps arrive in gamma's dtype.
_scp_train = elementwise(
    "scp_mask_train",
    "T gamma, T beta, T noise, T k, T c0, T t, T eps",
    "T m, T prob, T u, T a, T sign_gamma, T slope",
    _SCP_PROBABILITY
    + """
    const T z = (k * (c0 - p_) + noise) / t;  // (16)
    T sig, d_sig;
    sparsity_sigmoid(z, sig, d_sig);          // (16): m = sigmoid(z); sigmoid'(z) for (18)
    m = sig;
    slope = d_sig;
    """,
    preamble=_SIGMOID,
)

# Evaluation: (15) and the hard mask (17).
_scp_eval = elementwise(
    "scp_mask_eval",
    "T gamma, T beta, T c0, T eps",
    "T m, T prob, T u, T a, T sign_gamma",
    _SCP_PROBABILITY + "    m = p_ <= c0 ? T(1) : T(0);  // (17)\n",
)

# (18)-(21) per channel; neg_k_over_t = -k/t in gamma's dtype.
_scp_backward = elementwise(
    "scp_mask_backward",
    "T dy, T slope, T u, T a, T sign_gamma, T neg_k_over_t",
    "T dgamma, T dbeta",
    f"""
    const T dz = dy * slope;                                     // (18)
    const T dp = dz * neg_k_over_t;                              // (19)
    const T density = exp(T(-0.5) * u * u) * T({_INV_SQRT_2PI!r});  // phi(u); exp(-inf) = 0
    const T dp_phi_over_a = dp * density / a;
    dbeta = -dp_phi_over_a;                                      // (20)
    dgamma = -dp_phi_over_a * u * sign_gamma;                    // (21)
    """,
)


# --------------------------------------------------------------------------------------- helpers
def _float_array(op: str, name: str, x: Any) -> Any:
    if not isinstance(x, cupy.ndarray) or x.dtype.kind != "f":
        got = x.dtype if isinstance(x, cupy.ndarray) else type(x).__name__
        raise ShapeError(f"{op} expects {name} as a floating-point CuPy array, got {got}")
    return x


def _scalar_input(op: str, name: str, x: Any, dtype) -> tuple[Any, Any]:
    """A shape-() input in ``dtype`` for the kernels, and its own dtype (None for a Python number).

    A CuPy array stays on the device (cast there if its dtype differs); a host value becomes a
    scalar kernel argument.
    """
    if isinstance(x, cupy.ndarray):
        if x.shape != ():
            raise ShapeError(f"{op} expects {name} of shape (), got {x.shape}")
        return x.astype(dtype, copy=False), x.dtype
    if isinstance(x, (np.ndarray, np.generic)):
        if x.shape != ():
            raise ShapeError(f"{op} expects {name} of shape (), got {x.shape}")
        return dtype.type(x), x.dtype
    if isinstance(x, (int, float)):
        return dtype.type(x), None
    raise ShapeError(f"{op} expects {name} as a number or a 0-d array, got {type(x).__name__}")


def _temperature(op: str, temperature: Any) -> Any:
    """T as a validated Python float, or (a 0-d CuPy array) as a float64 device array, unvalidated."""
    if isinstance(temperature, cupy.ndarray):
        if temperature.shape != ():
            raise ShapeError(
                f"{op} expects temperature as a number or a 0-d array, got shape {temperature.shape}"
            )
        return temperature.astype(np.float64, copy=False)  # stays on the device: no value check
    if isinstance(temperature, np.ndarray):
        if temperature.shape != ():
            raise ShapeError(
                f"{op} expects temperature as a number or a 0-d array, got shape {temperature.shape}"
            )
        temperature = temperature.item()
    value = float(temperature)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    return value


def _channel_view(v: Any, ndim: int) -> Any:
    """A per-output-channel (O,) vector shaped to broadcast against a weight of ``ndim`` axes."""
    return v.reshape((-1,) + (1,) * (ndim - 1))  # (O,) -> (O, 1, ..., 1)


# ------------------------------------------------------------------------------------------- STR
class StrCache(NamedTuple):
    w: Any  # the latent weight (a reference, not a copy)
    mask: Any  # M = [|W| > g], bool, w's shape: the strict mask of (2)
    threshold: Any  # g of (1) in w's dtype, s's shape (for logging and tests)
    slope: Any  # sigmoid'(s) in w's dtype, s's shape
    s_dtype: Any  # None: s was a Python number (no gradient)
    per_channel: bool


def str_threshold_forward(w: Any, s: Any) -> tuple[Any, StrCache]:
    """STR soft threshold (2) of ``w`` with ``g = sigmoid(s)``; ``s`` of shape () or (w.shape[0],)."""
    op = "str_threshold"
    w = _float_array(op, "w", w)
    dtype = w.dtype
    if isinstance(s, cupy.ndarray):
        s_dtype = s.dtype
        s_arr = s.astype(dtype, copy=False)
    elif isinstance(s, (np.ndarray, np.generic)):
        s_dtype = s.dtype
        s_arr = cupy.asarray(np.asarray(s, dtype=dtype))  # a host array: copied to the device
    elif isinstance(s, (int, float)):
        s_dtype = None
        s_arr = dtype.type(s)  # a scalar kernel argument
    else:
        raise ShapeError(f"{op} expects s as a number or an array, got {type(s).__name__}")
    s_shape = tuple(s_arr.shape)
    per_channel = len(s_shape) == 1
    if len(s_shape) > 1 or (per_channel and (w.ndim == 0 or s_shape[0] != w.shape[0])):
        expected = "()" if w.ndim == 0 else f"() or ({w.shape[0]},)"
        raise ShapeError(f"{op} expects s of shape {expected} for w of shape {w.shape}, got {s_shape}")

    g = cupy.empty(s_shape, dtype=dtype)
    slope = cupy.empty(s_shape, dtype=dtype)
    _str_sigmoid(s_arr, g, slope)  # (1), in w's dtype
    g_w = _channel_view(g, w.ndim) if per_channel else g  # (O,) -> (O, 1, ..., 1)
    w_eff, mask = _str_forward(w, g_w)  # (2)
    return w_eff, StrCache(w, mask, g, slope, s_dtype, per_channel)


def str_threshold_backward(dy: Any, cache: StrCache):
    w, mask, _, slope, s_dtype, per_channel = cache
    dtype = w.dtype
    dy = dy.astype(dtype, copy=False)
    dw = _str_backward_dw(dy, mask)  # (3)
    ds = None
    if s_dtype is not None:
        ds = cupy.empty(slope.shape, dtype=s_dtype)
        if per_channel:
            if w.ndim == 1:  # (O,) -> (O, 1): one entry per channel, reduced over a unit axis
                dy, w, mask = dy[:, None], w[:, None], mask[:, None]
            # (O, ...) reduced over the trailing axes, one sum per channel
            _str_ds(dy, w, mask, _channel_view(slope, w.ndim), ds, axis=tuple(range(1, w.ndim)))  # (5)
        else:
            _str_ds(dy, w, mask, slope, ds)  # (4), a full reduction
    return dw, ds


# ------------------------------------------------------------------------------------------- LTP
class LtpCache(NamedTuple):
    w: Any  # the latent weight (a reference, not a copy)
    m: Any  # sigmoid(z) of (6), w's shape and dtype
    q: Any  # sigmoid'(z) of (6)
    temperature: Any  # T: a Python float, or a 0-d float64 device array (see the module docstring)
    flag: bool  # exact_grad for the mask, weight_grad for L0
    tau_dtype: Any  # None: tau was a Python number (no gradient)


def _ltp_inputs(op: str, w, tau, temperature) -> tuple[Any, Any, Any, Any]:
    """``(w, tau in w's dtype, T, tau's dtype)``, validated in the reference's order."""
    w = _float_array(op, "w", w)
    temp = _temperature(op, temperature)
    tau_arg, tau_dtype = _scalar_input(op, "tau", tau, w.dtype)
    return w, tau_arg, temp, tau_dtype


def ltp_mask_forward(w: Any, tau: Any, temperature: Any, exact_grad: bool = True):
    """LTP soft-masked weight ``W sigmoid((W^2 - tau) / T)`` (7); ``temperature`` gets no gradient."""
    w, tau_arg, temp, tau_dtype = _ltp_inputs("ltp_mask", w, tau, temperature)
    w_eff, m, q = _ltp_mask_forward(w, tau_arg, temp)  # (6), (7)
    return w_eff, LtpCache(w, m, q, temp, bool(exact_grad), tau_dtype)


def ltp_mask_backward(dy: Any, cache: LtpCache):
    w, m, q, temp, exact_grad, tau_dtype = cache
    dy = dy.astype(w.dtype, copy=False)
    dw = _ltp_mask_backward_dw(dy, w, m, q, temp, exact_grad)  # (8) or (9)
    dtau = None
    if tau_dtype is not None:
        dtau = cupy.empty((), dtype=tau_dtype)
        _ltp_mask_dtau(dy, w, q, temp, dtau)  # (10)
    return dw, dtau, None


def ltp_l0_forward(w: Any, tau: Any, temperature: Any, weight_grad: bool = True):
    """LTP differentiable L0 count ``sum(m)`` (11), a 0-d array of w's dtype."""
    w, tau_arg, temp, tau_dtype = _ltp_inputs("ltp_l0", w, tau, temperature)
    m, q = _ltp_soft_mask(w, tau_arg, temp)  # (6)
    count = cupy.empty((), dtype=w.dtype)
    _ltp_l0_count(m, count)  # (11)
    return count, LtpCache(w, m, q, temp, bool(weight_grad), tau_dtype)


def ltp_l0_backward(dy: Any, cache: LtpCache):
    w, _, q, temp, weight_grad, tau_dtype = cache
    # the upstream gradient of a scalar, as a double on the device (or a host float): never read back
    g = dy.reshape(()).astype(np.float64, copy=False) if isinstance(dy, cupy.ndarray) else float(dy)
    dw = None  # (13)
    if weight_grad:
        dw = _ltp_l0_backward_dw(w, q, g, temp)  # (12)
    dtau = None
    if tau_dtype is not None:
        dtau = cupy.empty((), dtype=tau_dtype)
        _ltp_l0_dtau(q, g, temp, dtau)  # (14)
    return dw, dtau, None


# ------------------------------------------------------------------------------------------- SCP
class ScpCache(NamedTuple):
    prob: Any  # P of (15), (C,): the probability that BN + ReLU leaves the channel off
    u: Any  # u of (15)
    a: Any  # |gamma| + 1e-8
    sign_gamma: Any  # sign(gamma), sign(0) = 0: the subgradient of |gamma| in (21)
    slope: Any | None  # sigmoid'(z) of (18); None in evaluation
    k_over_t: float
    training: bool
    gamma_dtype: Any
    beta_dtype: Any


def scp_channel_mask_forward(gamma, beta, noise, k, c0, t, eps, training):
    """SCP channel mask: the relaxed sample (16) in training, the hard mask (17) in evaluation."""
    op = "scp_channel_mask"
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
    beta_t = beta.astype(dtype, copy=False)
    c0_t, eps_t = dtype.type(float(c0)), dtype.type(float(eps))  # the kernels compute in gamma's dtype

    if training:
        k_t, t_t = dtype.type(float(k)), dtype.type(float(t))
        m, prob, u, a, sign_gamma, slope = _scp_train(
            gamma, beta_t, noise.astype(dtype, copy=False), k_t, c0_t, t_t, eps_t
        )  # (15), (16)
    else:
        m, prob, u, a, sign_gamma = _scp_eval(gamma, beta_t, c0_t, eps_t)  # (15), (17)
        slope = None
    cache = ScpCache(
        prob, u, a, sign_gamma, slope, float(k) / float(t), bool(training), gamma.dtype, beta.dtype
    )
    return m, cache


def scp_channel_mask_backward(dy: Any, cache: ScpCache):
    _, u, a, sign_gamma, slope, k_over_t, training, gamma_dtype, beta_dtype = cache
    if not training:
        return cupy.zeros(u.shape, gamma_dtype), cupy.zeros(u.shape, beta_dtype), None  # (22)
    dtype = u.dtype
    dgamma, dbeta = _scp_backward(
        dy.astype(dtype, copy=False), slope, u, a, sign_gamma, dtype.type(-k_over_t)
    )  # (18)-(21)
    return dgamma.astype(gamma_dtype, copy=False), dbeta.astype(beta_dtype, copy=False), None
