"""Argument types the benchmark scripts share: each rejects a bad value with one line (argparse, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def name_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """``"a,b"`` -> ``["a", "b"]``, every name one of ``allowed`` and at least one."""

    def parse(text: str) -> list[str]:
        chosen = [t.strip() for t in text.split(",") if t.strip()]
        if not chosen or any(t not in allowed for t in chosen):
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)}, got {text!r}")
        return chosen

    return parse
