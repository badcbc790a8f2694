"""The data-parallel benchmark (``benchmarks/data_parallel.py``): its bytes-per-step part and estimate.

Only the part that needs no MPI and times nothing runs here (about two seconds);
the measured parts run ``mpiexec`` and belong to the benchmark itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "data_parallel.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dp") / "dp.json"
    done = _run("--parts", "bytes", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.with_suffix(".md").read_text().startswith("# Data-parallel training")
    return json.loads(out.read_text())


def test_bytes_per_step_are_the_models_gradients_in_the_training_buckets(report):
    dense = report["bytes"]["resnet50"]["dense"]
    assert dense["parameters"] == 25_557_032  # torchvision's ResNet-50, 1000 classes
    assert report["bytes"]["mobilenet_v1"]["dense"]["parameters"] == 4_231_976
    for model, methods in report["bytes"].items():
        for method, b in methods.items():
            assert b["gradient_bytes"] == 4 * b["parameters"] == sum(b["bucket_bytes"]), (model, method)
            assert len(b["bucket_bytes"]) == b["buckets"]
            # every bucket but the last is filled past half the limit (parameters are packed in order)
            assert all(n > b["bucket_limit_bytes"] // 2 for n in b["bucket_bytes"][:-1]), (model, method)
    # STR and LTP add one threshold per sparsified layer; their gradients travel too
    assert report["bytes"]["resnet50"]["str"]["parameters"] == dense["parameters"] + 54
    # sync BN: per batch norm a (3, C) float64 sum in the forward and a (2, C) one in the backward
    assert dense["batch_norms"] == 53 and dense["sync_bn_calls"] == 106
    assert dense["sync_bn_bytes"] == 5 * 8 * 26_560  # 26,560 batch-norm channels in ResNet-50


def test_the_estimate_is_the_ring_formula_and_says_it_is_one(report):
    e = report["estimate"]
    assert "estimate" in e["note"]
    a = e["assumptions"]
    b = report["bytes"]["resnet50"]["dense"]
    row = next(r for r in e["rows"] if r["model"] == "resnet50" and r["gpus"] == 8)
    expected = (
        2 * 7 / 8 * b["gradient_bytes"] / (a["intra_node_gbs"] * 1e9) + b["buckets"] * a["latency_us"] * 1e-6
    )
    assert row["gradient_ms"] == pytest.approx(expected * 1e3)
    assert row["min_step_ms_for_90pct"] == pytest.approx(9 * row["gradient_ms"])  # t / (t + c) = 0.9


@pytest.mark.parametrize("args", [["--parts", "bytes,nothing"], ["--nvlink-gbs", "0"], ["--batch", "-3"]])
def test_bad_arguments_are_one_line_and_exit_2(args, tmp_path):
    done = _run(*args, "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()
