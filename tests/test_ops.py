"""Every op against its oracle, autograd's VJP and a finite difference."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.ops
from tests.harness import check_backward, check_finite_difference, check_forward
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
