"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the library writes (checkpoints, metrics, configs, reports,
exports) goes through here: the new contents go to a hidden temporary file in
the same directory, which is flushed to disk and then renamed over the target
(``os.replace`` is atomic on one file system). If anything fails on the way,
the temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "temporary_name", "write_atomic"]


def temporary_name(name: str) -> str:
    """A hidden, unique name for writing ``name``'s new contents before the rename."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = path.parent / temporary_name(path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path``'s contents with ``data`` (text is written as UTF-8)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_target(path) as tmp, open(tmp, "xb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    return path
