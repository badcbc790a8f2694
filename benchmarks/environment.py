"""What every benchmark records about where it ran (the machine, the code), and the environment its workers get."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Settings that pick OpenBLAS's kernel or its blocking for another CPU than this one: removed from
# the workers' environment when inherited (and recorded as removed), so OpenBLAS chooses for the CPU
# it runs on and the JSON's kernel (threadpoolctl's "architecture") is the one that ran.
UNSET_IN_WORKERS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _first_field(path: str, prefix: str) -> str | None:
    """The text after ``prefix`` on the first line of ``path`` that starts with it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line[len(prefix) :].strip(" \t:\n")
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load and OS of this machine."""
    mem_kib = _first_field("/proc/meminfo", "MemTotal")
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": _first_field("/proc/cpuinfo", "model name") or "unknown",
        "logical_cores": os.cpu_count(),
        "cores_available_to_process": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "memory_gib": round(int(mem_kib.split()[0]) / 1024**2, 1) if mem_kib else None,
        "load_average_at_start": load,
        "os": platform.platform(),
    }


def code_state() -> dict[str, Any]:
    """The commit measured, and a digest of every uncommitted file under reference/ (measured too)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = [line[3:] for line in git("status", "--porcelain", "--", "reference").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "uncommitted_in_reference_sha256_16": None}
    digests = {
        name: hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest()[:16]
        for name in changed
        if (REPO_ROOT / name).is_file()
    }
    return {"git_commit": commit, "uncommitted_in_reference_sha256_16": digests}


def worker_environment(threads: int) -> dict[str, str]:
    """This process's environment for a timed worker: the thread variables set, UNSET_IN_WORKERS removed."""
    env = {name: value for name, value in os.environ.items() if name not in UNSET_IN_WORKERS}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env
