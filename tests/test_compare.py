"""``learnsparse compare``: a tiny sweep end to end, stopped in the middle of a run and continued,
with its matching, placement, LTP trail, tables and figures; and bad input refused up front."""

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from reference.checkpoint import load_checkpoint
from reference.cli import main
from reference.compare import FIGURE_NAMES, METHODS, RECALIBRATED, RECALIBRATION_BATCHES, SweepSpec, run_sweep
from reference.config import TrainConfig
from reference.finalize import finalize_checkpoint, load_model_from_checkpoint
from reference.train import build_data, evaluate, train

EPOCHS = 2
TARGETS = (0.5, 0.8)
SCP_LAMBDA = 0.05  # strong enough to remove channels within two epochs
STOP_AT_RUN = 4  # the sweep is stopped after the first epoch of this run (magnitude (uniform) at 0.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spec() -> SweepSpec:
    base = TrainConfig(epochs=EPOCHS, label_smoothing=0.1)
    return SweepSpec(base, TARGETS, (0,), scp_lambdas=(SCP_LAMBDA,))


class _StopInRun:
    """A training log that raises KeyboardInterrupt after the first epoch of the n-th run (Ctrl-C there)."""

    def __init__(self, n: int) -> None:
        self.n, self.runs = n, 0

    def __call__(self, line: str) -> None:
        if line.startswith("training "):
            self.runs += 1
        if self.runs == self.n and line.startswith(f"epoch   1/{EPOCHS}"):
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep stopped inside run STOP_AT_RUN, what the stop left, then the sweep continued."""
    root = tmp_path_factory.mktemp("sweep")
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(root, _spec(), log=first.append, train_log=_StopInRun(STOP_AT_RUN), plots=False)
    stopped = json.loads((root / "sweep.json").read_text())
    records = sorted(root.glob("runs/**/compare.json"))
    stamps = {p: p.stat().st_mtime_ns for p in records}
    second: list[str] = []
    doc = run_sweep(root, _spec(), log=second.append)
    return {"root": root, "first": first, "stopped": stopped, "stamps": stamps, "lines": second, "doc": doc}


def _runs(doc, key):
    return [r for r in doc["runs"] if r["method"] == key]


def test_a_stopped_sweep_continues_where_it_stopped(sweep):
    stopped, lines = sweep["stopped"], [line for line in sweep["lines"] if "] run " in line]
    assert not stopped["complete"] and len(stopped["runs"]) == STOP_AT_RUN - 1
    assert "the same command continues it" in sweep["first"][-1]
    assert len(sweep["stamps"]) == STOP_AT_RUN - 1  # the stopped run has no record yet
    for line in lines[: STOP_AT_RUN - 1]:
        assert "(done before" in line
    assert "(resumed after epoch 1" in lines[STOP_AT_RUN - 1]
    assert all("(trained" in line for line in lines[STOP_AT_RUN:])
    # the finished runs were not redone: their records are untouched
    assert all(p.stat().st_mtime_ns == t for p, t in sweep["stamps"].items())
    doc = sweep["doc"]
    assert doc["complete"] and len(doc["runs"]) == len(lines) == 1 + 6 * len(TARGETS) + 1
    assert json.loads((sweep["root"] / "sweep.json").read_text())["runs"] == doc["runs"]


def test_the_resumed_run_equals_an_uninterrupted_one(sweep, tmp_path):
    rec = sweep["doc"]["runs"][STOP_AT_RUN - 1]
    assert rec["method"] == "magnitude-uniform"
    config = TrainConfig.from_dict({**rec["config"], "run_dir": str(tmp_path / "straight")})
    straight = train(config, log=lambda _line: None)
    resumed = load_checkpoint(rec["run_dir"] + "/checkpoint.npz")
    assert resumed.epoch == EPOCHS and [m["epoch"] for m in resumed.metrics] == [1, 2]
    assert resumed.metrics[-1]["test_acc"] == straight.metrics["test_acc"]
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(resumed.model_state[name]), np.asarray(value), err_msg=name)


def test_baselines_are_matched_on_nonzero_weights(sweep):
    doc = sweep["doc"]
    for target in TARGETS:
        (str_run,) = [r for r in _runs(doc, "str") if r["target"] == target]
        layers = len(str_run["layers"])
        for key in ("magnitude-uniform", "magnitude-global", "gmp", "gmp-str-budget"):
            (run,) = [r for r in _runs(doc, key) if r["target"] == target]
            assert abs(run["nonzeros"] - str_run["nonzeros"]) <= layers, key  # rounding, one weight a layer
            if key != "gmp-str-budget":
                assert run["matched_sparsity"] == round(str_run["sparsity"], 6)
        (budget,) = [r for r in _runs(doc, "gmp-str-budget") if r["target"] == target]
        for name, counts in str_run["layers"].items():  # STR's learned budget, layer by layer
            assert abs(budget["layers"][name]["nonzeros"] - counts["nonzeros"]) <= 1, name


def test_every_run_is_placed_by_sparsity_and_macs(sweep):
    doc = sweep["doc"]
    (dense,) = _runs(doc, "dense")
    assert dense["sparsity"] == 0.0 and dense["macs"] == dense["dense_macs"]
    for rec in doc["runs"]:
        per_layer = sum(v["nonzeros"] for v in rec["layers"].values())
        if rec["method"] != "scp":
            assert rec["nonzeros"] == per_layer
            assert rec["sparsity"] == pytest.approx(1 - rec["nonzeros"] / rec["weights"])
        assert 0 < rec["macs"] <= rec["dense_macs"] == dense["dense_macs"]
    for target in TARGETS:  # sparser STR runs do fewer MACs
        (run,) = [r for r in _runs(doc, "str") if r["target"] == target]
        assert run["macs"] < dense["macs"]


def test_scp_is_placed_by_its_slimmed_network(sweep):
    (scp,) = _runs(sweep["doc"], "scp")
    assert scp["channels_after"] < scp["channels_before"]
    assert scp["weights_after_slimming"] < scp["weights"]
    assert scp["sparsity"] == pytest.approx(1 - scp["weights_after_slimming"] / scp["weights"])
    assert scp["macs"] < scp["dense_macs"]
    assert scp["test_acc"] == scp["test_acc_masked"]  # slimming removes only channels the masks turned off
    kept = sum(v["kept_after_slimming"] for v in scp["layers"].values())
    assert kept == scp["weights_after_slimming"]


def test_ltp_trail_gives_a_curve_from_one_run(sweep):
    doc = sweep["doc"]
    for run in _runs(doc, "ltp"):
        trail = run["trail"]
        assert [p["epoch"] for p in trail] == list(range(1, EPOCHS + 1))
        assert trail[-1]["sparsity"] == pytest.approx(run["sparsity"], abs=1e-9)
        assert trail[-1]["test_acc"] == run["test_acc"]
        assert abs(trail[-1]["macs"] - run["macs"]) <= len(run["layers"])  # per-layer rounding
    assert any("one run gives a whole curve" in line for line in sweep["lines"])
    assert "one run gives a whole curve" in (sweep["root"] / "compare.md").read_text()


def test_tables_hold_every_point_and_the_figures_are_drawn(sweep):
    root, doc = sweep["root"], sweep["doc"]
    rows = list(csv.DictReader(io.StringIO((root / "compare.csv").read_text())))
    trail_points = sum(len(r.get("trail") or []) for r in doc["runs"])
    assert len(rows) == len(doc["runs"]) + trail_points
    assert {r["method"] for r in rows} == set(METHODS) | {"ltp-trail"}
    table = json.loads((root / "compare.json").read_text())
    assert len(table["runs"]) == len(doc["runs"]) and table["summary"]
    assert all(0 < float(r[RECALIBRATED]) <= 1 for r in rows if r["method"] != "ltp-trail")
    md = (root / "compare.md").read_text()
    assert "| test acc % | BN recalibrated % |" in md
    for label, _ in METHODS.values():
        assert f"| {label} |" in md
    assert "Per-layer sparsity (%) at target 0.8" in md  # the target nearest 0.9
    for name in FIGURE_NAMES:
        data = (root / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


def test_a_finished_sweep_is_not_redone_and_other_settings_are_refused(sweep, capsys):
    root = sweep["root"]
    lines: list[str] = []
    run_sweep(root, _spec(), log=lines.append, plots=False)
    assert all("(done before" in line for line in lines if "] run " in line)
    before = (root / "sweep.json").read_bytes()
    argv = ["compare", str(root), "--targets", "0.5,0.9", "--epochs", str(EPOCHS)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a sweep with other settings" in err
    assert (root / "sweep.json").read_bytes() == before


@pytest.mark.parametrize("key", ["str", "ltp", "scp", "gmp-str-budget"])
def test_the_recalibrated_accuracy_is_what_finalize_recalibrate_bn_gives(sweep, tmp_path, key):
    rec = _runs(sweep["doc"], key)[-1]
    assert rec["bn_recalibration_batches"] == RECALIBRATION_BATCHES
    out = tmp_path / "final.npz"
    src = Path(rec["run_dir"]) / "checkpoint.npz"
    finalize_checkpoint(src, out, recalibrate_bn=RECALIBRATION_BATCHES)
    restored = load_model_from_checkpoint(load_checkpoint(out))
    data = build_data(restored.config)
    assert rec[RECALIBRATED] == evaluate(restored.model, data.x_test, data.y_test)[1]


def test_a_record_from_before_the_recalibrated_accuracy_gets_it_without_training(sweep):
    root = sweep["root"]
    (rec,) = [r for r in _runs(sweep["doc"], "gmp") if r["target"] == TARGETS[0]]
    record, checkpoint = Path(rec["run_dir"]) / "compare.json", Path(rec["run_dir"]) / "checkpoint.npz"
    old = json.loads(record.read_text())
    expected = old.pop(RECALIBRATED)
    del old["bn_recalibration_batches"]
    record.write_text(json.dumps(old))  # as an older version of compare wrote it
    stamps = {
        p: p.stat().st_mtime_ns for p in [checkpoint, *root.glob("runs/**/compare.json")] if p != record
    }
    lines: list[str] = []
    doc = run_sweep(root, _spec(), log=lines.append, plots=False)
    assert sum("(done before; batch norms recalibrated now" in line for line in lines) == 1
    assert json.loads(record.read_text())[RECALIBRATED] == expected
    assert [r[RECALIBRATED] for r in doc["runs"]] == [r[RECALIBRATED] for r in sweep["doc"]["runs"]]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing retrained or remeasured


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--targets", "50,90"], "fractions of zero weights in (0, 1) such as 0.9, got 50.0"),
        (["--targets", "0.5", "--methods", "str,prune"], "unknown method 'prune'"),
        (["--targets", "0.5", "--methods", "dense,gmp"], "add str to --methods"),
        (["--targets", "0.5", "--method", "str"], "use --methods"),
        (["--targets", "0.5", "--target-sparsity", "0.5"], "use --targets"),
        (["--targets", "0.5", "--seed", "1"], "use --seeds"),
        (["--targets", "0.5", "--run-dir", "x"], "--run-dir is not used"),
        (["--targets", "0.5", "--seeds", "0,0"], "--seeds must be distinct"),
        (["--targets", "0.5", "--scp-lambdas", "0"], "--scp-lambdas must be positive numbers, got 0.0"),
        (["--targets", "0.5", "--budget-target", "0.9"], "--budget-target must be one of the targets"),
        (["--targets", "x"], "expected comma-separated numbers"),
        (["--seeds", "0"], "compare needs --targets"),
        (["--targets", "0.5", "--model", "vgg"], "unknown model 'vgg'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, expected):
    root = tmp_path / "sweep"
    assert main(["compare", str(root), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("learnsparse: error: ") and expected in captured.err
    assert not root.exists()


def test_a_config_file_may_not_choose_the_method(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('method = "str"\nepochs = 1\n')
    root = tmp_path / "sweep"
    assert main(["compare", str(root), "--targets", "0.5", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave it out of config file" in err and "use --methods" in err
    assert not root.exists()


def test_missing_matplotlib_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    root = tmp_path / "sweep"
    assert main(["compare", str(root), "--targets", "0.5", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'learnsparse[plots]', or pass --no-plots" in err
    assert not root.exists()
