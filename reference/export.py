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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reference.errors import CheckpointError, ConfigError
from reference.nn import Module, weight_layers

__all__ = ["FORMAT_NAME", "csr_decode", "csr_encode", "export_safetensors", "load_safetensors"]

FORMAT_NAME = "learnsparse-safetensors"
_CSR_PARTS = ("data", "indices", "indptr")


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
