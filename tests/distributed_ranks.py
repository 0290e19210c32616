"""The rank side of the MPI tests: run under mpiexec, each rank writes what it computed to
OUT/rank<r>.npz, and the test compares that with one process computing the same from the
problems defined here (which import no MPI).

    mpiexec -n 3 python -m tests.distributed_ranks exact OUT      # the collectives and exactness
    mpiexec -n 2 python -m tests.distributed_ranks raise OUT      # rank 1 raises mid-run
    mpiexec -n 2 python -m tests.distributed_ranks kill OUT       # rank 1 is SIGKILLed mid-run
    mpiexec -n 2 python -m tests.distributed_ranks hang OUT       # rank 1 stops calling collectives
    mpiexec -n 2 python -m tests.distributed_ranks exit OUT       # rank 1's main returns code 3
    mpiexec -n 2 python -m tests.distributed_ranks exit_all OUT   # every rank returns code 4
    mpiexec -n 2 python -m tests.distributed_ranks gpu OUT        # CuPy arrays (NCCL, or MPI host copies)
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from cnn_gpu.data import BatchIterator
from cnn_gpu.data.transforms import Augmentation
from cnn_gpu.functional import linear_backward, linear_forward, relu_backward, relu_forward, softmax_cross_entropy

# ---- the problems: the same on every rank and in the test --------------------------------------

BUCKET_BYTES = 96  # tiny, so that arrays are cut across buckets and every path of the plan runs
GRAD_LAYOUT = [((3, 4), np.float64), ((5,), np.float32), ((7,), np.float64), ((2, 3), np.float32),
               ((), np.float64), ((4, 3), np.float64)]
NONE_GRAD = (1, 2)  # (rank, parameter): this rank has no gradient for it (counts as zeros)
TRANSPOSED_GRAD = 5  # this parameter's gradient arrives as a non-contiguous (transposed) view


def rank_grads(rank: int) -> list[Any]:
    """Rank r's gradients for GRAD_LAYOUT (None where NONE_GRAD says)."""
    rng = np.random.default_rng([7, rank])
    grads: list[Any] = []
    for i, (shape, dtype) in enumerate(GRAD_LAYOUT):
        g = rng.normal(size=shape).astype(dtype)
        if i == TRANSPOSED_GRAD:
            g = np.ascontiguousarray(g.T).T  # same values, Fortran order
        grads.append(None if (rank, i) == NONE_GRAD else g)
    return grads


def rank_state(rank: int) -> list[np.ndarray]:
    """Differently seeded 'parameters and buffers' per rank, of several dtypes, for the broadcast."""
    rng = np.random.default_rng([11, rank])
    return [rng.normal(size=(4, 5)), rng.normal(size=(9,)).astype(np.float32),
            rng.integers(0, 1000, size=(3,)), rng.normal(size=(2, 2, 2)).astype(np.float32)]


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """23 uint8 images (6, 6, 1) and labels in [0, 3): batches of 10, 10 and 3."""
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, size=(23, 6, 6, 1), dtype=np.uint8), rng.integers(0, 3, size=23)


BATCH = 10
AUGMENT = Augmentation(max_shift=1, hflip=True)


def loader() -> BatchIterator:
    """The training batches every rank walks, with augmentation (random draws per batch)."""
    images, labels = dataset()
    return BatchIterator(images, labels, BATCH, shuffle=True, seed=3, augment=AUGMENT)


def bn_problem() -> dict[str, np.ndarray]:
    """A global batch x (10, 3, 3, 4) whose mean is far from 0 (1e4) against a spread of ~1, dy,
    gamma, beta and running statistics, float64."""
    rng = np.random.default_rng(13)
    return {"x": 1e4 + rng.normal(size=(10, 3, 3, 4)), "dy": rng.normal(size=(10, 3, 3, 4)),
            "gamma": rng.normal(size=4), "beta": rng.normal(size=4),
            "running_mean": rng.normal(size=4), "running_var": rng.uniform(0.5, 2.0, size=4)}


def mlp_params() -> list[np.ndarray]:
    """A small network 36 -> 5 (batch norm) -> ReLU -> 3, float64: w1, gamma, beta, w2, b2."""
    rng = np.random.default_rng(17)
    return [rng.normal(size=(36, 5)) * 0.2, 1.0 + 0.1 * rng.normal(size=5), 0.1 * rng.normal(size=5),
            rng.normal(size=(5, 3)) * 0.3, np.zeros(3)]


class Param:
    """What GradientAverager needs of a parameter: .data and .grad."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.grad = data, None


BNForward = Callable[..., tuple[Any, Any]]
BNBackward = Callable[[Any, Any], tuple[Any, Any, Any]]


def mlp_step(params: list[Param], running: list[np.ndarray], x_u8: np.ndarray, y: np.ndarray, scale: float,
             bn_forward: BNForward, bn_backward: BNBackward) -> tuple[float, int]:
    """Forward and backward of the small network on images x_u8 (b, 6, 6, 1), labels y (b,); the
    loss gradient times `scale` (sharding.grad_scale); fills each param's .grad. Returns this
    batch's (loss sum, right answers)."""
    w1, gamma, beta, w2, b2 = (p.data for p in params)
    x = (x_u8.reshape(len(x_u8), -1) / 255.0 - 0.5).astype(np.float64)  # (b, 36)
    h, c1 = linear_forward(x, w1)
    z, cbn = bn_forward(h, gamma, beta, running[0], running[1], True, 0.1, 1e-5)
    a, cr = relu_forward(z)
    logits, c2 = linear_forward(a, w2, b2)
    loss, dlogits = softmax_cross_entropy(logits, y)
    if scale != 1.0:
        dlogits *= scale
    da, params[3].grad, params[4].grad = linear_backward(dlogits, c2)
    dz = relu_backward(da, cr)
    dh, params[1].grad, params[2].grad = bn_backward(dz, cbn)
    _, params[0].grad, _ = linear_backward(dh, c1, need_dx=False)
    return float(loss) * len(y), int((logits.argmax(axis=1) == y).sum())


LR = 0.5


def sgd(params: list[Param]) -> None:
    for p in params:
        p.data -= LR * p.grad
        p.grad = None


def seed_images() -> tuple[np.ndarray, np.ndarray]:
    """23 uint8 images (28, 28, 1) for the seed network, labels in [0, 10)."""
    rng = np.random.default_rng(19)
    return rng.integers(0, 256, size=(23, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, size=23)


def seed_network(seed: int) -> tuple[Any, Any]:
    """The seed network in float64 and its optimizer (SGD, momentum, weight decay)."""
    from cnn_gpu import SGD, seed_cnn
    model = seed_cnn(seed=seed, dtype="float64")
    return model, SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def seed_step(model: Any, optimizer: Any, x_u8: np.ndarray, y: np.ndarray, scale: float,
              average: Callable[[], None] = lambda: None) -> None:
    """One training step of the seed network on images x_u8 (b, 28, 28, 1): the loss gradient
    times `scale`, then average() (the gradient averaging), then the optimizer."""
    logits = model.forward(x_u8.astype(np.float64) / 255.0)
    _, dlogits = softmax_cross_entropy(logits, y)
    if scale != 1.0:
        dlogits *= scale
    model.backward(dlogits)
    average()
    optimizer.step()
    optimizer.zero_grad()


# ---- the scenarios ------------------------------------------------------------------------------

def exact(comm: Any, out: Path) -> None:
    """Collectives, bucketed gradient averaging, broadcast, shards, sync batch norm and three
    training steps of the small network; everything goes to rank<r>.npz."""
    import cnn_gpu.distributed as dist
    r, n = comm.rank, comm.size
    found: dict[str, Any] = {"size": n, "local_size": comm.local_size, "local_rank": comm.local_rank}

    # allreduce_sum, broadcast, allgather, barrier, sum_scalars
    for name, dtype in (("f64", np.float64), ("f32", np.float32), ("i64", np.int64)):
        a = (np.arange(6, dtype=dtype) + 10 * r).reshape(2, 3)
        comm.allreduce_sum(a)
        found[f"allreduce_{name}"] = a
    scalar = np.array(r + 0.5)
    comm.allreduce_sum(scalar)
    found["allreduce_0d"] = scalar
    b = np.full(5, float(r))
    comm.broadcast(b, root=n - 1)
    found["broadcast_last"] = b
    found["allgather"] = comm.allgather(np.array([r, r * r], dtype=np.int64))
    comm.barrier()
    found["sum_scalars"] = np.array(comm.sum_scalars([1.0, r, 0.25 * r]))

    # gradients: averaged in buckets
    params = [Param(np.zeros(shape, dtype)) for shape, dtype in GRAD_LAYOUT]
    for p, g in zip(params, rank_grads(r)):
        p.grad = g
    averager = dist.GradientAverager(comm, params, bucket_bytes=BUCKET_BYTES)
    found["n_buckets"] = len(averager.buckets)
    averager.average()
    for i, p in enumerate(params):
        found[f"grad{i}"] = p.grad

    # broadcast of differently seeded state; the replicas agree afterwards, not before
    state = rank_state(r)
    found["agree_before"] = dist.ranks_agree(comm, state)
    dist.broadcast_arrays(comm, state, bucket_bytes=BUCKET_BYTES)
    found["agree_after"] = dist.ranks_agree(comm, state)
    for i, a in enumerate(state):
        found[f"state{i}"] = a

    # shards of every batch of two epochs, with their global batch lengths and scales
    batches = loader()
    for epoch in range(2):
        for step, shard in enumerate(dist.shard_batches(batches.batches(epoch), r, n)):
            found[f"shard_x_{epoch}_{step}"], found[f"shard_y_{epoch}_{step}"] = shard.x, shard.y
            found[f"shard_scale_{epoch}_{step}"] = shard.grad_scale

    # sync batch norm on this rank's shard of the global batch
    bn = bn_problem()
    part = dist.shard_slice(len(bn["x"]), r, n)
    running_mean, running_var = bn["running_mean"].copy(), bn["running_var"].copy()
    y, cache = dist.sync_batch_norm_forward(comm, bn["x"][part], bn["gamma"], bn["beta"], running_mean, running_var)
    dx, dgamma, dbeta = dist.sync_batch_norm_backward(comm, bn["dy"][part], cache)
    found.update(bn_y=y, bn_dx=dx, bn_dgamma=dgamma, bn_dbeta=dbeta, bn_running_mean=running_mean,
                 bn_running_var=running_var)

    # three steps of training, sharded: the same weights as one process
    net = [Param(w) for w in mlp_params()]
    dist.broadcast_arrays(comm, [p.data for p in net])
    running = [np.zeros(5), np.ones(5)]
    averager = dist.GradientAverager(comm, net)
    norm = dist.SyncBatchNorm(comm)
    sums = np.zeros(3)
    for shard in dist.shard_batches(loader().batches(0), r, n):
        loss_sum, correct = mlp_step(net, running, shard.x, shard.y, shard.grad_scale, norm.forward, norm.backward)
        averager.average()
        sgd(net)
        sums += (loss_sum, correct, len(shard.y))
    found["train_totals"] = np.array(comm.sum_scalars(sums))
    found["train_agree"] = dist.ranks_agree(comm, [p.data for p in net] + running)
    for i, p in enumerate(net):
        found[f"net{i}"] = p.data
    found["net_running_mean"], found["net_running_var"] = running

    # the seed network itself, built with another seed on every rank: rank 0's weights after
    # the broadcast, then three sharded steps of SGD with momentum and weight decay
    model, optimizer = seed_network(seed=100 + r)
    params = model.parameters()
    dist.broadcast_arrays(comm, [p.data for p in params])
    averager = dist.GradientAverager(comm, params)
    images, labels = seed_images()
    batches = BatchIterator(images, labels, BATCH, shuffle=True, seed=4)
    for shard in dist.shard_batches(batches.batches(0), r, n):
        seed_step(model, optimizer, shard.x, shard.y, shard.grad_scale, averager.average)
    found["seed_agree"] = dist.ranks_agree(comm, [p.data for p in params])
    for i, p in enumerate(params):
        found[f"seed{i}"] = p.data
    np.savez(out / f"rank{r}.npz", **found)


def _busy(comm: Any, steps: int) -> None:
    """Gradient averaging in a loop, as in training."""
    import cnn_gpu.distributed as dist
    params = [Param(np.zeros((64, 64))) for _ in range(3)]
    averager = dist.GradientAverager(comm, params)
    for _ in range(steps):
        for p in params:
            p.grad = np.ones((64, 64))
        averager.average()


def fails_by_raising(comm: Any, out: Path) -> None:
    """Rank 1 runs out of memory (a MemoryError) while rank 0 is in the next allreduce."""
    _busy(comm, 5)
    if comm.rank == 1:
        time.sleep(0.2)
        raise MemoryError("simulated: out of memory in the backward pass")
    _busy(comm, 1000)


def fails_by_being_killed(comm: Any, out: Path) -> None:
    """Rank 1 is SIGKILLed (as by the kernel's OOM killer) while rank 0 is in the next allreduce."""
    _busy(comm, 5)
    if comm.rank == 1:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    _busy(comm, 1000)


def fails_by_hanging(comm: Any, out: Path) -> None:
    """Rank 1 stops calling collectives without dying; rank 0's watchdog must end the job."""
    _busy(comm, 5)
    if comm.rank == 1:
        time.sleep(600)
    _busy(comm, 1000)


def fails_by_exit_code(comm: Any, out: Path) -> int:
    """Rank 1's main returns exit code 3 (an error it caught and reported itself)."""
    _busy(comm, 5)
    if comm.rank == 1:
        return 3
    _busy(comm, 1000)
    return 0


def fails_together(comm: Any, out: Path) -> int:
    """Every rank ends with exit code 4, an error all of them saw: no abort needed."""
    _busy(comm, 5)
    if comm.rank == 0:
        print("cnn-gpu: error: training diverged (as every rank saw)", file=sys.stderr)
    return 4


def gpu(comm: Any, out: Path) -> None:
    """The collectives and the averaging on CuPy arrays (NCCL, or MPI with host copies)."""
    import cnn_gpu.distributed as dist
    from cnn_gpu.backend import require_cupy
    cupy = require_cupy()
    r, n = comm.rank, comm.size
    found: dict[str, Any] = {"name": comm.name, "device": cupy.cuda.Device().id}
    for name, dtype in (("f64", np.float64), ("f32", np.float32), ("i64", np.int64)):
        a = cupy.asarray((np.arange(6, dtype=dtype) + 10 * r).reshape(2, 3))
        comm.allreduce_sum(a)
        found[f"allreduce_{name}"] = a.get()
    b = cupy.full(5, float(r))
    comm.broadcast(b, root=n - 1)
    found["broadcast_last"] = b.get()
    found["allgather"] = cupy.asnumpy(comm.allgather(cupy.asarray([r, r * r], dtype=np.int64)))
    params = [Param(cupy.zeros(shape, dtype)) for shape, dtype in GRAD_LAYOUT]
    for p, g in zip(params, rank_grads(r)):
        p.grad = None if g is None else cupy.asarray(g)
    dist.GradientAverager(comm, params, bucket_bytes=BUCKET_BYTES).average()
    for i, p in enumerate(params):
        found[f"grad{i}"] = p.grad.get()
    state = [cupy.asarray(a) for a in rank_state(r)]
    dist.broadcast_arrays(comm, state, bucket_bytes=BUCKET_BYTES)
    for i, a in enumerate(state):
        found[f"state{i}"] = a.get()
    bn = bn_problem()
    part = dist.shard_slice(len(bn["x"]), r, n)
    dev = {k: cupy.asarray(v) for k, v in bn.items()}
    y, cache = dist.sync_batch_norm_forward(comm, dev["x"][part], dev["gamma"], dev["beta"],
                                            dev["running_mean"], dev["running_var"])
    dx, dgamma, dbeta = dist.sync_batch_norm_backward(comm, dev["dy"][part], cache)
    found.update(bn_y=y.get(), bn_dx=dx.get(), bn_dgamma=dgamma.get(), bn_dbeta=dbeta.get(),
                 bn_running_mean=dev["running_mean"].get(), bn_running_var=dev["running_var"].get())
    cupy.cuda.get_current_stream().synchronize()
    if comm.name == "nccl":
        comm.close()
    np.savez(out / f"rank{r}.npz", **found)


SCENARIOS: dict[str, Callable[[Any, Path], Any]] = {
    "exact": exact, "raise": fails_by_raising, "kill": fails_by_being_killed, "hang": fails_by_hanging,
    "exit": fails_by_exit_code, "exit_all": fails_together, "gpu": gpu,
}


def main(argv: list[str]) -> int:
    scenario, out = argv[0], Path(argv[1])
    import cnn_gpu.distributed as dist
    comm = dist.init(array_backend="cupy" if scenario == "gpu" else "numpy")
    code = SCENARIOS[scenario](comm, out) or 0
    return comm.finish(code, collective=scenario == "exit_all")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
