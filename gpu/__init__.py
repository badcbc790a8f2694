"""The CuPy twin of :mod:`reference`: the same ops as CUDA kernels, plus the GPU runtime.

Nothing above the kernels is duplicated: layers, models, sparsity methods, the
optimizer, the training loop and checkpoints are the reference's, and they run
on the GPU because every op call picks its kernel set from the arrays it is
given (:func:`reference.ops.kernels_for`). This package holds only

- :mod:`gpu.ops`: the kernel set, module for module and function for function
  the mirror of :mod:`reference.ops` (its equations are cited, not re-derived);
- :mod:`gpu.kernels`: every hand-written CUDA kernel, declared in one place and
  compiled once on first use;
- :mod:`gpu.blas`: GEMM through cuBLAS with an explicit compute type;
- :mod:`gpu.runtime`: the device check, the memory pool, precision (float32
  with TF32 GEMMs by default, bfloat16 GEMMs as an option) and the kernel cache.

Importing :mod:`gpu` needs CuPy; :func:`require` says clearly why a GPU cannot
be used, for ``learnsparse train --device cuda`` on a machine without one.
"""

from __future__ import annotations

from gpu.runtime import DeviceUnavailable, available, describe, require

__all__ = ["DeviceUnavailable", "available", "describe", "require"]
