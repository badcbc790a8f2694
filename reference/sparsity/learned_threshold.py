"""LTP: learned threshold pruning with a differentiable L0 (Azarian et al., arXiv 2003.00075).

Patent notice: LTP is covered by a Qualcomm patent, US 11,704,571 B2. This
implementation is for research and teaching; check the patent's status and
terms before any other use.

Every conv and fc layer gets one learnable threshold ``tau`` (shape ``()``) on
the squared weight. In training the layer computes with the soft mask::

    T = t0 * var(|W|)                 recomputed from the current weights at every
                                      forward, passed as a constant (no gradient)   (1)
    z = (W^2 - tau) / T,   m = sigmoid(z),   W_eff = W * m                            (2)

and the loss gains ``lambda * sum_layers L0``, ``L0 = sum(m)`` (3). The kernels
and their gradients are :func:`reference.functional.ltp_mask` and
:func:`reference.functional.ltp_l0` (``ltp_exact_grad`` chooses the exact weight
gradient or the paper's ``dW_eff/dW ~ m``; ``ltp_l0_weight_grad`` whether L0 also
pushes the weights). In evaluation the layer computes with the hard mask::

    W_eff = W * [W^2 > tau]                                                           (4)

built with array operations and applied with :func:`reference.functional.mul`,
so no gradient reaches ``tau`` through it. Sparsity is the fraction of zeros of
(4) over all conv and fc weights ("hard sparsity"; a weight that is exactly 0
counts as pruned whatever ``tau`` is).

Preconditioning the threshold. ``tau`` lives on the scale of ``W^2`` (about
1e-3 to 1e-2 here) while its gradient scales as ``1 / W^2`` (the number of
weights per unit of ``W^2`` near the threshold), so one SGD step with the
weights' learning rate moves it by orders of magnitude more than its own size:
on the digits CNN ``tau`` jumped past every weight within a few steps and the
layer was pruned away for good. The loop gives every parameter group the same
learning rate, so the sparsifier rescales the gradient instead. With::

    k = mean(W^2)^2          (a constant, recomputed at every forward like T)      (5)

the forward uses::

    tau_k = tau.data + k * (tau - tau.data)                                         (6)

whose value is exactly ``tau`` (``tau - tau.data`` is exactly 0) and whose
gradient is ``k`` times the gradient of (2)-(3): the step on ``tau`` has the
units of ``W^2`` again, ``lr * mean(W^2)^2 * dL/dtau``. ``precondition=False``
gives the plain gradient.

A layer whose weights all have the same magnitude has ``var(|W|) = 0``; its ``T``
is then floored at the smallest normal number of the weight's dtype (the mask
is hard in all but name).

The band. Only weights near the threshold feed the gradient of ``tau``; when
none are left, pruning stalls. The log reports, per layer and overall, the
fraction of weights in the sigmoid's band, defined as ``|z| < 4`` (then
``m`` is in (0.018, 0.982) and ``sigmoid'(z) > 0.0177``, 7 % of its peak).

The trail. Hard-pruned networks get sparser as training goes on; the method
asks the loop to keep a checkpoint per epoch (``trail/epoch_NNN.npz``) and
:func:`pick_from_trail` picks the most accurate one that reaches a sparsity.

A requested sparsity (``target_sparsity``) switches on a
:class:`~reference.sparsity.control.TargetController` that sets ``lambda``
after every step, starting at ``ltp_lambda``; it turns negative (a reward for
density that lowers ``tau``) when the model is sparser than the ramp asks. See
:mod:`reference.sparsity.control`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor
from reference.backend import array_module, is_device_array, to_host
from reference.errors import ConfigError
from reference.nn import Module, Parameter
from reference.nn.layers import WeightLayer
from reference.sparsity.base import StepContext, ThresholdMethod
from reference.sparsity.control import TargetController

__all__ = ["BAND", "LTP", "LearnedThreshold", "from_config", "pick_from_trail"]

BAND = 4.0  # a weight is in the sigmoid's band when |z| < BAND


class LearnedThreshold(Module):
    """The map ``W -> W sigmoid((W^2 - tau) / T)`` (training) or ``W [W^2 > tau]`` (evaluation).

    Args:
        tau_init: the initial threshold on the squared weight.
        t0: the temperature factor of (1), > 0.
        exact_grad: exact weight gradient through the mask (False: ``dW_eff/dW ~ m``).
        precondition: scale the gradient of ``tau`` by ``k`` of (5).
    """

    def __init__(
        self,
        tau_init: float = 0.0,
        t0: float = 1.0,
        exact_grad: bool = True,
        *,
        precondition: bool = True,
        dtype: Any = np.float32,
    ):
        super().__init__()
        if not (t0 > 0 and math.isfinite(t0)):
            raise ConfigError(f"ltp_t0 must be a positive temperature factor, got {t0!r}")
        if not math.isfinite(tau_init):
            raise ConfigError(f"ltp_tau_init must be a finite number, got {tau_init!r}")
        self.tau = Parameter(np.full((), tau_init, dtype=np.dtype(dtype)))
        self.t0 = float(t0)
        self.exact_grad = bool(exact_grad)
        self.precondition = bool(precondition)

    def temperature(self, weight: Tensor) -> Any:
        """Equation (1) for the weight as it is now: a Python float, or a 0-d array on the GPU.

        On the GPU the value stays on the device (reading it would stall every
        layer of every step); the kernels take it as a 0-d array.
        """
        w = weight.data
        tiny = float(np.finfo(w.dtype).tiny)
        if is_device_array(w):
            xp = array_module(w)
            return xp.maximum(self.t0 * abs(w).var(dtype=np.float64), tiny)
        return max(self.t0 * float(abs(w).var(dtype=np.float64)), tiny)

    def tau_gradient_scale(self, weight: Tensor) -> Any:
        """Equation (5): ``k = mean(W^2)^2`` for the weight as it is now (1.0 when not preconditioning);
        a 0-d array on the GPU, as :meth:`temperature`."""
        if not self.precondition:
            return 1.0
        w = weight.data
        if is_device_array(w):
            return (w * w).mean(dtype=np.float64).astype(w.dtype) ** 2
        return float((w * w).mean(dtype=np.float64)) ** 2

    def preconditioned_tau(self, weight: Tensor) -> Tensor:
        """``tau`` with its value unchanged and its gradient multiplied by ``k``, equation (6)."""
        k = self.tau_gradient_scale(weight)
        if not self.precondition:
            return self.tau
        value = self.tau.data
        return F.add(F.mul(F.sub(self.tau, value), k), value)  # (6): value + k * 0, exactly tau

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            tau = self.preconditioned_tau(weight)
            return F.ltp_mask(weight, tau, self.temperature(weight), exact_grad=self.exact_grad)  # (2)
        return F.mul(weight, self.hard_mask(weight))  # (4)

    def hard_mask(self, weight: Tensor) -> Any:
        """``[W^2 > tau]`` in the weight's dtype, an array (no gradient)."""
        w = weight.data
        return (w * w > self.tau.data).astype(w.dtype)

    def zero_count(self, weight: Tensor) -> Any:
        """Zeros of (4) (``W^2 <= tau``, or ``W`` exactly 0) as a 0-d integer array on the weight's device."""
        w = weight.data
        kept = (w * w > self.tau.data) & (w != 0)
        return w.size - kept.sum()

    def logits(self, weight: Tensor) -> Any:
        """``z = (W^2 - tau) / T`` of (2), an array in float64 (no gradient)."""
        w = weight.data.astype(np.float64)
        return (w * w - self.tau.data.astype(np.float64)) / self.temperature(weight)

    def l0(self, weight: Tensor, weight_grad: bool = True) -> Tensor:
        """The differentiable count ``sum(m)`` of (3), a 0-d Tensor."""
        return F.ltp_l0(
            weight, self.preconditioned_tau(weight), self.temperature(weight), weight_grad=weight_grad
        )

    def stats(self, weight: Tensor) -> dict[str, float]:
        """Soft density (mean m), hard density, band fraction, zeros of (4), tau, T, weights."""
        w = weight.data
        z = self.logits(weight)
        xp = array_module(z)
        soft = 1.0 / (1.0 + xp.exp(-xp.clip(z, -700.0, 700.0)))
        hard = w * self.hard_mask(weight)
        n = int(w.size)
        return {
            "soft_density": float(soft.mean()),
            "hard_density": float((w * w > self.tau.data).mean()),
            "band": float((abs(z) < BAND).mean()),
            "zeros": n - int((hard != 0).sum()),
            "tau": float(self.tau.data),
            "temperature": float(self.temperature(weight)),
            "weights": n,
        }

    def extra_repr(self) -> str:
        return f"t0={self.t0}, exact_grad={self.exact_grad}"


class LTP(ThresholdMethod):
    """Learned threshold pruning on every conv and fc layer of a model.

    Args:
        lam: lambda, the weight of the L0 term (the controller's start when a target is set).
        t0, tau_init, exact_grad, precondition: see :class:`LearnedThreshold`.
        l0_weight_grad: let the L0 term send a gradient to the weights.
        weight_decay: the decay on weights, BN parameters and biases.
        threshold_decay: the decay on ``tau`` (None: ``weight_decay``).
        target_sparsity: None, or the sparsity to steer lambda to.
        controller: settings passed to the controller (``kp``, ``ki``, ...).
    """

    name = "ltp"
    keeps_trail = True

    def __init__(
        self,
        lam: float = 1e-5,
        t0: float = 1.0,
        tau_init: float = 0.0,
        *,
        exact_grad: bool = True,
        l0_weight_grad: bool = True,
        precondition: bool = True,
        weight_decay: float = 5e-4,
        threshold_decay: float | None = None,
        target_sparsity: float | None = None,
        controller: dict[str, Any] | None = None,
    ) -> None:
        if not (lam >= 0 and math.isfinite(lam)):
            raise ConfigError(f"ltp_lambda must be a non-negative number, got {lam!r}")
        if not (t0 > 0 and math.isfinite(t0)):
            raise ConfigError(f"ltp_t0 must be a positive temperature factor, got {t0!r}")
        if not math.isfinite(tau_init):
            raise ConfigError(f"ltp_tau_init must be a finite number, got {tau_init!r}")
        self._init_decays(weight_decay, threshold_decay, target_sparsity)
        if target_sparsity is not None and lam == 0:
            raise ConfigError("ltp_lambda must be positive with target_sparsity: the controller scales it")
        self.lam = float(lam)
        self.t0 = float(t0)
        self.tau_init = float(tau_init)
        self.exact_grad = bool(exact_grad)
        self.l0_weight_grad = bool(l0_weight_grad)
        self.precondition = bool(precondition)
        self.controller = (
            None
            if target_sparsity is None
            else TargetController(target_sparsity, self.lam, **(controller or {}))
        )

    @property
    def strength(self) -> float:
        """The lambda in use now: the controller's, or the configured one."""
        return self.lam if self.controller is None else self.controller.strength

    # ------------------------------------------------------------------ hooks
    sparsifier_type = LearnedThreshold
    threshold_param = "tau"

    def make_sparsifier(self, layer: WeightLayer) -> LearnedThreshold:
        """One threshold on the squared weight per layer (``<layer>.sparsifier.tau``)."""
        return LearnedThreshold(
            self.tau_init, self.t0, self.exact_grad, precondition=self.precondition, dtype=layer.weight.dtype
        )

    def regularization(self, model: Module) -> Tensor | None:
        """Equation (3): ``lambda * sum_layers L0`` (None when lambda is 0)."""
        self.placed_controller(model)
        lam = self.strength  # on the GPU, with a controller, a device value: never compared
        if not is_device_array(lam) and lam == 0.0:
            return None
        total = None
        for _, layer, sp in self.sparse_layers(model):
            term = sp.l0(layer.weight, weight_grad=self.l0_weight_grad)
            total = term if total is None else F.add(total, term)
        return None if total is None else F.mul(total, self.coefficient(lam, total))

    def after_step(self, model: Module, ctx: StepContext) -> None:
        """Measure the hard sparsity and update the controller (when one is on and due), on the weights' device."""
        self.update_controller(model, ctx)

    def end_epoch(self, model: Module, ctx: StepContext) -> dict[str, Any]:
        """Per layer and overall: hard sparsity, soft and hard density, band fraction
        (``|z| < 4``), tau and T; the requested target, lambda and, with a controller, its ramp."""
        layers: dict[str, Any] = {}
        sums = {"soft": 0.0, "hard": 0.0, "band": 0.0, "zeros": 0, "weights": 0}
        for name, layer, sp in self.sparse_layers(model):
            st = sp.stats(layer.weight)
            n = st["weights"]
            layers[name] = {"sparsity": st["zeros"] / n, **{k: v for k, v in st.items() if k != "zeros"}}
            sums["soft"] += st["soft_density"] * n
            sums["hard"] += st["hard_density"] * n
            sums["band"] += st["band"] * n
            sums["zeros"] += st["zeros"]
            sums["weights"] += n
        total = max(sums["weights"], 1)
        row: dict[str, Any] = {
            "sparsity": sums["zeros"] / total,
            "target_sparsity": self.target_sparsity,
            "soft_density": sums["soft"] / total,
            "hard_density": sums["hard"] / total,
            "band": sums["band"] / total,
            "lambda": float(to_host(self.strength)),
        }
        if self.controller is not None:
            row["controller"] = self.controller.log_row((ctx.epoch + 1) / max(ctx.epochs, 1))
        row["layers"] = layers
        return row


def from_config(config: Any) -> LTP:
    """The LTP method a :class:`~reference.config.TrainConfig` describes."""
    return LTP(
        config.ltp_lambda,
        config.ltp_t0,
        config.ltp_tau_init,
        exact_grad=config.ltp_exact_grad,
        l0_weight_grad=config.ltp_l0_weight_grad,
        weight_decay=config.weight_decay,
        threshold_decay=config.threshold_decay,
        target_sparsity=config.target_sparsity,
    )


# ---------------------------------------------------------------------------
# The trail


def pick_from_trail(run_dir: str | Path, target_sparsity: float) -> Path:
    """The trail checkpoint with hard sparsity >= ``target_sparsity`` and the best test accuracy.

    Reads ``metrics.jsonl`` of ``run_dir`` (one row per epoch, with ``sparsity``
    and ``test_acc``) and considers the epochs whose ``trail/epoch_NNN.npz``
    exists. Ties in accuracy go to the sparser snapshot, then the later one.
    Raises ConfigError when no snapshot reaches the target, naming the
    sparsest one available.
    """
    run_dir = Path(run_dir)
    if (
        isinstance(target_sparsity, bool)
        or not isinstance(target_sparsity, (int, float))
        or not (0.0 <= target_sparsity < 1.0)
    ):
        raise ConfigError(f"target sparsity must be a number in [0, 1), got {target_sparsity!r}")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no metrics.jsonl: not a training run directory")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            epoch, sparsity, acc = int(row["epoch"]), float(row["sparsity"]), float(row["test_acc"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{str(metrics)!r} line {number} is not a metrics row: {exc}") from None
        path = run_dir / "trail" / f"epoch_{epoch:03d}.npz"
        if path.is_file():
            rows.append((epoch, sparsity, acc, path))
    if not rows:
        raise ConfigError(
            f"{str(run_dir)!r} has no trail checkpoints (trail/epoch_NNN.npz); train with method 'ltp' to keep one"
        )
    reaching = [r for r in rows if r[1] >= target_sparsity]
    if not reaching:
        epoch, sparsity, acc, path = max(rows, key=lambda r: (r[1], r[0]))
        raise ConfigError(
            f"no trail checkpoint of {str(run_dir)!r} reaches sparsity {target_sparsity:.2%}; the sparsest is "
            f"epoch {epoch} at {sparsity:.2%} (test accuracy {acc:.2%}, {str(path)!r})"
        )
    return max(reaching, key=lambda r: (r[2], r[1], r[0]))[3]
