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

bfloat16 operands. Under ``bf16`` a float32 operand is rounded to a bfloat16
copy on every call, except one that is already bfloat16: :func:`gemm_operand`
makes that copy once, for an operand used by several GEMMs. The convolutions
(:mod:`gpu.ops.conv`, general and pointwise paths) convert their weight once
per forward and keep the copy in the op's cache, so every chunk and group of
the forward and the input gradient of the backward reuse it: the weight is
rounded once per training step instead of once per GEMM call, the same
values as rounding on every call (the same float32 in, the same
round-to-nearest-even out). The activations (im2col columns, ``dy``) and
the operands of ``linear`` and ``matmul`` are still rounded per call. The
copy lives only from an op's forward to its backward, when the tape already
assumes the weight unchanged, so it cannot go stale when the weight is
written between steps (optimizer, pruning masks, a loaded checkpoint). A
bfloat16 operand met under another precision is widened back to float32,
exactly.

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

__all__ = ["gemm", "gemm_batched", "gemm_operand"]

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


def _is_bfloat16(dtype: Any) -> bool:
    return getattr(dtype, "name", "") == "bfloat16"


def _arithmetic_dtype(x) -> Any:
    """The dtype ``x`` stands for in a GEMM: float32 for a bfloat16 operand (a rounded float32)."""
    return np.dtype(np.float32) if _is_bfloat16(x.dtype) else x.dtype


def _operand(x, operand_type: int):
    """``x`` C-contiguous, and rounded to bfloat16 when the plan asks for it (a copy)."""
    import cupy

    if _is_bfloat16(x.dtype):  # already rounded (gemm_operand); widened exactly for another plan
        return cupy.ascontiguousarray(x if operand_type == _CUDA_R_16BF else x.astype(np.float32))
    if operand_type == _CUDA_R_16BF:
        return cupy.ascontiguousarray(x.astype(_bfloat16()))
    return cupy.ascontiguousarray(x)


def gemm_operand(x):
    """``x`` as it enters a GEMM under the current precision, for reuse by several GEMMs.

    Under ``bf16`` a float32 ``x`` becomes a C-contiguous bfloat16 copy (the
    rounding every call would otherwise repeat); otherwise ``x`` itself,
    C-contiguous. :func:`gemm` and :func:`gemm_batched` take either form.
    """
    import cupy

    if x.dtype == np.float32 and runtime.get_precision() == "bf16":
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

    dtype = _arithmetic_dtype(a)
    if a.ndim != 2 or b.ndim != 2 or dtype != _arithmetic_dtype(b):
        raise ValueError(
            f"gemm expects two 2-D arrays of one dtype, got {a.shape} {a.dtype}, {b.shape} {b.dtype}"
        )
    m, n, k = _dims(a.shape, b.shape, trans_a, trans_b)
    operand_type, result_type, compute, scale = _plan(dtype)
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate=True needs an out array to add into")
        out = cupy.empty((m, n), dtype=dtype)
    elif out.shape != (m, n) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"gemm: out must be C-contiguous ({m}, {n}) {dtype}, got {out.shape} {out.dtype}")
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

    dtype = _arithmetic_dtype(a)
    if dtype != _arithmetic_dtype(b) or a.ndim not in (2, 3) or b.ndim not in (2, 3) or a.ndim + b.ndim < 5:
        raise ValueError(
            f"gemm_batched expects (B, ., .) arrays (one may be 2-D) of one dtype, got {a.shape} {a.dtype}, "
            f"{b.shape} {b.dtype}"
        )
    batch = a.shape[0] if a.ndim == 3 else b.shape[0]
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"gemm_batched: batch sizes differ, {a.shape[0]} and {b.shape[0]}")
    m, n, k = _dims(a.shape, b.shape, trans_a, trans_b)
    operand_type, result_type, compute, scale = _plan(dtype)
    out = cupy.empty((batch, m, n), dtype=dtype)
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
