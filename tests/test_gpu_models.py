"""Whole models on both backends (needs a CUDA GPU; skipped otherwise).

1. One training step after another (forward, backward, SGD with weight decay
   and momentum on every parameter group) of ResNet50 and MobileNetV1, dense
   and with each sparsity method, at a small batch and input size: the GPU
   and the reference give the same loss, gradients and updated parameters.
   float64 models agree to :data:`F64_RTOL`; float32 ones (full float32 GEMMs)
   to :data:`F32_RTOL` of each array's largest magnitude.
2. ``learnsparse``'s training loop on ``--device cuda`` with each method, then
   the checkpoint evaluated, reported and exported on the CPU.
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

pytestmark = pytest.mark.gpu

F64_RTOL = 1e-8
F32_RTOL = 2e-4
STEPS = 3
METHOD_SETTINGS = {
    "dense": {},
    "str": {"str_s_init": -4.0},  # a threshold that prunes from the first step
    "ltp": {"ltp_lambda": 1e-4},
    "scp": {"scp_lambda": 1e-3},
}


def _build(model_name, method_name, dtype, seed=0):
    config = TrainConfig(
        model=model_name, method=method_name, weight_decay=5e-4, **METHOD_SETTINGS[method_name]
    )
    model = build_model(
        model_name, num_classes=10, in_channels=3, rng=np.random.default_rng(seed), dtype=dtype
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


def _steps(model, method, config, batches, device):
    """``STEPS`` SGD steps; returns per step (loss, {param name: grad}) and the final parameters."""
    from reference.train import param_groups

    model.to(device)
    optimizer = SGD(
        param_groups(model, config, method), lr=0.05, momentum=0.9, weight_decay=config.weight_decay
    )
    model.train()
    trace = []
    for step, (x, y) in enumerate(batches):
        ctx = StepContext(0, step, STEPS, 1, np.random.default_rng([7, step]))
        method.before_step(model, ctx)
        x, y = to_device(x, device), to_device(y, device)
        loss = softmax_cross_entropy(model(Tensor(x)), y, label_smoothing=0.1)
        extra = method.regularization(model)
        full = loss if extra is None else loss + extra
        optimizer.zero_grad()
        full.backward()
        grads = {name: _host(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        method.after_step(model, ctx)
        trace.append((float(_host(full.data)), grads))
    params = {name: _host(p.data) for name, p in model.named_parameters()}
    buffers = {name: _host(b) for name, b in model.named_buffers()}
    return trace, params, buffers


@pytest.mark.parametrize("method_name", sorted(METHOD_SETTINGS))
@pytest.mark.parametrize("model_name", ["resnet50", "mobilenet_v1"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_training_steps_agree(model_name, method_name, dtype):
    from gpu import runtime

    rng = np.random.default_rng(3)
    batches = [
        (rng.standard_normal((4, 3, 32, 32)).astype(dtype), rng.integers(0, 10, 4)) for _ in range(STEPS)
    ]
    rtol = F64_RTOL if dtype == np.float64 else F32_RTOL
    cpu = _steps(*_build(model_name, method_name, dtype), batches, "cpu")
    with runtime.precision("fp32"):
        gpu = _steps(*_build(model_name, method_name, dtype), batches, "cuda")
    for step, ((loss_c, grads_c), (loss_g, grads_g)) in enumerate(zip(cpu[0], gpu[0])):
        assert abs(loss_g - loss_c) <= rtol * max(1.0, abs(loss_c)), f"step {step}: loss {loss_g} vs {loss_c}"
        assert sorted(grads_g) == sorted(grads_c), f"step {step}: different parameters got gradients"
        for name in grads_c:
            _close(grads_g[name], grads_c[name], rtol, f"step {step}: grad of {name}")
    for name in cpu[1]:
        _close(gpu[1][name], cpu[1][name], rtol, f"parameter {name} after {STEPS} steps")
    for name in cpu[2]:
        _close(gpu[2][name], cpu[2][name], rtol, f"buffer {name} after {STEPS} steps")


@pytest.mark.parametrize("method_name", sorted(METHOD_SETTINGS))
def test_train_on_gpu_then_use_the_checkpoint_on_cpu(method_name, tmp_path):
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


def test_device_run_matches_cpu_run_on_digits(tmp_path):
    """The same dense digits run on both devices ends at nearly the same accuracy (fp32 GEMMs)."""
    from reference.train import train

    base = TrainConfig(model="digits_cnn", epochs=2, batch_size=64, progress=False, precision="fp32")
    cpu = train(base.replace(run_dir=str(tmp_path / "cpu")), log=quiet)
    gpu = train(base.replace(run_dir=str(tmp_path / "gpu"), device="cuda"), log=quiet)
    assert abs(cpu.history[-1]["train_loss"] - gpu.history[-1]["train_loss"]) < 1e-3
    assert abs(cpu.history[-1]["test_acc"] - gpu.history[-1]["test_acc"]) <= 0.01


def test_imagefolder_trains_on_gpu(tmp_path):
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
