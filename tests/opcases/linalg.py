"""Cases for matmul (2-D and batched with broadcasting) and linear (with and without bias)."""

import autograd.numpy as anp
import hypothesis.extra.numpy as hnp
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from

_side = st.integers(1, 4)


def _matmul_2d(data):
    m, k, n = (data.draw(_side, label=s) for s in "mkn")
    rng = rng_from(data)
    return (rng.standard_normal((m, k)), rng.standard_normal((k, n))), {}


def _matmul_batched(data):
    # Batch shapes that broadcast against each other (either may be empty or have 1s).
    (batch_a, batch_b), _ = data.draw(
        hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3), label="batch"
    )
    m, k, n = (data.draw(_side, label=s) for s in "mkn")
    rng = rng_from(data)
    return (rng.standard_normal((*batch_a, m, k)), rng.standard_normal((*batch_b, k, n))), {}


def _matmul_oracle(a, b):
    # y[..., i, j] = sum_l a[..., i, l] b[..., l, j], batch axes broadcast by the product.
    return anp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _linear(lead_dims: int, bias: bool):
    def draw(data):
        lead = tuple(data.draw(_side, label=f"lead{i}") for i in range(lead_dims))
        n_in, n_out = data.draw(_side, label="in"), data.draw(_side, label="out")
        rng = rng_from(data)
        x = rng.standard_normal((*lead, n_in))
        w = rng.standard_normal((n_out, n_in))
        b = rng.standard_normal(n_out) if bias else None
        return (x, w, b), {}

    return draw


def _linear_oracle(x, w, b):
    # y[..., o] = sum_i x[..., i] w[o, i] + b[o]
    y = anp.sum(x[..., None, :] * w, axis=-1)
    return y if b is None else y + b


CASES = [
    OpCase("matmul", _matmul_2d, _matmul_oracle, wrt=(0, 1), label="2d"),
    OpCase("matmul", _matmul_batched, _matmul_oracle, wrt=(0, 1), label="batched"),
    OpCase("linear", _linear(1, bias=True), _linear_oracle, wrt=(0, 1, 2), label="bias-2d"),
    OpCase("linear", _linear(1, bias=False), _linear_oracle, wrt=(0, 1), label="nobias-2d"),
    OpCase("linear", _linear(2, bias=True), _linear_oracle, wrt=(0, 1, 2), label="bias-3d"),
    OpCase("linear", _linear(2, bias=False), _linear_oracle, wrt=(0, 1), label="nobias-3d"),
]
