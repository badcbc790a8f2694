"""The stand-in ``cupy.ndarray`` and CuPy's array functions, on NumPy buffers in registered memory.

``ndarray`` wraps a NumPy view of an emulated device allocation
(:mod:`tests.emulation.memory`). It is not a NumPy array: like CuPy's, it
refuses implicit conversion (``numpy.asarray(a)`` raises TypeError) and
arithmetic with NumPy arrays, while ``.get()``, ``.set()``, ``float()``,
``int()``, ``bool()`` and ``.item()`` copy to and from the host. Everything
else (arithmetic, indexing, reductions, CuPy's functions) is NumPy on the
wrapped buffers, with results in device memory; 0-d results stay device arrays,
as in CuPy.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from tests.emulation import hostreads, memory

__all__ = ["MemoryPointer", "asarray", "function", "is_device", "ndarray", "unwrap", "wrap"]


class MemoryPointer:
    """``a.data``: the address of the array's first element (``.ptr``) in its allocation (``.mem``)."""

    def __init__(self, owner: Any, ptr: int):
        self.mem = owner
        self.ptr = ptr

    def __int__(self) -> int:
        return self.ptr


class Flags:
    def __init__(self, a: np.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = a.base is None

    def __getitem__(self, key: str) -> bool:
        return {
            "C_CONTIGUOUS": self.c_contiguous,
            "F_CONTIGUOUS": self.f_contiguous,
            "OWNDATA": self.owndata,
        }[key]


def is_device(x: Any) -> bool:
    return isinstance(x, ndarray)


def _refuse(x: Any, where: str) -> None:
    raise TypeError(
        f"Unsupported type {type(x).__module__}.{type(x).__name__} in {where}: a device array takes device "
        "arrays and scalars, never host arrays (copy it with cupy.asarray first)"
    )


def unwrap(x: Any, where: str = "a CuPy operation", host_ok: bool = False) -> Any:
    """Device arrays -> their NumPy buffers, recursively through lists and tuples; NumPy arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray) and not host_ok:
        _refuse(x, where)
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v, where, host_ok) for v in x)
    return x


def wrap(x: Any) -> Any:
    """NumPy results -> device arrays (a NumPy scalar becomes a 0-d device array); others unchanged."""
    if isinstance(x, np.ndarray):
        return ndarray._from(memory.adopt(x))
    if isinstance(x, np.generic):
        return ndarray._from(memory.adopt(np.array(x)))
    if isinstance(x, tuple):
        return tuple(wrap(v) for v in x)
    if isinstance(x, list):
        return [wrap(v) for v in x]
    return x


def _empty(shape, dtype, order: str = "C") -> np.ndarray:
    """A fresh device array's buffer (poisoned memory, see :mod:`tests.emulation.memory`)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = 1
    for n in shape:
        if n < 0:
            raise ValueError(f"negative dimensions are not allowed, got shape {shape}")
        count *= int(n)
    buffer = memory.allocate(count * dtype.itemsize)
    if not count:
        return np.empty(shape, dtype)
    if order == "F":
        return buffer.view(dtype).reshape(shape[::-1]).T
    return buffer.view(dtype).reshape(shape)


def _binary(name: str):
    op = getattr(np.ndarray, name)

    def method(self, other):
        if isinstance(other, np.ndarray):
            _refuse(other, f"ndarray.{name}")
        if isinstance(other, (list, dict, set)):
            return NotImplemented
        result = op(self._a, unwrap(other))
        return NotImplemented if result is NotImplemented else wrap(result)

    method.__name__ = name
    return method


def _inplace(name: str):
    op = getattr(np.ndarray, name)

    def method(self, other):
        if isinstance(other, np.ndarray):
            _refuse(other, f"ndarray.{name}")
        op(self._a, unwrap(other))
        return self

    method.__name__ = name
    return method


def _unary(name: str):
    op = getattr(np.ndarray, name)

    def method(self):
        return wrap(op(self._a))

    method.__name__ = name
    return method


def _forward(name: str):
    """A method computed by NumPy on the buffer (arguments unwrapped, results wrapped)."""

    def method(self, *args, **kwargs):
        args = unwrap(args, f"ndarray.{name}")
        kwargs = {k: unwrap(v, f"ndarray.{name}") for k, v in kwargs.items()}
        return wrap(getattr(self._a, name)(*args, **kwargs))

    method.__name__ = name
    return method


class ndarray:  # noqa: N801  (CuPy's name)
    """A device array: a NumPy view of emulated device memory, with CuPy's host-transfer rules."""

    __module__ = "cupy"
    __array_priority__ = 100
    __slots__ = ("_a", "__weakref__")

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the emulated ndarray is built from a shape and dtype only")
        self._a = _empty(shape, dtype, order)

    @classmethod
    def _from(cls, a: np.ndarray) -> ndarray:
        self = object.__new__(cls)
        self._a = a
        return self

    # ------------------------------------------------------------------ metadata (no host read)
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: Flags(self._a))
    T = property(lambda self: ndarray._from(self._a.T))
    mT = property(lambda self: ndarray._from(np.swapaxes(self._a, -1, -2)))

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self, memory.address(self._a))

    @property
    def device(self):
        from tests.emulation.runtime import Device

        return Device(0)

    @property
    def base(self):
        return None

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": self._a.shape,
            "typestr": self._a.dtype.str,
            "data": (memory.address(self._a), False),
            "strides": None if self._a.flags.c_contiguous else self._a.strides,
            "version": 3,
        }

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        for k in range(len(self._a)):
            yield wrap(self._a[k])

    # ------------------------------------------------------------------ host transfers (reads)
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        hostreads.record(".get()", self._describe())
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"ndarray.set expects a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self._a.shape:
            raise ValueError(f"ndarray.set: shape mismatch, device {self._a.shape}, host {arr.shape}")
        if arr.dtype != self._a.dtype:
            raise TypeError(f"ndarray.set: dtype mismatch, device {self._a.dtype}, host {arr.dtype}")
        self._a[...] = arr

    def item(self, *args):
        hostreads.record(".item()", self._describe())
        return self._a.item(*args)

    def tolist(self):
        hostreads.record(".tolist()", self._describe())
        return self._a.tolist()

    def __float__(self) -> float:
        hostreads.record("float()", self._describe())
        return float(self._a)

    def __int__(self) -> int:
        hostreads.record("int()", self._describe())
        return int(self._a)

    def __complex__(self) -> complex:
        hostreads.record("complex()", self._describe())
        return complex(self._a)

    def __bool__(self) -> bool:
        hostreads.record("bool()", self._describe())
        return bool(self._a)

    def __index__(self) -> int:
        hostreads.record("__index__", self._describe())
        return self._a.__index__()

    def __repr__(self) -> str:
        hostreads.record("repr()", self._describe())
        return repr(self._a)

    def __str__(self) -> str:
        hostreads.record("str()", self._describe())
        return str(self._a)

    def __format__(self, spec: str) -> str:
        hostreads.record("format()", self._describe())
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __array__(self, *args, **kwargs):
        hostreads.record("numpy.asarray()", self._describe())
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
            "array explicitly."
        )

    def _describe(self) -> str:
        return f"a {self._a.shape} {self._a.dtype} device array"

    # ------------------------------------------------------------------ NumPy protocols
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"numpy.{ufunc.__name__}"
        inputs = unwrap(inputs, where)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = unwrap(out, where)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        where = f"numpy.{func.__name__}"
        result = func(*unwrap(args, where), **{k: unwrap(v, where) for k, v in kwargs.items()})
        return wrap(result)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("a device array cannot be pickled; copy it to the host with .get() first")

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, key):
        key = _index(key, self)
        return wrap(self._a[key])

    def __setitem__(self, key, value):
        key = _index(key, self)
        self._a[key] = unwrap(value, "ndarray.__setitem__", host_ok=True)

    def __contains__(self, value) -> bool:
        hostreads.record("in", self._describe())
        return unwrap(value) in self._a

    # ------------------------------------------------------------------ methods
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        dtype = np.dtype(dtype)
        if not copy and dtype == self._a.dtype:
            return self
        out = _empty(self._a.shape, dtype)
        out[...] = self._a.astype(dtype)
        return ndarray._from(out)

    def copy(self, order="C"):
        out = _empty(self._a.shape, self._a.dtype)
        out[...] = self._a
        return ndarray._from(out)

    def fill(self, value) -> None:
        if isinstance(value, ndarray):
            value = value._a
        self._a.fill(value)

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return wrap(self._a.reshape(shape, order=order))

    def view(self, dtype=None):
        return ndarray._from(self._a.view() if dtype is None else self._a.view(dtype))

    def take(self, indices, axis=None, out=None, mode="wrap"):
        if isinstance(indices, np.ndarray):
            _refuse(indices, "ndarray.take")
        result = np.take(self._a, unwrap(indices), axis=axis, mode="wrap" if mode == "wrap" else mode)
        if out is not None:
            out._a[...] = result
            return out
        return wrap(result)

    def nonzero(self):
        hostreads.record("nonzero()", self._describe())
        return wrap(self._a.nonzero())

    def __dlpack__(self, *args, **kwargs):
        raise TypeError("DLPack export is not emulated")


for _name in (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ __rfloordiv__ "
    "__mod__ __rmod__ __pow__ __rpow__ __matmul__ __rmatmul__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ "
    "__lshift__ __rlshift__ __rshift__ __rrshift__ __lt__ __le__ __gt__ __ge__ __eq__ __ne__ __divmod__"
).split():
    setattr(ndarray, _name, _binary(_name))
for _name in (
    "__iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ __iand__ __ior__ __ixor__ "
    "__ilshift__ __irshift__"
).split():
    setattr(ndarray, _name, _inplace(_name))
for _name in "__neg__ __pos__ __abs__ __invert__".split():
    setattr(ndarray, _name, _unary(_name))
for _name in (
    "sum mean var std max min argmax argmin any all prod cumsum cumprod clip round dot conj conjugate sort "
    "argsort diagonal trace ravel flatten transpose swapaxes squeeze repeat ptp partition argpartition "
    "searchsorted put choose compress"
).split():
    setattr(ndarray, _name, _forward(_name))
ndarray.__hash__ = None  # type: ignore[assignment]


def _is_mask(k: Any) -> bool:
    if isinstance(k, ndarray):
        return k._a.dtype == np.bool_
    return isinstance(k, np.ndarray) and k.dtype == np.bool_


def _index(key: Any, owner: ndarray) -> Any:
    """An index for the buffer: device arrays unwrapped; a boolean mask is a host read (CuPy sizes the
    result by reading the mask's count)."""
    keys = key if isinstance(key, tuple) else (key,)
    if any(_is_mask(k) for k in keys) and owner._a.ndim > 0:
        hostreads.record("boolean mask index", owner._describe())
    return unwrap(key, "indexing", host_ok=True)


# ------------------------------------------------------------------------------ functions
def _host_ok(name: str) -> bool:
    return name in {"asarray", "array", "ascontiguousarray", "asfortranarray", "asanyarray"}


def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a._a.dtype:
            if order in (None, "K", "A") or (order == "C" and a._a.flags.c_contiguous):
                return a
        return ndarray._from(_copy(a._a, dtype, order))
    host = np.asarray(a, dtype=dtype, order=None if order in (None, "K", "A") else order)
    return ndarray._from(_copy(host, dtype, order))


def _copy(a: np.ndarray, dtype=None, order=None) -> np.ndarray:
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    out = _empty(a.shape, dtype, "F" if order == "F" else "C")
    out[...] = a
    return out


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        source = obj._a
    else:
        source = np.asarray(obj, dtype=dtype)
    if ndmin:
        source = source.reshape((1,) * max(0, ndmin - source.ndim) + source.shape)
    if isinstance(obj, ndarray) and not copy and (dtype is None or np.dtype(dtype) == source.dtype):
        return obj
    return ndarray._from(_copy(source, dtype))


def ascontiguousarray(a, dtype=None):
    if (
        isinstance(a, ndarray)
        and a._a.flags.c_contiguous
        and (dtype is None or np.dtype(dtype) == a._a.dtype)
    ):
        return a
    return ndarray._from(_copy(a._a if isinstance(a, ndarray) else np.asarray(a), dtype))


def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype, order=order)


def zeros(shape, dtype=float, order="C"):
    out = ndarray(shape, dtype, order=order)
    out._a.fill(0)
    return out


def ones(shape, dtype=float, order="C"):
    out = ndarray(shape, dtype, order=order)
    out._a.fill(1)
    return out


def full(shape, fill_value, dtype=None, order="C"):
    value = unwrap(fill_value)
    out = ndarray(shape, np.result_type(value) if dtype is None else dtype, order=order)
    out._a[...] = value
    return out


def _like(maker):
    def like(a, dtype=None, order="K", subok=None, shape=None):
        if not isinstance(a, ndarray):
            _refuse(a, maker.__name__ + "_like")
        return maker(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)

    return like


empty_like, zeros_like, ones_like = _like(empty), _like(zeros), _like(ones)


def full_like(a, fill_value, dtype=None, order="K", subok=None, shape=None):
    return full(a.shape if shape is None else shape, fill_value, a.dtype if dtype is None else dtype)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    import sys

    if any(isinstance(a, ndarray) for a in args):
        return sys.modules["cupy"]
    return np


def result_type(*arrays_and_dtypes):
    return np.result_type(*(a.dtype if isinstance(a, ndarray) else a for a in arrays_and_dtypes))


def can_cast(from_, to, casting="safe"):
    return np.can_cast(from_.dtype if isinstance(from_, ndarray) else from_, to, casting)


@functools.cache
def function(name: str):
    """``cupy.<name>`` for a NumPy function: NumPy on the device buffers, results in device memory."""
    target = getattr(np, name)
    where = f"cupy.{name}"
    host_ok = _host_ok(name)

    def call(*args, **kwargs):
        args = unwrap(args, where, host_ok)
        kwargs = {k: unwrap(v, where, host_ok) for k, v in kwargs.items()}
        return wrap(target(*args, **kwargs))

    call.__name__ = name
    call.__qualname__ = name
    call.__module__ = "cupy"
    return call


def nonzero(a):
    return a.nonzero()


EXPORTS = {
    "ndarray": ndarray,
    "asarray": asarray,
    "array": array,
    "ascontiguousarray": ascontiguousarray,
    "empty": empty,
    "zeros": zeros,
    "ones": ones,
    "full": full,
    "empty_like": empty_like,
    "zeros_like": zeros_like,
    "ones_like": ones_like,
    "full_like": full_like,
    "asnumpy": asnumpy,
    "get_array_module": get_array_module,
    "result_type": result_type,
    "can_cast": can_cast,
    "nonzero": nonzero,
}
