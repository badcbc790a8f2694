"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file the library writes (checkpoints, metrics, configs, reports,
exports) goes through here: the new contents go to a hidden temporary file in
the same directory, which is flushed to disk and then renamed over the target
(``os.replace`` is atomic on one file system). If anything fails on the way,
the temporary file is removed and the old file is left as it was.

A process killed between the two steps cannot remove its temporary file. The
name says whose it is (``.NAME.PID.HEX.tmp``), so :func:`remove_stale_temporaries`
can later remove exactly the ones whose writer is gone. A temporary name never
exceeds the file system's limit on one name (``NAME_MAX``) when the target's
name is within it: a long ``NAME`` is shortened and a hash of it appended.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from reference.errors import ConfigError

__all__ = [
    "NAME_MAX",
    "atomic_target",
    "refuse_overwriting_inputs",
    "remove_stale_temporaries",
    "temporary_name",
    "write_atomic",
]

# The longest name of one directory entry, in bytes, on the file systems we write to
# (ext4, XFS, btrfs, APFS, tmpfs: 255).
NAME_MAX = 255

# ".NAME.PID.HEX.tmp": what temporary_name() makes, and nothing a user would name a file.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{8})\.tmp$", re.DOTALL)


def temporary_name(name: str) -> str:
    """A hidden, unique name for writing ``name``'s new contents before the rename.

    ``.NAME.PID.HEX.tmp``; when that would be longer than :data:`NAME_MAX`
    bytes, ``NAME`` is cut to fit and ``~`` plus 12 hex digits of its SHA-256
    are put in its place's end, so the temporary name stays unique per target.
    """
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"
    raw = os.fsencode(name)
    room = NAME_MAX - 1 - len(suffix)  # 1: the leading dot
    if len(raw) > room:
        digest = "~" + hashlib.sha256(raw).hexdigest()[:12]
        raw = raw[: room - len(digest)] + digest.encode("ascii")
    return "." + os.fsdecode(raw) + suffix


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal counts as existing)."""
    if pid <= 0:
        return True  # not a writer's pid: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files in ``directory`` left by writers that no longer run.

    Only names of :func:`temporary_name`'s pattern whose PID is not a live
    process are removed (a write in progress by another process is left
    alone); returns the paths removed. A missing directory has none.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(output: str | Path, inputs: Iterable[str | Path], what: str) -> None:
    """ConfigError when ``output`` is one of ``inputs`` (the same file, by any path to it).

    ``what`` names the command in the message (``"finalize"``).
    """
    for source in inputs:
        if _same_file(Path(output), Path(source)):
            raise ConfigError(
                f"{what}: the output {str(output)!r} is the input {str(source)!r}; "
                "writing it would destroy the input: choose another output file"
            )


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
