"""What each op accepts: argument checks shared by both kernel sets.

The NumPy kernels (``reference.ops``) and the CuPy kernels (``gpu.ops``) are
independent implementations of the same arithmetic, but an op's contract (the
shapes, geometries and settings it accepts, and the words of the error when
they are wrong) is one thing, so it is written once, here. These functions
read only shapes, dtypes and Python settings, never array values, so calling
them never synchronises with a GPU.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from reference.errors import ConfigError, ShapeError

__all__ = [
    "PoolGeometry",
    "batch_norm_channels",
    "check_scp_settings",
    "conv2d_geometry",
    "cross_entropy_shapes",
    "linear_shapes",
    "ltp_temperature",
    "matmul_shapes",
    "pair",
    "pool_geometry",
]


def pair(value: Any, name: str) -> tuple[int, int]:
    """``v`` -> ``(v, v)``; a pair stays a pair (as ints)."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    both = tuple(int(v) for v in value)
    if len(both) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return both  # type: ignore[return-value]


def conv2d_geometry(
    x, w, b, stride, padding, groups
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate conv2d's arguments; return ``(stride, padding, (Ho, Wo))``."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"conv2d expects x (N, C, H, W) and w (O, C/groups, kh, kw), got x {x.shape} and w {w.shape}"
        )
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d needs stride >= 1 and padding >= 0, got stride {stride}, padding {padding}")
    n_out, c_in_group, kh, kw = w.shape
    if groups < 1 or x.shape[1] % groups or n_out % groups or c_in_group * groups != x.shape[1]:
        raise ValueError(
            f"conv2d with groups={groups}: x has {x.shape[1]} channels and w has shape {w.shape}; "
            f"expected both channel counts divisible by groups and w.shape[1] == {x.shape[1]} / {groups}"
        )
    if b is not None and tuple(b.shape) != (n_out,):
        raise ValueError(f"conv2d bias must have shape ({n_out},), got {b.shape}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        got = f"x {x.dtype}, w {w.dtype}" + ("" if b is None else f", b {b.dtype}")
        raise ValueError(f"conv2d expects one dtype for x, w and b, got {got}")
    ho = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"conv2d output would be empty: input {x.shape[2:]} padded by {padding} is smaller "
            f"than the kernel {(kh, kw)}"
        )
    return stride, padding, (ho, wo)


class PoolGeometry(NamedTuple):
    x_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out: tuple[int, int]


def pool_geometry(op: str, x, kernel_size, stride, padding) -> PoolGeometry:
    """Validate a pooling window against ``x`` and work out the output size."""
    if x.ndim != 4:
        raise ValueError(f"{op} expects x of shape (N, C, H, W), got {x.shape}")
    kernel = pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else pair(stride, "stride")
    padding = pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(
            f"{op} needs kernel_size >= 1, stride >= 1 and padding >= 0, "
            f"got kernel_size {kernel}, stride {stride}, padding {padding}"
        )
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{op} padding {padding} must be at most half the kernel size {kernel}")
    out = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], padding, kernel, stride))
    if min(out) < 1:
        raise ValueError(
            f"{op} output would be empty: input {x.shape[2:]} padded by {padding} is smaller "
            f"than the kernel {kernel}"
        )
    return PoolGeometry(tuple(x.shape), kernel, stride, padding, out)  # type: ignore[arg-type]


def check_scp_settings(k, c0, t, eps) -> None:
    """SCP's mask settings: ``k > 0``, ``t > 0``, ``0 < c0 < 1``, all finite."""
    op = "scp_channel_mask"
    if not (float(k) > 0 and math.isfinite(float(k))):
        raise ConfigError(f"{op}: k must be a finite number > 0, got {k!r}")
    if not (float(t) > 0 and math.isfinite(float(t))):
        raise ConfigError(f"{op}: t must be a finite number > 0, got {t!r}")
    if not (0 < float(c0) < 1):
        raise ConfigError(f"{op}: c0 must lie strictly between 0 and 1, got {c0!r}")
    if not math.isfinite(float(eps)):
        raise ConfigError(f"{op}: eps must be a finite number, got {eps!r}")


def ltp_temperature(op: str, temperature: Any, dtype: Any) -> float:
    """LTP's temperature ``T`` (a number or a 0-d host array) as a Python float.

    ``T`` must be finite, > 0 and nonzero once rounded to ``dtype`` (the weight's
    dtype, in which the kernels divide by it): below half the smallest subnormal
    (about 7e-46 in float32, 2.5e-324 in float64) it rounds to 0 and ``W^2 = tau``
    would give ``0 / 0``. A device array is the caller's to handle (its value is
    not read here).
    """
    if isinstance(temperature, np.ndarray):
        if temperature.shape != ():
            raise ShapeError(
                f"{op} expects temperature as a number or a 0-d array, got shape {temperature.shape}"
            )
        temperature = temperature.item()
    value = float(temperature)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    dtype = np.dtype(dtype)
    if dtype.type(value) == 0:
        raise ConfigError(
            f"{op}: temperature {temperature!r} rounds to 0 in {dtype.name}, the weight's dtype; "
            f"expected a number >= {float(np.finfo(dtype).smallest_subnormal):.3g}, "
            f"the smallest positive {dtype.name}"
        )
    return value


def batch_norm_channels(x, gamma, beta, running_mean, running_var, training: bool) -> int:
    """Validate batch norm's inputs (x (N, C, ...), per-channel vectors (C,) or None); return C."""
    if x.ndim < 2:
        raise ShapeError(f"batch_norm expects x of shape (N, C) or (N, C, H, W), got {tuple(x.shape)}")
    channels = x.shape[1]
    if not training and (running_mean is None or running_var is None):
        raise ShapeError("batch_norm in evaluation mode needs running_mean and running_var, got None")
    per_channel_inputs = {"gamma": gamma, "beta": beta}
    if not training:
        per_channel_inputs.update(running_mean=running_mean, running_var=running_var)
    for name, v in per_channel_inputs.items():
        if v is not None and tuple(v.shape) != (channels,):
            raise ShapeError(f"batch_norm expects {name} of shape ({channels},), got {tuple(v.shape)}")
    return channels


def cross_entropy_shapes(logits, labels) -> tuple[int, int]:
    """Validate (N, K) logits against (N,) integer labels, N >= 1; return ``(N, K)``.

    The label *values* are not read here (that would synchronise with a GPU).
    """
    if logits.ndim != 2:
        raise ShapeError(f"softmax_cross_entropy expects logits of shape (N, K), got {tuple(logits.shape)}")
    n, k = logits.shape
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ShapeError(
            f"softmax_cross_entropy expects integer labels of shape ({n},), "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if n == 0:
        raise ShapeError("softmax_cross_entropy needs at least one row of logits, got N = 0")
    return n, k


def matmul_shapes(a, b) -> None:
    """matmul's operands: (..., m, k) and (..., k, n)."""
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(
            f"matmul expects a of shape (..., m, k) and b of shape (..., k, n), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(
            f"matmul: inner sizes differ, a is {tuple(a.shape)} (k={a.shape[-1]}) "
            f"and b is {tuple(b.shape)} (k={b.shape[-2]})"
        )


def linear_shapes(x, w, b) -> None:
    """linear's operands: x (..., in), w (out, in), b (out,) or None."""
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeError(
            f"linear expects x of shape (..., in) and w of shape (out, in), "
            f"got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ShapeError(f"linear expects a bias of shape ({w.shape[0]},), got {tuple(b.shape)}")
