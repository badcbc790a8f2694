"""Modules: parameters, buffers and sub-modules under dotted names.

A :class:`Module` owns three ordered tables, filled by plain attribute
assignment in ``__init__``:

- parameters: :class:`Parameter` tensors, the trainable leaves;
- buffers: plain arrays that are state but not trained (batch-norm running
  statistics), registered with :meth:`Module.register_buffer`;
- sub-modules: any attribute holding a :class:`Module`.

Names are dotted paths from the root (``layer1.0.conv1.weight``). The order of
:meth:`Module.state_dict` is: a module's own parameters, then its own buffers,
then each child's entries in the order the children were assigned. Assigning
children and parameters in torchvision's order therefore gives torchvision's
names in torchvision's order, so checkpoints move to and from PyTorch by name.

Shape tracing (used by :mod:`reference.accounting`): :meth:`Module.trace`
follows an input shape through the module without computing anything and
reports every leaf layer's input and output shape to a callback. Leaf layers
define :meth:`Module.output_shape`; a composite module whose ``forward`` is not
a plain chain of its children overrides :meth:`Module.trace` next to its
``forward``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from reference.autodiff import Tensor
from reference.backend import copy_into, to_device, to_host
from reference.errors import CheckpointError

__all__ = ["Identity", "LoadResult", "Module", "Parameter", "Sequential", "Shape", "TraceVisitor"]

Shape = tuple[int, ...]
TraceVisitor = Callable[["Module", Shape, Shape], None]


class Parameter(Tensor):
    """A trainable leaf tensor: a :class:`Tensor` with ``requires_grad=True``."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class LoadResult(NamedTuple):
    """What :meth:`Module.load_state_dict` skipped (only non-empty when ``strict=False``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of layers and models.

    Subclasses call ``super().__init__()`` first, assign parameters, buffers
    and children as attributes, and define ``forward``. ``module(x)`` calls
    ``forward(x)``.
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        tables = self.__dict__.get("_parameters")
        if tables is None:
            raise AttributeError(f"{type(self).__name__}: call Module.__init__() before assigning {name!r}")
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}.{name} is a parameter: assign a Parameter or None, "
                    f"got {type(value).__name__}"
                )
            params[name] = None
        elif name in buffers:
            if value is not None and not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise TypeError(
                    f"{type(self).__name__}.{name} is a buffer: assign an array or None, "
                    f"got {type(value).__name__}"
                )
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}.{name} is a sub-module: assign a Module or None, "
                    f"got {type(value).__name__}"
                )
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: look in the three tables.
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if any(name in t for t in (self._parameters, self._buffers, self._modules)):
            self._forget(name)
        else:
            object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register ``param`` under ``name``; ``None`` declares an absent optional parameter."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"register_parameter({name!r}): expected a Parameter or None, got {type(param).__name__}"
            )
        self._forget(name)
        self._parameters[name] = param

    def register_buffer(self, name: str, array: Any) -> None:
        """Register a plain array as state that is saved but not trained."""
        if array is not None and not (hasattr(array, "shape") and hasattr(array, "dtype")):
            raise TypeError(f"register_buffer({name!r}): expected an array, got {type(array).__name__}")
        self._forget(name)
        self._buffers[name] = array

    # --------------------------------------------------------------- traversal
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``, "" for the root) and every descendant, pre-order.

        A module reachable along two paths is listed once, under the first.
        """
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module.named_children()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """Every parameter under its dotted name, in state_dict order, each once."""
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            for name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self) -> Iterator[Parameter]:
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self) -> Iterator[tuple[str, Any]]:
        for prefix, module in self.named_modules():
            for name, array in module._buffers.items():
                if array is not None:
                    yield (f"{prefix}.{name}" if prefix else name), array

    def buffers(self) -> Iterator[Any]:
        for _, array in self.named_buffers():
            yield array

    def _named_state(self) -> Iterator[tuple[str, Any]]:
        """(name, array) for every parameter and buffer, torchvision's order; arrays by reference."""
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, param in module._parameters.items():
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    yield dot + name, param.data
            for name, array in module._buffers.items():
                if array is not None:
                    yield dot + name, array

    # ------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> Module:
        """Set training mode (``True``) or evaluation mode on this module and all below it."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Evaluation mode: batch norm uses its running statistics and does not update them."""
        return self.train(False)

    def to(self, device: str) -> Module:
        """Move every parameter and buffer to ``device`` ("cpu": NumPy, "cuda": CuPy), in place.

        The Parameter objects stay the same (an optimizer built on them stays
        valid); their arrays are replaced by copies on the device and their
        gradients are dropped. Returns ``self``.
        """
        for module in self.modules():
            for param in module._parameters.values():
                if param is not None:
                    param.data = to_device(param.data, device)
                    param.grad = None
            for name, array in module._buffers.items():
                if array is not None:
                    module._buffers[name] = to_device(array, device)
        return self

    def host_copy(self) -> Module:
        """A deep copy with every parameter and buffer in host memory and no gradients.

        The original is untouched, wherever its arrays live (a model on the GPU
        is copied array by array to NumPy, not through CuPy's deepcopy).
        """
        memo: dict[int, Any] = {}
        for module in self.modules():
            for param in module._parameters.values():
                if param is not None:
                    memo[id(param.data)] = np.array(to_host(param.data), copy=True)
                    if param.grad is not None:
                        memo[id(param.grad)] = None
            for array in module._buffers.values():
                if array is not None:
                    memo[id(array)] = np.array(to_host(array), copy=True)
        return copy.deepcopy(self, memo)

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (``grad = None``)."""
        for param in self.parameters():
            param.grad = None

    # ----------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def output_shape(self, input_shape: Shape) -> Shape:
        """The output shape for ``input_shape`` (leaf layers); raises ShapeError if it does not fit."""
        raise NotImplementedError(f"{type(self).__name__} does not define output_shape()")

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        """Follow ``input_shape`` through the module without computing, reporting each leaf layer.

        ``visit(layer, input_shape, output_shape)`` is called for every leaf
        layer in forward order. Leaf modules use :meth:`output_shape`;
        composite modules override this method to mirror their ``forward``.
        """
        if next(self.children(), None) is not None:
            raise NotImplementedError(
                f"{type(self).__name__} has sub-modules but does not define trace(); "
                "write one that mirrors its forward()"
            )
        return self.trace_as_leaf(input_shape, visit)

    def trace_as_leaf(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        """Report this module as one layer with :meth:`output_shape`, whatever its sub-modules."""
        out = tuple(int(d) for d in self.output_shape(tuple(input_shape)))
        visit(self, tuple(input_shape), out)
        return out

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """Dotted name -> a NumPy copy of every parameter and buffer, in torchvision's order."""
        return {name: np.array(to_host(array), copy=True) for name, array in self._named_state()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Copy ``state``'s values into this module's arrays in place.

        Every entry is checked before anything is copied: a shape or dtype
        mismatch always raises :class:`CheckpointError`; missing and
        unexpected keys raise it when ``strict`` and are returned otherwise.
        The arrays keep their identity, so optimizers and views holding them
        stay valid.
        """
        own = dict(self._named_state())
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        problems: list[str] = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        sources: dict[str, np.ndarray] = {}
        for name, dst in own.items():
            if name not in state:
                continue
            src = to_host(state[name])
            if tuple(src.shape) != tuple(dst.shape):
                problems.append(
                    f"{name}: checkpoint has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}"
                )
            elif src.dtype != dst.dtype:
                problems.append(f"{name}: checkpoint has dtype {src.dtype}, model expects {dst.dtype}")
            else:
                sources[name] = src
        if problems:
            raise CheckpointError(
                f"load_state_dict into {type(self).__name__} failed: " + "; ".join(problems)
            )
        for name, src in sources.items():
            copy_into(own[name], src)
        return LoadResult(missing, unexpected)

    # -------------------------------------------------------------------- repr
    def extra_repr(self) -> str:
        """Settings shown inside the parentheses of ``repr``; layers override it."""
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)


class Sequential(Module):
    """Children named "0", "1", ... applied in order."""

    def __init__(self, *modules: Module):
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: item {index} is a {type(module).__name__}, expected a Module")
            setattr(self, str(index), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Module:
        items = list(self._modules.values())
        return items[index]

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def append(self, module: Module) -> Sequential:
        setattr(self, str(len(self._modules)), module)
        return self

    def forward(self, x: Any) -> Any:
        for module in self._modules.values():
            x = module(x)
        return x

    def trace(self, input_shape: Shape, visit: TraceVisitor) -> Shape:
        shape = tuple(input_shape)
        for module in self._modules.values():
            shape = module.trace(shape, visit)
        return shape


class Identity(Module):
    """Returns its input unchanged."""

    def forward(self, x: Any) -> Any:
        return x

    def output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)
