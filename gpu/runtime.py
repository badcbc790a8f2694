"""The GPU runtime in one place: the device check, the memory pool, precision and the kernel cache.

Precision. Every array the twin keeps (parameters, activations, gradients,
optimizer state) is float32, as in the reference. What changes with the
precision setting is the arithmetic of the GEMMs that carry the convolutions
and the linear layers (:mod:`gpu.blas`):

- ``"tf32"`` (the default): float32 in and out, products on the tensor cores in
  TF32 (10-bit mantissa), sums in float32. PyTorch's default for convolutions.
- ``"fp32"``: full float32 products (no tensor cores); what the agreement tests
  use, so that differences from the reference are rounding, not TF32.
- ``"bf16"``: mixed precision. The two GEMM operands are rounded to bfloat16 on
  the way in (the float32 master weights are never overwritten), products and
  sums run in float32, and the result is float32.

float64 arrays always get float64 GEMMs, whatever the setting.

Memory. CuPy's default pool caches freed device blocks for the next step (the
role glibc's heap plays for :mod:`reference.runtime`); :func:`memory_stats`
reads it, for the benchmarks' peak-memory figures.

Kernel cache. CuPy compiles each CUDA kernel on its first launch and keeps the
binary in ``CUPY_CACHE_DIR``. Importing this module points that at
``~/.cache/learnsparse/cupy`` unless the variable is already set, so a second
run starts without recompiling. It has to happen here, at import: every path
into CuPy through this package (:mod:`gpu` imports this module first, and
:func:`unavailable_reason` is where CuPy is first imported) comes after it,
and CuPy may read the variable when it is imported. A program that imported
CuPy itself before :mod:`gpu` should set the variable itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reference.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "DeviceUnavailable",
    "available",
    "configure",
    "describe",
    "get_precision",
    "memory_stats",
    "precision",
    "require",
    "set_precision",
    "synchronize",
    "unavailable_reason",
]

PRECISIONS = ("tf32", "fp32", "bf16")
_state = {"precision": "tf32", "configured": False}
KERNEL_CACHE_DIR = Path.home() / ".cache" / "learnsparse" / "cupy"  # unless CUPY_CACHE_DIR says otherwise

# Before anything here imports CuPy (see the module docstring); a value the user set is kept.
os.environ.setdefault("CUPY_CACHE_DIR", str(KERNEL_CACHE_DIR))


class DeviceUnavailable(ConfigError):
    """``--device cuda`` was asked for, but CuPy or a CUDA GPU is missing."""


def unavailable_reason() -> str | None:
    """None when CuPy imports and sees at least one GPU; otherwise the reason, in words."""
    try:
        import cupy
    except ImportError as exc:
        return (
            f"CuPy is not installed ({exc}); install the GPU extra with "
            "pip install 'learnsparse[cuda]' (CUDA 13) on a machine with an NVIDIA GPU"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        return f"CuPy cannot reach a CUDA GPU: {exc}"
    if count < 1:
        return "CuPy sees no CUDA GPU on this machine"
    return None


def available() -> bool:
    """Whether CuPy is installed and a CUDA GPU can be used."""
    return unavailable_reason() is None


def require() -> None:
    """Raise :class:`DeviceUnavailable` (naming the reason) unless a CUDA GPU can be used."""
    why = unavailable_reason()
    if why is not None:
        raise DeviceUnavailable(f"device 'cuda' is not available: {why}; use --device cpu")
    configure()


def configure() -> None:
    """One-time process settings: the memory pool (the kernel cache directory is set at import)."""
    if _state["configured"]:
        return
    import cupy

    cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
    _state["configured"] = True


def describe() -> dict[str, Any]:
    """The device, driver and library versions, for benchmark records."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{props['major']}.{props['minor']}",
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "driver": cupy.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cupy": cupy.__version__,
        "precision": get_precision(),
    }


def get_precision() -> str:
    """The GEMM precision now in force: one of :data:`PRECISIONS`."""
    return str(_state["precision"])


def set_precision(name: str) -> None:
    """Set the GEMM precision for every later op (see the module docstring)."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    _state["precision"] = name


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """Run a block with GEMM precision ``name``, restoring the previous one after."""
    previous = get_precision()
    set_precision(name)
    try:
        yield
    finally:
        set_precision(previous)


def synchronize() -> None:
    """Wait for every kernel queued on the current device (timing and metric reads only)."""
    import cupy

    cupy.cuda.Device().synchronize()


def memory_stats() -> dict[str, int]:
    """Bytes held by the pool now, and the most it has held (CuPy tracks the total it owns)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    return {"used_bytes": int(pool.used_bytes()), "total_bytes": int(pool.total_bytes())}
