"""Per-layer sparsity reports: a table in the terminal, and Markdown, CSV, JSON and plots on disk.

The table (:func:`layer_report`, its columns and totals row) is built in
:mod:`reference.summary` and re-exported here.

:func:`write_report` rebuilds a model from a checkpoint and writes
``report.md``, ``report.csv`` and ``report.json`` (each atomically), and, where
matplotlib is installed, ``sparsity.png`` (per-layer weight sparsity, or for SCP the
channels each masked layer keeps: :func:`sparsity_panels`) and
``weights.png`` (histograms of the latent weights of a few layers with the
threshold marked).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from reference.errors import ConfigError
from reference.files import temporary_name, write_atomic
from reference.finalize import load_model_from_checkpoint
from reference.nn import Module, WeightLayer, weight_layers
from reference.summary import (  # the table itself; re-exported for callers of this module
    _HEADERS,
    _TEXT_COLUMNS,
    COLUMNS,
    DENOMINATOR_NOTE,
    _cell,
    _host_float,
    _shown_columns,
    channel_reduction,
    format_report,
    layer_report,
    layer_threshold,
    report_text,
    summary_lines,
)

__all__ = [
    "COLUMNS",
    "ReportFiles",
    "channel_reduction",
    "format_report",
    "layer_report",
    "layer_threshold",
    "report_text",
    "sparsity_panels",
    "to_csv",
    "to_json",
    "to_markdown",
    "write_report",
]

# ---------------------------------------------------------------------------
# Markdown, CSV, JSON


def _info_lines(info: dict[str, Any]) -> list[str]:
    return [f"- {key}: {value}" for key, value in info.items() if value is not None]


def to_markdown(
    rows: list[dict[str, Any]], info: dict[str, Any] | None = None, reduction: dict[str, Any] | None = None
) -> str:
    """A Markdown document: what was reported, the per-layer table, the totals in words."""
    columns = _shown_columns(rows)
    lines = ["# Sparsity report", ""]
    if info:
        lines += [*_info_lines(info), ""]
    lines.append("| " + " | ".join(_HEADERS[c] for c in columns) + " |")
    lines.append("| " + " | ".join("---" if c in _TEXT_COLUMNS else "---:" for c in columns) + " |")
    for r in rows:
        cells = [_cell(c, r[c]) for c in columns]
        if r is rows[-1]:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {s}" for s in summary_lines(rows, reduction)), "", DENOMINATOR_NOTE, ""]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """One line per row with the columns of :data:`COLUMNS`; None is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(
            ["" if r[c] is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in COLUMNS]
        )
    return buf.getvalue()


def to_json(
    rows: list[dict[str, Any]], info: dict[str, Any] | None = None, reduction: dict[str, Any] | None = None
) -> str:
    """``{"info": ..., "denominator": ..., "layers": [rows], "totals": row}`` as strict JSON, plus
    ``"channel_reduction"`` (:func:`channel_reduction`) for a model with channel masks."""
    doc = {"info": info or {}, "denominator": DENOMINATOR_NOTE, "layers": rows[:-1], "totals": rows[-1]}
    if reduction is not None:
        doc["channel_reduction"] = reduction
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------
# Plots (matplotlib is optional)


def _plot_layers(model: Module, count: int = 4) -> list[tuple[str, WeightLayer]]:
    """Up to ``count`` weight layers spread over the depth: the first, the last and evenly between."""
    layers = weight_layers(model)
    if len(layers) <= count:
        return layers
    picks = sorted({round(i * (len(layers) - 1) / (count - 1)) for i in range(count)})
    return [layers[i] for i in picks]


def _save_figure(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_atomic(path, buf.getvalue())


def sparsity_panels(
    rows: list[dict[str, Any]],
) -> list[tuple[str, list[tuple[str, float]], tuple[str, float]]]:
    """What ``sparsity.png`` draws: panels of (y label, [(layer, percent)], (overall label, percent)).

    Weight sparsity per conv and fc layer (zeros in the weights); with channel
    masks (SCP), the channels each masked layer keeps, in percent of its output
    channels, instead of the weight sparsity when no weight is zero (SCP before
    finalizing: a chart of zeros would be empty), under it otherwise.
    """
    weighted = [r for r in rows[:-1] if r["params"]]
    panels = [
        (
            "weight sparsity (% of the layer's weights that are zero)",
            [(r["layer"], r["sparsity_pct"]) for r in weighted],
            ("overall (conv+fc weights)", rows[-1]["sparsity_pct"]),
        )
    ]
    masked = [r for r in rows[:-1] if r["channels_kept"] is not None]
    if masked:
        channels = [int(r["shape"].split("x")[0]) for r in masked]
        kept = [(r["layer"], 100.0 * r["channels_kept"] / c) for r, c in zip(masked, channels)]
        overall = ("overall (masked channels)", 100.0 * rows[-1]["channels_kept"] / sum(channels))
        channel_panel = ("channels kept (% of the layer's output channels)", kept, overall)
        panels = [channel_panel] if rows[-1]["nonzeros"] == rows[-1]["params"] else [*panels, channel_panel]
    return panels


def write_plots(
    model: Module, rows: list[dict[str, Any]], out_dir: str | Path
) -> tuple[list[Path], str | None]:
    """``sparsity.png`` and ``weights.png`` in ``out_dir``; returns (paths, None), or ([], a note)
    when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return (
            [],
            "matplotlib is not installed: sparsity.png and weights.png were skipped (pip install matplotlib)",
        )
    out_dir = Path(out_dir)
    panels = sparsity_panels(rows)
    width = max(6.0, 0.22 * max(len(bars) for _, bars, _ in panels) + 2)
    fig = Figure(figsize=(width, 4.0 * len(panels)))
    FigureCanvasAgg(fig)
    for i, (ylabel, bars, overall) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        ax.bar(range(len(bars)), [value for _, value in bars], color="tab:blue")
        ax.axhline(overall[1], color="tab:red", linestyle="--", label=overall[0])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([name for name, _ in bars], rotation=90, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths = [_save_figure(fig, out_dir / "sparsity.png")]

    picks = _plot_layers(model)
    fig = Figure(figsize=(4.0 * max(len(picks), 1), 3.4))
    FigureCanvasAgg(fig)
    for i, (name, layer) in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), i + 1)
        w = _host_float(layer.weight).reshape(-1)
        ax.hist(w, bins=80, color="tab:gray")
        ax.set_yscale("log")
        g = layer_threshold(layer)
        if g is not None:
            for x in (-g, g):
                ax.axvline(x, color="tab:red", linewidth=1)
            ax.set_title(f"{name}\nthreshold {g:.3g}", fontsize=8)
        else:
            ax.set_title(name, fontsize=8)
        ax.set_xlabel("latent weight", fontsize=8)
        if i == 0:
            ax.set_ylabel("count (log scale)", fontsize=8)
    fig.tight_layout()
    paths.append(_save_figure(fig, out_dir / "weights.png"))
    return paths, None


# ---------------------------------------------------------------------------
# From a checkpoint


@dataclasses.dataclass
class ReportFiles:
    """What :func:`write_report` wrote: the files, the rows, the text table and notes (skipped plots)."""

    paths: list[Path]
    rows: list[dict[str, Any]]
    text: str
    notes: list[str]


def write_report(checkpoint_path: str | Path, out_dir: str | Path, *, plots: bool = True) -> ReportFiles:
    """Report the model saved in a checkpoint (trained or finalized) into ``out_dir``.

    ``plots=False`` skips the PNG files. Everything is computed before
    anything is written, so a bad checkpoint leaves nothing behind. The report
    is written whole or not at all: its files go to a hidden staging folder
    beside ``out_dir`` first, and only when every one of them is written (a
    full disk fails here, and the staging folder is removed) are they renamed
    into ``out_dir``, which takes no space. Files of ``out_dir`` that are not
    part of the report are left alone.
    """
    restored = load_model_from_checkpoint(checkpoint_path)
    model = restored.model
    rows = layer_report(model, restored.input_shape)
    metrics = restored.checkpoint.metrics[-1] if restored.checkpoint.metrics else {}
    c, h, w = restored.input_shape
    info = {
        "checkpoint": str(restored.checkpoint.path),
        "model": restored.config.model,
        "dataset": restored.config.dataset,
        "method": restored.method_name + (" (finalized)" if restored.finalized else ""),
        "epochs trained": restored.checkpoint.epoch,
        "test accuracy": f"{metrics['test_acc']:.2%}" if "test_acc" in metrics else None,
        "input": f"{c}x{h}x{w}",
    }
    reduction = channel_reduction(model, restored.input_shape)
    text = "\n".join([format_report(rows), "", *summary_lines(rows, reduction)])

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"report output {str(out_dir)!r} exists and is not a directory")
    staging = out_dir.parent / temporary_name(out_dir.name)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        staged = [
            write_atomic(staging / "report.md", to_markdown(rows, info, reduction)),
            write_atomic(staging / "report.csv", to_csv(rows)),
            write_atomic(staging / "report.json", to_json(rows, info, reduction)),
        ]
        pictures, note = write_plots(model, rows, staging) if plots else ([], None)
        staged += [Path(p) for p in pictures]
        if not out_dir.exists():
            os.replace(staging, out_dir)  # one rename: the folder appears whole
        else:
            for path in staged:
                os.replace(path, out_dir / path.name)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {str(out_dir)!r}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportFiles([out_dir / path.name for path in staged], rows, text, [note] if note else [])
