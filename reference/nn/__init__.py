"""Modules and layers: parameters, buffers and children under torchvision-style dotted names.

- :mod:`.module`: :class:`Parameter`, :class:`Module` (registration, traversal,
  train/eval, state_dict and load_state_dict, shape tracing), :class:`Sequential`,
  :class:`Identity`.
- :mod:`.layers`: :class:`Conv2d`, :class:`Linear` (both :class:`WeightLayer`,
  computing with ``effective_weight()``), :class:`BatchNorm2d`, :class:`ReLU`,
  :class:`MaxPool2d`, :class:`AvgPool2d`, :class:`GlobalAvgPool2d`, :class:`Flatten`.
"""

from reference.nn.layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
    WeightLayer,
    weight_layers,
)
from reference.nn.module import Identity, LoadResult, Module, Parameter, Sequential, Shape, TraceVisitor

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "GlobalAvgPool2d",
    "Identity",
    "Linear",
    "LoadResult",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Shape",
    "TraceVisitor",
    "WeightLayer",
    "weight_layers",
]
