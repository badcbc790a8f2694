"""What a sparsity method is to the training loop: a handful of hooks.

The loop (:func:`reference.train.train`) drives every method the same way::

    method.attach(model)                          # install sparsifiers / masks
    groups = method.param_groups(model, config)   # e.g. thresholds decayed differently
    for each epoch:
        for each step:
            method.before_step(model, ctx)        # noise, temperatures, mask updates
            loss = task_loss + method.regularization(model)   # None: no extra term
            backward, optimizer step
            method.after_step(model, ctx)         # e.g. re-apply fixed masks
        stats = method.end_epoch(model, ctx)      # per-layer numbers for the log
    method.state_dict() / load_state_dict()       # saved in the checkpoint

:class:`Dense` is the method that does nothing. Everything a method adds to
the model (thresholds, masks) is a parameter or buffer of a sub-module, so the
model's state dict carries it and resume restores it; anything else a method
keeps (a controller's state) goes through ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Dense", "SparsityMethod", "StepContext"]


@dataclass(frozen=True)
class StepContext:
    """Where the loop is, and the randomness a method may use at this point.

    ``rng`` is derived from (seed, epoch) alone, so a resumed run draws the
    same numbers as an uninterrupted one.
    """

    epoch: int  # 0-based
    step: int  # 0-based, within the epoch
    steps_per_epoch: int
    epochs: int
    rng: np.random.Generator

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.global_step / max(self.total_steps, 1)


class SparsityMethod:
    """Base class: every hook does nothing. Subclasses override what they need."""

    name = "dense"
    keeps_trail = False  # save a snapshot of the model every epoch (LTP's trail)

    def attach(self, model) -> None:
        """Install the method on ``model`` (before the optimizer and any checkpoint load)."""

    def param_groups(self, model, config) -> list[dict[str, Any]]:
        """Optimizer groups: by default one group with the configured weight decay."""
        return [{"params": list(model.parameters()), "weight_decay": config.weight_decay, "name": "all"}]

    def regularization(self, model):
        """An extra loss term as a Tensor, or None."""
        return None

    def before_step(self, model, ctx: StepContext) -> None:
        """Called before each forward pass in training."""

    def after_step(self, model, ctx: StepContext) -> None:
        """Called after each optimizer step."""

    def end_epoch(self, model, ctx: StepContext) -> dict[str, Any]:
        """Numbers to log for this epoch: ``{"sparsity": float, "layers": {name: {...}}, ...}``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (not the model's), JSON-friendly or arrays."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Dense(SparsityMethod):
    """Plain training: no sparsity."""
