"""Small helpers shared by the test modules."""

from __future__ import annotations

import numpy as np

from reference.models import build_model


def quiet(_message: str) -> None:
    """A training log that prints nothing."""


def digits_model(seed: int = 0, width: float = 0.5):
    """A small digits CNN, initialised from ``seed``."""
    return build_model("digits_cnn", width=width, rng=np.random.default_rng(seed))


def digits_batch(n: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 1x8x8 images and labels."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)
