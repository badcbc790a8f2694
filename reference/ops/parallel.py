"""One op's work cut along the batch axis and run on several cores at once.

A training step's large kernels (convolution, batch norm, ReLU, add) treat the ``N``
samples of a batch alike, so each can run on parts of the batch side by side:
the parts' outputs are rows of the output, and a gradient summed over the
batch (a weight's, a per-channel statistic) is the sum of the parts' sums.
On a small CPU this beats leaving the threading to BLAS: OpenBLAS's threads
speed the small GEMMs of these networks up little and everything between the
GEMMs (padding, gathers, batch norm, ReLU, the depthwise loops) runs on one
core, while NumPy releases the interpreter lock inside all of them, so Python
threads on separate parts keep every core busy. Inside a parallel region BLAS
is held to one thread (each part's GEMM runs on the thread that calls it).

Two rules keep the arithmetic the reader sees unchanged:

- **The cut depends on the shapes alone** (:func:`batch_parts`: the batch
  size, and whether the op is large enough to gain), never on the number of
  threads: the same parts are computed, and their partial sums added in the
  same order, on one thread or eight, so the results are the same bits
  whatever ``LEARNSPARSE_THREADS`` says.
- **A part is computed by the same code as a whole batch**: the kernels call
  their one-batch functions on each part; nothing here knows any equation.

Threads: ``LEARNSPARSE_THREADS`` if set (a positive integer), else
``OMP_NUM_THREADS`` if set (so ``OMP_NUM_THREADS=1 mpiexec -n 2 ...`` runs
each rank on one thread), else the cores this process may run on. With one
thread the parts run in turn on the calling thread and BLAS is left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from reference.errors import ConfigError

__all__ = ["batch_parts", "threads", "run_parts", "sum_in_order"]

T = TypeVar("T")

MIN_ROWS = 16  # no part smaller than this many samples: below it a part's GEMMs get too thin to pay
MAX_PARTS = 4  # at most this many parts; batch 128 -> four parts of 32
# Handing parts to another thread costs about 80 microseconds a region on the benchmark
# machine; an op smaller than these is not cut (see batch_parts).
MIN_ELEMENTS = 1 << 18  # entries of an op's arrays (a convolution: its input and output)
MIN_MACS = 1 << 24  # a convolution's multiply-adds

_local = threading.local()  # .inside: this thread is running a part (a nested call runs in turn)
_busy = threading.Lock()  # held by the region using the helpers; another thread's region runs in turn
_helpers: list[_Helper] = []  # started on first use, one per thread beyond the caller's
_blas = None  # threadpoolctl's controller, found on first use


def batch_parts(n: int, *, elements: int | None = None, macs: int | None = None) -> list[slice]:
    """The rows ``0 .. n`` cut into equal parts (sizes differ by at most one), in order.

    ``min(MAX_PARTS, n // MIN_ROWS)`` parts, at least one; a single part when the op is small
    by every size given (``elements``, the entries of its arrays, under MIN_ELEMENTS;
    ``macs``, a convolution's multiply-adds, under MIN_MACS): such an op runs as one call on
    the calling thread, since cutting it and waking threads would cost more than it saves.
    A function of the shapes only, never of the thread count.
    """
    small = (elements is not None or macs is not None) and (
        (elements is None or elements < MIN_ELEMENTS) and (macs is None or macs < MIN_MACS)
    )
    count = 1 if small else max(1, min(MAX_PARTS, n // MIN_ROWS))
    if count == 1:
        return [slice(0, n)]
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def sum_in_order(parts: list) -> Any:
    """The parts' partial sums added left to right: the same order, so the same bits, on any
    thread count. None when the parts computed none."""
    if parts[0] is None:
        return None
    total = parts[0]
    for term in parts[1:]:
        total = total + term
    return total


def threads() -> int:
    """How many threads a parallel region may use (see the module docstring for the order).

    ``LEARNSPARSE_THREADS`` must be a positive integer (else a ConfigError naming it).
    ``OMP_NUM_THREADS`` is read as OpenMP reads it, the first of a comma-separated list;
    a value that is not a positive integer is passed over, as OpenBLAS does.
    """
    text = os.environ.get("LEARNSPARSE_THREADS", "").strip()
    if text:
        value = _positive(text)
        if value is None:
            raise ConfigError(
                f"LEARNSPARSE_THREADS={text!r}: expected a positive integer (threads per process)"
            )
        return value
    value = _positive(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    if value is not None:
        return value
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 1 else None


class _Helper:
    """A thread that runs one lane of a region at a time, handed over through a queue.

    Waking a helper and being woken by it costs about 80 microseconds a region
    on the benchmark machine; a training step opens a few hundred regions.
    """

    def __init__(self, number: int) -> None:
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        name = f"learnsparse-part-{number}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            context, lane_args = self.inbox.get()
            try:
                context.run(_lane, *lane_args)
            finally:
                self.done.put(None)


def _forget_helpers_in_child() -> None:
    """A forked child has none of its parent's threads: it starts its own helpers on first use."""
    global _busy
    _helpers.clear()
    _busy = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_in_child)


def _one_blas_thread():
    """A context holding every loaded BLAS to one thread (threadpoolctl; found once)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _lane(fn: Callable[[Any], T], items: Sequence[Any], lane: int, step: int, results: list) -> None:
    """Items ``lane, lane + step, ...`` in turn, each result into its slot (an exception too)."""
    _local.inside = True
    try:
        for i in range(lane, len(items), step):
            try:
                results[i] = (True, fn(items[i]))
            except BaseException as error:  # noqa: BLE001 - re-raised by run_parts, once every lane ends
                results[i] = (False, error)
                return
    finally:
        _local.inside = False


def run_parts(fn: Callable[[Any], T], items: Sequence[Any], *, blas: bool = True) -> list[T]:
    """``[fn(item) for item in items]``, the items side by side on up to :func:`threads` threads.

    Thread ``k`` of ``s`` takes items ``k, k + s, ...`` (the parts are equal, so
    the lanes are too); the calling thread is lane 0. Results come back in the
    items' order. An exception in any item is raised here after every lane has
    stopped (no part is left running). A call from inside a part, or while
    another thread's region holds the helpers, runs its items in turn.
    ``blas=False`` says ``fn`` calls no BLAS, which is then left as it is (holding it to one
    thread and back costs about 30 microseconds).
    """
    if len(items) == 1:  # one part: a plain call (most ops of a small network)
        return [fn(items[0])]
    size = min(len(items), threads())
    if size <= 1 or getattr(_local, "inside", False) or not _busy.acquire(blocking=False):
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    try:
        while len(_helpers) < size - 1:
            _helpers.append(_Helper(len(_helpers) + 1))
        with _one_blas_thread() if blas else contextlib.nullcontext():
            # each lane runs in a copy of the caller's context: NumPy's errstate (how overflow and
            # invalid values are reported) is a context variable, and must hold in the parts too
            for lane, helper in enumerate(_helpers[: size - 1], start=1):
                helper.inbox.put((contextvars.copy_context(), (fn, items, lane, size, results)))
            try:
                _lane(fn, items, 0, size, results)
            finally:
                used = _helpers[: size - 1]
                try:
                    for helper in used:
                        helper.done.get()
                except BaseException:  # interrupted while a helper may still run its lane:
                    _helpers.clear()  # it is never handed another; later regions start new ones
                    raise
    finally:
        _busy.release()
    for ok, value in (r for r in results if r is not None):
        if not ok:
            raise value
    return [value for _, value in results]
