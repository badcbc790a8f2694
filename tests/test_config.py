"""TrainConfig: defaults, layering (defaults < TOML < overrides), validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from reference.config import TrainConfig, field_kind, load_toml, resolve_config
from reference.errors import ConfigError


def test_defaults_are_the_digits_quickstart():
    cfg = TrainConfig()
    assert cfg.model == "digits_cnn" and cfg.dataset == "digits"
    assert cfg.num_classes is None and cfg.run_dir is None and cfg.milestones == ()


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_dict_round_trip():
    cfg = TrainConfig(model="resnet20", dataset="synthetic", schedule="step", milestones=[3, 5], epochs=6)
    assert cfg.milestones == (3, 5)
    d = cfg.to_dict()
    assert d["milestones"] == [3, 5]
    assert TrainConfig.from_dict(d) == cfg


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig(
        model="resnet20", dataset="synthetic", schedule="step", milestones=[3, 5], epochs=6,
        run_dir='odd "dir" \\ name', label_smoothing=0.1, augment=True,
    )  # fmt: skip
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert resolve_config(path) == cfg


def test_ints_are_accepted_for_floats():
    cfg = TrainConfig(lr=1, width=2)
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and isinstance(cfg.width, float)


def test_layers_defaults_toml_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 3\nlr = 0.2\nmodel = "digits_cnn"\nmilestones = []\n')
    cfg = resolve_config(path, {"lr": 0.3, "seed": 4})
    assert cfg.epochs == 3  # from the file
    assert cfg.lr == 0.3  # the override wins over the file
    assert cfg.seed == 4
    assert cfg.batch_size == TrainConfig().batch_size  # default


def test_base_layer_sits_below_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = 3\n")
    base = TrainConfig(epochs=9, seed=7)
    cfg = resolve_config(path, {}, base=base)
    assert cfg.epochs == 3 and cfg.seed == 7


def test_train_table_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 4\n")
    assert load_toml(path) == {"epochs": 4}


def test_load_toml_returns_only_present_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("milestones = [2, 4]\nnesterov = true\n")
    assert load_toml(path) == {"milestones": (2, 4), "nesterov": True}


def test_unknown_toml_key_lists_valid_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = 2\nbatchsize = 3\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    msg = str(info.value)
    assert "'batchsize'" in msg and "batch_size" in msg and "label_smoothing" in msg and str(path) in msg


def test_missing_toml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


def test_toml_directory(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load_toml(tmp_path)


def test_invalid_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(path)


def test_wrong_type_in_toml_names_the_file_and_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = "2"\n')
    with pytest.raises(ConfigError, match=r"c\.toml.*epochs must be an integer, got '2'"):
        load_toml(path)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"eval_batch_size": -1}, "eval_batch_size must be a positive integer"),
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"lr": -0.1}, r"lr must be a positive number, got -0\.1"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1\.0"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -1e-4}, "weight_decay must be a non-negative number"),
        ({"width": 0}, "width must be a positive number"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"warmup_epochs": 99}, "warmup_epochs must be between 0 and epochs"),
        ({"model": "resnet9000"}, "unknown model 'resnet9000'; expected one of: digits_cnn"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'; expected one of: digits"),
        ({"schedule": "poly"}, "unknown schedule 'poly'"),
        ({"schedule": "step"}, "needs at least one milestone"),
        ({"schedule": "step", "milestones": (5, 3)}, "milestones must be strictly increasing"),
        ({"schedule": "constant", "warmup_epochs": 1}, "no warmup"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov must be false when momentum is 0"),
        ({"epochs": "3"}, "epochs must be an integer, got '3'"),
        ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"augment": 1}, "augment must be true or false, got 1"),
        ({"milestones": "3,5"}, "milestones must be a list of integers"),
        ({"model": None}, "model must be a string, got None"),
        ({"dataset": "cifar10"}, "dataset 'cifar10' needs data_root"),
        ({"run_dir": "  "}, "run_dir must be a directory path"),
    ],
)
def test_invalid_values_name_the_value_and_the_expectation(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(**changes)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'.*valid settings are: model"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="expected a table"):
        TrainConfig.from_dict([("lr", 0.1)])  # type: ignore[arg-type]


def test_replace_validates():
    cfg = TrainConfig()
    assert cfg.replace(epochs=2).epochs == 2
    with pytest.raises(ConfigError, match="batch_size"):
        cfg.replace(batch_size=0)
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        cfg.replace(bogus=1)


def test_field_kind():
    assert field_kind("lr") == "float" and field_kind("epochs") == "int" and field_kind("augment") == "bool"
    assert field_kind("model") == "str" and field_kind("milestones") == "int_list"
    with pytest.raises(ConfigError):
        field_kind("nope")
