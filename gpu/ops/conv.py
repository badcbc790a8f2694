"""2-D convolution on the GPU: the twin of ``reference.ops.conv``.

The equations are the reference's and keep its numbers: (1) the correlation,
(2) im2col + GEMM, (3) the bias gradient, (4) the weight gradient, (5) the input
gradient by col2im, (7) and (8) the depthwise weight and input gradients.
Shapes: ``x`` (N, C, H, W), ``w`` (O, C/G, kh, kw), ``b`` (O,), ``y``
(N, O, Ho, Wo); ``Cg = C/G``, ``Og = O/G``, ``L = Ho Wo``; every GEMM goes
through :mod:`gpu.blas` (explicit compute type), never ``cupy.matmul``.

Three paths, chosen by the shape alone in :func:`conv2d_forward`:

- general (im2col + GEMM, any groups). The columns of (2) are laid out for one
  big GEMM per group rather than one small GEMM per sample: rows
  ``r = (c, p, q)`` over all C channels (group g's rows are the contiguous block
  ``g Cg kh kw .. (g+1) Cg kh kw``), columns ``l = (n, i, j)``::

      cols[(c,p,q), (n,i,j)] = xp[n, c, i sh + p, j sw + q]       (C kh kw, N L)
      yf[g] = W[g] cols[g]                                        (O, N L)  -> y (N, O, Ho, Wo)

  The kernel ``conv_im2col`` writes the columns; the backward gathers them
  again from the cached ``x`` instead of caching them (they are kh kw times the
  strided input: 13 GB for ResNet50's 3x3 convs at batch 256), then runs
  dW = dY cols^T (4) and dX = W^T dY (5), and ``conv_col2im`` sums dX back into
  ``dx`` as a gather (each input pixel adds up its kh kw column entries in a
  fixed order: deterministic, no atomics). The batch is processed in chunks so
  that one column buffer holds at most ``_COLUMN_ELEMENTS`` values.
- pointwise (1x1, G = 1): no window gather. ``X[n] = xp[n, :, ::sh, ::sw]`` as
  (C, L) (``x`` itself, reshaped, for stride 1 and no padding);
  ``y[n] = W X[n]`` is one strided-batched GEMM with W shared (stride 0). (4) is
  one big GEMM on channel-major copies of ``dy`` and X (X rebuilt from the cached
  ``x``), (C, N L) and (O, N L);
  (5) is a batched GEMM ``W^T dY[n]``, scattered back into zeros when strided.
- depthwise (G = C > 1, Cg = 1, O = C m): the GEMM of (2) degenerates, so (1),
  (7) and (8) each get a kernel: one thread per output (``conv_depthwise_forward``),
  one thread per input pixel gathering the outputs that read it
  (``conv_depthwise_backward_input``, deterministic), and one block per
  (output channel, batch segment) reducing over (n, i, j) for every tap at once
  (``conv_depthwise_backward_weight``, the shared ``block_sum`` per tap; the
  segments' partial sums are added by ``cupy.sum``, also deterministic). All
  three index NCHW flat, so consecutive threads touch consecutive W positions.

The cache is the reference's :class:`reference.caches.Conv2dCache` and follows
its rules: ``x`` itself (not the columns, not a padded or strided copy), kept
only when ``dw`` is wanted, and the weight only when ``dx`` is; every path
rebuilds what it works on from ``x`` in the backward (the general path's
columns, the pointwise path's strided ``X``). A gradient nobody wants
(``needs_input_grad``; the input image's, in the first conv) is None and is
neither computed nor prepared for. The twin's path names are its own
("general", "pointwise", "depthwise"): it has no shift or channels-last path.

Under ``bf16`` precision the general and pointwise paths round the weight to
bfloat16 once per forward (:func:`gpu.blas.gemm_operand`) and cache that copy
(when ``dx`` is wanted) for the backward's input gradient; the columns and
``dy`` are rounded per GEMM.

Flat indices into arrays are 64-bit (``long long``); indices within one image
plane or one column chunk are 32-bit. Nothing here synchronises with the host.

Dtypes: float32 or float64; the output and every gradient have ``x``'s dtype.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from gpu import blas, kernels
from reference.caches import Conv2dCache, grad_flags
from reference.contracts import conv2d_geometry

__all__ = ["conv2d_forward", "conv2d_backward"]

_BLOCK = kernels.FLAT_BLOCK  # threads per block of every launch here
_COLUMN_ELEMENTS = 1 << 28  # at most this many values in one im2col buffer (1 GiB in float32)
_DW_TAPS = 16  # taps per pass of conv_depthwise_backward_weight (must match DW_TAPS in the source)
_DW_TARGET_BLOCKS = 1024  # blocks the depthwise weight gradient aims for (channels x segments)


# --------------------------------------------------------------------------- kernels
_IM2COL = kernels.raw(
    "conv_im2col",
    r"""
// (2): cols[(c,p,q), (n,i,j)] = xp[n, c, i sh + p, j sw + q], zero where (i sh + p, j sw + q) is padding.
// x: (Nc, C, H, W) contiguous, the samples of one chunk; cols: (C*kh*kw, n_cols), n_cols = Nc*Ho*Wo.
// grid.y walks the rows r = (c, p, q); grid.x * block.x the columns l = (n, i, j), consecutive
// threads on consecutive j (coalesced reads of x at stride 1, coalesced writes of cols).
extern "C" __global__ void conv_im2col(
    const ${T}* __restrict__ x, ${T}* __restrict__ cols,
    const int C, const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int Ho, const int Wo, const int n_cols)
{
    const int rows = C * kh * kw;
    const int hw_out = Ho * Wo;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const int q = r % kw;
        const int p = (r / kw) % kh;
        const int c = r / (kh * kw);
        ${T}* __restrict__ row = cols + (long long)r * n_cols;
        for (long long l = (long long)blockIdx.x * blockDim.x + threadIdx.x; l < n_cols;
             l += (long long)blockDim.x * gridDim.x) {
            const int li = (int)l;
            const int n = li / hw_out;
            const int rem = li - n * hw_out;
            const int i = rem / Wo;
            const int j = rem - i * Wo;
            const int h = i * sh - ph + p;  // row in x (unpadded coordinates)
            const int w = j * sw - pw + q;
            ${T} v = (${T})0;
            if (h >= 0 && h < H && w >= 0 && w < W) {
                v = x[(((long long)n * C + c) * H + h) * W + w];
            }
            row[li] = v;
        }
    }
}
""",
)

_COL2IM = kernels.raw(
    "conv_col2im",
    kernels.WINDOW_INDEX
    + r"""
// (5): dx[n, c, h, w] = sum over the (p, q) with h + ph = i sh + p, w + pw = j sw + q, 0 <= i < Ho,
// 0 <= j < Wo of dcols[(c,p,q), (n,i,j)]: a gather, one thread per input pixel, adding the taps in
// row-major (p, q) order (deterministic, no atomics; the border of dxp is never formed).
// dcols: (C*kh*kw, n_cols), n_cols = Nc*Ho*Wo; dx: (Nc, C, H, W) contiguous, total = Nc*C*H*W.
extern "C" __global__ void conv_col2im(
    const ${T}* __restrict__ dcols, ${T}* __restrict__ dx,
    const int C, const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int Ho, const int Wo, const int n_cols, const long long total)
{
    const int hw = H * W;
    const int hw_out = Ho * Wo;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw;  // n * C + c
        const int rem = (int)(t - plane * hw);
        const int h = rem / W;
        const int w = rem - h * W;
        const int c = (int)(plane % C);
        const int n = (int)(plane / C);
        const ${T}* __restrict__ sample = dcols + (long long)n * hw_out;
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int i = window_index(h, ph, p, sh, Ho);  // the window that puts tap p on row h
            if (i == -2) break;
            if (i < 0) continue;
            for (int q = 0; q < kw; ++q) {
                const int j = window_index(w, pw, q, sw, Wo);
                if (j == -2) break;
                if (j < 0) continue;
                const int r = (c * kh + p) * kw + q;
                acc += sample[(long long)r * n_cols + i * Wo + j];
            }
        }
        dx[t] = acc;
    }
}
""",
)

_DEPTHWISE = kernels.raw(
    "conv_depthwise",
    kernels.WINDOW_INDEX
    + kernels.BLOCK_REDUCE
    + r"""
// Depthwise convolution (G = C, Cg = 1, O = C m), NCHW, output channel o = c m + k reads input channel c.
#define DW_TAPS 16   // taps per pass of the weight gradient (gpu/ops/conv.py: _DW_TAPS)

// (1): y[n,o,i,j] = sum_{p,q} w[o,0,p,q] xp[n, o/m, i sh + p, j sw + q]; one thread per output,
// total = N*O*Ho*Wo.
extern "C" __global__ void conv_depthwise_forward(
    const ${T}* __restrict__ x, const ${T}* __restrict__ w, ${T}* __restrict__ y,
    const int C, const int H, const int W, const int m, const int kh, const int kw, const int sh,
    const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const int O = C * m;
    const int hw_out = Ho * Wo;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw_out;  // n * O + o
        const int rem = (int)(t - plane * hw_out);
        const int i = rem / Wo;
        const int j = rem - i * Wo;
        const int o = (int)(plane % O);
        const long long n = plane / O;
        const ${T}* __restrict__ xc = x + (n * C + o / m) * (long long)(H * W);
        const ${T}* __restrict__ wo = w + (long long)o * kh * kw;
        const int h0 = i * sh - ph;
        const int w0 = j * sw - pw;
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int h = h0 + p;
            if (h < 0 || h >= H) continue;  // zero padding adds nothing
            for (int q = 0; q < kw; ++q) {
                const int ww = w0 + q;
                if (ww < 0 || ww >= W) continue;
                acc += xc[h * W + ww] * wo[p * kw + q];
            }
        }
        y[t] = acc;
    }
}

// (8): dx[n,c,h,w] = sum_{p,q} sum_k w[c m + k,0,p,q] dy[n, c m + k, i, j] over the outputs (i, j)
// whose tap (p, q) lands on (h, w): h + ph = i sh + p, w + pw = j sw + q. A gather, one thread per
// input pixel (deterministic), total = N*C*H*W.
extern "C" __global__ void conv_depthwise_backward_input(
    const ${T}* __restrict__ dy, const ${T}* __restrict__ w, ${T}* __restrict__ dx,
    const int C, const int H, const int W, const int m, const int kh, const int kw, const int sh,
    const int sw, const int ph, const int pw, const int Ho, const int Wo, const long long total)
{
    const int O = C * m;
    const int hw = H * W;
    const int hw_out = Ho * Wo;
    const int taps = kh * kw;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        const long long plane = t / hw;  // n * C + c
        const int rem = (int)(t - plane * hw);
        const int h = rem / W;
        const int ww = rem - h * W;
        const int c = (int)(plane % C);
        const long long n = plane / C;
        // dy[n, c m : c m + m] as (m, Ho*Wo); w[c m : c m + m] as (m, kh*kw)
        const ${T}* __restrict__ dyc = dy + (n * O + (long long)c * m) * hw_out;
        const ${T}* __restrict__ wc = w + (long long)c * m * taps;
        ${T} acc = (${T})0;
        for (int p = 0; p < kh; ++p) {
            const int i = window_index(h, ph, p, sh, Ho);  // the window that puts tap p on row h
            if (i == -2) break;
            if (i < 0) continue;
            for (int q = 0; q < kw; ++q) {
                const int j = window_index(ww, pw, q, sw, Wo);
                if (j == -2) break;
                if (j < 0) continue;
                for (int k = 0; k < m; ++k) {
                    acc += wc[k * taps + p * kw + q] * dyc[(long long)k * hw_out + i * Wo + j];
                }
            }
        }
        dx[t] = acc;
    }
}

// (7): dw[o,0,p,q] = sum_{n,i,j} dy[n,o,i,j] xp[n, o/m, i sh + p, j sw + q], for the taps
// tap0 .. tap0 + ntaps - 1 (ntaps <= DW_TAPS) of every output channel. grid = (O, S): block (o, s)
// reduces the positions e = (n, i, j) in [s seg_len, (s+1) seg_len) of channel o, each thread keeping
// one running sum per tap in registers, then block_sum (warp shuffles + shared memory) per tap; it writes
// partial[s, o, tap] (S, O, kh*kw), summed over s on the host side. Launch with a multiple of 32 threads.
extern "C" __global__ void conv_depthwise_backward_weight(
    const ${T}* __restrict__ dy, const ${T}* __restrict__ x, ${T}* __restrict__ partial,
    const int N, const int C, const int H, const int W, const int m, const int kh, const int kw,
    const int sh, const int sw, const int ph, const int pw, const int Ho, const int Wo,
    const int tap0, const int ntaps, const long long seg_len)
{
    const int o = blockIdx.x;
    const int s = blockIdx.y;
    const int O = C * m;
    const int c = o / m;
    const int hw_out = Ho * Wo;
    const long long positions = (long long)N * hw_out;
    const long long begin = (long long)s * seg_len;
    const long long end = begin + seg_len < positions ? begin + seg_len : positions;

    int tp[DW_TAPS], tq[DW_TAPS];  // the (p, q) of each tap of this pass
    double acc[DW_TAPS];  // double sums: the float32 gradient is then as accurate as the reference's
#pragma unroll
    for (int k = 0; k < DW_TAPS; ++k) {
        const int tap = tap0 + (k < ntaps ? k : 0);
        tp[k] = tap / kw;
        tq[k] = tap - (tap / kw) * kw;
        acc[k] = 0.0;
    }
    for (long long e = begin + threadIdx.x; e < end; e += blockDim.x) {
        const long long n = e / hw_out;
        const int rem = (int)(e - n * hw_out);
        const int i = rem / Wo;
        const int j = rem - i * Wo;
        const ${T} g = dy[(n * O + o) * hw_out + rem];
        const ${T}* __restrict__ xc = x + (n * C + c) * (long long)(H * W);
        const int h0 = i * sh - ph;
        const int w0 = j * sw - pw;
#pragma unroll
        for (int k = 0; k < DW_TAPS; ++k) {
            if (k < ntaps) {
                const int h = h0 + tp[k];
                const int ww = w0 + tq[k];
                if (h >= 0 && h < H && ww >= 0 && ww < W) acc[k] += (double)g * xc[h * W + ww];
            }
        }
    }

    __shared__ double buf[33];  // for block_sum (gpu.kernels.BLOCK_REDUCE)
#pragma unroll
    for (int k = 0; k < DW_TAPS; ++k) {  // unrolled: acc stays in registers
        if (k < ntaps) {  // the same for the whole block, so every thread calls block_sum
            const double sum = block_sum(acc[k], buf);
            if (threadIdx.x == 0) partial[((long long)s * O + o) * (kh * kw) + tap0 + k] = (${T})sum;
        }
    }
}
""",
)


# --------------------------------------------------------------------------- validation


def _pad(x, ph: int, pw: int):
    """``x`` (N, C, H, W) -> (N, C, H + 2 ph, W + 2 pw), zero-bordered (``x`` itself when no padding)."""
    if ph == 0 and pw == 0:
        return x
    n, c, h, wd = x.shape
    xp = cp.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=x.dtype)
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    return xp


# --------------------------------------------------------------------------- public ops
def conv2d_forward(x, w, b=None, stride=1, padding=0, groups: int = 1, needs_input_grad=None):
    """``y = conv2d(x, w) + b`` (1): x (N, C, H, W), w (O, C/groups, kh, kw), b (O,) or None.

    ``stride`` and ``padding`` are an int or an (h, w) pair; padding is zeros.
    ``needs_input_grad`` (three bools for x, w, b; None means all) says which
    gradients the backward will be asked for. Returns ``y`` (N, O, Ho, Wo) in
    ``x``'s dtype and the cache for :func:`conv2d_backward`.
    """
    need_x, need_w, need_b = grad_flags("conv2d", needs_input_grad, 3)
    stride, padding, out_hw = conv2d_geometry(x, w, b, stride, padding, groups)
    groups = int(groups)
    n_out, c_in_group, kh, kw = w.shape
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    if kh == kw == 1 and groups == 1:
        path = "pointwise"
        y, w_kept = _forward_pointwise(x, w, stride, padding, out_hw)
    elif groups == x.shape[1] > 1 and c_in_group == 1:
        path = "depthwise"
        y, w_kept = _forward_depthwise(x, w, stride, padding, out_hw), w
    else:
        # the general path adds the bias in the copy that lays y out as NCHW
        path = "general"
        y, w_kept = _forward_general(x, w, b, stride, padding, groups, out_hw)
    if b is not None and path != "general":
        y += b.reshape(1, n_out, 1, 1)  # (1)
    # (4), (7) read x; (5), (8) read w (the bfloat16 copy under bf16, general and pointwise paths)
    cache = Conv2dCache.keep(
        path, x, w, b is not None, stride, padding, groups, (need_x, need_w, need_b), w_kept=w_kept
    )
    return y, cache


def conv2d_backward(dy, cache: Conv2dCache):
    """``(dx, dw, db)`` for :func:`conv2d_forward`; each None where it was not wanted (or no bias)."""
    need_x, need_w, need_b = cache.needs
    dy = cp.ascontiguousarray(dy)
    db = dy.sum(axis=(0, 2, 3)) if need_b else None  # (3)
    if not (need_x or need_w):
        return None, None, db
    if cache.path == "pointwise":
        dx, dw = _backward_pointwise(dy, cache)
    elif cache.path == "depthwise":
        dx, dw = _backward_depthwise(dy, cache)
    else:
        dx, dw = _backward_general(dy, cache)
    return dx, dw, db


# --------------------------------------------------------------------------- general path
def _chunk(n: int, rows: int, hw_out: int) -> int:
    """Samples per im2col chunk: the column buffer (rows, chunk Ho Wo) stays within _COLUMN_ELEMENTS."""
    return max(1, min(n, _COLUMN_ELEMENTS // max(1, rows * hw_out)))


def _im2col(x_chunk, kh: int, kw: int, stride, padding, out_hw, out=None):
    """The columns of (2): x (Nc, C, H, W) -> (C kh kw, Nc Ho Wo), written into ``out`` when given."""
    nc, c, h, wd = x_chunk.shape
    (sh, sw), (ph, pw), (ho, wo) = stride, padding, out_hw
    rows, n_cols = c * kh * kw, nc * ho * wo
    cols = (
        cp.empty((rows, n_cols), dtype=x_chunk.dtype)
        if out is None
        else out[: rows * n_cols].reshape(rows, n_cols)
    )
    if rows == 0 or n_cols == 0:
        return cols
    grid = (*kernels.flat_grid(n_cols), min(rows, 65535))
    args = (
        x_chunk,
        cols,
        np.int32(c),
        np.int32(h),
        np.int32(wd),
        np.int32(kh),
        np.int32(kw),
        np.int32(sh),
        np.int32(sw),
        np.int32(ph),
        np.int32(pw),
        np.int32(ho),
        np.int32(wo),
        np.int32(n_cols),
    )
    _IM2COL.launch("conv_im2col", x_chunk.dtype, grid, (_BLOCK,), args)  # (2)
    return cols


def _col2im(d_cols, dx_chunk, kh: int, kw: int, stride, padding, out_hw) -> None:
    """(5): sum the column gradients (C kh kw, Nc Ho Wo) into ``dx_chunk`` (Nc, C, H, W), a gather."""
    nc, c, h, wd = dx_chunk.shape
    (sh, sw), (ph, pw), (ho, wo) = stride, padding, out_hw
    total = dx_chunk.size
    if total == 0:
        return
    args = (
        d_cols,
        dx_chunk,
        np.int32(c),
        np.int32(h),
        np.int32(wd),
        np.int32(kh),
        np.int32(kw),
        np.int32(sh),
        np.int32(sw),
        np.int32(ph),
        np.int32(pw),
        np.int32(ho),
        np.int32(wo),
        np.int32(nc * ho * wo),
        np.int64(total),
    )
    _COL2IM.launch_flat("conv_col2im", dx_chunk.dtype, total, args)  # (5)


def _forward_general(x, w, b, stride, padding, groups, out_hw):
    n, c = x.shape[:2]
    n_out, c_in_group, kh, kw = w.shape
    ho, wo = out_hw
    rows_g = c_in_group * kh * kw
    w = blas.gemm_operand(w)  # rounded once for every GEMM of the forward and the backward (bf16)
    # (O, Cg, kh, kw) -> (G, Og, Cg*kh*kw)
    w_g = w.reshape(groups, n_out // groups, rows_g)
    y = cp.empty((n, n_out, ho, wo), dtype=x.dtype)
    step = _chunk(n, c * kh * kw, ho * wo)
    buffer = cp.empty(c * kh * kw * min(step, n) * ho * wo, dtype=x.dtype)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        width = (n1 - n0) * ho * wo
        cols = _im2col(x[n0:n1], kh, kw, stride, padding, out_hw, out=buffer)  # (2): (C*kh*kw, width)
        if groups == 1:
            y_f = blas.gemm(w_g[0], cols)  # (2): (O, width)
        else:
            # (C*kh*kw, width) -> (G, Cg*kh*kw, width); (G, Og, width) -> (O, width)
            y_f = blas.gemm_batched(w_g, cols.reshape(groups, rows_g, width)).reshape(n_out, width)  # (2)
        # (O, Nc*Ho*Wo) -> (O, Nc, Ho, Wo) -> (Nc, O, Ho, Wo), copied into y with the bias added
        y_f = y_f.reshape(n_out, n1 - n0, ho, wo).transpose(1, 0, 2, 3)
        if b is None:
            y[n0:n1] = y_f
        else:
            cp.add(y_f, b.reshape(1, n_out, 1, 1), out=y[n0:n1])  # (1)
    return y, w


def _backward_general(dy, cache: Conv2dCache):
    """(4) and (5) by chunks of the batch: the columns are gathered again from ``x`` only for ``dw``."""
    x, w, groups = cache.x, cache.w, cache.groups
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    n_out, c_in_group, kh, kw = cache.w_shape
    ho, wo = dy.shape[2:]
    rows_g = c_in_group * kh * kw
    # (O, Cg, kh, kw) -> (G, Og, Cg*kh*kw)
    w_g = w.reshape(groups, n_out // groups, rows_g) if need_x else None
    dw = cp.zeros((groups, n_out // groups, rows_g), dtype=dy.dtype) if need_w else None
    dx = cp.empty((n, c, h, wd), dtype=dy.dtype) if need_x else None
    step = _chunk(n, c * kh * kw, ho * wo)
    buffer = None  # the columns of (4), then dX of (5) over them (groups = 1)
    if need_w or groups == 1:
        buffer = cp.empty(c * kh * kw * min(step, n) * ho * wo, dtype=dy.dtype)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        width = (n1 - n0) * ho * wo
        # (Nc, O, Ho, Wo) -> (Nc, O, Ho*Wo) -> (O, Nc, Ho*Wo), copied -> (O, width): dY of (4), (5)
        dy_f = cp.ascontiguousarray(dy[n0:n1].reshape(n1 - n0, n_out, ho * wo).transpose(1, 0, 2))
        dy_f = dy_f.reshape(n_out, width)
        if need_w:
            cols = _im2col(x[n0:n1], kh, kw, cache.stride, cache.padding, (ho, wo), out=buffer)  # (2) again
            if groups == 1:
                blas.gemm(dy_f, cols, trans_b=True, out=dw[0], accumulate=True)  # (4): (O, C*kh*kw)
            else:
                # (G, Og, width) times (G, Cg*kh*kw, width) transposed -> (G, Og, Cg*kh*kw)
                dw += blas.gemm_batched(
                    dy_f.reshape(groups, -1, width), cols.reshape(groups, rows_g, width), trans_b=True
                )  # (4)
        if need_x:
            if groups == 1:
                # the columns are spent: dX = W^T dY overwrites the buffer, (C*kh*kw, width)
                d_cols = buffer[: c * kh * kw * width].reshape(c * kh * kw, width)
                d_cols = blas.gemm(w_g[0], dy_f, trans_a=True, out=d_cols)  # (5)
            else:
                # (G, Og, Cg*kh*kw) transposed times (G, Og, width) -> (G, Cg*kh*kw, width) -> (C*kh*kw, width)
                d_cols = blas.gemm_batched(w_g, dy_f.reshape(groups, -1, width), trans_a=True)  # (5)
                d_cols = d_cols.reshape(c * kh * kw, width)
            _col2im(d_cols, dx[n0:n1], kh, kw, cache.stride, cache.padding, (ho, wo))  # (5)
    # (G, Og, Cg*kh*kw) -> (O, Cg, kh, kw)
    return dx, None if dw is None else dw.reshape(cache.w_shape)


# --------------------------------------------------------------------------- pointwise path
def _pointwise_columns(x, stride, padding, out_hw):
    """``X[n] = xp[n, :, ::sh, ::sw]`` of (2) as (N, C, Ho*Wo): a view of ``x`` at stride 1 without padding."""
    n, c = x.shape[:2]
    (sh, sw), (ph, pw), (ho, wo) = stride, padding, out_hw
    if (sh, sw, ph, pw) == (1, 1, 0, 0):
        # (N, C, H, W) -> (N, C, H*W), a view
        return x.reshape(n, c, ho * wo)
    # (N, C, Hp, Wp) -> strided (N, C, Ho, Wo), copied -> (N, C, Ho*Wo)
    return cp.ascontiguousarray(_pad(x, ph, pw)[:, :, ::sh, ::sw]).reshape(n, c, ho * wo)


def _forward_pointwise(x, w, stride, padding, out_hw):
    """``(y, w as it entered the GEMM)``: the weight is rounded once for the forward and the backward (bf16)."""
    n, c = x.shape[:2]
    n_out = w.shape[0]
    ho, wo = out_hw
    cols = _pointwise_columns(x, stride, padding, out_hw)
    w = blas.gemm_operand(w)
    # (O, C, 1, 1) -> (O, C), shared by every sample: (N, O, Ho*Wo)
    y = blas.gemm_batched(w.reshape(n_out, c), cols)  # (2)
    # (N, O, Ho*Wo) -> (N, O, Ho, Wo)
    return y.reshape(n, n_out, ho, wo), w


def _backward_pointwise(dy, cache: Conv2dCache):
    """(4) from the columns rebuilt from ``x`` (only for ``dw``), (5) from the cached weight (only for ``dx``)."""
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    n_out, ho, wo = dy.shape[1:]
    # (N, O, Ho, Wo) -> (N, O, Ho*Wo)
    dy_m = dy.reshape(n, n_out, ho * wo)
    dx = dw = None
    if need_w:
        cols = _pointwise_columns(cache.x, cache.stride, cache.padding, (ho, wo))  # (2) again
        # (N, O, Ho*Wo) -> (O, N, Ho*Wo), copied -> (O, N*Ho*Wo)
        dy_f = cp.ascontiguousarray(dy_m.transpose(1, 0, 2)).reshape(n_out, -1)
        # (N, C, Ho*Wo) -> (C, N, Ho*Wo), copied -> (C, N*Ho*Wo)
        cols_f = cp.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(c, -1)
        del cols
        # (O, N*Ho*Wo) times (C, N*Ho*Wo) transposed -> (O, C) -> (O, C, 1, 1)
        dw = blas.gemm(dy_f, cols_f, trans_b=True).reshape(cache.w_shape)  # (4)
        del dy_f, cols_f
    if not need_x:
        return dx, dw
    # (O, C) transposed times (N, O, Ho*Wo) -> (N, C, Ho*Wo) -> (N, C, Ho, Wo)
    d_cols = blas.gemm_batched(cache.w.reshape(n_out, c), dy_m, trans_a=True).reshape(n, c, ho, wo)  # (5)
    if (sh, sw, ph, pw) == (1, 1, 0, 0):
        return d_cols, dw
    dxp = cp.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dy.dtype)
    dxp[:, :, ::sh, ::sw] = d_cols  # (5)
    if ph == 0 and pw == 0:
        return dxp, dw
    return cp.ascontiguousarray(dxp[:, :, ph : ph + h, pw : pw + wd]), dw  # (5)


# --------------------------------------------------------------------------- depthwise path
def _depthwise_geometry(x_shape, w_shape, stride, padding, out_hw) -> tuple:
    """The int32 scalars after the depthwise kernels' arrays: C, H, W, m, kh, kw, sh, sw, ph, pw, Ho, Wo."""
    _, c, h, wd = x_shape
    n_out, _, kh, kw = w_shape
    values = (c, h, wd, n_out // c, kh, kw, *stride, *padding, *out_hw)
    return tuple(np.int32(v) for v in values)


def _forward_depthwise(x, w, stride, padding, out_hw):
    n = x.shape[0]
    n_out = w.shape[0]
    ho, wo = out_hw
    y = cp.empty((n, n_out, ho, wo), dtype=x.dtype)
    args = (x, w, y, *_depthwise_geometry(x.shape, w.shape, stride, padding, out_hw), np.int64(y.size))
    _DEPTHWISE.launch_flat("conv_depthwise_forward", x.dtype, y.size, args)  # (1)
    return y


def _backward_depthwise(dy, cache: Conv2dCache):
    """(8) from the cached weight (only for ``dx``), (7) from the cached input (only for ``dw``)."""
    x, w = cache.x, cache.w
    need_x, need_w, _ = cache.needs
    n = cache.x_shape[0]
    n_out, _, kh, kw = cache.w_shape
    ho, wo = dy.shape[2:]
    geometry = _depthwise_geometry(cache.x_shape, cache.w_shape, cache.stride, cache.padding, (ho, wo))
    dx = None
    if need_x:
        dx = cp.empty(cache.x_shape, dtype=dy.dtype)
        args = (dy, w, dx, *geometry, np.int64(dx.size))
        _DEPTHWISE.launch_flat("conv_depthwise_backward_input", dy.dtype, dx.size, args)  # (8)
    if not need_w:
        return dx, None
    # (7): block (o, s) reduces the positions [s seg_len, (s+1) seg_len) of the N*Ho*Wo of channel o
    positions = n * ho * wo
    if positions == 0 or n_out == 0:
        return dx, cp.zeros(cache.w_shape, dtype=dy.dtype)
    segments = max(1, min(-(-_DW_TARGET_BLOCKS // n_out), -(-positions // (8 * _BLOCK)), 65535))
    seg_len = -(-positions // segments)
    segments = -(-positions // seg_len)
    taps = kh * kw
    # (S, O, kh*kw): each segment's partial sums
    partial = cp.empty((segments, n_out, taps), dtype=dy.dtype)
    for tap0 in range(0, taps, _DW_TAPS):
        args = (
            dy,
            x,
            partial,
            np.int32(n),
            *geometry,
            np.int32(tap0),
            np.int32(min(_DW_TAPS, taps - tap0)),
            np.int64(seg_len),
        )
        _DEPTHWISE.launch(
            "conv_depthwise_backward_weight", dy.dtype, (n_out, segments), (_BLOCK,), args
        )  # (7)
    # (S, O, kh*kw) -> (O, kh*kw) -> (O, 1, kh, kw)
    dw = (partial[0] if segments == 1 else partial.sum(axis=0)).reshape(cache.w_shape)  # (7)
    return dx, dw
