"""Budgets: the STR CSV, column choice, checks, budgets read back from checkpoints, cost without training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from reference.accounting import profile, totals
from reference.autodiff import Tensor, no_grad
from reference.build import budget_from_checkpoint, load_budget
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.errors import ConfigError, DataError
from reference.finalize import finalize_checkpoint, load_model_from_checkpoint
from reference.models import build_model
from reference.nn import Conv2d, GlobalAvgPool2d, Linear, Sequential, weight_layers
from reference.sparsity import build_method
from reference.sparsity.budgets import (
    STR_RESNET50,
    budget_columns,
    budget_cost,
    check_budget,
    cost_budget_report,
    read_budget_csv,
)
from reference.sparsity.magnitude import MagnitudePruning, keep_count
from reference.train import train
from tests.common import quiet

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "str_budgets_resnet50.csv"
STR_LABELS = [
    "79.55", "81.27", "87.7", "90.23", "90.55", "94.8", "95.03", "95.15",
    "96.11", "96.53", "97.78", "98.05", "98.22", "98.79", "98.98", "99.1",
]  # fmt: skip


@pytest.fixture(scope="module")
def resnet50():
    return build_model("resnet50", num_classes=1000)


def _write(tmp_path, text: str, name: str = "budget.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------- the STR file


def test_str_budget_file_has_54_layers_named_like_resnet50(resnet50):
    names = [name for name, _ in weight_layers(resnet50)]
    assert budget_columns(STR_RESNET50) == STR_LABELS
    for label in STR_LABELS:
        budget = read_budget_csv(STR_RESNET50, label)
        assert len(budget) == 54
        assert list(budget) == names  # the same names, in the model's order
        assert check_budget(budget, resnet50) == budget
    b = read_budget_csv(STR_RESNET50, "90.23")
    assert b["conv1"] == pytest.approx(0.598) and b["fc"] == pytest.approx(0.645)
    assert b["layer2.0.downsample.0"] == pytest.approx(0.9496)


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="the shared data folder (../shared/data) is not present")
def test_packaged_copy_equals_the_shared_file():
    assert STR_RESNET50.read_bytes() == SHARED_CSV.read_bytes()


def test_column_is_chosen_by_label_header_or_value():
    by_label = read_budget_csv(STR_RESNET50, "90.23")
    assert read_budget_csv(STR_RESNET50, "sparsity_pct@90.23") == by_label
    assert read_budget_csv(STR_RESNET50, " 90.230 ") == by_label
    assert read_budget_csv(STR_RESNET50, "87.70")["conv1"] == pytest.approx(0.6302)
    assert read_budget_csv(STR_RESNET50, "sparsity_pct@87.70") == read_budget_csv(STR_RESNET50, "87.7")


def test_a_single_column_needs_no_choice_and_several_do(tmp_path):
    one = _write(tmp_path, "layer,sparsity_pct@50\nconv1,50\nfc,12.5\n")
    assert read_budget_csv(one) == {"conv1": 0.5, "fc": 0.125}
    with pytest.raises(DataError, match=r"holds 16 budgets.*79\.55, 81\.27.*99\.1"):
        read_budget_csv(STR_RESNET50)


# ------------------------------------------------------------------- errors


def test_unknown_column_lists_the_available_ones():
    with pytest.raises(
        DataError, match=r"no column '90\.2'\. Available columns: 79\.55, 81\.27, 87\.7, 90\.23"
    ):
        read_budget_csv(STR_RESNET50, "90.2")


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,sparsity_pct@50\nconv1,50\n", "no 'layer' column"),
        ("layer,density\nconv1,50\n", "no budget column"),
        ("layer,sparsity_pct@50\nconv1,100\n", r"layer 'conv1' has sparsity 100% .*\[0, 100\)"),
        ("layer,sparsity_pct@50\nconv1,-1\n", "layer 'conv1' has sparsity -1%"),
        ("layer,sparsity_pct@50\nconv1,lots\n", "layer 'conv1' has no valid percent"),
        ("layer,sparsity_pct@50\nconv1,\n", "layer 'conv1' has no valid percent"),
        ("layer,sparsity_pct@50\nconv1,nan\n", "layer 'conv1' has no valid percent"),
        ("layer,sparsity_pct@50\nconv1,50\nconv1,60\n", r"line 3: layer 'conv1' appears twice"),
        ("layer,sparsity_pct@50\n", "no layers"),
        ("", "is empty"),
    ],
)
def test_malformed_budget_files(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_budget_csv(_write(tmp_path, text))


def test_missing_budget_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_budget_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="does not exist"):
        load_budget(tmp_path / "nope.csv")


def test_check_budget_names_the_layer_at_fault():
    model = build_model("digits_cnn")
    good = {"conv1": 0.1, "conv2": 0.2, "conv3": 0.3, "fc": 0.4}
    assert list(check_budget(dict(reversed(good.items())), model)) == ["conv1", "conv2", "conv3", "fc"]
    with pytest.raises(ConfigError, match="no sparsity for layer.*'conv3'"):
        check_budget({k: v for k, v in good.items() if k != "conv3"}, model)
    with pytest.raises(ConfigError, match="unknown layer.*'conv4'"):
        check_budget({**good, "conv4": 0.5}, model)
    for bad in (1.0, -0.1, math.nan, True, "0.5"):
        with pytest.raises(ConfigError, match=r"layer 'conv2' must be a sparsity fraction in \[0, 1\)"):
            check_budget({**good, "conv2": bad}, model)
    with pytest.raises(ConfigError, match="divided by 100"):
        check_budget({**good, "fc": 90.0}, model)


def test_a_budget_that_does_not_fit_the_model_is_refused_when_attaching():
    method = MagnitudePruning(budget=read_budget_csv(STR_RESNET50, "90.23"))
    with pytest.raises(ConfigError, match="budget does not fit DigitsCNN: no sparsity for layer"):
        method.attach(build_model("digits_cnn"))


# ------------------------------------------------ budget transfer round trip


def test_budget_transfer_reproduces_the_source_budget_per_layer(tmp_path):
    source = {"conv1": 0.5, "conv2": 0.8, "conv3": 0.9, "fc": 0.6}
    csv_path = _write(
        tmp_path, "layer,sparsity_pct@x\n" + "".join(f"{k},{100 * v:g}\n" for k, v in source.items())
    )
    common = {
        "epochs": 2, "width": 0.5, "batch_size": 64, "progress": False, "prune_frequency": 5,
    }  # fmt: skip

    # 1. magnitude pruning with the CSV budget: every layer at exactly its k
    first_cfg = TrainConfig(method="magnitude", budget=str(csv_path), run_dir=str(tmp_path / "a"), **common)
    first = train(first_cfg, log=quiet)
    measured = budget_from_checkpoint(tmp_path / "a" / "checkpoint.npz")
    sizes = {name: layer.weight.size for name, layer in weight_layers(first.model)}
    assert list(measured) == list(source)
    for name, s in source.items():
        n = sizes[name]
        assert measured[name] == (n - keep_count(n, s)) / n
        assert abs(measured[name] - s) <= 0.5 / n
    assert first.metrics["sparsity"] == pytest.approx(
        sum(measured[k] * sizes[k] for k in sizes) / sum(sizes.values())
    )

    # 2. GMP with the first run's checkpoint as its budget reproduces it exactly
    source_ckpt = str(tmp_path / "a" / "checkpoint.npz")
    second = TrainConfig(method="gmp", budget=source_ckpt, run_dir=str(tmp_path / "b"), **common)
    train(second, log=quiet)
    assert budget_from_checkpoint(tmp_path / "b" / "checkpoint.npz") == measured

    # a checkpoint holds one budget: a column makes no sense
    with pytest.raises(ConfigError, match="applies to budget CSV files only"):
        build_method(second.replace(budget_column="90.23", run_dir=str(tmp_path / "c")))
    # measuring a checkpoint rebuilds its model: the method layer leaves that to reference.build
    with pytest.raises(ConfigError, match="is a checkpoint: read it with reference.build.load_budget"):
        build_method(second)
    assert build_method(second, budget=measured).budget == measured
    with pytest.raises(ConfigError, match="method 'str' takes no budget"):
        build_method(TrainConfig(method="str"), budget=measured)

    # the checkpoint holds the budget as read: it loads, finalizes and evaluates without the file
    trained = tmp_path / "b" / "checkpoint.npz"
    assert load_checkpoint(trained).extra["budget"] == measured
    (tmp_path / "a" / "checkpoint.npz").rename(tmp_path / "moved.npz")
    restored = load_model_from_checkpoint(trained)
    assert budget_from_checkpoint(trained) == measured
    finalize_checkpoint(trained, tmp_path / "final.npz")
    final = load_model_from_checkpoint(tmp_path / "final.npz")  # no budget left in a finalized config
    x = np.random.default_rng(0).standard_normal((4, *restored.input_shape)).astype(np.float32)
    with no_grad():
        np.testing.assert_allclose(
            final.model(Tensor(x)).data, restored.model(Tensor(x)).data, rtol=1e-5, atol=1e-6
        )


# ------------------------------------------------------------------ cost


def _tiny_model():
    """conv 1->2 3x3 pad 1 on 4x4 (18 weights, 16 positions), global pool, fc 2->3 (6 weights)."""
    rng = np.random.default_rng(0)
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), GlobalAvgPool2d(), Linear(2, 3, rng=rng))


def test_budget_cost_by_hand_and_equal_to_accounting_of_the_pruned_model():
    budget = {"0": 0.5, "2": 1 / 3}
    model = _tiny_model()
    rows = budget_cost(model, (1, 4, 4), budget)
    by_name = {r.name: r for r in rows}
    assert (by_name["0"].params, by_name["0"].nonzeros, by_name["0"].dense_macs, by_name["0"].sparse_macs) == (
        18, 9, 288, 144,
    )  # fmt: skip
    assert (by_name["1"].dense_macs, by_name["1"].sparse_macs) == (32, 32)  # pool: 2 * 4 * 4, never sparse
    assert (by_name["2"].params, by_name["2"].nonzeros, by_name["2"].dense_macs, by_name["2"].sparse_macs) == (
        6, 4, 6, 4,
    )  # fmt: skip
    t = totals(rows)
    assert (t.weights, t.nonzeros, t.dense_macs, t.sparse_macs, t.pool_macs) == (24, 13, 326, 180, 32)
    assert np.all(model[0].weight.data != 0)  # costing read nothing into the model

    # prune the model to the budget for real: the accounting agrees row by row
    method = MagnitudePruning(budget=budget)
    method.attach(model)
    method.update_masks(model, 1.0)
    assert profile(model, (1, 4, 4)) == rows


def test_budget_cost_matches_accounting_on_a_dense_budget(resnet50):
    zero = {name: 0.0 for name, _ in weight_layers(resnet50)}
    assert budget_cost(resnet50, (3, 224, 224), zero) == profile(resnet50, (3, 224, 224))


def test_str_resnet50_budget_cost_and_report(resnet50):
    rows = budget_cost(resnet50, (3, 224, 224), read_budget_csv(STR_RESNET50, "90.23"))
    t = totals(rows)
    assert t.weights == 25_502_912 and t.dense_macs == 4_089_284_608  # METHODS.md section 6
    assert (t.nonzeros, t.sparse_macs) == (2_492_041, 342_704_361)
    assert round(100 * t.sparsity, 2) == 90.23
    # STR's published model at 90.23 %: 2.49M parameters and 343M FLOPs (MACs)
    assert abs(t.nonzeros - 2.49e6) < 0.01e6 and abs(t.sparse_macs - 343e6) < 1e6

    report = cost_budget_report("resnet50", STR_RESNET50, "90.23", 224, 1000)
    for text in ("layer2.0.downsample.0", "budget sparsity", "59.80%", "25,502,912", "2,492,041",
                 "4,089,284,608", "342,704,361", "sparsity 90.23%", "compression 10.23x"):  # fmt: skip
        assert text in report, text
    # title, blank, header, rule, 54 layers + the pool, rule, total, blank, 2 summary lines
    assert len(report.splitlines()) == 2 + 2 + 55 + 2 + 1 + 2
