"""SCP: operation-aware soft channel pruning (Kang & Han, ICML 2020), as a training-loop plugin.

Per channel ``c`` of a batch norm that feeds a ReLU, with scale ``gamma_c`` and
shift ``beta_c`` (no extra parameters):

    P_c = Phi((eps - beta_c) / (|gamma_c| + 1e-8))        chance that BN + ReLU leaves c (almost) off  (1)
    training:   m_c = sigmoid((k (c0 - P_c) + L_c) / t),  L_c logistic noise, one draw per step       (2)
    evaluation: m_c = [P_c <= c0]                                                                     (3)
    out = ReLU(BN(x)) * m_c                                mask after the ReLU                        (4)
    L_total = CE + lambda * sum_c (beta_c + s |gamma_c|) + weight decay (gamma, not beta)              (5)

(1)-(3) are the kernel :func:`reference.functional.scp_channel_mask`. (4): a
:class:`ChannelMask` is installed as ``bn.channel_mask`` and the batch norm
multiplies its output by the mask; since ``m >= 0``, ``ReLU(BN(x) m) = ReLU(BN(x)) m``.
In training only the channels whose sampled decision is "keep" (``m_c > 0.5``)
update the BN's running statistics. (5): :meth:`SCP.regularization` and
:meth:`SCP.param_groups`. The subgradient of ``|gamma|`` at 0 is that of
:func:`reference.functional.abs`.

Noise: :meth:`SCP.before_step` draws ``L`` (the standard logistic,
``log U - log(1 - U)``) for every mask from the step context's generator, which
depends on (seed, epoch) only, so a resumed run draws the same numbers. A
mask in training mode refuses to run without noise.

Which channels are prunable: those the model lists in ``channel_groups()``
(:class:`reference.models.common.ChannelGroup`): every BN followed directly by
a ReLU whose channels can be removed on their own. In the digits CNN that is
every BN; in MobileNetV1 every BN (a pointwise conv's channels go through the
next depthwise conv, whose BN is masked too, see
:mod:`reference.sparsity.slimming`); in the ResNets the BNs inside each block
(bn1 of a basic block, bn1 and bn2 of a bottleneck). The residual stream (the
stem's BN, each block's last BN, the projection shortcuts' BNs) is not
masked: its channels are added across blocks, so a channel could only be
removed from all of them at once; it stays dense.

:meth:`SCP.end_epoch` reports per masked BN the channels the evaluation mask
keeps, and for the model as a whole the channels and conv+fc weights that
slimming would keep (``sparsity`` = fraction of conv+fc weights it would
remove) and, when the input size is known, the MACs per image before and
after slimming.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.backend import like, to_host
from reference.errors import ConfigError
from reference.nn import BatchNorm2d, Conv2d, Module, weight_layers
from reference.sparsity.base import SparsityMethod, StepContext
from reference.sparsity.slimming import channel_groups, slim

__all__ = ["SCP", "ChannelMask", "from_config", "masked_batch_norms"]


class ChannelMask(Module):
    """The SCP mask of one batch norm's channels: ``(gamma, beta) -> m`` of shape (C,), (1)-(3).

    Hyperparameters are attributes, not state: the state dict of a masked model
    equals that of the plain one. ``noise`` holds the logistic draw ``L`` of
    (2) for the next training forward (set by :meth:`set_noise`).
    """

    def __init__(self, channels: int, *, k: float, c0: float, t: float, eps: float):
        super().__init__()
        self.channels = int(channels)
        self.k, self.c0, self.t, self.eps = float(k), float(c0), float(t), float(eps)
        self.noise: np.ndarray | None = None

    def set_noise(self, noise: np.ndarray) -> None:
        """The logistic noise ``L`` (shape (C,)) that the next training forwards use."""
        noise = np.asarray(noise)
        if noise.shape != (self.channels,):
            raise ConfigError(
                f"ChannelMask({self.channels}): noise must have shape ({self.channels},), got {noise.shape}"
            )
        self.noise = noise

    def forward(self, gamma: Tensor, beta: Tensor) -> Tensor:
        if self.training:
            if self.noise is None:
                raise ConfigError(
                    "ChannelMask: no noise for this training step; SCP.before_step(model, ctx) draws it "
                    "(or call set_noise), or switch the model to eval()"
                )
            noise = self.noise.astype(gamma.dtype, copy=False)
        else:
            noise = np.zeros(self.channels, dtype=gamma.dtype)  # unused by (3)
        return F.scp_channel_mask(
            gamma, beta, like(noise, gamma.data),
            k=self.k, c0=self.c0, t=self.t, eps=self.eps, training=self.training,
        )  # fmt: skip

    def kept(self, gamma: Tensor, beta: Tensor) -> np.ndarray:
        """The evaluation decisions (3) as a boolean (C,) NumPy array: True = keep."""
        with no_grad():
            m = F.scp_channel_mask(
                gamma, beta, like(np.zeros(self.channels, dtype=gamma.dtype), gamma.data),
                k=self.k, c0=self.c0, t=self.t, eps=self.eps, training=False,
            )  # fmt: skip
        return to_host(m.data) > 0.5

    def extra_repr(self) -> str:
        return f"{self.channels}, k={self.k:g}, c0={self.c0:g}, t={self.t:g}, eps={self.eps:g}"


def masked_batch_norms(model: Module) -> list[tuple[str, BatchNorm2d]]:
    """(name, BN) for every batch norm of ``model`` that carries a channel mask, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, BatchNorm2d) and m.channel_mask is not None
    ]


def _check_number(value: Any, name: str, ok, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"SCP: {name} must be {expected}, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and ok(value)):
        raise ConfigError(f"SCP: {name} must be {expected}, got {value!r}")
    return value


class SCP(SparsityMethod):
    """Soft channel pruning; see the module docstring.

    ``lam``, ``eps``, ``k``, ``c0``, ``t``, ``s``: the settings of (1)-(5).
    ``input_size``: the (H, W) of the training images, for the MAC counts in
    :meth:`end_epoch` (None: no MAC counts).

    The pull of (5) on a BN's parameters per step is ``lr * lam`` (times
    ``s`` for gamma, amplified by momentum), so what prunes is roughly
    ``lam`` times the number of steps: the default 5e-5 (the published
    CIFAR-10 ResNet-56 setting, 160 epochs of about 780 steps) prunes nothing
    in the 675 steps of the 15-epoch digits run, where ``lam`` near 8e-3 is
    needed (and 3e-2 switches every channel off).
    """

    name = "scp"
    # end_epoch's "sparsity" is the fraction of conv+fc weights slimming removes; the weights
    # themselves have no zeros (their weight sparsity, as the report shows it, is 0 until finalize)
    sparsity_label = "weights slimmed"

    def __init__(
        self,
        lam: float = 5e-5,
        eps: float = 0.05,
        k: float = 20.0,
        c0: float = 0.95,
        t: float = 0.5,
        s: float = 2.0,
        *,
        input_size: tuple[int, int] | None = None,
    ):
        self.lam = _check_number(lam, "lambda", lambda v: v >= 0, "a non-negative number")
        self.eps = _check_number(eps, "eps", lambda v: v >= 0, "a non-negative number")
        self.k = _check_number(k, "k", lambda v: v > 0, "a positive number")
        self.c0 = _check_number(c0, "c0", lambda v: 0 < v < 1, "in (0, 1)")
        self.t = _check_number(t, "t", lambda v: v > 0, "a positive temperature")
        self.s = _check_number(s, "s", lambda v: v >= 0, "a non-negative number")
        if input_size is not None:
            input_size = tuple(int(d) for d in input_size)
            if len(input_size) != 2 or min(input_size) < 1:
                raise ConfigError(f"SCP: input_size must be (H, W) with positive sides, got {input_size!r}")
        self.input_size = input_size

    # ------------------------------------------------------------------ hooks
    def attach(self, model: Module) -> None:
        """Install a :class:`ChannelMask` on every prunable BN (the BNs of ``model.channel_groups()``)."""
        groups = channel_groups(model, who="SCP")
        if not groups:
            raise ConfigError(
                f"SCP: {type(model).__name__} has no prunable channels (channel_groups() is empty): "
                "SCP needs batch norms followed directly by a ReLU"
            )
        seen: set[int] = set()
        for group in groups:
            for bn in (group.bn, group.depthwise_bn):
                if bn is None or id(bn) in seen:
                    continue
                seen.add(id(bn))
                bn.channel_mask = ChannelMask(bn.num_features, k=self.k, c0=self.c0, t=self.t, eps=self.eps)

    def param_groups(self, model: Module, config) -> list[dict[str, Any]]:
        """Masked BNs' shifts ``beta`` without weight decay (5); everything else with ``weight_decay``."""
        betas = {id(bn.bias) for _, bn in masked_batch_norms(model)}
        rest = [p for p in model.parameters() if id(p) not in betas]
        shifts = [p for p in model.parameters() if id(p) in betas]
        groups = [{"params": rest, "weight_decay": config.weight_decay, "name": "weights"}]
        if shifts:
            groups.append({"params": shifts, "weight_decay": 0.0, "name": "scp_beta"})
        return groups

    def regularization(self, model: Module) -> Tensor | None:
        """``lambda * sum over masked BNs of sum_c (beta_c + s |gamma_c|)``, (5); None when lambda is 0."""
        if self.lam == 0:
            return None
        total = None
        for _, bn in masked_batch_norms(model):
            term = F.sum(bn.bias)
            if self.s != 0:
                term = term + F.sum(F.abs(bn.weight)) * self.s
            total = term if total is None else total + term
        return None if total is None else total * self.lam

    def before_step(self, model: Module, ctx: StepContext) -> None:
        """Draw the logistic noise ``L`` of (2) for every mask, in module order, from ``ctx.rng``."""
        for _, bn in masked_batch_norms(model):
            mask = bn.channel_mask
            mask.set_noise(ctx.rng.logistic(size=mask.channels).astype(bn.weight.dtype))

    def end_epoch(self, model: Module, ctx: StepContext) -> dict[str, Any]:
        """Channels kept per masked BN and overall, weights and MACs before and after slimming.

        Keys: ``layers`` (per masked BN: ``channels``, ``kept`` by the
        evaluation mask, ``kept_fraction``); ``channels_total`` and
        ``channels_kept`` over the channel groups as :func:`slim` counts them
        (a group with every channel off keeps one); ``weights`` and
        ``weights_kept`` (conv+fc weights before and after slimming) and
        ``sparsity`` = 1 - weights_kept / weights; with an input size also
        ``dense_macs``, ``masked_macs`` (of the slimmed network) and ``macs_fraction``.
        """
        layers = {}
        for name, bn in masked_batch_norms(model):
            kept = int(bn.channel_mask.kept(bn.weight, bn.bias).sum())
            layers[name] = {
                "channels": bn.num_features,
                "kept": kept,
                "kept_fraction": kept / bn.num_features,
            }
        slimmed = model.host_copy()
        summary = slim(slimmed)
        dense_weights = sum(int(layer.weight.size) for _, layer in weight_layers(model))
        slim_weights = sum(int(layer.weight.size) for _, layer in weight_layers(slimmed))
        stats: dict[str, Any] = {
            "sparsity": 1.0 - slim_weights / max(dense_weights, 1),
            "channels_total": summary["channels_before"],
            "channels_kept": summary["channels_after"],
            "channels_kept_fraction": summary["channels_after"] / max(summary["channels_before"], 1),
            "weights": dense_weights,
            "weights_kept": slim_weights,
        }
        if self.input_size is not None:
            from reference.accounting import profile, totals

            first = next(m for m in model.modules() if isinstance(m, Conv2d))
            shape = (first.in_channels, *self.input_size)
            dense = totals(profile(model, shape)).dense_macs
            masked = totals(profile(slimmed, shape)).dense_macs
            stats.update(dense_macs=dense, masked_macs=masked, macs_fraction=masked / max(dense, 1))
        stats["layers"] = layers
        return stats


def _image_size(config) -> tuple[int, int] | None:
    """The (H, W) of the images of ``config``'s data set (None for a data set not listed here)."""
    # the fixed sizes of reference.data's data sets (a method may not import the data layer)
    sizes = {"digits": 8, "digits32": 32, "cifar10": 32, "synthetic": config.image_size}
    size = sizes.get(config.dataset)
    return None if size is None else (size, size)


def from_config(config) -> SCP:
    """The :class:`SCP` a :class:`~reference.config.TrainConfig` asks for (``scp_*`` settings)."""
    return SCP(
        lam=config.scp_lambda,
        eps=config.scp_eps,
        k=config.scp_k,
        c0=config.scp_c0,
        t=config.scp_t,
        s=config.scp_s,
        input_size=_image_size(config),
    )
