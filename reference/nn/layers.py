"""Layers: thin modules over :mod:`reference.functional` that own their parameters.

Weight layers (:class:`Conv2d`, :class:`Linear`) share the base class
:class:`WeightLayer`. Their forward reads the weight only through
:meth:`WeightLayer.effective_weight`, which returns ``self.weight`` here; a
sparse subclass overrides that one method to return the reparameterised weight
(``W_eff``) as a Tensor, and everything else (forward, accounting, export)
follows.

Initialisation (an explicit ``rng``; values drawn in float64, then cast to the
layer's dtype, so a float32 and a float64 model built from equal generators hold
the same numbers up to rounding):

- Conv2d weight: Kaiming normal with ``fan_out`` and the ReLU gain,
  ``std = sqrt(2 / fan_out)``, ``fan_out = (out_channels / groups) * kh * kw``, the
  number of outputs one input value feeds. For ``groups = 1`` this is
  torchvision's ResNet initialisation; for grouped and depthwise convs PyTorch's
  own fan-out formula does not divide by ``groups`` (it gives a smaller std).
- Conv2d bias (when asked for) and Linear weight and bias: uniform on
  ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, ``fan_in = (in_channels / groups) * kh * kw``
  or ``in_features``.
- BatchNorm2d: weight 1, bias 0, running mean 0, running variance 1,
  ``num_batches_tracked`` an int64 0-d array at 0 (the torchvision buffers).

``rng=None`` means ``np.random.default_rng(0)``: reproducible, and two equal
layers built without a generator start with equal weights. Models pass one
generator through all their layers.

Every layer checks its input in ``forward`` and in ``output_shape`` and raises
:class:`reference.errors.ShapeError` naming what it expected and what it got.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor
from reference.errors import ConfigError, ShapeError
from reference.nn.module import Module, Parameter, Shape, TraceVisitor

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "GlobalAvgPool2d",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "WeightLayer",
    "weight_layers",
]

IntPair = int | tuple[int, int]


def _pair(value: IntPair, what: str, owner: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints, each at least ``minimum``."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= minimum for v in pair):
        raise ConfigError(f"{owner}: {what} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _positive_int(value: Any, what: str, owner: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _float_dtype(dtype: Any, owner: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ConfigError(f"{owner}: dtype must be a floating-point dtype, got {dtype!r}") from exc
    if dt.kind != "f":
        raise ConfigError(f"{owner}: dtype must be a floating-point dtype, got {dt}")
    return dt


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return np.random.default_rng(0) if rng is None else rng


def _pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a sliding window: floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype}"


class WeightLayer(Module):
    """A layer whose forward uses a weight that a sparsity method may reparameterise.

    A sparsity method installs a sub-module as ``layer.sparsifier``: a map from
    the latent weight ``W`` to the weight the layer computes with (``W_eff``),
    with its own parameters and buffers (named ``<layer>.sparsifier.<name>`` in
    the state dict). Without one, the layer computes with ``W`` itself.
    """

    weight: Parameter

    @property
    def sparsifier(self) -> Module | None:
        """The installed weight map; assign a Module to install one, None to remove it."""
        return self._modules.get("sparsifier")

    def effective_weight(self) -> Tensor:
        """The weight the forward computes with: ``sparsifier(weight)``, or ``weight``."""
        sparsifier = self.sparsifier
        return self.weight if sparsifier is None else sparsifier(self.weight)

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        """A weight layer is one layer for accounting, with or without a sparsifier."""
        return self.trace_as_leaf(input_shape, visit)


class Conv2d(WeightLayer):
    """2-D convolution (cross-correlation), NCHW input, weight (out, in/groups, kh, kw).

    ``bias`` is off by default: every conv in the models here feeds a batch norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        groups: int = 1,
        bias: bool = False,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        owner = "Conv2d"
        self.in_channels = _positive_int(in_channels, "in_channels", owner)
        self.out_channels = _positive_int(out_channels, "out_channels", owner)
        self.kernel_size = _pair(kernel_size, "kernel_size", owner, 1)
        self.stride = _pair(stride, "stride", owner, 1)
        self.padding = _pair(padding, "padding", owner, 0)
        self.groups = _positive_int(groups, "groups", owner)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ConfigError(
                f"Conv2d: groups={self.groups} must divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        dt = _float_dtype(dtype, owner)
        rng = _rng(rng)
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
        fan_out = (self.out_channels // self.groups) * kh * kw
        std = math.sqrt(2.0 / fan_out)
        self.weight = Parameter((rng.standard_normal(shape) * std).astype(dt))
        if bias:
            bound = 1.0 / math.sqrt((self.in_channels // self.groups) * kh * kw)
            self.bias = Parameter(rng.uniform(-bound, bound, self.out_channels).astype(dt))
        else:
            self.register_parameter("bias", None)

    def _check(self, shape: Shape, dtype: Any = None) -> None:
        ok = len(shape) == 4 and shape[1] == self.in_channels
        ok = ok and (dtype is None or np.dtype(dtype) == self.weight.dtype)
        if not ok:
            got = f"{tuple(shape)}" + ("" if dtype is None else f" {np.dtype(dtype)}")
            raise ShapeError(
                f"Conv2d(in_channels={self.in_channels}): expected input of shape "
                f"(N, {self.in_channels}, H, W) and dtype {self.weight.dtype}, got {got}"
            )
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if shape[2] + 2 * ph < kh or shape[3] + 2 * pw < kw:
            raise ShapeError(
                f"Conv2d(kernel_size={self.kernel_size}, padding={self.padding}): input of spatial size "
                f"{tuple(shape[2:])} is smaller than the kernel; the input is too small for this model"
            )

    def output_shape(self, input_shape: Shape) -> Shape:
        self._check(input_shape)
        n, _, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (n, self.out_channels, _pooled_size(h, kh, sh, ph), _pooled_size(w, kw, sw, pw))

    def forward(self, x: Any) -> Tensor:
        self._check(tuple(x.shape), x.dtype)
        return F.conv2d(
            x,
            self.effective_weight(),
            self.bias,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is not None:
            s += ", bias=True"
        return s


class Linear(WeightLayer):
    """``y = x @ weight.T + bias`` with weight (out_features, in_features), input (N, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rng: np.random.Generator | None = None,
        dtype: Any = np.float32,
    ):
        super().__init__()
        owner = "Linear"
        self.in_features = _positive_int(in_features, "in_features", owner)
        self.out_features = _positive_int(out_features, "out_features", owner)
        dt = _float_dtype(dtype, owner)
        rng = _rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(dt))
        if bias:
            self.bias = Parameter(rng.uniform(-bound, bound, self.out_features).astype(dt))
        else:
            self.register_parameter("bias", None)

    def _check(self, shape: Shape, dtype: Any = None) -> None:
        ok = len(shape) == 2 and shape[1] == self.in_features
        ok = ok and (dtype is None or np.dtype(dtype) == self.weight.dtype)
        if not ok:
            got = f"{tuple(shape)}" + ("" if dtype is None else f" {np.dtype(dtype)}")
            raise ShapeError(
                f"Linear(in_features={self.in_features}): expected input of shape "
                f"(N, {self.in_features}) and dtype {self.weight.dtype}, got {got}"
            )

    def output_shape(self, input_shape: Shape) -> Shape:
        self._check(input_shape)
        return (input_shape[0], self.out_features)

    def forward(self, x: Any) -> Tensor:
        self._check(tuple(x.shape), x.dtype)
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class BatchNorm2d(Module):
    """Batch norm per channel over (N, H, W) for (N, C, H, W) input, or over N for (N, C) input.

    Training mode normalises with the batch statistics and moves the running
    averages toward them (see :func:`reference.functional.batch_norm`) and
    counts the step in ``num_batches_tracked``; evaluation mode normalises with
    the running statistics. Training needs more than one value per channel.

    A channel-pruning method installs a sub-module as ``bn.channel_mask``: a map
    ``(weight, bias) -> m``, a Tensor of shape (C,) with ``m >= 0``. The output is
    then ``BN(x) * m`` (m broadcast over N, H, W), and in training only the
    channels with ``m > 0.5`` (the sampled "keep" decisions) update the running
    statistics. For a BN followed by a ReLU, ``ReLU(BN(x) * m) = ReLU(BN(x)) * m``
    because ``m >= 0``: this is the mask after the ReLU. Without a mask the layer
    is plain batch norm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        dtype: Any = np.float32,
    ):
        super().__init__()
        owner = "BatchNorm2d"
        self.num_features = _positive_int(num_features, "num_features", owner)
        if not eps > 0:
            raise ConfigError(f"{owner}: eps must be positive, got {eps!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"{owner}: momentum must be in [0, 1], got {momentum!r}")
        self.eps = float(eps)
        self.momentum = float(momentum)
        dt = _float_dtype(dtype, owner)
        c = self.num_features
        self.weight = Parameter(np.ones(c, dtype=dt))
        self.bias = Parameter(np.zeros(c, dtype=dt))
        self.register_buffer("running_mean", np.zeros(c, dtype=dt))
        self.register_buffer("running_var", np.ones(c, dtype=dt))
        self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        # Synchronised batch norm: an ``allreduce(array)`` summing over the processes of a
        # data-parallel run (reference.distributed installs it); None normalises this batch alone.
        self.sync = None

    def _check(self, shape: Shape, dtype: Any = None) -> None:
        ok = len(shape) in (2, 4) and shape[1] == self.num_features
        ok = ok and (dtype is None or np.dtype(dtype) == self.weight.dtype)
        if not ok:
            c = self.num_features
            got = f"{tuple(shape)}" + ("" if dtype is None else f" {np.dtype(dtype)}")
            raise ShapeError(
                f"BatchNorm2d(num_features={c}): expected input of shape (N, {c}, H, W) or (N, {c}) "
                f"and dtype {self.weight.dtype}, got {got}"
            )

    def output_shape(self, input_shape: Shape) -> Shape:
        self._check(input_shape)
        return tuple(input_shape)

    @property
    def channel_mask(self) -> Module | None:
        """The installed channel mask; assign a Module to install one, None to remove it."""
        return self._modules.get("channel_mask")

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        """A leaf for shape tracing, with or without a channel mask."""
        return self.trace_as_leaf(input_shape, visit)

    def forward(self, x: Any) -> Tensor:
        shape = tuple(x.shape)
        self._check(shape, x.dtype)
        if self.training and math.prod(shape) // shape[1] < 2:
            raise ShapeError(
                f"BatchNorm2d(num_features={self.num_features}): training needs more than one value "
                f"per channel, got input of shape {shape}"
            )
        masker = self.channel_mask
        mask = None if masker is None else masker(self.weight, self.bias)  # (C,)
        if mask is not None and tuple(mask.shape) != (self.num_features,):
            raise ShapeError(
                f"BatchNorm2d(num_features={self.num_features}): channel_mask returned shape "
                f"{tuple(mask.shape)}, expected ({self.num_features},)"
            )
        update_mask = (mask.data > 0.5) if mask is not None and self.training else None
        if self.training and self.sync is not None:
            y = F.sync_batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.sync,
                momentum=self.momentum, eps=self.eps, update_mask=update_mask,
            )  # fmt: skip
        else:
            y = F.batch_norm(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                training=self.training,
                momentum=self.momentum,
                eps=self.eps,
                update_mask=update_mask,
            )
        if mask is not None:  # (C,) -> (1, C, 1, 1) or (1, C): broadcast over N (and H, W)
            y = F.mul(y, F.reshape(mask, (1, self.num_features) + (1,) * (len(shape) - 2)))
        if self.training:
            self.num_batches_tracked += 1  # in place: the 0-d array keeps its identity
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class ReLU(Module):
    """``max(x, 0)`` elementwise (the gradient at 0 is the op's convention)."""

    def forward(self, x: Any) -> Tensor:
        return F.relu(x)

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)


class _Pool2d(Module):
    """Shared settings and checks of the sliding-window pools (floor mode)."""

    _name = "Pool2d"

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size", self._name, 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride", self._name, 1)
        self.padding = _pair(padding, "padding", self._name, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ConfigError(
                f"{self._name}: padding {self.padding} must be at most half the kernel size {self.kernel_size}"
            )

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if len(shape) != 4 or shape[2] + 2 * ph < kh or shape[3] + 2 * pw < kw:
            raise ShapeError(
                f"{self._name}(kernel_size={self.kernel_size}, padding={self.padding}): expected input of "
                f"shape (N, C, H, W) with H + 2*{ph} >= {kh} and W + 2*{pw} >= {kw}, got {shape}"
            )
        return (shape[0], shape[1], _pooled_size(shape[2], kh, sh, ph), _pooled_size(shape[3], kw, sw, pw))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Maximum over each window (padding never wins)."""

    _name = "MaxPool2d"

    def forward(self, x: Any) -> Tensor:
        self.output_shape(tuple(x.shape))
        return F.max_pool2d(x, self.kernel_size, stride=self.stride, padding=self.padding)


class AvgPool2d(_Pool2d):
    """Mean over each window."""

    _name = "AvgPool2d"

    def forward(self, x: Any) -> Tensor:
        self.output_shape(tuple(x.shape))
        return F.avg_pool2d(x, self.kernel_size, stride=self.stride, padding=self.padding)


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): the mean over all positions of each channel."""

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        if len(shape) != 4:
            raise ShapeError(f"GlobalAvgPool2d: expected input of shape (N, C, H, W), got {shape}")
        return (shape[0], shape[1])

    def forward(self, x: Any) -> Tensor:
        self.output_shape(tuple(x.shape))
        return F.global_avg_pool2d(x)


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    def output_shape(self, input_shape: Shape) -> Shape:
        shape = tuple(input_shape)
        if len(shape) < 1:
            raise ShapeError(f"Flatten: expected input with a batch dimension, got shape {shape}")
        return (shape[0], math.prod(shape[1:]))

    def forward(self, x: Any) -> Tensor:
        return F.flatten(x)


def weight_layers(module: Module) -> list[tuple[str, WeightLayer]]:
    """(dotted name, layer) for every Conv2d and Linear below ``module``: the sparsifiable layers."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, WeightLayer)]
