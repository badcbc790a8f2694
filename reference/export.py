"""Portable weights: a finalized model as a safetensors file with torchvision's names.

:func:`export_safetensors` writes every entry of a finalized model's state dict
under its dotted torchvision name (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``fc.bias``, ...): floating-point arrays as float32, BN's ``num_batches_tracked``
as int64. A dense file loads straight into ``torchvision.models.resnet50()``
with ``safetensors.torch.load_file`` and ``load_state_dict``.

With ``csr=True`` each conv and fc weight is stored instead in compressed
sparse row form, its rows the output channels and its columns the flattened
``in/groups * kh * kw`` (``in_features`` for fc)::

    <name>.csr.data     float32 (nnz,)        the nonzero values, row by row, columns ascending
    <name>.csr.indices  int32   (nnz,)        the column of each value
    <name>.csr.indptr   int64   (rows + 1,)   row r holds data[indptr[r]:indptr[r + 1]]

and the dense shapes go into the file's metadata (``"csr_shapes"``: JSON
``{name: shape}``). :func:`load_safetensors` reads either form back as a dense
state dict. The file is written atomically.

:func:`export_model` is what ``learnsparse export`` calls: it finalizes a
restored checkpoint's model where it is not plain yet and writes it in the
format :func:`format_of` picks from the output's suffix (``.safetensors``,
``.onnx``; no suffix keeps the safetensors default) or from an explicit
format. ONNX graphs are built by :mod:`reference.onnx_export`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reference.errors import CheckpointError, ConfigError
from reference.nn import Module, weight_layers

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_NAME",
    "csr_decode",
    "csr_encode",
    "export_model",
    "export_options",
    "export_safetensors",
    "format_of",
    "load_safetensors",
]

FORMAT_NAME = "learnsparse-safetensors"
_CSR_PARTS = ("data", "indices", "indptr")
EXPORT_FORMATS = ("onnx", "safetensors")
_SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors"}


def csr_encode(weight: np.ndarray) -> dict[str, np.ndarray]:
    """``weight`` (out, ...) as CSR arrays ``{"data", "indices", "indptr"}`` of its (out, rest) matrix."""
    w = np.asarray(weight)
    matrix = w.reshape(w.shape[0], -1)  # (out, in/groups, kh, kw) -> (out, in/groups * kh * kw)
    nonzero = matrix != 0
    counts = nonzero.sum(axis=1)
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    _, columns = np.nonzero(nonzero)  # row-major: rows in order, columns ascending within a row
    return {
        "data": np.ascontiguousarray(matrix[nonzero], dtype=np.float32),
        "indices": columns.astype(np.int32),
        "indptr": indptr,
    }


def csr_decode(parts: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 array of ``shape`` that :func:`csr_encode` compressed into ``parts``."""
    data, indices, indptr = (np.asarray(parts[k]) for k in _CSR_PARTS)
    rows = int(shape[0]) if shape else 0
    cols = int(np.prod(shape[1:], dtype=np.int64))
    if (
        len(shape) < 2
        or indptr.shape != (rows + 1,)
        or data.shape != indices.shape
        or indptr[0] != 0
        or indptr[-1] != len(data)
        or np.any(np.diff(indptr) < 0)
        or (len(indices) and (indices.min() < 0 or indices.max() >= cols))
    ):
        raise CheckpointError(f"malformed CSR arrays for a weight of shape {tuple(shape)}")
    dense = np.zeros((rows, cols), dtype=np.float32)
    row_of = np.repeat(np.arange(rows), np.diff(indptr))  # the row of each stored value
    dense[row_of, indices] = data
    return dense.reshape(shape)  # (out, rest) -> the weight's shape


def _export_array(name: str, array: Any) -> np.ndarray:
    get = getattr(array, "get", None)
    a = np.asarray(get() if callable(get) and not isinstance(array, np.ndarray) else array)
    if a.dtype.kind == "f":
        return np.asarray(a, dtype=np.float32, order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
    if a.dtype.kind in "iub":
        return np.asarray(a, order="C")
    raise ConfigError(f"export: {name} has dtype {a.dtype}, which safetensors cannot store")


def export_safetensors(model: Module, path: str | Path, *, csr: bool = False) -> Path:
    """Write the finalized ``model``'s state dict to ``path`` (see the module docstring).

    Raises ConfigError when the model still carries a sparsifier or channel
    mask (finalize it first with :func:`reference.finalize.finalize`).
    """
    from safetensors.numpy import save

    from reference import __version__
    from reference.files import write_atomic
    from reference.finalize import has_sparsity_modules

    if has_sparsity_modules(model):
        raise ConfigError("export: the model still has sparsifiers or channel masks; finalize it first")
    path = Path(path)
    state = model.state_dict()
    weight_names = {f"{name}.weight" if name else "weight" for name, _ in weight_layers(model)}
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    for name, array in state.items():
        a = _export_array(name, array)
        if csr and name in weight_names:
            for part, values in csr_encode(a).items():
                tensors[f"{name}.csr.{part}"] = values
            shapes[name] = list(a.shape)
        else:
            tensors[name] = a
    metadata = {"format": FORMAT_NAME, "library_version": __version__, "csr": "true" if csr else "false"}
    if csr:
        metadata["csr_shapes"] = json.dumps(shapes)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    try:
        write_atomic(path, save(tensors, metadata=metadata))
    except OSError as exc:
        raise ConfigError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The dense state dict stored in a safetensors file (CSR weights expanded back to their shapes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {where!r} does not exist")
    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
            arrays = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where!r} is not a readable safetensors file: {exc}") from None
    try:
        shapes = json.loads(metadata.get("csr_shapes", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{where!r} has unreadable csr_shapes metadata: {exc}") from None
    state: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if ".csr." not in key:
            state[key] = value
            continue
        name, part = key.rsplit(".csr.", 1)
        if name in state or part not in _CSR_PARTS:
            continue
        if name not in shapes:
            raise CheckpointError(f"{where!r}: {key} has no dense shape in the csr_shapes metadata")
        try:
            parts = {p: arrays[f"{name}.csr.{p}"] for p in _CSR_PARTS}
        except KeyError as exc:
            raise CheckpointError(f"{where!r}: CSR weight {name} lacks {exc.args[0]}") from None
        state[name] = csr_decode(parts, tuple(int(d) for d in shapes[name]))
    return state


# ---------------------------------------------------------------------------
# Choosing the format, and exporting a restored checkpoint


def format_of(path: str | Path, fmt: str | None = None) -> str:
    """The export format for output ``path``: ``fmt`` when given, else the one its suffix names.

    A name without a suffix is safetensors (the format ``export`` has always
    written). Raises ConfigError for an unknown format, an unknown suffix
    without ``fmt``, or a suffix that names the other format than ``fmt``.
    """
    suffix = Path(path).suffix.lower()
    by_suffix = _SUFFIXES.get(suffix)
    if fmt is not None:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        if by_suffix is not None and by_suffix != fmt:
            raise ConfigError(
                f"the output {str(path)!r} has the suffix {suffix!r} of {by_suffix} but --format is {fmt!r}; "
                "make them agree"
            )
        return fmt
    if by_suffix is not None:
        return by_suffix
    if suffix == "":
        return "safetensors"
    raise ConfigError(
        f"cannot tell the export format of {str(path)!r} from its suffix {suffix!r}: "
        "expected .onnx or .safetensors, or --format onnx|safetensors"
    )


def export_options(
    path: str | Path,
    fmt: str | None = None,
    *,
    csr: bool = False,
    fold_bn: bool = False,
    opset: int | None = None,
) -> tuple[str, int | None]:
    """The format (:func:`format_of`) and the ONNX opset (the default where None; None for
    safetensors) of an export to ``path``; ConfigError for an option of the other format."""
    fmt = format_of(path, fmt)
    if fmt == "onnx" and csr:
        raise ConfigError("--csr is a safetensors option; an ONNX graph stores its weights dense")
    if fmt == "safetensors" and (fold_bn or opset is not None):
        flag = "--fold-bn" if fold_bn else "--opset"
        raise ConfigError(f"{flag} is an ONNX option; write a .onnx file (or --format onnx) to use it")
    if fmt == "onnx":
        from reference.onnx_export import DEFAULT_OPSET, check_opset

        opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    return fmt, opset


def export_model(
    restored: Any,
    path: str | Path,
    fmt: str | None = None,
    *,
    csr: bool = False,
    fold_bn: bool = False,
    opset: int | None = None,
) -> tuple[Path, str]:
    """Write the model of ``restored`` (a :class:`reference.finalize.RestoredModel`) to ``path``.

    The model is finalized in place first if it still carries a sparsity
    method. Returns the path and the format written. ``csr`` is a safetensors
    option; ``fold_bn`` and ``opset`` are ONNX options: each given with the
    other format raises ConfigError before anything is done.
    """
    from reference.finalize import finalize, has_sparsity_modules

    fmt, opset = export_options(path, fmt, csr=csr, fold_bn=fold_bn, opset=opset)
    model = restored.model
    if has_sparsity_modules(model):
        finalize(model)
    if fmt == "safetensors":
        return export_safetensors(model, path, csr=csr), fmt
    from reference.onnx_export import export_onnx

    config = restored.config
    slimmed = bool((restored.finalized or {}).get("slimmed")) or restored.method_name == "scp"
    metadata = {
        "model": config.model,
        "method": restored.method_name,
        "width": config.width,
        "num_classes": restored.num_classes,
        "slimmed": "true" if slimmed else "false",
    }
    out = export_onnx(
        model, path, restored.input_shape, dataset=config.dataset, fold_bn=fold_bn, opset=opset,
        metadata=metadata,
    )  # fmt: skip
    return out, fmt
