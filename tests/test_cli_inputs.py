"""Inputs that once ended in a traceback or were silently meaningless: each gets one line and status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reference.accounting import estimate_memory
from reference.cli import EXIT_BROKEN_PIPE, main
from reference.config import TrainConfig, check_path
from reference.data import load_dataset, synthetic_bytes
from reference.errors import ConfigError
from reference.memory import format_bytes, require_memory
from reference.models import build_model

from .test_cli import TINY, assert_one_line_error, listing, run

BAD_BYTE = os.fsdecode(b"\xff")  # what an undecodable byte in argv becomes: a lone surrogate
LONG_NAME = "a" * 256  # one more than NAME_MAX


# ------------------------------------------------------------------ files and paths


@pytest.mark.parametrize(
    "content, needles",
    [
        (b"epochs = 1\n# caf\xe9\n", ["bad.toml", "not UTF-8", "0xe9", "offset 16"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["bad.toml", "not UTF-8", "0x89", "offset 0"]),
    ],
    ids=["latin1-toml", "png"],
)
def test_config_that_is_not_utf8(workdir, capsys, content, needles):
    (workdir / "bad.toml").write_bytes(content)
    code, _, err = run(capsys, "train", "--config", "bad.toml", *TINY)
    assert_one_line_error(code, err, *needles)
    assert listing(workdir) == ["bad.toml"]


@pytest.mark.parametrize("flag", ["--run-dir", "--config", "--resume"])
def test_path_component_longer_than_name_max(workdir, capsys, flag):
    code, _, err = run(capsys, "train", *TINY, flag, f"runs/{LONG_NAME}")
    assert_one_line_error(code, err, flag, "256 bytes", "255 bytes")
    assert listing(workdir) == []


def test_name_max_itself_is_accepted():
    check_path("a" * 255, "run_dir")  # the longest legal name
    check_path("x/" + "é" * 127, "run_dir")  # 254 bytes of UTF-8
    with pytest.raises(ConfigError, match="256 bytes"):
        check_path("é" * 128, "run_dir")  # 128 characters, 256 bytes


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", *TINY, "--run-dir", f"r{BAD_BYTE}"], ["--run-dir", "UTF-8"]),
        (["train", *TINY, "--config", f"c{BAD_BYTE}.toml"], ["--config", "UTF-8"]),
        (["eval", f"c{BAD_BYTE}.npz"], ["CHECKPOINT", "UTF-8"]),
        (["export", f"c{BAD_BYTE}.npz", "-o", "x.safetensors"], ["CHECKPOINT", "UTF-8"]),
        (["finalize", "c.npz", "-o", f"o{BAD_BYTE}.npz"], ["--output", "UTF-8"]),
        (["report", "c.npz", "--out", f"o{BAD_BYTE}"], ["--out", "UTF-8"]),
    ],
)
def test_undecodable_bytes_in_a_path(workdir, capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert listing(workdir) == []


def test_undecodable_bytes_in_a_subprocess(tmp_path):
    """The bytes as a shell passes them, through the real entry point."""
    proc = subprocess.run(
        [sys.executable, "-m", "reference", "train", *TINY, "--run-dir", b"r\xff"],
        cwd=tmp_path,
        capture_output=True,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "UTF-8" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ sizes that cannot fit


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--num-classes", "10000000000"], ["10,000,000,000 classes", "needs at least", "TiB"]),
        (
            ["--dataset", "synthetic", "--train-size", "10000000000"],
            ["10,000,000,000 + 512", "needs at least"],
        ),
        (["--dataset", "synthetic", "--image-size", "1000000"], ["3x1000000x1000000", "needs at least"]),
    ],
    ids=["num-classes", "train-size", "image-size"],
)
def test_train_sizes_that_cannot_fit(workdir, capsys, flags, needles):
    code, _, err = run(capsys, "train", *TINY, *flags)
    assert_one_line_error(code, err, *needles, "memory available")
    assert listing(workdir) == []


def test_info_num_classes_that_cannot_fit(capsys):
    code, _, err = run(capsys, "info", "resnet20", "--num-classes", "100000000000")
    assert_one_line_error(
        code, err, "100,000,000,000 classes", "6,500,000,271,824 float32 parameters", "needs at least"
    )


@pytest.mark.parametrize("model, num_classes", [("digits_cnn", 10), ("resnet20", 37), ("mobilenet_v1", 1001)])
def test_parameter_estimate_is_exact(model, num_classes):
    """The estimate, made from a two-class model, counts what the real model holds."""
    c = 1 if model == "digits_cnn" else 3
    built = build_model(model, num_classes=num_classes, in_channels=c, width=0.25)
    need = estimate_memory(model, (c, 32, 32), num_classes, 0.25)
    assert need.parameters == sum(int(p.size) for p in built.parameters())
    assert need.model_bytes == 4 * need.parameters
    assert need.training_bytes(8) == 12 * need.parameters + 32 * need.activations


def test_synthetic_data_set_bytes_and_refusal():
    data = load_dataset("synthetic", image_shape=(3, 8, 8), num_classes=4, train_size=40, test_size=12)
    images = data.x_train.nbytes + data.x_test.nbytes + data.y_train.nbytes + data.y_test.nbytes
    assert synthetic_bytes((3, 8, 8), 4, 40, 12) == images + 4 * 3 * 8 * 8 * 4
    with pytest.raises(ConfigError, match=r"synthetic data set \(10,000,000,000,000 train.*needs at least"):
        load_dataset("synthetic", image_shape=(3, 8, 8), train_size=10**13)


def test_require_memory_names_the_estimate():
    require_memory(1024, "x", available=1024)  # exactly fits
    with pytest.raises(
        ConfigError, match=r"^the thing needs at least 1\.0 KiB \(1,025 bytes\), more than the 1\.0 KiB"
    ):
        require_memory(1025, "the thing", available=1024)
    assert format_bytes(3 * 2**40) == "3.0 TiB"
    assert format_bytes(100) == "100 B"


def test_memory_error_is_one_line(workdir, capsys, monkeypatch):
    """A size the estimates let through still ends in one line, not a traceback."""
    import reference.accounting

    def no_memory(*_args, **_kwargs):
        raise MemoryError("Unable to allocate 9.0 GiB for an array")

    monkeypatch.setattr(reference.accounting, "summarize", no_memory)
    code, _, err = run(capsys, "info", "resnet20")
    assert_one_line_error(code, err, "out of memory", "9.0 GiB")


# ------------------------------------------------------------------ a closed pipe


def _info_into(close_at_once: bool) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference", "info", "resnet50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if not close_at_once:
        proc.stdout.readline()  # what head -1 does before it goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=60), err


def test_closed_pipe_exits_quietly():
    """``learnsparse info resnet50 | head -1``: the reader goes away, the writer ends quietly."""
    code, err = _info_into(close_at_once=True)  # the reader is gone before the first write: always EPIPE
    assert (code, err) == (EXIT_BROKEN_PIPE, "")
    code, err = _info_into(close_at_once=False)  # the table may fit in the pipe's buffer: 0 or 141
    assert code in (0, EXIT_BROKEN_PIPE) and err == ""


def test_broken_pipe_status_in_process(capsys, monkeypatch):
    import reference.cli

    def closed(_message):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(reference.cli, "_print", closed)
    monkeypatch.setattr(reference.cli, "_silence_stdout", lambda: None)  # keep pytest's stdout
    assert main(["info", "digits_cnn"]) == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ settings that would mean nothing


@pytest.mark.parametrize("method", ["dense", "scp"])
def test_target_sparsity_with_a_method_that_ignores_it(workdir, capsys, method):
    code, _, err = run(capsys, "train", *TINY, "--method", method, "--target-sparsity", "0.9")
    assert_one_line_error(code, err, "target_sparsity", repr(method), "0.9")
    assert listing(workdir) == []


@pytest.mark.parametrize("method", ["str", "ltp", "magnitude", "gmp"])
def test_target_sparsity_still_accepted_where_it_steers(method):
    assert TrainConfig(method=method, target_sparsity=0.5).target_sparsity == 0.5


@pytest.mark.parametrize("prefix", ["--epoch", "--ep", "--target-spars"])
def test_abbreviated_flags_are_refused(workdir, capsys, prefix):
    code, _, err = run(capsys, "train", prefix, "1", "--quiet")
    assert_one_line_error(code, err, prefix)
    assert listing(workdir) == []


def test_abbreviated_flags_of_other_commands(capsys):
    code, _, err = run(capsys, "info", "resnet20", "--num-class", "5")
    assert_one_line_error(code, err, "--num-class")


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_data_root_for_a_builtin_data_set(workdir, capsys, dataset):
    code, _, err = run(capsys, "train", *TINY, "--dataset", dataset, "--data-root", str(workdir))
    assert_one_line_error(code, err, "data_root", repr(dataset))
    assert listing(workdir) == []


def test_resume_with_fewer_epochs_than_done(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--width", "0.5", "--quiet", "--run-dir", str(run_dir)]) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    code, _, err = run(capsys, "train", "--resume", run_dir / "checkpoint.npz", "--epochs", "1", "--quiet")
    assert_one_line_error(code, err, "--epochs 1", "2 epochs", "--epochs 2 or more")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("value", ["-1e30", "-7", "-0.5", "-2.5E-1"])
def test_negative_numbers_are_values(value, monkeypatch):
    import reference.cli

    seen = {}

    def fake_train(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setitem(reference.cli._COMMANDS, "train", fake_train)
    assert main(["train", "--str-s-init", value, "--quiet"]) == 0
    assert seen["str_s_init"] == float(value)


def test_negative_number_after_a_flag_without_value(capsys):
    code, _, err = run(capsys, "train", "--quiet", "-1e30")
    assert_one_line_error(code, err, "--quiet")


def test_negative_number_trains(workdir, capsys):
    code, _, err = run(capsys, "train", *TINY, "--method", "str", "--str-s-init", "-1e3", "--run-dir", "r")
    assert code == 0, err
    assert json.loads(Path("r/config.json").read_text())["str_s_init"] == -1e3
