"""Checks, the channel rule and the channel-group record shared by the model builders."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from reference.errors import ConfigError

__all__ = ["ChannelGroup", "check_model_args", "scale_channels"]

MIN_CHANNELS = 8


def scale_channels(channels: int, width: float) -> int:
    """The channel count of a layer with ``channels`` at width 1: ``max(8, round(channels * width))``.

    Halves round up (``int(c * width + 0.5)``). At width 1 every count is the
    paper's; the floor of 8 keeps very narrow models usable.
    """
    return max(MIN_CHANNELS, int(channels * width + 0.5))


def check_model_args(model: str, num_classes: Any, in_channels: Any, width: Any) -> None:
    """Raise ConfigError naming the first bad argument of a model constructor."""
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{model}: {what} must be a positive integer, got {value!r}")
    if not isinstance(width, (int, float, np.floating, np.integer)) or isinstance(width, bool):
        raise ConfigError(f"{model}: width must be a positive number, got {width!r}")
    if not (math.isfinite(width) and width > 0):
        raise ConfigError(f"{model}: width must be a positive number, got {width!r}")


class ChannelGroup(NamedTuple):
    """Channels that can be removed together: one conv's outputs, through a BN + ReLU, to their readers.

    Models list these in ``channel_groups()`` (channel pruning and slimming use them)::

        producer -> bn -> ReLU -> consumers                                  (plain group)
        producer -> bn -> ReLU -> depthwise -> depthwise_bn -> ReLU -> consumers   (depthwise chain)

    - ``producer``: the Conv2d whose output channels these are.
    - ``bn``: the BatchNorm2d right after ``producer``; a ReLU follows it directly.
    - ``consumers``: every layer that reads the channels (a Conv2d's input
      channels, or a Linear's input features behind a global average pool).
    - ``depthwise``, ``depthwise_bn``: a depthwise conv (channel c in, channel c
      out) and its BN, also followed by a ReLU, between ``bn``'s ReLU and the
      consumers (MobileNet); None in a plain group.
    - ``consumer_bn``: in a depthwise chain, the BN right after the single
      consumer, a 1x1 conv without padding (needed to fold constants, see
      :mod:`reference.sparsity.slimming`); None otherwise.

    Channel ``c`` of the group is output ``c`` of ``producer``, channel ``c`` of
    each BN and of ``depthwise``, and input ``c`` of each consumer.
    """

    producer: Any  # Conv2d
    bn: Any  # BatchNorm2d
    consumers: tuple[Any, ...]  # Conv2d or Linear
    depthwise: Any = None  # Conv2d with groups == channels
    depthwise_bn: Any = None  # BatchNorm2d
    consumer_bn: Any = None  # BatchNorm2d
