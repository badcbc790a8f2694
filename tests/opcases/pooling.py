"""Cases for max, average and global average pooling.

The oracles are equations (1), (4) and (6) of ``reference.ops.pooling`` read
literally: the max (or mean) over a stack of the padded input's strided slices,
one slice per window offset. Max-pool inputs are a shuffled set of distinct,
well separated values, so no window has a tie (the kink) and a finite
difference of size 1e-6 never changes which element is the maximum.
"""

import autograd.numpy as anp
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pad(x, ph, pw, value):
    """(N, C, H, W) -> (N, C, H + 2 ph, W + 2 pw) by concatenating a constant border."""
    n, c, h, w = x.shape
    if ph:
        rows = anp.full((n, c, ph, w), value)
        x = anp.concatenate([rows, x, rows], axis=2)
    if pw:
        cols = anp.full((n, c, h + 2 * ph, pw), value)
        x = anp.concatenate([cols, x, cols], axis=3)
    return x


def _window_slices(x, kernel_size, stride, padding, fill):
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    sh, sw = _pair(kernel_size if stride is None else stride)
    h, w = x.shape[2:]
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = _pad(x, ph, pw, fill)
    slices = [
        xp[:, :, p : p + sh * (ho - 1) + 1 : sh, q : q + sw * (wo - 1) + 1 : sw]
        for p in range(kh)
        for q in range(kw)
    ]
    return anp.stack(slices), kh * kw


def max_pool2d_oracle(x, kernel_size, stride=None, padding=0):
    slices, _ = _window_slices(x, kernel_size, stride, padding, -anp.inf)
    return anp.max(slices, axis=0)


def avg_pool2d_oracle(x, kernel_size, stride=None, padding=0):
    slices, count = _window_slices(x, kernel_size, stride, padding, 0.0)
    return anp.sum(slices, axis=0) / count


def _distinct(rng, shape):
    """Values spaced at least 0.08 apart, in a random order: no ties anywhere."""
    size = 1
    for n in shape:
        size *= n
    ranks = rng.permutation(size).reshape(shape)
    return (ranks - size / 2) * 0.1 + rng.uniform(-0.01, 0.01, size=shape)


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _pool_draw(values, kernel=st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))):
    def draw(data):
        kernel_size = data.draw(kernel, label="kernel")
        kh, kw = _pair(kernel_size)
        stride = data.draw(
            st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
            label="stride",
        )
        ph = data.draw(st.integers(0, kh // 2), label="pad H")
        pw = data.draw(st.integers(0, kw // 2), label="pad W")
        padding = ph if ph == pw and data.draw(st.booleans(), label="int padding") else (ph, pw)
        n = data.draw(st.integers(1, 2), label="N")
        c = data.draw(st.integers(1, 3), label="C")
        h = max(1, kh - 2 * ph) + data.draw(st.integers(0, 5), label="extra H")
        w = max(1, kw - 2 * pw) + data.draw(st.integers(0, 5), label="extra W")
        x = values(rng_from(data), (n, c, h, w))
        return (x,), {"kernel_size": kernel_size, "stride": stride, "padding": padding}

    return draw


def _global_draw(data):
    shape = tuple(data.draw(st.integers(1, 5), label=axis) for axis in "NCHW")
    return (rng_from(data).standard_normal(shape),), {}


CASES = [
    OpCase("max_pool2d", _pool_draw(_distinct), max_pool2d_oracle, wrt=(0,)),
    OpCase("max_pool2d", _pool_draw(_distinct, kernel=st.just(3)), max_pool2d_oracle, wrt=(0,), label="3x3"),
    OpCase("avg_pool2d", _pool_draw(_normal), avg_pool2d_oracle, wrt=(0,)),
    OpCase("global_avg_pool2d", _global_draw, lambda x: anp.mean(x, axis=(2, 3)), wrt=(0,)),
]
