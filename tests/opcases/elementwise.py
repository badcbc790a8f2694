"""Cases for broadcasting arithmetic, ReLU and the reductions."""

import autograd.numpy as anp
import hypothesis.extra.numpy as hnp
from hypothesis import strategies as st

from tests.harness import OpCase, away_from_zero, rng_from

_pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4)


def _binary(nonzero_b: bool = False):
    def draw(data):
        (sa, sb), _ = data.draw(_pairs, label="shapes")
        rng = rng_from(data)
        a = rng.standard_normal(sa)
        b = away_from_zero(rng, sb, 0.5, 2.0) if nonzero_b else rng.standard_normal(sb)
        return (a, b), {}

    return draw


def _scalar_right(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), label="shape")
    return (rng_from(data).standard_normal(shape), 1.5), {}


def _unary_away_from_kink(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=5), label="shape")
    return (away_from_zero(rng_from(data), shape),), {}


def _reduction(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), label="shape")
    axis = data.draw(
        st.one_of(
            st.none(),
            st.integers(-len(shape), len(shape) - 1),
            st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple),
        ),
        label="axis",
    )
    keepdims = data.draw(st.booleans(), label="keepdims")
    return (rng_from(data).standard_normal(shape),), {"axis": axis, "keepdims": keepdims}


def _relu(x):
    return anp.where(x > 0, x, 0.0)


CASES = [
    OpCase("add", _binary(), lambda a, b: a + b, wrt=(0, 1)),
    OpCase("add", _scalar_right, lambda a, b: a + b, wrt=(0,), label="scalar"),
    OpCase("sub", _binary(), lambda a, b: a - b, wrt=(0, 1)),
    OpCase("mul", _binary(), lambda a, b: a * b, wrt=(0, 1)),
    OpCase("mul", _scalar_right, lambda a, b: a * b, wrt=(0,), label="scalar"),
    OpCase("div", _binary(nonzero_b=True), lambda a, b: a / b, wrt=(0, 1)),
    OpCase("relu", _unary_away_from_kink, _relu, wrt=(0,)),
    OpCase("sum", _reduction, lambda x, axis, keepdims: anp.sum(x, axis=axis, keepdims=keepdims), wrt=(0,)),
    OpCase("mean", _reduction, lambda x, axis, keepdims: anp.mean(x, axis=axis, keepdims=keepdims), wrt=(0,)),
]
