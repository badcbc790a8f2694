"""Learnable-sparsity kernels on the GPU: the twin of ``reference.ops.sparsity``.

Equation numbers are those of ``reference.ops.sparsity`` (cited, not derived
again): the stable sigmoid (0); STR (1)-(5); LTP (6)-(14); SCP (15)-(22).
Every op computes in the dtype of its first input and returns that dtype; sums
over many weights accumulate in double inside the reduction kernels and are
cast once at the end, as in the reference. LTP's tiny-temperature convention
is the reference's (23): ``T_w`` (T in w's dtype) divides last, and the
results of (8), (10), (12) and (14) saturate at the dtype's largest finite
value (``sparsity_store``), so a weight outside the band never gets
``0 * inf = NaN``.

The sigmoid helper (0) is the same as the reference's: ``e = exp(-|x|)``,
``sigmoid = 1 / (1 + e)`` or ``e / (1 + e)`` by the sign of ``x``, and the
slope ``e / (1 + e)^2``, evaluated in the op's dtype. In float32,
``x = -3200`` gives ``e = 0``: a threshold and a slope of exactly 0.

Kernels, one launch each (no op reads a device value back to the host):

- Sums over a whole weight ((4), (10), (11), (14)) run grid-wide in two
  launches: a ``*_partial`` function of the raw module ``sparsity_sums``
  (up to :data:`_SUM_BLOCKS` blocks, each summing a grid-stride slice in
  double and reducing it with :data:`gpu.kernels.BLOCK_REDUCE`), then a
  one-thread closing kernel that adds the per-block partials in index order
  (deterministic: the same bits on every run) and applies the op's closing
  formula. CuPy's own reduction of several inputs to one scalar would run on
  a single block.
- STR: ``str_sigmoid`` forms ``g`` (1) and ``sigmoid'(s)`` on ``s``'s shape;
  ``str_threshold_forward`` writes ``W_eff`` (2); the strict mask ``M`` is not
  stored but formed again from ``w`` and ``g`` by every backward kernel:
  ``str_threshold_backward_dw`` is (3); ``str_ds_partial`` and
  ``str_threshold_ds_close`` give (4), ``-sigmoid'(s)`` times the double sum
  of ``G sign(W) M``, as the reference forms it. Per channel (5) is a CuPy
  reduction over the trailing axes (one block per channel), ``str_threshold_ds``,
  where the factor ``-sigmoid'(s_o)`` multiplies each term rather than the
  sum: the same value up to the last bit of a double.
- LTP: ``m`` and ``q`` of (6) are never stored: every kernel forms them from
  ``w``, ``tau`` and ``T_w`` with one device function (``ltp_soft_mask``), so
  the backward's are the forward's to the bit. ``ltp_mask_forward`` writes
  ``W_eff`` (7); ``ltp_sigmoid_sum_partial`` (summing ``m``) and
  ``ltp_l0_count_close`` give the count (11); ``ltp_mask_backward_dw`` is (8)
  or (9); ``ltp_dtau_partial`` and ``ltp_mask_dtau_close`` are (10);
  ``ltp_l0_backward_dw`` is (12); ``ltp_sigmoid_sum_partial`` (summing ``q``)
  and ``ltp_l0_dtau_close`` are (14).
- SCP: ``scp_mask_train`` forms (15) and (16) for all channels in one pass,
  ``scp_mask_eval`` forms (15) and (17), ``scp_mask_backward`` is (18)-(21);
  ``Phi`` is CUDA's ``normcdf`` evaluated in double and rounded to the op's
  dtype (as SciPy's ``ndtr`` is), ``phi`` is ``exp(-u^2/2) / sqrt(2 pi)`` in
  the op's dtype as in the reference.

The caches are the reference's (:mod:`reference.caches`): ``w`` itself, the
threshold and the slope for STR (no mask), ``w``, ``tau`` and ``T_w`` for LTP
(no ``m``, no ``q``), and a None dtype for every gradient nobody wants
(``needs_input_grad``), which is then neither computed nor returned. SCP's
backward is the one exception: its (C,) kernel writes ``dgamma`` and ``dbeta``
together (they share every factor but the last) and drops an unwanted one.

Differences from the reference, all about values that live on the device:

- ``tau`` and ``s`` may be CuPy arrays (as parameters on the GPU are); they go
  into the kernels as device arrays, never read to the host. A Python or
  NumPy number is accepted as in the reference.
- ``temperature`` may be a Python number, a NumPy scalar or 0-d array, or a 0-d
  CuPy array. Host values are validated by the reference's own check
  (:func:`reference.contracts.ltp_temperature`: same errors, same messages,
  a ``T`` that rounds to 0 in w's dtype included). A 0-d CuPy array has its
  shape checked but not its value (that would need a device-to-host copy and
  a synchronisation); the LTP method floors it at the dtype's smallest normal
  number, so it never rounds to 0. Either way the kernels get ``T_w``, T
  rounded to w's dtype, as a 0-d device array (a host value by a fill
  launch, a device one by a cast, once per forward), and
  ``LtpCache.temperature`` holds it, where the reference holds the Python
  float and rounds it in each kernel (the same ``T_w``). ``LtpCache.tau`` is
  likewise a 0-d device array of w's dtype (a host ``tau`` by a fill launch),
  which the raw sum kernels read through a pointer.
- ``ltp_l0_backward`` takes ``dy`` as a 0-d device array (the gradient of the
  count) or a host number and uses it on the device, without ``float(dy)``.
- The array-type check names CuPy: ``... as a floating-point CuPy array, got
  ...`` where the reference says NumPy. Every other validation error is the
  reference's class and message.
"""

from __future__ import annotations

import math
from typing import Any

import cupy
import numpy as np

from gpu.kernels import BLOCK_REDUCE, FLAT_BLOCK, elementwise, raw, reduction
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

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SUM_BLOCKS = 256  # at most this many blocks (and partial sums) per grid-wide sum
_GAMMA_FLOOR = 1e-8  # a = |gamma| + 1e-8 in (15)

# (23): store v in out's type, saturated at that type's largest finite value (NaN stays NaN).
_STORE = r"""
__device__ __forceinline__ double sparsity_clip(double v, double big) {
  return v > big ? big : (v < -big ? -big : v);
}
__device__ __forceinline__ void sparsity_store(float& out, double v) {
  out = (float)sparsity_clip(v, 3.4028234663852886e+38);
}
__device__ __forceinline__ void sparsity_store(double& out, double v) {
  out = sparsity_clip(v, 1.7976931348623157e+308);
}
"""

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

# W_eff of (2); g is a 0-d array (per layer) or an (O, 1, ..., 1) view (per channel).
_str_forward = elementwise(
    "str_threshold_forward",
    "T w, T g",
    "T w_eff",
    """
    const bool keep = fabs(w) > g;                       // M = [|W| > g], strict: |W| == g is pruned
    w_eff = keep ? (w > T(0) ? w - g : w + g) : T(0);    // (2): M (W - sign(W) g), +0 when pruned
    """,
)

# (3): dW = G M, with M = [|W| > g] of (2) formed again from the cached w and g.
_str_backward_dw = elementwise(
    "str_threshold_backward_dw",
    "T dy, T w, T g",
    "T dw",
    "dw = dy * (fabs(w) > g ? T(1) : T(0));  // (3), M of (2)",
)

# (6) at one weight: m = sigmoid(z) and q = sigmoid'(z), z = (W^2 - tau) / T_w, all in w's type. Every
# LTP kernel forms m and q through this one function, so the forward and the backward (which forms them
# again from the cached w) agree to the bit.
_LTP_SIGMOID = (
    _SIGMOID
    + r"""
template <typename F>
__device__ __forceinline__ void ltp_soft_mask(const F w, const F tau, const F temp, F& m, F& q) {
  const F z = (w * w - tau) / temp;  // (6), temp = T_w
  sparsity_sigmoid(z, m, q);         // (6): m = sigmoid(z), q = sigmoid'(z)
}
"""
)

# Grid-wide sums over a whole weight, pass 1 of 2 (see the module docstring): block b sums the terms
# of its grid-stride slice of the n elements in double and writes partial[b]. All arrays C-contiguous;
# g, tau and temp are 0-d device arrays (read once per thread, never by the host).
_SUMS = raw(
    "sparsity_sums",
    BLOCK_REDUCE
    + _LTP_SIGMOID
    + r"""
#define SPARSITY_GRID_STRIDE(i, n) \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)blockDim.x * gridDim.x)

// (4): the terms G sign(W) M, M = [|W| > g] of (2) formed again; -sigmoid'(s) multiplies the total
// when the partials are closed.
extern "C" __global__ void str_ds_partial(const ${T}* __restrict__ dy, const ${T}* __restrict__ w,
                                          const ${T}* __restrict__ g, double* __restrict__ partial,
                                          const long long n) {
  __shared__ double buf[33];
  const ${T} threshold = *g;
  double acc = 0.0;
  SPARSITY_GRID_STRIDE(i, n) {
    if (fabs(w[i]) > threshold) acc += w[i] > (${T})0 ? (double)dy[i] : -(double)dy[i];
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// (10): the terms q G W, q of (6) formed again from w; -1/T_w is applied to the total when the
// partials are closed.
extern "C" __global__ void ltp_dtau_partial(const ${T}* __restrict__ dy, const ${T}* __restrict__ w,
                                            const ${T}* __restrict__ tau, const ${T}* __restrict__ temp,
                                            double* __restrict__ partial, const long long n) {
  __shared__ double buf[33];
  const ${T} tau_ = *tau, temp_ = *temp;
  double acc = 0.0;
  SPARSITY_GRID_STRIDE(i, n) {
    ${T} m, q;
    ltp_soft_mask(w[i], tau_, temp_, m, q);  // (6)
    acc += (double)q * (double)dy[i] * (double)w[i];
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// (11) with slope = 0: the sum of m; (14) with slope = 1: the sum of q; both of (6), formed from w.
extern "C" __global__ void ltp_sigmoid_sum_partial(const ${T}* __restrict__ w, const ${T}* __restrict__ tau,
                                                   const ${T}* __restrict__ temp, double* __restrict__ partial,
                                                   const long long n, const int slope) {
  __shared__ double buf[33];
  const ${T} tau_ = *tau, temp_ = *temp;
  double acc = 0.0;
  SPARSITY_GRID_STRIDE(i, n) {
    ${T} m, q;
    ltp_soft_mask(w[i], tau_, temp_, m, q);  // (6)
    acc += slope ? (double)q : (double)m;
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
""",
)

# Pass 2 of 2: one thread adds the partials in index order (deterministic), into `total`.
_CLOSE = """
    double total = 0.0;
    #pragma unroll 8
    for (long long b = 0; b < blocks; ++b) total += partial[b];
"""

# (4): ds = -sigmoid'(s) sum(G sign(W) M), slope a 0-d array.
_str_ds_close = elementwise(
    "str_threshold_ds_close",
    "raw float64 partial, int64 blocks, T slope",
    "S ds",
    _CLOSE + "    ds = -(double)slope * total;  // (4)\n",
)

# (5): ds_o = -sigmoid'(s_o) sum(G sign(W) M) over channel o, summed in double over the trailing axes;
# g and slope are g and sigmoid'(s) as (O, 1, ..., 1) views, M = [|W| > g] of (2) formed again.
_str_ds = reduction(
    "str_threshold_ds",
    "T dy, T w, T g, T slope",
    "S ds",
    map_expr="fabs(w) > g ? -(double)slope * (w > T(0) ? (double)dy : -(double)dy) : 0.0",
    reduce_expr="a + b",
    post_map_expr="ds = a",
    identity="0",
    reduce_type="double",
)

# ------------------------------------------------------------------------------------------- LTP
# (6) and (7): W_eff = W m; tau and temp are 0-d arrays.
_ltp_mask_forward = elementwise(
    "ltp_mask_forward",
    "T w, T tau, T temp",
    "T w_eff",
    """
    T m, q;
    ltp_soft_mask(w, tau, temp, m, q);  // (6)
    w_eff = w * m;                      // (7)
    """,
    preamble=_LTP_SIGMOID,
)

# (11): L0 = sum(m), the double total cast to m's dtype.
_ltp_l0_count_close = elementwise(
    "ltp_l0_count_close",
    "raw float64 partial, int64 blocks",
    "T count",
    _CLOSE + "    count = (T)total;  // (11)\n",
)

# (8) with exact, else (9), m and q of (6) formed again from w; T_w divides last and the sum
# saturates (23).
_ltp_mask_backward_dw = elementwise(
    "ltp_mask_backward_dw",
    "T dy, T w, T tau, T temp, bool exact",
    "T dw",
    """
    T m, q;
    ltp_soft_mask(w, tau, temp, m, q);                              // (6)
    const T grad = dy * m;                                          // (9)
    if (exact) {
        sparsity_store(dw, (double)(grad + (T(2) * dy * (w * q) * w) / temp));  // (8), (23)
    } else {
        dw = grad;
    }
    """,
    preamble=_LTP_SIGMOID + _STORE,
)

# (10): dtau = sat(-sum(q G W) / T_w), the sum in double.
_ltp_mask_dtau_close = elementwise(
    "ltp_mask_dtau_close",
    "raw float64 partial, int64 blocks, T temp",
    "S dtau",
    _CLOSE + "    sparsity_store(dtau, -total / (double)temp);  // (10), (23)\n",
    preamble=_STORE,
)

# (12): dW = sat((W q) (2 dy) / T_w) in w's dtype, q of (6) formed again from w, dy (g here) a double
# as the reference's Python float.
_ltp_l0_backward_dw = elementwise(
    "ltp_l0_backward_dw",
    "T w, T tau, T temp, float64 g",
    "T dw",
    """
    T m, q;
    ltp_soft_mask(w, tau, temp, m, q);                                  // (6)
    sparsity_store(dw, (double)((w * q) * (T)(2.0 * g) / temp));  // (12), (23)
    """,
    preamble=_LTP_SIGMOID + _STORE,
)

# (14): dtau = sat(-(dy sum(q)) / T_w), the sum in double.
_ltp_l0_dtau_close = elementwise(
    "ltp_l0_dtau_close",
    "raw float64 partial, int64 blocks, float64 g, T temp",
    "S dtau",
    _CLOSE + "    sparsity_store(dtau, -(g * total) / (double)temp);  // (14), (23)\n",
    preamble=_STORE,
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


def _temperature(op: str, temperature: Any, dtype) -> Any:
    """T_w as a 0-d device array of ``dtype``: a host T validated and rounded (a fill, no copy), or a
    0-d CuPy array cast on the device, unvalidated (reading it would synchronise)."""
    if isinstance(temperature, cupy.ndarray):
        if temperature.shape != ():
            raise ShapeError(
                f"{op} expects temperature as a number or a 0-d array, got shape {temperature.shape}"
            )
        return temperature.astype(dtype, copy=False)  # stays on the device: no value check
    return cupy.full((), ltp_temperature(op, temperature, dtype), dtype=dtype)


def _grid_sum(function: str, inputs: tuple, dtype, *extra) -> tuple[Any, np.int64]:
    """Pass 1 of a grid-wide sum over the ``n`` elements of ``inputs[0]``: ``(partial, blocks)``, the
    per-block double sums for a closing kernel.

    The arrays of ``inputs`` are C-contiguous, of ``inputs[0]``'s shape or 0-d (a threshold, tau or
    T_w); the kernel's arguments are ``(*inputs, partial, n, *extra)``.
    """
    n = inputs[0].size
    blocks = max(1, min(_SUM_BLOCKS, -(-n // FLAT_BLOCK)))
    partial = cupy.empty(blocks, dtype=np.float64)
    _SUMS.launch(function, dtype, (blocks,), (FLAT_BLOCK,), (*inputs, partial, np.int64(n), *extra))
    return partial, np.int64(blocks)


def _channel_view(v: Any, ndim: int) -> Any:
    """A per-output-channel (O,) vector shaped to broadcast against a weight of ``ndim`` axes."""
    return v.reshape((-1,) + (1,) * (ndim - 1))  # (O,) -> (O, 1, ..., 1)


# ------------------------------------------------------------------------------------------- STR
def str_threshold_forward(w: Any, s: Any, needs_input_grad=None) -> tuple[Any, StrCache]:
    """STR soft threshold (2) of ``w`` with ``g = sigmoid(s)``; ``s`` of shape () or (w.shape[0],).

    The cache keeps ``w`` itself and ``g``; the mask ``M`` is formed again in the backward kernels.
    """
    op = "str_threshold"
    need_w, need_s = grad_flags(op, needs_input_grad, 2)
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
    w_eff = _str_forward(w, g_w)  # (2)
    cache = StrCache(w, g, slope, dtype if need_w else None, s_dtype if need_s else None, per_channel)
    return w_eff, cache


def str_threshold_backward(dy: Any, cache: StrCache):
    w, g, slope, w_dtype, s_dtype, per_channel = cache
    dtype = w.dtype
    dy = dy.astype(dtype, copy=False)
    g_w = _channel_view(g, w.ndim) if per_channel else g  # (O,) -> (O, 1, ..., 1)
    dw = None if w_dtype is None else _str_backward_dw(dy, w, g_w)  # (3)
    ds = None
    if s_dtype is not None:
        ds = cupy.empty(slope.shape, dtype=s_dtype)
        if per_channel:
            slope_w = _channel_view(slope, w.ndim)
            if w.ndim == 1:  # (O,) -> (O, 1): one entry per channel, reduced over a unit axis
                dy, w, g_w, slope_w = dy[:, None], w[:, None], g_w[:, None], slope_w[:, None]
            # (O, ...) reduced over the trailing axes, one sum per channel
            _str_ds(dy, w, g_w, slope_w, ds, axis=tuple(range(1, w.ndim)))  # (5)
        else:
            # (4): grid-wide, the double sum closed with -sigmoid'(s)
            flat = tuple(cupy.ascontiguousarray(a) for a in (dy, w))
            partial, blocks = _grid_sum("str_ds_partial", (*flat, g), dtype)
            _str_ds_close(partial, blocks, slope, ds)  # (4)
    return dw, ds


# ------------------------------------------------------------------------------------------- LTP
def _ltp_inputs(op: str, w, tau, temperature) -> tuple[Any, Any, Any, Any]:
    """``(w C-contiguous, tau as a 0-d device array of w's dtype, T_w, tau's dtype)``, validated in the
    reference's order."""
    w = _float_array(op, "w", w)
    temp = _temperature(op, temperature, w.dtype)
    tau_arg, tau_dtype = _scalar_input(op, "tau", tau, w.dtype)
    if not isinstance(tau_arg, cupy.ndarray):  # a host number: one fill launch, no copy
        tau_arg = cupy.full((), tau_arg, dtype=w.dtype)
    # the grid-wide sums walk w flat (a contiguous w is itself, so the cache holds w, not a copy)
    return cupy.ascontiguousarray(w), tau_arg, temp, tau_dtype


def _ltp_cache(op: str, w, tau, temperature, flag: bool, needs_input_grad) -> LtpCache:
    """The cache of both LTP ops: ``w`` itself, ``tau`` and ``T_w``; ``m`` and ``q`` are formed again."""
    need_w, need_tau, _ = grad_flags(op, needs_input_grad, 3)
    w, tau_arg, temp, tau_dtype = _ltp_inputs(op, w, tau, temperature)
    return LtpCache(
        w, tau_arg, temp, bool(flag), w.dtype if need_w else None, tau_dtype if need_tau else None
    )


def ltp_mask_forward(w: Any, tau: Any, temperature: Any, exact_grad: bool = True, needs_input_grad=None):
    """LTP soft-masked weight ``W sigmoid((W^2 - tau) / T)`` (7); ``temperature`` gets no gradient."""
    cache = _ltp_cache("ltp_mask", w, tau, temperature, exact_grad, needs_input_grad)
    return _ltp_mask_forward(cache.w, cache.tau, cache.temperature), cache  # (6), (7)


def ltp_mask_backward(dy: Any, cache: LtpCache):
    w, tau, temp, exact_grad, w_dtype, tau_dtype = cache
    dy = cupy.ascontiguousarray(dy.astype(w.dtype, copy=False))
    dw = None if w_dtype is None else _ltp_mask_backward_dw(dy, w, tau, temp, exact_grad)  # (8) or (9)
    dtau = None
    if tau_dtype is not None:
        dtau = cupy.empty((), dtype=tau_dtype)
        partial, blocks = _grid_sum("ltp_dtau_partial", (dy, w, tau, temp), w.dtype)
        _ltp_mask_dtau_close(partial, blocks, temp, dtau)  # (10)
    return dw, dtau, None


def ltp_l0_forward(w: Any, tau: Any, temperature: Any, weight_grad: bool = True, needs_input_grad=None):
    """LTP differentiable L0 count ``sum(m)`` (11), a 0-d array of w's dtype."""
    cache = _ltp_cache("ltp_l0", w, tau, temperature, weight_grad, needs_input_grad)
    count = cupy.empty((), dtype=cache.w.dtype)
    partial, blocks = _grid_sum(
        "ltp_sigmoid_sum_partial", (cache.w, cache.tau, cache.temperature), cache.w.dtype, np.int32(0)
    )  # (6), m summed
    _ltp_l0_count_close(partial, blocks, count)  # (11)
    return count, cache


def ltp_l0_backward(dy: Any, cache: LtpCache):
    w, tau, temp, weight_grad, w_dtype, tau_dtype = cache
    # the upstream gradient of a scalar, as a double on the device (or a host float): never read back
    g = dy.reshape(()).astype(np.float64, copy=False) if isinstance(dy, cupy.ndarray) else float(dy)
    dw = None  # (13)
    if weight_grad and w_dtype is not None:
        dw = _ltp_l0_backward_dw(w, tau, temp, g)  # (12)
    dtau = None
    if tau_dtype is not None:
        dtau = cupy.empty((), dtype=tau_dtype)
        partial, blocks = _grid_sum("ltp_sigmoid_sum_partial", (w, tau, temp), w.dtype, np.int32(1))  # q
        _ltp_l0_dtau_close(partial, blocks, g, temp, dtau)  # (14)
    return dw, dtau, None


# ------------------------------------------------------------------------------------------- SCP
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
    return m, cache


def scp_channel_mask_backward(dy: Any, cache: ScpCache):
    _, u, a, sign_gamma, slope, k_over_t, training, gamma_dtype, beta_dtype = cache
    if not training:
        dgamma = None if gamma_dtype is None else cupy.zeros(u.shape, gamma_dtype)  # (22)
        dbeta = None if beta_dtype is None else cupy.zeros(u.shape, beta_dtype)  # (22)
        return dgamma, dbeta, None
    dtype = u.dtype
    # one (C,) launch writes both (they share every factor but the last); an unwanted one is dropped
    dgamma, dbeta = _scp_backward(
        dy.astype(dtype, copy=False), slope, u, a, sign_gamma, dtype.type(-k_over_t)
    )  # (18)-(21)
    dgamma = None if gamma_dtype is None else dgamma.astype(gamma_dtype, copy=False)
    dbeta = None if beta_dtype is None else dbeta.astype(beta_dtype, copy=False)
    return dgamma, dbeta, None
