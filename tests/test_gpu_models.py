"""Whole models on both backends (needs a CUDA GPU; skipped otherwise).

1. Three training steps in a row (forward, backward, SGD with weight decay
   and momentum on every parameter group) of ResNet50 and MobileNetV1, dense
   and with each sparsity method, at a small batch and input size, in
   float64: the GPU and the reference give the same loss, gradients, updated
   parameters and running statistics at every step, to :data:`F64_RTOL` of
   each array's largest magnitude.

   After each step's comparison the GPU model is given the reference's
   parameters again (the optimizer's momentum carries on unaligned). Without
   that, rounding differences grow by about 10^3 per step: batch norm over a
   batch of 4 at these sizes makes training chaotic. A relative 1e-13 change
   of one weight moves the gradients by 1e-6 after two steps at learning rate
   0.05 on 32x32 inputs (still 3e-9 at 1e-3 on 64x64 for ResNet50), so free
   trajectories could not be compared tightly however right the kernels are.

   The same conditioning rules out a whole-model comparison in float32: two
   correct float32 implementations of these tiny-batch networks differ in a
   first-layer gradient by up to a few per cent, and by several times their
   own error against float64 (measured with the depthwise kernel that is,
   op by op, five times more accurate than the reference's). float32 is
   checked op by op (``tests/test_gpu_agreement.py``, stated tolerances) and
   on a well-conditioned real run, the digits model trained on both devices
   (``test_device_run_matches_cpu_run_on_digits``).
   These steps run on two backends (the ``gpu_backend`` fixture): the CUDA
   device (marker ``gpu``) at :data:`SIZES` ``["device"]``, and the CPU
   execution mode of ``tests/emulation`` (always, in CI) at a quarter of the
   width and two steps, which keeps every kernel path (im2col, pointwise,
   depthwise, batch norm, pooling, loss, the sparsity kernels, the fused SGD)
   at a cost CI can carry (about 30 s for the eight runs on 2 cores). The input
   size and batch stay: at 32x32 or a batch of 2, ResNet-50's last batch norms
   see 2 values per channel and the gradients lose the digits compared here.
2. ``learnsparse``'s training loop on ``--device cuda`` with each method, then
   the checkpoint evaluated, reported, finalized, exported and resumed on the
   CPU; the digits run on both devices; an imagefolder tree on the device. These
   run on the device and on the emulated one (about a minute in all in CI).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.autodiff import Tensor
from reference.backend import to_device
from reference.config import TrainConfig
from reference.functional import softmax_cross_entropy
from reference.models import build_model
from reference.optim import SGD
from reference.sparsity import StepContext, build_method
from tests.common import quiet

F64_RTOL = 1e-8
LR = 1e-3
SIZES = {  # (input size, batch, steps, width multiplier) per backend
    "device": (64, 4, 3, 1.0),
    "emulated": (64, 4, 2, 0.25),
}
METHOD_SETTINGS = {
    "dense": {},
    "str": {"str_s_init": -4.0},  # a threshold that prunes from the first step
    "ltp": {"ltp_lambda": 1e-4},
    "scp": {"scp_lambda": 1e-3},
}


def _build(model_name, method_name, dtype, width, seed=0):
    config = TrainConfig(
        model=model_name, method=method_name, weight_decay=5e-4, **METHOD_SETTINGS[method_name]
    )
    model = build_model(
        model_name, num_classes=10, in_channels=3, width=width, rng=np.random.default_rng(seed), dtype=dtype
    )
    method = build_method(config)
    method.attach(model)
    return model, method, config


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _close(actual, expected, rtol, what):
    actual, expected = _host(actual), _host(expected)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


class _Run:
    """One backend's model, method and optimizer, stepped one batch at a time."""

    def __init__(self, model_name, method_name, dtype, device, width, steps):
        from reference.train import param_groups

        self.model, self.method, config = _build(model_name, method_name, dtype, width)
        self.steps = steps
        self.device = device
        self.model.to(device)
        self.optimizer = SGD(
            param_groups(self.model, config, self.method),
            lr=LR,
            momentum=0.9,
            weight_decay=config.weight_decay,
        )
        self.model.train()

    def step(self, step: int, x, y):
        """One training step; returns (loss, {name: grad}, {name: parameter or buffer after it})."""
        ctx = StepContext(0, step, self.steps, 1, np.random.default_rng([7, step]))  # the same noise on both
        self.method.before_step(self.model, ctx)
        x, y = to_device(x, self.device), to_device(y, self.device)
        loss = softmax_cross_entropy(self.model(Tensor(x)), y, label_smoothing=0.1)
        extra = self.method.regularization(self.model)
        full = loss if extra is None else loss + extra
        self.optimizer.zero_grad()
        full.backward()
        grads = {name: _host(p.grad) for name, p in self.model.named_parameters() if p.grad is not None}
        self.optimizer.step()
        self.method.after_step(self.model, ctx)
        return float(_host(full.data)), grads, self.model.state_dict()


def _batches(dtype, size, batch, steps):
    rng = np.random.default_rng(3)
    return [
        (rng.standard_normal((batch, 3, size, size)).astype(dtype), rng.integers(0, 10, batch))
        for _ in range(steps)
    ]


@pytest.mark.parametrize("method_name", sorted(METHOD_SETTINGS))
@pytest.mark.parametrize("model_name", ["resnet50", "mobilenet_v1"])
def test_training_steps_agree_float64(model_name, method_name, gpu_backend):
    from gpu import runtime

    size, batch, steps, width = SIZES[gpu_backend]
    cpu = _Run(model_name, method_name, np.float64, "cpu", width, steps)
    with runtime.precision("fp32"):
        gpu = _Run(model_name, method_name, np.float64, "cuda", width, steps)
        for step, (x, y) in enumerate(_batches(np.float64, size, batch, steps)):
            loss_c, grads_c, state_c = cpu.step(step, x, y)
            loss_g, grads_g, state_g = gpu.step(step, x, y)
            assert abs(loss_g - loss_c) <= F64_RTOL * max(1.0, abs(loss_c)), (
                f"step {step}: {loss_g} vs {loss_c}"
            )
            assert sorted(grads_g) == sorted(grads_c), f"step {step}: different parameters got gradients"
            for name in grads_c:
                _close(grads_g[name], grads_c[name], F64_RTOL, f"step {step}: grad of {name}")
            for name in state_c:
                _close(state_g[name], state_c[name], F64_RTOL, f"step {step}: {name} after the update")
            gpu.model.load_state_dict(state_c)  # re-align (see the module docstring)


@pytest.mark.parametrize("method_name", sorted(METHOD_SETTINGS))
def test_train_on_gpu_then_use_the_checkpoint_on_cpu(gpu_backend, method_name, tmp_path):
    """``train --device cuda`` writes the reference's checkpoint: eval, report, finalize, export on the CPU."""
    from reference.cli import main
    from reference.train import train

    config = TrainConfig(
        model="digits_cnn", epochs=2, batch_size=64, method=method_name, device="cuda", progress=False,
        run_dir=str(tmp_path / "run"), **METHOD_SETTINGS[method_name],
    )  # fmt: skip
    result = train(config, log=quiet)
    assert result.history[-1]["test_acc"] > 0.5, result.history
    ckpt = str(result.checkpoint)
    assert main(["eval", ckpt]) == 0
    assert main(["report", ckpt, "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    assert main(["finalize", ckpt, "--output", str(tmp_path / "final.npz")]) == 0
    assert main(["export", str(tmp_path / "final.npz"), "--output", str(tmp_path / "model.safetensors")]) == 0
    resumed = train(config.replace(epochs=3, device="cpu"), resume=ckpt, log=quiet)
    assert resumed.history[-1]["epoch"] == 3


def test_device_run_matches_cpu_run_on_digits(gpu_backend, tmp_path):
    """The same dense digits run on both devices ends at nearly the same accuracy (fp32 GEMMs)."""
    from reference.train import train

    base = TrainConfig(model="digits_cnn", epochs=2, batch_size=64, progress=False, precision="fp32")
    cpu = train(base.replace(run_dir=str(tmp_path / "cpu")), log=quiet)
    gpu = train(base.replace(run_dir=str(tmp_path / "gpu"), device="cuda"), log=quiet)
    assert abs(cpu.history[-1]["train_loss"] - gpu.history[-1]["train_loss"]) < 1e-3
    assert abs(cpu.history[-1]["test_acc"] - gpu.history[-1]["test_acc"]) <= 0.01


def test_imagefolder_trains_on_gpu(gpu_backend, tmp_path):
    """An imagefolder tree: uint8 batches from the workers, normalised on the device."""
    from reference.train import train
    from tests.test_imagefolder import _make_tree

    root = _make_tree(tmp_path / "tree", train=8, val=4)
    config = TrainConfig(
        model="resnet18", dataset="imagefolder", data_root=str(root), image_size=64, epochs=1, batch_size=4,
        workers=2, device="cuda", progress=False, run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(config, log=quiet)
    assert np.isfinite(result.history[-1]["train_loss"])
