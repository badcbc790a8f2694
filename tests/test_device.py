"""The device switch on a machine of any kind: clear errors without a GPU, and the host side of moving models."""

from __future__ import annotations

import numpy as np
import pytest

import gpu
from reference.backend import check_device, copy_into, like, to_device, to_host
from reference.cli import main
from reference.config import TrainConfig
from reference.errors import ConfigError
from tests.common import digits_model

NO_GPU = not gpu.available()


def test_gpu_package_imports_without_a_gpu():
    assert isinstance(gpu.available(), bool)
    if NO_GPU:
        with pytest.raises(gpu.DeviceUnavailable, match="device 'cuda' is not available: .*use --device cpu"):
            gpu.require()


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: the error path cannot be seen")
def test_train_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--epochs", "1", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("learnsparse: error: device 'cuda' is not available:"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not run_dir.exists(), "nothing may be written when the device is missing"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--device", "tpu", "device must be 'cpu' or 'cuda', got 'tpu'"),
     ("--precision", "fp16", "precision must be one of 'tf32', 'fp32', 'bf16', got 'fp16'")],
)  # fmt: skip
def test_bad_device_settings_exit_2(flag, value, message, capsys, tmp_path):
    assert main(["train", flag, value, "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_check_device_names_the_value():
    assert check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, got 'gpu'"):
        check_device("gpu")


def test_device_and_precision_may_change_on_resume():
    from reference.train import RESUMABLE_CHANGES

    assert {"device", "precision"} <= RESUMABLE_CHANGES
    assert TrainConfig(device="cuda", precision="bf16").to_dict()["device"] == "cuda"  # valid without a GPU


def test_module_to_cpu_keeps_parameters_and_values():
    model = digits_model()
    params = list(model.parameters())
    before = model.state_dict()
    params[0].grad = np.ones_like(params[0].data)
    assert model.to("cpu") is model
    assert list(model.parameters()) == params, "the Parameter objects must survive a move"
    assert params[0].grad is None, "a move drops gradients"
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, got 'tpu'"):
        model.to("tpu")


def test_backend_helpers_on_host_arrays():
    a = np.arange(6.0).reshape(2, 3)
    assert to_host(a) is a or np.shares_memory(to_host(a), a)
    assert to_device(a, "cpu") is a or np.array_equal(to_device(a, "cpu"), a)
    assert isinstance(like([1, 2], a), np.ndarray)
    dst = np.zeros((2, 3), dtype=np.float32)
    copy_into(dst, a)
    assert dst.dtype == np.float32 and np.array_equal(dst, a)


class _DeviceArrayDouble:
    """Stands in for a CuPy array where only ``set`` (a host-to-device copy) matters."""

    __module__ = "cupy._double"

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def set(self, host):  # CuPy's ndarray.set refuses any change of shape
        assert isinstance(host, np.ndarray) and host.shape == self.shape, (host.shape, self.shape)
        self.array[...] = host


@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_copy_into_a_device_array_keeps_the_shape(shape):
    """A 0-d buffer (BN's num_batches_tracked) must stay 0-d on its way to the device."""
    dst = _DeviceArrayDouble(np.zeros(shape, dtype=np.int64))
    copy_into(dst, np.full(shape, 7))
    assert np.all(dst.array == 7)


def test_host_copy_is_an_independent_host_model():
    model = digits_model()
    next(model.parameters()).grad = np.ones_like(next(model.parameters()).data)
    twin = model.host_copy()
    before = model.state_dict()
    assert all(np.array_equal(before[k], v) for k, v in twin.state_dict().items())
    assert all(p.grad is None for p in twin.parameters())
    next(twin.parameters()).data += 1.0
    assert np.array_equal(model.state_dict()[next(iter(before))], before[next(iter(before))]), (
        "the copy shares memory"
    )
    assert next(model.parameters()).grad is not None, "the original keeps its gradient"
