"""Cases for the two kernels of synchronised batch norm (reference/ops/sync_norm.py).

``elemt`` normalises a shard ``x`` with the sums of a larger batch that contains
it (``x`` and another shard drawn alike), as it does when the sums come from an
all-reduce; the batch's channels have a known spread (see ``norm.py``), so the
variance (3) is far from zero and the finite differences are meaningful.
"""

import autograd.numpy as anp
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from
from tests.opcases.norm import _spread_channels


def _axes(ndim):
    return (0, *range(2, ndim))


def _shape(data, spatial: bool, low: int = 1):
    n = data.draw(st.integers(low, 4), label="N")
    c = data.draw(st.integers(1, 3), label="C")
    if not spatial:
        return (n, c)
    return (n, c, data.draw(st.integers(1, 3), label="H"), data.draw(st.integers(1, 3), label="W"))


def _draw_sums(spatial: bool):
    def draw(data):
        return (rng_from(data).standard_normal(_shape(data, spatial)) * 2.0 + 0.5,), {}

    return draw


def _sums_oracle(x):
    axes = _axes(x.ndim)
    return anp.stack([anp.sum(x, axis=axes), anp.sum(x * x, axis=axes)])


def _draw_elemt(spatial: bool):
    def draw(data):
        shape = _shape(data, spatial)
        other = (data.draw(st.integers(1, 3), label="N other"), *shape[1:])
        rng = rng_from(data)
        both = _spread_channels(rng, (shape[0] + other[0], *shape[1:]))  # every channel spread out
        x = both[: shape[0]]
        c = shape[1]
        gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
        beta = rng.standard_normal(c)
        sums = _sums_oracle(both)
        count = anp.array([float(both.size // c)])
        return (x, gamma, beta, sums, count), {"eps": 1e-5}

    return draw


def _elemt_oracle(x, gamma, beta, sums, count, eps=1e-5):
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)  # (C,) -> (1, C, 1, ..., 1)
    mu = sums[0] / count[0]
    var = sums[1] / count[0] - mu * mu
    xhat = (x - anp.reshape(mu, bshape)) / anp.sqrt(anp.reshape(var, bshape) + eps)
    return anp.reshape(gamma, bshape) * xhat + anp.reshape(beta, bshape)


CASES = [
    OpCase("sync_batch_norm_sums", _draw_sums(False), _sums_oracle, wrt=(0,), label="2d"),
    OpCase("sync_batch_norm_sums", _draw_sums(True), _sums_oracle, wrt=(0,), label="4d"),
    OpCase("sync_batch_norm_elemt", _draw_elemt(False), _elemt_oracle, wrt=(0, 1, 2, 3), label="2d"),
    OpCase("sync_batch_norm_elemt", _draw_elemt(True), _elemt_oracle, wrt=(0, 1, 2, 3), label="4d"),
]
