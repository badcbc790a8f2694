"""The PyTorch twins of the library's models, for the benchmarks that compare against PyTorch.

Each has the layers and parameter names of the matching model in ``reference.models``, so a
``state_dict`` of ours loads into it by name (``strict=True``) and both start from the same
weights: CIFAR ResNet (``resnet20``...), MobileNetV1 with a width multiplier, and ResNet-50 v1.5
(torchvision's layout, for machines without torchvision).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from reference.models.mobilenet import MOBILENET_V1_BLOCKS

__all__ = ["CifarResNet", "MobileNetV1", "ResNet50"]


def _channels(c: int, width: float) -> int:
    """The width rule of the model description: ``max(8, round(c * width))``, halves up."""
    return max(8, int(c * width + 0.5))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:  # projection shortcut: 1x1 conv + BN
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """3x3 stem with 16 channels, three stages of n basic blocks (16, 32, 64), pool, fc."""

    def __init__(self, depth: int, num_classes: int, width: float):
        super().__init__()
        n = (depth - 2) // 6
        planes = [_channels(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = planes[0]
        for index, p in enumerate(planes):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, p, 2 if index > 0 and j == 0 else 1))
                in_planes = p
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (N, C, H, W) -> (N, C)


class ConvBNReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_channels)
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(self.dw_bn(self.dw(x)), inplace=True)
        return F.relu(self.pw_bn(self.pw(x)), inplace=True)


class MobileNetV1(nn.Module):
    """3x3/2 stem with 32 channels, 13 depthwise-separable blocks, pool, fc (channels x width)."""

    def __init__(self, num_classes: int, width: float = 1.0):
        super().__init__()
        layers = [ConvBNReLU(3, _channels(32, width), 2)]
        for c_in, c_out, stride in MOBILENET_V1_BLOCKS:
            layers.append(DepthwiseSeparable(_channels(c_in, width), _channels(c_out, width), stride))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(_channels(1024, width), num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (N, C, H, W) -> (N, C)


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out_planes = planes * 4
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet50(nn.Module):
    """ResNet-50 v1.5 with torchvision's layout and parameter names."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for index, (count, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            blocks = []
            for j in range(count):
                blocks.append(Bottleneck(in_planes, planes, 2 if index > 0 and j == 0 else 1))
                in_planes = planes * 4
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (N, 2048, 1, 1) -> (N, 2048)
