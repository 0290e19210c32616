"""cnn_gpu.distributed over real MPI: mpiexec -n 2 and -n 3 (3 splits the batches unevenly).

One launch per rank count runs tests/distributed_ranks.py's `exact` scenario; each test below
reads what the ranks wrote and compares it with one process computing the same.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn_gpu.distributed import shard_sizes
from cnn_gpu.distributed.bench import SIZES
from cnn_gpu.functional import batch_norm_backward, batch_norm_forward

from . import distributed_ranks as problems
from .mpi_launch import requires_mpi, run_ranks

pytestmark = requires_mpi


@pytest.fixture(scope="module", params=[2, 3], ids=["n2", "n3"])
def ranks(request, tmp_path_factory):
    """(N, [what rank r wrote, for r in 0..N-1])."""
    n = request.param
    out = tmp_path_factory.mktemp(f"exact{n}")
    done = run_ranks(n, "exact", out, timeout=180)
    assert done.returncode == 0, f"mpiexec -n {n} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return n, [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]


def test_collectives(ranks):
    n, found = ranks
    for r, f in enumerate(found):
        assert int(f["size"]) == n and int(f["local_size"]) == n and int(f["local_rank"]) == r
        assert float(f["allreduce_0d"]) == sum(k + 0.5 for k in range(n))
        np.testing.assert_array_equal(f["sum_scalars"], [n, sum(range(n)), 0.25 * sum(range(n))])
    check_collectives(n, found)


def check_collectives(n: int, found: list[dict]) -> None:
    """allreduce_sum, broadcast and allgather as each rank saw them (here and on the GPU)."""
    for f in found:
        for name, dtype in (("f64", np.float64), ("f32", np.float32), ("i64", np.int64)):
            expected = sum(np.arange(6, dtype=dtype) + 10 * k for k in range(n)).reshape(2, 3)
            assert f[f"allreduce_{name}"].dtype == dtype
            np.testing.assert_array_equal(f[f"allreduce_{name}"], expected)  # small integers: exact sums
        np.testing.assert_array_equal(f["broadcast_last"], np.full(5, float(n - 1)))
        np.testing.assert_array_equal(f["allgather"], [[k, k * k] for k in range(n)])


def test_bucketed_gradient_average_is_the_mean(ranks):
    n, found = ranks
    assert int(found[0]["n_buckets"]) > 2  # BUCKET_BYTES cuts arrays across buckets
    check_gradient_average(n, found)


def check_gradient_average(n: int, found: list[dict]) -> None:
    grads = [problems.rank_grads(r) for r in range(n)]
    for i, (shape, dtype) in enumerate(problems.GRAD_LAYOUT):
        # One process: the mean of the ranks' gradients, a missing one counting as zeros. The
        # ranks sum in MPI's order and multiply by 1/N: another rounding, hence a tolerance.
        mean = sum(np.zeros(shape) if g[i] is None else g[i].astype(np.float64) for g in grads) / n
        rtol = 1e-12 if dtype == np.float64 else 1e-6
        for r, f in enumerate(found):
            got = f[f"grad{i}"]
            assert got.dtype == dtype and got.shape == shape, f"rank {r}, gradient {i}"
            np.testing.assert_allclose(got, mean, rtol=rtol, atol=rtol, err_msg=f"rank {r}, gradient {i}")
            # Every rank must hold the same bits, or the replicas drift apart step by step.
            np.testing.assert_array_equal(got, found[0][f"grad{i}"])


def test_broadcast_makes_differently_seeded_ranks_identical(ranks):
    _, found = ranks
    for f in found:
        assert not bool(f["agree_before"]) and bool(f["agree_after"])
    check_broadcast(found)


def check_broadcast(found: list[dict]) -> None:
    root = problems.rank_state(0)
    assert not np.array_equal(problems.rank_state(1)[0], root[0])  # the ranks start apart
    for f in found:
        for i, a in enumerate(root):
            assert f[f"state{i}"].dtype == a.dtype
            np.testing.assert_array_equal(f[f"state{i}"], a)  # copies: bit equality


def test_shards_are_the_single_process_batches(ranks):
    n, found = ranks
    batches = problems.loader()
    for epoch in range(2):
        for step, (x, y) in enumerate(batches.batches(epoch)):
            parts_x = [f[f"shard_x_{epoch}_{step}"] for f in found]
            parts_y = [f[f"shard_y_{epoch}_{step}"] for f in found]
            assert [len(p) for p in parts_y] == shard_sizes(len(y), n)
            # In rank order the shards are the batch: disjoint, covering, the same images
            # (augmented with the same draws) in the same order.
            np.testing.assert_array_equal(np.concatenate(parts_x), x)
            np.testing.assert_array_equal(np.concatenate(parts_y), y)
            scales = [float(f[f"shard_scale_{epoch}_{step}"]) for f in found]
            np.testing.assert_allclose(np.mean(scales), 1.0, rtol=1e-15)  # sum_r N b_r / B = N


def test_sync_batch_norm_equals_full_batch_batch_norm(ranks):
    check_sync_batch_norm(ranks[1])


def check_sync_batch_norm(found: list[dict]) -> None:
    bn = problems.bn_problem()
    running_mean, running_var = bn["running_mean"].copy(), bn["running_var"].copy()
    y, cache = batch_norm_forward(bn["x"], bn["gamma"], bn["beta"], running_mean, running_var)
    dx, dgamma, dbeta = batch_norm_backward(bn["dy"], cache)
    # Other summation orders (per shard, then merged) and a mean of 1e4 against a spread of 1:
    # x - mean keeps about 12 of float64's 16 digits in both computations.
    np.testing.assert_allclose(np.concatenate([f["bn_y"] for f in found]), y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([f["bn_dx"] for f in found]), dx, rtol=1e-9, atol=1e-9)
    # dgamma and dbeta are each rank's part; the gradient averaging sums them.
    np.testing.assert_allclose(sum(f["bn_dgamma"] for f in found), dgamma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sum(f["bn_dbeta"] for f in found), dbeta, rtol=1e-12, atol=1e-12)
    for f in found:
        np.testing.assert_allclose(f["bn_running_mean"], running_mean, rtol=1e-12)
        np.testing.assert_allclose(f["bn_running_var"], running_var, rtol=1e-9)
        np.testing.assert_array_equal(f["bn_running_var"], found[0]["bn_running_var"])  # the same merge everywhere


def test_sharded_training_equals_one_process(ranks):
    """Three SGD steps of a small network with batch norm, on batches of 10, 10 and 3 split over
    N ranks (uneven for N = 3 and for the batch of 3): the weights, running statistics and loss
    totals of one process on whole batches."""
    _, found = ranks
    net = [problems.Param(w) for w in problems.mlp_params()]
    running = [np.zeros(5), np.ones(5)]
    totals = np.zeros(3)
    for x, y in problems.loader().batches(0):
        loss_sum, correct = problems.mlp_step(net, running, x, y, 1.0, batch_norm_forward, batch_norm_backward)
        problems.sgd(net)
        totals += (loss_sum, correct, len(y))
    for r, f in enumerate(found):
        assert bool(f["train_agree"]), f"rank {r}: the replicas differ"
        # Other summation orders over three steps: a tolerance a little above float64 rounding.
        for i, p in enumerate(net):
            np.testing.assert_allclose(f[f"net{i}"], p.data, rtol=1e-10, atol=1e-12, err_msg=f"rank {r}, param {i}")
        np.testing.assert_allclose(f["net_running_mean"], running[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(f["net_running_var"], running[1], rtol=1e-10)
        np.testing.assert_allclose(f["train_totals"][0], totals[0], rtol=1e-12)
        np.testing.assert_array_equal(f["train_totals"][1:], totals[1:])  # counts: exact


def test_sharded_seed_network_equals_one_process(ranks):
    """The seed network, built with a different seed on each rank and broadcast from rank 0,
    trained three sharded steps (SGD with momentum and weight decay): one process's weights."""
    _, found = ranks
    model, optimizer = problems.seed_network(seed=100)  # rank 0's
    images, labels = problems.seed_images()
    for x, y in problems.BatchIterator(images, labels, problems.BATCH, shuffle=True, seed=4).batches(0):
        problems.seed_step(model, optimizer, x, y, 1.0)
    for r, f in enumerate(found):
        assert bool(f["seed_agree"]), f"rank {r}: the replicas differ"
        for i, p in enumerate(model.parameters()):
            # Shards and whole batches run GEMMs of other shapes (other summation orders).
            np.testing.assert_allclose(f[f"seed{i}"], p.data, rtol=1e-9, atol=1e-12, err_msg=f"rank {r}, param {i}")


def test_communication_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    done = run_ranks(2, "bench", out, timeout=180,
                     command_line=["-m", "cnn_gpu.distributed.bench", "--repeats", "2", "--json", str(out)])
    assert done.returncode == 0, done.stderr
    assert "ring model fitted" in done.stdout and "seed_cnn" in done.stdout
    results = json.loads(out.read_text())
    assert results["ranks"] == 2 and results["backend"] == "mpi"
    assert [s["bytes"] for s in results["sweep"]] == SIZES
    assert results["networks"][0]["parameters"] == 225_034 and results["networks"][0]["buckets"] == 1

