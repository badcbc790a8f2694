# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Convolution: im2col, GEMM and the backward pass
#
# Convolution is most of the work in a CNN: about three quarters of a ResNet-20 training step in
# this library. It is also the layer the sparsity methods prune. This tutorial builds it from
# the definition:
#
# 1. the definition, and **im2col**, which turns a convolution into one matrix product (GEMM);
# 2. the backward pass: the weight gradient is another GEMM, and the input gradient is a GEMM
#    followed by **col2im**, the adjoint of im2col;
# 3. for stride 1, the input gradient is itself a convolution, with the flipped kernel;
# 4. groups and depthwise convolution, and what they save in multiply-accumulates (MACs);
# 5. a real digit through two hand-made filters.
#
# Every step is checked against the library's kernels (`reference.ops.conv2d_forward` and
# `conv2d_backward`), against autograd, and against a finite difference.

# %%
import autograd
import autograd.numpy as anp
import matplotlib.pyplot as plt
import numpy as np
from common import output_dir, save_figure
from numpy.lib.stride_tricks import sliding_window_view

import reference.ops as ops
from reference.accounting import profile
from reference.data import load_dataset
from reference.models import build_model

OUT = output_dir("02_convolution")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The definition, and im2col
#
# Input `x` has shape (N, C, H, W) and weight `w` has shape (O, C, kh, kw). Let `xp` be `x`
# zero-padded by `p` on each side and `s` the stride. Output channel `o` at position `(i, j)` is
# the dot product of filter `o` with the window of `xp` starting at `(i s, j s)`:
#
# $$y_{n,o,i,j} = b_o + \sum_{c,\,u,\,v} w_{o,c,u,v}\; xp_{n,\,c,\; i s + u,\; j s + v},
# \qquad H_o = \left\lfloor \frac{H + 2p - k_h}{s} \right\rfloor + 1 .$$
#
# (Deep learning calls this convolution, but it is a cross-correlation: the kernel is not
# flipped. PyTorch does the same.)
#
# Seven nested loops would compute this, slowly. The trick that makes it fast is to notice
# that every output is the *same* dot product over a different window. So copy each window
# into one column of a matrix **X** with C kh kw rows and Ho Wo columns (**im2col**). Then
# the whole layer is one matrix product, **Y = W X**, where **W** is the weight reshaped to
# (O, C kh kw). Matrix products are what BLAS libraries do best.
#
# A naive im2col loops over the kh kw kernel offsets, not over the output positions. Offset
# `(u, v)` of every window is one strided slice of the padded input:


# %%
def im2col(x, kh, kw, stride=1, padding=0):
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo): one column per output position, rows (c, p, q)."""
    n, c, h, w = x.shape
    s, p = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            cols[:, :, u, v] = xp[:, :, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s]
    return cols.reshape(n, c * kh * kw, ho * wo)


def conv_gemm(x, w, b=None, stride=1, padding=0):
    """Convolution as im2col + one matrix product per sample: Y = W X (+ b)."""
    n, (o, _, kh, kw) = x.shape[0], w.shape
    ho = (x.shape[2] + 2 * padding - kh) // stride + 1
    wo = (x.shape[3] + 2 * padding - kw) // stride + 1
    y = w.reshape(o, -1) @ im2col(x, kh, kw, stride, padding)  # (O, CKK) @ (N, CKK, HoWo)
    y = y.reshape(n, o, ho, wo)
    return y if b is None else y + b.reshape(1, o, 1, 1)


# %% [markdown]
# NumPy can also produce every window as a *view*, without copying:
# `sliding_window_view(xp, (kh, kw), axis=(2, 3))` has shape (N, C, H', W', kh, kw). Taking
# every s-th window and moving the window axes in front gives the same matrix. Both ways must
# agree:

# %%
x = rng.standard_normal((2, 3, 7, 6))
xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
windows = sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2]  # (N, C, Ho, Wo, 3, 3)
cols_view = windows.transpose(0, 1, 4, 5, 2, 3).reshape(2, 3 * 9, -1)
np.testing.assert_array_equal(im2col(x, 3, 3, stride=2, padding=1), cols_view)
print("loop im2col == sliding_window_view im2col, shape", cols_view.shape[1:])

# %% [markdown]
# Here is im2col on a tiny single-channel 4x4 image with pixels numbered 1 to 16, a 3x3 kernel
# and padding 1. Each of the 16 columns is one flattened 3x3 window, and zeros (grey) come from
# the padding. Each interior pixel appears in up to 9 columns. That nine-fold copy is the memory
# price of im2col, and it is why the library's fast paths avoid building X in full.

# %%
tiny = np.arange(1, 17, dtype=float).reshape(1, 1, 4, 4)
tiny_cols = im2col(tiny, 3, 3, padding=1)[0]  # (9, 16)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 3.2]})
ax0.imshow(tiny[0, 0], cmap="viridis")
for (r, c), v in np.ndenumerate(tiny[0, 0]):
    ax0.text(c, r, int(v), ha="center", va="center", color="w")
ax0.set_title("input x (4x4), padding 1")
ax0.set_xticks([])
ax0.set_yticks([])
ax1.imshow(np.ma.masked_equal(tiny_cols, 0), cmap="viridis", vmin=1, vmax=16)
ax1.imshow(np.where(tiny_cols == 0, 0.0, np.nan), cmap="Greys", vmin=-1, vmax=1)
for (r, c), v in np.ndenumerate(tiny_cols):
    ax1.text(c, r, int(v), ha="center", va="center", color="w" if v else "k", fontsize=8)
ax1.set_title("im2col matrix X: rows = kernel offset (u, v), columns = output position (i, j)")
ax1.set_yticks(range(9), [f"({u},{v})" for u in range(3) for v in range(3)])
ax1.set_xticks(range(16), [f"{i},{j}" for i in range(4) for j in range(4)], fontsize=7)
save_figure(fig, OUT / "im2col_matrix.png")

# %% [markdown]
# Now the check against the library. Its `conv2d_forward` picks one of several internal paths
# from the shapes (a general im2col path, a "shift" path for stride-1 convs, a pointwise path
# for 1x1 convs). Our naive version must agree with every one of them.

# %%
geometries = [  # (C, O, k, stride, padding, H, W)
    (3, 4, 3, 1, 1, 8, 8),  # the ResNet 3x3 (shift path)
    (3, 4, 3, 2, 1, 9, 7),  # strided, odd sizes (general path)
    (2, 5, 1, 1, 0, 5, 5),  # 1x1 (pointwise path)
    (2, 3, 5, 1, 2, 6, 6),  # 5x5, padding 2
    (1, 2, 7, 2, 3, 12, 12),  # a 7x7 stride-2 stem
]
for c, o, k, s, p, h, w_ in geometries:
    x = rng.standard_normal((2, c, h, w_))
    w = rng.standard_normal((o, c, k, k))
    b = rng.standard_normal(o)
    y_lib, cache = ops.conv2d_forward(x, w, b, stride=s, padding=p)
    np.testing.assert_allclose(conv_gemm(x, w, b, s, p), y_lib, rtol=1e-12, atol=1e-12)
    print(f"k={k} stride={s} pad={p}: y {y_lib.shape} == library ({cache.path} path)")

# %% [markdown]
# ## 2. The backward pass: two GEMMs and col2im
#
# Per sample, the forward pass is **Y = W X + b**. With the cotangent **dY** (shape O x Ho Wo),
# the matrix-product rule gives
#
# $$dW = \sum_n dY_n X_n^\top, \qquad db_o = \sum_{n,i,j} dy_{n,o,i,j}, \qquad dX_n = W^\top dY_n .$$
#
# `dX` is the gradient with respect to the *columns*, not the image. Every entry of **X** is a
# copy of one pixel of `xp`, and a pixel that was copied into several columns influences the loss
# through each copy. So its gradient is the **sum** of the gradients of its copies. That
# scatter-add is **col2im**. It is the adjoint (transpose) of im2col, which is a linear map:
# $\langle \mathrm{im2col}(x), C\rangle = \langle x, \mathrm{col2im}(C)\rangle$ for every `x`
# and `C`. Its code is im2col's loop with `=` turned into `+=` and the two sides swapped. At the
# end we drop the padding border.


# %%
def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """(N, C*kh*kw, Ho*Wo) -> (N, C, H, W): scatter-add every column entry back to its pixel."""
    n, c, h, w = x_shape
    s, p = stride, padding
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    dxp = np.zeros((n, c, h + 2 * p, w + 2 * p))
    for u in range(kh):
        for v in range(kw):
            dxp[:, :, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s] += cols[:, :, u, v]
    return dxp[:, :, p : p + h, p : p + w]


def conv_gemm_backward(dy, x, w, stride=1, padding=0):
    n, (o, _, kh, kw) = x.shape[0], w.shape
    cols = im2col(x, kh, kw, stride, padding)  # X, (N, CKK, HoWo)
    dy_m = dy.reshape(n, o, -1)  # dY, (N, O, HoWo)
    dw = (dy_m @ cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)  # sum_n dY X^T
    dx = col2im(w.reshape(o, -1).T @ dy_m, x.shape, kh, kw, stride, padding)  # col2im(W^T dY)
    return dx, dw, dy.sum(axis=(0, 2, 3))


# im2col and col2im are adjoint: <im2col(x), C> == <x, col2im(C)>
x = rng.standard_normal((2, 3, 7, 6))
C = rng.standard_normal(im2col(x, 3, 3, 2, 1).shape)
lhs, rhs = np.sum(im2col(x, 3, 3, 2, 1) * C), np.sum(x * col2im(C, x.shape, 3, 3, 2, 1))
np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
print(f"<im2col(x), C> = {lhs:.6f} = <x, col2im(C)>")

# %% [markdown]
# Three checks for every geometry: the naive backward against the library's `conv2d_backward`;
# both against autograd's VJP of an oracle written straight from the definition (a sum over
# kernel offsets, sharing no code with im2col); and a central finite difference of the library's
# forward along a random direction. The cotangent is random, never all-ones (see tutorial 1).


# %%
def conv_oracle(x, w, b, stride=1, padding=0, groups=1):
    """The definition in autograd.numpy: a sum over kernel offsets of strided slices times weight taps."""
    o, cg, kh, kw = w.shape
    s, og = stride, o // groups
    xp = anp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), "constant")
    ho, wo = (xp.shape[2] - kh) // s + 1, (xp.shape[3] - kw) // s + 1
    outs = []
    for g in range(groups):
        xg, wg = xp[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og]
        y = 0.0
        for u in range(kh):
            for v in range(kw):
                x_uv = xg[:, :, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s]  # (N, Cg, Ho, Wo)
                y = y + anp.einsum("nchw,oc->nohw", x_uv, wg[:, :, u, v])
        outs.append(y)
    return anp.concatenate(outs, axis=1) + anp.reshape(b, (1, o, 1, 1))


def check_conv_backward(x, w, b, stride, padding, groups=1, naive=True):
    static = dict(stride=stride, padding=padding, groups=groups)
    y, cache = ops.conv2d_forward(x, w, b, **static)
    np.testing.assert_allclose(y, conv_oracle(x, w, b, **static), rtol=1e-11, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    grads = ops.conv2d_backward(dy, cache)
    if naive:
        for g_naive, g_lib in zip(conv_gemm_backward(dy, x, w, stride, padding), grads):
            np.testing.assert_allclose(g_naive, g_lib, rtol=1e-11, atol=1e-12)
    args = [x, w, b]
    for i in range(3):
        vjp, _ = autograd.make_vjp(conv_oracle, argnum=i)(x, w, b, **static)
        np.testing.assert_allclose(grads[i], vjp(dy), rtol=1e-10, atol=1e-11)
    # finite difference along a random direction (x, w, b move together)
    dirs = [rng.standard_normal(a.shape) for a in args]

    def phi(t):
        return np.sum(dy * ops.conv2d_forward(*(a + t * d for a, d in zip(args, dirs)), **static)[0])

    numeric = (phi(1e-6) - phi(-1e-6)) / 2e-6
    analytic = sum(np.sum(g * d) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(numeric, analytic, rtol=1e-7)
    return cache.path


for c, o, k, s, p, h, w_ in geometries:
    x, w, b = rng.standard_normal((2, c, h, w_)), rng.standard_normal((o, c, k, k)), rng.standard_normal(o)
    path = check_conv_backward(x, w, b, s, p)
    print(f"k={k} stride={s} pad={p} ({path}): dx, dw, db == naive == autograd; finite difference agrees")

# %% [markdown]
# ## 3. Stride 1: the input gradient is a convolution with the flipped kernel
#
# col2im writes a matrix kh kw times larger than the image, then scatters it. For stride 1
# there is a shortcut. With padding p, pixel `x[a, b]` contributes to output
# `y[a - u + p, b - v + p]` with weight `w[u, v]`. So
#
# $$dx_{c,a,b} = \sum_{o,u,v} w_{o,c,u,v}\; dy_{o,\,a - u + p,\; b - v + p} ,$$
#
# which is a correlation of `dy` (zero-padded by k - 1 - p) with the weight **flipped in space**
# and with its two channel axes **swapped** (input channels become output channels). In other
# words, the backward pass of a convolution is a convolution. We can prove it with the library's
# own forward kernel:

# %%
for k, p in ((3, 1), (3, 0), (5, 2)):
    x, w = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, k, k))
    y, cache = ops.conv2d_forward(x, w, None, stride=1, padding=p)
    dy = rng.standard_normal(y.shape)
    dx = ops.conv2d_backward(dy, cache)[0]
    w_flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, O, k, k)
    dx_as_conv, _ = ops.conv2d_forward(dy, w_flipped, None, stride=1, padding=k - 1 - p)
    np.testing.assert_allclose(dx_as_conv, dx, rtol=1e-12, atol=1e-12)
    print(f"k={k} pad={p}: dx == conv(dy, flipped and transposed w, padding {k - 1 - p})")

# %% [markdown]
# This is how the library computes `dx` for stride-1 convs: one more im2col and GEMM, writing
# `dx` directly, with no scatter. With stride 2 the outputs skip positions, and `dy` would have
# to be dilated with zeros first, so the library falls back to col2im there.
#
# ## 4. Groups and depthwise convolution
#
# With `groups = G`, the C input channels are split into G groups of C/G. Output channels are
# split the same way, and each group is an independent convolution. The weight therefore has
# shape (O, C/G, kh, kw), and the cost falls by a factor of G:
#
# $$\text{MACs} = O \cdot \frac{C}{G} \cdot k_h k_w \cdot H_o W_o .$$
#
# The extreme case is **depthwise**: G = C, so each channel gets its own kh x kw filter (or m
# filters with a *channel multiplier* m, O = C m) and channels never mix. MobileNet pairs a
# 3x3 depthwise conv, which mixes space, with a 1x1 "pointwise" conv, which mixes channels.
# Naively, a grouped conv is a loop over groups:


# %%
def conv_grouped(x, w, b, stride=1, padding=0, groups=1):
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    ys = [
        conv_gemm(x[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og], None, stride, padding)
        for g in range(groups)
    ]
    return np.concatenate(ys, axis=1) + b.reshape(1, -1, 1, 1)


cases = [  # (C, O, groups, k, stride, padding, H)
    (4, 6, 2, 3, 1, 1, 6),  # two groups
    (16, 16, 16, 3, 1, 1, 4),  # depthwise, many channels on a small image (channels-last path)
    (4, 4, 4, 3, 2, 1, 7),  # depthwise, stride 2
    (3, 6, 3, 3, 1, 1, 5),  # depthwise with channel multiplier 2
]
for c, o, g, k, s, p, h in cases:
    x, w, b = (
        rng.standard_normal((2, c, h, h)),
        rng.standard_normal((o, c // g, k, k)),
        rng.standard_normal(o),
    )
    y_lib, _ = ops.conv2d_forward(x, w, b, stride=s, padding=p, groups=g)
    np.testing.assert_allclose(conv_grouped(x, w, b, s, p, g), y_lib, rtol=1e-12, atol=1e-12)
    path = check_conv_backward(x, w, b, s, p, groups=g, naive=False)
    print(f"C={c} O={o} groups={g} stride={s}: forward == naive, backward == autograd ({path} path)")

# %% [markdown]
# How much does depthwise-separable save? Replace a dense 3x3 conv from C to O channels with a
# depthwise 3x3 plus a pointwise 1x1. The cost goes from $9 C O H W$ to $9 C H W + C O H W$,
# a ratio of $1/O + 1/9$: roughly 8 to 9 times fewer MACs once O is large. The library's
# accounting (`reference.accounting.profile`, the numbers `learnsparse info` prints) gives the
# real per-layer costs of MobileNetV1 at 224x224. We set each block next to the dense 3x3 conv
# it replaces.

# %%
mobilenet = build_model("mobilenet_v1", num_classes=1000)
rows = profile(mobilenet, (3, 224, 224))
blocks = []  # (name, depthwise MACs, pointwise MACs, dense 3x3 MACs)
for dw_row, pw_row in zip(rows, rows[1:]):
    if dw_row.kind == "dwconv":
        assert pw_row.kind == "conv" and pw_row.weight_shape[2:] == (1, 1)
        c_in, ho, wo = dw_row.weight_shape[0], *dw_row.output_shape[1:]
        c_out = pw_row.weight_shape[0]
        assert dw_row.dense_macs == c_in * 9 * ho * wo  # O * (C/G) * kh * kw * Ho * Wo with G = C
        blocks.append(
            (dw_row.name.rsplit(".", 1)[0], dw_row.dense_macs, pw_row.dense_macs, c_out * c_in * 9 * ho * wo)
        )
total_sep = sum(d + p for _, d, p, _ in blocks)
total_dense = sum(full for *_, full in blocks)
print(
    f"MobileNetV1 ({len(blocks)} separable blocks): {total_sep / 1e6:.1f} M MACs; "
    f"dense 3x3 convs instead: {total_dense / 1e6:.1f} M ({total_dense / total_sep:.1f}x)"
)
print(f"pointwise share of the separable blocks: {sum(p for _, _, p, _ in blocks) / total_sep:.1%}")
print(f"whole model: {sum(r.dense_macs for r in rows):,} MACs")

fig, ax = plt.subplots(figsize=(9, 3.8))
pos = np.arange(len(blocks))
for shift, values, label, color in (
    (-0.27, [full for *_, full in blocks], "dense 3x3 conv (C -> O)", "tab:gray"),
    (0.0, [d for _, d, _, _ in blocks], "depthwise 3x3", "tab:orange"),
    (0.27, [p for _, _, p, _ in blocks], "pointwise 1x1", "tab:blue"),
):
    ax.bar(pos + shift, values, 0.27, label=label, color=color)
ax.set_yscale("log")
ax.set_ylim(1e5, 2e9)
ax.set_xticks(pos, [f"{i + 1}" for i in pos])
ax.set_xlabel("MobileNetV1 separable block (224x224 input)")
ax.set_ylabel("MACs per image")
ax.set_title(
    f"Depthwise + pointwise: {total_sep / 1e6:.0f} M MACs; dense 3x3 convs: {total_dense / 1e6:.0f} M"
)
ax.legend(fontsize=8, ncol=3, loc="upper left")
save_figure(fig, OUT / "depthwise_vs_dense_macs.png")

# %% [markdown]
# Each dense bar is nine times its pointwise neighbour, and each depthwise bar is O/9 times
# lower still (7 times in the first block, 114 times in the last): the 1x1 convs carry about
# 97 % of the separable cost. That is why MobileNet's pointwise convs, not its depthwise ones,
# are where weight sparsity pays off.
#
# ## 5. A real digit through two filters
#
# Finally, the op on real data. A Sobel filter is a 3x3 kernel that responds to a brightness
# gradient in one direction. Stacking the horizontal and vertical Sobel kernels gives a weight of
# shape (2, 1, 3, 3): one input channel, two output channels. Applying it to a few of the
# scikit-learn digits (loaded through `load_dataset`) shows what the first layer of a trained
# network often learns by itself: edge detectors.

# %%
data = load_dataset("digits")
sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
edges = np.stack([sobel, sobel.T])[:, None]  # (2, 1, 3, 3): vertical edges, horizontal edges
# The digits are standardised, so their background is negative. Shift it to 0 to match the zero
# padding; otherwise the image border itself would show up as an edge.
images = np.ascontiguousarray(data.x_train[:4] - data.x_train.min())  # (4, 1, 8, 8), float32
responses, _ = ops.conv2d_forward(images, edges, None, stride=1, padding=1)
np.testing.assert_allclose(conv_gemm(images, edges, padding=1), responses, rtol=1e-5, atol=1e-5)

fig, axes = plt.subplots(3, 4, figsize=(7, 5.4))
for col in range(4):
    for row, (img, title) in enumerate(
        (
            (images[col, 0], "digit"),
            (responses[col, 0], "vertical edges"),
            (responses[col, 1], "horizontal edges"),
        )
    ):
        vmax = np.abs(img).max()
        axes[row, col].imshow(
            img, cmap="gray" if row == 0 else "RdBu_r", vmin=-vmax if row else None, vmax=vmax
        )
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        if col == 0:
            axes[row, col].set_ylabel(title)
    axes[0, col].set_title(f"label {data.y_train[col]}")
save_figure(fig, OUT / "digit_sobel_filters.png")

# %% [markdown]
# ## What to take away
#
# - im2col turns every window into a column, so a convolution is one GEMM, **Y = W X**.
# - Backward: **dW = dY X^T** and **dX = W^T dY**, then col2im, the scatter-add adjoint of
#   im2col. For stride 1, the input gradient is a convolution of `dy` with the flipped,
#   channel-transposed kernel.
# - Groups divide the cost by G. Depthwise-separable blocks are 8 to 9 times cheaper than dense
#   3x3 convs, and almost all of what remains is in the 1x1 convs.
#
# The next tutorial makes these convolutions sparse, with a threshold that is learned.
