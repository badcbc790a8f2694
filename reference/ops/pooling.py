"""Max, average and global average pooling on NCHW input.

``x`` is (N, C, H, W); windows are (kh, kw) at strides (sh, sw) (the stride
defaults to the window size); ``xp`` is ``x`` padded by (ph, pw) on each side.
The output size is ``Ho = (H + 2 ph - kh) // sh + 1`` (likewise ``Wo``), and the
padding may be at most half the window (``ph <= kh // 2``), so every window
holds at least one element of ``x``. Window ``(i, j)`` covers the offsets
``(p, q)``, ``p < kh``, ``q < kw``, of ``xp`` at ``(i sh + p, j sw + q)``.

Max pooling, with ``xp`` padded by -inf (padding is never selected)::

    y[n,c,i,j] = max_{p,q} xp[n, c, i sh + p, j sw + q]                                (1)
    (p*, q*)[n,c,i,j] = the first (p, q) in row-major order reaching that maximum       (2)
    dxp[n, c, i sh + p*, j sw + q*] += dy[n,c,i,j],   dx = dxp without its border       (3)

Kink: where several elements of a window tie for the maximum, (2) sends the
whole gradient to the first one in row-major window order (``np.argmax``'s
rule), not a share to each. Where windows overlap, one element can be the
maximum of several windows, and (3) adds up their gradients.

Average pooling, with ``xp`` padded by zeros that count in the divisor
(PyTorch's ``count_include_pad=True``)::

    y[n,c,i,j] = sum_{p,q} xp[n, c, i sh + p, j sw + q] / (kh kw)                       (4)
    dxp[n, c, i sh + p, j sw + q] += dy[n,c,i,j] / (kh kw)  for every (p, q)             (5)

Global average pooling, (N, C, H, W) -> (N, C)::

    y[n,c] = sum_{a,b} x[n,c,a,b] / (H W)                                               (6)
    dx[n,c,a,b] = dy[n,c] / (H W)                                                       (7)

Outputs and gradients keep ``x``'s dtype.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reference.caches import AvgPoolCache, GlobalAvgPoolCache, MaxPoolCache, grad_flags
from reference.contracts import PoolGeometry, pool_geometry

from .conv import _offset, _pad

__all__ = [
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
]


def _scatter(geo: PoolGeometry, dtype, pieces) -> np.ndarray:
    """``dx``: add ``piece`` (N, C, Ho, Wo) at each window offset ``(p, q)`` of ``dxp``, crop."""
    n, c, h, w = geo.x_shape
    (ph, pw), (ho, wo), (sh, sw) = geo.padding, geo.out, geo.stride
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dtype)
    for (p, q), piece in pieces:
        dxp[:, :, _offset(p, sh, ho), _offset(q, sw, wo)] += piece
    return dxp[:, :, ph : ph + h, pw : pw + w]


# ------------------------------------------------------------------ max pooling
def max_pool2d_forward(x, kernel_size, stride=None, padding=0, needs_input_grad=None):
    """Max over each window (1); ``stride`` None means the window size, padding is -inf."""
    grad_flags("max_pool2d", needs_input_grad, 1)
    geo = pool_geometry("max_pool2d", x, kernel_size, stride, padding)
    (kh, kw), (sh, sw) = geo.kernel, geo.stride
    n, c = x.shape[:2]
    ho, wo = geo.out
    xp = _pad(x, *geo.padding, value=-np.inf)
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    # (N, C, Ho, Wo, kh, kw) -> (N, C, Ho, Wo, kh*kw), row-major window order
    windows = windows.reshape(n, c, ho, wo, kh * kw)
    argmax = windows.argmax(axis=-1)  # (2): the first maximum
    y = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]  # (1)
    argmax = argmax.astype(np.min_scalar_type(kh * kw - 1))
    return y, MaxPoolCache(geo, argmax)


def max_pool2d_backward(dy, cache: MaxPoolCache):
    """``(dx,)``: each window's ``dy`` goes to its first maximum (3)."""
    geo, argmax = cache
    kh, kw = geo.kernel
    pieces = (((p, q), np.where(argmax == p * kw + q, dy, 0)) for p in range(kh) for q in range(kw))
    return (_scatter(geo, dy.dtype, pieces),)  # (3)


# -------------------------------------------------------------- average pooling
def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, needs_input_grad=None):
    """Mean over each window (4); zero padding counts in the divisor kh*kw."""
    grad_flags("avg_pool2d", needs_input_grad, 1)
    geo = pool_geometry("avg_pool2d", x, kernel_size, stride, padding)
    (kh, kw), (sh, sw), (ho, wo) = geo.kernel, geo.stride, geo.out
    xp = _pad(x, *geo.padding)
    y = np.zeros((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype)
    for p in range(kh):
        for q in range(kw):
            y += xp[:, :, _offset(p, sh, ho), _offset(q, sw, wo)]  # (4)
    y /= kh * kw  # (4)
    return y, AvgPoolCache(geo)


def avg_pool2d_backward(dy, cache: AvgPoolCache):
    """``(dx,)``: every element of a window gets ``dy / (kh kw)`` (5)."""
    geo = cache.geometry
    kh, kw = geo.kernel
    share = dy / (kh * kw)  # (5)
    pieces = (((p, q), share) for p in range(kh) for q in range(kw))
    return (_scatter(geo, dy.dtype, pieces),)  # (5)


# ------------------------------------------------------- global average pooling
def global_avg_pool2d_forward(x, needs_input_grad=None):
    """(N, C, H, W) -> (N, C), the mean over H and W (6)."""
    grad_flags("global_avg_pool2d", needs_input_grad, 1)
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool2d expects x of shape (N, C, H, W), got {x.shape}")
    return x.mean(axis=(2, 3)), GlobalAvgPoolCache(tuple(x.shape))  # (6)


def global_avg_pool2d_backward(dy, cache: GlobalAvgPoolCache):
    """``(dx,)``: ``dy / (H W)`` spread over every position (7)."""
    h, w = cache.x_shape[2:]
    # (N, C) -> (N, C, 1, 1)
    share = dy.reshape(dy.shape + (1, 1)) / (h * w)  # (7)
    return (np.broadcast_to(share, cache.x_shape).copy(),)  # (7)
