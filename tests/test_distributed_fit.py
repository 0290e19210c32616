"""fit() on several ranks (mpiexec -n 2 and -n 3) against one process computing the same.

One launch per rank count runs tests/distributed_fit_ranks.py's `fit` scenario; each test below
reads what the ranks wrote and compares it with fit() in this process, without MPI.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.distributed import shard_sizes

from . import distributed_fit_ranks as problems
from .mpi_launch import requires_mpi, run_ranks

pytestmark = requires_mpi


@pytest.fixture(scope="module", params=[2, 3], ids=["n2", "n3"])
def ranks(request, tmp_path_factory):
    """(N, [what rank r wrote, for r in 0..N-1], OUT)."""
    n = request.param
    out = tmp_path_factory.mktemp(f"fit{n}")
    problems.fit_case(problems.CASES[problems.RESUMED], epochs=1, out_dir=out / "one-rank", seed=100)  # to resume
    done = run_ranks(n, "fit", out, timeout=300, command_line=["-m", "tests.distributed_fit_ranks", "fit", str(out)])
    assert done.returncode == 0, f"mpiexec -n {n} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return n, [dict(np.load(out / f"rank{r}.npz")) for r in range(n)], out


@pytest.fixture(scope="module")
def one_process():
    """Each case trained by one process, from rank 0's weights (seed 100)."""
    return {name: problems.fit_case(case, epochs=problems.case_epochs(name), seed=100)
            for name, case in problems.CASES.items()}


def test_differently_seeded_ranks_hold_rank0s_weights_after_set_up(ranks):
    n, found, _ = ranks
    model, _ = problems.case_model(problems.CASES["seed_bn_local"], seed=100)
    expected = np.concatenate([v.ravel() for v in model.state_dict().values()])
    for f in found:
        assert not bool(f["agree_before"]) and bool(f["agree_after"])
        np.testing.assert_array_equal(f["setup_state"], expected)  # copies: bit equality


def test_local_statistics_average_the_weight_averages_buffers_over_the_ranks(ranks):
    """Rank r's weight-average buffers are rank 0's running statistics + r + 1; after
    share_running_statistics they are the same on every rank: the mean, + (n + 1) / 2."""
    n, found, _ = ranks
    model, _ = problems.case_model(problems.CASES["seed_bn_local"], seed=100)
    expected = np.concatenate([v.ravel() for _, v, _, _ in model.named_buffers()]) + (n + 1) / 2
    for f in found:
        assert bool(f["ema_buffers_agree"])
        np.testing.assert_allclose(f["ema_buffers"], expected, rtol=1e-15)  # a sum of n small integers: exact


def test_shards_are_disjoint_cover_each_batch_and_change_per_epoch(ranks):
    n, found, _ = ranks
    for epoch in range(2):
        # every batch's shard sizes as sharding says, and all ranks' images together: each image once
        for r, f in enumerate(found):
            np.testing.assert_array_equal(f[f"lens{epoch}"], [shard_sizes(b, n)[r] for b in (10, 10, 10, 10, 7)])
        seen = np.concatenate([f[f"ids{epoch}"] for f in found])
        np.testing.assert_array_equal(np.sort(seen), np.arange(problems.N_TRAIN))
    assert not np.array_equal(found[0]["ids0"], found[0]["ids1"])  # another shuffle each epoch


def _check_case(name: str, found: list[dict], one_process: dict, rtol: float, atol: float) -> None:
    model, result = one_process[name]
    state = model.state_dict()
    for r, f in enumerate(found):
        assert bool(f[f"{name}_agree"]), f"{name}: rank {r}'s replica differs from rank 0's"
        for key, value in state.items():
            np.testing.assert_allclose(f[f"{name}/{key}"], value, rtol=rtol, atol=atol,
                                       err_msg=f"{name} {key} rank {r}")
        np.testing.assert_allclose(f[f"{name}_history"], [problems.numbers(rec) for rec in result.history],
                                   rtol=rtol, atol=atol, err_msg=f"{name}: losses and accuracies, rank {r}")


@pytest.mark.parametrize("name", ["seed_sgd", "seed_adam", "seed_bn_sync", "resnet20_sync", "seed_bn_sync_ema"])
def test_n_ranks_train_what_one_process_trains_float64(ranks, one_process, name):
    """An epoch of five steps (the last batch of 7, uneven on 3 ranks), SGD with momentum and
    weight decay or Adam, batch norm with the global batch's statistics: one process's weights,
    running statistics, losses and accuracies. Shards run GEMMs and sums of other shapes than the
    whole batch (other summation orders): a tolerance a little above float64 rounding."""
    _check_case(name, ranks[1], one_process, rtol=1e-10, atol=1e-12)


def test_n_ranks_train_what_one_process_trains_float32(ranks, one_process):
    # The same as float64 but rounded to float32 (about 6e-8) at each of five steps.
    _check_case("seed_float32", ranks[1], one_process, rtol=2e-4, atol=1e-5)


def test_local_batch_norm_statistics_differ_from_one_process_and_stay_equal_on_every_rank(ranks, one_process):
    """With each rank's own statistics the weights leave one process's (so the sync test above can
    fail), while the ranks' replicas, running statistics included, stay identical."""
    _, found, _ = ranks
    model, _ = one_process["seed_bn_local"]
    gamma = model.state_dict()["1.gamma"]
    for f in found:
        assert bool(f["seed_bn_local_agree"])
        assert np.max(np.abs(f["seed_bn_local/1.gamma"] - gamma)) > 1e-6  # far above float64 rounding
    # The synced case, trained from the same start, does match: the difference is the statistics.
    sync_model, _ = one_process["seed_bn_sync"]
    np.testing.assert_allclose(found[0]["seed_bn_sync/1.gamma"], sync_model.state_dict()["1.gamma"], rtol=1e-10)


def test_evaluation_split_over_the_ranks_is_the_whole_split(ranks):
    """13 images in slices of 5/4/4 over 3 ranks (evaluated in batches of 4), and 2 images, which
    leave a rank nothing: the sums over the ranks give one process's loss and accuracy."""
    from cnn_gpu.training import evaluate
    _, found, _ = ranks
    model, _ = problems.case_model(problems.CASES["seed_bn_sync"], seed=100)
    x, y = problems.case_data(problems.CASES["seed_bn_sync"])["val"]
    for key, (images, labels) in (("eval_all", (x, y)), ("eval_two", (x[:2], y[:2]))):
        loss, accuracy, _ = evaluate(model, images.astype(np.float64), labels)
        for f in found:
            np.testing.assert_allclose(f[key], [loss, accuracy], rtol=1e-12)  # per-slice sums: another order


def test_only_rank0_writes_and_records_the_ranks(ranks):
    n, _, out = ranks
    for name in problems.CASES:
        assert (out / f"{name}-rank0" / "last.npz").is_file()
        for r in range(1, n):
            assert not (out / f"{name}-rank{r}").exists(), f"rank {r} wrote {name}'s files"
    history = json.loads((out / "seed_sgd-rank0" / "history.json").read_text())
    assert [rec["ranks"] for rec in history] == [n]
    assert load_checkpoint(out / "seed_sgd-rank0" / "last.npz").metadata["ranks"] == n


def test_resume_on_n_ranks_from_one_process_and_on_one_process_from_n_ranks(ranks, one_process):
    """A one-process checkpoint resumed on N ranks, and an N-rank checkpoint resumed by one
    process: both give the weights of one process that never stopped (batch norm synced, so
    N ranks compute what one process does; other summation orders, hence the tolerance)."""
    n, found, out = ranks
    straight = one_process[problems.RESUMED][0].state_dict()
    resumed_here, result = problems.fit_case(problems.CASES[problems.RESUMED], epochs=2,
                                             resume=out / "n-ranks-rank0" / "last.npz")
    assert [rec["ranks"] for rec in result.history] == [n, 1]
    for key, value in straight.items():
        np.testing.assert_allclose(resumed_here.state_dict()[key], value, rtol=1e-10, atol=1e-12, err_msg=key)
        for r, f in enumerate(found):
            np.testing.assert_allclose(f[f"resumed/{key}"], value, rtol=1e-10, atol=1e-12, err_msg=f"{key} rank {r}")
    assert load_checkpoint(out / "one-rank" / "last.npz").metadata["ranks"] == 1
    assert [rec["ranks"] for rec in json.loads((out / "resumed-rank0" / "history.json").read_text())] == [1, n]
    assert all(not (out / f"resumed-rank{r}").exists() for r in range(1, n))


def test_a_diverging_loss_stops_every_rank_at_the_same_step(ranks):
    _, found, _ = ranks
    from cnn_gpu.training import TrainingDiverged
    with pytest.raises(TrainingDiverged) as one:
        problems.fit_case(problems.CASES["seed_sgd"], epochs=1, lr=1e6)
    for f in found:
        np.testing.assert_array_equal(f["diverged"], [one.value.epoch, one.value.step])
