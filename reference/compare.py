"""Every method side by side: a resumable sweep over sparsity targets and seeds, with tables and figures.

``learnsparse compare SWEEP_DIR`` (:func:`run_sweep`) trains, for each seed::

    dense                                   once per seed: the accuracy to beat
    for each target t:
        STR at target t                     the controller steers it to t; its per-layer budget is learned
        LTP at target t                     the same, and its trail (below)
        magnitude (uniform), magnitude (global), GMP
                                            at the sparsity STR *achieved* at t in this seed (matched on
                                            nonzero weights, up to rounding of each layer's count)
        GMP + STR budget                    GMP given STR's learned per-layer sparsities (budget transfer)
    for each SCP lambda:
        SCP                                 no target: lambda sets how many channels go

Every run is placed on two axes:

- **sparsity**: the fraction of conv+fc weights that are zero in evaluation mode. SCP removes whole
  channels, so it is placed after :func:`reference.finalize.finalize` by its *slimmed* network: the
  fraction of conv+fc weights slimming removed;
- **MACs per image** (:mod:`reference.accounting`): for a weight-sparse network the MACs of its
  nonzero weights (a saving only with a sparse kernel), for SCP the MACs of the smaller dense
  network, which any dense kernel realises.

Every run's test accuracy is given twice: as trained (the last epoch's evaluation) and with the
batch norms' running statistics of its finalized network set from :data:`RECALIBRATION_BATCHES`
training batches, which is what ``learnsparse finalize --recalibrate-bn 20`` writes. Statistics
gathered in training lag weights that still change in the last epoch (a threshold still rising,
LTP's soft mask in training), and at high sparsity that lag alone can cost most of the accuracy;
the second figure shows what the sparse network can do. A record written before this figure was
measured gets it the next time the sweep runs, from its checkpoint, without training again.

LTP keeps a trail: a checkpoint after every epoch, each sparser than the last while the target
ramps up. One LTP run therefore gives a whole curve of accuracy against sparsity (the points the
``finalize --trail-sparsity`` command picks from); the tables and figures show the trail of each
seed's run at the highest target next to the final points. Trail points before the last epoch are
measured mid-schedule (their learning rate has not decayed), so they sit below what a run
finished at that sparsity would reach.

The sweep directory::

    sweep.json                     the sweep record: its settings and every finished run's numbers,
                                   rewritten atomically after each run
    runs/seed<S>/dense/            one run directory per run (reference.train: config, metrics,
    runs/seed<S>/t<T>/<method>/    checkpoints, lock), plus compare.json: the run's measured record
    runs/seed<S>/scp-lambda<L>/
    .lock                          held while a sweep runs here

A sweep is resumable run by run: a run with its record is not redone; a run whose checkpoint
is short of its epochs is resumed from it (bit-identical to an uninterrupted run, see
:mod:`reference.train`); any other run starts afresh. Running the same command again continues a
killed sweep; a sweep directory holding different settings is refused.

The tables (``compare.md``, ``compare.csv``, ``compare.json``: every run and every trail point)
and the figures (``accuracy_vs_sparsity.png``, ``accuracy_vs_macs.png``, ``layer_budgets.png``;
matplotlib, the ``plots`` extra) go to the output directory, the sweep directory by default. They
are written after each seed (the runs so far, marked as not finished) and at the end.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reference.accounting import profile, totals
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.errors import ConfigError
from reference.files import write_atomic
from reference.finalize import (
    finalize,
    load_model_from_checkpoint,
    recalibrate_batch_norm,
    recalibration_batches,
)
from reference.nn import BatchNorm2d
from reference.report import layer_report
from reference.rundir import held_lock
from reference.train import build_data, evaluate, train

__all__ = [
    "FIGURE_NAMES",
    "METHODS",
    "SweepSpec",
    "check_base_settings",
    "check_plotting",
    "run_sweep",
    "write_outputs",
]

Log = Callable[[str], Any]

# method key -> (label, TrainConfig overrides). Keys are what --methods takes, in plotting order.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {"method": "dense"}),
    "str": ("STR", {"method": "str"}),
    "ltp": ("LTP", {"method": "ltp"}),
    "scp": ("SCP", {"method": "scp"}),
    "magnitude-uniform": ("magnitude (uniform)", {"method": "magnitude", "prune_scope": "uniform"}),
    "magnitude-global": ("magnitude (global)", {"method": "magnitude", "prune_scope": "global"}),
    "gmp": ("GMP", {"method": "gmp", "prune_scope": "uniform"}),
    "gmp-str-budget": ("GMP + STR budget", {"method": "gmp", "prune_scope": "uniform"}),
}
_TARGETED = ("str", "ltp")  # steered to the target by the controller
_MATCHED = ("magnitude-uniform", "magnitude-global", "gmp")  # at STR's achieved sparsity
# Settings compare chooses per run (refused in the base config, with the flag to use instead) ...
_CHOSEN = {
    "method": "--methods",
    "target_sparsity": "--targets",
    "seed": "--seeds",
    "scp_lambda": "--scp-lambdas",
    "prune_scope": "--methods (magnitude-uniform, magnitude-global)",
    "budget": "--methods gmp-str-budget",
    "budget_column": "--methods gmp-str-budget",
}
# ... and those it sets itself without asking (the run directory and the progress bar).
_BASE_ONLY = (*_CHOSEN, "run_dir", "progress")
RECORD_NAME = "compare.json"
SWEEP_RECORD = "sweep.json"
FIGURE_NAMES = ("accuracy_vs_sparsity.png", "accuracy_vs_macs.png", "layer_budgets.png")
_ROUND = 6  # digits of the matched sparsity handed to the baselines
# Training batches that set the batch norms' running statistics for each run's second accuracy
# (as ``learnsparse finalize --recalibrate-bn 20``); a fixed number, so older sweeps stay the same sweep.
RECALIBRATION_BATCHES = 20
RECALIBRATED = "test_acc_bn_recalibrated"  # the record's key for that accuracy


# ---------------------------------------------------------------------------
# What to run


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep: the model, data and training settings (``base``) and what varies.

    ``base`` holds everything but the method settings and the seed
    (:data:`_BASE_ONLY` must keep their defaults). ``targets`` are fractions of zero
    weights in (0, 1); ``budget_target`` (one of them, default the one nearest 0.9)
    is where ``layer_budgets.png`` compares the per-layer budgets.
    """

    base: TrainConfig
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = tuple(METHODS)
    scp_lambdas: tuple[float, ...] = (0.008,)
    budget_target: float | None = None

    def __post_init__(self) -> None:
        _check_spec(self)
        if self.budget_target is None:
            object.__setattr__(self, "budget_target", min(self.targets, key=lambda t: (abs(t - 0.9), t)))

    def to_dict(self) -> dict[str, Any]:
        base = {k: v for k, v in self.base.to_dict().items() if k not in _BASE_ONLY}
        return {
            "base": base,
            "targets": list(self.targets),
            "seeds": list(self.seeds),
            "methods": list(self.methods),
            "scp_lambdas": list(self.scp_lambdas),
            "budget_target": self.budget_target,
        }


def check_base_settings(values: Mapping[str, Any], source: str) -> None:
    """ConfigError when ``values`` (flags, or a config file's settings) set what compare chooses per run."""
    for name, instead in _CHOSEN.items():
        if name in values:
            raise ConfigError(
                f"compare chooses {name} for each run itself: leave it out of {source} and use {instead} "
                f"(got {name} = {values[name]!r})"
            )


def _check_spec(spec: SweepSpec) -> None:
    """ConfigError naming the first bad value of ``spec``."""
    defaults = TrainConfig()
    for name, instead in _CHOSEN.items():
        if getattr(spec.base, name) != getattr(defaults, name):
            raise ConfigError(
                f"compare chooses {name} for each run itself: leave it unset and use {instead} "
                f"(got {name} = {getattr(spec.base, name)!r})"
            )
    if not spec.targets:
        raise ConfigError("compare needs at least one sparsity target, e.g. --targets 0.5,0.9")
    for t in spec.targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise ConfigError(f"--targets must be fractions of zero weights in (0, 1) such as 0.9, got {t!r}")
    if len(set(spec.targets)) != len(spec.targets):
        raise ConfigError(f"--targets must be distinct, got {list(spec.targets)}")
    if not spec.seeds:
        raise ConfigError("compare needs at least one seed, e.g. --seeds 0,1,2")
    for s in spec.seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"--seeds must be non-negative integers, got {s!r}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds must be distinct, got {list(spec.seeds)}")
    if not spec.methods:
        raise ConfigError(f"compare needs at least one method; expected some of: {', '.join(METHODS)}")
    for m in spec.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r} in --methods; expected some of: {', '.join(METHODS)}")
    if len(set(spec.methods)) != len(spec.methods):
        raise ConfigError(f"--methods must be distinct, got {list(spec.methods)}")
    needs_str = [m for m in spec.methods if m in (*_MATCHED, "gmp-str-budget")]
    if needs_str and "str" not in spec.methods:
        raise ConfigError(
            f"method {needs_str[0]!r} is matched to what STR achieves in the same seed and target: "
            "add str to --methods"
        )
    if "scp" in spec.methods and not spec.scp_lambdas:
        raise ConfigError("method 'scp' needs at least one --scp-lambdas value")
    for lam in spec.scp_lambdas:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (lam > 0 and math.isfinite(lam)):
            raise ConfigError(f"--scp-lambdas must be positive numbers, got {lam!r}")
    if spec.budget_target is not None and spec.budget_target not in spec.targets:
        raise ConfigError(
            f"--budget-target must be one of the targets {list(spec.targets)}, got {spec.budget_target!r}"
        )


def _run_name(key: str, target: float | None, lam: float | None) -> str:
    if key == "dense":
        return "dense"
    if key == "scp":
        return f"scp-lambda{lam:g}"
    return f"t{target:g}/{key}"


# ---------------------------------------------------------------------------
# One run: trained (or resumed, or found done), then measured


@dataclasses.dataclass(frozen=True)
class _Planned:
    key: str
    seed: int
    target: float | None
    config: TrainConfig
    run_dir: Path
    scp_lambda: float | None = None
    matched_sparsity: float | None = None


def _ensure_trained(run: _Planned, data: Any, train_log: Log) -> str:
    """Train ``run`` to its last epoch unless it is there; returns how ("trained", "resumed ...", "found")."""
    ckpt_path = run.run_dir / "checkpoint.npz"
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.epoch >= run.config.epochs:
            _check_same_run(run, dict(ckpt.config), str(ckpt_path))
            return "found trained"
        train(run.config, resume=ckpt, log=train_log, data=data)
        return f"resumed after epoch {ckpt.epoch}"
    train(run.config, log=train_log, data=data)
    return "trained"


def _check_same_run(run: _Planned, saved: dict[str, Any], where: str) -> None:
    """ConfigError when ``where`` (a checkpoint or record of ``run.run_dir``) was made with other settings."""
    ours = run.config.to_dict()
    differ = sorted(k for k in ours if k not in ("run_dir", "progress") and saved.get(k) != ours[k])
    if differ:
        raise ConfigError(
            f"{where!r} was made with other settings ({', '.join(f'{k} = {saved.get(k)!r}' for k in differ)}) "
            f"than this sweep's run there ({', '.join(f'{k} = {ours[k]!r}' for k in differ)}); "
            "choose another sweep directory"
        )


def _layer_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        r["layer"]: {"params": r["params"], "nonzeros": r["nonzeros"], "dense_macs": r["dense_macs"]}
        for r in rows[:-1]
        if r["params"]
    }


def _measure(run: _Planned, data: Any) -> dict[str, Any]:
    """The record of a trained run: accuracy, sparsity, MACs, per-layer counts (and SCP's slimmed network)."""
    ckpt = load_checkpoint(run.run_dir / "checkpoint.npz")
    restored = load_model_from_checkpoint(ckpt, data=data)
    model, shape = restored.model, restored.input_shape
    rows = layer_report(model, shape)
    history = list(ckpt.metrics)
    last = history[-1]
    total = rows[-1]
    rec: dict[str, Any] = {
        "method": run.key,
        "label": METHODS[run.key][0],
        "seed": run.seed,
        "target": run.target,
        "scp_lambda": run.scp_lambda,
        "matched_sparsity": run.matched_sparsity,
        "run_dir": str(run.run_dir),
        "epochs": int(ckpt.epoch),
        "test_acc": float(last["test_acc"]),
        "train_acc": float(last["train_acc"]),
        "weights": int(total["params"]),
        "nonzeros": int(total["nonzeros"]),
        "sparsity": 1.0 - total["nonzeros"] / total["params"],
        "dense_macs": int(total["dense_macs"]),
        "macs": int(total["sparse_macs"]),
        "parameters": totals(profile(model, shape), model).parameters,
        "seconds": round(sum(float(r.get("seconds", 0.0)) for r in history), 2),
        "layers": _layer_rows(rows),
    }
    if run.key == "scp":
        rec.update(_slimmed(model, shape, data, rec))
    if run.key == "ltp":
        rec["trail"] = _trail(run.run_dir, history, rows)
    rec.update(_recalibrated(run, data))
    rec["config"] = run.config.to_dict()
    return rec


def _recalibrated(run: _Planned, data: Any) -> dict[str, Any]:
    """The test accuracy of the run's finalized network once its batch norms' running statistics are
    set from :data:`RECALIBRATION_BATCHES` training batches (what ``finalize --recalibrate-bn`` gives);
    None for a network without batch norm.

    The last epoch's accuracy reads running statistics gathered while the weights moved under them:
    a threshold still rising in the last epoch, or LTP's soft mask in training, leaves them off for
    the network evaluated. This second figure separates that from what the sparse network can do.
    """
    model = load_model_from_checkpoint(load_checkpoint(run.run_dir / "checkpoint.npz"), data=data).model
    acc = None
    if any(isinstance(m, BatchNorm2d) for m in model.modules()):
        finalize(model)  # plain weights: training mode then means only "batch statistics"
        recalibrate_batch_norm(model, recalibration_batches(data, run.config, RECALIBRATION_BATCHES))
        acc = float(evaluate(model, data.x_test, data.y_test)[1])
    return {RECALIBRATED: acc, "bn_recalibration_batches": RECALIBRATION_BATCHES}


def _slimmed(model: Any, shape: tuple[int, ...], data: Any, before: dict[str, Any]) -> dict[str, Any]:
    """SCP placed by its slimmed network: :func:`finalize` removes the masked channels (in place)."""
    summary = finalize(model)
    costs = profile(model, shape)
    after = totals(costs, model)
    _, acc = evaluate(model, data.x_test, data.y_test)
    layers = before["layers"]
    for c in costs:
        if c.name in layers:
            layers[c.name]["kept_after_slimming"] = c.params
    slim = summary.slim if isinstance(summary.slim, dict) else {}
    return {
        "test_acc_masked": before["test_acc"],
        "test_acc": float(acc),  # the slimmed network's, which is the one deployed
        "weights_after_slimming": after.weights,
        "nonzeros": after.nonzeros,
        "sparsity": 1.0 - after.weights / before["weights"],
        "macs": after.dense_macs,  # the slimmed network is dense: all of its MACs are done
        "parameters_after_slimming": after.parameters,
        "channels_before": slim.get("channels_before"),
        "channels_after": slim.get("channels_after"),
    }


def _trail(run_dir: Path, history: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LTP's trail: per epoch with a snapshot, its sparsity, test accuracy and MACs (from layers.jsonl)."""
    per_epoch: dict[int, dict[str, Any]] = {}
    layers_log = run_dir / "layers.jsonl"
    if layers_log.is_file():
        for line in layers_log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                per_epoch[int(row["epoch"])] = row.get("layers", {})
    dense = {r["layer"]: r["dense_macs"] for r in rows[:-1] if r["params"]}
    fixed = sum(r["dense_macs"] for r in rows[:-1] if not r["params"])  # the pool
    points = []
    for h in history:
        epoch = int(h["epoch"])
        if not (run_dir / "trail" / f"epoch_{epoch:03d}.npz").is_file():
            continue
        layer_sp = per_epoch.get(epoch, {})
        macs = fixed + sum(
            round(m * (1.0 - float(layer_sp.get(name, {}).get("sparsity", 0.0)))) for name, m in dense.items()
        )
        points.append(
            {"epoch": epoch, "sparsity": float(h["sparsity"]), "test_acc": float(h["test_acc"]), "macs": macs}
        )
    return points


def _do_run(run: _Planned, data: Any, train_log: Log) -> tuple[dict[str, Any], str]:
    """The run's record, training or resuming first where needed; written to its directory."""
    record_path = run.run_dir / RECORD_NAME
    if record_path.is_file():
        rec = json.loads(record_path.read_text(encoding="utf-8"))
        _check_same_run(run, rec.get("config", {}), str(record_path))
        if RECALIBRATED in rec:
            return rec, "done before"
        rec.update(_recalibrated(run, data))  # a record from before that figure was measured
        write_atomic(record_path, json.dumps(rec, indent=2) + "\n")
        return rec, "done before; batch norms recalibrated now"
    how = _ensure_trained(run, data, train_log)
    rec = _measure(run, data)
    write_atomic(record_path, json.dumps(rec, indent=2) + "\n")
    return rec, how


# ---------------------------------------------------------------------------
# The sweep


def _config(spec: SweepSpec, key: str, seed: int, run_dir: Path, **extra: Any) -> TrainConfig:
    return spec.base.replace(**METHODS[key][1], seed=seed, run_dir=str(run_dir), progress=False, **extra)


def _plan_seed(spec: SweepSpec, root: Path, seed: int, records: dict[tuple, dict[str, Any]]):
    """The runs of one seed, in order; matched runs are planned once STR's record of their target exists."""
    home = root / "runs" / f"seed{seed}"
    if "dense" in spec.methods:
        yield _Planned("dense", seed, None, _config(spec, "dense", seed, home / "dense"), home / "dense")
    for target in spec.targets:
        for key in spec.methods:
            if key in ("dense", "scp"):
                continue
            run_dir = home / _run_name(key, target, None)
            if key in _TARGETED:
                yield _Planned(
                    key, seed, target, _config(spec, key, seed, run_dir, target_sparsity=target), run_dir
                )
            elif key in _MATCHED or key == "gmp-str-budget":
                str_rec = records[("str", seed, target, None)]
                if key == "gmp-str-budget":
                    budget = str(Path(str_rec["run_dir"]) / "checkpoint.npz")
                    yield _Planned(
                        key, seed, target, _config(spec, key, seed, run_dir, budget=budget), run_dir
                    )
                else:
                    matched = round(str_rec["sparsity"], _ROUND)
                    config = _config(spec, key, seed, run_dir, target_sparsity=matched)
                    yield _Planned(key, seed, target, config, run_dir, matched_sparsity=matched)
    if "scp" in spec.methods:
        for lam in spec.scp_lambdas:
            run_dir = home / _run_name("scp", None, lam)
            yield _Planned(
                "scp", seed, None, _config(spec, "scp", seed, run_dir, scp_lambda=lam), run_dir, lam
            )


def _progress_line(n: int, rec: dict[str, Any], how: str, elapsed: float) -> str:
    where = f"target {rec['target']:.0%}" if rec["target"] is not None else ""
    if rec["method"] == "scp":
        where = f"lambda {rec['scp_lambda']:g}"
    line = (
        f"[{elapsed:6.0f}s] run {n:>3}  seed {rec['seed']}  {rec['label']:<20} {where:<13} "
        f"test acc {rec['test_acc']:7.2%}{_recalibrated_note(rec)}  sparsity {rec['sparsity']:7.2%}  "
        f"MACs {rec['macs']:>13,}  ({how}, {rec['seconds']:.1f}s of training)"
    )
    if rec.get("trail"):
        t = rec["trail"]
        line += (
            f"; trail of {len(t)} snapshots from {t[0]['sparsity']:.1%} to {t[-1]['sparsity']:.1%} sparsity"
        )
    return line


def _recalibrated_note(rec: dict[str, Any]) -> str:
    acc = rec.get(RECALIBRATED)
    return "" if acc is None else f" ({acc:.2%} with BN recalibrated)"


def _read_sweep(root: Path, spec: SweepSpec) -> dict[str, Any]:
    """The sweep record in ``root`` (refused when it holds other settings), or a new one."""
    path = root / SWEEP_RECORD
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{str(path)!r} is not a sweep record (JSON): {exc}") from None
        if not isinstance(doc, dict) or doc.get("sweep") != spec.to_dict():
            raise ConfigError(
                f"sweep directory {str(root)!r} holds a sweep with other settings (see {str(path)!r}); "
                "give the same settings to continue it, or choose another directory"
            )
        return doc
    return {"sweep": spec.to_dict(), "machine": machine(), "runs": [], "seconds": 0.0, "complete": False}


def run_sweep(
    root: str | Path,
    spec: SweepSpec,
    *,
    log: Log = print,
    train_log: Log | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the sweep ``spec`` in directory ``root``; write its tables and figures to
    ``out`` (default ``root``); returns the sweep record. ``log`` gets one line per run and a
    summary; ``train_log`` the training lines of each run (default: none). ``command`` (the command
    line that made the sweep, for the tables) is recorded with the sweep."""
    if plots:
        check_plotting()
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"sweep directory {str(root)!r} exists and is not a directory")
    doc = _read_sweep(root, spec)
    if command is not None:
        doc["command"] = command
    root.mkdir(parents=True, exist_ok=True)
    quiet: Log = train_log if train_log is not None else (lambda _msg: None)
    with held_lock(root):
        try:
            return _sweep_locked(root, spec, doc, log, quiet, Path(out) if out is not None else root, plots)
        except KeyboardInterrupt:
            log(f"sweep stopped; the same command continues it where it stopped (sweep dir {str(root)!r})")
            raise


def _sweep_locked(root: Path, spec: SweepSpec, doc: dict, log: Log, train_log: Log, out: Path, plots: bool):
    t0 = time.perf_counter()
    spent = float(doc.get("seconds", 0.0))
    records: dict[tuple, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    write_atomic(root / SWEEP_RECORD, json.dumps(doc, indent=2) + "\n")
    log(
        f"compare: {spec.base.model} on {spec.base.dataset}, methods {', '.join(spec.methods)}, "
        f"targets {', '.join(f'{t:g}' for t in spec.targets)}, seeds {', '.join(map(str, spec.seeds))}; "
        f"sweep dir {str(root)!r}"
    )
    for seed in spec.seeds:
        data = build_data(spec.base.replace(seed=seed))
        for run in _plan_seed(spec, root, seed, records):
            rec, how = _do_run(run, data, train_log)
            records[(run.key, run.seed, run.target, run.scp_lambda)] = rec
            runs.append(rec)
            log(_progress_line(len(runs), rec, how, time.perf_counter() - t0))
            doc.update(runs=runs, seconds=round(spent + time.perf_counter() - t0, 1))
            write_atomic(root / SWEEP_RECORD, json.dumps(doc, indent=2) + "\n")
        if seed != spec.seeds[-1]:  # the tables and figures so far, after each seed
            write_outputs(doc, out, plots=plots)
    doc.update(
        complete=True, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    write_atomic(root / SWEEP_RECORD, json.dumps(doc, indent=2) + "\n")
    paths = write_outputs(doc, out, plots=plots)
    for line in summary_lines(doc):
        log(line)
    log(f"wrote {', '.join(p.name for p in paths)} to {str(out)!r}")
    return doc


def machine() -> dict[str, Any]:
    """The machine a sweep ran on, in words: CPU model, cores, Python and NumPy."""
    import numpy

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------
# Summaries


def _group_key(rec: dict[str, Any]) -> tuple:
    return (rec["method"], rec["target"], rec["scp_lambda"])


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of each (method, target or lambda): one point of a curve each."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in runs:
        groups.setdefault(_group_key(rec), []).append(rec)
    order = list(METHODS)
    out = []
    for (key, target, lam), group in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1] or 0.0, kv[0][2] or 0.0)
    ):
        accs = [r["test_acc"] for r in group]
        recal = [r.get(RECALIBRATED) for r in group]
        recal = recal if None not in recal else None
        out.append(
            {
                "method": key,
                "label": METHODS[key][0],
                "target": target,
                "scp_lambda": lam,
                "seeds": [r["seed"] for r in group],
                "test_acc_mean": statistics.fmean(accs),
                "test_acc_min": min(accs),
                "test_acc_max": max(accs),
                "recalibrated_mean": statistics.fmean(recal) if recal else None,
                "recalibrated_min": min(recal) if recal else None,
                "recalibrated_max": max(recal) if recal else None,
                "sparsity_mean": statistics.fmean(r["sparsity"] for r in group),
                "macs_mean": statistics.fmean(r["macs"] for r in group),
                "dense_macs": group[0]["dense_macs"],
                "seconds_mean": statistics.fmean(r["seconds"] for r in group),
            }
        )
    return out


def _acc(row: dict[str, Any], key: str = "test_acc") -> str:
    """``mean [min, max]`` in % of a summary row's ``key`` (``test_acc`` or ``recalibrated``); "-" if none."""
    if row[f"{key}_mean"] is None:
        return "-"
    mean = f"{100 * row[f'{key}_mean']:.2f}"
    if len(row["seeds"]) == 1:
        return mean
    return f"{mean} [{100 * row[f'{key}_min']:.2f}, {100 * row[f'{key}_max']:.2f}]"


def _where(row: dict[str, Any]) -> str:
    if row["method"] == "scp":
        return f"lambda {row['scp_lambda']:g}"
    return "-" if row["target"] is None else f"{100 * row['target']:g} %"


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The end-of-sweep summary: one line per method and target (or SCP lambda), and the LTP trail note."""
    lines = [
        "summary (test accuracy mean [min, max] over seeds, as trained and with the batch norms' statistics "
        f"recalibrated on {RECALIBRATION_BATCHES} training batches; sparsity and MACs per image, means):"
    ]
    for row in summarize(doc["runs"]):
        lines.append(
            f"  {row['label']:<20} {_where(row):<13} acc {_acc(row):<24} BN recalibrated "
            f"{_acc(row, 'recalibrated'):<24} sparsity {100 * row['sparsity_mean']:6.2f} %"
            f"  MACs {row['macs_mean']:>13,.0f} ({100 * row['macs_mean'] / row['dense_macs']:5.1f} % of dense)"
        )
    note = trail_note(doc["runs"])
    if note:
        lines.append(note)
    return lines


def trail_note(runs: Sequence[dict[str, Any]]) -> str | None:
    """What LTP's trails show: one run gives a whole curve."""
    trails = _top_trails(runs)
    if not trails:
        return None
    points = sum(len(r["trail"]) for r in trails)
    lo = min(p["sparsity"] for r in trails for p in r["trail"])
    hi = max(p["sparsity"] for r in trails for p in r["trail"])
    return (
        f"LTP: one run gives a whole curve: the trail of each seed's run at target {trails[0]['target']:g} "
        f"holds {points // len(trails)} snapshots from {lo:.1%} to {hi:.1%} sparsity (one per epoch), "
        "each a finished network; mid-run snapshots are taken before the learning rate has decayed"
    )


def _top_trails(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each seed's LTP run at the highest target (the longest trail)."""
    ltp = [r for r in runs if r["method"] == "ltp" and r.get("trail")]
    if not ltp:
        return []
    top = max(r["target"] for r in ltp)
    return [r for r in ltp if r["target"] == top]


# ---------------------------------------------------------------------------
# Tables


CSV_COLUMNS = (
    "method", "label", "seed", "target", "scp_lambda", "matched_sparsity", "epoch", "test_acc",
    RECALIBRATED, "train_acc", "sparsity", "weights", "nonzeros", "macs", "dense_macs", "parameters", "seconds",
)  # fmt: skip


def to_csv(runs: Sequence[dict[str, Any]]) -> str:
    """Every run, then every LTP trail point (method ``ltp-trail``, with its epoch)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in runs:
        writer.writerow({**rec, "epoch": rec["epochs"]})
    for rec in runs:
        for p in rec.get("trail") or []:
            row = {k: rec[k] for k in ("seed", "target", "weights", "dense_macs")}
            writer.writerow({**row, **p, "method": "ltp-trail", "label": "LTP trail", "nonzeros": ""})
    return buf.getvalue()


def layer_budgets(runs: Sequence[dict[str, Any]], target: float, seed: int) -> dict[str, dict[str, float]]:
    """Per method, each layer's sparsity at ``target`` in ``seed`` (SCP: the run nearest that sparsity,
    each layer's weights removed by slimming)."""
    out: dict[str, dict[str, float]] = {}
    mine = [r for r in runs if r["seed"] == seed]
    for rec in mine:
        if rec["target"] == target and rec["method"] != "dense":
            out[rec["label"]] = {n: 1.0 - v["nonzeros"] / v["params"] for n, v in rec["layers"].items()}
    scp = [r for r in mine if r["method"] == "scp"]
    if scp:
        near = min(scp, key=lambda r: abs(r["sparsity"] - target))
        out[f"SCP (lambda {near['scp_lambda']:g}, slimmed)"] = {
            n: 1.0 - v.get("kept_after_slimming", v["params"]) / v["params"]
            for n, v in near["layers"].items()
        }
    return out


def to_markdown(doc: dict[str, Any]) -> str:
    """The summary table, SCP's slimmed networks, the per-layer budgets and the LTP trail."""
    spec, runs, m = doc["sweep"], doc["runs"], doc["machine"]
    base = spec["base"]
    made = f"Made by `{doc['command']}`. " if doc.get("command") else ""
    lines = [
        f"# All methods side by side: {base['model']} (width {base['width']:g}) on {base['dataset']}",
        "",
        made
        + (f"Finished {doc['finished']}." if doc.get("complete") else "**Not finished**: the runs so far."),
        "",
        f"Seeds {spec['seeds']}, {base['epochs']} epochs, lr {base['lr']:g} {base['schedule']}, batch "
        f"{base['batch_size']}, label smoothing {base['label_smoothing']:g}, weight decay {base['weight_decay']:g}. "
        f"{len(runs)} runs, {doc['seconds'] / 60:.1f} min of wall time on {m['cpu']} ({m['logical_cores']} "
        f"logical cores, shared), Python {m['python']}, NumPy {m['numpy']}.",
        "",
        "Test accuracy (%) of the last epoch, mean [min, max] over seeds, as trained and after setting the "
        f"batch norms' running statistics of the finalized network from {RECALIBRATION_BATCHES} training batches "
        "(`learnsparse finalize --recalibrate-bn`; the statistics gathered in training lag weights that "
        "still move in the last epoch). Magnitude and GMP are trained at the "
        "sparsity STR achieved in the same seed and target (matched on nonzero conv+fc weights); "
        "GMP + STR budget takes STR's learned per-layer sparsities. SCP is measured after finalizing: its "
        "sparsity is the fraction of conv+fc weights that slimming removed, and its MACs are those of the "
        "smaller dense network. Other MACs count the nonzero weights (a saving only with a sparse kernel).",
        "",
        "| method | target | test acc % | BN recalibrated % | sparsity % | MACs / image | MACs % of dense "
        "| s / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summarize(runs):
        lines.append(
            f"| {row['label']} | {_where(row)} | {_acc(row)} | {_acc(row, 'recalibrated')} | "
            f"{100 * row['sparsity_mean']:.2f} | "
            f"{row['macs_mean']:,.0f} | {100 * row['macs_mean'] / row['dense_macs']:.1f} | {row['seconds_mean']:.1f} |"
        )
    lines += ["", *_budget_markdown(runs, spec), *_trail_markdown(runs)]
    return "\n".join(lines) + "\n"


def _budget_markdown(runs: Sequence[dict[str, Any]], spec: dict[str, Any]) -> list[str]:
    target, seed = spec["budget_target"], spec["seeds"][0]
    budgets = layer_budgets(runs, target, seed)
    if not budgets:
        return []
    names = list(budgets)
    layers = list(next(iter(budgets.values())))
    lines = [
        f"Per-layer sparsity (%) at target {target:g}, seed {seed}:",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for layer in layers:
        cells = [f"{100 * budgets[n].get(layer, float('nan')):.1f}" for n in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _trail_markdown(runs: Sequence[dict[str, Any]]) -> list[str]:
    trails = _top_trails(runs)
    if not trails:
        return []
    lines = [
        trail_note(runs) + ".",
        "",
        f"LTP trail, seed {trails[0]['seed']} (target {trails[0]['target']:g}):",
        "",
        "| epoch | sparsity % | test acc % | MACs / image |",
        "|---:|---:|---:|---:|",
    ]
    for p in trails[0]["trail"]:
        lines.append(
            f"| {p['epoch']} | {100 * p['sparsity']:.2f} | {100 * p['test_acc']:.2f} | {p['macs']:,} |"
        )
    return [*lines, ""]


def write_outputs(doc: dict[str, Any], out: str | Path, *, plots: bool = True) -> list[Path]:
    """``compare.md``, ``compare.csv``, ``compare.json`` and (with ``plots``) the figures, in ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}") from None
    table = {k: v for k, v in doc.items() if k != "runs"}
    table["summary"] = summarize(doc["runs"])
    table["runs"] = [{k: v for k, v in r.items() if k != "run_dir"} for r in doc["runs"]]
    paths = [
        write_atomic(out / "compare.md", to_markdown(doc)),
        write_atomic(out / "compare.csv", to_csv(doc["runs"])),
        write_atomic(out / "compare.json", json.dumps(table, indent=2) + "\n"),
    ]
    if plots:
        paths += write_figures(doc, out)
    return paths


def check_plotting() -> None:
    """ConfigError (one line) when matplotlib, which draws the figures, is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "compare draws its figures with matplotlib, which is not installed: "
            "pip install 'learnsparse[plots]', or pass --no-plots"
        ) from None


# ---------------------------------------------------------------------------
# Figures (matplotlib, drawn on the Agg canvas: no display, no global backend change)

_COLORS = {
    "dense": "black",
    "str": "tab:blue",
    "ltp": "tab:orange",
    "scp": "tab:green",
    "magnitude-uniform": "tab:gray",
    "magnitude-global": "tab:brown",
    "gmp": "tab:purple",
    "gmp-str-budget": "tab:cyan",
}


def _new_figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_atomic(path, buf.getvalue())


def _curves(ax: Any, doc: dict[str, Any], axis: str) -> None:
    """One line per method (mean over seeds, bars from min to max), dense as a band (sparsity axis) or
    a point (MACs axis), LTP's trails dotted. ``axis`` is "sparsity" (a fraction) or "macs"."""

    def x_of(row: dict[str, Any]) -> float:
        return row["sparsity_mean"] if axis == "sparsity" else row["macs_mean"]

    rows = summarize(doc["runs"])
    for key in METHODS:
        mine = sorted((r for r in rows if r["method"] == key), key=x_of)
        if axis == "sparsity" and key != "dense":  # the logit axis holds (0, 1) only
            mine = [r for r in mine if 0.0 < r["sparsity_mean"] < 1.0]
        if not mine:
            continue
        color = _COLORS[key]
        if key == "dense" and axis == "sparsity":
            r = mine[0]
            ax.axhspan(100 * r["test_acc_min"], 100 * r["test_acc_max"], color=color, alpha=0.08)
            ax.axhline(100 * r["test_acc_mean"], color=color, linestyle="--", linewidth=1, label="dense")
            continue
        ys = [100 * r["test_acc_mean"] for r in mine]
        err = [
            [y - 100 * r["test_acc_min"] for y, r in zip(ys, mine)],
            [100 * r["test_acc_max"] - y for y, r in zip(ys, mine)],
        ]
        ax.errorbar(
            [x_of(r) for r in mine], ys, yerr=err, color=color, marker="o", markersize=4, capsize=3,
            linewidth=1.4, label=METHODS[key][0],
        )  # fmt: skip
    for i, rec in enumerate(_top_trails(doc["runs"])):
        pts = [p for p in rec["trail"] if axis == "macs" or 0.0 < p["sparsity"] < 1.0]
        ax.plot(
            [p["sparsity"] if axis == "sparsity" else p["macs"] for p in pts],
            [100 * p["test_acc"] for p in pts],
            color=_COLORS["ltp"], linestyle=":", linewidth=1, marker=".", markersize=3, alpha=0.7,
            label="LTP trail (one run per seed)" if i == 0 else None,
        )  # fmt: skip


def _sparsity_axis(ax: Any) -> None:
    """A logit axis: equal room for 50 -> 90 % and 90 -> 98 %, where the methods part."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("logit")
    ticks = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{100 * t:g}" for t in ticks])
    ax.set_xlabel(
        "sparsity, % (logit scale; zero conv+fc weights, SCP: weights removed by slimming)", fontsize=8
    )


def _accuracy_panels(fig: Any, doc: dict[str, Any], axis: str) -> None:
    """Left: every point; right: the same zoomed to the top, where the differences are within a few images."""
    accs = [r["test_acc"] for r in doc["runs"]]
    accs += [p["test_acc"] for r in _top_trails(doc["runs"]) for p in r["trail"]]
    dense = [r["test_acc"] for r in doc["runs"] if r["method"] == "dense"]
    top = 100 * max(accs)
    zoom_low = (100 * min(dense) if dense else top) - 4.0
    for i, (low, title) in enumerate(
        ((max(0.0, 100 * min(accs) - 2), _title(doc)), (zoom_low, "zoomed to the top (dense - 4 points)"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        _curves(ax, doc, axis)
        if axis == "sparsity":
            _sparsity_axis(ax)
        else:
            ax.set_xscale("log")
            ax.set_xlabel("MACs per image (nonzero weights; SCP: its slimmed dense network)", fontsize=8)
        ax.set_ylim(low, top + 0.5)
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _title(doc: dict[str, Any]) -> str:
    base, seeds = doc["sweep"]["base"], doc["sweep"]["seeds"]
    return (
        f"{base['model']} (width {base['width']:g}) on {base['dataset']}, {base['epochs']} epochs, "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} (bars: min to max)"
    )


def write_figures(doc: dict[str, Any], out: Path) -> list[Path]:
    """The three figures of the module docstring, in ``out``."""
    check_plotting()
    paths = []
    for name, axis in zip(FIGURE_NAMES[:2], ("sparsity", "macs")):
        fig = _new_figure((13.0, 4.8))
        _accuracy_panels(fig, doc, axis)
        paths.append(_save(fig, out / name))
    paths.append(_budget_figure(doc, out / FIGURE_NAMES[2]))
    return paths


def _budget_figure(doc: dict[str, Any], path: Path) -> Path:
    """One line per method over the layers (in forward order): each layer's sparsity at the budget target."""
    spec = doc["sweep"]
    budgets = layer_budgets(doc["runs"], spec["budget_target"], spec["seeds"][0])
    layers = list(next(iter(budgets.values()))) if budgets else []
    fig = _new_figure((min(16.0, max(8.5, 0.35 * len(layers) + 5.0)), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for name, per_layer in budgets.items():
        key = {label: k for k, (label, _) in METHODS.items()}.get(name, "scp")  # SCP's name carries lambda
        ys = [100 * per_layer.get(n, 0.0) for n in layers]
        ax.plot(
            range(len(layers)), ys, color=_COLORS[key], marker="o", markersize=4, linewidth=1.2, label=name
        )
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("layer sparsity (%)")
    ax.set_title(
        f"per-layer budgets at target {spec['budget_target']:g}, seed {spec['seeds'][0]}", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
