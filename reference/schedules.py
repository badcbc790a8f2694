"""Learning-rate schedules: pure functions of the position in training.

A schedule is called as ``schedule(epoch, step=0, steps_per_epoch=1)`` and
returns the learning rate for that step. It holds no state, so resuming a run
needs only its epoch and step. ``epoch`` counts from 0; ``step`` is the index
of the batch inside the epoch (0 <= step < steps_per_epoch).

WarmupCosine, with base learning rate ``b``, final learning rate ``f``,
``E`` epochs of which ``W`` are warmup, and ``t`` the position in epochs:

    per-epoch form (per_step=False): t = epoch (the step is ignored)
        lr(t) = b * (t + 1) / W                                  t < W     (1)
        lr(t) = f + (b - f) * 0.5 * (1 + cos(pi * (t - W) / (E - W)))   W <= t < E   (2)
        lr(t) = f                                                t >= E    (3)

    per-step form (per_step=True): t = epoch + step / steps_per_epoch
        lr(t) = b * (t + 1/S) / W                                t < W     (1')
        (2) and (3) unchanged, with the fractional t.

(1') is (1) counted in steps instead of epochs, with ``S = steps_per_epoch``:
the k-th optimizer step (k = 0, 1, ...) of warmup gets ``b * (k + 1) / (W * S)``,
so the last warmup step reaches ``b`` exactly, as the last warmup epoch does in
(1). The cosine part (2) starts at ``b`` at ``t = W`` and reaches ``f`` at
``t = E``, the end of training; the last trained epoch (per-epoch form) or
step (per-step form) uses a value just above ``f``.

StepDecay: ``lr(epoch) = b * gamma ** (number of milestones <= epoch)``.
Constant: ``lr = b``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from reference.errors import ConfigError

__all__ = ["SCHEDULE_NAMES", "Constant", "Schedule", "StepDecay", "WarmupCosine", "build_schedule"]

SCHEDULE_NAMES = ("cosine", "step", "constant")


class Schedule(Protocol):
    """Anything that maps a position in training to a learning rate."""

    def __call__(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float: ...


def _positive_number(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_position(epoch: Any, step: Any, steps_per_epoch: Any) -> None:
    _count(epoch, "schedule: epoch", 0)
    _count(steps_per_epoch, "schedule: steps_per_epoch", 1)
    _count(step, "schedule: step", 0)
    if step >= steps_per_epoch:
        raise ConfigError(f"schedule: step must be < steps_per_epoch={steps_per_epoch}, got {step}")


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup then cosine decay; equations (1)-(3) and (1') of the module docstring."""

    base_lr: float
    epochs: int
    warmup_epochs: int = 0
    per_step: bool = False
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        _positive_number(self.base_lr, "WarmupCosine: base_lr")
        _count(self.epochs, "WarmupCosine: epochs", 1)
        _count(self.warmup_epochs, "WarmupCosine: warmup_epochs", 0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"WarmupCosine: warmup_epochs must be <= epochs={self.epochs}, got {self.warmup_epochs}"
            )
        if not isinstance(self.per_step, bool):
            raise ConfigError(f"WarmupCosine: per_step must be True or False, got {self.per_step!r}")
        final = self.final_lr
        if isinstance(final, bool) or not isinstance(final, numbers.Real) or not 0 <= final <= self.base_lr:
            raise ConfigError(
                f"WarmupCosine: final_lr must be a number in [0, base_lr={self.base_lr}], got {final!r}"
            )

    def __call__(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        _check_position(epoch, step, steps_per_epoch)
        base, final = float(self.base_lr), float(self.final_lr)
        warmup, epochs = self.warmup_epochs, self.epochs
        t = epoch + step / steps_per_epoch if self.per_step else float(epoch)
        if t < warmup:
            if self.per_step:
                return base * (epoch * steps_per_epoch + step + 1) / (warmup * steps_per_epoch)  # (1')
            return base * (epoch + 1) / warmup  # (1)
        if t >= epochs:
            return final  # (3)
        progress = (t - warmup) / (epochs - warmup)
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))  # (2)


@dataclass(frozen=True)
class StepDecay:
    """``base_lr * gamma ** (number of milestones <= epoch)``; milestones strictly increasing."""

    base_lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _positive_number(self.base_lr, "StepDecay: base_lr")
        _positive_number(self.gamma, "StepDecay: gamma")
        milestones = tuple(self.milestones)
        for m in milestones:
            _count(m, "StepDecay: each milestone", 1)
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ConfigError(f"StepDecay: milestones must be strictly increasing, got {list(milestones)}")
        object.__setattr__(self, "milestones", milestones)

    def __call__(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        _check_position(epoch, step, steps_per_epoch)
        passed = sum(1 for m in self.milestones if m <= epoch)
        return float(self.base_lr) * float(self.gamma) ** passed


@dataclass(frozen=True)
class Constant:
    """The same learning rate everywhere."""

    base_lr: float

    def __post_init__(self) -> None:
        _positive_number(self.base_lr, "Constant: base_lr")

    def __call__(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        _check_position(epoch, step, steps_per_epoch)
        return float(self.base_lr)


def build_schedule(
    name: str,
    base_lr: float,
    epochs: int,
    *,
    warmup_epochs: int = 0,
    per_step: bool = False,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> WarmupCosine | StepDecay | Constant:
    """The schedule called ``name`` ("cosine", "step" or "constant") for a run of ``epochs`` epochs.

    Options that the chosen schedule would ignore raise ConfigError instead:
    warmup and per_step belong to "cosine", milestones to "step". Milestones
    must lie strictly inside the run (0 < m < epochs), since one at or past the
    end would never take effect.
    """
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"unknown schedule {name!r}; expected one of {list(SCHEDULE_NAMES)}")
    _positive_number(base_lr, f"schedule {name!r}: base_lr")
    epochs = _count(epochs, f"schedule {name!r}: epochs", 1)
    milestones = tuple(milestones)
    if name != "cosine":
        if warmup_epochs:
            raise ConfigError(f"schedule {name!r} has no warmup; got warmup_epochs={warmup_epochs!r}")
        if per_step:
            raise ConfigError(
                f"schedule {name!r} is stepped per epoch; per_step=True applies to 'cosine' only"
            )
    if name != "step" and milestones:
        raise ConfigError(f"schedule {name!r} takes no milestones; got {list(milestones)}")
    if name == "cosine":
        return WarmupCosine(base_lr, epochs, warmup_epochs=warmup_epochs, per_step=per_step)
    if name == "step":
        if not milestones:
            raise ConfigError("schedule 'step' needs at least one milestone, got none")
        late = [m for m in milestones if isinstance(m, numbers.Integral) and m >= epochs]
        if late:
            raise ConfigError(
                f"schedule 'step': milestones must be < epochs={epochs}, got {list(milestones)}"
            )
        return StepDecay(base_lr, milestones, gamma=gamma)
    return Constant(base_lr)
