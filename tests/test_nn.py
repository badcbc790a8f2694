"""Modules and layers: registration, names, modes, checkpoints, input checks, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.errors import CheckpointError, ConfigError, ShapeError
from reference.models import build_model
from reference.nn import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Identity,
    Linear,
    MaxPool2d,
    Module,
    Parameter,
    ReLU,
    Sequential,
    weight_layers,
)


class Block(Module):
    def __init__(self, rng):
        super().__init__()
        self.conv = Conv2d(2, 4, 3, padding=1, rng=rng)
        self.bn = BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Toy(Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.scale = Parameter(np.ones((), dtype=np.float32))
        self.register_buffer("steps", np.zeros((), dtype=np.int64))
        self.body = Sequential(Block(rng), Identity())
        self.pool = GlobalAvgPool2d()
        self.fc = Linear(4, 3, rng=rng)

    def forward(self, x):
        return self.fc(self.pool(self.body(x))) * self.scale


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ registration


def test_parameters_buffers_and_modules_have_dotted_names_in_state_dict_order():
    toy = Toy()
    assert [n for n, _ in toy.named_parameters()] == [
        "scale",
        "body.0.conv.weight",
        "body.0.bn.weight",
        "body.0.bn.bias",
        "fc.weight",
        "fc.bias",
    ]
    assert [n for n, _ in toy.named_buffers()] == [
        "steps",
        "body.0.bn.running_mean",
        "body.0.bn.running_var",
        "body.0.bn.num_batches_tracked",
    ]
    assert [n for n, _ in toy.named_modules()] == [
        "",
        "body",
        "body.0",
        "body.0.conv",
        "body.0.bn",
        "body.1",
        "pool",
        "fc",
    ]
    assert [type(m).__name__ for m in toy.children()] == ["Sequential", "GlobalAvgPool2d", "Linear"]
    # own parameters, own buffers, then children: torchvision's order
    assert list(toy.state_dict()) == [
        "scale",
        "steps",
        "body.0.conv.weight",
        "body.0.bn.weight",
        "body.0.bn.bias",
        "body.0.bn.running_mean",
        "body.0.bn.running_var",
        "body.0.bn.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ]
    assert all(isinstance(p, Parameter) and p.requires_grad for p in toy.parameters())


def test_absent_bias_is_not_a_parameter_and_reassignment_moves_tables():
    conv = Conv2d(2, 3, 1)
    assert conv.bias is None
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    conv.bias = Parameter(np.zeros(3, dtype=np.float32))
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    conv.bias = None
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    with pytest.raises(TypeError, match="weight is a parameter"):
        conv.weight = np.zeros((3, 2, 1, 1), dtype=np.float32)
    bn = BatchNorm2d(3)
    with pytest.raises(TypeError, match="running_mean is a buffer"):
        bn.running_mean = [0.0, 0.0, 0.0]


def test_shared_parameter_is_listed_once():
    a = Linear(3, 3)
    seq = Sequential(a, ReLU(), a)
    assert len(list(seq.parameters())) == 2
    assert list(seq.state_dict()) == ["0.weight", "0.bias"]


def test_sequential_indexing_and_weight_layers():
    seq = Sequential(Conv2d(1, 2, 3), BatchNorm2d(2), ReLU(), Flatten(), Linear(2, 2))
    assert len(seq) == 5 and isinstance(seq[1], BatchNorm2d) and isinstance(seq[-1], Linear)
    assert [n for n, _ in weight_layers(seq)] == ["0", "4"]
    assert "Conv2d(1, 2, kernel_size=(3, 3)" in repr(seq)


# ------------------------------------------------------------------ modes and gradients


def test_train_and_eval_propagate_to_every_module():
    toy = Toy()
    assert all(m.training for m in toy.modules())
    assert toy.eval() is toy
    assert not any(m.training for m in toy.modules())
    toy.body.train()
    assert toy.body[0].bn.training and not toy.training
    toy.train()
    assert all(m.training for m in toy.modules())


def test_batch_norm_buffers_update_in_place_only_in_training():
    bn = BatchNorm2d(3)
    mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
    x = _x((4, 3, 2, 2)) + 2.0
    bn(x)
    assert bn.running_mean is mean and bn.running_var is var and bn.num_batches_tracked is count
    assert int(count) == 1 and count.dtype == np.int64 and count.shape == ()
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    before = mean.copy()
    bn.eval()
    bn(x)
    assert int(count) == 1
    np.testing.assert_array_equal(mean, before)


def test_batch_norm_accepts_2d_input_and_needs_two_values_in_training():
    bn = BatchNorm2d(5)
    assert bn(_x((4, 5))).shape == (4, 5)
    with pytest.raises(ShapeError, match="more than one value per channel"):
        bn(_x((1, 5)))
    bn.eval()
    assert bn(_x((1, 5))).shape == (1, 5)


def test_zero_grad_drops_every_gradient():
    toy = Toy()
    out = toy(_x((2, 2, 4, 4)))
    F.sum(F.mul(out, _x(out.shape, seed=1))).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in toy.parameters())
    toy.zero_grad()
    assert all(p.grad is None for p in toy.parameters())


def test_effective_weight_is_the_only_weight_the_forward_reads():
    class HalfConv(Conv2d):
        def effective_weight(self):
            return F.mul(self.weight, 0.5)

    class ZeroLinear(Linear):
        def effective_weight(self):
            return Tensor(np.zeros_like(self.weight.data))

    rng = np.random.default_rng(3)
    conv, half = (
        Conv2d(2, 3, 3, rng=np.random.default_rng(1)),
        HalfConv(2, 3, 3, rng=np.random.default_rng(1)),
    )
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(half(x).data, 0.5 * conv(x).data, rtol=1e-6, atol=1e-6)
    out = half(x)
    dy = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(dy)
    reference = conv(x)
    reference.backward(dy)
    np.testing.assert_allclose(half.weight.grad, 0.5 * conv.weight.grad, rtol=1e-5, atol=1e-6)
    lin = ZeroLinear(4, 2)
    np.testing.assert_array_equal(lin(_x((3, 4))).data, np.broadcast_to(lin.bias.data, (3, 2)))


# ------------------------------------------------------------------ initialisation


def test_initialisation_statistics_dtype_and_reproducibility():
    conv = Conv2d(64, 128, 3, rng=np.random.default_rng(0))
    assert conv.weight.dtype == np.float32
    assert abs(conv.weight.data.std() - math.sqrt(2.0 / (128 * 9))) < 0.02 * math.sqrt(2.0 / (128 * 9))
    lin = Linear(100, 50, rng=np.random.default_rng(0))
    assert np.abs(lin.weight.data).max() <= 0.1 and np.abs(lin.bias.data).max() <= 0.1
    bn = BatchNorm2d(4)
    np.testing.assert_array_equal(bn.weight.data, 1.0)
    np.testing.assert_array_equal(bn.bias.data, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    c64 = Conv2d(3, 4, 3, rng=np.random.default_rng(5), dtype=np.float64)
    c32 = Conv2d(3, 4, 3, rng=np.random.default_rng(5))
    assert c64.weight.dtype == np.float64
    np.testing.assert_array_equal(c64.weight.data.astype(np.float32), c32.weight.data)
    with pytest.raises(ConfigError, match="floating-point dtype"):
        Conv2d(3, 4, 3, dtype=np.int32)
    with pytest.raises(ConfigError, match="groups=2 must divide in_channels=3"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ConfigError, match="kernel_size"):
        Conv2d(3, 4, 0)


# ------------------------------------------------------------------ input checks


def test_conv_input_errors_name_what_was_expected():
    conv = Conv2d(3, 8, 3)
    with pytest.raises(ShapeError) as info:
        conv(_x((8, 1, 8, 8)))
    assert str(info.value) == (
        "Conv2d(in_channels=3): expected input of shape (N, 3, H, W) and dtype float32, got (8, 1, 8, 8) float32"
    )
    with pytest.raises(ShapeError, match=r"got \(3, 8, 8\) float32"):
        conv(_x((3, 8, 8)))
    with pytest.raises(ShapeError, match=r"got \(2, 3, 8, 8\) float64"):
        conv(_x((2, 3, 8, 8), dtype=np.float64))
    with pytest.raises(ShapeError, match=r"got \(2, 3, 8, 8\) int64"):
        conv(np.zeros((2, 3, 8, 8), dtype=np.int64))
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        conv(_x((2, 3, 2, 2)))


def test_linear_batch_norm_and_pool_input_errors():
    with pytest.raises(ShapeError, match=r"Linear\(in_features=4\): expected input of shape \(N, 4\)"):
        Linear(4, 2)(_x((2, 5)))
    with pytest.raises(ShapeError, match=r"got \(2, 4\) float64"):
        Linear(4, 2)(_x((2, 4), dtype=np.float64))
    with pytest.raises(
        ShapeError, match=r"BatchNorm2d\(num_features=3\): expected input of shape \(N, 3, H, W\)"
    ):
        BatchNorm2d(3)(_x((2, 4, 2, 2)))
    with pytest.raises(ShapeError, match="MaxPool2d"):
        MaxPool2d(3)(_x((1, 2, 2, 2)))
    with pytest.raises(ShapeError, match="GlobalAvgPool2d"):
        GlobalAvgPool2d()(_x((2, 3)))


def test_layer_output_shapes_match_their_forward():
    x = _x((2, 4, 9, 7))
    layers = [
        Conv2d(4, 6, 3, stride=2, padding=1),
        Conv2d(4, 4, (3, 1), stride=(1, 2), padding=(1, 0), groups=4),
        Conv2d(4, 8, 1, stride=2),
        BatchNorm2d(4),
        ReLU(),
        MaxPool2d(3, stride=2, padding=1),
        AvgPool2d(2),
        GlobalAvgPool2d(),
        Flatten(),
        Identity(),
    ]
    for layer in layers:
        assert layer(x).shape == layer.output_shape(x.shape), layer
    assert Linear(4, 3)(_x((5, 4))).shape == Linear(4, 3).output_shape((5, 4))


# ------------------------------------------------------------------ checkpoints


def _trained_digits_cnn(seed: int):
    model = build_model("digits_cnn", rng=np.random.default_rng(seed))
    for step in range(2):  # move the running statistics and the counters off their initial values
        model(_x((8, 1, 8, 8), seed=step) * 2.0 + 1.0)
    return model


def test_state_dict_round_trip_gives_identical_outputs():
    source = _trained_digits_cnn(seed=1)
    state = source.state_dict()
    assert int(state["bn1.num_batches_tracked"]) == 2
    target = build_model("digits_cnn", rng=np.random.default_rng(2))
    params_before = {n: p for n, p in target.named_parameters()}
    arrays_before = {n: id(a) for n, a in target.named_buffers()}
    data_before = {n: id(p.data) for n, p in target.named_parameters()}
    assert target.load_state_dict(state) == ([], [])
    # values copied in place: the same Parameter objects and the same arrays
    assert {n: p for n, p in target.named_parameters()} == params_before
    assert {n: id(p.data) for n, p in target.named_parameters()} == data_before
    assert {n: id(a) for n, a in target.named_buffers()} == arrays_before
    x = _x((5, 1, 8, 8), seed=9)
    source.eval(), target.eval()
    np.testing.assert_array_equal(source(x).data, target(x).data)
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
        assert value.dtype == state[name].dtype


def test_state_dict_returns_copies():
    model = build_model("digits_cnn")
    state = model.state_dict()
    state["conv1.weight"][...] = 7.0
    state["bn1.running_mean"][...] = 7.0
    assert not np.any(model.conv1.weight.data == 7.0)
    assert not np.any(model.bn1.running_mean == 7.0)


def test_load_state_dict_reports_missing_unexpected_and_mismatched_keys():
    model = build_model("resnet18", width=0.5)
    state = model.state_dict()
    del state["fc.bias"], state["layer4.1.bn2.running_var"]
    state["head.weight"] = np.zeros(3, dtype=np.float32)
    state["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), dtype=np.float32)
    state["bn1.weight"] = state["bn1.weight"].astype(np.float64)
    before = model.state_dict()
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert "missing keys: layer4.1.bn2.running_var, fc.bias" in message
    assert "unexpected keys: head.weight" in message
    assert (
        "layer1.0.conv1.weight: checkpoint has shape (64, 64, 3, 3), model expects (32, 32, 3, 3)" in message
    )
    assert "bn1.weight: checkpoint has dtype float64, model expects float32" in message
    # nothing was copied
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_non_strict_load_skips_missing_and_unexpected_but_not_mismatches():
    model = build_model("digits_cnn", rng=np.random.default_rng(1))
    other = build_model("digits_cnn", rng=np.random.default_rng(2)).state_dict()
    del other["fc.weight"]
    other["extra"] = np.zeros(1, dtype=np.float32)
    result = model.load_state_dict(other, strict=False)
    assert result.missing_keys == ["fc.weight"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(model.conv1.weight.data, other["conv1.weight"])
    other["conv1.weight"] = np.zeros((1, 1, 3, 3), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"conv1.weight: checkpoint has shape \(1, 1, 3, 3\)"):
        model.load_state_dict(other, strict=False)


def test_load_state_dict_restores_a_zero_dimensional_buffer():
    bn = BatchNorm2d(2)
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(41, dtype=np.int64)})
    assert int(bn.num_batches_tracked) == 41 and bn.num_batches_tracked.shape == ()


def test_forward_under_no_grad_records_nothing():
    model = build_model("digits_cnn")
    with no_grad():
        out = model(_x((2, 1, 8, 8)))
    assert not out.requires_grad and out.node is None
