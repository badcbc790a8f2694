"""Cases for batch norm: training and evaluation mode, (N, C) and (N, C, H, W) input.

Training-mode inputs are built with a known per-channel spread (standardised
noise, then a random scale in [0.5, 2] and shift), so no channel is nearly
constant: a tiny variance would make the normalisation ill-conditioned and the
finite difference meaningless. Every draw has at least two entries per channel.
"""

import autograd.numpy as anp
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from


def _shape(data, spatial: bool) -> tuple[int, ...]:
    n = data.draw(st.integers(1, 4), label="N")
    c = data.draw(st.integers(1, 3), label="C")
    if not spatial:
        n = max(n, 2)  # N >= 2 entries per channel
        return (n, c)
    h = data.draw(st.integers(1, 3), label="H")
    w = data.draw(st.integers(2 if n * h < 2 else 1, 3), label="W")  # N*H*W >= 2
    return (n, c, h, w)


def _spread_channels(rng, shape):
    """Noise whose every channel has mean ~U(-1, 1) and std ~U(0.5, 2) exactly."""
    axes = (0, *range(2, len(shape)))
    z = rng.standard_normal(shape)
    z = (z - z.mean(axis=axes, keepdims=True)) / z.std(axis=axes, keepdims=True)
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)  # (C,) -> (1, C, 1, ..., 1)
    return z * rng.uniform(0.5, 2.0, bshape) + rng.uniform(-1.0, 1.0, bshape)


def _draw(training: bool, spatial: bool):
    def draw(data):
        shape = _shape(data, spatial)
        c = shape[1]
        rng = rng_from(data)
        x = _spread_channels(rng, shape) if training else rng.standard_normal(shape)
        gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
        beta = rng.standard_normal(c)
        running_mean = rng.standard_normal(c)
        running_var = rng.uniform(0.5, 2.0, c)
        return (x, gamma, beta, running_mean, running_var), {"training": training}

    return draw


def _batch_norm_oracle(x, gamma, beta, running_mean, running_var, training, eps=1e-5):
    axes = (0, *range(2, x.ndim))
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)  # (C,) -> (1, C, 1, ..., 1)
    if training:
        mu = anp.mean(x, axis=axes, keepdims=True)
        var = anp.mean((x - mu) ** 2, axis=axes, keepdims=True)  # biased
    else:
        mu = anp.reshape(running_mean, bshape)
        var = anp.reshape(running_var, bshape)
    xhat = (x - mu) / anp.sqrt(var + eps)
    return anp.reshape(gamma, bshape) * xhat + anp.reshape(beta, bshape)


CASES = [
    OpCase("batch_norm", _draw(True, False), _batch_norm_oracle, wrt=(0, 1, 2), label="train-2d"),
    OpCase("batch_norm", _draw(True, True), _batch_norm_oracle, wrt=(0, 1, 2), label="train-4d"),
    OpCase("batch_norm", _draw(False, False), _batch_norm_oracle, wrt=(0, 1, 2), label="eval-2d"),
    OpCase("batch_norm", _draw(False, True), _batch_norm_oracle, wrt=(0, 1, 2), label="eval-4d"),
]
