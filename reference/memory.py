"""How much memory this machine has, and a refusal for sizes that cannot fit.

A size setting (``num_classes``, ``train_size``, ``image_size``) is only a
number until something allocates it; a number that needs terabytes would end
deep in NumPy with an allocation error. The callers here estimate the bytes
an allocation needs *before* making it and hand the estimate to
:func:`require_memory`, which refuses, naming the estimate and the memory
available, when it cannot fit.

Estimates are lower bounds (they count only the largest arrays), so a refusal
is never wrong; an estimate that passes can still run out of memory later,
which the command line reports in one line too.
"""

from __future__ import annotations

import os

from reference.errors import ConfigError

__all__ = ["available_memory", "format_bytes", "require_memory"]


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None when the system does not say.

    Linux: ``MemAvailable`` of /proc/meminfo (free memory plus reclaimable
    caches). Elsewhere: the physical memory (``sysconf``), an upper bound.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to EiB, then powers of ten."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            break
        value /= 1024
    if value >= 1e4:  # beyond EiB: say it plainly
        return f"{value:.3g} EiB"
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def require_memory(nbytes: int, what: str, *, available: int | None = None) -> None:
    """Refuse, with a ConfigError naming the estimate, when ``nbytes`` exceed the memory available.

    ``what`` says what the bytes are for (``"the synthetic data set (2048 + 512
    images of 3x32x32, float32)"``). ``available`` defaults to
    :func:`available_memory`; when that is unknown nothing is refused.
    """
    limit = available_memory() if available is None else available
    if limit is None or nbytes <= limit:
        return
    raise ConfigError(
        f"{what} needs at least {format_bytes(nbytes)} ({nbytes:,} bytes), more than the "
        f"{format_bytes(limit)} of memory available; choose smaller sizes"
    )
