"""Device memory of the emulation: every device array is a view of one registered host allocation.

The registry maps an address back to its allocation, so a raw pointer handed to
a kernel or to cuBLAS can be checked: it must point into a live allocation, and
a footprint computed from it (rows, leading dimension, strides, batch) must stay
inside that allocation.

Fresh memory is poisoned (every byte 0xFF) so that reading what no kernel wrote
shows up as NaN rather than as a lucky zero. Each allocation ends exactly where
an inaccessible guard page begins, so a kernel reading or writing past the end
of an array faults; the launch turns the fault into an error naming the
allocation (:func:`describe`). Reads before the start of an array are not caught.

The pool imitates ``cupy.cuda.MemoryPool``'s two figures: ``used_bytes`` (live
allocations) and ``total_bytes`` (what the pool holds: the most used since the
last ``free_all_blocks``, as freed blocks stay cached on a GPU).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["Allocation", "MemoryPool", "POOL", "adopt", "address", "allocate", "describe", "find"]


@dataclass
class Allocation:
    start: int
    nbytes: int
    root: weakref.ref  # the numpy array owning the memory

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def buffer(self) -> np.ndarray:
        """The allocation's bytes as a flat uint8 array (valid while the caller holds it)."""
        root = self.root()
        if root is None:
            raise RuntimeError(f"allocation at {self.start:#x} was freed")
        flat = root.reshape(-1).view(np.uint8)
        offset = self.start - address(root)
        return flat[offset : offset + self.nbytes]


class MemoryPool:
    """The figures of CuPy's default memory pool, for the emulated allocations."""

    def __init__(self) -> None:
        self._used = 0
        self._total = 0

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return max(self._total, self._used)

    def free_bytes(self) -> int:
        return self.total_bytes() - self._used

    def free_all_blocks(self, stream=None) -> None:
        self._total = self._used

    def n_free_blocks(self) -> int:
        return 0

    def set_limit(self, size=None, fraction=None) -> None:
        pass

    def get_limit(self) -> int:
        return 0

    def malloc(self, size: int):
        from tests.emulation.array import MemoryPointer

        buffer = allocate(int(size))
        return MemoryPointer(buffer, address(buffer))

    def _grow(self, nbytes: int) -> None:
        self._used += nbytes
        self._total = max(self._total, self._used)

    def _shrink(self, nbytes: int) -> None:
        self._used -= nbytes


POOL = MemoryPool()
_lock = threading.Lock()
_starts: list[int] = []  # sorted start addresses of live allocations
_by_start: dict[int, Allocation] = {}


def address(a: np.ndarray) -> int:
    """The address of ``a``'s first element."""
    return a.__array_interface__["data"][0]


def _release(start: int, nbytes: int) -> None:
    with _lock:
        if _by_start.pop(start, None) is not None:
            del _starts[bisect.bisect_left(_starts, start)]
            POOL._shrink(nbytes)


def _register(root: np.ndarray, start: int, nbytes: int) -> Allocation:
    alloc = Allocation(start, max(nbytes, 1), weakref.ref(root))
    with _lock:
        old = _by_start.get(start)
        if old is not None and old.root() is not None:
            raise RuntimeError(f"two live allocations at {start:#x}")
        if old is None:
            bisect.insort(_starts, start)
        _by_start[start] = alloc
        POOL._grow(nbytes)
    weakref.finalize(root, _release, start, nbytes)
    return alloc


POISON = 0xFF  # every byte of fresh device memory: NaN in floats, -1 in integers, true in bools


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def allocate(nbytes: int) -> np.ndarray:
    """A fresh registered allocation of ``nbytes`` bytes, as a flat uint8 array.

    The bytes end where a guard page (no access) begins. They are :data:`POISON`, never zeros:
    ``cupy.empty`` on a GPU returns whatever the pool's block held, so a kernel that leaves part of
    its output unwritten must not pass by luck.
    """
    pages = max(1, -(-nbytes // _PAGE))
    region = mmap.mmap(-1, (pages + 1) * _PAGE)
    whole = np.frombuffer(region, dtype=np.uint8)  # owns the mapping while any view lives
    guard = address(whole) + pages * _PAGE
    if _libc.mprotect(guard, _PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
    offset = pages * _PAGE - nbytes
    buffer = whole[offset : offset + nbytes]
    buffer.fill(POISON)
    _register(whole, address(whole) + offset, nbytes)
    return buffer


def describe(pointer: int) -> str:
    """Where ``pointer`` lies relative to the live allocations, in words (for fault messages)."""
    alloc = find(pointer)
    if alloc is not None:
        return f"inside the {alloc.nbytes}-byte allocation at {alloc.start:#x}"
    with _lock:
        k = bisect.bisect_right(_starts, pointer) - 1
        below = _by_start[_starts[k]] if k >= 0 else None
    if below is not None and 0 <= pointer - below.end < _PAGE:
        return f"{pointer - below.end} bytes past the end of the {below.nbytes}-byte allocation at {below.start:#x}"
    return "in no device allocation (a wild pointer, or a fiber's stack overflowing)"


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def find(pointer: int) -> Allocation | None:
    """The live allocation containing ``pointer``, or None."""
    with _lock:
        k = bisect.bisect_right(_starts, pointer) - 1
        if k < 0:
            return None
        alloc = _by_start[_starts[k]]
    if pointer < alloc.end and alloc.root() is not None:
        return alloc
    return None


def adopt(a: np.ndarray) -> np.ndarray:
    """``a`` as device memory: itself when it lies in a registered allocation, else a registered copy."""
    if a.size == 0 or find(address(a)) is not None:
        return a
    root = _root(a)
    if root.base is None and root.flags.owndata and root.flags.c_contiguous:
        _register(root, address(root), root.nbytes)
        return a
    buffer = allocate(a.nbytes)
    out = buffer.view(a.dtype).reshape(a.shape) if a.nbytes else np.empty(a.shape, a.dtype)
    out[...] = a
    return out
