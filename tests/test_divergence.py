"""The divergence guard: a diverging run stops with one line and keeps its last good checkpoint.

What stops a run (see ``reference/train.py``): a non-finite loss; a mean
training loss above ``LOSS_LIMIT_FACTOR * ln(num_classes)``; a parameter, a
last-step gradient or a buffer holding a NaN or an infinity after the epoch's
steps. Nothing of the diverged epoch is written, and no NumPy warning reaches
the terminal. The commands that use a checkpoint (eval, report, finalize,
export) refuse one holding a NaN or an infinity, naming the first such array.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from reference import train as training
from reference.checkpoint import check_finite, first_non_finite, load_checkpoint, save_checkpoint
from reference.cli import main
from reference.config import TrainConfig
from reference.errors import CheckpointError, DivergenceError
from reference.sparsity.base import Dense
from tests import emulation
from tests.common import quiet

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--width", "0.5", "--batch-size", "64", "--no-progress"]
# A sane first epoch at lr 0.1, then the step schedule multiplies the lr by 500: lr 50 from epoch 2.
LR_50_FROM_EPOCH_2 = ["--lr", "0.1", "--schedule", "step", "--milestones", "1", "--gamma", "500"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("learnsparse: error: "), err
    assert "Traceback" not in err and "Warning" not in err
    return lines[0]


def run_cli(capsys, *argv) -> tuple[int, str, str, list]:
    """``main(argv)`` in this process; returns (status, stdout, stderr, the warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err, caught


# ------------------------------------------------------------------ training stops


def test_lr_50_after_a_good_epoch_stops_with_one_line_and_keeps_that_epoch(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err, caught = run_cli(
        capsys, "train", *SMALL, *LR_50_FROM_EPOCH_2, "--epochs", "3", "--run-dir", run_dir
    )
    assert code == 2
    line = one_error_line(err)
    assert "training diverged at epoch 2" in line and "lr 50" in line, line
    assert str(run_dir / "checkpoint.npz") in line, line
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]

    ckpt = check_finite(load_checkpoint(run_dir / "checkpoint.npz"))  # the last good one: epoch 1, finite
    assert ckpt.epoch == 1
    assert load_checkpoint(run_dir / "best.npz").epoch == 1
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["test_acc"] > 0.3

    code, out, err, _ = run_cli(capsys, "eval", run_dir / "checkpoint.npz")
    assert code == 0 and err == "" and "1 epochs trained" in out


def test_lr_50_from_the_start_stops_in_the_first_epoch_on_the_loss_bound(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err, caught = run_cli(
        capsys, "train", *SMALL, "--lr", "50", "--epochs", "2", "--run-dir", run_dir
    )
    assert code == 2
    line = one_error_line(err)
    assert "training diverged at epoch 1" in line, line
    assert f"above {100 * math.log(10):.4g} (100 x ln 10, the loss of a uniform guess)" in line, line
    assert not (run_dir / "checkpoint.npz").exists() and not (run_dir / "best.npz").exists()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("gamma", ["500", "1e30"])  # 1e30: NaN within two steps, overflowing on the way
def test_a_diverging_command_prints_no_numpy_warning_on_the_real_terminal(tmp_path, gamma):
    """In a fresh interpreter, with every warning shown, stderr is the guard's one line."""
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-m", "reference", "train", *SMALL, *LR_50_FROM_EPOCH_2[:-1], gamma,
         "--epochs", "2", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "diverged at epoch 2" in line and "encountered" not in proc.stderr, proc.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").epoch == 1


def _tiny(tmp_path, **changes) -> TrainConfig:
    settings = dict(
        model="digits_cnn", width=0.5, epochs=2, batch_size=64, lr=0.1, progress=False,
        run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


def test_the_loss_bound_is_live_and_scales_with_ln_num_classes(tmp_path, monkeypatch):
    """With the factor at 0.5 a healthy first step (loss near ln 10 = 2.30) is above the bound, 1.15."""
    monkeypatch.setattr(training, "LOSS_LIMIT_FACTOR", 0.5)
    with pytest.raises(DivergenceError, match=r"epoch 1, by step 1: .* above 1\.151 \(0\.5 x ln 10"):
        training.train(_tiny(tmp_path), log=quiet)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


class _Spoil(Dense):
    """Dense training that spoils one array after the last step of epoch 2 (the loss stays finite)."""

    def __init__(self, spoil):
        super().__init__()
        self.spoil = spoil

    def after_step(self, model, ctx):
        if ctx.epoch == 1 and ctx.step == ctx.steps_per_epoch - 1:
            self.spoil(model)


def _nan_grad(model):
    model.conv2.weight.grad[...] = np.nan  # the last gradient; SGD has already used it


def _inf_running_var(model):
    model.bn3.running_var[1] = np.inf  # used only in evaluation


@pytest.mark.parametrize(
    ("spoil", "named"),
    [(_inf_running_var, "bn3.running_var"), (_nan_grad, "the gradient of conv2.weight")],
)
def test_a_non_finite_buffer_or_gradient_after_the_epoch_stops_before_anything_is_written(
    tmp_path, monkeypatch, spoil, named
):
    monkeypatch.setattr("reference.build.build_method", lambda config, budget=None: _Spoil(spoil))
    with pytest.raises(
        DivergenceError, match=rf"epoch 2: {named} holds a NaN or an infinity.*checkpoint\.npz"
    ):
        training.train(_tiny(tmp_path), log=quiet)
    run_dir = tmp_path / "run"
    ckpt = check_finite(load_checkpoint(run_dir / "checkpoint.npz"))
    assert ckpt.epoch == 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------------------------ finiteness of arrays


def test_first_non_finite_names_the_first_bad_floating_array_in_order():
    good = np.ones(3, np.float32)
    assert first_non_finite([("a", good), ("b", np.arange(4)), ("c", None)]) is None
    named = [
        ("a", good),
        ("ints", np.array([1, 2])),  # integers are always finite
        ("b", np.array([1.0, -np.inf])),
        ("c", np.array([np.nan], np.float32)),
    ]
    assert first_non_finite(named) == "b"
    assert first_non_finite(named[:2] + named[3:]) == "c"
    assert first_non_finite([("z", np.array(np.nan + 0j))]) == "z"  # complex, 0-d


def test_first_non_finite_on_the_device_reads_back_once():
    with emulation.device() as cupy:
        arrays = [(f"w{i}", cupy.asarray(np.full(5, float(i), np.float32))) for i in range(6)]
        arrays[4][1][2] = np.inf
        with emulation.host_reads() as reads:
            assert first_non_finite(arrays) == "w4"
        assert len(reads) == 1, reads
        with emulation.host_reads() as reads:
            assert first_non_finite(arrays[:4]) is None
        assert len(reads) == 1, reads


# ------------------------------------------------------------------ the commands refuse a diverged checkpoint


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("div") / "run"
    assert main(["train", "--epochs", "1", "--width", "0.5", "--batch-size", "64", "--quiet",
                 "--run-dir", str(run_dir)]) == 0  # fmt: skip
    return run_dir / "checkpoint.npz"


def _spoiled(src: Path, dst: Path, where: str) -> Path:
    ckpt = load_checkpoint(src)
    if where == "optimizer":
        buffers = ckpt.optimizer_state["momentum_buffers"]
        next(iter(buffers.values())).flat[0] = np.inf
    else:
        name, value = where.split("=")
        ckpt.model_state[name].flat[3] = float(value)
    save_checkpoint(
        dst, model_state=ckpt.model_state, optimizer_state=ckpt.optimizer_state, config=ckpt.config,
        epoch=ckpt.epoch, metrics=ckpt.metrics, extra=ckpt.extra,
    )  # fmt: skip
    return dst


COMMANDS = {
    "eval": lambda ck, out: ["eval", ck],
    "report": lambda ck, out: ["report", ck, "--out", out, "--no-plots"],
    "finalize": lambda ck, out: ["finalize", ck, "-o", out],
    "export": lambda ck, out: ["export", ck, "-o", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_refuses_a_checkpoint_with_a_nan_weight(command, good_checkpoint, tmp_path, capsys):
    bad = _spoiled(good_checkpoint, tmp_path / "bad.npz", "conv2.weight=nan")
    out = tmp_path / "out"
    code, stdout, err, _ = run_cli(capsys, *COMMANDS[command](bad, out))
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert str(bad) in line and "'conv2.weight'" in line and "non-finite" in line, line
    assert not out.exists()
    code, _, err, _ = run_cli(capsys, *COMMANDS[command](good_checkpoint, out))  # the good one passes
    assert code == 0, err


@pytest.mark.parametrize(
    ("where", "named"),
    [("bn2.running_var=inf", "'bn2.running_var'"), ("optimizer", "'optimizer.momentum_buffers.")],
)
def test_an_infinite_buffer_or_momentum_is_refused_by_name(where, named, good_checkpoint, tmp_path, capsys):
    bad = _spoiled(good_checkpoint, tmp_path / "bad.npz", where)
    code, _, err, _ = run_cli(capsys, "eval", bad)
    assert code == 2
    assert named in one_error_line(err)
    with pytest.raises(CheckpointError, match=named.strip("'")):
        check_finite(load_checkpoint(bad))


def test_finalize_from_the_trail_checks_the_snapshot_it_reads(tmp_path, capsys):
    """``--trail-sparsity`` finalizes a trail snapshot: that file is checked, not only the one named."""
    run_dir = tmp_path / "ltp"
    assert main(["train", "--epochs", "2", "--width", "0.5", "--batch-size", "64", "--quiet",
                 "--method", "ltp", "--run-dir", str(run_dir)]) == 0  # fmt: skip
    capsys.readouterr()
    for snapshot in (run_dir / "trail").iterdir():
        _spoiled(snapshot, snapshot, "conv2.weight=nan")
    out = tmp_path / "final.npz"
    code, stdout, err, _ = run_cli(capsys, "finalize", run_dir / "checkpoint.npz", "-o", out,
                                   "--trail-sparsity", "0")  # fmt: skip
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert "trail" in line and "'conv2.weight'" in line and "non-finite" in line, line
    assert not out.exists()
