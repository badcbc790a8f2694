"""The model zoo: build any model by name.

======================  ============================================  ===========  ========
name                    what                                          in channels  input
======================  ============================================  ===========  ========
``digits_cnn``          small CNN for the 8x8 scikit-learn digits     1            8x8
``resnet20/32/56``      CIFAR ResNets, basic blocks, widths 16/32/64  3            32x32
``resnet18``            ResNet-18, torchvision layout                 3            224x224
``resnet50``            ResNet-50 v1.5, torchvision layout            3            224x224
``mobilenet_v1``        MobileNetV1 with a width multiplier           3            224x224
======================  ============================================  ===========  ========

The "input" column is the usual size (:func:`default_input_shape`); every model
accepts any input size that survives its downsampling and any class count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference.errors import ConfigError
from reference.models.common import check_model_args, scale_channels
from reference.models.mobilenet import MobileNetV1
from reference.models.resnet import ResNet, cifar_resnet, resnet18, resnet50
from reference.models.small import DigitsCNN
from reference.nn import Module

__all__ = [
    "MODEL_NAMES",
    "MODEL_SPECS",
    "DigitsCNN",
    "MobileNetV1",
    "ModelSpec",
    "ResNet",
    "build_model",
    "default_input_shape",
    "scale_channels",
]


@dataclass(frozen=True)
class ModelSpec:
    """A buildable model: its constructor, the options it accepts and its usual input."""

    name: str
    build: Callable[..., Module]
    in_channels: int
    input_size: int
    num_classes: int
    options: tuple[str, ...] = ()
    description: str = ""


_RESNET_OPTIONS = ("zero_init_residual",)

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("digits_cnn", DigitsCNN, 1, 8, 10, (), "small CNN for the 8x8 digits"),
        ModelSpec(
            "resnet20", functools.partial(cifar_resnet, 20), 3, 32, 10, _RESNET_OPTIONS, "CIFAR ResNet-20"
        ),
        ModelSpec(
            "resnet32", functools.partial(cifar_resnet, 32), 3, 32, 10, _RESNET_OPTIONS, "CIFAR ResNet-32"
        ),
        ModelSpec(
            "resnet56", functools.partial(cifar_resnet, 56), 3, 32, 10, _RESNET_OPTIONS, "CIFAR ResNet-56"
        ),
        ModelSpec("resnet18", resnet18, 3, 224, 1000, _RESNET_OPTIONS, "ResNet-18 (torchvision layout)"),
        ModelSpec("resnet50", resnet50, 3, 224, 1000, _RESNET_OPTIONS, "ResNet-50 v1.5 (torchvision layout)"),
        ModelSpec("mobilenet_v1", MobileNetV1, 3, 224, 1000, (), "MobileNetV1"),
    )
}

MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def _spec(name: str) -> ModelSpec:
    spec = MODEL_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    return spec


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The usual (C, H, W) input of model ``name`` (e.g. (3, 224, 224) for resnet50)."""
    spec = _spec(name)
    return (spec.in_channels, spec.input_size, spec.input_size)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    width: float = 1.0,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float32,
    **options: Any,
) -> Module:
    """A freshly initialised model.

    ``in_channels`` defaults to the model's usual input (1 for ``digits_cnn``,
    3 otherwise). ``rng`` defaults to ``np.random.default_rng(0)``, so a call
    without one is reproducible. ``options`` are model-specific
    (``zero_init_residual`` for the ResNets). Raises ConfigError for an unknown
    name or option and for a non-positive ``num_classes`` or ``width``.
    """
    spec = _spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "none"
        raise ConfigError(f"model {name!r} has no option {', '.join(unknown)}; accepted options: {accepted}")
    in_channels = spec.in_channels if in_channels is None else in_channels
    check_model_args(name, num_classes, in_channels, width)
    rng = np.random.default_rng(0) if rng is None else rng
    return spec.build(
        num_classes=num_classes, in_channels=in_channels, width=width, rng=rng, dtype=dtype, **options
    )
