"""The GPU twin agrees with the reference, op by op (needs a CUDA GPU; skipped otherwise).

For every case of the op table (``tests/opcases``) hypothesis draws shapes,
geometries and values; both kernel sets run the forward and the backward with
the same random cotangent, and the results must agree:

- float64: tightly (the two differ only in the order of floating-point sums);
- float32, GEMMs in full float32 (``precision("fp32")``): within the stated
  per-op tolerance :data:`FLOAT32_RTOL`, relative to the largest magnitude of
  the reference's result (sums over thousands of terms in another order);
- float32 with TF32 GEMMs (the training default) for the GEMM-based ops: within
  :data:`TF32_RTOL` (TF32 keeps 10 bits of mantissa in products).

The float64 test asks both kernel sets for a drawn non-empty subset of the
gradients (``needs_input_grad``, as the engine asks when some inputs need
none): the wanted ones must agree and both sets must return None for the
others. The float32 tests ask for every gradient.

Every test runs on two backends (the ``gpu_backend`` fixture): ``device``, a
CUDA GPU (marker ``gpu``, skipped without one), and ``emulated``, the CPU
execution mode of ``tests/emulation`` (always, so CI exercises every kernel).
The emulated run draws fewer hypothesis examples (:data:`EXAMPLES`) to keep
its cost near a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import kernels, rng_from
from tests.opcases import CASES

FLOAT64_RTOL = 1e-9
FLOAT32_RTOL = {  # relative to max |reference result|; the default for ops not listed is 1e-5
    "conv2d": 1e-5,
    "matmul": 1e-5,
    "linear": 1e-5,
    "batch_norm": 2e-5,
    "mean": 1e-5,
    "sum": 1e-5,
    "softmax_cross_entropy": 1e-5,
    "scp_channel_mask": 5e-5,
    "ltp_mask": 2e-5,
    "ltp_l0": 2e-5,
    "str_threshold": 1e-5,
}
TF32_RTOL = 5e-3  # 10-bit mantissa products, float32 sums
GEMM_OPS = {"conv2d", "matmul", "linear"}


def _to_gpu(value, dtype=None):
    import cupy

    if isinstance(value, np.ndarray):
        if dtype is not None and value.dtype.kind == "f":
            value = value.astype(dtype)
        return cupy.asarray(value)
    return value


def _cast(value, dtype):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(dtype)
    return value


def _host(value):
    return value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else value


def _run_both(case, data, dtype, subset: bool = False):
    """Both kernel sets on one drawn case: ``(args, (y, grads) of the reference, (y, grads) of the twin)``.

    With ``subset``, both are asked for a drawn non-empty subset of ``case.wrt``
    (``needs_input_grad``) and the result gains the wanted indices; otherwise
    every gradient is wanted (no ``needs_input_grad``, as a direct call).
    """
    import gpu.ops

    args, static = case.draw(data)
    args = tuple(_cast(a, dtype) for a in args)
    static = {k: _cast(v, dtype) for k, v in static.items()}
    wanted = set(case.wrt)
    if subset:  # the engine never records an op with no wanted gradient, so at least one is wanted
        wanted = data.draw(st.sets(st.sampled_from(case.wrt), min_size=1), label="wanted gradients")
        static["needs_input_grad"] = tuple(i in wanted for i in range(len(args)))
    ref_forward, ref_backward = kernels(case.name)
    gpu_forward, gpu_backward = kernels(case.name, gpu.ops)
    y_ref, cache_ref = ref_forward(*args, **static)
    dy = rng_from(data).standard_normal(np.shape(y_ref)).astype(dtype)
    grads_ref = ref_backward(dy, cache_ref)
    y_gpu, cache_gpu = gpu_forward(*(_to_gpu(a) for a in args), **static)
    grads_gpu = gpu_backward(_to_gpu(dy), cache_gpu)
    return args, (y_ref, grads_ref), (_host(y_gpu), tuple(_host(g) for g in grads_gpu)), wanted


def _agree(case, args, ref, got, rtol, atol_floor=0.0, wanted=None):
    """The twin's forward and wanted gradients agree with the reference's; the unwanted are None in both."""
    (y_ref, grads_ref), (y_gpu, grads_gpu) = ref, got
    wanted = set(case.wrt) if wanted is None else wanted
    assert len(grads_gpu) == len(grads_ref), (
        f"{case.id}: {len(grads_gpu)} gradients, reference {len(grads_ref)}"
    )
    for i in sorted(set(case.wrt) - wanted):
        assert grads_ref[i] is None, f"{case.id} d input {i}: not wanted, the reference gave a gradient"
        assert grads_gpu[i] is None, f"{case.id} d input {i}: not wanted, the GPU gave a gradient"
    pairs = [("forward", y_ref, y_gpu)]
    pairs += [(f"d input {i}", grads_ref[i], grads_gpu[i]) for i in case.wrt if i in wanted]
    for what, expected, actual in pairs:
        assert actual is not None, f"{case.id} {what}: the GPU gave no gradient"
        expected, actual = np.asarray(expected), np.asarray(actual)
        assert actual.shape == expected.shape, f"{case.id} {what}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{case.id} {what}: dtype {actual.dtype} != {expected.dtype}"
        scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
        np.testing.assert_allclose(
            actual, expected, rtol=rtol, atol=max(rtol * scale, atol_floor), err_msg=f"{case.id} {what}"
        )


EXAMPLES = {  # hypothesis examples per op case: float64, float32, TF32
    "device": (25, 25, 15),
    "emulated": (10, 10, 6),
}


def _check_cases(backend: str, which: int, check) -> None:
    """Run ``check(data)`` over hypothesis's examples: the backend's budget, or fewer if the profile says so."""
    examples = min(EXAMPLES[backend][which], settings.default.max_examples)
    settings(max_examples=examples)(given(data=st.data())(check))()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_equals_reference_float64(case, gpu_backend):
    from gpu import runtime

    def check(data):
        with runtime.precision("fp32"):
            args, ref, got, wanted = _run_both(case, data, np.float64, subset=True)
        _agree(case, args, ref, got, FLOAT64_RTOL, wanted=wanted)

    _check_cases(gpu_backend, 0, check)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_equals_reference_float32(case, gpu_backend):
    from gpu import runtime

    def check(data):
        with runtime.precision("fp32"):
            args, ref, got, _ = _run_both(case, data, np.float32)
        _agree(case, args, ref, got, FLOAT32_RTOL.get(case.name, 1e-5))

    _check_cases(gpu_backend, 1, check)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in GEMM_OPS], ids=lambda c: c.id)
def test_gpu_tf32_is_close_to_reference(case, gpu_backend):
    from gpu import runtime

    def check(data):
        with runtime.precision("tf32"):
            args, ref, got, _ = _run_both(case, data, np.float32)
        _agree(case, args, ref, got, TF32_RTOL)

    _check_cases(gpu_backend, 2, check)


@pytest.mark.parametrize("name", ["tf32", "bf16"])
def test_gemm_precision_changes_only_rounding(name, gpu_backend):
    """TF32 and bfloat16 GEMMs differ from float32 by their operand rounding, no more."""
    if name == "bf16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 GEMMs need ml_dtypes (the cuda extra installs it)")
    import cupy

    from gpu import blas, runtime

    rng = np.random.default_rng(0)
    a, b = (
        rng.standard_normal((96, 200)).astype(np.float32),
        rng.standard_normal((200, 64)).astype(np.float32),
    )
    exact = a.astype(np.float64) @ b.astype(np.float64)
    with runtime.precision(name):
        got = blas.gemm(cupy.asarray(a), cupy.asarray(b)).get()
    unit = {"tf32": 2.0**-11, "bf16": 2.0**-8}[name]  # relative rounding of one operand
    bound = 2 * unit * (np.abs(a) @ np.abs(b))  # both operands rounded, sums in float32
    assert np.all(np.abs(got - exact) <= bound + 1e-4), f"{name}: error beyond operand rounding"
    assert got.dtype == np.float32


def test_gemm_transposes_and_batches_match_numpy(gpu_backend):
    import cupy

    from gpu import blas, runtime

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    with runtime.precision("fp32"):
        for ta in (False, True):
            for tb in (False, True):
                aa, bb = (a.T.copy() if ta else a), (b.T.copy() if tb else b)
                got = blas.gemm(cupy.asarray(aa), cupy.asarray(bb), trans_a=ta, trans_b=tb).get()
                np.testing.assert_allclose(got, a @ b, rtol=1e-12, err_msg=f"trans_a={ta}, trans_b={tb}")
        stack = rng.standard_normal((4, 7, 3))
        got = blas.gemm_batched(cupy.asarray(a), cupy.asarray(stack)).get()
        np.testing.assert_allclose(got, a @ stack, rtol=1e-12)
        got = blas.gemm_batched(cupy.asarray(stack), cupy.asarray(a), trans_a=True, trans_b=True).get()
        np.testing.assert_allclose(got, np.swapaxes(stack, 1, 2) @ a.T, rtol=1e-12)


def test_fused_sgd_equals_the_reference_update(gpu_backend):
    """The one-kernel SGD (gpu.optim) against reference.optim's array update, 3 steps, every option."""
    import cupy

    from reference.autodiff import Tensor
    from reference.optim import SGD

    rng = np.random.default_rng(2)
    for momentum, nesterov, wd in [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-3)]:
        w0 = rng.standard_normal((3, 4))
        grads = [rng.standard_normal((3, 4)) for _ in range(3)]
        results = []
        for to in (np.asarray, cupy.asarray):
            p = Tensor(to(w0.copy()), requires_grad=True)
            opt = SGD(
                [{"params": [p], "name": "all"}],
                lr=0.1,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=wd,
            )
            for g in grads:
                p.grad = to(g)
                opt.step()
            results.append(_host(p.data))
        np.testing.assert_allclose(
            results[1], results[0], rtol=1e-13, err_msg=f"{momentum=} {nesterov=} {wd=}"
        )
