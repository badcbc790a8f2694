"""Slimming: physically remove the channels that channel masks switch off.

A model lists its prunable channels as channel groups (``model.channel_groups()``,
:class:`reference.models.common.ChannelGroup`). A BN with a channel mask (SCP,
:mod:`reference.sparsity.channel_pruning`) multiplies its channel ``c`` by the
evaluation mask ``m_c`` in {0, 1}; the mask is applied before the ReLU that
follows, which equals applying it after. :func:`slim` removes, per group, every
channel the masks switch off and then removes the masks, so that in evaluation
mode the slimmed model computes what the masked model computed, up to float
rounding (sums over fewer terms).

Plain group ``producer -> bn -> ReLU -> consumers``. Channel ``c`` is removed
when ``bn``'s mask is 0 at ``c``: the consumers read exactly 0 there, so
deleting the producer's output ``c``, the BN's channel ``c`` and the consumers'
input ``c`` changes nothing (a Linear consumer reads ``c`` through the global
average pool, which maps 0 to 0).

Depthwise chain ``producer -> bn -> ReLU -> depthwise -> depthwise_bn -> ReLU ->
consumer -> consumer_bn`` (MobileNet). A depthwise conv maps channel ``c`` to
channel ``c``, so ``c`` is one channel of all these layers. It is removed when
either mask is 0 at ``c``:

    (a) depthwise_bn's mask is 0: the consumer reads 0 at input ``c``; delete as above.
    (b) bn's mask is 0, depthwise_bn's mask is 1: the depthwise conv sees an
        all-zero channel and outputs its bias (0 without one) everywhere, so
        depthwise_bn + ReLU give a constant
            v_c = max(gamma_c (z_c - mean_c) / sqrt(var_c + eps) + beta_c, 0)     (z_c: the bias or 0)
        at every position. The consumer, a 1x1 conv without padding, adds
        ``W[:, c] v_c`` to every position of its output; batch norm in
        evaluation subtracts its running mean, so
            consumer_bn.running_mean -= W[:, c] v_c                               (fold)
        gives the same output without channel ``c``. (In training the batch
        mean absorbs a constant shift by itself.)

A group whose channels are all switched off keeps one channel, channel 0,
with the affine parameters (gamma, beta) of each BN whose mask is 0 there set
to 0: that BN then outputs exactly 0, as the mask did.

Each layer's shape attributes follow its arrays (Conv2d ``out_channels``,
``in_channels`` and, for a depthwise conv, ``groups``; BatchNorm2d
``num_features``; Linear ``in_features``), so the accounting counts the slimmed
layers. Slimming gives the parameters smaller arrays (the Parameter objects
stay): an optimizer's state from before it no longer fits. :func:`slim_to_state` gives a freshly built
model the shapes of a slimmed state dict and loads it, so a slimmed checkpoint
can be evaluated later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from reference.backend import like, to_host
from reference.errors import CheckpointError, ConfigError
from reference.nn import BatchNorm2d, Conv2d, Linear, Module

__all__ = ["channel_groups", "slim", "slim_to_state"]


# ---------------------------------------------------------------------------
# Groups


def _is_depthwise(conv: Any, channels: int) -> bool:
    return isinstance(conv, Conv2d) and conv.groups == conv.in_channels == conv.out_channels == channels


def _check_group(group, name: str) -> None:
    """Raise ConfigError if ``group``'s layers do not agree on its channel count."""
    c = group.bn.num_features if isinstance(group.bn, BatchNorm2d) else None
    problems = []
    if c is None:
        problems.append("bn is not a BatchNorm2d")
    elif not (
        isinstance(group.producer, Conv2d) and group.producer.groups == 1 and group.producer.out_channels == c
    ):
        problems.append(f"producer must be an ungrouped Conv2d with {c} output channels")
    if c is not None and group.depthwise is not None:
        if not _is_depthwise(group.depthwise, c):
            problems.append(f"depthwise must be a depthwise Conv2d with {c} channels")
        if not (isinstance(group.depthwise_bn, BatchNorm2d) and group.depthwise_bn.num_features == c):
            problems.append(f"depthwise_bn must be a BatchNorm2d with {c} channels")
        (consumer,) = group.consumers if len(group.consumers) == 1 else (None,)
        if not (
            isinstance(consumer, Conv2d)
            and consumer.kernel_size == (1, 1)
            and consumer.padding == (0, 0)
            and isinstance(group.consumer_bn, BatchNorm2d)
            and group.consumer_bn.num_features == consumer.out_channels
        ):
            problems.append(
                "a depthwise chain needs one 1x1 consumer conv without padding and its consumer_bn"
            )
    elif group.depthwise_bn is not None:
        problems.append("depthwise_bn without depthwise")
    if c is not None:
        for consumer in group.consumers:
            ok = (isinstance(consumer, Conv2d) and consumer.groups == 1 and consumer.in_channels == c) or (
                isinstance(consumer, Linear) and consumer.in_features == c
            )
            if not ok:
                problems.append(f"every consumer must be an ungrouped Conv2d or a Linear with {c} inputs")
                break
    if not group.consumers:
        problems.append("no consumers")
    if problems:
        raise ConfigError(f"channel group {name!r}: " + "; ".join(problems))


def channel_groups(model: Module, who: str = "slim") -> list:
    """``model.channel_groups()``, checked; ConfigError if the model does not list any."""
    lister = getattr(model, "channel_groups", None)
    if not callable(lister):
        raise ConfigError(
            f"{who}: {type(model).__name__} does not list its prunable channels "
            "(it has no channel_groups() method); channel pruning needs a model that does"
        )
    groups = list(lister())
    names = {id(m): n for n, m in model.named_modules()}
    for group in groups:
        _check_group(group, names.get(id(group.bn), "?"))
    return groups


# ---------------------------------------------------------------------------
# Resizing layers (keep: integer indices of the channels that stay)


def _take(array: Any, keep: np.ndarray, axis: int) -> Any:
    """The entries ``keep`` along ``axis``: a fresh contiguous array."""
    return array.take(like(keep, array), axis=axis)


def _param(layer: Module, name: str, keep: np.ndarray, axis: int) -> None:
    p = getattr(layer, name)
    if p is not None:  # the same Parameter with a smaller array: names and order stay
        p.data = _take(p.data, keep, axis)
        p.grad = None


def _conv_outputs(conv: Conv2d, keep: np.ndarray) -> None:
    _param(conv, "weight", keep, 0)  # (O, I/g, kh, kw) -> (k, I/g, kh, kw)
    _param(conv, "bias", keep, 0)
    conv.out_channels = len(keep)


def _depthwise(conv: Conv2d, keep: np.ndarray) -> None:
    _conv_outputs(conv, keep)  # (C, 1, kh, kw) -> (k, 1, kh, kw)
    conv.in_channels = conv.groups = len(keep)


def _inputs(layer: Module, keep: np.ndarray) -> None:
    _param(layer, "weight", keep, 1)  # (O, I, kh, kw) -> (O, k, kh, kw), or (out, in) -> (out, k)
    if isinstance(layer, Conv2d):
        layer.in_channels = len(keep)
    else:
        layer.in_features = len(keep)


def _batch_norm(bn: BatchNorm2d, keep: np.ndarray) -> None:
    _param(bn, "weight", keep, 0)
    _param(bn, "bias", keep, 0)
    bn.running_mean = _take(bn.running_mean, keep, 0)
    bn.running_var = _take(bn.running_var, keep, 0)
    bn.num_features = len(keep)


def _resize(group, keep: np.ndarray) -> None:
    """Keep only channels ``keep`` of every layer of ``group``."""
    _conv_outputs(group.producer, keep)
    _batch_norm(group.bn, keep)
    if group.depthwise is not None:
        _depthwise(group.depthwise, keep)
        _batch_norm(group.depthwise_bn, keep)
    for consumer in group.consumers:
        _inputs(consumer, keep)


def _remove_masks(model: Module) -> None:
    for m in list(model.modules()):
        if isinstance(m, BatchNorm2d) and m.channel_mask is not None:
            del m.channel_mask


# ---------------------------------------------------------------------------
# Slimming


def _kept(bn: BatchNorm2d | None) -> np.ndarray | None:
    """The BN's evaluation mask as booleans (True = keep), or None without a mask."""
    if bn is None or bn.channel_mask is None:
        return None
    return np.asarray(bn.channel_mask.kept(bn.weight, bn.bias), dtype=bool)


def _off_value(dw: Conv2d, bn: BatchNorm2d, channels: np.ndarray) -> np.ndarray:
    """v_c of case (b): ReLU(depthwise_bn(depthwise(0))) at ``channels``, in float64."""
    z = np.zeros(len(channels)) if dw.bias is None else to_host(dw.bias.data)[channels].astype(np.float64)
    gamma = to_host(bn.weight.data)[channels].astype(np.float64)
    beta = to_host(bn.bias.data)[channels].astype(np.float64)
    mean = to_host(bn.running_mean)[channels].astype(np.float64)
    var = to_host(bn.running_var)[channels].astype(np.float64)
    return np.maximum(gamma * (z - mean) / np.sqrt(var + bn.eps) + beta, 0.0)


def _zero_affine(bn: BatchNorm2d, channel: int) -> None:
    bn.weight.data[channel] = 0
    bn.bias.data[channel] = 0


def slim(model: Module) -> dict[str, Any]:
    """Remove every channel the evaluation masks switch off, then the masks; see the module docstring.

    Returns ``{"groups": {bn name: {"before": C, "after": kept, "folded": n}},
    "channels_before": total C, "channels_after": total kept}`` (``folded``:
    channels of case (b), whose constant went into the consumer's BN).
    Works in place and returns the summary; the model's train/eval mode is
    unchanged.
    """
    groups = channel_groups(model, who="slim")
    names = {id(m): n for n, m in model.named_modules()}
    # 1. every decision from the masks as they are, before anything changes
    plans = []
    for group in groups:
        c = group.bn.num_features
        on_bn = _kept(group.bn)
        on_bn = np.ones(c, dtype=bool) if on_bn is None else on_bn
        on_dw = _kept(group.depthwise_bn) if group.depthwise is not None else None
        on_dw = np.ones(c, dtype=bool) if on_dw is None else on_dw
        plans.append((group, on_bn, on_dw))
    # 2. folds and zeroed channels, on the full-size arrays
    summary: dict[str, Any] = {"groups": {}, "channels_before": 0, "channels_after": 0}
    keeps = []
    for group, on_bn, on_dw in plans:
        keep = np.flatnonzero(on_bn & on_dw)
        if len(keep) == 0:  # keep channel 0, switched off by zero affine parameters
            keep = np.array([0])
            if not on_bn[0]:
                _zero_affine(group.bn, 0)
            if group.depthwise is not None and not on_dw[0]:
                _zero_affine(group.depthwise_bn, 0)
        folded = np.array([], dtype=np.int64)
        if group.depthwise is not None:
            folded = np.setdiff1d(np.flatnonzero(~on_bn & on_dw), keep)
            if len(folded):
                (consumer,) = group.consumers
                v = _off_value(group.depthwise, group.depthwise_bn, folded)  # (f,)
                w = to_host(consumer.weight.data)[:, folded, 0, 0].astype(
                    np.float64
                )  # (O, C, 1, 1) -> (O, f)
                rm = group.consumer_bn.running_mean
                shift = (w @ v).astype(rm.dtype)  # (O,)
                rm -= like(shift, rm)  # (fold)
        keeps.append(keep)
        name = names.get(id(group.bn), "?")
        c = group.bn.num_features
        summary["groups"][name] = {"before": c, "after": int(len(keep)), "folded": int(len(folded))}
        summary["channels_before"] += c
        summary["channels_after"] += int(len(keep))
    # 3. shapes
    for (group, _, _), keep in zip(plans, keeps):
        if len(keep) < group.bn.num_features:
            _resize(group, keep)
    _remove_masks(model)
    return summary


def slim_to_state(model: Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """Resize a freshly built ``model`` to the channel counts of the slimmed ``state``, then load it.

    The channel count of each group is read from ``state["<bn name>.weight"]``;
    channel masks are removed (the result is the slimmed network). Returns the
    summary of :func:`slim` (without ``folded``). Raises CheckpointError when
    ``state`` does not fit (a missing entry, a group wider than the model, or
    any other mismatch found by ``load_state_dict``).
    """
    groups = channel_groups(model, who="slim_to_state")
    names = {id(m): n for n, m in model.named_modules()}
    summary: dict[str, Any] = {"groups": {}, "channels_before": 0, "channels_after": 0}
    for group in groups:
        name = names.get(id(group.bn), "?")
        key = f"{name}.weight"
        if key not in state:
            raise CheckpointError(f"slim_to_state: the state has no entry {key!r}")
        c, kept = group.bn.num_features, int(np.shape(state[key])[0])
        if not 1 <= kept <= c:
            raise CheckpointError(
                f"slim_to_state: {key!r} has {kept} channels, the model's layer has {c}; "
                "the state does not come from this model"
            )
        if kept < c:
            _resize(group, np.arange(kept))
        summary["groups"][name] = {"before": c, "after": kept}
        summary["channels_before"] += c
        summary["channels_after"] += kept
    _remove_masks(model)
    model.load_state_dict(state, strict=True)
    return summary
