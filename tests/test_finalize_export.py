"""Finalizing sparse models into plain ones, exporting them as safetensors, and the three commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reference.autodiff import Tensor, no_grad
from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.cli import main
from reference.config import TrainConfig
from reference.export import csr_decode, csr_encode, export_safetensors, load_safetensors
from reference.finalize import (
    data_shape,
    finalize,
    finalize_checkpoint,
    has_sparsity_modules,
    load_model_from_checkpoint,
)
from reference.models import build_model
from reference.nn import BatchNorm2d, weight_layers
from reference.sparsity import build_method

REPO = Path(__file__).resolve().parents[1]
SPARSITY_WORDS = ("sparsifier", "channel_mask", ".s", ".tau", ".mask")


def sparse_model(method: str, model: str = "digits_cnn", seed: int = 0, **settings):
    """``model`` at width 0.5 (or ``settings["width"]``) with ``method`` installed, random BN statistics,
    and thresholds / masks that zero about half the weights (SCP: some channels switched off)."""
    config = TrainConfig(**{"model": model, "method": method, "width": 0.5, **settings})
    in_channels = 1 if model == "digits_cnn" else 3
    net = build_model(
        model, num_classes=config.num_classes or 10, in_channels=in_channels, width=config.width,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    build_method(config).attach(net)
    rng = np.random.default_rng(seed + 1)
    for m in net.modules():
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.running_mean[...] = rng.normal(0, 0.2, c)
            m.running_var[...] = rng.uniform(0.5, 2.0, c)
            m.weight.data[...] = rng.uniform(0.5, 1.5, c)
            m.bias.data[...] = rng.normal(0, 0.2, c)
            if m.channel_mask is not None:
                m.bias.data[rng.permutation(c)[: c // 3]] = -4.0  # switched off in evaluation
    for _, layer in weight_layers(net):
        w = layer.weight.numpy()
        q = float(np.quantile(np.abs(w), rng.uniform(0.3, 0.7)))
        sp = layer.sparsifier
        if method == "str":
            sp.s.data[...] = np.log(q / (1 - q))
        elif method == "ltp":
            sp.tau.data[...] = q**2
        elif method == "magnitude":
            sp.set_mask(np.abs(w) > q)
    return net, config


def images(model: str, n: int = 4, seed: int = 5) -> np.ndarray:
    shape = (1, 8, 8) if model == "digits_cnn" else (3, 16, 16)
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def outputs(net, x: np.ndarray) -> np.ndarray:
    net.eval()
    with no_grad():
        return np.array(net(Tensor(x)).numpy())


def save(net, config, path: Path) -> Path:
    return save_checkpoint(
        path, model_state=net.state_dict(), optimizer_state=None, config=config, epoch=1,
        metrics=[{"epoch": 1, "test_acc": 0.5, "sparsity": 0.5}], extra={"method": {}},
    )  # fmt: skip


CASES = [
    ("dense", "digits_cnn", {}),
    ("str", "digits_cnn", {}),
    ("str", "resnet20", {"str_per_channel": True}),
    ("magnitude", "digits_cnn", {"target_sparsity": 0.5}),
    ("ltp", "digits_cnn", {}),
    ("scp", "digits_cnn", {}),
    ("scp", "resnet20", {}),
]


@pytest.mark.parametrize("method, model, settings", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_finalize_keeps_eval_outputs_and_leaves_plain_names(method, model, settings):
    net, _ = sparse_model(method, model, **settings)
    x = images(model)
    before = outputs(net, x)
    plain_keys = list(build_model(model, in_channels=x.shape[1], width=0.5).state_dict())
    with no_grad():
        w_eff = {name: np.array(layer.effective_weight().numpy()) for name, layer in weight_layers(net)}
    summary = finalize(net)
    after = outputs(net, x)
    assert not has_sparsity_modules(net)
    assert sorted(net.state_dict()) == sorted(plain_keys)  # torchvision names, nothing else
    assert not any(word in key for key in plain_keys for word in SPARSITY_WORDS if word != ".s")
    if method == "scp":
        assert summary.slimmed and summary.slim["channels_after"] < summary.slim["channels_before"]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    else:
        assert not summary.slimmed
        np.testing.assert_array_equal(after, before)  # the same weights: the same numbers
        for name, layer in weight_layers(net):
            np.testing.assert_array_equal(layer.weight.numpy(), w_eff[name])
    if method in ("str", "ltp", "magnitude"):
        assert 0.2 < summary.sparsity < 0.8
        assert len(summary.layers) == len(weight_layers(net))
        for _, layer in weight_layers(net):
            w = layer.weight.numpy()
            assert not np.signbit(w[w == 0]).any()  # pruned entries are +0.0


def test_scp_slimming_makes_layers_smaller():
    net, _ = sparse_model("scp")
    before = [bn.num_features for bn in (net.bn1, net.bn2, net.bn3)]
    finalize(net)
    after = [bn.num_features for bn in (net.bn1, net.bn2, net.bn3)]
    assert all(a < b for a, b in zip(after, before))
    assert net.conv2.weight.shape[:2] == (after[1], after[0]) and net.fc.weight.shape[1] == after[2]


@pytest.mark.parametrize("method", ["str", "scp"])
def test_finalized_checkpoint_loads_back_and_computes_the_same(tmp_path, method):
    net, config = sparse_model(method)
    src = save(net, config, tmp_path / "run.npz")
    x = images("digits_cnn")
    expected = outputs(net, x)
    path, summary = finalize_checkpoint(src, tmp_path / "final.npz")
    ckpt = load_checkpoint(path)
    assert ckpt.config["method"] == "dense"
    record = ckpt.extra["finalized"]
    assert record["from_method"] == method and record["slimmed"] == (method == "scp")
    assert record["input_shape"] == [1, 8, 8] and record["num_classes"] == 10
    assert not any(w in k for k in ckpt.model_state for w in ("sparsifier", "channel_mask"))
    restored = load_model_from_checkpoint(path)
    assert restored.finalized is not None and restored.method_name == method
    np.testing.assert_allclose(outputs(restored.model, x), expected, rtol=1e-5, atol=1e-5)
    again, _ = finalize_checkpoint(path, tmp_path / "final2.npz")  # finalizing twice changes nothing
    for k, v in load_checkpoint(again).model_state.items():
        np.testing.assert_array_equal(v, ckpt.model_state[k])


def test_data_shape_agrees_with_the_loaded_data_sets():
    from reference.train import build_data

    for config in (
        TrainConfig(),
        TrainConfig(dataset="synthetic", image_size=12, train_size=20, test_size=10, num_classes=4),
    ):
        data = build_data(config)
        assert data_shape(config) == (tuple(data.x_train.shape[1:]), data.num_classes)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("csr", [False, True])
def test_export_round_trip_is_exact(tmp_path, csr):
    net, _ = sparse_model("str", "resnet20")
    finalize(net)
    state = net.state_dict()
    path = export_safetensors(net, tmp_path / "w.safetensors", csr=csr)
    loaded = load_safetensors(path)
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert loaded[name].dtype == (np.float32 if value.dtype.kind == "f" else value.dtype), name
        assert loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left


def test_csr_file_layout_and_size(tmp_path):
    from safetensors import safe_open

    net, _ = sparse_model("str", "resnet20")
    for _, layer in weight_layers(net):  # 90 % sparse: CSR (8 bytes per nonzero) beats dense (4 per weight)
        g = float(np.quantile(np.abs(layer.weight.numpy()), 0.9))
        layer.sparsifier.s.data[...] = np.log(g / (1 - g))
    finalize(net)
    dense = export_safetensors(net, tmp_path / "dense.safetensors")
    sparse = export_safetensors(net, tmp_path / "csr.safetensors", csr=True)
    assert sparse.stat().st_size < dense.stat().st_size
    with safe_open(str(sparse), framework="np") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        shapes = json.loads(meta["csr_shapes"])
        assert shapes["layer1.0.conv1.weight"] == list(net.layer1[0].conv1.weight.shape)
        assert "layer1.0.conv1.weight" not in keys and "layer1.0.bn1.running_var" in keys
        indptr = fh.get_tensor("fc.weight.csr.indptr")
        assert indptr.shape == (10 + 1,) and indptr[-1] == np.count_nonzero(net.fc.weight.numpy())
    assert {f"conv1.weight.csr.{p}" for p in ("data", "indices", "indptr")} <= keys


def test_csr_encoding_matches_scipy_and_handles_empty_layers():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * (rng.random((6, 3, 3, 3)) < 0.3)
    w[2] = 0  # an empty row
    parts = csr_encode(w)
    oracle = sparse.csr_matrix(w.reshape(6, -1))
    np.testing.assert_array_equal(parts["data"], oracle.data)
    np.testing.assert_array_equal(parts["indices"], oracle.indices)
    np.testing.assert_array_equal(parts["indptr"], oracle.indptr)
    np.testing.assert_array_equal(csr_decode(parts, w.shape), w)
    empty = csr_encode(np.zeros((4, 5), np.float32))
    assert empty["data"].shape == (0,)
    np.testing.assert_array_equal(csr_decode(empty, (4, 5)), np.zeros((4, 5)))


def test_export_refuses_a_model_that_is_not_finalized(tmp_path):
    net, _ = sparse_model("str")
    with pytest.raises(Exception, match="finalize it first"):
        export_safetensors(net, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())


def _torch_resnet(state: dict[str, np.ndarray]):
    """A CIFAR ResNet in plain torch.nn with torchvision's module names, its channels read from ``state``."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def conv(name, stride, padding):
        w = state[f"{name}.weight"]
        return nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride, padding=padding, bias=False)

    class Block(nn.Module):
        def __init__(self, prefix: str, stride: int):
            super().__init__()
            self.conv1 = conv(f"{prefix}.conv1", stride, 1)
            self.bn1 = nn.BatchNorm2d(state[f"{prefix}.bn1.weight"].shape[0])
            self.conv2 = conv(f"{prefix}.conv2", 1, 1)
            self.bn2 = nn.BatchNorm2d(state[f"{prefix}.bn2.weight"].shape[0])
            self.downsample = None
            if f"{prefix}.downsample.0.weight" in state:
                bn = nn.BatchNorm2d(state[f"{prefix}.downsample.1.weight"].shape[0])
                self.downsample = nn.Sequential(conv(f"{prefix}.downsample.0", stride, 0), bn)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = conv("conv1", 1, 1)
            self.bn1 = nn.BatchNorm2d(state["bn1.weight"].shape[0])
            for i in (1, 2, 3):
                blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")})
                stage = [Block(f"layer{i}.{j}", 2 if (i > 1 and j == 0) else 1) for j in blocks]
                setattr(self, f"layer{i}", nn.Sequential(*stage))
            w = state["fc.weight"]
            self.fc = nn.Linear(w.shape[1], w.shape[0])

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return Net()


@pytest.mark.parametrize("method", ["str", "scp"])
def test_pytorch_loads_the_exported_resnet_and_agrees(tmp_path, method):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    net, _ = sparse_model(method, "resnet20")
    x = images("resnet20")
    expected = outputs(net, x)
    finalize(net)
    path = export_safetensors(net, tmp_path / "w.safetensors")
    tensors = load_file(str(path))
    model = _torch_resnet({k: v.numpy() for k, v in tensors.items()})
    model.load_state_dict(tensors, strict=True)  # every name matches torchvision's
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ command line


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learnsparse: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


TINY = ["--epochs", "1", "--width", "0.5", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def str_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "str"
    assert main(["train", *TINY, "--method", "str", "--str-s-init", "-2", "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def ltp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "ltp"
    argv = ["train", *TINY, "--epochs", "2", "--method", "ltp", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    return run_dir


def test_cli_report_finalize_export_eval(str_run, tmp_path, capsys):
    ckpt = str_run / "checkpoint.npz"
    code, out, err = run(capsys, "report", ckpt, "--out", tmp_path / "rep", "--no-plots")
    assert code == 0, err
    assert "threshold" in out and "compression" in out
    assert {"report.md", "report.csv", "report.json"} <= set(listing(tmp_path / "rep"))
    total = json.loads((tmp_path / "rep" / "report.json").read_text())["totals"]

    code, out, err = run(capsys, "finalize", ckpt, "-o", tmp_path / "final.npz")
    assert code == 0, err
    assert "sparsity" in out and "final.npz" in out

    code, out_a, err = run(capsys, "eval", ckpt)
    assert code == 0, err
    code, out_b, err = run(capsys, "eval", tmp_path / "final.npz")
    assert code == 0, err
    acc = [line for line in out_a.splitlines() if "accuracy" in line]
    assert acc and acc == [line for line in out_b.splitlines() if "accuracy" in line]

    for src, name in ((ckpt, "a"), (tmp_path / "final.npz", "b")):
        code, out, err = run(capsys, "export", src, "-o", tmp_path / f"{name}.safetensors", "--csr")
        assert code == 0, err
    a, b = load_safetensors(tmp_path / "a.safetensors"), load_safetensors(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    nonzeros = sum(int(np.count_nonzero(a[f"{name}.weight"])) for name in ("conv1", "conv2", "conv3", "fc"))
    assert nonzeros == total["nonzeros"]  # the report counts what the export holds

    code, out, err = run(capsys, "report", tmp_path / "final.npz", "--out", tmp_path / "rep2", "--no-plots")
    assert code == 0, err
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["totals"] == total | {
        "threshold": None
    }


def test_cli_report_default_directory(str_run, capsys):
    code, out, err = run(capsys, "report", str_run / "best.npz")
    assert code == 0, err
    assert (str_run / "report-best" / "report.json").exists()


def test_cli_finalize_from_the_ltp_trail(ltp_run, tmp_path, capsys):
    code, out, err = run(capsys, "finalize", ltp_run / "checkpoint.npz", "-o", tmp_path / "t.npz",
                         "--trail-sparsity", "0")  # fmt: skip
    assert code == 0, err
    record = load_checkpoint(tmp_path / "t.npz").extra["finalized"]
    assert record["trail_sparsity"] == 0.0 and "trail" in record["source"]


def test_cli_budget_report(capsys):
    budget = REPO / "reference" / "budgets" / "str_resnet50.csv"
    code, out, err = run(capsys, "report", "--budget", budget, "--model", "resnet50", "--column", "90.23",
                         "--input-size", "64")  # fmt: skip
    assert code == 0, err
    assert "resnet50" in out and "sparse" in out


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["report", "missing.npz"], ["missing.npz", "does not exist"]),
        (["report", "corrupt.npz"], ["corrupt.npz"]),
        (["finalize", "missing.npz", "-o", "f.npz"], ["missing.npz"]),
        (["finalize", "corrupt.npz", "-o", "f.npz"], ["corrupt.npz"]),
        (["export", "missing.npz", "-o", "w.safetensors"], ["missing.npz"]),
        (["export", "corrupt.npz", "-o", "w.safetensors"], ["corrupt.npz"]),
        (["finalize", "STR", "-o", "f.npz", "--trail-sparsity", "1.5"], ["--trail-sparsity", "1.5"]),
        (["finalize", "STR", "-o", "f.npz", "--trail-sparsity", "0.5"], ["trail"]),
        (["finalize", "STR", "-o", "f.npz", "--trail-sparsity", "lots"], ["--trail-sparsity"]),
        (["finalize", "STR", "-o", "nodir/f.npz"], ["nodir"]),
        (["export", "STR", "-o", "nodir/w.safetensors"], ["nodir"]),
        (["report", "--budget", "BUDGET", "--model", "resnet99"], ["resnet99"]),
        (["report", "--budget", "BUDGET"], ["--model"]),
        (["report"], ["CHECKPOINT"]),
        (["finalize", "STR"], ["-o"]),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(str_run, tmp_path, monkeypatch, capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    Path("corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    subs = {
        "STR": str(str_run / "checkpoint.npz"),
        "BUDGET": str(REPO / "reference/budgets/str_resnet50.csv"),
    }
    before, run_before = listing(tmp_path), listing(str_run)
    code, out, err = run(capsys, *[subs.get(a, a) for a in argv])
    one_line_error(code, err, *needles)
    assert listing(tmp_path) == before and listing(str_run) == run_before


def test_a_run_with_a_target_finalizes_into_a_checkpoint_that_loads(tmp_path, capsys):
    """The finalized config is plain (method dense, no target): it must load and evaluate."""
    run_dir = tmp_path / "run"
    assert (
        main(["train", *TINY, "--method", "str", "--target-sparsity", "0.5", "--run-dir", str(run_dir)]) == 0
    )
    final = tmp_path / "final.npz"
    code, _, err = run(capsys, "finalize", run_dir / "checkpoint.npz", "-o", final)
    assert code == 0, err
    assert load_checkpoint(final).config["target_sparsity"] is None
    code, out, err = run(capsys, "eval", final)
    assert code == 0 and "accuracy" in out, err


def test_a_checkpoint_with_settings_its_run_ignored_still_loads(tmp_path, capsys):
    """Earlier versions saved a target for dense/SCP and a data root for digits; they meant nothing then."""
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run_dir)]) == 0
    ckpt = load_checkpoint(run_dir / "checkpoint.npz")
    config = dict(ckpt.config, target_sparsity=0.9, data_root="somewhere")
    old = save_checkpoint(
        tmp_path / "old.npz", model_state=ckpt.model_state, optimizer_state=None, config=config,
        epoch=ckpt.epoch, metrics=ckpt.metrics, extra=ckpt.extra,
    )  # fmt: skip
    code, out, err = run(capsys, "eval", old)
    assert code == 0 and "accuracy" in out, err


# ------------------------------------------------------------------ batch-norm recalibration
def test_recalibration_leaves_the_plain_mean_of_the_batch_statistics():
    from reference.finalize import recalibrate_batch_norm

    norm = BatchNorm2d(3, momentum=0.1)
    norm.running_mean[...] = 7.0  # whatever it held before does not count
    norm.running_var[...] = 9.0
    gamma = norm.weight.data.copy()
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(4, 3, 5, 5)) * (k + 1) + k).astype(np.float32) for k in range(3)]
    assert recalibrate_batch_norm(norm, iter(batches)) == 3
    means = [b.mean(axis=(0, 2, 3), dtype=np.float64) for b in batches]
    variances = [b.var(axis=(0, 2, 3), ddof=1, dtype=np.float64) for b in batches]  # unbiased, as training
    np.testing.assert_allclose(norm.running_mean, np.mean(means, axis=0), rtol=1e-5)
    np.testing.assert_allclose(norm.running_var, np.mean(variances, axis=0), rtol=1e-5)
    assert norm.momentum == 0.1 and not norm.training  # restored, left for evaluation
    np.testing.assert_array_equal(norm.weight.data, gamma)  # no parameter moved


def test_finalize_recalibrates_the_batch_norms_of_an_ltp_run(ltp_run, tmp_path, capsys):
    ckpt = ltp_run / "checkpoint.npz"
    plain, recal = tmp_path / "plain.npz", tmp_path / "recal.npz"
    assert run(capsys, "finalize", ckpt, "-o", plain)[0] == 0
    code, out, err = run(capsys, "finalize", ckpt, "-o", recal, "--recalibrate-bn", "3")
    assert code == 0, err
    assert "batch norms recalibrated on 3 training batches" in out
    a, b = load_checkpoint(plain), load_checkpoint(recal)
    assert a.extra["finalized"]["recalibrated_bn_batches"] == 0
    assert b.extra["finalized"]["recalibrated_bn_batches"] == 3
    stats = [k for k in a.model_state if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not np.array_equal(a.model_state[k], b.model_state[k]) for k in stats)
    for key, value in a.model_state.items():  # the weights are the same: only the statistics moved
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            np.testing.assert_array_equal(b.model_state[key], value, err_msg=key)
    # asked for more batches than one pass holds: one pass (1,438 images in batches of 64: 23)
    code, out, err = run(capsys, "finalize", ckpt, "-o", tmp_path / "all.npz", "--recalibrate-bn", "1000")
    assert code == 0 and "recalibrated on 23 training batches" in out, err
    # the same batches every time: recalibration is deterministic
    again = tmp_path / "again.npz"
    assert run(capsys, "finalize", ckpt, "-o", again, "--recalibrate-bn", "3")[0] == 0
    for key in stats:
        np.testing.assert_array_equal(load_checkpoint(again).model_state[key], b.model_state[key])


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many"])
def test_recalibrate_bn_needs_a_positive_count(ltp_run, tmp_path, capsys, value):
    code, _, err = run(
        capsys, "finalize", ltp_run / "checkpoint.npz", "-o", tmp_path / "x.npz", "--recalibrate-bn", value
    )
    one_line_error(code, err, "--recalibrate-bn", repr(value))
    assert not (tmp_path / "x.npz").exists()
