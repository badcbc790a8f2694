"""The per-layer sparsity table of a model: rows, the terminal table and its summary lines.

:func:`layer_report` gives one row per conv, fc and global average pool, in
forward order (the rows of :func:`reference.accounting.profile`), then a totals
row. Columns (:data:`COLUMNS`)::

    layer          dotted module name ("total" for the totals row)
    kind           conv, dwconv, gconv, fc or pool
    shape          weight shape as "64x3x7x7" ("" for the pool and the totals)
    params         weights of the layer (no bias)
    nonzeros       nonzero entries of the weight the layer computes with (eval mode)
    sparsity_pct   100 * (1 - nonzeros / params)
    compression    params / nonzeros (None when every weight is zero)
    threshold      the magnitude below which the layer's weights are zero, where the
                   method has one: g = sigmoid(s) for STR, sqrt(tau) for LTP (the mean
                   over channels for a per-channel threshold); None otherwise
    channels_kept  output channels the batch norm after the layer keeps, where a
                   channel mask is installed (SCP); None otherwise
    dense_macs     multiply-accumulates per image of the dense layer
    sparse_macs    dense_macs * nonzeros / params

The totals row sums conv and fc weights only: its sparsity and compression use
the conv+fc weights as the denominator (biases and BN parameters are not
counted), and its MACs include the global average pool, as in
:mod:`reference.accounting` (METHODS.md section 6).

Training prints this table at the end of a run (:func:`report_text`); the
``report`` command (:mod:`reference.report`) writes it to files with plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reference.accounting import profile, totals
from reference.autodiff import Tensor, no_grad
from reference.nn import BatchNorm2d, Module, WeightLayer, weight_layers
from reference.sparsity.slimming import slim

__all__ = [
    "COLUMNS",
    "DENOMINATOR_NOTE",
    "channel_keep_mask",
    "channel_reduction",
    "format_report",
    "layer_report",
    "layer_threshold",
    "report_text",
    "summary_lines",
]

COLUMNS = (
    "layer",
    "kind",
    "shape",
    "params",
    "nonzeros",
    "sparsity_pct",
    "compression",
    "threshold",
    "channels_kept",
    "dense_macs",
    "sparse_macs",
)

DENOMINATOR_NOTE = (
    "Sparsity and compression are over the conv and fc weights (biases and BN parameters are not "
    "counted); MACs are per image and include the global average pool."
)


# ---------------------------------------------------------------------------
# What a method exposes (duck-typed)


def _host_float(value: Any) -> np.ndarray:
    """A Tensor, NumPy or CuPy array, or number as a float64 NumPy array."""
    if isinstance(value, Tensor):
        value = value.numpy()
    get = getattr(value, "get", None)
    if callable(get) and not isinstance(value, np.ndarray):
        value = get()
    return np.asarray(value, dtype=np.float64)


def layer_threshold(layer: WeightLayer) -> float | None:
    """The magnitude threshold on ``|W|`` of ``layer``'s sparsifier, or None.

    Looked up in order: a ``threshold()`` method (taken as a threshold on
    ``|W|``), a parameter ``s`` (STR: ``g = sigmoid(s)``), a parameter ``tau``
    (LTP, a threshold on ``W^2``: ``sqrt(max(tau, 0))``). A per-channel
    threshold is reported as its mean.
    """
    sparsifier = layer.sparsifier
    if sparsifier is None:
        return None
    method = getattr(sparsifier, "threshold", None)
    if callable(method):
        g = _host_float(method())
    elif getattr(sparsifier, "s", None) is not None:
        s = _host_float(sparsifier.s)
        g = 0.5 * (1.0 + np.tanh(0.5 * s))  # sigmoid(s), without overflow for s = -3200
    elif getattr(sparsifier, "tau", None) is not None:
        g = np.sqrt(np.maximum(_host_float(sparsifier.tau), 0.0))
    else:
        return None
    return float(np.mean(g)) if g.size else None


def channel_keep_mask(bn: Module) -> np.ndarray | None:
    """The channels a batch norm's channel mask keeps, as booleans (call in eval mode); None without one.

    Uses the mask's contract (:class:`reference.nn.BatchNorm2d`): ``bn.channel_mask``
    maps ``(weight, bias)`` to ``m`` of shape (C,); a channel is kept where ``m > 0``.
    """
    mask_module = getattr(bn, "channel_mask", None)
    if not isinstance(mask_module, Module):
        return None
    with no_grad():
        m = mask_module(bn.weight, bn.bias)
    return _host_float(m).reshape(-1) > 0


def _extras(model: Module, input_shape: tuple[int, ...]) -> dict[str, tuple[float | None, int | None]]:
    """Layer name -> (threshold, channels kept by the batch norm that follows it in forward order)."""
    names = {id(m): n for n, m in model.named_modules()}
    order: list[Module] = []
    model.trace(input_shape, lambda layer, _i, _o: order.append(layer))
    out: dict[str, tuple[float | None, int | None]] = {}
    for i, layer in enumerate(order):
        if not isinstance(layer, WeightLayer):
            continue
        kept = None
        following = order[i + 1] if i + 1 < len(order) else None
        if isinstance(following, BatchNorm2d):
            keep = channel_keep_mask(following)
            kept = None if keep is None else int(keep.sum())
        out[names.get(id(layer), "")] = (layer_threshold(layer), kept)
    return out


# ---------------------------------------------------------------------------
# Rows


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "" if shape is None else "x".join(str(d) for d in shape)


def layer_report(model: Module, input_shape: Sequence[int]) -> list[dict[str, Any]]:
    """One row per conv, fc and global pool of ``model`` (see :data:`COLUMNS`), then a totals row.

    ``input_shape`` is one image's (C, H, W) or (N, C, H, W). The model is
    looked at in evaluation mode (the weights inference computes with, e.g.
    LTP's hard mask); its mode is restored afterwards.
    """
    shape = tuple(int(d) for d in input_shape)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            costs = profile(model, shape)
            extras = _extras(model, (1,) + (shape[1:] if len(shape) == 4 else shape))
    finally:
        model.train(was_training)
    rows: list[dict[str, Any]] = []
    for c in costs:
        threshold, kept = extras.get(c.name, (None, None))
        weighted = c.params > 0
        rows.append(
            {
                "layer": c.name,
                "kind": c.kind,
                "shape": _shape_text(c.weight_shape),
                "params": c.params,
                "nonzeros": c.nonzeros,
                "sparsity_pct": 100.0 * (1.0 - c.nonzeros / c.params) if weighted else None,
                "compression": c.params / c.nonzeros if weighted and c.nonzeros else None,
                "threshold": threshold,
                "channels_kept": kept,
                "dense_macs": c.dense_macs,
                "sparse_macs": c.sparse_macs,
            }
        )
    t = totals(costs)
    kept_counts = [r["channels_kept"] for r in rows if r["channels_kept"] is not None]
    rows.append(
        {
            "layer": "total",
            "kind": "",
            "shape": "",
            "params": t.weights,
            "nonzeros": t.nonzeros,
            "sparsity_pct": 100.0 * t.sparsity,
            "compression": t.compression if t.nonzeros else None,
            "threshold": None,
            "channels_kept": sum(kept_counts) if kept_counts else None,
            "dense_macs": t.dense_macs,
            "sparse_macs": t.sparse_macs,
        }
    )
    return rows


def channel_reduction(model: Module, input_shape: Sequence[int]) -> dict[str, Any] | None:
    """What slimming ``model`` would remove (its channel masks, in evaluation mode); None without masks.

    This is SCP's measure of sparsity, and it is not the weight sparsity of
    :func:`layer_report` (zeros in the weights, which SCP leaves at 0 until
    :func:`reference.finalize.finalize` removes the channels). Keys: ``weights``
    and ``weights_kept`` (conv+fc weights before and after slimming),
    ``weights_removed_pct``, ``dense_macs`` and ``slimmed_macs`` (per image,
    global average pool included), ``macs_removed_pct``.
    """

    if not any(isinstance(getattr(m, "channel_mask", None), Module) for m in model.modules()):
        return None
    shape = tuple(int(d) for d in input_shape)
    shape = shape[1:] if len(shape) == 4 else shape
    slimmed = model.host_copy()
    slimmed.eval()
    with no_grad():
        dense_macs = totals(profile(slimmed, shape)).dense_macs
        slim(slimmed)
        slimmed_macs = totals(profile(slimmed, shape)).dense_macs
    weights = sum(int(layer.weight.size) for _, layer in weight_layers(model))
    kept = sum(int(layer.weight.size) for _, layer in weight_layers(slimmed))
    return {
        "weights": weights,
        "weights_kept": kept,
        "weights_removed_pct": 100.0 * (1.0 - kept / max(weights, 1)),
        "dense_macs": dense_macs,
        "slimmed_macs": slimmed_macs,
        "macs_removed_pct": 100.0 * (1.0 - slimmed_macs / max(dense_macs, 1)),
    }


def _cell(column: str, value: Any) -> str:
    """A value as shown in the text and Markdown tables."""
    if value is None:
        return "-"
    if column in ("params", "nonzeros", "dense_macs", "sparse_macs", "channels_kept"):
        return f"{value:,}"
    if column == "sparsity_pct":
        return f"{value:.2f}%"
    if column == "compression":
        return f"{value:.2f}x"
    if column == "threshold":
        return f"{value:.4g}"
    return str(value) if value != "" else "-"


_HEADERS = {
    "layer": "layer",
    "kind": "kind",
    "shape": "weight shape",
    "params": "weights",
    "nonzeros": "nonzero",
    "sparsity_pct": "sparsity",
    "compression": "compression",
    "threshold": "threshold",
    "channels_kept": "channels kept",
    "dense_macs": "MACs",
    "sparse_macs": "sparse MACs",
}
_TEXT_COLUMNS = {"layer", "kind", "shape"}


def _shown_columns(rows: list[dict[str, Any]]) -> list[str]:
    """All columns, less threshold / channels kept where no layer has one."""
    return [
        c for c in COLUMNS if c not in ("threshold", "channels_kept") or any(r[c] is not None for r in rows)
    ]


def summary_lines(rows: list[dict[str, Any]], reduction: dict[str, Any] | None = None) -> list[str]:
    """The totals row of :func:`layer_report` in words, saying which denominator each number uses.

    ``reduction`` (:func:`channel_reduction`, for a model with channel masks)
    adds what slimming removes: a different quantity from the weight sparsity,
    which counts zeros in the weights and is 0 for SCP before finalizing.
    """
    t = rows[-1]
    pool = sum(r["dense_macs"] for r in rows[:-1] if r["kind"] == "pool")
    compression = "infinite" if t["compression"] is None else f"{t['compression']:.2f}x"
    lines = [
        f"weight sparsity: {t['sparsity_pct']:.2f}% of the conv+fc weights are zero "
        f"({t['params'] - t['nonzeros']:,} of {t['params']:,}; {t['nonzeros']:,} nonzero)",
        f"compression:     {compression} (conv+fc weights / nonzero conv+fc weights)",
        f"MACs per image: {t['dense_macs']:,} dense, {t['sparse_macs']:,} sparse "
        f"(including the global average pool, {pool:,})",
    ]
    masked = [r for r in rows[:-1] if r["channels_kept"] is not None]
    if masked:
        channels = sum(int(r["shape"].split("x")[0]) for r in masked)
        lines.append(
            f"channels:        the channel masks keep {t['channels_kept']:,} of {channels:,} masked channels; "
            "the weights and MACs above count the layers before slimming (finalize to remove the channels)"
        )
    if reduction is not None:
        lines.append(
            f"slimming:        removing the masked channels removes {reduction['weights_removed_pct']:.2f}% "
            f"of the conv+fc weights ({reduction['weights']:,} -> {reduction['weights_kept']:,}) and "
            f"{reduction['macs_removed_pct']:.2f}% of the MACs per image "
            f"({reduction['dense_macs']:,} -> {reduction['slimmed_macs']:,})"
        )
    return lines


def format_report(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of :func:`layer_report`'s rows (totals last)."""
    columns = _shown_columns(rows)
    header = [_HEADERS[c] for c in columns]
    body = [[_cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        parts = [
            cell.ljust(w) if c in _TEXT_COLUMNS else cell.rjust(w)
            for c, cell, w in zip(columns, cells, widths)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body[:-1]), rule, line(body[-1])])


def report_text(model: Module, input_shape: Sequence[int]) -> str:
    """The per-layer table of ``model`` followed by the totals in words."""
    rows = layer_report(model, input_shape)
    return "\n".join([format_report(rows), "", *summary_lines(rows, channel_reduction(model, input_shape))])
