"""Data-parallel training in one process, without MPI: fit() on one process is the plain loop bit
for bit, batch norm's statistics per layer (local or over ranks), averaging of buffers, and how
the CLI turns errors into comm.abort / comm.finish. Real ranks: test_distributed_fit.py and
test_distributed_cli.py."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu.cli as cli
from cnn_gpu.data import BatchIterator, compute_norm_stats, normalize
from cnn_gpu.data.transforms import Augmentation
from cnn_gpu.distributed import (Replicas, SingleProcess, SyncBatchNorm, average_arrays, ranks_agree,
                                 set_batch_norm_sync)
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.layers import LOCAL_STATISTICS, BatchNorm2D
from cnn_gpu.optim import SGD
from cnn_gpu.training import TrainingDiverged, evaluate, fit

from .test_distributed import Replicated
from .train_fixtures import bars, small_cnn

AUGMENT = Augmentation(max_shift=1, hflip=True)


# ---- one process: the plain loop -----------------------------------------------------------------

def _plain_fit(model, optimizer, train, val, epochs, batch_size, seed, label_smoothing):
    """What fit() did before it learnt about ranks: the loop written out, with the same seeds."""
    stats = compute_norm_stats(train[0])
    dtype = model.dtype

    def transform(x):
        return normalize(x, stats, dtype=dtype)

    loader = BatchIterator(*train, batch_size, shuffle=True, seed=seed, augment=AUGMENT, transform=transform)
    history = []
    for epoch in range(epochs):
        for i, (_, layer) in enumerate(model.named_layers()):
            if hasattr(layer, "reseed"):
                layer.reseed(int(np.random.SeedSequence([seed, epoch, 2, i]).generate_state(1)[0]))
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader.batches(epoch):
            logits = model.forward(x)
            loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing)
            model.backward(dlogits)
            optimizer.step()
            optimizer.zero_grad()
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            seen += len(y)
        val_loss, val_acc, _ = evaluate(model, *val, transform=transform)
        history.append((loss_sum / seen, correct / seen, val_loss, val_acc))
    return history


@pytest.mark.parametrize("comm", [None, SingleProcess()], ids=["no-comm", "single-process"])
def test_fit_on_one_process_is_the_plain_loop_bit_for_bit(comm):
    """Batch norm, dropout, augmentation, label smoothing, a last batch of 20 of 32."""
    train, val = bars(84, 0), bars(30, 1)
    models = [small_cnn(seed=4, dropout=True, batch_norm=True) for _ in range(2)]
    optimizers = [SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in models]
    result = fit(models[0], optimizers[0], train, epochs=2, batch_size=32, val_data=val, augment=AUGMENT, seed=5,
                 label_smoothing=0.1, progress=False, log=None, comm=comm, batch_norm_sync="sync")
    plain = _plain_fit(models[1], optimizers[1], train, val, 2, 32, 5, 0.1)
    for key, value in models[1].state_dict().items():
        np.testing.assert_array_equal(models[0].state_dict()[key], value, err_msg=key)  # the same computation
    got = [(r["train_loss"], r["train_accuracy"], r["val_loss"], r["val_accuracy"]) for r in result.history]
    assert got == plain  # float loss sums in the same order: equal
    assert [r["ranks"] for r in result.history] == [1, 1]


def test_fit_refuses_a_batch_smaller_than_the_ranks():
    model = small_cnn()
    with pytest.raises(ValueError, match="batch_size 2 and the 84 training images must be at least the 3 ranks"):
        fit(model, SGD(model.parameters(), lr=0.1), bars(84, 0), epochs=1, batch_size=2, comm=Replicated(3),
            progress=False, log=None)


# ---- batch norm's statistics --------------------------------------------------------------------

def test_set_batch_norm_sync_chooses_the_statistics_of_every_batch_norm_layer():
    model = small_cnn(batch_norm=True)
    assert model.children["1"].statistics is LOCAL_STATISTICS  # the default
    assert set_batch_norm_sync(model, Replicated(2), "sync") == ["1"]
    assert isinstance(model.children["1"].statistics, SyncBatchNorm)
    set_batch_norm_sync(model, Replicated(2), "local")
    assert model.children["1"].statistics is LOCAL_STATISTICS
    set_batch_norm_sync(model, SingleProcess(), "sync")  # one rank: the functional path itself
    assert model.children["1"].statistics is LOCAL_STATISTICS
    with pytest.raises(ValueError, match=r"batch norm sync must be one of \('local', 'sync'\), got 'global'"):
        set_batch_norm_sync(model, SingleProcess(), "global")


def test_a_batch_norm_layer_with_sync_statistics_uses_the_global_count(rng):
    """Two 'ranks' holding the same shard: the global batch is the shard twice, whose mean and
    biased variance are the shard's, so y, dx, dgamma and dbeta are the local layer's; but the
    unbiased running variance uses the global count 2M, not M."""
    x, dy = rng.normal(size=(4, 3, 3, 5)) * 2 + 1, rng.normal(size=(4, 3, 3, 5))
    local, synced = BatchNorm2D(5, dtype="float64"), BatchNorm2D(5, dtype="float64")
    synced.statistics = SyncBatchNorm(Replicated(2))
    y_local, y_sync = local.forward(x), synced.forward(x)
    dx_local, dx_sync = local.backward(dy), synced.backward(dy)
    # Other summation orders (two-pass moments merged over ranks against the functional kernels).
    np.testing.assert_allclose(y_sync, y_local, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_sync, dx_local, rtol=1e-10, atol=1e-12)
    for name in ("gamma", "beta"):
        np.testing.assert_allclose(synced.params[name].grad, local.params[name].grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(synced.buffers["running_mean"], local.buffers["running_mean"], rtol=1e-12)
    m = 4 * 3 * 3
    var = x.reshape(-1, 5).var(axis=0)
    np.testing.assert_allclose(synced.buffers["running_var"], 0.9 + 0.1 * var * (2 * m) / (2 * m - 1), rtol=1e-12)
    np.testing.assert_allclose(local.buffers["running_var"], 0.9 + 0.1 * var * m / (m - 1), rtol=1e-12)


def test_a_sync_batch_norm_computes_the_relu_after_it(rng):
    """forward(..., activation='relu') with sync statistics: max(y, 0), and a backward that takes
    dy at the ReLU's output, against the layer's own forward followed by a ReLU's."""
    from cnn_gpu.layers import ReLU
    x, dy = rng.normal(size=(4, 3, 3, 5)), rng.normal(size=(4, 3, 3, 5))
    fused, plain, relu = BatchNorm2D(5, dtype="float64"), BatchNorm2D(5, dtype="float64"), ReLU()
    fused.statistics = plain.statistics = SyncBatchNorm(Replicated(2))
    y = fused.forward(x, activation="relu")
    np.testing.assert_array_equal(y, relu.forward(plain.forward(x)))  # the same code, then the same maximum
    np.testing.assert_array_equal(fused.backward(dy), plain.backward(relu.backward(dy)))
    for name in ("gamma", "beta"):
        np.testing.assert_array_equal(fused.params[name].grad, plain.params[name].grad)


class NoCollectives(SingleProcess):
    """Two ranks whose collectives must not be called."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 2

    def allreduce_sum(self, a):
        raise AssertionError("a collective in evaluation")

    allgather = broadcast = barrier = allreduce_sum


def test_a_batch_norm_layer_evaluates_with_its_running_statistics_and_no_collective(rng):
    x = rng.normal(size=(3, 2, 2, 4))
    local, synced = BatchNorm2D(4, dtype="float64").eval(), BatchNorm2D(4, dtype="float64").eval()
    synced.statistics = SyncBatchNorm(NoCollectives())
    np.testing.assert_array_equal(synced.forward(x), local.forward(x))  # the same code path
    dy = rng.normal(size=x.shape)
    np.testing.assert_array_equal(synced.backward(dy), local.backward(dy))


# ---- buffers and replicas -----------------------------------------------------------------------

def test_average_arrays_of_equal_ranks_changes_nothing_in_one_allreduce_per_bucket():
    comm = Replicated(4)  # a sum over 4 equal ranks is 4x; times 1/4 exactly undoes it
    arrays = [np.arange(5.0), np.linspace(0, 1, 7, dtype=np.float32), np.full((2, 3), 0.3)]
    before = [a.copy() for a in arrays]
    average_arrays(comm, arrays)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
    assert comm.calls == 2  # a float64 bucket and a float32 one


def test_local_running_statistics_are_shared_only_on_several_ranks():
    model = small_cnn(batch_norm=True)
    model.children["1"].buffers["running_mean"][:] = 2.0
    Replicas(SingleProcess(), model).share_running_statistics()  # one rank: nothing to do
    comm = Replicated(2)
    replicas = Replicas(comm, model, "local")
    calls = comm.calls
    replicas.share_running_statistics()
    assert comm.calls == calls + 1  # the running mean and variance in one float32 bucket
    np.testing.assert_array_equal(model.children["1"].buffers["running_mean"], 2.0)
    Replicas(comm, model, "sync").share_running_statistics()  # equal on every rank already
    assert comm.calls == calls + 1
    assert ranks_agree(SingleProcess(), [model.children["1"].buffers["running_mean"]])


# ---- the CLI's errors on several ranks ----------------------------------------------------------

class Ranks(SingleProcess):
    """Rank `rank` of 2, recording how the CLI ends it; abort() raises SystemExit as MPI's would stop."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.size = rank, 2
        self.ended: list[tuple] = []

    def abort(self, message, exit_code=1):
        self.ended.append(("abort", message, exit_code))
        raise SystemExit(exit_code)

    def barrier(self, poll=None, bounded=True):
        self.ended.append(("barrier",))


def _raise(exc):
    def command():
        raise exc
    return command


def test_an_error_on_one_rank_aborts_every_rank_naming_it(capsys):
    comm = Ranks(1)
    with pytest.raises(SystemExit):
        cli._run_guarded(_raise(FileNotFoundError("no such file: x.npz")), comm)
    assert comm.ended == [("abort", "no such file: x.npz", 1)]
    with pytest.raises(SystemExit):
        cli._run_guarded(_raise(cli.UsageError("--val-size 9 leaves no training images")), comm)
    assert comm.ended[-1] == ("abort", "--val-size 9 leaves no training images", 2)
    with pytest.raises(SystemExit):
        cli._run_guarded(lambda: 3, comm)  # a non-zero code returned on one rank stops the others
    assert comm.ended[-1] == ("abort", "exited with code 3", 3)
    assert capsys.readouterr().err == ""  # abort prints the line (naming the rank), not _run_guarded


@pytest.mark.parametrize("rank", [0, 1])
def test_a_diverged_loss_every_rank_saw_ends_them_together_printed_once(rank, capsys):
    comm = Ranks(rank)
    code = cli._run_guarded(_raise(TrainingDiverged("training diverged: the loss became nan", 1, 2)), comm)
    assert code == 1 and comm.ended == [("barrier",)]  # finish(collective=True): no abort
    assert capsys.readouterr().err == ("cnn-gpu: error: training diverged: the loss became nan\n" if rank == 0 else "")


def test_one_process_errors_are_one_line_as_before(capsys):
    assert cli._run_guarded(_raise(ValueError("bad"))) == 1
    assert cli._run_guarded(_raise(TrainingDiverged("training diverged", 1, 1))) == 1
    assert capsys.readouterr().err == "cnn-gpu: error: bad\ncnn-gpu: error: training diverged\n"


def test_info_lists_the_communication_backends(capsys):
    assert cli.main(["info"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in ("mpi", "nccl"):
        assert " usable: " in lines[name] or " not usable: " in lines[name], lines[name]


def test_train_refuses_an_unknown_batch_norm_sync(capsys):
    assert cli.main(["train", "--batch-norm-sync", "global"]) == 2
    assert "invalid choice: 'global'" in capsys.readouterr().err


def test_ranks_on_one_machine_share_its_cores_unless_the_environment_chose(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info
    for var in cli.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = Ranks(0)
    comm.local_size = 2 * (cli.os.cpu_count() or 1)  # more ranks than cores: one thread each
    said = []
    limiter = cli._share_cores(comm, said.append)
    try:
        assert said == [f"{comm.local_size} ranks on this machine: 1 BLAS thread each (set OPENBLAS_NUM_THREADS "
                        "to choose)"]
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    finally:
        limiter.restore_original_limits()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert cli._share_cores(comm, said.append) is None and len(said) == 1
    assert cli._share_cores(SingleProcess(), said.append) is None
