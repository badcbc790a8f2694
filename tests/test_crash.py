"""A kill at any write of a run leaves a directory that resume brings to the uninterrupted run's files.

For every method, a forked child trains a tiny run and is killed (``os._exit``,
no cleanup of any kind) just before the N-th atomic rename into the run
directory, for every N in turn: its temporary file is written, the target is
not yet replaced. The parent then resumes the run from the checkpoint left
behind (or starts it again when no epoch was committed) and compares every
file of the directory with an uninterrupted run: the same names, the same
arrays and metadata in every checkpoint (trail and best included), the same
metrics and per-layer rows (timings aside), and no temporary or lock file.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.sparsity import METHOD_NAMES
from reference.train import train
from tests.common import quiet
from tests.resume import assert_same_optimizer, assert_same_state

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill is made in a forked child (POSIX)")

KILLED = 77  # the child's exit status when it was killed at the chosen write
TIMINGS = ("seconds", "train_seconds")


def config(run_dir: Path, method: str) -> TrainConfig:
    extra = {"target_sparsity": 0.5} if method in ("magnitude", "gmp") else {}
    return TrainConfig(
        method=method, epochs=2, width=0.25, batch_size=128, progress=False, run_dir=str(run_dir), **extra
    )


class _Renames:
    """``os.replace`` that counts the renames into ``root`` and kills the process at number ``kill_at``."""

    def __init__(self, root: Path, kill_at: int | None = None) -> None:
        self.root, self.kill_at, self.count = str(root), kill_at, 0
        self.real = os.replace

    def __call__(self, src, dst, *args, **kwargs):
        if os.path.abspath(dst).startswith(self.root):
            self.count += 1
            if self.count == self.kill_at:
                os._exit(KILLED)  # as kill -9: no finally, no atexit, no flush
        return self.real(src, dst, *args, **kwargs)


def _killed_child(cfg: TrainConfig, kill_at: int, root: Path) -> int:
    pid = os.fork()
    if pid == 0:  # the child: train until the kill; never return into pytest
        code = 1
        try:
            os.replace = _Renames(root, kill_at)
            train(cfg, log=quiet)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _json(tree) -> str:
    return json.dumps(tree, sort_keys=True, default=lambda array: [str(array.dtype), array.tolist()])


def _timeless(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def assert_same_run_files(expected: Path, got: Path) -> None:
    """Every file of run directory ``got`` matches ``expected``'s (timings aside)."""
    names = sorted(str(p.relative_to(expected)) for p in expected.rglob("*"))
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == names
    for name in names:
        a, b = expected / name, got / name
        if a.is_dir():
            continue
        if name.endswith(".npz"):
            x, y = load_checkpoint(a), load_checkpoint(b)
            assert x.epoch == y.epoch, name
            assert_same_state(x.model_state, y.model_state)
            assert_same_optimizer(x.optimizer_state, y.optimizer_state)
            assert _json(x.extra) == _json(y.extra), name  # best epoch, rng, the method's state
            assert {**x.config, "run_dir": None} == {**y.config, "run_dir": None}, name
            assert _timeless(x.metrics) == _timeless(y.metrics), name
        elif name == "metrics.jsonl":
            rows = [[json.loads(line) for line in p.read_text().splitlines()] for p in (a, b)]
            assert _timeless(rows[0]) == _timeless(rows[1])
        elif name == "metrics.csv":
            rows = [list(csv.DictReader(p.read_text().splitlines())) for p in (a, b)]
            assert _timeless(rows[0]) == _timeless(rows[1])
        else:  # config.json, config.toml (which name their own directory), layers.jsonl
            assert a.read_text().replace(str(expected), "RUN") == b.read_text().replace(str(got), "RUN"), name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_kill_at_every_write_resumes_to_the_uninterrupted_files(tmp_path, method, monkeypatch):
    full_dir = tmp_path / "full"
    counter = _Renames(full_dir)
    monkeypatch.setattr(os, "replace", counter)
    train(config(full_dir, method), log=quiet)
    monkeypatch.undo()
    writes = counter.count
    assert writes >= 2 + 2 * 4  # the config, then at least the records and the checkpoint of each epoch

    for kill_at in range(1, writes + 1):
        run_dir = tmp_path / f"killed-{kill_at}"
        cfg = config(run_dir, method)
        assert _killed_child(cfg, kill_at, run_dir) == KILLED, kill_at
        assert any(p.name.endswith(".tmp") for p in run_dir.rglob("*")), "the killed write left its temporary"
        checkpoint = run_dir / "checkpoint.npz"
        if checkpoint.exists():
            train(cfg, resume=checkpoint, log=quiet)
        else:  # no epoch committed: the run starts again in the same directory
            train(cfg, log=quiet)
        assert_same_run_files(full_dir, run_dir)
