"""Settings of the emulation that a test may change: the order threads of a block are resumed in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["SCHEDULES", "schedule", "thread_order"]

SCHEDULES = ("forward", "reverse", "shuffled")
_state = {"schedule": 0}


def schedule() -> int:
    """The scheduler code passed to a launch: 0 forward, 1 reverse, >= 2 a shuffle seeded by it."""
    return int(_state["schedule"])


@contextlib.contextmanager
def thread_order(name: str, seed: int = 12345) -> Iterator[None]:
    """Resume the threads of a block in ``name`` order ("forward", "reverse" or "shuffled" by ``seed``)."""
    if name not in SCHEDULES:
        raise ValueError(f"thread order must be one of {', '.join(SCHEDULES)}, got {name!r}")
    code = {"forward": 0, "reverse": 1}.get(name, 2 + abs(int(seed)))
    previous = _state["schedule"]
    _state["schedule"] = code
    try:
        yield
    finally:
        _state["schedule"] = previous
