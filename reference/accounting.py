"""Per-layer weights and multiply-accumulates (MACs), dense and sparse.

What is counted (METHODS.md section 6), per image:

    conv:  MACs = C_out * (C_in / groups) * k_h * k_w * H_out * W_out
              = (weights of the layer) * H_out * W_out                     (1)
    fc:    MACs = in * out = (weights of the layer)                        (2)
    global average pool:  MACs = C * H * W of its input                    (3)
    sparse MACs of a conv or fc = dense MACs * density,
        density = nonzeros of the effective weight / weights               (4)

so (4) is ``nonzeros * H_out * W_out`` for a conv and ``nonzeros`` for an fc,
an exact integer. BN, ReLU, windowed pools (max or average) and residual adds
cost nothing here; the global pool is never sparse. Sparsity is over the weights of the conv and fc layers
(the layers a sparsity method reparameterises), not BN parameters or biases.

Shapes come from :meth:`reference.nn.Module.trace`, which follows the input
shape through the model analytically (nothing is computed, so ResNet-50 at
224x224 takes milliseconds). Nonzeros are counted on each layer's
``effective_weight()``, so a sparse layer reports what it computes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.autodiff import no_grad
from reference.errors import ShapeError
from reference.nn import Conv2d, GlobalAvgPool2d, Linear, Module

__all__ = [
    "CostTotals",
    "LayerCost",
    "MemoryEstimate",
    "estimate_memory",
    "format_table",
    "profile",
    "summarize",
    "summarize_model",
    "totals",
]


@dataclass(frozen=True)
class LayerCost:
    """The cost of one layer for one image.

    name: dotted module name (``layer1.0.conv1``); kind: "conv", "dwconv"
    (depthwise), "gconv" (other grouped), "fc" or "pool"; weight_shape: None for
    the pool; params: weights of the layer (no bias), 0 for the pool;
    nonzeros: nonzero entries of the effective weight; output_shape: (C, H, W)
    or (features,) without the batch dimension; dense_macs, sparse_macs: (1)-(4).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...] | None
    params: int
    nonzeros: int
    output_shape: tuple[int, ...]
    dense_macs: int
    sparse_macs: int

    @property
    def density(self) -> float:
        """nonzeros / params (1.0 for the pool)."""
        return self.nonzeros / self.params if self.params else 1.0


@dataclass(frozen=True)
class CostTotals:
    """Model-wide sums. ``weights`` and ``nonzeros`` are over conv and fc weights only."""

    weights: int
    nonzeros: int
    parameters: int  # every parameter: weights, biases, BN affine (and any method's extras)
    dense_macs: int  # convs, fc and the global average pool
    sparse_macs: int
    pool_macs: int

    @property
    def dense_macs_without_pool(self) -> int:
        return self.dense_macs - self.pool_macs

    @property
    def sparse_macs_without_pool(self) -> int:
        return self.sparse_macs - self.pool_macs

    @property
    def sparsity(self) -> float:
        """Fraction of conv and fc weights that are zero."""
        return 1.0 - self.nonzeros / self.weights if self.weights else 0.0

    @property
    def compression(self) -> float:
        """weights / nonzeros (infinite when everything is pruned)."""
        return self.weights / self.nonzeros if self.nonzeros else float("inf")


def _conv_kind(layer: Conv2d) -> str:
    if layer.groups == 1:
        return "conv"
    if layer.groups == layer.in_channels:
        return "dwconv"
    return "gconv"


def profile(model: Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """One :class:`LayerCost` per conv, fc and global average pool, in forward order.

    ``input_shape`` is one image's (C, H, W), or (N, C, H, W) whose N is
    ignored: every count is per image. Raises ShapeError when the input does
    not fit the model (wrong channel count, or too small for its downsampling).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ShapeError(f"profile: expected input_shape (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    names = {id(module): name for name, module in model.named_modules()}
    rows: list[LayerCost] = []

    def visit(layer: Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        name = names.get(id(layer), type(layer).__name__)
        if isinstance(layer, GlobalAvgPool2d):
            macs = int(np.prod(in_shape[1:]))  # (3)
            rows.append(LayerCost(name, "pool", None, 0, 0, tuple(out_shape[1:]), macs, macs))
            return
        if not isinstance(layer, (Conv2d, Linear)):
            return
        with no_grad():
            w = layer.effective_weight().numpy()
        params = int(w.size)
        nonzeros = int(np.count_nonzero(w))
        if isinstance(layer, Conv2d):
            positions = int(out_shape[2]) * int(out_shape[3])
            kind = _conv_kind(layer)
        else:
            positions = 1
            kind = "fc"
        rows.append(
            LayerCost(
                name,
                kind,
                tuple(w.shape),
                params,
                nonzeros,
                tuple(out_shape[1:]),
                params * positions,  # (1), (2)
                nonzeros * positions,  # (4)
            )
        )

    model.trace((1,) + shape, visit)
    return rows


def totals(rows: list[LayerCost], model: Module | None = None) -> CostTotals:
    """Sums over ``rows``; ``parameters`` counts every parameter of ``model`` (0 without one)."""
    parameters = sum(int(p.size) for p in model.parameters()) if model is not None else 0
    return CostTotals(
        weights=sum(r.params for r in rows),
        nonzeros=sum(r.nonzeros for r in rows),
        parameters=parameters,
        dense_macs=sum(r.dense_macs for r in rows),
        sparse_macs=sum(r.sparse_macs for r in rows),
        pool_macs=sum(r.dense_macs for r in rows if r.kind == "pool"),
    )


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)


def format_table(rows: list[LayerCost]) -> str:
    """An aligned text table, one line per layer, then a totals line (thousands separators)."""
    header = (
        "layer",
        "kind",
        "weight shape",
        "weights",
        "nonzero",
        "density",
        "output",
        "MACs",
        "sparse MACs",
    )
    body = [
        (
            r.name,
            r.kind,
            _shape(r.weight_shape),
            f"{r.params:,}",
            f"{r.nonzeros:,}",
            f"{100 * r.density:.2f}%" if r.params else "-",
            _shape(r.output_shape),
            f"{r.dense_macs:,}",
            f"{r.sparse_macs:,}",
        )
        for r in rows
    ]
    t = totals(rows)
    total_density = f"{100 * t.nonzeros / t.weights:.2f}%" if t.weights else "-"
    footer = (
        "total", "", "", f"{t.weights:,}", f"{t.nonzeros:,}", total_density, "",
        f"{t.dense_macs:,}", f"{t.sparse_macs:,}",
    )  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body, footer]) for i in range(len(header))]
    left = {0, 1, 2, 6}  # text columns; numbers align right

    def line(cells: tuple[str, ...]) -> str:
        parts = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body), rule, line(footer)])


def summarize_model(model: Module, input_shape: tuple[int, ...]) -> str:
    """The per-layer table of ``model`` at ``input_shape`` ((C, H, W)) followed by the totals."""
    rows = profile(model, input_shape)
    t = totals(rows, model)
    weights = (
        f"conv+fc weights:  {t.weights:,} ({t.nonzeros:,} nonzero; sparsity {100 * t.sparsity:.2f}% "
        f"of conv+fc weights; compression {t.compression:.2f}x)"
    )
    parameters = (
        f"all parameters:   {t.parameters:,} (conv+fc weights, biases, BN affine, any method's extras)"
    )
    macs = (
        f"MACs per image:   {t.dense_macs:,} dense, {t.sparse_macs:,} sparse "
        f"(including the global average pool, {t.pool_macs:,}; without it "
        f"{t.dense_macs_without_pool:,} dense, {t.sparse_macs_without_pool:,} sparse)"
    )
    return "\n".join([format_table(rows), "", weights, parameters, macs])


def summarize(
    model_name: str,
    input_size: int | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    width: float = 1.0,
) -> str:
    """The cost table of a freshly built model; ``None`` picks the model's usual input and classes."""
    from reference.models import MODEL_SPECS, build_model, default_input_shape

    c, h, _ = default_input_shape(model_name)
    spec = MODEL_SPECS[model_name]
    c = c if in_channels is None else in_channels
    h = h if input_size is None else input_size
    num_classes = spec.num_classes if num_classes is None else num_classes
    if isinstance(num_classes, int) and num_classes > spec.num_classes:  # beyond the usual: may not fit
        from reference.memory import require_memory

        need = estimate_memory(model_name, (c, h, h), num_classes, width)
        require_memory(
            need.model_bytes,
            f"{model_name} with {num_classes:,} classes ({need.parameters:,} float32 parameters)",
        )
    model = build_model(model_name, num_classes=num_classes, in_channels=c, width=width)
    header = f"{model_name}: input {c}x{h}x{h}, {num_classes} classes, width {width:g}"
    return header + "\n\n" + summarize_model(model, (c, h, h))


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower bound on the bytes a model needs, from its float32 arrays only.

    parameters: every parameter of the model at the requested number of
    classes; activations: per image, the outputs of its conv, fc and pool layers
    (the ones backpropagation must keep).

        model bytes     = 4 * parameters                                        (5)
        training bytes  = 3 * 4 * parameters  (weights, gradients, momentum)
                          + batch_size * 4 * activations                        (6)
    """

    parameters: int
    activations: int

    @property
    def model_bytes(self) -> int:
        return 4 * self.parameters  # (5)

    def training_bytes(self, batch_size: int) -> int:
        return 3 * 4 * self.parameters + batch_size * 4 * self.activations  # (6)


def estimate_memory(
    model_name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    width: float = 1.0,
) -> MemoryEstimate:
    """:class:`MemoryEstimate` of ``model_name`` for ``num_classes`` classes, without allocating it.

    The model is built with two classes (its size then does not depend on the
    request) and traced analytically on ``input_shape`` = (C, H, W). Only the
    classifier, the model's last fc layer, grows with the classes: each class
    adds one row of its weight and one bias entry.
    """
    from reference.models import build_model
    from reference.models.common import check_model_args

    c = int(input_shape[0])
    check_model_args(model_name, num_classes, c, width)
    small = build_model(model_name, num_classes=2, in_channels=c, width=width)
    classifiers = [m for m in small.modules() if isinstance(m, Linear)]
    per_class = 0
    if classifiers:
        fc = classifiers[-1]
        per_class = fc.in_features + (1 if getattr(fc, "bias", None) is not None else 0)
    parameters = sum(int(p.size) for p in small.parameters()) + (num_classes - 2) * per_class
    rows = profile(small, tuple(input_shape))
    activations = sum(int(np.prod(r.output_shape, dtype=object)) for r in rows) + (num_classes - 2)
    return MemoryEstimate(parameters=parameters, activations=activations)
