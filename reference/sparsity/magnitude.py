"""Magnitude pruning and gradual magnitude pruning (GMP): the baselines.

Every weight layer (each conv and the classifier, see
:func:`reference.nn.weight_layers`) gets a :class:`FixedMask` sparsifier::

    W_eff = W * M,      M in {0, 1}, same shape as W                      (1)
    dW    = G * M       (G = dL/dW_eff; the mask is a constant)          (2)

The mask is a buffer (``<layer>.sparsifier.mask`` in the state dict), so a
checkpoint carries it and a resumed run continues with the same masks and no
extra method state.

Choosing the mask (recomputed only at the schedule's update steps):

    per layer:  keep the k = round((1 - s) * n) entries of largest |W|,   (3)
                at least 1 (a layer is never emptied by (3));
    global:     keep the K = round((1 - s) * N) entries of largest |W|    (4)
                over all layers together (N = all conv+fc weights): one
                magnitude threshold for the whole model; a layer may end
                up with any sparsity, even 1.

``round`` is round-half-up, ``floor(x + 0.5)``. Ties are broken
deterministically: among entries of equal magnitude, the one that comes
first is kept, where "first" is the flat (C-order) index within a layer and,
for (4), the layer's position in :func:`~reference.nn.weight_layers` order
before that. So exactly k (or K) entries are kept, whatever the ties.
On the GPU the masks are chosen where the weights live, by a stable sort by
descending magnitude (the same entries; nothing is read back to the host, so a
mask update inside a training step does not wait for the GPU).

Per-layer targets ``s``: the same ``target_sparsity`` in every layer (scope
``uniform``), or the layer's entry of a budget ``{layer: sparsity}`` (budget
transfer, :mod:`reference.sparsity.budgets`); scope ``global`` uses (4) with
``s = target_sparsity``.

Schedule, in optimizer steps ``t`` (``t0`` = first step of
``prune_start_epoch``, ``t1`` = first step of ``prune_end_epoch``, ``dt`` =
``prune_frequency``; ``te = min(t1, T - 1)`` with ``T`` the run's total steps,
so the final target is always applied at least once)::

    update steps:  t0, t0 + dt, t0 + 2 dt, ... (< te), and te                 (5)
    fraction phi(u) of the final sparsity at an update step u,
    p = (u - t0) / (te - t0):
        one-shot (te == t0):          phi = 1                                  (6)
        magnitude, gradual:           phi = p              (linear from 0)     (7)
        GMP (Zhu & Gupta):            phi = 1 - (1 - p)^3                      (8)
    target at update u:  s(u) = phi(u) * s_final   (per layer, or overall)     (9)

(8) is Zhu & Gupta's ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``
with ``s_i = 0`` and ``n dt = te - t0`` (when ``te - t0`` is not a multiple of
``dt`` the last interval is shorter); :func:`gmp_sparsity` is that formula.
Before ``t0`` every mask is all ones; after ``te`` the masks never change.
With ``prune_end_epoch`` unset, ``t1`` is the first step of epoch
``max(prune_start_epoch, floor(3 * epochs / 4))``.

Momentum: after every optimizer step the mask is multiplied into the latent
weights (``W <- W * M``). Pruned entries then hold exactly zero at every step
boundary: the stale momentum of a freshly pruned weight may move it during an
SGD step, but the next ``after_step`` zeroes it again, it never reaches the
forward (1), and its gradient (2) and coupled decay are zero, so its momentum
buffer only decays. Because pruned weights are zero, a later mask update with
a higher target never brings them back (they are the smallest magnitudes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from reference import functional as F
from reference.autodiff import Tensor, no_grad
from reference.backend import array_module, copy_into, is_device_array, to_host
from reference.errors import ConfigError
from reference.nn import Module, weight_layers
from reference.sparsity.base import SparsityMethod, StepContext
from reference.sparsity.budgets import check_budget, keep_count, read_budget_file

__all__ = [
    "GMP",
    "FixedMask",
    "MagnitudePruning",
    "PruneSchedule",
    "default_end_epoch",
    "global_magnitude_masks",
    "gmp_from_config",
    "gmp_sparsity",
    "keep_count",
    "magnitude_from_config",
    "top_k_mask",
]

SCOPES = ("uniform", "global")
RAMPS = ("linear", "cubic")


# ---------------------------------------------------------------------------
# The sparsifier


class FixedMask(Module):
    """``W_eff = W * mask`` (1), so ``dW = G * mask`` (2); the mask is a buffer.

    ``mask`` is a 0/1 array in the weight's dtype (and on the weight's
    device), so the product keeps the weight's dtype. It starts all ones.
    """

    def __init__(self, weight: Any):
        super().__init__()
        data = weight.data if isinstance(weight, Tensor) else weight
        mask = data.copy()
        mask[...] = 1
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return F.mul(weight, self.mask)  # (1); the mul backward gives (2)

    def set_mask(self, keep: Any) -> None:
        """Replace the mask's values with ``keep`` (bool or 0/1, the mask's shape), in place.

        ``keep`` may be a host array or an array on the mask's device (then
        nothing is read back: the copy stays on the device).
        """
        keep = keep if is_device_array(keep) else np.asarray(keep)
        if tuple(keep.shape) != tuple(self.mask.shape):
            raise ConfigError(
                f"FixedMask: expected a mask of shape {tuple(self.mask.shape)}, got {tuple(keep.shape)}"
            )
        copy_into(self.mask, keep)

    def apply_to(self, weight: Tensor) -> None:
        """Zero the pruned entries of the latent weight in place: ``W <- W * mask``."""
        weight.data *= self.mask

    def kept(self) -> int:
        """Number of entries the mask keeps."""
        return int(np.count_nonzero(to_host(self.mask)))

    def extra_repr(self) -> str:
        size = int(self.mask.size)
        return f"shape={tuple(self.mask.shape)}, kept={self.kept()}/{size}"


# ---------------------------------------------------------------------------
# Choosing masks: (3), (4)


def _top_k_flat(magnitude: Any, k: int) -> Any:
    """Bool mask of the k largest entries of the 1-D ``magnitude``; ties go to the lower index.

    Equivalent to a stable sort by descending magnitude taking the first k,
    done in O(n): everything above the k-th largest value ``v`` is kept,
    then the first (lowest-index) entries equal to ``v`` until k are kept.
    A device array takes :func:`_top_k_flat_sorted` instead (the count of
    entries above ``v`` would be a read back to the host).
    """
    if is_device_array(magnitude):
        return _top_k_flat_sorted(magnitude, k)
    n = magnitude.size
    if k >= n:
        return np.ones(n, dtype=bool)
    if k <= 0:
        return np.zeros(n, dtype=bool)
    v = np.partition(magnitude, n - k)[n - k]  # the k-th largest value
    keep = magnitude > v
    missing = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(magnitude == v)[:missing]] = True
    return keep


def _top_k_flat_sorted(magnitude: Any, k: int) -> Any:
    """:func:`_top_k_flat` by a stable sort, on ``magnitude``'s device and with no read back.

    The stable sort of ``-magnitude`` lists the entries by descending
    magnitude, equal ones in index order; the first k are kept, the same set
    as :func:`_top_k_flat` chooses. O(n log n) instead of O(n), which is what
    a GPU does well; ``k`` is a host number (it comes from shapes and settings).
    """
    xp = array_module(magnitude)
    keep = xp.zeros(magnitude.size, dtype=bool)
    if k > 0:
        order = xp.argsort(-magnitude, kind="stable")  # (n,): largest first, ties by index
        keep[order[:k]] = True  # a scatter of k indices: nothing is counted on the host
    return keep


def _as_array(weight: Any) -> Any:
    """A weight's array where it lives: a device array stays there; anything else as a NumPy array."""
    w = weight.data if isinstance(weight, Tensor) else weight
    return w if is_device_array(w) else to_host(w)


def top_k_mask(weight: Any, k: int) -> Any:
    """Bool array of ``weight``'s shape keeping exactly the ``k`` entries of largest ``|W|`` (3).

    Ties: the entry with the lower flat (C-order) index is kept. The mask is
    on the weight's device (a NumPy array for a host weight).
    """
    w = _as_array(weight)
    if not 0 <= k <= w.size:
        raise ConfigError(f"top_k_mask: k must be in [0, {w.size}], got {k}")
    magnitude = abs(w).ravel()  # (...) -> (n,)
    return _top_k_flat(magnitude, k).reshape(w.shape)  # (n,) -> weight's shape


def global_magnitude_masks(weights: list[Any], sparsity: float) -> list[Any]:
    """One threshold over all ``weights``: keep the K = round((1 - s) N) largest ``|W|`` overall (4).

    Ties: the entry that comes first in the concatenation (layer order, then
    flat index) is kept, so exactly K entries survive in total. The masks are
    on the weights' device (all weights must live on one).
    """
    arrays = [_as_array(w) for w in weights]
    total = sum(a.size for a in arrays)
    k = keep_count(total, sparsity, at_least_one=False)
    xp = array_module(arrays[0]) if arrays else np
    magnitude = xp.concatenate([abs(a).ravel() for a in arrays])  # [(n_l,) ...] -> (N,)
    keep = _top_k_flat(magnitude, k)
    masks, offset = [], 0
    for a in arrays:
        masks.append(keep[offset : offset + a.size].reshape(a.shape))  # (n_l,) -> layer's shape
        offset += a.size
    return masks


# ---------------------------------------------------------------------------
# The schedule: (5)-(9)


def gmp_sparsity(t: float, final: float, t0: float, span: float, initial: float = 0.0) -> float:
    """Zhu & Gupta: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``, ``span = n dt``.

    ``t`` is clipped to ``[t0, t0 + span]``; ``span = 0`` gives ``final``.
    """
    if span <= 0:
        return float(final) if t >= t0 else float(initial)
    p = min(max((t - t0) / span, 0.0), 1.0)
    return float(final + (initial - final) * (1.0 - p) ** 3)


def default_end_epoch(start_epoch: int, epochs: int) -> int:
    """``prune_end_epoch`` when unset: 3/4 of the run, ``floor(3 epochs / 4)``, but not before the start."""
    return max(start_epoch, (3 * epochs) // 4)


@dataclass(frozen=True)
class PruneSchedule:
    """The update steps (5) and the fraction of the final sparsity at each (6)-(8).

    ``start`` is t0, ``end`` is te (>= t0), ``frequency`` is dt, ``ramp`` is
    ``"linear"`` (7) or ``"cubic"`` (8).
    """

    start: int
    end: int
    frequency: int
    ramp: str

    @classmethod
    def for_run(
        cls, start_epoch: int, end_epoch: int | None, frequency: int, ramp: str, ctx: StepContext
    ) -> PruneSchedule:
        """The schedule in steps of the run that ``ctx`` belongs to."""
        spe, total = ctx.steps_per_epoch, ctx.total_steps
        end_epoch = default_end_epoch(start_epoch, ctx.epochs) if end_epoch is None else end_epoch
        t0 = start_epoch * spe
        te = max(t0, min(end_epoch * spe, total - 1))
        return cls(t0, te, frequency, ramp)

    def is_update(self, t: int) -> bool:
        """Whether the masks are recomputed before step ``t`` (5)."""
        if t == self.end:
            return True
        return self.start <= t < self.end and (t - self.start) % self.frequency == 0

    def last_update(self, t: int) -> int | None:
        """The latest update step ``<= t``, or None before ``t0``."""
        if t < self.start:
            return None
        if t >= self.end:
            return self.end
        return self.start + ((t - self.start) // self.frequency) * self.frequency

    def fraction(self, t: int) -> float:
        """phi of the masks in force at step ``t`` (after any update at ``t``): (6)-(8); 0 before t0."""
        u = self.last_update(t)
        if u is None:
            return 0.0
        if self.end == self.start:
            return 1.0  # (6)
        p = (u - self.start) / (self.end - self.start)
        if self.ramp == "linear":
            return p  # (7)
        return 1.0 - (1.0 - p) ** 3  # (8)


# ---------------------------------------------------------------------------
# The methods


class MagnitudePruning(SparsityMethod):
    """Magnitude pruning: uniform (3) or global (4), one-shot (6) or gradual linear (7).

    ``target_sparsity``: the final fraction of zeros (per layer for
    ``uniform``, overall for ``global``). ``budget``: ``{layer: sparsity}``
    instead of a target (budget transfer; scope must be ``uniform``).
    ``start_epoch``/``end_epoch``: the ramp (``end_epoch == start_epoch`` is
    one-shot; None is :func:`default_end_epoch`); ``frequency``: steps between
    mask updates while ramping.
    """

    name = "magnitude"
    ramp = "linear"

    def __init__(
        self,
        target_sparsity: float | None = None,
        *,
        scope: str = "uniform",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 50,
        budget: Mapping[str, float] | None = None,
    ):
        owner = type(self).__name__
        if (target_sparsity is None) == (budget is None):
            raise ConfigError(f"{owner}: give either target_sparsity or a budget, not both or neither")
        if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
            raise ConfigError(f"{owner}: target_sparsity must be in [0, 1), got {target_sparsity!r}")
        if scope not in SCOPES:
            raise ConfigError(f"{owner}: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if budget is not None and scope != "uniform":
            raise ConfigError(
                f"{owner}: a budget fixes every layer's sparsity; it cannot be combined with scope {scope!r}"
            )
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError(f"{owner}: start_epoch must be a non-negative integer, got {start_epoch!r}")
        if end_epoch is not None and (not isinstance(end_epoch, int) or end_epoch < start_epoch):
            raise ConfigError(
                f"{owner}: end_epoch must be an integer >= start_epoch ({start_epoch}), got {end_epoch!r}"
            )
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ConfigError(f"{owner}: frequency must be a positive number of steps, got {frequency!r}")
        self.target_sparsity = None if target_sparsity is None else float(target_sparsity)
        self.scope = scope
        self.prune_start_epoch = start_epoch
        self.prune_end_epoch = end_epoch
        self.frequency = frequency
        self.budget = None if budget is None else dict(budget)
        self._final: dict[str, float] = {}  # per-layer final sparsity (uniform or budget), set by attach

    # ------------------------------------------------------------- helpers
    def schedule(self, ctx: StepContext) -> PruneSchedule:
        """The update steps and ramp of the run ``ctx`` belongs to."""
        return PruneSchedule.for_run(
            self.prune_start_epoch, self.prune_end_epoch, self.frequency, self.ramp, ctx
        )

    def layer_targets(self, fraction: float) -> dict[str, float]:
        """Per-layer target sparsities at ramp ``fraction`` (9); empty for scope ``global``."""
        return {name: fraction * s for name, s in self._final.items()}

    def update_masks(self, model, fraction: float) -> None:
        """Recompute every mask from the current |W| at ramp ``fraction`` and zero the pruned weights."""
        layers = weight_layers(model)
        if self.scope == "global":
            masks = global_magnitude_masks(
                [layer.weight for _, layer in layers], fraction * self.target_sparsity
            )
        else:
            targets = self.layer_targets(fraction)
            masks = [
                top_k_mask(layer.weight, keep_count(layer.weight.size, targets[name]))
                for name, layer in layers
            ]
        for (_, layer), keep in zip(layers, masks):
            layer.sparsifier.set_mask(keep)
            layer.sparsifier.apply_to(layer.weight)

    # --------------------------------------------------------------- hooks
    def attach(self, model) -> None:
        layers = weight_layers(model)
        if not layers:
            raise ConfigError(
                f"{type(self).__name__}: {type(model).__name__} has no conv or fc layer to prune"
            )
        if self.budget is not None:
            self._final = check_budget(self.budget, model)
        elif self.scope == "uniform":
            self._final = {name: self.target_sparsity for name, _ in layers}
        for name, layer in layers:
            if layer.sparsifier is not None:
                raise ConfigError(
                    f"{type(self).__name__}: layer {name!r} already has a sparsifier "
                    f"({type(layer.sparsifier).__name__}); attach one method per model"
                )
            layer.sparsifier = FixedMask(layer.weight)

    def before_step(self, model, ctx: StepContext) -> None:
        schedule = self.schedule(ctx)
        t = ctx.global_step
        if schedule.is_update(t):
            self.update_masks(model, schedule.fraction(t))

    def after_step(self, model, ctx: StepContext) -> None:
        if ctx.global_step < self.schedule(ctx).start:
            return  # every mask is still all ones
        for _, layer in weight_layers(model):
            layer.sparsifier.apply_to(layer.weight)

    def end_epoch(self, model, ctx: StepContext) -> dict[str, Any]:
        """Per-layer sparsity of the effective weights, each layer's target, and the overall ones.

        ``target`` is the target of the masks in force at the epoch's last
        step: per layer (9) for uniform and budgets (absent for global), and
        overall (weighted by layer size for uniform and budgets).
        """
        fraction = self.schedule(ctx).fraction(ctx.global_step - 1)
        targets = self.layer_targets(fraction)
        layers: dict[str, dict[str, Any]] = {}
        total = zeros = 0
        target_zeros = 0.0
        with no_grad():
            for name, layer in weight_layers(model):
                w = to_host(layer.effective_weight().data)
                n, z = int(w.size), int(w.size - np.count_nonzero(w))
                total, zeros = total + n, zeros + z
                row: dict[str, Any] = {"sparsity": z / n, "params": n}
                if name in targets:
                    row["target"] = targets[name]
                    target_zeros += targets[name] * n
                layers[name] = row
        overall = fraction * self.target_sparsity if self.scope == "global" else target_zeros / max(total, 1)
        return {"sparsity": zeros / max(total, 1), "target": overall, "layers": layers}


class GMP(MagnitudePruning):
    """Gradual magnitude pruning (Zhu & Gupta): the cubic ramp (8), per-layer top-k (3).

    Same options as :class:`MagnitudePruning`; scope ``global`` (one
    threshold (4) following the cubic ramp) is allowed as a variant.
    """

    name = "gmp"
    ramp = "cubic"


# ---------------------------------------------------------------------------
# Factories (the registry in reference.sparsity)


def _from_config(cls, config, budget: Mapping[str, float] | None = None) -> MagnitudePruning:
    """``cls`` from a TrainConfig; ``budget``: the config's budget file, already read (if any).

    The training layer reads the budget file (:func:`reference.build.load_budget`,
    which also measures a checkpoint); called without it, a budget CSV is read here.
    """
    if config.budget is not None:
        if config.target_sparsity is not None:
            raise ConfigError(
                f"method {config.method!r}: set either target_sparsity or budget, not both "
                f"(got target_sparsity={config.target_sparsity!r}, budget={config.budget!r})"
            )
        if budget is None:
            budget = read_budget_file(config.budget, config.budget_column)
    elif budget is not None:
        raise ConfigError("a budget was given but the config names no budget file")
    elif config.budget_column is not None:
        raise ConfigError(f"budget_column={config.budget_column!r} is set but no budget file is given")
    return cls(
        config.target_sparsity,
        scope=config.prune_scope,
        start_epoch=config.prune_start_epoch,
        end_epoch=config.prune_end_epoch,
        frequency=config.prune_frequency,
        budget=budget,
    )


def magnitude_from_config(config, budget: Mapping[str, float] | None = None) -> MagnitudePruning:
    """:class:`MagnitudePruning` from a TrainConfig (target_sparsity or budget, prune_* settings)."""
    return _from_config(MagnitudePruning, config, budget)


def gmp_from_config(config, budget: Mapping[str, float] | None = None) -> GMP:
    """:class:`GMP` from a TrainConfig (target_sparsity or budget, prune_* settings)."""
    return _from_config(GMP, config, budget)
