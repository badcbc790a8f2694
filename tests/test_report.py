"""Per-layer reports: totals equal the accounting, thresholds and channels, and md / csv / json agree."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from reference.accounting import profile, totals
from reference.autodiff import Tensor, no_grad
from reference.checkpoint import save_checkpoint
from reference.config import TrainConfig
from reference.export import export_safetensors, load_safetensors
from reference.finalize import finalize, load_model_from_checkpoint
from reference.models import build_model
from reference.nn import weight_layers
from reference.report import COLUMNS, format_report, layer_report, report_text, write_report
from reference.sparsity import build_method
from reference.train import train

INPUT = (1, 8, 8)


def sparse_model(method: str, model: str = "digits_cnn", seed: int = 0, **settings):
    """A model with ``method`` installed and its thresholds / masks set so that about half the weights are 0."""
    config = TrainConfig(model=model, method=method, width=0.5, **settings)
    in_channels = 1 if model == "digits_cnn" else 3
    net = build_model(
        model, num_classes=10, in_channels=in_channels, width=0.5, rng=np.random.default_rng(seed)
    )
    build_method(config).attach(net)
    rng = np.random.default_rng(seed + 1)
    for _, layer in weight_layers(net):
        w = layer.weight.numpy()
        quantile = float(np.quantile(np.abs(w), rng.uniform(0.3, 0.7)))
        sp = layer.sparsifier
        if method == "str":
            sp.s.data[...] = np.log(quantile / (1 - quantile))  # sigmoid(s) = quantile
        elif method == "ltp":
            sp.tau.data[...] = quantile**2
        elif method in ("magnitude", "gmp"):
            sp.set_mask(np.abs(w) > quantile)
    return net, config


def ckpt_of(net, config: TrainConfig, path: Path) -> Path:
    return save_checkpoint(
        path,
        model_state=net.state_dict(),
        optimizer_state=None,
        config=config,
        epoch=1,
        metrics=[{"epoch": 1, "test_acc": 0.5, "sparsity": 0.5}],
        extra={"method": {}},
    )


def test_rows_and_totals_equal_the_accounting():
    net, _ = sparse_model("str")
    rows = layer_report(net, INPUT)
    net.eval()
    costs = profile(net, INPUT)
    t = totals(costs)
    assert [r["layer"] for r in rows[:-1]] == [c.name for c in costs]
    for row, cost in zip(rows, costs):
        assert (row["params"], row["nonzeros"]) == (cost.params, cost.nonzeros)
        assert (row["dense_macs"], row["sparse_macs"]) == (cost.dense_macs, cost.sparse_macs)
    total = rows[-1]
    assert total["layer"] == "total"
    assert (total["params"], total["nonzeros"]) == (t.weights, t.nonzeros)
    assert (total["dense_macs"], total["sparse_macs"]) == (t.dense_macs, t.sparse_macs)  # pool included
    assert total["sparsity_pct"] == pytest.approx(100 * t.sparsity)
    assert total["compression"] == pytest.approx(t.weights / t.nonzeros)
    assert 20 < total["sparsity_pct"] < 80
    assert total["params"] == sum(r["params"] for r in rows[:-1])
    assert any(r["kind"] == "pool" for r in rows)


def test_str_and_ltp_thresholds_and_no_threshold_for_masks():
    net, _ = sparse_model("str")
    for row, (_, layer) in zip([r for r in layer_report(net, INPUT) if r["params"]], weight_layers(net)):
        s = float(layer.sparsifier.s.data)
        assert row["threshold"] == pytest.approx(1 / (1 + math.exp(-s)), rel=1e-6)
        w = layer.weight.numpy()
        assert row["nonzeros"] == int(np.count_nonzero(np.abs(w) > row["threshold"]))
    net, _ = sparse_model("ltp")
    for row, (_, layer) in zip([r for r in layer_report(net, INPUT) if r["params"]], weight_layers(net)):
        assert row["threshold"] == pytest.approx(math.sqrt(float(layer.sparsifier.tau.data)), rel=1e-6)
    net, _ = sparse_model("magnitude", target_sparsity=0.5)
    assert all(r["threshold"] is None for r in layer_report(net, INPUT))
    assert "threshold" not in format_report(layer_report(net, INPUT)).splitlines()[0]


def test_ltp_is_reported_with_the_hard_mask_and_the_mode_is_restored():
    net, _ = sparse_model("ltp")
    net.train()
    rows = layer_report(net, INPUT)
    assert net.training
    with no_grad():
        hard = sum(
            int(np.count_nonzero(layer.sparsifier.hard_mask(layer.weight))) for _, layer in weight_layers(net)
        )
    assert rows[-1]["nonzeros"] == hard


def test_scp_channels_kept_are_the_eval_mask():
    net, _ = sparse_model("scp")
    net.bn1.bias.data[:3] = -4.0  # P_c ~ 1: pruned in evaluation
    net.bn2.bias.data[:5] = -4.0
    rows = {r["layer"]: r for r in layer_report(net, INPUT)}
    assert rows["conv1"]["channels_kept"] == net.bn1.num_features - 3
    assert rows["conv2"]["channels_kept"] == net.bn2.num_features - 5
    assert rows["conv3"]["channels_kept"] == net.bn3.num_features
    assert rows["fc"]["channels_kept"] is None
    channels = sum(bn.num_features for bn in (net.bn1, net.bn2, net.bn3))
    assert rows["total"]["channels_kept"] == channels - 8
    assert f"keep {channels - 8:,} of {channels:,} masked channels" in report_text(net, INPUT)


def test_dense_model_has_no_optional_columns():
    net = build_model("resnet20", width=0.5)
    rows = layer_report(net, (3, 16, 16))
    assert rows[-1]["sparsity_pct"] == 0.0 and rows[-1]["compression"] == 1.0
    header = format_report(rows).splitlines()[0]
    assert "threshold" not in header and "channels kept" not in header
    text = report_text(net, (3, 16, 16))
    assert "conv+fc weights" in text and "including the global average pool" in text


def _parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_markdown_csv_and_json_agree(tmp_path):
    net, config = sparse_model("str")
    path = ckpt_of(net, config, tmp_path / "run.npz")
    result = write_report(path, tmp_path / "out", plots=False)
    names = {p.name for p in result.paths}
    assert {"report.md", "report.csv", "report.json"} <= names
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = doc["layers"] + [doc["totals"]]
    assert rows == result.rows
    assert "conv and fc weights" in doc["denominator"]
    csv_rows = _parse_csv((tmp_path / "out" / "report.csv").read_text())
    assert list(csv_rows[0]) == list(COLUMNS)
    assert len(csv_rows) == len(rows)
    for c, j in zip(csv_rows, rows):
        for key in COLUMNS:
            if j[key] is None:
                assert c[key] == ""
            elif isinstance(j[key], float):
                assert float(c[key]) == j[key]
            else:
                assert c[key] == str(j[key])
    md = (tmp_path / "out" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows)  # header, rule, rows
    header = [h.strip() for h in table[0].strip("|").split("|")]
    for line, j in zip(table[2:], rows):
        cells = dict(zip(header, (c.strip().strip("*") for c in line.strip("|").split("|"))))
        assert cells["layer"] == j["layer"]
        assert cells["nonzero"] == f"{j['nonzeros']:,}"
        assert cells["MACs"] == f"{j['dense_macs']:,}" and cells["sparse MACs"] == f"{j['sparse_macs']:,}"
        if j["sparsity_pct"] is not None:
            assert float(cells["sparsity"].rstrip("%")) == pytest.approx(j["sparsity_pct"], abs=0.006)
        if j["threshold"] is not None:
            assert float(cells["threshold"]) == pytest.approx(j["threshold"], rel=1e-3)
    assert f"{rows[-1]['sparsity_pct']:.2f}% of the conv+fc weights" in md
    assert "str" in md and "digits_cnn" in md


def test_reported_sparsity_equals_the_nonzeros_of_the_exported_weights(tmp_path):
    net, config = sparse_model("ltp")
    path = ckpt_of(net, config, tmp_path / "run.npz")
    total = write_report(path, tmp_path / "out", plots=False).rows[-1]
    model = load_model_from_checkpoint(path).model
    finalize(model)
    state = load_safetensors(export_safetensors(model, tmp_path / "w.safetensors", csr=True))
    weights = [state[f"{name}.weight"] for name, _ in weight_layers(model)]
    assert total["params"] == sum(w.size for w in weights)
    assert total["nonzeros"] == sum(int(np.count_nonzero(w)) for w in weights)
    assert total["sparsity_pct"] == pytest.approx(100 * (1 - total["nonzeros"] / total["params"]))


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    net, config = sparse_model("str")
    result = write_report(ckpt_of(net, config, tmp_path / "run.npz"), tmp_path / "out")
    assert len(result.notes) == 1 and "matplotlib" in result.notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.json", "report.md"]


def test_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    net, config = sparse_model("str")
    result = write_report(ckpt_of(net, config, tmp_path / "run.npz"), tmp_path / "out")
    assert not result.notes
    for name in ("sparsity.png", "weights.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_checkpoint_leaves_no_output(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(Exception, match="bad.npz"):
        write_report(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sparse_run_ends_with_the_report_table(tmp_path):
    lines: list[str] = []
    config = TrainConfig(
        epochs=1, width=0.5, batch_size=64, method="str", str_s_init=-2.0, progress=False,
        run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(config, log=lines.append)
    table = lines[-1]
    assert "threshold" in table.splitlines()[0] and "of the conv+fc weights are zero" in table
    rows = layer_report(result.model, INPUT)
    assert f"{rows[-1]['nonzeros']:,} nonzero" in table
    with no_grad():
        logits = result.model(Tensor(np.zeros((2, *INPUT), np.float32)))
    assert logits.shape == (2, 10)


# ------------------------------------------- SCP: weight sparsity and channel reduction, named apart


def _scp_with_channels_off():
    net, config = sparse_model("scp")
    net.bn1.bias.data[:3] = -4.0  # P_c ~ 1: pruned in evaluation
    net.bn2.bias.data[:5] = -4.0
    return net, config


def test_scp_report_names_weight_sparsity_and_what_slimming_removes_apart():
    from reference.report import channel_reduction

    net, _ = _scp_with_channels_off()
    c1, c2, c3 = net.bn1.num_features, net.bn2.num_features, net.bn3.num_features
    reduction = channel_reduction(net, INPUT)
    # digits_cnn: conv1 1->c1, conv2 c1->c2, conv3 c2->c3 (3x3 each), fc c3->10; slimming drops
    # the switched-off channels' rows and the next layer's matching inputs
    dense = 9 * (c1 + c1 * c2 + c2 * c3) + 10 * c3
    kept = 9 * ((c1 - 3) + (c1 - 3) * (c2 - 5) + (c2 - 5) * c3) + 10 * c3
    assert (reduction["weights"], reduction["weights_kept"]) == (dense, kept)
    assert reduction["weights_removed_pct"] == pytest.approx(100 * (1 - kept / dense))
    slimmed = net.host_copy()
    finalize(slimmed)  # removes the channels for real
    assert reduction["slimmed_macs"] == totals(profile(slimmed, INPUT)).dense_macs
    assert reduction["dense_macs"] == totals(profile(net, INPUT)).dense_macs > reduction["slimmed_macs"]
    text = report_text(net, INPUT)
    assert "weight sparsity: 0.00% of the conv+fc weights are zero" in text  # SCP zeroes no weight
    assert f"removes {100 * (1 - kept / dense):.2f}% of the conv+fc weights ({dense:,} -> {kept:,})" in text
    assert channel_reduction(sparse_model("str")[0], INPUT) is None
    assert "slimming" not in report_text(sparse_model("str")[0], INPUT)


def test_scp_chart_draws_channels_kept_per_layer():
    from reference.report import sparsity_panels

    net, _ = _scp_with_channels_off()
    panels = sparsity_panels(layer_report(net, INPUT))
    assert len(panels) == 1  # no weight is zero: the weight-sparsity chart would be empty
    label, bars, (_, overall) = panels[0]
    assert "channels kept" in label
    c1, c2, c3 = net.bn1.num_features, net.bn2.num_features, net.bn3.num_features
    assert bars == [
        ("conv1", pytest.approx(100 * (c1 - 3) / c1)),
        ("conv2", pytest.approx(100 * (c2 - 5) / c2)),
        ("conv3", pytest.approx(100.0)),
    ]
    assert overall == pytest.approx(100 * (c1 + c2 + c3 - 8) / (c1 + c2 + c3))
    str_panels = sparsity_panels(layer_report(sparse_model("str")[0], INPUT))
    assert len(str_panels) == 1 and "weight sparsity" in str_panels[0][0] and len(str_panels[0][1]) == 4


def test_scp_report_files_carry_the_channel_reduction(tmp_path):
    net, config = _scp_with_channels_off()
    result = write_report(ckpt_of(net, config, tmp_path / "run.npz"), tmp_path / "out", plots=False)
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["channel_reduction"]["weights_kept"] < doc["channel_reduction"]["weights"]
    assert doc["totals"]["sparsity_pct"] == 0.0
    assert "slimming:" in (tmp_path / "out" / "report.md").read_text() and "slimming:" in result.text


def test_an_scp_run_logs_weights_slimmed_not_sparsity(tmp_path):
    lines: list[str] = []
    config = TrainConfig(
        epochs=1, width=0.5, batch_size=64, method="scp", scp_lambda=8e-3, progress=False,
        run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, log=lines.append)
    epoch_line = next(line for line in lines if line.startswith("epoch"))
    assert "weights slimmed" in epoch_line and " sparsity " not in epoch_line
    assert "weight sparsity: 0.00%" in lines[-1] and "slimming:" in lines[-1]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-an-old-report"])
def test_a_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch, existing):
    """A full disk at each write of the report in turn: the folder is as before, no staging left."""
    import errno

    import reference.report as report

    net, config = sparse_model("str")
    ckpt = ckpt_of(net, config, tmp_path / "run.npz")
    out = tmp_path / "out"
    if existing:  # an older report, of another model, and a file of the user's
        other, _ = sparse_model("str", seed=3)
        write_report(ckpt_of(other, config, tmp_path / "other.npz"), out)
        (tmp_path / "other.npz").unlink()
        (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    real = report.write_atomic
    writes = []

    def counting(path, data):
        writes.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(report, "write_atomic", counting)
    write_report(ckpt, tmp_path / "count")
    assert len(writes) == 5, writes  # md, csv, json, sparsity.png, weights.png
    for fail_at in range(len(writes)):
        calls = []

        def full_disk(path, data, fail_at=fail_at, calls=calls):
            calls.append(path)
            if len(calls) > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, data)

        monkeypatch.setattr(report, "write_atomic", full_disk)
        with pytest.raises(report.ConfigError, match="No space left"):
            write_report(ckpt, out)
        if existing:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        else:
            assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["count", "run.npz"] + (["out"] if existing else [])
        )
    monkeypatch.setattr(report, "write_atomic", real)
    result = write_report(ckpt, out)  # and with room, the report is all there
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "report.csv", "report.json", "sparsity.png", "weights.png"]
        + (["notes.txt"] if existing else [])
    )
    assert all(Path(p).parent == out and Path(p).is_file() for p in result.paths)
