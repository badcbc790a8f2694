"""The NumPy kernel set: stateless forward/backward pairs, one module per family.

Every op ``name`` is two functions::

    name_forward(*inputs, **static, needs_input_grad=None) -> (y, cache)
    name_backward(dy, cache) -> (d<input0>, d<input1>, ...)   # None where no gradient

``needs_input_grad`` is one bool per input, in input order (None, for a direct
call, means every input that can have a gradient). The forward records in its
cache only what the wanted gradients read, and the backward returns None for
every other input without computing its gradient. (The engine records an op,
and so calls its backward, only when at least one input wants a gradient.) The cache types, and the
rules for what a cache may hold (no copy of an array the backward can rebuild
cheaply, the op's own input or output object rather than a copy), are declared
once in :mod:`reference.caches`, for this set and ``gpu.ops`` alike.
``NEEDS_INPUT_GRAD = True`` below tells :func:`reference.autodiff.apply` that
this set's forwards take the argument.

``gpu.ops`` exports the same names with the same signatures for CuPy arrays;
:func:`kernels_for` picks the set from an array's type, and
:func:`reference.autodiff.apply` records the pair on the tape.

Families (each module's docstring numbers its equations; each backward line
cites the equation it implements):

- :mod:`.elementwise`: broadcasting arithmetic, ReLU, absolute value, sum and mean
- :mod:`.shape`: reshape
- :mod:`.linalg`: matmul and linear
- :mod:`.conv`: conv2d via im2col (stride, padding, groups, depthwise)
- :mod:`.norm`: batch norm (training and evaluation)
- :mod:`.sync_norm`: the two kernels of synchronised batch norm (local sums; normalising with given sums)
- :mod:`.pooling`: max, average and global average pooling
- :mod:`.loss`: softmax cross-entropy with label smoothing
- :mod:`.sparsity`: STR soft threshold, LTP soft mask and differentiable L0,
  SCP channel mask

Convolution, batch norm and ReLU run on parts of the batch side by side, one
thread per core (:mod:`.parallel`: how the batch is cut, and why the answer
does not depend on the thread count).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

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


def kernels_for(array: Any) -> ModuleType:
    """The kernel set for ``array``: this module for NumPy, ``gpu.ops`` for CuPy.

    ``gpu`` is imported only when a CuPy array is seen, so the reference never
    needs CuPy installed.
    """
    if array is None or isinstance(array, (np.ndarray, np.generic, int, float)):
        return sys.modules[__name__]
    if type(array).__module__.split(".")[0] == "cupy":
        import gpu.ops

        return gpu.ops
    raise TypeError(f"no kernel set for arrays of type {type(array).__module__}.{type(array).__name__}")
