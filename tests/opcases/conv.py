"""Cases for conv2d: dense, stride 1, grouped, depthwise (multiplier 1 and 2), 1x1 and the 7x7 stem;
"stride1-shift" and "depthwise-wide" draw the geometries that the kernel's shift and
channels-last depthwise paths serve (a large image; many channels on a narrow one).

The oracle is equation (1) of ``reference.ops.conv`` read literally: a sum over
the kernel offsets (p, q) of the zero-padded input's strided slice at that
offset times the weight's (p, q) tap, with the channels split into groups by a
reshape. It shares no code with the kernels (no im2col, no GEMM, no special
paths), and conv is linear, so inputs need no distance from any kink.
"""

import autograd.numpy as anp
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from


def _zero_pad(x, ph, pw):
    """(N, C, H, W) -> (N, C, H + 2 ph, W + 2 pw) by concatenating zeros."""
    n, c, h, w = x.shape
    if ph:
        rows = anp.zeros((n, c, ph, w))
        x = anp.concatenate([rows, x, rows], axis=2)
    if pw:
        cols = anp.zeros((n, c, h + 2 * ph, pw))
        x = anp.concatenate([cols, x, cols], axis=3)
    return x


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_oracle(x, w, b=None, stride=1, padding=0, groups=1):
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xp = _zero_pad(x, ph, pw)
    xg = anp.reshape(xp, (n, groups, cg, h + 2 * ph, wd + 2 * pw))
    wg = anp.reshape(w, (groups, o // groups, cg, kh, kw))
    y = 0.0
    for p in range(kh):
        for q in range(kw):
            x_pq = xg[:, :, :, p : p + sh * (ho - 1) + 1 : sh, q : q + sw * (wo - 1) + 1 : sw]
            # (N, G, 1, Cg, Ho, Wo) * (1, G, Og, Cg, 1, 1), summed over Cg
            y = y + anp.sum(x_pq[:, :, None] * wg[None, :, :, :, p, q, None, None], axis=3)
    y = anp.reshape(y, (n, o, ho, wo))
    if b is not None:
        y = y + anp.reshape(b, (1, o, 1, 1))
    return y


def _geometry(data, kernel, stride, padding, extra=4):
    """Draw H, W so that the output has at least one row and column."""
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    h = max(1, kh - 2 * ph) + data.draw(st.integers(0, extra), label="extra H")
    w = max(1, kw - 2 * pw) + data.draw(st.integers(0, extra), label="extra W")
    return h, w


def _int_or_pair(low, high):
    return st.one_of(st.integers(low, high), st.tuples(st.integers(low, high), st.integers(low, high)))


def _conv_draw(
    channels,
    kernel=_int_or_pair(1, 3),
    stride=_int_or_pair(1, 3),
    padding=_int_or_pair(0, 2),
    bias=True,
    extra=4,
):
    """A draw for conv2d; ``channels(data) -> (C, O, groups)``."""

    def draw(data):
        c, o, groups = channels(data)
        k = _pair(data.draw(kernel, label="kernel"))
        s = data.draw(stride, label="stride")
        p = data.draw(padding, label="padding")
        n = data.draw(st.integers(1, 2), label="N")
        h, w = _geometry(data, k, s, p, extra)
        rng = rng_from(data)
        x = rng.standard_normal((n, c, h, w))
        weight = rng.standard_normal((o, c // groups, *k))
        b = rng.standard_normal(o) if bias else None
        return (x, weight, b), {"stride": s, "padding": p, "groups": groups}

    return draw


def _dense(data):
    return data.draw(st.integers(1, 3), label="C"), data.draw(st.integers(1, 3), label="O"), 1


def _grouped(data):
    groups = data.draw(st.integers(2, 3), label="groups")
    cg, og = data.draw(st.integers(1, 2), label="Cg"), data.draw(st.integers(1, 2), label="Og")
    return groups * cg, groups * og, groups


def _depthwise(data):
    c = data.draw(st.integers(2, 4), label="C")
    return c, c * data.draw(st.sampled_from([1, 2]), label="multiplier"), c


def _depthwise_wide(data):
    """Depthwise with C >= 4 Wo for most drawn widths: the channels-last path."""
    c = data.draw(st.integers(24, 32), label="C")
    return c, c * data.draw(st.sampled_from([1, 2]), label="multiplier"), c


def _stem_channels(data):
    return 3, data.draw(st.integers(1, 4), label="O"), 1


CASES = [
    OpCase("conv2d", _conv_draw(_dense), conv2d_oracle, wrt=(0, 1, 2), label="dense"),
    OpCase(
        "conv2d",
        _conv_draw(_dense, stride=st.just(1), bias=False),
        conv2d_oracle,
        wrt=(0, 1),
        label="stride1-nobias",
    ),
    # H, W up to 16 more than the kernel: the padded grid within 1.6x the output (the shift path)
    OpCase(
        "conv2d",
        _conv_draw(_dense, stride=st.just(1), extra=16),
        conv2d_oracle,
        wrt=(0, 1, 2),
        label="stride1-shift",
    ),
    OpCase("conv2d", _conv_draw(_grouped), conv2d_oracle, wrt=(0, 1, 2), label="grouped"),
    OpCase("conv2d", _conv_draw(_depthwise), conv2d_oracle, wrt=(0, 1, 2), label="depthwise"),
    OpCase("conv2d", _conv_draw(_depthwise_wide), conv2d_oracle, wrt=(0, 1, 2), label="depthwise-wide"),
    OpCase("conv2d", _conv_draw(_depthwise, bias=False), conv2d_oracle, wrt=(0, 1), label="depthwise-nobias"),
    OpCase("conv2d", _conv_draw(_dense, kernel=st.just(1)), conv2d_oracle, wrt=(0, 1, 2), label="pointwise"),
    OpCase(
        "conv2d",
        _conv_draw(_stem_channels, kernel=st.just(7), stride=st.just(2), padding=st.just(3), bias=False),
        conv2d_oracle,
        wrt=(0, 1),
        label="stem7x7",
    ),
]
