# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. From NumPy to CUDA: the STR kernel on the GPU
#
# The reference library computes STR's soft threshold with a handful of NumPy expressions. Each
# expression is a full pass over the weight tensor and allocates a temporary:
# `np.abs(w)`, the comparison, `np.sign(w) * g`, the subtraction, `np.where`. On a GPU each of
# those would be a separate kernel launch with its own trip through memory. The library's GPU twin
# (`gpu/`) writes the operator as **one fused kernel** instead, and the threshold gradient as **one
# fused reduction**. This tutorial builds both with CuPy, checks them against the NumPy
# reference, and times them.
#
# **This tutorial runs anywhere.** The cells that need a GPU check `GPU` first. Without CuPy or a
# CUDA device they print what they would have done and carry on. If NVIDIA's runtime compiler
# (NVRTC, installed with CuPy) can be loaded, the kernels are still *compiled* here, since
# compiling needs no GPU.
#
# Throughout, $W$ is a weight tensor, $s$ the layer's threshold parameter and $G$ the gradient
# arriving from above (equations (1)-(5) of `reference/ops/sparsity.py`):
#
# $$g = \sigma(s), \qquad W_\text{eff} = M\,(W - \operatorname{sign}(W)\,g), \quad M = [\,|W| > g\,]
# \tag{1, 2}$$
#
# $$\frac{\partial L}{\partial W} = G\,M, \qquad
# \frac{\partial L}{\partial s} = -\sigma'(s) \sum G\,\operatorname{sign}(W)\,M. \tag{3, 4}$$

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from common import output_dir, pick, save_figure

import gpu
import reference.ops as ops
from gpu.kernels import check_source, elementwise, reduction
from reference.backend import to_host

OUT = output_dir("07_numpy_to_cuda")
GPU = gpu.available()
print("GPU available:", GPU, "" if GPU else f"({gpu.runtime.unavailable_reason()})")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The NumPy version, for reference
#
# Written inline in five lines: the same arithmetic as the library's kernel.


# %%
def str_numpy(w, s):
    g = 1.0 / (1.0 + np.exp(-s))  # (1)
    mask = np.abs(w) > g  # (2), strict: |W| == g is pruned
    return np.where(mask, w - np.sign(w) * g, 0.0).astype(w.dtype), mask


w = rng.standard_normal((256, 128, 3, 3)).astype(np.float32) * 0.05
s = np.float32(-3.0)  # g = sigmoid(-3) = 0.047: about two thirds of these weights go
w_eff, mask = str_numpy(w, s)
expected, ref_cache = ops.str_threshold_forward(w, np.asarray(s))
np.testing.assert_array_equal(w_eff, expected)
print(f"pruned: {1 - mask.mean():.1%} of {w.size:,} weights; the inline version equals the library's")

# %% [markdown]
# ## 2. The same operator as a CuPy `ElementwiseKernel`
#
# An elementwise kernel is a C++ loop body that CuPy runs once per element, each on its own GPU
# thread. Inputs are read-only values and outputs are references. `T` is a type placeholder, so one
# declaration serves float32 and float64. We pass `g` (a scalar) instead of `s`, so the sigmoid
# is computed once and not 3 million times.
#
# `gpu.kernels.elementwise` records the declaration in the twin's kernel registry and builds
# the `cupy.ElementwiseKernel` on first use. CuPy compiles it on the first launch and caches the
# binary on disk.

# %%
str_forward = elementwise(
    "tutorial_str_forward",
    "T w, T g",
    "T w_eff, bool mask",
    """
    mask = fabs(w) > g;                                       // (2), strict
    w_eff = mask ? w - copysign(g, w) : T(0);                 // (2): W - sign(W) g
    """,
)

# %% [markdown]
# The threshold gradient (4) is a sum over the whole tensor. A `ReductionKernel` fuses the
# elementwise product with the sum. `map_expr` maps each element, `reduce_expr` combines two
# partial sums (a tree across threads and blocks), and `post_map_expr` writes the result. The
# partial sums are kept in `double`, so a float32 sum over millions of terms does not drift.

# %%
str_ds = reduction(
    "tutorial_str_ds",
    "T dy, T w, bool mask",
    "T total",
    map_expr="mask ? (double)dy * (w > T(0) ? 1.0 : (w < T(0) ? -1.0 : 0.0)) : 0.0",
    reduce_expr="a + b",
    post_map_expr="total = T(a)",
    identity="0",
    reduce_type="double",
)

# %% [markdown]
# ### Compiling without a GPU
#
# A kernel is C++ text, so the first thing that can go wrong is a typo. The CUDA compiler needs
# no GPU, so the registry can wrap each kernel body in a complete translation unit and compile
# it for `float` and `double`. The test suite does this for every kernel of the twin. Here is
# the unit for the forward kernel:

# %%
unit = check_source(str_forward.spec, "float")
print(unit[unit.index("extern") :])


def try_compile(source):
    """Compile with NVRTC if it can be loaded: None on success, the log on failure, 'skipped' without."""
    try:
        from cupy.cuda import nvrtc
    except Exception:
        return "skipped (CuPy is not installed)"
    try:
        program = nvrtc.createProgram(source, "kernel.cu", [], [])
    except Exception as exc:
        return f"skipped (NVRTC cannot be loaded: {type(exc).__name__})"
    try:
        nvrtc.compileProgram(program, ["-arch=compute_80", "-std=c++17"])
        return None
    except nvrtc.NVRTCError:
        return nvrtc.getProgramLog(program)


for kernel in (str_forward, str_ds):
    for ctype in ("float", "double"):
        log = try_compile(check_source(kernel.spec, ctype))
        assert log is None or log.startswith("skipped"), log
        print(f"{kernel.spec.name} ({ctype}): {'compiled' if log is None else log}")

# %% [markdown]
# ## 3. On the GPU: agreement with the reference
#
# The tutorial's kernels are checked here against the reference and against the twin's own
# kernels (`gpu.ops.str_threshold_forward` / `_backward`, which also cover per-channel
# thresholds). The two results must agree exactly. Both compute `|W| > g` and `W - sign(W) g` in
# float32 with the same `g`, and neither involves a sum, so no rounding can separate them. The
# threshold gradient is a sum, and summation order differs between the CPU and GPU, so it agrees
# to float32 rounding.

# %%
if GPU:
    import cupy

    import gpu.ops

    g = ref_cache.threshold  # the reference's g, float32: the same threshold bit for bit
    wd = cupy.asarray(w)
    w_eff_gpu, mask_gpu = str_forward(wd, g)
    np.testing.assert_array_equal(to_host(w_eff_gpu), expected)
    twin, twin_cache = gpu.ops.str_threshold_forward(wd, cupy.asarray(s))
    np.testing.assert_array_equal(to_host(twin), expected)

    dy = rng.standard_normal(w.shape).astype(np.float32)
    _, ds_ref = ops.str_threshold_backward(dy, ref_cache)
    slope = ref_cache.slope  # sigmoid'(s)
    ds_tutorial = -float(slope) * float(str_ds(cupy.asarray(dy), wd, mask_gpu))
    _, ds_twin = gpu.ops.str_threshold_backward(cupy.asarray(dy), twin_cache)
    np.testing.assert_allclose(ds_tutorial, ds_ref, rtol=1e-5)
    np.testing.assert_allclose(to_host(ds_twin), ds_ref, rtol=1e-5)
    print("GPU kernels agree with the reference: W_eff exactly, ds to float32 rounding")
else:
    print("no GPU: the agreement cells are skipped (the test suite runs them on a GPU machine)")

# %% [markdown]
# ## 4. Timing: five passes against one
#
# The NumPy version reads and writes the whole tensor about five times. The fused kernel reads
# `W` once and writes `W_eff` and the mask once, so on a GPU its time is close to the time it
# takes to move those bytes. The cell below times NumPy on this CPU and, when there is a GPU,
# the unfused CuPy expressions (the NumPy code run on CuPy arrays) against the fused kernel. GPU
# times are taken with CUDA events, because a kernel launch returns before the kernel has run.

# %%
sizes = pick([2**16, 2**18, 2**20, 2**22, 2**24], [2**14, 2**16, 2**18])
repeats = pick(20, 5)


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


timings = {"NumPy (CPU)": []}
for n in sizes:
    x = rng.standard_normal(n).astype(np.float32) * 0.05
    timings["NumPy (CPU)"].append(median_seconds(lambda x=x: str_numpy(x, s), repeats))

if GPU:
    import cupy

    def gpu_seconds(fn, repeats):
        fn()  # compile and warm up
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats

    def str_cupy_unfused(x, g):
        mask = cupy.abs(x) > g
        return cupy.where(mask, x - cupy.sign(x) * g, 0.0), mask

    timings["CuPy, unfused"], timings["CuPy, one fused kernel"] = [], []
    gd = np.float32(0.047)
    for n in sizes:
        xd = cupy.asarray(rng.standard_normal(n).astype(np.float32) * 0.05)
        timings["CuPy, unfused"].append(gpu_seconds(lambda xd=xd: str_cupy_unfused(xd, gd), repeats))
        timings["CuPy, one fused kernel"].append(gpu_seconds(lambda xd=xd: str_forward(xd, gd), repeats))

for name, values in timings.items():
    print(f"{name:>24}: " + "  ".join(f"{n:>9,}: {t * 1e6:9.1f} us" for n, t in zip(sizes, values)))

fig, ax = plt.subplots(figsize=(6, 4))
for name, values in timings.items():
    ax.loglog(sizes, np.array(values) * 1e6, "o-", label=name)
ax.set_xlabel("weights in the tensor")
ax.set_ylabel("median time per call (us)")
ax.set_title("STR soft threshold: NumPy against CUDA kernels")
ax.legend()
save_figure(fig, OUT / "str_kernel_timing.png")

# %% [markdown]
# ## 5. What the twin adds on top
#
# The library's GPU kernel set (`gpu/ops/`) mirrors `reference/ops/` module for module, and
# every op is written the way this tutorial wrote STR:
#
# - **fused elementwise kernels** where NumPy would make several passes (ReLU with its mask,
#   batch-norm's normalise-scale-shift, the LTP and SCP masks, the SGD update in
#   `gpu/optim.py`);
# - **reductions** accumulating in double for every per-channel or per-layer sum;
# - **cuBLAS GEMMs with an explicit compute type** (`gpu/blas.py`) under convolution and the
#   linear layers: float32, TF32 on the tensor cores (the default for training), or bfloat16
#   operands with float32 master weights;
# - **raw CUDA kernels** for the shapes a GEMM handles badly: im2col and col2im, the depthwise
#   convolution of MobileNetV1, pooling.
#
# The training loop, models, sparsity methods and checkpoints are the reference's, unchanged. A
# model moves with `model.to("cuda")` and a run with `learnsparse train --device cuda`. The test
# suite proves the twin equal to the reference op by op (`tests/test_gpu_agreement.py`) and step
# by step on ResNet50 and MobileNetV1 (`tests/test_gpu_models.py`).
