"""The allocator setting leaves NumPy working and reports what it did."""

import sys

import numpy as np

from reference.runtime import keep_freed_memory


def test_keep_freed_memory_is_harmless_and_reports():
    accepted = keep_freed_memory()
    assert isinstance(accepted, bool)
    if sys.platform.startswith("linux"):
        assert accepted  # glibc understands mallopt
    big = np.ones((64, 1024, 1024), dtype=np.float32)  # 256 MiB: served from the heap now
    assert float(big.sum()) == 64 * 1024 * 1024
