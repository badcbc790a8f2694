"""A minimal reverse-mode automatic differentiation engine.

The whole engine is three ideas:

1. A :class:`Tensor` wraps an array (NumPy, or CuPy on the GPU) and, once
   :meth:`Tensor.backward` has run, the gradient of a scalar with respect to it.
2. :func:`apply` runs one op. An op is a pair of stateless kernels looked up by
   name in the kernel set that matches the arrays (``reference.ops`` for NumPy,
   ``gpu.ops`` for CuPy)::

       y, cache = <name>_forward(*inputs, **static, needs_input_grad=needs)
       grads    = <name>_backward(dy, cache)   # one entry per input, None where none

   ``needs`` holds one bool per input: whether that input requires a gradient
   (and grad mode is on). The forward keeps in its cache only what the wanted
   gradients read, and the backward returns None for the others without
   computing them (the input image's gradient in the first conv, say). A
   kernel set declares ``NEEDS_INPUT_GRAD = True`` when its forwards take the
   argument; the engine passes it only then, and a set without it computes
   every gradient.

   When any input requires a gradient, the result remembers a :class:`Node`:
   the backward kernel, its cache, and for each input the node that produced
   it (or the leaf tensor itself, or None). These nodes, linked from output
   back to leaves, are the tape. A node never holds the tensors its op made or
   read: an intermediate output stays alive only while the caller, or some
   cache, holds it.
3. :meth:`Tensor.backward` orders the tape so that every node comes after all
   nodes that consume its output, walks it in that (reverse) order, calls each
   backward kernel once with the summed upstream gradient, and adds the results
   into ``.grad`` of the leaves (gradients accumulate across calls, as in
   PyTorch; optimizers zero them). Each node's cache is released as soon as
   its backward has run, so the graph's memory falls during the backward and
   nothing of it is left afterwards.

The engine never looks inside the arrays: everything array-specific happens in
the kernels, so the same code drives both backends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "Tensor",
    "Node",
    "apply",
    "apply_with_cache",
    "as_array",
    "graph_nodes",
    "is_grad_enabled",
    "no_grad",
]


class _GradMode(threading.local):
    enabled: bool = True


_grad_mode = _GradMode()


def is_grad_enabled() -> bool:
    """Whether ops called now record themselves for :meth:`Tensor.backward`."""
    return _grad_mode.enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run ops without recording them (evaluation, optimizer updates)."""
    previous = _grad_mode.enabled
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


class Node:
    """One recorded op: how to send a gradient from its output to its inputs.

    ``inputs`` has one entry per input of the op: the :class:`Node` that
    produced it, the leaf :class:`Tensor` itself (a tensor that requires a
    gradient and was made by no op), or None (no gradient wanted). A backward
    pass that frees the node sets ``backward`` and ``cache`` to None and
    ``inputs`` to ``()``.
    """

    __slots__ = ("name", "backward", "cache", "inputs", "shape")

    def __init__(self, name: str, backward: Callable[..., tuple] | None, cache: Any, inputs: tuple, shape=()):
        self.name = name
        self.backward = backward
        self.cache = cache
        self.inputs = inputs
        self.shape = tuple(shape)  # the output's shape (for error messages and for printing the tape)

    def free(self) -> None:
        """Release the cache and the links to the inputs (the node stays, marked as used)."""
        self.backward = None
        self.cache = None
        self.inputs = ()

    def __repr__(self) -> str:
        return f"Node({self.name!r}, shape={self.shape})"


class Tensor:
    """An array with an optional gradient and the op that produced it.

    ``data`` is the array itself; ``grad`` is an array of the same shape once a
    backward pass reached this tensor (leaves only; intermediate gradients are
    freed as soon as they have been used).
    """

    __slots__ = ("data", "grad", "requires_grad", "node")
    __array_priority__ = 1000  # make ``ndarray + Tensor`` defer to Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False, node: Node | None = None):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data) expects an array, got a Tensor; use t.data or t.detach()")
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            raise TypeError(f"Tensor(data) expects a NumPy or CuPy array, got {type(data).__name__}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.node = node

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{grad})"

    def detach(self) -> Tensor:
        """The same array, cut off from the graph."""
        return Tensor(self.data)

    def item(self) -> float:
        return float(self.data.item())

    def numpy(self):
        """The data as a NumPy array (copied to the host if it lives on a GPU)."""
        get = getattr(self.data, "get", None)
        return get() if callable(get) else self.data

    # --------------------------------------------------------------- backward
    def backward(self, dy: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * dy into ``leaf.grad`` for every leaf.

        ``dy`` defaults to 1 for a scalar; a non-scalar output needs an explicit
        cotangent of its own shape. Each node's cache (the activations its
        backward needs) is released as soon as it has been used, so memory falls
        during the backward pass; ``retain_graph=True`` keeps the graph for a
        second backward through it.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require a gradient")
        if dy is None:
            if self.data.size != 1:
                raise ValueError(
                    f"backward() without an argument needs a scalar output, got shape {self.shape}"
                )
            dy = self.data * 0 + 1  # ones of the right type, shape and dtype
        elif tuple(dy.shape) != self.shape:
            raise ValueError(f"backward(dy): dy has shape {tuple(dy.shape)}, expected {self.shape}")

        if self.node is None:  # a leaf: d(self)/d(self) = 1
            self.grad = dy if self.grad is None else self.grad + dy
            return
        order = _topological_order(self.node)
        grads: dict[int, Any] = {id(self.node): dy}  # pending gradients of node outputs
        leaves: dict[int, tuple[Tensor, Any]] = {}  # summed gradients of leaf tensors
        for node in order:  # outputs first
            g = grads.pop(id(node), None)
            if g is None:  # no gradient reached this node's output
                if not retain_graph:
                    node.free()
                continue
            if node.backward is None:
                raise RuntimeError(
                    f"backward() through '{node.name}' a second time, but the first call freed its "
                    "cache; pass retain_graph=True to the first backward() to keep it"
                )
            input_grads = node.backward(g, node.cache)
            del g
            if len(input_grads) != len(node.inputs):
                raise RuntimeError(
                    f"{node.name}_backward returned {len(input_grads)} gradients for {len(node.inputs)} inputs"
                )
            parents = node.inputs
            if not retain_graph:
                node.free()  # the cache is released before the next node's backward runs
            for parent, g_in in zip(parents, input_grads):
                if parent is None or g_in is None:
                    continue
                key = id(parent)
                if isinstance(parent, Tensor):
                    leaves[key] = (
                        (parent, g_in) if key not in leaves else (parent, _sum(leaves[key][1], g_in))
                    )
                else:
                    grads[key] = g_in if key not in grads else _sum(grads[key], g_in)
            del input_grads, parents
        for leaf, g in leaves.values():
            leaf.grad = g if leaf.grad is None else leaf.grad + g

    # ------------------------------------------------------------- operators
    # Sugar for the ops of the same name (reference.functional routes the same
    # way): each records one op on the tape through apply, defined below.
    def __add__(self, other):
        return apply("add", self, other)

    def __radd__(self, other):
        return apply("add", other, self)

    def __sub__(self, other):
        return apply("sub", self, other)

    def __rsub__(self, other):
        return apply("sub", other, self)

    def __mul__(self, other):
        return apply("mul", self, other)

    def __rmul__(self, other):
        return apply("mul", other, self)

    def __truediv__(self, other):
        return apply("div", self, other)

    def __rtruediv__(self, other):
        return apply("div", other, self)

    def __neg__(self):
        return apply("mul", self, -1.0)

    def __matmul__(self, other):
        return apply("matmul", self, other)

    def sum(self, axis=None, keepdims: bool = False):
        return apply("sum", self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return apply("mean", self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return apply("reshape", self, shape=tuple(shape))


def _topological_order(root: Node) -> list[Node]:
    """Nodes reachable from ``root``, each after every node that consumes its output.

    Iterative depth-first search (deep networks would overflow Python's
    recursion limit), then reversed post-order. Leaf tensors are not listed.
    """
    order: list[Node] = []
    visited: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node.inputs:
            if isinstance(parent, Node) and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def graph_nodes(root: Tensor) -> list[Node]:
    """Every node of the tape below ``root``, consumers first (empty for a leaf or a constant)."""
    return [] if root.node is None else _topological_order(root.node)


def as_array(x: Any) -> Any:
    """The array inside a Tensor, or ``x`` itself."""
    return x.data if isinstance(x, Tensor) else x


def apply(name: str, *inputs: Any, **static: Any) -> Tensor:
    """Run op ``name`` on ``inputs`` and record it if a gradient is needed.

    ``inputs`` are Tensors, arrays, Python scalars or None (an absent optional
    input such as a bias). ``static`` holds non-differentiable settings
    (stride, padding, training flag, ...). The kernel set is chosen from the
    first array among the inputs. The forward learns which inputs need a
    gradient through ``needs_input_grad`` (see the module docstring); with
    grad mode off, none does, and the forward keeps nothing for a backward.
    """
    return apply_with_cache(name, *inputs, **static)[0]


def _sum(a: Any, b: Any) -> Any:
    """Two gradients of one value added (a residual block's input gets two) by the kernel set's add,
    which for the reference runs on parts of the batch side by side."""
    from reference.ops import kernels_for

    kernels = kernels_for(a)
    if getattr(kernels, "NEEDS_INPUT_GRAD", False):
        return kernels.add_forward(a, b, needs_input_grad=(False, False))[0]
    return kernels.add_forward(a, b)[0]


def apply_with_cache(name: str, *inputs: Any, **static: Any) -> tuple[Tensor, Any]:
    """:func:`apply`, also returning the forward kernel's cache.

    For the few callers that need a by-product of the forward pass (batch norm
    reads the batch statistics to update its running averages).
    """
    from reference.ops import kernels_for

    arrays = tuple(as_array(x) for x in inputs)
    kernels = kernels_for(next((a for a in arrays if hasattr(a, "shape")), None))
    forward = getattr(kernels, f"{name}_forward")
    enabled = _grad_mode.enabled
    needs = tuple(enabled and isinstance(x, Tensor) and x.requires_grad for x in inputs)
    if getattr(kernels, "NEEDS_INPUT_GRAD", False):
        y, cache = forward(*arrays, **static, needs_input_grad=needs)
    else:
        y, cache = forward(*arrays, **static)
    if not any(needs):
        return Tensor(y), cache
    parents = tuple((x if x.node is None else x.node) if need else None for x, need in zip(inputs, needs))
    node = Node(name, getattr(kernels, f"{name}_backward"), cache, parents, getattr(y, "shape", ()))
    return Tensor(y, requires_grad=True, node=node), cache
