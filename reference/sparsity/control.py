"""Asking STR and LTP for a sparsity: a target ramp and a PID controller on a signed log-strength.

STR and LTP learn their thresholds; how sparse the result is follows only
indirectly from a regularization strength (STR: the weight decay on the
threshold parameters ``s``; LTP: the weight ``lambda`` of the L0 term). The
map from strength to final sparsity depends on the model, the data, the
learning rate and the number of steps, so a user who wants "90 %" cannot set
it by hand. :class:`TargetController` closes the loop: it measures the
sparsity after every optimizer step and moves the strength so that the
measured sparsity follows a ramp to the target.

The ramp (the cubic of gradual magnitude pruning, Zhu & Gupta), with ``p`` the
fraction of training done and ``p_end`` (default 2/3) where it reaches the
target::

    r(p) = target * (1 - (1 - min(p / p_end, 1))^3)                          (1)

The error, in log-density (density = 1 - sparsity), with ``delta = 1e-3``::

    e = log((1 - s_measured + delta) / (1 - r(p) + delta))                    (2)

``e > 0``: the model is denser than the ramp asks. Log-density weighs a miss by
its relative size where it matters: 96 % instead of 98 % keeps twice the
weights, an error of log 2; around 50 % it is the absolute error up to a factor 2.

The control law, on a signed log-strength ``u``, with ``e_prev`` the previous
update's error::

    I'   = clip(I + ki * m * e, -u_max, u_max),  m = unwind if I e < 0 else 1 (3)
    goal = 1 + kp * e + I' + kd * (e - e_prev)                                (4)
    step = clip(goal - u, min(-max_step, 1 - u), max_step)                    (5)
    u    = clip(u + step, -u_max, u_max)
    I    = I if step != goal - u else I'                                      (5a)
    strength = strength0 * sinh(u) / sinh(1)                                  (6)

(3): the integral moves ``unwind`` (default 10) times faster back toward 0
than away from it, and an unwinding integral stops at 0 rather than cross it.
``u`` starts at 1 (``strength = strength0``) and ``u_max = asinh(limit sinh(1))``
bounds ``|strength|`` by ``limit * strength0``. The step (5) rises by at most
``max_step``; it falls by at most ``max_step`` too, except that a strength above
its start may fall straight back to the start (``u = 1``) in one update. (5a):
while the step is rate-limited, the integral keeps its value.

Why this design (each choice was needed on the digits CNN, 15 epochs,
targets 0.5 / 0.8 / 0.9; both methods end within about one point of the target):

- Log-space: the right strength is unknown by orders of magnitude (in one STR
  run to 90 % the decay on ``s`` went from 1e-3 up to 0.16 and back to 2e-3 as
  the task gradient on ``s`` changed over training; LTP's lambda scales with
  layer sizes and weight scales). Away from 0, (6) is ``~ exp(|u|)``: equal steps in ``u`` are
  equal relative changes, so any scale is reached in a number of updates
  logarithmic in the mismatch.
- Signed: both methods have a ratchet (pruned weights get no task gradient
  and weight decay shrinks them further), so sparsity can drift above the
  ramp with the strength at zero, and a controller that can only weaken the
  push cannot bring it back. ``sinh`` passes smoothly through 0, so a negative
  strength (STR: a decay pushing ``s`` away from 0; LTP: a reward for density)
  pulls thresholds down.
- A ramp rather than the target from step 0: the network adapts while it thins
  out (as in gradual magnitude pruning), and the last third of training runs at
  the target to recover accuracy.
- P + I: the plant (strength -> speed of the thresholds -> sparsity) acts like
  an integrator whose gain changes over training; P follows the ramp, I
  removes the offset where a push must be held against the task gradient.
- D (on the error, whose change is smooth: the measurement is a deterministic
  function of the weights, not a noisy batch statistic): STR's sparsity
  responds late and then fast; the derivative term cuts the push as soon as
  the sparsity starts to run. Without it an STR run to 90 % jumped from 28 % to
  65 % in one epoch, past the ramp's 59 % (test accuracy fell to 87 %); with
  ``kd = 200`` it went to 56 % and stayed above 92 %.
- The rate limit (5) and the bounds (3), (5) are anti-windup: while the plant
  does not respond (STR with ``sigmoid(s)`` far below the weights' scale), the
  strength grows by at most ``exp(max_step)`` per update and never past
  ``limit`` times its start.
- Conditional integration (5a) and the fast fall in (5), both for short runs:
  STR from ``s_init = -5`` prunes nothing until ``sigmoid(s)`` reaches the
  weights' scale, so the error stays large while the strength climbs at the
  rate limit. Integrating that error as well (the integral then grew to its
  bound) and falling back only ``max_step`` per update made a 3-epoch
  ResNet-20 run asked for 80 % jump from 13 % to 98 % within ten steps and stay
  at 91 % (61 % test accuracy): the push kept rising for as long as it had
  risen. With (5a) the integral holds only what the free steps needed, and
  once the sparsity runs, the strength returns to its start in one update.
- Unwinding (3), against overshoot: while the sparsity lags behind the ramp
  (STR's first epochs) the integral winds up, and at the plain rate it took
  longer to wind down than the run had left: a 5-epoch ResNet-20 run asked for
  80 % crossed the target with the integral at 3.9 and, still pushed at 15
  times the starting strength, crept on to 82.2 %. Unwinding ten times faster
  lands that run at 81.7 %, the 3-epoch one at 80.6 % (was 81.6 %), and the
  digits CNN's 15-epoch runs within 0.6 points of 50, 80 and 90 % for STR
  (was up to 1.8 points over) and 0.1 for LTP, at equal or better accuracy.
  Stopping at 0 matters: crossing it at the faster rate, the integral jumped
  from -0.002 to +2.7 in the update where a short run's sparsity started to
  run, and the run ended at 86 %.
- Cheap: the measurement is one comparison per weight (``|W| <= g`` for STR,
  ``W^2 <= tau`` for LTP) after each step; the rest is a few float operations.
- On the device, every step, with no read: on the GPU the measurement (a count
  summed over the layers on the device), the state and the arithmetic (2)-(6)
  stay in GPU memory as 0-d float64 arrays, and the strength reaches the loss
  as a 0-d array, so the controller never waits for the GPU. The alternative,
  updating every K steps after one read of all layers' counts, was rejected:
  the gains above were tuned per step (``kd`` acts on the change between
  updates, ``max_step`` and ``ki`` are per update), so a coarser update would
  need other gains and would steer a GPU run differently from a CPU run. On
  the CPU the state stays Python floats (the arithmetic of ``math``); the same
  code runs on both, dispatching only ``log``, ``sinh`` and ``clip``
  (:meth:`TargetController.place` moves the state to the weights' device).
- Deterministic and resumable: the state is five numbers
  (:meth:`TargetController.state_dict` gives Python numbers, reading them from
  the device when they live there), saved with the method's state in every
  checkpoint (JSON keeps Python floats exactly); the measurement is a count of
  integers, so a resumed run repeats the uninterrupted one bit for bit (on the
  GPU too: the restored state is placed on the device before its first use, so
  every value goes through the same device arithmetic as in the uninterrupted run).

The methods apply the strength as a loss term: for STR the extra decay
``(strength - d) * 0.5 * sum(s^2)`` on top of the optimizer's decay ``d`` on the
threshold group, so the total coupled decay on ``s`` is ``strength`` (the
gradient of ``0.5 c s^2`` is ``c s``, exactly the optimizer's coupled decay,
before momentum); for LTP ``strength`` is lambda in ``lambda * sum L0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reference.backend import array_module, is_device_array, to_host
from reference.errors import CheckpointError, ConfigError

__all__ = ["TargetController", "cubic_ramp", "load_controller_state"]

DENSITY_FLOOR = 1e-3  # delta in (2)
_STATE_KEYS = ("u", "integral", "error", "measured", "updates")


# The arithmetic of (2)-(6) on a Python float (the CPU: ``math``) or a 0-d array
# (the GPU: the array's own module, so nothing is read back to the host).


def _is_array(x: Any) -> bool:
    """A NumPy or device array or a NumPy scalar (Python floats take the ``math`` path)."""
    return isinstance(x, (np.ndarray, np.generic)) or is_device_array(x)


def _log(x: Any) -> Any:
    return array_module(x).log(x) if _is_array(x) else math.log(x)


def _sinh(x: Any) -> Any:
    return array_module(x).sinh(x) if _is_array(x) else math.sinh(x)


def _clip(x: Any, low: float, high: float) -> Any:
    """``min(max(x, low), high)``; for an array, the element-wise select (no comparison read on the host)."""
    if _is_array(x):
        xp = array_module(x)
        return xp.minimum(xp.maximum(x, low), high)
    return min(max(x, low), high)


def _minimum(a: Any, b: Any) -> Any:
    """``min(a, b)`` (for arrays, element-wise)."""
    return array_module(b).minimum(a, b) if _is_array(b) else min(a, b)


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    """``if_true if condition else if_false``; for an array condition, the element-wise select."""
    if _is_array(condition):
        return array_module(condition).where(condition, if_true, if_false)
    return if_true if condition else if_false


def _number(x: Any) -> float:
    """A state value as a Python float (a device value is read back: checkpoints and logs only)."""
    return float(to_host(x)) if _is_array(x) else float(x)


def cubic_ramp(progress: float, target: float, ramp_end: float) -> float:
    """Equation (1): the target sparsity after ``progress`` (fraction of training done)."""
    if ramp_end <= 0.0:
        return target
    x = min(max(progress / ramp_end, 0.0), 1.0)
    return target * (1.0 - (1.0 - x) ** 3)


class TargetController:
    """Moves a regularization strength so that a measured sparsity follows the ramp (1).

    Args:
        target: the requested final sparsity, in [0, 1).
        strength0: the strength at the start (``u = 1``), > 0.
        ramp_end: fraction of training at which the ramp reaches ``target``.
        kp, ki, kd: proportional, integral (per update) and derivative gains of
            (3)-(4), in units of ``u`` per unit of the error (2).
        max_step: the largest change of ``u`` in one update (5).
        limit: ``|strength|`` stays at most ``limit * strength0``.
        every: update after every ``every``-th optimizer step.
        unwind: how many times faster the integral moves back toward 0 than
            away from it (3); 1 is the plain integral.
    """

    def __init__(
        self,
        target: float,
        strength0: float,
        *,
        ramp_end: float = 2.0 / 3.0,
        kp: float = 5.0,
        ki: float = 0.3,
        kd: float = 200.0,
        max_step: float = 0.2,
        limit: float = 1e4,
        every: int = 1,
        unwind: float = 10.0,
    ) -> None:
        checks = (
            (isinstance(target, (int, float)) and 0.0 <= target < 1.0, "target", "in [0, 1)"),
            (isinstance(strength0, (int, float)) and 0.0 < strength0 < math.inf, "strength0", "positive"),
            (0.0 <= ramp_end <= 1.0, "ramp_end", "in [0, 1]"),
            (min(kp, ki, kd) >= 0, "kp, ki and kd", "non-negative"),
            (max_step > 0, "max_step", "positive"),
            (limit >= 1, "limit", "at least 1"),
            (isinstance(every, int) and every >= 1, "every", "a positive integer"),
            (unwind >= 1, "unwind", "at least 1"),
        )
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"TargetController: {name} must be {expected}")
        self.target = float(target)
        self.strength0 = float(strength0)
        self.ramp_end = float(ramp_end)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.max_step = float(max_step)
        self.u_max = math.asinh(limit * math.sinh(1.0))
        self.every = every
        self.unwind = float(unwind)
        # state
        self.u = 1.0  # (6): strength0 at the start
        self.integral = 0.0  # I of (3)
        self.error = 0.0  # e_prev of (4)
        self.measured = 0.0  # the last measured sparsity
        self.updates = 0

    @property
    def strength(self) -> Any:
        """Equation (6): the current strength (negative: a push toward density).

        A Python float on the CPU, a 0-d float64 array where the state lives on
        the GPU (see :meth:`place`).
        """
        return self.strength0 * _sinh(self.u) / math.sinh(1.0)

    def place(self, like: Any) -> None:
        """Keep the state where ``like`` (an array of the model, e.g. a weight) lives.

        For a device array, state values still on the host (a new controller,
        one restored from a checkpoint) become 0-d float64 device arrays, a copy
        to the device and no read; for a host array, device values come back as
        Python floats. The methods call this before every use, so the state
        follows the model when it is moved.
        """
        on_device = is_device_array(like)
        for key in _STATE_KEYS[:-1]:  # "updates" is a count the host keeps
            value = getattr(self, key)
            if on_device and not is_device_array(value):
                setattr(self, key, array_module(like).asarray(value, dtype=np.float64))
            elif not on_device and _is_array(value):
                setattr(self, key, _number(value))

    def ramp(self, progress: float) -> float:
        """Equation (1) for this controller's target and ramp end."""
        return cubic_ramp(progress, self.target, self.ramp_end)

    def due(self, global_step: int) -> bool:
        """Whether the update after optimizer step ``global_step`` (0-based) is one of every ``every``."""
        return (global_step + 1) % self.every == 0

    def update(self, measured: Any, progress: float) -> Any:
        """Equations (2)-(6) for sparsity ``measured`` at ``progress``; returns the new strength.

        ``measured`` is a Python float, or a 0-d array on the device where the
        model lives (the state then follows it there and nothing is read back).
        ``progress`` is a host number (it depends only on the step count).
        """
        wanted = self.ramp(progress)
        error = _log((1.0 - measured + DENSITY_FLOOR) / (1.0 - wanted + DENSITY_FLOOR))  # (2)
        unwinding = self.integral * error < 0  # the error pulls the integral back toward 0
        integral = self.integral + self.ki * _select(unwinding, self.unwind, 1.0) * error  # (3)
        # (3): an unwinding integral stops at 0 rather than cross it at the faster rate
        integral = _select(unwinding & (integral * self.integral < 0), 0.0, integral)
        integral = _clip(integral, -self.u_max, self.u_max)  # (3)
        change = 0.0 if self.updates == 0 else error - self.error
        goal = 1.0 + self.kp * error + integral + self.kd * change  # (4)
        wanted_step = goal - self.u
        step = _clip(wanted_step, _minimum(-self.max_step, 1.0 - self.u), self.max_step)  # (5)
        self.u = _clip(self.u + step, -self.u_max, self.u_max)  # (5)
        self.integral = _select(step == wanted_step, integral, self.integral)  # (5a)
        self.error = error
        self.measured = measured if _is_array(measured) else float(measured)
        self.updates += 1
        return self.strength

    def state_dict(self) -> dict[str, Any]:
        """The controller's state as plain Python numbers (device values are read back)."""
        state: dict[str, Any] = {key: _number(getattr(self, key)) for key in _STATE_KEYS[:-1]}
        state["updates"] = int(self.updates)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"target controller state: expected keys {list(_STATE_KEYS)}, got {got}")
        self.u = float(state["u"])
        self.integral = float(state["integral"])
        self.error = float(state["error"])
        self.measured = float(state["measured"])
        self.updates = int(state["updates"])

    def log_row(self, progress: float) -> dict[str, float]:
        """What end_epoch reports about the controller: the ramp now, the strength and its factor."""
        strength = _number(self.strength)
        return {
            "ramp_sparsity": self.ramp(progress),
            "strength": strength,
            "strength_factor": strength / self.strength0,
        }


def load_controller_state(controller: TargetController | None, state: dict[str, Any], who: str) -> None:
    """Restore ``controller`` (None: the method has none) from a method's state dict ``{"controller": ...}``."""
    saved = (state or {}).get("controller")
    if controller is None:
        if saved is not None:
            raise CheckpointError(
                f"{who}: the checkpoint holds a target controller but no target_sparsity is set"
            )
        return
    if saved is None:
        raise CheckpointError(f"{who}: target_sparsity is set but the checkpoint holds no controller state")
    controller.load_state_dict(saved)
