"""Cases for reshape."""

import autograd.numpy as anp
import hypothesis.extra.numpy as hnp

from tests.harness import OpCase, rng_from


def _reshape(data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), label="shape")
    x = rng_from(data).standard_normal(shape)
    return (x,), {"shape": (shape[0], -1)}


CASES = [OpCase("reshape", _reshape, lambda x, shape: anp.reshape(x, shape), wrt=(0,))]
