"""Per-layer sparsity budgets: read, check, measure and cost them.

A budget is ``{layer name: sparsity}`` over a model's weight layers (the
names of :func:`reference.nn.weight_layers`, torchvision style: ``conv1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``), each sparsity a
fraction of zeros in ``[0, 1)``.

Where budgets come from:

- a budget CSV (:func:`read_budget_csv`): a ``layer`` column and one or more
  columns ``sparsity_pct@<label>`` holding percents, one column per budget
  (the label is usually the model's overall sparsity, e.g. ``90.23``);
  :data:`STR_RESNET50` is STR's published ResNet50 budgets in this format;
- a trained checkpoint of any method (:func:`reference.build.budget_from_checkpoint`):
  the measured sparsity of each layer's effective weight.

:func:`reference.build.load_budget` reads either (:func:`read_budget_file`
here, with the checkpoint measured by the layer that builds models). Magnitude pruning and GMP
(:mod:`reference.sparsity.magnitude`) take a budget as per-layer final targets
(budget transfer). :func:`budget_cost` and :func:`cost_budget_report` give
the per-layer weights and MACs a model would have under a budget, without
training: a layer of ``n`` weights at sparsity ``s`` keeps exactly
``k = round((1 - s) n)`` weights (at least 1), the count magnitude pruning
keeps, and costs ``dense MACs * k / n`` (:mod:`reference.accounting`).
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from reference.accounting import LayerCost, profile, totals
from reference.errors import ConfigError, DataError
from reference.models import MODEL_SPECS, build_model, default_input_shape
from reference.nn import Module, weight_layers

__all__ = [
    "COLUMN_PREFIX",
    "STR_RESNET50",
    "budget_columns",
    "budget_cost",
    "check_budget",
    "cost_budget_report",
    "keep_count",
    "read_budget_csv",
    "read_budget_file",
]

COLUMN_PREFIX = "sparsity_pct@"
STR_RESNET50 = Path(__file__).resolve().parent.parent / "budgets" / "str_resnet50.csv"
"""STR's learned per-layer ResNet50 budgets (ImageNet), one column per published model."""


# ---------------------------------------------------------------------------
# How many weights a layer keeps


def keep_count(size: int, sparsity: float, *, at_least_one: bool = True) -> int:
    """k = round_half_up((1 - sparsity) * size), in [1, size] (or [0, size] without ``at_least_one``).

    The count magnitude pruning keeps (equation (3) of
    :mod:`reference.sparsity.magnitude`) and a budget is costed with.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity!r}")
    k = int(math.floor((1.0 - sparsity) * size + 0.5))
    k = min(max(k, 0), size)
    return max(k, 1) if at_least_one and size > 0 else k


# ---------------------------------------------------------------------------
# Budget CSV files


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows of a CSV file (blank lines skipped), or a DataError."""
    if not path.exists():
        raise DataError(f"budget file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"budget file {str(path)!r} is a directory, expected a .csv file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"budget file {str(path)!r} cannot be read as CSV: {exc}") from None
    if not rows:
        raise DataError(f"budget file {str(path)!r} is empty")
    return [cell.strip() for cell in rows[0]], rows[1:]


def _columns(path: Path, header: list[str]) -> list[str]:
    if "layer" not in header:
        raise DataError(f"budget file {str(path)!r} has no 'layer' column (header: {', '.join(header)})")
    columns = [h for h in header if h.startswith(COLUMN_PREFIX)]
    if not columns:
        raise DataError(
            f"budget file {str(path)!r} has no budget column; expected columns named "
            f"{COLUMN_PREFIX}<label> holding percents (header: {', '.join(header)})"
        )
    return columns


def _label(column: str) -> str:
    return column[len(COLUMN_PREFIX) :]


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _select(path: Path, columns: list[str], column: str | None) -> str:
    """The header of the chosen column: by full header, by label, or by the label's numeric value."""
    available = ", ".join(_label(c) for c in columns)
    if column is None:
        if len(columns) == 1:
            return columns[0]
        raise DataError(
            f"budget file {str(path)!r} holds {len(columns)} budgets; choose one with budget_column "
            f"(--budget-column). Available columns: {available}"
        )
    wanted = str(column).strip()
    for c in columns:
        if wanted in (c, _label(c)):
            return c
    value = _as_float(_label(wanted) if wanted.startswith(COLUMN_PREFIX) else wanted)
    if value is not None:
        for c in columns:
            if _as_float(_label(c)) == value:
                return c
    raise DataError(f"budget file {str(path)!r} has no column {column!r}. Available columns: {available}")


def budget_columns(path: str | Path) -> list[str]:
    """The labels of the budget columns of a budget CSV (``["79.55", "81.27", ...]``)."""
    path = Path(path)
    header, _ = _read_rows(path)
    return [_label(c) for c in _columns(path, header)]


def read_budget_csv(path: str | Path, column: str | None = None) -> dict[str, float]:
    """``{layer: sparsity fraction}`` from one column of a budget CSV, in the file's row order.

    ``column`` is the column's label (``"90.23"``, matched as text or as a
    number, so ``"87.70"`` finds ``87.7``) or its full header
    (``"sparsity_pct@90.23"``); None picks the only column. Percents are
    divided by 100. Raises DataError naming the file (and the available
    columns, the layer or the value) when the column is unknown or ambiguous,
    a layer repeats, or a value is missing, not a number, or outside [0, 100).
    """
    path = Path(path)
    header, rows = _read_rows(path)
    columns = _columns(path, header)
    chosen = _select(path, columns, column)
    layer_at, value_at = header.index("layer"), header.index(chosen)
    budget: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        name, text = cells[layer_at], cells[value_at]
        where = f"budget file {str(path)!r}, line {line}"
        if not name:
            raise DataError(f"{where}: the layer name is empty")
        if name in budget:
            raise DataError(f"{where}: layer {name!r} appears twice")
        value = _as_float(text)
        if value is None or not math.isfinite(value):
            raise DataError(
                f"{where}: layer {name!r} has no valid percent in column {_label(chosen)!r}: {text!r}"
            )
        if not 0.0 <= value < 100.0:
            raise DataError(
                f"{where}: layer {name!r} has sparsity {text}% in column {_label(chosen)!r}; "
                "expected a percent in [0, 100)"
            )
        budget[name] = value / 100.0
    if not budget:
        raise DataError(f"budget file {str(path)!r} has a header but no layers")
    return budget


# ---------------------------------------------------------------------------
# Budget files: a CSV, or a checkpoint measured by the caller


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an .npz archive (a checkpoint) rather than a CSV file."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


def read_budget_file(
    path: str | Path,
    column: str | None = None,
    *,
    measure_checkpoint: Callable[[Path], dict[str, float]] | None = None,
) -> dict[str, float]:
    """A budget from a budget CSV (:func:`read_budget_csv`) or a checkpoint.

    The kind is told by the file's contents (checkpoints are .npz archives).
    ``column`` applies to CSV files only. A checkpoint's budget is measured by
    rebuilding its model, which is the training layer's work:
    ``measure_checkpoint`` does it (:func:`reference.build.load_budget` passes
    :func:`reference.build.budget_from_checkpoint`); without one a checkpoint
    is refused.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"budget file {str(path)!r} does not exist")
    if _is_checkpoint(path):
        if column is not None:
            raise ConfigError(
                f"budget {str(path)!r} is a checkpoint, which holds one budget; budget_column={column!r} "
                "applies to budget CSV files only"
            )
        if measure_checkpoint is None:
            raise ConfigError(
                f"budget {str(path)!r} is a checkpoint: read it with reference.build.load_budget, "
                "which rebuilds its model to measure it"
            )
        return measure_checkpoint(path)
    return read_budget_csv(path, column)


# ---------------------------------------------------------------------------
# Checking a budget against a model


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_budget(budget: Mapping[str, Any], model: Module) -> dict[str, float]:
    """``budget`` checked against ``model``'s weight layers, as floats in the model's layer order.

    Every weight layer must be present, no other name may appear, and every
    value must be a number in [0, 1). Raises ConfigError naming the layers at
    fault.
    """
    if not isinstance(budget, Mapping):
        raise ConfigError(f"a budget must be a mapping {{layer: sparsity}}, got {type(budget).__name__}")
    names = [name for name, _ in weight_layers(model)]
    model_name = type(model).__name__
    missing = [n for n in names if n not in budget]
    unknown = [str(n) for n in budget if n not in set(names)]
    problems = []
    if missing:
        problems.append(f"no sparsity for layer(s) {_listing(missing)}")
    if unknown:
        problems.append(
            f"unknown layer(s) {_listing(unknown)} (the model's weight layers are {_listing(names, 4)})"
        )
    if problems:
        raise ConfigError(f"budget does not fit {model_name}: " + "; ".join(problems))
    checked: dict[str, float] = {}
    for name in names:
        value = budget[name]
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0.0 <= value < 1.0:
            raise ConfigError(
                f"budget for layer {name!r} must be a sparsity fraction in [0, 1), got {value!r}"
                + (" (percents must be divided by 100)" if ok and 1.0 <= value < 100.0 else "")
            )
        checked[name] = float(value)
    return checked


# ---------------------------------------------------------------------------
# Cost of a budget, without training


def budget_cost(model: Module, input_shape: tuple[int, ...], budget: Mapping[str, Any]) -> list[LayerCost]:
    """The rows of :func:`reference.accounting.profile` as they would be under ``budget``.

    Each weight layer keeps ``k = round((1 - s) n)`` of its ``n`` weights (at
    least 1; what magnitude pruning keeps) and its sparse MACs are
    ``dense MACs * k / n``; the global pool is unchanged. ``model``'s own
    weights are not read or changed. Use :func:`reference.accounting.totals`
    on the rows for the totals.
    """
    checked = check_budget(budget, model)
    rows = []
    for row in profile(model, input_shape):
        if row.name in checked:
            k = keep_count(row.params, checked[row.name])
            positions = row.dense_macs // row.params  # H_out * W_out for a conv, 1 for the fc
            row = replace(row, nonzeros=k, sparse_macs=k * positions)
        rows.append(row)
    return rows


def _format(rows: list[LayerCost], budget: Mapping[str, float]) -> str:
    header = ("layer", "params", "budget sparsity", "nonzeros", "dense MACs", "sparse MACs")
    body = [
        (
            r.name,
            f"{r.params:,}" if r.params else "-",
            f"{100 * budget[r.name]:.2f}%" if r.name in budget else "-",
            f"{r.nonzeros:,}" if r.params else "-",
            f"{r.dense_macs:,}",
            f"{r.sparse_macs:,}",
        )
        for r in rows
    ]
    t = totals(rows)
    footer = ("total", f"{t.weights:,}", f"{100 * t.sparsity:.2f}%", f"{t.nonzeros:,}", f"{t.dense_macs:,}",
              f"{t.sparse_macs:,}")  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body, footer]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body), rule, line(footer)])


def cost_budget_report(
    model_name: str,
    budget_path: str | Path,
    column: str | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    *,
    measure_checkpoint: Callable[[Path], dict[str, float]] | None = None,
) -> str:
    """The per-layer cost table of ``model_name`` under a budget file, and the totals, as text.

    Columns: layer, params (weights), budget sparsity, nonzeros, dense MACs,
    sparse MACs; then the totals (sparsity over conv+fc weights, compression,
    MACs with and without the global average pool). ``input_size`` and
    ``num_classes`` default to the model's usual ones (224 and 1000 for
    ResNet50). Nothing is trained. A checkpoint as the budget file needs
    ``measure_checkpoint`` (see :func:`read_budget_file`).
    """
    c, h, _ = default_input_shape(model_name)
    h = h if input_size is None else input_size
    num_classes = MODEL_SPECS[model_name].num_classes if num_classes is None else num_classes
    model = build_model(model_name, num_classes=num_classes, in_channels=c)
    budget = check_budget(read_budget_file(budget_path, column, measure_checkpoint=measure_checkpoint), model)
    rows = budget_cost(model, (c, h, h), budget)
    t = totals(rows, model)
    chosen = "" if column is None else f", column {column}"
    lines = [
        f"{model_name}: input {c}x{h}x{h}, {num_classes} classes; budget {str(budget_path)!r}{chosen}",
        "",
        _format(rows, budget),
        "",
        f"conv+fc weights:  {t.weights:,}, {t.nonzeros:,} nonzero under the budget: sparsity "
        f"{100 * t.sparsity:.2f}% of conv+fc weights, compression {t.compression:.2f}x",
        f"MACs per image:   {t.dense_macs:,} dense, {t.sparse_macs:,} sparse "
        f"({100 * t.sparse_macs / t.dense_macs:.2f}% of dense), including the global average pool "
        f"({t.pool_macs:,}); without it {t.dense_macs_without_pool:,} dense, "
        f"{t.sparse_macs_without_pool:,} sparse",
    ]
    return "\n".join(lines)
