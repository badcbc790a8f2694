"""Cases for softmax cross-entropy, with and without label smoothing.

The labels are an integer input with no gradient, so only the logits (input 0)
are checked.
"""

import autograd.numpy as anp
import numpy as np
from hypothesis import strategies as st

from tests.harness import OpCase, rng_from


def _draw(smoothing: bool):
    def draw(data):
        n = data.draw(st.integers(1, 5), label="N")
        k = data.draw(st.integers(2, 6), label="K")
        e = data.draw(st.floats(0.05, 0.5), label="label_smoothing") if smoothing else 0.0
        rng = rng_from(data)
        logits = 2.0 * rng.standard_normal((n, k))
        labels = rng.integers(0, k, size=n)
        return (logits, labels), {"label_smoothing": e}

    return draw


def _cross_entropy_oracle(logits, labels, label_smoothing=0.0):
    n, k = logits.shape
    # log softmax straight from the definition (the drawn logits are small).
    logp = logits - anp.log(anp.sum(anp.exp(logits), axis=1, keepdims=True))
    onehot = (labels[:, None] == np.arange(k)[None, :]).astype(float)  # (N,) -> (N, K)
    target = (1.0 - label_smoothing) * onehot + label_smoothing / k
    return -anp.sum(target * logp) / n


CASES = [
    OpCase("softmax_cross_entropy", _draw(False), _cross_entropy_oracle, wrt=(0,), label="plain"),
    OpCase("softmax_cross_entropy", _draw(True), _cross_entropy_oracle, wrt=(0,), label="smoothed"),
]
