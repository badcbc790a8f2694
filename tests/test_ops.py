"""Every op against its oracle, autograd's VJP and a finite difference."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.ops
from tests.harness import check_backward, check_finite_difference, check_forward, kernels
from tests.opcases import CASES

ids = [c.id for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
@given(data=st.data())
def test_forward_matches_oracle(case, data):
    check_forward(case, data)


@pytest.mark.parametrize("case", CASES, ids=ids)
@given(data=st.data())
def test_backward_matches_autograd_vjp(case, data):
    check_backward(case, data)


@pytest.mark.parametrize("case", CASES, ids=ids)
@given(data=st.data())
def test_backward_matches_finite_difference(case, data):
    check_finite_difference(case, data)


def test_every_op_has_a_case():
    missing = set(reference.ops.op_names()) - {c.name for c in CASES}
    assert not missing, f"ops without a test case: {sorted(missing)}"


# Cache fields that may hold a new array as large as an input: each one is what its backward reads and
# cannot rebuild without redoing the forward (batch norm's xhat, the loss's softmax, max pooling's
# argmax in the smallest integer type).
_FRESH_FIELDS = {
    "batch_norm": {"xhat"},
    "sync_batch_norm_elemt": {"xhat"},
    "softmax_cross_entropy": {"probs"},
    "max_pool2d": {"argmax"},
}


@pytest.mark.parametrize("case", CASES, ids=ids)
@given(data=st.data())
def test_cache_holds_only_what_the_backward_reads(case, data):
    """Every array in a cache is an input or the output (the object or a view of it), or small.

    "Small" is the size of the largest vector (0-d or 1-d) among the inputs and
    the output: a per-channel statistic or a threshold. A copy of anything
    larger (im2col columns, a padded or transposed input, a dense mask) fails.
    """
    import numpy as np

    from reference.caches import buffer_of

    args, static = case.draw(data)
    forward, _ = kernels(case.name)
    y, cache = forward(*args, **static)
    given_arrays = [a for a in (*args, y) if isinstance(a, np.ndarray)]
    owners = {id(buffer_of(a)) for a in given_arrays}
    small = max([a.size for a in given_arrays if a.ndim <= 1], default=1)
    for field, value in cache._asdict().items():
        if not isinstance(value, np.ndarray) or id(buffer_of(value)) in owners:
            continue
        if field in _FRESH_FIELDS.get(case.name, ()):
            continue
        assert value.size <= small, (
            f"{case.id}: cache field {field!r} is a new array of shape {value.shape}, "
            f"larger than the op's vectors ({small} entries)"
        )
