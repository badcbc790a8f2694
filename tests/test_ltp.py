"""LTP (learned threshold pruning) as a training-loop method: masks, L0, preconditioning, trail, controller."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference.sparsity.learned_threshold as ltp_module
from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.errors import ConfigError
from reference.models import build_model
from reference.nn import weight_layers
from reference.sparsity import StepContext, build_method
from reference.sparsity.learned_threshold import BAND, LTP, LearnedThreshold, pick_from_trail
from reference.train import param_groups, train
from tests.common import digits_batch, digits_model, quiet
from tests.resume import check_resume


def _temperature(w: np.ndarray, t0: float) -> float:
    """T = t0 var(|W|), from the paper's rule."""
    return t0 * float(np.var(np.abs(w.astype(np.float64))))


def _soft_mask(w: np.ndarray, tau: float, t: float) -> np.ndarray:
    z = (w.astype(np.float64) ** 2 - tau) / t
    return 1.0 / (1.0 + np.exp(-z))


def _with_thresholds(model, t0: float = 1.0, **kwargs) -> LTP:
    """LTP on ``model`` with each tau at the median of its layer's squared weights (half pruned)."""
    method = LTP(t0=t0, **kwargs)
    method.attach(model)
    for _, layer in weight_layers(model):
        layer.sparsifier.tau.data[...] = np.median(layer.weight.data.astype(np.float64) ** 2)
    return method


def _tiny(tmp_path, name: str = "run", **changes) -> TrainConfig:
    settings = {
        "method": "ltp", "epochs": 3, "width": 0.5, "batch_size": 64, "lr": 0.05,
        "progress": False, "run_dir": str(tmp_path / name),
    }  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def test_the_module_names_the_patent():
    assert "US 11,704,571 B2" in ltp_module.__doc__ and "research and teaching" in ltp_module.__doc__


# --------------------------------------------------------------------- attach


@pytest.mark.parametrize(("name", "width"), [("digits_cnn", 0.5), ("mobilenet_v1", 0.25)])
def test_attach_adds_one_threshold_per_weight_layer(name, width):
    model = build_model(name, width=width)
    before = model.state_dict()
    layers = [n for n, _ in weight_layers(model)]
    build_method(TrainConfig(method="ltp", ltp_tau_init=1e-4)).attach(model)
    after = model.state_dict()
    added = [k for k in after if k not in before]
    assert added == [f"{n}.sparsifier.tau" for n in layers]
    assert all(after[k].shape == () and after[k] == np.float32(1e-4) for k in added)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_thresholds_have_their_own_group_and_decay():
    cfg = TrainConfig(method="ltp", weight_decay=5e-4, threshold_decay=0.0)
    model = digits_model()
    method = build_method(cfg)
    method.attach(model)
    weights, thresholds = param_groups(model, cfg, method)
    assert (weights["name"], thresholds["name"]) == ("weights", "thresholds")
    assert weights["weight_decay"] == 5e-4 and thresholds["weight_decay"] == 0.0
    assert [id(p) for p in thresholds["params"]] == [
        id(layer.sparsifier.tau) for _, layer in weight_layers(model)
    ]


# --------------------------------------------------------------------- masks


def test_training_uses_the_soft_mask_and_evaluation_the_hard_one():
    sparse, soft, hard = digits_model(), digits_model(), digits_model()
    _with_thresholds(sparse, t0=0.5)
    for (_, ls), (_, lsoft), (_, lhard) in zip(
        weight_layers(sparse), weight_layers(soft), weight_layers(hard)
    ):
        w, tau = ls.weight.data, float(ls.sparsifier.tau.data)
        assert ls.sparsifier.temperature(ls.weight) == pytest.approx(_temperature(w, 0.5), rel=1e-12)
        lsoft.weight.data[...] = (w * _soft_mask(w, tau, _temperature(w, 0.5))).astype(np.float32)
        lhard.weight.data[...] = np.where(w.astype(np.float64) ** 2 > tau, w, 0)
    x, _ = digits_batch()
    # BN in evaluation mode in all three, so only the sparsifier's mode differs
    for model in (soft, hard):
        model.eval()
    sparse.eval()
    for _, layer in weight_layers(sparse):
        layer.sparsifier.train()
    with no_grad():
        np.testing.assert_allclose(sparse(Tensor(x)).numpy(), soft(Tensor(x)).numpy(), rtol=1e-4, atol=1e-5)
    sparse.eval()
    with no_grad():
        np.testing.assert_array_equal(sparse(Tensor(x)).numpy(), hard(Tensor(x)).numpy())


def test_no_gradient_reaches_tau_in_evaluation_mode():
    model = digits_model()
    _with_thresholds(model)
    model.eval()
    x, y = digits_batch()
    F.softmax_cross_entropy(model(Tensor(x)), y).backward()
    for _, layer in weight_layers(model):
        assert layer.sparsifier.tau.grad is None
        assert layer.weight.grad is not None


def test_temperature_is_floored_for_a_constant_weight():
    sp = LearnedThreshold(0.0, 1.0)
    w = Tensor(np.full((3, 2), 0.5, np.float32))
    assert sp.temperature(w) == float(np.finfo(np.float32).tiny)
    sp.eval()
    np.testing.assert_array_equal(sp(w).numpy(), w.numpy())  # 0.25 > 0: kept


# ---------------------------------------------------------------------- L0


@pytest.mark.parametrize("weight_grad", [True, False])
def test_regularization_is_lambda_times_the_sum_of_the_masks(weight_grad):
    model = digits_model()
    method = _with_thresholds(model, t0=0.7, lam=3e-5, l0_weight_grad=weight_grad)
    expected = 0.0
    for _, layer in weight_layers(model):
        w = layer.weight.data
        expected += _soft_mask(w, float(layer.sparsifier.tau.data), _temperature(w, 0.7)).sum()
    reg = method.regularization(model)
    assert reg.item() == pytest.approx(3e-5 * expected, rel=1e-5)
    reg.backward()
    for _, layer in weight_layers(model):
        assert (layer.weight.grad is not None) == weight_grad
        assert layer.sparsifier.tau.grad < 0  # more threshold, fewer weights: L0 falls
    assert LTP(lam=0.0).regularization(model) is None


def test_preconditioning_scales_only_the_gradient_of_tau():
    x, y = digits_batch()
    grads, outputs = [], []
    for precondition in (True, False):
        model = digits_model()
        _with_thresholds(model, precondition=precondition)
        out = model(Tensor(x))
        F.softmax_cross_entropy(out, y).backward()
        outputs.append(out.numpy())
        grads.append(
            [
                (layer.sparsifier.tau.grad, layer.weight.grad, layer.weight.data)
                for _, layer in weight_layers(model)
            ]
        )
    np.testing.assert_array_equal(outputs[0], outputs[1])  # (6) leaves the value of tau exact
    for (tau_k, w_k, w), (tau_1, w_1, _) in zip(*grads):
        k = float(np.mean(w.astype(np.float64) ** 2)) ** 2
        assert float(tau_k) == pytest.approx(k * float(tau_1), rel=1e-5)
        np.testing.assert_array_equal(w_k, w_1)


# ----------------------------------------------------------------- end_epoch


def test_end_epoch_reports_densities_band_tau_and_temperature():
    model = digits_model()
    method = _with_thresholds(model, t0=0.5)
    stats = method.end_epoch(model, StepContext(0, 0, 1, 1, np.random.default_rng(0)))
    zeros = total = 0
    for name, layer in weight_layers(model):
        w, tau = layer.weight.data, float(layer.sparsifier.tau.data)
        t = _temperature(w, 0.5)
        z = (w.astype(np.float64) ** 2 - tau) / t
        row = stats["layers"][name]
        assert row["tau"] == pytest.approx(tau) and row["temperature"] == pytest.approx(t)
        assert row["soft_density"] == pytest.approx(_soft_mask(w, tau, t).mean(), rel=1e-6)
        assert row["hard_density"] == pytest.approx(np.mean(w * w > np.float32(tau)))
        assert row["band"] == pytest.approx(np.mean(np.abs(z) < BAND))
        assert 0.3 < row["sparsity"] < 0.7  # tau at the median of W^2
        zeros, total = zeros + int((np.where(w * w > np.float32(tau), w, 0) == 0).sum()), total + w.size
    assert stats["sparsity"] == pytest.approx(zeros / total)
    assert set(stats) >= {"sparsity", "target_sparsity", "soft_density", "hard_density", "band", "lambda"}
    json.dumps(stats)


# --------------------------------------------------------------------- trail


def _fake_run(tmp_path, rows, trail_epochs=None):
    run = tmp_path / "fake"
    (run / "trail").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        if trail_epochs is None or r["epoch"] in trail_epochs:
            (run / "trail" / f"epoch_{r['epoch']:03d}.npz").write_bytes(b"")
    return run


def test_pick_from_trail_takes_the_most_accurate_snapshot_that_is_sparse_enough(tmp_path):
    rows = [
        {"epoch": 1, "sparsity": 0.50, "test_acc": 0.99},
        {"epoch": 2, "sparsity": 0.80, "test_acc": 0.97},
        {"epoch": 3, "sparsity": 0.85, "test_acc": 0.98},
        {"epoch": 4, "sparsity": 0.90, "test_acc": 0.98},
        {"epoch": 5, "sparsity": 0.95, "test_acc": 0.90},
    ]
    run = _fake_run(tmp_path, rows)
    assert pick_from_trail(run, 0.8).name == "epoch_004.npz"  # tie at 0.98: the sparser one
    assert pick_from_trail(run, 0.9).name == "epoch_004.npz"
    assert pick_from_trail(run, 0.91).name == "epoch_005.npz"
    assert pick_from_trail(run, 0.0).name == "epoch_001.npz"
    with pytest.raises(ConfigError, match=r"no trail checkpoint .* 96\.00%.*epoch 5 at 95\.00%"):
        pick_from_trail(run, 0.96)
    with pytest.raises(ConfigError, match="target sparsity"):
        pick_from_trail(run, 1.0)


def test_pick_from_trail_only_considers_snapshots_that_exist(tmp_path):
    rows = [{"epoch": 1, "sparsity": 0.9, "test_acc": 0.99}, {"epoch": 2, "sparsity": 0.9, "test_acc": 0.9}]
    assert pick_from_trail(_fake_run(tmp_path, rows, trail_epochs={2}), 0.5).name == "epoch_002.npz"
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        pick_from_trail(tmp_path / "nowhere", 0.5)


def test_training_keeps_a_trail_and_logs_the_band(tmp_path):
    result = train(_tiny(tmp_path, epochs=2), log=quiet)
    run = result.run_dir
    assert sorted(p.name for p in (run / "trail").iterdir()) == ["epoch_001.npz", "epoch_002.npz"]
    rows = [json.loads(x) for x in (run / "layers.jsonl").read_text().splitlines()]
    assert {"band", "soft_density", "hard_density", "lambda"} <= set(rows[-1])
    assert set(rows[-1]["layers"]) == {n for n, _ in weight_layers(result.model)}
    snap = load_checkpoint(run / "trail" / "epoch_002.npz")
    assert snap.epoch == 2 and "conv1.sparsifier.tau" in snap.model_state
    best = max(result.history, key=lambda r: (r["test_acc"], r["sparsity"], r["epoch"]))
    assert pick_from_trail(run, 0.0).name == f"epoch_{best['epoch']:03d}.npz"


# ----------------------------------------------------------------- settings


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="ltp_t0"):
        TrainConfig(method="ltp", ltp_t0=0.0)
    with pytest.raises(ConfigError, match="ltp_t0"):
        LTP(t0=-1.0)
    with pytest.raises(ConfigError, match="ltp_t0"):
        LearnedThreshold(0.0, 0.0)
    with pytest.raises(ConfigError, match="threshold_decay"):
        TrainConfig(method="ltp", threshold_decay=-1.0)
    with pytest.raises(ConfigError, match="ltp_lambda"):
        LTP(lam=-1e-5)
    with pytest.raises(ConfigError, match="ltp_lambda must be positive with target_sparsity"):
        LTP(lam=0.0, target_sparsity=0.5)


# ---------------------------------------------------------------- controller


def test_target_run_reaches_the_target_and_logs_requested_and_achieved(tmp_path):
    lines: list[str] = []
    result = train(
        _tiny(tmp_path, epochs=10, width=1.0, batch_size=32, target_sparsity=0.8), log=lines.append
    )
    assert abs(result.metrics["sparsity"] - 0.8) < 0.03, result.history
    rows = [json.loads(x) for x in (tmp_path / "run" / "layers.jsonl").read_text().splitlines()]
    assert (
        all(r["target_sparsity"] == 0.8 for r in rows) and rows[-1]["sparsity"] == result.metrics["sparsity"]
    )
    assert "sparsity: requested 80.00%, achieved" in "\n".join(lines)
    assert result.metrics["test_acc"] > 0.9


def test_resume_with_a_controller_is_bit_identical(tmp_path):
    changes = {"target_sparsity": 0.5, "epochs": 3}
    check_resume(lambda run: _tiny(tmp_path, run, **changes), tmp_path, stop_after=2)
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    assert ckpt.extra["method"]["controller"]["updates"] > 0
    assert sorted(p.name for p in (tmp_path / "part" / "trail").iterdir()) == [
        "epoch_001.npz", "epoch_002.npz", "epoch_003.npz",
    ]  # fmt: skip


# ------------------------------------------------------------- tiny temperatures, both kernel sets
# reference.ops.sparsity, "Tiny temperatures": T_w (T in w's dtype) divides last and (8), (10),
# (12), (14) saturate at the dtype's largest finite value (23); a T that rounds to 0 is rejected.
TINY = [
    (np.float32, 5.8e-39),  # just below 2 / max(float32) = 5.88e-39: 2/T overflows
    (np.float32, 1e-45),  # the smallest positive float32 (a subnormal)
    (np.float64, 1e-310),  # a float64 subnormal
    (np.float64, 5e-324),  # the smallest positive float64
]


@pytest.fixture(params=["reference", pytest.param("gpu", marks=pytest.mark.gpu), "emulated"])
def kernel_set(request):
    """The kernel set under test: the reference, the twin on a GPU, or the twin on the emulated device."""
    if request.param != "emulated":
        yield request.param
        return
    from tests import emulation

    with emulation.device():
        yield "gpu"


def _kernel_set(name: str):
    """``(ops module, to_device, to_host)`` of one kernel set."""
    if name == "reference":
        import reference.ops as ops

        return ops, np.asarray, np.asarray
    import cupy

    import gpu.ops as ops

    return ops, cupy.asarray, lambda a: np.asarray(a.get())


def _saturated(value: np.ndarray, dtype) -> np.ndarray:
    """(23) on a float64 value computed from the formula: clipped to dtype's finite range, in dtype."""
    big = float(np.finfo(dtype).max)
    return np.clip(np.asarray(value, np.float64), -big, big).astype(dtype)


@pytest.mark.parametrize("dtype, temperature", TINY)
def test_ltp_at_a_tiny_temperature_gives_finite_gradients_that_saturate_at_the_threshold(
    kernel_set, dtype, temperature
):
    ops, to_device, to_host = _kernel_set(kernel_set)
    t_w = float(dtype(temperature))  # the temperature the kernels divide by
    # w[0]^2 == tau exactly (z = 0, m = 1/2, q = 1/4); every other weight is far outside the band
    # (|z| >= 0.01 / T: m exactly 0 or 1 and q exactly 0), 1e20 with a square that overflows float32.
    w = np.array([0.5, -0.6, 0.1, 0.0, 2.0, -1e20], dtype)
    tau = np.asarray(0.25, dtype)
    dy = np.array([0.7, -1.3, 0.4, 0.9, -0.2, 1.1], dtype)
    outside = np.arange(w.size) > 0
    m_outside = (w.astype(np.float64) ** 2 > 0.25)[outside].astype(dtype)  # exactly 0 or 1 there

    y, cache = ops.ltp_mask_forward(to_device(w), to_device(tau), temperature)
    y = to_host(y)
    assert y[0] == w[0] / 2, "W^2 == tau: m = 1/2 whatever T is"
    np.testing.assert_array_equal(y[outside], w[outside] * m_outside)

    dw, dtau, _ = ops.ltp_mask_backward(to_device(dy), cache)
    dw, dtau = to_host(dw), to_host(dtau)
    assert np.all(~np.isnan(dw)) and not np.isnan(dtau)
    np.testing.assert_array_equal(dw[outside], dy[outside] * m_outside)  # (8) with q = 0: exactly G m
    at_threshold = 0.7 * 0.5 + 2 * 0.7 * (0.5 * 0.25) * 0.5 / t_w  # (8): G (m + 2 W^2 q / T)
    np.testing.assert_allclose(dw[0], _saturated(at_threshold, dtype), rtol=1e-6)
    np.testing.assert_allclose(dtau, _saturated(-(0.25 * 0.7 * 0.5) / t_w, dtype), rtol=1e-6)  # (10)
    assert np.isfinite(dw).all() and np.isfinite(dtau)

    l0, cache = ops.ltp_l0_forward(to_device(w), to_device(tau), temperature)
    assert to_host(l0) == 0.5 + m_outside.sum()
    dw, dtau, _ = ops.ltp_l0_backward(to_device(np.asarray(1.5, dtype)), cache)
    dw, dtau = to_host(dw), to_host(dtau)
    np.testing.assert_array_equal(dw[outside], 0.0)  # (12) with q = 0: exactly 0, never 0 * inf
    np.testing.assert_allclose(dw[0], _saturated(2 * 1.5 * 0.5 * 0.25 / t_w, dtype), rtol=1e-6)  # (12)
    np.testing.assert_allclose(dtau, _saturated(-(1.5 * 0.25) / t_w, dtype), rtol=1e-6)  # (14)
    assert np.isfinite(dw).all() and np.isfinite(dtau)


def test_the_tiny_temperature_cases_reach_both_regimes():
    """The cases above cover a finite value beyond 2/T's range and a saturated one, in each dtype."""
    finite = [(d, t) for d, t in TINY if 0.0875 / float(d(t)) < float(np.finfo(d).max)]
    assert finite == [(np.float32, 5.8e-39)]  # 2/T alone would overflow, the gradient does not
    assert all(2.0 / float(d(t)) > float(np.finfo(d).max) for d, t in TINY)


@pytest.mark.parametrize("forward", ["ltp_mask_forward", "ltp_l0_forward"])
def test_ltp_rejects_a_temperature_that_rounds_to_zero_in_the_weights_dtype(kernel_set, forward):
    ops, to_device, _ = _kernel_set(kernel_set)
    w, tau = np.full(3, 0.5, np.float32), np.asarray(0.25, np.float32)
    with pytest.raises(ConfigError, match=r"temperature 1e-46 rounds to 0 in float32.*1\.4e-45"):
        getattr(ops, forward)(to_device(w), to_device(tau), 1e-46)
    # the same T is a float64 subnormal, and float64 weights accept it
    y, _ = getattr(ops, forward)(to_device(w.astype(np.float64)), to_device(tau.astype(np.float64)), 1e-46)
    assert np.isfinite(_kernel_set(kernel_set)[2](y)).all()
