"""The stand-in ``cupy`` package, and installing it in ``sys.modules`` for the length of a block.

While it is installed, ``import cupy`` anywhere gives the stand-in, and ``gpu``
and its submodules are imported afresh against it (their kernels, kernel caches
and runtime state are new). On the way out the stand-in and those modules are
removed, and whatever was there before (the real CuPy and ``gpu`` on a GPU
machine, or nothing) is put back, with the state of the ``gpu`` modules that
existed before (kernel caches, module-level dicts) as it was and
``CUPY_CACHE_DIR`` as it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator

import numpy as np

from tests.emulation import array, cublas, kernels, memory, runtime

__all__ = ["VERSION", "build", "installed"]

VERSION = "14.2.0+cpu.emulation"

_PREFIXES = ("cupy", "cupyx", "gpu")


def _module(name: str, attrs: dict, doc: str) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attrs)
    return module


def _numpy_fallback(name: str):
    """``cupy.<name>`` for anything not defined here: NumPy's types and constants, wrapped functions."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        target = getattr(np, name)
    except AttributeError:
        raise AttributeError(f"the emulated cupy has no attribute {name!r}") from None
    if isinstance(target, type) or isinstance(target, np.dtype):
        return target
    if isinstance(target, types.ModuleType):
        raise AttributeError(f"the emulated cupy has no submodule {name!r}")
    if callable(target):
        return array.function(name)
    return target


def build() -> dict[str, types.ModuleType]:
    """The stand-in's modules by name: cupy, cupy.cuda and its runtime, device, cublas and memory."""
    cublas_module = _module(
        "cupy.cuda.cublas",
        {
            k: getattr(cublas, k)
            for k in dir(cublas)
            if not k.startswith("_") and k not in ("np", "ctypes", "memory")
        },
        "cuBLAS in NumPy (tests/emulation/cublas.py).",
    )
    runtime_module = _module(
        "cupy.cuda.runtime",
        {
            name: getattr(runtime, name)
            for name in (
                "getDeviceCount",
                "getDevice",
                "setDevice",
                "getDeviceProperties",
                "driverGetVersion",
                "runtimeGetVersion",
                "deviceSynchronize",
                "memGetInfo",
            )
        },  # fmt: skip
        "The CUDA runtime queries of the emulated device.",
    )
    device_module = _module(
        "cupy.cuda.device",
        {"Device": runtime.Device, "get_cublas_handle": runtime.get_cublas_handle},
        "The emulated device.",
    )
    memory_module = _module(
        "cupy.cuda.memory",
        {
            "MemoryPool": memory.MemoryPool,
            "MemoryPointer": array.MemoryPointer,
            "set_allocator": runtime.set_allocator,
        },
        "The emulated memory pool.",
    )
    cuda = _module(
        "cupy.cuda",
        {
            "Device": runtime.Device,
            "Event": runtime.Event,
            "Stream": runtime.Stream,
            "get_current_stream": runtime.get_current_stream,
            "get_elapsed_time": runtime.get_elapsed_time,
            "set_allocator": runtime.set_allocator,
            "get_allocator": runtime.get_allocator,
            "set_pinned_memory_allocator": runtime.set_pinned_memory_allocator,
            "MemoryPool": memory.MemoryPool,
            "MemoryPointer": array.MemoryPointer,
            "runtime": runtime_module,
            "device": device_module,
            "cublas": cublas_module,
            "memory": memory_module,
            "is_available": lambda: True,
        },
        "cupy.cuda, emulated on the CPU.",
    )
    cupy = _module(
        "cupy",
        {
            **array.EXPORTS,
            "__version__": VERSION,
            "cuda": cuda,
            "ElementwiseKernel": kernels.ElementwiseKernel,
            "ReductionKernel": kernels.ReductionKernel,
            "RawModule": kernels.RawModule,
            "RawKernel": kernels.RawKernel,
            "get_default_memory_pool": lambda: memory.POOL,
            "get_default_pinned_memory_pool": lambda: memory.MemoryPool(),
            "is_available": lambda: True,
            "newaxis": None,
            "__getattr__": _numpy_fallback,
        },
        "A stand-in for CuPy that runs on the CPU (tests/emulation): see tests/emulation/__init__.py.",
    )
    return {m.__name__: m for m in (cupy, cuda, runtime_module, device_module, cublas_module, memory_module)}


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PREFIXES)


def _snapshot(modules: dict[str, types.ModuleType]) -> list[tuple[dict, dict]]:
    """Copies of the mutable state of already-imported ``gpu`` modules: kernel caches, module dicts."""
    saved = []
    for name, module in modules.items():
        if not name.startswith("gpu"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, dict) and not attr.startswith("__"):
                saved.append((value, dict(value)))
            elif type(value).__module__.startswith("gpu") and hasattr(value, "__dict__"):
                # an object of the twin (a declared Kernel): its caches (_built, functions)
                saved.extend(
                    (cache, dict(cache)) for cache in vars(value).values() if isinstance(cache, dict)
                )
    return saved


_depth = {"n": 0}


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Install the stand-in as ``cupy`` (re-entrant); yields the ``cupy`` module."""
    if _depth["n"] > 0:
        _depth["n"] += 1
        try:
            yield sys.modules["cupy"]
        finally:
            _depth["n"] -= 1
        return
    before = {name: module for name, module in sys.modules.items() if _ours(name)}
    state = _snapshot(before)
    env = os.environ.get("CUPY_CACHE_DIR")
    for name in before:
        del sys.modules[name]
    stand_in = build()
    sys.modules.update(stand_in)
    _depth["n"] = 1
    try:
        yield stand_in["cupy"]
    finally:
        _depth["n"] = 0
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(before)
        for target, copy in state:
            target.clear()
            target.update(copy)
        if env is None:
            os.environ.pop("CUPY_CACHE_DIR", None)
        else:
            os.environ["CUPY_CACHE_DIR"] = env
