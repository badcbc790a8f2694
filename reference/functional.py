"""The Tensor-level API: one function per op, recording it on the tape.

Each function validates nothing beyond what its kernel needs; layers in
:mod:`reference.nn` check shapes and dtypes and say what they expected.
Kernels live in :mod:`reference.ops` (NumPy) and ``gpu.ops`` (CuPy); the
function bodies here only route arguments to :func:`reference.autodiff.apply`.
"""

from __future__ import annotations

from typing import Any

from reference.autodiff import Node, Tensor, apply, apply_with_cache, as_array, is_grad_enabled, no_grad
from reference.backend import array_module
from reference.errors import ShapeError

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


def abs(x) -> Tensor:  # noqa: A001 - mirrors numpy
    """``|x|``, with the subgradient ``sign(0) = 0`` at the kink."""
    return apply("abs", x)


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
    update_mask: Any = None,
) -> Tensor:
    """Batch norm over (N, H, W) per channel (or over N for 2-D input).

    In training mode the batch statistics normalise ``x`` and the running
    averages (arrays, updated in place) move toward them::

        running_mean <- (1 - momentum) running_mean + momentum mean
        running_var  <- (1 - momentum) running_var  + momentum var * n / (n - 1)

    (the unbiased variance, as PyTorch). In evaluation mode the running
    statistics normalise and nothing is updated.

    ``update_mask``, a boolean (C,) array, limits the update in training mode
    to the channels where it is True; the others keep their running statistics
    unchanged (SCP updates the statistics of kept channels only). The updated
    channels get exactly the values they would get without a mask. It does not
    change the output, and is ignored in evaluation mode. The masked update is
    an element-wise select (``where``), not boolean indexing: on the GPU,
    indexing by a mask reads the number of selected channels back to the host,
    a synchronisation inside every training step.
    """
    running_mean, running_var = as_array(running_mean), as_array(running_var)
    update_mask = as_array(update_mask)
    if update_mask is not None:
        expected = (x.shape[1],) if len(x.shape) > 1 else None
        if not hasattr(update_mask, "dtype") or update_mask.dtype != bool or update_mask.shape != expected:
            got = f"{getattr(update_mask, 'dtype', type(update_mask).__name__)} {getattr(update_mask, 'shape', '')}"
            raise ShapeError(f"batch_norm expects update_mask as a bool array of shape {expected}, got {got}")
    y, cache = apply_with_cache(
        "batch_norm", x, gamma, beta, running_mean, running_var, training=training, eps=eps
    )
    if training:
        n = x.size // x.shape[1]
        with no_grad():
            if update_mask is None:
                new_mean, new_var = running_mean, running_var  # updated in place
            else:
                new_mean, new_var = running_mean.copy(), running_var.copy()
            new_mean *= 1.0 - momentum
            new_mean += momentum * cache.mean
            new_var *= 1.0 - momentum
            new_var += momentum * cache.var * (n / max(n - 1, 1))
            if update_mask is not None:  # a select, not boolean indexing: no read of the mask's values
                xp = array_module(running_mean)
                running_mean[...] = xp.where(update_mask, new_mean, running_mean)
                running_var[...] = xp.where(update_mask, new_var, running_var)
    return y


def sync_batch_norm(
    x,
    gamma,
    beta,
    running_mean: Any,
    running_var: Any,
    allreduce: Any,
    momentum: float = 0.1,
    eps: float = 1e-5,
    update_mask: Any = None,
) -> Tensor:
    """Training-mode batch norm over a global batch spread across processes (synchronised batch norm).

    ``x`` is this process's shard; ``allreduce(array)`` sums a C-contiguous
    array over the processes in place (every process calls this function for
    the same layers in the same order). The local sums (``reference.ops.sync_norm``
    (1)) and this shard's entry count are summed over the processes in one call;
    ``sync_batch_norm_elemt`` normalises with the result. On the tape the
    all-reduce is a node whose backward all-reduces the cotangent of the sums:
    the adjoint of a sum over processes that every process receives. The
    gradient is then the one-process gradient of the global batch (equation
    (13) there). The running statistics move as in :func:`batch_norm`, with the
    global mean, the global unbiased variance and the same ``update_mask`` rule.
    """
    running_mean, running_var = as_array(running_mean), as_array(running_var)
    sums = apply("sync_batch_norm_sums", x)  # (2, C) float64: (1)
    xp = array_module(sums.data)
    channels = int(x.shape[1])
    local = x.size // channels if channels else 0
    packed = xp.concatenate(
        [sums.data, xp.full((1, channels), float(local), dtype=sums.data.dtype)]
    )  # (3, C)
    allreduce(packed)  # every process's sums and counts, added
    total_data, count = packed[:2].copy(), packed[2, :1].copy()  # (2, C), (1,)
    if sums.requires_grad and is_grad_enabled():

        def allreduce_backward(dy: Any, cache: Any) -> tuple[Any]:
            dsums = xp.ascontiguousarray(dy).copy()
            allreduce(dsums)  # the adjoint: the cotangents of every process, added
            return (dsums,)

        node = Node("sync_batch_norm_allreduce", allreduce_backward, None, (sums.node,), total_data.shape)
        total = Tensor(total_data, requires_grad=True, node=node)
    else:
        total = Tensor(total_data)
    y, cache = apply_with_cache("sync_batch_norm_elemt", x, gamma, beta, total, count, eps=eps)
    with no_grad():
        unbiased = count / xp.maximum(count - 1.0, 1.0)  # (1,) on the device: n / (n - 1), not read back
        new_mean = running_mean * (1.0 - momentum) + momentum * cache.mean_out
        new_var = running_var * (1.0 - momentum) + (momentum * cache.var_out * unbiased).astype(
            running_var.dtype
        )
        if update_mask is not None:  # a select, as in batch_norm
            new_mean = xp.where(update_mask, new_mean, running_mean)
            new_var = xp.where(update_mask, new_var, running_var)
        running_mean[...] = new_mean
        running_var[...] = new_var
    return y


def max_pool2d(x, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Tensor:
    return apply("max_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d(x, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Tensor:
    return apply("avg_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def global_avg_pool2d(x) -> Tensor:
    """(N, C, H, W) -> (N, C), the mean over H and W."""
    return apply("global_avg_pool2d", x)


def str_threshold(w, s) -> Tensor:
    """STR's soft-thresholded weight ``sign(w) max(|w| - sigmoid(s), 0)``.

    ``s`` has shape () (one threshold per layer) or (O,) (one per output
    channel, broadcast over the trailing axes of ``w``).
    """
    return apply("str_threshold", w, s)


def ltp_mask(w, tau, temperature, exact_grad: bool = True) -> Tensor:
    """LTP's soft-masked weight ``w sigmoid((w^2 - tau) / temperature)``.

    ``temperature`` (a positive number or 0-d array) gets no gradient;
    ``exact_grad=False`` uses the approximation ``d w_eff / d w = mask``.
    """
    return apply("ltp_mask", w, tau, temperature, exact_grad=exact_grad)


def ltp_l0(w, tau, temperature, weight_grad: bool = True) -> Tensor:
    """LTP's differentiable L0 count ``sum(sigmoid((w^2 - tau) / temperature))``, a scalar.

    ``weight_grad=False`` sends its gradient to ``tau`` only.
    """
    return apply("ltp_l0", w, tau, temperature, weight_grad=weight_grad)


def scp_channel_mask(
    gamma, beta, noise, *, k: float, c0: float, t: float, eps: float, training: bool
) -> Tensor:
    """SCP's per-channel mask from the BN scale ``gamma`` and shift ``beta``, shape (C,).

    Training: the relaxed keep sample ``sigmoid((k (c0 - P) + noise) / t)`` with
    ``P = Phi((eps - beta) / (|gamma| + 1e-8))`` and logistic ``noise`` drawn by
    the caller. Evaluation: the hard mask ``[P <= c0]`` (``noise`` is ignored and
    may be None; the gradients are zero).
    """
    return apply("scp_channel_mask", gamma, beta, noise, k=k, c0=c0, t=t, eps=eps, training=training)


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of softmax(logits) against integer ``labels``.

    With label smoothing ``e`` the target is ``(1 - e) onehot + e / classes``.
    """
    return apply("softmax_cross_entropy", logits, as_array(labels), label_smoothing=label_smoothing)
