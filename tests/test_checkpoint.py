"""Checkpoint files: round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from reference import checkpoint as ckpt_mod
from reference.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from reference.errors import CheckpointError


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    model_state = {
        "conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "bn1.running_mean": np.zeros(4, np.float32),
        "bn1.num_batches": np.array(7, np.int64),
        "fc.bias": rng.standard_normal(10).astype(np.float64),
    }
    optimizer_state = {
        "groups": [{"name": "all", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
                    "num_params": 3}],
        "momentum_buffers": {"0.0": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                             "0.2": rng.standard_normal(10)},
    }  # fmt: skip
    return {
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "config": {"model": "m", "epochs": 3, "milestones": [1, 2], "data_root": None},
        "epoch": 2,
        "metrics": [{"epoch": 1, "test_acc": 0.5, "test_loss": float("nan")}, {"epoch": 2, "test_acc": 0.75}],
        "extra": {"best_acc": np.float64(0.75), "rng": {"seed": 3, "state": np.arange(4, dtype=np.uint64)}},
    }


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_keeps_arrays_dtypes_and_metadata(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "c.npz", **state)
    ck = load_checkpoint(path)
    assert ck.epoch == 2 and ck.format_version == FORMAT_VERSION
    assert list(ck.model_state) == list(state["model_state"])  # order kept
    for name, value in state["model_state"].items():
        assert ck.model_state[name].dtype == value.dtype
        assert np.array_equal(ck.model_state[name], value)
    buffers = ck.optimizer_state["momentum_buffers"]
    for key, value in state["optimizer_state"]["momentum_buffers"].items():
        assert buffers[key].dtype == value.dtype and np.array_equal(buffers[key], value)
    assert ck.optimizer_state["groups"] == state["optimizer_state"]["groups"]
    assert ck.config == state["config"]
    assert ck.metrics[1] == {"epoch": 2, "test_acc": 0.75} and np.isnan(ck.metrics[0]["test_loss"])
    assert ck.extra["best_acc"] == 0.75
    assert np.array_equal(ck.extra["rng"]["state"], np.arange(4, dtype=np.uint64))
    assert _leftovers(tmp_path) == []


def test_file_layout_is_plain_npz_without_pickle(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", **_state())
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        meta = json.loads(str(data["__meta__"][()]))
    assert {"model/conv1.weight", "model/fc.bias", "__meta__"} <= names
    assert any(n.startswith("optim/") for n in names) and any(n.startswith("extra/") for n in names)
    assert meta["format"] == "learnsparse-checkpoint" and meta["version"] == FORMAT_VERSION
    assert meta["epoch"] == 2 and "library_version" in meta


def test_config_object_with_to_dict_is_accepted(tmp_path):
    class Cfg:
        def to_dict(self):
            return {"lr": 0.1}

    state = _state()
    state["config"] = Cfg()
    assert load_checkpoint(save_checkpoint(tmp_path / "c.npz", **state)).config == {"lr": 0.1}


def test_overwrite_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, **_state(0))
    state = _state(1)
    state["epoch"] = 5
    save_checkpoint(path, **state)
    assert load_checkpoint(path).epoch == 5
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, **_state(0))
    before = path.read_bytes()

    def broken_savez(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.np, "savez", broken_savez)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_checkpoint(path, **_state(1))
    assert str(path) in str(info.value)
    assert _leftovers(tmp_path) == []
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 2


def test_interrupted_write_cleans_up_and_reraises(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.npz", **_state())
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.npz", **_state())


def test_unstorable_values_are_rejected_before_writing(tmp_path):
    state = _state()
    state["extra"] = {"f": object()}
    with pytest.raises(CheckpointError, match="object"):
        save_checkpoint(tmp_path / "c.npz", **state)
    state["extra"] = {"a": np.array([object()], dtype=object)}
    with pytest.raises(CheckpointError, match="dtype object"):
        save_checkpoint(tmp_path / "c.npz", **state)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a learnsparse checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a learnsparse checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    data = good.read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_corrupted_member_is_detected(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    data = bytearray(good.read_bytes())
    # Flip bytes inside the first member's data (after its local header): the CRC check fails.
    for i in range(200, 240):
        data[i] ^= 0xFF
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_npz_without_metadata_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no __meta__"):
        load_checkpoint(path)


def test_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CheckpointError, match="not an .npz archive"):
        load_checkpoint(path)


def _rewrite_meta(src, dst, change) -> None:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["__meta__"][()]))
    change(meta)
    arrays["__meta__"] = np.array(json.dumps(meta))
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)


def test_wrong_format_version(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    path = tmp_path / "future.npz"
    _rewrite_meta(good, path, lambda m: m.update(version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"version {FORMAT_VERSION + 1}") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_wrong_format_name(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    path = tmp_path / "other.npz"
    _rewrite_meta(good, path, lambda m: m.update(format="something-else"))
    with pytest.raises(CheckpointError, match="something-else"):
        load_checkpoint(path)


def test_incomplete_metadata(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    path = tmp_path / "partial.npz"
    _rewrite_meta(good, path, lambda m: m.pop("epoch"))
    with pytest.raises(CheckpointError, match="epoch"):
        load_checkpoint(path)


def test_pickled_object_member_is_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", **_state())
    path = tmp_path / "pickled.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        with dst.open("model/evil.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_is_readable_only_by_its_path(tmp_path):
    """The temporary name never shows up next to the target after success."""
    save_checkpoint(tmp_path / "run.npz", **_state())
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]
