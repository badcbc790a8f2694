"""Magnitude pruning and GMP: masks (top-k, global), schedules, fixed masks, short runs, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reference.autodiff import Tensor
from reference.config import TrainConfig
from reference.errors import ConfigError
from reference.functional import softmax_cross_entropy
from reference.models import build_model
from reference.nn import weight_layers
from reference.optim import SGD
from reference.sparsity import StepContext, build_method
from reference.sparsity.magnitude import (
    GMP,
    FixedMask,
    MagnitudePruning,
    default_end_epoch,
    global_magnitude_masks,
    gmp_sparsity,
    keep_count,
    top_k_mask,
)
from reference.train import train
from tests.common import quiet
from tests.resume import check_resume


def _ctx(step: int, steps_per_epoch: int, epochs: int) -> StepContext:
    """The context of global step ``step``."""
    epoch, within = divmod(step, steps_per_epoch)
    return StepContext(epoch, within, steps_per_epoch, epochs, np.random.default_rng(0))


def tiny(tmp_path, name: str = "run", **changes) -> TrainConfig:
    """The digits CNN at half width for two epochs (23 steps each): well under a second."""
    settings = {
        "epochs": 2, "width": 0.5, "batch_size": 64, "lr": 0.05, "progress": False,
        "run_dir": str(tmp_path / name), "prune_frequency": 5,
    }  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def _zeros(array) -> int:
    return int(array.size - np.count_nonzero(array))


# ------------------------------------------------------------------ the mask


def test_fixed_mask_multiplies_and_passes_the_gradient_through_the_mask():
    rng = np.random.default_rng(0)
    w = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    m = FixedMask(w)
    assert m.mask.dtype == w.dtype and np.all(m.mask == 1)
    keep = rng.random((3, 4)) < 0.5
    m.set_mask(keep)
    y = m(w)
    assert np.array_equal(y.data, w.data * keep)  # (1)
    g = rng.standard_normal((3, 4))  # a random cotangent
    y.backward(g)
    assert np.array_equal(w.grad, g * keep)  # (2)


def test_masks_are_buffers_in_the_state_dict():
    model = build_model("digits_cnn", width=0.5)
    MagnitudePruning(0.5).attach(model)
    state = model.state_dict()
    for name, layer in weight_layers(model):
        key = f"{name}.sparsifier.mask"
        assert key in state and state[key].shape == layer.weight.shape and state[key].dtype == np.float32
    assert len(list(model.parameters())) == len(list(build_model("digits_cnn", width=0.5).parameters()))


# ---------------------------------------------------------------- choosing k


def test_keep_count_rounds_half_up_and_never_empties_a_layer():
    assert keep_count(1000, 0.9) == 100
    assert keep_count(10, 0.25) == 8  # 7.5 rounds up
    assert keep_count(10, 0.26) == 7  # 7.4
    assert keep_count(7, 0.0) == 7
    assert keep_count(10, 0.96) == 1  # 0.4 would round to 0
    assert keep_count(10, 0.96, at_least_one=False) == 0


@pytest.mark.parametrize("k", [0, 1, 17, 54, 107, 108])
def test_top_k_keeps_exactly_the_k_largest(k):
    w = np.random.default_rng(k).standard_normal((4, 3, 3, 3)).astype(np.float32)
    keep = top_k_mask(w, k)
    assert keep.shape == w.shape and keep.dtype == bool
    assert int(keep.sum()) == k
    mags = np.abs(w)
    if 0 < k < w.size:
        assert mags[keep].min() > mags[~keep].max()
    expected = np.sort(np.argsort(-mags.ravel())[:k])
    assert np.array_equal(np.flatnonzero(keep), expected)


def test_top_k_breaks_ties_toward_the_lower_flat_index():
    w = np.array([[1.0, -2.0, 2.0], [2.0, 0.5, -2.0]])
    # |w| flat: [1, 2, 2, 2, 0.5, 2]; the four 2s are kept in index order
    assert np.flatnonzero(top_k_mask(w, 2)).tolist() == [1, 2]
    assert np.flatnonzero(top_k_mask(w, 3)).tolist() == [1, 2, 3]
    assert np.flatnonzero(top_k_mask(w, 5)).tolist() == [0, 1, 2, 3, 5]
    # many ties: the same as a stable sort by descending magnitude
    ints = np.random.default_rng(1).integers(-3, 4, size=200).astype(np.float64)
    for k in (0, 13, 50, 120, 199):
        order = np.argsort(-np.abs(ints), kind="stable")[:k]
        assert np.array_equal(np.flatnonzero(top_k_mask(ints, k)), np.sort(order))


def test_global_threshold_reaches_the_overall_target_within_one_weight():
    rng = np.random.default_rng(2)
    shapes_and_scales = (((8, 4, 3, 3), 0.1), ((16, 8), 1.0), ((50,), 3.0))
    weights = [rng.standard_normal(shape) * scale for shape, scale in shapes_and_scales]
    total = sum(w.size for w in weights)
    for target in (0.3, 0.7, 0.9):
        masks = global_magnitude_masks(weights, target)
        zeros = sum(int((~m).sum()) for m in masks)
        assert abs(zeros - target * total) <= 1  # within one weight
        assert zeros == total - keep_count(total, target, at_least_one=False)
        kept = np.concatenate([np.abs(w[m]) for w, m in zip(weights, masks)])
        pruned = np.concatenate([np.abs(w[~m]) for w, m in zip(weights, masks)])
        assert kept.min() > pruned.max()  # one threshold for all layers
    # one threshold, not one sparsity: the small-scale layer is pruned hardest
    per_layer = [float((~m).mean()) for m in global_magnitude_masks(weights, 0.7)]
    assert per_layer[0] > per_layer[1] > per_layer[2]


def test_uniform_scope_gives_the_same_sparsity_in_every_layer():
    model = build_model("digits_cnn")
    method = MagnitudePruning(0.7, start_epoch=0, end_epoch=0)
    method.attach(model)
    method.update_masks(model, 1.0)
    for _, layer in weight_layers(model):
        n = layer.weight.size
        zeros = _zeros(layer.effective_weight().data)
        assert zeros == n - keep_count(n, 0.7)
        assert abs(zeros / n - 0.7) <= 0.5 / n
        # the latent weights are masked too, and the kept ones are the layer's top-k
        assert _zeros(layer.weight.data) == zeros
    model_g = build_model("digits_cnn")
    g = MagnitudePruning(0.7, scope="global", start_epoch=0, end_epoch=0)
    g.attach(model_g)
    g.update_masks(model_g, 1.0)
    sparsities = {
        round(_zeros(layer.weight.data) / layer.weight.size, 3) for _, layer in weight_layers(model_g)
    }
    assert len(sparsities) > 1


# ----------------------------------------------------------------- schedules


def test_gmp_cubic_schedule_values_by_hand():
    # s_f = 0.8, t0 = 10, n dt = 80: s_t = 0.8 - 0.8 (1 - (t - 10) / 80)^3
    assert gmp_sparsity(10, 0.8, 10, 80) == 0.0
    assert gmp_sparsity(50, 0.8, 10, 80) == pytest.approx(0.7)  # 0.8 - 0.8 / 8
    assert gmp_sparsity(30, 0.8, 10, 80) == pytest.approx(0.4625)  # 0.8 - 0.8 * 27 / 64
    assert gmp_sparsity(90, 0.8, 10, 80) == pytest.approx(0.8)
    assert gmp_sparsity(5, 0.8, 10, 80) == 0.0 and gmp_sparsity(500, 0.8, 10, 80) == pytest.approx(0.8)

    # the method: epochs 1..5 of 10 with 20 steps each -> t0 = 20, te = 100, dt = 5
    method = GMP(0.8, start_epoch=1, end_epoch=5, frequency=5)
    sched = method.schedule(_ctx(0, 20, 10))
    assert (sched.start, sched.end, sched.frequency) == (20, 100, 5)

    def target(t: int) -> float:
        return sched.fraction(t) * 0.8

    assert target(19) == 0.0 and target(20) == 0.0  # before t0, and s_i = 0 at t0
    assert target(60) == pytest.approx(0.7)  # the midpoint
    assert target(63) == pytest.approx(0.7)  # held between updates
    assert target(100) == pytest.approx(0.8) and target(150) == pytest.approx(0.8)
    for u in range(20, 101, 5):
        assert sched.is_update(u) and target(u) == pytest.approx(gmp_sparsity(u, 0.8, 20, 80))
    assert not any(sched.is_update(t) for t in (19, 21, 64, 101, 105))


def test_one_shot_and_gradual_linear_schedules():
    one_shot = MagnitudePruning(0.6, start_epoch=2, end_epoch=2, frequency=3).schedule(_ctx(0, 10, 5))
    assert [one_shot.fraction(t) for t in (0, 19, 20, 21, 49)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [t for t in range(50) if one_shot.is_update(t)] == [20]

    gradual = MagnitudePruning(0.6, start_epoch=0, end_epoch=2, frequency=5).schedule(_ctx(0, 10, 5))
    assert [t for t in range(50) if gradual.is_update(t)] == [0, 5, 10, 15, 20]
    assert [gradual.fraction(t) for t in (0, 4, 5, 10, 12, 20, 40)] == [0.0, 0.0, 0.25, 0.5, 0.5, 1.0, 1.0]

    # a ramp to the very end of training is clamped to the last step, so the target is reached
    to_end = MagnitudePruning(0.6, start_epoch=0, end_epoch=4, frequency=100).schedule(_ctx(0, 10, 4))
    assert to_end.end == 39 and to_end.is_update(39) and to_end.fraction(39) == 1.0
    # unset end: 3/4 of the run, never before the start
    assert default_end_epoch(0, 15) == 11 and default_end_epoch(12, 15) == 12
    assert MagnitudePruning(0.5).schedule(_ctx(0, 10, 8)).end == 60


def test_masks_are_fixed_after_the_end_and_pruned_weights_stay_exactly_zero():
    """A hand-driven loop with momentum and decay: the hooks in the training loop's order."""
    rng = np.random.default_rng(3)
    model = build_model("digits_cnn", width=0.5)
    method = GMP(0.75, start_epoch=0, end_epoch=1, frequency=2)
    method.attach(model)
    opt = SGD([{"params": list(model.parameters()), "name": "all"}], lr=0.1, momentum=0.9, weight_decay=5e-4)
    spe, epochs = 4, 3  # te = 4
    layers = weight_layers(model)
    final_masks = None
    moved_then_zeroed = False
    for t in range(spe * epochs):
        ctx = _ctx(t, spe, epochs)
        method.before_step(model, ctx)
        x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 10, 16)
        loss = softmax_cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        for _, layer in layers:
            assert np.all(layer.weight.grad[layer.sparsifier.mask == 0] == 0)  # dW = G * M
        opt.step()
        moved_then_zeroed |= any(
            np.any(layer.weight.data[layer.sparsifier.mask == 0] != 0) for _, layer in layers
        )
        method.after_step(model, ctx)
        for _, layer in layers:
            pruned = layer.sparsifier.mask == 0
            assert np.all(layer.weight.data[pruned] == 0)
            assert np.all(layer.effective_weight().data[pruned] == 0)
        masks = [layer.sparsifier.mask.copy() for _, layer in layers]
        if t == 4:
            final_masks = masks
            for _, layer in layers:
                n = layer.weight.size
                assert _zeros(layer.sparsifier.mask) == n - keep_count(n, 0.75)
        elif t > 4:
            assert all(np.array_equal(a, b) for a, b in zip(masks, final_masks))
    # stale momentum did move pruned weights inside opt.step(); after_step put them back to zero
    assert moved_then_zeroed


# ------------------------------------------------------------------ full runs


@pytest.mark.parametrize(
    "method, scope", [("magnitude", "uniform"), ("gmp", "uniform"), ("magnitude", "global")]
)
def test_short_digits_run_reaches_the_target_exactly(tmp_path, method, scope):
    target = 0.75
    result = train(tiny(tmp_path, method=method, prune_scope=scope, target_sparsity=target), log=quiet)
    total = zeros = 0
    for _, layer in weight_layers(result.model):
        n, z = layer.weight.size, _zeros(layer.effective_weight().data)
        total, zeros = total + n, zeros + z
        if scope == "uniform":
            assert z == n - keep_count(n, target), "each layer exactly at its k"
    if scope == "global":
        assert zeros == total - keep_count(total, target, at_least_one=False)
    assert abs(zeros - target * total) <= len(weight_layers(result.model))
    assert result.metrics["sparsity"] == pytest.approx(zeros / total)
    rows = [json.loads(line) for line in (tmp_path / "run" / "layers.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["target"] == pytest.approx(target) and rows[-1]["sparsity"] == pytest.approx(
        zeros / total
    )
    assert set(rows[-1]["layers"]) == {name for name, _ in weight_layers(result.model)}


def test_one_shot_run_is_dense_before_the_start_epoch(tmp_path):
    cfg = tiny(tmp_path, method="magnitude", target_sparsity=0.5, prune_start_epoch=1, prune_end_epoch=1)
    result = train(cfg, log=quiet)
    assert result.history[0]["sparsity"] == 0.0
    assert result.history[1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """Interrupted mid-ramp: the masks travel in the checkpoint and the schedule picks up."""
    changes = {"method": "gmp", "target_sparsity": 0.8, "epochs": 3, "prune_end_epoch": 2, "momentum": 0.9}
    full, resumed, interrupted = check_resume(
        lambda run: tiny(tmp_path, run, **changes), tmp_path, stop_after=1
    )
    assert 0.0 < interrupted.metrics[0]["sparsity"] < 0.8
    assert "conv1.sparsifier.mask" in full.model.state_dict()
    assert [r["sparsity"] for r in full.history] == [r["sparsity"] for r in resumed.history]


# ------------------------------------------------------------------- options


def test_conflicting_options_are_refused(tmp_path):
    budget = tmp_path / "b.csv"
    budget.write_text("layer,sparsity_pct@50\nconv1,50\nconv2,50\nconv3,50\nfc,50\n")
    with pytest.raises(ConfigError, match="scope 'global'"):
        build_method(tiny(tmp_path, method="gmp", budget=str(budget), prune_scope="global"))
    with pytest.raises(ConfigError, match="not both"):
        build_method(tiny(tmp_path, method="magnitude", budget=str(budget), target_sparsity=0.5))
    with pytest.raises(ConfigError, match="no budget file"):
        build_method(tiny(tmp_path, method="magnitude", target_sparsity=0.5, budget_column="50"))
    with pytest.raises(ConfigError, match="already has a sparsifier"):
        model = build_model("digits_cnn")
        MagnitudePruning(0.5).attach(model)
        GMP(0.5).attach(model)
    with pytest.raises(ConfigError, match="target_sparsity must be in"):
        MagnitudePruning(1.0)
