"""``cupy.cuda``: one emulated device, its events and streams, the allocator hooks and runtime queries."""

from __future__ import annotations

import time

from tests.emulation import cublas, memory

__all__ = ["Device", "Event", "Stream", "get_elapsed_time", "PROPERTIES"]

PROPERTIES = {
    "name": b"CPU emulation of a CUDA device (tests/emulation)",
    "major": 9,
    "minor": 0,
    "totalGlobalMem": 16 * 2**30,
    "multiProcessorCount": 1,
    "maxThreadsPerBlock": 1024,
    "warpSize": 32,
    "sharedMemPerBlock": 48 * 1024,
}
VERSION = 13000  # what driverGetVersion/runtimeGetVersion report (CUDA 13.0)


class Device:
    def __init__(self, device=None):
        if device not in (None, 0):
            raise ValueError(f"the emulation has one device, 0; got {device!r}")
        self.id = 0

    compute_capability = "90"

    def synchronize(self) -> None:
        pass

    def use(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def cublas_handle(self) -> int:
        return cublas.get_handle()


class Stream:
    null: Stream

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self) -> None:
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


Stream.null = Stream(null=True)


def get_current_stream(device_id=None) -> Stream:
    return Stream.null


class Event:
    """Host wall-clock time at record(): every launch has finished by then (launches are synchronous)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time: float | None = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    if start.time is None or end.time is None:
        raise RuntimeError("get_elapsed_time: both events must be recorded")
    return (end.time - start.time) * 1e3


_allocator = {"fn": None}


def set_allocator(allocator=None) -> None:
    """Recorded only: emulated arrays always live in the registry's allocations."""
    _allocator["fn"] = allocator


def get_allocator():
    return _allocator["fn"]


def set_pinned_memory_allocator(allocator=None) -> None:
    pass


def get_cublas_handle() -> int:
    return cublas.get_handle()


# cupy.cuda.runtime
def getDeviceCount() -> int:  # noqa: N802  (CUDA's names)
    return 1


def getDevice() -> int:  # noqa: N802
    return 0


def setDevice(device: int) -> None:  # noqa: N802
    Device(device)


def getDeviceProperties(device: int) -> dict:  # noqa: N802
    Device(device)
    return dict(PROPERTIES)


def driverGetVersion() -> int:  # noqa: N802
    return VERSION


def runtimeGetVersion() -> int:  # noqa: N802
    return VERSION


def deviceSynchronize() -> None:  # noqa: N802
    pass


def memGetInfo() -> tuple[int, int]:  # noqa: N802
    total = PROPERTIES["totalGlobalMem"]
    return total - memory.POOL.used_bytes(), total
