"""The prepared GPU check (``benchmarks/gpu_check.py``) runs end to end on the CPU, so it cannot rot.

``--emulate`` runs every stage through the CPU execution mode of the twin
(``tests/emulation``) at a tiny size; ``--select`` keeps the test stages to a
few tests each, so the whole check costs about half a minute here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
# One or a few tests per test stage: conv agreement, MobileNetV1's dense float64 steps, LTP's tiny temperature.
SELECT = "conv2d or (mobilenet_v1 and dense) or tiny_temperature"


def _run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_whole_check_runs_through_the_emulation(tmp_path):
    done = _run(str(tmp_path), "--emulate", "--select", SELECT, "--deadline", "380")
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((tmp_path / "check.json").read_text())
    module = _load_check_module()
    assert [s["name"] for s in check["stages"]] == list(module.STAGE_NAMES)
    assert {s["name"]: s["status"] for s in check["stages"]} == dict.fromkeys(module.STAGE_NAMES, "passed")
    for stage in check["stages"]:
        assert (tmp_path / stage["log"]).is_file()
        if "tests" in stage:  # every test stage ran tests, and none failed
            assert stage["tests"]["passed"] >= 1 and not stage["tests"]["failing"], stage
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["emulated"] is True and "device" in environment["gpu"]
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    configurations = {(c["model"], c["method"], c["precision"]) for c in smoke["configurations"]}
    assert configurations == {
        (m, k, p) for m in ("resnet50", "mobilenet_v1") for k in ("dense", "str") for p in ("tf32", "bf16")
    }
    assert all(c["finite_losses"] for c in smoke["configurations"])
    resnet = json.loads((tmp_path / "throughput_resnet50.json").read_text())
    profile = resnet["configurations"][0]["profile"]
    assert {"conv2d_forward", "conv2d_backward", "batch_norm_forward"} <= {
        r["function"] for r in profile["rows"]
    }


def test_a_stage_past_its_limit_is_killed_and_recorded_as_timed_out(tmp_path, monkeypatch):
    module = _load_check_module()
    marker = tmp_path / "grandchild-survived"
    grandchild = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).write_text('x')"
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    monkeypatch.setattr(module, "stage_command", lambda *args: [sys.executable, "-c", hang])
    record = module.run_stage(module.STAGES[1], tmp_path, emulate=True, seconds_left=1.0)
    assert record["status"] == "timed_out" and record["returncode"] is None and record["seconds"] < 10
    time.sleep(3)  # the grandchild would have written its file by now had it survived
    assert (tmp_path / "smoke.log").is_file() and not marker.exists()  # the whole process group was killed


def test_stages_past_the_deadline_are_not_started_and_the_record_says_so(tmp_path):
    done = _run(str(tmp_path), "--emulate", "--stages", "environment,smoke", "--deadline", "5.5", timeout=120)
    assert done.returncode == 1, done.stderr  # a check that ran nothing has not passed
    check = json.loads((tmp_path / "check.json").read_text())
    assert [(s["name"], s["status"]) for s in check["stages"]] == [
        ("environment", "not_reached"), ("smoke", "not_reached"),
    ]  # fmt: skip
    assert all("deadline" in s["reason"] for s in check["stages"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--stages", "smoke,warp"], "--stages must be a comma-separated list"),
        (["--deadline", "0"], "--deadline must be more than"),
        (["--deadline", "nan"], "--deadline must be more than"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, words):
    done = _run(str(tmp_path / "out"), *args, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_outdir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    done = _run(str(target), timeout=60)
    assert done.returncode == 2 and "is not a folder" in done.stderr and target.read_text() == "keep"


def test_a_missing_test_package_skips_the_test_stages_with_one_line(tmp_path, monkeypatch):
    module = _load_check_module()
    monkeypatch.setattr(module, "missing_modules", lambda names: ["autograd"] if "autograd" in names else [])
    stages = {s.name: s for s in module.STAGES}
    reason = module.stage_command(stages["agreement"], tmp_path, emulate=False)
    assert isinstance(reason, str) and reason.startswith("autograd not installed") and "\n" not in reason
    record = module.run_stage(stages["models_float64"], tmp_path, emulate=False, seconds_left=60)
    assert record["status"] == "skipped" and "autograd" in record["reason"]
    assert isinstance(module.stage_command(stages["smoke"], tmp_path, emulate=False), list)


def test_test_stage_selections_combine_with_select():
    module = _load_check_module()
    assert module._pytest_selection("agreement", False, None) == ["-m", "gpu"]
    assert module._pytest_selection("gpu_tests_rest", False, "ltp") == [
        "-m", "gpu", "-k", "(not test_training_steps_agree_float64) and (ltp)",
    ]  # fmt: skip
    assert module._pytest_selection("models_float64", True, None) == [
        "-k", "(test_training_steps_agree_float64) and (emulated)",
    ]  # fmt: skip
