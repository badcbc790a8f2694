"""Checkpoints: one ``.npz`` file per snapshot of a training run.

Layout of the file (a zip of ``.npy`` members, written with NumPy and read
with ``allow_pickle=False``)::

    __meta__            0-d unicode array: a JSON document (below)
    model/<name>        one array per entry of the model's state_dict (dotted names)
    optim/<i>           the arrays inside the optimizer state, numbered
    extra/<i>           the arrays inside ``extra``, numbered

The JSON document::

    {"format": "learnsparse-checkpoint", "version": 1,
     "library_version": "...", "epoch": <completed epochs>,
     "config": {...}, "metrics": [{...}, ...],
     "optimizer": <optimizer state>, "extra": <extra>}

Nested optimizer and extra states (dicts, lists, numbers, strings, arrays)
are stored as JSON in which every array is replaced by ``{"__array__": key}``
pointing at its ``optim/...`` or ``extra/...`` member, so any structure of
plain values and arrays round-trips without pickle.

Writes are atomic: the file is written under a temporary name in the target
directory and renamed over the target only once complete, so a crash or a
full disk never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reference.backend import array_module, to_host
from reference.errors import CheckpointError
from reference.files import atomic_target

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "check_finite",
    "first_non_finite",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT_NAME = "learnsparse-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
_ARRAY_TAG = "__array__"


@dataclasses.dataclass
class Checkpoint:
    """The contents of one checkpoint file."""

    path: Path
    model_state: dict[str, np.ndarray]
    optimizer_state: Any
    config: dict[str, Any]
    epoch: int  # completed epochs
    metrics: list[dict[str, Any]]
    extra: Any
    library_version: str
    format_version: int = FORMAT_VERSION


def library_version() -> str:
    """The library's version, recorded in every checkpoint."""
    from reference import __version__

    return __version__


# ---------------------------------------------------------------------------
# Nested state <-> (JSON tree, arrays)


def _host(array: Any) -> np.ndarray:
    """A NumPy copy of ``array`` (fetched from the GPU when it is a CuPy array)."""
    out = to_host(array)
    if out.dtype.hasobject:
        raise CheckpointError(f"cannot store an array of Python objects (dtype {out.dtype}) in a checkpoint")
    return out


def _split(value: Any, prefix: str, arrays: dict[str, np.ndarray], where: str) -> Any:
    """``value`` as a JSON tree, its arrays moved into ``arrays`` under ``prefix/<n>``."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        if getattr(value, "ndim", 1) == 0 and isinstance(value, np.generic):
            return value.item()  # NumPy scalars are plain numbers
        key = f"{prefix}/{len([k for k in arrays if k.startswith(prefix + '/')])}"
        arrays[key] = _host(value)
        return {_ARRAY_TAG: key}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: keys must be strings to be stored, got {k!r}")
            out[k] = _split(v, prefix, arrays, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_split(v, prefix, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"{where}: cannot store a value of type {type(value).__name__} in a checkpoint")


def _join(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY_TAG}:
            return arrays[tree[_ARRAY_TAG]]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


# ---------------------------------------------------------------------------
# Saving


def save_checkpoint(
    path: str | Path,
    *,
    model_state: Mapping[str, Any],
    optimizer_state: Any,
    config: Any,
    epoch: int,
    metrics: list[Mapping[str, Any]],
    extra: Any = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically and return the path.

    ``config`` is a mapping or an object with ``to_dict()`` (a TrainConfig).
    ``epoch`` is the number of completed epochs. The directory must exist.
    """
    path = Path(path)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arrays: dict[str, np.ndarray] = {}
    for name, value in model_state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"model_state names must be strings, got {name!r}")
        arrays[f"model/{name}"] = _host(value)
    metric_arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "library_version": library_version(),
        "epoch": int(epoch),
        "config": config_dict,
        "metrics": _split(list(metrics), "metrics", metric_arrays, "metrics"),
        "optimizer": _split(optimizer_state, "optim", arrays, "optimizer_state"),
        "extra": _split(extra, "extra", arrays, "extra"),
    }
    if metric_arrays:
        raise CheckpointError("metrics must hold plain numbers and strings, not arrays")
    try:
        meta_json = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store the checkpoint metadata for {str(path)!r}: {exc}") from None
    arrays[_META_KEY] = np.array(meta_json)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(
            f"cannot write checkpoint {str(path)!r}: directory {str(directory)!r} does not exist"
        )
    try:
        with atomic_target(path) as tmp, open(tmp, "xb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}") from exc
    return path


# ---------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises CheckpointError, naming ``path``, when the file is missing, is not a
    checkpoint, is truncated or corrupt, or has an unknown format version.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {where!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {where!r} is a directory, expected a .npz file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {where!r} cannot be read: {exc.strerror or exc}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise CheckpointError(f"{where!r} is not a learnsparse checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if _META_KEY not in data.files:
                raise CheckpointError(f"{where!r} is not a learnsparse checkpoint (no {_META_KEY} entry)")
            arrays = {key: data[key] for key in data.files}
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise CheckpointError(
            f"{where!r} is not a readable learnsparse checkpoint (corrupt or truncated file: {exc})"
        ) from None

    try:
        meta = json.loads(str(arrays.pop(_META_KEY)[()]))
    except (ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{where!r} has unreadable checkpoint metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where!r} is not a learnsparse checkpoint (format {meta.get('format')!r})")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has checkpoint format version {version!r}; this library reads version {FORMAT_VERSION}"
        )
    try:
        model_state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
        return Checkpoint(
            path=path,
            model_state=model_state,
            optimizer_state=_join(meta["optimizer"], arrays),
            config=dict(meta["config"]),
            epoch=int(meta["epoch"]),
            metrics=list(meta["metrics"]),
            extra=_join(meta.get("extra"), arrays),
            library_version=str(meta.get("library_version", "unknown")),
            format_version=int(version),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where!r} has incomplete checkpoint metadata (missing {exc})") from None


# ---------------------------------------------------------------------------
# Finiteness: a diverged run's arrays are never used


def first_non_finite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating array in ``named`` that holds a NaN or an infinity, else None.

    One reduction per array (``isfinite(a).all()``) on the array's own backend;
    the flags of GPU arrays are stacked and read back to the host once, so
    checking a whole model on the device costs one synchronisation. Integer and
    boolean arrays cannot hold a NaN and are skipped.
    """
    names: list[str] = []
    flags: list[Any] = []  # host bools, or 0-d device booleans (read below, all at once)
    for name, array in named:
        if array is None or getattr(array, "dtype", None) is None or array.dtype.kind not in "fc":
            continue
        xp = array_module(array)
        names.append(name)
        flags.append(xp.isfinite(array).all() if xp is not np else bool(np.isfinite(array).all()))
    on_device = [i for i, flag in enumerate(flags) if not isinstance(flag, bool)]
    if on_device:
        xp = array_module(flags[on_device[0]])
        read = to_host(xp.stack([flags[i] for i in on_device]))  # the one host read
        for i, ok in zip(on_device, read.tolist()):
            flags[i] = bool(ok)
    return next((name for name, ok in zip(names, flags) if not ok), None)


def _named_arrays(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every array inside a nested state (dicts, lists), named by its path below ``prefix``."""
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _named_arrays(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _named_arrays(value, f"{prefix}[{i}]")


def check_finite(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself when its model and optimizer arrays are all finite; else CheckpointError.

    The error names the checkpoint and the first array that holds a NaN or an
    infinity (model arrays by their dotted name, optimizer arrays as
    ``optimizer.<path>``): such a checkpoint was saved by a run that diverged,
    and nothing computed from it would mean anything.
    """
    named = itertools.chain(ckpt.model_state.items(), _named_arrays(ckpt.optimizer_state, "optimizer"))
    bad = first_non_finite(named)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} holds non-finite values (NaN or infinity) in {bad!r}: "
            "it was saved by a run that diverged; train again with a smaller lr"
        )
    return ckpt
