"""A small CNN for the 8x8 one-channel scikit-learn digits (model name ``digits_cnn``).

Layers (channels at width 1; ``scale_channels`` scales them), with parameter names::

    conv1  3x3, 16, stride 1, pad 1   + bn1 + ReLU     8x8 -> 8x8
    conv2  3x3, 32, stride 2, pad 1   + bn2 + ReLU     8x8 -> 4x4
    conv3  3x3, 64, stride 1, pad 1   + bn3 + ReLU     4x4 -> 4x4
    avgpool  global average                            (N, 64)
    fc     64 -> num_classes (with bias)

Channel pruning (:meth:`DigitsCNN.channel_groups`): each of bn1, bn2, bn3 feeds
a ReLU, so each conv's channels can be removed; bn3's channels are read by ``fc``
through the average pool.

At width 1 with one input channel and 10 classes: 23,824 conv+fc weights and
about 0.38 M MACs per image. Any input of at least 1x1 pixels works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor
from reference.models.common import ChannelGroup, check_model_args, scale_channels
from reference.nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, Module, ReLU
from reference.nn.module import Shape, TraceVisitor

__all__ = ["DigitsCNN"]


class DigitsCNN(Module):
    """Three conv + BN + ReLU layers, global average pool, linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: float = 1.0,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        check_model_args("digits_cnn", num_classes, in_channels, width)
        rng = np.random.default_rng(0) if rng is None else rng
        c1, c2, c3 = (scale_channels(c, width) for c in (16, 32, 64))
        self.conv1 = Conv2d(in_channels, c1, 3, stride=1, padding=1, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(c1, dtype=dtype)
        self.conv2 = Conv2d(c1, c2, 3, stride=2, padding=1, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(c2, dtype=dtype)
        self.conv3 = Conv2d(c2, c3, 3, stride=1, padding=1, rng=rng, dtype=dtype)
        self.bn3 = BatchNorm2d(c3, dtype=dtype)
        self.relu = ReLU()
        self.avgpool = GlobalAvgPool2d()
        self.fc = Linear(c3, num_classes, rng=rng, dtype=dtype)

    def _chain(self) -> list[Module]:
        return [
            self.conv1, self.bn1, self.relu,
            self.conv2, self.bn2, self.relu,
            self.conv3, self.bn3, self.relu,
            self.avgpool, self.fc,
        ]  # fmt: skip

    def channel_groups(self) -> list[ChannelGroup]:
        """The prunable channels: conv1 -> bn1 -> conv2, conv2 -> bn2 -> conv3, conv3 -> bn3 -> fc."""
        return [
            ChannelGroup(self.conv1, self.bn1, (self.conv2,)),
            ChannelGroup(self.conv2, self.bn2, (self.conv3,)),
            ChannelGroup(self.conv3, self.bn3, (self.fc,)),
        ]

    def forward(self, x: Any) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(self.avgpool(x))  # (N, C, H, W) -> (N, C) -> (N, classes)

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        for module in self._chain():
            shape = module.trace(shape, visit)
        return shape
