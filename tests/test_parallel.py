"""Kernels run on parts of the batch (reference.ops.parallel): the cut, the threads, and the same answers.

The op table (tests/test_ops.py) draws small batches, which are one part; here
the same cases run with every batch cut into parts of one sample and two
threads, against the same oracles, and the split kernels are compared with the
whole-batch ones at the sizes where the cut happens by itself.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.errors import ConfigError
from reference.ops import parallel
from reference.ops.conv import conv2d_backward, conv2d_forward
from reference.ops.elementwise import relu_backward, relu_forward
from reference.ops.norm import batch_norm_backward, batch_norm_forward
from tests.harness import check_backward, check_finite_difference, check_forward
from tests.opcases import CASES

SPLIT_OPS = ("conv2d", "batch_norm", "relu", "add")
SPLIT_CASES = [c for c in CASES if c.name in SPLIT_OPS]


@pytest.fixture
def every_sample_a_part(monkeypatch):
    """Parts of one sample (up to eight), two threads: the drawn batches of 2-5 samples are split."""
    monkeypatch.setattr(parallel, "MIN_ROWS", 1)
    monkeypatch.setattr(parallel, "MAX_PARTS", 8)
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 0)  # the drawn arrays are small: on threads all the same
    monkeypatch.setattr(parallel, "MIN_MACS", 0)
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")


# ------------------------------------------------------------------ the cut
@given(n=st.integers(0, 5000))
def test_parts_cover_the_batch_in_order_and_in_near_equal_sizes(n):
    parts = parallel.batch_parts(n)
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert len(parts) == max(1, min(parallel.MAX_PARTS, n // parallel.MIN_ROWS))
    assert parallel.batch_parts(n, elements=parallel.MIN_ELEMENTS - 1) == [slice(0, n)]  # a small op: whole


def test_parts_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("LEARNSPARSE_THREADS", "1")
    one = parallel.batch_parts(128)
    monkeypatch.setenv("LEARNSPARSE_THREADS", "7")
    assert parallel.batch_parts(128) == one
    assert len(one) == 4  # batch 128: four parts of 32


# ------------------------------------------------------------------ threads
def test_thread_count_comes_from_learnsparse_threads_then_omp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LEARNSPARSE_THREADS", "5")
    assert parallel.threads() == 5
    monkeypatch.delenv("LEARNSPARSE_THREADS")
    assert parallel.threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested list: the outer level
    assert parallel.threads() == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = parallel.threads()
    assert cores >= 1
    for ignored in ("", "0", "abc", "-1"):  # passed over as OpenBLAS does: the cores
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert parallel.threads() == cores


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_one_clear_line(monkeypatch, value):
    monkeypatch.setenv("LEARNSPARSE_THREADS", value)
    with pytest.raises(ConfigError, match=rf"LEARNSPARSE_THREADS={value!r}: expected a positive integer"):
        parallel.threads()


def test_the_cli_refuses_a_bad_thread_count_before_writing_anything(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LEARNSPARSE_THREADS": "many"}
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "reference", "train", "--epochs", "1", "--run-dir", str(run)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "learnsparse: error: LEARNSPARSE_THREADS='many': expected a positive integer (threads per process)"
    ]
    assert not run.exists()


def test_results_come_back_in_order_and_every_item_runs_once(monkeypatch):
    monkeypatch.setenv("LEARNSPARSE_THREADS", "3")
    seen = []
    lock = threading.Lock()

    def square(i):
        with lock:
            seen.append(i)
        return i * i

    assert parallel.run_parts(square, list(range(10))) == [i * i for i in range(10)]
    assert sorted(seen) == list(range(10))


def test_parts_run_on_several_threads_at_once(monkeypatch):
    """Two parts that each wait for the other finish only if they run side by side."""
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    barrier = threading.Barrier(2, timeout=10)
    assert parallel.run_parts(lambda i: barrier.wait() >= 0, [0, 1]) == [True, True]


def test_an_error_in_a_part_is_raised_after_every_part_has_stopped(monkeypatch):
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    finished = []

    def part(i):
        if i == 1:
            raise ValueError("part 1 failed")
        threading.Event().wait(0.05)
        finished.append(i)

    with pytest.raises(ValueError, match="part 1 failed"):
        parallel.run_parts(part, [0, 1, 2, 3])
    assert 0 in finished and 2 in finished  # lane 0 finished its parts before the error surfaced


def test_a_region_inside_a_part_runs_in_turn(monkeypatch):
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    names = parallel.run_parts(
        lambda _: parallel.run_parts(lambda __: threading.current_thread().name, [0, 1]), [0, 1]
    )
    for inner in names:
        assert inner[0] == inner[1]  # both inner items ran on the thread of their outer part


def test_blas_threads_are_restored_after_a_region(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    inside = parallel.run_parts(
        lambda _: [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"],
        [0, 1],
    )
    after = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert after == before
    assert all(n == 1 for lane in inside for n in lane)


# --------------------------------------------- the op table with the batch cut
ids = [c.id for c in SPLIT_CASES]
# the fixture's settings hold for every drawn input alike, so one fixture per test is right here
fixture_once = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("case", SPLIT_CASES, ids=ids)
@fixture_once
@given(data=st.data())
def test_split_forward_matches_oracle(case, data, every_sample_a_part):
    check_forward(case, data)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=ids)
@fixture_once
@given(data=st.data())
def test_split_backward_matches_autograd_vjp(case, data, every_sample_a_part):
    check_backward(case, data)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=ids)
@fixture_once
@given(data=st.data())
def test_split_backward_matches_finite_difference(case, data, every_sample_a_part):
    check_finite_difference(case, data)


# ----------------------------------- a real batch: split against whole, any thread count
def _step(x, w, stride, padding, groups, training=True):
    """Conv, batch norm, ReLU forward and backward: every array the three kernels return."""
    rng = np.random.default_rng(7)
    y, conv_cache = conv2d_forward(x, w, None, stride, padding, groups)
    gamma = (1 + 0.1 * rng.standard_normal(y.shape[1])).astype(x.dtype)
    beta = (0.1 * rng.standard_normal(y.shape[1])).astype(x.dtype)
    mean = (0.1 * rng.standard_normal(y.shape[1])).astype(x.dtype)
    var = (1 + 0.1 * rng.random(y.shape[1])).astype(x.dtype)
    z, norm_cache = batch_norm_forward(y, gamma, beta, mean, var, training)
    r, relu_cache = relu_forward(z)
    dr = rng.standard_normal(r.shape).astype(x.dtype)
    (dz,) = relu_backward(dr, relu_cache)
    dy, dgamma, dbeta, _, _ = batch_norm_backward(dz, norm_cache)
    dx, dw, _ = conv2d_backward(dy, conv_cache)
    return {"y": y, "z": z, "r": r, "dz": dz, "dy": dy, "dgamma": dgamma, "dbeta": dbeta, "dx": dx, "dw": dw}


# (in channels, out channels, side, kernel, stride, padding, groups): one geometry per conv path
GEOMETRIES = {
    "shift": (4, 6, 8, 3, 1, 1, 1),
    "general": (4, 6, 9, 3, 2, 1, 1),
    "pointwise": (4, 6, 5, 1, 1, 0, 1),
    "depthwise": (4, 4, 9, 3, 1, 1, 4),
    "depthwise-cl": (16, 32, 3, 3, 1, 1, 16),
}


@pytest.mark.parametrize("path", sorted(GEOMETRIES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_split_kernels_equal_whole_batch_ones_and_the_thread_count_changes_no_bit(
    path, training, monkeypatch
):
    c, o, side, k, stride, padding, groups = GEOMETRIES[path]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, c, side, side)).astype(np.float32)
    w = (0.3 * rng.standard_normal((o, c // groups, k, k))).astype(np.float32)
    _, cache = conv2d_forward(x, w, None, stride, padding, groups)
    assert cache.path == path
    assert len(parallel.batch_parts(64)) == 4
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 0)  # these small arrays too run on threads
    monkeypatch.setattr(parallel, "MIN_MACS", 0)

    monkeypatch.setenv("LEARNSPARSE_THREADS", "1")
    one_thread = _step(x, w, stride, padding, groups, training)
    monkeypatch.setenv("LEARNSPARSE_THREADS", "3")
    three_threads = _step(x, w, stride, padding, groups, training)
    monkeypatch.setattr(parallel, "MAX_PARTS", 1)
    whole = _step(x, w, stride, padding, groups, training)

    for name, value in one_thread.items():
        np.testing.assert_array_equal(three_threads[name], value, err_msg=name)
        assert value.dtype == np.float32, name
        scale = np.abs(whole[name]).max()
        np.testing.assert_allclose(value, whole[name], rtol=2e-5, atol=2e-5 * scale, err_msg=name)


def test_a_forked_child_runs_parts_on_threads_of_its_own(monkeypatch):
    """The parent's pool threads do not exist in a forked child (which would wait for them forever)."""
    import os

    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    assert parallel.run_parts(lambda i: i, [0, 1, 2]) == [0, 1, 2]  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a region finishes
        done = threading.Event()
        threading.Thread(
            target=lambda: (parallel.run_parts(lambda i: i, [0, 1, 2]), done.set()), daemon=True
        ).start()
        os._exit(0 if done.wait(20) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_callers_errstate_holds_in_every_part(monkeypatch):
    """NumPy's errstate is per context: a part on another thread must see the caller's."""
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    big = np.full(4, 3e38, dtype=np.float32)
    with np.errstate(over="raise"):
        with pytest.raises(FloatingPointError):
            # the second part (on the other thread) overflows
            parallel.run_parts(lambda i: big * np.float32(0.5 + i), [0, 1])
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.run_parts(lambda i: big * np.float32(0.5 + i), [0, 1])  # silent in every lane


def test_regions_from_two_threads_at_once_both_finish_with_their_own_results(monkeypatch):
    """A second caller while the helpers are busy runs its parts in turn, never mixing the two."""
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    errors, answers = [], {}

    def caller(name):
        try:
            for round_ in range(200):
                got = parallel.run_parts(lambda i, r=round_: (name, r, i), list(range(4)))
                assert got == [(name, round_, i) for i in range(4)]
            answers[name] = True
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    callers = [threading.Thread(target=caller, args=(name,)) for name in ("a", "b")]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    assert not errors and answers == {"a": True, "b": True}


def test_an_interrupted_region_retires_its_helpers(monkeypatch):
    """A wait cut short (Ctrl-C) leaves a helper that may still run: later regions start fresh ones."""
    monkeypatch.setenv("LEARNSPARSE_THREADS", "2")
    parallel.run_parts(lambda i: i, [0, 1])
    old = list(parallel._helpers)
    release = threading.Event()

    class Interrupt(BaseException):
        pass

    class InterruptedQueue:
        """The helper's done queue, its wait cut short as Ctrl-C would."""

        def __init__(self, queue):
            self.put = queue.put

        def get(self):
            raise Interrupt

    helper = old[0]
    monkeypatch.setattr(helper, "done", InterruptedQueue(helper.done))
    with pytest.raises(Interrupt):
        parallel.run_parts(lambda i: release.wait(5) if i == 1 else i, [0, 1])
    release.set()
    assert parallel._helpers == []
    assert parallel.run_parts(lambda i: i * 2, [0, 1, 2]) == [0, 2, 4]
    assert parallel._helpers and parallel._helpers[0] is not helper


def test_an_op_small_by_every_measure_is_not_cut():
    whole = [slice(0, 128)]
    assert parallel.batch_parts(128, elements=parallel.MIN_ELEMENTS - 1) == whole
    assert parallel.batch_parts(128, elements=parallel.MIN_ELEMENTS - 1, macs=parallel.MIN_MACS - 1) == whole
    for sizes in (
        {},  # no size given
        {"elements": parallel.MIN_ELEMENTS},
        {"elements": 1, "macs": parallel.MIN_MACS},  # a convolution large by its multiply-adds alone
    ):
        assert len(parallel.batch_parts(128, **sizes)) == 4, sizes
