"""An ImageNet-style class-per-folder tree of images, decoded in batches on demand.

Layout::

    root/train/<class>/<image>.jpg|.jpeg|.png
    root/val/<class>/<image>.jpg|.jpeg|.png

The classes are the sorted sub-directory names of ``root/train``; label ``k``
is the ``k``-th of them. Every class of ``val`` must be a class of ``train``
(a class may have no ``val`` folder). Files are taken in sorted order within a
class; extensions are matched case-insensitively, other files are ignored.
Scanning lists directories only: an image that cannot be decoded is reported
(a DataError naming the file) when a batch that holds it is built.

Transforms (Pillow, bilinear resampling, every image converted to RGB):

- training (``augment=True``): random-resized-crop to ``size`` x ``size`` --
  up to 10 attempts to draw a box of area ``U(0.08, 1) * H * W`` and aspect
  ratio ``exp(U(log 3/4, log 4/3))`` (width over height) that fits in the
  image, at a uniform position; when none fits, the centre crop of the whole
  image clamped to that ratio range -- then a horizontal flip with
  probability 1/2.
- evaluation (``augment=False``): resize the short side to
  ``round(size * 256 / 224)`` (the long side in proportion, truncated), then
  take the centre ``size`` x ``size`` crop.

Each transform yields a uint8 (H, W, 3) image; a batch is uint8
(N, 3, size, size). With ``normalize=True`` batches are float32, scaled to
[0, 1] and standardised per channel with IMAGENET_MEAN and IMAGENET_STD; with
``normalize=False`` they stay uint8, for a caller that normalises elsewhere
(on a GPU, say) with :func:`normalize`.

Randomness: every call of :meth:`ImageFolder.batches` draws, from the rng it
is given and before the first batch is built, first the permutation (when
shuffling) and then one 63-bit seed per position (when augmenting). Sample
``i``'s crop and flip come from ``default_rng(seed_i)`` alone, so the batches
are a function of the rng's starting state, the same for any number of
worker processes.

Workers: with ``workers=0`` batches are decoded in the calling process when
asked for. With ``workers=k > 0`` a pool of ``k`` processes decodes whole
batches, at most ``k + prefetch`` of them ahead of the consumer (a bounded
window, yielded in order); the pool lives as long as the iteration, and
closing the iteration early drops the queued batches and waits for those
being decoded. Workers are forked where
the platform can fork (Linux), so they start fast and need no import guard;
elsewhere they are spawned, and a script that iterates with workers must do
so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import numbers
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reference.errors import ConfigError, DataError

__all__ = [
    "EVAL_RESIZE_RATIO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "count_classes",
    "eval_transform",
    "normalize",
    "random_resized_crop_box",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_RESIZE_RATIO = 256 / 224
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
SPLITS = ("train", "val")
_START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


# ------------------------------------------------------------------ scanning
def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: p.name)


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise DataError(f"imagefolder: missing directory {root}")
    path = root / split
    if not path.is_dir():
        raise DataError(f"imagefolder: missing split directory {path}")
    return path


def count_classes(root: str | Path) -> int:
    """The number of class folders under ``root/train`` (listing directories only)."""
    train_dir = _split_dir(Path(root), "train")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"imagefolder: no class folders in {train_dir}")
    return len(classes)


def _images_in(class_dir: Path) -> list[Path]:
    return sorted(
        (p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )


@dataclass(frozen=True)
class _Split:
    """The files of one split and their labels (int64), in scan order."""

    files: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)


def _scan_split(root: Path, split: str, classes: list[str] | None) -> tuple[list[str], _Split]:
    split_dir = _split_dir(root, split)
    dirs = _class_dirs(split_dir)
    if classes is None:
        if not dirs:
            raise DataError(f"imagefolder: no class folders in {split_dir}")
        classes = [d.name for d in dirs]
    else:
        unknown = [d for d in dirs if d.name not in classes]
        if unknown:
            raise DataError(f"imagefolder: class folder {unknown[0]} is not a class of {root / 'train'}")
        if not dirs:
            raise DataError(f"imagefolder: no class folders in {split_dir}")
    index = {name: k for k, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for d in dirs:
        images = _images_in(d)
        if not images:
            raise DataError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folder {d}")
        files.extend(str(p) for p in images)
        labels.extend([index[d.name]] * len(images))
    return classes, _Split(tuple(files), np.asarray(labels, dtype=np.int64))


# ------------------------------------------------------------------ transforms
def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random-resized-crop box in a ``width`` x ``height`` image.

    Each attempt draws a target area ``U(scale) * width * height`` and a ratio
    ``exp(U(log ratio))``, rounds ``sqrt(area * ratio)`` and ``sqrt(area / ratio)``
    to the box's width and height, and accepts them when they fit; the offsets
    are then uniform over the valid positions. After ``attempts`` failures the
    box is the centred crop of the whole image clamped to the ratio range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, min(height, int(round(width / ratio[0]))))
    elif in_ratio > ratio[1]:
        w, h = max(1, min(width, int(round(height * ratio[1])))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(image: Any, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-resized-crop of a PIL image to ``size`` x ``size``, then a flip with p = 1/2.

    The rng is used for the box first, then for one flip draw. Returns uint8 (size, size, 3).
    """
    from PIL import Image

    image = _rgb(image)
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    arr = np.asarray(out, dtype=np.uint8)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def eval_transform(image: Any, size: int) -> np.ndarray:
    """Resize the short side of a PIL image to ``round(size * 256 / 224)``, centre-crop ``size``.

    Returns uint8 (size, size, 3).
    """
    from PIL import Image

    image = _rgb(image)
    short = int(round(size * EVAL_RESIZE_RATIO))
    w, h = image.width, image.height
    if w <= h:
        new_w, new_h = short, max(short, int(short * h / w))
    else:
        new_w, new_h = max(short, int(short * w / h)), short
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8).copy()


def normalize(batch: Any, xp: Any = np) -> Any:
    """uint8 (N, 3, H, W) -> float32 ``(batch / 255 - IMAGENET_MEAN) / IMAGENET_STD``.

    ``xp`` is the array module (NumPy, or CuPy for a batch on the GPU).
    """
    mean = xp.asarray(IMAGENET_MEAN, dtype=xp.float32).reshape(1, 3, 1, 1) * xp.float32(255.0)
    std = xp.asarray(IMAGENET_STD, dtype=xp.float32).reshape(1, 3, 1, 1) * xp.float32(255.0)
    inv_std = xp.float32(1.0) / std
    out = batch.astype(xp.float32)
    out -= mean
    out *= inv_std
    return out


def _decode(path: str, size: int, seed: int | None) -> np.ndarray:
    """One image file through its transform: uint8 (3, size, size)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if seed is None:
                arr = eval_transform(image, size)
            else:
                arr = train_transform(image, size, np.random.default_rng(seed))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: cannot read image {path}: {exc}") from None
    return arr.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _decode_batch(paths: list[str], seeds: list[int] | None, size: int) -> np.ndarray:
    """A batch of files through their transforms: uint8 (N, 3, size, size)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _decode(path, size, None if seeds is None else seeds[i])
    return out


# ------------------------------------------------------------------ the data set
def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ImageFolder:
    """The scanned tree at ``root`` (see the module docstring), decoded to ``image_size`` squares.

    ``train`` and ``val`` hold the file paths and int64 labels; ``classes``
    the class folder names. ``workers`` and ``prefetch`` are the defaults of
    :meth:`batches`.
    """

    def __init__(
        self, root: str | Path, image_size: int = 224, *, workers: int = 0, prefetch: int = 2
    ) -> None:
        self.root = Path(root)
        self.image_size = _check_int(image_size, "imagefolder: image_size", 1)
        self.workers = _check_int(workers, "imagefolder: workers", 0)
        self.prefetch = _check_int(prefetch, "imagefolder: prefetch", 0)
        classes, self.train = _scan_split(self.root, "train", None)
        _, self.val = _scan_split(self.root, "val", classes)
        self.classes = tuple(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, classes={self.num_classes}, train={len(self.train)}, "
            f"val={len(self.val)}, image_size={self.image_size}, workers={self.workers})"
        )

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        augment: bool = False,
        drop_last: bool = False,
        normalize: bool = True,
        workers: int | None = None,
        prefetch: int | None = None,
        start_batch: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` batches over one pass of ``split`` ("train" or "val").

        ``x`` is float32 (normalised) or uint8 (``normalize=False``) of shape
        (N, 3, image_size, image_size); ``y`` is int64 (N,). ``augment``
        selects the training transform, otherwise the evaluation one. The
        last, smaller batch is yielded unless ``drop_last``. Arguments are
        checked and all randomness is drawn (from ``rng``, required when
        shuffling or augmenting) when this is called; ``start_batch=k`` skips
        the first ``k`` batches and yields what a full pass would from there.
        """
        if split not in SPLITS:
            raise ConfigError(f"imagefolder: split must be one of {list(SPLITS)}, got {split!r}")
        batch_size = _check_int(batch_size, "batch_size", 1)
        start_batch = _check_int(start_batch, "start_batch", 0)
        workers = self.workers if workers is None else _check_int(workers, "imagefolder: workers", 0)
        prefetch = self.prefetch if prefetch is None else _check_int(prefetch, "imagefolder: prefetch", 0)
        if (shuffle or augment) and rng is None:
            raise ConfigError(
                f"imagefolder: shuffle={shuffle!r}, augment={augment!r} need rng=np.random.Generator, got None"
            )
        data = self.train if split == "train" else self.val
        n = len(data)
        order = rng.permutation(n) if shuffle else np.arange(n)
        seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64) if augment else None
        count = n // batch_size if drop_last else -(-n // batch_size)
        tasks = []
        for b in range(start_batch, count):
            idx = order[b * batch_size : min((b + 1) * batch_size, n)]
            paths = [data.files[i] for i in idx]
            lo = b * batch_size
            batch_seeds = None if seeds is None else [int(s) for s in seeds[lo : lo + len(idx)]]
            tasks.append((paths, batch_seeds, data.labels[idx]))
        return self._run(tasks, normalize, workers, prefetch)

    def _run(
        self,
        tasks: list[tuple[list[str], list[int] | None, np.ndarray]],
        norm: bool,
        workers: int,
        prefetch: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode the batch ``tasks`` in order, in this process or in a bounded pool window."""
        size = self.image_size

        def finish(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (normalize(x) if norm else x), y

        if workers == 0 or not tasks:
            for paths, seeds, labels in tasks:
                yield finish(_decode_batch(paths, seeds, size), labels)
            return
        window = workers + prefetch
        ctx = multiprocessing.get_context(_START_METHOD)
        # An executor, not multiprocessing.Pool: Pool.terminate() with tasks in
        # flight can deadlock its task-handler thread (seen when an iteration
        # is closed early); shutdown(cancel_futures=True) drops the queued
        # batches and waits for the running ones, so closing always returns.
        pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx)
        try:
            pending: collections.deque = collections.deque()
            it = iter(tasks)
            for paths, seeds, labels in it:
                pending.append((pool.submit(_decode_batch, paths, seeds, size), labels))
                if len(pending) >= window:
                    break
            while pending:
                future, labels = pending.popleft()
                x = future.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((pool.submit(_decode_batch, nxt[0], nxt[1], size), nxt[2]))
                yield finish(x, labels)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
