"""CuPy's kernel classes, compiled for the host: ElementwiseKernel, ReductionKernel, RawModule.

Elementwise and reduction kernels are wrapped into complete kernels the way
CuPy generates them: non-raw arguments are broadcast together and read through
``CArray``s at the multi-index of ``i`` (inputs as values, outputs as
references), raw arguments are whole ``CArray``s indexed by hand, scalars are
parameters of their declared type, and type placeholders (``T``, ``S``...) are
bound from the dtypes of the array and NumPy-scalar arguments. A reduction is
CuPy's simple block reduction: the reduced axes are moved in front, each block
of ``REDUCE_BLOCK`` threads takes ``_block_stride`` outputs, every thread
accumulates ``map_expr`` over a strided share of its output's inputs, then a
shared-memory tree with a barrier per level combines the threads of one
output, and ``post_map_expr`` writes it.

Raw modules are compiled from their source as written. A launch checks the
grid and block against CUDA's limits and every argument against the compiled
signature (count; device array for a pointer, of the pointee's dtype, live and
C-contiguous; a NumPy scalar of the parameter's exact C type, Python numbers
taking CuPy's int64/float64/bool).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.emulation import memory, settings
from tests.emulation.array import ndarray
from tests.emulation.build import EmulationError, Library, load

__all__ = ["ElementwiseKernel", "RawKernel", "RawModule", "ReductionKernel", "raw_source", "uses_barriers"]

REDUCE_BLOCK = 512  # CuPy's block size for reductions
MAX_NDIM = 12  # EMU_MAX_NDIM in cuda_host.h

_CTYPES = {
    "bool": "bool",
    "int8": "signed char",
    "uint8": "unsigned char",
    "int16": "short",
    "uint16": "unsigned short",
    "int32": "int",
    "uint32": "unsigned int",
    "int64": "long long",
    "uint64": "unsigned long long",
    "float32": "float",
    "float64": "double",
}
_BARRIERS = re.compile(r"__syncthreads|__syncwarp|__shfl|__ballot_sync|__any_sync|__all_sync|__shared__")


def ctype_of(dtype: Any) -> str:
    name = np.dtype(dtype).name
    try:
        return _CTYPES[name]
    except KeyError:
        raise TypeError(f"the emulation has no C type for dtype {name}") from None


def uses_barriers(source: str) -> bool:
    """Whether threads of a block can observe each other (then they run as fibers)."""
    return bool(_BARRIERS.search(source))


# ------------------------------------------------------------------------------ array layout
class _CArray(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_longlong),
        ("ndim", ctypes.c_longlong),
        ("shape", ctypes.c_longlong * MAX_NDIM),
        ("strides", ctypes.c_longlong * MAX_NDIM),
        ("contiguous", ctypes.c_longlong),
    ]


class _CIndexer(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_longlong),
        ("ndim", ctypes.c_longlong),
        ("shape", ctypes.c_longlong * MAX_NDIM),
        ("index", ctypes.c_longlong * MAX_NDIM),
    ]


def _carray(a: np.ndarray, shape=None, strides=None) -> _CArray:
    shape = a.shape if shape is None else shape
    strides = a.strides if strides is None else strides
    if len(shape) > MAX_NDIM:
        raise EmulationError(f"arrays of more than {MAX_NDIM} dimensions are not emulated, got {len(shape)}")
    s = _CArray()
    s.data = memory.address(a)
    s.size = int(np.prod(shape, dtype=np.int64))
    s.ndim = len(shape)
    for k, (n, st) in enumerate(zip(shape, strides)):
        s.shape[k], s.strides[k] = n, st
    expected = a.itemsize
    contiguous = True
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != expected:
            contiguous = False
        expected *= n
    s.contiguous = int(contiguous)
    return s


def _indexer(shape) -> _CIndexer:
    if len(shape) > MAX_NDIM:
        raise EmulationError(f"arrays of more than {MAX_NDIM} dimensions are not emulated, got {len(shape)}")
    s = _CIndexer()
    s.size = int(np.prod(shape, dtype=np.int64))
    s.ndim = len(shape)
    for k, n in enumerate(shape):
        s.shape[k] = n
    return s


def _collapse(shape: tuple[int, ...], strides_list: list[tuple[int, ...]]):
    """Drop unit axes and merge neighbours every array walks contiguously (CuPy's dimension reduction)."""
    if 0 in shape:
        return tuple(shape), [tuple(s) for s in strides_list]
    keep = [k for k, n in enumerate(shape) if n != 1]
    dims = [shape[k] for k in keep]
    strides = [[s[k] for k in keep] for s in strides_list]
    k = len(dims) - 1
    while k > 0:
        if all(s[k - 1] == s[k] * dims[k] for s in strides):
            dims[k - 1] *= dims[k]
            del dims[k]
            for s in strides:
                s[k - 1] = s[k]
                del s[k]
        k -= 1
    return tuple(dims), [tuple(s) for s in strides]


# ------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Param:
    type_name: str  # a dtype name ("float32") or a placeholder ("T")
    name: str
    raw: bool

    @property
    def placeholder(self) -> bool:
        return self.type_name not in _CTYPES


def parse_params(text: str) -> tuple[Param, ...]:
    params = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        words = part.split()
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        if len(words) != 2:
            raise ValueError(f"cannot parse kernel parameter {part!r}")
        params.append(Param(words[0], words[1], raw))
    return tuple(params)


_SCALARS = (bool, int, float, np.generic)


def _bind(name: str, params, args) -> dict[str, np.dtype]:
    """The dtype of each type placeholder, from the array and NumPy-scalar arguments bound to it."""
    types: dict[str, np.dtype] = {}
    for p, a in zip(params, args):
        if a is None or not p.placeholder:
            continue
        if isinstance(a, ndarray):
            dtype = a.dtype
        elif isinstance(a, np.generic):
            dtype = a.dtype
        else:
            continue
        if types.setdefault(p.type_name, dtype) != dtype:
            raise TypeError(f"{name}: Type is mismatched. {p.type_name} {types[p.type_name]} {dtype}")
    return types


def _resolve(kernel: str, p: Param, types: dict) -> np.dtype:
    if not p.placeholder:
        return np.dtype(p.type_name)
    if p.type_name not in types:
        raise TypeError(f"{kernel}: cannot determine the type of {p.type_name} (parameter {p.name})")
    return types[p.type_name]


def _scalar_value(kernel: str, p: Param, value: Any, dtype: np.dtype):
    if isinstance(value, np.generic):
        source = value.dtype
    elif isinstance(value, bool):
        source = np.dtype(np.bool_)
    elif isinstance(value, int):
        source = np.dtype(np.int64)
    else:
        source = np.dtype(np.float64)
    integral = source.kind in "biu" and dtype.kind in "iu"
    if not np.can_cast(source, dtype, "same_kind") and not integral:
        raise TypeError(f"{kernel}: argument {p.name}={value!r} ({source}) cannot be passed as {dtype}")
    if integral and not np.iinfo(dtype).min <= int(value) <= np.iinfo(dtype).max:
        raise TypeError(f"{kernel}: argument {p.name}={value!r} does not fit in {dtype}")
    return np.array(value).astype(dtype)


def _check_args(kernel: str, in_params, out_params, args) -> tuple[list, list | None]:
    n_in, n_out = len(in_params), len(out_params)
    if len(args) not in (n_in, n_in + n_out):
        raise TypeError(
            f"Wrong number of arguments for {kernel!r}: got {len(args)}, expected {n_in} or {n_in + n_out}"
        )
    ins, outs = list(args[:n_in]), list(args[n_in:]) or None
    for p, a in zip(in_params, ins):
        if isinstance(a, np.ndarray):
            raise TypeError(f"{kernel}: Unsupported type numpy.ndarray for argument {p.name} (a host array)")
        if p.raw and not isinstance(a, ndarray):
            raise TypeError(f"{kernel}: raw argument {p.name} must be a device array, got {type(a).__name__}")
        if not isinstance(a, (ndarray, *_SCALARS)):
            raise TypeError(f"{kernel}: Unsupported type {type(a).__name__} for argument {p.name}")
    for p, a in zip(out_params, outs or ()):
        if not isinstance(a, ndarray):
            raise TypeError(f"{kernel}: output {p.name} must be a device array, got {type(a).__name__}")
    return ins, outs


def _broadcast(kernel: str, arrays: list[np.ndarray]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*(a.shape for a in arrays)))
    except ValueError:
        raise ValueError(
            f"{kernel}: operands could not be broadcast together: {[a.shape for a in arrays]}"
        ) from None


def _typedefs(types: dict) -> str:
    return "".join(f"typedef {ctype_of(t)} {name};\n" for name, t in sorted(types.items()))


def _launch(lib: Library, fn: str, grid, block, values: list, mode: int, shared_mem: int = 0) -> None:
    """Run ``fn`` of ``lib`` over ``grid`` x ``block`` with ``values`` (ctypes objects) as its arguments."""
    index, _ = lib.functions[fn]
    pointers = (ctypes.c_void_p * max(1, len(values)))()
    for k, v in enumerate(values):
        pointers[k] = ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
    geometry = (*grid, *block, int(shared_mem), mode, settings.schedule())
    error = lib.launch(index, geometry, pointers)
    if error is not None:
        fault = re.match(r"invalid memory access at (0x[0-9a-f]+)", error)
        if fault:
            error += f": {memory.describe(int(fault.group(1), 16))}"
        raise EmulationError(f"kernel {fn}: {error}")


def _scalar_ctype(value: np.ndarray):
    """A NumPy scalar value as the ctypes object holding its bytes (aligned for its type)."""
    if value.dtype == np.bool_:
        return ctypes.c_bool(bool(value))
    return np.ctypeslib.as_ctypes_type(value.dtype).from_buffer_copy(value.tobytes())


# ------------------------------------------------------------------------------ ElementwiseKernel
class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, loop_prep="", after_loop="", options=(), **kwargs):  # fmt: skip
        self.in_params, self.out_params = parse_params(in_params), parse_params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self.loop_prep, self.after_loop = loop_prep, after_loop
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self._libs: dict[tuple, Library] = {}

    def _source(self, decls: list[str], loads: list[str], types: dict) -> str:
        return (
            '#include "cuda_host.h"\n'
            f"{_typedefs(types)}{self.preamble}\n"
            f'extern "C" __global__ void {self.name}({", ".join(decls)}, CIndexer _ind) {{\n'
            f"  {self.loop_prep};\n"
            "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < _ind.size();\n"
            "       i += (long long)blockDim.x * gridDim.x) {\n"
            "    _ind.set(i);\n"
            + "".join(f"    {line}\n" for line in loads)
            + f"    {self.operation};\n  }}\n  {self.after_loop};\n}}\n"
            f"EMU_FUNCTION({self.name})\nEMU_TABLE(EMU_ENTRY({self.name}))\n"
        )

    def __call__(self, *args, size=None, block_size=None, stream=None):
        kernel = self.name
        ins, outs = _check_args(kernel, self.in_params, self.out_params, args)
        params = self.in_params + self.out_params
        types = _bind(kernel, params, ins + (outs or [None] * self.nout))
        # the broadcast shape of every non-raw array argument, inputs and given outputs
        nonraw = [a._a for p, a in zip(params, ins + (outs or [])) if isinstance(a, ndarray) and not p.raw]
        if nonraw:
            if size is not None:
                raise ValueError(f"{kernel}: size= is given, but there are non-raw array arguments")
            shape = _broadcast(kernel, nonraw)
        elif size is None:
            raise ValueError(f"{kernel}: Loop size is undecided (no non-raw array argument and no size=)")
        else:
            shape = (int(size),)
        if outs is None:
            outs = [ndarray(shape, _resolve(kernel, p, types)) for p in self.out_params]
        for p, o in zip(self.out_params, outs):
            if not p.raw and o.shape != shape:
                raise ValueError(
                    f"{kernel}: Out shape is mismatched: output {p.name} is {o.shape}, expected {shape}"
                )
            want = _resolve(kernel, p, types)
            if o.dtype != want:
                raise TypeError(f"{kernel}: output {p.name} is {o.dtype}, the kernel writes {want}")

        # per-argument declarations, loads and values; non-raw arrays broadcast to `shape`
        views, strides_list = [], []
        for p, a in zip(params, ins + outs):
            if isinstance(a, ndarray) and not p.raw:
                view = np.broadcast_to(a._a, shape) if a._a.shape != shape else a._a
                views.append(view)
                strides_list.append(view.strides)
        loop_shape, collapsed = _collapse(shape, strides_list)
        decls, loads, values, key = [], [], [], []
        k = 0
        for j, (p, a) in enumerate(zip(params, ins + outs)):
            is_out = j >= self.nin
            ctype_decl = p.type_name if p.placeholder else ctype_of(p.type_name)
            if isinstance(a, ndarray):
                c = ctype_of(a.dtype)
                if p.raw:
                    decls.append(f"CArray<{c}> {p.name}")
                    values.append(_carray(a._a))
                else:
                    decls.append(f"CArray<{c}> _raw_{p.name}")
                    values.append(_carray(views[k], loop_shape, collapsed[k]))
                    k += 1
                    if is_out:
                        loads.append(f"{ctype_decl} &{p.name} = _raw_{p.name}[_ind.get()];")
                    else:
                        loads.append(f"const {ctype_decl} {p.name} = _raw_{p.name}[_ind.get()];")
                key.append(("a", p.raw, c))
            else:
                dtype = _resolve(kernel, p, types)
                decls.append(f"const {ctype_of(dtype)} {p.name}")
                values.append(_scalar_ctype(_scalar_value(kernel, p, a, dtype)))
                key.append(("s", ctype_of(dtype)))
        key = (tuple(key), tuple(sorted((n, str(t)) for n, t in types.items())))
        lib = self._libs.get(key)
        if lib is None:
            lib = self._libs[key] = load(self._source(decls, loads, types), self.name)
        values.append(_indexer(loop_shape))
        if int(np.prod(loop_shape, dtype=np.int64)) > 0:
            # one thread walks every index: the elements are independent, and CUDA's grid-stride loop
            # gives each the same work whatever the geometry
            _launch(lib, self.name, (1, 1, 1), (1, 1, 1), values, 0)
        if self.no_return:
            return None
        if self.nout == 1 and not self.return_tuple:
            return outs[0]
        return tuple(outs)


# ------------------------------------------------------------------------------ ReductionKernel
def _clp2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


class ReductionKernel:
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce_kernel",
                 reduce_type=None, reduce_dims=True, preamble="", options=(), **kwargs):  # fmt: skip
        self.in_params, self.out_params = parse_params(in_params), parse_params(out_params)
        if any(p.raw for p in self.in_params + self.out_params):
            raise NotImplementedError(f"{name}: raw parameters in a reduction are not emulated")
        if identity is None or identity == "":
            raise NotImplementedError(f"{name}: a reduction without an identity is not emulated")
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity, self.name, self.preamble = identity, name, preamble
        self.reduce_type = reduce_type
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self._libs: dict[tuple, Library] = {}

    def _source(self, decls, in_loads, out_loads, types, reduce_c) -> str:
        return (
            '#include "cuda_host.h"\n'
            f"{_typedefs(types)}typedef {reduce_c} _type_reduce;\n{self.preamble}\n"
            f"#define REDUCE(a, b) ({self.reduce_expr})\n"
            f"#define POST_MAP(a) ({self.post_map_expr})\n"
            f"#define EMU_REDUCE_BLOCK {REDUCE_BLOCK}\n"
            f'extern "C" __global__ void {self.name}({", ".join(decls)}, CIndexer _in_ind, CIndexer _out_ind,\n'
            "    const int _block_stride) {\n"
            "  __shared__ __align__(16) char _sdata_raw[EMU_REDUCE_BLOCK * sizeof(_type_reduce)];\n"
            "  _type_reduce* _sdata = reinterpret_cast<_type_reduce*>(_sdata_raw);\n"
            "  const unsigned int _tid = threadIdx.x;\n"
            "  const int _J_offset = _tid / _block_stride;\n"
            "  const long long _j_offset = (long long)_J_offset * _out_ind.size();\n"
            "  const int _J_stride = blockDim.x / _block_stride;\n"
            "  const long long _j_stride = (long long)_J_stride * _out_ind.size();\n"
            "  for (long long _i_base = (long long)blockIdx.x * _block_stride; _i_base < _out_ind.size();\n"
            "       _i_base += (long long)gridDim.x * _block_stride) {\n"
            f"    _type_reduce _s = _type_reduce({self.identity});\n"
            "    const long long _i = _i_base + (_tid % _block_stride);\n"
            "    if (_i < _out_ind.size()) {\n"
            "      for (long long _j = _i + _j_offset; _j < _in_ind.size(); _j += _j_stride) {\n"
            "        _in_ind.set(_j);\n"
            + "".join(f"        {line}\n" for line in in_loads)
            + f"        const _type_reduce _a = static_cast<_type_reduce>({self.map_expr});\n"
            "        _s = REDUCE(_s, _a);\n"
            "      }\n"
            "    }\n"
            "    _sdata[_tid] = _s;\n"
            "    __syncthreads();\n"
            "    for (unsigned int _half = blockDim.x / 2; _half >= (unsigned int)_block_stride; _half >>= 1) {\n"
            "      if (_tid < _half) _sdata[_tid] = REDUCE(_sdata[_tid], _sdata[_tid + _half]);\n"
            "      __syncthreads();\n"
            "    }\n"
            "    if (_J_offset == 0 && _i < _out_ind.size()) {\n"
            "      _out_ind.set(_i);\n"
            + "".join(f"      {line}\n" for line in out_loads)
            + "      const _type_reduce _r = _sdata[_tid];\n"
            "      POST_MAP(_r);\n"
            "    }\n"
            "    __syncthreads();  // _sdata is reused by the next outputs\n"
            "  }\n"
            "}\n"
            f"EMU_FUNCTION({self.name})\nEMU_TABLE(EMU_ENTRY({self.name}))\n"
        )

    def __call__(self, *args, out=None, axis=None, keepdims=False, stream=None):
        kernel = self.name
        if out is not None:
            if len(args) != self.nin:
                raise TypeError(f"{kernel}: out= is given with {len(args) - self.nin} positional outputs")
            args = (*args, out)
        ins, outs = _check_args(kernel, self.in_params, self.out_params, args)
        params = self.in_params + self.out_params
        types = _bind(kernel, params, ins + (outs or [None] * self.nout))
        arrays = [a._a for a in ins if isinstance(a, ndarray)]
        if not arrays:
            raise ValueError(f"{kernel}: a reduction needs at least one array input")
        in_shape = _broadcast(kernel, arrays)
        ndim = len(in_shape)
        if axis is None:
            axes = tuple(range(ndim))
        else:
            axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
            for ax in axes:
                if not -ndim <= ax < ndim:
                    raise ValueError(f"{kernel}: axis {ax} is out of bounds for {ndim} dimensions")
            axes = tuple(sorted({int(ax) % ndim for ax in axes}))
            if len(axes) != len(tuple(axis) if not isinstance(axis, (int, np.integer)) else (axis,)):
                raise ValueError(f"{kernel}: duplicate value in axis {axis}")
        kept = tuple(k for k in range(ndim) if k not in axes)
        out_shape = (
            tuple(1 if k in axes else in_shape[k] for k in range(ndim))
            if keepdims
            else tuple(in_shape[k] for k in kept)
        )
        if outs is None:
            outs = [ndarray(out_shape, _resolve(kernel, p, types)) for p in self.out_params]
        for p, o in zip(self.out_params, outs):
            if o.shape != out_shape:
                raise ValueError(
                    f"{kernel}: Out shape is mismatched: output {p.name} is {o.shape}, expected {out_shape}"
                )
            want = _resolve(kernel, p, types)
            if o.dtype != want:
                raise TypeError(f"{kernel}: output {p.name} is {o.dtype}, the kernel writes {want}")
        reduce_t = self.reduce_type
        if reduce_t is None:
            reduce_c = ctype_of(_resolve(kernel, self.in_params[0], types))
        elif reduce_t in _CTYPES:
            reduce_c = ctype_of(reduce_t)
        elif reduce_t in types:
            reduce_c = ctype_of(types[reduce_t])
        else:
            reduce_c = reduce_t  # a C type written out ("double")

        # the input indexer walks (reduced axes..., kept axes...); the output indexer the kept axes
        order = axes + kept
        in_index_shape = tuple(in_shape[k] for k in order)
        kept_shape = tuple(in_shape[k] for k in kept)
        decls, in_loads, out_loads, values, key = [], [], [], [], []
        for j, (p, a) in enumerate(zip(params, ins + outs)):
            is_out = j >= self.nin
            ctype_decl = p.type_name if p.placeholder else ctype_of(p.type_name)
            if isinstance(a, ndarray):
                c = ctype_of(a.dtype)
                decls.append(f"CArray<{c}> _raw_{p.name}")
                if is_out:
                    o = a._a
                    strides = tuple(o.strides[k] for k in kept) if keepdims else o.strides
                    values.append(_carray(o, kept_shape, strides))
                    out_loads.append(f"{ctype_decl} &{p.name} = _raw_{p.name}[_out_ind.get()];")
                else:
                    view = np.broadcast_to(a._a, in_shape)
                    values.append(_carray(view, in_index_shape, tuple(view.strides[k] for k in order)))
                    in_loads.append(f"const {ctype_decl} {p.name} = _raw_{p.name}[_in_ind.get()];")
                key.append(("a", c))
            else:
                dtype = _resolve(kernel, p, types)
                decls.append(f"const {ctype_of(dtype)} {p.name}")
                values.append(_scalar_ctype(_scalar_value(kernel, p, a, dtype)))
                key.append(("s", ctype_of(dtype)))
        key = (tuple(key), tuple(sorted((n, str(t)) for n, t in types.items())), reduce_c)
        lib = self._libs.get(key)
        if lib is None:
            lib = self._libs[key] = load(self._source(decls, in_loads, out_loads, types, reduce_c), self.name)
        in_size = int(np.prod(in_shape, dtype=np.int64))
        out_size = int(np.prod(kept_shape, dtype=np.int64))
        if out_size > 0:
            reduce_block = max(1, in_size // out_size)
            stride = _clp2(max(1, REDUCE_BLOCK // reduce_block) // 2 + 1)
            blocks = (out_size + stride - 1) // stride
            values += [_indexer(in_index_shape), _indexer(kept_shape), ctypes.c_int(stride)]
            _launch(lib, self.name, (blocks, 1, 1), (REDUCE_BLOCK, 1, 1), values, 1)
        return outs[0] if self.nout == 1 else tuple(outs)


# ------------------------------------------------------------------------------ raw modules
_GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w\s]+?)\s*(\w+)\s*\[\s*\]\s*;"
)


def raw_source(code: str) -> tuple[str, tuple[str, ...]]:
    """``code`` as a host translation unit, and its ``__global__`` functions."""
    names = tuple(dict.fromkeys(_GLOBAL.findall(code)))
    if not names:
        raise EmulationError('the module defines no extern "C" __global__ function')
    body = _DYNAMIC_SHARED.sub(
        lambda m: f"\n#define {m.group(2)} (({m.group(1).strip()}*)emu_dynamic_shared())\n", code
    )
    table = ", ".join(f"EMU_ENTRY({n})" for n in names)
    functions = "".join(f"EMU_FUNCTION({n})\n" for n in names)
    return f'#include "cuda_host.h"\n#line 1 "kernel.cu"\n{body}\n{functions}EMU_TABLE({table})\n', names


_KIND_NAMES = {"f": "floating", "i": "signed integer", "u": "unsigned integer", "b": "bool", "p": "pointer",
               "s": "struct", "v": "void"}  # fmt: skip


def _dtype_kind(dtype: np.dtype) -> str:
    return "b" if dtype == np.bool_ else dtype.kind


class RawFunction:
    def __init__(self, module: RawModule, name: str):
        self.module, self.name = module, name
        self.lib = module._library()
        if name not in self.lib.functions:
            raise EmulationError(f"the module defines {sorted(self.lib.functions)}, not {name!r}")
        self.index, self.params = self.lib.functions[name]

    def _geometry(self, what: str, value, limits) -> tuple[int, int, int]:
        dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
        if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
            raise EmulationError(f"kernel {self.name}: {what} must be 1 to 3 integers, got {value!r}")
        dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
        for axis, d, limit in zip("xyz", dims, limits):
            if not 1 <= d <= limit:
                raise EmulationError(f"kernel {self.name}: {what}.{axis} = {d} is outside [1, {limit}]")
        return dims

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        grid3 = self._geometry("grid", grid, (2**31 - 1, 65535, 65535))
        block3 = self._geometry("block", block, (1024, 1024, 64))
        if block3[0] * block3[1] * block3[2] > 1024:
            raise EmulationError(f"kernel {self.name}: a block of {block3} has more than 1024 threads")
        if not isinstance(shared_mem, (int, np.integer)) or not 0 <= shared_mem <= 48 * 1024:
            raise EmulationError(
                f"kernel {self.name}: shared_mem = {shared_mem!r} is outside [0, 49152] bytes"
            )
        if not isinstance(args, tuple):
            raise TypeError(f"kernel {self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise EmulationError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = [self._argument(k, a, p) for k, (a, p) in enumerate(zip(args, self.params))]
        _launch(self.lib, self.name, grid3, block3, values, 1 if self.module.barriers else 0, shared_mem)

    def _argument(self, k: int, a: Any, param: tuple[str, int, str, int]):
        kind, size, pkind, psize = param
        where = f"kernel {self.name}, argument {k}"
        if isinstance(a, ndarray):
            if kind != "p":
                raise EmulationError(
                    f"{where}: a device array is passed where the kernel takes a {size}-byte {_KIND_NAMES[kind]}"
                )
            dtype = a.dtype
            if pkind != "v":
                ok = psize == dtype.itemsize and (
                    pkind == _dtype_kind(dtype)
                    or (pkind in "iu" and _dtype_kind(dtype) in "iub" and psize == 1)
                )
                if not ok:
                    raise EmulationError(
                        f"{where}: a {dtype} array is passed to a pointer to a {psize}-byte {_KIND_NAMES[pkind]}"
                    )
            if a.size > 0:
                ptr = memory.address(a._a)
                if memory.find(ptr) is None:
                    raise EmulationError(f"{where}: pointer {ptr:#x} is not in a live device allocation")
                if not a._a.flags.c_contiguous:
                    raise EmulationError(
                        f"{where}: a non-contiguous {a.shape} array (strides {a.strides}) is passed as a pointer; "
                        "the kernel would index it as contiguous"
                    )
            return ctypes.c_void_p(memory.address(a._a))
        if a is None:
            if kind != "p":
                raise EmulationError(f"{where}: None is passed where the kernel takes a {_KIND_NAMES[kind]}")
            return ctypes.c_void_p(0)
        if isinstance(a, np.ndarray):
            raise EmulationError(f"{where}: a host numpy.ndarray is passed; kernels take device arrays")
        if isinstance(a, np.generic):
            value = np.array(a)
        elif isinstance(a, bool):
            value = np.array(a, dtype=np.bool_)
        elif isinstance(a, int):
            value = np.array(a, dtype=np.int64)  # CuPy passes a Python int as int64
        elif isinstance(a, float):
            value = np.array(a, dtype=np.float64)  # and a Python float as float64
        else:
            raise EmulationError(f"{where}: unsupported argument type {type(a).__name__}")
        dkind = _dtype_kind(value.dtype)
        if kind == "p" or dkind != kind or value.dtype.itemsize != size:
            raise EmulationError(
                f"{where}: {a!r} is passed as {value.dtype} ({value.dtype.itemsize} bytes), but the kernel takes "
                f"a {size}-byte {_KIND_NAMES[kind]}"
            )
        return _scalar_ctype(value)


class RawModule:
    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):  # fmt: skip
        if code is None:
            if path is None:
                raise TypeError("RawModule needs code= or path=")
            with open(path) as f:
                code = f.read()
        self.code, self.options = code, tuple(options)
        self.source, self.names = raw_source(code)
        self.barriers = uses_barriers(code)
        self._lib: Library | None = None
        self._functions: dict[str, RawFunction] = {}

    def _library(self) -> Library:
        if self._lib is None:
            self._lib = load(self.source, self.names[0])
        return self._lib

    def get_function(self, name: str) -> RawFunction:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = RawFunction(self, name)
        return fn


class RawKernel:
    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):  # fmt: skip
        self.module = RawModule(code=code, options=options)
        self.name = name
        self._fn: RawFunction | None = None

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        if self._fn is None:
            self._fn = self.module.get_function(self.name)
        self._fn(grid, block, args, shared_mem=shared_mem)
