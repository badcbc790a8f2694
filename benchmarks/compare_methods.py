"""Every method side by side on three models: the committed runs of ``learnsparse compare``.

Each experiment is one ``learnsparse compare`` sweep (:mod:`reference.compare`): dense, STR, LTP,
SCP, uniform and global magnitude pruning, GMP and GMP with STR's budget, over sparsity targets and
seeds; the magnitude baselines at the sparsity STR achieved in the same seed; every run placed by
sparsity and by MACs per image (SCP by its slimmed network); LTP's trail as a curve from one run.

Experiments (``NAME``: model and data):

- ``digits_cnn``: the small CNN on scikit-learn's 8x8 digits (359 test images: one image is
  0.28 points), 16 epochs, targets 0.7 to 0.98, seeds 0, 1 and 2, SCP at three lambdas;
- ``resnet20``: CIFAR ResNet-20 at width 0.5 on ``digits32`` (the same digits at 32x32, each
  pixel a 4x4 block, so the ResNet sees CIFAR-sized inputs: 32 -> 16 -> 8), 10 epochs, targets
  0.7, 0.9 and 0.97, one seed, SCP at three lambdas;
- ``mobilenet_v1``: MobileNetV1 at width 0.5 on ``digits32`` (it halves its input five times:
  32 -> 1), 12 epochs, targets 0.7, 0.9 and 0.97, one seed, SCP at three lambdas.

On the README's 2-core AMD EPYC machine the sweeps took 7.8, 15.2 and 11.1 minutes (on a 2-core
Intel Xeon, before the kernels split the batch: 7.4, 17.4 and 17.3). Each run's record also holds
its test accuracy with the batch norms recalibrated (:mod:`reference.compare`); running this again
on sweeps recorded before that figure existed adds it from the checkpoints, without training.

Usage (from the repository root)::

    python benchmarks/compare_methods.py [NAME ...] [--sweeps DIR] [--results DIR] [--quick]

Each experiment writes ``<results>/compare_<NAME>/`` (``compare.md``, ``.csv``, ``.json`` and
the figures; default ``benchmarks/results``). Its run directories (checkpoints) go to
``<sweeps>/<NAME>`` (default ``runs/compare``, which git ignores): run the same command again
and a stopped sweep continues where it stopped. ``--quick`` is a smoke test (2 epochs, two
targets, one seed; tiny sets where the data set is synthetic) whose numbers mean nothing; it writes its tables next to
its sweeps, never to the results directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reference.cli import main as learnsparse

# Relative to the repository root, where the command runs, so that the tables name no local path.
SWEEPS_DIR = Path("runs") / "compare"
RESULTS_DIR = Path("benchmarks") / "results"

COMMON = ["--label-smoothing", "0.1", "--weight-decay", "5e-4"]
EXPERIMENTS: dict[str, list[str]] = {
    "digits_cnn": [
        "--model", "digits_cnn", "--dataset", "digits", "--epochs", "16", "--lr", "0.05", "--batch-size", "32",
        "--targets", "0.7,0.8,0.9,0.95,0.97,0.98", "--seeds", "0,1,2",
        "--scp-lambdas", "0.004,0.008,0.016", "--budget-target", "0.95",
    ],
    "resnet20": [
        "--model", "resnet20", "--width", "0.5", "--dataset", "digits32", "--epochs", "10", "--lr", "0.1",
        "--batch-size", "64", "--targets", "0.7,0.9,0.97", "--seeds", "0", "--scp-lambdas", "0.003,0.008,0.02",
    ],
    "mobilenet_v1": [
        "--model", "mobilenet_v1", "--width", "0.5", "--dataset", "digits32", "--epochs", "12", "--lr", "0.1",
        "--batch-size", "64", "--targets", "0.7,0.9,0.97", "--seeds", "0", "--scp-lambdas", "0.001,0.002,0.004",
    ],
}  # fmt: skip
QUICK = ["--epochs", "2", "--targets", "0.5,0.9", "--seeds", "0", "--train-size", "128", "--test-size", "64"]


def _quick(argv: list[str]) -> list[str]:
    """The experiment's flags with QUICK's settings in place of its own (and no sizes for digits)."""
    replaced = {QUICK[i] for i in range(0, len(QUICK), 2)}
    out: list[str] = []
    it = iter(argv)
    for flag in it:
        value = next(it)
        if flag not in replaced and flag != "--budget-target":
            out += [flag, value]
    quick = QUICK if "synthetic" in argv else QUICK[:-4]
    return out + quick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"experiments (default: all of {list(EXPERIMENTS)})"
    )
    parser.add_argument("--sweeps", type=Path, default=SWEEPS_DIR, help="sweep directories")
    parser.add_argument("--results", type=Path, default=None, help="where compare_<NAME>/ goes")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sweeps, meaningless numbers")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; expected some of {list(EXPERIMENTS)}")
    for name in args.names or list(EXPERIMENTS):
        flags = _quick(EXPERIMENTS[name]) if args.quick else EXPERIMENTS[name]
        sweep = args.sweeps / (f"{name}-quick" if args.quick else name)
        results = args.results if args.results is not None else (args.sweeps if args.quick else RESULTS_DIR)
        out = results / f"compare_{name}{'-quick' if args.quick else ''}"
        t0 = time.perf_counter()
        status = learnsparse(["compare", str(sweep), *COMMON, *flags, "--out", str(out)])
        if status != 0:
            return status
        print(f"{name}: {(time.perf_counter() - t0) / 60:.1f} min; tables and figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
