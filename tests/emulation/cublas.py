"""``cupy.cuda.cublas.gemmEx`` and ``gemmStridedBatchedEx`` in NumPy, under cuBLAS's exact contract.

Matrices are column-major: element (i, j) of a matrix with leading dimension
``ld`` is at ``ptr + (i + j ld) * itemsize``, and batch b starts ``b * stride``
elements further. For ``C = alpha op(A) op(B) + beta C`` (op(A) m x k, op(B)
k x n, C m x n) every call is checked before it runs:

- the handle is the one ``cupy.cuda.device.get_cublas_handle()`` gave;
- the data and compute types are a combination cuBLAS accepts;
- each of A, B, C points into a live device allocation, aligned to its element
  size, with ``ld >= max(1, rows as stored)``, a stride >= 0, and its whole
  footprint ``(batch - 1) stride + (cols - 1) ld + rows`` inside the allocation;
- C's footprint overlaps neither A's nor B's, and C's batches do not overlap;
- alpha and beta are host memory in host pointer mode, device memory in device mode.

Arithmetic: CUBLAS_COMPUTE_64F in float64; CUBLAS_COMPUTE_32F in float32
(bfloat16 and float16 operands widened exactly); CUBLAS_COMPUTE_32F_FAST_TF32
rounds both float32 operands to TF32 (10-bit mantissa, round to nearest even)
and sums in float32. With beta = 0, C is not read (NaN there does not leak).
"""

from __future__ import annotations

import ctypes

import numpy as np
from numpy.lib.stride_tricks import as_strided

from tests.emulation import memory
from tests.emulation.build import EmulationError

__all__ = ["gemmEx", "gemmStridedBatchedEx", "get_handle", "round_tf32", "setPointerMode", "getPointerMode"]

CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C = 0, 1, 2
CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH = 0, 3
CUDA_R_16F, CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF = 2, 0, 1, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC = (
    68,
    69,
    70,
    71,
)
CUBLAS_COMPUTE_32F_FAST_TF32 = 77
CUBLAS_GEMM_DEFAULT = -1

_TYPES = {CUDA_R_32F: ("CUDA_R_32F", 4), CUDA_R_64F: ("CUDA_R_64F", 8), CUDA_R_16BF: ("CUDA_R_16BF", 2),
          CUDA_R_16F: ("CUDA_R_16F", 2)}  # fmt: skip
_COMPUTE = {
    CUBLAS_COMPUTE_32F: "CUBLAS_COMPUTE_32F",
    CUBLAS_COMPUTE_32F_PEDANTIC: "CUBLAS_COMPUTE_32F_PEDANTIC",
    CUBLAS_COMPUTE_64F: "CUBLAS_COMPUTE_64F",
    CUBLAS_COMPUTE_64F_PEDANTIC: "CUBLAS_COMPUTE_64F_PEDANTIC",
    CUBLAS_COMPUTE_32F_FAST_TF32: "CUBLAS_COMPUTE_32F_FAST_TF32",
}
# (A type, B type, C type) accepted per compute type (cublasGemmEx's table, the rows emulated here)
_ALLOWED = {
    "64F": {(CUDA_R_64F, CUDA_R_64F, CUDA_R_64F)},
    "32F": {
        (CUDA_R_32F, CUDA_R_32F, CUDA_R_32F),
        (CUDA_R_16BF, CUDA_R_16BF, CUDA_R_32F),
        (CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF),
        (CUDA_R_16F, CUDA_R_16F, CUDA_R_32F),
        (CUDA_R_16F, CUDA_R_16F, CUDA_R_16F),
    },
    "TF32": {(CUDA_R_32F, CUDA_R_32F, CUDA_R_32F)},
}

_HANDLE = 0x7E57_0000
_pointer_mode = {_HANDLE: CUBLAS_POINTER_MODE_HOST}


def get_handle() -> int:
    return _HANDLE


def _check_handle(handle: int, what: str) -> None:
    if handle not in _pointer_mode:
        raise EmulationError(
            f"{what}: {handle!r} is not a cuBLAS handle (use cupy.cuda.device.get_cublas_handle())"
        )


def setPointerMode(handle: int, mode: int) -> None:  # noqa: N802  (cuBLAS's name)
    _check_handle(handle, "setPointerMode")
    if mode not in (CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE):
        raise EmulationError(f"setPointerMode: mode must be 0 (host) or 1 (device), got {mode!r}")
    _pointer_mode[handle] = mode


def getPointerMode(handle: int) -> int:  # noqa: N802
    _check_handle(handle, "getPointerMode")
    return _pointer_mode[handle]


def setMathMode(handle: int, mode: int) -> None:  # noqa: N802
    _check_handle(handle, "setMathMode")


def getMathMode(handle: int) -> int:  # noqa: N802
    _check_handle(handle, "getMathMode")
    return CUBLAS_DEFAULT_MATH


def round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (sign, 8-bit exponent, 10-bit mantissa), to nearest, ties to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    lsb = (bits >> np.uint32(13)) & np.uint32(1)
    rounded = (bits + np.uint32(0x0FFF) + lsb) & np.uint32(0xFFFFE000)
    return np.where(finite, rounded, bits).view(np.float32)


def _to_float(raw: np.ndarray, dtype_code: int) -> np.ndarray:
    """Stored values (raw bytes viewed by element) as float32/float64 (exact widening)."""
    if dtype_code == CUDA_R_32F:
        return raw.view(np.float32)
    if dtype_code == CUDA_R_64F:
        return raw.view(np.float64)
    if dtype_code == CUDA_R_16F:
        return raw.view(np.float16).astype(np.float32)
    # bfloat16: the high half of a float32
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _from_float(values: np.ndarray, dtype_code: int) -> np.ndarray:
    """float32/float64 values as the stored type's bytes (bfloat16: round to nearest even)."""
    if dtype_code == CUDA_R_32F:
        return values.astype(np.float32).view(np.uint8)
    if dtype_code == CUDA_R_64F:
        return values.astype(np.float64).view(np.uint8)
    if dtype_code == CUDA_R_16F:
        return values.astype(np.float16).view(np.uint8)
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values)
    rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16).view(np.uint8)


class _Operand:
    """One of A, B, C: where it lives and the (batch, rows, cols) column-major view of it."""

    def __init__(self, call: str, name: str, ptr: int, dtype_code: int, rows: int, cols: int, ld: int,
                 stride: int, batch: int, min_ld: int):  # fmt: skip
        if dtype_code not in _TYPES:
            raise EmulationError(f"{call}: {name}type = {dtype_code!r} is not a data type emulated here")
        type_name, itemsize = _TYPES[dtype_code]
        self.name, self.dtype_code, self.itemsize = name, dtype_code, itemsize
        if not isinstance(ld, (int, np.integer)) or ld < max(1, min_ld):
            raise EmulationError(
                f"{call}: ld{name.lower()} = {ld!r} is less than max(1, {min_ld}), the rows of {name} as stored "
                f"(column-major)"
            )
        if stride < 0:
            raise EmulationError(f"{call}: stride{name} = {stride} is negative")
        self.alloc = memory.find(ptr)
        if self.alloc is None:
            raise EmulationError(f"{call}: {name} = {ptr:#x} is not a pointer into a live device allocation")
        offset = ptr - self.alloc.start
        if offset % itemsize:
            raise EmulationError(
                f"{call}: {name} = {ptr:#x} is not aligned to its {itemsize}-byte {type_name} elements"
            )
        elements = (batch - 1) * stride + (cols - 1) * ld + rows if rows and cols and batch else 0
        self.start, self.end = ptr, ptr + elements * itemsize
        if self.end > self.alloc.end:
            raise EmulationError(
                f"{call}: {name}'s footprint ({rows} x {cols}, ld{name.lower()} = {ld}, stride {stride}, "
                f"batch {batch}, {type_name}) ends {self.end - self.alloc.end} bytes past its allocation "
                f"of {self.alloc.nbytes} bytes at {self.alloc.start:#x}"
            )
        buffer = self.alloc.buffer()
        raw = buffer[offset : offset + elements * itemsize]
        element = raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize])
        self.raw = as_strided(
            element, shape=(batch, rows, cols), strides=(stride * itemsize, itemsize, ld * itemsize), writeable=True
        ) if elements else np.zeros((batch, rows, cols), element.dtype)  # fmt: skip
        self.buffer = buffer  # keeps the memory alive while the call runs

    def values(self) -> np.ndarray:
        return _to_float(np.ascontiguousarray(self.raw), self.dtype_code)

    def overlaps(self, other: _Operand) -> bool:
        return self.start < other.end and other.start < self.end


def _scalar(call: str, name: str, ptr: int, handle: int, double: bool) -> float:
    in_device = memory.find(ptr) is not None
    mode = _pointer_mode[handle]
    if mode == CUBLAS_POINTER_MODE_HOST and in_device:
        raise EmulationError(f"{call}: {name} = {ptr:#x} is device memory, but the pointer mode is host")
    if mode == CUBLAS_POINTER_MODE_DEVICE and not in_device:
        raise EmulationError(
            f"{call}: {name} = {ptr:#x} is not device memory, but the pointer mode is device"
        )
    if not ptr:
        raise EmulationError(f"{call}: {name} is a null pointer")
    return (ctypes.c_double if double else ctypes.c_float).from_address(ptr).value


def _op(call: str, name: str, trans: int) -> bool:
    if trans not in (CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C):
        raise EmulationError(f"{call}: trans{name.lower()} = {trans!r} is not CUBLAS_OP_N, _T or _C")
    return trans != CUBLAS_OP_N  # real types: C is T


def _gemm(call, handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb, stride_b, beta, c,
          ctype, ldc, stride_c, batch, compute, algo):  # fmt: skip
    _check_handle(handle, call)
    for name, v in (("m", m), ("n", n), ("k", k), ("batchCount", batch)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise EmulationError(f"{call}: {name} = {v!r} must be an integer >= 0")
    if compute not in _COMPUTE:
        raise EmulationError(f"{call}: computeType = {compute!r} is not a cublasComputeType_t emulated here")
    kind = {68: "32F", 69: "32F", 70: "64F", 71: "64F", 77: "TF32"}[compute]
    if (atype, btype, ctype) not in _ALLOWED[kind]:
        names = tuple(_TYPES.get(t, (str(t),))[0] for t in (atype, btype, ctype))
        raise EmulationError(f"{call}: types A, B, C = {names} are not allowed with {_COMPUTE[compute]}")
    ta, tb = _op(call, "A", transa), _op(call, "B", transb)
    if m == 0 or n == 0 or batch == 0:
        return
    # A is stored (k, m) when transposed, else (m, k); B (n, k) or (k, n); C (m, n)
    a_rows, a_cols = (k, m) if ta else (m, k)
    b_rows, b_cols = (n, k) if tb else (k, n)
    op_a = _Operand(call, "A", a, atype, a_rows, a_cols, lda, stride_a, batch, a_rows)
    op_b = _Operand(call, "B", b, btype, b_rows, b_cols, ldb, stride_b, batch, b_rows)
    op_c = _Operand(call, "C", c, ctype, m, n, ldc, stride_c, batch, m)
    if batch > 1 and stride_c < ldc * n:
        raise EmulationError(f"{call}: strideC = {stride_c} < ldc * n = {ldc * n}: the batches of C overlap")
    for other in (op_a, op_b):
        if k > 0 and op_c.overlaps(other):
            raise EmulationError(f"{call}: C's footprint overlaps {other.name}'s (cuBLAS needs them apart)")
    double = kind == "64F"
    alpha_v = _scalar(call, "alpha", alpha, handle, double)
    beta_v = _scalar(call, "beta", beta, handle, double)
    work = np.float64 if double else np.float32
    if k > 0:
        va, vb = op_a.values().astype(work, copy=False), op_b.values().astype(work, copy=False)
        if kind == "TF32":
            va, vb = round_tf32(va), round_tf32(vb)
        opa = np.swapaxes(va, 1, 2) if ta else va
        opb = np.swapaxes(vb, 1, 2) if tb else vb
        product = np.matmul(opa, opb)  # (batch, m, n), sums in `work`
    else:
        product = np.zeros((batch, m, n), work)
    result = work(alpha_v) * product
    if beta_v != 0:
        result = result + work(beta_v) * op_c.values().astype(work, copy=False)
    stored = _from_float(np.ascontiguousarray(result), ctype)
    op_c.raw[...] = stored.view(op_c.raw.dtype).reshape(result.shape)


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,  # noqa: N802,N803
           computeType, algo):  # noqa: N803  # fmt: skip
    """cublasGemmEx: ``C = alpha op(A) op(B) + beta C``, column-major (see the module docstring)."""
    _gemm("gemmEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta, C, Ctype,
          ldc, 0, 1, computeType, algo)  # fmt: skip


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,  # noqa: N802,N803
                         strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):  # noqa: N803  # fmt: skip
    """cublasGemmStridedBatchedEx: ``gemmEx`` on ``batchCount`` matrices ``stride`` elements apart."""
    _gemm("gemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
          strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo)  # fmt: skip
