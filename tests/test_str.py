"""STR (soft threshold reparameterization) as a training-loop method, and the target-sparsity controller."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.errors import CheckpointError, ConfigError
from reference.models import build_model
from reference.nn import weight_layers
from reference.optim import SGD
from reference.sparsity import StepContext, build_method
from reference.sparsity.control import DENSITY_FLOOR, TargetController, cubic_ramp
from reference.sparsity.soft_threshold import STR, SoftThreshold
from reference.train import param_groups, train
from tests.common import digits_batch, digits_model
from tests.resume import check_resume


def _sigmoid64(s: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64)))


def _str_by_hand(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Equation (2), from the paper's formula, with the threshold per layer or per output channel."""
    g = _sigmoid64(s)
    if g.ndim == 1:
        g = g.reshape((-1,) + (1,) * (w.ndim - 1))  # (O,) -> (O, 1, ..., 1)
    w64 = w.astype(np.float64)
    return np.where(np.abs(w64) > g, np.sign(w64) * (np.abs(w64) - g), 0.0)


def _tiny(tmp_path, name: str = "run", **changes) -> TrainConfig:
    settings = {
        "method": "str", "epochs": 3, "width": 0.5, "batch_size": 64, "lr": 0.05,
        "progress": False, "run_dir": str(tmp_path / name),
    }  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


# --------------------------------------------------------------------- attach


@pytest.mark.parametrize(("name", "width"), [("digits_cnn", 0.5), ("mobilenet_v1", 0.25), ("resnet20", 0.5)])
def test_attach_adds_one_threshold_per_weight_layer(name, width):
    model = build_model(name, width=width)
    before = model.state_dict()
    layers = [n for n, _ in weight_layers(model)]
    STR(s_init=-5.0).attach(model)
    after = model.state_dict()
    added = [k for k in after if k not in before]
    assert added == [f"{n}.sparsifier.s" for n in layers]
    assert all(
        after[k].shape == () and after[k].dtype == np.float32 and after[k] == np.float32(-5) for k in added
    )
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing else changed
    if name == "mobilenet_v1":  # depthwise convs are sparsified too
        assert any(layer.groups > 1 and layer.sparsifier is not None for _, layer in weight_layers(model))


def test_attach_twice_is_refused():
    model = digits_model()
    STR().attach(model)
    with pytest.raises(ConfigError, match="already has a sparsifier"):
        STR().attach(model)


def test_per_channel_thresholds_have_one_entry_per_output_channel():
    model = build_model("mobilenet_v1", width=0.25)
    STR(s_init=-4.0, per_channel=True).attach(model)
    for name, layer in weight_layers(model):
        assert layer.sparsifier.s.shape == (layer.weight.shape[0],), name


# -------------------------------------------------------------------- forward


@pytest.mark.parametrize("per_channel", [False, True])
def test_output_equals_the_dense_model_with_hand_computed_weights(per_channel):
    sparse, dense = digits_model(), digits_model()
    STR(per_channel=per_channel).attach(sparse)
    rng = np.random.default_rng(2)
    for _, layer in weight_layers(sparse):
        s = layer.sparsifier.s
        s.data[...] = rng.uniform(-4.0, -2.0, size=s.shape)  # g in 0.02 ... 0.12: some weights pruned
    for (_, ls), (_, ld) in zip(weight_layers(sparse), weight_layers(dense)):
        ld.weight.data[...] = _str_by_hand(ls.weight.data, ls.sparsifier.s.data).astype(np.float32)
    x, _ = digits_batch()
    for model in (sparse, dense):
        model.eval()
    with no_grad():
        np.testing.assert_allclose(sparse(Tensor(x)).numpy(), dense(Tensor(x)).numpy(), rtol=1e-5, atol=1e-6)
    # the accessor is the threshold the layer uses
    for _, layer in weight_layers(sparse):
        np.testing.assert_allclose(
            layer.sparsifier.threshold(), _sigmoid64(layer.sparsifier.s.data), rtol=1e-6
        )


def test_s_init_minus_3200_is_the_dense_model_and_only_decay_moves_s():
    """sigmoid(-3200) is exactly 0 in float32: W_eff = W bit for bit, ds = 0, and the decay moves s up."""
    sparse, dense = digits_model(), digits_model()
    method = STR(s_init=-3200.0, weight_decay=5e-4)
    method.attach(sparse)
    x, y = digits_batch()
    for mode in ("train", "eval"):
        getattr(sparse, mode)(), getattr(dense, mode)()
        with no_grad():
            np.testing.assert_array_equal(sparse(Tensor(x)).numpy(), dense(Tensor(x)).numpy())
    for _, layer in weight_layers(sparse):
        assert float(layer.sparsifier.threshold()) == 0.0

    sparse.train()
    lr, wd = 0.05, 5e-4
    groups = method.param_groups(sparse, TrainConfig(method="str", weight_decay=wd))
    optimizer = SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
    loss = F.softmax_cross_entropy(sparse(Tensor(x)), y)
    optimizer.zero_grad()
    loss.backward()
    thresholds = [layer.sparsifier.s for _, layer in weight_layers(sparse)]
    assert all(np.array_equal(s.grad, np.zeros((), np.float32)) for s in thresholds)  # ds == 0 exactly
    before = [s.data.copy() for s in thresholds]
    optimizer.step()
    for s, s0 in zip(thresholds, before):
        expected = s0 - lr * (s0 * 0 + wd * s0)  # SGD (1), (2), (6) in float32 with a zero gradient
        assert s.data.dtype == np.float32 and s.data == expected
        assert s.data > s0  # toward 0: the threshold grows
        step = float(s.data) - float(s0)
        assert step == pytest.approx(lr * wd * 3200, abs=float(np.spacing(np.float32(3200))))


# --------------------------------------------------------------- param groups


@pytest.mark.parametrize(("threshold_decay", "expected"), [(None, 5e-4), (0.0, 0.0), (1e-3, 1e-3)])
def test_thresholds_have_their_own_group_and_decay(threshold_decay, expected):
    cfg = TrainConfig(method="str", weight_decay=5e-4, threshold_decay=threshold_decay)
    model = digits_model()
    method = build_method(cfg)
    method.attach(model)
    groups = param_groups(model, cfg, method)
    assert [g["name"] for g in groups] == ["weights", "thresholds"]
    weights, thresholds = groups
    assert weights["weight_decay"] == 5e-4 and thresholds["weight_decay"] == expected
    assert [id(p) for p in thresholds["params"]] == [
        id(layer.sparsifier.s) for _, layer in weight_layers(model)
    ]
    every = {id(p) for p in model.parameters()}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == every  # BN and biases sit with the weights


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="threshold_decay"):
        TrainConfig(method="str", threshold_decay=-1e-4)
    with pytest.raises(ConfigError, match="threshold_decay"):
        STR(threshold_decay=-1.0)
    with pytest.raises(ConfigError, match="str_s_init"):
        STR(s_init=math.inf)
    with pytest.raises(ConfigError, match="target_sparsity"):
        STR(target_sparsity=1.0)
    with pytest.raises(ConfigError, match="target"):
        TargetController(1.2, 1.0)
    with pytest.raises(ConfigError, match="unwind"):
        TargetController(0.5, 1.0, unwind=0.5)


# ----------------------------------------------------------------- end_epoch


def test_end_epoch_reports_per_layer_sparsity_and_thresholds():
    model = digits_model()
    method = STR(per_channel=True)
    method.attach(model)
    for _, layer in weight_layers(model):
        layer.sparsifier.s.data[...] = np.linspace(-3.5, -2.5, layer.weight.shape[0])
    stats = method.end_epoch(model, StepContext(0, 0, 1, 1, np.random.default_rng(0)))
    zeros = total = 0
    for name, layer in weight_layers(model):
        w_eff = _str_by_hand(layer.weight.data, layer.sparsifier.s.data)
        row = stats["layers"][name]
        assert row["sparsity"] == pytest.approx(np.mean(w_eff == 0))
        assert row["threshold"] == pytest.approx(_sigmoid64(layer.sparsifier.s.data).mean(), rel=1e-6)
        zeros, total = zeros + int((w_eff == 0).sum()), total + w_eff.size
    assert stats["sparsity"] == pytest.approx(zeros / total)
    assert stats["target_sparsity"] is None
    json.dumps(stats)  # plain numbers only: it goes to layers.jsonl


# ---------------------------------------------------------------- controller


def test_cubic_ramp_goes_from_zero_to_the_target_and_stays():
    assert cubic_ramp(0.0, 0.9, 2 / 3) == 0.0
    assert cubic_ramp(2 / 3, 0.9, 2 / 3) == pytest.approx(0.9)
    assert cubic_ramp(1.0, 0.9, 2 / 3) == 0.9
    values = [cubic_ramp(p, 0.9, 2 / 3) for p in np.linspace(0, 1, 31)]
    assert values == sorted(values)
    assert cubic_ramp(0.5, 0.9, 0.0) == 0.9


def test_controller_pushes_up_when_too_dense_and_down_when_too_sparse():
    dense_side, sparse_side = TargetController(0.8, 1e-4), TargetController(0.8, 1e-4)
    for _ in range(50):
        dense_side.update(0.1, 0.9)
        sparse_side.update(0.99, 0.9)
    assert dense_side.strength > 1e-4 * 100  # grew by orders of magnitude
    assert sparse_side.strength < 0  # a push toward density
    assert abs(dense_side.strength) <= 1e-4 * 1e4 * (1 + 1e-9)  # bounded by the limit


def _error(measured: float, wanted: float = 0.8) -> float:
    """(2) for a measured sparsity against the ramp's ``wanted``."""
    return math.log((1.0 - measured + DENSITY_FLOOR) / (1.0 - wanted + DENSITY_FLOOR))


def _settled(integral: float, measured: float, unwind: float = 10.0) -> TargetController:
    """A controller at rest on ``integral`` (u = 1 + I), whose previous error was the coming one's
    (no derivative kick), so the next update's step stays inside the rate limit and (3) applies."""
    controller = TargetController(0.8, 1e-4, unwind=unwind)
    controller.integral, controller.u = integral, 1.0 + integral
    controller.error, controller.updates = _error(measured), 1
    return controller


@pytest.mark.parametrize("unwind", [1.0, 10.0])
def test_the_integral_unwinds_unwind_times_faster_than_it_winds(unwind):
    """(3): an error of the integral's own sign adds ki e; one of the other sign, ki unwind e."""
    sparser = _settled(2.0, 0.81, unwind)  # past the ramp's 0.8, against a positive integral
    sparser.update(0.81, 0.9)
    assert sparser.integral == pytest.approx(2.0 + sparser.ki * unwind * _error(0.81), rel=1e-12)
    denser = _settled(2.0, 0.795, unwind)  # short of the ramp: winds further at the plain rate
    denser.update(0.795, 0.9)
    assert denser.integral == pytest.approx(2.0 + denser.ki * _error(0.795), rel=1e-12)


def test_an_unwinding_integral_stops_at_zero():
    controller = _settled(0.01, 0.802)  # ki unwind e = -0.03 would carry it to -0.02
    controller.update(0.802, 0.9)
    assert controller.integral == 0.0
    controller.update(0.802, 0.9)  # from 0 the same error winds it negative, at the plain rate
    assert controller.integral == pytest.approx(controller.ki * _error(0.802), rel=1e-12)


def test_controller_state_round_trips_and_is_deterministic():
    a, b = TargetController(0.9, 5e-4), TargetController(0.9, 5e-4)
    measured = np.random.default_rng(0).uniform(0, 1, 40)
    for i, m in enumerate(measured[:20]):
        a.update(float(m), i / 40)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for i, m in enumerate(measured[20:], 20):
        assert a.update(float(m), i / 40) == b.update(float(m), i / 40)
    with pytest.raises(CheckpointError, match="controller"):
        b.load_state_dict({"u": 1.0})


def test_resume_without_the_controller_state_is_refused():
    with pytest.raises(CheckpointError, match="no controller state"):
        STR(target_sparsity=0.5).load_state_dict({})
    with pytest.raises(CheckpointError, match="no target_sparsity"):
        STR().load_state_dict({"controller": TargetController(0.5, 1.0).state_dict()})


def test_target_run_reaches_the_target_and_logs_requested_and_achieved(tmp_path):
    lines: list[str] = []
    result = train(
        _tiny(tmp_path, epochs=10, width=1.0, batch_size=32, target_sparsity=0.8), log=lines.append
    )
    assert abs(result.metrics["sparsity"] - 0.8) < 0.03, result.history
    rows = [json.loads(x) for x in (tmp_path / "run" / "layers.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert all(r["target_sparsity"] == 0.8 for r in rows)
    assert rows[-1]["sparsity"] == result.metrics["sparsity"]
    assert rows[-1]["controller"]["ramp_sparsity"] == pytest.approx(0.8)
    assert "sparsity: requested 80.00%, achieved" in "\n".join(lines)
    assert result.metrics["test_acc"] > 0.9


# A CIFAR-shaped ResNet-20 (width 0.25, 16x16 synthetic images) asked for 80 % in a few epochs of
# 32 steps, from the default s_init = -5: thresholds that prune nothing for the first steps, then
# sparsity that runs. The controller must land within two points of the target all the same.
SHORT_RUN = {
    "model": "resnet20", "dataset": "synthetic", "width": 0.25, "image_size": 16, "batch_size": 64,
    "lr": 0.1, "warmup_epochs": 1, "label_smoothing": 0.1, "method": "str", "target_sparsity": 0.8,
    "progress": False,
}  # fmt: skip


@pytest.mark.parametrize("epochs", [3, 5])
def test_the_controller_lands_near_the_target_on_a_short_run(tmp_path, epochs):
    result = train(TrainConfig(**SHORT_RUN, epochs=epochs, run_dir=str(tmp_path / "run")), log=lambda _: None)
    achieved = result.metrics["sparsity"]
    assert abs(achieved - 0.8) <= 0.02, [round(row["sparsity"], 4) for row in result.history]
    assert result.metrics["test_acc"] > 0.9


def test_resume_with_a_controller_is_bit_identical(tmp_path):
    changes = {"target_sparsity": 0.5, "epochs": 3}
    full, _, _ = check_resume(lambda run: _tiny(tmp_path, run, **changes), tmp_path, stop_after=2)
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    assert ckpt.extra["method"]["controller"]["updates"] > 0


def test_the_controller_strength_is_the_decay_on_s():
    """With a controller, the gradient of the extra term is (c - d) s: the total coupled decay is c."""
    model = digits_model()
    method = STR(s_init=-4.0, weight_decay=5e-4, target_sparsity=0.9)
    method.attach(model)
    method.controller.u = 2.5
    c = method.controller.strength
    reg = method.regularization(model)
    reg.backward()
    for _, layer in weight_layers(model):
        s = layer.sparsifier.s
        np.testing.assert_allclose(s.grad, (c - 5e-4) * s.data, rtol=1e-6)
    assert isinstance(model.conv1.sparsifier, SoftThreshold)
