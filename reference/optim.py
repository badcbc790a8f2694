"""Stochastic gradient descent with momentum, Nesterov momentum and coupled L2 decay.

The update, per parameter ``p`` with gradient ``grad`` (PyTorch's SGD with
dampening 0), at step ``t`` (counted per parameter from its first update):

    g = grad + wd * p                                    (1)  coupled L2 decay, before momentum
    buf = g                     if t == 0                (2)
    buf = momentum * buf + g    otherwise                (3)
    d = g + momentum * buf      if nesterov              (4)
    d = buf                     otherwise                (5)
    p = p - lr * d                                       (6)

With ``momentum == 0`` there is no buffer and ``d = g``.

Parameters are :class:`reference.autodiff.Tensor` objects; the update writes
into ``p.data`` in place, in ``p.data``'s dtype, using only array operators and
methods; CuPy parameters get the same update as one fused kernel
(:func:`gpu.optim.sgd_update`). Gradients are only
read, never written: a leaf's ``.grad`` may share memory with an array the
backward pass produced elsewhere.

Parameter groups let one optimizer apply different settings to different sets
of parameters (for example no weight decay on thresholds, another on BN)::

    SGD([{"params": weights, "name": "weights"},
         {"params": bn_params, "name": "bn", "weight_decay": 0.0}],
        lr=0.1, momentum=0.9, weight_decay=5e-4)

A group's own ``lr``, ``momentum``, ``nesterov`` or ``weight_decay`` overrides the
constructor's default for that group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from reference.autodiff import Tensor
from reference.backend import copy_into, is_device_array
from reference.errors import ConfigError

__all__ = ["SGD"]

_HYPER_KEYS = ("lr", "momentum", "nesterov", "weight_decay")
_GROUP_KEYS = frozenset(("params", "name") + _HYPER_KEYS)


def _check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _check_hyper(group: dict[str, Any], where: str) -> None:
    """Validate one group's hyperparameters in place (numbers become floats)."""
    lr = _check_number(group["lr"], f"{where}lr")
    if lr <= 0:
        raise ConfigError(f"{where}lr must be > 0, got {lr!r}")
    momentum = _check_number(group["momentum"], f"{where}momentum")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"{where}momentum must be in [0, 1), got {momentum!r}")
    weight_decay = _check_number(group["weight_decay"], f"{where}weight_decay")
    if weight_decay < 0:
        raise ConfigError(f"{where}weight_decay must be >= 0, got {weight_decay!r}")
    nesterov = group["nesterov"]
    if not isinstance(nesterov, bool):
        raise ConfigError(f"{where}nesterov must be True or False, got {nesterov!r}")
    if nesterov and momentum == 0.0:
        raise ConfigError(f"{where}nesterov=True needs momentum > 0, got momentum={momentum!r}")
    group.update(lr=lr, momentum=momentum, weight_decay=weight_decay)


class SGD:
    """SGD over parameter groups; see the module docstring for the update.

    Attributes:
        param_groups: one dict per group with keys ``params`` (list of Tensors),
            ``name``, ``lr``, ``momentum``, ``nesterov``, ``weight_decay``.
    """

    def __init__(
        self,
        params_or_groups: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        _check_hyper(dict(defaults), "SGD: ")
        items = list(params_or_groups)
        if not items:
            raise ConfigError("SGD: expected a non-empty list of parameters or parameter groups, got none")
        if all(isinstance(item, dict) for item in items):
            raw_groups = items
        elif not any(isinstance(item, dict) for item in items):
            raw_groups = [{"params": items}]
        else:
            raise ConfigError("SGD: expected either a list of Tensors or a list of group dicts, not a mix")

        self.param_groups: list[dict[str, Any]] = []
        seen: dict[int, str] = {}
        for index, raw in enumerate(raw_groups):
            unknown = set(raw) - _GROUP_KEYS
            if unknown:
                raise ConfigError(
                    f"SGD: group {index} has unknown keys {sorted(unknown)}; expected some of {sorted(_GROUP_KEYS)}"
                )
            if "params" not in raw:
                raise ConfigError(f"SGD: group {index} has no 'params' entry")
            group = {**defaults, "name": f"group{index}", **raw}
            name = group["name"]
            if not isinstance(name, str):
                raise ConfigError(f"SGD: group {index} name must be a string, got {name!r}")
            params = group["params"]
            if isinstance(params, Tensor):
                raise ConfigError(f"SGD: group {name!r} 'params' must be a list of Tensors, got one Tensor")
            params = list(params)
            for p in params:
                if not isinstance(p, Tensor):
                    raise ConfigError(
                        f"SGD: group {name!r} holds a {type(p).__name__}, expected reference.autodiff.Tensor"
                    )
                if id(p) in seen:
                    raise ConfigError(
                        f"SGD: a parameter of shape {p.shape} appears twice (groups {seen[id(p)]!r} and {name!r})"
                    )
                seen[id(p)] = name
            group["params"] = params
            _check_hyper(group, f"SGD group {name!r}: ")
            self.param_groups.append(group)
        if not seen:
            raise ConfigError("SGD: the parameter groups hold no parameters")
        # Momentum buffers, keyed by (group index, parameter index).
        self._buffers: dict[tuple[int, int], Any] = {}

    # ----------------------------------------------------------------- update
    def step(self) -> None:
        """Apply one update (1)-(6) to every parameter whose ``grad`` is not None."""
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            momentum = group["momentum"]
            nesterov = group["nesterov"]
            weight_decay = group["weight_decay"]
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                data = p.data
                if tuple(grad.shape) != tuple(data.shape):
                    raise ConfigError(
                        f"SGD: parameter {pi} of group {group['name']!r} has shape {tuple(data.shape)} "
                        f"but its grad has shape {tuple(grad.shape)}"
                    )
                if is_device_array(data):  # one fused kernel on the GPU: the same (1)-(6)
                    from gpu.optim import sgd_update

                    buf = sgd_update(
                        data,
                        grad,
                        self._buffers.get((gi, pi)),
                        lr=lr,
                        weight_decay=weight_decay,
                        momentum=momentum,
                        nesterov=nesterov,
                    )
                    if buf is not None:
                        self._buffers[(gi, pi)] = buf
                    continue
                g = grad if grad.dtype == data.dtype else grad.astype(data.dtype)
                if weight_decay != 0.0:
                    g = g + weight_decay * data  # (1)
                if momentum != 0.0:
                    buf = self._buffers.get((gi, pi))
                    if buf is None:
                        # (2) a new array: g may be the grad array itself, or a NumPy scalar for a 0-d
                        # parameter (0-d arithmetic returns scalars, which cannot be updated in place)
                        buf = data.copy()
                        buf[...] = g
                        self._buffers[(gi, pi)] = buf
                    else:
                        buf *= momentum  # (3)
                        buf += g
                    g = g + momentum * buf if nesterov else buf  # (4) / (5)
                data -= lr * g  # (6)

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (``grad = None``; the next backward starts afresh)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every group (schedules call this each epoch or step)."""
        lr = _check_number(lr, "SGD.set_lr: lr")
        if lr <= 0:
            raise ConfigError(f"SGD.set_lr: lr must be > 0, got {lr!r}")
        for group in self.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the optimizer: hyperparameters and momentum buffers.

        Returns ``{"groups": [...], "momentum_buffers": {...}}``. Each entry of
        ``groups`` holds a group's ``name``, ``lr``, ``momentum``, ``nesterov``,
        ``weight_decay`` and ``num_params``. ``momentum_buffers`` maps
        ``"<group index>.<param index>"`` to a copy of that buffer (same array
        type and dtype as the parameter); parameters that have not been updated
        yet have no entry. Nothing in the snapshot aliases live state.
        """
        groups = [
            {
                "name": group["name"],
                **{key: group[key] for key in _HYPER_KEYS},
                "num_params": len(group["params"]),
            }
            for group in self.param_groups
        ]
        buffers = {f"{gi}.{pi}": buf.copy() for (gi, pi), buf in sorted(self._buffers.items())}
        return {"groups": groups, "momentum_buffers": buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot taken from an optimizer over the same parameters.

        Checks that the number of groups, their names and sizes, and every
        buffer's index and shape match; raises ConfigError (and changes
        nothing) otherwise. Buffers are copied into the parameter's array type
        and dtype, so a snapshot saved from host memory loads onto either backend.
        """
        if not isinstance(state, dict) or set(state) != {"groups", "momentum_buffers"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"SGD.load_state_dict: expected keys ['groups', 'momentum_buffers'], got {got}")
        groups = list(state["groups"])
        if len(groups) != len(self.param_groups):
            raise ConfigError(
                f"SGD.load_state_dict: the state has {len(groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        new_hyper = []
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            missing = [key for key in ("name", "num_params", *_HYPER_KEYS) if key not in saved]
            if missing:
                raise ConfigError(f"SGD.load_state_dict: group {gi} lacks {missing}")
            if saved["name"] != group["name"]:
                raise ConfigError(
                    f"SGD.load_state_dict: group {gi} is named {saved['name']!r} in the state, "
                    f"{group['name']!r} here"
                )
            if saved["num_params"] != len(group["params"]):
                raise ConfigError(
                    f"SGD.load_state_dict: group {group['name']!r} has {saved['num_params']} parameters "
                    f"in the state, {len(group['params'])} here"
                )
            hyper = {key: saved[key] for key in _HYPER_KEYS}
            _check_hyper(hyper, f"SGD.load_state_dict group {group['name']!r}: ")
            new_hyper.append(hyper)

        new_buffers: dict[tuple[int, int], Any] = {}
        for key, value in dict(state["momentum_buffers"]).items():
            gi, pi = self._parse_key(key)
            p = self.param_groups[gi]["params"][pi]
            if tuple(value.shape) != p.shape:
                raise ConfigError(
                    f"SGD.load_state_dict: momentum buffer {key!r} has shape {tuple(value.shape)}, "
                    f"expected {p.shape} (the parameter's shape)"
                )
            if new_hyper[gi]["momentum"] == 0.0:
                raise ConfigError(
                    f"SGD.load_state_dict: momentum buffer {key!r} given for group "
                    f"{self.param_groups[gi]['name']!r}, which has momentum 0"
                )
            buffer = p.data.copy()  # an array of the parameter's kind, dtype and device
            copy_into(buffer, value)
            new_buffers[(gi, pi)] = buffer

        for group, hyper in zip(self.param_groups, new_hyper):
            group.update(hyper)
        self._buffers = new_buffers

    def _parse_key(self, key: Any) -> tuple[int, int]:
        parts = key.split(".") if isinstance(key, str) else []
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ConfigError(
                f"SGD.load_state_dict: momentum buffer key {key!r} is not '<group index>.<param index>'"
            )
        gi, pi = int(parts[0]), int(parts[1])
        if gi >= len(self.param_groups) or pi >= len(self.param_groups[gi]["params"]):
            raise ConfigError(f"SGD.load_state_dict: momentum buffer key {key!r} names no parameter here")
        return gi, pi
