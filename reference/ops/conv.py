"""2-D convolution (cross-correlation, as PyTorch) on NCHW input, by im2col and GEMM.

Shapes: ``x`` (N, C, H, W), ``w`` (O, C/G, kh, kw) with G = ``groups``, ``b`` (O,).
Group ``g`` maps input channels ``g*Cg .. (g+1)*Cg - 1`` to output channels
``g*Og .. (g+1)*Og - 1``, with ``Cg = C/G`` and ``Og = O/G``. ``xp`` is ``x``
zero-padded by ``(ph, pw)``; strides are ``(sh, sw)``; the output size is
``Ho = (H + 2 ph - kh) // sh + 1`` (likewise ``Wo``). For an output channel
``o`` in group ``g``::

    y[n,o,i,j] = b[o] + sum_{c<Cg, p<kh, q<kw} w[o,c,p,q] xp[n, g Cg + c, i sh + p, j sw + q]   (1)

im2col gathers every window into columns, one matrix per sample and group,
with rows ``r = (c, p, q)`` and columns ``l = (i, j)``; (1) is then a GEMM::

    X[n,g][(c,p,q), (i,j)] = xp[n, g Cg + c, i sh + p, j sw + q]
    Y[n,g] = W[g] X[n,g] + b[g],    W[g] = w[g Og : (g+1) Og] as (Og, Cg kh kw)       (2)

Gradients, with ``dY[n,g]`` the upstream ``dy`` as (Og, Ho Wo)::

    db[o]  = sum_{n,i,j} dy[n,o,i,j]                                                  (3)
    dW[g]  = sum_n dY[n,g] X[n,g]^T                                                   (4)
    dX[n,g] = W[g]^T dY[n,g];  dxp[n, g Cg + c, i sh + p, j sw + q] += dX[n,g][(c,p,q),(i,j)]
    (col2im: a scatter-add over the kh kw kernel offsets), dx = dxp without its border (5)

For stride 1 (and ``ph <= kh - 1``, ``pw <= kw - 1``), (5) is itself a
correlation: of ``dy`` zero-padded by ``(kh-1-ph, kw-1-pw)`` with the weight
flipped in space and transposed in its channel axes, group by group::

    dyp[n, o, a + kh-1-ph, b + kw-1-pw] = dy[n, o, a, b]   (zero elsewhere)
    dx[n, g Cg + c, a, b] = sum_{o<Og, p, q} w[g Og + o, c, kh-1-p, kw-1-q] dyp[n, g Og + o, a + p, b + q]
                                                                                      (6)

which runs as im2col of ``dyp`` and one GEMM, writing ``dx`` in NCHW directly
instead of scattering a kh kw times larger ``dX``.

Four shapes get their own path (same equations, less work); which one runs is
decided by the shape alone, in :func:`conv2d_forward`:

- pointwise (1x1, G = 1): ``X[n]`` is ``xp[n, :, ::sh, ::sw]`` as (C, Ho Wo),
  no window gather; (5) writes ``dX[n]`` back to ``dxp[n, :, ::sh, ::sw]``.
- shift (G = 1, stride 1, ``ph <= kh - 1`` and ``pw <= kw - 1``; every
  stride-1 3x3 conv of ResNet-20 and ResNet-50): lay ``x`` out channel-major on one flat grid on which
  neighbouring rows and images share their zero borders. Each row is ``pw``
  zeros then the row's ``W`` entries (``Wr = W + pw`` positions), each image
  its ``H`` rows then ``ph`` rows of zeros (``Hr = H + ph`` rows), and the
  first image has ``ph`` zero rows above it::

      xf[c, (ph + n Hr + r) Wr + pw + s] = x[n, c, r, s]   (zero at every other position)

  A window's left border is then the zeros that open its own row, its right
  border those that open the next row, its top border the zero rows below the
  image above: with output (n, i, j) at ``t = (n Hr + i) Wr + j``, window
  offset (p, q) is a shift of ``t`` by ``s_pq = p Wr + q``, so (1) holds at
  every ``t`` of the grid, and the valid outputs are those with ``i < Ho,
  j < Wo``::

      yf[o, t] = sum_{c, p, q} w[o,c,p,q] xf[c, t + s_pq],   y[n,o,i,j] = yf[o, (n Hr + i) Wr + j]  (9)

  Each column block of X in (2) is kh kw contiguous slices of ``xf`` (a
  memcpy, not a window gather) and Y is one 2-D GEMM per block of
  ``_CHUNK_COLUMNS`` positions; the blocks stay in cache and are gathered
  again in the backward for (11), so the cache holds ``x`` (not the kh kw times larger
  X). (4) is the same with ``dyf``, ``dy`` placed at the output positions
  of the grid with zeros everywhere else; (6) in flat form reads ``dyf`` at
  ``t - s_pq``, and ``dx`` is read off the input positions of ``dxf``::

      dw[o,c,p,q] = sum_t dyf[o, t] xf[c, t + s_pq]                                            (10)
      dxf[c, t] = sum_{o, p, q} w[o,c,p,q] dyf[o, t - s_pq],   dx[n,c,r,s] = dxf[c, (ph + n Hr + r) Wr + pw + s]  (11)

  Both gradients come off one gather per block: the columns of ``dyf`` read
  at ``t - s_pq`` (the flipped tap), which (11) multiplies by the flipped
  weight. Substituting ``t -> t - s_pq`` in (10) shows the same columns give
  ``dw``, with ``(p', q') = (kh-1-p, kw-1-q)`` the flip of tap ``(p, q)``::

      dw[o, c, p', q'] = sum_t dyf[o, t - s_pq] xf[c, t]                                       (12)

  one GEMM per block of an (O kh kw, width) block with the (C, width) block
  of ``xf``, where (10) read as written is kh kw GEMMs of (O, T) by (T, C),
  two tiny dimensions and a long one: on 32 samples of ResNet-20's first
  stage those took 4.3 ms, (12) adds 2.5 ms to the gather and GEMM of (11).
  A one-channel input (a grayscale stem) keeps (10), whose GEMMs then have a
  single column and cost less than the gather.

  The price is computing (9) and (11) at the ``Hr Wr - Ho Wo`` positions of
  each image that hold no output (for a 3x3 conv padded by 1, its row and
  column of shared zeros: 27 % more GEMM work at 8x8, 13 % at 16x16, 6 % at
  32x32; padding each image on its own, as an earlier version did, wasted
  56 %, 27 % and 13 %). Even on tiny grids this beats the general path, whose
  backward forms a weight gradient per sample: on one core, 32 samples of 64
  channels at 3x3 took 1.5 against 2.4 ms forward and backward, at 1x1 0.4
  against 1.7 ms (128 samples of 256 channels at 1x1: 27 against 133 ms).
  ``ph <= kh - 1`` keeps every output row inside its image's ``Hr`` rows
  (likewise the columns); a larger padding takes the general path.
- depthwise (G = C > 1, O = C m for a channel multiplier m): with Cg = 1 the
  GEMM in (2) degenerates, so (1) runs as a multiply-accumulate over the kh kw
  offsets of strided views of ``xp``, and (4), (5) as::

      dw[c m + k, 0, p, q] = sum_{n,i,j} dy[n, c m + k, i, j] xp[n, c, i sh + p, j sw + q]        (7)
      dxp[n, c, i sh + p, j sw + q] += sum_k w[c m + k, 0, p, q] dy[n, c m + k, i, j]          (8)

  For stride 1, one output channel per input channel (m = 1) and ``ph <= kh - 1``,
  ``pw <= kw - 1``, (8) is (6) with a single channel per group: ``dx`` is this same path's
  forward (1) of ``dy`` padded by ``(kh-1-ph, kw-1-pw)`` with the weight flipped in space, a
  gather of each tap instead of a scatter-add into ``dxp`` (a third less time on MobileNetV1's
  4x4 maps).

  In NCHW the innermost loop of each multiply-accumulate spans only Wo (2 to 4
  in MobileNet's deep layers), so when ``C >= 4 Wo`` the same loops run on
  channels-last copies (N, Hp, Wp, C) of ``xp`` and ``dy``, innermost over C
  (the "depthwise-cl" path; measured 2-7x faster there, 2-3x slower on the
  8-channel 32x32 first layer).

Convolution is linear in ``x``, ``w`` and ``b``: there are no kinks.

Dtypes: the output and every gradient have ``x``'s dtype; ``w`` and ``b`` must
match it (a float32 network stays float32).

Memory: every path caches ``x`` itself (the object it was given, which is
usually also the previous ReLU's cached output, so the two share one buffer)
and the weight, and nothing derived from them. The backward rebuilds what its
path works on (the padded input, the columns ``X``, the channel-major or
channels-last copies) from ``x``: one gather per backward, against a kh kw
times larger array held from the forward to the backward. ``x`` is kept only
when ``w`` needs a gradient (4), ``w`` only when ``x`` does (5); a gradient the
caller does not need (``needs_input_grad``; the input image of the first layer)
is not computed and is None.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reference.caches import Conv2dCache, grad_flags
from reference.contracts import conv2d_geometry

from .parallel import batch_parts, run_parts, sum_in_order

__all__ = ["conv2d_forward", "conv2d_backward"]


def _pad(x: np.ndarray, ph: int, pw: int, value: float = 0.0) -> np.ndarray:
    """``x`` (N, C, H, W) -> (N, C, H + 2 ph, W + 2 pw), the border filled with ``value``."""
    if ph == 0 and pw == 0:
        return x
    n, c, h, wd = x.shape
    xp = np.full((n, c, h + 2 * ph, wd + 2 * pw), value, dtype=x.dtype)  # np.pad does the same, slower
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    return xp


def _windows(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int) -> np.ndarray:
    """A view of every (kh, kw) window of ``xp`` at strides (sh, sw), without a copy.

    (N, C, Hp, Wp) -> (N, C, Ho, Wo, kh, kw)
    """
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def _im2col(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int) -> np.ndarray:
    """The columns of (2), contiguous: (N, C, Hp, Wp) -> (N, C, kh, kw, Ho, Wo)."""
    # (N, C, Ho, Wo, kh, kw) -> (N, C, kh, kw, Ho, Wo), one gathering copy
    return np.ascontiguousarray(_windows(xp, kh, kw, sh, sw).transpose(0, 1, 4, 5, 2, 3))


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """``out`` (the caller's rows of the output, written in place), or a new array when None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    assert out.shape == shape and out.flags.c_contiguous, "the paths write into views of a contiguous out"
    return out


def _offset(p: int, s: int, n: int) -> slice:
    """Indices ``p, p + s, ..., p + s (n - 1)``: where offset ``p`` of a window lands
    for each of ``n`` outputs at stride ``s`` along one axis."""
    return slice(p, p + s * (n - 1) + 1, s)


def _path(x_shape, w_shape, stride, padding, groups, out_hw) -> str:
    """Which algorithm serves this geometry (the shape alone decides; see the module docstring)."""
    n_out, c_in_group, kh, kw = w_shape
    channels = x_shape[1]
    (ph, pw), wo = padding, out_hw[1]
    if kh == kw == 1 and groups == 1:
        return "pointwise"
    if groups == channels > 1 and c_in_group == 1:
        return "depthwise-cl" if channels >= 4 * wo else "depthwise"
    if groups == 1 and stride == (1, 1) and ph <= kh - 1 and pw <= kw - 1:
        return "shift"
    return "general"


def conv2d_forward(x, w, b=None, stride=1, padding=0, groups: int = 1, needs_input_grad=None):
    """``y = conv2d(x, w) + b`` (1): x (N, C, H, W), w (O, C/groups, kh, kw), b (O,) or None.

    ``stride`` and ``padding`` are an int or an (h, w) pair; padding is zeros.
    ``needs_input_grad`` (three bools for x, w, b; None means all) says which
    gradients the backward will be asked for. Returns ``y`` (N, O, Ho, Wo) in
    ``x``'s dtype and the cache for :func:`conv2d_backward`.
    """
    need_x, need_w, need_b = grad_flags("conv2d", needs_input_grad, 3)
    stride, padding, out_hw = conv2d_geometry(x, w, b, stride, padding, groups)
    path = _path(x.shape, w.shape, stride, padding, groups, out_hw)
    forward = _FORWARD[path]
    y = np.empty((x.shape[0], w.shape[0], *out_hw), dtype=x.dtype)

    def part(rows: slice) -> None:
        forward(x[rows], w, stride, padding, groups, out_hw, out=y[rows])
        if b is not None:
            y[rows] += b.reshape(1, w.shape[0], 1, 1)  # (1)

    macs = y.size * math.prod(w.shape[1:])  # (1)'s multiply-adds
    run_parts(part, batch_parts(x.shape[0], elements=x.size + y.size, macs=macs))
    cache = Conv2dCache.keep(path, x, w, b is not None, stride, padding, groups, (need_x, need_w, need_b))
    return y, cache


def conv2d_backward(dy, cache: Conv2dCache):
    """``(dx, dw, db)`` for :func:`conv2d_forward`; each None where it was not wanted (or no bias).

    Run on parts of the batch (:mod:`.parallel`): each part's ``dx`` rows are
    written in place, and its ``dw`` (4) and ``db`` (3) are sums over its own
    samples, added in the parts' order.
    """
    need_x, need_w, need_b = cache.needs
    backward = _BACKWARD[cache.path]
    elements = math.prod(cache.x_shape) + dy.size
    macs = dy.size * math.prod(cache.w_shape[1:])  # (1)'s multiply-adds
    parts = batch_parts(dy.shape[0], elements=elements, macs=macs)
    if len(parts) == 1:  # the whole batch in one call, its arrays as the path made them
        dx, dw = backward(dy, cache)
        return dx, dw, dy.sum(axis=(0, 2, 3)) if need_b else None  # (3)
    dx = np.empty(cache.x_shape, dtype=dy.dtype) if need_x else None

    def part(rows: slice):
        x_rows = None if cache.x is None else cache.x[rows]
        own = cache._replace(x=x_rows, x_shape=(rows.stop - rows.start, *cache.x_shape[1:]))
        out = None if dx is None else dx[rows]
        dx_rows, dw_part = backward(dy[rows], own, out=out)
        if out is not None and dx_rows is not out:
            out[...] = dx_rows  # a path that returns its own array
        return dw_part, dy[rows].sum(axis=(0, 2, 3)) if need_b else None  # (3)

    sums = run_parts(part, parts)
    dw = sum_in_order([dw_part for dw_part, _ in sums]) if need_w else None  # (4)
    db = sum_in_order([db_part for _, db_part in sums]) if need_b else None  # (3)
    return dx, dw, db


def _contiguous(view: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``view`` copied into ``out`` (a part's rows of the caller's array), or into a new contiguous array."""
    if out is None:
        return np.ascontiguousarray(view)
    np.copyto(out, view)
    return out


# ---------------------------------------------------------------- general path
def _forward_general(x, w, stride, padding, groups, out_hw, out=None):
    n = x.shape[0]
    n_out, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (ho, wo) = stride, padding, out_hw
    cols = _im2col(_pad(x, ph, pw), kh, kw, sh, sw)  # (2)
    # (N, C, kh, kw, Ho, Wo) -> (N, G, Cg*kh*kw, Ho*Wo)
    cols_g = cols.reshape(n, groups, -1, ho * wo)
    # (O, Cg, kh, kw) -> (G, Og, Cg*kh*kw)
    w_g = w.reshape(groups, n_out // groups, -1)
    out = _output(out, (n, n_out, ho, wo), x.dtype)
    # (N, O, Ho, Wo) -> (N, G, Og, Ho*Wo), a view the product is written into
    np.matmul(w_g, cols_g, out=out.reshape(n, groups, n_out // groups, ho * wo))  # (2)
    return out


def _backward_general(dy, cache: Conv2dCache, out=None):
    need_x, need_w, _ = cache.needs
    n, groups = cache.x_shape[0], cache.groups
    n_out, _, kh, kw = cache.w_shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    ho, wo = dy.shape[2:]
    # (N, O, Ho, Wo) -> (N, G, Og, Ho*Wo)
    dy_g = dy.reshape(n, groups, n_out // groups, ho * wo)
    dx = dw = None
    if need_w:
        cols = _im2col(_pad(cache.x, ph, pw), kh, kw, sh, sw)  # (2), gathered again from x
        # (N, C, kh, kw, Ho, Wo) -> (N, G, Cg*kh*kw, Ho*Wo) -> transposed (N, G, Ho*Wo, Cg*kh*kw)
        cols_t = cols.reshape(n, groups, -1, ho * wo).swapaxes(-1, -2)
        dw = np.matmul(dy_g, cols_t).sum(axis=0)  # (4)
        del cols, cols_t
        # (G, Og, Cg*kh*kw) -> (O, Cg, kh, kw)
        dw = dw.reshape(cache.w_shape)
    if need_x:
        if sh == sw == 1 and ph <= kh - 1 and pw <= kw - 1:
            dx = _dx_transposed(dy, cache.w, groups, (ph, pw))
        else:
            dx = _dx_col2im(dy_g, cache.w, cache, (ho, wo))
    return dx, dw


def _dx_transposed(dy, w, groups, padding):
    """``dx`` for stride 1 by (6): a correlation of the padded ``dy`` with the flipped weight."""
    n, n_out = dy.shape[:2]
    _, c_in_group, kh, kw = w.shape
    ph, pw = padding
    cols = _im2col(_pad(dy, kh - 1 - ph, kw - 1 - pw), kh, kw, 1, 1)  # (6)
    h, wd = cols.shape[-2:]
    # (N, O, kh, kw, H, W) -> (N, G, Og*kh*kw, H*W)
    cols = cols.reshape(n, groups, -1, h * wd)
    # (O, Cg, kh, kw) -> (G, Og, Cg, kh, kw), flipped in space -> (G, Cg, Og, kh, kw) -> (G, Cg, Og*kh*kw)
    w_t = w.reshape(groups, n_out // groups, c_in_group, kh, kw)[..., ::-1, ::-1]
    w_t = w_t.transpose(0, 2, 1, 3, 4).reshape(groups, c_in_group, -1)
    dx = np.matmul(w_t, cols)  # (6)
    # (N, G, Cg, H*W) -> (N, C, H, W)
    return dx.reshape(n, groups * c_in_group, h, wd)


def _dx_col2im(dy_g, w, cache: Conv2dCache, out_hw):
    """``dx`` by (5): ``dX = W^T dY``, then a scatter-add over the kernel offsets."""
    n, c, h, wd = cache.x_shape
    groups = cache.groups
    n_out, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    ho, wo = out_hw
    # (O, Cg, kh, kw) -> (G, Og, Cg*kh*kw) -> transposed (G, Cg*kh*kw, Og)
    w_t = w.reshape(groups, n_out // groups, -1).swapaxes(-1, -2)
    d_cols = np.matmul(w_t, dy_g)  # (5)
    # (N, G, Cg*kh*kw, Ho*Wo) -> (N, C, kh, kw, Ho, Wo)
    d_cols = d_cols.reshape(n, c, kh, kw, ho, wo)
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dy_g.dtype)
    for p in range(kh):
        for q in range(kw):
            dxp[:, :, _offset(p, sh, ho), _offset(q, sw, wo)] += d_cols[:, :, p, q]  # (5)
    return dxp[:, :, ph : ph + h, pw : pw + wd]  # (5)


# ------------------------------------------------------------------ shift path
_CHUNK_COLUMNS = 4096  # positions t per GEMM block: its columns (C kh kw x 4096) stay in cache


def _shared_grid(x, ph, pw, tail):
    """``x`` (N, C, H, W) -> ``xf`` of (9), (C, (ph + N Hr) Wr + tail): channel-major, the zero
    borders shared by neighbouring rows and images, ``tail`` zeros at the end; one copy."""
    n, c, h, wd = x.shape
    hr, wr = h + ph, wd + pw
    xf = np.zeros((c, (ph + n * hr) * wr + tail), dtype=x.dtype)
    # the images' rows: (C, N*Hr*Wr) -> (C, N, Hr, Wr), x written at rows < H, columns >= pw
    grid = xf[:, ph * wr : (ph + n * hr) * wr].reshape(c, n, hr, wr)
    grid[:, :, :h, pw:] = x.transpose(1, 0, 2, 3)  # (N, C, H, W) -> (C, N, H, W)
    return xf


def _flat_columns(src, offsets, t0, width, buffer):
    """Rows ``src[r, t0 + offsets[k] : t0 + offsets[k] + width]`` for every row r and offset k.

    (R, T) -> (R, K, width) with K = len(offsets): one contiguous copy per offset.
    """
    cols = buffer[: src.shape[0] * len(offsets) * width].reshape(src.shape[0], len(offsets), width)
    for k, offset in enumerate(offsets):
        cols[:, k] = src[:, t0 + offset : t0 + offset + width]
    return cols


def _forward_shift(x, w, stride, padding, groups, out_hw, out=None):
    n, c, h, wd = x.shape
    n_out, _, kh, kw = w.shape
    (ph, pw), (ho, wo) = padding, out_hw
    hr, wr = h + ph, wd + pw
    offsets = [p * wr + q for p in range(kh) for q in range(kw)]  # s_pq of (9)
    span = n * hr * wr  # output positions t = (n Hr + i) Wr + j; (9) reads xf up to t + s_pq
    xf = _shared_grid(x, ph, pw, tail=offsets[-1] - ph * wr)  # (C, span + s_max)
    # (O, C, kh, kw) -> (O, C*kh*kw)
    w_m = w.reshape(n_out, -1)
    y = np.empty((n_out, span), dtype=x.dtype)  # (9) at every t of the grid
    buffer = np.empty(c * len(offsets) * min(_CHUNK_COLUMNS, span), dtype=x.dtype)
    for t0 in range(0, span, _CHUNK_COLUMNS):
        width = min(_CHUNK_COLUMNS, span - t0)
        cols = _flat_columns(xf, offsets, t0, width, buffer)  # (9)
        # (C, kh*kw, width) -> (C*kh*kw, width)
        np.matmul(w_m, cols.reshape(-1, width), out=y[:, t0 : t0 + width])  # (9)
    out = _output(out, (n, n_out, ho, wo), x.dtype)
    # (O, T) -> (O, N, Hr, Wr) -> the outputs (O, N, Ho, Wo) -> (N, O, Ho, Wo)
    np.copyto(out, y.reshape(n_out, n, hr, wr)[:, :, :ho, :wo].transpose(1, 0, 2, 3))
    return out


def _backward_shift(dy, cache: Conv2dCache, out=None):
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    n_out, _, kh, kw = cache.w_shape
    ph, pw = cache.padding
    ho, wo = dy.shape[2:]
    hr, wr = h + ph, wd + pw
    offsets = [p * wr + q for p in range(kh) for q in range(kw)]
    span, lead, top = n * hr * wr, offsets[-1], ph * wr
    # dyf of (10): dy at its output positions t, zero elsewhere, after ``lead`` zeros so that (11)
    # can read it at t - s_pq >= -lead, and long enough to be read at every input position of (11),
    # which lie in [top, top + span): (O, lead + top + span)
    dy_f = np.zeros((n_out, lead + top + span), dtype=dy.dtype)
    grid = dy_f[:, lead : lead + span].reshape(n_out, n, hr, wr)
    grid[:, :, :ho, :wo] = dy.transpose(1, 0, 2, 3)
    # dw by (12), off the columns (11) gathers, except for a one-channel input (a grayscale stem):
    # there (10)'s GEMMs have one column and cost less than gathering kh kw O rows of columns
    # (62 against 157 microseconds for the digits CNN's first conv at batch 32). The choice
    # depends on the shape alone, so dw is the same whichever gradients are asked for.
    by_columns = need_w and c > 1
    xf = _shared_grid(cache.x, ph, pw, tail=lead - top) if need_w else None  # xf of (9), rebuilt from x
    dx, dw = _shift_backward_blocks(
        dy_f, cache.w, xf if by_columns else None, cache.x_shape, cache.w_shape, (ph, pw), offsets, out
    )
    if need_w and not by_columns:
        dyf_valid = dy_f[:, lead : lead + span]  # (O, span): every t that can hold an output
        dw = np.empty((n_out, c, kh * kw), dtype=dy.dtype)
        for k, offset in enumerate(offsets):
            # (O, span) times (C, span) shifted by s_pq, transposed: strided views BLAS reads in place
            # (np.dot would copy the (O, span) view for each offset, twice the time here)
            dw[:, :, k] = dyf_valid @ xf[:, offset : offset + span].T  # (10)
        dw = dw.reshape(cache.w_shape)  # (O, C, kh*kw) -> (O, C, kh, kw)
    return dx, dw


def _shift_backward_blocks(dy_f, w, xf, x_shape, w_shape, padding, offsets, out=None):
    """``dx`` by (11) when ``w`` is given, ``dw`` by (12) when ``xf`` is: both off one gather.

    Each block of ``_CHUNK_COLUMNS`` input positions gathers the columns of ``dy_f``
    read at ``t - s_pq`` once; (11) multiplies them by the flipped weight and
    (12) by the block of ``xf``. Returns ``(dx, dw)``, None for the one not asked.
    """
    if w is None and xf is None:
        return None, None
    n, c, h, wd = x_shape
    n_out, _, kh, kw = w_shape
    ph, pw = padding
    hr, wr = h + ph, wd + pw
    span, top = n * hr * wr, ph * wr  # the input positions: [top, top + span)
    buffer = np.empty(n_out * len(offsets) * min(_CHUNK_COLUMNS, span), dtype=dy_f.dtype)
    dx = g = w_t = None
    if w is not None:
        # (O, C, kh, kw) -> (C, O, kh, kw), flipped in space: (C, O*kh*kw)
        w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(c, -1)
        dx = np.empty((c, span), dtype=dy_f.dtype)  # dxf of (11) at the positions top .. top + span
    if xf is not None:
        g = np.zeros((n_out * kh * kw, c), dtype=dy_f.dtype)  # (12), summed over the blocks
    for t0 in range(top, top + span, _CHUNK_COLUMNS):
        width = min(_CHUNK_COLUMNS, top + span - t0)
        # offset k = (p, q) reads dy_f at t + s_pq - lead = t - s_(kh-1-p)(kw-1-q): the flipped tap
        cols = _flat_columns(dy_f, offsets, t0, width, buffer)  # (11), (12)
        # (O, kh*kw, width) -> (O*kh*kw, width)
        cols = cols.reshape(-1, width)
        if dx is not None:
            np.matmul(w_t, cols, out=dx[:, t0 - top : t0 - top + width])  # (11)
        if g is not None:
            # (O*kh*kw, width) times (C, width) transposed. np.dot, not matmul: NumPy's matmul keeps
            # the interpreter lock for a transposed operand (two threads ran it no faster than one)
            g += np.dot(cols, xf[:, t0 : t0 + width].T)  # (12)
    dw = None
    if g is not None:
        # (O*kh*kw, C) -> (O, kh, kw, C), the taps flipped back -> (O, C, kh, kw)
        dw = np.ascontiguousarray(g.reshape(n_out, kh, kw, c)[:, ::-1, ::-1].transpose(0, 3, 1, 2))  # (12)
    if dx is not None:
        # (C, N*Hr*Wr) -> (C, N, Hr, Wr) -> the input positions (C, N, H, W) -> (N, C, H, W),
        # into ``out`` or a new array
        dx = _contiguous(dx.reshape(c, n, hr, wr)[:, :, :h, pw:].transpose(1, 0, 2, 3), out)  # (11)
    return dx, dw


# -------------------------------------------------------------- pointwise path
def _forward_pointwise(x, w, stride, padding, groups, out_hw, out=None):
    n, c = x.shape[:2]
    n_out = w.shape[0]
    ho, wo = out_hw
    cols = _pointwise_columns(x, stride, padding, ho, wo)  # (2)
    # (O, C, 1, 1) -> (O, C)
    out = _output(out, (n, n_out, ho, wo), x.dtype)
    # (N, O, Ho, Wo) -> (N, O, Ho*Wo), a view the product is written into
    np.matmul(w.reshape(n_out, c), cols, out=out.reshape(n, n_out, ho * wo))  # (2)
    return out


def _pointwise_columns(x, stride, padding, ho, wo):
    """X of (2) for a 1x1 kernel: (N, C, H, W) -> (N, C, Ho*Wo); a copy only when strided or padded."""
    (sh, sw), (ph, pw) = stride, padding
    n, c = x.shape[:2]
    # (N, C, Hp, Wp) -> (N, C, Ho, Wo) -> (N, C, Ho*Wo)
    return _pad(x, ph, pw)[:, :, ::sh, ::sw].reshape(n, c, ho * wo)


def _backward_pointwise(dy, cache: Conv2dCache, out=None):
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    n_out, ho, wo = dy.shape[1:]
    # (N, O, Ho, Wo) -> (N, O, Ho*Wo)
    dy_m = dy.reshape(n, n_out, ho * wo)
    dw = None
    if need_w:
        cols = _pointwise_columns(cache.x, cache.stride, cache.padding, ho, wo)
        # (N, C, Ho*Wo) -> transposed (N, Ho*Wo, C)
        dw = np.matmul(dy_m, cols.swapaxes(1, 2)).sum(axis=0)  # (4)
        # (O, C) -> (O, C, 1, 1)
        dw = dw.reshape(cache.w_shape)
    if not need_x:
        return None, dw
    # (O, C, 1, 1) -> (O, C) -> transposed (C, O)
    d_cols = np.matmul(cache.w.reshape(n_out, c).T, dy_m)  # (5)
    # (N, C, Ho*Wo) -> (N, C, Ho, Wo)
    d_cols = d_cols.reshape(n, c, ho, wo)
    if sh == sw == 1 and ph == pw == 0:
        return d_cols, dw
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dy.dtype)
    dxp[:, :, ::sh, ::sw] = d_cols  # (5)
    return dxp[:, :, ph : ph + h, pw : pw + wd], dw  # (5)


# -------------------------------------------------------------- depthwise path
def _forward_depthwise(x, w, stride, padding, groups, out_hw, out=None):
    n, c = x.shape[:2]
    n_out, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (ho, wo) = stride, padding, out_hw
    xp = _pad(x, ph, pw)
    # (O, 1, kh, kw) -> (C, m, kh, kw)
    w_cm = w.reshape(c, n_out // c, kh, kw)
    out = _output(out, (n, n_out, ho, wo), x.dtype)
    # (N, O, Ho, Wo) -> (N, C, m, Ho, Wo), a view the taps are summed into
    y = out.reshape(n, c, n_out // c, ho, wo)
    term = np.empty_like(y)
    for p in range(kh):
        for q in range(kw):
            x_pq = xp[:, :, _offset(p, sh, ho), _offset(q, sw, wo)]
            # (N, C, Ho, Wo) -> (N, C, 1, Ho, Wo) times (C, m) -> (C, m, 1, 1); the first tap starts y
            np.multiply(x_pq[:, :, None], w_cm[:, :, p, q, None, None], out=y if p == q == 0 else term)  # (1)
            if p or q:
                y += term  # (1)
    return out


def _dx_depthwise_by_correlation(dy, cache: Conv2dCache, out=None):
    """``dx`` by (6) for a stride-1 depthwise conv with m = 1, through the path's own forward; None
    where (6) does not apply (then (8) scatters). ``dx`` is (N, C, H, W), into ``out`` if given."""
    n, c, h, wd = cache.x_shape
    n_out, _, kh, kw = cache.w_shape
    (ph, pw) = cache.padding
    if cache.stride != (1, 1) or n_out != c or ph > kh - 1 or pw > kw - 1:
        return None
    w_flipped = np.ascontiguousarray(cache.w[:, :, ::-1, ::-1])  # (6): (C, 1, kh, kw) flipped in space
    forward = _FORWARD[cache.path]
    return forward(dy, w_flipped, (1, 1), (kh - 1 - ph, kw - 1 - pw), c, (h, wd), out=out)  # (6)


def _backward_depthwise(dy, cache: Conv2dCache, out=None):
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    n_out, _, kh, kw = cache.w_shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    ho, wo = dy.shape[2:]
    # (N, O, Ho, Wo) -> (N, C, m, Ho, Wo)
    dy_cm = dy.reshape(n, c, n_out // c, ho, wo)
    dx = dw = None
    if need_w:
        xp = _pad(cache.x, ph, pw)  # rebuilt from x
        dw = np.empty((c, n_out // c, kh, kw), dtype=dy.dtype)
        for p in range(kh):
            for q in range(kw):
                x_pq = xp[:, :, _offset(p, sh, ho), _offset(q, sw, wo)]
                dw[:, :, p, q] = np.einsum("ncmij,ncij->cm", dy_cm, x_pq)  # (7)
        # (C, m, kh, kw) -> (O, 1, kh, kw)
        dw = dw.reshape(cache.w_shape)
    dx = _dx_depthwise_by_correlation(dy, cache, out) if need_x else None  # (6)
    if need_x and dx is None:
        # (O, 1, kh, kw) -> (C, m, kh, kw)
        w_cm = cache.w.reshape(c, n_out // c, kh, kw)
        dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dy.dtype)
        for p in range(kh):
            for q in range(kw):
                rows, columns = _offset(p, sh, ho), _offset(q, sw, wo)
                dxp[:, :, rows, columns] += np.einsum("ncmij,cm->ncij", dy_cm, w_cm[:, :, p, q])  # (8)
        dx = dxp[:, :, ph : ph + h, pw : pw + wd]  # (8)
    return dx, dw


# ------------------------------------------------ depthwise path, channels-last
def _forward_depthwise_cl(x, w, stride, padding, groups, out_hw, out=None):
    n, c = x.shape[:2]
    n_out, _, kh, kw = w.shape
    (sh, sw), (ho, wo) = stride, out_hw
    xl = _channels_last(x, *padding)
    # (O, 1, kh, kw) -> (C, m, kh, kw)
    w_cm = w.reshape(c, n_out // c, kh, kw)
    y = np.empty((n, ho, wo, c, n_out // c), dtype=x.dtype)
    term = np.empty_like(y)
    for p in range(kh):
        for q in range(kw):
            x_pq = xl[:, _offset(p, sh, ho), _offset(q, sw, wo)]
            # (N, Ho, Wo, C) -> (N, Ho, Wo, C, 1) times (C, m); the first tap starts y
            np.multiply(x_pq[..., None], w_cm[:, :, p, q], out=y if p == q == 0 else term)  # (1)
            if p or q:
                y += term  # (1)
    out = _output(out, (n, n_out, ho, wo), x.dtype)
    # (N, Ho, Wo, C, m) -> (N, C, m, Ho, Wo), into (N, O, Ho, Wo) seen as (N, C, m, Ho, Wo)
    np.copyto(out.reshape(n, c, n_out // c, ho, wo), y.transpose(0, 3, 4, 1, 2))
    return out


def _channels_last(x, ph, pw):
    """``x`` (N, C, H, W) -> ``xp`` channels-last (N, H + 2 ph, W + 2 pw, C), zero-bordered, in one copy."""
    n, c, h, wd = x.shape
    xl = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=x.dtype)
    # (N, C, H, W) -> (N, H, W, C), written into the interior
    xl[:, ph : ph + h, pw : pw + wd] = x.transpose(0, 2, 3, 1)
    return xl


def _backward_depthwise_cl(dy, cache: Conv2dCache, out=None):
    need_x, need_w, _ = cache.needs
    n, c, h, wd = cache.x_shape
    n_out, _, kh, kw = cache.w_shape
    (sh, sw), (ph, pw) = cache.stride, cache.padding
    ho, wo = dy.shape[2:]
    # (N, O, Ho, Wo) -> (N, C, m, Ho, Wo) -> (N, Ho, Wo, C, m)
    dy_l = np.ascontiguousarray(dy.reshape(n, c, n_out // c, ho, wo).transpose(0, 3, 4, 1, 2))
    dx = dw = None
    if need_w:
        xl = _channels_last(cache.x, ph, pw)  # rebuilt from x
        dw = np.empty((c, n_out // c, kh, kw), dtype=dy.dtype)
        for p in range(kh):
            for q in range(kw):
                x_pq = xl[:, _offset(p, sh, ho), _offset(q, sw, wo)]
                dw[:, :, p, q] = np.einsum("nijcm,nijc->cm", dy_l, x_pq)  # (7)
        del xl
        # (C, m, kh, kw) -> (O, 1, kh, kw)
        dw = dw.reshape(cache.w_shape)
    dx = _dx_depthwise_by_correlation(dy, cache, out) if need_x else None  # (6)
    if need_x and dx is None:
        # (O, 1, kh, kw) -> (C, m, kh, kw)
        w_cm = cache.w.reshape(c, n_out // c, kh, kw)
        dxl = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=dy.dtype)
        for p in range(kh):
            for q in range(kw):
                rows, columns = _offset(p, sh, ho), _offset(q, sw, wo)
                dxl[:, rows, columns] += np.einsum("nijcm,cm->nijc", dy_l, w_cm[:, :, p, q])  # (8)
        # (N, Hp, Wp, C) -> (N, H, W, C) -> (N, C, H, W)
        # (N, H, W, C) -> (N, C, H, W), into ``out`` or a new array
        dx = _contiguous(dxl[:, ph : ph + h, pw : pw + wd].transpose(0, 3, 1, 2), out)  # (8)
    return dx, dw


# the algorithm for each path (chosen by :func:`_path`); one signature per direction
_FORWARD = {
    "pointwise": _forward_pointwise,
    "depthwise": _forward_depthwise,
    "depthwise-cl": _forward_depthwise_cl,
    "shift": _forward_shift,
    "general": _forward_general,
}
_BACKWARD = {
    "pointwise": _backward_pointwise,
    "depthwise": _backward_depthwise,
    "depthwise-cl": _backward_depthwise_cl,
    "shift": _backward_shift,
    "general": _backward_general,
}
