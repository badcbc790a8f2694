"""Whole networks against an autograd oracle: catches composition bugs.

The op tests prove each kernel on its own; here the real model classes run a
forward pass, the loss and a backward pass in float64, and every parameter's
gradient is compared with autograd's gradient of the same network written
independently from the oracles (by parameter name, from the state dict).
Batch norm runs in training mode with non-trivial scale and shift, so the
batch statistics couple the samples as they do in training.
"""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from reference import functional as F
from reference.autodiff import Tensor
from reference.models import build_model
from tests.opcases.conv import conv2d_oracle


def bn(p, name, x):
    mean = anp.mean(x, axis=(0, 2, 3), keepdims=True)
    var = anp.mean((x - mean) ** 2, axis=(0, 2, 3), keepdims=True)
    xhat = (x - mean) / anp.sqrt(var + 1e-5)
    return xhat * p[name + ".weight"].reshape(1, -1, 1, 1) + p[name + ".bias"].reshape(1, -1, 1, 1)


def relu(x):
    return anp.where(x > 0, x, 0.0)


def cross_entropy(logits, labels, smoothing):
    k = logits.shape[1]
    shifted = logits - anp.max(logits, axis=1, keepdims=True)
    logp = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
    target = (1 - smoothing) * np.eye(k)[labels] + smoothing / k
    return -anp.mean(anp.sum(target * logp, axis=1))


def head(p, x, labels):
    pooled = anp.mean(x, axis=(2, 3))
    return cross_entropy(anp.dot(pooled, p["fc.weight"].T) + p["fc.bias"], labels, 0.1)


def cifar_resnet_oracle(p, x, labels, blocks_per_stage):
    x = relu(bn(p, "bn1", conv2d_oracle(x, p["conv1.weight"], padding=1)))
    for stage in (1, 2, 3):
        for i in range(blocks_per_stage):
            name = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            out = relu(
                bn(p, name + ".bn1", conv2d_oracle(x, p[name + ".conv1.weight"], stride=stride, padding=1))
            )
            out = bn(p, name + ".bn2", conv2d_oracle(out, p[name + ".conv2.weight"], padding=1))
            if name + ".downsample.0.weight" in p:
                x = bn(
                    p,
                    name + ".downsample.1",
                    conv2d_oracle(x, p[name + ".downsample.0.weight"], stride=stride),
                )
            x = relu(out + x)
    return head(p, x, labels)


MOBILENET_STRIDES = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]  # stem, then the 13 blocks


def mobilenet_oracle(p, x, labels):
    x = relu(bn(p, "features.0.bn", conv2d_oracle(x, p["features.0.conv.weight"], stride=2, padding=1)))
    for i in range(1, 14):
        name = f"features.{i}"
        w = p[name + ".dw.weight"]
        x = relu(
            bn(
                p,
                name + ".dw_bn",
                conv2d_oracle(x, w, stride=MOBILENET_STRIDES[i], padding=1, groups=w.shape[0]),
            )
        )
        x = relu(bn(p, name + ".pw_bn", conv2d_oracle(x, p[name + ".pw.weight"])))
    return head(p, x, labels)


def _randomize_bn(model, rng):
    """BN starts at gamma=1, beta=0; move them so the check is not a special case."""
    for name, param in model.named_parameters():
        if ".bn" in name or "bn1" in name or "downsample.1" in name or name.endswith("_bn.weight"):
            if name.endswith(".weight") and param.ndim == 1:
                param.data[...] = rng.uniform(0.5, 1.5, param.shape)
            elif name.endswith(".bias") and param.ndim == 1:
                param.data[...] = rng.uniform(-0.5, 0.5, param.shape)


@pytest.mark.parametrize(
    "model_name, width, input_hw, oracle",
    [
        ("resnet20", 0.5, 8, lambda p, x, y: cifar_resnet_oracle(p, x, y, 3)),
        ("mobilenet_v1", 0.25, 32, mobilenet_oracle),
    ],
)
def test_model_gradients_match_autograd(model_name, width, input_hw, oracle):
    rng = np.random.default_rng(7)
    model = build_model(model_name, num_classes=5, width=width, dtype=np.float64, rng=rng)
    model.train()
    _randomize_bn(model, rng)
    x = rng.standard_normal((4, 3, input_hw, input_hw))
    labels = rng.integers(0, 5, size=4)

    loss = F.softmax_cross_entropy(model(Tensor(x)), labels, label_smoothing=0.1)
    model.zero_grad()
    loss.backward()

    params = {name: p.data.copy() for name, p in model.named_parameters()}
    expected_loss = oracle(params, x, labels)
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=1e-10)
    expected = autograd.grad(oracle)(params, x, labels)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, expected[name], rtol=1e-7, atol=1e-10, err_msg=name)
