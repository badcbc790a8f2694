"""A short real training run on the GPU: ResNet-50 and MobileNetV1 on the digits, upsampled to 224x224.

The data: the library's digits data set (scikit-learn's 1,797 8x8 handwritten digits, scaled to
[0, 1] and standardised with the training pixels' mean and standard deviation, the fixed
stratified 80/20 split of ``reference.data``), each image upsampled by nearest neighbour to
``--image`` x ``--image`` (224: every pixel becomes a 28x28 block) and replicated to 3 channels.
It is held in memory as a ``reference.data.Dataset`` (about 1.1 GB of float32 at 224). No
augmentation: the digits' one-pixel shift means nothing at this scale.

The training: ``reference.train.train(config, data=...)`` itself, with
``TrainConfig(device="cuda")``, for every model (``--models``) and method (``--methods``: dense and
STR by default; LTP, SCP, magnitude and GMP on request). Throughput counts the training steps only
(each epoch's ``train_seconds``), not the per-epoch evaluation and checkpoint writes.

Settings: batch 64, SGD momentum 0.9, weight decay 5e-4, no label smoothing, STR's default
``s_init`` (-5); the learning rate ramps linearly over the first epoch's steps, then follows a
cosine (updated every step). Its peak (``--lr``) defaults per model to DEFAULT_LR: 0.01 for
ResNet-50, 0.05 for MobileNetV1. These were chosen by running this recipe in PyTorch on the CPU
at 64x64 (same initial weights): ResNet-50 reached 99 % test accuracy at 0.01 but at 0.05 was
still at 18 % train accuracy after 4 epochs; MobileNetV1 reached 99 % at 0.05 and 95 % at 0.01.
The number of epochs is the fewest that reach ``--steps`` steps (default 300: 23 steps per
epoch, so 14 epochs, 322 steps). Checkpoints go to a temporary directory (``--keep-runs DIR``
keeps them).

Recorded per run: per epoch the train loss and accuracy, test loss and accuracy, sparsity, the
epoch's seconds and its training seconds; the throughput (training images per second over all
epochs, and over all but the first, which includes CuPy's kernel compilation); the most the CuPy
memory pool held; and ``train()``'s log. One JSON (``--out``, written atomically) and a PNG of the
curves beside it (same name, ``.png``; needs matplotlib).

``--smoke`` checks the script on a machine without a GPU: the CPU, image 32, 128 training and 64
test images, batch 32, 2 epochs. Its numbers mean nothing.

Usage (from the repository root; the project need not be installed)::

    PYTHONPATH=. python benchmarks/gpu_train.py [--models resnet50,mobilenet_v1] [--methods dense,str]
        [--steps 300] [--batch 64] [--precision tf32] [--out benchmarks/results/gpu_train.json]

Exit status: 0 when every run finished, 1 when one failed (its JSON entry holds the error), 2 for
bad arguments or a missing GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from environment import machine_info
from gpu_throughput import (
    OneLineParser,
    comma_list,
    device_record,
    fail,
    release_device_memory,
    source_state,
)

from reference.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODELS = ("resnet50", "mobilenet_v1")
METHODS = ("dense", "str", "ltp", "scp", "magnitude", "gmp")
PRECISIONS = ("tf32", "bf16", "fp32")
DEFAULT_LR = {"resnet50": 0.01, "mobilenet_v1": 0.05}  # peak lr per model; see the module docstring
SMOKE = {"image": 32, "train_images": 128, "test_images": 64, "batch": 32, "steps": 8}


# ======================================================================== data
def upsample_nearest(x, size: int):
    """(N, C, h, w) images -> (N, 3, size, size) float32: nearest-neighbour resize, channels replicated.

    Output pixel i reads input pixel floor((i + 1/2) h / size), the pixel whose area holds the
    output pixel's centre; for size = 28 h that is a 28x28 block per input pixel.
    """
    import numpy as np

    n, c, h, w = x.shape
    rows = ((2 * np.arange(size) + 1) * h) // (2 * size)  # (size,)
    cols = ((2 * np.arange(size) + 1) * w) // (2 * size)  # (size,)
    y = x[:, :, rows[:, None], cols[None, :]]  # (N, C, h, w) -> (N, C, size, size)
    if c == 1:
        y = np.broadcast_to(y, (n, 3, size, size))  # (N, 1, S, S) -> (N, 3, S, S), one plane three times
    return np.ascontiguousarray(y, dtype=np.float32)


def upsampled_digits(size: int, train_images: int | None = None, test_images: int | None = None):
    """The library's digits data set at ``size`` x ``size`` with 3 channels, as a Dataset in memory.

    ``train_images`` / ``test_images`` keep only the first that many of each split (for --smoke).
    """
    from reference.data import Dataset, load_dataset

    digits = load_dataset("digits")
    x_train, y_train = digits.x_train[:train_images], digits.y_train[:train_images]
    x_test, y_test = digits.x_test[:test_images], digits.y_test[:test_images]
    return Dataset(
        "digits",
        upsample_nearest(x_train, size),
        y_train.copy(),
        upsample_nearest(x_test, size),
        y_test.copy(),
        digits.num_classes,
        augment=None,
    )


# ===================================================================== one run
def train_one(model: str, method: str, dataset, args, device: str, run_root: Path) -> dict[str, Any]:
    """One call of reference.train.train(); its history, throughput, memory and log."""
    from reference.config import TrainConfig
    from reference.data import num_batches
    from reference.train import train

    steps_per_epoch = num_batches(dataset.num_train, args.batch, drop_last=False)
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    config = TrainConfig(
        model=model,
        dataset="digits",
        image_size=args.image,
        epochs=epochs,
        batch_size=args.batch,
        eval_batch_size=args.eval_batch,
        lr=args.lr if args.lr is not None else DEFAULT_LR[model],
        momentum=0.9,
        weight_decay=5e-4,
        label_smoothing=0.0,
        schedule="cosine",
        warmup_epochs=min(1, epochs - 1),
        per_step=True,
        method=method,
        target_sparsity=args.target_sparsity,
        seed=args.seed,
        device=device,
        precision=args.precision,
        run_dir=str(run_root / f"{model}-{method}"),
        progress=False,
    )
    log_lines: list[str] = []

    def log(text: str) -> None:
        log_lines.append(text)
        first = text.splitlines()[0] if text else ""
        if first.startswith(("training ", "epoch ", "done:", "sparsity:", "resuming")):
            print(f"  {first}", flush=True)

    release_device_memory(device)
    start = time.perf_counter()
    result = train(config, log=log, data=dataset)
    seconds = time.perf_counter() - start
    epoch_seconds = [row["train_seconds"] for row in result.history]
    peak = None
    if device == "cuda":
        from gpu import runtime

        stats = runtime.memory_stats()
        peak = {"pool_total_bytes": stats["total_bytes"], "peak_gib": round(stats["total_bytes"] / 2**30, 3)}
    history = [dict(row) for row in result.history]
    n = dataset.num_train
    later = epoch_seconds[1:]
    return {
        "model": model,
        "method": method,
        "precision": args.precision if device == "cuda" else None,
        "batch": args.batch,
        "lr": config.lr,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "steps": epochs * steps_per_epoch,
        "config": config.to_dict(),
        "history": history,
        "final": {
            "train_loss": history[-1]["train_loss"],
            "train_acc": history[-1]["train_acc"],
            "test_acc": history[-1]["test_acc"],
            "best_test_acc": result.best_acc,
            "best_epoch": result.best_epoch,
            "sparsity": history[-1]["sparsity"],
        },
        "loss_fell": history[-1]["train_loss"] < history[0]["train_loss"],
        "accuracy_rose": history[-1]["test_acc"] > history[0]["test_acc"],
        "images_per_s": n * len(epoch_seconds) / sum(epoch_seconds),
        "images_per_s_after_first_epoch": n * len(later) / sum(later) if later else None,
        "train_seconds": round(sum(epoch_seconds), 2),
        "seconds": round(seconds, 2),
        "peak_memory": peak,
        "log": "\n".join(log_lines),
    }


# ======================================================================= plots
def plot(runs: list[dict[str, Any]], path: Path) -> str | None:
    """Train loss, accuracy (test solid, train dashed) and sparsity per epoch, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is missing ({exc})"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        if "history" not in run:
            continue
        epochs = [row["epoch"] for row in run["history"]]
        label = f"{run['model']} {run['method']}"
        (line,) = axes[0].plot(
            epochs, [row["train_loss"] for row in run["history"]], marker="o", ms=3, label=label
        )
        color = line.get_color()
        axes[1].plot(
            epochs, [100 * row["test_acc"] for row in run["history"]], color=color, label=f"{label} test"
        )
        axes[1].plot(
            epochs,
            [100 * row["train_acc"] for row in run["history"]],
            color=color,
            ls="--",
            label=f"{label} train",
        )
        axes[2].plot(epochs, [100 * row["sparsity"] for row in run["history"]], color=color, label=label)
    axes[0].set(title="training loss (mean cross-entropy)", xlabel="epoch", yscale="log")
    axes[1].set(title="accuracy (test solid, train dashed)", xlabel="epoch", ylabel="%")
    axes[2].set(title="weight sparsity (conv + fc)", xlabel="epoch", ylabel="%")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return None


# ====================================================================== driver
def parse_args(argv: list[str] | None):
    parser = OneLineParser(
        description=__doc__.split("\n")[0],
        epilog="See the module docstring (head of this file) for the data, the settings and the output.",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(
        "--methods", default="dense,str", help=f"comma-separated, of {', '.join(METHODS)} (default dense,str)"
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps to reach, in whole epochs (default 300)"
    )
    parser.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--eval-batch", type=int, default=256, help="evaluation batch size (default 256)")
    parser.add_argument("--image", type=int, default=224, help="side of the upsampled images (default 224)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default per model: resnet50 0.01, mobilenet_v1 0.05)",
    )
    parser.add_argument(
        "--precision", default="tf32", choices=PRECISIONS, help="GEMM precision on the GPU (default tf32)"
    )
    parser.add_argument(
        "--target-sparsity", type=float, default=None,
        help="sparsity for STR/LTP to steer to (default: none); needed by magnitude and gmp",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation and data order (default 0)"
    )
    parser.add_argument(
        "--keep-runs", type=Path, default=None, help="keep run directories (checkpoints) here"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "gpu_train.json",
        help="JSON path; the plot goes beside it (.png)",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="check the script on the CPU: image 32, 128/64 images, batch 32, 2 epochs "
        "(its numbers mean nothing)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.models = comma_list(args.models, MODELS, "--models")
    args.methods = comma_list(args.methods, METHODS, "--methods")
    args.train_images = args.test_images = None
    if args.smoke:
        args.image, args.batch, args.steps = SMOKE["image"], SMOKE["batch"], SMOKE["steps"]
        args.train_images, args.test_images = SMOKE["train_images"], SMOKE["test_images"]
    if args.batch < 2:
        fail(f"--batch must be at least 2 (batch norm needs two samples), got {args.batch}")
    if args.steps < 1 or args.eval_batch < 1:
        fail("--steps and --eval-batch must be >= 1")
    if args.image < 32:
        fail(f"--image must be at least 32 (the models downsample by 32), got {args.image}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be a positive number, got {args.lr}")
    if args.target_sparsity is not None and not 0.0 <= args.target_sparsity < 1.0:
        fail(f"--target-sparsity must be in [0, 1), got {args.target_sparsity}")
    needs_target = [m for m in args.methods if m in ("magnitude", "gmp")]
    if needs_target and args.target_sparsity is None:
        fail(f"method(s) {', '.join(needs_target)} need --target-sparsity")
    if args.out.suffix != ".json":
        fail(f"--out must name a .json file (the plot goes beside it as .png), got {str(args.out)!r}")
    if args.seed < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    return args


def check_device(smoke: bool) -> str:
    """ "cpu" for --smoke; otherwise "cuda", once CuPy sees a GPU (exit 2 with the reason if not)."""
    if smoke:
        return "cpu"
    from gpu import runtime

    why = runtime.unavailable_reason()
    if why is not None:
        fail(f"no GPU: {why}; use --smoke to check the script on the CPU")
    runtime.require()
    return "cuda"


def summary_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | epochs (steps) | train loss first -> last | test acc first -> last (best) | "
        "sparsity | img/s (after epoch 1) | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['method']} | failed: {r['error'].splitlines()[0][:90]} | | | | | |"
            )
            continue
        h = r["history"]
        later = r["images_per_s_after_first_epoch"]
        peak = "-" if r["peak_memory"] is None else f"{r['peak_memory']['peak_gib']:.2f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['epochs']} ({r['steps']}) | "
            f"{h[0]['train_loss']:.4f} -> {h[-1]['train_loss']:.4f} | "
            f"{h[0]['test_acc']:.2%} -> {h[-1]['test_acc']:.2%} ({r['final']['best_test_acc']:.2%}) | "
            f"{h[-1]['sparsity']:.2%} | {r['images_per_s']:.1f} "
            f"({'-' if later is None else f'{later:.1f}'}) | "
            f"{peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = check_device(args.smoke)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")

    print(f"building the digits at {args.image}x{args.image} ...", flush=True)
    start = time.perf_counter()
    dataset = upsampled_digits(args.image, args.train_images, args.test_images)
    print(f"  {dataset!r} in {time.perf_counter() - start:.1f} s", flush=True)

    import numpy as np

    report: dict[str, Any] = {
        "benchmark": "short training runs on the GPU with reference.train.train(): digits upsampled",
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "device": device_record(device),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "machine": machine_info(),
        "code": source_state(),
        "data": {
            "source": "reference.data.load_dataset('digits'): sklearn digits / 16, standardised with the "
            "training pixels' mean and std, fixed stratified 80/20 split",
            "transform": f"nearest-neighbour upsampling 8x8 -> {args.image}x{args.image}, "
            "the one channel replicated to 3",
            "train_images": dataset.num_train,
            "test_images": dataset.num_test,
            "augment": None,
        },
        "runs": [],
    }
    if device == "cuda":
        import cupy

        report["versions"]["cupy"] = cupy.__version__
    failed = False
    with contextlib.ExitStack() as stack:
        if args.keep_runs is not None:
            run_root = args.keep_runs
            run_root.mkdir(parents=True, exist_ok=True)
        else:
            run_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_train_")))
        pairs = [(m, k) for m in args.models for k in args.methods]
        for index, (model, method) in enumerate(pairs):
            print(f"[{index + 1}/{len(pairs)}] {model} {method}", flush=True)
            try:
                run = train_one(model, method, dataset, args, device, run_root)
            except Exception as exc:  # recorded per run; the other runs still go
                failed = True
                run = {
                    "model": model, "method": method, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc().splitlines()[-20:],
                }  # fmt: skip
                print(f"  failed: {run['error'].splitlines()[0]}", file=sys.stderr, flush=True)
            else:
                later = run["images_per_s_after_first_epoch"]
                print(
                    f"  {run['images_per_s']:.1f} img/s over all epochs"
                    + ("" if later is None else f", {later:.1f} after the first")
                    + f"; {run['seconds']:.1f} s in all",
                    flush=True,
                )
            release_device_memory(device)
            report["runs"].append(run)
            write_atomic(out, json.dumps(report, indent=2) + "\n")  # partial results survive a crash

    table = summary_table(report["runs"])
    report["markdown_table"] = table
    problem = plot(report["runs"], png)
    report["plot"] = png.name if problem is None else problem
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print()
    print(table)
    print(f"wrote {out}" + ("" if problem else f" and {png}") + ("" if not problem else f" ({problem})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
