"""The resume check every method shares: interrupted + resumed == uninterrupted, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from reference.checkpoint import Checkpoint, load_checkpoint
from reference.config import TrainConfig
from reference.train import TrainResult, train
from tests.common import quiet


def assert_same_state(a: dict, b: dict) -> None:
    """Same keys in the same order, same dtypes, equal arrays."""
    assert list(a) == list(b)
    for name, value in a.items():
        assert value.dtype == b[name].dtype, name
        assert np.array_equal(value, b[name]), name


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["groups"] == b["groups"]
    assert sorted(a["momentum_buffers"]) == sorted(b["momentum_buffers"])
    for key, value in a["momentum_buffers"].items():
        assert np.array_equal(value, b["momentum_buffers"][key]), key


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in rows]


def check_resume(
    make: Callable[[str], TrainConfig], tmp_path: Path, stop_after: int
) -> tuple[TrainResult, TrainResult, Checkpoint]:
    """Train ``make("full")``; train ``make("part")`` for ``stop_after`` epochs, then resume it.

    Asserts that the two final checkpoints hold equal weights, buffers,
    momentum, method state (thresholds' controller, masks), metrics and
    per-layer logs. Returns (full result, resumed result, the interrupted
    run's checkpoint after ``stop_after`` epochs) for method-specific checks.
    """
    full = train(make("full"), log=quiet)
    train(make("part"), log=quiet, stop_after=stop_after)
    part_path = tmp_path / "part" / "checkpoint.npz"
    interrupted = load_checkpoint(part_path)
    assert interrupted.epoch == stop_after
    resumed = train(make("part"), resume=part_path, log=quiet)

    assert_same_state(resumed.model.state_dict(), full.model.state_dict())
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.npz"), load_checkpoint(part_path)
    assert_same_state(a.model_state, b.model_state)
    assert_same_optimizer(a.optimizer_state, b.optimizer_state)
    assert a.extra.get("method") == b.extra.get("method")
    assert _timeless(a.metrics) == _timeless(b.metrics)
    logs = [tmp_path / run / "layers.jsonl" for run in ("full", "part")]
    assert logs[0].exists() == logs[1].exists()
    if logs[0].exists():
        assert logs[0].read_text() == logs[1].read_text()
    return full, resumed, interrupted
