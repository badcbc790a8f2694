"""The model zoo: every model builds, runs, traces, and carries torchvision's names."""

from __future__ import annotations

import re

import numpy as np
import pytest

from reference import functional as F
from reference.errors import ConfigError, ShapeError
from reference.models import MODEL_NAMES, build_model, default_input_shape, scale_channels
from reference.nn import BatchNorm2d, Conv2d, Linear, weight_layers

SMALL_WIDTH = {"resnet18": 0.25, "resnet50": 0.25, "mobilenet_v1": 0.25}


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [8, 19])
def test_every_model_runs_forward_and_backward_at_a_small_input(name, size):
    c = default_input_shape(name)[0]
    model = build_model(name, num_classes=7, width=SMALL_WIDTH.get(name, 1.0))
    x = _x((2, c, size, size))
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == np.float32
    assert model.trace((2, c, size, size), lambda *_: None) == (2, 7)
    loss = F.softmax_cross_entropy(out, np.array([0, 6]))
    loss.backward()
    assert all(p.grad is not None and np.all(np.isfinite(p.grad)) for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_in_float64_with_any_class_count(name):
    model = build_model(name, num_classes=3, width=SMALL_WIDTH.get(name, 1.0), dtype=np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    c = default_input_shape(name)[0]
    assert model(_x((2, c, 8, 8), dtype=np.float64)).shape == (2, 3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_reject_wrong_channels_and_dtype(name):
    c = default_input_shape(name)[0]
    model = build_model(name, width=SMALL_WIDTH.get(name, 1.0))
    with pytest.raises(ShapeError, match=rf"expected input of shape \(N, {c}, H, W\)"):
        model(_x((2, c + 1, 8, 8)))
    with pytest.raises(ShapeError, match="float64"):
        model(_x((2, c, 8, 8), dtype=np.float64))


def test_same_rng_gives_the_same_model_and_default_is_reproducible():
    a = build_model("resnet20", rng=np.random.default_rng(4)).state_dict()
    b = build_model("resnet20", rng=np.random.default_rng(4)).state_dict()
    c = build_model("resnet20", rng=np.random.default_rng(5)).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    d, e = build_model("resnet20").state_dict(), build_model("resnet20").state_dict()
    assert all(np.array_equal(d[k], e[k]) for k in d)


# ------------------------------------------------------------------ ResNet-50 names


def test_resnet50_state_dict_follows_torchvision():
    model = build_model("resnet50", num_classes=1000)
    state = model.state_dict()
    keys = list(state)
    assert keys[:7] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
    ]
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    for key in ("layer4.2.bn3.running_var", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight"):
        assert key in state
    # structure rules: blocks per stage, a downsample only in each stage's first block
    blocks = {(int(m[1]), int(m[2])) for k in keys if (m := re.match(r"layer(\d)\.(\d+)\.", k))}
    assert {s: max(j for i, j in blocks if i == s) + 1 for s in (1, 2, 3, 4)} == {1: 3, 2: 4, 3: 6, 4: 3}
    downsample = {k.split(".downsample")[0] for k in keys if ".downsample." in k}
    assert downsample == {"layer1.0", "layer2.0", "layer3.0", "layer4.0"}
    pattern = re.compile(
        r"^(conv1\.weight|bn1\.\w+|fc\.(weight|bias)"
        r"|layer[1-4]\.\d+\.(conv[123]\.weight|bn[123]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))$"
    )
    assert [k for k in keys if not pattern.match(k)] == []
    bn_suffixes = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert len(keys) == 53 + 53 * len(bn_suffixes) + 2 == 320
    conv_weights = [k for k in keys if k.endswith(".weight") and ("conv" in k or "downsample.0" in k)]
    assert len(conv_weights) == 53
    layers = weight_layers(model)
    assert len(layers) == 54 and layers[-1][0] == "fc"
    assert [n for n, m in layers if isinstance(m, Conv2d)] == [k[: -len(".weight")] for k in conv_weights]


def test_resnet50_shapes_are_v1_5():
    model = build_model("resnet50", num_classes=1000)
    state = model.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert state["fc.weight"].shape == (1000, 2048)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # stride in the 3x3 conv
    assert block.downsample[0].stride == (2, 2)
    assert sum(p.size for p in model.parameters()) == 25_557_032


def test_resnet18_and_cifar_resnet_structure():
    r18 = build_model("resnet18", num_classes=1000)
    assert sum(p.size for p in r18.parameters()) == 11_689_512  # torchvision's count
    assert len(weight_layers(r18)) == 17 + 3 + 1
    assert "layer1.0.downsample.0.weight" not in r18.state_dict()
    for depth in (20, 32, 56):
        model = build_model(f"resnet{depth}")
        n = (depth - 2) // 6
        state = model.state_dict()
        assert state["conv1.weight"].shape == (16, 3, 3, 3)
        assert f"layer3.{n - 1}.bn2.running_var" in state and f"layer3.{n}.conv1.weight" not in state
        assert "layer4.0.conv1.weight" not in state
        assert {k.split(".downsample")[0] for k in state if "downsample" in k} == {"layer2.0", "layer3.0"}
        assert len(weight_layers(model)) == (depth - 1) + 2 + 1  # depth - 1 convs, 2 projections, fc


def test_zero_init_residual_is_optional_and_off_by_default():
    default = build_model("resnet50", width=0.25)
    assert all(np.all(m.bn3.weight.data == 1) for m in default.modules() if hasattr(m, "bn3"))
    zeroed = build_model("resnet50", width=0.25, zero_init_residual=True)
    last = [m.bn3 for m in zeroed.modules() if hasattr(m, "bn3")]
    assert len(last) == 16 and all(np.all(bn.weight.data == 0) for bn in last)
    assert np.all(zeroed.layer1[0].bn2.weight.data == 1)
    basic = build_model("resnet20", zero_init_residual=True)
    assert np.all(basic.layer1[0].bn2.weight.data == 0) and np.all(basic.layer1[0].bn1.weight.data == 1)


# ------------------------------------------------------------------ MobileNetV1


def test_mobilenet_v1_names_and_shapes():
    model = build_model("mobilenet_v1", num_classes=1000)
    state = model.state_dict()
    assert state["features.0.conv.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.dw.weight"].shape == (32, 1, 3, 3)
    assert state["features.1.pw.weight"].shape == (64, 32, 1, 1)
    assert state["features.13.pw.weight"].shape == (1024, 1024, 1, 1)
    assert state["features.13.pw_bn.running_var"].shape == (1024,)
    assert state["fc.weight"].shape == (1000, 1024) and state["fc.bias"].shape == (1000,)
    layers = weight_layers(model)
    assert len(layers) == 1 + 2 * 13 + 1
    strides = [model.features[i].dw.stride[0] for i in range(1, 14)]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert all(model.features[i].dw.groups == model.features[i].dw.in_channels for i in range(1, 14))
    assert all(isinstance(m, (Conv2d, Linear)) for _, m in layers)
    assert sum(isinstance(m, BatchNorm2d) for m in model.modules()) == 27


def test_width_multiplier_scales_channels():
    assert [scale_channels(c, 0.25) for c in (32, 64, 1024)] == [8, 16, 256]
    assert [scale_channels(c, 0.75) for c in (32, 64, 1024)] == [24, 48, 768]
    assert scale_channels(16, 0.1) == 8
    half = build_model("mobilenet_v1", width=0.5)
    assert half.features[0].conv.out_channels == 16 and half.fc.in_features == 512
    assert build_model("resnet50", width=0.5).fc.in_features == 1024
    assert build_model("digits_cnn", width=2).fc.in_features == 128


# ------------------------------------------------------------------ errors


def test_unknown_model_and_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError) as info:
        build_model("resnet51")
    message = str(info.value)
    assert "'resnet51'" in message and all(name in message for name in MODEL_NAMES)
    for kwargs, pattern in (
        ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"num_classes": -3}, "num_classes must be a positive integer"),
        ({"width": 0.0}, "width must be a positive number, got 0.0"),
        ({"width": -1}, "width must be a positive number"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"zero_init": True}, "has no option zero_init"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            build_model("resnet20", **kwargs)
    with pytest.raises(ConfigError, match="accepted options: none"):
        build_model("mobilenet_v1", zero_init_residual=True)
    with pytest.raises(ConfigError, match="dtype"):
        build_model("digits_cnn", dtype=np.int32)
