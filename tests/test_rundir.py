"""The run directory: resume where the checkpoint is, one trainer at a time, no stale temporaries,
no output written over its input, nothing left by a run that never committed an epoch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reference.checkpoint import load_checkpoint
from reference.cli import main
from reference.errors import ConfigError
from reference.files import NAME_MAX, remove_stale_temporaries, temporary_name, write_atomic
from reference.rundir import LOCK_NAME, held_lock

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--width", "0.25", "--batch-size", "128", "--quiet"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learnsparse: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def run_a(tmp_path, capsys) -> Path:
    """A one-epoch run in ``tmp_path/runA``."""
    assert run(capsys, "train", *TINY, "--run-dir", tmp_path / "runA")[0] == 0
    return tmp_path / "runA"


# ------------------------------------------------------------------ resume where the checkpoint is


def test_resume_from_another_directory_continues_in_the_checkpoints_directory(
    run_a, tmp_path, monkeypatch, capsys
):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, out, err = run(capsys, "train", "--resume", "../runA/checkpoint.npz", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert listing(other) == [], "nothing may be written where the command started"
    ck = load_checkpoint(run_a / "checkpoint.npz")
    assert ck.epoch == 2 and [m["epoch"] for m in ck.metrics] == [1, 2]
    assert len((run_a / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_into_a_new_run_dir_forks_the_run(run_a, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--resume", run_a / "checkpoint.npz", "--epochs", "2",
                       "--run-dir", tmp_path / "fork", "--quiet")  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(tmp_path / "fork" / "checkpoint.npz").epoch == 2
    assert load_checkpoint(run_a / "checkpoint.npz").epoch == 1


def test_resume_into_another_runs_directory_is_refused(run_a, tmp_path, capsys):
    assert run(capsys, "train", *TINY, "--seed", "3", "--run-dir", tmp_path / "runB")[0] == 0
    before = (tmp_path / "runB" / "checkpoint.npz").read_bytes()
    code, _, err = run(capsys, "train", "--resume", run_a / "checkpoint.npz", "--epochs", "2",
                       "--run-dir", tmp_path / "runB")  # fmt: skip
    one_line_error(code, err, str(tmp_path / "runB"), "would overwrite that run")
    assert (tmp_path / "runB" / "checkpoint.npz").read_bytes() == before


# ------------------------------------------------------------------ temporary files


def test_temporary_names_stay_within_name_max(tmp_path):
    for name in ["a" * 240 + ".safetensors", "é" * 127, "checkpoint.npz"]:
        tmp = temporary_name(name)
        assert len(os.fsencode(tmp)) <= NAME_MAX and tmp.startswith(".") and tmp.endswith(".tmp")
    long = ["x" * 250 + "1", "x" * 250 + "2"]
    assert temporary_name(long[0]).split(".")[1] != temporary_name(long[1]).split(".")[1]
    path = write_atomic(tmp_path / long[0], "ok")
    assert path.read_text() == "ok" and listing(tmp_path) == [long[0]]


def test_export_to_a_long_legal_name(run_a, tmp_path, capsys):
    out = tmp_path / ("m" * 240 + ".safetensors")  # 252 bytes: legal
    code, _, err = run(capsys, "export", run_a / "checkpoint.npz", "-o", out)
    assert code == 0, err
    assert out.stat().st_size > 0


def test_stale_temporaries_of_dead_writers_are_removed_on_resume(run_a, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_a / "trail").mkdir()
    stale = [
        run_a / f".checkpoint.npz.{dead.pid}.0123abcd.tmp",
        run_a / "trail" / f".epoch_002.npz.{dead.pid}.fedc9876.tmp",
    ]
    live = run_a / f".best.npz.{os.getpid()}.89abcdef.tmp"  # a write in progress elsewhere
    mine = run_a / "notes.1.tmp"  # not our pattern
    for path in [*stale, live, mine]:
        path.write_bytes(b"x" * 100)
    code, _, err = run(capsys, "train", "--resume", run_a / "checkpoint.npz", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert live.exists() and mine.exists()
    assert remove_stale_temporaries(run_a / "missing") == []


# ------------------------------------------------------------------ the lock


def test_the_lock_names_its_holder_and_dies_with_it(run_a, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from reference.rundir import held_lock\n"
         f"with held_lock({str(run_a)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((run_a / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        before = (run_a / "checkpoint.npz").read_bytes()
        code, _, err = run(capsys, "train", "--resume", run_a / "checkpoint.npz", "--epochs", "2", "--quiet")
        one_line_error(code, err, "in use", f"process {holder.pid}", socket.gethostname(), info["started"])
        assert (run_a / "checkpoint.npz").read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)  # as kill -9: the OS drops the lock
        holder.wait()
    code, _, err = run(capsys, "train", "--resume", run_a / "checkpoint.npz", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert load_checkpoint(run_a / "checkpoint.npz").epoch == 2
    assert not (run_a / LOCK_NAME).exists(), "a clean exit removes the lock file"


def test_two_trainers_into_one_fresh_run_dir(tmp_path):
    """Two real trainers started together: one trains, the other is refused before writing anything."""
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, "-m", "reference", "train", "--epochs", "2", "--width", "0.25", "--quiet",
           "--run-dir", str(run_dir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert len(err.strip().splitlines()) == 1 and ("in use" in err or "already holds a run" in err), err
    ck = load_checkpoint(run_dir / "checkpoint.npz")
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert ck.epoch == 2 and [r["epoch"] for r in rows] == [1, 2]


def test_held_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with held_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"process {os.getpid()} on host"):
            with held_lock(tmp_path):
                pass
    with held_lock(tmp_path):  # free again
        pass
    assert listing(tmp_path) == []


# ------------------------------------------------------------------ outputs that are inputs


def test_finalize_and_export_refuse_to_write_over_their_input(run_a, capsys):
    ckpt = run_a / "checkpoint.npz"
    before = ckpt.read_bytes()
    same = run_a / ".." / "runA" / "checkpoint.npz"
    (run_a / "link.npz").symlink_to(ckpt)
    for out in (ckpt, same, run_a / "link.npz"):
        code, _, err = run(capsys, "finalize", ckpt, "-o", out)
        one_line_error(code, err, "finalize", "is the input")
        code, _, err = run(capsys, "export", ckpt, "-o", out)
        one_line_error(code, err, "export", "is the input")
    assert ckpt.read_bytes() == before


# ------------------------------------------------------------------ nothing left by a run that never committed


def test_a_run_that_fails_in_its_first_epoch_leaves_nothing(tmp_path, capsys):
    code, _, err = run(capsys, "train", *TINY, "--lr", "1e6", "--run-dir", tmp_path / "new")
    one_line_error(code, err, "diverged")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", *TINY, "--lr", "1e6", "--run-dir", kept)
    one_line_error(code, err, "diverged")
    assert listing(kept) == ["notes.txt"]


def test_sigterm_is_one_line_and_leaves_no_uncommitted_run(tmp_path):
    """SIGTERM in the first epoch: one line, status 143, and no run directory left."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference", "train", "--epochs", "30", "--no-progress", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "training" in proc.stdout.readline()  # the run has started: the directory is locked
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["learnsparse: terminated"], err
    assert not run_dir.exists()
