"""Would splitting each op over the batch in threads make the NumPy step faster? A measurement.

Made before the kernels split the batch themselves (``reference/ops/parallel.py``, which this
measurement led to): then the NumPy training step left a core idle, as OpenBLAS's second thread
sped its small GEMMs up little and batch norm, ReLU and the depthwise convs ran on one thread.
For the layer shapes of the two step-time workloads, one block (a conv, batch norm and ReLU,
forward and backward, through the reference's own kernels, with the kernels' own batch parts run
in turn: ``LEARNSPARSE_THREADS=1``) is timed

- **one call**: the whole batch, OpenBLAS on ``--threads`` threads (what the step did then);
- **split**: the batch cut into ``--threads`` equal parts, each run by its own Python thread
  (NumPy releases the GIL inside its loops and BLAS calls), OpenBLAS on one thread;

and reports the ratio. The split blocks compute batch norm over each part alone, so they are a
timing model, not the same arithmetic: a real split would add the parts' float64 sums before
normalising, which costs a few reductions of C numbers per layer.

    python benchmarks/batch_split.py          # seconds; writes results/batch_split_cpu.json and .md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from arguments import positive_int
from environment import code_state, machine_info

from reference.files import write_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "batch_split_cpu.json"
# (name, batch, in channels, out channels, side, kernel, stride, groups): the blocks of the workloads
BLOCKS = (
    ("resnet20 stage 1 conv3x3", 128, 16, 16, 32, 3, 1, 1),
    ("resnet20 stage 2 conv3x3", 128, 32, 32, 16, 3, 1, 1),
    ("resnet20 stage 3 conv3x3", 128, 64, 64, 8, 3, 1, 1),
    ("mobilenet_v1 x0.25 dw3x3 @32", 128, 16, 16, 32, 3, 1, 16),
    ("mobilenet_v1 x0.25 pw1x1 @32", 128, 16, 32, 32, 1, 1, 1),
    ("mobilenet_v1 x0.25 dw3x3 @8", 128, 64, 64, 8, 3, 1, 64),
    ("mobilenet_v1 x0.25 pw1x1 @8", 128, 64, 64, 8, 1, 1, 1),
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--threads", type=positive_int, default=2, help="BLAS threads for one call; parts for the split"
    )
    p.add_argument("--reps", type=positive_int, default=9, help="timed repetitions per median")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def _block(x, w, stride: int, padding: int, groups: int):
    """Conv, batch norm, ReLU forward, then their backward, through the reference's kernels."""
    import numpy as np

    from reference.ops.conv import conv2d_backward, conv2d_forward
    from reference.ops.norm import batch_norm_backward, batch_norm_forward

    y, conv_cache = conv2d_forward(x, w, None, stride, padding, groups)
    channels = y.shape[1]
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    z, norm_cache = batch_norm_forward(y, gamma, beta, None, None, True)
    r = np.maximum(z, 0)
    dz = np.where(r > 0, r, 0).astype(np.float32)  # a cotangent the size of the activation
    dy = batch_norm_backward(dz, norm_cache)[0]
    return conv2d_backward(dy, conv_cache)[:2]


def _split(pool, parts, w, stride: int, padding: int, groups: int) -> list:
    """:func:`_block` on every part of the batch at once, one thread each."""
    return [f.result() for f in [pool.submit(_block, p, w, stride, padding, groups) for p in parts]]


def _median(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import numpy as np
    from threadpoolctl import ThreadpoolController

    from reference.runtime import keep_freed_memory

    keep_freed_memory()  # as learnsparse train does
    os.environ["LEARNSPARSE_THREADS"] = "1"  # the kernels' own parts in turn: only the two ways below thread
    controller = ThreadpoolController()
    pool = ThreadPoolExecutor(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, n, c_in, c_out, side, k, stride, groups in BLOCKS:
        x = rng.standard_normal((n, c_in, side, side), dtype=np.float32)
        w = (rng.standard_normal((c_out, c_in // groups, k, k)) * 0.1).astype(np.float32)
        pad = k // 2
        cut = np.linspace(0, n, args.threads + 1).astype(int)
        parts = [np.ascontiguousarray(x[lo:hi]) for lo, hi in zip(cut[:-1], cut[1:])]
        one_call = functools.partial(_block, x, w, stride, pad, groups)
        split_call = functools.partial(_split, pool, parts, w, stride, pad, groups)
        with controller.limit(limits=args.threads, user_api="blas"):
            whole = _median(one_call, args.reps)
        with controller.limit(limits=1, user_api="blas"):
            split = _median(split_call, args.reps)
        rows.append({"block": name, "one_call_s": whole, "split_s": split, "speedup": whole / split})
        print(
            f"{name:30s} one call {whole * 1e3:7.1f} ms   split {split * 1e3:7.1f} ms   {whole / split:.2f}x"
        )
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "code": code_state(),
        "numpy": np.__version__,
        "blas": [
            {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for info in controller.info()
            if info.get("user_api") == "blas"
        ],
        "threads": args.threads,
        "reps": args.reps,
        "rows": rows,
    }
    lines = [
        "# One call with BLAS threads against the batch split over Python threads",
        "",
        f"{result['date']}, `{result['command']}`, {result['machine']['cpu_model']}, {args.threads} threads, "
        f"median of {args.reps}; conv + batch norm + ReLU, forward and backward, batch 128.",
        "",
        "| block | one call ms | split ms | speed-up |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['block']} | {r['one_call_s'] * 1e3:.1f} | {r['split_s'] * 1e3:.1f} | {r['speedup']:.2f}x |"
            for r in rows
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
