"""Nothing is read back from the GPU inside a training step.

A host read of a device array (``float()``, ``int()``, ``bool()``, ``.item()``,
``.get()``, ``numpy.asarray``, indexing by a boolean mask, ...) makes the host
wait until the GPU has finished everything queued so far; inside a step that
stalls every step. The proof runs on the CPU: whole training steps of a CIFAR
ResNet and of MobileNetV1 (small widths, 32x32, batch 2), dense and with every
method, with and without a target sparsity, go through the training loop on
``--device cuda`` inside the GPU stand-in of :mod:`tests.emulation`, whose host
reads raise. Only the reads that are meant to happen are allowed, by the name
of the function that makes them (:data:`ALLOWED`).

The fixes those runs rely on are also checked on their own on NumPy: the masked
running-statistics update of batch norm equals the boolean-indexing version bit
for bit; the controller's arithmetic on arrays takes the decisions of the
equations; the sparsity it measures is the count of zeros; the sorted top-k of
magnitude pruning keeps the entries the partition-based one keeps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reference import functional as F
from reference import train as training
from reference.autodiff import Tensor, no_grad
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.data import load_dataset
from reference.nn import weight_layers
from reference.sparsity.base import Dense
from reference.sparsity.control import DENSITY_FLOOR, TargetController, cubic_ramp
from reference.sparsity.learned_threshold import LTP
from reference.sparsity.magnitude import _top_k_flat, _top_k_flat_sorted
from reference.sparsity.soft_threshold import STR
from tests import emulation
from tests.common import digits_model, quiet
from tests.resume import check_resume

# --------------------------------------------------------------------------
# Batch norm: the running statistics of kept channels only (SCP)


def _masked_update_by_indexing(x, gamma, beta, running_mean, running_var, mask, momentum):
    """The masked update as boolean indexing writes it: the unmasked update's values where ``mask`` holds."""
    full_mean, full_var = running_mean.copy(), running_var.copy()
    F.batch_norm(Tensor(x), gamma, beta, full_mean, full_var, training=True, momentum=momentum)
    running_mean[mask] = full_mean[mask]
    running_var[mask] = full_var[mask]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 6, 3, 3), (5, 6)])
@pytest.mark.parametrize("which", ["random", "all", "none"])
def test_masked_running_statistics_equal_the_boolean_indexing_update(dtype, shape, which):
    rng = np.random.default_rng(list(shape) + [len(which)])
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    c = shape[1]
    mask = {"random": rng.random(c) < 0.5, "all": np.ones(c, bool), "none": np.zeros(c, bool)}[which]
    if which == "random":
        mask[:2] = [True, False]  # both kinds present
    start_mean = rng.standard_normal(c).astype(dtype)
    start_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    gamma, beta = np.ones(c, dtype), np.zeros(c, dtype)

    mean, var = start_mean.copy(), start_var.copy()
    F.batch_norm(Tensor(x), gamma, beta, mean, var, training=True, momentum=0.3, update_mask=mask)
    expected_mean, expected_var = start_mean.copy(), start_var.copy()
    _masked_update_by_indexing(x, gamma, beta, expected_mean, expected_var, mask, 0.3)

    assert mean.dtype == var.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(mean, expected_mean)  # bit for bit, both channel kinds
    np.testing.assert_array_equal(var, expected_var)
    np.testing.assert_array_equal(mean[~mask], start_mean[~mask])
    if mask.any():
        assert not np.array_equal(mean[mask], start_mean[mask])


# --------------------------------------------------------------------------
# The target-sparsity controller


def _controller_by_hand(
    measured, progress, *, target, strength0, ramp_end, kp, ki, kd, max_step, limit, unwind
):
    """Equations (1)-(6) of reference.sparsity.control, from their statement, one update per entry."""
    u_max = math.asinh(limit * math.sinh(1.0))
    u, integral, previous = 1.0, 0.0, None
    out = []
    for s, p in zip(measured, progress):
        x = min(max(p / ramp_end, 0.0), 1.0)
        r = target * (1.0 - (1.0 - x) ** 3)  # (1)
        e = math.log((1.0 - s + DENSITY_FLOOR) / (1.0 - r + DENSITY_FLOOR))  # (2)
        unwinding = integral * e < 0  # (3): back toward 0 at unwind times the rate, and no further
        candidate = integral + ki * (unwind if unwinding else 1.0) * e
        if unwinding and candidate * integral < 0:
            candidate = 0.0
        candidate = min(max(candidate, -u_max), u_max)  # (3)
        d = 0.0 if previous is None else e - previous
        goal = 1.0 + kp * e + candidate + kd * d  # (4)
        floor = -max_step if u <= 1.0 + max_step else 1.0 - u  # a strength above its start falls to it
        if floor <= goal - u <= max_step:  # (5a): integrate only while the step is free
            integral = candidate
        u = min(max(u + min(max(goal - u, floor), max_step), -u_max), u_max)  # (5)
        previous = e
        out.append((u, integral, e, strength0 * math.sinh(u) / math.sinh(1.0)))  # (6)
    return out


SETTINGS = {
    "ramp_end": 0.5,
    "kp": 5.0,
    "ki": 0.3,
    "kd": 200.0,
    "max_step": 0.2,
    "limit": 30.0,
    "unwind": 10.0,
}


def _measurements(n=110):
    """Too dense, then far too sparse, then near the ramp, then a little short of it and a little
    past it: the rate limit, both bounds, free steps, an integral wound up and wound back toward 0."""
    rng = np.random.default_rng(5)
    measured = np.concatenate(
        [
            np.full(20, 0.05),
            np.full(20, 0.999),
            rng.uniform(0.3, 0.7, 20),
            np.full(30, 0.78),
            np.full(n - 90, 0.805),
        ]
    )
    return [float(v) for v in measured], [i / n for i in range(1, n + 1)]


@pytest.mark.parametrize("kind", ["float", "array"])
def test_controller_takes_the_decisions_of_the_equations(kind):
    """Python floats (the CPU) and 0-d arrays (how the GPU keeps it) both follow (1)-(6)."""
    measured, progress = _measurements()
    expected = _controller_by_hand(measured, progress, target=0.8, strength0=2e-4, **SETTINGS)
    controller = TargetController(0.8, 2e-4, **SETTINGS)
    hit_rate_limit = hit_bound = fell_fast = held_integral = unwound = False
    for m, p, (u, integral, e, strength) in zip(measured, progress, expected):
        value = np.asarray(m, dtype=np.float64) if kind == "array" else m
        before, integral_before = float(controller.u), float(controller.integral)
        got = controller.update(value, p)
        assert (type(got) is float) == (kind == "float")  # arrays stay arrays (NumPy scalars here)
        for name, actual, wanted in (("u", controller.u, u), ("I", controller.integral, integral),
                                     ("e", controller.error, e), ("strength", got, strength)):  # fmt: skip
            assert float(actual) == pytest.approx(wanted, rel=1e-12, abs=1e-15), name
        hit_rate_limit |= abs(float(controller.u) - before) == pytest.approx(SETTINGS["max_step"])
        hit_bound |= abs(u) == pytest.approx(math.asinh(SETTINGS["limit"] * math.sinh(1.0)))
        fell_fast |= before - float(controller.u) > SETTINGS["max_step"] * 1.5 and u == pytest.approx(1.0)
        held_integral |= abs(e) > 0.1 and float(controller.integral) == integral_before
        unwound |= integral_before * e < 0 and 0.0 != float(controller.integral) != integral_before
    assert hit_rate_limit and hit_bound, "the sequence must reach the rate limit and a bound"
    assert fell_fast and held_integral, "the sequence must fall back to the start and hold the integral"
    assert unwound, "the sequence must wind the integral back toward 0"
    assert controller.updates == len(measured)
    assert controller.ramp(1.0) == cubic_ramp(1.0, 0.8, SETTINGS["ramp_end"])


def test_controller_state_from_arrays_round_trips_as_python_numbers():
    measured, progress = _measurements()
    on_arrays, on_floats = TargetController(0.8, 2e-4, **SETTINGS), TargetController(0.8, 2e-4, **SETTINGS)
    for m, p in zip(measured[:30], progress[:30]):
        on_arrays.update(np.asarray(m), p)
        on_floats.update(m, p)
    state = on_arrays.state_dict()
    assert all(type(v) is float for k, v in state.items() if k != "updates") and type(state["updates"]) is int
    assert state["u"] == float(on_arrays.u) and state["measured"] == measured[29]
    restored = TargetController(0.8, 2e-4, **SETTINGS)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    restored.place(np.zeros(1, np.float32))  # a host model: the state stays Python floats
    assert type(restored.u) is float
    for m, p in zip(measured[30:], progress[30:]):
        assert restored.update(m, p) == pytest.approx(on_floats.update(m, p), rel=1e-12)


def _pruned_digits(method):
    model = digits_model(seed=3)
    method.attach(model)
    for _, layer in weight_layers(model):  # a spread of magnitudes, some exactly 0
        w = layer.weight.data
        w[...] = np.random.default_rng(w.size).standard_normal(w.shape) * 0.1
        w.reshape(-1)[:3] = 0.0
    return model


@pytest.mark.parametrize("name", ["str", "ltp"])
def test_measured_sparsity_is_the_fraction_of_zero_effective_weights(name):
    method = (
        STR(s_init=-2.5, target_sparsity=0.5) if name == "str" else LTP(tau_init=0.004, target_sparsity=0.5)
    )
    model = _pruned_digits(method)
    model.eval()  # LTP's hard mask (4); STR's weights are the same in both modes
    with no_grad():
        effective = [layer.effective_weight().data for _, layer in weight_layers(model)]
    zeros = sum(int(np.count_nonzero(w == 0)) for w in effective)
    total = sum(w.size for w in effective)
    model.train()
    measured = method.measured_sparsity(model)
    assert type(measured) is float  # host counts: Python arithmetic, as before
    assert measured == zeros / total
    assert 0.1 < measured < 0.9


# --------------------------------------------------------------------------
# Magnitude pruning: the top-k a device computes


@pytest.mark.parametrize("seed", range(4))
def test_sorted_top_k_keeps_what_the_partition_keeps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    magnitude = rng.integers(0, 4, n).astype(np.float32)  # many ties, and zeros
    for k in range(n + 1):
        np.testing.assert_array_equal(
            _top_k_flat_sorted(magnitude, k), _top_k_flat(magnitude, k), err_msg=f"k={k}"
        )


# --------------------------------------------------------------------------
# Whole training steps on the GPU stand-in, whose host reads raise

# The reads that are meant to happen, by the function that makes them: the
# running sums every GPU_READ_EVERY steps and at the end of the epoch, and
# everything after an epoch's steps (evaluation, the method's statistics,
# metrics and checkpoints) or after the run (the model back on the host).
ALLOWED = (
    "reference.train._RunningSums.read",
    "reference.train._RunningSums.totals",
    "reference.train._finish_epoch",
    "reference.train._finish_run",
)

MODELS = {"resnet20": 0.25, "mobilenet_v1": 0.25}  # name -> width; 16x16 inputs, two steps of batch 2
METHODS = {
    "dense": {},
    "str": {"str_s_init": -4.0},  # prunes from the first step
    "str+target": {"str_s_init": -4.0, "target_sparsity": 0.5},
    "ltp": {"ltp_lambda": 1e-4},
    "ltp+target": {"ltp_lambda": 1e-4, "target_sparsity": 0.5},
    "scp": {"scp_lambda": 1e-3},
    # masks recomputed on the device before each of the two steps, per layer and global
    "magnitude": {"target_sparsity": 0.5, "prune_end_epoch": 1, "prune_frequency": 1},
    "gmp": {"target_sparsity": 0.5, "prune_end_epoch": 1, "prune_frequency": 1, "prune_scope": "global"},
}


def _tiny_data(size: int = 16, train: int = 4):
    return load_dataset(
        "synthetic", seed=0, image_shape=(3, size, size), num_classes=2, train_size=train, test_size=2
    )


def _device_config(tmp_path, model: str, method: str, run: str = "run", **changes):
    settings = dict(METHODS[method])
    settings.update(
        model=model, method=method.split("+")[0], width=MODELS[model], dataset="synthetic",
        num_classes=2, image_size=16, epochs=1, batch_size=2, eval_batch_size=2, lr=0.01, per_step=True,
        device="cuda", progress=False, run_dir=str(tmp_path / run),
    )  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_training_steps_read_nothing_back_from_the_device(model, method, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "GPU_READ_EVERY", 2)  # the periodic read happens, by its allowed name
    config, data = _device_config(tmp_path, model, method), _tiny_data()
    with emulation.device(), emulation.no_host_reads(allow=ALLOWED):
        result = training.train(config, data=data, log=quiet)
    assert result.metrics["epoch"] == 1 and math.isfinite(result.metrics["train_loss"])
    if "target" in method:  # the controller ran inside the steps, on the device
        assert load_checkpoint(result.checkpoint).extra["method"]["controller"]["updates"] == 2


def test_a_read_inside_a_step_is_caught_and_named(tmp_path):
    """The guard is live: one ``float()`` of a device value in a method's hook stops the run, named."""

    class ReadingDense(Dense):
        def after_step(self, model, ctx):
            float(next(iter(model.parameters())).data.sum())

    config = _device_config(tmp_path, "resnet20", "dense")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reference.build.build_method", lambda config, budget=None: ReadingDense())
        with emulation.device(), emulation.no_host_reads(allow=ALLOWED):
            with pytest.raises(emulation.HostRead, match=r"float\(\).* in .*ReadingDense\.after_step"):
                training.train(config, data=_tiny_data(), log=quiet)


def test_the_controller_on_the_device_resumes_bit_identically(tmp_path):
    """An interrupted and resumed device run with a controller ends where the uninterrupted one does."""

    def make(run):
        return _device_config(
            tmp_path,
            "resnet20",
            "str+target",
            run,
            epochs=3,
            batch_size=4,
            train_size=8,
            test_size=2,
            image_size=8,
        )

    with emulation.device(), emulation.no_host_reads(allow=ALLOWED):  # resuming reads nothing either
        check_resume(make, tmp_path, stop_after=2)
    interrupted = load_checkpoint(tmp_path / "part" / "checkpoint.npz")  # after the resume: all 3 epochs
    controller = interrupted.extra["method"]["controller"]
    assert controller["updates"] == 6 and all(
        type(v) is float for k, v in controller.items() if k != "updates"
    )
