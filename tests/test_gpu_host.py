"""The GPU twin's host-side plumbing: where CuPy's kernel cache goes, raw-kernel lookups, bf16 operands.

- ``CUPY_CACHE_DIR`` is set before CuPy is first imported (checked in a fresh
  interpreter against a stand-in ``cupy`` that records the variable when it is
  imported), and a value the user set is kept.
- A raw kernel's module is built, and each function looked up, once per
  (dtype, function), however often it is launched (a stand-in ``cupy``
  counts the calls).
- Under ``bf16``, an operand rounded once by :func:`gpu.blas.gemm_operand`
  gives the same bits as rounding it on every call, in the GEMMs and in the
  convolutions that cache their weight that way (needs a GPU, or the CPU
  execution mode).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- CUPY_CACHE_DIR
def _import_with_recording_cupy(tmp_path: Path, preset: str | None) -> str:
    """What ``CUPY_CACHE_DIR`` held when a stand-in ``cupy`` was first imported through ``gpu``."""
    package = tmp_path / "standin" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import os\nSEEN = os.environ.get('CUPY_CACHE_DIR')\n")
    env = {k: v for k, v in os.environ.items() if k != "CUPY_CACHE_DIR"}
    env.update(PYTHONPATH=os.pathsep.join([str(package.parent), str(ROOT)]), HOME=str(tmp_path / "home"))
    if preset is not None:
        env["CUPY_CACHE_DIR"] = preset
    code = (
        "import sys, gpu\n"
        "assert 'cupy' not in sys.modules, 'importing gpu imported cupy'\n"
        "gpu.runtime.unavailable_reason()  # the first import of cupy in the package\n"
        "import cupy\n"
        "assert 'standin' in cupy.__file__\n"
        "print(cupy.SEEN)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kernel_cache_dir_is_set_before_cupy_is_imported(tmp_path):
    seen = _import_with_recording_cupy(tmp_path, preset=None)
    assert seen == str(tmp_path / "home" / ".cache" / "learnsparse" / "cupy")


def test_kernel_cache_dir_set_by_the_user_is_kept(tmp_path):
    assert _import_with_recording_cupy(tmp_path, preset=str(tmp_path / "mine")) == str(tmp_path / "mine")


# --------------------------------------------------------------------------- raw-kernel lookups
class _CountingModule:
    def __init__(self, counts: dict, code: str):
        self.counts, self.code = counts, code
        counts["modules"].append(code)

    def get_function(self, name: str):
        self.counts["lookups"].append(name)
        return lambda grid, block, args, shared_mem=0: self.counts["launches"].append((name, grid, block))


def test_raw_kernels_are_built_and_looked_up_once_per_dtype_and_function(monkeypatch):
    from gpu import kernels

    counts: dict = {"modules": [], "lookups": [], "launches": []}
    standin = types.ModuleType("cupy")
    standin.RawModule = lambda code, options=(): _CountingModule(counts, code)
    monkeypatch.setitem(sys.modules, "cupy", standin)
    spec = kernels.KernelSpec(
        "raw",
        "host_test_pair",
        'extern "C" __global__ void first(${T}* x) {}\nextern "C" __global__ void second(${T}* x) {}\n',
        functions=("first", "second"),
    )
    kernel = kernels.Kernel(spec)
    for _ in range(3):
        for dtype in (np.float32, np.float64):
            kernel.launch("first", np.dtype(dtype), (1,), (32,), ())
            kernel.launch_flat("second", np.dtype(dtype), 1000, ())
    kernel.launch_flat("second", np.dtype(np.float32), 0, ())  # nothing to do: no launch
    assert len(counts["modules"]) == 2  # one module per dtype
    assert "float* x" in counts["modules"][0] and "double* x" in counts["modules"][1]
    assert sorted(counts["lookups"]) == ["first", "first", "second", "second"]
    assert len(counts["launches"]) == 12
    assert counts["launches"][1] == ("second", (4,), (kernels.FLAT_BLOCK,))  # 1000 elements, 256 a block
    with pytest.raises(KeyError, match="third"):
        kernel.launch("third", np.dtype(np.float32), (1,), (32,), ())


def test_flat_grid_covers_the_elements_and_caps_the_blocks():
    from gpu.kernels import FLAT_BLOCK, flat_grid

    assert flat_grid(1) == (1,)
    assert flat_grid(FLAT_BLOCK) == (1,) and flat_grid(FLAT_BLOCK + 1) == (2,)
    assert flat_grid(1 << 40) == (1 << 20,)  # a grid-stride loop covers the rest


# --------------------------------------------------------------------------- bf16 operands
def test_a_bf16_operand_rounded_once_gives_the_bits_of_rounding_per_call(gpu_backend):
    import cupy

    from gpu import blas, runtime

    rng = np.random.default_rng(5)
    a = cupy.asarray(rng.standard_normal((37, 50)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal((50, 29)).astype(np.float32))
    stack = cupy.asarray(rng.standard_normal((3, 50, 29)).astype(np.float32))
    with runtime.precision("bf16"):
        a16 = blas.gemm_operand(a)
        assert a16.dtype.name == "bfloat16"
        for trans_b, rhs in ((False, b), (True, cupy.ascontiguousarray(b.T))):
            per_call = blas.gemm(a, rhs, trans_b=trans_b).get()
            np.testing.assert_array_equal(blas.gemm(a16, rhs, trans_b=trans_b).get(), per_call)
        np.testing.assert_array_equal(blas.gemm_batched(a16, stack).get(), blas.gemm_batched(a, stack).get())
    with runtime.precision("fp32"):  # met under another precision: widened exactly
        assert blas.gemm_operand(a) is a or blas.gemm_operand(a).dtype == np.float32
        rounded = a16.astype(np.float32)
        np.testing.assert_array_equal(blas.gemm(a16, b).get(), blas.gemm(rounded, b).get())


@pytest.mark.parametrize(
    "shape, kernel, groups, stride, padding",
    [
        ((3, 4, 7, 7), 3, 1, 1, 1),
        ((2, 6, 6, 5), 3, 2, 2, 0),
        ((3, 5, 6, 6), 1, 1, 1, 0),
        ((2, 5, 7, 7), 1, 1, 2, 0),
    ],
    ids=["general", "grouped", "pointwise", "pointwise-strided"],
)
def test_conv_weight_rounded_once_per_forward_gives_the_bits_of_rounding_per_call(
    gpu_backend, monkeypatch, shape, kernel, groups, stride, padding
):
    import cupy

    import gpu.ops.conv as conv
    from gpu import blas, runtime

    rng = np.random.default_rng(6)
    n_out = 6
    x = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((n_out, shape[1] // groups, kernel, kernel)).astype(np.float32))
    results, dy = [], None
    with runtime.precision("bf16"):
        for once in (True, False):
            if not once:  # the weight goes into every GEMM as float32 and is rounded there, per call
                monkeypatch.setattr(blas, "gemm_operand", cupy.ascontiguousarray)
            y, cache = conv.conv2d_forward(x, w, None, stride, padding, groups)
            if dy is None:  # one cotangent for both
                dy = cupy.asarray(rng.standard_normal(y.shape).astype(np.float32))
            assert (cache.w.dtype.name == "bfloat16") == once
            dx, dw, _ = conv.conv2d_backward(dy, cache)
            results.append([a.get() for a in (y, dx, dw)])
    for got, expected, name in zip(*results, ("y", "dx", "dw")):
        np.testing.assert_array_equal(got, expected, err_msg=name)
