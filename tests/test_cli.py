"""The command line: train / eval / info, and one clear line with exit status 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.cli import main
from reference.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--width", "0.5", "--batch-size", "64", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("learnsparse: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch run directory made through the command line."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


# ------------------------------------------------------------------ good paths


def test_train_quiet_prints_one_summary_line(workdir, capsys):
    code, out, err = run(capsys, "train", *TINY, "--run-dir", "r")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and "test accuracy" in out and "'r'" in out
    assert (workdir / "r" / "checkpoint.npz").exists()
    cfg = json.loads((workdir / "r" / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["width"] == 0.5 and cfg["progress"] is False


def test_train_verbose_prints_epochs_and_the_accounting_table(workdir, capsys):
    code, out, _ = run(capsys, "train", "--epochs", "1", "--width", "0.5", "--no-progress", "--run-dir", "r")
    assert code == 0
    assert "epoch   1/1" in out and "MACs per image" in out


def test_config_file_and_flags_are_layered(workdir, capsys):
    Path("c.toml").write_text('epochs = 5\nwidth = 0.5\nschedule = "step"\nmilestones = [1]\nseed = 3\n')
    code, _, err = run(capsys, "train", "--config", "c.toml", "--epochs", "2", "--milestones", "1",
                       "--quiet", "--run-dir", "r")  # fmt: skip
    assert code == 0, err
    cfg = json.loads(Path("r/config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["seed"] == 3 and cfg["schedule"] == "step" and cfg["milestones"] == [1]


def test_resume_continues_in_the_checkpoints_run_directory(workdir, capsys):
    assert run(capsys, "train", *TINY, "--schedule", "constant", "--run-dir", "r")[0] == 0
    code, _, err = run(capsys, "train", "--resume", "r/checkpoint.npz", "--epochs", "2", "--quiet")
    assert code == 0, err
    ck = load_checkpoint("r/checkpoint.npz")
    assert ck.epoch == 2 and [m["epoch"] for m in ck.metrics] == [1, 2]
    assert ck.config["width"] == 0.5 and ck.config["schedule"] == "constant"


def test_eval_reports_the_checkpoint_accuracy(trained, capsys):
    code, out, err = run(capsys, "eval", trained / "checkpoint.npz")
    assert code == 0, err
    acc = load_checkpoint(trained / "checkpoint.npz").metrics[-1]["test_acc"]
    assert f"accuracy {acc:.2%}" in out and "359 images" in out


def test_info_resnet50_golden_macs(capsys):
    code, out, _ = run(capsys, "info", "resnet50", "--input-size", "224", "--num-classes", "1000")
    assert code == 0
    assert "4,089,284,608" in out and "layer4.2.conv3" in out


def test_info_defaults_to_the_models_usual_input(capsys):
    code, out, _ = run(capsys, "info", "digits_cnn")
    assert code == 0 and "1x8x8" in out and "379,520" in out


def test_help_and_version_exit_zero(capsys):
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, "train", "--help")[0] == 0
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("learnsparse ")


def test_keyboard_interrupt_exits_130(workdir, capsys, monkeypatch):
    import reference.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reference.train, "train", interrupted)
    code, _, err = run(capsys, "train", *TINY)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--model", "resnet9000"], ["'resnet9000'", "digits_cnn"]),
        (["train", "--dataset", "mnist"], ["'mnist'", "synthetic"]),
        (["train", "--dataset", "cifar10", "--data-root", "no/such/dir"], ["no/such/dir"]),
        (["train", "--dataset", "cifar10"], ["--data-root"]),
        (["train", "--config", "missing.toml"], ["'missing.toml'", "does not exist"]),
        (["train", "--batch-size", "0"], ["batch_size", "got 0"]),
        (["train", "--lr", "-0.5"], ["lr", "-0.5"]),
        (["train", "--lr", "fast"], ["--lr", "'fast'"]),
        (["train", "--epochs", "0"], ["epochs", "got 0"]),
        (["train", "--label-smoothing", "1.5"], ["label_smoothing", "1.5"]),
        (["train", "--milestones", "a,b"], ["--milestones", "'a,b'"]),
        (["train", "--bogus-flag"], ["--bogus-flag"]),
        (["train", "--resume", "missing.npz"], ["'missing.npz'", "does not exist"]),
        (["eval", "missing.npz"], ["'missing.npz'", "does not exist"]),
        (["info", "resnet9000"], ["'resnet9000'"]),
        (["info", "resnet20", "--input-size", "0"], ["--input-size", "0"]),
        (["frobnicate"], ["'frobnicate'"]),
        ([], ["required"]),
    ],
)
def test_bad_input_gives_one_line_and_status_2(workdir, capsys, argv, needles):
    code, _out, err = run(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert listing(workdir) == []  # no run directory, no partial files


def test_unknown_toml_key(workdir, capsys):
    Path("c.toml").write_text("epochs = 1\nlearning_rate = 0.1\n")
    code, _, err = run(capsys, "train", "--config", "c.toml", "--run-dir", "r")
    assert_one_line_error(code, err, "'learning_rate'", "c.toml", "valid settings are", "lr")
    assert listing(workdir) == ["c.toml"]


def test_corrupt_checkpoint(workdir, capsys):
    Path("bad.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    assert_one_line_error(*run(capsys, "eval", "bad.npz")[::2], "'bad.npz'", "not a learnsparse checkpoint")
    assert_one_line_error(*run(capsys, "train", "--resume", "bad.npz")[::2], "'bad.npz'")
    assert listing(workdir) == ["bad.npz"]


def test_truncated_checkpoint(trained, workdir, capsys):
    data = (trained / "checkpoint.npz").read_bytes()
    Path("cut.npz").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run(capsys, "eval", "cut.npz")[::2], "'cut.npz'")


def test_mismatched_checkpoint(trained, workdir, capsys):
    """A checkpoint whose arrays do not fit the model its config describes."""
    ck = load_checkpoint(trained / "checkpoint.npz")
    wrong = build_model("digits_cnn", width=1.0).state_dict()  # the config says width 0.5
    save_checkpoint("wrong.npz", model_state=wrong, optimizer_state=ck.optimizer_state, config=ck.config,
                    epoch=1, metrics=ck.metrics)  # fmt: skip
    code, _, err = run(capsys, "eval", "wrong.npz")
    assert_one_line_error(code, err, "'wrong.npz'", "does not fit", "conv1.weight")
    code, _, err = run(capsys, "train", "--resume", "wrong.npz", "--epochs", "2", "--run-dir", "r")
    assert_one_line_error(code, err, "'wrong.npz'", "conv1.weight")
    assert listing(workdir) == ["wrong.npz"]


def test_checkpoint_with_a_broken_config(trained, workdir, capsys):
    ck = load_checkpoint(trained / "checkpoint.npz")
    save_checkpoint("odd.npz", model_state=ck.model_state, optimizer_state=ck.optimizer_state,
                    config={**ck.config, "model": "nope"}, epoch=1, metrics=ck.metrics)  # fmt: skip
    assert_one_line_error(*run(capsys, "eval", "odd.npz")[::2], "'odd.npz'", "'nope'")


def test_resume_with_a_changed_setting(trained, workdir, capsys):
    code, _, err = run(capsys, "train", "--resume", trained / "checkpoint.npz", "--lr", "0.5",
                       "--run-dir", "r")  # fmt: skip
    assert_one_line_error(code, err, "lr=0.5")
    assert listing(workdir) == []


# ------------------------------------------------------------------ real processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_subprocess_train_then_eval(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "reference.cli", "train", *TINY, "--run-dir", str(run_dir)],
        check=False, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "reference", "eval", str(run_dir / "checkpoint.npz")],
        check=False, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout


def test_subprocess_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "reference.cli", "train", "--batch-size", "0"],
        check=False, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert_one_line_error(proc.returncode, proc.stderr, "batch_size", "got 0")
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []
