"""Learnable sparsity against its baselines, at matched sparsity: the papers' central claims on our data.

Three experiments, each run in-process through :func:`reference.train.train`
(no progress bar, no log), with the same epochs, learning rate, schedule and
label smoothing for every method of an experiment:

A. **digits** (``digits_cnn`` on scikit-learn's 8x8 digits, 359 test images, so one
   image is 0.28 points), several seeds, at each target in ``--digits-targets``:

   - ``dense``;
   - ``str``: STR with ``target_sparsity`` (the controller), which learns a per-layer budget;
   - then at the *sparsity STR achieved* in the same seed (so every row of a block
     has the same number of nonzero weights, up to rounding):
     ``magnitude`` uniform (gradual, linear ramp; same sparsity in every layer),
     ``magnitude`` global (one threshold over all layers), ``gmp`` (Zhu & Gupta's
     cubic ramp, uniform per layer) and ``gmp`` with STR's learned budget
     (``budget = <STR checkpoint>``: budget transfer).

B. **CIFAR-shaped**: CIFAR ResNet-20 at width 0.5 on the ``synthetic`` data set
   (3x16x16 images, 2,048 train / 512 test), the same comparison at each target in
   ``--synthetic-targets``, with the seeds in ``--synthetic-seeds``.

C. **SCP** on digits: dense against SCP (``scp_lambda`` 0.008), whose slimmed
   network is measured after :func:`reference.finalize.finalize` (channels removed)
   with :func:`reference.accounting.profile`/``totals``; and uniform magnitude
   pruning at SCP's remaining conv+fc weight count, for comparison.

Per run the JSON records: the experiment, method, settings, seed, test accuracy
(last epoch), train accuracy, achieved sparsity of the conv+fc weights (eval
mode, measured with :func:`reference.report.layer_report`), dense and sparse MACs
per image (``sparse MACs = dense MACs x density`` per layer; for SCP the dense MACs
of the slimmed network), and the wall time of the run. STR runs also record
their learned per-layer budget.

Usage (from the repository root)::

    python benchmarks/compare_methods.py [--quick] [--seeds 0,1,2]
        [--out benchmarks/results/compare_methods.json] [--md benchmarks/results/compare_methods.md]
        [--digits-targets 0.9,0.95] [--synthetic-targets 0.9,0.95] [--synthetic-seeds 0]
        [--keep-runs DIR]
    python benchmarks/compare_methods.py --render benchmarks/results/compare_methods.json   # Markdown only

``--quick`` is a smoke test (one seed, few epochs, small synthetic images); its
numbers mean nothing. Run directories go to a temporary directory that is
removed at the end, unless ``--keep-runs`` names one.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from environment import code_state, machine_info

from reference.config import TrainConfig
from reference.files import write_atomic
from reference.report import layer_report
from reference.train import build_data, evaluate, train

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------
# The settings of each experiment (full mode; --quick shrinks them)

DIGITS = dict(model="digits_cnn", dataset="digits", epochs=30, lr=0.05, batch_size=32, label_smoothing=0.1)
SYNTHETIC = dict(
    model="resnet20",
    dataset="synthetic",
    width=0.5,
    image_size=16,
    train_size=2048,
    test_size=512,
    epochs=12,
    lr=0.1,
    batch_size=64,
    label_smoothing=0.1,
)
SCP_LAMBDA = 0.008

QUICK_DIGITS = dict(DIGITS, epochs=6)
QUICK_SYNTHETIC = dict(SYNTHETIC, image_size=8, train_size=256, test_size=128, epochs=2)

# method label -> (TrainConfig overrides, needs: "target" | "matched" | "budget" | None)
BASELINES = [
    ("magnitude (uniform)", dict(method="magnitude", prune_scope="uniform")),
    ("magnitude (global)", dict(method="magnitude", prune_scope="global")),
    ("GMP (uniform)", dict(method="gmp", prune_scope="uniform")),
    ("GMP + STR budget", dict(method="gmp", prune_scope="uniform")),  # budget added per run
]
METHOD_ORDER = ["dense", "STR", *(label for label, _ in BASELINES)]


# ---------------------------------------------------------------------------
# Environment


def _versions() -> dict[str, Any]:
    import numpy

    out: dict[str, Any] = {"python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import sklearn

        out["scikit-learn"] = sklearn.__version__
    except ImportError:
        out["scikit-learn"] = None
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads")} for p in threadpool_info()
        ]
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------
# One run


_RUN_NUMBER = itertools.count(1)  # run directories are numbered: one per run, never reused


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def _measure(model, input_shape) -> dict[str, Any]:
    """Totals of the per-layer report (eval mode) and each weight layer's sparsity."""
    rows = layer_report(model, input_shape)
    total = rows[-1]
    per_layer = {r["layer"]: round(r["sparsity_pct"] / 100.0, 6) for r in rows[:-1] if r["params"]}
    return {
        "weights": total["params"],
        "nonzeros": total["nonzeros"],
        "sparsity": 1.0 - total["nonzeros"] / total["params"],
        "dense_macs": total["dense_macs"],
        "sparse_macs": total["sparse_macs"],
        "layer_sparsity": per_layer,
    }


def _input_shape(settings: dict[str, Any]) -> tuple[int, int, int]:
    if settings["dataset"] == "digits":
        return (1, 8, 8)
    size = settings["image_size"]
    return (3, size, size)


def run_one(
    experiment: str,
    label: str,
    settings: dict[str, Any],
    seed: int,
    runs_root: Path,
    *,
    keep_budget: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Train one configuration; returns (the record, the TrainResult)."""
    tag = f"{next(_RUN_NUMBER):03d}-{experiment}-{label}-{seed}"
    run_dir = runs_root / "".join(c if c.isalnum() or c in "-._" else "_" for c in tag)
    config = TrainConfig(**settings, seed=seed, progress=False, run_dir=str(run_dir))
    t0 = time.perf_counter()
    result = train(config, log=_quiet)
    seconds = time.perf_counter() - t0
    measured = _measure(result.model, _input_shape(settings))
    record = {
        "experiment": experiment,
        "method": label,
        "seed": seed,
        "settings": {k: v for k, v in config.to_dict().items() if k in settings or k in ("seed",)},
        "test_acc": float(result.metrics["test_acc"]),
        "best_test_acc": float(result.best_acc),
        "train_acc": float(result.metrics["train_acc"]),
        "sparsity": measured["sparsity"],
        "weights": measured["weights"],
        "nonzeros": measured["nonzeros"],
        "dense_macs": measured["dense_macs"],
        "sparse_macs": measured["sparse_macs"],
        "seconds": round(seconds, 2),
    }
    if settings.get("budget") is not None:
        record["settings"]["budget"] = "checkpoint of the STR run of this seed and target"
    if keep_budget:
        record["layer_sparsity"] = measured["layer_sparsity"]
    return record, result


# ---------------------------------------------------------------------------
# Experiments


def sparsity_comparison(
    experiment: str,
    base: dict[str, Any],
    targets: list[float],
    seeds: list[int],
    runs_root: Path,
    records: list[dict[str, Any]],
    progress,
) -> None:
    """Dense, STR at each target, and the baselines at STR's achieved sparsity (A and B)."""
    for seed in seeds:
        rec, _ = run_one(experiment, "dense", dict(base, method="dense"), seed, runs_root)
        rec["target"] = None
        records.append(rec)
        progress(rec)
        for target in targets:
            rec, str_result = run_one(
                experiment,
                "STR",
                dict(base, method="str", target_sparsity=target),
                seed,
                runs_root,
                keep_budget=True,
            )
            rec["target"] = target
            records.append(rec)
            progress(rec)
            matched = round(rec["sparsity"], 6)  # what STR achieved, measured in eval mode
            for label, overrides in BASELINES:
                settings = dict(base, **overrides)
                if label == "GMP + STR budget":
                    settings["budget"] = str(str_result.checkpoint)
                else:
                    settings["target_sparsity"] = matched
                rec, _ = run_one(
                    experiment, label, settings, seed, runs_root, keep_budget=label == "GMP + STR budget"
                )
                rec["target"] = target
                rec["matched_to_str_sparsity"] = matched
                records.append(rec)
                progress(rec)


def scp_experiment(
    base: dict[str, Any], seeds: list[int], runs_root: Path, records: list[dict[str, Any]], progress
) -> None:
    """SCP against dense (accuracy, MACs after slimming) and magnitude at SCP's weight count (C)."""
    from reference.accounting import profile, totals
    from reference.finalize import finalize

    for seed in seeds:
        rec, result = run_one("scp", "SCP", dict(base, method="scp", scp_lambda=SCP_LAMBDA), seed, runs_root)
        model = result.model
        input_shape = _input_shape(base)
        before = totals(profile(model, input_shape))
        summary = finalize(model)  # in place: channels removed, eval mode
        after = totals(profile(model, input_shape))
        data = build_data(result.config)
        _, acc_final = evaluate(model, data.x_test, data.y_test, result.config.eval_batch_size)
        slim_info = summary.slim if isinstance(summary.slim, dict) else {}
        layers_log = Path(result.run_dir) / "layers.jsonl"
        last = json.loads(layers_log.read_text().splitlines()[-1]) if layers_log.exists() else {}
        rec.update(
            target=None,
            dense_macs=before.dense_macs,
            sparse_macs=after.dense_macs,  # the slimmed network is dense: all its MACs are done
            weights=before.weights,
            nonzeros=after.nonzeros,
            weights_after_slimming=after.weights,
            sparsity=1.0 - after.weights / before.weights,
            test_acc_after_finalize=float(acc_final),
            channels_before=slim_info.get("channels_before"),
            channels_after=slim_info.get("channels_after"),
            logged_dense_macs=last.get("dense_macs"),
            logged_masked_macs=last.get("masked_macs"),
        )
        records.append(rec)
        progress(rec)
        matched = round(1.0 - after.weights / before.weights, 6)
        rec2, _ = run_one(
            "scp",
            "magnitude (uniform) at SCP's weight count",
            dict(base, method="magnitude", prune_scope="uniform", target_sparsity=matched),
            seed,
            runs_root,
        )
        rec2["target"] = None
        rec2["matched_to_scp_sparsity"] = matched
        records.append(rec2)
        progress(rec2)


# ---------------------------------------------------------------------------
# Summaries and Markdown


def _summary_rows(records: list[dict[str, Any]], experiment: str) -> list[dict[str, Any]]:
    """Mean / min / max per (target, method) of one experiment, dense first in each target block."""
    exp = [r for r in records if r["experiment"] == experiment]
    targets = sorted({r["target"] for r in exp if r["target"] is not None})
    out = []
    for target in targets:
        for method in METHOD_ORDER:
            group = [r for r in exp if r["method"] == method and (r["target"] == target or method == "dense")]
            if group:
                out.append(_aggregate(group, target, method))
    return out


def _aggregate(group: list[dict[str, Any]], target: Any, method: str) -> dict[str, Any]:
    accs = [r["test_acc"] for r in group]
    return {
        "target": target,
        "method": method,
        "seeds": [r["seed"] for r in group],
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_min": min(accs),
        "test_acc_max": max(accs),
        "train_acc_mean": statistics.fmean(r["train_acc"] for r in group),
        "sparsity_mean": statistics.fmean(r["sparsity"] for r in group),
        "sparse_macs_mean": statistics.fmean(r["sparse_macs"] for r in group),
        "dense_macs": group[0]["dense_macs"],
        "seconds_mean": statistics.fmean(r["seconds"] for r in group),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _acc_cell(row: dict[str, Any]) -> str:
    if len(row["seeds"]) == 1:
        return _pct(row["test_acc_mean"])
    return f"{_pct(row['test_acc_mean'])} [{_pct(row['test_acc_min'])}, {_pct(row['test_acc_max'])}]"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | method | test acc % (mean [min, max]) | train acc % | sparsity % | sparse MACs / image | s / run |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']:g} | {r['method']} | {_acc_cell(r)} | {_pct(r['train_acc_mean'])} | "
            f"{_pct(r['sparsity_mean'])} | {r['sparse_macs_mean']:,.0f} | {r['seconds_mean']:.1f} |"
        )
    return lines


def _budget_table(records: list[dict[str, Any]], experiment: str, seed: int) -> list[str]:
    """STR's learned per-layer sparsity (one seed), one column per target."""
    strs = [
        r for r in records if r["experiment"] == experiment and r["method"] == "STR" and r["seed"] == seed
    ]
    if not strs:
        return []
    strs.sort(key=lambda r: r["target"])
    layers = list(strs[0]["layer_sparsity"])
    head = (
        "| layer | "
        + " | ".join(f"STR @ {r['target']:g} (achieved {_pct(r['sparsity'])} %)" for r in strs)
        + " |"
    )
    lines = [head, "|---|" + "---:|" * len(strs)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{_pct(r['layer_sparsity'][layer])}" for r in strs) + " |")
    return lines


def _scp_table(records: list[dict[str, Any]]) -> list[str]:
    dense = [r for r in records if r["experiment"] == "A-digits" and r["method"] == "dense"]
    scp = [r for r in records if r["experiment"] == "scp" and r["method"] == "SCP"]
    mag = [r for r in records if r["experiment"] == "scp" and r["method"].startswith("magnitude")]
    if not scp:
        return []
    lines = [
        "| method | test acc % (mean [min, max]) | conv+fc weights kept | MACs / image | MACs vs dense |",
        "|---|---:|---:|---:|---:|",
    ]
    dense_macs = scp[0]["dense_macs"]
    # (label, runs, weights-kept key, MACs key); SCP's MACs are the dense MACs of the slimmed network,
    # magnitude's are sparse MACs (a saving only with a sparse kernel)
    for label, group, kept_key, macs_key in (
        ("dense", dense, "weights", "dense_macs"),
        (f"SCP (lambda {SCP_LAMBDA:g}), slimmed", scp, "weights_after_slimming", "sparse_macs"),
        ("magnitude (uniform) at SCP's weight count", mag, "nonzeros", "sparse_macs"),
    ):
        if not group:
            continue
        agg = _aggregate(group, None, label)
        kept = statistics.fmean(r[kept_key] for r in group)
        macs = statistics.fmean(r[macs_key] for r in group)
        lines.append(
            f"| {label} | {_acc_cell(agg)} | {kept:,.0f} | {macs:,.0f} | {100 * macs / dense_macs:.1f} % |"
        )
    return lines


def markdown(doc: dict[str, Any]) -> str:
    records = doc["runs"]
    s = doc["settings"]
    a, b = s["digits"], s["synthetic"]
    lines = [
        "# Learnable sparsity against magnitude baselines at matched sparsity",
        "",
        f"Made by `{doc['command']}` on {doc['date']} ({doc['machine']['cpu_model']}, "
        f"{doc['machine']['logical_cores']} cores, shared), total wall time {doc['wall_seconds'] / 60:.1f} min; "
        f"git {str(doc['code']['git_commit'])[:10]}.",
        *(["", "**QUICK MODE: smoke test, the numbers mean nothing.**"] if doc["quick"] else []),
        "",
        "Baselines are trained at the sparsity STR achieved in the same seed (so each block has the same number of "
        "nonzero weights); `GMP + STR budget` uses STR's learned per-layer sparsities (budget transfer). Accuracy is "
        "the last epoch's. Sparse MACs = dense MACs x density, per layer (unstructured sparsity: a saving only with a "
        "sparse kernel).",
        "",
        f"## A. digits_cnn on digits (359 test images: 1 image = 0.28 points), seeds {s['seeds']}",
        "",
        f"{a['epochs']} epochs, lr {a['lr']:g} cosine, batch {a['batch_size']}, "
        f"label smoothing {a['label_smoothing']:g}, "
        "weight decay 5e-4; magnitude/GMP prune from epoch 0 to 3/4 of training (every 50 steps). "
        f"Dense MACs: {next((r['dense_macs'] for r in records if r['experiment'] == 'A-digits'), 0):,}.",
        "",
        *_table(_summary_rows(records, "A-digits")),
        "",
        "STR's learned per-layer sparsity (seed 0):",
        "",
        *_budget_table(records, "A-digits", s["seeds"][0]),
        "",
        f"## B. ResNet-20 (width {b['width']:g}) on synthetic 3x{b['image_size']}x{b['image_size']} "
        f"({b['train_size']} train / {b['test_size']} test), seed(s) {s['synthetic_seeds']}",
        "",
        f"{b['epochs']} epochs, lr {b['lr']:g} cosine, batch {b['batch_size']}, label smoothing "
        f"{b['label_smoothing']:g}. One seed only, to fit the time budget. 1 test image = "
        f"{100 / b['test_size']:.2f} points.",
        "",
        *_table(_summary_rows(records, "B-synthetic")),
        "",
        f"## C. SCP on digits (lambda {SCP_LAMBDA:g}, {a['epochs']} epochs, seeds {s['seeds']})",
        "",
        "SCP is measured after `reference.finalize.finalize` (masked channels removed), so its MACs are those of a "
        "smaller dense network; the dense row is section A's dense runs.",
        "",
        *_scp_table(records),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: one seed, few epochs, tiny synthetic data"
    )
    parser.add_argument("--seeds", type=_ints, default=None, help="digits seeds (default 0,1,2; quick: 0)")
    parser.add_argument("--digits-targets", type=_floats, default=[0.9, 0.95])
    parser.add_argument("--synthetic-targets", type=_floats, default=[0.9, 0.95])
    parser.add_argument("--synthetic-seeds", type=_ints, default=[0])
    parser.add_argument("--skip", default="", help="comma list of parts to skip: A, B, C")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "compare_methods.json")
    parser.add_argument("--md", type=Path, default=None, help="Markdown table (default: --out with .md)")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep the run directories here")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="train nothing: rewrite the Markdown (--md, default JSON with .md) from a results JSON",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text(encoding="utf-8"))
        md_path = args.md if args.md is not None else args.render.with_suffix(".md")
        write_atomic(md_path, markdown(doc))
        print(f"wrote {md_path}")
        return 0

    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    digits = QUICK_DIGITS if args.quick else DIGITS
    synthetic = QUICK_SYNTHETIC if args.quick else SYNTHETIC
    skip = {p.strip().upper() for p in args.skip.split(",") if p.strip()}
    md_path = args.md if args.md is not None else args.out.with_suffix(".md")

    if args.keep_runs is not None:
        args.keep_runs.mkdir(parents=True, exist_ok=True)
        runs_root = Path(tempfile.mkdtemp(prefix="compare_methods-", dir=args.keep_runs))
    else:
        runs_root = Path(tempfile.mkdtemp(prefix="compare_methods-"))

    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]]
    )
    machine = machine_info()
    t_start = time.perf_counter()
    records: list[dict[str, Any]] = []

    def progress(rec: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - t_start
        print(
            f"[{elapsed:6.0f}s] {rec['experiment']:<11} {rec['method']:<42} seed {rec['seed']} "
            f"target {rec.get('target')!s:<5} acc {100 * rec['test_acc']:6.2f}% sparsity {100 * rec['sparsity']:6.2f}% "
            f"sparse MACs {rec['sparse_macs']:>10,} ({rec['seconds']:.1f}s)",
            flush=True,
        )

    try:
        if "A" not in skip:
            sparsity_comparison("A-digits", digits, args.digits_targets, seeds, runs_root, records, progress)
        if "B" not in skip:
            sparsity_comparison(
                "B-synthetic",
                synthetic,
                args.synthetic_targets,
                args.synthetic_seeds,
                runs_root,
                records,
                progress,
            )
        if "C" not in skip:
            scp_experiment(digits, seeds, runs_root, records, progress)
    finally:
        if args.keep_runs is None:
            shutil.rmtree(runs_root, ignore_errors=True)

    wall = time.perf_counter() - t_start
    doc = {
        "benchmark": "compare_methods",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "wall_seconds": round(wall, 1),
        "machine": machine,
        "versions": _versions(),
        "code": code_state(),
        "settings": {
            "digits": digits,
            "synthetic": synthetic,
            "seeds": seeds,
            "digits_targets": args.digits_targets,
            "synthetic_targets": args.synthetic_targets,
            "synthetic_seeds": args.synthetic_seeds,
            "scp_lambda": SCP_LAMBDA,
            "matching": "baselines take the sparsity STR achieved (eval mode) in the same seed and target; "
            "'GMP + STR budget' takes STR's per-layer sparsities from its final checkpoint",
            "accuracy": "test accuracy of the last epoch",
        },
        "summary": {
            "A-digits": _summary_rows(records, "A-digits"),
            "B-synthetic": _summary_rows(records, "B-synthetic"),
        },
        "runs": records,
    }
    write_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    write_atomic(md_path, markdown(doc))
    print(f"wrote {args.out} and {md_path} in {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
