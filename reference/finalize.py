"""Finalizing a sparse model into a plain one, and rebuilding a model from any checkpoint.

:func:`finalize` turns a model trained with a sparsity method into the plain
model it stands for, in place::

    model.eval()                                  the weights inference computes with
    for each conv / fc with a sparsifier:
        weight <- effective_weight()              STR: sign(W) max(|W| - g, 0); LTP: W [W^2 > tau];
                                                  masks applied; pruned entries exactly 0
        remove the sparsifier                     its s / tau / mask leave the state dict
    if a batch norm carries a channel mask (SCP):
        reference.sparsity.slimming.slim(model)   delete the masked channels: a smaller model

The result has the state dict names of the plain (torchvision-named) model
and computes the same evaluation outputs as the sparse model did.

A *finalized checkpoint* (:func:`finalize_checkpoint`) is an ordinary
checkpoint whose config says ``method = "dense"`` and whose ``extra`` holds a
``"finalized"`` record::

    {"from_method": "str", "source": "<checkpoint it came from>",
     "slimmed": false, "input_shape": [C, H, W], "num_classes": K,
     "weights": <conv+fc weights>, "nonzeros": <of them nonzero>,
     "trail_sparsity": null, "slim": <what slim() reported, or null>}

``finalize --recalibrate-bn N`` (:func:`recalibrate_batch_norm`) then runs N
training batches through the plain model to replace every batch norm's running
statistics by those of the network as it now is. Methods that train with a
soft mask (LTP) gather their statistics under it, and the hard mask of
evaluation shifts every layer's inputs: measured on MobileNetV1 (digits32,
LTP at 70.8 %), the recalibrated statistics are worth 36 points of test
accuracy. The record then holds ``"recalibrated_bn_batches": N``.

For a slimmed model the saved arrays carry the smaller shapes, and
:func:`load_model_from_checkpoint` rebuilds that architecture with
``reference.sparsity.slimming.slim_to_state`` before loading them. It loads
trained and finalized checkpoints alike, without loading the data set.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from reference.autodiff import Tensor, as_array, no_grad
from reference.build import build_data, build_model_and_method, stored_budget
from reference.checkpoint import Checkpoint, check_finite, first_non_finite, load_checkpoint, save_checkpoint
from reference.config import TrainConfig
from reference.errors import CheckpointError, ConfigError
from reference.files import refuse_overwriting_inputs
from reference.nn import BatchNorm2d, Module, weight_layers

__all__ = [
    "FINALIZED_KEY",
    "FinalizeSummary",
    "RestoredModel",
    "data_shape",
    "finalize",
    "finalize_checkpoint",
    "has_sparsity_modules",
    "load_model_from_checkpoint",
    "recalibrate_batch_norm",
    "recalibration_batches",
]

FINALIZED_KEY = "finalized"
_SPARSITY_CHILDREN = ("sparsifier", "channel_mask")  # sub-modules a finalized model no longer has


# ---------------------------------------------------------------------------
# Finalizing a model


@dataclasses.dataclass
class FinalizeSummary:
    """What :func:`finalize` did."""

    layers: list[str]  # weight layers whose weight was replaced by its effective weight
    weights: int  # conv+fc weights of the finalized model
    nonzeros: int  # of them nonzero
    slimmed: bool  # channels were physically removed (SCP)
    slim: Any = None  # what slimming.slim reported
    # training batches the batch norms were recalibrated on (finalize_checkpoint)
    recalibrated_bn_batches: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of the conv+fc weights that are zero."""
        return 1.0 - self.nonzeros / self.weights if self.weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "weights": self.weights,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "slimmed": self.slimmed,
            "slim": _plain(self.slim),
        }


def _plain(value: Any) -> Any:
    """``value`` as JSON-friendly data (dataclasses and NumPy values converted, the rest as text)."""

    def default(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.asdict(v)
        if hasattr(v, "to_dict"):
            return v.to_dict()
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return str(v)

    return json.loads(json.dumps(value, default=default))


def _leftovers(model: Module) -> list[str]:
    """``<module>.sparsifier`` / ``<module>.channel_mask`` for every such sub-module still installed."""
    return [
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        for child in _SPARSITY_CHILDREN
        if isinstance(getattr(m, child, None), Module)
    ]


def has_sparsity_modules(model: Module) -> bool:
    """Whether any module still carries a sparsifier or a channel mask (i.e. the model is not final)."""
    return bool(_leftovers(model))


def finalize(model: Module) -> FinalizeSummary:
    """Make ``model`` plain in place (see the module docstring) and leave it in evaluation mode."""
    model.eval()
    done: list[str] = []
    with no_grad():
        for name, layer in weight_layers(model):
            if layer.sparsifier is None:
                continue
            w_eff = as_array(layer.effective_weight())
            if tuple(w_eff.shape) != tuple(layer.weight.shape):
                raise ConfigError(
                    f"finalize: {name}'s effective weight has shape {tuple(w_eff.shape)}, "
                    f"its weight {tuple(layer.weight.shape)}"
                )
            # "+ 0.0" turns the -0.0 of pruned negative weights into +0.0 (and makes a copy)
            layer.weight.data[...] = (w_eff + 0.0).astype(layer.weight.dtype, copy=False)
            del layer.sparsifier
            done.append(name)
    slim_summary = None
    slimmed = any(name.endswith("channel_mask") for name in _leftovers(model))
    if slimmed:
        from reference.sparsity.slimming import slim

        slim_summary = slim(model)
        model.eval()
    left = _leftovers(model)
    if left:
        raise ConfigError(f"finalize: sparsity modules remain after finalizing: {', '.join(left)}")
    weights = nonzeros = 0
    for _, layer in weight_layers(model):
        w = layer.weight.numpy()
        weights += int(w.size)
        nonzeros += int(np.count_nonzero(w))
    return FinalizeSummary(done, weights, nonzeros, slimmed, slim_summary)


# ---------------------------------------------------------------------------
# Rebuilding a model from a checkpoint


# data set -> (C, H, W) of its images and its classes, from the config alone
def _dataset_shapes(config: TrainConfig) -> tuple[tuple[int, int, int], int] | None:
    size = config.image_size
    if config.dataset == "imagefolder":  # the classes are its train/ folders: listed, no image read
        from reference.imagefolder import count_classes

        classes = config.num_classes if config.num_classes is not None else count_classes(config.data_root)
        return (3, size, size), classes
    from reference.data import DATASET_NAMES, dataset_image_shape

    if config.dataset in DATASET_NAMES:  # the in-memory data sets: 10 classes, a known image shape
        return dataset_image_shape(config.dataset, size), 10
    return None


def data_shape(config: TrainConfig) -> tuple[tuple[int, int, int], int]:
    """One image's (C, H, W) and the model's class count for a run with ``config``.

    Known data sets answer from the config alone (no data is read); others are
    loaded to find out.
    """
    known = _dataset_shapes(config)
    if known is None:
        data = build_data(config)
        image_shape, classes = tuple(int(d) for d in data.x_train.shape[1:]), int(data.num_classes)
    else:
        image_shape, classes = known
    return image_shape, classes if config.num_classes is None else config.num_classes


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """What model building reads from a data set: the image shape (as ``x_train``) and the classes."""

    x_train: np.ndarray  # (0, C, H, W)
    num_classes: int


@dataclasses.dataclass
class RestoredModel:
    """A model rebuilt from a checkpoint, in evaluation mode."""

    model: Module
    config: TrainConfig  # as saved (method "dense" for a finalized checkpoint)
    checkpoint: Checkpoint
    input_shape: tuple[int, int, int]  # one image's (C, H, W)
    num_classes: int
    finalized: dict[str, Any] | None  # the checkpoint's "finalized" record, None for a trained one

    @property
    def method_name(self) -> str:
        """The sparsity method the weights were trained with."""
        if self.finalized is not None:
            return str(self.finalized.get("from_method", self.config.method))
        return self.config.method


def finalized_record(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The ``"finalized"`` record of a finalized checkpoint, else None."""
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    record = extra.get(FINALIZED_KEY)
    return record if isinstance(record, dict) else None


def load_model_from_checkpoint(ckpt: str | Path | Checkpoint, *, data: Any = None) -> RestoredModel:
    """The model saved in ``ckpt`` (a path or a loaded checkpoint), trained or finalized, in eval mode.

    A trained checkpoint gets its sparsity method installed (its thresholds
    and masks are sub-module parameters and buffers, so they load with the
    model's state); a finalized one is plain, slimmed back to the
    saved shapes where it was slimmed. ``data`` (a loaded data set) fixes the
    input channels and classes; without it they come from :func:`data_shape`.
    Raises CheckpointError when the checkpoint's config is unusable or its
    arrays do not fit the model.
    """

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    where = str(ckpt.path)
    try:
        config = TrainConfig.from_checkpoint(ckpt.config, source=f"checkpoint {where!r} config")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {where!r} holds an unusable config: {exc}") from None
    record = finalized_record(ckpt)
    if data is None:
        if record is not None and "input_shape" in record and "num_classes" in record:
            image_shape = tuple(int(d) for d in record["input_shape"])
            classes = int(record["num_classes"])
        else:
            image_shape, classes = data_shape(config)
        data = _Shapes(np.empty((0, *image_shape), dtype=np.float32), classes)
    image_shape = tuple(int(d) for d in data.x_train.shape[1:])
    model, _ = build_model_and_method(config, data, budget=stored_budget(ckpt))
    try:
        if record is not None and record.get("slimmed"):
            from reference.sparsity.slimming import slim_to_state

            slim_to_state(model, ckpt.model_state)  # the saved channel counts, then the arrays
        else:
            model.load_state_dict(ckpt.model_state, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {where!r} does not fit model {config.model!r}: {exc}") from None
    model.eval()
    classes = int(data.num_classes if config.num_classes is None else config.num_classes)
    return RestoredModel(model, config, ckpt, image_shape, classes, record)


# ---------------------------------------------------------------------------
# Finalized checkpoints


def _check_trail_sparsity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"--trail-sparsity must be a fraction of zero weights in [0, 1) such as 0.9, got {value!r}"
        )
    return float(value)


def pick_trail_checkpoint(src: str | Path, target: float) -> Path:
    """The snapshot of the trail of the run holding checkpoint ``src`` chosen for sparsity ``target``
    (by :func:`reference.sparsity.learned_threshold.pick_from_trail`)."""
    from reference.sparsity.learned_threshold import pick_from_trail

    return Path(pick_from_trail(Path(src).parent, _check_trail_sparsity(target)))


def recalibrate_batch_norm(model: Module, batches) -> int:
    """Set every batch norm's running statistics to their average over ``batches``; returns the count.

    ``batches`` yields input arrays (N, C, H, W). With ``momentum = 1 / k`` at
    the k-th batch, the usual update ``r <- (1 - m) r + m b`` leaves ``r`` the
    plain mean of the K batch statistics (the mean, and the unbiased variance
    the training update uses), whatever it held before. Only the batch norms'
    buffers change: no gradient, no parameter; their momenta are restored and
    the model is left in evaluation mode. Call it on a plain (finalized) model,
    so that training mode means only "batch statistics".
    """
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    count = 0
    model.train()
    try:
        with no_grad():
            for x in batches:
                count += 1
                for m in norms:
                    m.momentum = 1.0 / count
                model(Tensor(x))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return count


def recalibration_batches(data, config: TrainConfig, batches: int):
    """The first ``batches`` shuffled training batches of ``data`` (no augmentation), at the run's
    batch size, in an order drawn from the run's seed on a stream of its own (not the training order)."""
    rng = np.random.default_rng([config.seed, 1 << 21])
    pairs = data.train_batches(config.batch_size, rng, augment=False)
    return (x for x, _ in itertools.islice(pairs, batches))


def _recalibration_batches(restored, batches: int, data_root: str | None):
    """:func:`recalibration_batches` of the checkpoint's data set."""
    config = restored.config
    return recalibration_batches(build_data(config, data_root=data_root), config, batches)


def finalize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    trail_sparsity: float | None = None,
    recalibrate_bn: int = 0,
    data_root: str | None = None,
) -> tuple[Path, FinalizeSummary]:
    """Finalize the model in checkpoint ``src`` and save it as a finalized checkpoint at ``dst``.

    With ``trail_sparsity``, the snapshot of the run's trail (``trail/`` next
    to ``src``) chosen for that sparsity is finalized instead. Everything is
    checked before ``dst`` is written, including that the checkpoint read
    holds only finite values; the write is atomic. A ``dst`` that is
    ``src`` (or the trail snapshot read), by any path to it, is refused: the
    training checkpoint would be lost. ``recalibrate_bn`` > 0 recalibrates the
    batch norms on that many training batches (:func:`recalibrate_batch_norm`;
    ``data_root`` overrides the config's for a data set read from disk).
    """
    if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
        raise ConfigError(
            f"finalize: recalibrate_bn must be a number of batches >= 0, got {recalibrate_bn!r}"
        )
    refuse_overwriting_inputs(dst, [src], "finalize")
    if trail_sparsity is not None:
        if not Path(src).is_file():
            raise CheckpointError(f"checkpoint {str(src)!r} does not exist")
        src = pick_trail_checkpoint(src, trail_sparsity)
        refuse_overwriting_inputs(dst, [src], "finalize")
    restored = load_model_from_checkpoint(check_finite(load_checkpoint(src)))  # the file actually read
    summary = finalize(restored.model)
    if recalibrate_bn:
        batches = _recalibration_batches(restored, recalibrate_bn, data_root)
        count = recalibrate_batch_norm(restored.model, batches)
        summary = dataclasses.replace(summary, recalibrated_bn_batches=count)
        bad = first_non_finite(restored.model.state_dict().items())
        if bad is not None:
            raise CheckpointError(
                f"finalize --recalibrate-bn: {bad!r} became non-finite on the training batches; "
                "nothing was written"
            )
    ckpt = restored.checkpoint
    record = {
        "from_method": restored.method_name,
        "source": str(ckpt.path),
        "slimmed": bool(summary.slimmed or (restored.finalized or {}).get("slimmed", False)),
        "input_shape": list(restored.input_shape),
        "num_classes": restored.num_classes,
        "weights": summary.weights,
        "nonzeros": summary.nonzeros,
        "trail_sparsity": trail_sparsity,
        "slim": _plain(summary.slim),
        "recalibrated_bn_batches": summary.recalibrated_bn_batches,
    }
    path = save_checkpoint(
        dst,
        model_state=restored.model.state_dict(),
        optimizer_state=None,
        # plain weights: no method left, and no budget file to read when it is loaded
        config=restored.config.replace(method="dense", target_sparsity=None, budget=None, budget_column=None),
        epoch=ckpt.epoch,
        metrics=ckpt.metrics,
        extra={FINALIZED_KEY: record},
    )
    return path, summary
