"""A run directory's lifecycle: one trainer at a time, and one committed epoch on disk.

The lock. While a process trains in a run directory it holds an exclusive
``fcntl.flock`` on ``<run_dir>/.lock``; the file holds the holder's PID, host
and start time, so a second trainer is refused with one line naming it. The OS
drops the lock when the process ends, however it ends (a ``kill -9`` too), so a
stale lock file never blocks anyone; a clean exit also removes the file.
Where ``fcntl`` does not exist (Windows) the lock is not taken.

The commit. An epoch writes, in this order::

    trail/epoch_NNN.npz, layers.jsonl, metrics.jsonl, metrics.csv   (the epoch's records)
    checkpoint.npz                                                 (the commit point)
    best.npz                                                       (when the epoch is the best)

Each file is replaced atomically (:mod:`reference.files`). A kill before the
commit leaves records of an epoch the checkpoint does not have; a kill after it
may leave ``best.npz`` one epoch behind. :func:`roll_back` brings the directory
to the checkpoint's epoch when a run resumes (or, with epoch 0, clears the
records of a run that never committed when a new run starts there): records
past the epoch are removed, and ``best.npz`` is rewritten from the checkpoint
when the checkpoint's epoch is the best one. Stale temporary files of killed
writes are removed at the same time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from reference.errors import ConfigError
from reference.files import atomic_target, remove_stale_temporaries, write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RECORD_NAMES", "discard", "held_lock", "roll_back", "run_home", "trail_epoch"]

LOCK_NAME = ".lock"
# The files of a run's epochs besides checkpoint.npz; trail/epoch_NNN.npz too.
RECORD_NAMES = ("metrics.jsonl", "metrics.csv", "layers.jsonl", "best.npz")
_TRAIL = re.compile(r"^epoch_(?P<epoch>[0-9]+)\.npz$")


def run_home(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to: its directory, or the run above ``trail/``."""
    parent = Path(checkpoint).parent
    if parent.name == "trail" and (parent.parent / "config.json").exists():
        return parent.parent
    return parent


def trail_epoch(path: Path) -> int | None:
    """The epoch of a trail snapshot's file name (``epoch_007.npz`` -> 7), else None."""
    match = _TRAIL.match(path.name)
    return int(match["epoch"]) if match else None


# ---------------------------------------------------------------------------
# The lock


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (``process 12 on host h, started ...``)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"process {int(info['pid'])} on host {info['host']!r}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now, or not ours
        return "another process"


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; ConfigError when another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            run_dir = str(path.parent)
            raise ConfigError(
                f"run_dir {run_dir!r} is in use: {holder} is training there; wait for it to end "
                "or choose another run directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The last holder removes the file when it ends: a lock taken on a removed file
        # guards nothing, so take it again on the file that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def held_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block (the directory must exist); see the module docstring."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = _acquire(path)
    except OSError as exc:
        raise ConfigError(f"cannot lock run_dir {str(run_dir)!r}: {exc.strerror or exc}") from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: nobody else can lock it while we hold it
        os.close(fd)


# ---------------------------------------------------------------------------
# Back to the committed epoch


def _keep_rows(path: Path, epoch: int) -> None:
    """Drop the lines of a JSON-lines log whose ``epoch`` is past ``epoch``."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and int(json.loads(line).get("epoch", 0)) <= epoch]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


def roll_back(run_dir: Path, epoch: int, *, best_epoch: int = 0, checkpoint: Path | None = None) -> None:
    """Bring ``run_dir``'s records to the committed epoch ``epoch`` (hold the lock first).

    Removes stale temporary files, ``layers.jsonl`` rows and trail snapshots
    past ``epoch`` (everything of the kind when ``epoch`` is 0, with the
    metrics and ``best.npz``), and copies ``checkpoint`` to ``best.npz`` when
    ``best_epoch == epoch``. The metrics files are rewritten by the caller
    from the checkpoint's history.
    """
    trail = run_dir / "trail"
    for directory in (run_dir, trail):
        remove_stale_temporaries(directory)
    _keep_rows(run_dir / "layers.jsonl", epoch)
    if trail.is_dir():
        for snapshot in trail.iterdir():
            n = trail_epoch(snapshot)
            if n is not None and n > epoch:
                snapshot.unlink()
    if epoch == 0:
        for name in RECORD_NAMES:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    elif checkpoint is not None and best_epoch == epoch:
        best = run_dir / "best.npz"
        if not (best.exists() and os.path.samefile(best, checkpoint)):
            with atomic_target(best) as tmp, open(checkpoint, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())


def discard(run_dir: Path, *, created: bool) -> None:
    """Remove what a run that never committed an epoch wrote (hold the lock first).

    The whole directory when the run created it; else only the run's own files
    (its config, records and trail), leaving anything else that was there.
    """
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    roll_back(run_dir, 0)
    for name in ("config.json", "config.toml"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    with contextlib.suppress(OSError):
        (run_dir / "trail").rmdir()
