"""Every hand-written CUDA kernel of the twin, declared in one place.

An op module declares its kernels at import time with :func:`elementwise`,
:func:`reduction` or :func:`raw`; each returns a :class:`Kernel` that builds the
CuPy kernel object on its first call (CuPy then compiles it for the argument
dtypes on first launch and caches the binary, see :mod:`gpu.runtime`).

Because every kernel is a :class:`KernelSpec` in :data:`REGISTRY`, the sources
can be checked without a GPU: :func:`check_source` wraps a spec in a complete
translation unit (for ``float`` and ``double``) that ``nvcc`` or NVRTC
compiles, so a typo in a kernel fails a test on any machine with the CUDA
compiler, long before a GPU run.

The kernel-writing conventions of CuPy apply:

- ``elementwise``: ``in_params``/``out_params`` like ``"T x, raw T w, float32 g"``;
  the body sees each non-raw argument as a value (inputs) or a reference
  (outputs) at the current index ``i``; ``raw`` arguments are whole arrays
  indexed by hand.
- ``reduction``: ``map_expr`` maps one element (``a`` is the running value),
  ``reduce_expr`` combines ``a`` and ``b``, ``post_map_expr`` writes the output
  from ``a``; ``reduce_type`` is the accumulator's C type.
- ``raw``: a complete CUDA source with ``extern "C" __global__`` functions; the
  placeholder ``${T}`` is replaced by the C type of the floating dtype it is
  compiled for, so one source serves float32 and float64. A raw kernel is
  launched with :meth:`Kernel.launch`, or with :meth:`Kernel.launch_flat` for a
  grid-stride loop over ``total`` elements (the grid size follows from the
  count); the function object is looked up once per (dtype, function).

Device helpers shared by raw sources (prepend the string to a source that
needs it): :data:`WINDOW_INDEX` runs a sliding window backwards;
:data:`BLOCK_REDUCE` is the one block-wide reduction of doubles (warp
shuffles, then one shared-memory pass), used by batch norm, the loss, the
depthwise weight gradient and the sparsity threshold gradients.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

__all__ = [
    "BLOCK_REDUCE",
    "FLAT_BLOCK",
    "REGISTRY",
    "WINDOW_INDEX",
    "Kernel",
    "KernelSpec",
    "check_source",
    "ctype",
    "elementwise",
    "flat_grid",
    "raw",
    "reduction",
]

# A device function for the gathers that run a sliding window backwards (col2im, the depthwise
# input gradient, the pooling gradients): prepend it to a raw source that needs it.
WINDOW_INDEX = r"""
// Along one axis: the output position i whose window puts tap p on input position h
// (h + pad = i stride + p). i >= 0; -1 when no window does; -2 when no larger tap can either
// (h + pad - p only falls as p grows), so a loop over the taps may stop.
__device__ __forceinline__ int window_index(int h, int pad, int p, int stride, int n_out) {
    const int hp = h + pad - p;
    if (hp < 0) return -2;
    if (hp % stride != 0) return -1;
    const int i = hp / stride;
    return i < n_out ? i : -1;
}
"""

# Block-wide reductions of doubles, for blocks of a multiple of 32 threads (at most 1024). Every
# thread of the block must call them (they hold barriers); every thread gets the result. The order of
# the sums is fixed by the thread layout (a shuffle tree in each warp, then one over the warps'
# results), so a launch with the same shape gives the same bits every time. ``buf`` is 33 doubles of
# shared memory, free again when the call returns.
BLOCK_REDUCE = r"""
struct BlockSumOp {
    __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ double block_reduce(double v, Op op, double identity, double* buf) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int warps = (blockDim.x + 31u) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) buf[warp] = v;  // each warp's result
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? buf[lane] : identity;
        for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
        if (lane == 0) buf[32] = v;
    }
    __syncthreads();
    v = buf[32];
    __syncthreads();  // buf is free for the next call
    return v;
}

__device__ __forceinline__ double block_sum(double v, double* buf) {
    return block_reduce(v, BlockSumOp(), 0.0, buf);
}
"""

FLAT_BLOCK = 256  # threads per block of a flat (grid-stride, one thread per element) launch
_MAX_BLOCKS = 1 << 20  # grid-stride loops cover anything beyond 2^28 elements


def flat_grid(total: int, block: int = FLAT_BLOCK, max_blocks: int = _MAX_BLOCKS) -> tuple[int]:
    """The grid of a grid-stride loop over ``total`` elements (``total`` > 0) in blocks of ``block``."""
    return (max(1, min((total + block - 1) // block, max_blocks)),)


_CTYPES = {
    "float32": "float",
    "float64": "double",
    "int32": "int",
    "int64": "long long",
    "bool": "bool",
    "uint8": "unsigned char",
    "int8": "signed char",
}


def ctype(dtype: Any) -> str:
    """The C type of a NumPy/CuPy dtype: float32 -> "float", float64 -> "double"."""
    name = getattr(dtype, "name", None) or str(dtype)
    try:
        return _CTYPES[name]
    except KeyError:
        raise TypeError(f"no CUDA kernel is compiled for dtype {name}") from None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    kind: str  # "elementwise", "reduction" or "raw"
    name: str
    source: str  # elementwise: the body; reduction: "" (see the expressions); raw: the whole source
    in_params: str = ""
    out_params: str = ""
    map_expr: str = ""
    reduce_expr: str = ""
    post_map_expr: str = ""
    identity: str = ""
    reduce_type: str = ""
    preamble: str = ""
    functions: tuple[str, ...] = ()  # raw: the __global__ functions it defines


REGISTRY: dict[str, KernelSpec] = {}


class Kernel:
    """A declared kernel; calling it builds the CuPy object once and launches it."""

    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self._built: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}  # (C type, function) -> CuPy function

    def _build(self, key: str) -> Any:
        import cupy

        s = self.spec
        if s.kind == "elementwise":
            return cupy.ElementwiseKernel(s.in_params, s.out_params, s.source, s.name, preamble=s.preamble)
        if s.kind == "reduction":
            return cupy.ReductionKernel(
                s.in_params,
                s.out_params,
                s.map_expr,
                s.reduce_expr,
                s.post_map_expr,
                s.identity,
                s.name,
                reduce_type=s.reduce_type,
                preamble=s.preamble,
            )
        source = string.Template(s.source).substitute(T=key)
        return cupy.RawModule(code=source, options=("-std=c++17",))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Launch an elementwise or reduction kernel, CuPy's calling convention."""
        if self.spec.kind == "raw":
            raise TypeError(f"raw kernel {self.spec.name!r} is launched with .launch(), not called")
        kernel = self._built.get("")
        if kernel is None:
            kernel = self._built[""] = self._build("")
        return kernel(*args, **kwargs)

    def launch(
        self, function: str, dtype: Any, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0
    ) -> None:
        """Launch ``function`` of a raw kernel compiled for the floating ``dtype``."""
        self.function(function, dtype)(grid, block, args, shared_mem=shared_mem)

    def launch_flat(
        self, function: str, dtype: Any, total: int, args: tuple, block: int = FLAT_BLOCK
    ) -> None:
        """Launch ``function`` as a grid-stride loop over ``total`` elements (nothing when ``total`` is 0)."""
        if total > 0:
            self.launch(function, dtype, flat_grid(total, block), (block,), args)

    def function(self, function: str, dtype: Any) -> Any:
        """The CuPy function object of ``function`` compiled for ``dtype``, built and looked up once."""
        key = ctype(dtype)
        found = self._functions.get((key, function))
        if found is None:
            if function not in self.spec.functions:
                raise KeyError(
                    f"raw kernel {self.spec.name!r} defines {self.spec.functions}, not {function!r}"
                )
            module = self._built.get(key)
            if module is None:
                module = self._built[key] = self._build(key)
            found = self._functions[(key, function)] = module.get_function(function)
        return found


def _register(spec: KernelSpec) -> Kernel:
    if spec.name in REGISTRY and REGISTRY[spec.name] != spec:
        raise ValueError(f"two different kernels are named {spec.name!r}")
    REGISTRY[spec.name] = spec
    return Kernel(spec)


def elementwise(name: str, in_params: str, out_params: str, body: str, *, preamble: str = "") -> Kernel:
    """Declare a ``cupy.ElementwiseKernel``."""
    return _register(KernelSpec("elementwise", name, body, in_params, out_params, preamble=preamble))


def reduction(
    name: str,
    in_params: str,
    out_params: str,
    *,
    map_expr: str,
    reduce_expr: str,
    post_map_expr: str,
    identity: str,
    reduce_type: str,
    preamble: str = "",
) -> Kernel:
    """Declare a ``cupy.ReductionKernel``."""
    spec = KernelSpec(
        "reduction",
        name,
        "",
        in_params,
        out_params,
        map_expr,
        reduce_expr,
        post_map_expr,
        identity,
        reduce_type,
        preamble,
    )
    return _register(spec)


def raw(name: str, source: str) -> Kernel:
    """Declare a ``cupy.RawModule`` source (``${T}`` is the floating type it is compiled for)."""
    functions = tuple(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', source))
    if not functions:
        raise ValueError(f'raw kernel {name!r} defines no extern "C" __global__ function')
    return _register(KernelSpec("raw", name, source, functions=functions))


# --------------------------------------------------------------------------- source checks
_CHECK_PRELUDE = """
template <typename T> struct RawArray {  // stands in for CuPy's CArray in raw parameters
  T* p;
  __device__ T& operator[](long long k) const { return p[k]; }
  __device__ long long size() const { return 0; }
};
struct IndexStub { __device__ long long size() const { return 1; } };  // CuPy's _in_ind, _out_ind
"""


def _params(text: str, floating: str) -> list[tuple[str, str, bool]]:
    """``"T x, raw T w, float32 g"`` -> ``[("float", "x", False), ("float", "w", True), ...]``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        words = part.split()
        is_raw = words[0] == "raw"
        if is_raw:
            words = words[1:]
        type_name, name = words
        c = floating if len(type_name) == 1 and type_name.isupper() else _CTYPES.get(type_name, type_name)
        out.append((c, name, is_raw))
    return out


def check_source(spec: KernelSpec, floating: str) -> str:
    """A complete CUDA translation unit exercising ``spec`` with floating type ``floating``.

    Elementwise and reduction bodies are wrapped the way CuPy wraps them (each
    non-raw input a value, each output a reference, raw ones indexable, ``i``
    the element index), so compiling this checks their syntax and names.
    """
    if spec.kind == "raw":
        return string.Template(spec.source).substitute(T=floating)
    ins = _params(spec.in_params, floating)
    outs = _params(spec.out_params, floating)
    typedefs = f"typedef {floating} T;\n"
    args = [f"RawArray<{c}> {n}" if r else f"const {c} {n}" for c, n, r in ins]
    args += [f"RawArray<{c}> {n}" if r else f"{c}* {n}_out" for c, n, r in outs]
    refs = "".join(f"  {c}& {n} = {n}_out[i];\n" for c, n, r in outs if not r)
    if spec.kind == "elementwise":
        body = f"  const long long i = blockIdx.x * blockDim.x + threadIdx.x;\n{refs}  {spec.source};\n"
    else:
        reduce_t = spec.reduce_type if spec.reduce_type not in ("T",) else floating
        reduce_t = _CTYPES.get(reduce_t, reduce_t)
        body = (
            f"  const long long i = blockIdx.x * blockDim.x + threadIdx.x;\n{refs}"
            f"  typedef {reduce_t} _type_reduce;\n  const IndexStub _in_ind, _out_ind;\n"
            f"  _type_reduce a = _type_reduce({spec.identity or 0});\n"
            f"  _type_reduce b = ({spec.map_expr});\n"
            f"  a = ({spec.reduce_expr});\n"
            f"  {spec.post_map_expr};\n"
        )
    return (
        f"{_CHECK_PRELUDE}{typedefs}{spec.preamble}\n"
        f'extern "C" __global__ void {spec.name}_check({", ".join(args)}) {{\n{body}}}\n'
    )
