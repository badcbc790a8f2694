"""MobileNetV1 (model name ``mobilenet_v1``) with a width multiplier.

Layout at width 1 (a 224x224 input gives 7x7 before the pool)::

    features.0          3x3/2 conv 32, BN, ReLU          names: features.0.conv, features.0.bn
    features.1..13      depthwise-separable blocks       names: features.{i}.dw, .dw_bn, .pw, .pw_bn
                        (in, out, stride):
                        (32,64,1) (64,128,2) (128,128,1) (128,256,2) (256,256,1) (256,512,2)
                        5x (512,512,1) (512,1024,2) (1024,1024,1)
    avgpool             global average pool
    fc                  linear 1024 -> num_classes, with bias

A depthwise-separable block is a 3x3 depthwise conv (``groups`` = channels,
with the block's stride) + BN + ReLU, then a 1x1 pointwise conv + BN + ReLU.
All convs have no bias. Parameter names therefore look like
``features.0.conv.weight``, ``features.3.dw.weight``, ``features.3.pw_bn.running_var``,
``fc.bias``.

Channel pruning (:meth:`MobileNetV1.channel_groups`): every BN feeds a ReLU. A
depthwise conv maps channel c to channel c, so the output channels of the stem
and of each pointwise conv form one group with the next block's depthwise conv
and its BN (a depthwise chain, read by that block's pointwise conv); the last
pointwise conv's channels are read by ``fc``.

Width multiplier: every channel count ``c`` becomes ``scale_channels(c, width)``
= ``max(8, round(c * width))``, the stem and the classifier's input included;
at widths 0.25, 0.5, 0.75 and 1 this gives the usual counts (all multiples of 8).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor
from reference.models.common import ChannelGroup, check_model_args, scale_channels
from reference.nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, Module, Sequential
from reference.nn.module import Shape, TraceVisitor

__all__ = ["MOBILENET_V1_BLOCKS", "ConvBNReLU", "DepthwiseSeparable", "MobileNetV1"]

# (in, out, stride) of the 13 depthwise-separable blocks at width 1
MOBILENET_V1_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
)


class ConvBNReLU(Module):
    """A full 3x3 conv (``conv``), batch norm (``bn``) and ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rng: np.random.Generator, dtype: Any
    ):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, rng=rng, dtype=dtype)
        self.bn = BatchNorm2d(out_channels, dtype=dtype)

    def forward(self, x: Any) -> Tensor:
        return F.relu(self.bn(self.conv(x)))

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        return self.bn.trace(self.conv.trace(input_shape, visit), visit)


class DepthwiseSeparable(Module):
    """3x3 depthwise conv (``dw``) + BN (``dw_bn``) + ReLU, 1x1 conv (``pw``) + BN (``pw_bn``) + ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rng: np.random.Generator, dtype: Any
    ):
        super().__init__()
        self.dw = Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, rng=rng, dtype=dtype
        )
        self.dw_bn = BatchNorm2d(in_channels, dtype=dtype)
        self.pw = Conv2d(in_channels, out_channels, 1, rng=rng, dtype=dtype)
        self.pw_bn = BatchNorm2d(out_channels, dtype=dtype)

    def forward(self, x: Any) -> Tensor:
        x = F.relu(self.dw_bn(self.dw(x)))
        return F.relu(self.pw_bn(self.pw(x)))

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        for module in (self.dw, self.dw_bn, self.pw, self.pw_bn):
            shape = module.trace(shape, visit)
        return shape


class MobileNetV1(Module):
    """The stem, 13 depthwise-separable blocks, global average pool and ``fc``."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        check_model_args("mobilenet_v1", num_classes, in_channels, width)
        rng = np.random.default_rng(0) if rng is None else rng
        stem = scale_channels(32, width)
        layers: list[Module] = [ConvBNReLU(in_channels, stem, 2, rng=rng, dtype=dtype)]
        for c_in, c_out, stride in MOBILENET_V1_BLOCKS:
            layers.append(
                DepthwiseSeparable(
                    scale_channels(c_in, width), scale_channels(c_out, width), stride, rng=rng, dtype=dtype
                )
            )
        self.features = Sequential(*layers)
        self.avgpool = GlobalAvgPool2d()
        self.fc = Linear(scale_channels(1024, width), num_classes, rng=rng, dtype=dtype)

    def channel_groups(self) -> list[ChannelGroup]:
        """Stem or pointwise conv -> BN -> next depthwise conv -> BN -> next pointwise conv; last pw -> fc."""
        stem, *blocks = list(self.features)
        producers = [(stem.conv, stem.bn)] + [(b.pw, b.pw_bn) for b in blocks]
        groups = [
            ChannelGroup(conv, bn, (nxt.pw,), depthwise=nxt.dw, depthwise_bn=nxt.dw_bn, consumer_bn=nxt.pw_bn)
            for (conv, bn), nxt in zip(producers, blocks)
        ]
        conv, bn = producers[-1]
        return groups + [ChannelGroup(conv, bn, (self.fc,))]

    def forward(self, x: Any) -> Tensor:
        return self.fc(self.avgpool(self.features(x)))  # (N, C, H, W) -> (N, C) -> (N, classes)

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        for module in (self.features, self.avgpool, self.fc):
            shape = module.trace(shape, visit)
        return shape
