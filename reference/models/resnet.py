"""ResNets: CIFAR ResNet-20/32/56, ResNet-18 and ResNet-50 v1.5, with torchvision's names.

Layout and parameter names (as torchvision, so weights move to and from PyTorch
by name)::

    conv1, bn1                  stem (ImageNet: 7x7/2 conv 64 then 3x3/2 max pool;
                                CIFAR: 3x3/1 conv 16, no max pool)
    layer{i}.{j}.conv1 .bn1     block j of stage i (stages counted from 1)
    layer{i}.{j}.conv2 .bn2
    layer{i}.{j}.conv3 .bn3     bottleneck blocks only
    layer{i}.{j}.downsample.0   1x1 conv with the block's stride, then
    layer{i}.{j}.downsample.1   its batch norm; only where the shape changes
    fc                          linear classifier with bias, after a global average pool

Blocks:

- :class:`BasicBlock` (ResNet-18 and the CIFAR ResNets): 3x3 conv (with the
  stride), BN, ReLU, 3x3 conv, BN, add the shortcut, ReLU.
- :class:`Bottleneck` (ResNet-50 v1.5): 1x1 conv, BN, ReLU, 3x3 conv (with the
  stride: the "v1.5" placement), BN, ReLU, 1x1 conv to 4x the width, BN, add the
  shortcut, ReLU.

Shortcuts: identity when the block keeps the shape, otherwise a projection
(1x1 conv with the stride + BN, ``downsample.0`` / ``downsample.1``). The CIFAR
ResNets here use this projection too (the paper's option B). The ResNet paper's
CIFAR networks used option A, a parameter-free shortcut that subsamples and
zero-pads the new channels; the projection is chosen so that every shape change
is a plain conv that the sparsity methods, the accounting and the exporters
treat like any other layer. It adds two 1x1 convs (2,560 weights at width 1)
to each CIFAR ResNet.

Channel pruning (:meth:`ResNet.channel_groups`): only the channels inside a
block are prunable, the outputs of every BN of the main path but the last (bn1
in a basic block; bn1 and bn2 in a bottleneck), each read by the next conv. The
residual stream (the stem, each block's last BN, the projections) is not
listed: its channels are tied across blocks by the additions.

``zero_init_residual=True`` starts each block's last BN scale at 0 so that every
block begins as the identity; it is off by default.

A width multiplier scales every stage's channels with ``scale_channels``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor
from reference.errors import ConfigError, ShapeError
from reference.models.common import ChannelGroup, check_model_args, scale_channels
from reference.nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, Module, ReLU, Sequential
from reference.nn.module import Shape, TraceVisitor

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "cifar_resnet", "resnet18", "resnet50"]


def _projection(in_planes: int, out_planes: int, stride: int, rng, dtype) -> Sequential | None:
    """The ``downsample`` shortcut where the shape changes (1x1 conv + BN), else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return Sequential(
        Conv2d(in_planes, out_planes, 1, stride=stride, rng=rng, dtype=dtype),
        BatchNorm2d(out_planes, dtype=dtype),
    )


class _ResidualBlock(Module):
    """What both blocks share: ``relu(main(x) + shortcut(x))`` and its shape trace.

    A subclass sets ``downsample`` and lists its main path's layers in
    :meth:`main_path`, in order; its forward applies them with ReLUs between.
    """

    downsample: Sequential | None

    def main_path(self) -> tuple[Module, ...]:
        raise NotImplementedError

    def channel_groups(self) -> list[ChannelGroup]:
        """(conv, BN, next conv) for every BN of the main path that feeds a ReLU (all but the last)."""
        layers = self.main_path()
        return [
            ChannelGroup(layers[i], layers[i + 1], (layers[i + 2],)) for i in range(0, len(layers) - 2, 2)
        ]

    @property
    def last_bn(self) -> BatchNorm2d:
        return self.main_path()[-1]

    def forward(self, x: Any) -> Tensor:
        layers = self.main_path()
        out = x
        for i in range(0, len(layers), 2):  # (conv, bn) pairs; ReLU after all but the last
            out = layers[i + 1](layers[i](out))
            if i + 2 < len(layers):
                out = F.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(F.add(out, shortcut))

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        for module in self.main_path():
            shape = module.trace(shape, visit)
        shortcut = (
            tuple(input_shape) if self.downsample is None else self.downsample.trace(input_shape, visit)
        )
        if shape != shortcut:
            raise ShapeError(
                f"{type(self).__name__}: main path gives shape {shape} but the shortcut gives {shortcut}"
            )
        return shape


class BasicBlock(_ResidualBlock):
    """3x3 conv (strided), BN, ReLU, 3x3 conv, BN, plus the shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, stride=1, padding=1, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.downsample = _projection(in_planes, planes, stride, rng, dtype)

    def main_path(self) -> tuple[Module, ...]:
        return (self.conv1, self.bn1, self.conv2, self.bn2)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand, with a residual; output channels = 4 * ``planes``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, rng: np.random.Generator, dtype: Any):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = Conv2d(in_planes, planes, 1, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, stride=stride, padding=1, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.conv3 = Conv2d(planes, out_planes, 1, rng=rng, dtype=dtype)
        self.bn3 = BatchNorm2d(out_planes, dtype=dtype)
        self.downsample = _projection(in_planes, out_planes, stride, rng, dtype)

    def main_path(self) -> tuple[Module, ...]:
        return (self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3)


class ResNet(Module):
    """A stem, stages ``layer1``..``layerK`` of residual blocks, global average pool and ``fc``.

    ``block``: :class:`BasicBlock` or :class:`Bottleneck`. ``blocks``: blocks per
    stage. ``widths``: each stage's ``planes`` at width 1 (the first stage has
    stride 1, the others stride 2 in their first block). ``stem``: "imagenet"
    (7x7/2 conv with 64 channels at width 1, BN, ReLU, 3x3/2 max pool) or
    "cifar" (3x3/1 conv with ``widths[0]`` channels, BN, ReLU).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        zero_init_residual: bool = False,
        *,
        name: str = "resnet",
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        check_model_args(name, num_classes, in_channels, width)
        if stem not in ("imagenet", "cifar"):
            raise ConfigError(f"{name}: stem must be 'imagenet' or 'cifar', got {stem!r}")
        if len(blocks) != len(widths) or not blocks or min(blocks) < 1:
            raise ConfigError(
                f"{name}: blocks {blocks} and widths {widths} must be equally long and positive"
            )
        rng = np.random.default_rng(0) if rng is None else rng
        if stem == "imagenet":
            stem_planes = scale_channels(64, width)
            self.conv1 = Conv2d(in_channels, stem_planes, 7, stride=2, padding=3, rng=rng, dtype=dtype)
        else:
            stem_planes = scale_channels(widths[0], width)
            self.conv1 = Conv2d(in_channels, stem_planes, 3, stride=1, padding=1, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(stem_planes, dtype=dtype)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None
        in_planes = stem_planes
        self.stage_names: list[str] = []
        for index, (count, planes_at_1) in enumerate(zip(blocks, widths)):
            planes = scale_channels(planes_at_1, width)
            stage = []
            for j in range(count):
                stride = 2 if (index > 0 and j == 0) else 1
                stage.append(block(in_planes, planes, stride, rng=rng, dtype=dtype))
                in_planes = planes * block.expansion
            stage_name = f"layer{index + 1}"
            setattr(self, stage_name, Sequential(*stage))
            self.stage_names.append(stage_name)
        self.avgpool = GlobalAvgPool2d()
        self.fc = Linear(in_planes, num_classes, rng=rng, dtype=dtype)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    module.last_bn.weight.data[...] = 0

    def channel_groups(self) -> list[ChannelGroup]:
        """Every block's prunable groups, in forward order (the residual stream is not prunable)."""
        return [
            group
            for stage_name in self.stage_names
            for block in getattr(self, stage_name)
            for group in block.channel_groups()
        ]

    def _stem(self) -> list[Module]:
        return [self.conv1, self.bn1, self.relu] + ([self.maxpool] if self.maxpool is not None else [])

    def forward(self, x: Any) -> Tensor:
        for module in self._stem():
            x = module(x)
        for stage_name in self.stage_names:
            x = getattr(self, stage_name)(x)
        return self.fc(self.avgpool(x))  # (N, C, H, W) -> (N, C) -> (N, classes)

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        modules = self._stem() + [getattr(self, s) for s in self.stage_names] + [self.avgpool, self.fc]
        for module in modules:
            shape = module.trace(shape, visit)
        return shape


def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    *,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float32,
) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2), widths 64/128/256/512, ImageNet stem."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), "imagenet", num_classes, in_channels, width,
        zero_init_residual, name="resnet18", rng=rng, dtype=dtype,
    )  # fmt: skip


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    *,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float32,
) -> ResNet:
    """ResNet-50 v1.5: bottlenecks (3, 4, 6, 3), widths 64/128/256/512 (x4 out), ImageNet stem."""
    return ResNet(
        Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", num_classes, in_channels, width,
        zero_init_residual, name="resnet50", rng=rng, dtype=dtype,
    )  # fmt: skip


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    zero_init_residual: bool = False,
    *,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float32,
) -> ResNet:
    """CIFAR ResNet of ``depth = 6 n + 2``: three stages of ``n`` basic blocks, widths 16/32/64."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"cifar_resnet: depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth!r}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock, (n, n, n), (16, 32, 64), "cifar", num_classes, in_channels, width,
        zero_init_residual, name=f"resnet{depth}", rng=rng, dtype=dtype,
    )  # fmt: skip
