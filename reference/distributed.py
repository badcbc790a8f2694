"""Data-parallel training: one model replica per process, gradients averaged over processes.

``mpiexec -n N learnsparse train ...`` starts N processes (ranks). Each builds
the same model from the same seed and takes its own shard of every global
batch; the gradients are averaged before the optimizer step, so the replicas
stay identical and every rank's optimizer, schedule and sparsity method does
exactly the same thing. MPI (through ``mpi4py``) launches the ranks and carries
the host collectives; on the GPU the gradients go through NCCL instead
(:mod:`gpu.distributed`). A plain ``learnsparse train`` is a world of one and
never imports ``mpi4py``.

The arithmetic. A global batch of ``n`` images is split into contiguous shards,
rank ``r`` taking positions ``[r n / N, (r + 1) n / N)`` (integer division), so
``n_r`` images. Each rank's objective is the mean loss over its shard plus the
method's regularization ``R``, identical on every rank::

    L_r = (1 / n_r) sum_{i in shard r} l_i + R                          (1)

The one-process objective is ``L = (1 / n) sum_i l_i + R``, and since
``sum_r n_r / n = 1``::

    dL/dtheta = sum_r (n_r / n) dL_r/dtheta                              (2)

Each rank seeds its backward with ``n_r / n`` (it differentiates ``(n_r / n) L_r``)
and the ranks sum the gradients (an all-reduce). With equal shards that is the
mean of the ranks' gradients. Seeding rather than scaling afterwards matters
for synchronised batch norm, whose backward sums over the ranks midway: the
cotangents summed there must belong to the one objective ``L``.

Batch norm. By default each rank normalises with its own shard's statistics
(as data-parallel PyTorch does): two ranks at global batch ``n`` compute what
one process computes when it normalises each half of the batch separately (a
ghost batch). Each rank's running averages move toward its own shard's
statistics; they are averaged over the ranks at the end of every epoch, before
evaluation and the checkpoint. The running averages are linear in the batch
statistics, so this equals running averages of the ranks' mean statistics.
``--sync-bn`` instead all-reduces the batch statistics (and, in the backward,
the two sums the gradient needs): see :mod:`reference.ops.sync_norm`; the
replicas then compute exactly the one-process batch norm of the global batch.

Evaluation splits the test set the same way and sums the losses, the correct
predictions and the counts over the ranks. Only rank 0 writes the run
directory.

Failures. Input problems are found by every rank alike before training
(:meth:`Communicator.agreed` makes sure of it: one rank's error is every
rank's), and rank 0 reports them. A rank that fails once training has begun
(it raises, or runs out of memory) prints one line naming itself and the cause
and aborts the whole job (``MPI_Abort``): the others are stopped by the MPI
launcher at once instead of waiting for it forever in a collective. Writes are
atomic, so the last checkpoint stays intact. A rank killed by a signal is
noticed by the launcher, which stops the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from reference.errors import ConfigError, LearnsparseError

__all__ = [
    "BUCKET_BYTES",
    "Bucket",
    "Communicator",
    "DataParallel",
    "MPICommunicator",
    "plan_buckets",
    "shard_bounds",
    "current",
    "report_failure",
    "world",
]

# Gradients travel in flat buffers of at most this many bytes (a parameter larger than
# this gets a bucket of its own): a few calls per step instead of one per parameter.
BUCKET_BYTES = 25 * 2**20

# Environment variables an MPI launcher sets to the number of processes it started
# (MPICH's Hydra, Open MPI, and the generic PMIx ones).
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

# A failing rank waits this long between printing its line and aborting the job: the MPI
# launcher forwards a rank's output asynchronously and, once the job aborts, may drop what
# it has not forwarded yet.
ABORT_GRACE_SECONDS = 1.0

# Set to 1 to use MPI even in a world of one (e.g. to check that mpi4py works).
FORCE_VARIABLE = "LEARNSPARSE_MPI"


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions of rank ``rank``'s shard of ``n`` items split over ``size`` ranks (1)."""
    return (rank * n) // size, ((rank + 1) * n) // size


# ---------------------------------------------------------------------------
# Communicators


class Communicator:
    """A world of one process: every collective returns its input unchanged.

    The interface the training loop uses; :class:`MPICommunicator` is the
    many-process one. ``collectives`` counts the collective calls made, so a
    failure can tell whether the other ranks may already be waiting for this one.
    """

    rank = 0
    size = 1
    local_rank = 0

    def __init__(self) -> None:
        self.collectives = 0

    def allreduce_(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` (a host array) over the ranks, in place; returns it."""
        return array

    def sum_values(self, values: Sequence[float]) -> np.ndarray:
        """The float64 sums over the ranks of a few host numbers."""
        return self.allreduce_(np.asarray(values, dtype=np.float64).copy())

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        return [obj]

    def abort(self, code: int) -> None:
        """End every rank of the job with exit status ``code``."""
        raise SystemExit(code)

    @contextlib.contextmanager
    def agreed(self) -> Iterator[None]:
        """Run the block on every rank; if it raised a :class:`LearnsparseError` on any rank,
        raise one on every rank, marked ``on_every_rank`` (rank 0 reports it once).

        The block must not itself make collective calls. In a world of one the
        error passes through unchanged.
        """
        if self.size == 1:
            yield
            return
        error: LearnsparseError | None = None
        try:
            yield
        except LearnsparseError as exc:
            error = exc
        reports = self.allgather(None if error is None else " ".join(str(error).split()))
        failed = [r for r, report in enumerate(reports) if report is not None]
        if not failed:
            return
        if error is None or failed[0] != self.rank:
            first = failed[0]
            error = ConfigError(f"rank {first} of {self.size}: {reports[first]}")
        error.on_every_rank = True  # type: ignore[attr-defined]
        raise error


class MPICommunicator(Communicator):
    """``MPI.COMM_WORLD`` through mpi4py: host collectives over the ranks the launcher started."""

    def __init__(self, comm: Any = None) -> None:
        super().__init__()
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()  # which GPU this rank takes on its node
        node.Free()

    def allreduce_(self, array: np.ndarray) -> np.ndarray:
        if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
            raise ConfigError(
                f"MPICommunicator.allreduce_ expects a C-contiguous NumPy array, got {type(array).__name__}"
            )
        self.collectives += 1
        self.comm.Allreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)
        return array

    def bcast(self, obj: Any) -> Any:
        self.collectives += 1
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        self.collectives += 1
        return self.comm.allgather(obj)

    def abort(self, code: int) -> None:
        self.comm.Abort(code)


_WORLD: list[Communicator] = []  # the process's communicator, made on first use


def launched_size(environ: dict[str, str] | None = None) -> int:
    """How many processes an MPI launcher says it started (1 when not started by one)."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        value = environ.get(name)
        if value is not None:
            try:
                return max(int(value), 1)
            except ValueError:
                raise ConfigError(f"{name}={value!r} in the environment; expected a process count") from None
    return 1


def world() -> Communicator:
    """This process's communicator: MPI when an MPI launcher started more than one process
    (or ``LEARNSPARSE_MPI=1``), else a world of one. Made once per process."""
    if not _WORLD:
        size = launched_size()
        if size > 1 or os.environ.get(FORCE_VARIABLE) == "1":
            try:
                import mpi4py  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"started as one of {size} processes by an MPI launcher, but mpi4py is not installed; "
                    "install it with: pip install 'learnsparse[mpi]'"
                ) from None
            _WORLD.append(MPICommunicator())
        else:
            _WORLD.append(Communicator())
    return _WORLD[0]


def current() -> Communicator:
    """The communicator :func:`world` made; if none was made yet, one that knows only this process's
    rank and the number of processes from the launcher's environment (nothing imported, and no
    collective made: :func:`report_failure` then lets rank 0 alone speak)."""
    if _WORLD:
        return _WORLD[0]
    comm = Communicator()
    comm.size = launched_size()
    if comm.size > 1:
        ranks = [os.environ[name] for name in _RANK_VARIABLES if name in os.environ]
        comm.rank = int(ranks[0]) if ranks and ranks[0].isdigit() else 0
    return comm


def report_failure(
    comm: Communicator, prog: str, message: str, code: int, *, on_every_rank: bool = False
) -> int:
    """The failure protocol of a rank that stops: returns the exit status, or aborts the job.

    Before any collective (every rank reads the same input and fails alike) and
    for errors :meth:`Communicator.agreed` made every rank's (``on_every_rank``), rank 0 prints the
    line and every rank returns ``code``. Otherwise the failing rank prints one
    line naming itself and aborts every rank, so none waits for it.
    """
    if comm.size == 1:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        return code
    if comm.collectives == 0 or on_every_rank:
        if comm.rank == 0:
            print(f"{prog}: {message}", file=sys.stderr, flush=True)
        return code
    print(f"{prog}: rank {comm.rank} of {comm.size} failed: {message}; stopping every rank", file=sys.stderr,
          flush=True)  # fmt: skip
    time.sleep(ABORT_GRACE_SECONDS)  # let the launcher forward the line before the job ends
    comm.abort(code)
    return code  # not reached under MPI


# ---------------------------------------------------------------------------
# Gradient buckets


class Bucket(NamedTuple):
    """One flat buffer's worth of parameters: their indices, offsets and sizes in it."""

    dtype: np.dtype
    index: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]
    total: int


def plan_buckets(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[Any], limit: int = BUCKET_BYTES):
    """Group parameters, in order, into flat buckets of one dtype and at most ``limit`` bytes.

    A parameter larger than ``limit`` gets a bucket of its own; a change of
    dtype starts a new bucket. Returns a list of :class:`Bucket`.
    """
    if limit < 1:
        raise ConfigError(f"plan_buckets: limit must be a positive number of bytes, got {limit!r}")
    buckets: list[Bucket] = []
    current: list[tuple[int, int]] = []  # (index, size)
    current_dtype: np.dtype | None = None
    current_bytes = 0

    def close() -> None:
        if current:
            sizes = [s for _, s in current]
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
            buckets.append(
                Bucket(current_dtype, tuple(i for i, _ in current), tuple(offsets), tuple(sizes), sum(sizes))
            )

    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        nbytes = size * dtype.itemsize
        if current and (dtype != current_dtype or current_bytes + nbytes > limit):
            close()
            current, current_bytes = [], 0
        current_dtype = dtype
        current.append((i, size))
        current_bytes += nbytes
    close()
    return buckets


def reduce_gradients(
    params: Sequence[Any], buckets, weight: float, allreduce: Callable[[Any], Any], xp
) -> None:
    """Replace each parameter's gradient by the weighted sum over the ranks, ``sum_r w_r g_r`` (2).

    Per bucket: the gradients are packed into one new flat buffer (a missing
    gradient counts as zeros), scaled by this rank's ``weight``, summed over
    the ranks by ``allreduce`` (in place), and each parameter's gradient
    becomes a view of its slice. Fresh buffers every step, so a gradient array
    shared by two parameters is never written through.
    """
    for bucket in buckets:
        parts = []
        for i, n in zip(bucket.index, bucket.size):
            g = params[i].grad
            parts.append(xp.zeros(n, dtype=bucket.dtype) if g is None else g.reshape(-1))  # any shape -> (n,)
        flat = xp.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        if weight != 1.0:
            flat *= flat.dtype.type(weight)  # (2)
        allreduce(flat)
        for i, off, n in zip(bucket.index, bucket.offset, bucket.size):
            params[i].grad = flat[off : off + n].reshape(
                params[i].data.shape
            )  # (n,) -> the parameter's shape


# ---------------------------------------------------------------------------
# The training loop's view


class DataParallel:
    """What the training loop needs from the ranks: shards, gradient sums, epoch-end agreement.

    ``params`` are the parameters the optimizer updates, in its order (the same
    on every rank). ``sync_bn`` says the batch norms already agree (no
    averaging of running statistics at the end of an epoch).
    """

    def __init__(self, comm: Communicator, params: Sequence[Any], *, sync_bn: bool = False) -> None:
        self.comm = comm
        self.params = list(params)
        self.sync_bn = sync_bn
        self.buckets = plan_buckets([p.data.shape for p in self.params], [p.data.dtype for p in self.params])
        self._device_allreduce: Callable[[Any], Any] | None = None

    @property
    def active(self) -> bool:
        return self.comm.size > 1

    def shard(self, xb: Any, yb: Any) -> tuple[Any, Any, float]:
        """This rank's contiguous shard of a global batch and its gradient weight ``n_r / n`` (2)."""
        n = len(yb)
        lo, hi = shard_bounds(n, self.comm.rank, self.comm.size)
        return xb[lo:hi], yb[lo:hi], (hi - lo) / n

    def allreduce_for(self, array: Any) -> Callable[[Any], Any]:
        """The in-place sum over the ranks for arrays like ``array``: MPI on the host, NCCL on the GPU."""
        from reference.backend import array_module

        if array_module(array) is np:
            return self.comm.allreduce_
        if self._device_allreduce is None:
            from gpu.distributed import device_allreduce

            self._device_allreduce = device_allreduce(self.comm)
        return self._device_allreduce

    def reduce_gradients(self, weight: float = 1.0) -> None:
        """Every parameter's gradient becomes ``sum_r w_r g_r`` (2), on the device it lives on.

        The training loop seeds each rank's backward with ``w_r`` instead (so that
        synchronised batch norm, which sums over the ranks inside the backward,
        sums gradients of one objective) and passes ``weight=1``.
        """
        if self.params:
            xp = _array_module(self.params[0].data)
            reduce_gradients(self.params, self.buckets, weight, self.allreduce_for(self.params[0].data), xp)

    def attach_sync_bn(self, model: Any) -> None:
        """Make every batch norm of ``model`` synchronised over the ranks (``--sync-bn``)."""
        from reference.nn.layers import BatchNorm2d

        for module in model.modules():
            if isinstance(module, BatchNorm2d):
                module.sync = self.allreduce_for(module.weight.data)

    @staticmethod
    def detach_sync_bn(model: Any) -> None:
        """Every batch norm of ``model`` back to normalising its own batch."""
        from reference.nn.layers import BatchNorm2d

        for module in model.modules():
            if isinstance(module, BatchNorm2d):
                module.sync = None

    def end_epoch(self, model: Any) -> None:
        """Average the batch norms' running statistics over the ranks, then, in debug mode, check
        that the replicas are identical.

        With ``sync_bn`` the statistics agree already, except for the channels a
        rank's own channel-mask draw left unchanged (SCP); the average of equal
        float32 values, summed in float64, is exactly that value again.
        """
        if not self.active:
            return
        from reference.backend import to_device

        for _, buf in model.named_buffers():
            if np.dtype(buf.dtype).kind != "f":
                continue
            host = np.ascontiguousarray(to_device(buf, "cpu"), dtype=np.float64)
            self.comm.allreduce_(host)
            buf[...] = to_device((host / self.comm.size).astype(buf.dtype), _device(buf))
        if __debug__:
            self.check_replicas(model)

    def check_replicas(self, model: Any) -> None:
        """ConfigError naming the first rank whose parameters or buffers differ from rank 0's."""
        from reference.backend import to_device

        digest = hashlib.sha256()
        for _, p in model.named_parameters():
            digest.update(np.ascontiguousarray(to_device(p.data, "cpu")).tobytes())
        for _, buf in model.named_buffers():
            digest.update(np.ascontiguousarray(to_device(buf, "cpu")).tobytes())
        digests = self.comm.allgather(digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise LearnsparseError(
                f"the model replicas differ: rank {differ[0]}'s parameters or buffers are not rank 0's "
                f"(a rank computed something the others did not)"
            )

    def sum_values(self, values: Sequence[float]) -> np.ndarray:
        return self.comm.sum_values(values)


def _array_module(array: Any) -> Any:
    from reference.backend import array_module

    return array_module(array)


def _device(array: Any) -> str:
    from reference.backend import device_of

    return device_of(array)
