"""Suite-wide settings: hypothesis profiles, skipping ``gpu`` tests where no GPU can be used, and the
fixtures that run a GPU test on the device or through the CPU execution mode (``tests/emulation``).

Profiles (choose with ``HYPOTHESIS_PROFILE``):

- ``ci`` (default): few examples, derandomized, so the suite is fast and
  repeatable on a 2-core machine.
- ``dev``: more examples, random seeds: run it when changing a kernel.
- ``thorough``: many examples, for a long fuzzing session.
- ``smoke``: a handful of examples, for checking that a test still runs at all
  (``benchmarks/gpu_check.py --emulate`` uses it).

With ``LEARNSPARSE_EMULATE_GPU=1`` every ``gpu`` test runs through the CPU
execution mode instead of being skipped: the ``device`` tests of a machine
without a GPU then run exactly as they would on one, on the emulated device
(``benchmarks/gpu_check.py --emulate`` checks itself that way).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.register_profile("smoke", max_examples=3, derandomize=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


EMULATE_VARIABLE = "LEARNSPARSE_EMULATE_GPU"


def _emulating() -> bool:
    return os.environ.get(EMULATE_VARIABLE) == "1"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests, with the reason in words, where CuPy or a CUDA GPU is missing."""
    from gpu.runtime import unavailable_reason

    if _emulating():
        return

    # the marker, not item.keywords: a parameter id "gpu" (a module of that name) is no GPU test
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    why = unavailable_reason() if marked else None
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_tests_emulated(request):
    """Under ``LEARNSPARSE_EMULATE_GPU=1``, run each ``gpu`` test inside the emulated device."""
    if not (_emulating() and request.node.get_closest_marker("gpu") is not None):
        yield
        return
    from tests import emulation

    with emulation.device():
        emulation.precompile()
        yield


@pytest.fixture(params=[pytest.param("device", marks=pytest.mark.gpu), "emulated"])
def gpu_backend(request):
    """Where a GPU test runs: ``"device"`` (a CUDA GPU, marker ``gpu``) or ``"emulated"`` (always).

    ``"emulated"`` runs the test inside :func:`tests.emulation.device`: CuPy and the twin's kernels
    emulated on the CPU, everything restored afterwards.
    """
    if request.param == "device":
        yield "device"
        return
    from tests import emulation

    with emulation.device():
        emulation.precompile()  # the raw kernels, in parallel, once per process
        yield "emulated"


@pytest.fixture
def emulated_cupy():
    """The stand-in ``cupy`` module, installed for the test (see :mod:`tests.emulation`)."""
    from tests import emulation

    with emulation.device() as cupy:
        yield cupy


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory, so that stray files would show up."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
