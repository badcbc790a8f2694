"""The training loop: data, model, optimizer and schedule from one TrainConfig.

One call to :func:`train` runs (or resumes) a whole run::

    for epoch in range(start, epochs):
        lr = schedule(epoch, ...)                       per epoch, or per step
        for each batch (order and augmentation from default_rng([seed, epoch])):
            method.before_step(model, ctx)              a sparsity method's hooks
            loss = cross_entropy(model(x), y) + method.regularization(model)
            zero_grad; backward; optimizer step         non-finite or exploding loss -> DivergenceError
            method.after_step(model, ctx)
        parameters, last gradients, buffers finite?     else DivergenceError (see LOSS_LIMIT_FACTOR)
        evaluate on the test split (eval mode, no_grad, in batches)
        method.end_epoch(model, ctx)                    per-layer sparsity and thresholds
        write the epoch's records, then the checkpoint (the commit), then best.npz

The sparsity method (``config.method``, :mod:`reference.sparsity`) draws its
own randomness from ``default_rng([seed, epoch, 1])``.

Exact resume: every epoch draws its randomness from a generator seeded with
``(seed, epoch)`` and nothing else random happens during training, so a run
resumed from the checkpoint written after epoch ``k`` repeats epochs
``k+1, ...`` exactly; its final weights are bit-identical to those of an
uninterrupted run.

Host reads on the GPU: inside a step (:func:`_train_step`: the method's
hooks, forward, backward, update) nothing is read back from the device, so the
host queues work ahead of the GPU. The reads that do happen are in a few named
places: :meth:`_RunningSums.read` (the running loss every
:data:`GPU_READ_EVERY` steps) and :meth:`_RunningSums.totals` (the end of the
epoch's steps), :func:`_finish_epoch` (evaluation, the method's statistics,
metrics and checkpoints) and :func:`_finish_run` (the model back on the host).
``tests/test_no_host_reads.py`` allows exactly these.

The run directory holds::

    config.json, config.toml   the resolved configuration
    metrics.jsonl, metrics.csv one row per epoch (see METRIC_COLUMNS)
    checkpoint.npz             the latest epoch (rewritten atomically each epoch)
    best.npz                   the epoch with the best test accuracy so far
    layers.jsonl               per-layer numbers of the sparsity method, one line per epoch
    trail/epoch_NNN.npz        a checkpoint per epoch, for methods that keep a trail (LTP)
    .lock                      held (flock) while a process trains here

An epoch's records are written before its checkpoint, which commits it; a
resume first brings the directory back to the checkpoint's epoch, and a run
that never committed an epoch removes what it wrote (:mod:`reference.rundir`).
A resumed run trains in the directory that holds its checkpoint unless
``run_dir`` names another.
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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reference.autodiff import Tensor, no_grad
from reference.backend import array_module, check_device, device_of, to_device
from reference.build import build_data, build_model_and_method, build_model_for, param_groups
from reference.checkpoint import Checkpoint, first_non_finite, load_checkpoint, save_checkpoint
from reference.config import TrainConfig, schedule_of
from reference.distributed import Communicator, DataParallel, world
from reference.errors import CheckpointError, ConfigError, DataError, DivergenceError
from reference.files import write_atomic
from reference.functional import softmax_cross_entropy
from reference.rundir import discard, held_lock, roll_back, run_home

__all__ = [
    "METRIC_COLUMNS",
    "TrainResult",
    "build_data",
    "build_model_and_method",
    "build_model_for",
    "evaluate",
    "evaluate_batches",
    "param_groups",
    "train",
]

METRIC_COLUMNS = (
    "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "sparsity", "seconds", "train_seconds",
)  # fmt: skip

# Settings that may change when a run is resumed: they do not affect the
# numbers computed in the epochs already done (``epochs`` extends or shortens
# the run; with the cosine schedule that changes the remaining learning rates).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "run_dir", "progress", "eval_batch_size", "data_root", "workers", "device", "precision"}
)

# On the GPU the running loss and accuracy stay on the device and are read (a
# host synchronisation) only every this many steps, for the progress bar and
# the divergence check, and at the end of the epoch.
GPU_READ_EVERY = 25

# The divergence guard stops a run, before anything of the epoch is written, when
#   - the loss is not finite (the CPU reads it every step, the GPU every GPU_READ_EVERY steps), or
#   - the epoch's mean task loss so far exceeds LOSS_LIMIT_FACTOR * ln(num_classes), a hundred
#     times the loss of a uniform guess (checked where the loss is read: every step on the CPU,
#     every GPU_READ_EVERY steps on the GPU, and at the end of the epoch's steps), or
#   - after the epoch's steps, a parameter, a gradient of the last step or a buffer (batch-norm
#     running statistics) holds a NaN or an infinity. A non-finite gradient of any earlier step
#     has reached the parameters by then (SGD adds it in), so this check sees it too.
# A healthy run starts near ln(num_classes) and goes down; a hundred times that is orders of
# magnitude away and is only reached by a run whose weights are blowing up.
LOSS_LIMIT_FACTOR = 100.0

Log = Callable[[str], Any]


@dataclasses.dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    config: TrainConfig
    model: Any  # reference.nn.Module
    metrics: dict[str, float]  # the last epoch's row
    history: list[dict[str, float]]  # one row per epoch, from the first
    best_acc: float
    best_epoch: int
    run_dir: Path
    seconds: float  # wall time of this call

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.npz"


# ---------------------------------------------------------------------------
# Randomness


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The data's randomness in epoch ``epoch`` (0-based): order and augmentation."""
    return np.random.default_rng([seed, epoch])


def _method_rng(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """The sparsity method's randomness in epoch ``epoch`` (e.g. SCP's mask noise) on rank ``rank``
    of a data-parallel run (rank 0 draws what a single process draws)."""
    return np.random.default_rng([seed, epoch, 1] if rank == 0 else [seed, epoch, 1, rank])


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``(x, y)``.

    Runs in evaluation mode under ``no_grad`` in batches of ``batch_size``;
    the model's previous mode is restored afterwards.
    """
    if len(x) != len(y):
        raise DataError(f"evaluate: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError("evaluate: the evaluation split is empty")
    if batch_size <= 0:
        raise ConfigError(f"eval batch size must be a positive integer, got {batch_size!r}")
    starts = range(0, len(x), batch_size)
    batches = ((x[start : start + batch_size], y[start : start + batch_size]) for start in starts)
    return evaluate_batches(model, batches)


def evaluate_batches(model, batches) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over the ``(x, y)`` pairs of ``batches``.

    Like :func:`evaluate`, for data that arrives in batches (a streamed data set).
    Batches are host arrays; for a model on the GPU each is copied to the device
    (uint8 images are normalised there), and the sums stay on the device until
    the end.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        with no_grad():
            for xb, yb in batches:
                n = len(yb)
                if device == "cuda":
                    xd, yd = _batch_on_device(xb, yb)
                    logits = model(Tensor(xd))
                    loss = softmax_cross_entropy(logits, yd)
                    total_loss = total_loss + loss.data.astype("float64") * n  # stays on the device
                    correct = correct + (logits.data.argmax(axis=1) == yd).sum()
                else:
                    logits = model(Tensor(xb))
                    loss = softmax_cross_entropy(logits, yb)
                    total_loss += loss.item() * n
                    correct += int((np.asarray(logits.numpy()).argmax(axis=1) == yb).sum())
                seen += n
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("evaluate: the evaluation split is empty")
    return float(total_loss) / seen, int(correct) / seen


def _model_device(model) -> str:
    """``"cuda"`` when the model's parameters are CuPy arrays, else ``"cpu"``."""
    for p in model.parameters():
        return device_of(p.data)
    return "cpu"


def _batch_on_device(xb, yb):
    """A host batch copied to the GPU; uint8 images (an imagefolder stream) are normalised there."""
    from reference.imagefolder import normalize

    x, y = to_device(xb, "cuda"), to_device(yb, "cuda")
    if x.dtype == np.uint8:
        x = normalize(x, xp=array_module(x))
    return x, y


def _evaluate_data(model, data, batch_size: int) -> tuple[float, float]:
    """:func:`evaluate` on the test split of ``data``, in memory or streamed."""
    if data.stream is None:
        return evaluate(model, data.x_test, data.y_test, batch_size)
    if batch_size <= 0:
        raise ConfigError(f"eval batch size must be a positive integer, got {batch_size!r}")
    return evaluate_batches(model, data.test_batches(batch_size, normalize=_model_device(model) == "cpu"))


# ---------------------------------------------------------------------------
# Run directory


def _default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.model}-{config.dataset}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _run_dir_for(config: TrainConfig, ckpt: Checkpoint | None) -> Path:
    """Where the run trains: the run directory the resumed checkpoint is in, unless
    ``config.run_dir`` names another one (a changed setting); else ``config.run_dir``
    or a new ``runs/...`` directory. A checkpoint's stored run_dir is never read
    against the current directory."""
    if ckpt is not None and config.run_dir in (None, _saved_config(ckpt).run_dir):
        return run_home(ckpt.path)
    return Path(config.run_dir) if config.run_dir is not None else _default_run_dir(config)


def _check_run_dir(run_dir: Path, ckpt: Checkpoint | None) -> None:
    """ConfigError unless ``run_dir`` can take this run: a fresh run needs a directory without a
    checkpoint; a resumed one, a directory without one or with the very checkpoint it resumes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {str(run_dir)!r} exists and is not a directory")
    existing = run_dir / "checkpoint.npz"
    if not existing.exists():
        return
    if ckpt is None:
        raise ConfigError(
            f"run_dir {str(run_dir)!r} already holds a run (checkpoint.npz); choose another run directory "
            f"or continue it with --resume {str(existing)!r}"
        )
    if not _same_file(existing, Path(ckpt.path)):
        raise ConfigError(
            f"run_dir {str(run_dir)!r} holds another checkpoint ({str(existing)!r}); resuming "
            f"{str(ckpt.path)!r} there would overwrite that run: resume {str(existing)!r} itself, "
            f"or give a new --run-dir to continue {str(ckpt.path)!r} in"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _weight_sparsity(model) -> float:
    """Fraction of zeros among the effective weights of every conv and fc layer."""
    from reference.nn import weight_layers

    was_training = model.training
    model.eval()  # the weights evaluation computes with (e.g. LTP's hard mask)
    total = zeros = 0
    try:
        with no_grad():
            for _, layer in weight_layers(model):
                w = layer.effective_weight().data
                total += w.size
                zeros += int(w.size) - int((w != 0).sum())  # NumPy or CuPy alike
    finally:
        model.train(was_training)
    return zeros / max(total, 1)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Rewrite ``path`` atomically with ``row`` appended (the file is small: one line per epoch)."""
    previous = path.read_text() if path.exists() else ""
    write_atomic(path, previous + json.dumps(row, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_atomic(run_dir / "metrics.csv", buf.getvalue())


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    write_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    write_atomic(run_dir / "config.toml", config.to_toml())


# ---------------------------------------------------------------------------
# Resume


def _check_resume_config(saved: TrainConfig, config: TrainConfig, path: Path) -> None:
    changed = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if changed:
        details = ", ".join(
            f"{n}={getattr(config, n)!r} (checkpoint: {getattr(saved, n)!r})" for n in changed
        )
        raise ConfigError(
            f"cannot resume {str(path)!r} with different settings: {details}; "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )


def _saved_config(ckpt: Checkpoint) -> TrainConfig:
    try:
        return TrainConfig.from_checkpoint(ckpt.config, source=f"checkpoint {str(ckpt.path)!r} config")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds an unusable config: {exc}") from None


# ---------------------------------------------------------------------------
# Training


def _progress_enabled(config: TrainConfig) -> bool:
    return config.progress and sys.stderr.isatty()


class _RunningSums:
    """An epoch's running task-loss sum, correct predictions and images seen.

    On the CPU each step's values are read as they come (:meth:`add` returns a
    non-finite objective, so the run stops before the update). On the GPU they
    stay device arrays, together with the sum of the full objective for the
    divergence check; only :meth:`read` (every :data:`GPU_READ_EVERY` steps) and
    :meth:`totals` (the end of the epoch) read them back to the host.
    """

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu
        self.loss: Any = 0.0
        self.correct: Any = 0
        self.objective: Any = 0.0  # GPU: the sum of the full objective
        self.seen = 0

    def add(self, loss: Tensor, full: Tensor, logits: Tensor, labels: Any) -> float | None:
        """Count one batch; on the CPU, return the objective when it is not finite (else None)."""
        n = len(labels)
        if self.on_gpu:  # device arithmetic only: nothing is read
            self.loss = self.loss + loss.data.astype("float64") * n
            self.objective = self.objective + full.data.astype("float64")
            self.correct = self.correct + (logits.data.argmax(axis=1) == labels).sum()
            self.seen += n
            return None
        value, total = loss.item(), full.item()
        if not (math.isfinite(value) and math.isfinite(total)):
            return total
        self.loss += value * n
        self.correct += int((np.asarray(logits.numpy()).argmax(axis=1) == labels).sum())
        self.seen += n
        return None

    def read(self) -> tuple[float, float]:
        """(objective sum, mean task loss so far) as host numbers: the GPU's one read every few steps."""
        return float(self.objective), float(self.loss) / max(self.seen, 1)

    def totals(self) -> tuple[float, float, float]:
        """(objective sum, mean task loss, accuracy) of the epoch as host numbers: the end-of-epoch read."""
        return (
            float(self.objective),
            float(self.loss) / max(self.seen, 1),
            int(self.correct) / max(self.seen, 1),
        )


def _train_step(
    model,
    optimizer,
    method,
    ctx,
    xb,
    yb,
    config: TrainConfig,
    sums: _RunningSums,
    dp: DataParallel | None = None,
):
    """One optimizer step on the batch ``(xb, yb)``: the method's hooks, forward, backward, update.

    With several ranks (``dp``), ``(xb, yb)`` is the global batch: this rank
    trains on its shard, and the gradients are summed over the ranks, weighted
    by the shards' sizes, before the update (:mod:`reference.distributed`).

    Returns a non-finite objective (CPU only; nothing was updated) or None. On
    the GPU nothing here reads a device value back.
    """
    weight = 1.0
    if dp is not None and dp.active:
        xb, yb, weight = dp.shard(xb, yb)
    method.before_step(model, ctx)
    if sums.on_gpu:
        xb, yb = _batch_on_device(xb, yb)
    logits = model(Tensor(xb))
    loss = softmax_cross_entropy(logits, yb, label_smoothing=config.label_smoothing)
    extra = method.regularization(model)
    full = loss if extra is None else loss + extra
    bad = sums.add(loss, full, logits, yb)
    if bad is not None:
        return bad
    optimizer.zero_grad()
    if dp is not None and dp.active:
        full.backward(full.data * 0 + full.data.dtype.type(weight))  # this rank's share w_r of the objective
        dp.reduce_gradients()  # sum_r of the ranks' gradients (reference.distributed (2))
    else:
        full.backward()
    optimizer.step()
    method.after_step(model, ctx)
    return None


def _train_epoch(model, optimizer, schedule, data, config: TrainConfig, epoch: int, method, dp=None):
    """One epoch of SGD; returns (lr at the first step, mean task loss, accuracy).

    On the CPU the loss is read after every step (a non-finite loss stops the
    run before the update). On the GPU nothing is read inside a step: the
    running sums stay on the device and are read every :data:`GPU_READ_EVERY`
    steps (progress bar, divergence check) and at the end of the epoch, in
    :meth:`_RunningSums.read` and :meth:`_RunningSums.totals`.
    """
    from tqdm import tqdm

    from reference.data import num_batches
    from reference.sparsity import StepContext

    on_gpu = config.device == "cuda"
    steps = num_batches(data.num_train, config.batch_size, drop_last=False)
    batches = data.train_batches(
        config.batch_size, _epoch_rng(config.seed, epoch), augment=config.augment, normalize=not on_gpu
    )
    bar = tqdm(
        batches,
        total=steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=not _progress_enabled(config),
    )
    first_lr = schedule(epoch, 0, steps)
    optimizer.set_lr(first_lr)
    model.train()
    method_rng = _method_rng(config.seed, epoch, 0 if dp is None else dp.comm.rank)
    sums = _RunningSums(on_gpu)

    loss_limit = LOSS_LIMIT_FACTOR * math.log(data.num_classes)

    def diverged(step: int, value: Any, where: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at epoch {epoch + 1}, {where} {step + 1}: the loss is {value} "
            f"(lr {optimizer.param_groups[0]['lr']:g}); try a smaller lr"
        )

    def check_growth(step: int, mean_loss: float) -> None:
        if mean_loss > loss_limit:
            raise diverged(
                step,
                f"{mean_loss:.4g} on average, above {loss_limit:.4g} "
                f"({LOSS_LIMIT_FACTOR:g} x ln {data.num_classes}, the loss of a uniform guess)",
                "by step",
            )

    try:
        for step, (xb, yb) in enumerate(bar):
            ctx = StepContext(epoch, step, steps, config.epochs, method_rng)
            if config.per_step:
                optimizer.set_lr(schedule(epoch, step, steps))
            bad = _train_step(model, optimizer, method, ctx, xb, yb, config, sums, dp)
            if bad is not None:
                raise diverged(step, bad, "step")
            if on_gpu and (step + 1) % GPU_READ_EVERY == 0:
                objective, mean_loss = sums.read()  # the one host synchronisation of these steps
                if not math.isfinite(objective):
                    raise diverged(step, objective, "by step")
                check_growth(step, mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            elif not on_gpu:  # host numbers: the mean so far costs nothing to look at
                mean_loss = sums.read()[1]
                check_growth(step, mean_loss)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
    finally:
        bar.close()
    objective, mean_loss, accuracy = sums.totals()
    if dp is not None and dp.active:  # the epoch's numbers over every rank's shards
        loss_sum, objective, correct, seen = dp.sum_values(
            [mean_loss * sums.seen, objective, accuracy * sums.seen, sums.seen]
        )
        mean_loss, accuracy = loss_sum / seen, round(correct) / seen
    if on_gpu and not math.isfinite(objective):
        raise diverged(steps - 1, objective, "by step")
    check_growth(steps - 1, mean_loss)
    return first_lr, mean_loss, accuracy


@dataclasses.dataclass
class _Run:
    """What the epochs of one :func:`train` call share."""

    config: TrainConfig
    data: Any
    model: Any
    method: Any
    optimizer: Any
    schedule: Any
    run_dir: Path
    log: Log
    history: list[dict[str, float]]
    best_acc: float = -1.0
    best_epoch: int = 0
    committed: int = 0  # the epoch the run directory's checkpoint holds (0: none yet)
    dp: DataParallel | None = None  # the ranks of a data-parallel run (None: this process alone)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 of a data-parallel run)."""
        return self.dp is None or self.dp.comm.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.npz"


def _build(config: TrainConfig, data):
    """``(model, method, optimizer, schedule)`` for ``config``, the model on ``config.device``."""
    from reference.optim import SGD

    model, method = build_model_and_method(config, data)
    model.to(config.device)  # before the optimizer, so its momentum buffers are made on the device
    optimizer = SGD(
        param_groups(model, config, method),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    return model, method, optimizer, schedule_of(config)


def _restore(ckpt: Checkpoint, config: TrainConfig, model, method, optimizer, world_size: int = 1):
    """Load ``ckpt`` into the model, optimizer and method; returns (epoch, history, best_acc, best_epoch)."""
    where = str(ckpt.path)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {where!r} does not fit model {config.model!r}: {exc}") from None
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (ConfigError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {where!r}: optimizer state does not fit: {exc}") from None
    history = [dict(row) for row in ckpt.metrics]
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    method.load_state_dict(extra.get("method", {}))
    saved_world = int(extra.get("world_size", 1))
    if saved_world != world_size:
        raise ConfigError(
            f"checkpoint {where!r} was trained on {saved_world} process(es); resume it on {saved_world} "
            f"(mpiexec -n {saved_world}), not {world_size}, to continue the same run"
        )
    best_acc = float(extra.get("best_acc", max((r["test_acc"] for r in history), default=-1.0)))
    return ckpt.epoch, history, best_acc, int(extra.get("best_epoch", 0))


# A diverging run overflows in NumPy (the CPU) long before the guard stops it: its warnings
# would bury the guard's one line, so floating-point errors are silent inside an epoch.
@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def _run_epoch(run: _Run, epoch: int) -> None:
    """Train epoch ``epoch`` (0-based), then :func:`_finish_epoch`."""
    t_epoch = time.perf_counter()
    path = run.checkpoint_path
    try:
        lr, train_loss, train_acc = _train_epoch(
            run.model, run.optimizer, run.schedule, run.data, run.config, epoch, run.method, run.dp
        )
        train_seconds = time.perf_counter() - t_epoch  # the steps alone (they end with a device read)
    except DivergenceError as exc:
        if path.exists() and epoch > 0:
            raise DivergenceError(f"{exc}; the last good checkpoint is {str(path)!r}") from None
        raise
    except KeyboardInterrupt:
        if epoch > 0 and path.exists():
            run.log(f"interrupted in epoch {epoch + 1}; continue with --resume {str(path)!r}")
        raise
    _finish_epoch(run, epoch, lr, train_loss, train_acc, t_epoch, train_seconds)


def _check_finite_state(run: _Run, epoch: int) -> None:
    """DivergenceError when a parameter, a last-step gradient or a buffer holds a NaN or an infinity.

    One reduction per array on its device and one host read for all of them
    (:func:`reference.checkpoint.first_non_finite`); called from
    :func:`_finish_epoch`, before anything of the epoch is written.
    """
    model = run.model
    named = [(name, p.data) for name, p in model.named_parameters()]
    named += [(f"the gradient of {name}", p.grad) for name, p in model.named_parameters()]
    named += list(model.named_buffers())
    bad = first_non_finite(named)
    if bad is not None:
        path = run.checkpoint_path
        last_good = f"; the last good checkpoint is {str(path)!r}" if path.exists() else ""
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1}: {bad} holds a NaN or an infinity after the epoch's "
            f"steps (lr {run.optimizer.param_groups[0]['lr']:g}); try a smaller lr{last_good}"
        )


def _finish_epoch(
    run: _Run,
    epoch: int,
    lr: float,
    train_loss: float,
    train_acc: float,
    t_epoch: float,
    train_seconds: float,
) -> None:
    """After an epoch's steps: evaluate, ask the method for its numbers, write metrics and checkpoints.

    Everything here reads the model back to the host on purpose (evaluation
    totals, per-layer statistics, the checkpoint's arrays); none of it runs
    inside a training step.
    """
    from reference.sparsity import StepContext

    config, model, method = run.config, run.model, run.method
    if run.dp is not None:
        run.dp.end_epoch(model)  # the ranks' batch-norm running statistics averaged; replicas checked
    _check_finite_state(run, epoch)
    test_loss, test_acc = _evaluate_ranks(model, run.data, config.eval_batch_size, run.dp)
    if not math.isfinite(test_loss):  # the last update broke the weights: keep the old checkpoint
        path = run.checkpoint_path
        last_good = f"; the last good checkpoint is {str(path)!r}" if path.exists() else ""
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1}: the test loss after the epoch is {test_loss} "
            f"(lr {run.optimizer.param_groups[0]['lr']:g}); try a smaller lr{last_good}"
        )
    steps = max(1, -(-run.data.num_train // config.batch_size))
    method_stats = method.end_epoch(
        model, StepContext(epoch, steps, steps, config.epochs, _method_rng(config.seed, epoch))
    )
    row = {
        "epoch": epoch + 1,
        "lr": float(lr),
        "train_loss": float(train_loss),
        "train_acc": float(train_acc),
        "test_loss": float(test_loss),
        "test_acc": float(test_acc),
        "sparsity": float(method_stats.get("sparsity", _weight_sparsity(model))),
        "seconds": round(time.perf_counter() - t_epoch, 3),
        "train_seconds": round(train_seconds, 3),
    }
    run.history.append(row)
    improved = test_acc > run.best_acc
    if improved:
        run.best_acc, run.best_epoch = test_acc, epoch + 1
    state = {
        "model_state": model.state_dict(),
        "optimizer_state": run.optimizer.state_dict(),
        "config": config,
        "epoch": epoch + 1,
        "metrics": run.history,
        "extra": {
            "best_acc": run.best_acc,
            "best_epoch": run.best_epoch,
            "rng": {"seed": config.seed, "epoch": epoch + 1},
            "method": method.state_dict(),
            "world_size": 1 if run.dp is None else run.dp.comm.size,
        },
    }
    if (
        getattr(method, "budget", None) is not None
    ):  # the budget as read: the checkpoint loads without its file
        state["extra"]["budget"] = dict(method.budget)
    if run.writes:
        _write_epoch(run, epoch, state, method_stats, improved)
    run.committed = epoch + 1
    run.log(
        f"epoch {epoch + 1:>3}/{config.epochs}  lr {lr:.4g}  train loss {train_loss:.4f} acc {train_acc:.2%}  "
        f"test loss {test_loss:.4f} acc {test_acc:.2%}  "
        f"{method.sparsity_label} {row['sparsity']:.2%}  ({row['seconds']:.1f}s)"
    )


def _write_epoch(run: _Run, epoch: int, state: dict[str, Any], method_stats: dict[str, Any], improved: bool):
    """The epoch's records first, the checkpoint last: it commits the epoch (reference.rundir)."""
    if run.method.keeps_trail:
        (run.run_dir / "trail").mkdir(exist_ok=True)
        save_checkpoint(run.run_dir / "trail" / f"epoch_{epoch + 1:03d}.npz", **state)
    if method_stats:
        _append_jsonl(run.run_dir / "layers.jsonl", {"epoch": epoch + 1, **method_stats})
    _write_metrics(run.run_dir, run.history)
    save_checkpoint(run.checkpoint_path, **state)
    if improved:  # after the commit: a resume rewrites it from the checkpoint if this write is lost
        save_checkpoint(run.run_dir / "best.npz", **state)


def _evaluate_ranks(model, data, batch_size: int, dp: DataParallel | None) -> tuple[float, float]:
    """:func:`_evaluate_data`, or with several ranks, each evaluating its contiguous share of the
    test split (:func:`reference.distributed.shard_bounds`) and the sums added over the ranks."""
    if dp is None or not dp.active:
        return _evaluate_data(model, data, batch_size)
    from reference.distributed import shard_bounds

    comm = dp.comm
    if batch_size <= 0:
        raise ConfigError(f"eval batch size must be a positive integer, got {batch_size!r}")
    if data.stream is None:
        lo, hi = shard_bounds(len(data.y_test), comm.rank, comm.size)
        batches = (
            (
                data.x_test[start : min(start + batch_size, hi)],
                data.y_test[start : min(start + batch_size, hi)],
            )
            for start in range(lo, hi, batch_size)
        )
    else:  # every size-th batch of the stream, from this rank's position
        stream = data.test_batches(batch_size, normalize=_model_device(model) == "cpu")
        batches = (b for i, b in enumerate(stream) if i % comm.size == comm.rank)
    seen = 0

    def counted():
        nonlocal seen
        for xb, yb in batches:
            seen += len(yb)
            yield xb, yb

    loss, acc = evaluate_batches(model, counted()) if _has_items(comm, data, batch_size) else (0.0, 0.0)
    loss_sum, correct, total = dp.sum_values([loss * seen, acc * seen, seen])
    if total == 0:
        raise DataError("evaluate: the evaluation split is empty")
    return float(loss_sum / total), round(correct) / float(total)


def _has_items(comm: Communicator, data, batch_size: int) -> bool:
    """Whether rank ``comm.rank`` has any of the test split to evaluate."""
    from reference.distributed import shard_bounds

    if data.stream is None:
        lo, hi = shard_bounds(len(data.y_test), comm.rank, comm.size)
        return hi > lo
    return comm.rank < -(-data.num_test // batch_size)  # the stream's batch number ``rank`` exists


def _finish_run(run: _Run, start_epoch: int, t_start: float) -> TrainResult:
    """The model back on the host, the result, and the summary in the log."""
    seconds = time.perf_counter() - t_start
    model, config = run.model, run.config
    model.to("cpu")  # the result (and the summary below) on the host, whatever trained it
    if run.history:
        metrics = dict(run.history[-1])
    else:  # nothing left to train: report the restored model as it is
        test_loss, test_acc = _evaluate_data(model, run.data, config.eval_batch_size)
        metrics = {"epoch": start_epoch, "test_loss": test_loss, "test_acc": test_acc}
    result = TrainResult(
        config=config,
        model=model,
        metrics=metrics,
        history=run.history,
        best_acc=max(run.best_acc, 0.0),
        best_epoch=run.best_epoch,
        run_dir=run.run_dir,
        seconds=seconds,
    )
    _summary(result, run.data, run.log)
    return result


def train(
    config: TrainConfig,
    *,
    resume: str | Path | Checkpoint | None = None,
    log: Log = print,
    stop_after: int | None = None,
    data=None,
    comm: Communicator | None = None,
) -> TrainResult:
    """Train (or resume) the run described by ``config``; see the module docstring.

    ``resume`` is a checkpoint (path or loaded) to continue from: its model, optimizer, epoch
    and metrics history are restored, and training goes on to
    ``config.epochs``. Only the settings in :data:`RESUMABLE_CHANGES` may
    differ from the checkpoint's config.

    ``stop_after`` ends this call after that many epochs have been completed in
    total (an interruption at an epoch boundary, as if the process had been
    stopped there); ``config.epochs`` still defines the schedule.

    ``data`` is a :class:`reference.data.Dataset` to train on instead of the
    one ``config`` names (a data set built in code; ``config.dataset`` then
    only labels the run).

    ``comm`` is the communicator of a data-parallel run
    (:mod:`reference.distributed`); by default, the MPI world when an MPI
    launcher started this process with others, else a world of one. Every
    rank builds the same model; only rank 0 writes the run directory.

    Every problem with the input (config, data, checkpoint) is raised before
    the run directory is created or touched.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() expects a TrainConfig, got {type(config).__name__}")
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise ConfigError(f"stop_after must be a positive integer, got {stop_after!r}")
    comm = world() if comm is None else comm
    if comm.rank != 0:  # one log for the run: rank 0's
        log = _quiet
    t_start = time.perf_counter()

    # 1. Everything that can fail on bad input, before writing anything (on every rank alike).
    with comm.agreed():
        ckpt = None
        if resume is not None:
            ckpt = resume if isinstance(resume, Checkpoint) else load_checkpoint(resume)
            _check_resume_config(_saved_config(ckpt), config, ckpt.path)
            if config.epochs < ckpt.epoch:
                raise ConfigError(
                    f"epochs={config.epochs} is fewer than the {ckpt.epoch} epochs checkpoint "
                    f"{str(ckpt.path)!r} has already trained; give {ckpt.epoch} or more to continue it"
                )
        check_device(config.device)  # a missing GPU is reported before anything is built or written
        if config.device == "cuda":
            from gpu import runtime

            if comm.size > 1:  # one GPU per rank, chosen by the rank's place on its node
                from gpu.distributed import use_local_device

                use_local_device(comm)
            runtime.set_precision(config.precision)
        if data is None:
            data = build_data(config)
        _check_shards(config, data, comm)
        model, method, optimizer, schedule = _build(config, data)
        history: list[dict[str, float]] = []
        start_epoch, best_acc, best_epoch = 0, -1.0, 0
        if ckpt is not None:
            start_epoch, history, best_acc, best_epoch = _restore(
                ckpt, config, model, method, optimizer, comm.size
            )
        run_dir = _run_dir_for(config, ckpt)
        if comm.rank == 0:
            _check_run_dir(run_dir, ckpt)
    run_dir = Path(comm.bcast(str(run_dir)))  # rank 0's choice (a new run's name holds the time)
    config = config.replace(run_dir=str(run_dir))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    dp = DataParallel(comm, params, sync_bn=config.sync_bn) if comm.size > 1 else None
    if dp is not None and config.sync_bn:
        dp.attach_sync_bn(model)

    # 2. The run directory, locked while this run trains there (reference.rundir); rank 0's alone.
    with contextlib.ExitStack() as stack:
        created = False
        with comm.agreed():
            if comm.rank == 0:
                created = _enter_run_dir(stack, run_dir, ckpt)
        run = _Run(
            config, data, model, method, optimizer, schedule, run_dir, log, history, best_acc, best_epoch
        )
        run.committed = start_epoch
        run.dp = dp
        try:
            return _train_locked(run, ckpt, start_epoch, stop_after, t_start)
        except BaseException:
            if run.writes and ckpt is None and run.committed == 0:  # never committed an epoch: leave nothing
                discard(run_dir, created=created)
            raise
        finally:
            if dp is not None:
                dp.detach_sync_bn(model)  # the returned model normalises its own batches


def _quiet(message: str) -> None:
    """The log of a rank other than 0."""


def _check_shards(config: TrainConfig, data, comm: Communicator) -> None:
    """ConfigError unless every batch of an epoch gives every rank at least one image."""
    if comm.size == 1:
        return
    last = data.num_train % config.batch_size or config.batch_size
    smallest = min(config.batch_size, last, data.num_train)
    if smallest < comm.size:
        raise ConfigError(
            f"batch_size {config.batch_size} over {comm.size} processes: the epoch's "
            f"{'last ' if smallest == last < config.batch_size else ''}batch holds {smallest} images, "
            f"fewer than the {comm.size} processes; give a batch size whose every batch "
            f"({data.num_train} training images) has at least one image per process"
        )


def _enter_run_dir(stack: contextlib.ExitStack, run_dir: Path, ckpt: Checkpoint | None) -> bool:
    """Create and lock ``run_dir`` (the lock held until ``stack`` closes); returns whether it was created."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write to run_dir {str(run_dir)!r}: {exc.strerror or exc}") from None
    try:
        stack.enter_context(held_lock(run_dir))
        _check_run_dir(run_dir, ckpt)  # again, now that no other trainer can change it
    except ConfigError:
        if created:  # nothing of ours in it: leave no empty directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    return created


def _train_locked(
    run: _Run, ckpt: Checkpoint | None, start_epoch: int, stop_after: int | None, t_start: float
):
    """The part of :func:`train` that runs with the run directory locked: bring the directory to
    the checkpoint's epoch (:func:`reference.rundir.roll_back`), write the config, train."""
    config, run_dir, data, log = run.config, run.run_dir, run.data, run.log
    with (Communicator() if run.dp is None else run.dp.comm).agreed():
        if run.writes:
            _prepare_run_dir(run, ckpt, start_epoch)
    end_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    if ckpt is not None:
        log(f"resuming {str(ckpt.path)!r} after epoch {start_epoch} of {config.epochs}")
    log(
        f"training {config.model} on {config.dataset} ({data.num_train} train / {data.num_test} test "
        f"images of shape {tuple(data.x_train.shape[1:])}) for {config.epochs} epochs "
        f"on {_device_text(config, run.dp)}; run dir {str(run_dir)!r}"
    )
    for epoch in range(start_epoch, end_epoch):
        _run_epoch(run, epoch)
    return _finish_run(run, start_epoch, t_start)


def _prepare_run_dir(run: _Run, ckpt: Checkpoint | None, start_epoch: int) -> None:
    """Bring the run directory to the checkpoint's epoch and write the config (and metrics so far)."""
    run_dir = run.run_dir
    try:
        roll_back(
            run_dir, start_epoch, best_epoch=run.best_epoch, checkpoint=None if ckpt is None else ckpt.path
        )
        _write_config(run_dir, run.config)
        if run.history:
            _write_metrics(run_dir, run.history)
    except OSError as exc:
        raise ConfigError(f"cannot write to run_dir {str(run_dir)!r}: {exc.strerror or exc}") from None


def _device_text(config: TrainConfig, dp: DataParallel | None = None) -> str:
    ranks = "" if dp is None else f", {dp.comm.size} processes"
    if config.device == "cpu":
        return f"the CPU{ranks}"
    from gpu import runtime

    return f"{runtime.describe()['device']} ({config.precision}{ranks})"


def _summary(result: TrainResult, data, log: Log) -> None:
    from reference.accounting import summarize_model

    m = result.metrics
    log(
        f"done: {m['epoch']} of {result.config.epochs} epochs, test accuracy {m['test_acc']:.2%} "
        f"(best {result.best_acc:.2%} at epoch {result.best_epoch}), {result.seconds:.1f}s; "
        f"checkpoint {str(result.checkpoint)!r}"
    )
    if result.config.target_sparsity is not None and "sparsity" in m:
        log(f"sparsity: requested {result.config.target_sparsity:.2%}, achieved {m['sparsity']:.2%}")
    if result.config.method == "dense":
        log(summarize_model(result.model, tuple(data.x_test.shape[1:])))
    else:  # the sparsity report: per-layer thresholds, nonzeros and MACs in evaluation mode
        from reference.summary import report_text

        log(report_text(result.model, tuple(data.x_test.shape[1:])))
