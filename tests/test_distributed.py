"""cnn_gpu.distributed in one process: launch detection, backend choice, bucket plans, shards,
moment merging, sync batch norm against functional batch norm, the watchdog and the excepthook.

The collectives over real MPI are in test_distributed_mpi.py, failures in
test_distributed_failures.py, CuPy and NCCL in test_distributed_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import cnn_gpu.distributed as dist
from cnn_gpu.distributed import (SINGLE, DistributedError, GradientAverager, LaunchInfo, SingleProcess,
                                 choose_backend, detect_launch, gpu_for_rank, grad_scale, plan_buckets,
                                 shard_batches, shard_sizes, shard_slice)
from cnn_gpu.distributed.buckets import layout_digest, layout_of, pack, unpack
from cnn_gpu.functional import batch_norm_backward, batch_norm_forward

from . import distributed_ranks as problems
from .helpers import assert_close
from .mpi_launch import ROOT

# ---- launch -------------------------------------------------------------------------------------


def test_no_launcher_is_a_single_process():
    assert detect_launch({}) == SINGLE
    assert detect_launch({"PATH": "/bin", "SLURM_JOB_ID": "7"}) == SINGLE


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ("openmpi", 3, 4, 1, 2)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, ("mpich", 1, 2, 1, 2)),
    ({"PMI_RANK": "0", "PMI_SIZE": "3"}, ("mpich", 0, 3, None, None)),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"},
     ("slurm", 5, 8, 1, None)),
    # mpirun inside a Slurm allocation: Open MPI's variables win over the job's.
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"},
     ("openmpi", 1, 2, None, None)),
])
def test_launchers_are_read_from_their_variables(env, expected):
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.size, launch.local_rank, launch.local_size) == expected
    assert launch.distributed == (expected[2] > 1)


def test_a_slurm_batch_script_is_not_a_launch():
    # sbatch -n 4 sets SLURM_NTASKS=4 and SLURM_PROCID=0 in the script itself: one process.
    assert detect_launch({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) == SINGLE


@pytest.mark.parametrize("env, match", [
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK must be an integer"),
    ({"PMI_RANK": "2", "PMI_SIZE": "2"}, "rank 2 of 2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "rank 0 of 0"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "-1"}, "negative"),
])
def test_bad_launcher_variables_say_what_came(env, match):
    with pytest.raises(ValueError, match=match):
        detect_launch(env)


def test_each_rank_takes_its_local_rank_modulo_the_gpus():
    assert [gpu_for_rank(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [gpu_for_rank(r, 1) for r in range(3)] == [0, 0, 0]  # one visible GPU per rank (srun --gpus-per-task)
    with pytest.raises(ValueError, match="no GPU"):
        gpu_for_rank(0, 0)


OMPI2 = LaunchInfo("openmpi", 0, 2, 0, 2, "OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2")


@pytest.mark.parametrize("requested, arrays, launch, nccl_reason, name, note", [
    ("auto", "numpy", SINGLE, None, "single", None),
    ("auto", "cupy", SINGLE, None, "single", None),
    ("auto", "numpy", OMPI2, None, "mpi", None),
    ("auto", "cupy", OMPI2, None, "nccl", None),
    ("auto", "cupy", OMPI2, "libnccl.so.2 not found", "mpi", "libnccl.so.2 not found"),
    ("mpi", "cupy", OMPI2, None, "mpi", "copied to the host"),
    ("mpi", "numpy", SINGLE, None, "mpi", None),        # asked for: MPI with one rank
    ("nccl", "cupy", SINGLE, None, "nccl", None),
    ("single", "numpy", SINGLE, None, "single", None),
    (" MPI ", "numpy", OMPI2, None, "mpi", None),
])
def test_backend_choice(requested, arrays, launch, nccl_reason, name, note):
    choice = choose_backend(requested, arrays, launch, nccl_reason)
    assert choice.name == name
    assert (choice.note is None) if note is None else (note in choice.note)


@pytest.mark.parametrize("requested, arrays, launch, nccl_reason, match", [
    ("nccl", "numpy", OMPI2, None, "NCCL needs the cupy backend"),
    ("nccl", "cupy", OMPI2, "no GPU", "NCCL was asked for but cannot run: no GPU"),
    ("single", "numpy", OMPI2, None, "started 2 ranks"),
])
def test_backend_choices_that_cannot_run_say_why(requested, arrays, launch, nccl_reason, match):
    with pytest.raises(DistributedError, match=match):
        choose_backend(requested, arrays, launch, nccl_reason)


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend("gloo", "numpy", SINGLE, None)
    with pytest.raises(ValueError, match="array_backend"):
        choose_backend("auto", "torch", SINGLE, None)


def test_a_single_process_never_imports_mpi4py():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_", "CNN_GPU_DIST"))}
    code = ("import sys, cnn_gpu.distributed as d; c = d.init(); "
            "print(type(c).__name__, c.size, 'mpi4py' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SingleProcess", "1", "False"]


def test_backend_report_names_mpi_and_nccl():
    report = {s.name: s for s in dist.backend_report({})}
    assert set(report) == {"mpi", "nccl"}
    assert report["mpi"].usable == (dist.mpi_unavailable_reason() is None)
    if report["mpi"].usable:
        assert "not launched under MPI" in report["mpi"].detail
    assert report["nccl"].usable == (dist.nccl_unavailable_reason() is None)
    assert report["nccl"].detail


# ---- the single-process communicator -----------------------------------------------------------


def test_single_process_collectives_are_the_identity(capsys):
    comm = SingleProcess()
    a = np.arange(4.0)
    comm.allreduce_sum(a)
    comm.broadcast(a)
    comm.barrier()
    np.testing.assert_array_equal(a, np.arange(4.0))
    gathered = comm.allgather(a)
    assert gathered.shape == (1, 4) and not np.shares_memory(gathered, a)
    assert comm.sum_scalars([1, 2.5]) == (1.0, 2.5)
    assert comm.finish(3) == 3  # one process returns its code itself
    with pytest.raises(SystemExit) as stop:
        comm.abort("the data is missing", 2)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "cnn-gpu: error: rank 0 of 1: the data is missing\n"


class Replicated(SingleProcess):
    """N ranks that all hold this process's arrays: a sum over ranks is N times the array. Enough
    to check what averaging does with layouts, missing and non-contiguous gradients; the real
    collectives are in test_distributed_mpi.py."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.calls = 0

    def allreduce_sum(self, a):
        self.calls += 1
        a *= self.size

    def allgather(self, a):
        return np.stack([a] * self.size)


# ---- buckets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_bytes", [1, 8, 40, 96, 1 << 20])
def test_bucket_plan_covers_every_element_once(bucket_bytes):
    layout = [((3, 4), np.float64), ((5,), np.float32), ((0,), np.float64), ((7,), np.float64),
              ((2, 3), np.float32), ((), np.float64), ((1,), np.int64)]
    buckets = plan_buckets(layout, bucket_bytes)
    seen = {i: np.zeros(int(np.prod(shape)), dtype=int) for i, (shape, _) in enumerate(layout)}
    dtype_order = []
    for bucket in buckets:
        assert bucket.size * bucket.dtype.itemsize <= max(bucket_bytes, bucket.dtype.itemsize)
        assert bucket.size == sum(s.stop - s.start for s in bucket.segments)
        offset = 0
        for seg in bucket.segments:
            assert layout[seg.index][1] == bucket.dtype and seg.offset == offset  # packed end to end
            seen[seg.index][seg.start:seg.stop] += 1
            offset += seg.stop - seg.start
        if not dtype_order or dtype_order[-1] != bucket.dtype:
            dtype_order.append(bucket.dtype)
    assert all((count == 1).all() for count in seen.values())
    assert dtype_order == [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64)]  # first appearance


def test_one_bucket_holds_the_seed_network():
    from cnn_gpu import seed_cnn
    params = seed_cnn().parameters()
    buckets = plan_buckets(layout_of([p.data for p in params]))
    assert len(buckets) == 1 and buckets[0].size == sum(p.data.size for p in params) == 225_034


def test_pack_and_unpack_round_trip():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)), rng.normal(size=7), rng.normal(size=())]
    flats = [a.reshape(-1) for a in arrays]
    copies = [np.zeros_like(a) for a in arrays]
    for bucket in plan_buckets(layout_of(arrays), 40):
        buffer = pack(bucket, flats, np.empty(bucket.size))
        unpack(bucket, buffer, [c.reshape(-1) for c in copies])
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_layout_digest_tells_layouts_apart():
    a = layout_digest([((3, 4), np.float32)])
    assert np.array_equal(a, layout_digest([((3, 4), np.float32)]))
    assert not np.array_equal(a, layout_digest([((4, 3), np.float32)]))
    assert not np.array_equal(a, layout_digest([((3, 4), np.float64)]))


def test_averaging_identical_ranks_changes_nothing_and_fills_missing_gradients():
    comm = Replicated(3)
    grads = problems.rank_grads(1)  # parameter 2 has no gradient on this rank; 5 is non-contiguous
    params = [problems.Param(np.zeros(shape, dtype)) for shape, dtype in problems.GRAD_LAYOUT]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.copy(order="K")
    kept = params[0].grad
    averager = GradientAverager(comm, params, bucket_bytes=problems.BUCKET_BYTES)
    averager.average()
    assert comm.calls == len(averager.buckets) > 2  # one allreduce per bucket, not per parameter
    assert params[0].grad is kept  # contiguous: written in place
    for i, (p, g) in enumerate(zip(params, grads)):
        expected = np.zeros(p.data.shape) if g is None else g
        assert p.grad.dtype == p.data.dtype and p.grad.shape == p.data.shape
        # x * 3 * (1/3) rounds once or twice: a tolerance of the dtype's rounding.
        rtol = 1e-15 if p.data.dtype == np.float64 else 1e-7
        np.testing.assert_allclose(p.grad, expected, rtol=rtol, err_msg=f"parameter {i}")
    assert params[problems.TRANSPOSED_GRAD].grad.flags.c_contiguous


def test_averaging_with_one_rank_does_nothing():
    params = [problems.Param(np.zeros(3)), problems.Param(np.zeros(2))]
    params[0].grad = g = np.ones(3)
    GradientAverager(SingleProcess(), params).average()
    assert params[0].grad is g and params[1].grad is None


def test_gradients_of_another_shape_are_an_error():
    params = [problems.Param(np.zeros((2, 3)))]
    params[0].grad = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"parameter 0 is float64 \(2, 3\) but its gradient is float64 \(3, 2\)"):
        GradientAverager(Replicated(2), params).average()


def test_broadcast_needs_contiguous_arrays():
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.broadcast_arrays(Replicated(2), [np.zeros((3, 4)).T])


# ---- shards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shards_are_disjoint_covering_and_balanced(size):
    for batch_len in range(30):
        sizes = shard_sizes(batch_len, size)
        slices = [shard_slice(batch_len, r, size) for r in range(size)]
        covered = np.concatenate([np.arange(batch_len)[s] for s in slices])
        np.testing.assert_array_equal(covered, np.arange(batch_len))  # in rank order: the batch
        assert [s.stop - s.start for s in slices] == sizes and max(sizes) - min(sizes) <= 1
        if batch_len:
            scales = [grad_scale(batch_len, r, size) for r in range(size)]
            assert sum(scales) == pytest.approx(size, rel=1e-15)
            if batch_len % size == 0:
                assert scales == [1.0] * size  # exactly the plain average


def test_scaled_shard_means_average_to_the_batch_mean():
    # The identity behind grad_scale: (1/N) sum_r scale_r * mean over shard r = mean over the batch.
    values = np.random.default_rng(1).normal(size=(23, 4))
    for size in (2, 3, 5):
        parts = [values[shard_slice(23, r, size)].mean(axis=0) * grad_scale(23, r, size) for r in range(size)]
        np.testing.assert_allclose(sum(parts) / size, values.mean(axis=0), rtol=1e-13)


def test_shard_batches_transform_only_the_shard():
    batches = list(problems.loader().batches(0))
    shards = list(shard_batches(iter(batches), 1, 3, transform=lambda x: x.astype(np.float64) / 255))
    assert [s.batch_len for s in shards] == [len(y) for _, y in batches]
    for shard, (x, y) in zip(shards, batches):
        part = shard_slice(len(y), 1, 3)
        np.testing.assert_array_equal(shard.x, x[part] / 255)
        np.testing.assert_array_equal(shard.y, y[part])


# ---- moments and sync batch norm --------------------------------------------------------------


def test_channel_moments_stay_accurate_far_from_zero():
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=(4000, 3))).astype(np.float32)
    exact = x.astype(np.float64)
    m = dist.channel_moments(x)
    assert m.count == 4000
    # float32 with mean 1e4 and std 1: E[x^2] - mean^2 would lose all ~7 digits here.
    np.testing.assert_allclose(m.m2 / 4000, exact.var(axis=0), rtol=1e-3)
    np.testing.assert_allclose(m.mean, exact.mean(axis=0), rtol=1e-6)
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.abs(naive - exact.var(axis=0)).max() > 0.1  # what the two-pass avoids


def test_merging_moments_equals_the_whole():
    rng = np.random.default_rng(3)
    x = 1e6 + rng.normal(size=(50, 4))
    cuts = [0, 7, 7, 20, 49, 50]  # one empty group
    parts = [dist.channel_moments(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    whole = dist.channel_moments(x)
    folded = parts[0]
    for p in parts[1:]:
        folded = dist.merge_moments(folded, p)
    combined = dist.combine_moments(np.array([p.count for p in parts], dtype=np.float64),
                                    np.stack([p.mean for p in parts]), np.stack([p.m2 for p in parts]))
    for merged in (folded, combined):
        assert float(merged.count) == 50
        # Other summation orders around a mean of 1e6: about 10 of float64's digits survive x - mean.
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-14)
        np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-8)


def test_an_empty_groups_mean_is_ignored():
    combined = dist.combine_moments(np.array([0.0, 3.0]), np.array([[np.nan], [2.0]]), np.array([[np.nan], [6.0]]))
    assert float(combined.count) == 3 and combined.mean.tolist() == [2.0] and combined.m2.tolist() == [6.0]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape", [(16, 5), (6, 4, 3, 8)])
def test_sync_batch_norm_on_one_rank_is_batch_norm(xp, dtype, rtol, shape):
    rng = np.random.default_rng(4)
    c = shape[-1]
    x = xp.asarray((3 + 2 * rng.normal(size=shape)).astype(dtype))
    dy = xp.asarray(rng.normal(size=shape).astype(dtype))
    gamma, beta = (xp.asarray(rng.normal(size=c).astype(dtype)) for _ in range(2))
    stats = [xp.asarray(rng.uniform(0.5, 1.5, size=c).astype(dtype)) for _ in range(2)]
    ours, theirs = [s.copy() for s in stats], [s.copy() for s in stats]
    norm = dist.SyncBatchNorm(SingleProcess())
    for training in (True, False):
        y, cache = norm.forward(x, gamma, beta, *ours, training, 0.1, 1e-5)
        y_ref, cache_ref = batch_norm_forward(x, gamma, beta, *theirs, training, 0.1, 1e-5)
        # Two codes for one function (other summation orders): the dtype's rounding.
        assert_close(y, y_ref, rtol=rtol, atol=rtol, what=f"y, training={training}")
        for got, want in zip(ours, theirs):
            assert_close(got, want, rtol=rtol, what="running statistics")
        for got, want, name in zip(norm.backward(dy, cache), batch_norm_backward(dy, cache_ref),
                                   ("dx", "dgamma", "dbeta")):
            assert got.dtype == dtype
            assert_close(got, want, rtol=rtol, atol=rtol * 10, what=f"{name}, training={training}")


def test_sync_batch_norm_checks_its_shapes():
    comm = SingleProcess()
    with pytest.raises(ValueError, match=r"gamma and beta must have shape \(3,\)"):
        dist.sync_batch_norm_forward(comm, np.zeros((4, 3)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        dist.sync_batch_norm_forward(comm, np.zeros((4, 3)), np.zeros(3), np.zeros(3), training=False)


def test_single_process_sharded_training_is_plain_training():
    """The scenario of test_distributed_mpi.py on one rank: shards are whole batches, the scale is
    1, and sync batch norm is batch norm."""
    comm = SingleProcess()
    net, ref = ([problems.Param(w) for w in problems.mlp_params()] for _ in range(2))
    norm, averager = dist.SyncBatchNorm(comm), GradientAverager(comm, net)
    running, running_ref = [np.zeros(5), np.ones(5)], [np.zeros(5), np.ones(5)]
    for shard, (x, y) in zip(shard_batches(problems.loader().batches(0), 0, 1), problems.loader().batches(0)):
        assert shard.grad_scale == 1.0
        problems.mlp_step(net, running, shard.x, shard.y, shard.grad_scale, norm.forward, norm.backward)
        averager.average()
        problems.sgd(net)
        problems.mlp_step(ref, running_ref, x, y, 1.0, batch_norm_forward, batch_norm_backward)
        problems.sgd(ref)
    for p, q in zip(net, ref):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-10, atol=1e-12)  # two batch-norm codes: other sums


# ---- watchdog and failure hooks -----------------------------------------------------------------


class FakeEvent:
    def __init__(self, done: bool) -> None:
        self.done = done


def _watchdog(timeout, check=None):
    fired = threading.Event()
    messages: list[str] = []

    def on_timeout(message):
        messages.append(message)
        fired.set()
    return dist.Watchdog(timeout, on_timeout, check=check, poll=0.02), fired, messages


def test_watchdog_fires_when_a_blocking_call_outlives_its_timeout():
    watchdog, fired, messages = _watchdog(0.05)
    with watchdog.guard("allreduce_sum"):
        assert fired.wait(10)
    assert messages == [watchdog.fired] and "allreduce_sum did not complete within 0.05 s" in messages[0]


def test_watchdog_stays_quiet_for_calls_that_return():
    watchdog, fired, messages = _watchdog(5.0)
    for _ in range(100):
        with watchdog.guard("barrier"):
            pass
    watchdog.watch_event(FakeEvent(done=True), "NCCL allreduce_sum")
    time.sleep(0.1)  # a few polls of the finished event
    watchdog.stop()
    assert not fired.is_set() and messages == []


def test_watchdog_fires_for_device_work_that_never_finishes():
    watchdog, fired, messages = _watchdog(0.05)
    watchdog.watch_event(FakeEvent(done=True), "NCCL broadcast")
    watchdog.watch_event(FakeEvent(done=False), "NCCL allreduce_sum")
    assert fired.wait(10)
    assert "NCCL allreduce_sum did not complete" in messages[0]


def test_watchdog_reports_an_asynchronous_error():
    errors = iter([None, None, "NCCL reported an error: remote process exited"])
    watchdog, fired, messages = _watchdog(None, check=lambda: next(errors))
    watchdog.watch_event(FakeEvent(done=False), "NCCL allreduce_sum")
    assert fired.wait(10)
    assert messages == ["NCCL reported an error: remote process exited"]


def test_watchdog_without_timeout_never_starts():
    watchdog, _, _ = _watchdog(None)
    with watchdog.guard("allreduce_sum"):
        pass
    assert watchdog._thread is None


@pytest.mark.parametrize("text, seconds", [("", dist.DEFAULT_TIMEOUT), ("30", 30.0), ("0", None), ("none", None)])
def test_timeout_from_the_environment(text, seconds):
    assert dist.timeout_from_env({dist.TIMEOUT_VAR: text}) == seconds


@pytest.mark.parametrize("text", ["soon", "-1"])
def test_bad_timeouts_say_what_came(text):
    with pytest.raises(ValueError, match=dist.TIMEOUT_VAR):
        dist.timeout_from_env({dist.TIMEOUT_VAR: text})


def test_excepthook_prints_the_traceback_then_aborts(capsys):
    calls = []
    previous = dist.install_excepthook(lambda message, code: calls.append((message, code)))
    try:
        try:
            raise MemoryError("out of memory on the GPU")
        except MemoryError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    finally:
        sys.excepthook = previous
    assert calls == [("MemoryError: out of memory on the GPU", 1)]
    assert "Traceback" in capsys.readouterr().err


def test_ranks_sharing_a_gpu_are_found():
    # (machine, PCI domain, bus, device) per rank: ranks 0 and 2 are on one GPU of machine 7.
    keys = np.array([[7, 0, 3, 0], [7, 0, 4, 0], [7, 0, 3, 0], [8, 0, 3, 0]])
    assert dist.shared_devices(keys) == [[0, 2]]
    assert dist.shared_devices(keys[:2]) == []


def test_the_ring_model_is_fitted_back_from_its_own_times():
    from cnn_gpu.distributed.bench import SIZES, fit_ring
    latency, bandwidth, n = 5e-6, 4e9, 3
    times = [2 * (n - 1) * latency + 2 * (n - 1) / n * size / bandwidth for size in SIZES]
    fitted = fit_ring(SIZES, times, n)
    np.testing.assert_allclose(fitted, (latency, bandwidth), rtol=1e-6)

