"""Tests of the CPU execution mode itself (``tests/emulation``): each one can fail.

The emulation is what CI trusts for the GPU twin, so its own claims are pinned
here: barriers are real rendezvous (a missing ``__syncthreads`` gives a wrong
sum), warp shuffles move values between lanes, kernel arguments and cuBLAS
calls are checked against their contracts, cuBLAS is column-major, device
arrays refuse implicit host conversion, host reads can be refused by name, and
everything is put back when the context exits.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from tests import emulation
from tests.emulation import cublas
from tests.emulation.build import EmulationError

# ------------------------------------------------------------------------------ barriers
_TREE_SUM = r"""
extern "C" __global__ void tree_sum(const double* x, double* out, const int n) {
    __shared__ double buf[256];
    const unsigned int tid = threadIdx.x;
    buf[tid] = tid < (unsigned int)n ? x[blockIdx.x * n + tid] : 0.0;
    %s
    for (unsigned int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (tid < half) buf[tid] += buf[tid + half];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = buf[0];
}
"""


def _tree_sum(cupy, barrier: str, x: np.ndarray) -> np.ndarray:
    fn = cupy.RawModule(code=_TREE_SUM % barrier).get_function("tree_sum")
    out = cupy.zeros(x.shape[0])
    fn((x.shape[0],), (256,), (cupy.asarray(x), out, np.int32(x.shape[1])))
    return out.get()


def test_block_barrier_is_a_real_rendezvous(emulated_cupy):
    """The tree sum is right with its first __syncthreads, and wrong without it.

    Threads switch only at barriers, so the race shows in the orders where a low thread runs before
    the high one it reads: forward and shuffled. In reverse order every write precedes the reads, and
    this race is invisible (one of the emulation's stated limits).
    """
    rng = np.random.default_rng(0)
    for order in emulation.settings.SCHEDULES:
        with emulation.settings.thread_order(order):
            for _ in range(2):  # a second launch reads what the first left in shared memory: still wrong
                x = rng.standard_normal((3, 256))
                np.testing.assert_allclose(
                    _tree_sum(emulated_cupy, "__syncthreads();", x), x.sum(1), rtol=1e-12
                )
                broken = _tree_sum(emulated_cupy, "", x)
                if order != "reverse":
                    assert not np.allclose(broken, x.sum(1)), (
                        f"a missing barrier went unnoticed ({order} order)"
                    )


def test_barrier_some_threads_skip_is_a_deadlock(emulated_cupy):
    code = r"""
    extern "C" __global__ void split(double* x) {
        double v = x[threadIdx.x];
        if (threadIdx.x == 0) __syncthreads();  // lane 0 waits for the block ...
        v = __shfl_xor_sync(0xffffffffu, v, 1);  // ... while its warp waits for lane 0
        if (threadIdx.x != 0) __syncthreads();
        x[threadIdx.x] = v;
    }
    """
    fn = emulated_cupy.RawModule(code=code).get_function("split")
    with pytest.raises(EmulationError, match="barrier deadlock"):
        fn((1,), (64,), (emulated_cupy.zeros(64),))


def test_dynamic_shared_memory_is_per_launch(emulated_cupy):
    cp = emulated_cupy
    code = r"""
    extern "C" __global__ void reverse(double* x) {
        extern __shared__ double tmp[];
        tmp[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
        __syncthreads();
        x[blockIdx.x * blockDim.x + threadIdx.x] = tmp[blockDim.x - 1 - threadIdx.x];
    }
    """
    fn = cp.RawModule(code=code).get_function("reverse")
    x = cp.asarray(np.arange(128.0))
    fn((2,), (64,), (x,), shared_mem=64 * 8)
    np.testing.assert_array_equal(x.get(), np.arange(128.0).reshape(2, 64)[:, ::-1].ravel())
    with pytest.raises(EmulationError, match="shared_mem = 0"):
        fn((2,), (64,), (x,))


# ------------------------------------------------------------------------------ warp shuffles
_WARP_SUMS = r"""
extern "C" __global__ void warp_sums(const double* x, double* down, double* butterfly, double* first) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    double v = x[i], w = x[i];
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
        w += __shfl_xor_sync(0xffffffffu, w, offset);
    }
    const double lane0 = __shfl_sync(0xffffffffu, x[i], 0);
    if ((threadIdx.x & 31) == 0) down[i / 32] = v;  // lane 0 holds the warp's sum
    butterfly[i] = w;                               // every lane holds it
    first[i] = lane0;
}
"""


def test_warp_shuffles_sum_a_warp(emulated_cupy):
    cp = emulated_cupy
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4 * 64)
    down, butterfly, first = cp.zeros(8), cp.zeros(x.size), cp.zeros(x.size)
    fn = cp.RawModule(code=_WARP_SUMS).get_function("warp_sums")
    fn((4,), (64,), (cp.asarray(x), down, butterfly, first))
    sums = x.reshape(-1, 32).sum(1)
    np.testing.assert_allclose(down.get(), sums, rtol=1e-12)
    np.testing.assert_allclose(butterfly.get(), np.repeat(sums, 32), rtol=1e-12)
    np.testing.assert_array_equal(first.get(), np.repeat(x.reshape(-1, 32)[:, 0], 32))


def test_shuffle_from_a_missing_lane_is_an_error(emulated_cupy):
    cp = emulated_cupy
    fn = cp.RawModule(code=_WARP_SUMS).get_function("warp_sums")
    with pytest.raises(EmulationError, match=r"warp 1 .* reads lane \d+, which has exited or does not exist"):
        fn((1,), (48,), (cp.zeros(48), cp.zeros(2), cp.zeros(48), cp.zeros(48)))  # warp 1 has 16 lanes


# ------------------------------------------------------------------------------ kernel arguments
_SCALE = r"""
extern "C" __global__ void scale(const float* x, float* y, const int n, const float a) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) y[i] = a * x[i];
}
"""


def test_raw_kernel_arguments_are_checked(emulated_cupy):
    cp = emulated_cupy
    fn = cp.RawModule(code=_SCALE).get_function("scale")
    x, y = cp.arange(10, dtype=np.float32), cp.zeros(10, dtype=np.float32)
    fn((2,), (8,), (x, y, np.int32(10), np.float32(3)))
    np.testing.assert_array_equal(y.get(), 3 * np.arange(10, dtype=np.float32))
    cases = [
        ((x, y, 10, np.float32(3)), "passed as int64"),  # a Python int is an int64 for CuPy
        ((x, y, np.int32(10), 3.0), "passed as float64"),
        ((x, y, np.int32(10)), "takes 4 arguments, got 3"),
        ((x.astype(np.float64), y, np.int32(10), np.float32(3)), "float64 array is passed to a pointer"),
        ((x[::2], y, np.int32(5), np.float32(3)), "non-contiguous"),
        ((x.get(), y, np.int32(10), np.float32(3)), "host numpy.ndarray"),
    ]
    for args, message in cases:
        with pytest.raises(EmulationError, match=message):
            fn((1,), (8,), args)
    with pytest.raises(EmulationError, match="more than 1024 threads"):
        fn((1,), (64, 32), (x, y, np.int32(10), np.float32(3)))
    with pytest.raises(EmulationError, match=r"grid.y = 70000 is outside"):
        fn((1, 70000), (8,), (x, y, np.int32(10), np.float32(3)))


def test_access_past_the_end_of_an_array_is_an_error(emulated_cupy):
    """An off-by-one write (``i <= n``) faults on the allocation's guard page; the launch says where."""
    cp = emulated_cupy
    code = r"""
    extern "C" __global__ void off_by_one(double* y, const int n) {
        for (int i = threadIdx.x; i <= n; i += blockDim.x) y[i] = 1.0;
    }
    """
    fn = cp.RawModule(code=code).get_function("off_by_one")
    y = cp.zeros(100)
    with pytest.raises(
        EmulationError, match=r"invalid memory access .* 0 bytes past the end of the 800-byte"
    ):
        fn((1,), (32,), (y, np.int32(100)))
    fn((1,), (32,), (y, np.int32(99)))  # in bounds: no fault, and the process goes on
    assert float(y.sum()) == 100.0


def test_elementwise_and_reduction_kernels_follow_cupy(emulated_cupy):
    cp = emulated_cupy
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 1, 5)), rng.standard_normal((4, 1))
    axpy = cp.ElementwiseKernel("T x, T y, float64 s", "T z", "z = s * x + y", "axpy")
    z = axpy(cp.asarray(a), cp.asarray(b), 2.5)  # broadcast (3, 1, 5) with (4, 1), a scalar
    np.testing.assert_allclose(z.get(), 2.5 * a + b, rtol=1e-15)
    with pytest.raises(TypeError, match="Type is mismatched"):
        axpy(cp.asarray(a), cp.asarray(b.astype(np.float32)), 2.5)
    total = cp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "sumsq", reduce_type="double")
    x = rng.standard_normal((6, 7, 300))
    for axis, keepdims in [(None, False), (0, False), ((0, 2), True), (2, False), ((1,), True)]:
        got = total(cp.asarray(x), axis=axis, keepdims=keepdims).get()
        np.testing.assert_allclose(
            got, (x * x).sum(axis=axis, keepdims=keepdims), rtol=1e-13, err_msg=f"{axis}"
        )


# ------------------------------------------------------------------------------ cuBLAS
def _col_major(cp, a: np.ndarray, ld: int):
    """``a`` (rows, cols) stored column-major with leading dimension ``ld`` >= rows, on the device."""
    rows, cols = a.shape
    buf = np.zeros((cols, ld))
    buf[:, :rows] = a.T
    return cp.asarray(buf)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_is_column_major(emulated_cupy, trans_a, trans_b):
    cp = emulated_cupy
    rng = np.random.default_rng(3)
    m, n, k = 4, 3, 5
    op_a, op_b, c0 = rng.standard_normal((m, k)), rng.standard_normal((k, n)), rng.standard_normal((m, n))
    a_stored, b_stored = (op_a.T if trans_a else op_a), (op_b.T if trans_b else op_b)
    a = _col_major(cp, a_stored, a_stored.shape[0] + 2)  # padded leading dimensions
    b = _col_major(cp, b_stored, b_stored.shape[0] + 1)
    c = _col_major(cp, c0, m + 3)
    alpha, beta = np.array(0.5), np.array(-2.0)
    handle = cp.cuda.device.get_cublas_handle()
    cp.cuda.cublas.gemmEx(
        handle, int(trans_a), int(trans_b), m, n, k, alpha.ctypes.data, a.data.ptr, cublas.CUDA_R_64F,
        a_stored.shape[0] + 2, b.data.ptr, cublas.CUDA_R_64F, b_stored.shape[0] + 1, beta.ctypes.data,
        c.data.ptr, cublas.CUDA_R_64F, m + 3, cublas.CUBLAS_COMPUTE_64F, -1,
    )  # fmt: skip
    got = c.get()[:, :m].T  # (n, ldc) column-major -> (m, n)
    np.testing.assert_allclose(got, 0.5 * op_a @ op_b - 2.0 * c0, rtol=1e-13)
    np.testing.assert_array_equal(c.get()[:, m:], 0.0)  # the padding rows of C are not written


def test_gemm_refuses_a_bad_contract(emulated_cupy):
    cp = emulated_cupy
    handle = cp.cuda.device.get_cublas_handle()
    one, zero = np.array(1.0), np.array(0.0)
    a, b, c = cp.zeros(4 * 5), cp.zeros(5 * 3), cp.zeros(4 * 3)
    host = np.zeros(20)

    def call(m=4, n=3, k=5, a_ptr=a.data.ptr, lda=4, c_ptr=c.data.ptr, alpha=one.ctypes.data, batch=None):
        f64, compute = cublas.CUDA_R_64F, cublas.CUBLAS_COMPUTE_64F
        a_args = (handle, 0, 0, m, n, k, alpha, a_ptr, f64, lda)
        if batch is None:
            b_args = (b.data.ptr, f64, 5, zero.ctypes.data, c_ptr, f64, 4, compute, -1)
            cp.cuda.cublas.gemmEx(*a_args, *b_args)
        else:  # A and B shared by every batch (stride 0), C matrices 12 elements apart
            b_args = (b.data.ptr, f64, 5, 0, zero.ctypes.data, c_ptr, f64, 4, 12, batch, compute, -1)
            cp.cuda.cublas.gemmStridedBatchedEx(*a_args, 0, *b_args)

    call()  # the contract holds
    call(batch=1)
    with pytest.raises(EmulationError, match=r"lda = 3 is less than max\(1, 4\)"):
        call(lda=3)
    with pytest.raises(EmulationError, match="A's footprint .* past its allocation"):
        call(lda=5)  # ld 5 over 5 columns needs 24 elements, A has 20
    with pytest.raises(
        EmulationError, match="A = 0x[0-9a-f]+ is not a pointer into a live device allocation"
    ):
        call(a_ptr=host.ctypes.data)
    with pytest.raises(EmulationError, match="C's footprint"):
        call(batch=2)  # a second C matrix 12 elements on runs off the end
    with pytest.raises(EmulationError, match="overlaps A"):
        call(c_ptr=a.data.ptr)
    with pytest.raises(EmulationError, match="alpha = .* is device memory, but the pointer mode is host"):
        call(alpha=a.data.ptr)
    with pytest.raises(EmulationError, match="not allowed with CUBLAS_COMPUTE_32F"):
        cp.cuda.cublas.gemmEx(handle, 0, 0, 4, 3, 5, one.ctypes.data, a.data.ptr, cublas.CUDA_R_64F, 4, b.data.ptr,
                              cublas.CUDA_R_64F, 5, zero.ctypes.data, c.data.ptr, cublas.CUDA_R_64F, 4,
                              cublas.CUBLAS_COMPUTE_32F, -1)  # fmt: skip


def test_tf32_rounds_to_ten_mantissa_bits():
    x = np.array(
        [1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12, -(1 + 2**-11), np.inf, np.nan], np.float32
    )
    got = cublas.round_tf32(x)
    expected = np.array([1 + 2**-10, 1.0, 1 + 2**-9, 1.0, -1.0, np.inf, np.nan], np.float32)  # ties to even
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------ device arrays
def test_device_arrays_refuse_implicit_host_conversion(emulated_cupy):
    cp = emulated_cupy
    a = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert type(a).__module__.split(".")[0] == "cupy" and not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type numpy.ndarray"):
        a + np.ones(3)
    assert isinstance(a + np.float64(1), cp.ndarray) and isinstance(np.exp(a), cp.ndarray)
    assert isinstance(a.sum(), cp.ndarray) and a.sum().shape == ()  # 0-d results stay on the device


def test_fresh_device_memory_is_poisoned(emulated_cupy):
    """``empty`` is never a lucky zero: floats read NaN, integers -1, until a kernel writes them."""
    cp = emulated_cupy
    assert np.isnan(cp.empty((2, 3)).get()).all() and (cp.empty(4, dtype=np.int32).get() == -1).all()
    assert (cp.zeros(3).get() == 0).all() and (cp.empty_like(cp.zeros(2)).get() != 0).all()


def test_host_conversions_work(emulated_cupy):
    cp = emulated_cupy
    a = cp.asarray(np.array([[1.5, 2.0], [3.0, 4.0]]))
    assert float(a[0, 0]) == 1.5 and int(a[1, 1]) == 4 and bool(a[0, 1]) and a[1, 0].item() == 3.0
    assert a.tolist() == [[1.5, 2.0], [3.0, 4.0]] and len(a) == 2
    np.testing.assert_array_equal(a.get(), [[1.5, 2.0], [3.0, 4.0]])
    a.set(np.zeros((2, 2)))
    assert float(a.sum()) == 0.0
    assert a.data.ptr == a._a.__array_interface__["data"][0]


def test_host_reads_are_refused_by_name_and_recorded(emulated_cupy):
    cp = emulated_cupy
    a = cp.ones(3)

    def allowed_reader():
        return float(a.sum())

    with emulation.no_host_reads(allow=(f"{__name__}.test_host_reads_are_refused_by_name_and_recorded.<locals>."
                                        "allowed_reader",)):  # fmt: skip
        assert len(a) == 3 and a.shape == (3,)  # metadata is not a read
        b = a * 2 + 1  # nor is device arithmetic
        assert allowed_reader() == 3.0
        for read in (lambda: float(b[0]), lambda: b.get(), lambda: int(b[0]), lambda: bool(b[0]),
                     lambda: b.item(0), lambda: b.tolist(), lambda: repr(b), lambda: b[b > 0]):  # fmt: skip
            with pytest.raises(emulation.HostRead, match=r"test_emulation\.py:\d+ in "):
                read()
        with pytest.raises(emulation.HostRead, match="numpy.asarray"):
            np.asarray(b)
    with emulation.host_reads() as log:
        float(a[0])
        a.get()
    assert [r.kind for r in log] == ["float()", ".get()"]
    assert all(r.location.startswith("tests/test_emulation.py:") for r in log)
    assert float(a[0]) == 1.0  # outside both, reads are allowed


# ------------------------------------------------------------------------------ install and restore
def test_the_context_installs_the_device_and_restores_everything():
    before_modules = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("cupy", "gpu")}
    before_env = os.environ.get("CUPY_CACHE_DIR")
    import gpu.runtime

    reason_before = gpu.runtime.unavailable_reason()
    with emulation.device() as cp:
        import gpu
        import gpu.ops  # noqa: F401  (imported afresh against the stand-in)

        assert sys.modules["cupy"] is cp
        assert gpu.runtime.unavailable_reason() is None and gpu.available()
        gpu.require()
        assert gpu.runtime.describe()["cupy"] == cp.__version__
        from reference.backend import to_device

        assert type(to_device(np.zeros(2), "cuda")) is cp.ndarray
    after = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("cupy", "gpu")}
    assert after.keys() == before_modules.keys() and all(after[n] is before_modules[n] for n in after)
    assert os.environ.get("CUPY_CACHE_DIR") == before_env
    import gpu.runtime as runtime_after

    assert runtime_after.unavailable_reason() == reason_before
    if reason_before is not None:  # no real CuPy here: importing it fails again
        with pytest.raises(ImportError):
            import cupy  # noqa: F401
