"""The training loop: run directory, exact resume, divergence, evaluation, quickstart accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig, resolve_config
from reference.errors import CheckpointError, ConfigError, DivergenceError
from reference.models import build_model
from reference.train import METRIC_COLUMNS, evaluate, train
from tests.common import quiet
from tests.resume import assert_same_state, check_resume


def tiny(tmp_path, name: str = "run", **changes) -> TrainConfig:
    """A run of a second or less: the digits CNN at half width, two epochs."""
    settings = {
        "epochs": 2,
        "width": 0.5,
        "batch_size": 64,
        "lr": 0.05,
        "progress": False,
        "run_dir": str(tmp_path / name),
    }
    settings.update(changes)
    return TrainConfig(**settings)


def synthetic(tmp_path, name: str = "run", **changes) -> TrainConfig:
    """Synthetic 8x8 three-channel images, 4 classes."""
    settings = {
        "dataset": "synthetic", "image_size": 8, "num_classes": 4, "train_size": 256, "test_size": 64, "width": 0.5,
        "epochs": 2, "batch_size": 32, "progress": False, "run_dir": str(tmp_path / name),
    }  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


# ---------------------------------------------------------------- run directory


def test_short_run_writes_the_run_directory(tmp_path):
    lines: list[str] = []
    cfg = tiny(tmp_path)
    result = train(cfg, log=lines.append)
    run = tmp_path / "run"
    assert result.run_dir == run
    assert sorted(p.name for p in run.iterdir()) == [
        "best.npz", "checkpoint.npz", "config.json", "config.toml", "metrics.csv", "metrics.jsonl",
    ]  # fmt: skip

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(METRIC_COLUMNS) <= set(rows[0])
    with open(run / "metrics.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert tuple(csv_rows[0]) == METRIC_COLUMNS
    assert [float(r["test_acc"]) for r in csv_rows] == [r["test_acc"] for r in rows]
    assert rows == result.history and result.metrics == rows[-1]
    for r in rows:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0 and r["lr"] > 0

    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    assert resolve_config(run / "config.toml") == cfg

    ck = load_checkpoint(run / "checkpoint.npz")
    assert ck.epoch == 2 and ck.metrics == rows and ck.config == cfg.to_dict()
    assert_same_state(ck.model_state, result.model.state_dict())
    assert result.best_acc == max(r["test_acc"] for r in rows)
    assert load_checkpoint(run / "best.npz").epoch == result.best_epoch

    # the summary names the accuracy and prints the accounting table
    text = "\n".join(lines)
    assert "test accuracy" in text and "MACs" in text and "conv1" in text
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_run_directory_of_a_finished_run_is_not_overwritten(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, log=quiet)
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(cfg, log=quiet)
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before


def test_default_run_dir_is_created_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny(tmp_path, epochs=1).replace(run_dir=None)
    first = train(cfg, log=quiet)
    second = train(cfg, log=quiet)
    assert first.run_dir.parent == second.run_dir.parent == tmp_path.joinpath("runs").relative_to(tmp_path)
    assert first.run_dir != second.run_dir
    assert first.config.run_dir == str(first.run_dir)


def test_synthetic_data_and_per_step_warmup(tmp_path):
    result = train(synthetic(tmp_path, warmup_epochs=1, per_step=True, label_smoothing=0.1), log=quiet)
    assert len(result.history) == 2 and result.model.fc.weight.shape == (4, 32)
    assert result.history[0]["lr"] < result.history[1]["lr"] or result.history[1]["lr"] < result.config.lr


# --------------------------------------------------------------------- resume


@pytest.mark.parametrize("make", [tiny, synthetic])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, make):
    """Train 3 epochs; train 2 of the same 3-epoch config, then resume to 3: every array equal."""
    changes = {"epochs": 3, "schedule": "step", "milestones": (2,), "augment": make is tiny}
    full, resumed, _ = check_resume(lambda run: make(tmp_path, run, **changes), tmp_path, stop_after=2)
    assert len(resumed.history) == 3 and resumed.history[-1]["test_acc"] == full.history[-1]["test_acc"]


def test_two_epoch_run_extended_to_three(tmp_path):
    """With a constant schedule a 2-epoch run is a prefix of a 3-epoch run, so extending it matches."""
    changes = {"schedule": "constant", "momentum": 0.9, "nesterov": True}
    full = train(tiny(tmp_path, "full", epochs=3, **changes), log=quiet)
    train(tiny(tmp_path, "part", epochs=2, **changes), log=quiet)
    part = tmp_path / "part" / "checkpoint.npz"
    resumed = train(tiny(tmp_path, "part", epochs=3, **changes), resume=part, log=quiet)
    assert_same_state(resumed.model.state_dict(), full.model.state_dict())
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_resume_into_a_new_run_directory(tmp_path):
    cfg = tiny(tmp_path, "a", epochs=3, schedule="constant")
    train(cfg, log=quiet, stop_after=1)
    result = train(
        cfg.replace(run_dir=str(tmp_path / "b")), resume=tmp_path / "a" / "checkpoint.npz", log=quiet
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.npz").epoch == 3
    assert load_checkpoint(tmp_path / "a" / "checkpoint.npz").epoch == 1


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    first = train(cfg, log=quiet)
    again = train(cfg, resume=tmp_path / "run" / "checkpoint.npz", log=quiet)
    assert_same_state(first.model.state_dict(), again.model.state_dict())
    assert again.metrics == first.metrics


def test_resume_with_fewer_epochs_than_done_is_refused_before_writing(tmp_path):
    """From Python as from the CLI: a shorter run cannot continue a longer one."""
    train(tiny(tmp_path, epochs=2), log=quiet)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match=r"epochs=1 is fewer than the 2 epochs .* give 2 or more"):
        train(tiny(tmp_path, epochs=1), resume=tmp_path / "run" / "checkpoint.npz", log=quiet)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").epoch == 2


def test_resume_with_different_settings_is_refused_before_writing(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, log=quiet)
    with pytest.raises(ConfigError, match=r"lr=0\.1 \(checkpoint: 0\.05\)"):
        train(
            cfg.replace(lr=0.1, run_dir=str(tmp_path / "other")), resume=tmp_path / "run" / "checkpoint.npz"
        )
    assert not (tmp_path / "other").exists()


def test_resume_from_a_checkpoint_that_does_not_fit(tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    train(cfg, log=quiet)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    from reference.checkpoint import save_checkpoint

    wide = build_model("digits_cnn", width=1.0).state_dict()  # the config says width 0.5
    bad = tmp_path / "bad.npz"
    save_checkpoint(bad, model_state=wide, optimizer_state=ck.optimizer_state, config=ck.config,
                    epoch=1, metrics=ck.metrics)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"bad\.npz.*does not fit.*conv1\.weight"):
        train(cfg.replace(epochs=2, run_dir=str(tmp_path / "new")), resume=bad, log=quiet)
    assert not (tmp_path / "new").exists()


def test_resume_from_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny(tmp_path), resume=tmp_path / "nope.npz", log=quiet)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- divergence


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way to the non-finite loss
def test_divergence_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    # A sane first epoch, then the step schedule multiplies the lr by 1e30.
    cfg = tiny(tmp_path, epochs=3, schedule="step", milestones=(1,), gamma=1e30)
    with pytest.raises(DivergenceError, match=r"epoch 2, step \d+.*checkpoint.*checkpoint\.npz") as info:
        train(cfg, log=quiet)
    assert "loss is" in str(info.value)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert ck.epoch == 1
    assert all(np.isfinite(a).all() for a in ck.model_state.values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_in_the_first_epoch(tmp_path):
    with pytest.raises(DivergenceError, match=r"epoch 1, step \d+"):
        train(tiny(tmp_path, lr=1e30, momentum=0.0), log=quiet)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


# ----------------------------------------------------------------- evaluation


def test_evaluate_matches_a_direct_computation_and_restores_the_mode():
    from reference.data import load_dataset

    data = load_dataset("digits")
    model = build_model("digits_cnn", width=0.5, rng=np.random.default_rng(3))
    model.train()
    loss, acc = evaluate(model, data.x_test, data.y_test, batch_size=50)
    assert model.training
    model.eval()
    logits = model(data.x_test).data.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_p[np.arange(len(data.y_test)), data.y_test].mean()
    assert acc == np.mean(logits.argmax(axis=1) == data.y_test)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    # batch size does not change the result beyond rounding
    loss2, acc2 = evaluate(model, data.x_test, data.y_test, batch_size=1000)
    assert acc2 == acc and loss2 == pytest.approx(loss, rel=1e-5)
    assert not model.training


def test_evaluate_rejects_mismatched_inputs():
    model = build_model("digits_cnn", width=0.5)
    x = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(Exception, match="4 images but 3 labels"):
        evaluate(model, x, np.zeros(3, np.int64), 2)


# ----------------------------------------------------------------- quickstart


def test_quickstart_default_config_reaches_97_percent(tmp_path):
    """The default TrainConfig is the quickstart: >= 97 % test accuracy on the digits."""
    result = train(TrainConfig(run_dir=str(tmp_path / "quickstart"), progress=False), log=quiet)
    assert result.metrics["test_acc"] >= 0.97, result.history
    assert result.metrics["epoch"] == TrainConfig().epochs


# The README's quickstart command, as settings (kept in one place with the README by this test).
QUICKSTART_STR = {"method": "str", "target_sparsity": 0.9, "label_smoothing": 0.1, "epochs": 30}


def test_quickstart_str_run_is_90_percent_sparse_within_a_point_of_dense(tmp_path):
    """STR on digits: 90 % of the conv+fc weights zero to within half a point either way (the
    controller lands on the target, not past it), test accuracy within 1 point of dense."""
    dense = train(TrainConfig(run_dir=str(tmp_path / "dense"), progress=False), log=quiet)
    sparse = train(TrainConfig(run_dir=str(tmp_path / "str"), progress=False, **QUICKSTART_STR), log=quiet)
    assert abs(sparse.metrics["sparsity"] - 0.90) <= 0.005, sparse.history[-1]
    assert sparse.metrics["test_acc"] >= dense.metrics["test_acc"] - 0.01, (dense.metrics, sparse.metrics)


def test_readme_quickstart_command_uses_the_tested_settings():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICKSTART_STR.items())
    assert f"learnsparse train {flags}" in readme
