"""Max, average and global average pooling on the GPU: the twin of ``reference.ops.pooling``.

The equations are the reference's and keep its numbers: (1) the window maximum,
(2) its first position in row-major window order (padding is -inf, never
selected over an element of ``x``; NaN counts as the maximum, as in
``np.argmax``), (3) the max-pool gradient, (4), (5) average pooling with the
zero padding counted in the divisor kh kw (``count_include_pad=True``), (6),
(7) global average pooling. ``x`` is (N, C, H, W), windows (kh, kw) at strides
(sh, sw) (the window size by default) with padding (ph, pw) <= half the window.

Kernels (NCHW, flat 64-bit indices, one thread per element, grid-stride loops launched by
:meth:`gpu.kernels.Kernel.launch_flat`):

- ``pool_max``: ``pool_max_forward_{u8,i32}`` writes ``y`` and the tap index
  ``p* kw + q*`` (uint8 when kh kw <= 256, else int32) per output;
  ``pool_max_backward_{u8,i32}`` is a gather over input pixels: each pixel adds
  the ``dy`` of the windows whose chosen tap is it, in row-major (p, q) order,
  so the result is deterministic (no atomics) and overlapping windows add up.
- ``pool_avg``: ``pool_avg_forward`` sums a window and divides by kh kw;
  ``pool_avg_backward`` gathers ``dy / (kh kw)`` from every window covering a pixel.
- ``pool_global_avg_backward``: ``dx = dy / (H W)`` broadcast over H, W; the
  forward is ``cupy.mean`` over (H, W).

Outputs and gradients keep ``x``'s dtype (float32 or float64). Nothing here
synchronises with the host.
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from gpu import kernels
from reference.caches import AvgPoolCache, GlobalAvgPoolCache, MaxPoolCache, grad_flags
from reference.contracts import PoolGeometry, pool_geometry

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
]

# --------------------------------------------------------------------------- kernels
_MAX = kernels.raw(
    "pool_max",
    kernels.WINDOW_INDEX
    + r"""
// Max pooling, NCHW; a window's tap (p, q) is the index p*kw + q, stored as I (unsigned char or int).

// (1), (2): one thread per output (n, c, i, j), total = N*C*Ho*Wo. Padding reads as -inf; a tap replaces
// the running maximum only when strictly greater (or the first NaN), so ties keep the first tap in
// row-major order, and an all -inf window keeps tap 0.
template <typename I>
__device__ void max_forward(const ${T}* __restrict__ x, ${T}* __restrict__ y, I* __restrict__ arg,
                            const int H, const int W, const int kh, const int kw, const int sh, const int sw,
                            const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const ${T} neg_inf = (${T})__int_as_float((int)0xff800000u);
    const int hw_out = Ho * Wo;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw_out;  // n * C + c
        const int rem = (int)(t - plane * hw_out);
        const int i = rem / Wo;
        const int j = rem - i * Wo;
        const ${T}* __restrict__ xc = x + plane * (long long)(H * W);
        ${T} best = neg_inf;
        int best_tap = 0;
        for (int p = 0; p < kh; ++p) {
            const int h = i * sh - ph + p;
            for (int q = 0; q < kw; ++q) {
                const int w = j * sw - pw + q;
                const ${T} v = (h >= 0 && h < H && w >= 0 && w < W) ? xc[h * W + w] : neg_inf;
                if (v > best || (v != v && best == best)) {
                    best = v;
                    best_tap = p * kw + q;
                }
            }
        }
        y[t] = best;
        arg[t] = (I)best_tap;
    }
}

// (3): one thread per input pixel (n, c, h, w), total = N*C*H*W: the sum, over the windows (i, j) whose
// tap (p, q) lands on the pixel (h + ph = i sh + p, w + pw = j sw + q), in row-major (p, q) order, of
// dy[n,c,i,j] where that window chose tap (p, q). A gather: deterministic, no atomics.
template <typename I>
__device__ void max_backward(const ${T}* __restrict__ dy, const I* __restrict__ arg, ${T}* __restrict__ dx,
                             const int H, const int W, const int kh, const int kw, const int sh, const int sw,
                             const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const int hw = H * W;
    const int hw_out = Ho * Wo;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw;  // n * C + c
        const int rem = (int)(t - plane * hw);
        const int h = rem / W;
        const int w = rem - h * W;
        const long long base = plane * hw_out;
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int i = window_index(h, ph, p, sh, Ho);  // the window that puts tap p on row h
            if (i == -2) break;
            if (i < 0) continue;
            for (int q = 0; q < kw; ++q) {
                const int j = window_index(w, pw, q, sw, Wo);
                if (j == -2) break;
                if (j < 0) continue;
                const long long o = base + i * Wo + j;
                if ((int)arg[o] == p * kw + q) acc += dy[o];
            }
        }
        dx[t] = acc;
    }
}

extern "C" __global__ void pool_max_forward_u8(
    const ${T}* x, ${T}* y, unsigned char* arg, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    max_forward<unsigned char>(x, y, arg, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total);
}

extern "C" __global__ void pool_max_forward_i32(
    const ${T}* x, ${T}* y, int* arg, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    max_forward<int>(x, y, arg, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total);
}

extern "C" __global__ void pool_max_backward_u8(
    const ${T}* dy, const unsigned char* arg, ${T}* dx, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    max_backward<unsigned char>(dy, arg, dx, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total);
}

extern "C" __global__ void pool_max_backward_i32(
    const ${T}* dy, const int* arg, ${T}* dx, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    max_backward<int>(dy, arg, dx, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, total);
}
""",
)

_AVG = kernels.raw(
    "pool_avg",
    kernels.WINDOW_INDEX
    + r"""
// Average pooling, NCHW, zero padding counted in the divisor kh*kw.

// (4): y[n,c,i,j] = (sum of the window's elements of x, taps in row-major order) / (kh kw);
// one thread per output, total = N*C*Ho*Wo.
extern "C" __global__ void pool_avg_forward(
    const ${T}* __restrict__ x, ${T}* __restrict__ y, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const int hw_out = Ho * Wo;
    const ${T} count = (${T})(kh * kw);
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw_out;  // n * C + c
        const int rem = (int)(t - plane * hw_out);
        const int i = rem / Wo;
        const int j = rem - i * Wo;
        const ${T}* __restrict__ xc = x + plane * (long long)(H * W);
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int h = i * sh - ph + p;
            if (h < 0 || h >= H) continue;  // padding adds zero
            for (int q = 0; q < kw; ++q) {
                const int w = j * sw - pw + q;
                if (w < 0 || w >= W) continue;
                acc += xc[h * W + w];
            }
        }
        y[t] = acc / count;
    }
}

// (5): dx[n,c,h,w] = sum over the windows (i, j) covering (h, w), in row-major tap order, of
// dy[n,c,i,j] / (kh kw); a gather, one thread per input pixel, total = N*C*H*W.
extern "C" __global__ void pool_avg_backward(
    const ${T}* __restrict__ dy, ${T}* __restrict__ dx, const int H, const int W, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const int hw = H * W;
    const int hw_out = Ho * Wo;
    const ${T} count = (${T})(kh * kw);
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw;  // n * C + c
        const int rem = (int)(t - plane * hw);
        const int h = rem / W;
        const int w = rem - h * W;
        const ${T}* __restrict__ dyc = dy + plane * hw_out;
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int i = window_index(h, ph, p, sh, Ho);  // the window that puts tap p on row h
            if (i == -2) break;
            if (i < 0) continue;
            for (int q = 0; q < kw; ++q) {
                const int j = window_index(w, pw, q, sw, Wo);
                if (j == -2) break;
                if (j < 0) continue;
                acc += dyc[i * Wo + j] / count;
            }
        }
        dx[t] = acc;
    }
}
""",
)

# (7): dx[n,c,a,b] = dy[n,c] / (H W), dx (N, C, H, W), dy (N, C) contiguous, hw = H W
_GLOBAL_AVG_BACKWARD = kernels.elementwise(
    "pool_global_avg_backward", "raw T dy, int64 hw", "T dx", "dx = dy[i / hw] / (T)hw"
)


# --------------------------------------------------------------------------- geometry


def _scalars(geo: PoolGeometry) -> tuple:
    """The int32 scalars every pooling kernel takes after its arrays: H, W, kh, kw, sh, sw, ph, pw, Ho, Wo."""
    values = (*geo.x_shape[2:], *geo.kernel, *geo.stride, *geo.padding, *geo.out)
    return tuple(np.int32(v) for v in values)


# --------------------------------------------------------------------------- max pooling
def _index_suffix(geo: PoolGeometry) -> tuple[str, Any]:
    """The kernel suffix and dtype of the tap index: uint8 while every tap fits, else int32."""
    kh, kw = geo.kernel
    return ("u8", cp.uint8) if kh * kw <= 256 else ("i32", cp.int32)


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, needs_input_grad=None):
    """Max over each window (1); ``stride`` None means the window size, padding is -inf.

    The cache's ``argmax`` (N, C, Ho, Wo) is uint8 when kh*kw <= 256, else int32.
    """
    grad_flags("max_pool2d", needs_input_grad, 1)
    geo = pool_geometry("max_pool2d", x, kernel_size, stride, padding)
    x = cp.ascontiguousarray(x)
    suffix, index_dtype = _index_suffix(geo)
    y = cp.empty((*x.shape[:2], *geo.out), dtype=x.dtype)
    argmax = cp.empty(y.shape, dtype=index_dtype)
    args = (x, y, argmax, *_scalars(geo), np.int64(y.size))
    _MAX.launch_flat(f"pool_max_forward_{suffix}", x.dtype, y.size, args)  # (1), (2)
    return y, MaxPoolCache(geo, argmax)


def max_pool2d_backward(dy, cache: MaxPoolCache):
    """``(dx,)``: each window's ``dy`` goes to its first maximum (3)."""
    geo, argmax = cache
    dy = cp.ascontiguousarray(dy)
    suffix, _ = _index_suffix(geo)
    dx = cp.empty(geo.x_shape, dtype=dy.dtype)
    args = (dy, argmax, dx, *_scalars(geo), np.int64(dx.size))
    _MAX.launch_flat(f"pool_max_backward_{suffix}", dy.dtype, dx.size, args)  # (3)
    return (dx,)


# --------------------------------------------------------------------------- average pooling
def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, needs_input_grad=None):
    """Mean over each window (4); zero padding counts in the divisor kh*kw."""
    grad_flags("avg_pool2d", needs_input_grad, 1)
    geo = pool_geometry("avg_pool2d", x, kernel_size, stride, padding)
    x = cp.ascontiguousarray(x)
    y = cp.empty((*x.shape[:2], *geo.out), dtype=x.dtype)
    args = (x, y, *_scalars(geo), np.int64(y.size))
    _AVG.launch_flat("pool_avg_forward", x.dtype, y.size, args)  # (4)
    return y, AvgPoolCache(geo)


def avg_pool2d_backward(dy, cache: AvgPoolCache):
    """``(dx,)``: every element of a window gets ``dy / (kh kw)`` (5)."""
    geo = cache.geometry
    dy = cp.ascontiguousarray(dy)
    dx = cp.empty(geo.x_shape, dtype=dy.dtype)
    args = (dy, dx, *_scalars(geo), np.int64(dx.size))
    _AVG.launch_flat("pool_avg_backward", dy.dtype, dx.size, args)  # (5)
    return (dx,)


# ------------------------------------------------------------------- global average pooling
def global_avg_pool2d_forward(x, needs_input_grad=None):
    """(N, C, H, W) -> (N, C), the mean over H and W (6)."""
    grad_flags("global_avg_pool2d", needs_input_grad, 1)
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool2d expects x of shape (N, C, H, W), got {x.shape}")
    return x.mean(axis=(2, 3)), GlobalAvgPoolCache(tuple(x.shape))  # (6)


def global_avg_pool2d_backward(dy, cache: GlobalAvgPoolCache):
    """``(dx,)``: ``dy / (H W)`` spread over every position (7)."""
    h, w = cache.x_shape[2:]
    dy = cp.ascontiguousarray(dy)
    dx = cp.empty(cache.x_shape, dtype=dy.dtype)
    _GLOBAL_AVG_BACKWARD(dy, np.int64(h * w), dx)  # (7)
    return (dx,)
