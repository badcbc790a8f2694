"""Everything a run is built from, given its config: data, model, sparsity method, budget.

Training (:mod:`reference.train`) and the commands that rebuild a model from a
checkpoint (:mod:`reference.finalize` and the reports and exports on top of
it) both start here, so the model of a checkpoint is always built the way it
was trained.

A budget (per-layer final sparsities for magnitude pruning and GMP: budget
transfer, :mod:`reference.sparsity.budgets`) comes from a CSV file or from a
trained checkpoint of any method. Reading one from a checkpoint means
rebuilding that checkpoint's model, so it is done here, at the level that
builds models, and the method receives the budget as a plain
``{layer: sparsity}`` dict.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from reference.autodiff import no_grad
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.data import load_dataset
from reference.errors import CheckpointError, ConfigError
from reference.models import build_model
from reference.nn import weight_layers
from reference.sparsity import Dense, build_method
from reference.sparsity import budgets as _budgets

__all__ = [
    "budget_from_checkpoint",
    "build_data",
    "build_model_and_method",
    "build_model_for",
    "load_budget",
    "param_groups",
    "stored_budget",
]


def build_data(config: TrainConfig, *, data_root: str | None = None):
    """The data set named by ``config`` (``data_root`` overrides ``config.data_root``)."""
    size = config.image_size
    return load_dataset(
        config.dataset,
        root=data_root if data_root is not None else config.data_root,
        seed=config.seed,
        image_shape=(3, size, size),
        num_classes=config.num_classes if config.num_classes is not None else 10,
        train_size=config.train_size,
        test_size=config.test_size,
        workers=config.workers,
    )


def _num_classes(config: TrainConfig, data) -> int:
    if config.num_classes is None:
        return int(data.num_classes)
    if config.num_classes < data.num_classes:
        raise ConfigError(
            f"num_classes must be at least {data.num_classes} (the classes of data set "
            f"{config.dataset!r}), got {config.num_classes}"
        )
    return config.num_classes


def build_model_for(config: TrainConfig, data):
    """The model named by ``config``, sized for ``data``, initialised from ``config.seed``,
    with its sparsity method installed (so a sparse checkpoint loads into it)."""
    return build_model_and_method(config, data)[0]


def build_model_and_method(config: TrainConfig, data, budget: dict[str, float] | None = None):
    """``(model, method)``: :func:`build_model_for` and the method it installed.

    A budget file in the config (magnitude pruning and GMP) is read here,
    before the method is built (:func:`load_budget`), unless ``budget`` is
    that budget already read: the copy a trained checkpoint holds, so that a
    checkpoint loads without the file it was trained from.
    """
    model = build_model(
        config.model,
        num_classes=_num_classes(config, data),
        in_channels=int(data.x_train.shape[1]),
        width=config.width,
        rng=np.random.default_rng([config.seed, 1 << 20]),
        dtype=np.float32,
    )
    if config.budget is None:
        budget = None
    elif budget is None:
        budget = load_budget(config.budget, config.budget_column)
    method = build_method(config, budget=budget)
    method.attach(model)
    return model, method


def param_groups(model, config: TrainConfig, method=None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, as the sparsity method splits them.

    Dense training has one group with the configured weight decay on every
    parameter; methods split it (thresholds decayed differently, no decay on a
    BN shift). The group names are stored in checkpoints.
    """
    return (method or Dense()).param_groups(model, config)


# ---------------------------------------------------------------------------
# Budgets


def stored_budget(ckpt) -> dict[str, float] | None:
    """The budget a trained checkpoint holds as its run read it (magnitude pruning and GMP with a
    budget; None for others, and for checkpoints written before runs kept it)."""
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    budget = extra.get("budget")
    return None if budget is None else {str(k): float(v) for k, v in budget.items()}


def budget_from_checkpoint(path: str | Path, *, data_root: str | None = None) -> dict[str, float]:
    """``{layer: sparsity}`` measured on a trained checkpoint of any method.

    The model (and its sparsity method) is rebuilt from the checkpoint's
    config, the state is loaded, and each weight layer's effective weight is
    read in evaluation mode; its sparsity is ``zeros / size``. Building the
    model needs the run's data set (for its image and class counts):
    ``data_root`` overrides the config's, for data sets read from files. A
    layer that is entirely zero is reported as 1.0, which
    :func:`~reference.sparsity.budgets.check_budget` rejects.
    """
    ckpt = load_checkpoint(path)
    where = str(ckpt.path)
    try:
        config = TrainConfig.from_checkpoint(ckpt.config, source=f"checkpoint {where!r} config")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {where!r} holds an unusable config: {exc}") from None
    data = build_data(config, data_root=data_root)
    model, _ = build_model_and_method(config, data, budget=stored_budget(ckpt))
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {where!r} does not fit model {config.model!r}: {exc}") from None
    model.eval()
    budget: dict[str, float] = {}
    with no_grad():
        for name, layer in weight_layers(model):
            w = layer.effective_weight().numpy()
            budget[name] = float(w.size - np.count_nonzero(w)) / w.size
    return budget


def load_budget(
    path: str | Path, column: str | None = None, *, data_root: str | None = None
) -> dict[str, float]:
    """A budget from a budget CSV or a trained checkpoint (:func:`budget_from_checkpoint`).

    The kind is told by the file's contents (checkpoints are .npz archives);
    ``column`` applies to CSV files only
    (:func:`~reference.sparsity.budgets.read_budget_file`).
    """
    measure = partial(budget_from_checkpoint, data_root=data_root)
    return _budgets.read_budget_file(path, column, measure_checkpoint=measure)
