"""ONNX export: a finalized model as an ONNX graph that any ONNX runtime can execute.

:func:`build_onnx` walks a finalized model (plain weights: ``W_eff`` for STR
and LTP with its exact zeros, the slimmed channel counts for SCP) and writes
one ONNX node per layer with the ``onnx`` package's own graph API (no PyTorch):

    layer                          ONNX node
    Conv2d                         Conv      (kernel_shape, strides, pads, group)
    BatchNorm2d (evaluation)       BatchNormalization (epsilon; running statistics)
    ReLU                           Relu
    residual addition              Add
    MaxPool2d                      MaxPool   (padding never selected, as the reference's -inf)
    GlobalAvgPool2d                GlobalAveragePool, then Flatten -> (N, C)
    Linear                         Gemm      (transB = 1: x @ W.T + b)

The graph has one input ``input`` of shape ``(batch, C, H, W)`` and one output
``logits`` of shape ``(batch, num_classes)``; ``batch`` is a symbolic (dynamic)
dimension. Initializers keep the state dict's torchvision names
(``layer1.0.conv1.weight``, ``layer1.0.bn1.running_mean``, ...), as float32.

Folding batch norm (``fold_bn=True``). In evaluation a conv followed by its
batch norm computes, for output channel ``o``::

    z_o = (W_o * x) + b_o                                   (1)  the conv (b = 0 without a bias)
    y_o = gamma_o (z_o - mu_o) / sqrt(var_o + eps) + beta_o  (2)  batch norm with running mu, var

Writing ``a_o = gamma_o / sqrt(var_o + eps)`` (3), (2) of (1) is one conv::

    y_o = (a_o W_o) * x + (a_o (b_o - mu_o) + beta_o)        (4)
    W'_o = a_o W_o,   b'_o = a_o (b_o - mu_o) + beta_o       (5)

so the pair becomes one Conv with weight ``W'`` and bias ``b'`` (names
``<conv>.weight`` and ``<conv>.bias``). (5) is computed in float64 and rounded
once to float32, so the folded graph equals the unfolded one up to that
rounding. ``var_o + eps > 0`` makes ``a_o`` finite: a weight that is exactly 0
stays exactly 0, and the sparsity pattern survives folding (a channel with
``gamma_o = 0`` becomes all zeros, which is what it computed before).

The preprocessing a caller must apply to raw pixels is recorded in the model's
``metadata_props`` (:func:`preprocessing_of`): ``x = (pixel * pixel_scale - mean)
/ std`` per channel, with the input size; see :data:`METADATA_KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reference.errors import ConfigError
from reference.nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, MaxPool2d, Module, weight_layers

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "METADATA_KEYS",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "build_onnx",
    "check_opset",
    "export_onnx",
    "max_opset",
    "preprocessing_of",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
DEFAULT_OPSET = 17  # every op used here has had its present meaning since opset 13
MIN_OPSET = 13
METADATA_KEYS = (
    "learnsparse_version",
    "model",  # the model's name (resnet50, ...)
    "method",  # the sparsity method the weights were trained with
    "width",  # the model's width multiplier
    "num_classes",
    "slimmed",  # "true" where SCP removed channels
    "dataset",
    "input_name",
    "output_name",
    "input_shape",  # JSON [C, H, W] of one image
    "input_size",  # H (= W) or "HxW"
    "layout",  # NCHW
    "pixel_scale",  # raw pixel -> [0, 1]
    "mean",  # JSON list, one per channel
    "std",  # JSON list, one per channel
    "preprocessing",  # the formula in words
    "opset",
    "bn_folded",  # "true" / "false"
    "weights",  # conv + fc weights
    "nonzeros",  # of them nonzero
)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install onnx (the project's 'onnx' extra)"
        ) from None
    return onnx


def max_opset() -> int:
    """The newest opset the installed ``onnx`` package knows."""
    return int(_onnx().defs.onnx_opset_version())


def check_opset(opset: Any) -> int:
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= top:
        raise ConfigError(f"--opset must be an integer from {MIN_OPSET} to {top}, got {opset!r}")
    return int(opset)


# ---------------------------------------------------------------------------
# Preprocessing


def preprocessing_of(dataset: str, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """What turns a raw image into the model's input: ``(pixel * pixel_scale - mean) / std`` per channel.

    ``dataset`` is the training data set's name; ``input_shape`` one image's (C, H, W).
    """
    c = int(input_shape[0])
    if dataset in ("digits", "digits32"):
        from reference.data import digits_statistics

        mean, std = digits_statistics()
        upsampled = " after repeating each pixel over a 4x4 block" if dataset == "digits32" else ""
        return {
            "pixel_scale": 1.0 / 16.0,
            "mean": [mean] * c,
            "std": [std] * c,
            "preprocessing": f"8x8 grey digits with pixels 0..16{upsampled}: x = (pixel / 16 - mean) / std",
        }
    if dataset == "cifar10":
        from reference.data import CIFAR10_MEAN, CIFAR10_STD

        return {
            "pixel_scale": 1.0 / 255.0,
            "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD),
            "preprocessing": "RGB pixels 0..255: x = (pixel / 255 - mean) / std per channel",
        }
    if dataset == "imagefolder":
        from reference.imagefolder import IMAGENET_MEAN, IMAGENET_STD

        side = int(input_shape[1])
        return {
            "pixel_scale": 1.0 / 255.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "preprocessing": (
                f"resize the short side to {round(side * 256 / 224)}, centre crop {side}x{side}, "
                "RGB pixels 0..255: x = (pixel / 255 - mean) / std per channel"
            ),
        }
    return {  # synthetic: the inputs are already standardised
        "pixel_scale": 1.0,
        "mean": [0.0] * c,
        "std": [1.0] * c,
        "preprocessing": f"none: {dataset} inputs are used as they are",
    }


# ---------------------------------------------------------------------------
# The graph


def _host32(array: Any, name: str) -> np.ndarray:
    get = getattr(array, "get", None)
    a = np.asarray(get() if callable(get) and not isinstance(array, np.ndarray) else array)
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"export: {name} holds a NaN or an infinity; only finite weights can be exported")
    return np.asarray(a, dtype=np.float32, order="C")


class _GraphBuilder:
    """Collects nodes and initializers while the model is walked in forward order."""

    def __init__(self, model: Module, fold_bn: bool):
        self.onnx = _onnx()
        self.names = {id(m): name for name, m in model.named_modules()}
        self.fold_bn = fold_bn
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _name(self, module: Module) -> str:
        return self.names[id(module)]

    def _tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def _node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{hint}_{self._count}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=f"{op}_{self._count}", **attrs))
        return out

    # layers

    def conv(self, conv: Conv2d, x: str, bn: BatchNorm2d | None = None) -> str:
        """Conv (and its batch norm ``bn``, folded by (5) or as a BatchNormalization node)."""
        if not isinstance(conv, Conv2d):
            raise ConfigError(f"export: expected a Conv2d, got {type(conv).__name__}")
        name = self._name(conv)
        w = _host32(conv.weight.data, f"{name}.weight")
        b = None if conv.bias is None else _host32(conv.bias.data, f"{name}.bias")
        if bn is not None and self.fold_bn:
            w, b = self._folded(w, b, bn)
            bn = None
        inputs = [x, self._tensor(f"{name}.weight", w)]
        if b is not None:
            inputs.append(self._tensor(f"{name}.bias", b))
        (ph, pw), (sh, sw), (kh, kw) = conv.padding, conv.stride, conv.kernel_size
        y = self._node(
            "Conv", inputs, name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
            group=conv.groups, dilations=[1, 1],
        )  # fmt: skip
        return y if bn is None else self.batch_norm(bn, y)

    def _folded(self, w: np.ndarray, b: np.ndarray | None, bn: BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
        name = self._name(bn)
        gamma, beta, mu, var = (
            _host32(a, f"{name}.{k}").astype(np.float64)
            for k, a in (
                ("weight", bn.weight.data), ("bias", bn.bias.data),
                ("running_mean", bn.running_mean), ("running_var", bn.running_var),
            )
        )  # fmt: skip
        a = gamma / np.sqrt(var + bn.eps)  # (3)
        bias = np.zeros_like(mu) if b is None else b.astype(np.float64)
        w_folded = w.astype(np.float64) * a[:, None, None, None]  # (5) W' = a W; a: (O,) -> (O, 1, 1, 1)
        b_folded = a * (bias - mu) + beta  # (5) b' = a (b - mu) + beta
        return w_folded.astype(np.float32), b_folded.astype(np.float32)

    def batch_norm(self, bn: BatchNorm2d, x: str) -> str:
        name = self._name(bn)
        parts = [
            self._tensor(f"{name}.{k}", _host32(a, f"{name}.{k}"))
            for k, a in (
                ("weight", bn.weight.data), ("bias", bn.bias.data),
                ("running_mean", bn.running_mean), ("running_var", bn.running_var),
            )
        ]  # fmt: skip
        return self._node("BatchNormalization", [x, *parts], name, epsilon=float(bn.eps))

    def relu(self, x: str) -> str:
        return self._node("Relu", [x], "relu")

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b], "add")

    def max_pool(self, pool: MaxPool2d, x: str) -> str:
        (ph, pw), (sh, sw), (kh, kw) = pool.padding, pool.stride, pool.kernel_size
        return self._node(
            "MaxPool", [x], "maxpool", kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw]
        )

    def head(self, pool: GlobalAvgPool2d, fc: Linear, x: str) -> str:
        """Global average pool, flatten, and the classifier: (N, C, H, W) -> (N, C) -> (N, classes)."""
        if not isinstance(pool, GlobalAvgPool2d) or not isinstance(fc, Linear):
            raise ConfigError("export: expected a global average pool and a Linear classifier")
        pooled = self._node("GlobalAveragePool", [x], "avgpool")  # (N, C, H, W) -> (N, C, 1, 1)
        flat = self._node("Flatten", [pooled], "flatten", axis=1)  # (N, C, 1, 1) -> (N, C)
        name = self._name(fc)
        inputs = [flat, self._tensor(f"{name}.weight", _host32(fc.weight.data, f"{name}.weight"))]
        if fc.bias is not None:
            inputs.append(self._tensor(f"{name}.bias", _host32(fc.bias.data, f"{name}.bias")))
        self.nodes.append(self.onnx.helper.make_node("Gemm", inputs, [OUTPUT_NAME], name="Gemm_fc", transB=1))
        return OUTPUT_NAME


def _walk(model: Module, g: _GraphBuilder, x: str) -> str:
    """Emit ``model``'s evaluation forward into ``g``, starting from the tensor named ``x``."""
    from reference.models.mobilenet import ConvBNReLU, DepthwiseSeparable, MobileNetV1
    from reference.models.resnet import ResNet
    from reference.models.small import DigitsCNN

    if isinstance(model, DigitsCNN):
        for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2), (model.conv3, model.bn3)):
            x = g.relu(g.conv(conv, x, bn))
        return g.head(model.avgpool, model.fc, x)
    if isinstance(model, ResNet):
        x = g.relu(g.conv(model.conv1, x, model.bn1))
        if model.maxpool is not None:
            x = g.max_pool(model.maxpool, x)
        for stage_name in model.stage_names:
            for block in getattr(model, stage_name):
                layers = block.main_path()  # (conv, bn) pairs; ReLU after all but the last
                out = x
                for i in range(0, len(layers), 2):
                    out = g.conv(layers[i], out, layers[i + 1])
                    if i + 2 < len(layers):
                        out = g.relu(out)
                shortcut = x
                if block.downsample is not None:  # the projection: 1x1 conv + BN
                    projection, projection_bn = block.downsample
                    shortcut = g.conv(projection, x, projection_bn)
                x = g.relu(g.add(out, shortcut))
        return g.head(model.avgpool, model.fc, x)
    if isinstance(model, MobileNetV1):
        for layer in model.features:
            if isinstance(layer, ConvBNReLU):
                x = g.relu(g.conv(layer.conv, x, layer.bn))
            elif isinstance(layer, DepthwiseSeparable):
                x = g.relu(g.conv(layer.dw, x, layer.dw_bn))
                x = g.relu(g.conv(layer.pw, x, layer.pw_bn))
            else:
                raise ConfigError(f"export: no ONNX form for MobileNetV1 layer {type(layer).__name__}")
        return g.head(model.avgpool, model.fc, x)
    raise ConfigError(
        f"export: no ONNX graph for a {type(model).__name__}; "
        "expected digits_cnn, a ResNet or mobilenet_v1 from reference.models"
    )


def _counts(model: Module) -> tuple[int, int]:
    weights = nonzeros = 0
    for _, layer in weight_layers(model):
        w = layer.weight.numpy()
        weights += int(w.size)
        nonzeros += int(np.count_nonzero(w))
    return weights, nonzeros


def build_onnx(
    model: Module,
    input_shape: tuple[int, int, int],
    *,
    fold_bn: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of the finalized ``model`` for images of ``input_shape`` (C, H, W).

    ``metadata`` adds entries to ``metadata_props`` (values turned into
    text; lists and dicts as JSON). Raises ConfigError for a model that is not
    finalized, a model type without a graph, a bad opset or non-finite weights.
    """
    from reference import __version__
    from reference.finalize import has_sparsity_modules

    onnx = _onnx()
    opset = check_opset(opset)
    if has_sparsity_modules(model):
        raise ConfigError("export: the model still has sparsifiers or channel masks; finalize it first")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"export: input_shape must be (C, H, W) of positive sizes, got {input_shape!r}")
    out_shape = model.trace((1, *shape), lambda *_: None)  # ShapeError if the input does not fit
    model.eval()
    g = _GraphBuilder(model, fold_bn)
    _walk(model, g, INPUT_NAME)
    classes = int(out_shape[1])
    helper = onnx.helper
    graph = helper.make_graph(
        g.nodes,
        "learnsparse",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, [BATCH_AXIS, *shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [BATCH_AXIS, classes])],
        initializer=g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="learnsparse",
        producer_version=__version__,
        doc_string="A learnsparse model; the preprocessing its input needs is in metadata_props.",
    )
    weights, nonzeros = _counts(model)
    props: dict[str, Any] = {
        "learnsparse_version": __version__,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": list(shape),
        "input_size": str(shape[1]) if shape[1] == shape[2] else f"{shape[1]}x{shape[2]}",
        "layout": "NCHW",
        "opset": opset,
        "bn_folded": "true" if fold_bn else "false",
        "weights": weights,
        "nonzeros": nonzeros,
    }
    props.update(metadata or {})
    helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    return proto


def export_onnx(
    model: Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    *,
    dataset: str = "synthetic",
    fold_bn: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the finalized ``model`` as an ONNX file at ``path`` (see the module docstring); atomic.

    ``dataset`` names the training data set, whose preprocessing goes into the
    metadata. The graph passes ``onnx.checker.check_model`` before it is written.
    """
    from reference.files import write_atomic

    onnx = _onnx()
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    props = {"dataset": dataset, **preprocessing_of(dataset, input_shape), **(metadata or {})}
    proto = build_onnx(model, input_shape, fold_bn=fold_bn, opset=opset, metadata=props)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"export: the ONNX graph failed its check: {exc}") from None
    try:
        write_atomic(path, proto.SerializeToString())
    except OSError as exc:
        raise ConfigError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path
