"""Every method refuses a model it cannot sparsify, with a message naming the model."""

import pytest

from reference.config import TrainConfig
from reference.errors import ConfigError
from reference.nn import ReLU, Sequential
from reference.sparsity import METHOD_NAMES, build_method

SETTINGS = {"magnitude": {"target_sparsity": 0.5}, "gmp": {"target_sparsity": 0.5}}


@pytest.mark.parametrize("name", [m for m in METHOD_NAMES if m != "dense"])
def test_method_on_a_model_without_eligible_layers_is_a_clear_error(name):
    method = build_method(TrainConfig(method=name, **SETTINGS.get(name, {})))
    with pytest.raises(ConfigError, match="Sequential"):
        method.attach(Sequential(ReLU()))


@pytest.mark.parametrize(
    "setting, value, expected",
    [
        ("target_sparsity", 1.0, r"target_sparsity must be in \[0, 1\)"),
        ("target_sparsity", -0.1, r"target_sparsity must be in \[0, 1\)"),
        ("ltp_t0", 0.0, "ltp_t0 must be a positive temperature"),
        ("scp_k", -1.0, "scp_k must be a positive number"),
        ("scp_t", 0.0, "scp_t must be a positive temperature"),
    ],
)
def test_bad_sparsity_settings_name_the_value(setting, value, expected):
    with pytest.raises(ConfigError, match=expected):
        TrainConfig(**{setting: value})
