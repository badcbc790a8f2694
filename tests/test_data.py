"""Data sets (digits, synthetic, a fake CIFAR-10 directory), the batch iterator and augmentations."""

import pickle

import numpy as np
import pytest

from reference.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASET_NAMES,
    Dataset,
    dataset_image_shape,
    iterate_batches,
    load_dataset,
    num_batches,
)
from reference.errors import ConfigError, DataError, ShapeError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def nearest_class_mean_accuracy(x_train, y_train, x_test, y_test, num_classes):
    means = np.stack([x_train[y_train == k].mean(axis=0) for k in range(num_classes)]).reshape(
        num_classes, -1
    )
    flat = x_test.reshape(len(x_test), -1)
    dist = (flat**2).sum(1)[:, None] - 2 * flat @ means.T + (means**2).sum(1)[None]
    return float((dist.argmin(axis=1) == y_test).mean())


# ------------------------------------------------------------------ digits
def test_digits_shapes_dtypes_and_normalisation(digits):
    assert DATASET_NAMES == ("digits", "digits32", "synthetic", "cifar10", "imagefolder")
    assert digits.name == "digits" and digits.num_classes == 10 and digits.augment == "digits"
    assert digits.x_train.shape[1:] == digits.x_test.shape[1:] == (1, 8, 8) == digits.image_shape
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.dtype == digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == digits.y_test.dtype == np.int64
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-4
    assert not digits.x_train.flags.writeable and not digits.y_test.flags.writeable
    assert "train=" in repr(digits) and "(1, 8, 8)" in repr(digits)


def test_digits_split_is_fixed_stratified_and_a_partition(digits):
    from sklearn.datasets import load_digits

    again = load_dataset("digits", seed=123)  # the run seed does not move the split
    np.testing.assert_array_equal(digits.x_test, again.x_test)
    np.testing.assert_array_equal(digits.y_train, again.y_train)

    labels = load_digits().target
    for k in range(10):
        n_k = int((labels == k).sum())
        assert int((digits.y_test == k).sum()) == round(0.2 * n_k)

    # Undo the standardisation: train and test together are exactly the original images, each once.
    raw = load_digits().images.reshape(len(labels), 64)
    x_train = digits.x_train.reshape(len(digits.x_train), 64).astype(np.float64)
    x_test = digits.x_test.reshape(len(digits.x_test), 64).astype(np.float64)
    lo, hi = x_train.min(), x_train.max()  # pixel values 0 and 16 both occur in the training split
    rebuilt = np.rint((np.concatenate([x_train, x_test]) - lo) / (hi - lo) * 16)
    rebuilt_rows = np.column_stack([rebuilt, np.concatenate([digits.y_train, digits.y_test])])
    original_rows = np.column_stack([raw, labels])
    np.testing.assert_array_equal(np.unique(rebuilt_rows, axis=0), np.unique(original_rows, axis=0))
    train_rows = {r.tobytes() for r in np.rint((x_train - lo) / (hi - lo) * 16)}
    test_rows = {r.tobytes() for r in np.rint((x_test - lo) / (hi - lo) * 16)}
    duplicated = {r.tobytes() for r, c in zip(*np.unique(raw, axis=0, return_counts=True)) if c > 1}
    assert not (train_rows & test_rows) - duplicated


def test_digits32_is_the_digits_upsampled_4x(digits):
    big = load_dataset("digits32")
    assert big.name == "digits32" and big.image_shape == (1, 32, 32) and big.augment == "digits"
    for small, large in ((digits.x_train, big.x_train), (digits.x_test, big.x_test)):
        assert large.dtype == np.float32 and not large.flags.writeable
        # each 8x8 pixel is a 4x4 block: the block's top-left corners are the digits, and all 16 agree
        np.testing.assert_array_equal(large[:, :, ::4, ::4], small)
        blocks = large.reshape(len(large), 1, 8, 4, 8, 4)
        assert (blocks == blocks[:, :, :, :1, :, :1]).all()
    np.testing.assert_array_equal(big.y_train, digits.y_train)
    np.testing.assert_array_equal(big.y_test, digits.y_test)
    for name in ("digits", "digits32", "cifar10", "synthetic"):
        data_shape = load_dataset(name, root=None).image_shape if name != "cifar10" else (3, 32, 32)
        assert dataset_image_shape(name, 32) == data_shape
    # SCP keeps its own copy of the sizes (a method may not import the data layer): the same
    from reference.config import TrainConfig
    from reference.sparsity.channel_pruning import _image_size

    for name in ("digits", "digits32", "synthetic"):
        assert _image_size(TrainConfig(dataset=name)) == dataset_image_shape(name, 32)[1:]


def test_digits_are_learnable(digits):
    acc = nearest_class_mean_accuracy(digits.x_train, digits.y_train, digits.x_test, digits.y_test, 10)
    assert acc > 0.8


# ------------------------------------------------------------------ synthetic
def test_synthetic_shapes_and_determinism():
    a = load_dataset(
        "synthetic", seed=3, image_shape=(2, 12, 10), num_classes=5, train_size=100, test_size=20
    )
    b = load_dataset(
        "synthetic", seed=3, image_shape=(2, 12, 10), num_classes=5, train_size=100, test_size=20
    )
    c = load_dataset(
        "synthetic", seed=4, image_shape=(2, 12, 10), num_classes=5, train_size=100, test_size=20
    )
    assert a.x_train.shape == (100, 2, 12, 10) and a.x_test.shape == (20, 2, 12, 10)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.num_classes == 5 and a.augment is None
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert np.bincount(a.y_train).tolist() == [20] * 5
    assert abs(float(a.x_train.std()) - 1.0) < 0.05


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 8, 8)])
def test_synthetic_is_learnable(shape):
    data = load_dataset("synthetic", seed=0, image_shape=shape, num_classes=10, train_size=600, test_size=200)
    acc = nearest_class_mean_accuracy(data.x_train, data.y_train, data.x_test, data.y_test, 10)
    assert acc > 0.8  # chance is 0.1


def test_synthetic_signal_survives_translation():
    # The power spectrum forgets where things are; the classes must still be told apart from it.
    data = load_dataset(
        "synthetic", seed=1, image_shape=(3, 16, 16), num_classes=10, train_size=600, test_size=200
    )

    def power(x):
        return np.abs(np.fft.fft2(x)) ** 2

    acc = nearest_class_mean_accuracy(power(data.x_train), data.y_train, power(data.x_test), data.y_test, 10)
    assert acc > 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_shape": (3, 32)}, r"\(C, H, W\)"),
        ({"image_shape": (3, 0, 32)}, "got 0"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"num_classes": 10, "train_size": 5}, "train_size must be an integer >= 10, got 5"),
        ({"test_size": 0}, "test_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset("synthetic", **kwargs)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown data set 'mnist'"):
        load_dataset("mnist")


def test_dataset_checks_its_arrays():
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(DataError, match="float32"):
        Dataset("d", x.astype(np.float64), y, x, y, 2)
    with pytest.raises(DataError, match="int64"):
        Dataset("d", x, y.astype(np.int32), x, y, 2)
    with pytest.raises(DataError, match=r"labels in \[0, 7\]"):
        Dataset("d", x, np.array([0, 1, 7, 0]), x, y, 2)
    with pytest.raises(DataError, match="augment"):
        Dataset("d", x, y, x, y, 2, augment="imagenet")


# ------------------------------------------------------------------ cifar10
def write_batch(path, data, labels, protocol=2):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels}, f, protocol=protocol)


@pytest.fixture(params=[2, pickle.HIGHEST_PROTOCOL], ids=["protocol2", "newest"])
def fake_cifar(tmp_path, request):
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=3)]
        write_batch(tmp_path / f"data_batch_{i}", data, labels, request.param)
        batches.append((data, labels))
    test = (rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), [0, 9, 3, 3])
    write_batch(tmp_path / "test_batch", *test, request.param)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072}, f)
    return tmp_path, batches, test


def test_cifar10_reads_the_pickle_directory(fake_cifar):
    root, batches, test = fake_cifar
    data = load_dataset("cifar10", root=root)
    assert data.name == "cifar10" and data.augment == "cifar" and data.num_classes == 10
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.y_train.tolist() == [v for _, labels in batches for v in labels]
    assert data.y_test.tolist() == test[1]
    # Row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major over (32, 32).
    raw = batches[1][0][2]  # third image of data_batch_2 -> train index 5
    for c in range(3):
        for i, j in [(0, 0), (5, 17), (31, 31)]:
            expected = (raw[c * 1024 + i * 32 + j] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
            assert data.x_train[5, c, i, j] == pytest.approx(expected, abs=1e-5)


def test_cifar10_missing_pieces_name_the_path(fake_cifar, tmp_path):
    root, _, _ = fake_cifar
    with pytest.raises(ConfigError, match="root="):
        load_dataset("cifar10")
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"missing directory {missing_dir}$"):
        load_dataset("cifar10", root=missing_dir)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"missing file {root / 'data_batch_3'}$"):
        load_dataset("cifar10", root=str(root))


def test_cifar10_malformed_files(fake_cifar):
    root, _, _ = fake_cifar
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=str(root / "test_batch")):
        load_dataset("cifar10", root=root)
    write_batch(root / "test_batch", np.zeros((2, 3000), np.uint8), [0, 1])
    with pytest.raises(DataError, match=r"\(N, 3072\).*\(2, 3000\)"):
        load_dataset("cifar10", root=root)
    write_batch(root / "test_batch", np.zeros((2, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match="2 images but labels of shape"):
        load_dataset("cifar10", root=root)
    write_batch(root / "test_batch", np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(DataError, match=r"labels in \[0, 10\]"):
        load_dataset("cifar10", root=root)
    with open(root / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="b'data'"):
        load_dataset("cifar10", root=root)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar10_refuses_foreign_globals(fake_cifar, capsys):
    root, _, _ = fake_cifar
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": _Payload()}, f)
    with pytest.raises(DataError, match="builtins.print"):
        load_dataset("cifar10", root=root)
    assert "never run" not in capsys.readouterr().out


# ------------------------------------------------------------------ batches
def labelled(n, shape=(1, 4, 4)):
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, *shape)
    return x, np.arange(n, dtype=np.int64)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (5, 8), (1, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch(n, batch_size, drop_last):
    x, y = labelled(n)
    batches = list(
        iterate_batches(x, y, batch_size, shuffle=True, rng=np.random.default_rng(0), drop_last=drop_last)
    )
    assert len(batches) == num_batches(n, batch_size, drop_last)
    sizes = [len(yb) for _, yb in batches]
    assert all(s == batch_size for s in sizes[:-1])
    seen = np.concatenate([yb for _, yb in batches]) if batches else np.zeros(0, np.int64)
    if drop_last:
        assert sizes == [batch_size] * (n // batch_size)
        assert len(set(seen.tolist())) == len(seen) == n - n % batch_size
    else:
        assert sorted(seen.tolist()) == list(range(n))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, x[yb])  # images travel with their labels


def test_num_batches():
    assert num_batches(10, 3, False) == 4
    assert num_batches(10, 3, True) == 3
    assert num_batches(0, 3, False) == 0
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        num_batches(10, 0, False)


def test_no_shuffle_keeps_order_and_is_deterministic_with_shuffle():
    x, y = labelled(10)
    plain = [yb.tolist() for _, yb in iterate_batches(x, y, 4, shuffle=False)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def epoch(seed):
        rng = np.random.default_rng([seed, 3])
        return [
            (xb.copy(), yb.copy())
            for xb, yb in iterate_batches(x, y, 4, shuffle=True, rng=rng, augment="digits")
        ]

    a, b, c = epoch(7), epoch(7), epoch(8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_start_batch_resumes_mid_epoch():
    x, y = labelled(23, (3, 6, 6))
    full = list(iterate_batches(x, y, 5, shuffle=True, rng=np.random.default_rng([1, 2]), augment="cifar"))
    tail = list(
        iterate_batches(
            x, y, 5, shuffle=True, rng=np.random.default_rng([1, 2]), augment="cifar", start_batch=3
        )
    )
    assert len(tail) == len(full) - 3
    for (xf, yf), (xt, yt) in zip(full[3:], tail):
        np.testing.assert_array_equal(xf, xt)
        np.testing.assert_array_equal(yf, yt)


def test_iterate_errors_are_raised_at_the_call():
    x, y = labelled(6)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        iterate_batches(x, y, 0, shuffle=False)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got -2"):
        iterate_batches(x, y, -2, shuffle=False)
    with pytest.raises(ConfigError, match="need rng"):
        iterate_batches(x, y, 2, shuffle=True)
    with pytest.raises(ConfigError, match="need rng"):
        iterate_batches(x, y, 2, shuffle=False, augment="cifar")
    with pytest.raises(ConfigError, match="unknown augmentation 'flip'"):
        iterate_batches(x, y, 2, shuffle=False, augment="flip", rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="x has 6 samples but y has 5"):
        iterate_batches(x, y[:5], 2, shuffle=False)
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\)"):
        iterate_batches(x.reshape(6, 16), y, 2, shuffle=False, augment="digits", rng=np.random.default_rng(0))


def test_randomness_is_drawn_at_the_call():
    x, y = labelled(8)
    rng = np.random.default_rng(0)
    batches = iterate_batches(x, y, 4, shuffle=True, rng=rng, augment="digits")
    after_call = rng.bit_generator.state
    list(batches)
    assert rng.bit_generator.state == after_call


# ------------------------------------------------------------------ augmentation
def cifar_candidates(img, pad=4):
    """Every crop of the zero-padded image, and its mirror image, keyed by (dy, dx, flip)."""
    _, h, w = img.shape
    padded = np.zeros((img.shape[0], h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, :, ::-1]
    return out


def digits_candidates(img):
    """Every translation by -1, 0, 1 per axis, pixels from outside copied from the nearest edge."""
    _, h, w = img.shape
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return {
        (dy, dx): padded[:, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    }


def matches(img, candidates):
    return [key for key, cand in candidates.items() if np.array_equal(img, cand)]


def test_cifar_augmentation_crops_and_flips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 10, 12)).astype(np.float32) + 5.0  # no zeros, so padding is visible
    x_before = x.copy()
    y = np.arange(64, dtype=np.int64)
    ((xb, yb),) = iterate_batches(x, y, 64, shuffle=True, rng=np.random.default_rng(5), augment="cifar")
    assert xb.shape == x.shape and xb.dtype == np.float32 and yb.dtype == np.int64
    found = []
    for img, label in zip(xb, yb):
        keys = matches(img, cifar_candidates(x[label]))
        assert len(keys) == 1, "each output is exactly one crop of the padded image, maybe mirrored"
        found.append(keys[0])
    flips = sum(k[2] for k in found)
    assert 16 < flips < 48
    assert len({k[:2] for k in found}) > 20
    assert any(np.any(img == 0) for img in xb)  # zero padding shows up in some crops
    np.testing.assert_array_equal(x, x_before)


def test_digits_augmentation_translates_without_flipping():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((90, 1, 8, 8)).astype(np.float64)
    y = np.arange(90, dtype=np.int64)
    ((xb, yb),) = iterate_batches(x, y, 128, shuffle=False, rng=np.random.default_rng(3), augment="digits")
    assert xb.shape == x.shape and xb.dtype == np.float64
    shifts = []
    for img, label in zip(xb, yb):
        keys = matches(img, digits_candidates(x[label]))
        assert len(keys) == 1
        assert not np.array_equal(img, x[label][:, :, ::-1])
        shifts.append(keys[0])
    assert set(shifts) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_augmentation_leaves_the_data_set_alone(digits):
    before = digits.x_train[:32].copy()
    for _ in iterate_batches(
        digits.x_train, digits.y_train, 32, shuffle=True, rng=np.random.default_rng(0), augment="digits"
    ):
        pass
    np.testing.assert_array_equal(digits.x_train[:32], before)
