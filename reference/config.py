"""The training configuration: one frozen object, passed explicitly.

A :class:`TrainConfig` holds every setting of a training run. It is built in
layers, each overriding the one before::

    defaults  <  TOML file (--config FILE.toml)  <  command-line flags

and checked as a whole when it is constructed, so a ``TrainConfig`` that
exists is a valid one. Problems raise :class:`~reference.errors.ConfigError`
naming the offending value and what was expected.

The defaults are the quickstart: the small CNN on the 8x8 digits, which
reaches about 99 % test accuracy (at least 98.5 % over seeds 0-4) in a few
seconds on a laptop CPU.

A TOML file holds the same keys as the dataclass fields, at the top level::

    model = "resnet20"
    dataset = "synthetic"
    epochs = 30
    lr = 0.1
    schedule = "step"
    milestones = [15, 25]
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reference.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["FIELD_HELP", "TrainConfig", "check_path", "field_kind", "load_toml", "resolve_config"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (see :data:`FIELD_HELP`)."""

    # what to train, on what
    model: str = "digits_cnn"
    dataset: str = "digits"
    data_root: str | None = None
    num_classes: int | None = None
    width: float = 1.0
    image_size: int = 32
    train_size: int = 2048
    test_size: int = 512
    # how long, how fast
    epochs: int = 15
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    per_step: bool = False
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    # sparsity (see reference.sparsity)
    method: str = "dense"
    target_sparsity: float | None = None
    threshold_decay: float | None = None
    str_s_init: float = -5.0
    str_per_channel: bool = False
    ltp_lambda: float = 1e-5
    ltp_t0: float = 1.0
    ltp_tau_init: float = 0.0
    ltp_exact_grad: bool = True
    ltp_l0_weight_grad: bool = True
    scp_lambda: float = 5e-5
    scp_eps: float = 0.05
    scp_k: float = 20.0
    scp_c0: float = 0.95
    scp_t: float = 0.5
    scp_s: float = 2.0
    prune_scope: str = "uniform"
    prune_start_epoch: int = 0
    prune_end_epoch: int | None = None
    prune_frequency: int = 50
    budget: str | None = None
    budget_column: str | None = None
    # reproducibility and output
    seed: int = 0
    augment: bool = False
    workers: int = 0
    sync_bn: bool = False
    device: str = "cpu"
    precision: str = "tf32"
    run_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        _validate(self)

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON/TOML-friendly values (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from a mapping of field names; missing ones take the defaults.

        ``source`` names where the mapping came from, for error messages.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a table of settings, got {type(values).__name__}")
        _check_keys(values, source)
        return cls(**dict(values))

    @classmethod
    def from_checkpoint(cls, values: Mapping[str, Any], *, source: str = "checkpoint config") -> TrainConfig:
        """:meth:`from_dict` for a config saved in a checkpoint.

        Earlier versions accepted settings that the run ignored (a ``target_sparsity`` for dense
        and SCP, which finalized checkpoints also kept; a ``data_root`` for a bundled or generated
        data set). They changed nothing then, so they are dropped here instead of making the
        checkpoint unreadable.
        """
        if isinstance(values, Mapping):
            values = dict(values)
            if values.get("method", "dense") in _NO_TARGET_METHODS:
                values["target_sparsity"] = None
            if values.get("dataset", "digits") in _BUILTIN_DATASETS:
                values["data_root"] = None
        return cls.from_dict(values, source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated like a new config)."""
        _check_keys(changes, "replace()")
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        """The settings as a TOML document that :func:`load_toml` reads back.

        Fields that are ``None`` (TOML has no null) are written as comments.
        """
        lines = []
        for name, value in self.to_dict().items():
            if value is None:
                lines.append(f"# {name} = (not set)")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


FIELD_HELP: dict[str, str] = {
    "model": "model name (see `learnsparse info`)",
    "dataset": "data set name",
    "data_root": "directory holding the data set files, for cifar10 and imagefolder (default: none)",
    "num_classes": "number of classes (default: taken from the data set)",
    "width": "channel width multiplier of the model",
    "image_size": "side of the square images of the synthetic and imagefolder data sets",
    "train_size": "training images of the synthetic data set",
    "test_size": "test images of the synthetic data set",
    "epochs": "number of training epochs",
    "batch_size": "training batch size",
    "eval_batch_size": "batch size for evaluation",
    "lr": "base learning rate",
    "momentum": "SGD momentum",
    "nesterov": "use Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "label_smoothing": "label smoothing in [0, 1)",
    "schedule": "learning-rate schedule name",
    "warmup_epochs": "epochs of linear warm-up",
    "per_step": "update the learning rate every step instead of every epoch",
    "milestones": "epochs at which the step schedule multiplies the lr by gamma",
    "gamma": "factor of the step schedule",
    "method": "sparsity method: dense, str, ltp, scp, magnitude or gmp",
    "target_sparsity": "requested fraction of zero conv+fc weights in [0, 1) (default: none; STR and LTP"
    " then reach what their hyperparameters give)",
    "threshold_decay": "weight decay on STR/LTP thresholds (default: the weight_decay)",
    "str_s_init": "STR: initial threshold parameter s (threshold = sigmoid(s))",
    "str_per_channel": "STR: one threshold per output channel instead of per layer",
    "ltp_lambda": "LTP: weight of the differentiable L0 term",
    "ltp_t0": "LTP: temperature factor, T = t0 * var(|W|) per layer",
    "ltp_tau_init": "LTP: initial threshold on the squared weight",
    "ltp_exact_grad": "LTP: exact weight gradient (false: the paper's approximation dW_eff/dW = mask)",
    "ltp_l0_weight_grad": "LTP: let the L0 term send a gradient to the weights too",
    "scp_lambda": "SCP: weight of the channel regularizer sum(beta + s |gamma|)",
    "scp_eps": "SCP: activation level below which a channel counts as off",
    "scp_k": "SCP: sharpness k of the keep/prune logit",
    "scp_c0": "SCP: probability threshold c0 above which a channel is pruned",
    "scp_t": "SCP: temperature t of the logistic relaxation",
    "scp_s": "SCP: weight s of |gamma| in the regularizer",
    "prune_scope": "magnitude/GMP: uniform (same sparsity per layer) or global (one threshold)",
    "prune_start_epoch": "magnitude/GMP: epoch at which pruning starts",
    "prune_end_epoch": "magnitude/GMP: epoch by which the final sparsity is reached (default: 3/4 of the"
    " epochs; equal to prune_start_epoch for one-shot pruning)",
    "prune_frequency": "magnitude/GMP: steps between mask updates",
    "budget": "magnitude/GMP: per-layer sparsities from a budget CSV or a trained STR/LTP checkpoint",
    "budget_column": "column of a budget CSV with several budgets (default: the only one)",
    "seed": "random seed (model initialisation, data order, augmentation)",
    "augment": "use the data set's training augmentation",
    "workers": "processes decoding imagefolder batches (0: in the training process)",
    "sync_bn": "with several processes (mpiexec -n N): batch norm over the global batch, its statistics"
    " summed over the processes (default: each process normalises its own shard)",
    "device": "cpu (NumPy) or cuda (CuPy on an NVIDIA GPU; pip install 'learnsparse[cuda]')",
    "precision": "cuda GEMMs: tf32 (float32 with TF32 products), fp32, or bf16 (bfloat16 products, float32"
    " weights)",
    "run_dir": "directory for the config, metrics and checkpoints (default: runs/<model>-<dataset>-<time>)",
    "progress": "show a progress bar over the batches",
}

# ---------------------------------------------------------------------------
# Field kinds. Each field accepts exactly one kind of value (plus None where
# the default is None); ints are accepted for float fields, never bools.

_INT_FIELDS = {
    "num_classes", "image_size", "train_size", "test_size", "epochs", "batch_size",
    "eval_batch_size", "warmup_epochs", "seed", "prune_start_epoch", "prune_end_epoch", "prune_frequency",
    "workers",
}  # fmt: skip
_FLOAT_FIELDS = {
    "width", "lr", "momentum", "weight_decay", "label_smoothing", "gamma", "target_sparsity",
    "threshold_decay", "str_s_init", "ltp_lambda", "ltp_t0", "ltp_tau_init", "scp_lambda", "scp_eps",
    "scp_k", "scp_c0", "scp_t", "scp_s",
}  # fmt: skip
_BOOL_FIELDS = {"nesterov", "per_step", "augment", "progress", "str_per_channel", "ltp_exact_grad",
                "ltp_l0_weight_grad", "sync_bn"}  # fmt: skip
_STR_FIELDS = {"model", "dataset", "data_root", "schedule", "run_dir", "method", "prune_scope", "budget",
               "budget_column", "device", "precision"}  # fmt: skip
_OPTIONAL_FIELDS = {"data_root", "num_classes", "run_dir", "target_sparsity", "threshold_decay",
                    "prune_end_epoch", "budget", "budget_column"}  # fmt: skip
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_BUILTIN_DATASETS = ("digits", "digits32", "synthetic")  # generated or bundled: no data_root needed
_NO_TARGET_METHODS = ("dense", "scp")  # target_sparsity would be ignored: refuse it
_PATH_FIELDS = ("data_root", "run_dir", "budget")
_NAME_MAX = 255  # bytes in one path component on the common file systems (ext4, XFS, APFS, NTFS)


def field_kind(name: str) -> str:
    """The kind of value field ``name`` holds: "int", "float", "bool", "str" or "int_list"."""
    if name not in _FIELD_NAMES:
        raise ConfigError(f"unknown setting {name!r}; valid settings are: {', '.join(_FIELD_NAMES)}")
    for kind, names in (
        ("int", _INT_FIELDS),
        ("float", _FLOAT_FIELDS),
        ("bool", _BOOL_FIELDS),
        ("str", _STR_FIELDS),
    ):
        if name in names:
            return kind
    return "int_list"


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    unknown = sorted(str(k) for k in values if k not in _FIELD_NAMES)
    if unknown:
        noun = "setting" if len(unknown) == 1 else "settings"
        raise ConfigError(
            f"{source}: unknown {noun} {', '.join(repr(k) for k in unknown)}; "
            f"valid settings are: {', '.join(_FIELD_NAMES)}"
        )


def _kind(name: str) -> str:
    if name in _INT_FIELDS:
        return "an integer"
    if name in _FLOAT_FIELDS:
        return "a number"
    if name in _BOOL_FIELDS:
        return "true or false"
    if name in _STR_FIELDS:
        return "a string"
    return "a list of integers"


def _coerce(name: str, value: Any) -> Any:
    """``value`` in the canonical type of field ``name``, or a ConfigError."""
    if value is None and name in _OPTIONAL_FIELDS:
        return None
    bad = ConfigError(f"{name} must be {_kind(name)}, got {value!r} ({type(value).__name__})")
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise bad
        return value
    # milestones
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise bad
    items = tuple(value)
    if any(isinstance(m, bool) or not isinstance(m, int) for m in items):
        raise bad
    return tuple(int(m) for m in items)


def _validate_sparsity(cfg: TrainConfig, need) -> None:
    """The sparsity settings (only range checks; methods check how they combine)."""
    from reference.sparsity import METHOD_NAMES

    if cfg.method not in METHOD_NAMES:
        raise ConfigError(f"unknown method {cfg.method!r}; expected one of: {', '.join(METHOD_NAMES)}")
    need(
        cfg.target_sparsity is None or 0.0 <= cfg.target_sparsity < 1.0,
        "target_sparsity",
        "in [0, 1) (a fraction: 0.9 means 90 % of the weights are zero)",
    )
    need(cfg.threshold_decay is None or cfg.threshold_decay >= 0, "threshold_decay", "a non-negative number")
    need(cfg.ltp_lambda >= 0, "ltp_lambda", "a non-negative number")
    need(cfg.ltp_t0 > 0, "ltp_t0", "a positive temperature factor")
    need(cfg.scp_lambda >= 0, "scp_lambda", "a non-negative number")
    need(cfg.scp_eps >= 0, "scp_eps", "a non-negative number")
    need(cfg.scp_k > 0, "scp_k", "a positive number")
    need(0.0 < cfg.scp_c0 < 1.0, "scp_c0", "in (0, 1)")
    need(cfg.scp_t > 0, "scp_t", "a positive temperature")
    need(cfg.scp_s >= 0, "scp_s", "a non-negative number")
    need(cfg.prune_scope in ("uniform", "global"), "prune_scope", "'uniform' or 'global'")
    need(0 <= cfg.prune_start_epoch < cfg.epochs, "prune_start_epoch", f"in [0, epochs) = [0, {cfg.epochs})")
    need(
        cfg.prune_end_epoch is None or cfg.prune_start_epoch <= cfg.prune_end_epoch <= cfg.epochs,
        "prune_end_epoch",
        f"between prune_start_epoch ({cfg.prune_start_epoch}) and epochs ({cfg.epochs}), or unset",
    )
    need(cfg.prune_frequency > 0, "prune_frequency", "a positive number of steps")
    need(
        cfg.target_sparsity is None or cfg.method not in _NO_TARGET_METHODS,
        "target_sparsity",
        f"unset for method {cfg.method!r}, which does not steer weight sparsity (it is used by "
        f"str, ltp, magnitude and gmp)",
    )
    if cfg.method in ("magnitude", "gmp"):
        need(
            cfg.target_sparsity is not None or cfg.budget is not None,
            "target_sparsity",
            f"set (or a budget file) for method {cfg.method!r}",
        )


def _validate(cfg: TrainConfig) -> None:
    """Range checks and name look-ups; raises ConfigError on the first problem."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{name} must be {expected}, got {getattr(cfg, name)!r}")

    for name in ("epochs", "batch_size", "eval_batch_size", "train_size", "test_size", "image_size"):
        need(getattr(cfg, name) > 0, name, "a positive integer")
    need(cfg.lr > 0, "lr", "a positive number")
    need(cfg.width > 0, "width", "a positive number")
    need(0.0 <= cfg.momentum < 1.0, "momentum", "in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "a non-negative number")
    need(0.0 <= cfg.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
    need(cfg.gamma > 0, "gamma", "a positive number")
    need(0 <= cfg.warmup_epochs <= cfg.epochs, "warmup_epochs", f"between 0 and epochs ({cfg.epochs})")
    need(cfg.seed >= 0, "seed", "a non-negative integer")
    need(cfg.workers >= 0, "workers", "a non-negative integer (0: decode in the training process)")
    need(cfg.device in ("cpu", "cuda"), "device", "'cpu' or 'cuda'")
    need(cfg.precision in ("tf32", "fp32", "bf16"), "precision", "one of 'tf32', 'fp32', 'bf16'")
    need(cfg.num_classes is None or cfg.num_classes >= 2, "num_classes", "at least 2 (or unset)")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", "false when momentum is 0")
    need(
        all(m > 0 for m in cfg.milestones) and list(cfg.milestones) == sorted(set(cfg.milestones)),
        "milestones",
        "strictly increasing positive epochs",
    )
    need(cfg.run_dir is None or cfg.run_dir.strip() != "", "run_dir", "a directory path (or unset)")
    need(cfg.data_root is None or cfg.data_root.strip() != "", "data_root", "a directory path (or unset)")
    for name in _PATH_FIELDS:
        check_path(getattr(cfg, name), name)
    _validate_sparsity(cfg, need)

    from reference.data import DATASET_NAMES
    from reference.models import MODEL_NAMES
    from reference.schedules import SCHEDULE_NAMES

    for name, valid in (("model", MODEL_NAMES), ("dataset", DATASET_NAMES), ("schedule", SCHEDULE_NAMES)):
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}; expected one of: {', '.join(valid)}")
    if cfg.dataset in _BUILTIN_DATASETS and cfg.data_root is not None:
        where = "generated from the seed" if cfg.dataset == "synthetic" else "bundled with the library"
        raise ConfigError(
            f"data_root is not used by dataset {cfg.dataset!r} ({where}), got {cfg.data_root!r}; leave it unset"
        )
    if cfg.dataset not in _BUILTIN_DATASETS and cfg.data_root is None:
        raise ConfigError(
            f"dataset {cfg.dataset!r} needs data_root (--data-root DIR): the directory holding its files"
        )
    schedule_of(cfg)  # the schedule checks how its options fit together (milestones inside the run, ...)


def schedule_of(cfg: TrainConfig):
    """The learning-rate schedule ``cfg`` describes (:func:`reference.schedules.build_schedule`)."""
    from reference.schedules import build_schedule

    return build_schedule(
        cfg.schedule,
        cfg.lr,
        cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        per_step=cfg.per_step,
        milestones=cfg.milestones,
        gamma=cfg.gamma,
    )


def check_path(path: str | None, what: str) -> None:
    """Refuse a path that no file can have: one that is not valid UTF-8 text (undecodable bytes
    on the command line arrive as lone surrogates) or has a component longer than a file
    name may be. ``what`` names the setting or flag in the message."""
    if path is None:
        return
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} must be a path of valid UTF-8 characters, got {path!r}") from None
    for sep in {os.sep, os.altsep or os.sep} - {"/"}:
        path = path.replace(sep, "/")
    for part in path.split("/"):
        if len(part.encode("utf-8")) > _NAME_MAX:
            raise ConfigError(
                f"{what} has a path component of {len(part.encode('utf-8'))} bytes ({part[:24]!r}...), "
                f"longer than the {_NAME_MAX} bytes a file or directory name may have"
            )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


# ---------------------------------------------------------------------------
# Reading files and merging layers


def load_toml(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, checked against the known field names and kinds.

    Returns only the keys present in the file (a layer to merge, see
    :func:`resolve_config`). A ``[train]`` table may hold the settings instead of
    the top level.
    """
    check_path(str(path), "config file")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, expected a .toml file")
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text, as a TOML file must be: byte "
            f"{exc.object[exc.start]:#04x} at offset {exc.start} ({exc.reason})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if set(values) == {"train"} and isinstance(values["train"], dict):
        values = values["train"]
    _check_keys(values, f"config file {str(path)!r}")
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = _coerce(name, value)
        except ConfigError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    return checked


def resolve_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: TrainConfig | Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Merge the layers ``base`` (default: the defaults) < ``config_file`` < ``overrides``."""
    if base is None:
        values: dict[str, Any] = {}
    elif isinstance(base, TrainConfig):
        values = base.to_dict()
    else:
        _check_keys(base, "base config")
        values = dict(base)
    if config_file is not None:
        values.update(load_toml(config_file))
    if overrides:
        _check_keys(overrides, "overrides")
        values.update(overrides)
    return TrainConfig.from_dict(values)
