"""Data-parallel training (reference/distributed.py): the pieces in one process, then real ranks.

The first part needs no MPI: shard bounds, bucket plans, the weighted gradient
sum (2) with a two-rank reduction done by hand, and the failure agreement with
a stand-in communicator. The second part launches ``mpiexec -n 2`` (MPICH or
Open MPI from the ``mpi`` extra) on the digits CNN and checks the ranks
against a single process:

- per-rank batch norm: 2 ranks equal one process that normalises each half of
  every batch with its own statistics (a ghost batch), for every method;
- resume on 2 ranks is bit-identical; a checkpoint of 2 ranks evaluates in one
  process;
- a rank that raises or is killed ends the job within a bounded time, with one
  line naming the rank, and the last checkpoint stays intact;
- bad input is reported once, not once per rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference.autodiff import Tensor
from reference.checkpoint import load_checkpoint
from reference.config import TrainConfig
from reference.distributed import (
    Communicator,
    DataParallel,
    plan_buckets,
    reduce_gradients,
    report_failure,
    shard_bounds,
)
from reference.errors import ConfigError, DataError
from reference.functional import softmax_cross_entropy
from reference.nn import Parameter

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("n,size", [(1, 1), (7, 2), (45, 2), (43, 3), (10, 4), (5, 5)])
def test_shards_cover_the_batch_once_in_order(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_bucket_plan_keeps_order_dtype_and_limit():
    shapes = [(3, 4), (5,), (100,), (2, 2), (6,), (1,)]
    dtypes = ["float32", "float32", "float32", "float32", "float64", "float64"]
    buckets = plan_buckets(shapes, dtypes, limit=80)  # 20 float32 values per bucket
    assert [b.index for b in buckets] == [(0, 1), (2,), (3,), (4, 5)]
    assert [b.offset for b in buckets] == [(0, 12), (0,), (0,), (0, 6)]
    assert [b.total for b in buckets] == [17, 100, 4, 7]
    assert [b.dtype for b in buckets] == [np.float32, np.float32, np.float32, np.float64]
    assert len(plan_buckets(shapes, dtypes)) == 2  # the default limit: one bucket per dtype here
    with pytest.raises(ConfigError, match="limit"):
        plan_buckets(shapes, dtypes, limit=0)


def test_reduced_gradient_is_the_weighted_sum_over_ranks():
    """Two ranks' gradients, weights n_r / n, summed by a hand-made all-reduce: (2)."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(2)]
    weights = (3 / 7, 4 / 7)
    buckets = plan_buckets(shapes, ["float64"] * 3, limit=100)  # (0, 1) then (2,)
    packed: list[list[np.ndarray]] = [[], []]
    params = []
    for r in range(2):  # each rank packs and scales; the buffers are kept to be summed below
        ps = [Parameter(np.zeros(s)) for s in shapes]
        for p, g in zip(ps, grads[r]):
            p.grad = g.copy()
        reduce_gradients(ps, buckets, weights[r], lambda flat, r=r: packed[r].append(flat), np)
        params.append(ps)
    for b in range(len(buckets)):  # the all-reduce: both ranks' buffers become the sum
        total = packed[0][b] + packed[1][b]
        packed[0][b][...] = total
        packed[1][b][...] = total
    for i in range(len(shapes)):
        expected = weights[0] * grads[0][i] + weights[1] * grads[1][i]
        for r in range(2):
            np.testing.assert_allclose(params[r][i].grad, expected, rtol=1e-14)
            assert params[r][i].grad.shape == shapes[i]


def test_a_shared_gradient_array_is_not_written_through():
    g = np.arange(4.0)
    a, b = Parameter(np.zeros(4)), Parameter(np.zeros(4))
    a.grad = b.grad = g  # one array, two parameters (as an add's backward may hand out)
    reduce_gradients([a, b], plan_buckets([(4,), (4,)], ["float64"] * 2), 0.5, lambda flat: flat, np)
    np.testing.assert_array_equal(g, np.arange(4.0))
    np.testing.assert_array_equal(a.grad, 0.5 * g)
    np.testing.assert_array_equal(b.grad, 0.5 * g)


class _FakeRanks(Communicator):
    """Rank ``rank`` of ``size``, whose allgather returns what the other ranks are told to report."""

    def __init__(self, rank: int, size: int, others: dict[int, str | None]) -> None:
        super().__init__()
        self.rank, self.size, self.others = rank, size, others
        self.aborted: int | None = None

    def allgather(self, obj):
        self.collectives += 1
        return [obj if r == self.rank else self.others.get(r) for r in range(self.size)]

    def abort(self, code: int) -> None:
        self.aborted = code


def test_one_ranks_input_error_becomes_every_ranks():
    healthy = _FakeRanks(0, 2, {1: "data set 'x' not found"})
    with pytest.raises(ConfigError, match="rank 1 of 2: data set 'x' not found") as info:
        with healthy.agreed():
            pass
    assert info.value.on_every_rank
    failing = _FakeRanks(1, 2, {0: None})
    with pytest.raises(DataError, match="not found") as info:
        with failing.agreed():
            raise DataError("data set 'x' not found")
    assert info.value.on_every_rank
    with _FakeRanks(0, 2, {1: None}).agreed():  # nobody failed: nothing raised
        pass


def test_failure_report_once_before_collectives_and_with_the_rank_after(capsys, monkeypatch):
    monkeypatch.setattr("reference.distributed.ABORT_GRACE_SECONDS", 0.0)
    assert report_failure(_FakeRanks(1, 2, {}), "prog", "error: bad", 2) == 2  # before any collective
    assert capsys.readouterr().err == ""  # rank 0 says it, once
    assert report_failure(_FakeRanks(0, 2, {}), "prog", "error: bad", 2) == 2
    assert capsys.readouterr().err == "prog: error: bad\n"
    comm = _FakeRanks(1, 2, {})
    comm.collectives = 3  # training had begun: the others may be waiting for this rank
    report_failure(comm, "prog", "error: RuntimeError: boom", 1)
    assert comm.aborted == 1
    assert (
        capsys.readouterr().err
        == "prog: rank 1 of 2 failed: error: RuntimeError: boom; stopping every rank\n"
    )


def test_a_world_of_one_changes_nothing():
    p = Parameter(np.ones(3, dtype=np.float32))
    p.grad = np.full(3, 2.0, dtype=np.float32)
    dp = DataParallel(Communicator(), [p])
    assert not dp.active
    x, y, weight = dp.shard(np.zeros((5, 1)), np.arange(5))
    assert len(y) == 5 and weight == 1.0
    assert dp.sum_values([1.5, 2]).tolist() == [1.5, 2.0]


def _threads_allreduce(size: int):
    """An in-place sum over ``size`` threads (each calls it with its own array, in the same order)."""
    import threading

    barrier = threading.Barrier(size)
    slots: list = [None] * size

    def allreduce(array, rank):
        slots[rank] = array.copy()
        barrier.wait()
        total = sum(slots[1:], slots[0].copy())
        barrier.wait()
        array[...] = total
        return array

    return allreduce


@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (7, 4)])
def test_sync_batch_norm_over_shards_is_batch_norm_of_the_whole_batch(shape):
    """Two shards in two threads, summed by a stand-in all-reduce, against ``batch_norm`` of the
    concatenated batch in one call: outputs, gradients (random cotangent) and running statistics."""
    import threading

    from reference.functional import batch_norm, sync_batch_norm

    rng = np.random.default_rng(3)
    c = shape[1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 2, (1, c) + (1,) * (len(shape) - 2)) + 1.5
    dy = rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.normal(size=c)
    whole = Tensor(x.copy(), requires_grad=True)
    g, b = Parameter(gamma.copy()), Parameter(beta.copy())
    rm, rv = np.zeros(c), np.ones(c)
    y = batch_norm(whole, g, b, rm, rv, training=True, momentum=0.1)
    y.backward(dy)
    allreduce = _threads_allreduce(2)
    results: dict = {}

    def rank(r: int) -> None:
        lo, hi = shard_bounds(shape[0], r, 2)
        xs = Tensor(x[lo:hi].copy(), requires_grad=True)
        gs, bs = Parameter(gamma.copy()), Parameter(beta.copy())
        rms, rvs = np.zeros(c), np.ones(c)
        ys = sync_batch_norm(xs, gs, bs, rms, rvs, lambda a: allreduce(a, r), momentum=0.1)
        ys.backward(dy[lo:hi])
        results[r] = (ys.data, xs.grad, gs.grad, bs.grad, rms, rvs)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert set(results) == {0, 1}
    np.testing.assert_allclose(np.concatenate([results[0][0], results[1][0]]), y.data, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.concatenate([results[0][1], results[1][1]]), whole.grad, rtol=1e-9, atol=1e-11
    )
    np.testing.assert_allclose(results[0][2] + results[1][2], g.grad, rtol=1e-10)  # (7), summed by the ranks
    np.testing.assert_allclose(results[0][3] + results[1][3], b.grad, rtol=1e-10)  # (6)
    for r in range(2):
        np.testing.assert_allclose(results[r][4], rm, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(results[r][5], rv, rtol=1e-10)


# ---------------------------------------------------------------------------
# Real ranks


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _missing_mpi() -> str:
    """Why MPI runs cannot be made here ("" when they can)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec on PATH or beside the Python interpreter"
    return ""


mpi = pytest.mark.skipif(bool(_missing_mpi()), reason=_missing_mpi() or "MPI is available")

TIMEOUT = 120  # seconds: far above the few seconds these runs take; a hang fails the test instead


def _ranks(args: list[str], tmp_path: Path, n: int = 2, driver: list[str] | None = None):
    """``mpiexec -n n`` running the command line (through tests/mpi_driver.py when ``driver``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    module = ["-m", "tests.mpi_driver", *(driver or [])] if driver is not None else ["-m", "reference"]
    command = [_mpiexec(), "-n", str(n), sys.executable, *module, *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


# The digits CNN at half width; 1,438 training images in batches of 45: the last batch (43)
# splits 21 / 22, so the gradient weights n_r / n are not all 1/2.
BASE = {"model": "digits_cnn", "width": 0.5, "batch_size": 45, "lr": 0.05, "quiet": True}
METHOD_SETTINGS = {
    "dense": {},
    "str": {"method": "str", "str_s_init": -6.0},
    "ltp": {"method": "ltp"},
    "scp": {"method": "scp"},
}


def _train_ranks(tmp_path: Path, name: str, n: int = 2, driver=None, **settings):
    settings = {**BASE, "run_dir": str(tmp_path / name), **settings}
    return _ranks(["train", *_flags(settings)], tmp_path, n, driver)


def _ghost_batch_run(config: TrainConfig, epochs: int, size: int):
    """One process doing what ``size`` ranks with per-rank batch norm do: each shard of every batch
    goes through the model alone (its own batch statistics, its own running averages, its own
    method randomness), the gradients are summed with weights n_r / n, one update; at the end of
    every epoch the running averages are averaged. Returns the model's state."""
    from reference.build import build_data
    from reference.data import num_batches
    from reference.sparsity import StepContext
    from reference.train import _build, _epoch_rng, _method_rng

    data = build_data(config)
    model, method, optimizer, schedule = _build(config, data)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = [name for name, _ in model.named_buffers()]
    ranks_buffers = [{k: v.copy() for k, v in model.named_buffers()} for _ in range(size)]
    for epoch in range(epochs):
        steps = num_batches(data.num_train, config.batch_size, drop_last=False)
        optimizer.set_lr(schedule(epoch, 0, steps))
        model.train()
        rngs = [_method_rng(config.seed, epoch, r) for r in range(size)]
        batches = data.train_batches(
            config.batch_size, _epoch_rng(config.seed, epoch), augment=config.augment
        )
        for step, (xb, yb) in enumerate(batches):
            total = [np.zeros_like(p.data) for p in params]
            for r in range(size):
                ctx = StepContext(epoch, step, steps, config.epochs, rngs[r])
                for name, buf in model.named_buffers():
                    buf[...] = ranks_buffers[r][name]
                lo, hi = shard_bounds(len(yb), r, size)
                method.before_step(model, ctx)
                loss = softmax_cross_entropy(model(Tensor(xb[lo:hi])), yb[lo:hi])
                extra = method.regularization(model)
                full = loss if extra is None else loss + extra
                optimizer.zero_grad()
                full.backward()
                for t, p in zip(total, params):
                    t += p.grad * p.grad.dtype.type((hi - lo) / len(yb))
                ranks_buffers[r] = {k: v.copy() for k, v in model.named_buffers()}
            for p, t in zip(params, total):
                p.grad = t
            optimizer.step()
            method.after_step(model, StepContext(epoch, step, steps, config.epochs, rngs[0]))
        for name, buf in model.named_buffers():
            if buf.dtype.kind == "f":
                mean = sum(rb[name].astype(np.float64) for rb in ranks_buffers) / size
                buf[...] = mean.astype(buf.dtype)
            else:
                buf[...] = ranks_buffers[0][name]
            for rb in ranks_buffers:
                rb[name] = buf.copy()
        method.end_epoch(
            model, StepContext(epoch, steps, steps, config.epochs, _method_rng(config.seed, epoch))
        )
    assert names == [name for name, _ in model.named_buffers()]
    return model.state_dict()


@mpi
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_two_ranks_equal_one_process_with_ghost_batches(tmp_path, method):
    """Per-rank batch norm: 2 ranks, 1 epoch, against the ghost-batch process above. The ranks
    compute the same float32 operations on the same shards, so the only differences allowed are
    the rounding of summation order: rtol 1e-5, atol 1e-6."""
    settings = {**METHOD_SETTINGS[method], "epochs": 1}
    done = _train_ranks(tmp_path, "ranks", **settings)
    assert done.returncode == 0, done.stderr
    ckpt = load_checkpoint(tmp_path / "ranks" / "checkpoint.npz")
    assert ckpt.extra["world_size"] == 2
    config = TrainConfig(**{k: v for k, v in {**BASE, **settings}.items() if k != "quiet"}, progress=False)
    expected = _ghost_batch_run(config, epochs=1, size=2)
    assert list(ckpt.model_state) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(ckpt.model_state[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@mpi
def test_resume_on_two_ranks_is_bit_identical_and_evaluates_in_one_process(tmp_path):
    settings = {"epochs": 3, "schedule": "step", "milestones": (2,), "augment": True}
    full = _train_ranks(tmp_path, "full", **settings)
    assert full.returncode == 0, full.stderr
    part = _train_ranks(tmp_path, "part", driver=["--stop-after", "2"], **settings)
    assert part.returncode == 0, part.stderr
    assert load_checkpoint(tmp_path / "part" / "checkpoint.npz").epoch == 2
    resumed = _ranks(["train", "--resume", str(tmp_path / "part" / "checkpoint.npz"), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.npz")
    assert a.epoch == b.epoch == 3
    for name, value in a.model_state.items():
        assert np.array_equal(value, b.model_state[name]), name
    for name, value in a.optimizer_state["momentum_buffers"].items():
        assert np.array_equal(value, b.optimizer_state["momentum_buffers"][name]), name
    untimed = [{k: v for k, v in row.items() if "seconds" not in k} for row in a.metrics]
    assert untimed == [{k: v for k, v in row.items() if "seconds" not in k} for row in b.metrics]
    # A resume on another number of processes is refused, once, before anything is written.
    again = _ranks(
        ["train", "--resume", str(tmp_path / "full" / "checkpoint.npz"), "--epochs", "4"], tmp_path, n=3
    )
    assert again.returncode == 2
    assert again.stderr.count("error:") == 1 and "trained on 2 process(es)" in again.stderr
    # The 2-rank checkpoint in one process: eval gives the accuracy the ranks summed.
    from reference.cli import main

    assert main(["eval", str(tmp_path / "full" / "checkpoint.npz")]) == 0
    assert (
        main(["finalize", str(tmp_path / "full" / "checkpoint.npz"), "-o", str(tmp_path / "final.npz")]) == 0
    )
    assert (
        main(
            [
                "report",
                str(tmp_path / "full" / "checkpoint.npz"),
                "--no-plots",
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    ours = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    from reference.build import build_data, build_model_for
    from reference.train import evaluate

    config = TrainConfig.from_checkpoint(ours.config)
    data = build_data(config)
    model = build_model_for(config, data)
    model.load_state_dict(ours.model_state)
    loss, acc = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
    assert acc == metrics[-1]["test_acc"]
    assert loss == pytest.approx(metrics[-1]["test_loss"], rel=1e-6)


@mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_job_and_keeps_the_last_checkpoint(tmp_path, how):
    done = _train_ranks(tmp_path, "run", driver=["--fail", f"1:2:{how}"], epochs=3)
    assert done.returncode != 0
    if how == "raise":
        lines = [line for line in done.stderr.splitlines() if "failed:" in line]
        assert lines == [
            "learnsparse: rank 1 of 2 failed: error: RuntimeError: planted failure in epoch 2; stopping every rank"
        ]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert ckpt.epoch == 1  # the epoch committed before the failure, whole
    assert not any("epoch   2/3" in line for line in done.stdout.splitlines())


@mpi
def test_bad_input_is_reported_once(tmp_path):
    done = _train_ranks(tmp_path, "run", epochs=1, batch_size=1)
    assert done.returncode == 2
    assert done.stderr.count("learnsparse: error:") == 1, done.stderr
    assert "batch_size 1 over 2 processes" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    done = _train_ranks(tmp_path, "run", epochs=0)
    assert done.returncode == 2 and done.stderr.count("learnsparse: error:") == 1, done.stderr


# Synchronised batch norm: 2 ranks at global batch B against one process at batch B. The two
# compute the same quantities in another order (and the variance in one pass instead of two), in
# float32; after an epoch of updates the weights agree to rtol 2e-4, atol 2e-5 (a few hundred
# float32 ulps) and the epoch's losses to 1e-5 relative. SCP is left out: its channel-mask noise
# is drawn per rank, so 2 ranks sample two masks per step where one process samples one.
# MobileNetV1 at this toy size (8 channels, 1x1 maps in its last layers) is chaotic: scaling one
# weight tensor by 1 + 1e-6 changes its fourth step's loss by several percent, in one process
# and with either batch norm, and at the base learning rate the second step already differs by
# percents; its case therefore covers one step (forward, synchronised backward, update).
# A ReLU input that lands within rounding of 0 in one run and not in the other turns one entry of
# a gradient on or off, and the runs part: at batch 45 STR's run did so at step 9 of 32 (one
# activation of 11,264; every step before agreed to 4e-7), after a change of the conv kernel's
# summation order alone. Its case runs 14 steps of 105 (the last batch, 73, still splits 36 / 37).
SYNC_CASES = {
    "digits-dense": {},
    "digits-str": {**METHOD_SETTINGS["str"], "batch_size": 105},
    "digits-ltp": METHOD_SETTINGS["ltp"],
    "resnet20": {"model": "resnet20", "dataset": "synthetic", "image_size": 8, "train_size": 96, "test_size": 32,
                 "num_classes": 4, "width": 0.25, "batch_size": 24},
    "mobilenet_v1": {"model": "mobilenet_v1", "dataset": "synthetic", "image_size": 32, "train_size": 12,
                     "test_size": 16, "num_classes": 4, "width": 0.125, "batch_size": 12},
}  # fmt: skip


@mpi
@pytest.mark.parametrize("case", sorted(SYNC_CASES))
def test_two_ranks_with_sync_bn_equal_one_process(tmp_path, case):
    from reference.train import train
    from tests.common import quiet

    settings = {**BASE, **SYNC_CASES[case], "epochs": 1}
    done = _train_ranks(tmp_path, "ranks", sync_bn=True, **SYNC_CASES[case], epochs=1)
    assert done.returncode == 0, done.stderr
    ranks = load_checkpoint(tmp_path / "ranks" / "checkpoint.npz")
    config = {k: v for k, v in settings.items() if k != "quiet"}
    one = train(TrainConfig(**config, progress=False, run_dir=str(tmp_path / "one")), log=quiet)
    for name, value in one.model.state_dict().items():
        np.testing.assert_allclose(ranks.model_state[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
    for key in ("train_loss", "test_loss"):
        assert ranks.metrics[-1][key] == pytest.approx(one.history[-1][key], rel=1e-5), key


# ---------------------------------------------------------------------------
# The NCCL path (gpu/distributed.py), on the CPU: the emulated device and a stand-in nccl module


class _FakeNccl:
    """Records what a rank asks of NCCL; its all-reduce leaves the buffer as it is (one rank's sum)."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0

    def __init__(self, unique_id=None):
        self.unique_id = unique_id
        self.joined: list = []
        self.calls: list = []
        self.ids_made = 0

    def get_unique_id(self):
        self.ids_made += 1
        return self.unique_id

    def NcclCommunicator(self, size, unique_id, rank):  # noqa: N802 (NCCL's spelling)
        self.joined.append((size, unique_id, rank))
        return self

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802
        self.calls.append((send, recv, count, dtype, op, stream))


class _Broadcast(Communicator):
    """Rank ``rank`` of 2 whose bcast hands out what rank 0 put in ``box``."""

    def __init__(self, rank, box):
        super().__init__()
        self.rank, self.size, self.box = rank, 2, box

    def bcast(self, obj):
        if self.rank == 0:
            self.box.append(obj)
        return self.box[0]


def test_nccl_unique_id_goes_from_rank_0_to_every_rank(emulated_cupy):
    from gpu.distributed import NcclAllreduce

    box: list = []
    ranks = [(_Broadcast(r, box), _FakeNccl(unique_id=f"id of rank {r}")) for r in range(2)]
    sums = [NcclAllreduce(comm, nccl, emulated_cupy) for comm, nccl in ranks]
    assert all(not nccl.joined for _, nccl in ranks)  # nothing until the first sum
    for s in sums:
        s(emulated_cupy.zeros(3, dtype=np.float32))
        s(emulated_cupy.zeros(3, dtype=np.float32))  # the second sum reuses the communicator
    assert [nccl.ids_made for _, nccl in ranks] == [1, 0]
    assert [nccl.joined for _, nccl in ranks] == [[(2, "id of rank 0", 0)], [(2, "id of rank 0", 1)]]


def test_nccl_buckets_on_the_device_go_on_the_current_stream(emulated_cupy):
    """The device gradient sum: one NCCL call per bucket, in place, with its count and data type,
    on CuPy's current stream; the gradients come back scaled and reshaped, as device arrays."""
    from gpu.distributed import NcclAllreduce

    cp = emulated_cupy
    rng = np.random.default_rng(5)
    shapes = [(3, 4), (5,), (100,), (2, 2)]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    params = [Parameter(cp.zeros(s, dtype=cp.float32)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = cp.asarray(g)
    nccl = _FakeNccl(unique_id="id")
    buckets = plan_buckets(shapes, ["float32"] * 4, limit=80)
    reduce_gradients(params, buckets, 0.25, NcclAllreduce(Communicator(), nccl, cp), cp)
    stream = cp.cuda.get_current_stream().ptr
    assert [(c[2], c[3], c[4], c[5]) for c in nccl.calls] == [
        (b.total, _FakeNccl.NCCL_FLOAT32, _FakeNccl.NCCL_SUM, stream) for b in buckets
    ]
    assert all(send == recv for send, recv, *_ in nccl.calls)  # in place
    for p, g in zip(params, grads):
        assert isinstance(p.grad, cp.ndarray) and p.grad.shape == g.shape
        np.testing.assert_array_equal(cp.asnumpy(p.grad), g * np.float32(0.25))
    with pytest.raises(ConfigError, match="float16, float32 or float64"):
        NcclAllreduce(Communicator(), nccl, cp)(cp.zeros(2, dtype=cp.int32))
    with pytest.raises(ConfigError, match="C-contiguous"):
        NcclAllreduce(Communicator(), nccl, cp)(cp.zeros((4, 4), dtype=cp.float32)[:, 1])


@pytest.mark.gpu
def test_one_process_nccl_sums_on_a_real_gpu():
    """The real ``cupy.cuda.nccl`` with one rank (one GPU suffices): the communicator is made from
    a unique id, every bucket is summed in place on the stream the caller runs on, and the sum over
    one rank is that rank's own scaled gradient, for every dtype NCCL takes here."""
    if os.environ.get("LEARNSPARSE_EMULATE_GPU") == "1":
        pytest.skip("NCCL has no CPU execution mode; the stand-in tests above check the calls")
    import cupy as cp

    from gpu.distributed import NcclAllreduce

    rng = np.random.default_rng(7)
    shapes = [(64, 3, 3, 3), (64,), (1000, 64), (1000,)]
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    params = [Parameter(cp.zeros(s, dtype=cp.float32)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = cp.asarray(g)
    allreduce = NcclAllreduce(Communicator())
    buckets = plan_buckets(shapes, ["float32"] * len(shapes), limit=64 * 1024)
    assert len(buckets) > 1
    stream = cp.cuda.Stream(non_blocking=True)  # not the default stream: the calls must follow the caller's
    with stream:
        reduce_gradients(params, buckets, 0.5, allreduce, cp)
    stream.synchronize()
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(cp.asnumpy(p.grad), g * np.float32(0.5))
    for dtype in (np.float16, np.float64):
        x = cp.asarray(rng.normal(size=257).astype(dtype))
        before = cp.asnumpy(x)
        assert allreduce(x) is x
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(x), before)


def test_each_rank_takes_the_gpu_of_its_place_on_the_node():
    from types import SimpleNamespace

    from gpu.distributed import use_local_device

    used: list = []
    runtime = SimpleNamespace(getDeviceCount=lambda: 2)
    fake = SimpleNamespace(
        cuda=SimpleNamespace(runtime=runtime, Device=lambda n: SimpleNamespace(use=lambda: used.append(n)))
    )
    comm = Communicator()
    comm.rank, comm.size, comm.local_rank = 3, 4, 1
    assert use_local_device(comm, fake) == 1 and used == [1]
    comm.local_rank = 2
    with pytest.raises(ConfigError, match="has 2 GPU"):
        use_local_device(comm, fake)
