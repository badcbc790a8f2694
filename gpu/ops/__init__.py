"""The CuPy kernel set: the mirror of :mod:`reference.ops` on the GPU.

Same modules, same op names, same signatures and the same cache-then-backward
contract::

    name_forward(*inputs, **static, needs_input_grad=None) -> (y, cache)
    name_backward(dy, cache) -> (d<input0>, d<input1>, ...)   # None where no gradient

``needs_input_grad`` is one bool per input, as :func:`reference.autodiff.apply`
passes it (None, for a direct call, means every input that can have a
gradient): the forward keeps in its cache only what the wanted gradients read,
and the backward returns None for the others without computing them. The cache
types are the reference's, declared once in :mod:`reference.caches`.

Each module cites the reference module's numbered equations instead of
deriving them again, and never calls :mod:`reference.ops`: the twin is an
independent implementation, which is what gives the agreement tests
(``tests/test_gpu_agreement.py``) their meaning. Validation errors are the
reference's error classes with the same messages, so a caller cannot tell the
backends apart by how they fail.

Families:

- :mod:`.elementwise`: fused broadcasting arithmetic, ReLU, |x|, sum and mean
- :mod:`.shape`: reshape
- :mod:`.linalg`: matmul and linear on :func:`gpu.blas.gemm`
- :mod:`.conv`: conv2d by im2col + GEMM, with pointwise and depthwise kernels
- :mod:`.norm`: batch norm with fused statistics and backward kernels
- :mod:`.pooling`: max, average and global average pooling kernels
- :mod:`.loss`: softmax cross-entropy in two kernels
- :mod:`.sparsity`: fused STR, LTP and SCP kernels with their reductions
- :mod:`.sync_norm`: synchronised batch norm's local sums and normalisation with given sums
"""

from __future__ import annotations

import sys

from .conv import *  # noqa: F401,F403
from .elementwise import *  # noqa: F401,F403
from .linalg import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .pooling import *  # noqa: F401,F403
from .shape import *  # noqa: F401,F403
from .sparsity import *  # noqa: F401,F403
from .sync_norm import *  # noqa: F401,F403

NEEDS_INPUT_GRAD = True  # every forward here takes needs_input_grad (see above)


def op_names() -> list[str]:
    """Every op with both a forward and a backward kernel in this set."""
    module = sys.modules[__name__]
    return sorted(
        name[: -len("_forward")]
        for name in dir(module)
        if name.endswith("_forward") and hasattr(module, name[: -len("_forward")] + "_backward")
    )
