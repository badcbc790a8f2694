"""The imagefolder data set: scanning, transforms, the batch loader and training on it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from reference.config import TrainConfig  # noqa: E402
from reference.data import DATASET_NAMES, load_dataset  # noqa: E402
from reference.errors import ConfigError, DataError  # noqa: E402
from reference.imagefolder import (  # noqa: E402
    CROP_RATIO,
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    count_classes,
    eval_transform,
    normalize,
    random_resized_crop_box,
    train_transform,
)

CLASSES = ("cat", "dog", "eel")
SIZE = 32


def _save(path: Path, rng: np.random.Generator, mode: str = "RGB") -> None:
    w, h = int(rng.integers(40, 81)), int(rng.integers(30, 101))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _make_tree(root: Path, train: int = 6, val: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in CLASSES:
            for i in range(count):
                ext = ("jpg", "png", "JPEG")[i % 3]
                mode = "L" if i == 1 else "RGB"  # a greyscale image too
                _save(root / split / c / f"img{i}.{ext}", rng, mode)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def folder(tree) -> ImageFolder:
    return ImageFolder(tree, SIZE)


# ------------------------------------------------------------------ scanning and batches
def test_scan_finds_classes_files_and_labels(folder, tree):
    assert folder.classes == CLASSES and folder.num_classes == 3 and count_classes(tree) == 3
    assert len(folder.train) == 18 and len(folder.val) == 6
    assert folder.train.labels.dtype == np.int64
    assert list(folder.train.labels) == [0] * 6 + [1] * 6 + [2] * 6
    assert all(Path(f).parent.name == CLASSES[k] for f, k in zip(folder.train.files, folder.train.labels))
    assert not any(f.endswith(".txt") for f in folder.train.files)
    assert "classes=3" in repr(folder)


def test_batches_shapes_dtypes_and_normalisation(folder):
    batches = list(folder.batches("val", 4))
    assert [len(y) for _, y in batches] == [4, 2]
    x, y = batches[0]
    assert x.dtype == np.float32 and x.shape == (4, 3, SIZE, SIZE) and y.dtype == np.int64
    raw = list(folder.batches("val", 4, normalize=False))
    assert raw[0][0].dtype == np.uint8 and raw[0][0].shape == (4, 3, SIZE, SIZE)
    for (xf, yf), (xu, yu) in zip(batches, raw):
        np.testing.assert_array_equal(yf, yu)
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)[:, None, None]
        std = np.asarray(IMAGENET_STD, dtype=np.float64)[:, None, None]
        np.testing.assert_allclose(xf, (xu / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(normalize(xu), xf)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), folder.val.labels)
    assert len(list(folder.batches("val", 4, drop_last=True))) == 1


def test_batch_arguments_are_checked(folder):
    with pytest.raises(ConfigError, match="rng"):
        folder.batches("train", 4, shuffle=True)
    with pytest.raises(ConfigError, match="split"):
        folder.batches("test", 4)
    with pytest.raises(ConfigError, match="batch_size"):
        folder.batches("val", 0)
    with pytest.raises(ConfigError, match="workers"):
        ImageFolder(folder.root, SIZE, workers=-1)


# ------------------------------------------------------------------ transforms
def test_eval_transform_takes_the_centre():
    # 200 x 100: a red then a blue block in the middle 120 columns, black around them.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, 40:100, 0] = 255
    pixels[:, 100:160, 2] = 255
    out = eval_transform(Image.fromarray(pixels), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # resized to 36 x 18 (short side round(16 * 256 / 224) = 18), crop columns 10..26:
    # original columns 55..145, inside the coloured blocks, red on the left, blue on the right.
    assert (out[..., 0].astype(int) + out[..., 2] >= 250).all()
    assert (out[:, :7, 0] > 200).all() and (out[:, :7, 2] < 50).all()
    assert (out[:, 9:, 2] > 200).all() and (out[:, 9:, 0] < 50).all()
    tall = eval_transform(Image.fromarray(pixels.transpose(1, 0, 2).copy()), 16)
    np.testing.assert_array_equal(tall, out.transpose(1, 0, 2))


@given(st.integers(1, 120), st.integers(1, 120), st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_eval_transform_size_for_any_image(w, h, size):
    out = eval_transform(Image.new("RGB", (w, h), (10, 20, 30)), size)
    assert out.shape == (size, size, 3)


@given(st.integers(1, 400), st.integers(1, 400), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_random_resized_crop_box_in_bounds(width, height, seed):
    left, top, w, h = random_resized_crop_box(width, height, np.random.default_rng(seed))
    assert 0 <= left and 0 <= top and 1 <= w and 1 <= h
    assert left + w <= width and top + h <= height
    area = width * height
    # a drawn box: the unrounded sides lie within 1/2 of w and h
    drawn = (
        (w + 0.5) / (h - 0.5 if h > 0.5 else 1e-9) >= CROP_RATIO[0] - 1e-9
        and (w - 0.5) / (h + 0.5) <= CROP_RATIO[1] + 1e-9
        and (w + 0.5) * (h + 0.5) >= CROP_SCALE[0] * area - 1e-9
        and (w - 0.5) * (h - 0.5) <= CROP_SCALE[1] * area + 1e-9
    )
    # the fallback: centred, one full side
    fallback = (w == width or h == height) and left == (width - w) // 2 and top == (height - h) // 2
    assert drawn or fallback


def test_random_resized_crop_box_varies_and_rarely_falls_back():
    rng = np.random.default_rng(0)
    boxes = [random_resized_crop_box(300, 200, rng) for _ in range(300)]
    fractions = np.array([w * h / 60000 for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert fractions.min() < 0.2 and fractions.max() > 0.8
    assert ratios.min() < 0.85 and ratios.max() > 1.2
    assert len(set(boxes)) > 250


def test_train_transform_flips_are_exact_mirrors_half_the_time():
    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    flips = 0
    for seed in range(200):
        out = train_transform(image, 24, np.random.default_rng(seed))
        left, top, w, h = random_resized_crop_box(70, 50, np.random.default_rng(seed))
        plain = np.asarray(
            image.resize((24, 24), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        )
        if np.array_equal(out, plain):
            continue
        np.testing.assert_array_equal(out, plain[:, ::-1])
        flips += 1
    assert 70 <= flips <= 130  # p = 1/2: 100 +- 4 standard deviations


# ------------------------------------------------------------------ determinism and workers
def test_same_rng_same_batches_for_any_worker_count(folder):
    def epoch(workers, seed=3, **kw):
        rng = np.random.default_rng(seed)
        return list(folder.batches("train", 5, shuffle=True, rng=rng, augment=True, workers=workers, **kw))

    serial, pooled = epoch(0), epoch(2, prefetch=1)
    assert len(serial) == len(pooled) == 4
    for (xa, ya), (xb, yb) in zip(serial, pooled):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = epoch(0, seed=4)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(serial, other))
    # resuming in the middle of the epoch yields the rest of the same epoch
    rest = list(
        folder.batches("train", 5, shuffle=True, rng=np.random.default_rng(3), augment=True, start_batch=2)
    )
    for (xa, ya), (xb, yb) in zip(serial[2:], rest):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_closing_a_pooled_iteration_early(folder):
    batches = folder.batches("train", 2, shuffle=True, rng=np.random.default_rng(0), workers=2)
    first = next(batches)
    assert first[0].shape == (2, 3, SIZE, SIZE)
    batches.close()


_CLOSE_EARLY = """
import sys
import numpy as np
from reference.imagefolder import ImageFolder
folder = ImageFolder(sys.argv[1], 32)
for i in range(int(sys.argv[2])):
    batches = folder.batches("train", 2, shuffle=True, rng=np.random.default_rng(i), workers=2)
    next(batches)
    batches.close()
print("closed", sys.argv[2])
"""


def test_closing_early_never_hangs(tree):
    # multiprocessing.Pool.terminate() with batches still queued deadlocked
    # about once in a few hundred early closes; 400 in a row, with a deadline
    n = 400
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", _CLOSE_EARLY, str(tree), str(n)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"closed {n}"


# ------------------------------------------------------------------ errors
def _one_line_naming(exc_info, path) -> None:
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message


@pytest.mark.parametrize(
    "damage, culprit",
    [
        (lambda r: r / "nowhere", lambda r: r / "nowhere"),
        (lambda r: _rm(r / "train"), lambda r: r / "train"),
        (lambda r: _rm(r / "val"), lambda r: r / "val"),
        (lambda r: _empty_dir(r / "train"), lambda r: r / "train"),
        (lambda r: _empty_dir(r / "train" / "dog"), lambda r: r / "train" / "dog"),
        (lambda r: _save(r / "val" / "fox" / "a.jpg", np.random.default_rng(0)), lambda r: r / "val" / "fox"),
    ],
    ids=["missing-root", "missing-train", "missing-val", "no-classes", "empty-class", "unknown-val-class"],
)
def test_bad_trees(tmp_path, damage, culprit):
    root = _make_tree(tmp_path / "tree", train=2, val=1)
    target = damage(root)
    with pytest.raises(DataError) as exc_info:
        ImageFolder(target if isinstance(target, Path) else root, SIZE)
    _one_line_naming(exc_info, culprit(root))


def _rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _empty_dir(path: Path) -> None:
    _rm(path)
    path.mkdir()


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_names_the_file(tmp_path, workers):
    root = _make_tree(tmp_path / "tree", train=2, val=1)
    bad = root / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    folder = ImageFolder(root, SIZE)  # scanning reads no image
    with pytest.raises(DataError) as exc_info:
        list(folder.batches("val", 2, workers=workers))
    _one_line_naming(exc_info, bad)


# ------------------------------------------------------------------ the Dataset and training
def test_load_dataset_streams_imagefolder(tree):
    assert "imagefolder" in DATASET_NAMES
    data = load_dataset("imagefolder", root=tree, image_shape=(3, SIZE, SIZE))
    assert data.stream is not None and data.augment == "imagenet"
    assert data.image_shape == (3, SIZE, SIZE) and data.num_classes == 3
    assert data.num_train == 18 and data.num_test == 6 and len(data.x_train) == 0
    assert "train=18" in repr(data)
    x, y = next(data.train_batches(4, np.random.default_rng(0), augment=True))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == np.float32
    assert sum(len(y) for _, y in data.test_batches(4)) == 6
    with pytest.raises(ConfigError, match="root"):
        load_dataset("imagefolder", image_shape=(3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="image_shape"):
        load_dataset("imagefolder", root=tree, image_shape=(1, SIZE, SIZE))


def test_in_memory_datasets_iterate_through_the_same_methods():
    data = load_dataset("synthetic", image_shape=(3, 4, 4), train_size=10, test_size=6)
    assert data.stream is None and data.num_train == 10 and data.num_test == 6
    assert sum(len(y) for _, y in data.test_batches(4)) == 6
    assert sum(len(y) for _, y in data.train_batches(4, np.random.default_rng(0))) == 10


def test_config_workers_and_data_root(tree):
    assert TrainConfig().workers == 0
    with pytest.raises(ConfigError, match="workers"):
        TrainConfig(workers=-1)
    with pytest.raises(ConfigError, match="data_root"):
        TrainConfig(dataset="imagefolder")
    from reference.finalize import data_shape

    config = TrainConfig(dataset="imagefolder", data_root=str(tree), image_size=48, model="resnet20")
    assert data_shape(config) == ((3, 48, 48), 3)
    assert data_shape(config.replace(num_classes=5)) == ((3, 48, 48), 5)


def test_train_one_epoch_on_a_tree_same_for_any_worker_count(tree, tmp_path):
    from reference.train import train

    results = []
    for workers in (0, 2):
        config = TrainConfig(
            model="resnet20",
            width=0.25,
            dataset="imagefolder",
            data_root=str(tree),
            image_size=SIZE,
            epochs=1,
            batch_size=6,
            eval_batch_size=4,
            lr=0.05,
            augment=True,
            workers=workers,
            progress=False,
            run_dir=str(tmp_path / f"run{workers}"),
        )
        result = train(config, log=lambda _: None)
        assert result.checkpoint.exists()
        assert math.isfinite(result.metrics["train_loss"]) and 0.0 <= result.metrics["test_acc"] <= 1.0
        results.append(result)
    a, b = results
    assert a.metrics["train_loss"] == b.metrics["train_loss"]
    assert a.metrics["test_loss"] == b.metrics["test_loss"]
    # the command line evaluates the checkpoint on the streamed test split
    from reference.cli import main

    assert main(["eval", str(a.checkpoint)]) == 0
