"""The ``learnsparse`` command line.

Subcommands::

    learnsparse train [--config FILE.toml] [--resume CKPT] [--run-dir DIR] [--quiet] [--<setting> VALUE ...]
    learnsparse eval CHECKPOINT [--data-root DIR] [--batch-size N]
    learnsparse info MODEL [--input-size N] [--num-classes N] [--width W] [--in-channels C]
    learnsparse report CHECKPOINT [--out DIR] [--no-plots]
    learnsparse report --budget FILE.csv --model MODEL [--column NAME] [--input-size N] [--num-classes N]
    learnsparse finalize CHECKPOINT -o OUT.npz [--trail-sparsity X]
    learnsparse export CHECKPOINT -o OUT.safetensors [--csr]
    learnsparse compare SWEEP_DIR --targets T1,T2,... [--seeds S1,S2,...] [--methods M1,M2,...]
        [--scp-lambdas L1,...] [--budget-target T] [--out DIR] [--no-plots] [--config FILE.toml] [--<setting> VALUE ...]
    learnsparse export CHECKPOINT -o OUT.onnx [--fold-bn] [--opset N]

Every setting of :class:`reference.config.TrainConfig` is a flag of ``train``
(``batch_size`` is ``--batch-size``; true/false settings come as
``--augment`` / ``--no-augment``). Settings are merged as defaults < the
checkpoint's config (with ``--resume``) < ``--config`` file < flags.

Any problem with the input (a :class:`~reference.errors.LearnsparseError` or a
bad flag) prints one line ``learnsparse: error: <message>`` on stderr and exits
with status 2; so does running out of memory. Ctrl-C exits with status 130 and
SIGTERM with 143, each after one line, unwinding like any error. A
closed output pipe (``learnsparse info resnet50 | head``) ends the command
quietly with status 141, what a shell reports for a process ended by SIGPIPE
(128 + 13), as ``cat`` or ``yes`` would.

Flags are matched only by their full names (``--epoch`` is not ``--epochs``),
and a negative number is a value, not a flag: ``--str-s-init -1e30``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from reference.config import FIELD_HELP, TrainConfig, check_path, field_kind, resolve_config
from reference.errors import CheckpointError, ConfigError, LearnsparseError
from reference.ops.parallel import threads

__all__ = ["build_parser", "main"]

PROG = "learnsparse"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, the status a shell shows for a writer whose reader went away

# A number with a minus sign, in any form float() reads: -3, -.5, -1e30, -2.5E-3, -inf, -nan.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-(inf|infinity|nan)", re.IGNORECASE)
# The positional arguments and flags that name files or directories.
_PATH_ARGS = (
    "config",
    "resume",
    "checkpoint",
    "output",
    "out",
    "budget",
    "data_root",
    "run_dir",
    "sweep_dir",
)


class _UsageError(Exception):
    """A command-line syntax problem reported by argparse."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --epoch is an error, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--str-s-init", "-1e30"]`` -> ``["--str-s-init=-1e30"]``.

    argparse takes a token that starts with ``-`` for a flag unless it looks
    like a plain negative integer or decimal, so ``-1e30`` would be refused as
    an unknown option. A negative number that follows a long flag is joined to
    it, which argparse reads as that flag's value (a flag that takes no value
    then reports the value as unexpected).
    """
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if (
            _NEGATIVE_NUMBER.fullmatch(token)
            and prev.startswith("--")
            and "=" not in prev
            and prev != "--"
            and "--" not in out
        ):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _check_paths(args: argparse.Namespace) -> None:
    """Every file or directory argument is valid UTF-8 with file-name-sized components."""
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            flag = name.upper() if name in ("checkpoint", "sweep_dir") else "--" + name.replace("_", "-")
            check_path(value, flag)


def _count(text: str) -> int:
    """A positive integer, such as a number of batches."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer such as 20, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """``"30,60,80"`` -> ``[30, 60, 80]``; an empty string is an empty list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 30,60, got {text!r}"
        ) from None


def _float_list(text: str) -> list[float]:
    """``"0.5,0.9"`` -> ``[0.5, 0.9]``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.9, got {text!r}"
        ) from None


def _name_list(text: str) -> list[str]:
    """``"str,gmp"`` -> ``["str", "gmp"]``."""
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; absent flags leave the attribute unset."""
    defaults = TrainConfig.__dataclass_fields__
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        help_text = FIELD_HELP.get(f.name, "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs.update(action=argparse.BooleanOptionalAction, help=f"{help_text} (default: {default})")
        elif f.name == "milestones":
            kwargs.update(type=_int_list, metavar="E1,E2,...", help=help_text)
        else:
            kind = {"int": int, "float": float}.get(field_kind(f.name), str)
            shown = "" if "(default:" in help_text else f" (default: {default})"
            kwargs.update(type=kind, metavar=f.name.upper(), help=help_text + shown)
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``learnsparse`` command."""
    from reference.checkpoint import library_version

    parser = _Parser(prog=PROG, description="Learnable sparsity in CNNs, from scratch in NumPy.")
    parser.add_argument("--version", action="version", version=f"{PROG} {library_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_train = sub.add_parser(
        "train",
        help="train a model (the defaults are the digits quickstart)",
        description="Train a model. Settings: defaults < --resume checkpoint < --config file < flags.",
    )
    p_train.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    p_train.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    _add_config_flags(p_train)

    p_eval = sub.add_parser("eval", help="evaluate a checkpoint on its data set's test split")
    p_eval.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz checkpoint written by train")
    p_eval.add_argument("--data-root", help="data directory (default: the one in the checkpoint's config)")
    p_eval.add_argument("--batch-size", type=int, help="evaluation batch size (default: the config's)")

    p_info = sub.add_parser("info", help="per-layer weights and MACs of a model")
    p_info.add_argument("model", metavar="MODEL", help="model name")
    p_info.add_argument(
        "--input-size", type=int, help="side of the square input image (default: the model's usual)"
    )
    p_info.add_argument("--num-classes", type=int, help="number of classes (default: the model's usual)")
    p_info.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default: 1.0)")
    p_info.add_argument("--in-channels", type=int, help="input channels (default: the model's usual)")

    p_report = sub.add_parser(
        "report",
        help="per-layer sparsity, thresholds and MACs of a checkpoint, or the cost of a budget file",
        description="Report a checkpoint (report.md, .csv, .json and plots), or cost a per-layer budget "
        "file on a model without training (--budget, --model).",
    )
    p_report.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="a .npz checkpoint")
    p_report.add_argument("--out", metavar="DIR", help="output directory (default: report-<name> next to it)")
    p_report.add_argument("--no-plots", action="store_true", help="skip sparsity.png and weights.png")
    p_report.add_argument("--budget", metavar="FILE.csv", help="a per-layer budget file to cost")
    p_report.add_argument("--model", help="model name for --budget")
    p_report.add_argument("--column", help="budget column, e.g. 90.23 (default: the only one)")
    p_report.add_argument("--input-size", type=int, help="--budget: input side (default: the model's usual)")
    p_report.add_argument("--num-classes", type=int, help="--budget: classes (default: the model's usual)")

    p_final = sub.add_parser(
        "finalize",
        help="bake a sparse checkpoint into plain weights (W_eff, masks applied, SCP channels removed)",
    )
    p_final.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz checkpoint written by train")
    p_final.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="the finalized checkpoint")
    p_final.add_argument(
        "--trail-sparsity",
        type=float,
        metavar="X",
        help="finalize the snapshot of the run's trail (LTP) chosen for this sparsity, a fraction such as 0.9",
    )
    p_final.add_argument(
        "--recalibrate-bn",
        type=_count,
        default=0,
        metavar="N",
        help="then set the batch norms' running statistics from N training batches (for LTP: its soft "
        "mask in training left them off for the hard-masked network)",
    )
    p_final.add_argument(
        "--data-root", help="--recalibrate-bn: where the data set is (default: the config's)"
    )

    p_export = sub.add_parser(
        "export",
        help="write a checkpoint's finalized model as safetensors (torchvision names) or as an ONNX graph",
    )
    p_export.add_argument("checkpoint", metavar="CHECKPOINT", help="a trained or finalized .npz checkpoint")
    p_export.add_argument(
        "-o", "--output", required=True, metavar="OUT.safetensors|OUT.onnx",
        help="the output file; its suffix picks the format (no suffix: safetensors)",
    )  # fmt: skip
    p_export.add_argument(
        "--format", choices=("onnx", "safetensors"), default=None, help="the format, whatever the suffix"
    )
    p_export.add_argument(
        "--csr",
        action="store_true",
        help="store conv and fc weights in compressed sparse row form (safetensors)",
    )
    p_export.add_argument(
        "--fold-bn", action="store_true", help="fold each batch norm into the conv before it (ONNX)"
    )
    p_export.add_argument("--opset", type=int, default=None, metavar="N", help="the ONNX opset (default 17)")
    _add_compare_parser(sub)
    return parser


def _add_compare_parser(sub: Any) -> None:
    from reference.compare import METHODS

    p = sub.add_parser(
        "compare",
        help="every method side by side over sparsity targets and seeds: tables and figures (resumable)",
        description="Train dense, STR, LTP, SCP, magnitude and GMP runs over targets and seeds in SWEEP_DIR "
        "(run again to continue a stopped sweep), then write compare.md/.csv/.json and figures. "
        "Model, data and training settings are given as for train.",
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="directory of the sweep: one run directory per run")
    p.add_argument(
        "--targets", type=_float_list, metavar="T1,T2,...", help="sparsity targets, fractions such as 0.5,0.9"
    )
    p.add_argument("--seeds", type=_int_list, default=[0], metavar="S1,S2,...", help="seeds (default: 0)")
    p.add_argument(
        "--methods",
        type=_name_list,
        default=list(METHODS),
        metavar="M1,M2,...",
        help=f"methods to run (default: all of {','.join(METHODS)})",
    )
    p.add_argument(
        "--scp-lambdas",
        type=_float_list,
        default=[0.008],
        metavar="L1,L2,...",
        help="SCP's regularization strengths: one SCP run per value and seed (default: 0.008)",
    )
    p.add_argument(
        "--budget-target", type=float, metavar="T", help="target of layer_budgets.png (default: nearest 0.9)"
    )
    p.add_argument("--out", metavar="DIR", help="where the tables and figures go (default: SWEEP_DIR)")
    p.add_argument("--no-plots", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument(
        "--config", metavar="FILE.toml", help="read model, data and training settings from a TOML file"
    )
    _add_config_flags(p)


# ---------------------------------------------------------------------------
# Subcommands


def _cmd_train(args: argparse.Namespace) -> int:
    from reference.checkpoint import load_checkpoint
    from reference.distributed import world
    from reference.runtime import keep_freed_memory
    from reference.train import train

    keep_freed_memory()

    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)
    }
    if args.quiet:
        overrides["progress"] = False
    base = None
    resume = None
    if args.resume is not None:
        resume = load_checkpoint(args.resume)
        base = {k: v for k, v in resume.config.items() if k != "progress"}
        try:
            TrainConfig.from_dict(base)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {args.resume!r} holds an unusable config: {exc}") from None
    config = resolve_config(args.config, overrides, base=base)
    if resume is not None and config.epochs < resume.epoch:
        raise ConfigError(
            f"--epochs {config.epochs} is fewer than the {resume.epoch} epochs checkpoint {args.resume!r} "
            f"has already trained; give --epochs {resume.epoch} or more to continue it"
        )
    _check_training_memory(config)
    log = (lambda _msg: None) if args.quiet else _print
    result = train(config, resume=resume, log=log)
    if args.quiet and world().rank == 0:  # one line for the run, from rank 0 of a data-parallel one
        m = result.metrics
        _print(
            f"test accuracy {m['test_acc']:.2%} (best {result.best_acc:.2%} at epoch {result.best_epoch}), "
            f"sparsity {m.get('sparsity', 0.0):.2%}, {result.seconds:.1f}s; run dir {str(result.run_dir)!r}"
        )
    return 0


def _check_training_memory(config: TrainConfig) -> None:
    """Refuse, before anything is built, a run whose model, batch and data cannot fit in memory."""
    from reference.accounting import estimate_memory
    from reference.data import dataset_image_shape, synthetic_bytes
    from reference.memory import require_memory

    shape = dataset_image_shape(config.dataset, config.image_size)
    # The classes of the data set are not known before it is read; the model has at least these.
    classes = config.num_classes or (2 if config.dataset == "imagefolder" else 10)
    need = estimate_memory(config.model, shape, classes, config.width)
    total = need.training_bytes(config.batch_size)
    what = (
        f"training {config.model} with {classes:,} classes on {shape[0]}x{shape[1]}x{shape[2]} images in "
        f"batches of {config.batch_size} ({need.parameters:,} float32 parameters, {need.activations:,} "
        f"layer outputs per image)"
    )
    if config.dataset == "synthetic":
        total += synthetic_bytes(shape, classes, config.train_size, config.test_size)
        what += f" with {config.train_size:,} + {config.test_size:,} synthetic images"
    require_memory(total, what)


def _cmd_compare(args: argparse.Namespace) -> int:
    from reference.compare import SweepSpec, check_base_settings, run_sweep
    from reference.config import load_toml
    from reference.runtime import keep_freed_memory

    keep_freed_memory()
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)
    }
    check_base_settings(overrides, "the flags")
    if args.config is not None:
        check_base_settings(load_toml(args.config), f"config file {args.config!r}")
    for name in ("run_dir", "progress"):
        if name in overrides:
            raise ConfigError(
                f"compare: --{name.replace('_', '-')} is not used: each run has its directory under "
                "SWEEP_DIR/runs, and runs show no progress bar"
            )
    base = resolve_config(args.config, overrides)
    if args.targets is None:
        raise ConfigError("compare needs --targets, fractions of zero weights such as --targets 0.5,0.8,0.9")
    spec = SweepSpec(
        base,
        tuple(args.targets),
        tuple(args.seeds),
        tuple(args.methods),
        tuple(args.scp_lambdas),
        args.budget_target,
    )
    _check_training_memory(base)
    command = _compare_command(args, overrides)
    run_sweep(args.sweep_dir, spec, log=_print, out=args.out, plots=not args.no_plots, command=command)
    return 0


def _compare_command(args: argparse.Namespace, overrides: dict[str, Any]) -> str:
    """The compare command line these arguments spell, for the sweep's tables."""
    import shlex

    def join(values: Sequence[Any]) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    words = [PROG, "compare", args.sweep_dir, "--targets", join(args.targets), "--seeds", join(args.seeds)]
    words += ["--methods", join(args.methods), "--scp-lambdas", join(args.scp_lambdas)]
    if args.budget_target is not None:
        words += ["--budget-target", f"{args.budget_target:g}"]
    if args.config is not None:
        words += ["--config", args.config]
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            words += [flag, join(value) if isinstance(value, (list, tuple)) else str(value)]
    if args.out is not None:
        words += ["--out", args.out]
    return shlex.join(words)


def _cmd_eval(args: argparse.Namespace) -> int:
    from reference.finalize import load_model_from_checkpoint
    from reference.train import build_data, evaluate_batches

    ckpt = _finite_checkpoint(args.checkpoint)
    where = str(ckpt.path)
    try:
        config = TrainConfig.from_checkpoint(ckpt.config, source=f"checkpoint {where!r} config")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {where!r} holds an unusable config: {exc}") from None
    if args.data_root is not None:
        config = config.replace(data_root=args.data_root)
    batch_size = config.eval_batch_size if args.batch_size is None else args.batch_size
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size}")
    data = build_data(config)
    model = load_model_from_checkpoint(ckpt, data=data).model
    loss, acc = evaluate_batches(model, data.test_batches(batch_size))
    _print(f"checkpoint {where!r}: {config.model} on {config.dataset}, {ckpt.epoch} epochs trained")
    _print(f"test loss {loss:.4f}, accuracy {acc:.2%} ({data.num_test} images)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from reference.accounting import summarize

    _check_model_flags(args, ("input_size", "num_classes", "in_channels"))
    if not args.width > 0:
        raise ConfigError(f"--width must be a positive number, got {args.width}")
    _print(
        summarize(
            args.model,
            input_size=args.input_size,
            num_classes=args.num_classes,
            in_channels=args.in_channels,
            width=args.width,
        )
    )
    return 0


def _check_model_flags(args: argparse.Namespace, sizes: tuple[str, ...]) -> None:
    """A known ``--model`` / MODEL and positive integers in the flags named by ``sizes``."""
    from reference.models import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {args.model!r}; expected one of: {', '.join(MODEL_NAMES)}")
    for name in sizes:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.budget is not None:
        if args.checkpoint is not None or args.out is not None:
            raise ConfigError("report: give either CHECKPOINT [--out DIR] or --budget FILE.csv --model MODEL")
        return _report_budget(args)
    if args.checkpoint is None:
        raise ConfigError("report: give a CHECKPOINT, or --budget FILE.csv --model MODEL")
    stray = [f for f in ("model", "column", "input_size", "num_classes") if getattr(args, f) is not None]
    if stray:
        flags = ", ".join("--" + f.replace("_", "-") for f in stray)
        raise ConfigError(f"report: {flags} only go with --budget")
    from reference.report import write_report

    _finite_checkpoint(args.checkpoint)
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out is not None else checkpoint.parent / f"report-{checkpoint.stem}"
    result = write_report(checkpoint, out, plots=not args.no_plots)
    _print(result.text)
    for note in result.notes:
        _print(f"note: {note}")
    _print(f"wrote {', '.join(p.name for p in result.paths)} to {str(out)!r}")
    return 0


def _report_budget(args: argparse.Namespace) -> int:
    from reference.build import budget_from_checkpoint
    from reference.sparsity.budgets import cost_budget_report

    if args.model is None:
        raise ConfigError("report --budget needs --model MODEL (the model to cost the budget on)")
    _check_model_flags(args, ("input_size", "num_classes"))
    report = cost_budget_report(
        args.model,
        args.budget,
        args.column,
        args.input_size,
        args.num_classes,
        measure_checkpoint=budget_from_checkpoint,
    )
    _print(report)
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from reference.finalize import finalize_checkpoint

    _finite_checkpoint(args.checkpoint)
    path, summary = finalize_checkpoint(
        args.checkpoint,
        args.output,
        trail_sparsity=args.trail_sparsity,
        recalibrate_bn=args.recalibrate_bn,
        data_root=args.data_root,
    )
    compression = f"{summary.weights / summary.nonzeros:.2f}x" if summary.nonzeros else "infinite"
    done = []
    if summary.layers:
        done.append(f"{len(summary.layers)} layers now hold their effective weights")
    if summary.recalibrated_bn_batches:
        done.append(f"batch norms recalibrated on {summary.recalibrated_bn_batches} training batches")
    if summary.slimmed and isinstance(summary.slim, dict):
        before, after = summary.slim.get("channels_before", 0), summary.slim.get("channels_after", 0)
        done.append(f"masked channels {before:,} -> {after:,}, removed from the network")
    _print(
        f"finalized ({'; '.join(done) or 'nothing to change: the model was already plain'}): "
        f"sparsity {summary.sparsity:.2%} of {summary.weights:,} conv+fc weights (compression {compression}); "
        f"wrote {str(path)!r}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from reference.export import export_model, export_options
    from reference.files import refuse_overwriting_inputs
    from reference.finalize import load_model_from_checkpoint

    refuse_overwriting_inputs(args.output, [args.checkpoint], "export")
    _, opset = export_options(  # a bad suffix, format or option is reported before any loading
        args.output, args.format, csr=args.csr, fold_bn=args.fold_bn, opset=args.opset
    )
    restored = load_model_from_checkpoint(_finite_checkpoint(args.checkpoint))
    path, fmt = export_model(
        restored, args.output, args.format, csr=args.csr, fold_bn=args.fold_bn, opset=args.opset
    )
    size = f"{path.stat().st_size:,} bytes"
    if fmt == "onnx":
        folded = ", batch norm folded" if args.fold_bn else ""
        _print(f"wrote {str(path)!r} (ONNX, opset {opset}{folded}, dynamic batch axis, {size})")
    else:
        form = "CSR conv/fc weights" if args.csr else "dense weights"
        _print(f"wrote {str(path)!r} ({form}, torchvision names, {size})")
    return 0


def _finite_checkpoint(path: str) -> Any:
    """The checkpoint at ``path``, loaded; CheckpointError when it holds a NaN or an infinity."""
    from reference.checkpoint import check_finite, load_checkpoint

    return check_finite(load_checkpoint(path))


def _print(message: str) -> None:
    print(message, flush=True)


_COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "info": _cmd_info,
    "report": _cmd_report,
    "finalize": _cmd_finalize,
    "export": _cmd_export,
    "compare": _cmd_compare,
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds (locks, files) as Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
        _check_paths(args)
        threads()  # a bad LEARNSPARSE_THREADS is refused here, before anything is written
        return _COMMANDS[args.command](args)
    except (LearnsparseError, _UsageError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        return _failed(f"error: {message}", 2, exc)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except MemoryError as exc:  # a size the up-front estimates let through
        message = " ".join(str(exc).split()) or "an allocation failed"
        return _failed(f"error: out of memory: {message}", 2, exc)
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143)
        terminated = isinstance(exc, _Terminated)
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM if terminated else 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a failure nobody foresaw: on one of several ranks, stop them all
        from reference.distributed import current

        if current().size == 1:
            raise
        traceback.print_exc()
        return _failed(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", 1, exc)


def _failed(message: str, code: int, exc: BaseException) -> int:
    """Print ``message`` and return ``code``; one of several ranks follows the data-parallel failure
    protocol (:func:`reference.distributed.report_failure`): one line, naming the rank, and every rank
    stops."""
    from reference.distributed import current, report_failure

    return report_failure(current(), PROG, message, code, on_every_rank=getattr(exc, "on_every_rank", False))


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's final flush of output
    the closed pipe did not take raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
