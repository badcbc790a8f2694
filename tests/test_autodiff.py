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


# ------------------------------------------------------------- what the graph holds


def _step_graph(method_name: str):
    """A digits CNN with ``method_name`` installed, after forward and loss: (model, x, loss, nodes)."""
    from reference.autodiff import graph_nodes
    from reference.config import TrainConfig
    from reference.sparsity import StepContext, build_method
    from tests.common import digits_batch, digits_model

    model = digits_model()
    method = build_method(TrainConfig(method=method_name))
    method.attach(model)
    model.train()
    method.before_step(model, StepContext(0, 0, 1, 1, np.random.default_rng(0)))
    x, labels = digits_batch()
    loss = F.softmax_cross_entropy(model(Tensor(x)), labels)
    extra = method.regularization(model)
    full = loss if extra is None else loss + extra
    return model, x, full, graph_nodes(full)


@pytest.mark.parametrize("method_name", ["dense", "str", "ltp", "scp"])
def test_after_backward_no_cache_and_no_intermediate_array_is_alive(method_name):
    import weakref

    from reference.caches import buffer_of, cache_arrays

    model, x, loss, nodes = _step_graph(method_name)
    owned = {id(buffer_of(a)) for a in [x, *(p.data for p in model.parameters())]}
    intermediates = [
        weakref.ref(buffer_of(a))
        for node in nodes
        for a in cache_arrays(node.cache)
        if isinstance(a, np.ndarray) and id(buffer_of(a)) not in owned  # (NumPy scalars: no weakref)
    ]
    assert intermediates, "the graph should hold some activations before the backward"
    loss.backward()
    assert all(n.cache is None and n.backward is None and n.inputs == () for n in nodes)
    # nothing else (layers, tensors, the loss) keeps an activation alive: no collector run needed
    alive = [r() for r in intermediates if r() is not None]
    assert not alive, f"{len(alive)} intermediate arrays outlive the backward: {[a.shape for a in alive]}"


def test_a_node_holds_no_tensor_so_a_dropped_output_is_freed():
    """The tape links nodes, not tensors: an output nobody holds (and no cache needs) is freed."""
    import weakref

    x = leaf(np.arange(6.0) - 2.5)
    h = x + 1.0  # add caches no array; only the consumer's node links to add's node
    kept = weakref.ref(h.data)
    y = (h * 3.0).sum()  # mul by a scalar that needs no gradient keeps no array either
    del h
    assert kept() is None, "the intermediate output stayed alive through the graph"
    y.backward()
    np.testing.assert_array_equal(x.grad, np.full(6, 3.0))


def test_relu_output_and_the_next_conv_input_are_one_buffer():
    from reference.caches import cache_arrays, unique_bytes

    rng = np.random.default_rng(0)
    x = leaf(rng.standard_normal((2, 3, 6, 6)))
    w = leaf(rng.standard_normal((4, 3, 3, 3)))
    r = F.relu(x)
    y = F.conv2d(r, w, padding=1)
    relu_cache, conv_cache = r.node.cache, y.node.cache
    assert relu_cache.y is r.data and conv_cache.x is r.data  # the same object, not copies
    arrays = cache_arrays(relu_cache) + cache_arrays(conv_cache)
    assert unique_bytes(arrays) == r.data.nbytes + w.data.nbytes  # counted once


def test_unique_bytes_counts_each_buffer_once_through_views():
    from numpy.lib.stride_tricks import sliding_window_view

    from reference.caches import cache_arrays, unique_bytes

    a = np.zeros((8, 8), np.float32)
    b = np.ones(5, np.float64)
    views = [a, a.reshape(64), a[::2, 1:], a.T, sliding_window_view(a, (3, 3))]
    cache = (views, {"again": a}, (b, b[1:], None, 3.0, "text"))
    assert len(cache_arrays(cache)) == 8
    assert unique_bytes(cache_arrays(cache)) == a.nbytes + b.nbytes
    assert unique_bytes([a.copy(), a.copy()]) == 2 * a.nbytes  # equal values, two buffers


def test_an_input_that_needs_no_gradient_gets_none_and_weights_are_unchanged():
    """The stem conv: the image needs no gradient, so dx is skipped and w's is as before."""
    from reference.ops import conv2d_backward, conv2d_forward

    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, 3, 9, 9))
    w = leaf(rng.standard_normal((4, 3, 3, 3)))
    dy = rng.standard_normal((2, 4, 5, 5))
    y = F.conv2d(Tensor(image), w, stride=2, padding=1)
    node = y.node
    assert node.inputs[0] is None and node.inputs[1] is w
    assert node.cache.x is image and node.cache.w is None  # w is kept only for dx, which is not wanted
    assert conv2d_backward(dy, node.cache)[0] is None
    y.backward(dy)
    _, full = conv2d_forward(image, w.data, stride=2, padding=1)
    _, dw_full, _ = conv2d_backward(dy, full)
    np.testing.assert_array_equal(w.grad, dw_full)


def test_a_kernel_set_without_needs_input_grad_still_runs(monkeypatch):
    """The engine passes ``needs_input_grad`` only to a kernel set that declares it takes it."""
    import reference.ops as ops

    seen = {}
    real_forward = ops.mul_forward

    def forward(a, b, **static):
        seen.update(static)
        return real_forward(a, b, **static)

    monkeypatch.setattr(ops, "mul_forward", forward)
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    assert seen == {"needs_input_grad": (True, False)}
    seen.clear()
    monkeypatch.setattr(ops, "NEEDS_INPUT_GRAD", False)
    x.grad = None
    (x * 3.0).sum().backward()
    assert seen == {}
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])
