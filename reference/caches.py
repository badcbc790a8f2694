"""What each op's forward leaves for its backward: the cache types of both kernel sets.

An op's forward returns ``(y, cache)`` and its backward reads only the cache
(see :mod:`reference.ops`). The NumPy kernels (``reference.ops``) and the CuPy
kernels (``gpu.ops``) are independent implementations, but what a backward
needs is a fact about the equations, so the cache types are declared once,
here, and both kernel sets fill them. Array fields hold NumPy arrays in one set
and CuPy arrays in the other.

The rules every cache follows (they are what keeps a training step's graph as
small as the one PyTorch keeps):

- A cache holds only what its backward reads. Anything that can be recomputed
  from a cached input in one cheap pass (im2col columns, padded or transposed
  copies of the input, STR's mask, LTP's sigmoid and its slope) is recomputed
  in the backward, not kept.
- An array a cache keeps is the op's own input or output object, not a copy,
  wherever the backward can use it as it is: a ReLU keeps its output, which is
  also the next conv's input, so the two caches share one buffer.
- A field that only one input's gradient reads is None when that input needs
  no gradient: the forward knows, from its ``needs_input_grad`` argument
  (:func:`grad_flags`), which gradients will be asked for.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "AbsCache",
    "BatchNormCache",
    "BinaryCache",
    "Conv2dCache",
    "GlobalAvgPoolCache",
    "LinearCache",
    "LtpCache",
    "MatmulCache",
    "MaxPoolCache",
    "AvgPoolCache",
    "ReduceCache",
    "ReluCache",
    "ReshapeCache",
    "ScpCache",
    "SoftmaxCrossEntropyCache",
    "StrCache",
    "SyncNormElemtCache",
    "SyncNormSumsCache",
    "buffer_of",
    "cache_arrays",
    "grad_flags",
    "unique_bytes",
]


def grad_flags(op: str, needs_input_grad: Any, count: int) -> tuple[bool, ...]:
    """``needs_input_grad`` as ``count`` bools, one per input of ``op``.

    None (a direct call of a kernel) means every input that can have a
    gradient gets one. Otherwise it must be a sequence of ``count`` bools, in
    input order, as the engine passes it.
    """
    if needs_input_grad is None:
        return (True,) * count
    flags = tuple(needs_input_grad)
    if len(flags) != count or not all(isinstance(f, bool) for f in flags):
        raise ValueError(
            f"{op}: needs_input_grad must be {count} bools, one per input, got {needs_input_grad!r}"
        )
    return flags


def cache_arrays(cache: Any) -> list[Any]:
    """Every array a cache holds, looking inside tuples, lists and dicts (NamedTuples included)."""
    found: list[Any] = []
    stack = [cache]
    while stack:
        item = stack.pop()
        if hasattr(item, "nbytes") and hasattr(item, "shape"):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def buffer_of(array: Any) -> Any:
    """The array that owns ``array``'s memory: its ``.base`` chain followed to the last array.

    A view (a reshape, a slice, a transpose) keeps its whole base alive, so
    the base is what it costs.
    """
    owner = link = array
    while getattr(link, "base", None) is not None:  # through non-array links too (a strided view's)
        link = link.base
        if hasattr(link, "nbytes") and hasattr(link, "shape"):
            owner = link
    return owner


def unique_bytes(arrays) -> int:
    """Bytes of the buffers behind ``arrays``, each buffer counted once however many views share it."""
    owners = {id(b): b for b in map(buffer_of, arrays)}
    return sum(int(b.nbytes) for b in owners.values())


# ------------------------------------------------------------------ elementwise
class BinaryCache(NamedTuple):
    """add, sub, mul, div: ``a`` and ``b`` only where a gradient reads them.

    ``a_shape``/``b_shape`` None means that input gets no gradient (a Python
    scalar, or an input that needs none).
    """

    a: Any  # mul: kept when b needs a gradient; div: when b does
    b: Any  # mul: kept when a needs a gradient; div: when a or b does
    a_shape: tuple[int, ...] | None
    b_shape: tuple[int, ...] | None


class ReluCache(NamedTuple):
    y: Any  # the output itself (not a copy): [y > 0] = [x > 0] is the mask of the backward


class ReduceCache(NamedTuple):
    x_shape: tuple[int, ...]
    axis: tuple[int, ...]
    keepdims: bool
    count: int


class AbsCache(NamedTuple):
    x: Any  # the input itself: sign(x) is recomputed in the backward


# ------------------------------------------------------------------------ shape
class ReshapeCache(NamedTuple):
    x_shape: tuple[int, ...]


# ----------------------------------------------------------------------- linalg
class MatmulCache(NamedTuple):
    a: Any  # kept when b needs a gradient
    b: Any  # kept when a needs a gradient
    a_shape: tuple[int, ...] | None  # None: no gradient for a
    b_shape: tuple[int, ...] | None
    a_dtype: Any
    b_dtype: Any

    @classmethod
    def keep(cls, a: Any, b: Any, need_a: bool, need_b: bool) -> MatmulCache:
        """``b`` only for ``da`` (2) and ``a`` only for ``db`` (3) of :mod:`reference.ops.linalg`."""
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        return cls(
            a if need_b else None,
            b if need_a else None,
            a_shape if need_a else None,
            b_shape if need_b else None,
            a.dtype,
            b.dtype,
        )


class LinearCache(NamedTuple):
    x: Any  # kept when w needs a gradient
    w: Any  # kept when x needs a gradient
    x_dtype: Any  # None: x gets no gradient
    w_dtype: Any  # None: w gets no gradient
    b_dtype: Any  # None: no bias, or it gets no gradient
    w_shape: tuple[int, int]


# ------------------------------------------------------------------------- conv
class Conv2dCache(NamedTuple):
    """conv2d: the input as given (NCHW) and the weight, each only where a gradient reads it.

    ``path`` names the kernel's algorithm (the reference's "general",
    "shift", "pointwise", "depthwise", "depthwise-cl"; the twin's own names).
    Whatever layout the path works in (padded, channel-major, channels-last,
    im2col columns) is rebuilt from ``x`` in the backward.
    """

    path: str
    x: Any  # the input itself, kept when w needs a gradient; else None
    w: Any  # the weight itself, kept when x needs a gradient; else None
    x_shape: tuple[int, int, int, int]
    w_shape: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    needs: tuple[bool, bool, bool]  # dx, dw, db wanted (db False when there is no bias)

    @classmethod
    def keep(
        cls,
        path: str,
        x: Any,
        w: Any,
        has_bias: bool,
        stride: tuple[int, int],
        padding: tuple[int, int],
        groups: int,
        needs: tuple[bool, bool, bool],
        *,
        w_kept: Any = None,
    ) -> Conv2dCache:
        """``x`` only for ``dw`` (4), the weight only for ``dx`` (5); ``w_kept`` is the copy of the
        weight a kernel set multiplies with, when it is not ``w`` itself (the bfloat16 one)."""
        need_x, need_w, need_b = needs
        kept = w if w_kept is None else w_kept
        return cls(
            path,
            x if need_w else None,
            kept if need_x else None,
            tuple(x.shape),
            tuple(w.shape),
            stride,
            padding,
            groups,
            (need_x, need_w, need_b and has_bias),
        )


# ------------------------------------------------------------------------- norm
class BatchNormCache(NamedTuple):
    xhat: Any  # (4), x's shape; None when neither x (training) nor gamma needs a gradient
    inv_std: Any  # s of (3), (C,)
    gamma: Any  # (C,), None means gamma = 1
    mean: Any  # (C,): the batch mean (1) in training, running_mean in evaluation
    var: Any  # (C,): the biased batch variance (2) in training, running_var in evaluation
    training: bool
    count: int  # n, the entries per channel
    x_dtype: Any  # None: x gets no gradient
    gamma_dtype: Any  # None: gamma absent or gets no gradient
    beta_dtype: Any  # None: beta absent or gets no gradient
    x_ndim: int

    @staticmethod
    def keeps_xhat(need_x: bool, need_gamma: bool, training: bool) -> bool:
        """``xhat`` is read by ``dgamma`` and by the training ``dx``; nothing else needs it."""
        return need_gamma or (need_x and training)

    @classmethod
    def keep(
        cls,
        xhat: Any,
        inv_std: Any,
        gamma: Any,
        beta: Any,
        mean: Any,
        var: Any,
        training: bool,
        count: int,
        dtype: Any,
        ndim: int,
        needs: tuple[bool, bool, bool],
    ) -> BatchNormCache:
        """The cache for the wanted gradients ``needs`` = (x, gamma, beta); an absent gamma or beta gets none."""
        need_x, need_gamma, need_beta = needs
        need_gamma = need_gamma and gamma is not None
        keep = cls.keeps_xhat(need_x, need_gamma, training)
        return cls(
            xhat if keep else None,
            inv_std,
            gamma,
            mean,
            var,
            bool(training),
            count,
            dtype if need_x else None,
            gamma.dtype if need_gamma else None,
            beta.dtype if beta is not None and need_beta else None,
            ndim,
        )


class SyncNormSumsCache(NamedTuple):
    """sync_batch_norm_sums (reference.ops.sync_norm): the input itself, when it needs a gradient."""

    x: Any


class SyncNormElemtCache(NamedTuple):
    """sync_batch_norm_elemt (reference.ops.sync_norm (2)-(5)); per-channel values are (C,)."""

    xhat: Any  # (5), x's shape, in the accumulation dtype; None when no gradient reads it
    x: Any  # or the input itself, from which the GPU twin recomputes xhat (then xhat is None)
    mean: Any  # mu (2), accumulation dtype
    inv_std: Any  # s (4), accumulation dtype
    count: Any  # n, the global entries per channel (a float)
    gamma: Any  # None means gamma = 1
    x_dtype: Any  # None: x gets no gradient
    gamma_dtype: Any  # None: gamma absent or gets no gradient
    beta_dtype: Any  # None: beta absent or gets no gradient
    sums_dtype: Any  # None: the sums get no gradient
    mean_out: Any  # mu in x's dtype, for the running statistics
    var_out: Any  # the biased variance (3) in x's dtype, for the running statistics


# ---------------------------------------------------------------------- pooling
class MaxPoolCache(NamedTuple):
    geometry: Any  # reference.contracts.PoolGeometry
    argmax: Any  # (N, C, Ho, Wo): p* kw + q* of (2), the smallest integer type that fits


class AvgPoolCache(NamedTuple):
    geometry: Any  # reference.contracts.PoolGeometry


class GlobalAvgPoolCache(NamedTuple):
    x_shape: tuple[int, int, int, int]


# ------------------------------------------------------------------------- loss
class SoftmaxCrossEntropyCache(NamedTuple):
    probs: Any  # p = softmax(z), (N, K), the logits' dtype
    labels: Any  # (N,) integers
    label_smoothing: float


# --------------------------------------------------------------------- sparsity
class StrCache(NamedTuple):
    w: Any  # the latent weight itself; the mask [|W| > g] is recomputed from it
    threshold: Any  # g of (1) in w's dtype, s's shape
    slope: Any  # sigmoid'(s) in w's dtype, s's shape
    w_dtype: Any  # None: w gets no gradient
    s_dtype: Any  # None: s is a Python number or needs no gradient
    per_channel: bool


class LtpCache(NamedTuple):
    w: Any  # the latent weight itself; z, m and q of (6) are recomputed from it
    tau: Any  # tau as a 0-d array in w's dtype
    temperature: float  # T
    flag: bool  # exact_grad for the mask, weight_grad for L0
    w_dtype: Any  # None: w gets no gradient
    tau_dtype: Any  # None: tau is a Python number or needs no gradient


class ScpCache(NamedTuple):
    prob: Any  # P of (15), (C,)
    u: Any  # u of (15)
    a: Any  # |gamma| + 1e-8
    sign_gamma: Any  # sign(gamma), sign(0) = 0: the subgradient of |gamma| in (21)
    slope: Any  # sigmoid'(z) of (18); None in evaluation
    k_over_t: float
    training: bool
    gamma_dtype: Any  # None: gamma gets no gradient
    beta_dtype: Any  # None: beta gets no gradient
