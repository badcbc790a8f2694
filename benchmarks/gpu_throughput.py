"""Training throughput and peak memory on one GPU: the CuPy twin against PyTorch, side by side.

One training step is: forward in training mode (batch norm with batch
statistics), mean softmax cross-entropy (no label smoothing), plus the sparsity
method's regularization when it has one, zero the gradients, backward, and an
SGD update (lr 0.1, momentum 0.9, coupled weight decay 5e-4), on one fixed
synthetic batch that is already on the device (data loading is not part of
the step).

Configurations: every combination of

- model (``--models``): ``resnet50`` (ResNet-50 v1.5) and ``mobilenet_v1`` (width 1.0), 1000
  classes, input 3x224x224 (``--image``);
- method (``--methods``): ``dense``, and ``str`` (soft threshold reparameterization on every conv
  and the classifier weight, one threshold per layer, ``s`` initialised to TrainConfig's default
  ``str_s_init``);
- precision (``--precisions``): ``tf32``, ``bf16`` and optionally ``fp32``.

Both frameworks train the same network from the same initial weights (ours, loaded into PyTorch
by name with ``strict=True``) on the same batch:

- ours: ``reference.models.build_model`` + ``reference.sparsity.build_method(...).attach``,
  ``model.to("cuda")``, ``reference.optim.SGD`` over ``reference.train.param_groups``, and
  ``gpu.runtime.set_precision`` (TF32 GEMMs; bf16 GEMM operands with float32 master weights);
- PyTorch: torchvision's ``resnet50`` when torchvision imports (else the same layout defined
  below), the MobileNetV1 defined below (our layer list), STR as the paper's formula
  ``W_eff = sign(W) * relu(|W| - sigmoid(s))`` through ``torch.nn.utils.parametrize`` with
  autograd, ``torch.optim.SGD``; tf32 through ``torch.backends.{cuda.matmul,cudnn}.allow_tf32``,
  bf16 through ``torch.autocast(device_type="cuda", dtype=torch.bfloat16)`` with float32 weights.
  ``cudnn.benchmark`` is on unless ``--no-cudnn-benchmark``; NCHW unless ``--torch-channels-last``.

Timing: per configuration, ``--rounds`` rounds alternate ours then PyTorch; each round runs
``--warmup`` untimed steps (on our side the first ones include CuPy's kernel compilation) and
``--steps`` timed steps, each between two device synchronisations. A round's figure is its median
step; the configuration's figure is the median of its rounds. Throughput = batch / step time.

Memory: ours is the CuPy memory pool's ``total_bytes()`` at the end of a round, the pool having
been emptied (``free_all_blocks``) before it: the pool keeps every block it gets, so this is the
most it held (comparable to PyTorch's reserved bytes). PyTorch's is ``max_memory_allocated`` and
``max_memory_reserved`` after ``reset_peak_memory_stats``. Each framework's cache is emptied before
the other's round. On out-of-memory in either framework the batch is halved and the
configuration run again with both; the batch used is recorded.

Profile (``--profile [MODEL/METHOD/PRECISION]``, default the first configuration): every
``*_forward`` / ``*_backward`` function of ``gpu.ops`` (the module that ``reference.autodiff``
looks kernels up on at each call) and the optimizer step are wrapped with a pair of CUDA events
on the current stream; after each synchronised step the elapsed times are summed per function.
The event pair measures stream time from the op's first launch to its last kernel's end: kernel
time when the GPU is the bottleneck, launch gaps included when the host is. Host time per call
(``time.perf_counter``) is recorded beside it.

``--smoke`` checks the script's logic on a machine without a GPU: both frameworks on the CPU,
batch 2, image 32, 1 warm-up step, 1 timed step, 1 round (the profile then times NumPy kernels
with ``time.perf_counter``). Its numbers mean nothing.

``--frameworks ours`` runs our side alone (no PyTorch needed): the quick real-size smoke of
``benchmarks/gpu_check.py`` uses it. ``--emulate`` runs our side on the device through the tests'
CPU execution mode (``tests/emulation``: the twin's CUDA kernels compiled for the host, a stand-in
CuPy), so the whole device path of this script is exercised without a GPU; it needs the repository
root on ``PYTHONPATH``, implies ``--frameworks ours`` and its numbers mean nothing either.

Usage (from the repository root; the project need not be installed)::

    PYTHONPATH=. python benchmarks/gpu_throughput.py [--models resnet50,mobilenet_v1]
        [--methods dense,str] [--precisions tf32,bf16] [--batch 256] [--warmup 3] [--steps 10]
        [--rounds 3] [--profile [resnet50/str/tf32]] [--out benchmarks/results/gpu_throughput.json]
        [--frameworks ours,torch] [--smoke | --emulate]

Exit status: 0 when every configuration ran, 1 when one failed (its JSON entry holds the error),
2 for bad arguments or a missing GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

from environment import code_state, machine_info

from reference.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODELS = ("resnet50", "mobilenet_v1")
FRAMEWORKS = ("ours", "torch")
METHODS = ("dense", "str")
PRECISIONS = ("tf32", "bf16", "fp32")
NUM_CLASSES = 1000
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SEED = 0
GIB = 2**30


class Settings(NamedTuple):
    device: str  # "cuda", or "cpu" for --smoke
    image: int
    batch: int
    warmup: int
    steps: int
    rounds: int
    profile: str | None  # "model/method/precision" to profile, or None
    profile_steps: int
    cudnn_benchmark: bool
    channels_last: bool
    frameworks: tuple[str, ...] = FRAMEWORKS
    width: float = 1.0  # our models' channel multiplier (PyTorch's twins exist at 1.0 only)
    num_classes: int = NUM_CLASSES


class Config(NamedTuple):
    model: str
    method: str
    precision: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.method}/{self.precision}"


# ====================================================================== shared
class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message, prog=self.prog)


def fail(message: str, prog: str | None = None) -> None:
    """Print ``prog: error: message`` on one line and exit with status 2."""
    name = prog or Path(sys.argv[0]).name
    print(f"{name}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def comma_list(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    """The comma-separated names in ``text``, each checked against ``valid`` (exit 2 otherwise)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in valid]
    if not names or unknown:
        fail(f"{what} must be a comma-separated list of {', '.join(valid)}; got {text!r}")
    return list(dict.fromkeys(names))


def source_state() -> dict[str, Any]:
    """code_state() (commit, uncommitted files under reference/), plus the same for gpu/ (untracked
    files included) and a digest of every .py file under reference/ and gpu/, which holds without git."""
    state = code_state()
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", "gpu"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        changed = [line[3:] for line in done.stdout.splitlines()]
        state["uncommitted_in_gpu_sha256_16"] = {
            name: hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest()[:16]
            for name in changed
            if (REPO_ROOT / name).is_file()
        }
    except (OSError, subprocess.CalledProcessError):
        state["uncommitted_in_gpu_sha256_16"] = None
    for package in ("reference", "gpu"):
        digest = hashlib.sha256()
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
        state[f"{package}_tree_sha256_16"] = digest.hexdigest()[:16]
    return state


def device_record(device: str) -> dict[str, Any]:
    """The GPU, driver, CUDA and CuPy versions (gpu.runtime.describe) and the kernel cache state."""
    if device != "cuda":
        return {"device": "cpu (--smoke: no GPU used)"}
    from gpu import runtime

    info = runtime.describe()
    info.pop("precision", None)  # per configuration, not per device
    cache = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    info["cupy_cache_dir"] = str(cache)
    info["cupy_cache_files_at_start"] = sum(1 for _ in cache.rglob("*")) if cache.is_dir() else 0
    return info


def release_device_memory(device: str) -> None:
    """Drop unreachable objects, then hand both frameworks' cached device blocks back to the driver."""
    gc.collect()
    if device != "cuda":
        return
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        import torch

        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error from CuPy, cuBLAS or PyTorch."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    if "OutOfMemoryError" in names:
        return True
    text = str(exc).lower()
    return any(
        s in text for s in ("out of memory", "cudaerrormemoryallocation", "cublas_status_alloc_failed")
    )


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ======================================================================== ours
class OursRun:
    """Our model, method and optimizer on the device, and one training step on a fixed batch."""

    framework = "ours"

    def __init__(self, config: Config, batch: tuple, settings: Settings):
        import numpy as np

        from reference.backend import to_device
        from reference.config import TrainConfig
        from reference.models import build_model
        from reference.optim import SGD
        from reference.sparsity import build_method
        from reference.train import param_groups

        self.device = settings.device
        if self.device == "cuda":
            from gpu import runtime

            runtime.set_precision(config.precision)
        model = build_model(
            config.model, num_classes=settings.num_classes, in_channels=3, width=settings.width,
            rng=np.random.default_rng(SEED),
            dtype=np.float32,
        )  # fmt: skip
        # The dense initial weights, for PyTorch (taken before a method adds its own parameters).
        self.initial_state = {name: np.array(a, copy=True) for name, a in model.state_dict().items()}
        train_config = TrainConfig(model=config.model, method=config.method, weight_decay=WEIGHT_DECAY)
        self.method = build_method(train_config)
        self.method.attach(model)
        model.to(self.device)  # before the optimizer, so the momentum buffers are made on the device
        model.train()
        self.model = model
        self.optimizer = SGD(
            param_groups(model, train_config, self.method),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
        )
        self.x = to_device(batch[0], self.device)
        self.labels = to_device(batch[1], self.device)
        self.num_parameters = int(sum(p.size for p in model.parameters()))

    def step(self):
        from reference.autodiff import Tensor
        from reference.functional import softmax_cross_entropy

        loss = softmax_cross_entropy(self.model(Tensor(self.x)), self.labels)
        extra = self.method.regularization(self.model)
        full = loss if extra is None else loss + extra
        self.optimizer.zero_grad()
        full.backward()
        self.optimizer.step()
        return loss

    def synchronize(self) -> None:
        if self.device == "cuda":
            from gpu import runtime

            runtime.synchronize()

    @staticmethod
    def read(loss) -> float:
        return loss.item()

    def reset_memory(self) -> None:
        if self.device == "cuda":
            release_device_memory(self.device)

    def memory(self) -> dict[str, Any] | None:
        if self.device != "cuda":
            return None
        from gpu import runtime

        stats = runtime.memory_stats()
        return {
            "pool_total_bytes": stats["total_bytes"],
            "pool_used_bytes_after": stats["used_bytes"],
            "peak_gib": round(stats["total_bytes"] / GIB, 3),
            "what": "CuPy memory pool total_bytes() after the round, the pool emptied before it",
        }


# ===================================================================== PyTorch
def _torch_models():
    """benchmarks/torch_models.py, imported only when PyTorch is used."""
    import torch_models

    return torch_models


def torch_model(name: str, num_classes: int):
    """``(model, source)``: the PyTorch network for our model ``name``."""
    if name == "mobilenet_v1":
        return _torch_models().MobileNetV1(num_classes), "defined in benchmarks/torch_models.py"
    try:
        import torchvision
    except Exception as exc:  # absent, or an install that does not match torch
        return _torch_models().ResNet50(num_classes), (
            f"defined in benchmarks/torch_models.py (torchvision not usable: {type(exc).__name__})"
        )
    return torchvision.models.resnet50(weights=None, num_classes=num_classes), (
        f"torchvision {torchvision.__version__} models.resnet50"
    )


def _torch_soft_threshold(s_init: float):
    """STR as a parametrization: W -> sign(W) * relu(|W| - sigmoid(s)), one scalar s per layer."""
    import torch
    from torch import nn

    class SoftThreshold(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(float(s_init), dtype=torch.float32))

        def forward(self, weight):
            return torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(self.s))

    return SoftThreshold()


class TorchRun:
    """The PyTorch network, its optimizer and one training step on the same fixed batch."""

    framework = "torch"

    def __init__(self, config: Config, batch: tuple, settings: Settings, initial_state: dict):
        import torch
        from torch.nn.utils import parametrize

        from reference.config import TrainConfig

        self.torch = torch
        self.device = settings.device
        model, self.source = torch_model(config.model, settings.num_classes)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in initial_state.items()}, strict=True)
        if config.method == "str":
            s_init = TrainConfig().str_s_init
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    parametrize.register_parametrization(module, "weight", _torch_soft_threshold(s_init))
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=memory_format).float().train()
        self.model = model
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self.x = torch.from_numpy(batch[0]).to(self.device).contiguous(memory_format=memory_format)
        self.labels = torch.from_numpy(batch[1]).to(self.device)
        self.num_parameters = int(sum(p.numel() for p in model.parameters()))
        tf32 = config.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        if config.precision == "bf16":
            self.autocast = functools.partial(torch.autocast, device_type=self.device, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.flags = {
            "cuda.matmul.allow_tf32": tf32,
            "cudnn.allow_tf32": tf32,
            "cudnn.benchmark": settings.cudnn_benchmark,
            "autocast": "bfloat16" if config.precision == "bf16" else None,
            "memory_format": "channels_last" if settings.channels_last else "contiguous (NCHW)",
        }

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    @staticmethod
    def read(loss) -> float:
        return float(loss.item())

    def reset_memory(self) -> None:
        if self.device == "cuda":
            release_device_memory(self.device)
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, Any] | None:
        if self.device != "cuda":
            return None
        cuda = self.torch.cuda
        allocated, reserved = int(cuda.max_memory_allocated()), int(cuda.max_memory_reserved())
        return {
            "max_memory_allocated_bytes": allocated,
            "max_memory_reserved_bytes": reserved,
            "peak_gib": round(allocated / GIB, 3),
            "peak_reserved_gib": round(reserved / GIB, 3),
            "what": "torch.cuda.max_memory_allocated / max_memory_reserved after reset_peak_memory_stats",
        }


# ====================================================================== timing
def time_round(run, settings: Settings, batch_size: int) -> dict[str, Any]:
    """``settings.warmup`` untimed then ``settings.steps`` timed steps, each between synchronisations."""
    run.reset_memory()
    warmup_times, times, first, last = [], [], None, None
    for i in range(settings.warmup + settings.steps):
        run.synchronize()
        start = time.perf_counter()
        loss = run.step()
        run.synchronize()
        (warmup_times if i < settings.warmup else times).append(time.perf_counter() - start)
        first = loss if first is None else first
        last = loss
    median = statistics.median(times)
    result = {
        "median_s": median,
        "images_per_s": batch_size / median,
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "first_loss": run.read(first),
        "last_loss": run.read(last),
        "memory": run.memory(),
    }
    del first, last, loss
    run.reset_memory()  # leave the device to the other framework
    return result


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's rounds: the median over rounds of each round's throughput, and every round."""
    rates = [r["images_per_s"] for r in rounds]
    memories = [r["memory"] for r in rounds if r["memory"] is not None]
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_rounds": rates,
        "median_step_s": statistics.median(r["median_s"] for r in rounds),
        "peak_gib": max((m["peak_gib"] for m in memories), default=None),
        "peak_reserved_gib": max((m.get("peak_reserved_gib", m["peak_gib"]) for m in memories), default=None),
        "rounds": rounds,
    }


# ===================================================================== profile
class _Timer:
    """Start/stop marks: CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            import cupy

            self.cupy = cupy

    def mark(self):
        if self.cuda:
            event = self.cupy.cuda.Event()
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return float(self.cupy.cuda.get_elapsed_time(start, end))
        return 1000.0 * (end - start)


def profile_ours(run: OursRun, steps: int) -> dict[str, Any]:
    """Per-function time of our step: every *_forward / *_backward kernel and the optimizer step."""
    if run.device == "cuda":
        import gpu.ops as kernels
    else:
        import reference.ops as kernels
    timer = _Timer(run.device)
    records: list[tuple[str, Any, Any, float]] = []

    def wrap(name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            host = time.perf_counter()
            start = timer.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                records.append((name, start, timer.mark(), time.perf_counter() - host))

        return timed

    originals = {
        name: getattr(kernels, name)
        for name in dir(kernels)
        if name.endswith(("_forward", "_backward")) and callable(getattr(kernels, name))
    }
    optimizer_step = "optimizer.step (SGD)"
    totals: dict[str, list[float]] = {}  # name -> [device ms, host s, calls]
    step_ms, step_host = [], []
    for name, fn in originals.items():
        setattr(kernels, name, wrap(name, fn))
    run.optimizer.step = wrap(optimizer_step, run.optimizer.step)  # an instance attribute, removed below
    try:
        for _ in range(steps):
            records.clear()
            run.synchronize()
            host = time.perf_counter()
            start = timer.mark()
            run.step()
            end = timer.mark()
            run.synchronize()
            step_host.append(time.perf_counter() - host)
            step_ms.append(timer.elapsed_ms(start, end))
            for name, a, b, host_s in records:
                entry = totals.setdefault(name, [0.0, 0.0, 0])
                entry[0] += timer.elapsed_ms(a, b)
                entry[1] += host_s
                entry[2] += 1
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
        del run.optimizer.step
        records.clear()

    per_step = statistics.fmean(step_ms)
    rows = sorted(
        (
            {
                "function": name,
                "calls_per_step": calls / steps,
                "ms_per_step": ms / steps,
                "percent_of_step": 100.0 * ms / steps / per_step,
                "host_ms_per_step": 1000.0 * host_s / steps,
            }
            for name, (ms, host_s, calls) in totals.items()
        ),
        key=lambda row: -row["ms_per_step"],
    )
    in_ops = sum(r["ms_per_step"] for r in rows if r["function"] != optimizer_step)
    optimizer_ms = sum(r["ms_per_step"] for r in rows if r["function"] == optimizer_step)
    return {
        "timer": "CUDA events on the current stream" if run.device == "cuda" else "time.perf_counter",
        "profiled_steps": steps,
        "step_ms": per_step,
        "step_host_ms": 1000.0 * statistics.fmean(step_host),
        "kernels_ms": in_ops,
        "optimizer_ms": optimizer_ms,
        "outside_kernels_ms": per_step - in_ops - optimizer_ms,
        "rows": rows,
    }


def profile_table(profile: dict[str, Any]) -> str:
    lines = [
        f"per-op profile ({profile['timer']}, {profile['profiled_steps']} steps): "
        f"step {profile['step_ms']:.1f} ms on the device clock, {profile['step_host_ms']:.1f} ms host",
        "",
        "| function | calls/step | ms/step | % of step | host ms/step |",
        "|---|---|---|---|---|",
    ]
    for r in profile["rows"]:
        lines.append(
            f"| `{r['function']}` | {r['calls_per_step']:.0f} | {r['ms_per_step']:.2f} | "
            f"{r['percent_of_step']:.1f}% | {r['host_ms_per_step']:.2f} |"
        )
    lines.append(
        f"| all *_forward/*_backward | | {profile['kernels_ms']:.2f} | "
        f"{100 * profile['kernels_ms'] / profile['step_ms']:.1f}% | |"
    )
    lines.append(
        f"| outside kernels and optimizer (tape, Python, gaps) | | {profile['outside_kernels_ms']:.2f} | "
        f"{100 * profile['outside_kernels_ms'] / profile['step_ms']:.1f}% | |"
    )
    return "\n".join(lines)


# ====================================================================== driver
def synthetic_batch(batch: int, image: int, num_classes: int = NUM_CLASSES):
    """Standard-normal images and uniform labels over ``num_classes``, from SEED + 1 (host arrays)."""
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    x = rng.standard_normal((batch, 3, image, image), dtype=np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int64)
    return x, labels


def run_configuration(config: Config, batch_size: int, settings: Settings) -> dict[str, Any]:
    """Build both frameworks' runs for ``config`` at ``batch_size``, alternate the rounds, maybe profile."""
    batch = synthetic_batch(batch_size, settings.image, settings.num_classes)
    release_device_memory(settings.device)
    ours = OursRun(config, batch, settings)
    theirs = TorchRun(config, batch, settings, ours.initial_state) if "torch" in settings.frameworks else None
    ours.initial_state = None
    runs = (ours,) if theirs is None else (ours, theirs)
    rounds: dict[str, list[dict[str, Any]]] = {run.framework: [] for run in runs}
    for index in range(settings.rounds):
        for run in runs:
            result = time_round(run, settings, batch_size)
            rounds[run.framework].append(result)
            memory = result["memory"]
            peak = f", peak {memory['peak_gib']:.2f} GiB" if memory else ""
            print(
                f"  round {index + 1}/{settings.rounds} {run.framework:<5} "
                f"{result['median_s'] * 1000:8.1f} ms/step "
                f"{result['images_per_s']:9.1f} img/s{peak}  (loss {result['first_loss']:.4f} -> "
                f"{result['last_loss']:.4f}; warm-up {sum(result['warmup_times_s']):.1f} s)",
                flush=True,
            )
    entry: dict[str, Any] = {
        "model": config.model,
        "method": config.method,
        "precision": config.precision,
        "batch": batch_size,
        "input_shape": [batch_size, 3, settings.image, settings.image],
        "width": settings.width,
        "num_classes": settings.num_classes,
        "num_parameters": {"ours": ours.num_parameters},
        "ours": summarize_rounds(rounds["ours"]),
    }
    a = rounds["ours"][0]["first_loss"]
    entry["initial_loss"] = {"ours": a, "what": "loss of the first step from the reference initial weights"}
    entry["finite_losses"] = all(
        math.isfinite(r[key]) for r in rounds["ours"] for key in ("first_loss", "last_loss")
    )
    if theirs is not None:
        entry["num_parameters"]["torch"] = theirs.num_parameters
        entry["torch_model"] = theirs.source
        entry["torch_flags"] = theirs.flags
        entry["torch"] = summarize_rounds(rounds["torch"])
        entry["ratio_torch_over_ours"] = entry["torch"]["images_per_s"] / entry["ours"]["images_per_s"]
        b = rounds["torch"][0]["first_loss"]
        entry["initial_loss"] = {
            "ours": a,
            "torch": b,
            "relative_difference": abs(a - b) / max(abs(a), abs(b), 1e-30),
            "what": "loss of the first step from the same weights and batch (informational: precision differs)",
        }
    if settings.profile == config.key:
        print(f"  profiling {settings.profile_steps} steps of ours", flush=True)
        ours.reset_memory()
        entry["profile"] = profile_ours(ours, settings.profile_steps)
    del ours, theirs
    release_device_memory(settings.device)
    return entry


def run_with_fallback(config: Config, settings: Settings) -> dict[str, Any]:
    """run_configuration at the requested batch, halving it on out-of-memory (both frameworks)."""
    batch, ooms = settings.batch, []
    while True:
        failure = None
        try:
            entry = run_configuration(config, batch, settings)
            entry["batch_requested"] = settings.batch
            entry["out_of_memory_at"] = ooms
            return entry
        except Exception as exc:  # recorded per configuration; the other configurations still run
            failure = (is_out_of_memory(exc), f"{type(exc).__name__}: {exc}", traceback.format_exc())
        release_device_memory(settings.device)  # outside the except block: the traceback is gone
        oom, message, trace = failure
        if not oom or batch // 2 < 2:
            print(f"  failed: {message.splitlines()[0] if message else ''}", file=sys.stderr, flush=True)
            return {
                "model": config.model, "method": config.method, "precision": config.precision,
                "batch_requested": settings.batch, "batch": batch, "out_of_memory_at": ooms,
                "error": message, "traceback": trace.splitlines()[-20:],
            }  # fmt: skip
        ooms.append({"batch": batch, "error": message.splitlines()[0]})
        batch //= 2
        print(f"  out of memory at batch {ooms[-1]['batch']}; trying batch {batch}", flush=True)


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | precision | batch | ours img/s | torch img/s | torch / ours | "
        "ours peak GiB (pool) | torch peak GiB (allocated / reserved) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        head = f"| {e['model']} | {e['method']} | {e['precision']} | {e['batch']} |"
        if "error" in e:
            lines.append(f"{head} failed: {e['error'].splitlines()[0][:80]} | | | | |")
            continue

        def gib(value):
            return "-" if value is None else f"{value:.2f}"

        if "torch" not in e:
            lines.append(
                f"{head} {e['ours']['images_per_s']:.1f} | not run | - | {gib(e['ours']['peak_gib'])} | - |"
            )
            continue
        lines.append(
            f"{head} {e['ours']['images_per_s']:.1f} | {e['torch']['images_per_s']:.1f} | "
            f"{e['ratio_torch_over_ours']:.2f} | {gib(e['ours']['peak_gib'])} | "
            f"{gib(e['torch']['peak_gib'])} / {gib(e['torch']['peak_reserved_gib'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__.split("\n")[0],
        epilog="See the module docstring (head of this file) for what is measured and how.",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--precisions",
        default="tf32,bf16",
        help=f"comma-separated, of {', '.join(PRECISIONS)} (default tf32,bf16)",
    )
    parser.add_argument(
        "--batch", type=int, default=256, help="batch size; halved on out-of-memory (default 256)"
    )
    parser.add_argument("--image", type=int, default=224, help="square input side (default 224)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating ours, torch (default 3)")
    parser.add_argument(
        "--profile", nargs="?", const="first", default=None, metavar="MODEL/METHOD/PRECISION",
        help="profile our step per op for one configuration (default: the first one run)",
    )  # fmt: skip
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (default 3)")
    parser.add_argument(
        "--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off"
    )
    parser.add_argument(
        "--torch-channels-last", action="store_true", help="run PyTorch in channels_last (ours stays NCHW)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "gpu_throughput.json", help="JSON path (written atomically)"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="check the script on the CPU: batch 2, image 32, 1 warm-up, 1 step, 1 round "
        "(its numbers mean nothing)",
    )  # fmt: skip
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS),
        help=f"comma-separated, of {', '.join(FRAMEWORKS)} (default both; ours alone needs no PyTorch)",
    )  # fmt: skip
    parser.add_argument(
        "--emulate", action="store_true",
        help="run our side through the tests' CPU execution mode of the twin (no GPU; implies "
        "--frameworks ours; needs the repository root on PYTHONPATH; its numbers mean nothing)",
    )  # fmt: skip
    parser.add_argument(
        "--width", type=float, default=1.0,
        help="our models' channel multiplier (default 1.0; other widths need --frameworks ours)",
    )  # fmt: skip
    parser.add_argument(
        "--num-classes", type=int, default=NUM_CLASSES, help=f"classifier outputs (default {NUM_CLASSES})"
    )
    args = parser.parse_args(argv)
    if args.smoke and args.emulate:
        fail("--smoke and --emulate exclude each other")
    args.frameworks = tuple(comma_list(args.frameworks, FRAMEWORKS, "--frameworks"))
    if args.emulate:
        args.frameworks = ("ours",)
    if "ours" not in args.frameworks:
        fail(f"--frameworks must include ours, got {','.join(args.frameworks)}")
    if not args.width > 0 or args.num_classes < 2:
        fail(f"--width must be > 0 and --num-classes >= 2, got {args.width} and {args.num_classes}")
    if args.width != 1.0 and "torch" in args.frameworks:
        fail(f"--width {args.width}: PyTorch's twins are built at width 1.0; add --frameworks ours")
    args.models = comma_list(args.models, MODELS, "--models")
    args.methods = comma_list(args.methods, METHODS, "--methods")
    args.precisions = comma_list(args.precisions, PRECISIONS, "--precisions")
    if args.smoke:
        args.batch, args.image, args.warmup, args.steps, args.rounds = 2, 32, 1, 1, 1
        args.profile_steps = min(args.profile_steps, 1)
    if args.batch < 2:
        fail(f"--batch must be at least 2 (batch norm needs two samples), got {args.batch}")
    if args.image < 32:
        fail(f"--image must be at least 32 (the models downsample by 32), got {args.image}")
    if min(args.steps, args.rounds, args.profile_steps) < 1 or args.warmup < 0:
        fail("--steps, --rounds and --profile-steps must be >= 1 and --warmup >= 0")
    configs = [Config(m, k, p) for m in args.models for k in args.methods for p in args.precisions]
    if args.profile == "first":
        args.profile = configs[0].key
    elif args.profile is not None and args.profile not in {c.key for c in configs}:
        fail(
            f"--profile {args.profile!r} is not among the configurations run "
            f"({', '.join(c.key for c in configs)}); write it as MODEL/METHOD/PRECISION"
        )
    args.configs = configs
    if args.out.exists() and args.out.is_dir():
        fail(f"--out {str(args.out)!r} is a directory; give the path of the JSON file")
    return args


def check_devices(smoke: bool, frameworks: tuple[str, ...] = FRAMEWORKS) -> str:
    """The device both frameworks use: "cpu" for --smoke, else "cuda" once CuPy and PyTorch see a GPU."""
    use_torch = "torch" in frameworks
    if use_torch:
        try:
            import torch
        except ImportError as exc:
            fail(f"PyTorch is needed for the side-by-side figures: {exc}; or run --frameworks ours")
    if smoke:
        return "cpu"
    from gpu import runtime

    why = runtime.unavailable_reason()
    if why is not None:
        fail(f"no GPU for our side: {why}; use --smoke to check the script on the CPU")
    if use_torch and not torch.cuda.is_available():
        fail("PyTorch sees no CUDA GPU (a CPU-only build?); use --smoke to check the script on the CPU")
    runtime.require()
    return "cuda"


def versions(device: str, frameworks: tuple[str, ...] = FRAMEWORKS) -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    if "torch" in frameworks:
        import torch

        info.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            torch_cudnn=torch.backends.cudnn.version() if device == "cuda" else None,
            torch_device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        )
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    if "torch" in frameworks:
        try:
            import torchvision

            info["torchvision"] = torchvision.__version__
        except Exception as exc:  # absent, or an install that does not match torch
            info["torchvision"] = f"not usable ({type(exc).__name__}: {exc})"
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        info["ml_dtypes"] = None
    return info


def emulated_device() -> contextlib.AbstractContextManager:
    """The tests' CPU execution mode of the twin, as a context (one clear line if it cannot be imported)."""
    try:
        from tests import emulation
    except ImportError as exc:
        fail(f"--emulate needs the repository root on PYTHONPATH (tests/emulation): {exc}")
    return emulation.device()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with emulated_device() if args.emulate else contextlib.nullcontext():
        return run(args)


def run(args: argparse.Namespace) -> int:
    device = check_devices(args.smoke, args.frameworks)
    settings = Settings(
        device=device, image=args.image, batch=args.batch, warmup=args.warmup, steps=args.steps,
        rounds=args.rounds, profile=args.profile, profile_steps=args.profile_steps,
        cudnn_benchmark=not args.no_cudnn_benchmark, channels_last=args.torch_channels_last,
        frameworks=args.frameworks, width=args.width, num_classes=args.num_classes,
    )  # fmt: skip
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "training throughput and peak memory, CuPy twin vs PyTorch on the same GPU",
        "smoke": args.smoke,
        "emulated": args.emulate,
        "frameworks": list(args.frameworks),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "device": device_record(device),
        "versions": versions(device, args.frameworks),
        "machine": machine_info(),
        "code": source_state(),
        "step": {
            "definition": "forward (training mode), mean softmax cross-entropy (+ method regularization), "
            "zero_grad, backward, SGD update",
            "optimizer": {"name": "SGD", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "data": f"one synthetic batch on the device: standard-normal images, uniform labels over "
            f"{args.num_classes} classes (seed {SEED + 1}); label smoothing 0",
            "weights": f"reference initialisation (seed {SEED}), loaded into PyTorch by name (strict)",
        },
        "timing": {
            "warmup_steps": args.warmup,
            "timed_steps_per_round": args.steps,
            "rounds": args.rounds,
            "order": "per configuration, rounds alternate ours then torch",
            "clock": "time.perf_counter around each step, device synchronised before and after",
            "figure": "images/s = batch / median step of a round; reported: median over rounds",
        },
        "configurations": [],
    }
    print(
        f"{len(args.configs)} configurations on {report['device']['device']}; batch {args.batch}, "
        f"image {args.image}, {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds",
        flush=True,
    )
    failed = False
    for index, config in enumerate(args.configs):
        print(f"[{index + 1}/{len(args.configs)}] {config.key}", flush=True)
        start = time.perf_counter()
        entry = run_with_fallback(config, settings)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        failed = failed or "error" in entry
        report["configurations"].append(entry)
        write_atomic(out, json.dumps(report, indent=2) + "\n")  # partial results survive a crash

    table = markdown_table(report["configurations"])
    report["markdown_table"] = table
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print()
    for entry in report["configurations"]:
        if "profile" in entry:
            print(f"{entry['model']}/{entry['method']}/{entry['precision']} (ours), batch {entry['batch']}:")
            print(profile_table(entry["profile"]))
            print()
    print(table)
    print("(images/s: median over rounds of batch / median step; torch / ours > 1: PyTorch is faster)")
    print(f"wrote {_display(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
