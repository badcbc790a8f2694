"""The op case table: every op in ``reference.ops`` has at least one case here.

Each family module exports ``CASES: list[OpCase]``; adding an op means adding
its kernels and one entry in its family's list.
"""

from . import conv, elementwise, linalg, loss, norm, pooling, shape, sparsity, sync_norm

CASES = [
    *elementwise.CASES,
    *shape.CASES,
    *linalg.CASES,
    *conv.CASES,
    *norm.CASES,
    *pooling.CASES,
    *loss.CASES,
    *sparsity.CASES,
    *sync_norm.CASES,
]
