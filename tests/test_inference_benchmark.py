"""The inference benchmark (``benchmarks/inference.py``): what its report says about the machine.

Runs the helper in a fresh interpreter with ``benchmarks/`` on the path, as the script runs,
without timing anything (and without PyTorch or ONNX Runtime).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _state(loads: list[float], cores: int) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "benchmarks"), str(REPO_ROOT)]))
    code = "import json, sys, inference\nprint(json.dumps(inference.machine_state(json.loads(sys.argv[1]))))"
    machine = json.dumps({"cores_available_to_process": cores, "load_average_at_start": loads})
    done = subprocess.run(
        [sys.executable, "-c", code, machine],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "loads, cores, busy",
    [
        ([0.9, 1.0, 1.2], 2, False),
        ([8.0, 8.0, 5.3], 2, True),
        ([1.0, 2.5, 1.0], 2, True),
        ([3.0, 3.0, 3.0], 4, False),
    ],
)
def test_the_report_calls_the_machine_busy_only_when_it_was(loads, cores, busy):
    text = _state(loads, cores)
    assert ("shared and busy" in text) is busy
    assert f"on {cores} cores" in text and f"{loads[0]:.1f}" in text
