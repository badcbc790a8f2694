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
# # 1. Autodiff from scratch: the tape
#
# Training a network means following the gradient of a scalar loss with respect to every
# parameter. There can be millions of parameters but only one loss, so we want the whole gradient
# in one sweep backwards from the loss. That sweep is **reverse-mode automatic differentiation**.
# This tutorial takes the engine in `reference/autodiff.py` apart:
#
# 1. the tape: how calling ops records a graph, and how `backward()` walks it;
# 2. one op's backward derived by hand (multiplication with broadcasting), written naively and
#    checked three ways: against the library's kernel, against autograd's vector-Jacobian
#    product, and against a finite difference;
# 3. a nonlinear op, softmax cross-entropy, treated the same way;
# 4. why the checks use *random* cotangents and never all-ones;
# 5. how to choose the step of a finite difference;
# 6. the tape training a small network on real handwritten digits.

# %%
import autograd
import autograd.numpy as anp
import matplotlib.pyplot as plt
import numpy as np
from common import output_dir, pick, save_figure

import reference.ops as ops
from reference import functional as F
from reference.autodiff import Tensor
from reference.data import load_dataset
from reference.optim import SGD

OUT = output_dir("01_autodiff")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The tape
#
# Three ideas make the whole engine:
#
# - A `Tensor` wraps an array. A leaf created with `requires_grad=True` will receive a gradient
#   in `.grad`.
# - `apply(name, *inputs)` runs one op. Every op is a pair of stateless kernels,
#   `name_forward(*inputs) -> (y, cache)` and `name_backward(dy, cache) -> (dx0, dx1, ...)`.
#   If any input needs a gradient, the output remembers a `Node`: the backward kernel, its
#   cache and, for each input, the node that made it (or the leaf tensor itself). These nodes,
#   linked from the output back to the leaves, are the tape. The forward is told which inputs
#   need a gradient, so its cache holds only what those gradients read.
# - `Tensor.backward()` orders the nodes so that each comes after every node that uses its
#   output, then calls each backward kernel once, with the *sum* of the gradients flowing into
#   that output.
#
# Let us record a small computation, `loss = sum(relu(x * w + b)^2)`, and look at what was
# stored. `F.mul`, `F.add`, ... are one-line wrappers around `apply`; the operators `*` and `+`
# on a `Tensor` call them.

# %%
x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
w = Tensor(rng.standard_normal(4), requires_grad=True)
b = Tensor(np.array(0.1), requires_grad=True)

h = F.relu(x * w + b)
loss = F.sum(h * h)


def show_tape(t, depth=0):
    """Print the graph below ``t`` (a tensor or a node): each op's name and output shape, leaves marked."""
    node = t.node if isinstance(t, Tensor) else t
    if node is None:
        print("  " * depth + f"leaf {t.shape}")
        return
    print("  " * depth + f"{node.name} -> {node.shape}")
    for parent in node.inputs:
        if parent is not None:
            show_tape(parent, depth + 1)


show_tape(loss)

# %% [markdown]
# `h` feeds both inputs of the last `mul`, so it appears twice: on the way back, the two
# gradients arriving at `h` are added before `relu`'s backward runs. That sum is the multivariate
# chain rule, and it is all `backward()` does beyond calling kernels.
#
# Before trusting the engine, compare it with an independent one. The
# [autograd](https://github.com/HIPS/autograd) package differentiates plain NumPy code written
# with `autograd.numpy`. The same function, written once more in that dialect, is our *oracle*.

# %%
loss.backward()


def loss_oracle(x, w, b):
    return anp.sum(anp.maximum(x * w + b, 0.0) ** 2)


expected = autograd.grad(loss_oracle, argnum=(0, 1, 2))(x.data, w.data, b.data)
for name, tensor, g in zip("xwb", (x, w, b), expected):
    np.testing.assert_allclose(tensor.grad, g, rtol=1e-12)
    print(f"d loss / d {name}: shape {tensor.grad.shape}, matches autograd")

# %% [markdown]
# ## 2. One op by hand: multiplication with broadcasting
#
# Take `y = a * b` with NumPy broadcasting, say `a` of shape (3, 4) and `b` of shape (4,).
# Broadcasting repeats `b` along the rows, so
#
# $$y_{ij} = a_{ij}\, b_j .$$
#
# The backward kernel receives the **cotangent** $\bar y = \partial L / \partial y$ (same shape
# as `y`) and must return $\bar a$ and $\bar b$. By the chain rule, sum over every output that an
# input touched:
#
# $$\bar a_{ij} = \sum_{k,l} \bar y_{kl} \frac{\partial y_{kl}}{\partial a_{ij}} = \bar y_{ij}\, b_j,
# \qquad
# \bar b_j = \sum_{k,l} \bar y_{kl} \frac{\partial y_{kl}}{\partial b_j} = \sum_i \bar y_{ij}\, a_{ij}.$$
#
# The rule behind the second line holds for every broadcasting op: compute the gradient as if
# both inputs had the output's shape (`dy * a`), then **sum over every axis along which the input
# was repeated**. Those are the leading axes broadcasting added, and the axes where the input
# had length 1. This step is called `unbroadcast`:


# %%
def naive_unbroadcast(g, shape):
    """Sum g down to shape: over the leading axes broadcasting added, then where shape has a 1."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def naive_mul_backward(dy, a, b):
    return naive_unbroadcast(dy * b, a.shape), naive_unbroadcast(dy * a, b.shape)


# %% [markdown]
# The library's kernel pair is `reference.ops.mul_forward` / `mul_backward`. We compare on
# several shape pairs, including ones where *both* inputs are broadcast, with a random
# cotangent `dy`.

# %%
shape_pairs = [((3, 4), (4,)), ((3, 4), (3, 1)), ((2, 1, 4), (3, 1)), ((5,), ()), ((2, 3), (2, 3))]
for shape_a, shape_b in shape_pairs:
    a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
    y, cache = ops.mul_forward(a, b)
    dy = rng.standard_normal(y.shape)
    da, db = ops.mul_backward(dy, cache)
    da_naive, db_naive = naive_mul_backward(dy, a, b)
    np.testing.assert_allclose(da, da_naive, rtol=1e-13)
    np.testing.assert_allclose(db, db_naive, rtol=1e-13)
    print(f"{shape_a} * {shape_b} -> {y.shape}: da {da.shape}, db {db.shape} match the naive version")

# %% [markdown]
# Agreeing with our own derivation only shows that two pieces of code agree. The oracle is
# independent: `autograd.make_vjp(f)(a)` returns a function that maps a cotangent $\bar y$ to
# $\bar y^\top J$, the **vector-Jacobian product** that a backward kernel must compute.

# %%
a, b = rng.standard_normal((2, 1, 4)), rng.standard_normal((3, 1))
y, cache = ops.mul_forward(a, b)
dy = rng.standard_normal(y.shape)
da, db = ops.mul_backward(dy, cache)

vjp_a, _ = autograd.make_vjp(lambda a_: a_ * b)(a)
vjp_b, _ = autograd.make_vjp(lambda b_: a * b_)(b)
np.testing.assert_allclose(da, vjp_a(dy), rtol=1e-13)
np.testing.assert_allclose(db, vjp_b(dy), rtol=1e-13)
print("mul backward == autograd's VJP for a random cotangent")

# %% [markdown]
# The third check needs no oracle at all, only the forward kernel. Pick random directions `u`,
# `v` for the inputs and define the scalar function
#
# $$\varphi(t) = \langle \bar y,\; f(a + t u,\; b + t v) \rangle .$$
#
# Its derivative at 0 is $\langle \bar a, u\rangle + \langle \bar b, v\rangle$, exactly what the
# backward pass claims. A **central difference** $(\varphi(h) - \varphi(-h)) / 2h$ estimates it
# with an error of order $h^2$. One direction checks every entry of the gradient at once, in a
# random combination.


# %%
def directional_check(forward, backward, inputs, h=1e-6, seed=1):
    """Central finite difference of <dy, forward(inputs + t * directions)> against the backward pass."""
    r = np.random.default_rng(seed)
    y, cache = forward(*inputs)
    dy = r.standard_normal(np.shape(y))
    grads = backward(dy, cache)
    dirs = [r.standard_normal(np.shape(v)) for v in inputs]

    def phi(t):
        return float(np.sum(dy * forward(*(v + t * d for v, d in zip(inputs, dirs)))[0]))

    numeric = (phi(h) - phi(-h)) / (2 * h)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
    return numeric, analytic


numeric, analytic = directional_check(ops.mul_forward, ops.mul_backward, (a, b))
print(f"finite difference {numeric:.10f}, backward {analytic:.10f}")
np.testing.assert_allclose(numeric, analytic, rtol=1e-7)

# %% [markdown]
# ## 3. A nonlinear op: softmax cross-entropy
#
# For logits $z$ of shape (N, K) and integer labels $c_i$, with $p = \mathrm{softmax}(z)$ row by
# row and the one-hot target $t_{ik} = [k = c_i]$,
#
# $$L = -\frac1N \sum_i \log p_{i c_i}, \qquad \log p_{ik} = z_{ik} - \log \sum_m e^{z_{im}} .$$
#
# Differentiate one row: $\partial \log p_{ik} / \partial z_{ij} = [j = k] - p_{ij}$, so
#
# $$\frac{\partial L}{\partial z_{ij}} = -\frac1N\,([j = c_i] - p_{ij}) = \frac{p_{ij} - t_{ij}}{N}.$$
#
# The gradient is "prediction minus target": no exponentials are differentiated, and each row sums
# to zero. For the forward pass, subtract each row's maximum before `exp` (softmax does not
# change under a per-row shift, and no exponential can overflow). The library's kernel also
# handles label smoothing; we leave it at 0 here.


# %%
def naive_ce_forward(z, labels):
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(z)), labels].mean(), np.exp(logp)


def naive_ce_backward(dy, p, labels):
    t = np.eye(p.shape[1])[labels]
    return dy * (p - t) / len(p)


z = 3 * rng.standard_normal((6, 10))
labels = rng.integers(0, 10, size=6)
loss_lib, cache = ops.softmax_cross_entropy_forward(z, labels)
loss_naive, p = naive_ce_forward(z, labels)
np.testing.assert_allclose(loss_lib, loss_naive, rtol=1e-13)

dy = rng.standard_normal()  # the loss is a scalar, so its cotangent is one random number
dz_lib, _ = ops.softmax_cross_entropy_backward(dy, cache)
np.testing.assert_allclose(dz_lib, naive_ce_backward(dy, p, labels), rtol=1e-12)


def ce_oracle(z):
    logp = z - anp.log(anp.sum(anp.exp(z), axis=1, keepdims=True))
    return -anp.mean(logp[np.arange(len(z)), labels])


vjp, _ = autograd.make_vjp(ce_oracle)(z)
np.testing.assert_allclose(dz_lib, vjp(dy), rtol=1e-10)
numeric, analytic = directional_check(
    lambda z_: ops.softmax_cross_entropy_forward(z_, labels),
    lambda d, c: ops.softmax_cross_entropy_backward(d, c)[:1],
    (z,),
)
np.testing.assert_allclose(numeric, analytic, rtol=1e-7)
print(f"loss {float(loss_lib):.6f}; backward == naive == autograd VJP; finite difference agrees")

# %% [markdown]
# ## 4. Why random cotangents
#
# A tempting shortcut when testing a backward kernel is `y.sum().backward()`, which feeds the
# cotangent $\bar y = 1$ everywhere. For some ops this proves nothing.
#
# Batch norm in training mode normalises each channel with its own batch mean and variance,
# $\hat x_i = (x_i - \mu)\, s$ with $s = (\sigma^2 + \epsilon)^{-1/2}$, then
# $y_i = \gamma \hat x_i + \beta$. Because $\mu$ and $s$ depend on every $x_j$, its input
# gradient has two correction terms (derived in `reference/ops/norm.py`, equation (10)):
#
# $$\bar x_j = \frac{\gamma s}{n}\Big(n \bar y_j - \sum_i \bar y_i - \hat x_j \sum_i \bar y_i \hat x_i\Big).$$
#
# Feed $\bar y = 1$: the bracket becomes $n - n - \hat x_j \sum_i \hat x_i = 0$, since the
# normalised values sum to zero. The correct gradient is **exactly zero** for every input. Now
# suppose someone forgot that the variance depends on $x$ and wrote the bracket without its last
# term. That bug also gives zero for $\bar y = 1$, so a ones cotangent cannot tell the two
# apart. A random one can.

# %%
x_bn = rng.standard_normal((16, 3)) * 2 + 1
gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
_, bn_cache = ops.batch_norm_forward(x_bn, gamma, beta, None, None, training=True)


def buggy_bn_backward(dy, cache):
    """Wrong: treats the variance as a constant (drops the xhat * sum(dy * xhat) term)."""
    n = dy.shape[0]
    return cache.gamma * cache.inv_std / n * (n * dy - dy.sum(axis=0))


for label, dy in (("ones", np.ones_like(x_bn)), ("random", rng.standard_normal(x_bn.shape))):
    correct = ops.batch_norm_backward(dy, bn_cache)[0]
    wrong = buggy_bn_backward(dy, bn_cache)
    print(
        f"cotangent {label:6s}: |correct| max {np.abs(correct).max():.1e}, "
        f"|buggy - correct| max {np.abs(wrong - correct).max():.1e}"
    )
    if label == "ones":
        assert np.abs(wrong - correct).max() < 1e-12  # the bug is invisible
    else:
        assert np.abs(wrong - correct).max() > 1e-2  # and caught

# %% [markdown]
# This is why every op test in this project draws its cotangent from a normal distribution
# (`tests/harness.py`). A random cotangent weighs each output differently, so no systematic
# cancellation can hide a term.
#
# ## 5. Choosing the step of a finite difference
#
# A finite difference has two errors that pull in opposite directions:
#
# - **truncation**: the Taylor terms we ignore. For the one-sided difference
#   $(\varphi(h) - \varphi(0))/h$ it is about $h\,|\varphi''|/2$; for the central difference the
#   even terms cancel and it is about $h^2 |\varphi'''|/6$;
# - **rounding**: $\varphi$ is computed with a relative error $\varepsilon$ (about $10^{-16}$ in
#   float64, $10^{-7}$ in float32), and dividing by $h$ amplifies it to about
#   $\varepsilon |\varphi| / h$.
#
# Their sum is smallest near $h \approx \varepsilon^{1/2}$ (one-sided) or $\varepsilon^{1/3}$
# (central). On a log-log plot the error is a V: slope $-1$ on the left, where rounding
# dominates, and slope $+1$ or $+2$ on the right. We measure it on the softmax cross-entropy,
# with the backward pass as the exact answer.


# %%
def fd_errors(dtype, steps):
    r = np.random.default_rng(2)
    z0 = (3 * r.standard_normal((6, 10))).astype(dtype)
    u = r.standard_normal(z0.shape).astype(dtype)
    _, c = ops.softmax_cross_entropy_forward(z0, labels)
    exact = float(np.sum(ops.softmax_cross_entropy_backward(np.asarray(1.0, dtype), c)[0] * u))

    def phi(t):
        return float(ops.softmax_cross_entropy_forward(z0 + dtype(t) * u, labels)[0])

    one_sided = [abs((phi(h) - phi(0)) / h - exact) for h in steps]
    central = [abs((phi(h) - phi(-h)) / (2 * h) - exact) for h in steps]
    return np.maximum(one_sided, 1e-17), np.maximum(central, 1e-17)


steps = np.logspace(-13, 0, 53)
one64, cen64 = fd_errors(np.float64, steps)
one32, cen32 = fd_errors(np.float32, steps)
best = steps[np.argmin(cen64)]
print(
    f"float64: best central step {best:.1e} (eps^(1/3) = {np.finfo(np.float64).eps ** (1 / 3):.1e}),"
    f" error {cen64.min():.1e}"
)
print(f"float32: best central error {cen32.min():.1e}")
assert cen64.min() < 1e-8 and cen64.min() < one64.min()

fig, ax = plt.subplots(figsize=(6.4, 4.2))
ax.loglog(steps, one64, "o-", ms=3, label="one-sided, float64")
ax.loglog(steps, cen64, "s-", ms=3, label="central, float64")
ax.loglog(steps, cen32, "^-", ms=3, label="central, float32")
# reference lines through the float64 central curve: c / h at the small steps, c h^2 at h = 0.01
rounding = np.median(cen64[:12] * steps[:12])
truncation = cen64[np.searchsorted(steps, 1e-2)] / 1e-4
ax.loglog(steps, rounding / steps, "k:", lw=1, label="slope -1 (rounding)")
ax.loglog(steps, truncation * steps**2, "k--", lw=1, label="slope 2 (truncation, central)")
ax.set_ylim(1e-13, 10)
ax.set_xlabel("step h")
ax.set_ylabel("|finite difference - backward|")
ax.set_title("Finite-difference error against step size")
ax.legend(fontsize=8)
save_figure(fig, OUT / "fd_error_vs_h.png")

# %% [markdown]
# In float64 the central difference reaches about $10^{-11}$ near $h = 10^{-5}$, good enough
# to catch any real bug. The one-sided difference bottoms out three orders of magnitude higher.
# In float32 the central difference never gets much below $10^{-5}$. For $h$ under about
# $10^{-7}$ the step is lost in rounding altogether: $\varphi(h)$ and $\varphi(-h)$ are the same
# number, the "derivative" is 0 and the error is the size of the true derivative (the flat line
# at the top). This is why the test suite checks gradients in float64, even though training
# runs in float32.
#
# ## 6. The tape at work: a network on handwritten digits
#
# Everything above was one op at a time. A network is many ops on one tape. Here is a two-layer
# perceptron on the 8x8 scikit-learn digits (1,797 real images, loaded through the library's
# `load_dataset`), trained with the library's SGD. Before training, we check the gradient of
# every parameter of the *whole network* against autograd, in float64. A wrong kernel anywhere
# on the tape would show up here.

# %%
data = load_dataset("digits")
x_train = data.x_train.reshape(len(data.x_train), -1)  # (N, 1, 8, 8) -> (N, 64), float32
x_test = data.x_test.reshape(len(data.x_test), -1)
print(f"digits: {len(x_train)} train / {len(x_test)} test images")

init = np.random.default_rng(3)
shapes = {"w1": (32, 64), "b1": (32,), "w2": (10, 32), "b2": (10,)}
params = {
    k: Tensor(
        (init.standard_normal(s) * (np.sqrt(2 / s[1]) if len(s) == 2 else 0)).astype(np.float32),
        requires_grad=True,
    )
    for k, s in shapes.items()
}


def mlp_loss(p, xb, yb):
    hidden = F.relu(F.linear(xb, p["w1"], p["b1"]))
    return F.softmax_cross_entropy(F.linear(hidden, p["w2"], p["b2"]), yb)


def mlp_oracle(w1, b1, w2, b2, xb, yb):
    hidden = anp.maximum(xb @ w1.T + b1, 0.0)
    logits = hidden @ w2.T + b2
    logp = logits - anp.log(anp.sum(anp.exp(logits), axis=1, keepdims=True))
    return -anp.mean(logp[np.arange(len(yb)), yb])


xb, yb = x_train[:64].astype(np.float64), data.y_train[:64]
p64 = {k: Tensor(v.data.astype(np.float64), requires_grad=True) for k, v in params.items()}
mlp_loss(p64, xb, yb).backward()
oracle = autograd.grad(mlp_oracle, argnum=(0, 1, 2, 3))(*(v.data for v in p64.values()), xb, yb)
for v, g in zip(p64.values(), oracle):
    np.testing.assert_allclose(v.grad, g, rtol=1e-9, atol=1e-12)
print("every parameter gradient of the network == autograd")

# %% [markdown]
# Now train: sample a batch, run the forward pass (recording the tape), call `backward()`,
# let SGD update the parameters. Gradients accumulate across `backward()` calls, so they are
# reset before each one.

# %%
opt = SGD(list(params.values()), lr=0.1, momentum=0.9)
steps_total = pick(600, 150)
history = []
for _ in range(steps_total):
    idx = rng.integers(0, len(x_train), size=64)
    loss = mlp_loss(params, x_train[idx], data.y_train[idx])
    for v in params.values():
        v.grad = None
    loss.backward()
    opt.step()
    history.append(loss.item())

logits = F.linear(F.relu(F.linear(x_test, params["w1"], params["b1"])), params["w2"], params["b2"])
accuracy = float((logits.data.argmax(axis=1) == data.y_test).mean())
print(f"after {steps_total} steps: train loss {np.mean(history[-20:]):.3f}, test accuracy {accuracy:.2%}")
assert accuracy > 0.85

fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.plot(history, lw=0.8, alpha=0.5, label="batch loss")
window = 20
ax.plot(
    np.arange(window - 1, len(history)),
    np.convolve(history, np.ones(window) / window, "valid"),
    lw=2,
    label=f"mean of {window}",
)
ax.set_xlabel("SGD step")
ax.set_ylabel("cross-entropy")
ax.set_title(f"Two-layer perceptron on digits: test accuracy {accuracy:.1%}")
ax.legend()
save_figure(fig, OUT / "mlp_training_loss.png")

# %% [markdown]
# ## What to take away
#
# - The engine is small because each op knows its own backward. The tape only records which
#   backward to call and adds the gradients where paths meet.
# - For a broadcasting op, compute the gradient at the output's shape, then sum over the axes
#   the input was repeated along.
# - Check a backward kernel three ways: against a naive version, against an independent VJP
#   oracle, and against a central finite difference in float64. Always use a random cotangent.
#
# The next tutorial applies the same recipe to the op that dominates a CNN's running time, the
# convolution.
