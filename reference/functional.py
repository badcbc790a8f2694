"""The Tensor-level API: one function per op, recording it on the tape.

Each function validates nothing beyond what its kernel needs; layers in
:mod:`reference.nn` check shapes and dtypes and say what they expected.
Kernels live in :mod:`reference.ops` (NumPy) and ``gpu.ops`` (CuPy); the
function bodies here only route arguments to :func:`reference.autodiff.apply`.
"""

from __future__ import annotations

from typing import Any

from reference.autodiff import Tensor, apply, apply_with_cache, as_array, no_grad

IntPair = int | tuple[int, int]


def add(a, b) -> Tensor:
    return apply("add", a, b)


def sub(a, b) -> Tensor:
    return apply("sub", a, b)


def mul(a, b) -> Tensor:
    return apply("mul", a, b)


def div(a, b) -> Tensor:
    return apply("div", a, b)


def relu(x) -> Tensor:
    return apply("relu", x)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    return apply("sum", x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    return apply("mean", x, axis=axis, keepdims=keepdims)


def reshape(x, shape: tuple[int, ...]) -> Tensor:
    return apply("reshape", x, shape=tuple(shape))


def flatten(x) -> Tensor:
    """(N, ...) -> (N, prod(...))."""
    return reshape(x, (x.shape[0], -1))


def matmul(a, b) -> Tensor:
    return apply("matmul", a, b)


def linear(x, w, b=None) -> Tensor:
    """``x @ w.T + b`` with ``w`` of shape (out, in), as torch.nn.Linear."""
    return apply("linear", x, w, b)


def conv2d(x, w, b=None, stride: IntPair = 1, padding: IntPair = 0, groups: int = 1) -> Tensor:
    """2-D cross-correlation, NCHW input, OIHW weight (O, C/groups, kh, kw)."""
    return apply("conv2d", x, w, b, stride=stride, padding=padding, groups=groups)


def batch_norm(
    x,
    gamma,
    beta,
    running_mean: Any,
    running_var: Any,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch norm over (N, H, W) per channel (or over N for 2-D input).

    In training mode the batch statistics normalise ``x`` and the running
    averages (arrays, updated in place) move toward them::

        running_mean <- (1 - momentum) running_mean + momentum mean
        running_var  <- (1 - momentum) running_var  + momentum var * n / (n - 1)

    (the unbiased variance, as PyTorch). In evaluation mode the running
    statistics normalise and nothing is updated.
    """
    running_mean, running_var = as_array(running_mean), as_array(running_var)
    y, cache = apply_with_cache(
        "batch_norm", x, gamma, beta, running_mean, running_var, training=training, eps=eps
    )
    if training:
        n = x.size // x.shape[1]
        with no_grad():
            running_mean *= 1.0 - momentum
            running_mean += momentum * cache.mean
            running_var *= 1.0 - momentum
            running_var += momentum * cache.var * (n / max(n - 1, 1))
    return y


def max_pool2d(x, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Tensor:
    return apply("max_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d(x, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Tensor:
    return apply("avg_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def global_avg_pool2d(x) -> Tensor:
    """(N, C, H, W) -> (N, C), the mean over H and W."""
    return apply("global_avg_pool2d", x)


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of softmax(logits) against integer ``labels``.

    With label smoothing ``e`` the target is ``(1 - e) onehot + e / classes``.
    """
    return apply("softmax_cross_entropy", logits, as_array(labels), label_smoothing=label_smoothing)
