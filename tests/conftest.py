"""Suite-wide settings: hypothesis profiles, and skipping ``gpu`` tests where no GPU can be used.

Profiles (choose with ``HYPOTHESIS_PROFILE``):

- ``ci`` (default): few examples, derandomized, so the suite is fast and
  repeatable on a 2-core machine.
- ``dev``: more examples, random seeds: run it when changing a kernel.
- ``thorough``: many examples, for a long fuzzing session.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests, with the reason in words, where CuPy or a CUDA GPU is missing."""
    import pytest

    from gpu.runtime import unavailable_reason

    why = unavailable_reason() if any("gpu" in item.keywords for item in items) else None
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
