"""Sums over the GPUs of a data-parallel run: NCCL through ``cupy.cuda.nccl``, one GPU per rank.

MPI starts the ranks and carries the host collectives (:mod:`reference.distributed`);
on the GPU the gradient buckets and synchronised batch norm's sums go through
NCCL instead, device to device, with no copy to the host.

- Device: each rank uses the GPU numbered by its place on its node
  (``comm.local_rank``), before anything is allocated (:func:`use_local_device`).
- Setup: rank 0 creates the NCCL unique id and MPI broadcasts it; every rank then
  joins the NCCL communicator with its MPI rank and the world size
  (:class:`NcclAllreduce`). The communicator is made on the first sum, so a run
  that never sums (one rank) never touches NCCL.
- Streams: each sum is enqueued on CuPy's current stream, the one the backward
  kernels and the optimizer's update run on. The all-reduce therefore starts
  after the gradients it reads are written and the update starts after it,
  without any host synchronisation; the host only queues the call.

Nothing here has run on a GPU in this project's tests: the CPU suite checks,
through the CPU execution mode and a stand-in ``nccl`` module, the unique-id
handoff, the arguments of every call (device pointers, counts, NCCL data
types, the operation, the stream) and the bucketed sums they produce. On a GPU,
``tests/test_distributed.py::test_one_process_nccl_sums_on_a_real_gpu`` makes the
real calls with one rank (the GPU check runs it with the other ``gpu`` tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import ConfigError

__all__ = ["NcclAllreduce", "device_allreduce", "nccl_dtype", "use_local_device"]

# NumPy dtype -> the name of NCCL's data-type constant in cupy.cuda.nccl.
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


def use_local_device(comm: Any, cupy_module: Any = None) -> int:
    """Make GPU ``comm.local_rank`` the current device of this process; returns its number.

    ConfigError when the node has fewer GPUs than ranks on it.
    """
    cp = _cupy(cupy_module)
    count = int(cp.cuda.runtime.getDeviceCount())
    if comm.local_rank >= count:
        raise ConfigError(
            f"rank {comm.rank} is process {comm.local_rank + 1} on its node, which has {count} GPU(s): "
            f"start at most {count} processes per node with --device cuda (one GPU each)"
        )
    cp.cuda.Device(comm.local_rank).use()
    return comm.local_rank


def nccl_dtype(dtype: Any, nccl: Any) -> int:
    """NCCL's code for ``dtype``; ConfigError for a dtype NCCL cannot sum here."""
    name = np.dtype(dtype).name
    if name not in _NCCL_TYPES:
        raise ConfigError(f"NCCL sums float16, float32 or float64 arrays, got {name}")
    return getattr(nccl, _NCCL_TYPES[name])


class NcclAllreduce:
    """``allreduce(array)``: the in-place sum of a C-contiguous CuPy array over the ranks of ``comm``.

    ``nccl`` and ``cupy_module`` default to ``cupy.cuda.nccl`` and ``cupy``
    (given explicitly by tests). The NCCL communicator is created on the first
    call: rank 0's unique id, broadcast over ``comm`` (MPI).
    """

    def __init__(self, comm: Any, nccl: Any = None, cupy_module: Any = None) -> None:
        self.comm = comm
        self._cp = _cupy(cupy_module)
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl = nccl
        self._nccl_comm: Any = None

    def _communicator(self) -> Any:
        if self._nccl_comm is None:
            unique_id = self.nccl.get_unique_id() if self.comm.rank == 0 else None
            unique_id = self.comm.bcast(unique_id)  # rank 0's id on every rank
            self._nccl_comm = self.nccl.NcclCommunicator(self.comm.size, unique_id, self.comm.rank)
        return self._nccl_comm

    def __call__(self, array: Any) -> Any:
        if not isinstance(array, self._cp.ndarray) or not array.flags.c_contiguous:
            raise ConfigError(
                f"NcclAllreduce expects a C-contiguous CuPy array, got {type(array).__name__}"
                + ("" if not hasattr(array, "flags") else " that is not C-contiguous")
            )
        code = nccl_dtype(array.dtype, self.nccl)
        stream = self._cp.cuda.get_current_stream().ptr  # the stream the backward and the update run on
        self._communicator().allReduce(
            array.data.ptr, array.data.ptr, array.size, code, self.nccl.NCCL_SUM, stream
        )
        return array


def device_allreduce(comm: Any) -> NcclAllreduce:
    """The device sum for a data-parallel run on GPUs (:class:`NcclAllreduce` over ``comm``)."""
    return NcclAllreduce(comm)


def _cupy(module: Any) -> Any:
    if module is not None:
        return module
    import cupy

    return cupy
