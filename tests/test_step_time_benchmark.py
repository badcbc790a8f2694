"""The training-step benchmark (``benchmarks/step_time.py``): what its workers inherit and what each step records.

The script runs as a program; these tests call its helpers in a fresh interpreter
with ``benchmarks/`` on ``PYTHONPATH`` (as the script itself runs), without
PyTorch and without timing anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"


def _call(code: str, **env_extra: str) -> dict:
    """Run ``code`` (which prints one JSON line) with ``step_time`` importable; its JSON."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENBLAS_")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCHMARKS), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json, step_time as st\n" + code],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_do_not_inherit_a_foreign_openblas_kernel_or_cache_size():
    got = _call(
        "env = st.worker_environment(3)\n"
        "print(json.dumps({k: env.get(k) for k in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE', "
        "'OPENBLAS_VERBOSE', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')}))",
        OPENBLAS_CORETYPE="Haswell",
        OPENBLAS_L2_SIZE="512",
        OPENBLAS_VERBOSE="2",
    )
    assert got["OPENBLAS_CORETYPE"] is None and got["OPENBLAS_L2_SIZE"] is None
    assert got["OPENBLAS_VERBOSE"] == "2"  # only the two that pick the kernel and its blocking are removed
    assert got["OMP_NUM_THREADS"] == got["OPENBLAS_NUM_THREADS"] == got["MKL_NUM_THREADS"] == "3"


def test_step_counters_state_cpu_use_and_preemptions():
    got = _call(
        "from types import SimpleNamespace as R\n"
        "before = R(ru_utime=1.0, ru_stime=0.5, ru_nivcsw=10, ru_minflt=100)\n"
        "after = R(ru_utime=2.5, ru_stime=0.75, ru_nivcsw=17, ru_minflt=130)\n"
        "print(json.dumps(st._counters(before, after, 0.875)))"
    )
    assert got == {
        "user_cpu_s": 1.5,
        "system_cpu_s": 0.25,
        "cpu_over_wall": 2.0,  # 1.75 CPU seconds in 0.875 wall seconds: two threads on a core throughout
        "involuntary_context_switches": 7,
        "minor_page_faults": 30,
    }


def test_a_numpy_worker_holds_numpy_alone():
    got = _call("import numpy\nprint(json.dumps(st._process_state()))")
    assert got["frameworks_imported"] == ["numpy"]
    assert got["threads_in_process"] is None or got["threads_in_process"] >= 1
