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
# # 4. LTP: learned threshold pruning with a differentiable L0
#
# Pruning asks a question a gradient cannot answer: is this weight *in* or *out*? The count of
# surviving weights, the L0 "norm", is a step function, and its gradient is zero almost
# everywhere. Learned threshold pruning (LTP) replaces the step by a steep sigmoid, so the count
# becomes differentiable and one learnable threshold per layer can be trained with SGD along
# with the weights.
#
# This tutorial covers:
#
# 1. the soft mask, its temperature, and soft against hard density;
# 2. the gradients with respect to the weights and the threshold, checked against the library,
#    autograd and a finite difference;
# 3. why an L0 penalty keeps working in a network with batch norm, where L1 and L2 penalties can
#    be "paid" without pruning anything;
# 4. LTP training a CNN on real handwritten digits;
# 5. the *trail*: the progressively sparser networks that one LTP run passes through, and how to
#    pick one of them.
#
# LTP is covered by a Qualcomm patent (US 11,704,571 B2); the implementation here is for
# research and teaching.

# %%
import copy
import json
import shutil

import autograd
import autograd.numpy as anp
import matplotlib.pyplot as plt
import numpy as np
from common import SMALL, output_dir, pick, save_figure

import reference.ops as ops
from reference.autodiff import Tensor
from reference.config import TrainConfig
from reference.finalize import finalize_checkpoint, load_model_from_checkpoint, recalibration_batches
from reference.models import build_model
from reference.nn import weight_layers
from reference.sparsity.learned_threshold import BAND, LearnedThreshold, pick_from_trail
from reference.train import build_data, evaluate, train

OUT = output_dir("04_ltp")
rng = np.random.default_rng(0)
print("small run" if SMALL else "full run", "; figures go to", OUT)

# %% [markdown]
# ## 1. The soft mask and its temperature
#
# Every conv and fc layer gets one learnable scalar $\tau$, a threshold on the *squared* weight.
# In training the layer computes with a softly masked weight:
#
# $$z = \frac{W^2 - \tau}{T}, \qquad m = \sigma(z) = \frac{1}{1 + e^{-z}}, \qquad
# W_\text{eff} = W \odot m .$$
#
# A weight far above the threshold has $m \approx 1$ and passes unchanged; one far below has
# $m \approx 0$. In evaluation the sigmoid becomes the step it approximates, the **hard mask**
# $W_\text{eff} = W \odot [W^2 > \tau]$, and the pruned weights are exactly zero.
#
# The penalty is the **differentiable L0**, the sum of the soft mask, added to the task loss with
# a weight $\lambda$:
#
# $$L_0 = \sum_i m_i, \qquad L = L_\text{task} + \lambda \sum_\text{layers} L_0 .$$
#
# The temperature $T$ sets how wide the sigmoid's transition band is. Its units must be those of
# $W^2$, or the band would be too sharp in a layer of large weights and too blurry in a layer of
# small ones. The library ties it to the layer's own weights,
#
# $$T = t_0 \operatorname{var}(|W|),$$
#
# recomputed at every forward and treated as a constant by the backward pass. Here is the
# whole forward in five lines of NumPy:


# %%
def naive_ltp_forward(w, tau, t0):
    """Soft-masked weight, differentiable L0, mask and temperature of one layer."""
    T = t0 * np.var(np.abs(w))
    m = 1.0 / (1.0 + np.exp(-(w * w - tau) / T))
    return w * m, m.sum(), m, T


w = rng.normal(0.0, 0.05, size=(32, 16, 3, 3))  # a conv weight at a typical scale
tau = float(np.quantile(w * w, 0.7))  # a threshold that hard-prunes 70 % of the weights
t0 = 1.0

w_eff_naive, l0_naive, m_naive, T = naive_ltp_forward(w, tau, t0)
w_eff_lib, _ = ops.ltp_mask_forward(w, tau, T)
l0_lib, _ = ops.ltp_l0_forward(w, tau, T)
np.testing.assert_allclose(w_eff_lib, w_eff_naive, rtol=1e-12, atol=1e-300)
np.testing.assert_allclose(l0_lib, l0_naive, rtol=1e-12)
# the training loop's sparsifier computes T the same way from the weight it masks
np.testing.assert_allclose(LearnedThreshold(t0=t0, dtype=np.float64).temperature(Tensor(w)), T, rtol=1e-12)
print(f"T = {T:.3e}, tau = {tau:.3e}; naive forward == ops.ltp_mask_forward / ops.ltp_l0_forward")

# %% [markdown]
# **Soft and hard density.** The fraction of weights that the evaluation network keeps is the
# *hard density*, the mean of $[W^2 > \tau]$. Training sees the *soft density*, the mean of $m$.
# They agree only when the band is narrow compared with the spread of $W^2$. With the default
# $t_0 = 1$ the band is wide: weights just below the threshold still pass at half strength,
# so the network that is trained and the network that is evaluated differ. The figure shows the
# mask for several $t_0$ and how the soft density approaches the hard one as $t_0$ shrinks.

# %%
hard_density = float(np.mean(w * w > tau))
t0s = np.geomspace(0.01, 10.0, 25)
soft_densities = [naive_ltp_forward(w, tau, t)[2].mean() for t in t0s]
print(f"hard density {hard_density:.3f}")
for t in (0.01, 0.1, 1.0, 10.0):
    print(f"t0 = {t:<5}: soft density {naive_ltp_forward(w, tau, t)[2].mean():.3f}")
# a small t0 makes the soft mask a step; a large one flattens it toward 1/2
assert abs(soft_densities[0] - hard_density) < 0.02
assert abs(soft_densities[-1] - 0.5) < 0.05

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
grid = np.linspace(-0.15, 0.15, 601)
ax1.plot(grid, (grid * grid > tau).astype(float), "k--", lw=1, label="hard mask $[W^2 > \\tau]$")
for t in (0.1, 1.0, 4.0):
    ax1.plot(
        grid, 1.0 / (1.0 + np.exp(-(grid * grid - tau) / (t * np.var(np.abs(w))))), label=f"$t_0$ = {t:g}"
    )
ax1.set_xlabel("weight W")
ax1.set_ylabel("mask m")
ax1.set_title("soft mask for a few temperatures")
ax1.legend(fontsize=8, loc="upper center")
ax2.semilogx(t0s, soft_densities, "o-", ms=3, label="soft density mean(m)")
ax2.axhline(hard_density, color="k", ls="--", lw=1, label="hard density")
ax2.set_xlabel("$t_0$ (T = $t_0$ var|W|)")
ax2.set_ylabel("density")
ax2.set_title("soft vs hard density")
ax2.legend(fontsize=8)
save_figure(fig, OUT / "ltp_soft_mask.png")

# %% [markdown]
# ## 2. The gradients
#
# Write $G = \partial L_\text{task} / \partial W_\text{eff}$ and $q = m(1 - m)$, the sigmoid's
# slope. With $\partial z / \partial W = 2W/T$ and $\partial z / \partial \tau = -1/T$, the
# product rule on $W m$ and the sum $\lambda \sum m$ give
#
# $$\frac{\partial L}{\partial W} = G \left(m + \frac{2 W^2 q}{T}\right) + \lambda \frac{2 W q}{T},
# \qquad
# \frac{\partial L}{\partial \tau} = -\frac{1}{T} \sum_i q_i \left(G_i W_i + \lambda\right).$$
#
# Two things to read off. First, only weights *inside the band* ($q$ not negligible) move
# $\tau$: if every weight is far from the threshold, $\tau$ stops learning and pruning stalls,
# which is why the training log reports the fraction of weights in the band. Second, the L0
# term pushes $\tau$ up (it lowers the count) and pushes weights inside the band toward zero.
#
# In the library, the mask op's backward gives the $G$ terms and the L0 op's backward, fed
# $\lambda$, gives the $\lambda$ terms. Their sum must equal the two lines above:


# %%
def naive_ltp_backward(G, w, tau, T, lam):
    m = 1.0 / (1.0 + np.exp(-(w * w - tau) / T))
    q = m * (1.0 - m)
    dw = G * (m + 2.0 * w * w * q / T) + lam * 2.0 * w * q / T
    dtau = -np.sum(q * (G * w + lam)) / T
    return dw, dtau


G = rng.standard_normal(w.shape)  # a random cotangent, never all-ones
lam = 0.37
_, mask_cache = ops.ltp_mask_forward(w, np.asarray(tau), T)
_, l0_cache = ops.ltp_l0_forward(w, np.asarray(tau), T)
dw_mask, dtau_mask, _ = ops.ltp_mask_backward(G, mask_cache)
dw_l0, dtau_l0, _ = ops.ltp_l0_backward(lam, l0_cache)
dw_naive, dtau_naive = naive_ltp_backward(G, w, tau, T, lam)
np.testing.assert_allclose(dw_mask + dw_l0, dw_naive, rtol=1e-10, atol=1e-14)
np.testing.assert_allclose(dtau_mask + dtau_l0, dtau_naive, rtol=1e-10)
print("library backward (mask + lambda * L0) == the hand-derived formulas")

# %% [markdown]
# The formulas and the library could share a mistake, so we check both against an independent
# oracle: the same forward written in `autograd.numpy`, differentiated by autograd. `make_vjp`
# returns the vector-Jacobian product; we feed it a random cotangent for the masked weight and a
# random scalar for the L0 count. Finally a central finite difference along a random direction
# in $(W, \tau)$ checks the total without any oracle at all.


# %%
def oracle_mask(w_, tau_):
    return w_ / (1.0 + anp.exp(-(w_ * w_ - tau_) / T))


def oracle_l0(w_, tau_):
    return anp.sum(1.0 / (1.0 + anp.exp(-(w_ * w_ - tau_) / T)))


vjp_mask, _ = autograd.make_vjp(oracle_mask, argnum=(0, 1))(w, tau)
vjp_l0, _ = autograd.make_vjp(oracle_l0, argnum=(0, 1))(w, tau)
c_l0 = float(rng.standard_normal())  # random cotangent of the scalar L0
auto_dw, auto_dtau = vjp_mask(G)
np.testing.assert_allclose(dw_mask, auto_dw, rtol=1e-10, atol=1e-14)
np.testing.assert_allclose(dtau_mask, auto_dtau, rtol=1e-10)
dw_l0c, dtau_l0c, _ = ops.ltp_l0_backward(c_l0, l0_cache)
auto_dw, auto_dtau = vjp_l0(c_l0)
np.testing.assert_allclose(dw_l0c, auto_dw, rtol=1e-10, atol=1e-14)
np.testing.assert_allclose(dtau_l0c, auto_dtau, rtol=1e-10)


def total_loss(w_, tau_):
    """<G, W_eff> + lambda L0: a scalar whose gradient is the one derived above."""
    w_eff, _ = ops.ltp_mask_forward(w_, tau_, T)
    l0, _ = ops.ltp_l0_forward(w_, tau_, T)
    return float(np.sum(G * w_eff) + lam * l0)


dir_w, dir_tau, h = rng.standard_normal(w.shape), float(rng.standard_normal()), 1e-7
numeric = (
    total_loss(w + h * dir_w, tau + h * tau * dir_tau) - total_loss(w - h * dir_w, tau - h * tau * dir_tau)
) / (2 * h)
analytic = np.sum(dw_naive * dir_w) + dtau_naive * tau * dir_tau
print(f"finite difference {numeric:.8f}, backward {analytic:.8f}")
np.testing.assert_allclose(numeric, analytic, rtol=1e-6)

# %% [markdown]
# (The step in $\tau$ is scaled by $\tau$ itself, about 3e-3, so that both directions move the
# loss by comparable amounts.)
#
# The paper approximates the weight gradient by $G m$, holding the sigmoid constant for the
# weights only; `exact_grad=False` selects it, and $\tau$ keeps its exact gradient. It is not
# the derivative of the forward (a finite difference would reject it). Here is how far it is
# from the exact gradient:

# %%
_, approx_cache = ops.ltp_mask_forward(w, np.asarray(tau), T, exact_grad=False)
dw_approx, dtau_approx, _ = ops.ltp_mask_backward(G, approx_cache)
np.testing.assert_allclose(dw_approx, G * m_naive, rtol=1e-12)
np.testing.assert_allclose(dtau_approx, dtau_mask, rtol=1e-12)
rel = np.linalg.norm(dw_approx - dw_mask) / np.linalg.norm(dw_mask)
print(f"approximate weight gradient differs from the exact one by {rel:.1%} (relative norm)")
assert rel > 0.01

# %% [markdown]
# ## 3. Why L0, and not L1 or L2, under batch norm
#
# Most CNNs follow every conv with batch norm. In training, BN divides each channel by its
# batch standard deviation, so multiplying a conv's weights by any $c > 0$ changes **nothing**
# downstream: $\text{BN}(c\,x) = \text{BN}(x)$, up to BN's small $\epsilon$. Let us check that on
# the digits CNN with a real batch, scaling `conv2` by factors from 0.1 to 10. (The small changes
# at $c = 0.1$ come from $\epsilon = 10^{-5}$, added to a variance that has shrunk by $c^2$.)

# %%
data = build_data(TrainConfig())  # scikit-learn's 8x8 digits, the fixed 80/20 split
net = build_model("digits_cnn", num_classes=10, in_channels=1, rng=np.random.default_rng(0), dtype=np.float64)
net.train()  # BN normalises with batch statistics, as in training
x_batch = Tensor(data.x_train[:128].astype(np.float64))
w2 = net.conv2.weight.data.copy()
scales = np.array([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
logits = {}
for c in scales:
    net.conv2.weight.data[...] = c * w2
    logits[c] = net(x_batch).numpy()
net.conv2.weight.data[...] = w2
size = np.abs(logits[1.0]).max()
for c in scales:
    change = np.abs(logits[c] - logits[1.0]).max() / size
    print(f"c = {c:>4g}: largest change of a logit {change:.1e} (relative to the largest logit)")
    assert change < 2e-3

# %% [markdown]
# Now compare penalties on the scaled weights $cW$:
#
# - L1 $= \sum |cW| = c\,\lVert W \rVert_1$ and L2 (weight decay) $= \sum (cW)^2 = c^2 \lVert W \rVert_2^2$.
#   Both go to zero as $c \to 0$ while the network computes exactly the same function. An
#   optimizer minimising them under BN simply shrinks the layer; the penalty is "satisfied" and
#   not a single weight is pruned.
# - L0 with $T = t_0 \operatorname{var}(|W|)$: scaling $W \to cW$ scales $T \to c^2 T$.
#   The threshold is a learned parameter too, and the rescaled network that prunes the same
#   weights has the threshold $c^2 \tau$. Then $z = (c^2 W^2 - c^2 \tau)/(c^2 T)$ is unchanged,
#   and so is every $m$. The count can only go down by moving weights below the threshold
#   *relative to the others*, that is, by pruning.
#
# The "T frozen" column shows why $T$ must follow the weights: with $T$ fixed at its $c = 1$
# value, shrinking the weights squeezes every $z$ toward 0 and every mask toward 1/2.

# %%
tau2 = float(np.quantile(w2 * w2, 0.7))
T_fixed = t0 * np.var(np.abs(w2))
rows = []
for c in scales:
    wc = c * w2
    l1 = np.abs(wc).sum()
    l2 = (wc * wc).sum()
    l0, _ = ops.ltp_l0_forward(wc, c * c * tau2, t0 * np.var(np.abs(wc)))
    l0_fixed_t, _ = ops.ltp_l0_forward(wc, c * c * tau2, T_fixed)
    hard = int((wc * wc > c * c * tau2).sum())
    rows.append((c, l1, l2, float(l0), float(l0_fixed_t), hard))
rows = np.array(rows)
ref = rows[scales == 1.0][0]
print(f"{'c':>5} {'L1':>9} {'L2':>9} {'L0 (T~var|W|)':>14} {'L0 (T fixed)':>13} {'hard count':>10}")
for c, l1, l2, l0, l0f, hard in rows:
    print(f"{c:>5g} {l1:>9.3f} {l2:>9.4f} {l0:>14.2f} {l0f:>13.2f} {int(hard):>10d}")
np.testing.assert_allclose(rows[:, 1] / ref[1], scales, rtol=1e-10)  # L1 ~ c
np.testing.assert_allclose(rows[:, 2] / ref[2], scales**2, rtol=1e-10)  # L2 ~ c^2
np.testing.assert_allclose(rows[:, 3], ref[3], rtol=1e-9)  # L0 does not move
assert np.all(rows[:, 5] == ref[5])  # nor does the hard count
assert abs(rows[0, 4] - 0.5 * w2.size) < 0.05 * w2.size  # a frozen T drifts toward n/2 as c -> 0

fig, ax = plt.subplots(figsize=(6.2, 4))
ax.loglog(scales, rows[:, 1] / ref[1], "o-", label="L1 penalty")
ax.loglog(scales, rows[:, 2] / ref[2], "s-", label="L2 penalty (weight decay)")
ax.loglog(scales, rows[:, 3] / ref[3], "^-", lw=2.5, label="L0, T = $t_0$ var|W|")
ax.loglog(scales, rows[:, 4] / ref[4], "v--", label="L0, T frozen")
ax.set_xlabel("scale c of conv2's weights (network output unchanged)")
ax.set_ylabel("penalty relative to c = 1")
ax.set_title("Under BN, only the L0 count cannot be cheated by rescaling")
ax.legend(fontsize=8)
save_figure(fig, OUT / "ltp_scale_invariance.png")

# %% [markdown]
# ## 4. LTP on real digits
#
# Now the method at work: the digits CNN (three conv + BN + ReLU layers and a classifier,
# 23,824 conv and fc weights) on scikit-learn's 1,797 handwritten digits. A raw $\lambda$ does not
# say how sparse the result will be, so we ask for a sparsity: `target_sparsity` turns on a
# controller that raises the requested sparsity along a cubic ramp over the first two thirds of
# training and adjusts $\lambda$ after every step to follow it. We ask for 97 %, more than this
# small network can give without losing accuracy, so that the run passes through every level of
# sparsity on the way.
#
# Each epoch, `layers.jsonl` records per layer the soft density, the hard density and the
# fraction of weights inside the band ($|z| < 4$).

# %%
run_dir = OUT / "run_ltp"
shutil.rmtree(run_dir, ignore_errors=True)  # train() refuses to overwrite a run
config = TrainConfig(
    method="ltp",
    target_sparsity=0.97,
    epochs=pick(24, 8),
    label_smoothing=0.1,
    progress=False,
    run_dir=str(run_dir),
)
result = train(config, log=lambda *_: None)
history = result.history
for row in history:
    print(f"epoch {row['epoch']:>2}: test accuracy {row['test_acc']:.2%}, sparsity {row['sparsity']:.2%}")

layers_log = [json.loads(line) for line in (run_dir / "layers.jsonl").read_text().splitlines()]
epochs = [r["epoch"] for r in layers_log]

# the logged hard density is what the evaluation network really keeps
model = result.model
model.eval()
kept = total = 0
for _, layer in weight_layers(model):
    w_layer, tau_layer = layer.weight.data, layer.sparsifier.tau.data
    kept += int((w_layer * w_layer > tau_layer).sum())
    total += w_layer.size
np.testing.assert_allclose(kept / total, layers_log[-1]["hard_density"], rtol=1e-12)
assert history[-1]["sparsity"] > 0.9

fig, ax = plt.subplots(figsize=(6.2, 4))
ax.plot(epochs, [r["soft_density"] for r in layers_log], "o-", label="soft density mean(m)")
ax.plot(epochs, [r["hard_density"] for r in layers_log], "s-", label="hard density (evaluation)")
ax.plot(epochs, [r["band"] for r in layers_log], "^-", label=f"fraction in the band |z| < {BAND:g}")
ax.set_yscale("log")
ax.set_xlabel("epoch")
ax.set_ylabel("fraction of conv+fc weights")
ax.set_title("LTP on digits: what training sees and what evaluation keeps")
ax.legend(fontsize=8)
save_figure(fig, OUT / "ltp_training_densities.png")

# %% [markdown]
# The two densities track each other closely, yet they are not the same thing. The soft density
# counts survivors inside the band at less than 1 and pruned weights inside the band at more
# than 0, and the two errors roughly cancel *in the count*. They need not cancel in what the
# network computes. Let us evaluate the final model twice: once as training sees it
# ($W \odot m$, soft masks) and once as evaluation does (hard masks).

# %%
soft_net = copy.deepcopy(model)
for _, layer in weight_layers(soft_net):
    sparsifier = layer.sparsifier
    w_soft, _ = ops.ltp_mask_forward(
        layer.weight.data, sparsifier.tau.data, sparsifier.temperature(layer.weight)
    )
    layer.weight.data[...] = w_soft
    del layer.sparsifier  # the layer now computes with W * m
_, acc_soft = evaluate(soft_net, data.x_test, data.y_test)
_, acc_hard = evaluate(model, data.x_test, data.y_test)
np.testing.assert_allclose(acc_hard, history[-1]["test_acc"])  # the loop evaluates with hard masks
print(f"last epoch: soft-masked network {acc_soft:.2%}, hard-masked network {acc_hard:.2%}")

# %% [markdown]
# When the hard-masked accuracy is well below the soft-masked one, the network has come to rely
# on the fractional weights that sit in the band, and the step function throws them away. This
# is the price of training a relaxation. It grows when the requested sparsity is more than the
# network can afford, which is what the next section shows.
#
# The band fraction is what keeps $\tau$ learning. As the layers thin out it falls with the
# density. If it reached zero, the thresholds would freeze.
#
# ## 5. The trail
#
# The hard-pruned network of each epoch is a usable model, and they get sparser as training goes
# on. LTP keeps all of them (`trail/epoch_NNN.npz`), so one run gives a whole accuracy-sparsity
# curve. You then pick a point on it: `pick_from_trail(run_dir, s)` returns the most accurate
# snapshot that is at least `s` sparse, and `learnsparse finalize CKPT --trail-sparsity s`
# (here `finalize_checkpoint(..., trail_sparsity=s)`) turns it into a plain model with exact
# zeros. First the rule, naively:

# %%
wanted = 0.9
metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
reaching = [r for r in metrics if r["sparsity"] >= wanted]
naive_best = max(reaching, key=lambda r: (r["test_acc"], r["sparsity"], r["epoch"]))
picked = pick_from_trail(run_dir, wanted)
assert picked == run_dir / "trail" / f"epoch_{naive_best['epoch']:03d}.npz"
print(
    f"picked {picked.name}: {naive_best['sparsity']:.2%} sparse, test accuracy {naive_best['test_acc']:.2%}"
)
last = metrics[-1]
print(f"the last epoch, for comparison: {last['sparsity']:.2%} sparse, test accuracy {last['test_acc']:.2%}")

final_path, summary = finalize_checkpoint(
    run_dir / "checkpoint.npz", OUT / "ltp_trail_90.npz", trail_sparsity=wanted
)
restored = load_model_from_checkpoint(final_path)
_, acc = evaluate(restored.model, data.x_test, data.y_test)
zeros = sum(int((layer.weight.data == 0).sum()) for _, layer in weight_layers(restored.model))
print(f"finalized: {summary.nonzeros:,} of {summary.weights:,} weights left, test accuracy {acc:.2%}")
assert restored.model.fc.sparsifier is None  # a plain model: no thresholds left
assert zeros / summary.weights >= wanted
np.testing.assert_allclose(zeros / summary.weights, naive_best["sparsity"], rtol=1e-12)
assert abs(acc - naive_best["test_acc"]) <= 1.0 / len(data.y_test)  # same network, same answers

fig, ax = plt.subplots(figsize=(6.2, 4))
sp = np.array([r["sparsity"] for r in metrics])
acc_curve = np.array([r["test_acc"] for r in metrics])
ax.plot(100 * sp, 100 * acc_curve, "o-", color="tab:blue", label="trail snapshot (one per epoch)")
for r in metrics:
    ax.annotate(
        str(r["epoch"]),
        (100 * r["sparsity"], 100 * r["test_acc"]),
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
    )
ax.plot(
    100 * naive_best["sparsity"],
    100 * naive_best["test_acc"],
    "*",
    ms=16,
    color="tab:red",
    label=f"picked for sparsity >= {wanted:.0%}",
)
ax.axvline(100 * wanted, color="gray", ls=":", lw=1)
ax.set_xlabel("sparsity of conv+fc weights (%)")
ax.set_ylabel("test accuracy (%)")
ax.set_title("The LTP trail on digits (numbers: epochs)")
ax.legend(fontsize=8, loc="lower left")
save_figure(fig, OUT / "ltp_trail.png")

# %% [markdown]
# Read the curve from left to right. While the ramp is gentle, accuracy holds. Past the
# sparsity this network can afford, accuracy drops. In the full-size run (24 epochs) the drop
# comes after about 94 % and the last epochs do not recover it, so the final checkpoint is one
# of the worst points of the run. (The 8-epoch small run climbs too fast to show the shape
# clearly.) A run kept only at its end would give you that last point. The trail lets you take
# the best one that meets your budget.

# %% [markdown]
# ## 6. Whose statistics? Batch norm after training
#
# Section 4 compared the soft-masked and the hard-masked network, but both read the same batch
# norm running statistics, and those were gathered in training, where every forward pass used
# the *soft* masks. The hard-masked network's channels have other means and variances, so part
# of what the hard mask seems to cost is only stale statistics. In evaluation a batch norm
# computes $\gamma (x - \mu_r) / \sqrt{\sigma_r^2 + \epsilon} + \beta$ with running $\mu_r$ and
# $\sigma_r^2$; recalibrating sets them to the average over a few training batches of the
# statistics the *finalized* network produces, and changes nothing else:
#
# $$\mu_r = \frac{1}{K} \sum_{k=1}^{K} \operatorname{mean}(x_k), \qquad
#   \sigma_r^2 = \frac{1}{K} \sum_{k=1}^{K} \operatorname{var}_{\text{unbiased}}(x_k),$$
#
# where $x_k$ is the batch norm's input for training batch $k$. `learnsparse finalize
# --recalibrate-bn 20` (here `finalize_checkpoint(..., recalibrate_bn=20)`) does it after
# baking the hard masks in. First the rule by hand for the first batch norm, whose input is the
# first conv's output:

# %%
baked_path, _ = finalize_checkpoint(run_dir / "checkpoint.npz", OUT / "ltp_final.npz")
recal_path, _ = finalize_checkpoint(run_dir / "checkpoint.npz", OUT / "ltp_final_bn.npz", recalibrate_bn=20)
baked, recal = load_model_from_checkpoint(baked_path), load_model_from_checkpoint(recal_path)

conv1 = baked.model.conv1
means, variances = [], []
for x in recalibration_batches(data, config, 20):  # the batches finalize used
    y, _ = ops.conv2d_forward(x, conv1.weight.data, None, stride=1, padding=1)
    means.append(y.mean(axis=(0, 2, 3), dtype=np.float64))
    variances.append(y.var(axis=(0, 2, 3), dtype=np.float64, ddof=1))
np.testing.assert_allclose(recal.model.bn1.running_mean, np.mean(means, axis=0), rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(recal.model.bn1.running_var, np.mean(variances, axis=0), rtol=1e-4, atol=1e-6)
for (name, before), (_, after) in zip(baked.model.state_dict().items(), recal.model.state_dict().items()):
    if name.endswith("num_batches_tracked"):
        assert after == before + 20  # the count of batches seen goes on
    elif "running" not in name:
        np.testing.assert_array_equal(before, after, err_msg=name)  # only the statistics changed
assert not np.allclose(baked.model.bn1.running_mean, recal.model.bn1.running_mean)

_, acc_baked = evaluate(baked.model, data.x_test, data.y_test)
_, acc_recal = evaluate(recal.model, data.x_test, data.y_test)
np.testing.assert_allclose(acc_baked, acc_hard)  # baking the hard masks in changes no answer
print(
    f"last epoch, {history[-1]['sparsity']:.2%} sparse: soft masks {acc_soft:.2%}, hard masks {acc_hard:.2%}, "
    f"hard masks with batch norm recalibrated {acc_recal:.2%}"
)

# %% [markdown]
# The gap between the hard-masked accuracy and the recalibrated one is the statistics; what
# remains between the recalibrated and the soft-masked one is the mask itself. In the full-size
# run here (96.96 % sparse) the soft masks gave 98.61 %, the hard masks 94.15 % and the hard masks
# with recalibrated statistics 97.77 %: the statistics were 3.6 of the 4.5 points. On the method
# comparison in the README the statistics were most of it: LTP on ResNet-20 at 90 % sparsity went
# from 91.1 % as trained to 99.4 % recalibrated, on MobileNetV1 from 29.8 % to 96.7 %. STR has the
# same problem in a milder form: its thresholds still rise in the last epochs at high sparsity,
# and the statistics trail them (on the digits CNN at 97 %, one seed gave 72.7 % as trained and
# 96.9 % recalibrated). So `learnsparse compare` reports every run both ways, and a network
# trained with moving thresholds should be recalibrated before it is judged or deployed. Twenty
# forward passes are all it costs.

# %% [markdown]
# **What to remember**
#
# - LTP makes the weight count differentiable with a sigmoid on $(W^2 - \tau)/T$. Its threshold
#   learns only from weights inside the band.
# - Tying $T$ to $\operatorname{var}(|W|)$ makes the count scale-free. Under batch norm this is
#   what makes the penalty mean "prune", where L1 or L2 can be satisfied by shrinking a layer.
# - Training sees soft masks and evaluation uses hard ones. Both densities are logged, and the
#   trail of hard-pruned snapshots is yours to pick from.
# - Batch norm's running statistics were gathered under the soft masks. Recalibrate them on a few
#   training batches (`finalize --recalibrate-bn 20`) before judging the hard-masked network.
