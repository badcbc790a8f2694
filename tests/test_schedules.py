"""Learning-rate schedules: warmup and cosine values, step decay, per-step continuity, errors."""

import dataclasses
import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.errors import ConfigError
from reference.schedules import Constant, StepDecay, WarmupCosine, build_schedule


def test_str_imagenet_recipe_per_epoch():
    base = 0.256
    sched = build_schedule("cosine", base, 100, warmup_epochs=5)
    for e in range(5):
        assert sched(e) == pytest.approx(base * (e + 1) / 5, rel=1e-15)
    assert sched(4) == pytest.approx(base)
    for e in range(5, 100):
        assert sched(e) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (e - 5) / 95)), rel=1e-15)
    assert sched(5) == base
    # Per epoch: the step inside the epoch does not matter.
    assert sched(37, 123, 500) == sched(37)


def test_cosine_ends_at_final_lr():
    sched = WarmupCosine(0.1, 20, warmup_epochs=2, final_lr=0.001)
    assert sched(20) == 0.001
    assert sched(25) == 0.001
    assert 0.001 < sched(19) < 0.002
    values = [sched(e) for e in range(2, 21)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert WarmupCosine(0.1, 10)(10) == 0.0


def test_no_warmup_starts_at_base_and_all_warmup_never_decays():
    assert WarmupCosine(0.4, 10)(0) == 0.4
    sched = WarmupCosine(0.4, 4, warmup_epochs=4)
    assert [sched(e) for e in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_per_step_warmup_counts_optimizer_steps():
    base, warmup, spe = 0.2, 2, 10
    sched = WarmupCosine(base, 6, warmup_epochs=warmup, per_step=True)
    for k in range(warmup * spe):
        assert sched(k // spe, k % spe, spe) == pytest.approx(base * (k + 1) / (warmup * spe), rel=1e-15)
    assert sched(1, spe - 1, spe) == pytest.approx(base)
    assert sched(2, 0, spe) == base
    # Fractional epoch in the cosine part.
    t = 3 + 4 / spe
    assert sched(3, 4, spe) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4)), rel=1e-15)


@given(
    base=st.floats(1e-3, 1.0),
    epochs=st.integers(1, 30),
    data=st.data(),
)
def test_per_step_is_continuous_bounded_and_agrees_with_per_epoch_at_boundaries(base, epochs, data):
    warmup = data.draw(st.integers(0, epochs))
    spe = data.draw(st.integers(1, 20))
    final = data.draw(st.sampled_from([0.0, base / 100]))
    step_sched = WarmupCosine(base, epochs, warmup_epochs=warmup, per_step=True, final_lr=final)
    epoch_sched = WarmupCosine(base, epochs, warmup_epochs=warmup, final_lr=final)
    values = [step_sched(e, s, spe) for e in range(epochs) for s in range(spe)]
    assert all(0 < v <= base * (1 + 1e-12) for v in values)
    assert all(v >= final for v in values[warmup * spe :])
    if warmup < epochs:  # the value at the end of training joins the curve continuously
        values.append(step_sched(epochs, 0, spe))
    # Largest jump: one warmup increment, or the cosine's steepest slope over one step.
    bound = (base / (warmup * spe) if warmup else 0.0) + (base - final) * math.pi / 2 / max(
        epochs - warmup, 1
    ) / spe
    assert max((abs(b - a) for a, b in itertools.pairwise(values)), default=0.0) <= bound * (1 + 1e-9)
    for e in range(warmup, epochs + 1):
        assert step_sched(e, 0, spe) == pytest.approx(epoch_sched(e), rel=1e-12, abs=1e-15)
    if warmup:
        assert step_sched(warmup - 1, spe - 1, spe) == pytest.approx(epoch_sched(warmup - 1))


def test_step_decay_at_milestones():
    sched = build_schedule("step", 0.1, 160, milestones=(80, 120))
    assert sched(0) == 0.1
    assert sched(79) == 0.1
    assert sched(80) == pytest.approx(0.01)
    assert sched(119) == pytest.approx(0.01)
    assert sched(120) == pytest.approx(0.001)
    assert sched(159, 3, 10) == pytest.approx(0.001)
    assert StepDecay(1.0, [2, 4], gamma=0.5)(5) == 0.25


def test_constant():
    sched = build_schedule("constant", 0.05, 3)
    assert [sched(e, s, 4) for e in range(3) for s in range(4)] == [0.05] * 12
    assert Constant(0.05)(1000) == 0.05


def test_schedules_are_pure_and_frozen():
    sched = WarmupCosine(0.1, 10, warmup_epochs=2, per_step=True)
    first = [sched(e, s, 3) for e in range(10) for s in range(3)]
    assert first == [sched(e, s, 3) for e in range(10) for s in range(3)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.base_lr = 1.0


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("linear", 0.1, 10), {}, "unknown schedule 'linear'"),
        (("cosine", 0.0, 10), {}, "base_lr must be a finite number > 0, got 0.0"),
        (("cosine", -1.0, 10), {}, "got -1.0"),
        (("cosine", float("inf"), 10), {}, "inf"),
        (("cosine", 0.1, 0), {}, "epochs must be an integer >= 1, got 0"),
        (("cosine", 0.1, 5), {"warmup_epochs": 6}, "warmup_epochs must be <= epochs=5, got 6"),
        (("cosine", 0.1, 5), {"warmup_epochs": -1}, "got -1"),
        (("cosine", 0.1, 5), {"milestones": (2,)}, "takes no milestones"),
        (("step", 0.1, 10), {"milestones": (5, 5)}, r"strictly increasing, got \[5, 5\]"),
        (("step", 0.1, 10), {"milestones": (6, 3)}, "strictly increasing"),
        (("step", 0.1, 10), {"milestones": (0, 3)}, "milestone must be an integer >= 1, got 0"),
        (("step", 0.1, 10), {"milestones": (3, 10)}, "< epochs=10"),
        (("step", 0.1, 10), {}, "at least one milestone"),
        (("step", 0.1, 10), {"milestones": (3,), "gamma": 0.0}, "gamma"),
        (("step", 0.1, 10), {"milestones": (3,), "warmup_epochs": 2}, "no warmup"),
        (("constant", 0.1, 10), {"per_step": True}, "per_step"),
    ],
)
def test_build_schedule_errors(args, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(*args, **kwargs)


def test_bad_positions_and_final_lr():
    sched = WarmupCosine(0.1, 10)
    with pytest.raises(ConfigError, match="epoch must be an integer >= 0, got -1"):
        sched(-1)
    with pytest.raises(ConfigError, match="step must be < steps_per_epoch=4, got 4"):
        sched(0, 4, 4)
    with pytest.raises(ConfigError, match="steps_per_epoch must be an integer >= 1, got 0"):
        sched(0, 0, 0)
    with pytest.raises(ConfigError, match="final_lr"):
        WarmupCosine(0.1, 10, final_lr=0.2)
    with pytest.raises(ConfigError, match="per_step"):
        WarmupCosine(0.1, 10, per_step="yes")
