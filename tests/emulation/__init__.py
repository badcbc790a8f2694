"""A CPU execution mode for the GPU twin: CuPy and CUDA emulated on the host, for tests.

``with emulation.device() as cupy:`` installs a stand-in ``cupy`` package for
the length of the block (nothing is installed at import time). Inside it, the
twin (``gpu``) runs unchanged: device arrays are NumPy buffers in registered
host memory that refuse implicit conversion as CuPy's do; every kernel of
``gpu/kernels.py`` (ElementwiseKernel and ReductionKernel wrapped as CuPy wraps
them, RawModule sources as written) is compiled with g++ against
``cuda_host.h``, a header of the CUDA built-ins, and launched over its grid;
``cublasGemmEx``/``cublasGemmStridedBatchedEx`` run in NumPy under their
column-major contract; ``gpu.available()`` is true. On exit everything is put
back as it was (the real CuPy and ``gpu`` modules where there are any).

What it can show
    - index arithmetic: every thread's indices, grid-stride loops, strides, the
      flat/multi-index mapping of CuPy's generated kernels;
    - bounds: grid and block limits, the count, kind and dtype of every kernel
      argument against the compiled signature, pointers into live allocations,
      any read or write past the end of an array (every allocation ends at a
      guard page; the fault becomes the launch's error, naming the array),
      unwritten output (fresh memory is poisoned: NaN, not zero), and for
      cuBLAS the (ld, rows, cols, stride, batch) footprint of each matrix inside
      its allocation, ``ld`` minima and C aliasing an operand;
    - reduction logic: CuPy's block reduction, shared-memory trees, partial
      sums across blocks, identities and post-maps, over the axes CuPy reduces;
    - barrier placement, as far as the schedule can expose it: threads of a
      block run as fibers that switch only at barriers and warp collectives,
      so a missing ``__syncthreads`` lets a thread read shared memory before
      another has written it (try ``settings.thread_order("reverse")`` or
      ``"shuffled"`` for other interleavings), a barrier some threads skip is a
      reported deadlock, and a shuffle reading an exited lane is an error;
    - argument order and types of kernels and of the cuBLAS calls
      (transposes, leading dimensions, strides, compute and data types,
      pointer mode), and TF32/bfloat16 operand rounding;
    - host reads of device arrays (:func:`no_host_reads`, :func:`host_reads`).

What it cannot show
    - races between real warps: threads interleave only at barriers, so a
      race that needs two threads to run at once, or warp-synchronous code
      without ``__syncwarp``, is invisible; accesses before the start of an
      array, or into another live array, are not caught;
    - the GPU memory model (visibility, fences, caches, atomics' contention);
    - timing and speed: launches are synchronous, events read host time;
    - any CuPy behaviour it imitates rather than runs (CuPy's own functions
      are NumPy here; its CUB reduction path is not emulated; elementwise
      kernels run on one thread since their elements are independent);
    - NVRTC-versus-g++ differences: the language accepted, fused
      multiply-adds, the exact ulps of ``exp``/``log``/``normcdf``, 32-bit
      ``long`` on the device (use ``long long``), device-only intrinsics not in
      the header.

Each real GPU run compares its verdicts with the device's: the agreement and
whole-model tests run once on the device and once here, so a test that passes
here and fails there (or the reverse) points at one of the limits above.

Execution of the threads of a block. A module whose source has no barrier,
shuffle or shared memory runs each block's threads in a plain loop (and an
elementwise kernel runs its grid-stride loop on one thread). Any other module
runs each block's threads as fibers: one stack each, a hand-written x86-64
context switch, a thread handing over directly to the next ready one when it
waits, one warp barrier per shuffle. Measured (CPU time, 2 shared cores): a
CuPy reduction of a (300, 700) array over axis 0 (700 blocks of 512 threads,
11 barriers each) takes 0.09 s, 0.24 us a thread; batch norm's statistics of a
(2, 512, 4, 4) array (512 blocks of 256 threads, two block sums of shuffles and
barriers) 0.055 s, 0.4 us a thread, about 4x less than with a scheduler fiber
in between and two barriers per shuffle. OS threads were not built: each
barrier crossing would be a kernel futex wake-up per thread. Blocks run one
after another. On 2 cores the emulated agreement tests take about 7 s with the
kernels cached (20-25 s compiling them first), the eight emulated model runs
30-45 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.emulation import settings
from tests.emulation.build import CompileError, EmulationError, cache_dir
from tests.emulation.hostreads import HostRead, Read, host_reads, no_host_reads

__all__ = [
    "CompileError",
    "EmulationError",
    "HostRead",
    "Read",
    "cache_dir",
    "device",
    "host_reads",
    "no_host_reads",
    "precompile",
    "settings",
]


@contextlib.contextmanager
def device() -> Iterator[object]:
    """Run the block with the emulated GPU; yields the stand-in ``cupy`` module."""
    from tests.emulation.standin import installed

    with installed() as cupy:
        yield cupy


_precompiled = {"done": False}


def precompile() -> int:
    """Compile every raw kernel of ``gpu`` for float and double in parallel (inside :func:`device`).

    Returns how many modules were built or found in the cache (0 when an earlier
    call in this process did it). Elementwise and reduction kernels compile on
    first use (their types depend on the call).
    """
    if _precompiled["done"]:
        return 0
    import importlib
    import string

    from tests.emulation.build import load_many
    from tests.emulation.kernels import raw_source

    importlib.import_module("gpu.ops")
    importlib.import_module("gpu.optim")
    registry = importlib.import_module("gpu.kernels").REGISTRY
    jobs = []
    for spec in registry.values():
        if spec.kind == "raw":
            for t in ("float", "double"):
                source, names = raw_source(string.Template(spec.source).substitute(T=t))
                jobs.append((source, names[0]))
    count = len(load_many(jobs))
    _precompiled["done"] = True
    return count
