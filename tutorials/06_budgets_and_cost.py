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
# # 6. Budgets and cost: what sparsity buys, and what it does not
#
# "90 % sparse" is only half a description of a pruned network. *Where* the zeros sit, the
# per-layer **budget**, decides both how accurate the network stays and how much computation it
# saves. And the computation saved on paper is not the time saved on a machine. This tutorial
# covers:
#
# 1. how cost is counted: weights and multiply-accumulates (MACs), dense and sparse, checked by
#    hand and against published totals;
# 2. how much the budget changes the cost, using STR's published ResNet-50 budget;
# 3. STR against magnitude pruning, global magnitude pruning and GMP on real digits, all at the
#    *same* sparsity, with their budgets side by side;
# 4. a timing of one layer, dense against sparse, and why fewer MACs is not the same as faster.

# %%
import shutil
import time
from functools import partial
from operator import matmul

import autograd
import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse
from common import SMALL, output_dir, pick, save_figure
from threadpoolctl import threadpool_limits

from reference.accounting import profile, summarize_model, totals
from reference.autodiff import Tensor
from reference.config import TrainConfig
from reference.models import build_model
from reference.nn import Conv2d, weight_layers
from reference.report import layer_report
from reference.sparsity.budgets import STR_RESNET50, budget_cost, read_budget_csv
from reference.sparsity.magnitude import (
    FixedMask,
    global_magnitude_masks,
    gmp_sparsity,
    keep_count,
    top_k_mask,
)
from reference.train import train

OUT = output_dir("06_budgets_and_cost")
rng = np.random.default_rng(0)
print("small run" if SMALL else "full run", "; figures go to", OUT)

# %% [markdown]
# ## 1. Counting cost
#
# The sparsity literature counts two things per image:
#
# - **weights**: the entries of the conv and classifier weights (BN parameters and biases are
#   tiny and never pruned, so they are left out);
# - **MACs**: multiply-accumulates. A conv computes one dot product of length
#   $C_\text{in}/\text{groups} \cdot k_h k_w$ for each of its $C_\text{out} H_\text{out}
#   W_\text{out}$ outputs, a fully connected layer one of length $\text{in}$ per output, and the
#   global average pool adds up $C H W$ values:
#
# $$\text{conv: } C_\text{out} \frac{C_\text{in}}{\text{groups}} k_h k_w H_\text{out}
#   W_\text{out}, \qquad \text{fc: } \text{in} \cdot \text{out}, \qquad \text{pool: } C H W.$$
#
# BN, ReLU, max pooling and residual additions are not counted. (The papers call these numbers
# "FLOPs", but they are MACs.) A pruned layer's **sparse MACs** are its dense MACs times its
# density, the MACs a kernel that skipped every zero weight would do.
#
# The digits CNN is a plain chain of layers, so its MACs can be counted by hand in a few lines.
# The library's `profile` must agree:


# %%
def naive_macs(model, height, width):
    """MACs per image of a chain of convs, a global average pool and one fc layer."""
    macs = {}
    for name, layer in weight_layers(model):
        if isinstance(layer, Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            height, width = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
            per_output = layer.in_channels // layer.groups * kh * kw
            macs[name] = layer.out_channels * per_output * height * width
            channels = layer.out_channels
        else:
            macs["avgpool"] = channels * height * width
            macs[name] = layer.in_features * layer.out_features
    return macs


digits_cnn = build_model("digits_cnn", num_classes=10, in_channels=1)
rows = profile(digits_cnn, (1, 8, 8))
assert {r.name: r.dense_macs for r in rows} == naive_macs(digits_cnn, 8, 8)
print(summarize_model(digits_cnn, (1, 8, 8)))

# %% [markdown]
# The same code counts the large models. The README's golden totals at 224x224 with 1,000
# classes, which match the published figures, are checked exactly:

# %%
resnet50 = build_model("resnet50", num_classes=1000, in_channels=3)
r50 = totals(profile(resnet50, (3, 224, 224)), resnet50)
mobilenet = build_model("mobilenet_v1", num_classes=1000, in_channels=3)
mb = totals(profile(mobilenet, (3, 224, 224)), mobilenet)
assert (r50.weights, r50.parameters, r50.dense_macs) == (25_502_912, 25_557_032, 4_089_284_608)
assert (mb.weights, mb.dense_macs) == (4_209_088, 568_790_528)
print(f"ResNet-50:   {r50.weights:>11,} conv+fc weights, {r50.dense_macs:>14,} MACs per image")
print(f"MobileNetV1: {mb.weights:>11,} conv+fc weights, {mb.dense_macs:>14,} MACs per image")

# %% [markdown]
# ## 2. The same sparsity, different costs
#
# A layer's MACs are its weights times its output positions. The first layers of a CNN work on
# large images with few weights, the last ones on small images with many weights. So a weight
# pruned early saves many more MACs than one pruned late. Two budgets with the same overall
# sparsity can therefore cost very different amounts.
#
# `reference/budgets/str_resnet50.csv` holds the per-layer sparsities that STR learned for
# ResNet-50 on ImageNet, as published. `budget_cost` prices a budget without training anything:
# each layer keeps $\text{round}((1 - s)\,n)$ of its $n$ weights. We compare STR's 90.23 % budget
# with a uniform one of the same overall sparsity.

# %%
str_budget = read_budget_csv(STR_RESNET50, "90.23")
str_rows = budget_cost(resnet50, (3, 224, 224), str_budget)
str_total = totals(str_rows)
uniform_budget = {name: 1.0 - str_total.nonzeros / str_total.weights for name in str_budget}
uni_rows = budget_cost(resnet50, (3, 224, 224), uniform_budget)
uni_total = totals(uni_rows)
assert str_total.sparse_macs == 342_704_361  # the README's figure (the paper reports 343 M FLOPs)
assert abs(uni_total.nonzeros - str_total.nonzeros) <= len(str_budget)  # same weight count, up to rounding
for label, t in (("STR budget", str_total), ("uniform", uni_total)):
    print(
        f"{label:<11}: {t.nonzeros:>10,} weights kept ({t.sparsity:.2%} sparse), "
        f"{t.sparse_macs:>12,} sparse MACs ({t.sparse_macs / t.dense_macs:.1%} of dense)"
    )

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
layer_rows = [r for r in str_rows if r.params]
idx = np.arange(len(layer_rows))
ax1.bar(idx, [100 * str_budget[r.name] for r in layer_rows], color="tab:blue", label="STR (learned)")
ax1.axhline(100 * uniform_budget["conv1"], color="tab:orange", lw=2, label="uniform")
ax1.set_ylim(40, 100)
ax1.set_ylabel("sparsity (%)")
ax1.set_title("ResNet-50 at 90.23 % sparsity: STR's published budget against a uniform one")
ax1.legend(fontsize=8, loc="lower right")
uni_by_name = {r.name: r for r in uni_rows}
ax2.bar(idx - 0.2, [r.sparse_macs / 1e6 for r in layer_rows], width=0.4, label="STR", color="tab:blue")
ax2.bar(idx + 0.2, [uni_by_name[r.name].sparse_macs / 1e6 for r in layer_rows], width=0.4,
        label="uniform", color="tab:orange")  # fmt: skip
ax2.set_ylabel("sparse MACs (millions)")
ax2.set_xticks(idx, [r.name for r in layer_rows], rotation=90, fontsize=6)
ax2.legend(fontsize=8)
save_figure(fig, OUT / "budget_resnet50.png")

# %% [markdown]
# Summed per stage, the picture is clearer:

# %%
stages = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
print(
    f"{'stage':<7} {'weights':>11} {'STR kept':>10} {'uniform kept':>13} {'STR MACs':>12} {'uniform MACs':>13}"
)
for stage in stages:
    s_rows = [r for r in str_rows if r.name.split(".")[0] == stage]
    u_rows = [uni_by_name[r.name] for r in s_rows]
    print(
        f"{stage:<7} {sum(r.params for r in s_rows):>11,} {sum(r.nonzeros for r in s_rows):>10,} "
        f"{sum(r.nonzeros for r in u_rows):>13,} {sum(r.sparse_macs for r in s_rows):>12,} "
        f"{sum(r.sparse_macs for r in u_rows):>13,}"
    )

# %% [markdown]
# STR keeps the stem and the classifier far denser than average (about 60 % and 65 % sparse)
# and prunes the middle stages, `layer2` and `layer3`, hardest. With the same number of weights
# kept, its budget costs 14 % fewer MACs than the uniform one. The reason is the price of a
# weight: in the classifier a weight costs one MAC per image, in `layer3` it costs 196 (one per
# 14x14 output position). Moving kept weights from `layer3` to the classifier saves MACs. The
# stem goes the other way: each of its weights costs 12,544 MACs (112x112 positions), and
# keeping 40 % of them costs about four times as much as the uniform budget spends there.
#
# A budget learned for accuracy is not automatically the cheapest one. On the CIFAR ResNet-20,
# the README reports the opposite: STR's budget costs more MACs than a uniform one.
#
# ## 3. Learned against hand-set budgets, at matched sparsity
#
# Does the learned budget also buy accuracy? We train the digits CNN six ways:
#
# - **dense**, for reference;
# - **STR** asked for 95 % sparsity, which learns its own budget;
# - at exactly the sparsity STR reached: **magnitude pruning, uniform** (the same sparsity in
#   every layer, ramped up linearly), **magnitude pruning, global** (one magnitude threshold for
#   all layers), and **GMP** (uniform, on Zhu and Gupta's cubic schedule);
# - **GMP + STR budget**: GMP given STR's learned per-layer sparsities ("budget transfer").
#
# This is a small version of `benchmarks/compare_methods.py`. The small run uses one seed and 6
# epochs, the full run three seeds and 30 epochs.
#
# The baselines are simple enough to write in a few lines each:
#
# - **uniform magnitude**: in each layer of $n$ weights keep the $\text{round}((1 - s)\,n)$
#   largest $|W|$;
# - **global magnitude**: the same over all layers at once, one threshold for the whole model;
# - **GMP's schedule** (Zhu and Gupta, starting from 0): at step $t$ the target sparsity is
#   $s_t = s_f \left(1 - (1 - p)^3\right)$, with $p = (t - t_0)/(n\,\Delta t)$ the fraction of
#   the pruning window done. It prunes fast at first and gently at the end, and the masks are
#   recomputed every $\Delta t$ steps.
#
# The pruned layer computes with $W \odot M$ for a fixed 0/1 mask $M$, so its weight gradient
# is $G \odot M$: a pruned weight gets no gradient and never comes back. First the naive
# versions against the library's, on the digits CNN's weights:


# %%
def naive_uniform_mask(w, s):
    k = max(1, int(np.floor((1 - s) * w.size + 0.5)))  # round half up, keep at least one
    return np.abs(w) >= np.sort(np.abs(w).ravel())[-k]


def naive_global_masks(ws, s):
    everything = np.concatenate([np.abs(w).ravel() for w in ws])
    k = int(np.floor((1 - s) * everything.size + 0.5))
    return [np.abs(w) >= np.sort(everything)[-k] for w in ws]


def naive_gmp(t, s_final, t0, span):
    p = min(max((t - t0) / span, 0.0), 1.0)
    return s_final * (1 - (1 - p) ** 3)


weights = [layer.weight.data for _, layer in weight_layers(digits_cnn)]  # random: no ties
for w in weights:
    np.testing.assert_array_equal(top_k_mask(w, keep_count(w.size, 0.95)), naive_uniform_mask(w, 0.95))
for lib, naive in zip(global_magnitude_masks(weights, 0.95), naive_global_masks(weights, 0.95)):
    np.testing.assert_array_equal(lib, naive)
for t in (0, 100, 250, 400, 500, 600):
    np.testing.assert_allclose(gmp_sparsity(t, 0.95, t0=100, span=400), naive_gmp(t, 0.95, 100, 400))
layer_names_cnn = [name for name, _ in weight_layers(digits_cnn)]
global_kept = [f"{n} {m.mean():.1%}" for n, m in zip(layer_names_cnn, global_magnitude_masks(weights, 0.95))]
print("global magnitude pruning to 95 % of the initial weights keeps:", ", ".join(global_kept))

# %% [markdown]
# Applied to freshly initialised weights, global magnitude pruning would empty the classifier:
# each layer's initial scale is set by its fan-in, so one threshold for all layers mostly
# compares initialisations. This is one reason to prune gradually during training, once the
# weights have adapted.
#
# Now the masked layer's gradient, through the library's tape, against autograd and a finite
# difference:

# %%
w = weights[1].astype(np.float64)
M = naive_uniform_mask(w, 0.9).astype(np.float64)
G = rng.standard_normal(w.shape)  # a random cotangent
layer_mask = FixedMask(w)
layer_mask.set_mask(M)
w_t = Tensor(w, requires_grad=True)
layer_mask(w_t).backward(G)
vjp, _ = autograd.make_vjp(lambda w_: w_ * M)(w)
np.testing.assert_allclose(w_t.grad, vjp(G), rtol=1e-13)
direction, h = rng.standard_normal(w.shape), 1e-6
numeric = (np.sum(G * (w + h * direction) * M) - np.sum(G * (w - h * direction) * M)) / (2 * h)
np.testing.assert_allclose(numeric, np.sum(w_t.grad * direction), rtol=1e-7)
assert np.all(w_t.grad[M == 0] == 0)  # pruned weights get exactly zero gradient
print("FixedMask backward == G * M == autograd VJP; finite difference agrees")

# %% [markdown]
# %%
epochs = pick(30, 6)
seeds = pick((0, 1, 2), (0,))
base = dict(model="digits_cnn", dataset="digits", epochs=epochs, lr=0.05, batch_size=32, label_smoothing=0.1)
runs_root = OUT / "runs"
shutil.rmtree(runs_root, ignore_errors=True)
INPUT = (1, 8, 8)


def run(label, seed, **settings):
    """Train one configuration; return its test accuracy, per-layer sparsity and totals row."""
    run_dir = runs_root / f"{label.replace(' ', '_').replace('+', 'plus')}-seed{seed}"
    config = TrainConfig(**base, **settings, seed=seed, progress=False, run_dir=str(run_dir))
    result = train(config, log=lambda *_: None)
    report = layer_report(result.model, INPUT)  # evaluation mode: the weights inference uses
    per_layer = {r["layer"]: r["sparsity_pct"] / 100 for r in report[:-1] if r["params"]}
    total = report[-1]
    return {
        "label": label,
        "seed": seed,
        "acc": result.metrics["test_acc"],
        "sparsity": 1.0 - total["nonzeros"] / total["params"],
        "sparse_macs": total["sparse_macs"],
        "layers": per_layer,
        "params": {r["layer"]: r["params"] for r in report[:-1] if r["params"]},
        "checkpoint": result.checkpoint,
    }


t_start = time.perf_counter()
records = []
for seed in seeds:
    records.append(run("dense", seed))
    str_rec = run("STR", seed, method="str", target_sparsity=0.95)
    records.append(str_rec)
    matched = round(str_rec["sparsity"], 6)
    records.append(
        run("magnitude uniform", seed, method="magnitude", prune_scope="uniform", target_sparsity=matched)
    )
    records.append(
        run("magnitude global", seed, method="magnitude", prune_scope="global", target_sparsity=matched)
    )
    records.append(run("GMP uniform", seed, method="gmp", prune_scope="uniform", target_sparsity=matched))
    records.append(run("GMP + STR budget", seed, method="gmp", budget=str(str_rec["checkpoint"])))
print(f"{len(records)} runs in {time.perf_counter() - t_start:.0f} s")

labels = ["dense", "STR", "magnitude uniform", "magnitude global", "GMP uniform", "GMP + STR budget"]
print(f"{'method':<18} {'test accuracy (mean [min, max])':>32} {'sparsity':>9} {'sparse MACs':>12}")
for label in labels:
    group = [r for r in records if r["label"] == label]
    accs = np.array([r["acc"] for r in group])
    print(
        f"{label:<18} {100 * accs.mean():>14.2f} [{100 * accs.min():.2f}, {100 * accs.max():.2f}]"
        f"{'':>4} {100 * np.mean([r['sparsity'] for r in group]):>8.2f}% "
        f"{np.mean([r['sparse_macs'] for r in group]):>12,.0f}"
    )

# %% [markdown]
# Before reading the accuracies, check that the comparison is fair: every pruned network of a
# seed has the same number of nonzero weights as STR's, and budget transfer reproduced STR's
# per-layer sparsities (to one weight per layer).

# %%
for seed in seeds:
    group = {r["label"]: r for r in records if r["seed"] == seed}
    s_str = group["STR"]["sparsity"]
    assert s_str > 0.9, f"STR reached only {s_str:.2%}"
    for label in labels[2:]:
        assert abs(group[label]["sparsity"] - s_str) < 1e-3, (label, group[label]["sparsity"], s_str)
    for layer, n in group["STR"]["params"].items():
        assert abs(group["GMP + STR budget"]["layers"][layer] - group["STR"]["layers"][layer]) <= 1.0 / n
print("matched: every baseline within 0.1 points of STR's sparsity; budget transfer reproduces STR's budget")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.2))
colors = ["gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
means = [100 * np.mean([r["acc"] for r in records if r["label"] == lb]) for lb in labels]
lows = [100 * min(r["acc"] for r in records if r["label"] == lb) for lb in labels]
highs = [100 * max(r["acc"] for r in records if r["label"] == lb) for lb in labels]
err = [np.subtract(means, lows), np.subtract(highs, means)]
ax1.bar(range(len(labels)), means, color=colors, yerr=err if len(seeds) > 1 else None, capsize=4)
for i, (m, top) in enumerate(zip(means, highs)):
    ax1.text(i, top + 0.4, f"{m:.1f}", ha="center", fontsize=8)
ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
ax1.set_ylim(max(0.0, min(lows) - 10), 101)
ax1.set_ylabel("test accuracy (%)")
sparsity_str = np.mean([r["sparsity"] for r in records if r["label"] == "STR"])
ax1.set_title(f"digits, all pruned at {100 * sparsity_str:.1f} % ({len(seeds)} seed(s), {epochs} epochs)")

first = {r["label"]: r for r in records if r["seed"] == seeds[0]}
layer_names = list(first["STR"]["layers"])
width = 0.16
for j, label in enumerate(labels[1:]):
    ax2.bar(np.arange(len(layer_names)) + (j - 2) * width, [100 * first[label]["layers"][n] for n in layer_names],
            width=width, color=colors[j + 1], label=label)  # fmt: skip
ax2.set_xticks(range(len(layer_names)), [f"{n}\n({first['STR']['params'][n]:,} w)" for n in layer_names])
ax2.set_ylabel("sparsity of the layer (%)")
ax2.set_title(f"per-layer budgets (seed {seeds[0]})")
ax2.set_ylim(0, 105)
ax2.legend(fontsize=7, loc="lower center")
save_figure(fig, OUT / "compare_methods.png")

# %% [markdown]
# What to look for. (The full-size run repeats the README's benchmark at 95 % and gives the same
# numbers: dense 99.35 %, STR 98.70 %, GMP with STR's budget 98.61 %, global magnitude 95.73 %,
# GMP 92.76 %, uniform magnitude 83.10 %. The 6-epoch small run keeps the same order.)
#
# - **Uniform budgets suffer most.** At 95 %, a uniform budget leaves the 144-weight first conv
#   about 7 weights and the 640-weight classifier about 30, while the wide third conv could lose
#   far more with little harm. GMP's gentler cubic schedule recovers part of the loss, but the
#   budget is still wrong.
# - **Global magnitude pruning** finds a non-uniform budget by itself, because small layers tend
#   to have larger weights. It does much better than uniform, but it overshoots: it empties the
#   third conv to about 99 %.
# - **The gain is in the budget.** GMP given STR's budget lands close to STR itself (in the full
#   run, within one test image on average). What STR adds is finding that budget while it trains.
#
# The budgets also price differently (the sparse-MACs column above). Global magnitude pruning
# is the cheapest here because it prunes hardest the third conv, whose weights each cost 16 MACs
# (4x4 positions). The classifier weights it keeps cost one MAC each.
#
# ## 4. Fewer MACs is not the same as faster
#
# Sparse MACs assume a kernel that skips every zero for free. Real sparse kernels pay for
# skipping. A compressed sparse row (CSR) matrix stores each nonzero with its column index, and
# the product must load an index, then gather from a scattered address, for every nonzero. Dense
# BLAS instead streams contiguous blocks through vector units at close to peak speed.
#
# We time one realistic layer, a 3x3 conv with 512 input and 512 output channels, written as the
# matrix product it is: a 512 x 4608 weight times a 4608 x 196 matrix of input patches (196
# output positions, four 7x7 feature maps). For each sparsity we zero random weights and time:
#
# - **dense BLAS** on the matrix with its zeros;
# - **CSR**: `scipy.sparse.csr_matrix(W) @ X`;
# - **structured**: a dense product with that fraction of *rows* removed, which is what channel
#   pruning (tutorial 5) gives;
# - **MACs-proportional**: the dense time times the density, what the MAC count promises.
#
# scipy's CSR product runs on one thread, so the comparison runs everything on one thread;
# two-thread dense BLAS is shown for reference. Each time is the median of several repeats,
# timed with `time.perf_counter` in alternating rounds.


# %%
def interleaved_medians(functions, repeats):
    """Median time of each function, timed in alternating rounds so that any slowdown of the
    machine (other programs, frequency changes) hits every function alike."""
    for f in functions.values():
        f()  # warm up: caches, thread pool
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


W = rng.standard_normal((512, 4608)).astype(np.float32)
X = rng.standard_normal((4608, 196)).astype(np.float32)
repeats = pick(21, 5)
sparsities = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
timing = {"dense, 2 threads": [], "dense": [], "CSR": [], "structured": []}
for s in sparsities:
    W_s = W * (rng.random(W.shape) >= s)
    csr = scipy.sparse.csr_matrix(W_s)
    np.testing.assert_allclose(csr @ X, W_s @ X, rtol=1e-4, atol=1e-3)  # the same product
    W_rows = np.ascontiguousarray(W[: max(1, round((1 - s) * W.shape[0]))])  # rows (channels) removed
    products = {  # each entry computes one product when called
        "dense": partial(matmul, W_s, X),
        "CSR": partial(matmul, csr, X),
        "structured": partial(matmul, W_rows, X),
    }
    timing["dense, 2 threads"].append(interleaved_medians({"d": products["dense"]}, repeats)["d"])
    with threadpool_limits(limits=1):  # one thread for all three: scipy's CSR product has only one
        t = interleaved_medians(products, repeats)
    for name, value in t.items():
        timing[name].append(value)
timing = {k: 1e3 * np.array(v) for k, v in timing.items()}  # milliseconds

print(f"{'sparsity':>8} {'dense 2t':>9} {'dense':>8} {'CSR':>8} {'struct.':>8}   CSR speedup over dense")
for i, s in enumerate(sparsities):
    d, c = timing["dense"][i], timing["CSR"][i]
    print(
        f"{s:>8.0%} {timing['dense, 2 threads'][i]:>7.2f}ms {d:>6.2f}ms {c:>6.2f}ms "
        f"{timing['structured'][i]:>6.2f}ms   {d / c:>5.2f}x"
    )


def where_csr_wins(dense_times):
    won = [f"{s:.0%}" for s, d, c in zip(sparsities, dense_times, timing["CSR"]) if c < d]
    return ", ".join(won) or "no sparsity tested"


print(f"CSR beats dense BLAS (one thread each) at: {where_csr_wins(timing['dense'])}")
print(f"CSR beats dense BLAS on both cores at: {where_csr_wins(timing['dense, 2 threads'])}")

fig, ax = plt.subplots(figsize=(7, 4.3))
x = 100 * np.array(sparsities)
ax.plot(x, timing["dense, 2 threads"], "o-", color="gray", label="dense BLAS, 2 threads")
ax.plot(x, timing["dense"], "o--", color="black", label="dense BLAS, 1 thread")
ax.plot(x, timing["CSR"], "s-", color="tab:red", label="CSR (scipy), 1 thread")
ax.plot(x, timing["structured"], "^-", color="tab:blue", label="structured: rows removed, 1 thread")
ax.plot(x, timing["dense"][0] * (1 - np.array(sparsities)), ":", color="tab:green",
        label="MACs-proportional (dense 1 thread x density)")  # fmt: skip
ax.set_yscale("log")
ax.set_xlabel("sparsity of the 512 x 4608 weight (%)")
ax.set_ylabel("time per product (ms, median)")
ax.set_title("One conv layer as a matrix product: what the zeros buy")
ax.legend(fontsize=8)
save_figure(fig, OUT / "sparse_timing.png")

# %% [markdown]
# The honest reading:
#
# - **Dense BLAS does not care about zeros.** Its time is flat in the sparsity: a zero is
#   multiplied as fast as any other number. Unstructured sparsity on dense hardware saves memory
#   if the weights are stored compressed, and no time at all.
# - **CSR loses at moderate sparsity.** At 50 % it is about three times *slower* than dense, and
#   it breaks even with single-threaded BLAS only between 80 % and 90 %. Against BLAS on both
#   cores, on an otherwise idle machine, it needs about 95 %. Even at 99 % it stays far from the
#   MACs-proportional line: the MAC count promises 100x, and CSR delivers less than a tenth of
#   that. The index loads and scattered reads cost more than the multiplications they save.
# - **Structured sparsity turns MACs into time.** Removing whole rows (channels) gives a smaller
#   dense product, whose time falls roughly in proportion to the MACs.
#
# The exact numbers depend on the machine, the BLAS, the matrix shapes and whatever else the
# machine is running at the time (a busy core slows two-thread BLAS most); run this cell on your
# own. The pattern does not: count MACs to compare budgets, and measure time to compare
# deployments. Unstructured sparsity rarely speeds up dense hardware. It pays off at very high
# sparsity with sparse kernels, or on hardware built to skip zeros.
