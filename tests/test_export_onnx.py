"""ONNX export, checked by ``onnx.checker`` and run by ONNX Runtime on the CPU.

For every model and method the runtime's logits must equal the evaluation
forward of the checkpoint (what ``learnsparse eval`` computes) on the same
batch within 1e-5 relative to the logits' largest magnitude, in float32; the
exported weights must be exactly the finalized checkpoint's (the same zeros),
with batch norm kept or folded into the conv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from reference.checkpoint import load_checkpoint  # noqa: E402
from reference.cli import main  # noqa: E402
from reference.finalize import finalize_checkpoint, load_model_from_checkpoint  # noqa: E402
from reference.onnx_export import DEFAULT_OPSET, METADATA_KEYS, build_onnx  # noqa: E402
from tests.test_finalize_export import listing, one_line_error, outputs, save, sparse_model  # noqa: E402

RTOL = 1e-5  # float32, relative to the largest logit magnitude
MODELS = ["digits_cnn", "resnet20", "resnet18", "resnet50", "mobilenet_v1"]
METHODS = ["dense", "str", "ltp", "scp"]
CLASSES = 7


def tiny(method: str, model: str, seed: int = 0):
    """A narrow ``model`` with ``method`` installed (see ``sparse_model``), its config on the data set
    the checkpoint will name: digits for ``digits_cnn``, 16x16 synthetic images otherwise."""
    data = {} if model == "digits_cnn" else {"dataset": "synthetic", "image_size": 16}
    return sparse_model(method, model, seed, width=0.125, num_classes=CLASSES, **data)


def batch(model: str, n: int = 3, seed: int = 7) -> np.ndarray:
    shape = (1, 8, 8) if model == "digits_cnn" else (3, 16, 16)
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the suite shares the machine's cores
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runtime_logits(path: Path, x: np.ndarray) -> np.ndarray:
    return session(path).run(["logits"], {"input": x})[0]


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == np.float32
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(got - expected).max())
    assert err <= RTOL * scale, f"max |runtime - reference| = {err:.3g}, {err / scale:.3g} relative"


def initializers(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", MODELS)
def test_runtime_logits_equal_the_eval_forward(model, method, tmp_path, capsys):
    net, config = tiny(method, model)
    trained = save(net, config, tmp_path / "trained.npz")
    x = batch(model)
    expected = outputs(load_model_from_checkpoint(trained).model, x)  # the eval forward, method installed
    final, summary = finalize_checkpoint(trained, tmp_path / "final.npz")
    plain = load_checkpoint(final).model_state

    code, out, err = run(capsys, "export", trained, "-o", tmp_path / "model.onnx")
    assert code == 0 and err == "" and "ONNX" in out
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")), full_check=True)
    assert_close(runtime_logits(tmp_path / "model.onnx", x), expected)

    # the exported arrays are the finalized checkpoint's, bit for bit: W_eff with its exact zeros,
    # SCP's slimmed shapes, every BN statistic
    arrays = initializers(tmp_path / "model.onnx")
    floats = {k: v for k, v in plain.items() if not k.endswith("num_batches_tracked")}
    assert sorted(arrays) == sorted(floats)
    for name, value in floats.items():
        np.testing.assert_array_equal(arrays[name], value.astype(np.float32), err_msg=name)
    zeros = sum(int(np.sum(arrays[k] == 0)) for k in arrays if k.endswith("weight") and arrays[k].ndim > 1)
    assert zeros == summary.weights - summary.nonzeros
    if method in ("str", "ltp"):
        assert 0.2 < summary.sparsity < 0.8
    if method == "scp":
        assert summary.slimmed and summary.slim["channels_after"] < summary.slim["channels_before"]

    # the finalized checkpoint exports the same graph; --fold-bn folds every BN into its conv
    code, _, err = run(capsys, "export", final, "-o", tmp_path / "same.onnx")
    assert code == 0, err
    again = initializers(tmp_path / "same.onnx")
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    code, out, err = run(capsys, "export", final, "-o", tmp_path / "folded.onnx", "--fold-bn")
    assert code == 0 and "batch norm folded" in out, err
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    onnx.checker.check_model(folded, full_check=True)
    ops = {node.op_type for node in folded.graph.node}
    assert "BatchNormalization" not in ops and "BatchNormalization" in {
        node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node
    }
    assert_close(runtime_logits(tmp_path / "folded.onnx", x), expected)
    folded_arrays = initializers(tmp_path / "folded.onnx")
    for name, value in arrays.items():
        if name.endswith("weight") and value.ndim == 4:  # conv: the same zeros (every BN scale is nonzero)
            np.testing.assert_array_equal(folded_arrays[name] == 0, value == 0, err_msg=name)


def test_folding_is_the_algebra_of_the_docstring(tmp_path):
    """(5): W' = a W and b' = a (b - mu) + beta with a = gamma / sqrt(var + eps), per output channel."""
    net, _ = tiny("str", "digits_cnn")
    from reference.finalize import finalize

    finalize(net)
    proto = build_onnx(net, (1, 8, 8), fold_bn=True)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv, bn = net.conv2, net.bn2
    gamma, beta = bn.weight.numpy().astype(np.float64), bn.bias.numpy().astype(np.float64)
    mu, var = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    a = gamma / np.sqrt(var + bn.eps)
    w = conv.weight.numpy().astype(np.float64)
    np.testing.assert_array_equal(arrays["conv2.weight"], (w * a[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(arrays["conv2.bias"], (beta - a * mu).astype(np.float32))


def test_batch_axis_is_dynamic_and_the_metadata_states_the_preprocessing(tmp_path, capsys):
    from reference.data import digits_statistics

    net, config = tiny("str", "digits_cnn")
    trained = save(net, config, tmp_path / "trained.npz")
    path = tmp_path / "digits.onnx"
    assert run(capsys, "export", trained, "-o", path, "--opset", "13")[0] == 0
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 8, 8]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", CLASSES]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(METADATA_KEYS) <= set(meta), set(METADATA_KEYS) - set(meta)
    mean, std = digits_statistics()
    assert json.loads(meta["input_shape"]) == [1, 8, 8] and meta["input_size"] == "8"
    assert json.loads(meta["mean"]) == [mean] and json.loads(meta["std"]) == [std]
    assert float(meta["pixel_scale"]) == 1 / 16 and meta["dataset"] == "digits"
    assert meta["model"] == "digits_cnn" and meta["method"] == "str" and meta["opset"] == "13"
    assert meta["bn_folded"] == "false" and int(meta["nonzeros"]) < int(meta["weights"])
    # one session answers any batch size, and each image's logits do not depend on the batch
    x = batch("digits_cnn", n=5)
    sess = session(path)
    whole = sess.run(None, {"input": x})[0]
    ones = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(5)])
    assert whole.shape == (5, CLASSES)
    np.testing.assert_allclose(ones, whole, rtol=1e-5, atol=1e-6)
    synthetic = build_onnx(tiny("dense", "resnet20")[0], (3, 16, 16), opset=DEFAULT_OPSET)
    assert [o.version for o in synthetic.opset_import] == [DEFAULT_OPSET]


def test_upsampled_digits_state_their_4x4_blocks():
    from reference.data import digits_statistics
    from reference.onnx_export import preprocessing_of

    small, large = preprocessing_of("digits", (1, 8, 8)), preprocessing_of("digits32", (1, 32, 32))
    mean, std = digits_statistics()  # repeating pixels changes neither
    assert small["mean"] == large["mean"] == [mean] and small["std"] == large["std"] == [std]
    assert "4x4 block" in large["preprocessing"] and "4x4" not in small["preprocessing"]


def test_the_format_follows_the_suffix_or_the_flag(tmp_path, capsys):
    net, config = tiny("dense", "digits_cnn")
    trained = save(net, config, tmp_path / "trained.npz")
    assert run(capsys, "export", trained, "-o", tmp_path / "graph", "--format", "onnx")[0] == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "graph")))
    assert run(capsys, "export", trained, "-o", tmp_path / "weights")[0] == 0  # no suffix: safetensors
    from reference.export import load_safetensors

    assert "conv1.weight" in load_safetensors(tmp_path / "weights")
    code, out, _ = run(capsys, "export", trained, "-o", tmp_path / "w.bin", "--format", "safetensors")
    assert code == 0 and "torchvision names" in out


BAD = [
    (["-o", "model.pt"], ["'.pt'", ".onnx", ".safetensors"]),
    (["-o", "model.onnx", "--format", "tflite"], ["--format", "tflite"]),
    (["-o", "model.onnx", "--format", "safetensors"], ["'.onnx'", "--format"]),
    (["-o", "model.onnx", "--csr"], ["--csr"]),
    (["-o", "model.safetensors", "--fold-bn"], ["--fold-bn"]),
    (["-o", "model.onnx", "--opset", "5"], ["--opset", "5"]),
    (["-o", "nodir/model.onnx"], ["nodir"]),
    (["-o", "plain.txt/model.onnx"], ["plain.txt"]),
    (["-o", "adir"], ["adir"]),
    (["-o", "adir.onnx"], ["adir.onnx"]),
]


@pytest.mark.parametrize("argv, needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, needles, tmp_path, monkeypatch, capsys):
    net, config = tiny("str", "digits_cnn")
    save(net, config, tmp_path / "trained.npz")
    monkeypatch.chdir(tmp_path)
    Path("plain.txt").write_text("a file, not a directory")
    Path("adir").mkdir()
    Path("adir.onnx").mkdir()
    before = listing(tmp_path)
    code, out, err = run(capsys, "export", "trained.npz", *argv)
    one_line_error(code, err, *needles)
    assert out == "" and listing(tmp_path) == before


def test_a_non_finite_checkpoint_is_refused(tmp_path, capsys):
    from reference.checkpoint import save_checkpoint

    net, config = tiny("str", "resnet20")
    state = net.state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = np.nan
    bad = save_checkpoint(
        tmp_path / "bad.npz", model_state=state, optimizer_state=None, config=config, epoch=1,
        metrics=[], extra={"method": {}},
    )  # fmt: skip
    before = listing(tmp_path)
    code, out, err = run(capsys, "export", bad, "-o", tmp_path / "model.onnx")
    one_line_error(code, err, "bad.npz", "layer1.0.conv1.weight", "non-finite")
    assert out == "" and listing(tmp_path) == before
