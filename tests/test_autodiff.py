"""The tape: ordering, accumulation, no_grad, and the operator sugar."""

import numpy as np
import pytest

from reference import functional as F
from reference.autodiff import Tensor, is_grad_enabled, no_grad


def leaf(values):
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


def test_diamond_graph_sums_both_paths():
    x = leaf([1.0, -2.0, 3.0])
    y = (x * x + x).sum()  # dy/dx = 2x + 1
    y.backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 1)


def test_shared_intermediate_is_backpropagated_once_with_summed_gradient():
    a, b = leaf([2.0]), leaf([5.0])
    z = a * b
    y = (z + z * 3.0).sum()  # y = 4ab
    y.backward()
    np.testing.assert_array_equal(a.grad, [20.0])
    np.testing.assert_array_equal(b.grad, [8.0])


def test_gradients_accumulate_across_backward_calls():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0 + 2.0, 3.0 + 4.0])


def test_reflected_operators():
    x = leaf([2.0, 4.0])
    y = (1.0 - x) + 2.0 * x + 8.0 / x - (-x)
    y.sum().backward()  # d/dx = -1 + 2 - 8/x^2 + 1
    np.testing.assert_allclose(x.grad, 2.0 - 8.0 / x.data**2)


def test_numpy_array_on_the_left_defers_to_tensor():
    x = leaf([1.0, 2.0])
    y = np.array([3.0, 4.0]) * x
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_no_grad_records_nothing_and_restores_mode():
    x = leaf([1.0])
    with no_grad():
        assert not is_grad_enabled()
        y = x * 2.0
    assert is_grad_enabled()
    assert not y.requires_grad and y.node is None


def test_no_grad_restores_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError), no_grad():
        _ = 1 / 0
    assert is_grad_enabled()


def test_inputs_without_requires_grad_get_no_gradient():
    x, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_long_chain_does_not_recurse():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0])


def test_backward_needs_a_cotangent_for_non_scalars():
    x = leaf([1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        (x * 2.0).backward(np.ones(3))


def test_backward_on_a_constant_is_an_error():
    with pytest.raises(RuntimeError, match="does not require"):
        Tensor(np.ones(1)).backward()


def test_tensor_rejects_non_arrays():
    with pytest.raises(TypeError, match="list"):
        Tensor([1.0, 2.0])


def test_relu_kink_subgradient_is_zero():
    """Pinned convention: d relu / dx at x == 0 is 0 (as PyTorch)."""
    x = leaf([-1.0, 0.0, 1.0])
    F.relu(x).backward(np.array([5.0, 7.0, 11.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 11.0])


def test_reduction_keepdims_and_axis_round_trip():
    x = leaf(np.arange(24.0).reshape(2, 3, 4))
    y = F.mean(x, axis=(0, 2), keepdims=False)
    assert y.shape == (3,)
    y.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad[1, 2], np.full(4, 3.0 / 8))


def test_backward_frees_the_graph_unless_retained():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, 2 * (2 * x.data))
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    assert y.node.cache is None and y.node.inputs == ()
