"""The ``learnsparse`` command line.

Subcommands::

    learnsparse train [--config FILE.toml] [--resume CKPT] [--run-dir DIR] [--quiet] [--<setting> VALUE ...]
    learnsparse eval CHECKPOINT [--data-root DIR] [--batch-size N]
    learnsparse info MODEL [--input-size N] [--num-classes N] [--width W] [--in-channels C]
    learnsparse report CHECKPOINT [--out DIR] [--no-plots]
    learnsparse report --budget FILE.csv --model MODEL [--column NAME] [--input-size N] [--num-classes N]
    learnsparse finalize CHECKPOINT -o OUT.npz [--trail-sparsity X]
    learnsparse export CHECKPOINT -o OUT.safetensors [--csr]

Every setting of :class:`reference.config.TrainConfig` is a flag of ``train``
(``batch_size`` is ``--batch-size``; true/false settings come as
``--augment`` / ``--no-augment``). Settings are merged as defaults < the
checkpoint's config (with ``--resume``) < ``--config`` file < flags.

Any problem with the input (a :class:`~reference.errors.LearnsparseError` or a
bad flag) prints one line ``learnsparse: error: <message>`` on stderr and exits
with status 2; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from reference.config import FIELD_HELP, TrainConfig, field_kind, resolve_config
from reference.errors import CheckpointError, ConfigError, LearnsparseError

__all__ = ["build_parser", "main"]

PROG = "learnsparse"


class _UsageError(Exception):
    """A command-line syntax problem reported by argparse."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _int_list(text: str) -> list[int]:
    """``"30,60,80"`` -> ``[30, 60, 80]``; an empty string is an empty list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 30,60, got {text!r}"
        ) from None


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

    p_export = sub.add_parser(
        "export", help="write a checkpoint's finalized weights as safetensors with torchvision names"
    )
    p_export.add_argument("checkpoint", metavar="CHECKPOINT", help="a trained or finalized .npz checkpoint")
    p_export.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="the output file")
    p_export.add_argument(
        "--csr", action="store_true", help="store conv and fc weights in compressed sparse row form"
    )
    return parser


# ---------------------------------------------------------------------------
# Subcommands


def _cmd_train(args: argparse.Namespace) -> int:
    from reference.checkpoint import load_checkpoint
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
    log = (lambda _msg: None) if args.quiet else _print
    result = train(config, resume=resume, log=log)
    if args.quiet:
        m = result.metrics
        _print(
            f"test accuracy {m['test_acc']:.2%} (best {result.best_acc:.2%} at epoch {result.best_epoch}), "
            f"sparsity {m.get('sparsity', 0.0):.2%}, {result.seconds:.1f}s; run dir {str(result.run_dir)!r}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from reference.checkpoint import load_checkpoint
    from reference.finalize import load_model_from_checkpoint
    from reference.train import build_data, evaluate_batches

    ckpt = load_checkpoint(args.checkpoint)
    where = str(ckpt.path)
    try:
        config = TrainConfig.from_dict(ckpt.config, source=f"checkpoint {where!r} config")
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

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out is not None else checkpoint.parent / f"report-{checkpoint.stem}"
    result = write_report(checkpoint, out, plots=not args.no_plots)
    _print(result.text)
    for note in result.notes:
        _print(f"note: {note}")
    _print(f"wrote {', '.join(p.name for p in result.paths)} to {str(out)!r}")
    return 0


def _report_budget(args: argparse.Namespace) -> int:
    from reference.sparsity.budgets import cost_budget_report

    if args.model is None:
        raise ConfigError("report --budget needs --model MODEL (the model to cost the budget on)")
    _check_model_flags(args, ("input_size", "num_classes"))
    _print(cost_budget_report(args.model, args.budget, args.column, args.input_size, args.num_classes))
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from reference.finalize import finalize_checkpoint

    path, summary = finalize_checkpoint(args.checkpoint, args.output, trail_sparsity=args.trail_sparsity)
    compression = f"{summary.weights / summary.nonzeros:.2f}x" if summary.nonzeros else "infinite"
    done = []
    if summary.layers:
        done.append(f"{len(summary.layers)} layers now hold their effective weights")
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
    from reference.export import export_safetensors
    from reference.finalize import finalize, has_sparsity_modules, load_model_from_checkpoint

    model = load_model_from_checkpoint(args.checkpoint).model
    if has_sparsity_modules(model):
        finalize(model)
    path = export_safetensors(model, args.output, csr=args.csr)
    form = "CSR conv/fc weights" if args.csr else "dense weights"
    _print(f"wrote {str(path)!r} ({form}, torchvision names, {path.stat().st_size:,} bytes)")
    return 0


def _print(message: str) -> None:
    print(message, flush=True)


_COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "info": _cmd_info,
    "report": _cmd_report,
    "finalize": _cmd_finalize,
    "export": _cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return _COMMANDS[args.command](args)
    except (LearnsparseError, _UsageError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
