"""Checks and the channel rule shared by the model builders."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference.errors import ConfigError

__all__ = ["check_model_args", "scale_channels"]

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
