"""Host reads of device arrays: recording them, and refusing those not allowed by name.

A host read is anything that must copy a device value to the host and wait for
the device: ``float()``, ``int()``, ``bool()``, ``__index__``, ``.item()``,
``.get()``, ``.tolist()``, ``numpy.asarray``/``__array__``, ``repr``/``str``/
``format``, and the data-dependent shapes CuPy can only size after reading
the device (indexing with a boolean mask, ``nonzero``). ``len()`` and ``.shape``
are not reads: shapes are host metadata.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple

__all__ = ["HostRead", "Read", "host_reads", "no_host_reads", "record"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


class HostRead(AssertionError):
    """A device array was read on the host where no allowed function was on the call stack."""


class Read(NamedTuple):
    kind: str  # e.g. "float()", ".item()", "numpy.asarray()"
    location: str  # "path:line in function" of the first frame outside the emulation


class _Guard:
    def __init__(self, allow: frozenset[str] | None, log: list[Read] | None):
        self.allow = allow  # None: record only
        self.log = log


_active: list[_Guard] = []


def _qualname(frame) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    return f"{frame.f_globals.get('__name__', '?')}.{name}"


def _location(frame) -> str:
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_HERE + os.sep):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    path = os.path.abspath(frame.f_code.co_filename)
    if path.startswith(_ROOT + os.sep):
        path = os.path.relpath(path, _ROOT)
    return f"{path}:{frame.f_lineno} in {_qualname(frame)}"


def record(kind: str, what: str = "") -> None:
    """Note a host read of kind ``kind`` (``what``: the array, for the message); raise where refused."""
    if not _active:
        return
    frame = sys._getframe(1)
    read = Read(kind, _location(frame))
    stack: set[str] | None = None
    for guard in _active:
        if guard.log is not None:
            guard.log.append(read)
    for guard in _active:
        if guard.allow is None:
            continue
        if stack is None:
            stack, f = set(), frame
            while f is not None:
                stack.add(_qualname(f))
                f = f.f_back
        if not (stack & guard.allow):
            allowed = ", ".join(sorted(guard.allow)) or "none"
            raise HostRead(
                f"host read of a device array: {kind}{' of ' + what if what else ''} at {read.location} "
                f"(no allowed function on the call stack; allowed: {allowed})"
            )


@contextlib.contextmanager
def no_host_reads(allow: Iterable[str] = ()) -> Iterator[None]:
    """Inside, any host read of a device array raises :class:`HostRead`, unless a function named in
    ``allow`` (``"module.qualname"``) is on the call stack. Nested guards each apply (they only narrow).
    """
    if isinstance(allow, str):
        raise TypeError(f"allow must be a collection of 'module.qualname' strings, got the string {allow!r}")
    guard = _Guard(frozenset(allow), None)
    _active.append(guard)
    try:
        yield
    finally:
        _active.remove(guard)


@contextlib.contextmanager
def host_reads() -> Iterator[list[Read]]:
    """Record every host read of a device array inside, as :class:`Read` (kind, location); never raises."""
    log: list[Read] = []
    guard = _Guard(None, log)
    _active.append(guard)
    try:
        yield log
    finally:
        _active.remove(guard)
