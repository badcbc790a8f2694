"""Data sets held in memory, and a batch iterator with vectorised augmentation.

Every data set is a :class:`Dataset`: float32 images in NCHW layout, int64
labels, and the name of the training augmentation that suits it. The arrays
that :func:`load_dataset` returns are read-only.

Data sets (``load_dataset(name, ...)``):

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  read from the package, no network). Pixels are scaled from 0..16 to [0, 1],
  then standardised with the mean and standard deviation of all training
  pixels. The split is stratified: within each class, 20 % of the images
  (rounded to the nearest integer) go to the test set, chosen by a permutation
  drawn from ``default_rng(DIGITS_SPLIT_SEED)``. That seed is a fixed constant,
  independent of the run's seed, so the test set is the same in every run.
  Images are kept in the original order within each split.
- ``"digits32"``: the same digits, split and standardisation at 32x32: each
  pixel repeated over a 4x4 block (nearest-neighbour upsampling), for models
  that halve their input more often than 8x8 allows (MobileNetV1, the
  ResNets). Its augmentation is the digits' one-pixel translation.
- ``"synthetic"``: images of any shape (C, H, W) and any number of classes,
  drawn from ``seed``. Each class has a random motif of C x k x k pixels with
  ``k = min(8, H, W)``, smoothed (periodically, so it tiles without seams),
  standardised to a per-pixel standard deviation of SYNTHETIC_SIGNAL, and
  tiled over the image from the top-left corner. The class is thus visible
  both at fixed positions (a nearest-class-mean classifier on raw pixels
  finds it) and as a local texture repeated everywhere (a convolution followed
  by global average pooling finds it). An image is its class's template plus
  independent standard Gaussian noise, divided by
  ``sqrt(1 + SYNTHETIC_SIGNAL**2)`` so pixels have unit variance. Classes are
  balanced and shuffled. Train and test share the templates and differ in noise.
- ``"cifar10"``: the standard python-pickle batch directory at ``root``
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``).
  Pixels are scaled to [0, 1] and standardised per channel with the usual
  CIFAR-10 training-set statistics CIFAR10_MEAN and CIFAR10_STD. Only load
  directories you trust: the files are pickles, though the reader accepts
  nothing but the few NumPy globals that array pickles use.
- ``"imagefolder"``: a class-per-folder tree of JPEG/PNG images at ``root``
  (``train/<class>/...`` and ``val/<class>/...``, see
  :mod:`reference.imagefolder`), never held in memory: ``x_train`` and
  ``x_test`` are empty (0, 3, S, S) arrays that carry the image shape, and
  ``stream`` decodes batches on demand (``workers`` processes; the ImageNet
  transforms at side ``S = image_shape[1]``; normalised with the ImageNet
  mean and standard deviation). The "val" split is the test split. Its
  augmentation, "imagenet", is random-resized-crop plus a horizontal flip.

Augmentations (``iterate_batches(..., augment=...)``), applied to the whole
batch with one gather, no loop over samples:

- ``"cifar"``: pad 4 pixels of zeros on every side (zero in the standardised
  space, i.e. the mean colour), take a random crop of the original size
  (offsets uniform in 0..8 per axis), and flip horizontally with
  probability 1/2.
- ``"digits"``: translate by a random offset in {-1, 0, 1} per axis; pixels
  moved in from outside repeat the nearest edge pixel (the background). No
  flips: digits are not mirror-symmetric.
"""

from __future__ import annotations

import math
import numbers
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reference.errors import ConfigError, DataError, ShapeError
from reference.memory import require_memory

__all__ = [
    "AUGMENT_NAMES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "dataset_image_shape",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "SYNTHETIC_SIGNAL",
    "Dataset",
    "digits_statistics",
    "iterate_batches",
    "load_dataset",
    "num_batches",
    "synthetic_bytes",
]

DATASET_NAMES = ("digits", "digits32", "synthetic", "cifar10", "imagefolder")
AUGMENT_NAMES = ("digits", "cifar")

DIGITS_SPLIT_SEED = 1797
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SIGNAL = 0.5
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_PAD = 4
_DIGITS_SHIFT = 1
_SYNTHETIC_MOTIF = 8
_STREAM_AUGMENT = "imagenet"


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A data set: float32 (N, C, H, W) images and int64 (N,) labels, or a stream of them.

    ``augment`` names the augmentation to use for training batches
    ("digits", "cifar" or None; "imagenet" for a stream); evaluation batches
    are never augmented. ``stream``, when set, is a
    :class:`reference.imagefolder.ImageFolder` that yields the batches; the
    arrays are then empty and carry only the image shape. Use
    :meth:`train_batches` and :meth:`test_batches` to iterate either kind.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: str | None = None
    stream: Any = None

    def __post_init__(self) -> None:
        valid = AUGMENT_NAMES + (_STREAM_AUGMENT,) if self.stream is not None else AUGMENT_NAMES
        if self.augment is not None and self.augment not in valid:
            raise DataError(
                f"Dataset {self.name!r}: augment must be None or one of {list(valid)}, got {self.augment!r}"
            )
        if not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 2:
            raise DataError(
                f"Dataset {self.name!r}: num_classes must be an integer >= 2, got {self.num_classes!r}"
            )
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.dtype != np.float32:
                raise DataError(
                    f"Dataset {self.name!r}: x_{split} must be float32 (N, C, H, W), "
                    f"got {x.dtype} with shape {x.shape}"
                )
            if y.ndim != 1 or y.dtype != np.int64 or len(y) != len(x):
                raise DataError(
                    f"Dataset {self.name!r}: y_{split} must be int64 of shape ({len(x)},), "
                    f"got {y.dtype} with shape {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"Dataset {self.name!r}: y_{split} holds labels in [{y.min()}, {y.max()}], "
                    f"expected [0, {self.num_classes - 1}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"Dataset {self.name!r}: train images are {self.x_train.shape[1:]}, "
                f"test images {self.x_test.shape[1:]}; expected the same (C, H, W)"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return len(self.stream.train) if self.stream is not None else len(self.x_train)

    @property
    def num_test(self) -> int:
        """Number of test images."""
        return len(self.stream.val) if self.stream is not None else len(self.x_test)

    def train_batches(
        self,
        batch_size: int,
        rng: np.random.Generator,
        *,
        augment: bool = False,
        drop_last: bool = False,
        normalize: bool = True,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One shuffled epoch of training batches, with the data set's augmentation when ``augment``.

        In memory this is :func:`iterate_batches` with ``shuffle=True``; a
        stream draws the same way from ``rng`` (see :mod:`reference.imagefolder`).
        ``normalize=False`` leaves a stream's images uint8, for normalising on
        the GPU; in-memory data sets are float32 already and ignore it.
        """
        if self.stream is not None:
            return self.stream.batches(
                "train",
                batch_size,
                shuffle=True,
                rng=rng,
                augment=augment and self.augment is not None,
                drop_last=drop_last,
                normalize=normalize,
            )
        return iterate_batches(
            self.x_train,
            self.y_train,
            batch_size,
            shuffle=True,
            rng=rng,
            augment=self.augment if augment else None,
            drop_last=drop_last,
        )

    def test_batches(
        self, batch_size: int, *, normalize: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The test split in stored order, in batches of ``batch_size``, never augmented
        (``normalize`` as in :meth:`train_batches`)."""
        if self.stream is not None:
            return self.stream.batches("val", batch_size, normalize=normalize)
        return iterate_batches(self.x_test, self.y_test, batch_size, shuffle=False)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}, augment={self.augment!r})"
        )


def _read_only(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


# ------------------------------------------------------------------ loading
def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    train_size: int = 2048,
    test_size: int = 512,
    workers: int = 0,
) -> Dataset:
    """Load the data set called ``name`` (one of DATASET_NAMES); see the module docstring.

    ``root`` is the directory for "cifar10" and "imagefolder" (required
    there, unused otherwise). ``seed``, ``image_shape``, ``num_classes``,
    ``train_size`` and ``test_size`` shape "synthetic" only; "digits" and
    "cifar10" are fixed data sets whose split does not depend on them.
    "imagefolder" takes its image side from ``image_shape`` (which must be
    (3, S, S)) and decodes with ``workers`` processes (0: in this process).
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"unknown data set {name!r}; expected one of {list(DATASET_NAMES)}")
    if name == "digits":
        data = _load_digits()
    elif name == "digits32":
        data = _load_digits(upsample=4)
    elif name == "synthetic":
        data = _make_synthetic(seed, image_shape, num_classes, train_size, test_size)
    elif name == "imagefolder":
        if root is None:
            raise ConfigError("data set 'imagefolder' needs root=<directory holding train/ and val/>")
        data = _load_imagefolder(Path(root), image_shape, workers)
    else:
        if root is None:
            raise ConfigError("data set 'cifar10' needs root=<directory holding data_batch_1 .. test_batch>")
        data = _load_cifar10(Path(root))
    _read_only(data.x_train, data.y_train, data.x_test, data.y_test)
    return data


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits images scaled to [0, 1] (float64), their labels, and which images are in the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = round(DIGITS_TEST_FRACTION * len(members))
        is_test[rng.permutation(members)[:n_test]] = True
    return images, labels, is_test


def digits_statistics() -> tuple[float, float]:
    """The mean and standard deviation of the training pixels (scaled to [0, 1]) that standardise ``digits``."""
    images, _, is_test = _digits_split()
    x_train = images[~is_test]
    return float(x_train.mean()), float(x_train.std())


def _load_digits(upsample: int = 1) -> Dataset:
    images, labels, is_test = _digits_split()
    x_train, x_test = images[~is_test], images[is_test]
    # the statistics of the 8x8 pixels, which upsampling keeps: every pixel counts upsample**2 times
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).astype(np.float32)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
    x_test = ((x_test - mean) / std).astype(np.float32)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
    if upsample > 1:  # (N, 1, 8, 8) -> (N, 1, 8 k, 8 k), each pixel a k x k block
        x_train, x_test = (x.repeat(upsample, axis=2).repeat(upsample, axis=3) for x in (x_train, x_test))
    name = "digits" if upsample == 1 else f"digits{8 * upsample}"
    return Dataset(name, x_train, labels[~is_test], x_test, labels[is_test], 10, augment="digits")


def dataset_image_shape(name: str, image_size: int) -> tuple[int, int, int]:
    """One image's (C, H, W) in data set ``name``, known without loading it.

    ``image_size`` is the configured side, which only "synthetic" and
    "imagefolder" follow; the others have their own fixed size.
    """
    fixed = {"digits": (1, 8, 8), "digits32": (1, 32, 32), "cifar10": (3, 32, 32)}
    return fixed.get(name, (3, image_size, image_size))


def _load_imagefolder(root: Path, image_shape: tuple[int, int, int], workers: int) -> Dataset:
    from reference.imagefolder import ImageFolder

    shape = tuple(image_shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise ConfigError(f"imagefolder: image_shape must be (3, S, S), got {image_shape!r}")
    size = _check_count(shape[1], "imagefolder: image side", 1)
    folder = ImageFolder(root, size, workers=_check_count(workers, "imagefolder: workers", 0))
    empty = np.empty((0, 3, size, size), dtype=np.float32)
    no_labels = np.empty(0, dtype=np.int64)
    return Dataset(
        "imagefolder",
        empty,
        no_labels,
        empty.copy(),
        no_labels.copy(),
        folder.num_classes,
        augment=_STREAM_AUGMENT,
        stream=folder,
    )


def _check_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _smooth(a: np.ndarray, passes: int) -> np.ndarray:
    """Blur the last two axes with ``passes`` rounds of the periodic [1, 2, 1] / 4 filter."""
    for _ in range(passes):
        for axis in (-2, -1):
            a = 0.25 * np.roll(a, 1, axis=axis) + 0.5 * a + 0.25 * np.roll(a, -1, axis=axis)
    return a


def synthetic_bytes(
    image_shape: tuple[int, int, int], num_classes: int, train_size: int, test_size: int
) -> int:
    """A lower bound on the bytes the synthetic data set allocates: its float32 images and
    int64 labels, plus one float32 template per class."""
    pixels = math.prod(image_shape)
    return (train_size + test_size) * (4 * pixels + 8) + num_classes * 4 * pixels


def _make_synthetic(
    seed: int, image_shape: tuple[int, int, int], num_classes: int, train_size: int, test_size: int
) -> Dataset:
    _check_count(seed, "synthetic: seed", 0)
    shape = tuple(image_shape)
    if len(shape) != 3:
        raise ConfigError(f"synthetic: image_shape must be (C, H, W), got {image_shape!r}")
    c, h, w = (_check_count(s, "synthetic: each entry of image_shape", 1) for s in shape)
    num_classes = _check_count(num_classes, "synthetic: num_classes", 2)
    train_size = _check_count(train_size, "synthetic: train_size", num_classes)
    test_size = _check_count(test_size, "synthetic: test_size", 1)
    require_memory(
        synthetic_bytes((c, h, w), num_classes, train_size, test_size),
        f"the synthetic data set ({train_size:,} train + {test_size:,} test images of {c}x{h}x{w} float32, "
        f"{num_classes:,} class templates)",
    )

    template_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    k = min(_SYNTHETIC_MOTIF, h, w)
    motifs = np.random.default_rng(template_seq).standard_normal((num_classes, c, k, k))
    motifs = _smooth(motifs, passes=1)
    # Per-motif standardisation; a motif with no spread (1x1, one channel) is left as drawn.
    motifs -= motifs.mean(axis=(1, 2, 3), keepdims=True) if k * k * c > 1 else 0.0
    spread = motifs.std(axis=(1, 2, 3), keepdims=True)
    motifs = motifs / np.where(spread > 0, spread, 1.0) * SYNTHETIC_SIGNAL
    reps = (1, 1, -(-h // k), -(-w // k))
    templates = np.tile(motifs, reps)[:, :, :h, :w].astype(np.float32)  # (K, C, k, k) -> (K, C, H, W)
    scale = np.float32(1.0 / math.sqrt(1.0 + SYNTHETIC_SIGNAL**2))

    def draw(seq: np.random.SeedSequence, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        x += templates[labels]
        x *= scale
        return x, labels

    x_train, y_train = draw(train_seq, train_size)
    x_test, y_test = draw(test_seq, test_size)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes, augment=None)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays; refuses any other global."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"cifar10: missing file {path}")
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure to decode means the file is not a CIFAR pickle
        raise DataError(f"cifar10: cannot read {path} as a python-pickle batch: {exc}") from exc


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"cifar10: {path} is not a batch dict with keys b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"cifar10: {path} has labels that are not integers: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(
            f"cifar10: {path} b'data' must be uint8 of shape (N, 3072), got {data.dtype} with shape {data.shape}"
        )
    if labels.shape != (len(data),):
        raise DataError(f"cifar10: {path} has {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"cifar10: {path} holds labels in [{labels.min()}, {labels.max()}], expected [0, {num_classes - 1}]"
        )
    return data, labels


def _load_cifar10(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"cifar10: missing directory {root}")
    meta_path = root / "batches.meta"
    meta = _read_pickle(meta_path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"cifar10: {meta_path} must hold b'label_names', a list of 10 names")
    train = [_read_cifar_batch(root / f"data_batch_{i}", 10) for i in range(1, 6)]
    test = _read_cifar_batch(root / "test_batch", 10)
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[:, None, None]

    def to_images(data: np.ndarray) -> np.ndarray:
        x = data.reshape(-1, 3, 32, 32).astype(np.float32)  # (N, 3072) -> (N, 3, 32, 32), channel planes
        x /= np.float32(255.0)
        x -= mean
        x /= std
        return x

    x_train = to_images(np.concatenate([d for d, _ in train]))
    y_train = np.concatenate([labels for _, labels in train])
    x_test, y_test = to_images(test[0]), test[1]
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10, augment="cifar")


# ------------------------------------------------------------------ batches
def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches :func:`iterate_batches` yields for ``n`` samples."""
    n = _check_count(n, "num_batches: n", 0)
    batch_size = _check_count(batch_size, "batch_size", 1)
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    rng: np.random.Generator | None = None,
    augment: str | None = None,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` over one epoch of ``(x, y)``.

    With ``shuffle`` the order is one permutation of all samples; without it,
    the stored order. The last, smaller batch is yielded unless ``drop_last``.
    ``augment`` ("cifar", "digits" or None) transforms each image as the
    module docstring describes.

    Arguments are checked, and all randomness is drawn, when this function is
    called, before the first batch is asked for. All randomness comes from
    ``rng`` (required when shuffling or augmenting), drawn in a fixed order:
    first the permutation (when shuffling), then the augmentation parameters
    of all ``len(x)`` positions. The batches
    of an epoch are therefore a function of the rng's starting state alone,
    and ``start_batch=k`` skips the first ``k`` batches cheaply (to resume in
    the middle of an epoch) while yielding exactly what a full pass would have
    yielded from batch ``k`` on.

    Without shuffle or augmentation the batches are slices (views) of ``x``
    and ``y``; otherwise they are fresh arrays. Dtypes are preserved.
    """
    batch_size = _check_count(batch_size, "batch_size", 1)
    start_batch = _check_count(start_batch, "start_batch", 0)
    if len(x) != len(y):
        raise DataError(f"iterate_batches: x has {len(x)} samples but y has {len(y)}")
    if augment is not None and augment not in AUGMENT_NAMES:
        raise ConfigError(f"unknown augmentation {augment!r}; expected None or one of {list(AUGMENT_NAMES)}")
    if augment is not None and x.ndim != 4:
        raise ShapeError(f"iterate_batches: augmentation needs images (N, C, H, W), got shape {x.shape}")
    if (shuffle or augment is not None) and rng is None:
        raise ConfigError(
            f"iterate_batches: shuffle={shuffle!r}, augment={augment!r} need rng=np.random.Generator, got None"
        )
    n = len(x)
    order = rng.permutation(n) if shuffle else None
    params = _draw_augment(augment, n, rng) if augment is not None else None
    return _batches(
        x, y, batch_size, order, augment, params, range(start_batch, num_batches(n, batch_size, drop_last))
    )


def _batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    order: np.ndarray | None,
    augment: str | None,
    params: dict[str, np.ndarray] | None,
    batch_indices: range,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The generator behind :func:`iterate_batches`, once checks and random draws are done."""
    n = len(x)
    for b in batch_indices:
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        idx = order[lo:hi] if order is not None else slice(lo, hi)
        xb, yb = x[idx], y[idx]
        if params is not None:
            xb = _apply_augment(augment, xb, {k: v[lo:hi] for k, v in params.items()})
        yield xb, yb


def _draw_augment(augment: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-position augmentation parameters for one epoch, drawn in a fixed order."""
    if augment == "cifar":
        dy = rng.integers(0, 2 * _CIFAR_PAD + 1, size=n)
        dx = rng.integers(0, 2 * _CIFAR_PAD + 1, size=n)
        flip = rng.random(n) < 0.5
        return {"dy": dy, "dx": dx, "flip": flip}
    dy = rng.integers(-_DIGITS_SHIFT, _DIGITS_SHIFT + 1, size=n)
    dx = rng.integers(-_DIGITS_SHIFT, _DIGITS_SHIFT + 1, size=n)
    return {"dy": dy, "dx": dx}


def _apply_augment(augment: str, xb: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Transform a batch with one gather: out[n, c, i, j] = src[n, c, rows[n, i], cols[n, j]]."""
    nb, _, h, w = xb.shape
    i, j = np.arange(h), np.arange(w)
    if augment == "cifar":
        pad = _CIFAR_PAD
        src = np.pad(xb, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # (N, C, H, W) -> (N, C, H+8, W+8)
        rows = p["dy"][:, None] + i  # (N, H): crop window rows in the padded image
        cols = p["dx"][:, None] + j  # (N, W)
        cols = np.where(p["flip"][:, None], cols[:, ::-1], cols)  # a flip reads the window right to left
    else:
        src = xb
        rows = np.clip(i - p["dy"][:, None], 0, h - 1)  # (N, H): shift down by dy, edge pixels repeat
        cols = np.clip(j - p["dx"][:, None], 0, w - 1)  # (N, W)
    n_idx = np.arange(nb)[:, None, None, None]  # (N, 1, 1, 1)
    c_idx = np.arange(xb.shape[1])[None, :, None, None]  # (1, C, 1, 1)
    return src[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)
