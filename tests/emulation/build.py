"""Compiling kernel sources for the host with g++, cached on disk, loaded with ctypes.

A source is compiled once per distinct text: the shared object is named by a
hash of the source, the header ``cuda_host.h`` and the compiler flags, and kept
in ``$LEARNSPARSE_EMULATION_CACHE``, else ``$XDG_CACHE_HOME/learnsparse/emulation``
(``~/.cache/...``), else a temporary directory. :func:`load_many` compiles
several sources in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["CompileError", "EmulationError", "Library", "cache_dir", "load", "load_many"]

HEADER = Path(__file__).with_name("cuda_host.h")
CXX = os.environ.get("CXX", "g++")
FLAGS = (
    "-O1",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
    "-Wno-unused-variable",
)


class EmulationError(RuntimeError):
    """The emulation refused a launch or a call (a wrong argument, a bound, a barrier deadlock)."""


class CompileError(EmulationError):
    """The host compiler rejected a kernel source."""


def cache_dir() -> Path:
    for candidate in (
        os.environ.get("LEARNSPARSE_EMULATION_CACHE"),
        os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "learnsparse", "emulation"
        ),
    ):
        if not candidate:
            continue
        path = Path(candidate)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    path = Path(tempfile.gettempdir()) / f"learnsparse-emulation-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Library:
    """A compiled source: its ``__global__`` functions by name, with their parameter kinds."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        dll = ctypes.CDLL(str(path))
        dll.emu_function_name.restype = ctypes.c_char_p
        dll.emu_function_name.argtypes = [ctypes.c_int]
        dll.emu_launch.restype = ctypes.c_int
        dll.emu_launch.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._dll = dll
        self.functions: dict[str, tuple[int, list[tuple[str, int, str, int]]]] = {}
        for i in range(dll.emu_function_count()):
            kinds, sizes = ctypes.create_string_buffer(256), (ctypes.c_int * 256)()
            pkinds, psizes = ctypes.create_string_buffer(256), (ctypes.c_int * 256)()
            n = dll.emu_function_signature(i, kinds, sizes, pkinds, psizes)
            params = [
                (kinds.raw[k : k + 1].decode(), sizes[k], pkinds.raw[k : k + 1].decode(), psizes[k])
                for k in range(n)
            ]
            self.functions[dll.emu_function_name(i).decode()] = (i, params)

    def launch(self, index: int, geometry: tuple[int, ...], pointers) -> str | None:
        """Run function ``index``; None, or the emulator's error message."""
        g = (ctypes.c_longlong * 9)(*geometry)
        message = ctypes.create_string_buffer(1024)
        rc = self._dll.emu_launch(index, g, pointers, message, len(message))
        return None if rc == 0 else message.value.decode(errors="replace")


_loaded: dict[str, Library] = {}
_lock = threading.Lock()


def _digest(source: str) -> str:
    h = hashlib.sha256()
    for part in (source, HEADER.read_text(), CXX, " ".join(FLAGS)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


_header: dict[str, Path] = {}


def _include_dir() -> Path:
    """A directory holding ``cuda_host.h`` and, where g++ can build one, its precompiled header.

    The precompiled header (built once per header text and flags) halves the compile time of a
    kernel; without it the header is parsed each time.
    """
    text = HEADER.read_text()
    key = hashlib.sha256((text + CXX + " ".join(FLAGS)).encode()).hexdigest()[:16]
    with _lock:
        found = _header.get(key)
        if found is not None:
            return found
        directory = cache_dir() / f"header-{key}"
        if not (directory / "cuda_host.h.gch").exists():
            with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                staging = Path(tmp) / "header"
                staging.mkdir()
                (staging / "cuda_host.h").write_text(text)
                flags = [f for f in FLAGS if f != "-shared"]
                done = subprocess.run(
                    [CXX, *flags, "-x", "c++-header", str(staging / "cuda_host.h"), "-o",
                     str(staging / "cuda_host.h.gch")],
                    capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode != 0:
                    _header[key] = HEADER.parent  # no precompiled header: parse it each time
                    return HEADER.parent
                try:
                    os.replace(staging, directory)
                except OSError:  # another process got there first
                    pass
        _header[key] = directory
        return directory


def _compile(source: str, name: str, digest: str) -> Path:
    directory = cache_dir()
    target = directory / f"{name}-{digest}.so"
    if target.exists():
        return target
    if shutil.which(CXX) is None:
        raise CompileError(f"the host C++ compiler {CXX!r} was not found (set CXX)")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cpp = Path(tmp) / f"{name}.cpp"
        cpp.write_text(source)
        out = Path(tmp) / f"{name}.so"
        done = subprocess.run(
            [CXX, *FLAGS, f"-I{_include_dir()}", str(cpp), "-o", str(out)], capture_output=True, text=True
        )
        if done.returncode != 0:
            numbered = "\n".join(f"{k + 1:4d} {line}" for k, line in enumerate(source.splitlines()))
            raise CompileError(
                f"g++ rejected kernel {name!r}:\n{done.stderr[-6000:]}\n--- source ---\n{numbered}"
            )
        os.replace(out, target)
    return target


def load(source: str, name: str) -> Library:
    """The library compiled from ``source`` (compiled now, or found in the caches)."""
    digest = _digest(source)
    with _lock:
        lib = _loaded.get(digest)
    if lib is None:
        path = _compile(source, name, digest)
        with _lock:
            lib = _loaded.get(digest) or Library(path, name)
            _loaded[digest] = lib
    return lib


def load_many(jobs: list[tuple[str, str]], workers: int | None = None) -> list[Library]:
    """``load`` for several ``(source, name)`` pairs, compiling in parallel."""
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: load(*job), jobs))
