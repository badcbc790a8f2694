"""GEMM through cuBLAS with an explicit compute type (the precision of :mod:`gpu.runtime`).

``cupy.matmul`` picks its own compute type (TF32 only with ``CUPY_TF32=1``, and
never for batched products), so every product in the twin goes through
:func:`gemm` or :func:`gemm_batched`, which call ``cublasGemmEx`` and
``cublasGemmStridedBatchedEx`` with the compute type named by the precision
setting:

=========  ==========================  ===========================  ==========
precision  operands (A, B)             compute type                 result C
=========  ==========================  ===========================  ==========
fp32       float32                     CUBLAS_COMPUTE_32F           float32
tf32       float32                     CUBLAS_COMPUTE_32F_FAST_TF32 float32
bf16       bfloat16 copies of float32  CUBLAS_COMPUTE_32F           float32
(any)      float64                     CUBLAS_COMPUTE_64F           float64
=========  ==========================  ===========================  ==========

Row-major arrays and cuBLAS's column-major convention. A C-contiguous (r, c)
array read column-major is its transpose, (c, r) with leading dimension c. So
the row-major product ``C = op(A) op(B)`` (m, n) is computed as the
column-major ``C^T = op(B)^T op(A)^T``: B is passed first, the transpose flags
keep their meaning, and every leading dimension is the stored row length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu import runtime

__all__ = ["gemm", "gemm_batched"]

# cuBLAS and CUDA library constants (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16BF = 0, 1, 14
_COMPUTE_32F, _COMPUTE_64F, _COMPUTE_32F_FAST_TF32 = 68, 70, 77
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0

_ONE = {np.float32: np.ones((), np.float32), np.float64: np.ones((), np.float64)}
_ZERO = {np.float32: np.zeros((), np.float32), np.float64: np.zeros((), np.float64)}


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        raise runtime.DeviceUnavailable(
            "precision 'bf16' needs the ml_dtypes package (pip install ml_dtypes)"
        ) from None
    return ml_dtypes.bfloat16


def _plan(dtype: Any) -> tuple[int, int, int, Any]:
    """``(operand type, result type, compute type, scale dtype)`` for arrays of ``dtype``."""
    if dtype == np.float64:
        return _CUDA_R_64F, _CUDA_R_64F, _COMPUTE_64F, np.float64
    if dtype != np.float32:
        raise TypeError(f"gemm supports float32 and float64 arrays, got {dtype}")
    name = runtime.get_precision()
    if name == "tf32":
        return _CUDA_R_32F, _CUDA_R_32F, _COMPUTE_32F_FAST_TF32, np.float32
    if name == "bf16":
        return _CUDA_R_16BF, _CUDA_R_32F, _COMPUTE_32F, np.float32
    return _CUDA_R_32F, _CUDA_R_32F, _COMPUTE_32F, np.float32


def _operand(x, operand_type: int):
    """``x`` C-contiguous, and rounded to bfloat16 when the plan asks for it (a copy)."""
    import cupy

    if operand_type == _CUDA_R_16BF:
        return cupy.ascontiguousarray(x.astype(_bfloat16()))
    return cupy.ascontiguousarray(x)


def _dims(a_shape, b_shape, trans_a: bool, trans_b: bool) -> tuple[int, int, int]:
    m, k = (a_shape[-1], a_shape[-2]) if trans_a else (a_shape[-2], a_shape[-1])
    k_b, n = (b_shape[-1], b_shape[-2]) if trans_b else (b_shape[-2], b_shape[-1])
    if k != k_b:
        raise ValueError(f"gemm: inner sizes differ, op(A) is ({m}, {k}) and op(B) is ({k_b}, {n})")
    return m, n, k


def _handle() -> int:
    import cupy
    from cupy.cuda import cublas

    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_MODE_HOST)  # alpha and beta live in host memory
    return handle


def gemm(a, b, *, trans_a: bool = False, trans_b: bool = False, out=None, accumulate: bool = False):
    """``op(a) @ op(b)`` for 2-D CuPy arrays, ``op`` the transpose where asked.

    ``out`` (C-contiguous, (m, n), the result dtype) receives the product; with
    ``accumulate`` the product is added to what ``out`` holds (``beta = 1``).
    """
    import cupy
    from cupy.cuda import cublas

    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
        raise ValueError(
            f"gemm expects two 2-D arrays of one dtype, got {a.shape} {a.dtype}, {b.shape} {b.dtype}"
        )
    m, n, k = _dims(a.shape, b.shape, trans_a, trans_b)
    operand_type, result_type, compute, scale = _plan(a.dtype)
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate=True needs an out array to add into")
        out = cupy.empty((m, n), dtype=a.dtype)
    elif out.shape != (m, n) or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError(f"gemm: out must be C-contiguous ({m}, {n}) {a.dtype}, got {out.shape} {out.dtype}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out.fill(0)
        return out
    a_c, b_c = _operand(a, operand_type), _operand(b, operand_type)
    one, beta = _ONE[scale], (_ONE if accumulate else _ZERO)[scale]
    cublas.gemmEx(
        _handle(),
        _OP_T if trans_b else _OP_N,
        _OP_T if trans_a else _OP_N,
        n,
        m,
        k,
        one.ctypes.data,
        b_c.data.ptr,
        operand_type,
        b_c.shape[1],
        a_c.data.ptr,
        operand_type,
        a_c.shape[1],
        beta.ctypes.data,
        out.data.ptr,
        result_type,
        n,
        compute,
        _GEMM_DEFAULT,
    )
    return out


def gemm_batched(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """``op(a[i]) @ op(b[i])`` for every ``i``: (B, ., .) arrays, or one 2-D side shared by all.

    A 2-D operand is broadcast over the batch with stride 0 (no copy).
    """
    import cupy
    from cupy.cuda import cublas

    if a.dtype != b.dtype or a.ndim not in (2, 3) or b.ndim not in (2, 3) or a.ndim + b.ndim < 5:
        raise ValueError(
            f"gemm_batched expects (B, ., .) arrays (one may be 2-D) of one dtype, got {a.shape} {a.dtype}, "
            f"{b.shape} {b.dtype}"
        )
    batch = a.shape[0] if a.ndim == 3 else b.shape[0]
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"gemm_batched: batch sizes differ, {a.shape[0]} and {b.shape[0]}")
    m, n, k = _dims(a.shape, b.shape, trans_a, trans_b)
    operand_type, result_type, compute, scale = _plan(a.dtype)
    out = cupy.empty((batch, m, n), dtype=a.dtype)
    if out.size == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    a_c, b_c = _operand(a, operand_type), _operand(b, operand_type)
    stride_a = a_c.shape[-2] * a_c.shape[-1] if a_c.ndim == 3 else 0
    stride_b = b_c.shape[-2] * b_c.shape[-1] if b_c.ndim == 3 else 0
    one, zero = _ONE[scale], _ZERO[scale]
    cublas.gemmStridedBatchedEx(
        _handle(),
        _OP_T if trans_b else _OP_N,
        _OP_T if trans_a else _OP_N,
        n,
        m,
        k,
        one.ctypes.data,
        b_c.data.ptr,
        operand_type,
        b_c.shape[-1],
        stride_b,
        a_c.data.ptr,
        operand_type,
        a_c.shape[-1],
        stride_a,
        zero.ctypes.data,
        out.data.ptr,
        result_type,
        n,
        m * n,
        batch,
        compute,
        _GEMM_DEFAULT,
    )
    return out
