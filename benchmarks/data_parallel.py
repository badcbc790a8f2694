"""Data-parallel training: what the ranks exchange per step, and how fast 1 and 2 ranks train here.

Three parts, one run, one JSON (``results/data_parallel_cpu.json``) and its Markdown twin:

1. **Bytes per step** (no MPI needed). For ResNet-50 and MobileNetV1 at 224x224 with 1000
   classes, dense and with each method, the gradient all-reduce exactly as training plans it:
   the optimizer's parameters (a method's thresholds and masks included) packed into
   :func:`reference.distributed.plan_buckets`' flat buckets, their count and bytes; and, for
   ``--sync-bn``, the batch-norm sums (one (3, C) float64 all-reduce per batch norm in the
   forward, one (2, C) in the backward).
2. **Steps per second on this CPU**. ``mpiexec -n R learnsparse train`` on synthetic images at a
   fixed global batch, for R = 1 and 2, with the cores shared out (threads per rank =
   ``--cores // R``, set through ``OMP_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS``); also one rank
   on one thread, the per-core baseline. The time of an epoch's steps comes from the run's own
   ``metrics.jsonl`` (``train_seconds``); the first epoch is warm-up and is left out.
3. **The all-reduce alone**. ``mpiexec -n 2`` ranks sum the real buckets of each model
   (random gradients) through :meth:`reference.distributed.DataParallel.reduce_gradients`,
   timed; the median of ``--allreduce-runs``.

Then **an estimate, not a measurement**, for 8 GPUs per node: a ring all-reduce moves
``2 (N - 1) / N`` times the bucket bytes through each GPU's link, so its time is that over the
link's bandwidth plus a latency per bucket (the bandwidths and latency are arguments, stated in
the JSON). Training here sums the gradients after the whole backward (no overlap), so with a
single-GPU step time ``t`` the efficiency is ``t / (t + c)``; the table gives ``c`` and the
smallest ``t`` for 90 % efficiency.

    python benchmarks/data_parallel.py                    # all three parts, about 4 minutes on 2 cores
    python benchmarks/data_parallel.py --parts bytes      # part 1 only, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from arguments import name_list, positive_int
from environment import code_state, machine_info, worker_environment

from reference.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "data_parallel_cpu.json"
PARTS = ("bytes", "train", "allreduce")
BIG_MODELS = ("resnet50", "mobilenet_v1")
METHODS = ("dense", "str", "ltp", "scp")
# the CPU workloads of part 2: the step-time benchmark's two
WORKLOADS = {
    "resnet20": ["--model", "resnet20", "--image-size", "32"],
    "mobilenet_v1": ["--model", "mobilenet_v1", "--width", "0.25", "--image-size", "64"],
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    def bandwidth(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive bandwidth in GB/s, got {text!r}")
        return value

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", type=name_list(PARTS), default=list(PARTS))
    p.add_argument(
        "--workloads", type=name_list(tuple(WORKLOADS)), default=list(WORKLOADS), help="part 2's models"
    )
    p.add_argument(
        "--cores", type=positive_int, default=os.cpu_count() or 1, help="cores to share among the ranks"
    )
    p.add_argument("--batch", type=positive_int, default=128, help="global batch of part 2")
    p.add_argument("--steps", type=positive_int, default=8, help="steps per epoch in part 2")
    p.add_argument(
        "--epochs", type=positive_int, default=3, help="epochs per run in part 2 (the first is warm-up)"
    )
    p.add_argument("--allreduce-runs", type=positive_int, default=7)
    p.add_argument(
        "--nvlink-gbs", type=bandwidth, default=360.0, help="intra-node bus bandwidth per GPU, GB/s"
    )
    p.add_argument("--network-gbs", type=bandwidth, default=45.0, help="inter-node bandwidth per GPU, GB/s")
    p.add_argument("--latency-us", type=float, default=20.0, help="per all-reduce call, microseconds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--allreduce-worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--worker-runs", type=positive_int, default=7, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Part 1: bytes per step


def _model_params(model_name: str, method: str, **options: Any):
    """(model, the optimizer's parameters in order) as ``learnsparse train`` builds them."""
    import numpy as np

    from reference.build import build_model_and_method, param_groups
    from reference.config import TrainConfig

    fields = {"model": model_name, "method": method, "num_classes": 1000, "image_size": 224, **options}
    if method in ("str", "ltp"):
        fields["target_sparsity"] = 0.9
    config = TrainConfig(**fields)
    data = SimpleNamespace(x_train=np.zeros((0, 3, 224, 224), np.float32), num_classes=1000)  # shapes only
    model, method_obj = build_model_and_method(config, data)
    params = [p for group in param_groups(model, config, method_obj) for p in group["params"]]
    assert all(np.dtype(p.data.dtype) == np.float32 for p in params)
    return model, params


def bytes_per_step(model_name: str, method: str, **options: Any) -> dict[str, Any]:
    """The gradient buckets and the synchronised batch norms' sums of one training step."""
    from reference.distributed import BUCKET_BYTES, plan_buckets
    from reference.nn.layers import BatchNorm2d

    model, params = _model_params(model_name, method, **options)
    buckets = plan_buckets([p.data.shape for p in params], [p.data.dtype for p in params])
    grad_bytes = sum(b.total * b.dtype.itemsize for b in buckets)
    channels = [m.weight.data.shape[0] for m in model.modules() if isinstance(m, BatchNorm2d)]
    sync_bytes = sum((3 + 2) * c * 8 for c in channels)  # (3, C) forward + (2, C) backward, float64
    return {
        "parameters": sum(int(p.data.size) for p in params),
        "parameter_tensors": len(params),
        "bucket_limit_bytes": BUCKET_BYTES,
        "buckets": len(buckets),
        "bucket_bytes": [b.total * b.dtype.itemsize for b in buckets],
        "gradient_bytes": grad_bytes,
        "batch_norms": len(channels),
        "sync_bn_calls": 2 * len(channels),
        "sync_bn_bytes": sync_bytes,
    }


def ring_estimate(nbytes: int, calls: int, gpus: int, gbs: float, latency_us: float) -> float:
    """Seconds of one ring all-reduce of ``nbytes`` in ``calls`` calls over ``gpus`` GPUs (an estimate)."""
    return 2 * (gpus - 1) / gpus * nbytes / (gbs * 1e9) + calls * latency_us * 1e-6


# ---------------------------------------------------------------------------
# Part 2: learnsparse train under mpiexec


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _environment(threads: int) -> dict[str, str]:
    """A worker's environment (``threads`` per rank, no foreign OpenBLAS kernel), this checkout importable."""
    env = worker_environment(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _train_run(workload: str, ranks: int, threads: int, sync_bn: bool, args: argparse.Namespace) -> dict:
    env = _environment(threads)
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            _mpiexec(), "-n", str(ranks), sys.executable, "-m", "reference.cli", "train",
            *WORKLOADS[workload], "--dataset", "synthetic", "--num-classes", "10",
            "--train-size", str(args.batch * args.steps), "--test-size", str(args.batch),
            "--batch-size", str(args.batch), "--epochs", str(args.epochs), "--seed", "0",
            "--quiet", "--run-dir", str(run_dir), "--sync-bn" if sync_bn else "--no-sync-bn",
        ]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            return {
                "error": (done.stderr or done.stdout).strip().splitlines()[-1:],
                "command": _show(command),
            }
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    seconds = [r["train_seconds"] for r in rows[1:]]  # the first epoch warms up
    per_step = statistics.median(seconds) / args.steps
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "sync_bn": sync_bn,
        "global_batch": args.batch,
        "steps_per_epoch": args.steps,
        "train_seconds_per_epoch": [r["train_seconds"] for r in rows],
        "s_per_step": per_step,
        "steps_per_s": 1 / per_step,
        "images_per_s": args.batch / per_step,
        "final_train_loss": rows[-1]["train_loss"],
        "wall_s": wall,
        "command": _show(command),
    }


def _show(command: list[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in command)


# ---------------------------------------------------------------------------
# Part 3: the all-reduce of the real buckets


def allreduce_worker(model_name: str, runs: int) -> None:
    """Under ``mpiexec -n R``: time the gradient sum of ``model_name``'s buckets; rank 0 prints JSON."""
    import numpy as np

    from reference.distributed import DataParallel, world

    comm = world()
    model, params = _model_params(model_name, "dense")
    rng = np.random.default_rng(comm.rank)
    dp = DataParallel(comm, params)
    times = []
    for _ in range(runs + 1):
        for p in params:
            p.grad = rng.standard_normal(p.data.shape, dtype=np.float32)
        comm.allreduce_(np.zeros(1))  # start together
        t0 = time.perf_counter()
        dp.reduce_gradients(1.0 / comm.size)
        times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "buckets": len(dp.buckets), "times_s": times[1:]}))


def _allreduce_run(model_name: str, args: argparse.Namespace) -> dict:
    env = _environment(1)
    command = [
        _mpiexec(), "-n", "2", sys.executable, str(Path(__file__).resolve()),
        "--allreduce-worker", model_name, "--worker-runs", str(args.allreduce_runs),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "command": _show(command)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["times_s"])
    result["command"] = _show(command)
    return result


# ---------------------------------------------------------------------------
# The report


def _markdown(result: dict) -> str:
    lines = [f"# Data-parallel training on {result['machine'].get('cpu_model', 'this CPU')}", ""]
    if "bytes" in result:
        lines += [
            "## What the ranks exchange per step (224x224, 1000 classes, float32 gradients)",
            "",
            "| model | method | parameters | buckets | gradient MiB | sync-BN calls | sync-BN KiB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for model, methods in result["bytes"].items():
            for method, b in methods.items():
                lines.append(
                    f"| {model} | {method} | {b['parameters']:,} | {b['buckets']} | "
                    f"{b['gradient_bytes'] / 2**20:.1f} | {b['sync_bn_calls']} | {b['sync_bn_bytes'] / 2**10:.0f} |"
                )
        lines.append("")
    if "train" in result:
        lines += [
            f"## Training on this CPU ({result['cores']} cores, global batch {result['train_batch']})",
            "",
            "| workload | ranks x threads | sync BN | s/step | images/s | speed-up over 1x1 |",
            "|---|---|---|---:|---:|---:|",
        ]
        for workload, runs in result["train"].items():
            base = next((r for r in runs if r.get("ranks") == 1 and r.get("threads_per_rank") == 1), None)
            for r in runs:
                if "error" in r:
                    lines.append(f"| {workload} | | | failed: {r['error']} | | |")
                    continue
                speed = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base and "error" not in base else ""
                lines.append(
                    f"| {workload} | {r['ranks']} x {r['threads_per_rank']} | {'yes' if r['sync_bn'] else 'no'} | "
                    f"{r['s_per_step']:.3f} | {r['images_per_s']:.0f} | {speed} |"
                )
        lines.append("")
    if "allreduce" in result:
        lines += ["## The gradient all-reduce alone, 2 ranks over MPI on this machine", ""]
        lines += [
            "| model | buckets | gradient MiB | median s | GB/s of gradient |",
            "|---|---:|---:|---:|---:|",
        ]
        for model, r in result["allreduce"].items():
            if "error" in r:
                lines.append(f"| {model} | failed: {r['error']} | | | |")
                continue
            nbytes = result.get("bytes", {}).get(model, {}).get("dense", {}).get("gradient_bytes")
            mib = f"{nbytes / 2**20:.1f}" if nbytes else ""
            rate = f"{nbytes / r['median_s'] / 1e9:.2f}" if nbytes else ""
            lines.append(f"| {model} | {r['buckets']} | {mib} | {r['median_s']:.3f} | {rate} |")
        lines.append("")
    if "estimate" in result:
        e = result["estimate"]
        lines += [
            "## An estimate for 8 GPUs per node (not a measurement)",
            "",
            f"Ring all-reduce, {e['assumptions']['intra_node_gbs']:g} GB/s per GPU inside a node, "
            f"{e['assumptions']['inter_node_gbs']:g} GB/s per GPU between nodes, "
            f"{e['assumptions']['latency_us']:g} us per call; no overlap with the backward.",
            "",
            "| model | GPUs | gradient all-reduce ms | with --sync-bn ms | step for 90 % efficiency ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in e["rows"]:
            lines.append(
                f"| {row['model']} | {row['gpus']} | {row['gradient_ms']:.2f} | {row['with_sync_bn_ms']:.2f} | "
                f"{row['min_step_ms_for_90pct']:.0f} |"
            )
        lines.append("")
    lines.append(f"Command: `{result['command']}`; commit {result['code'].get('git_commit', '?')[:7]}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker, args.worker_runs)
        return 0
    needs_mpi = {"train", "allreduce"} & set(args.parts)
    if needs_mpi and _mpiexec() is None:
        print("data_parallel: no mpiexec beside Python or on PATH (pip install '.[mpi]')", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _show([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "code": code_state(),
        "cores": args.cores,
    }
    if "bytes" in args.parts:
        result["bytes"] = {}
        for model in BIG_MODELS:
            result["bytes"][model] = {}
            for method in METHODS:
                b = bytes_per_step(model, method)
                result["bytes"][model][method] = b
                print(
                    f"{model:13s} {method:6s} {b['gradient_bytes'] / 2**20:7.1f} MiB in {b['buckets']} buckets; "
                    f"sync BN {b['sync_bn_calls']} calls, {b['sync_bn_bytes'] / 2**10:.0f} KiB",
                    flush=True,
                )
        a = {
            "intra_node_gbs": args.nvlink_gbs,
            "inter_node_gbs": args.network_gbs,
            "latency_us": args.latency_us,
        }
        rows = []
        for model in BIG_MODELS:
            b = result["bytes"][model]["dense"]
            for gpus, gbs in ((8, args.nvlink_gbs), (16, args.network_gbs), (64, args.network_gbs)):
                grad = ring_estimate(b["gradient_bytes"], b["buckets"], gpus, gbs, args.latency_us)
                sync = ring_estimate(b["sync_bn_bytes"], b["sync_bn_calls"], gpus, gbs, args.latency_us)
                rows.append(
                    {
                        "model": model,
                        "gpus": gpus,
                        "gradient_ms": grad * 1e3,
                        "with_sync_bn_ms": (grad + sync) * 1e3,
                        "min_step_ms_for_90pct": 9 * grad * 1e3,  # t / (t + c) >= 0.9  <=>  t >= 9 c
                    }
                )
        result["estimate"] = {"assumptions": a, "rows": rows, "note": "an estimate from bytes and bandwidth"}
    if "train" in args.parts:
        result["train_batch"] = args.batch
        result["train"] = {}
        plans = [(1, 1, False), (1, args.cores, False), (2, max(1, args.cores // 2), False)]
        plans.append((2, max(1, args.cores // 2), True))
        for workload in args.workloads:
            result["train"][workload] = []
            for ranks, threads, sync in plans:
                r = _train_run(workload, ranks, threads, sync, args)
                result["train"][workload].append(r)
                shown = r.get("error") or f"{r['s_per_step']:.3f} s/step, {r['images_per_s']:.0f} images/s"
                print(
                    f"{workload:13s} {ranks} rank(s) x {threads} thread(s) sync_bn={sync}: {shown}",
                    flush=True,
                )
    if "allreduce" in args.parts:
        result["allreduce"] = {}
        for model in BIG_MODELS:
            r = _allreduce_run(model, args)
            result["allreduce"][model] = r
            shown = r.get("error") or f"{r['median_s']:.3f} s median over {len(r['times_s'])}"
            print(f"{model:13s} gradient all-reduce on 2 ranks: {shown}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), _markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    failed = any("error" in r for runs in result.get("train", {}).values() for r in runs)
    failed |= any("error" in r for r in result.get("allreduce", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
