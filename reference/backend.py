"""Which array library holds an array, and moving arrays between host and GPU.

Everything above the kernels is written once for both backends: NumPy arrays
live in host memory, CuPy arrays on the GPU. The few places that must know the
difference (checkpoints read from the host, a host-computed mask written into a
device array, a model moved to ``--device cuda``) use these helpers, so CuPy is
imported only when a CuPy array or the ``cuda`` device is actually seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reference.errors import ConfigError

__all__ = [
    "DEVICES",
    "array_module",
    "check_device",
    "copy_into",
    "device_of",
    "is_device_array",
    "like",
    "to_device",
    "to_host",
]

DEVICES = ("cpu", "cuda")


def is_device_array(array: Any) -> bool:
    """True for a CuPy array (GPU memory), False for NumPy arrays and Python numbers."""
    return type(array).__module__.split(".")[0] == "cupy"


def device_of(array: Any) -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "cuda" if is_device_array(array) else "cpu"


def array_module(array: Any) -> Any:
    """``cupy`` for a CuPy array, ``numpy`` otherwise (as ``cupy.get_array_module``)."""
    if is_device_array(array):
        import cupy

        return cupy
    return np


def to_host(array: Any) -> np.ndarray:
    """A NumPy view or copy of ``array`` (CuPy arrays are copied to the host)."""
    if is_device_array(array):
        return array.get()
    return np.asarray(array)


def like(values: Any, reference: Any) -> Any:
    """``values`` as an array on ``reference``'s backend (copied to the GPU when it is a CuPy array)."""
    if is_device_array(reference):
        import cupy

        return cupy.asarray(values)
    return np.asarray(to_host(values))


def copy_into(dst: Any, src: Any) -> None:
    """Overwrite ``dst``'s values with ``src`` in place (cast to ``dst``'s dtype), keeping ``dst``."""
    if is_device_array(dst):
        if is_device_array(src):
            dst[...] = src
        else:  # host memory to the device, in place (np.asarray keeps a 0-d array 0-d;
            # np.ascontiguousarray would make it 1-d, which ndarray.set refuses)
            dst.set(np.asarray(src, dtype=dst.dtype, order="C"))
    else:
        np.copyto(dst, to_host(src), casting="unsafe")


def check_device(device: Any) -> str:
    """Validate a device name; for ``"cuda"``, also that CuPy and a GPU can be used.

    Raises :class:`reference.errors.ConfigError` naming the value, or
    ``gpu.DeviceUnavailable`` (a ConfigError) saying why the GPU cannot be used.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        try:
            import gpu
        except ImportError as exc:  # CuPy itself is missing: gpu imports it lazily, but be safe
            raise ConfigError(f"device 'cuda' is not available: {exc}; use --device cpu") from None
        gpu.require()
    return device


def to_device(array: Any, device: str) -> Any:
    """``array`` on ``device`` (``"cpu"``: a NumPy array; ``"cuda"``: a CuPy array); no copy if already there."""
    if device == "cuda":
        if is_device_array(array):
            return array
        import cupy

        return cupy.asarray(array)
    if device == "cpu":
        return to_host(array)
    raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
