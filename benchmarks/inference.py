"""Inference speed on the CPU: what sparsity buys, in ONNX Runtime, PyTorch and our NumPy eval.

Rows (``--models``, ``--variants``), every model with 1000 classes at 224x224:

- ``resnet50``: ResNet-50 v1.5; ``mobilenet_v1``: MobileNetV1 at width 1;
- ``dense``: random weights (speed does not depend on training);
- ``str90`` / ``str95``: the same weights pruned by magnitude to STR's published
  per-layer budgets (``reference/budgets/str_resnet50.csv``, columns 90.23 and
  95.03) for ResNet-50, and to a uniform 90 % / 95 % in every layer for
  MobileNetV1 (no published budget is bundled for it), then finalized: the
  graph holds ``W_eff`` with exact zeros, stored and computed dense;
- ``scp``: SCP's slimmed network: channel masks switch off half the channels of
  every prunable group, the same channels in each BN of a group (the residual
  stream of a ResNet is not prunable), and
  ``reference.finalize.finalize`` removes them: fewer channels, smaller convs.

Engines (``--engines``), each in evaluation mode on the same float32 batch:
``onnxruntime`` (the graph ``learnsparse export`` writes, CPU provider, all
graph optimisations), ``torch`` (the PyTorch twins of ``torch_models.py`` with
our weights loaded by name, ``torch.inference_mode``) and ``numpy`` (our
reference forward under ``no_grad``). Latency is the median wall time of one
image (batch 1); throughput is the batch size over the median wall time of one
batch of ``--batch`` (32) images; each median is over ``--runs`` runs
(``--numpy-runs`` for the slow NumPy forward) after one warm-up run. The runs
go in rounds, each round timing every engine once in turn, so that the load of
a shared machine falls on all engines alike. All
engines use ``--threads`` threads (BLAS, ONNX Runtime intra-op, PyTorch),
set before any of them is imported. Before timing, each engine's logits are
compared with ONNX Runtime's on the batch-1 input.

The CSR row (``--csr``, ResNet-50 only): every conv of ResNet-50 at batch 1 as
a matrix product ``W (out, in*kh*kw) @ columns (in*kh*kw, positions)``, the
im2col columns of a random input of the layer's shape. Dense: NumPy's BLAS
GEMM (``--threads`` threads). Sparse: the weight as a ``scipy.sparse`` CSR
matrix at densities ``--densities`` times the same columns (scipy's CSR
product is single-threaded). Per layer: both times, the density below which
CSR is faster (from a least-squares line of CSR time against density), and the
times at the layer's own density under each STR budget. The im2col itself is
common to both and not timed. These are single-kernel timings, so each is the
fastest of ``--runs`` runs (the least disturbed by other work on the machine),
not the median.

Usage (from the repository root)::

    python benchmarks/inference.py [--models resnet50,mobilenet_v1] [--variants dense,str90,str95,scp]
        [--engines onnxruntime,torch,numpy] [--runs 5] [--numpy-runs 3] [--batch 32] [--threads 2]
        [--image 224] [--no-csr] [--out benchmarks/results/inference_cpu.json]

A quick check of the script: ``--models mobilenet_v1 --variants dense,scp --runs 2 --numpy-runs 1
--batch 4 --image 64 --no-csr --out /tmp/inference.json``. The JSON and a Markdown table beside it
(same name, ``.md``) are written atomically; ``--markdown-from RESULTS.json`` rewrites only the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from arguments import name_list, positive_int
from environment import THREAD_VARIABLES, code_state, machine_info

from reference.files import write_atomic  # standard library only: NumPy is imported after the threads are set

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("resnet50", "mobilenet_v1")
VARIANTS = ("dense", "str90", "str95", "scp")
ENGINES = ("onnxruntime", "torch", "numpy")
STR_COLUMNS = {"str90": "90.23", "str95": "95.03"}  # columns of reference/budgets/str_resnet50.csv
UNIFORM = {"str90": 0.90, "str95": 0.95}  # MobileNetV1: the same sparsity in every layer
SCP_KEEP = 0.5  # fraction of each prunable group's channels that SCP keeps here
DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01)
SEED = 0
NUM_CLASSES = 1000
AGREE_RTOL = 1e-3  # engines vs ONNX Runtime on the batch-1 logits, relative to their largest magnitude


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=name_list(MODELS), default=list(MODELS))
    p.add_argument("--variants", type=name_list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--engines", type=name_list(ENGINES), default=list(ENGINES))
    p.add_argument(
        "--runs", type=positive_int, default=5, help="timed runs per median (ONNX Runtime, PyTorch)"
    )
    p.add_argument("--numpy-runs", type=positive_int, default=3, help="timed runs per median (NumPy)")
    p.add_argument("--batch", type=positive_int, default=32, help="the throughput batch")
    p.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--image", type=positive_int, default=224, help="input side")
    p.add_argument("--csr", action=argparse.BooleanOptionalAction, default=True, help="the CSR row")
    p.add_argument("--densities", type=lambda t: [float(x) for x in t.split(",")], default=list(DENSITIES))
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "inference_cpu.json")
    p.add_argument(
        "--markdown-from", type=Path, metavar="JSON", help="only rewrite the .md table of a results JSON"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# The models


def _build(name: str, variant: str, image: int):
    """Our model ``name`` in ``variant``, finalized (plain weights), in evaluation mode."""
    import numpy as np

    from reference.config import TrainConfig
    from reference.finalize import finalize
    from reference.models import build_model
    from reference.nn import BatchNorm2d, weight_layers
    from reference.sparsity import build_method
    from reference.sparsity.budgets import STR_RESNET50, read_budget_csv
    from reference.sparsity.magnitude import keep_count

    rng = np.random.default_rng(SEED)
    net = build_model(name, num_classes=NUM_CLASSES, in_channels=3, rng=rng)
    if variant == "scp":
        build_method(TrainConfig(model=name, method="scp")).attach(net)
    for m in net.modules():  # plausible evaluation statistics
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.running_mean[...] = rng.normal(0, 0.1, c)
            m.running_var[...] = rng.uniform(0.5, 2.0, c)
            m.weight.data[...] = rng.uniform(0.5, 1.5, c)
            m.bias.data[...] = rng.normal(0, 0.1, c)
    if variant == "scp":  # switch off the same channels in every BN of a group (a large negative shift)
        for group in net.channel_groups():
            c = group.bn.num_features
            off = rng.permutation(c)[: c - max(1, round(SCP_KEEP * c))]
            for bn in (group.bn, group.depthwise_bn):
                if bn is not None and bn.channel_mask is not None:
                    bn.bias.data[off] = -4.0
    if variant in STR_COLUMNS:
        if name == "resnet50":
            budget = read_budget_csv(STR_RESNET50, STR_COLUMNS[variant])
        else:
            budget = {layer: UNIFORM[variant] for layer, _ in weight_layers(net)}
        for layer_name, layer in weight_layers(net):
            w = layer.weight.data
            k = keep_count(w.size, budget[layer_name])
            cut = np.partition(np.abs(w).ravel(), w.size - k)[w.size - k]  # the k-th largest magnitude
            w[np.abs(w) < cut] = 0.0
    summary = finalize(net)
    return net, summary


def _macs(net, image: int) -> dict[str, int]:
    from reference.accounting import profile, totals

    t = totals(profile(net, (1, 3, image, image)))
    return {"macs": int(t.dense_macs), "nonzero_macs": int(t.sparse_macs)}


def _torch_twin(name: str, state: dict):
    """The PyTorch twin of ``name`` with ``state`` loaded; shapes follow the state (slimmed SCP)."""
    import torch
    from torch import nn
    from torch_models import MobileNetV1, ResNet50

    twin = ResNet50(NUM_CLASSES) if name == "resnet50" else MobileNetV1(NUM_CLASSES, 1.0)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    for key, value in tensors.items():  # give each parameter and buffer the state's shape
        module_name, _, attr = key.rpartition(".")
        module = twin.get_submodule(module_name)
        getattr(module, attr).data = value
    for module in twin.modules():
        if isinstance(module, nn.Conv2d):
            out_c, in_per_group = module.weight.shape[:2]
            module.out_channels = out_c
            module.groups = out_c if module.groups > 1 else 1  # depthwise stays depthwise
            module.in_channels = in_per_group * module.groups
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = module.weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.in_features = module.weight.shape[1]
    twin.load_state_dict(tensors, strict=True)
    return twin.float().eval()


# ---------------------------------------------------------------------------
# Timing


def _median_time(fn, runs: int, warmup: int = 1) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 6) for t in times],
    }


def _engines(name: str, net, summary, args) -> dict[str, Any]:
    """Time every engine on this model; returns one record per engine."""
    import numpy as np
    import onnxruntime as ort

    from reference.autodiff import Tensor, no_grad
    from reference.onnx_export import build_onnx

    rng = np.random.default_rng(SEED + 1)
    x1 = rng.standard_normal((1, 3, args.image, args.image)).astype(np.float32)
    xb = rng.standard_normal((args.batch, 3, args.image, args.image)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = build_onnx(net, (3, args.image, args.image)).SerializeToString()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    reference_logits = session.run(None, {"input": x1})[0]

    def run_ort(x):
        return lambda: session.run(None, {"input": x})[0]

    runners: dict[str, Any] = {"onnxruntime": run_ort}
    if "torch" in args.engines:
        import torch

        twin = _torch_twin(name, net.state_dict())

        def run_torch(x):
            xt = torch.from_numpy(x)

            def go():
                with torch.inference_mode():
                    return twin(xt).numpy()

            return go

        runners["torch"] = run_torch
    if "numpy" in args.engines:

        def run_numpy(x):
            def go():
                with no_grad():
                    return np.asarray(net(Tensor(x)).numpy())

            return go

        runners["numpy"] = run_numpy
    # warm-up and agreement first; then rounds that time every engine in turn, so that the load of a
    # shared machine falls on all of them alike
    calls: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for engine in args.engines:
        one, many = runners[engine](x1), runners[engine](xb)
        logits = one()
        many()
        scale = float(np.abs(reference_logits).max())
        agreement = float(np.abs(logits - reference_logits).max()) / scale
        if agreement > AGREE_RTOL:
            raise SystemExit(f"{name}: {engine} disagrees with ONNX Runtime by {agreement:.3g} relative")
        calls[engine] = {"one": one, "many": many, "times_one": [], "times_many": []}
        out[engine] = {"max_relative_difference_to_onnxruntime": agreement}
    for round_index in range(max(args.runs, args.numpy_runs)):
        for engine, c in calls.items():
            if round_index >= (args.numpy_runs if engine == "numpy" else args.runs):
                continue
            for kind in ("one", "many"):
                c[f"times_{kind}"].append(_median_time(c[kind], 1, warmup=0)["median_s"])
    for engine, c in calls.items():
        one, many = statistics.median(c["times_one"]), statistics.median(c["times_many"])
        out[engine].update(
            {
                "latency_ms_batch1": round(1e3 * one, 3),
                "throughput_img_s": round(args.batch / many, 2),
                "runs": len(c["times_one"]),
                "batch1_times_s": [round(t, 6) for t in c["times_one"]],
                "batch_times_s": [round(t, 6) for t in c["times_many"]],
            }
        )
        print(
            f"  {engine:12s} latency {out[engine]['latency_ms_batch1']:9.2f} ms   "
            f"throughput {out[engine]['throughput_img_s']:8.2f} img/s",
            flush=True,
        )
    out["onnx_bytes"] = len(graph)
    return out


# ---------------------------------------------------------------------------
# The CSR row


def _im2col(x, kh: int, kw: int, stride: int, padding: int):
    """(1, C, H, W) -> (C*kh*kw, Ho*Wo): the columns a conv's weight (O, C*kh*kw) multiplies."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    xp = np.pad(x[0], ((0, 0), (padding, padding), (padding, padding)))
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (C, Ho, Wo, kh, kw)
    c, ho, wo = win.shape[:3]
    return np.ascontiguousarray(
        win.transpose(0, 3, 4, 1, 2).reshape(c * kh * kw, ho * wo)
    )  # -> (C*kh*kw, Ho*Wo)


def _csr_row(args) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp

    from reference.models import build_model
    from reference.nn import Conv2d, weight_layers
    from reference.sparsity.budgets import STR_RESNET50, read_budget_csv

    net = build_model("resnet50", num_classes=NUM_CLASSES, rng=np.random.default_rng(SEED))
    shapes: dict[int, tuple] = {}
    net.trace((1, 3, args.image, args.image), lambda layer, i, o: shapes.setdefault(id(layer), (i, o)))
    budgets = {v: read_budget_csv(STR_RESNET50, c) for v, c in STR_COLUMNS.items()}
    rng = np.random.default_rng(SEED + 2)
    rows = []
    for name, layer in weight_layers(net):
        if not isinstance(layer, Conv2d):
            continue
        (_, c, h, w), _ = shapes[id(layer)]
        x = np.abs(rng.standard_normal((1, c, h, w))).astype(np.float32)  # post-ReLU-like input
        cols = _im2col(x, *layer.kernel_size, layer.stride[0], layer.padding[0])
        weight = layer.weight.numpy().reshape(layer.out_channels, -1)  # (O, C, kh, kw) -> (O, C*kh*kw)
        dense = _median_time(lambda w=weight, c=cols: w @ c, args.runs)["min_s"]

        def csr_time(density: float, weight=weight, cols=cols) -> float:
            mask = rng.random(weight.shape) < density
            matrix = sp.csr_matrix(np.where(mask, weight, 0).astype(np.float32))
            return _median_time(lambda: matrix @ cols, args.runs)["min_s"]

        sweep = {d: csr_time(d) for d in args.densities}
        slope, intercept = np.polyfit(list(sweep), list(sweep.values()), 1)  # CSR time ~ a + b * density
        break_even = float(np.clip((dense - intercept) / slope, 0.0, 1.0)) if slope > 0 else None
        record = {
            "layer": name,
            "weight": list(layer.weight.shape),
            "columns": list(cols.shape),
            "dense_ms": round(1e3 * dense, 4),
            "csr_ms": {str(d): round(1e3 * t, 4) for d, t in sweep.items()},
            "break_even_density": None if break_even is None else round(break_even, 4),
        }
        for variant, budget in budgets.items():
            density = 1.0 - budget[name]
            t = csr_time(density)
            record[variant] = {
                "density": round(density, 4),
                "csr_ms": round(1e3 * t, 4),
                "speedup": dense / t,
            }
        rows.append(record)
        print(
            f"  {name:24s} dense {record['dense_ms']:8.3f} ms  break-even density "
            f"{record['break_even_density']}",
            flush=True,
        )
    total = {"dense_ms": round(sum(r["dense_ms"] for r in rows), 3)}
    for variant in budgets:
        csr_total = sum(r[variant]["csr_ms"] for r in rows)
        best = sum(min(r["dense_ms"], r[variant]["csr_ms"]) for r in rows)  # CSR only where it wins
        total[variant] = {
            "csr_ms": round(csr_total, 3),
            "speedup": total["dense_ms"] / csr_total,
            "csr_where_faster_ms": round(best, 3),
            "csr_where_faster_speedup": total["dense_ms"] / best,
        }
    return {
        "what": (
            "each ResNet-50 conv at batch 1 as W @ im2col columns: dense BLAS GEMM against a scipy.sparse "
            "CSR weight at each density; im2col not timed; CSR single-threaded"
        ),
        "layers": rows,
        "total": total,
    }


# ---------------------------------------------------------------------------
# Recording


def _versions(threads: int) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime
    import scipy

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas_build"] = {k: blas.get(k) for k in ("name", "version")}
    except Exception as exc:  # the layout of show_config differs between NumPy versions
        info["numpy_blas_build"] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    info["threads"] = threads
    info["thread_variables"] = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    return info


def machine_state(machine: dict[str, Any]) -> str:
    """One sentence on how busy the machine was when the run started, from its load average."""
    cores = machine["cores_available_to_process"]
    loads = machine["load_average_at_start"]
    shown = f"load average {', '.join(f'{v:.1f}' for v in loads)} over 1, 5 and 15 minutes at the start"
    if max(loads) > cores:  # more runnable work than cores: other jobs took turns on ours
        return (
            f"**The machine was shared and busy** ({shown}, on {cores} cores), so the numbers are noisy; "
            "the ratios between rows of one run mean more than the absolute values."
        )
    return f"The machine was otherwise quiet ({shown}, on {cores} cores)."


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Inference on the CPU: dense, STR and SCP in ONNX Runtime, PyTorch and NumPy",
        "",
        f"Measured {result['date']} with `{result['command']}` on {result['machine']['cpu_model']} "
        f"({result['machine']['cores_available_to_process']} cores; threads: {result['versions']['threads']} "
        f"for every engine). {machine_state(result['machine'])}",
        "",
        f"Latency: median ms for one image; throughput: images/s at batch {result['batch']} "
        f"({result['image']}x{result['image']}, 1000 classes).",
        "",
        "| model | variant | nonzero weights | MACs/img (G) | ONNX Runtime ms | img/s | PyTorch ms | img/s "
        "| NumPy ms | img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cells = [
            row["model"],
            row["variant"],
            f"{row['nonzeros']:,} / {row['weights']:,}",
            f"{row['macs'] / 1e9:.2f}",
        ]
        for engine in ENGINES:
            e = row["engines"].get(engine)
            cells += (
                ["-", "-"] if e is None else [f"{e['latency_ms_batch1']:.1f}", f"{e['throughput_img_s']:.1f}"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    agreement = max(
        e["max_relative_difference_to_onnxruntime"]
        for row in result["rows"]
        for e in row["engines"].values()
        if isinstance(e, dict)
    )
    lines += [
        "",
        "The same, from the fastest run of each instead of the median (the run least disturbed by any "
        "other work):",
        "",
        "| model | variant | ONNX Runtime ms | img/s | PyTorch ms | img/s | NumPy ms | img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cells = [row["model"], row["variant"]]
        for engine in ENGINES:
            e = row["engines"].get(engine)
            if e is None:
                cells += ["-", "-"]
            else:
                best_one, best_batch = min(e["batch1_times_s"]), min(e["batch_times_s"])
                cells += [f"{1e3 * best_one:.1f}", f"{result['batch'] / best_batch:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Every engine's batch-1 logits agreed with ONNX Runtime's within {agreement:.1e} relative. STR's rows "
        "have the dense rows' MACs: their zeros are stored and multiplied like any other weight, so any "
        "difference between them and the dense row within one engine is the machine's noise.",
    ]
    csr = result.get("csr")
    if csr:
        t = csr["total"]
        be = sorted(r["break_even_density"] for r in csr["layers"] if r["break_even_density"] is not None)
        best = {  # CSR only in the layers where it wins at the budget, dense elsewhere
            v: sum(min(r["dense_ms"], r[v]["csr_ms"]) for r in csr["layers"]) for v in STR_COLUMNS
        }
        lines += [
            "",
            "CSR (scipy.sparse, one thread) against dense GEMM (BLAS), every ResNet-50 conv at batch 1, "
            "im2col excluded, fastest of the runs: total dense "
            f"{t['dense_ms']:.1f} ms; CSR at STR's 90 % budget {t['str90']['csr_ms']:.1f} ms "
            f"({t['str90']['speedup']:.2f}x), at the 95 % budget {t['str95']['csr_ms']:.1f} ms "
            f"({t['str95']['speedup']:.2f}x). Using CSR only in the layers where it wins at the budget "
            f"(dense elsewhere): {best['str90']:.1f} ms ({t['dense_ms'] / best['str90']:.2f}x) and "
            f"{best['str95']:.1f} ms ({t['dense_ms'] / best['str95']:.2f}x). "
            "Per layer, CSR is faster below a density of "
            f"{be[0]:.3f} to {be[-1]:.3f} (median {statistics.median(be):.3f}).",
            "",
            "| layer | weight | dense ms | break-even density | 90 %: density, CSR ms | 95 %: density, CSR ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in csr["layers"]:
            lines.append(
                f"| {r['layer']} | {'x'.join(map(str, r['weight']))} | {r['dense_ms']:.2f} | "
                f"{r['break_even_density']} | {r['str90']['density']:.3f}, {r['str90']['csr_ms']:.2f} | "
                f"{r['str95']['density']:.3f}, {r['str95']['csr_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.markdown_from is not None:
        result = json.loads(args.markdown_from.read_text())
        write_atomic(args.markdown_from.with_suffix(".md"), _markdown(result))
        print(f"wrote {args.markdown_from.with_suffix('.md')}")
        return 0
    for variable in THREAD_VARIABLES:  # before NumPy, ONNX Runtime or PyTorch is imported
        os.environ[variable] = str(args.threads)
    if "torch" in args.engines:
        import torch

        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    rows = []
    for name in args.models:
        for variant in args.variants:
            print(f"{name} {variant}", flush=True)
            net, summary = _build(name, variant, args.image)
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "weights": summary.weights,
                    "nonzeros": summary.nonzeros,
                    "sparsity": round(summary.sparsity, 4),
                    **_macs(net, args.image),
                    "engines": _engines(name, net, summary, args),
                }
            )
    result: dict[str, Any] = {
        "benchmark": "inference latency and throughput on the CPU: ONNX Runtime, PyTorch, NumPy",
        "date": started,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "machine": machine,
        "versions": _versions(args.threads),
        "code": code_state(),
        "image": args.image,
        "batch": args.batch,
        "settings": {
            "str_budgets": {"resnet50": STR_COLUMNS, "mobilenet_v1": UNIFORM},
            "scp_keep_fraction": SCP_KEEP,
            "weights": "random (seed 0); speed does not depend on training",
            "timing": (
                "median of runs after one warm-up, in rounds over the engines; "
                "latency at batch 1, throughput at the batch"
            ),
        },
        "rows": rows,
    }
    if args.csr and "resnet50" in args.models:
        print("CSR row (resnet50 convs, batch 1)", flush=True)
        result["csr"] = _csr_row(args)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), _markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
