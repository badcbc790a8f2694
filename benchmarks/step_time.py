"""Training-step time and memory: the NumPy reference against PyTorch on the CPU.

One training step is: zero the gradients, forward in training mode (batch norm
with batch statistics), mean softmax cross-entropy, backward, and an SGD update
(momentum 0.9, weight decay 5e-4, learning rate 0.1), all in float32, on one
fixed synthetic batch (data loading is not part of the step).

Workloads (``--models``):

- ``resnet20``: CIFAR ResNet-20, input (128, 3, 32, 32), 10 classes;
- ``mobilenet_v1``: MobileNetV1 at width 0.25, input (128, 3, 64, 64), 10 classes.

How a run goes, per workload, each stage in a fresh subprocess (so the thread
settings are in place before NumPy or PyTorch is imported, and each peak RSS
belongs to one framework alone)::

    check    build our model from a fixed seed, save its state_dict and the batch,
             load the same weights into the PyTorch twin defined below, run two
             steps in each framework and compare the losses and the first gradients
    numpy    warm-up steps, then timed steps of the reference
    torch    the same for the PyTorch twin (rounds alternate numpy/torch and torch/numpy)
    profile  (with --profile) cProfile over a few reference steps, each after an unprofiled
             one in the same process, summarised as text that names its machine and commit

An inherited OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE is removed from the workers'
environment (and recorded), so OpenBLAS picks the kernel of the CPU it runs on.

The PyTorch twin is written here from the architecture description (not from
our modules) with the parameter names of our ``state_dict``, so
``load_state_dict(strict=True)`` proves the names and shapes match and the loss
check proves the computation matches. It follows torchvision's idiom (in-place
ReLU and residual add).

Usage (from the repository root)::

    python benchmarks/step_time.py [--steps 7] [--warmup 2] [--threads 2]
        [--models resnet20,mobilenet_v1] [--out benchmarks/results/step_time_cpu.json] [--profile]

The JSON is described in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from environment import THREAD_VARIABLES, UNSET_IN_WORKERS, code_state, machine_info, worker_environment

from reference.files import write_atomic  # standard library only: NumPy is imported by the workers

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Inherited settings that change the speed of either framework; recorded in the JSON as found.
ENVIRONMENT_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "GOMP_", "KMP_", "MALLOC_", "DNNL_", "ONEDNN_", "ATEN_")

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SEED = 0
LOSS_RTOL = 1e-4  # the like-for-like criterion on the loss from equal weights and batch


class Workload(NamedTuple):
    model: str  # name for reference.models.build_model
    width: float
    image: int  # square input side
    batch: int
    num_classes: int
    description: str


WORKLOADS: dict[str, Workload] = {
    "resnet20": Workload("resnet20", 1.0, 32, 128, 10, "CIFAR ResNet-20, 3x32x32"),
    "mobilenet_v1": Workload("mobilenet_v1", 0.25, 64, 128, 10, "MobileNetV1 width 0.25, 3x64x64"),
}


# ============================================================== small helpers
def _rss_mib() -> float:
    """This process's resident set size now, from /proc/self/status (MiB)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def _peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _display(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ================================================================ data, models
def _batch(workload: Workload):
    """The fixed synthetic batch: standard-normal images and uniform labels, from SEED + 1."""
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    shape = (workload.batch, 3, workload.image, workload.image)
    x = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, workload.num_classes, workload.batch).astype(np.int64)
    return x, labels


def _numpy_model(workload: Workload, state=None):
    """The reference model in training mode; with ``state``, its weights replaced by those."""
    import numpy as np

    from reference.models import build_model

    model = build_model(
        workload.model,
        num_classes=workload.num_classes,
        in_channels=3,
        width=workload.width,
        rng=np.random.default_rng(SEED),
        dtype=np.float32,
    )
    if state is not None:
        model.load_state_dict(state)
    model.train()
    return model


def _numpy_step_fn(model):
    """A closure running one reference training step and returning the loss as a float."""
    from reference.functional import softmax_cross_entropy
    from reference.optim import SGD

    optimizer = SGD(list(model.parameters()), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(x, labels) -> float:
        optimizer.zero_grad()
        loss = softmax_cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _torch_model(workload: Workload):
    """The PyTorch twin of ``workload.model`` (parameter names as our state_dict)."""
    from torch_models import CifarResNet, MobileNetV1

    if workload.model == "resnet20":
        model = CifarResNet(20, workload.num_classes, workload.width)
    elif workload.model == "mobilenet_v1":
        model = MobileNetV1(workload.num_classes, workload.width)
    else:
        raise ValueError(f"no PyTorch twin for model {workload.model!r}")
    return model.float().train()


def _torch_step_fn(model):
    """A closure running one PyTorch training step and returning the loss as a float."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(x, labels) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, optimizer


def _load_into_torch(model, state) -> None:
    import torch

    model.load_state_dict(
        {name: torch.from_numpy(array.copy()) for name, array in state.items()}, strict=True
    )


def _load_state(path: str) -> dict:
    import numpy as np

    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


# ==================================================================== workers
def _numpy_environment() -> dict[str, Any]:
    """NumPy's version, its BLAS as built and as loaded (threadpoolctl, when installed)."""
    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas_build"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except (KeyError, TypeError, AttributeError) as exc:  # the layout differs across NumPy versions
        info["numpy_blas_build"] = f"unavailable ({type(exc).__name__})"
    info["threadpools"] = _threadpools()
    return info


def _threadpools() -> Any:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    keep = ("user_api", "internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [{k: pool.get(k) for k in keep if k in pool} for pool in threadpool_info()]


def _pool_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's rounds as one result: statistics over every timed step of every round."""
    times = [t for r in rounds for t in r["step_times_s"]]
    pooled = dict(rounds[0])
    pooled.update(
        median_s=statistics.median(times),
        min_s=min(times),
        mean_s=statistics.fmean(times),
        step_times_s=times,
        round_medians_s=[r["median_s"] for r in rounds],
        peak_rss_mib=max(r["peak_rss_mib"] for r in rounds),
        peak_rss_increase_mib=max(r["peak_rss_increase_mib"] for r in rounds),
        losses=[loss for r in rounds for loss in r["losses"]],
        per_step_counters=[c for r in rounds for c in r["per_step_counters"]],
    )
    return pooled


def _counters(before, after, elapsed: float) -> dict[str, Any]:
    """What one step cost the process besides wall time, from two ``getrusage`` readings.

    ``cpu_over_wall`` near the thread count means every thread was on a core the whole
    step (working, or OpenBLAS's idle threads spinning between GEMMs); involuntary
    context switches count how often another process took a core from this one, the
    sign of a busy machine.
    """
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "user_cpu_s": round(after.ru_utime - before.ru_utime, 3),
        "system_cpu_s": round(after.ru_stime - before.ru_stime, 3),
        "cpu_over_wall": round(cpu / elapsed, 2) if elapsed > 0 else None,
        "involuntary_context_switches": after.ru_nivcsw - before.ru_nivcsw,
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
    }


def _process_state() -> dict[str, Any]:
    """Which frameworks this worker has imported and how many threads it runs now.

    A timed worker must hold one framework only, so neither framework's idle
    threads can spin on a core the other needs.
    """
    try:
        threads: int | None = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = None
    return {
        "frameworks_imported": sorted(name for name in ("numpy", "torch") if name in sys.modules),
        "threads_in_process": threads,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _time_steps(step, x, labels, warmup: int, steps: int) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` steps; times, losses and memory."""
    rss_before = _rss_mib()
    warmup_times, times, losses, counters = [], [], [], []
    for i in range(warmup + steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        loss = step(x, labels)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        (warmup_times if i < warmup else times).append(elapsed)
        losses.append(loss)
        counters.append(_counters(before, after, elapsed))
    peak = _peak_rss_mib()
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "losses": losses,
        "per_step_counters": counters,
        "rss_before_first_step_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_increase_mib": round(peak - rss_before, 1),
    }


def _gradient_differences(numpy_grads: dict, torch_grads: dict) -> dict[str, Any]:
    """Relative L2 differences of the gradients: all parameters as one vector, and the worst one."""
    import numpy as np

    worst_name, worst, diff_sq, ref_sq = None, 0.0, 0.0, 0.0
    for name, g in numpy_grads.items():
        t = torch_grads[name]
        d = float(np.linalg.norm((g - t).ravel()))
        r = float(np.linalg.norm(t.ravel()))
        diff_sq, ref_sq = diff_sq + d * d, ref_sq + r * r
        if d / max(r, 1e-300) >= worst:
            worst_name, worst = name, d / max(r, 1e-300)
    return {
        "all_parameters": (diff_sq**0.5) / max(ref_sq**0.5, 1e-300),
        "worst_parameter": worst_name,
        "worst_parameter_value": worst,
    }


def _cast_state(state: dict, dtype) -> dict:
    """``state`` with its floating-point arrays cast to ``dtype`` (integer counters stay)."""
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in state.items()}


def _first_gradients(
    workload: Workload, state: dict, x, labels, dtype_name: str
) -> tuple[float, float, dict]:
    """Both frameworks' loss and their relative gradient differences: one forward/backward in ``dtype``."""
    import numpy as np
    import torch

    from reference.functional import softmax_cross_entropy
    from reference.models import build_model

    dtype = np.dtype(dtype_name)
    model = build_model(
        workload.model, num_classes=workload.num_classes, in_channels=3, width=workload.width,
        rng=np.random.default_rng(SEED), dtype=dtype,
    )  # fmt: skip
    model.load_state_dict(_cast_state(state, dtype))
    model.train()
    loss = softmax_cross_entropy(model(x.astype(dtype)), labels)
    loss.backward()
    numpy_grads = {name: p.grad for name, p in model.named_parameters()}

    twin = _torch_model(workload).to(getattr(torch, dtype_name))
    _load_into_torch(twin, _cast_state(state, dtype))
    logits = twin(torch.from_numpy(x.astype(dtype)))
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    torch_loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in twin.named_parameters()}
    return loss.item(), torch_loss.item(), _gradient_differences(numpy_grads, torch_grads)


def _worker_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Save the initial weights and the batch; compare losses and gradients across frameworks.

    float32: the loss from the shared weights (the like-for-like criterion), the
    loss after one SGD step of each, and the first gradients. float64: the
    first gradients again, where rounding no longer hides a difference in the
    computation.
    """
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    workload = Workload(**spec["workload"])
    model = _numpy_model(workload)
    state = {name: np.array(array, copy=True) for name, array in model.state_dict().items()}
    num_parameters = int(sum(p.size for p in model.parameters()))
    x, labels = _batch(workload)
    np.savez(spec["state_path"], **state)
    np.savez(spec["batch_path"], x=x, labels=labels)

    numpy_step = _numpy_step_fn(model)
    numpy_losses = [numpy_step(x, labels), numpy_step(x, labels)]
    twin = _torch_model(workload)
    _load_into_torch(twin, state)
    torch_step, _ = _torch_step_fn(twin)
    tx, tlabels = torch.from_numpy(x), torch.from_numpy(labels)
    torch_losses = [torch_step(tx, tlabels), torch_step(tx, tlabels)]

    _, _, grads32 = _first_gradients(workload, state, x, labels, "float32")
    loss64, torch_loss64, grads64 = _first_gradients(workload, state, x, labels, "float64")
    initial = _relative_difference(numpy_losses[0], torch_losses[0])
    return {
        "loss_check": {
            "what": "mean cross-entropy on the benchmark batch from the same initial weights, "
            "training mode, float32",
            "numpy_loss": numpy_losses[0],
            "torch_loss": torch_losses[0],
            "relative_difference": initial,
            "tolerance": LOSS_RTOL,
            "passed": initial < LOSS_RTOL,
            "after_one_sgd_step": {
                "numpy_loss": numpy_losses[1],
                "torch_loss": torch_losses[1],
                "relative_difference": _relative_difference(numpy_losses[1], torch_losses[1]),
            },
            "first_gradients_relative_l2_difference": {"float32": grads32, "float64": grads64},
            "float64_loss": {
                "numpy": loss64,
                "torch": torch_loss64,
                "relative_difference": _relative_difference(loss64, torch_loss64),
            },
        },
        "num_parameters": num_parameters,
        "torch_load_state_dict_strict": True,
    }


def _worker_numpy(spec: dict[str, Any]) -> dict[str, Any]:
    from reference.runtime import keep_freed_memory

    kept = keep_freed_memory()  # as `learnsparse train` does
    workload = Workload(**spec["workload"])
    model = _numpy_model(workload, _load_state(spec["state_path"]))
    batch = _load_state(spec["batch_path"])
    step = _numpy_step_fn(model)
    result = _time_steps(step, batch["x"], batch["labels"], spec["warmup"], spec["steps"])
    result["environment"] = _numpy_environment()
    result["keep_freed_memory"] = kept
    result["process"] = _process_state()
    return result


def _worker_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    workload = Workload(**spec["workload"])
    model = _torch_model(workload)
    _load_into_torch(model, _load_state(spec["state_path"]))
    batch = _load_state(spec["batch_path"])
    step, _ = _torch_step_fn(model)
    x, labels = torch.from_numpy(batch["x"]), torch.from_numpy(batch["labels"])
    result = _time_steps(step, x, labels, spec["warmup"], spec["steps"])
    result["environment"] = {
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "build_blas": next(
            (
                part.split("=", 1)[1]
                for part in torch.__config__.show().replace(",", "\n").split()
                if part.startswith("BLAS_INFO=")
            ),
            None,
        ),
        "threadpools": _threadpools(),
    }
    result["process"] = _process_state()
    return result


def _provenance() -> str:
    """Where and on what code a profile was measured, for its text file's header.

    A profile file outlives the run that wrote it (a run without ``--profile``
    leaves the previous one in place), so it says itself which machine, BLAS
    kernel, commit and load it describes.
    """
    machine, code = machine_info(), code_state()
    pools = _threadpools()
    kernels = (
        ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}" for p in pools)
        if isinstance(pools, list)
        else pools
    )
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = (code.get("git_commit") or "unknown")[:12]
    dirty = (
        " (with uncommitted changes under reference/)"
        if code.get("uncommitted_in_reference_sha256_16")
        else ""
    )
    load = machine.get("load_average_at_start")
    return (
        f"{when} on {machine['cpu_model']} ({machine['logical_cores']} logical cores, load average "
        f"{f'{load[0]:.2f}' if load else 'unknown'}), BLAS {kernels}, commit {commit}{dirty}"
    )


def _worker_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """cProfile over ``profile_steps`` reference steps after the warm-up; write the text summary.

    Each profiled step alternates with an unprofiled one in the same process, so the
    summary states what the step costs without the profiler here and now, and its
    shares can be set against the timed workers' median (a busy machine slows one
    worker and not another; the profiler's own overhead shows as the difference).
    """
    import cProfile
    import pstats

    from reference.runtime import keep_freed_memory

    keep_freed_memory()
    workload = Workload(**spec["workload"])
    model = _numpy_model(workload, _load_state(spec["state_path"]))
    batch = _load_state(spec["batch_path"])
    x, labels = batch["x"], batch["labels"]
    step = _numpy_step_fn(model)
    for _ in range(max(spec["warmup"], 1)):  # warm-up, not profiled
        step(x, labels)
    profiler = cProfile.Profile()
    plain, profiled = [], []
    for _ in range(spec["profile_steps"]):
        start = time.perf_counter()
        step(x, labels)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        profiler.enable()
        step(x, labels)
        profiler.disable()
        profiled.append(time.perf_counter() - start)
    wall = sum(profiled)
    spec = dict(spec, unprofiled_median_s=statistics.median(plain), provenance=_provenance())
    stats = pstats.Stats(profiler)
    text, top_ops = _profile_summary(stats, wall, spec)
    write_atomic(Path(spec["profile_path"]), text)
    return {
        "profile_file": _display(Path(spec["profile_path"])),
        "profiled_steps": spec["profile_steps"],
        "step_time_under_profiler_s": wall / spec["profile_steps"],
        "step_times_under_profiler_s": profiled,
        "unprofiled_step_times_same_process_s": plain,
        "unprofiled_median_same_process_s": statistics.median(plain),
        "top_kernels": top_ops,
        "process": _process_state(),
    }


# ===================================================================== profile
def _profile_summary(stats, wall: float, spec: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text report: per-kernel table, per-op table, every function of reference/ops, top self time."""
    steps = spec["profile_steps"]
    workload = Workload(**spec["workload"])
    ops_dir = str(REPO_ROOT / "reference" / "ops") + os.sep
    total = stats.total_tt  # seconds spent in the profiled region, all functions
    per_step = total / steps

    # pstats: (file, line, function) -> (primitive calls, calls, own time, cumulative time, callers)
    rows = [(key, value) for key, value in stats.stats.items()]
    kernels, helpers = [], []
    for (filename, line, name), (_, calls, own, cumulative, _) in rows:
        if not filename.startswith(ops_dir):
            continue
        entry = {
            "function": name,
            "where": f"reference/ops/{filename[len(ops_dir) :]}:{line}",
            "calls_per_step": calls / steps,
            "own_s": own / steps,
            "cumulative_s": cumulative / steps,
        }
        (kernels if name.endswith(("_forward", "_backward")) else helpers).append(entry)
    kernels.sort(key=lambda e: -e["cumulative_s"])
    helpers.sort(key=lambda e: -e["cumulative_s"])
    in_kernels = sum(e["cumulative_s"] for e in kernels)

    def cumulative_of(suffix: str, name: str) -> float:
        return sum(v[3] for (f, _, n), v in rows if n == name and f.endswith(suffix)) / steps

    sgd = cumulative_of(os.path.join("reference", "optim.py"), "step")
    tape = cumulative_of(os.path.join("reference", "autodiff.py"), "backward")
    backward_kernels = sum(e["cumulative_s"] for e in kernels if e["function"].endswith("_backward"))

    def pct(seconds: float) -> str:
        return f"{100.0 * seconds / per_step:6.1f}%"

    out: list[str] = []
    out.append(
        f"step_time profile: {workload.model} ({workload.description}), batch {workload.batch}, "
        f"float32, {spec['threads']} threads"
    )
    out.append(
        f"cProfile (wall clock) over {steps} training steps after {max(spec['warmup'], 1)} "
        "unprofiled warm-up step(s); "
        f"{per_step:.3f} s/step under the profiler ({wall / steps:.3f} s/step wall)."
    )
    out.append(
        f"Unprofiled steps interleaved with those, same process: {spec['unprofiled_median_s']:.3f} s/step "
        "(median); the difference is the profiler's own cost."
    )
    out.append(f"Measured {spec['provenance']}.")
    out.append("Times are per step. 'cumulative' includes everything a function calls.")
    out.append("")
    out.append("Per-op kernel time (each *_forward / *_backward of reference/ops, summed over its calls)")
    out.append(f"{'kernel':<34}{'calls':>7}{'s/step':>10}{'% step':>9}{'cum %':>8}")
    running = 0.0
    for e in kernels:
        running += e["cumulative_s"]
        out.append(
            f"{e['function']:<34}{e['calls_per_step']:>7.0f}{e['cumulative_s']:>10.3f}"
            f"{pct(e['cumulative_s']):>9}{100.0 * running / per_step:>7.1f}%"
        )
    out.append(f"{'all kernels':<34}{'':>7}{in_kernels:>10.3f}{pct(in_kernels):>9}")
    outside = per_step - in_kernels
    out.append(f"{'outside the kernels':<34}{'':>7}{outside:>10.3f}{pct(outside):>9}")
    out.append(
        f"  of which SGD.step (reference/optim.py): {sgd:.3f} s ({pct(sgd).strip()}); "
        f"Tensor.backward outside its kernels (tape walk, gradient sums): "
        f"{tape - backward_kernels:.3f} s ({pct(tape - backward_kernels).strip()})"
    )
    out.append("")

    by_op: dict[str, list[float]] = {}
    for e in kernels:
        op, _, direction = e["function"].rpartition("_")
        by_op.setdefault(op, [0.0, 0.0])[0 if direction == "forward" else 1] += e["cumulative_s"]
    out.append("By op (forward + backward)")
    out.append(f"{'op':<26}{'forward s':>11}{'backward s':>12}{'total s':>10}{'% step':>9}")
    for op, (fwd, bwd) in sorted(by_op.items(), key=lambda item: -sum(item[1])):
        out.append(f"{op:<26}{fwd:>11.3f}{bwd:>12.3f}{fwd + bwd:>10.3f}{pct(fwd + bwd):>9}")
    out.append("")

    out.append("Inside the kernels: helpers and paths of reference/ops (cumulative, so nested ones overlap)")
    out.append(f"{'function':<22}{'where':<32}{'calls':>7}{'own s':>9}{'cum s':>9}{'% step':>9}")
    for e in helpers:
        if e["cumulative_s"] < 0.0005 * per_step:
            continue
        out.append(
            f"{e['function']:<22}{e['where']:<32}{e['calls_per_step']:>7.0f}{e['own_s']:>9.3f}"
            f"{e['cumulative_s']:>9.3f}{pct(e['cumulative_s']):>9}"
        )
    out.append("")

    out.append("Top 25 functions by own time (time not spent in profiled callees; NumPy C calls are leaves)")
    out.append(f"{'own s':>8}{'% step':>9}{'calls':>8}  function")
    ranked = sorted(rows, key=lambda kv: -kv[1][2])[:25]
    for (filename, line, name), (_, calls, own, _, _) in ranked:
        where = name if filename == "~" else f"{_short_path(filename)}:{line}({name})"
        out.append(f"{own / steps:>8.3f}{pct(own / steps):>9}{calls / steps:>8.0f}  {where}")
    out.append("")

    top = [
        {"kernel": e["function"], "s_per_step": round(e["cumulative_s"], 4),
         "percent_of_step": round(100.0 * e["cumulative_s"] / per_step, 1)}
        for e in kernels[:8]
    ]  # fmt: skip
    return "\n".join(out), top


def _short_path(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        parts = path.parts
        return (
            str(Path(*parts[parts.index("site-packages") + 1 :])) if "site-packages" in parts else path.name
        )


# ===================================================================== driver
WORKERS = {"check": _worker_check, "numpy": _worker_numpy, "torch": _worker_torch, "profile": _worker_profile}


def _blas_kernels(report: dict[str, Any]) -> dict[str, Any]:
    """The BLAS each timed worker loaded, as threadpoolctl saw it: library, version, kernel, threads."""
    kernels: dict[str, Any] = {}
    for framework in ("numpy", "torch"):
        pools = report["versions"].get(f"{framework}_threadpools")
        if isinstance(pools, list):
            kernels[framework] = [
                {k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for pool in pools
                if pool.get("user_api") == "blas" or framework == "torch"
            ]
    kernels["torch_cpu_capability"] = report["versions"].get("torch_cpu_capability")
    return kernels


def _run_worker(kind: str, spec: dict[str, Any], workdir: Path, threads: int) -> dict[str, Any]:
    """Run worker ``kind`` in a fresh interpreter with the thread variables set; its JSON result."""
    tag = f"{spec['workload']['model']}_{kind}"
    spec_path, result_path = workdir / f"{tag}_spec.json", workdir / f"{tag}_result.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_environment(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
               "--spec", str(spec_path), "--result", str(result_path)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or not result_path.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"worker {kind} for {spec['workload']['model']} failed:\n" + "\n".join(tail))
    result = json.loads(result_path.read_text())
    print(f"  {kind:<8} done in {elapsed:6.1f} s", flush=True)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=7, help="timed steps per framework and round (default 7)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating numpy/torch worker rounds, pooled (default 3)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both frameworks (default 2)")
    parser.add_argument("--models", default="resnet20,mobilenet_v1", help="comma-separated workloads")
    parser.add_argument("--batch", type=int, default=None, help="override every workload's batch size")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step_time_cpu.json", help="JSON path")
    parser.add_argument("--profile", action="store_true", help="also cProfile the NumPy step")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under cProfile (default 3)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        if min(args.steps, args.rounds, args.threads, args.profile_steps) < 1 or args.warmup < 0:
            parser.error("--steps, --rounds, --threads and --profile-steps must be >= 1 and --warmup >= 0")
        if args.batch is not None and args.batch < 2:
            parser.error("--batch must be >= 2 (batch norm needs two samples)")
        unknown = [m for m in args.models.split(",") if m not in WORKLOADS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return args


def _table(report: dict[str, Any]) -> str:
    header = (
        f"{'workload':<14}{'batch':>6}{'numpy s':>10}{'torch s':>10}{'ratio':>8}"
        f"{'np peak MiB':>13}{'pt peak MiB':>13}{'loss rel diff':>15}"
    )
    lines = [header]
    for name, w in report["workloads"].items():
        if "error" in w:
            lines.append(f"{name:<14} failed: {w['error'].splitlines()[0]}")
            continue
        np_r, pt_r = w["numpy"], w["torch"]
        lines.append(
            f"{name:<14}{w['batch']:>6}{np_r['median_s']:>10.3f}{pt_r['median_s']:>10.3f}"
            f"{w['ratio_numpy_over_torch']:>8.1f}{np_r['peak_rss_mib']:>13.0f}{pt_r['peak_rss_mib']:>13.0f}"
            f"{w['loss_check']['relative_difference']:>15.1e}"
        )
    lines.append("(medians of timed steps; ratio = numpy / torch; peak = subprocess peak RSS)")
    for name, w in report["workloads"].items():
        if "numpy" not in w or "torch" not in w:
            continue
        busy = ", ".join(
            f"{framework} {_median_counter(w[framework], 'involuntary_context_switches'):.0f} preemptions "
            f"and {_median_counter(w[framework], 'cpu_over_wall'):.2f} CPU s per wall s"
            for framework in ("numpy", "torch")
        )
        lines.append(f"{name}: per step (median) {busy}")
        if "profile" in w:
            lines.append(
                f"{name}: profile worker's unprofiled steps / timed median = "
                f"{w['profile']['unprofiled_over_timed_median']:.2f}"
            )
    return "\n".join(lines)


def _median_counter(result: dict[str, Any], key: str) -> float:
    values = [c[key] for c in result["per_step_counters"] if c.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker is not None:
        spec = json.loads(Path(args.spec).read_text())
        result = WORKERS[args.worker](spec)
        write_atomic(Path(args.result), json.dumps(result))
        return 0

    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    report: dict[str, Any] = {
        "benchmark": "training step time, NumPy reference vs PyTorch CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "machine": machine_info(),
        "versions": {"python": platform.python_version()},
        "code": code_state(),
        "threads": args.threads,
        "thread_variables": {name: str(args.threads) for name in THREAD_VARIABLES},
        "inherited_environment": {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith(ENVIRONMENT_PREFIXES) and name not in THREAD_VARIABLES
        },
        "unset_in_workers": {name: os.environ[name] for name in UNSET_IN_WORKERS if name in os.environ},
        "step": {
            "definition": "zero_grad, forward (training mode), mean softmax cross-entropy, backward, SGD update",
            "dtype": "float32",
            "optimizer": {"name": "SGD", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "data": "one fixed synthetic batch: standard-normal images, uniform labels (seed 1)",
            "weights": "reference initialisation with seed 0, loaded into both frameworks",
        },
        "timing": {
            "warmup_steps": args.warmup,
            "timed_steps_per_round": args.steps,
            "rounds": args.rounds,
            "pooling": "median over every timed step of every round; rounds alternate numpy-torch, torch-numpy",
            "clock": "time.perf_counter",
        },
        "workloads": {},
    }
    for name, value in report["unset_in_workers"].items():
        print(f"note: inherited {name}={value} is removed from the workers' environment", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)  # before minutes of measuring, not after
    failed = False
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            workload = WORKLOADS[name]
            if args.batch is not None:
                workload = workload._replace(batch=args.batch)
            print(f"{name}: batch {workload.batch}, input 3x{workload.image}x{workload.image}", flush=True)
            spec = {
                "workload": workload._asdict(),
                "threads": args.threads,
                "warmup": args.warmup,
                "steps": args.steps,
                "profile_steps": args.profile_steps,
                "state_path": str(workdir / f"{name}_state.npz"),
                "batch_path": str(workdir / f"{name}_batch.npz"),
                "profile_path": str(out.parent / f"step_time_profile_{name}.txt"),
            }
            entry: dict[str, Any] = {
                "description": workload.description,
                "model": workload.model,
                "width": workload.width,
                "batch": workload.batch,
                "input_shape": [workload.batch, 3, workload.image, workload.image],
                "num_classes": workload.num_classes,
            }
            report["workloads"][name] = entry
            try:
                entry.update(_run_worker("check", spec, workdir, args.threads))
                if not entry["loss_check"]["passed"]:
                    raise RuntimeError(
                        f"loss check failed: relative difference {entry['loss_check']['relative_difference']:.2e} "
                        f">= {LOSS_RTOL}; not timing a comparison that is not like for like"
                    )
                runs: dict[str, list[dict[str, Any]]] = {"numpy": [], "torch": []}
                for r in range(args.rounds):  # alternate, so slow spells of a shared machine hit both
                    for framework in ("numpy", "torch") if r % 2 == 0 else ("torch", "numpy"):
                        runs[framework].append(_run_worker(framework, spec, workdir, args.threads))
                entry["numpy"], entry["torch"] = _pool_rounds(runs["numpy"]), _pool_rounds(runs["torch"])
                entry["ratio_numpy_over_torch"] = entry["numpy"]["median_s"] / entry["torch"]["median_s"]
                if args.profile:
                    entry["profile"] = profile = _run_worker("profile", spec, workdir, args.threads)
                    # the same step, unprofiled, in the profile worker against the timed workers
                    profile["unprofiled_over_timed_median"] = (
                        profile["unprofiled_median_same_process_s"] / entry["numpy"]["median_s"]
                    )
            except RuntimeError as exc:
                entry["error"] = str(exc)
                failed = True
                print(f"  {exc}", file=sys.stderr, flush=True)

    # Versions as the workers saw them (the first workload that got that far).
    for entry in report["workloads"].values():
        if "numpy" in entry and "torch" in entry:
            np_env, pt_env = entry["numpy"]["environment"], entry["torch"]["environment"]
            report["versions"].update(
                numpy=np_env["numpy"], numpy_blas_build=np_env["numpy_blas_build"],
                numpy_threadpools=np_env["threadpools"], torch=pt_env["torch"],
                torch_num_threads=pt_env["torch_num_threads"], torch_threadpools=pt_env["threadpools"],
                torch_cpu_capability=pt_env["cpu_capability"], torch_build_blas=pt_env["build_blas"],
            )  # fmt: skip
            break
    report["blas_kernels"] = _blas_kernels(report)

    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print()
    print(_table(report))
    print(f"wrote {_display(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
