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

from reference.backend import is_device_array

__all__ = ["Dense", "SparsityMethod", "StepContext", "ThresholdMethod"]


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
    # What end_epoch's "sparsity" measures, as the epoch's log line names it: the fraction of
    # zeros in the conv+fc weights here; SCP's is the fraction of weights slimming removes.
    sparsity_label = "sparsity"

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


class ThresholdMethod(SparsityMethod):
    """What STR and LTP share: a threshold-holding sparsifier on every conv and fc layer.

    A subclass sets ``sparsifier_type`` (the sparsifier module class),
    ``threshold_param`` (the name of its threshold parameter: ``"s"`` or
    ``"tau"``) and :meth:`make_sparsifier`, calls :meth:`_init_decays` from its
    constructor and may set ``self.controller`` (a
    :class:`~reference.sparsity.control.TargetController`, or None).
    """

    sparsifier_type: type
    threshold_param: str
    controller = None

    def _init_decays(self, weight_decay: float, threshold_decay: float | None, target_sparsity) -> None:
        from reference.errors import ConfigError

        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        if threshold_decay is not None and not threshold_decay >= 0:
            raise ConfigError(f"threshold_decay must be a non-negative number, got {threshold_decay!r}")
        if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be in [0, 1), got {target_sparsity!r}")
        self.weight_decay = float(weight_decay)
        self.threshold_decay = self.weight_decay if threshold_decay is None else float(threshold_decay)
        self.target_sparsity = target_sparsity

    def make_sparsifier(self, layer):
        """The sparsifier module for one weight layer."""
        raise NotImplementedError

    def sparse_layers(self, model) -> list[tuple[str, Any, Any]]:
        """``(name, layer, sparsifier)`` for every layer this method sparsifies."""
        from reference.nn.layers import weight_layers

        out = [(name, layer, layer.sparsifier) for name, layer in weight_layers(model)]
        return [(n, layer, sp) for n, layer, sp in out if isinstance(sp, self.sparsifier_type)]

    def attach(self, model) -> None:
        """Install a sparsifier on every conv and fc layer (``<layer>.sparsifier.<threshold>``)."""
        from reference.errors import ConfigError
        from reference.nn.layers import weight_layers

        method = self.name.upper()
        layers = weight_layers(model)
        if not layers:
            raise ConfigError(f"{method}: {type(model).__name__} has no conv or fc layer to sparsify")
        for name, layer in layers:
            if layer.sparsifier is not None:
                raise ConfigError(
                    f"{method}: layer {name!r} already has a sparsifier ({type(layer.sparsifier).__name__})"
                )
            layer.sparsifier = self.make_sparsifier(layer)

    def param_groups(self, model, config=None) -> list[dict[str, Any]]:
        """Two groups: ``"weights"`` (weights, BN, biases; ``weight_decay``) and
        ``"thresholds"`` (every threshold; ``threshold_decay``)."""
        thresholds = [getattr(sp, self.threshold_param) for _, _, sp in self.sparse_layers(model)]
        ids = {id(p) for p in thresholds}
        others = [p for p in model.parameters() if id(p) not in ids]
        return [
            {"params": others, "weight_decay": self.weight_decay, "name": "weights"},
            {"params": thresholds, "weight_decay": self.threshold_decay, "name": "thresholds"},
        ]

    # ------------------------------------------------------ the controller
    # Everything below runs inside a training step (regularization, after_step)
    # and reads nothing back from the GPU: counts, the sparsity and the
    # controller's state stay on the weights' device (see reference.sparsity.control).

    def placed_controller(self, model):
        """The controller (or None), its state moved to where ``model``'s sparse weights live."""
        if self.controller is not None:
            layers = self.sparse_layers(model)
            if layers:
                self.controller.place(layers[0][1].weight.data)
        return self.controller

    def measured_sparsity(self, model) -> Any:
        """Zeros of the effective weights over all weights of the sparse layers, as the controller sees it.

        Each sparsifier's ``zero_count`` is an integer array on the weights'
        device; the counts are summed there. On the host the result is a Python
        float (exact integer counts, one division); on the GPU a 0-d float64
        device array, never read back.
        """
        zeros: Any = 0
        total = 0
        for _, layer, sp in self.sparse_layers(model):
            zeros = zeros + sp.zero_count(layer.weight)
            total += int(layer.weight.size)  # a shape, known on the host
        if not is_device_array(zeros):
            zeros = int(zeros)
        return zeros / max(total, 1)

    def update_controller(self, model, ctx: StepContext) -> None:
        """After an optimizer step: feed the measured sparsity to the controller (when one is on and due)."""
        controller = self.placed_controller(model)
        if controller is None or not controller.due(ctx.global_step):
            return
        controller.update(self.measured_sparsity(model), (ctx.global_step + 1) / max(ctx.total_steps, 1))

    @staticmethod
    def coefficient(value: Any, like) -> Any:
        """A loss coefficient for Tensor ``like``: a host number as it is, a device value in ``like``'s dtype.

        (A float64 device scalar would otherwise promote the float32 loss.)
        """
        return value.astype(like.dtype) if is_device_array(value) else value

    def state_dict(self) -> dict[str, Any]:
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from reference.sparsity.control import load_controller_state

        load_controller_state(self.controller, state, self.name.upper())
