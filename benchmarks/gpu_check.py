"""One prepared check of the GPU twin: every stage in order of value, each under its own limit.

GPU time is short, so a GPU machine runs this one script first. Its stages, in order:

====================  =====  ==================================================================
stage                 limit  what it runs, and what it writes into OUTDIR
====================  =====  ==================================================================
environment             45s  device, driver, CUDA, CuPy, NumPy, PyTorch, test packages:
                             ``environment.json``
smoke                  180s  real size, ours alone: ResNet-50 and MobileNetV1, batch 256, 224x224,
                             dense and STR, tf32 and bf16; first step, steady step, memory-pool
                             peak, finite loss (``benchmarks/gpu_throughput.py --frameworks ours``):
                             ``smoke.json``
agreement              120s  ``tests/test_gpu_agreement.py``, every op against the reference:
                             ``agreement.xml`` (JUnit) and ``agreement.log``
models_float64         120s  the float64 whole-model training steps of ``tests/test_gpu_models.py``
throughput_resnet50    180s  ResNet-50 dense tf32 against PyTorch, with the per-op profile:
                             ``throughput_resnet50.json``
gpu_tests_rest         150s  every other ``gpu`` test of the suite
throughput_mobilenet   150s  MobileNetV1 dense and STR, tf32, against PyTorch:
                             ``throughput_mobilenet_v1.json``
====================  =====  ==================================================================

Every stage runs in a subprocess of its own (a hang or a crash ends that stage only), under
``min(its limit, what is left of --deadline)``. After each stage, ``check.json`` is rewritten
(atomically) with every stage's status (``passed``, ``failed``, ``timed_out``, ``skipped`` with the
reason, or ``not_reached`` once the deadline is spent), its seconds, command and summary, so a check
cut short still returns everything that finished. Each stage's output is in ``<stage>.log``.

A stage whose prerequisites are missing is skipped with one line saying so (for example the test
stages without ``autograd``, the gradient oracle the test suite imports; the PyTorch comparisons
without ``torch``), and the check goes on.

``--emulate`` runs the whole check on the CPU through the tests' CPU execution mode of the twin
(``tests/emulation``: the CUDA kernels compiled for the host, a stand-in CuPy) at tiny sizes
(batch 2, 32x32, width 0.125, 10 classes, one step), the ``gpu`` tests on the emulated device (the
whole-model steps through their own emulated parametrization, at a smaller size), the PyTorch
comparisons ours-only. The test suite runs it that way so this script cannot rot; its numbers mean
nothing.

Usage, from the repository root (the project need not be installed)::

    PYTHONPATH=. python benchmarks/gpu_check.py OUTDIR [--deadline 540] [--stages smoke,agreement]
        [--select PYTEST_K_EXPRESSION] [--emulate]

``--stages`` and ``--select`` rerun a part after a fix: some stages, or only the named tests.

Exit status: 0 when every stage asked for passed; 1 when one failed, timed out, was skipped or was
not reached; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, NamedTuple

from reference.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_DEADLINE_S = 540
MARGIN_S = 5  # left at the end of the deadline for writing check.json


class Stage(NamedTuple):
    name: str
    limit_s: int
    what: str
    result: str = ""  # the JSON file a benchmark stage writes into OUTDIR


STAGES = (
    Stage("environment", 45, "device, driver and library versions"),
    Stage(
        "smoke",
        180,
        "ResNet-50 and MobileNetV1, batch 256, 224x224, dense and STR, tf32 and bf16",
        "smoke.json",
    ),
    Stage("agreement", 120, "every op against the reference (tests/test_gpu_agreement.py)"),
    Stage("models_float64", 120, "float64 whole-model training steps (tests/test_gpu_models.py)"),
    Stage(
        "throughput_resnet50",
        180,
        "ResNet-50 dense tf32 against PyTorch, with the per-op profile",
        "throughput_resnet50.json",
    ),
    Stage("gpu_tests_rest", 150, "every other gpu test of the suite"),
    Stage(
        "throughput_mobilenet",
        150,
        "MobileNetV1 dense and STR tf32 against PyTorch",
        "throughput_mobilenet_v1.json",
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

# The test stages: the files and the -k expression each selects among the ``gpu`` tests. With
# --emulate the same ``gpu`` tests run through the CPU execution mode (the conftest honours
# LEARNSPARSE_EMULATE_GPU=1), except the whole-model steps, whose device size is too slow to emulate:
# their own emulated parametrization (a smaller model) runs instead.
_FLOAT64_STEPS = "test_training_steps_agree_float64"
_TESTS = {
    "agreement": (["tests/test_gpu_agreement.py"], None),
    "models_float64": (["tests/test_gpu_models.py"], _FLOAT64_STEPS),
    "gpu_tests_rest": (["tests", "--ignore", "tests/test_gpu_agreement.py"], f"not {_FLOAT64_STEPS}"),
}
_TEST_MODULES = ("pytest", "hypothesis", "autograd")
EMULATE_VARIABLE = "LEARNSPARSE_EMULATE_GPU"


# ====================================================================== helpers
class OneLineParser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(2)


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The names among ``names`` that this interpreter cannot import."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def _pytest_selection(stage: str, emulate: bool, select: str | None) -> list[str]:
    """``-m``/``-k`` arguments of a test stage: its own expression, and ``select`` if given."""
    expressions = [_TESTS[stage][1], select]
    marker = ["-m", "gpu"]
    if emulate and stage == "models_float64":
        marker = []
        expressions.append("emulated")
    expression = " and ".join(f"({e})" for e in expressions if e)
    return marker + (["-k", expression] if expression else [])


def stage_command(stage: Stage, out: Path, emulate: bool, select: str | None = None) -> list[str] | str:
    """The command line of ``stage``, or the reason (a string) it cannot run here."""
    python = sys.executable
    if stage.name == "environment":
        emulated = ["--emulate"] if emulate else []
        return [
            python,
            str(Path(__file__)),
            str(out),
            *emulated,
            "--environment",
            str(out / "environment.json"),
        ]
    if stage.name in _TESTS:
        missing = missing_modules(_TEST_MODULES)
        if missing:
            return (
                f"{', '.join(missing)} not installed: the test suite needs it (pip install "
                f"{' '.join(missing)}, or bring its wheel and install it with --no-index)"
            )
        return [
            python, "-m", "pytest", *_TESTS[stage.name][0], *_pytest_selection(stage.name, emulate, select),
            "-q", "-rfE", "--maxfail", "25",
            "-p", "no:cacheprovider", f"--junitxml={out / (stage.name + '.xml')}",
        ]  # fmt: skip
    throughput = [python, str(BENCHMARKS / "gpu_throughput.py")]
    if emulate:
        throughput += [
            "--emulate",
            "--batch",
            "2",
            "--image",
            "32",
            "--width",
            "0.125",
            "--num-classes",
            "10",
        ]
        throughput += ["--warmup", "0", "--steps", "1", "--rounds", "1", "--profile-steps", "1"]
    if stage.name == "smoke":
        steps = [] if emulate else ["--warmup", "1", "--steps", "3", "--rounds", "1"]
        return [
            *throughput, "--frameworks", "ours", "--models", "resnet50,mobilenet_v1", "--methods", "dense,str",
            "--precisions", "tf32,bf16", *steps, "--out", str(out / stage.result),
        ]  # fmt: skip
    if not emulate and missing_modules(("torch",)):
        return "torch not installed: the side-by-side comparison needs PyTorch"
    model = "resnet50" if stage.name == "throughput_resnet50" else "mobilenet_v1"
    methods = "dense" if model == "resnet50" else "dense,str"
    rounds = [] if emulate else ["--rounds", "2"]
    return [
        *throughput, "--models", model, "--methods", methods, "--precisions", "tf32", *rounds,
        "--profile", f"{model}/dense/tf32", "--out", str(out / stage.result),
    ]  # fmt: skip


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts and the failing tests' names from a pytest JUnit file (None if absent or unreadable)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    failing = []
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            failing.append(
                f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}"
            )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing
    return counts


def json_summary(path: Path) -> dict[str, Any] | None:
    """The gist of a gpu_throughput.py result: per configuration, images/s, peak and loss."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = []
    for entry in report.get("configurations", []):
        row = {key: entry.get(key) for key in ("model", "method", "precision", "batch")}
        if "error" in entry:
            row["error"] = entry["error"].splitlines()[0][:200]
        else:
            ours = entry["ours"]
            first = ours["rounds"][0]
            row.update(
                ours_images_per_s=round(ours["images_per_s"], 1),
                ours_first_step_s=round(first["warmup_times_s"][0], 2) if first["warmup_times_s"] else None,
                ours_steady_step_ms=round(1000 * ours["median_step_s"], 1),
                ours_pool_peak_gib=ours["peak_gib"],
                finite_losses=entry.get("finite_losses"),
                loss=first["last_loss"],
            )
            if "torch" in entry:
                row["torch_images_per_s"] = round(entry["torch"]["images_per_s"], 1)
                row["ratio_torch_over_ours"] = round(entry["ratio_torch_over_ours"], 3)
        rows.append(row)
    return {"configurations": rows}


def environment(path: Path, emulate: bool) -> int:
    """Write the versions and the device this check runs on to ``path`` (the environment stage)."""
    if emulate:
        from tests import emulation

        with emulation.device():
            return _environment(path, emulated=True)
    return _environment(path, emulated=False)


def _environment(path: Path, emulated: bool) -> int:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "emulated": emulated,
    }
    for name in (
        "numpy",
        "cupy",
        "torch",
        "torchvision",
        "ml_dtypes",
        "autograd",
        "hypothesis",
        "pytest",
        "scipy",
    ):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # absent, or broken: either is worth recording
            info[name] = f"not available ({type(exc).__name__}: {exc})"
    from gpu import runtime

    why = runtime.unavailable_reason()
    info["gpu"] = runtime.describe() if why is None else {"unavailable": why}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_cuda"] = torch.version.cuda
        info["torch_sees_gpu"] = torch.cuda.is_available()
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.splitlines()[:20]
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    info["environment_variables"] = {
        k: v for k, v in os.environ.items() if k.startswith(("CUPY_", "CUDA_", "NVIDIA_", EMULATE_VARIABLE))
    }
    write_atomic(path, json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(info.get("gpu"), default=str))
    return 0 if why is None else 1


# ====================================================================== driver
def run_stage(
    stage: Stage, out: Path, emulate: bool, seconds_left: float, select: str | None = None
) -> dict[str, Any]:
    """Run one stage in its own process group, under its limit; its record for check.json."""
    record: dict[str, Any] = {"name": stage.name, "what": stage.what, "limit_s": stage.limit_s}
    command = stage_command(stage, out, emulate, select)
    if isinstance(command, str):
        record.update(status="skipped", reason=command)
        return record
    limit = min(stage.limit_s, seconds_left)
    record.update(command=shlex.join(command), timeout_s=round(limit, 1), log=f"{stage.name}.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if emulate:
        env[EMULATE_VARIABLE] = "1"
        env["HYPOTHESIS_PROFILE"] = "smoke"  # a check that the tests still run, not a search
    start = time.monotonic()
    with open(out / f"{stage.name}.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    record["seconds"] = round(time.monotonic() - start, 1)
    record["returncode"] = code
    record["status"] = "timed_out" if code is None else ("passed" if code == 0 else "failed")
    if stage.name in _TESTS:
        summary = junit_summary(out / f"{stage.name}.xml")
        if summary is not None:
            record["tests"] = summary
            if code == 5 or summary["tests"] == summary["skipped"]:
                record["status"] = "failed"  # a test stage that ran no test has shown nothing
                record["reason"] = "no test ran (all skipped or deselected)"
    elif stage.result:
        summary = json_summary(out / stage.result)
        if summary is not None:
            record["result"] = stage.result
            record["summary"] = summary
            if any(row.get("finite_losses") is False for row in summary["configurations"]):
                record["status"] = "failed"
                record["reason"] = "a loss was not finite"
    tail = (out / f"{stage.name}.log").read_bytes()[-1500:].decode("utf-8", "replace").strip().splitlines()
    record["log_tail"] = tail[-8:]
    return record


def _unavailable_reason() -> str | None:
    """Why no GPU can be used here (None when one can), without importing CuPy into this process."""
    probe = "from gpu.runtime import unavailable_reason as u; print(u() or '')"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "probing the GPU took over 120 s"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["the GPU probe failed"])[-1]
    return done.stdout.strip() or None


def stage_line(record: dict[str, Any]) -> str:
    """One line for the console: status, seconds, test counts, reason."""
    parts = [record["status"]]
    if "seconds" in record:
        parts.append(f"in {record['seconds']} s")
    if "tests" in record:
        t = record["tests"]
        parts.append(f"({t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped)")
    if record.get("reason"):
        parts.append(f"- {record['reason']}")
    return " ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="gpu_check.py",
        description=__doc__.split("\n")[0],
        epilog="The module docstring lists the stages.",
    )
    parser.add_argument("outdir", type=Path, help="folder for the results (created; existing files replaced)")
    parser.add_argument(
        "--deadline", type=float, default=DEFAULT_DEADLINE_S,
        help=f"seconds for the whole check; stages past it are not started (default {DEFAULT_DEADLINE_S})",
    )  # fmt: skip
    parser.add_argument(
        "--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset, of {', '.join(STAGE_NAMES)}"
    )
    parser.add_argument(
        "--emulate",
        action="store_true",
        help="run on the CPU through the tests' execution mode, at tiny sizes",
    )
    parser.add_argument(
        "--select", metavar="EXPR",
        help="only the tests matching this pytest -k expression, in every test stage (e.g. to rerun "
        "what failed after a fix)",
    )  # fmt: skip
    parser.add_argument("--environment", type=Path, help=argparse.SUPPRESS)  # the environment stage's worker
    args = parser.parse_args(argv)
    if args.deadline <= MARGIN_S or args.deadline != args.deadline:
        parser.error(f"--deadline must be more than {MARGIN_S} seconds, got {args.deadline}")
    names = [part.strip() for part in args.stages.split(",") if part.strip()]
    unknown = [name for name in names if name not in STAGE_NAMES]
    if not names or unknown:
        parser.error(
            f"--stages must be a comma-separated list of {', '.join(STAGE_NAMES)}; got {args.stages!r}"
        )
    args.stages = [stage for stage in STAGES if stage.name in names]
    if args.outdir.exists() and not args.outdir.is_dir():
        parser.error(f"OUTDIR {str(args.outdir)!r} exists and is not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment is not None:
        return environment(args.environment, args.emulate)
    out = args.outdir.resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"gpu_check.py: error: cannot create OUTDIR {str(args.outdir)!r}: {exc.strerror}", file=sys.stderr
        )
        return 2
    deadline = time.monotonic() + args.deadline
    check: dict[str, Any] = {
        "check": "the GPU twin's prepared check (benchmarks/gpu_check.py)",
        "emulated": args.emulate,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "deadline_s": args.deadline,
        "select": args.select,
        "stages": [],
    }
    mode = "through the CPU execution mode (numbers mean nothing)" if args.emulate else "on the device"
    print(
        f"gpu check {mode}: {len(args.stages)} stages, deadline {args.deadline:.0f} s, results in {out}",
        flush=True,
    )
    no_gpu = None if args.emulate else _unavailable_reason()
    for stage in args.stages:
        left = deadline - time.monotonic() - MARGIN_S
        if no_gpu is not None and stage.name != "environment":
            record = {
                "name": stage.name,
                "what": stage.what,
                "status": "skipped",
                "reason": f"no GPU: {no_gpu}",
            }
        elif left < 1:
            record = {
                "name": stage.name,
                "what": stage.what,
                "status": "not_reached",
                "reason": "deadline spent",
            }
        else:
            print(f"[{stage.name}] {stage.what} (limit {min(stage.limit_s, left):.0f} s)", flush=True)
            record = run_stage(stage, out, args.emulate, left, args.select)
        check["stages"].append(record)
        check["seconds"] = round(args.deadline - (deadline - time.monotonic()), 1)
        write_atomic(out / "check.json", json.dumps(check, indent=2) + "\n")
        print(f"[{stage.name}] {stage_line(record)}", flush=True)
    bad = [f"{r['name']} ({r['status']})" for r in check["stages"] if r["status"] != "passed"]
    print(
        f"wrote {out / 'check.json'}; " + (f"not passed: {', '.join(bad)}" if bad else "every stage passed"),
        flush=True,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
