"""STR: soft threshold weight reparameterization (Kusupati et al., ICML 2020).

Every conv (depthwise and pointwise included) and the classifier computes with

    g = sigmoid(s)                                   (1)
    W_eff = sign(W) * max(|W| - g, 0)                (2)

where ``s`` is one learnable scalar per layer (shape ``()``), or one per output
channel (shape ``(O,)``) with ``str_per_channel``. The kernel and its gradients
are :func:`reference.functional.str_threshold`; this module installs it
(:class:`SoftThreshold` as each layer's ``sparsifier``) and runs the method
(:class:`STR`). BN parameters and biases are never sparsified.

Sparsity here is the fraction of zeros in ``W_eff``, that is of weights with
``|W| <= g``, over all conv and fc weights.

Weight decay. The official recipe decays ``s`` with the same coupled L2 decay as
the weights (and BN). With ``s`` very negative (``-3200``), ``g`` is exactly 0 in
float32 and so is the loss gradient of ``s`` (it carries the factor
``g (1 - g)``), so at first only the decay moves ``s``, up toward 0; sparsity
switches on once ``g`` reaches the scale of the weights, after which the loss
gradient and the decay balance per layer. The thresholds form their own
optimizer group, ``"thresholds"``, with ``threshold_decay`` (default: the
``weight_decay``, the recipe's coupled decay).

A requested sparsity (``target_sparsity``) switches on a
:class:`~reference.sparsity.control.TargetController` that scales the decay on
``s`` (see :mod:`reference.sparsity.control`): the thresholds group keeps its
configured decay ``d`` and the method adds the loss term
``(c - d) * 0.5 * sum(s^2)``, so the total coupled decay on ``s`` is the
controller's strength ``c``. It starts at ``d`` (or at 1e-4 when ``d`` is 0) and
may turn negative (a push of ``s`` away from 0, lowering thresholds) when the
model is sparser than the ramp asks. With the controller, use a moderate
``s_init`` (about -5 to -10 for runs of a few thousand steps): while ``g`` is far
below the weights nothing responds and the controller can only wait at its
rate limit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.backend import array_module, is_device_array, to_host
from reference.errors import ConfigError
from reference.nn import Module, Parameter
from reference.nn.layers import WeightLayer
from reference.sparsity.base import StepContext, ThresholdMethod
from reference.sparsity.control import TargetController

__all__ = ["STR", "SoftThreshold", "from_config"]

CONTROL_START_FLOOR = 1e-4  # the controller's first strength when the configured decay is 0


class SoftThreshold(Module):
    """The map ``W -> sign(W) max(|W| - sigmoid(s), 0)`` with its own parameter ``s``.

    ``out_channels`` None: one threshold for the layer (``s`` of shape ``()``);
    otherwise one per output channel (``s`` of shape ``(out_channels,)``).
    """

    def __init__(self, s_init: float, out_channels: int | None = None, *, dtype: Any = np.float32):
        super().__init__()
        shape = () if out_channels is None else (int(out_channels),)
        self.s = Parameter(np.full(shape, s_init, dtype=np.dtype(dtype)))

    def forward(self, weight: Tensor) -> Tensor:
        return F.str_threshold(weight, self.s)  # the kernel checks that s fits the weight

    def threshold(self) -> Any:
        """``g = sigmoid(s)`` as an array of ``s``'s shape and dtype (no gradient)."""
        s = self.s.data
        e = array_module(s).exp(-abs(s))  # exp of a non-positive number: no overflow for any s
        return ((s >= 0) / (1 + e) + (s < 0) * (e / (1 + e))).astype(s.dtype)

    def zero_count(self, weight: Tensor) -> Any:
        """Zeros in ``W_eff`` (``|W| <= g``) as a 0-d integer array on the weight's device (no read)."""
        with no_grad():
            w_eff = self(weight).data
        return (w_eff == 0).sum()

    def weight_sparsity(self, weight: Tensor) -> tuple[int, int]:
        """(zeros in ``W_eff``, weights): the layer's sparsity as integer counts."""
        with no_grad():
            w_eff = self(weight).data
        return int(w_eff.size - int((w_eff != 0).sum())), int(w_eff.size)

    def extra_repr(self) -> str:
        return f"s: shape {self.s.shape}"


class STR(ThresholdMethod):
    """Soft threshold reparameterization on every conv and fc layer of a model.

    Args:
        s_init: initial ``s`` (threshold ``sigmoid(s_init)``).
        per_channel: one threshold per output channel instead of one per layer.
        weight_decay: the decay on weights, BN parameters and biases.
        threshold_decay: the decay on ``s`` (None: ``weight_decay``).
        target_sparsity: None, or the sparsity to steer to with a
            :class:`~reference.sparsity.control.TargetController`.
        controller: settings passed to the controller (``kp``, ``ki``, ...).
    """

    name = "str"

    def __init__(
        self,
        s_init: float = -5.0,
        per_channel: bool = False,
        *,
        weight_decay: float = 5e-4,
        threshold_decay: float | None = None,
        target_sparsity: float | None = None,
        controller: dict[str, Any] | None = None,
    ) -> None:
        if not np.isfinite(s_init):
            raise ConfigError(f"str_s_init must be a finite number, got {s_init!r}")
        self._init_decays(weight_decay, threshold_decay, target_sparsity)
        self.s_init = float(s_init)
        self.per_channel = bool(per_channel)
        self.controller = None
        if target_sparsity is not None:
            start = self.threshold_decay if self.threshold_decay > 0 else CONTROL_START_FLOOR
            self.controller = TargetController(target_sparsity, start, **(controller or {}))

    # ------------------------------------------------------------------ hooks
    sparsifier_type = SoftThreshold
    threshold_param = "s"

    def make_sparsifier(self, layer: WeightLayer) -> SoftThreshold:
        """One threshold per layer (``<layer>.sparsifier.s``), or per output channel."""
        channels = layer.weight.shape[0] if self.per_channel else None
        return SoftThreshold(self.s_init, channels, dtype=layer.weight.dtype)

    def regularization(self, model: Module) -> Tensor | None:
        """With a controller: ``(c - d) * 0.5 * sum_l sum(s_l^2)``, so the decay on ``s`` totals ``c``."""
        controller = self.placed_controller(model)
        if controller is None:
            return None
        extra = controller.strength - self.threshold_decay  # on the GPU a device value: never compared
        if not is_device_array(extra) and extra == 0.0:
            return None
        total = None
        for _, _, sp in self.sparse_layers(model):
            term = F.sum(F.mul(sp.s, sp.s))
            total = term if total is None else F.add(total, term)
        return None if total is None else F.mul(total, self.coefficient(0.5 * extra, total))

    def after_step(self, model: Module, ctx: StepContext) -> None:
        """Measure the sparsity and update the controller (when one is on and due), on the weights' device."""
        self.update_controller(model, ctx)

    def end_epoch(self, model: Module, ctx: StepContext) -> dict[str, Any]:
        """Per layer: sparsity, threshold ``g`` (mean over channels), weights; overall sparsity,
        the requested target and, with a controller, the ramp and the decay on ``s``."""
        layers: dict[str, Any] = {}
        zeros_all = total_all = 0
        for name, layer, sp in self.sparse_layers(model):
            zeros, total = sp.weight_sparsity(layer.weight)
            g = sp.threshold()
            layers[name] = {
                "sparsity": zeros / total,
                "threshold": float(g.mean()),
                "s": float(sp.s.data.mean()),
                "weights": total,
            }
            zeros_all += zeros
            total_all += total
        row: dict[str, Any] = {
            "sparsity": zeros_all / max(total_all, 1),
            "target_sparsity": self.target_sparsity,
            "threshold_decay": (
                self.threshold_decay if self.controller is None else float(to_host(self.controller.strength))
            ),
        }
        if self.controller is not None:
            row["controller"] = self.controller.log_row((ctx.epoch + 1) / max(ctx.epochs, 1))
        row["layers"] = layers
        return row


def from_config(config: Any) -> STR:
    """The STR method a :class:`~reference.config.TrainConfig` describes."""
    return STR(
        config.str_s_init,
        config.str_per_channel,
        weight_decay=config.weight_decay,
        threshold_decay=config.threshold_decay,
        target_sparsity=config.target_sparsity,
    )
