"""Conv and pooling beyond the generic op table: the max-pool kink, -inf padding,
the depthwise, channels-last depthwise, shift and stride-1 shortcuts against the
general path, dtypes and argument errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.caches import Conv2dCache
from reference.contracts import conv2d_geometry
from reference.ops import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    conv2d_backward,
    conv2d_forward,
    global_avg_pool2d_backward,
    global_avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)
from reference.ops import conv as conv_ops
from tests.opcases.conv import conv2d_oracle

# ------------------------------------------------------------------ max-pool kink


def test_max_pool_tie_sends_the_whole_gradient_to_the_first_maximum():
    x = np.array(
        [
            [1.0, 3.0, 5.0, 5.0],
            [3.0, 2.0, 5.0, 5.0],
        ]
    ).reshape(1, 1, 2, 4)
    y, cache = max_pool2d_forward(x, kernel_size=2)
    np.testing.assert_array_equal(y, [[[[3.0, 5.0]]]])
    (dx,) = max_pool2d_backward(np.array([[[[10.0, 7.0]]]]), cache)
    # window 1 ties at (0, 1) and (1, 0); window 2 ties at all four: row-major first wins
    expected = np.array(
        [
            [0.0, 10.0, 7.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    ).reshape(1, 1, 2, 4)
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_overlapping_windows_add_their_gradients():
    x = np.array(
        [
            [0.0, 1.0, 0.0],
            [1.0, 9.0, 2.0],
            [0.0, 2.0, 0.0],
        ]
    ).reshape(1, 1, 3, 3)
    y, cache = max_pool2d_forward(x, kernel_size=2, stride=1)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), 9.0))
    dy = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    (dx,) = max_pool2d_backward(dy, cache)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 1, 1] = 10.0  # the centre is the maximum of all four windows
    np.testing.assert_array_equal(dx, expected)


def test_max_pool_padding_is_never_selected():
    rng = np.random.default_rng(0)
    x = -rng.uniform(1.0, 2.0, size=(2, 3, 5, 6))  # all negative: zero padding would win
    y, cache = max_pool2d_forward(x, kernel_size=3, stride=2, padding=1)
    assert (y < 0).all()
    assert np.isin(y, x).all()
    dy = rng.standard_normal(y.shape)
    (dx,) = max_pool2d_backward(dy, cache)
    np.testing.assert_allclose(dx.sum(), dy.sum())  # every share landed inside x


# ------------------------------------------------------ conv paths against each other


def _general(x, w, b, stride, padding, groups):
    """The im2col path forced, whatever the shape (the reference for the shortcuts)."""
    stride, padding, out_hw = conv2d_geometry(x, w, b, stride, padding, groups)
    y = conv_ops._forward_general(x, w, stride, padding, groups, out_hw)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    needs = (True, True, b is not None)
    return y, Conv2dCache("general", x, w, x.shape, w.shape, stride, padding, groups, needs)


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 2), ((2, 1), (0, 2), 3)])
def test_depthwise_path_equals_general_grouped_path(multiplier, stride, padding, kernel):
    rng = np.random.default_rng(multiplier)
    c = 4
    x = rng.standard_normal((2, c, 7, 6))
    w = rng.standard_normal((c * multiplier, 1, kernel, kernel))
    b = rng.standard_normal(c * multiplier)
    y, cache = conv2d_forward(x, w, b, stride=stride, padding=padding, groups=c)
    assert cache.path == "depthwise"
    y_ref, cache_ref = _general(x, w, b, stride, padding, c)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, g_ref in zip(conv2d_backward(dy, cache), conv2d_backward(dy, cache_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


def _assert_paths_agree(x, w, b, stride, padding, groups, path):
    """``conv2d_forward`` takes ``path`` here and agrees with the general path, forward and backward."""
    rng = np.random.default_rng(7)
    y, cache = conv2d_forward(x, w, b, stride=stride, padding=padding, groups=groups)
    assert cache.path == path
    y_ref, cache_ref = _general(x, w, b, stride, padding, groups)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, g_ref in zip(conv2d_backward(dy, cache), conv2d_backward(dy, cache_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding, kernel", [(1, (3, 3)), (0, (3, 3)), ((2, 0), (3, 2)), (2, (5, 5))])
def test_shift_path_equals_general_path(padding, kernel):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 20, 19))
    w = rng.standard_normal((4, 3, *kernel))
    _assert_paths_agree(x, w, rng.standard_normal(4), 1, padding, 1, "shift")


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), ((2, 1), (0, 2))])
def test_channels_last_depthwise_path_equals_general_path(multiplier, stride, padding):
    rng = np.random.default_rng(multiplier)
    c = 16
    x = rng.standard_normal((2, c, 5, 2))
    w = rng.standard_normal((c * multiplier, 1, 3, 3))
    _assert_paths_agree(x, w, rng.standard_normal(c * multiplier), stride, padding, c, "depthwise-cl")


@st.composite
def _shift_geometries(draw):
    """A stride-1 conv the shift path takes: any kernel but 1x1, any padding up to kh - 1, kw - 1."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if kh == kw == 1:
        kw = 2
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    h = draw(st.integers(max(1, kh - 2 * ph), 7))
    wd = draw(st.integers(max(1, kw - 2 * pw), 7))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, h, wd), (o, c, kh, kw), (ph, pw), draw(st.sampled_from([5, 64]))


@given(_shift_geometries(), st.integers(0, 2**32 - 1))
def test_shift_path_equals_general_path_on_any_geometry(geometry, seed):
    """The shared-border grid against the general path: every kernel, padding and image size,
    with GEMM blocks small enough that a block boundary falls inside an image, a row and a window."""
    x_shape, w_shape, padding, chunk = geometry
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_ops, "_CHUNK_COLUMNS", chunk)
        _assert_paths_agree(x, w, rng.standard_normal(w_shape[0]), 1, padding, 1, "shift")


@st.composite
def _depthwise_geometries(draw):
    """A depthwise conv: any kernel, stride 1 or 2, padding up to the kernel and one past it,
    channel multiplier 1 or 2, and enough channels for either depthwise path."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    stride = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(max(1, kh - 2 * ph), 7))
    wd = draw(st.integers(max(1, kw - 2 * pw), 7))
    c = draw(st.sampled_from([2, 3, 32]))  # 32 >= 4 Wo: the channels-last path
    multiplier = draw(st.integers(1, 2))
    return (draw(st.integers(1, 3)), c, h, wd), (c * multiplier, 1, kh, kw), stride, (ph, pw)


@given(_depthwise_geometries(), st.integers(0, 2**32 - 1))
def test_depthwise_paths_equal_the_general_path_on_any_geometry(geometry, seed):
    """Both depthwise paths against the general grouped path; stride 1, m = 1 and padding within the
    kernel take dx by (6) through the path's own forward, every other geometry the scatter of (8)."""
    x_shape, w_shape, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    c, (kh, kw) = x_shape[1], w_shape[2:]
    wo = (x_shape[3] + 2 * padding[1] - kw) // stride + 1
    path = "depthwise-cl" if c >= 4 * wo else "depthwise"
    routes = []
    by_forward = conv_ops._dx_depthwise_by_correlation
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            conv_ops, "_dx_depthwise_by_correlation", lambda *a: routes.append(by_forward(*a)) or routes[-1]
        )
        _assert_paths_agree(x, w, rng.standard_normal(w_shape[0]), stride, padding, c, path)
    takes_6 = stride == 1 and w_shape[0] == c and padding[0] <= kh - 1 and padding[1] <= kw - 1
    assert routes and all((dx is not None) == takes_6 for dx in routes)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tiny_grids_take_the_shift_path(size):
    # an output grid of 1x1 .. 3x3 padded by one: most of the shared grid holds no output
    rng = np.random.default_rng(size)
    x = rng.standard_normal((3, 4, size, size))
    _assert_paths_agree(x, rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5), 1, 1, 1, "shift")


@pytest.mark.parametrize("padding", [3, (0, 3)])
def test_padding_past_the_kernel_keeps_the_general_path(padding):
    # a border wider than kh - 1 puts output rows (or columns) outside the image's rows of the shared grid
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 6))
    _assert_paths_agree(
        x, rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), 1, padding, 1, "general"
    )


@pytest.mark.parametrize("padding", [0, 1, 2, (2, 0)])
@pytest.mark.parametrize("groups", [1, 2])
def test_stride1_transposed_dx_equals_col2im(padding, groups):
    rng = np.random.default_rng(groups)
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((6, 4 // groups, 3, 3))
    y, cache = _general(x, w, None, 1, padding, groups)
    dy = rng.standard_normal(y.shape)
    # (N, O, Ho, Wo) -> (N, G, Og, Ho*Wo)
    dy_g = dy.reshape(2, groups, 6 // groups, -1)
    dx_col2im = conv_ops._dx_col2im(dy_g, w, cache, y.shape[2:])
    dx, _, _ = conv2d_backward(dy, cache)
    np.testing.assert_allclose(dx, dx_col2im, rtol=1e-12, atol=1e-12)


def test_pointwise_path_with_stride_and_padding_equals_oracle():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 4))
    w = rng.standard_normal((4, 3, 1, 1))
    y, cache = conv2d_forward(x, w, stride=2, padding=1)
    assert cache.path == "pointwise"
    np.testing.assert_allclose(y, conv2d_oracle(x, w, stride=2, padding=1), rtol=1e-12)


def test_no_bias_gives_no_bias_gradient():
    x = np.ones((1, 2, 3, 3))
    y, cache = conv2d_forward(x, np.ones((2, 2, 3, 3)))
    assert conv2d_backward(np.ones_like(y), cache)[2] is None


# ------------------------------------------------------------------------ dtypes

_CONVS = {
    "general-stride1": ((2, 4, 6, 6), (5, 4, 3, 3), dict(stride=1, padding=1)),
    "general-stride2": ((2, 4, 6, 6), (5, 4, 3, 3), dict(stride=2, padding=1)),
    "grouped": ((2, 4, 6, 6), (6, 2, 3, 3), dict(padding=1, groups=2)),
    "depthwise": ((2, 4, 6, 6), (8, 1, 3, 3), dict(padding=1, groups=4)),
    "depthwise-cl": ((2, 16, 4, 4), (16, 1, 3, 3), dict(padding=1, groups=16)),
    "shift": ((2, 4, 12, 12), (5, 4, 3, 3), dict(stride=1, padding=1)),
    "pointwise": ((2, 4, 6, 6), (5, 4, 1, 1), dict(stride=2)),
}


@pytest.mark.parametrize("name", sorted(_CONVS))
def test_conv_keeps_float32(name):
    x_shape, w_shape, static = _CONVS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    y, cache = conv2d_forward(x, w, b, **static)
    assert y.dtype == np.float32
    grads = conv2d_backward(rng.standard_normal(y.shape).astype(np.float32), cache)
    assert [g.dtype for g in grads] == [np.float32] * 3
    y64, _ = conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **static)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "forward, backward, static",
    [
        (max_pool2d_forward, max_pool2d_backward, dict(kernel_size=3, stride=2, padding=1)),
        (avg_pool2d_forward, avg_pool2d_backward, dict(kernel_size=3, stride=2, padding=1)),
        (global_avg_pool2d_forward, global_avg_pool2d_backward, {}),
    ],
)
def test_pooling_keeps_float32(forward, backward, static):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
    y, cache = forward(x, **static)
    assert y.dtype == np.float32
    (dx,) = backward(np.ones_like(y), cache)
    assert dx.dtype == np.float32 and dx.shape == x.shape


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "x_shape, w_shape, groups, message",
    [
        ((1, 4, 5, 5), (6, 3, 3, 3), 1, "w.shape\\[1\\] == 4 / 1"),
        ((1, 4, 5, 5), (6, 4, 3, 3), 2, "groups=2"),
        ((1, 4, 5, 5), (5, 2, 3, 3), 2, "divisible by groups"),
        ((4, 5, 5), (6, 4, 3, 3), 1, "x \\(N, C, H, W\\)"),
        ((1, 4, 2, 2), (6, 4, 3, 3), 1, "output would be empty"),
    ],
)
def test_conv_rejects_mismatched_shapes(x_shape, w_shape, groups, message):
    with pytest.raises(ValueError, match=message):
        conv2d_forward(np.zeros(x_shape), np.zeros(w_shape), groups=groups)


def test_conv_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        conv2d_forward(np.zeros((1, 2, 3, 3), np.float32), np.zeros((2, 2, 3, 3)))


def test_pooling_rejects_padding_over_half_the_window():
    with pytest.raises(ValueError, match="at most half"):
        max_pool2d_forward(np.zeros((1, 1, 4, 4)), kernel_size=2, padding=2)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "static", "path"),
    [
        ((2, 3, 9, 9), (4, 3, 3, 3), {"stride": 2, "padding": 1}, "general"),
        ((2, 3, 12, 12), (4, 3, 3, 3), {"padding": 1}, "shift"),
        ((2, 3, 5, 5), (4, 3, 1, 1), {"stride": 2}, "pointwise"),
        ((2, 4, 6, 6), (4, 1, 3, 3), {"padding": 1, "groups": 4}, "depthwise"),
        ((2, 16, 4, 2), (16, 1, 3, 3), {"padding": 1, "groups": 16}, "depthwise-cl"),
    ],
)
def test_every_conv_path_caches_its_input_and_weight_themselves(x_shape, w_shape, static, path):
    """No im2col columns, padded or re-laid-out copies: the backward rebuilds them from x."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y, cache = conv2d_forward(x, w, **static)
    assert cache.path == path
    assert cache.x is x and cache.w is w
    y_x, cache_x = conv2d_forward(x, w, **static, needs_input_grad=(True, False, False))
    assert cache_x.x is None and cache_x.w is w  # dx reads w only
    y_w, cache_w = conv2d_forward(x, w, **static, needs_input_grad=(False, True, False))
    assert cache_w.x is x and cache_w.w is None  # dw reads x only
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = conv2d_backward(dy, cache)
    only_dx, only_dw = conv2d_backward(dy, cache_x), conv2d_backward(dy, cache_w)
    assert only_dx[1] is None and only_dw[0] is None
    np.testing.assert_array_equal(only_dx[0], dx)
    np.testing.assert_array_equal(only_dw[1], dw)
