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
# # 5. SCP: soft channel pruning through batch norm
#
# Weight pruning leaves zeros scattered through a dense tensor, and dense hardware still
# multiplies them (tutorial 6 measures this). Removing whole **channels** is different: a conv
# with fewer output channels is just a smaller dense conv, and it is faster everywhere.
#
# Operation-aware soft channel pruning (SCP) decides which channels to remove from parameters the
# network already has: the scale $\gamma$ and shift $\beta$ of the batch norm that precedes each
# ReLU. It adds no new parameters. This tutorial covers:
#
# 1. the probability that BN + ReLU switches a channel off, checked by sampling;
# 2. the logistic relaxation that turns the keep/prune decision into something differentiable;
# 3. its gradients, checked against the library, autograd and a finite difference;
# 4. SCP training a CNN on real digits;
# 5. removing the switched-off channels for real, and checking that the smaller network computes
#    the same outputs with fewer multiply-accumulates (MACs).

# %%
import copy
import json
import shutil

import autograd
import autograd.numpy as anp
import matplotlib.pyplot as plt
import numpy as np
from autograd.scipy.stats import norm
from common import SMALL, output_dir, pick, save_figure
from scipy.special import erf, ndtri

import reference.ops as ops
from reference import functional as F
from reference.accounting import profile, totals
from reference.autodiff import Tensor, no_grad
from reference.config import TrainConfig
from reference.finalize import finalize
from reference.sparsity.channel_pruning import masked_batch_norms
from reference.train import build_data, evaluate, train

OUT = output_dir("05_scp")
rng = np.random.default_rng(0)
print("small run" if SMALL else "full run", "; figures go to", OUT)

# SCP's settings, as in the paper's CIFAR-10 code (and the library's defaults)
EPS, K, C0, T_RELAX = 0.05, 20.0, 0.95, 0.5
SETTINGS = dict(k=K, c0=C0, t=T_RELAX, eps=EPS)

# %% [markdown]
# ## 1. When does BN + ReLU switch a channel off?
#
# Batch norm standardises each channel of its input to $\hat x$ (zero mean, unit variance over
# the batch), then applies its own affine map, and a ReLU follows:
#
# $$y_c = \operatorname{ReLU}(\gamma_c\, \hat x_c + \beta_c).$$
#
# Assume $\hat x_c$ is roughly standard normal. Then $\gamma_c \hat x_c + \beta_c \sim
# \mathcal N(\beta_c, \gamma_c^2)$, and the probability that the channel's output is (almost) off,
# below a small level $\epsilon$, is
#
# $$P_c = \Pr\left[\gamma_c \hat x_c + \beta_c \le \epsilon\right]
#       = \Phi\!\left(\frac{\epsilon - \beta_c}{|\gamma_c|}\right),$$
#
# with $\Phi$ the standard normal CDF. (The library adds $10^{-8}$ to $|\gamma_c|$ so that
# $\gamma_c = 0$ is safe.) A channel with a very negative $\beta$, or a tiny $|\gamma|$ and
# $\beta \le \epsilon$, is off for nearly every input. It carries no information and can go.
# A few lines of NumPy, against the value the library's kernel computes:


# %%
def naive_off_probability(gamma, beta, eps=EPS):
    u = (eps - beta) / (np.abs(gamma) + 1e-8)
    return 0.5 * (1.0 + erf(u / np.sqrt(2.0)))


gamma = np.array([1.0, 0.5, -0.8, 0.2, 1.5, 0.05, 0.3, -1.2])
beta = np.array([0.0, 0.3, -0.2, -0.1, -2.0, 0.02, -0.5, 1.0])
_, cache = ops.scp_channel_mask_forward(gamma, beta, None, **SETTINGS, training=False)
P = naive_off_probability(gamma, beta)
np.testing.assert_allclose(cache.prob, P, rtol=1e-12)
print("P =", np.round(P, 3))

# %% [markdown]
# Now check the formula itself by sampling. We feed Gaussian inputs with an arbitrary mean and
# scale through the library's batch norm in training mode and a ReLU, and count how often each
# channel's output is at most $\epsilon$. With 65,536 samples per channel, the binomial standard
# error is at most 0.002.

# %%
n_batch, C = 4096, len(gamma)
x = rng.normal(loc=3.0, scale=2.0, size=(n_batch, C, 4, 4))  # BN standardises any mean and scale
with no_grad():
    bn_out = F.batch_norm(Tensor(x), Tensor(gamma), Tensor(beta), np.zeros(C), np.ones(C), training=True)
    y = F.relu(bn_out).numpy()
measured = (y <= EPS).mean(axis=(0, 2, 3))
n_samples = n_batch * 16
stderr = np.sqrt(P * (1 - P) / n_samples)
for p_c, m_c in zip(P, measured):
    print(f"predicted {p_c:.4f}   measured {m_c:.4f}")
assert np.all(np.abs(measured - P) <= 5 * stderr + 1e-4)

# %% [markdown]
# The prediction is exact here because the inputs *are* Gaussian. Real pre-activations are not
# (they come from a conv of ReLU outputs), so in section 4 we repeat the check on a trained
# network's own activations.
#
# ## 2. A differentiable keep/prune decision
#
# SCP prunes channel $c$ when $P_c$ exceeds a level $c_0$ (0.95: off for 95 % of inputs). A hard
# test $[P_c \le c_0]$ has no gradient, so training uses a random, relaxed decision. Draw
# logistic noise $L_c = \log U - \log(1 - U)$, $U \sim \text{Uniform}(0, 1)$, once per step, and
# use the mask
#
# $$m_c = \sigma\!\left(\frac{k\,(c_0 - P_c) + L_c}{t}\right) \quad\text{(training)}, \qquad
#   m_c = [P_c \le c_0] \quad\text{(evaluation)}.$$
#
# The mask multiplies the channel after the ReLU: $\text{out} = \operatorname{ReLU}(\text{BN}(x))
# \cdot m_c$. Why this form? Since $L$ is logistic, $\Pr[L > -a] = \sigma(a)$, so
#
# $$\Pr[m_c > 1/2] = \Pr\left[L_c > -k\,(c_0 - P_c)\right] = \sigma\!\left(k\,(c_0 - P_c)\right).$$
#
# The sample keeps the channel with probability $\sigma(k(c_0 - P_c))$: a coin flip at
# $P_c = c_0$, a near-certain keep well below it. This is the two-class Gumbel-softmax trick
# written as one logistic draw. $k$ sets how sharply that probability changes with $P$, and the
# temperature $t$ how close each sample lies to 0 or 1.


# %%
def naive_scp_mask(gamma, beta, noise, training=True, k=K, c0=C0, t=T_RELAX, eps=EPS):
    P = naive_off_probability(gamma, beta, eps)
    if not training:
        return (P <= c0).astype(float)
    return 1.0 / (1.0 + np.exp(-(k * (c0 - P) + noise) / t))


noise = rng.logistic(size=C)
m_lib, _ = ops.scp_channel_mask_forward(gamma, beta, noise, **SETTINGS, training=True)
np.testing.assert_allclose(m_lib, naive_scp_mask(gamma, beta, noise), rtol=1e-12)
m_eval, _ = ops.scp_channel_mask_forward(gamma, beta, None, **SETTINGS, training=False)
np.testing.assert_array_equal(m_eval, naive_scp_mask(gamma, beta, None, training=False))
print("naive mask == ops.scp_channel_mask_forward, in training and in evaluation:", m_eval)

# %% [markdown]
# Check the keep probability by Monte Carlo: channels with $P$ from 0.75 to 1 (we solve for the
# $\beta$ that gives each $P$ at $\gamma = 1$), 20,000 noise draws each, all through the library's
# kernel in a single call.

# %%
P_grid = np.linspace(0.75, 0.999, 24)
beta_grid = EPS - ndtri(P_grid)  # gamma = 1: P = Phi(eps - beta), so beta = eps - Phi^-1(P)
gamma_grid = np.ones_like(P_grid)
draws = 20_000
tiled_noise = rng.logistic(size=(draws, len(P_grid)))
m_samples, _ = ops.scp_channel_mask_forward(
    np.tile(gamma_grid, draws), np.tile(beta_grid, draws), tiled_noise.ravel(), **SETTINGS, training=True
)
m_samples = m_samples.reshape(draws, len(P_grid))
keep_rate = (m_samples > 0.5).mean(axis=0)
keep_theory = 1.0 / (1.0 + np.exp(-K * (C0 - P_grid)))
keep_err = np.sqrt(keep_theory * (1 - keep_theory) / draws)
assert np.all(np.abs(keep_rate - keep_theory) <= 5 * keep_err + 1e-3)
print("Monte Carlo keep rate matches sigmoid(k (c0 - P)) at every P")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.9))
b = np.linspace(-2.0, 1.0, 300)
for g in (0.1, 0.5, 1.0, 2.0):
    ax1.plot(b, naive_off_probability(g, b), label=f"$|\\gamma|$ = {g:g}")
ax1.axhline(C0, color="k", ls=":", lw=1, label=f"$c_0$ = {C0:g}")
ax1.set_xlabel("BN shift $\\beta$")
ax1.set_ylabel("P(channel off)")
ax1.set_title("$P = \\Phi((\\epsilon - \\beta) / |\\gamma|)$")
ax1.legend(fontsize=8)
P_fine = np.linspace(0.75, 1.0, 300)
ax2.plot(P_fine, 1.0 / (1.0 + np.exp(-K * (C0 - P_fine))), label="$\\sigma(k (c_0 - P))$")
ax2.plot(P_grid, keep_rate, "o", ms=4, label=f"Monte Carlo, {draws:,} draws")
ax2.plot(P_fine, (P_fine <= C0).astype(float), "k--", lw=1, label="evaluation mask $[P \\leq c_0]$")
ax2.set_xlabel("P(channel off)")
ax2.set_ylabel("P(sampled mask keeps the channel)")
ax2.set_title(f"the relaxed decision (k = {K:g}, $c_0$ = {C0:g})")
ax2.legend(fontsize=8)
save_figure(fig, OUT / "scp_relaxation.png")

# %% [markdown]
# ## 3. The gradients
#
# With the noise held fixed, write $G = \partial L / \partial m$, $a = |\gamma| + 10^{-8}$,
# $u = (\epsilon - \beta)/a$ and $\varphi$ for the normal density. The chain rule through the
# sigmoid, then $P = \Phi(u)$, gives
#
# $$\frac{\partial L}{\partial P} = -\frac{k}{t}\, G\, m (1 - m), \qquad
# \frac{\partial L}{\partial \beta} = -\frac{\partial L}{\partial P} \frac{\varphi(u)}{a}, \qquad
# \frac{\partial L}{\partial \gamma} = -\frac{\partial L}{\partial P}
#   \frac{\varphi(u)\, u\, \operatorname{sign}(\gamma)}{a}.$$
#
# Raising $\beta$ lowers $P$ (the channel is on more often), so it raises the keep
# probability. The regularizer $\lambda \sum_c (\beta_c + s |\gamma_c|)$ pulls the other way:
# it lowers $\beta$ and shrinks $|\gamma|$, which raises $P$. A channel survives only if the task
# loss pushes back harder.


# %%
def naive_scp_backward(G, gamma, beta, noise, k=K, c0=C0, t=T_RELAX, eps=EPS):
    a = np.abs(gamma) + 1e-8
    u = (eps - beta) / a
    m = naive_scp_mask(gamma, beta, noise, k=k, c0=c0, t=t, eps=eps)
    dP = -(k / t) * G * m * (1 - m)
    phi = np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi)
    return -dP * phi * u * np.sign(gamma) / a, -dP * phi / a  # (dgamma, dbeta)


# With k / t = 40 most random draws saturate the sigmoid (m within 1e-10 of 0 or 1), where every
# gradient is ~0 and proves little. For the check we pick noise values that put each channel
# inside the transition instead: z = (k (c0 - P) + L) / t between -3 and 3.
noise = -K * (C0 - P) + T_RELAX * rng.uniform(-3.0, 3.0, C)
G = rng.standard_normal(C)  # a random cotangent, never all-ones
_, train_cache = ops.scp_channel_mask_forward(gamma, beta, noise, **SETTINGS, training=True)
dgamma_lib, dbeta_lib, _ = ops.scp_channel_mask_backward(G, train_cache)
dgamma_naive, dbeta_naive = naive_scp_backward(G, gamma, beta, noise)
np.testing.assert_allclose(dgamma_lib, dgamma_naive, rtol=1e-10, atol=1e-14)
np.testing.assert_allclose(dbeta_lib, dbeta_naive, rtol=1e-10, atol=1e-14)
print("dL/dgamma =", np.array2string(dgamma_lib, precision=3))
print("dL/dbeta  =", np.array2string(dbeta_lib, precision=3))


def oracle_mask(gamma_, beta_):
    """The same mask in autograd.numpy; |gamma| via where(), so it is smooth away from 0."""
    a = anp.where(gamma_ >= 0, gamma_, -gamma_) + 1e-8
    P_ = norm.cdf((EPS - beta_) / a)
    return 1.0 / (1.0 + anp.exp(-(K * (C0 - P_) + noise) / T_RELAX))


vjp, _ = autograd.make_vjp(oracle_mask, argnum=(0, 1))(gamma, beta)
auto_dgamma, auto_dbeta = vjp(G)
np.testing.assert_allclose(dgamma_lib, auto_dgamma, rtol=1e-9, atol=1e-14)
np.testing.assert_allclose(dbeta_lib, auto_dbeta, rtol=1e-9, atol=1e-14)


def scalar_loss(gamma_, beta_):
    m, _ = ops.scp_channel_mask_forward(gamma_, beta_, noise, **SETTINGS, training=True)
    return float(np.sum(G * m))


dir_g, dir_b, h = rng.standard_normal(C), rng.standard_normal(C), 1e-6
numeric = (
    scalar_loss(gamma + h * dir_g, beta + h * dir_b) - scalar_loss(gamma - h * dir_g, beta - h * dir_b)
) / (2 * h)
analytic = np.sum(dgamma_lib * dir_g) + np.sum(dbeta_lib * dir_b)
print(f"finite difference {numeric:.8f}, backward {analytic:.8f}")
np.testing.assert_allclose(numeric, analytic, rtol=1e-6, atol=1e-10)
print("SCP backward == hand-derived formulas == autograd VJP; the finite difference agrees")

# %% [markdown]
# (No channel here has $\gamma = 0$, where $|\gamma|$ has a kink; the library uses
# $\operatorname{sign}(0) = 0$ there.)
#
# ## 4. SCP on real digits
#
# The digits CNN has three conv + BN + ReLU layers with 16, 32 and 64 channels (112 in all); each
# of their BNs gets a channel mask. What prunes is roughly $\lambda$ times the number of steps. The
# paper's $\lambda = 5 \times 10^{-5}$ is meant for 160 CIFAR epochs and prunes nothing in a short
# digits run, so we use $\lambda = 8 \times 10^{-3}$ (30 epochs; the small run trains 10). The
# shifts $\beta$ get no weight decay, only the regularizer, and in training only the channels
# whose sampled decision is "keep" update the BN's running statistics. The run logs, per epoch,
# how many channels each BN's evaluation mask keeps.

# %%
run_dir = OUT / "run_scp"
shutil.rmtree(run_dir, ignore_errors=True)  # train() refuses to overwrite a run
config = TrainConfig(
    method="scp",
    scp_lambda=8e-3,
    epochs=pick(30, 10),
    label_smoothing=0.1,
    progress=False,
    run_dir=str(run_dir),
)
result = train(config, log=lambda *_: None)
model = result.model
data = build_data(config)
layers_log = [json.loads(line) for line in (run_dir / "layers.jsonl").read_text().splitlines()]
bn_names = list(layers_log[-1]["layers"])
for row, log_row in zip(result.history, layers_log):
    kept = ", ".join(
        f"{n} {log_row['layers'][n]['kept']}/{log_row['layers'][n]['channels']}" for n in bn_names
    )
    print(f"epoch {row['epoch']:>2}: test accuracy {row['test_acc']:.2%}; channels kept {kept}")

# %% [markdown]
# Is the Gaussian assumption fair for a real network? For each channel of the trained model we
# compute the BN output on the test images (evaluation mode: running statistics) and measure how
# often it is at most $\epsilon$. We compare that with the $P$ that SCP computed from $\gamma$ and
# $\beta$ alone. Channels with $P$ near 1 are the pruned ones; the informative comparison is the
# channels in between.

# %%
model.eval()
pred_all, meas_all = [], []
with no_grad():
    h = Tensor(data.x_test)
    for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2), (model.conv3, model.bn3)):
        pre = conv(h).numpy()  # the BN's input
        rm, rv = bn.running_mean[None, :, None, None], bn.running_var[None, :, None, None]
        g_, b_ = bn.weight.data, bn.bias.data
        out = g_[None, :, None, None] * (pre - rm) / np.sqrt(rv + bn.eps) + b_[None, :, None, None]
        meas_all.append((out <= EPS).mean(axis=(0, 2, 3)))
        pred_all.append(naive_off_probability(g_, b_))
        h = F.relu(bn(Tensor(pre)))  # the masked BN + ReLU, as the model computes it
pred_all, meas_all = np.concatenate(pred_all), np.concatenate(meas_all)
middle = (pred_all > 0.02) & (pred_all < 0.98)
err = np.abs(pred_all - meas_all)
print(f"{middle.sum()} channels with 0.02 < P < 0.98: mean |predicted - measured| = {err[middle].mean():.3f}")
print(f"channels SCP prunes (P > c0): off on at least {meas_all[pred_all > C0].min():.1%} of positions")
assert err[middle].mean() < 0.1

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.9))
ax1.plot(P, measured, "o", label="Gaussian inputs (section 1)")
ax1.plot(pred_all, meas_all, ".", alpha=0.6, label="trained digits CNN, test images")
ax1.plot([0, 1], [0, 1], "k:", lw=1)
ax1.set_xlabel("predicted $\\Phi((\\epsilon - \\beta)/|\\gamma|)$")
ax1.set_ylabel("measured fraction of outputs $\\leq \\epsilon$")
ax1.set_title("is the channel off? prediction vs measurement")
ax1.legend(fontsize=8)
epochs = [r["epoch"] for r in layers_log]
for n in bn_names:
    ax2.plot(epochs, [r["layers"][n]["kept"] for r in layers_log], "o-", ms=3, label=f"{n}")
ax2.plot(epochs, [r["channels_kept"] for r in layers_log], "k--", label="all three")
ax2.set_xlabel("epoch")
ax2.set_ylabel("channels kept by the evaluation mask")
ax2.set_title("SCP on digits")
ax2.legend(fontsize=8)
save_figure(fig, OUT / "scp_training.png")

# %% [markdown]
# On the real network the points scatter around the diagonal. The Gaussian guess is off by a few
# points per channel (the mean error printed above), because real pre-activations are not
# Gaussian. That is good enough for a pruning rule: the channels SCP prunes really are off
# almost everywhere. On the right, the regularizer switches channels off during the first
# epochs, and the count then settles where the task loss pushes back.
#
# ## 5. Removing the channels for real
#
# In evaluation a masked channel outputs exactly zero after the ReLU. Deleting it changes
# nothing: remove that output channel of the conv before the BN, that channel of the BN, and that
# input channel of the next layer (for the last conv, the matching column of the classifier,
# which reads it through the global average pool). `reference.finalize.finalize` does this
# (through `reference.sparsity.slimming.slim`). The result is a plain, physically smaller dense
# network. We check that it gives the same logits on every test image.

# %%
model.eval()
masked = copy.deepcopy(model)  # keep the masked network to compare with
kept = {name: int(bn.channel_mask.kept(bn.weight, bn.bias).sum()) for name, bn in masked_batch_norms(model)}
x_test = Tensor(data.x_test)
with no_grad():
    logits_masked = model(x_test).numpy()
rows_before = profile(model, (1, 8, 8))
before = totals(rows_before)

summary = finalize(model)  # in place: channels removed, masks gone, evaluation mode
with no_grad():
    logits_slim = model(x_test).numpy()
rows_after = profile(model, (1, 8, 8))
after = totals(rows_after)

np.testing.assert_allclose(logits_slim, logits_masked, rtol=1e-4, atol=1e-5)
_, acc_masked = evaluate(masked, data.x_test, data.y_test)
_, acc_slim = evaluate(model, data.x_test, data.y_test)
assert acc_slim == acc_masked
print(f"same logits (to float32 rounding) and the same test accuracy: {acc_slim:.2%}")
print("conv weight shapes now:", [tuple(c.weight.shape) for c in (model.conv1, model.conv2, model.conv3)])

# %% [markdown]
# The MACs of the smaller network follow from the per-layer formula
# $C_\text{out} \cdot C_\text{in} \cdot k_h k_w \cdot H_\text{out} W_\text{out}$ (plus the average
# pool and the classifier). By hand, with $c_1, c_2, c_3$ the channels kept (a layer keeps at
# least one), it must agree with the library's accounting:

# %%
c1, c2, c3 = (max(kept[n], 1) for n in ("bn1", "bn2", "bn3"))
macs_by_hand = c1 * 1 * 9 * 64 + c2 * c1 * 9 * 16 + c3 * c2 * 9 * 16 + c3 * 16 + 10 * c3
assert (model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels) == (c1, c2, c3)
assert after.dense_macs == macs_by_hand
assert before.dense_macs == 16 * 9 * 64 + 32 * 16 * 9 * 16 + 64 * 32 * 9 * 16 + 64 * 16 + 640  # 379,520
print(f"channels: {summary.slim['channels_before']} -> {summary.slim['channels_after']}")
print(f"conv+fc weights: {before.weights:,} -> {after.weights:,}")
print(
    f"MACs per image: {before.dense_macs:,} -> {after.dense_macs:,} "
    f"({after.dense_macs / before.dense_macs:.1%}, {before.dense_macs / after.dense_macs:.1f}x fewer)"
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.9))
names = ["conv1", "conv2", "conv3"]
idx = np.arange(len(names))
ax1.bar(idx - 0.2, [16, 32, 64], width=0.4, label="before", color="lightgray")
ax1.bar(idx + 0.2, [c1, c2, c3], width=0.4, label="after slimming", color="tab:blue")
for i, c in enumerate((c1, c2, c3)):
    ax1.text(i + 0.2, c + 1, str(c), ha="center", fontsize=9)
ax1.set_xticks(idx, names)
ax1.set_ylabel("output channels")
ax1.set_title("channels per layer")
ax1.legend(fontsize=8)
layer_names = [r.name for r in rows_before]
macs_b = {r.name: r.dense_macs for r in rows_before}
macs_a = {r.name: r.dense_macs for r in rows_after}
idx2 = np.arange(len(layer_names))
ax2.bar(idx2 - 0.2, [macs_b[n] for n in layer_names], width=0.4, label="before", color="lightgray")
ax2.bar(idx2 + 0.2, [macs_a[n] for n in layer_names], width=0.4, label="after slimming", color="tab:blue")
ax2.set_xticks(idx2, layer_names)
ax2.set_yscale("log")
ax2.set_ylabel("MACs per image")
ax2.set_title(f"MACs: {before.dense_macs:,} -> {after.dense_macs:,}")
ax2.legend(fontsize=8)
save_figure(fig, OUT / "scp_channels.png")

# %% [markdown]
# Unlike the weight sparsity of STR or LTP, these savings need no sparse kernel: the slimmed
# model is an ordinary dense network with smaller tensors, so fewer MACs translate directly into
# less time and memory on any hardware. A removed channel also saves its weights in *two* layers
# (the conv that produced it and the layer that read it), which is why the MACs fall faster than
# the channel count.
#
# **What to remember**
#
# - SCP reads the chance that a channel is off from its BN's $\beta$ and $|\gamma|$ under a
#   Gaussian assumption. The assumption is exact for Gaussian inputs and close on a real network.
# - Training samples a relaxed keep/prune decision whose keep probability is
#   $\sigma(k(c_0 - P))$; evaluation uses the hard mask $[P \le c_0]$.
# - Because the mask acts after the ReLU, removing a masked channel is exact: the smaller network
#   gives the same outputs.
