"""The SGD update of :mod:`reference.optim` as one fused kernel per parameter.

:meth:`reference.optim.SGD.step` hands every CuPy parameter to
:func:`sgd_update`, which applies equations (1)-(6) of ``reference.optim`` in a
single pass over the parameter, its gradient and its momentum buffer (the
array expressions of the reference would launch four to six kernels and
allocate two temporaries per parameter). The hyperparameters are kernel
arguments, not compiled in, so a schedule changing ``lr`` every step never
recompiles.
"""

from __future__ import annotations

from typing import Any

from gpu.kernels import elementwise

__all__ = ["sgd_update"]

_sgd_plain = elementwise(
    "optim_sgd_plain",
    "T grad, T lr, T weight_decay",
    "T p",
    "p = p - lr * (grad + weight_decay * p);  // (1), (6) with momentum 0: d = g",
)

_sgd = elementwise(
    "optim_sgd_update",
    "T grad, T lr, T weight_decay, T momentum, bool nesterov, bool first",
    "T p, T buf",
    """
    T g = grad + weight_decay * p;                    // (1)
    if (momentum != T(0)) {
        buf = first ? g : momentum * buf + g;         // (2), (3)
        g = nesterov ? g + momentum * buf : buf;      // (4), (5)
    }
    p = p - lr * g;                                   // (6)
    """,
)


def sgd_update(
    data: Any, grad: Any, buf: Any, *, lr: float, weight_decay: float, momentum: float, nesterov: bool
) -> Any:
    """Update ``data`` in place; returns the momentum buffer (new on the first step, else ``buf``).

    ``buf`` None means the parameter's first update (equation (2)); with
    ``momentum == 0`` no buffer is kept and None is returned.
    """
    import cupy

    if grad.dtype != data.dtype:
        grad = grad.astype(data.dtype)
    t = data.dtype.type
    if momentum == 0.0:
        _sgd_plain(grad, t(lr), t(weight_decay), data)
        return None
    first = buf is None
    if first:
        buf = cupy.empty_like(data)
    _sgd(grad, t(lr), t(weight_decay), t(momentum), bool(nesterov), first, data, buf)
    return buf
