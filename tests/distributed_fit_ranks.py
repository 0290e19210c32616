"""The rank side of the data-parallel training tests: fit() and `cnn-gpu train` under mpiexec.

    mpiexec -n 3 python -m tests.distributed_fit_ranks fit OUT        # fit() on N ranks: OUT/rank<r>.npz
    mpiexec -n 2 python -m tests.distributed_fit_ranks cli OUT train --data-dir ...   # cnn_gpu.cli.main
    mpiexec -n 2 python -m tests.distributed_fit_ranks gpu OUT        # fit() on CuPy (NCCL or MPI host copies)
    mpiexec -n 2 python -m tests.distributed_fit_ranks wait OUT       # rank 0 works alone past the timeout

The problems (CASES, the data) are defined here without MPI, so the test computes the same in one
process and compares. For `cli`, CNN_GPU_TEST_FAULT="what:rank:step" makes one rank fail at its
step-th training step: "kill" (SIGKILL, as the OOM killer), "raise" (a MemoryError, as running
out of memory), "nan" (a NaN loss on that rank only, which the loss sums carry to every rank).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnn_gpu.data.transforms import Augmentation

# ---- the problems: the same on every rank and in the test ---------------------------------------

BATCH = 10       # a global batch of 10: shards of 5 on 2 ranks, 4, 3, 3 on 3
N_TRAIN = 47     # 5 steps an epoch: 10, 10, 10, 10 and a last batch of 7 (3, 2, 2 on 3 ranks)
AUGMENT = Augmentation(max_shift=1, hflip=True)
FAULT_VAR = "CNN_GPU_TEST_FAULT"


def images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images of `shape` and labels in [0, 3): the class lightens one third of the rows,
    so training moves the loss."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 120, (n, *shape)).astype(np.uint8)
    rows = shape[0] // 3
    for k in range(3):
        x[labels == k, k * rows:(k + 1) * rows] += 100
    return x, labels


class Case(NamedTuple):
    """One fit() run compared between N ranks and one process."""

    model: str            # a zoo model
    batch_norm: bool
    input_shape: tuple[int, ...]
    dtype: str
    optimizer: str        # "sgd" or "adam"
    batch_norm_sync: str  # "local" or "sync"
    ema: float = 0.0      # fit's ema_decay: evaluate a moving average of the weights


CASES = {
    "seed_sgd": Case("seed_cnn", False, (28, 28, 1), "float64", "sgd", "local"),
    "seed_adam": Case("seed_cnn", False, (28, 28, 1), "float64", "adam", "local"),
    "seed_bn_sync": Case("seed_cnn", True, (28, 28, 1), "float64", "sgd", "sync"),
    "resnet20_sync": Case("resnet20", True, (8, 8, 1), "float64", "sgd", "sync"),
    "seed_float32": Case("seed_cnn", False, (28, 28, 1), "float32", "sgd", "local"),
    "seed_bn_local": Case("seed_cnn", True, (28, 28, 1), "float64", "sgd", "local"),
    "seed_bn_sync_ema": Case("seed_cnn", True, (28, 28, 1), "float64", "sgd", "sync", ema=0.9),
}


RESUMED = "seed_bn_sync"  # the case resumed across rank counts: N ranks match one process in it


def case_epochs(name: str) -> int:
    """One epoch (five steps) per case; two for the one resumed, so that a run that never stopped
    is there to compare with."""
    return 2 if name == RESUMED else 1


def case_data(case: Case) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Training (N_TRAIN), validation (13: uneven over 2 and 3 ranks) and test (8) images."""
    return {"train": images(N_TRAIN, case.input_shape, 1), "val": images(13, case.input_shape, 2),
            "test": images(8, case.input_shape, 3)}


def case_model(case: Case, seed: int) -> tuple[Any, Any]:
    """The case's model, built with `seed`, and its optimizer."""
    from cnn_gpu import SGD, Adam
    from cnn_gpu.models import build
    model = build(case.model, input_shape=case.input_shape, num_classes=3, batch_norm=case.batch_norm,
                  seed=seed, dtype=case.dtype)
    if case.optimizer == "adam":
        return model, Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return model, SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def fit_case(case: Case, comm: Any = None, epochs: int = 1, out_dir: Any = None, resume: Any = None,
             seed: int = 0, lr: float | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """fit() of the case (the model built with `seed`, on `device`): (model, FitResult)."""
    from cnn_gpu.training import fit
    model, optimizer = case_model(case, seed)
    model.to(device)
    if lr is not None:
        optimizer.lr = lr
    data = case_data(case)
    result = fit(model, optimizer, data["train"], epochs=epochs, batch_size=BATCH, val_data=data["val"],
                 test_data=data["test"], augment=AUGMENT, seed=5, progress=False, log=None, comm=comm,
                 batch_norm_sync=case.batch_norm_sync, out_dir=out_dir, resume=resume, ema_decay=case.ema)
    return model, result


def numbers(record: dict[str, Any]) -> np.ndarray:
    """An epoch record's losses and accuracies, in a fixed order."""
    return np.array([record[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                         "test_loss", "test_accuracy")])


def id_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (4, 4, 1) whose first pixel is their index: which images a shard holds."""
    x = np.zeros((n, 4, 4, 1), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x, np.zeros(n, dtype=np.int64)


# ---- the scenarios ------------------------------------------------------------------------------

def fit_scenario(comm: Any, out: Path) -> None:
    """Set-up, shards, every case of CASES through fit(), resuming, and divergence; everything
    goes to OUT/rank<r>.npz."""
    import cnn_gpu.distributed as dist
    from cnn_gpu.data import BatchIterator
    from cnn_gpu.training import TrainingDiverged
    r = comm.rank
    found: dict[str, Any] = {"size": comm.size}

    # set-up: each rank builds its model with its own seed; afterwards they hold rank 0's
    model, _ = case_model(CASES["seed_bn_local"], seed=100 + r)
    arrays = [p.data for p in model.parameters()]
    for _, value, _, _ in model.named_buffers():
        value += r  # the running statistics differ too
        arrays.append(value)
    found["agree_before"] = dist.ranks_agree(comm, arrays)
    dist.Replicas(comm, model)
    found["agree_after"] = dist.ranks_agree(comm, [p.data for p in model.parameters()] +
                                            [v for _, v, _, _ in model.named_buffers()])
    found["setup_state"] = np.concatenate([v.ravel() for v in model.state_dict().values()])

    # a weight average's buffers, different on every rank (local batch-norm statistics): averaged
    # over the ranks with the model's own
    from cnn_gpu.ema import WeightEMA
    ema = WeightEMA(model, decay=0.9)
    for average in ema.buffers():
        average += r + 1
    dist.Replicas(comm, model).share_running_statistics(ema.buffers())
    found["ema_buffers_agree"] = dist.ranks_agree(comm, ema.buffers())
    found["ema_buffers"] = np.concatenate([a.ravel() for a in ema.buffers()])

    # the images each rank trains on, two epochs, as fit() walks them
    x, y = id_images(N_TRAIN)
    loader = BatchIterator(x, y, BATCH, shuffle=True, seed=5)
    replicas = dist.Replicas(comm, model)
    for epoch in range(2):
        ids = [shard.x[:, 0, 0, 0].astype(np.int64) for shard in replicas.shards(loader.batches(epoch))]
        found[f"ids{epoch}"] = np.concatenate(ids)
        found[f"lens{epoch}"] = np.array([len(i) for i in ids])

    # every case through fit(); rank r writes to OUT/case-rank<r> (only rank 0 may write)
    for name, case in CASES.items():
        model, result = fit_case(case, comm, epochs=case_epochs(name), out_dir=out / f"{name}-rank{r}",
                                 seed=100 + r)
        found[f"{name}_agree"] = dist.ranks_agree(comm, list(model.state_dict().values()))
        for key, value in model.state_dict().items():
            found[f"{name}/{key}"] = value
        found[f"{name}_history"] = np.array([numbers(rec) for rec in result.history])

    # evaluation split over the ranks, also of fewer images than ranks (some slices empty)
    from cnn_gpu.training.evaluate import evaluate_on_ranks
    model, _ = case_model(CASES["seed_bn_sync"], seed=100)
    x, y = case_data(CASES["seed_bn_sync"])["val"]
    found["eval_all"] = np.array(evaluate_on_ranks(model, x.astype(np.float64), y, comm, batch_size=4))
    found["eval_two"] = np.array(evaluate_on_ranks(model, x[:2].astype(np.float64), y[:2], comm))

    # resume on N ranks from the checkpoint one process wrote (the test wrote it before launching)
    case = CASES[RESUMED]
    model, result = fit_case(case, comm, epochs=2, resume=out / "one-rank" / "last.npz",
                             out_dir=out / f"resumed-rank{r}")
    for key, value in model.state_dict().items():
        found[f"resumed/{key}"] = value
    # and an epoch on N ranks for one process to resume from (rank 0 writes OUT/n-ranks-rank0)
    fit_case(case, comm, epochs=1, out_dir=out / f"n-ranks-rank{r}", seed=100 + r)

    # divergence: a learning rate that explodes; every rank must stop at the same step
    try:
        fit_case(CASES["seed_sgd"], comm, epochs=1, lr=1e6)
        found["diverged"] = np.array([0, 0])
    except TrainingDiverged as exc:
        found["diverged"] = np.array([exc.epoch, exc.step])
    np.savez(out / f"rank{r}.npz", **found)


GPU_CASES = ("seed_sgd", "seed_bn_sync", "seed_bn_local")


def gpu_scenario(comm: Any, out: Path) -> None:
    """GPU_CASES through fit() with the models on this rank's GPU; OUT/rank<r>.npz."""
    import cnn_gpu.distributed as dist
    from cnn_gpu.backend import require_cupy
    found: dict[str, Any] = {"name": comm.name, "device": require_cupy().cuda.Device().id}
    for name in GPU_CASES:
        model, result = fit_case(CASES[name], comm, epochs=2, seed=100 + comm.rank, device="gpu")
        found[f"{name}_agree"] = dist.ranks_agree(comm, list(model.state_dict().values()))
        for key, value in model.state_dict().items():
            found[f"{name}/{key}"] = value
        found[f"{name}_history"] = np.array([numbers(rec) for rec in result.history])
    np.savez(out / f"rank{comm.rank}.npz", **found)


def wait_scenario(comm: Any, out: Path) -> None:
    """Rank 0 works alone for 3 s (as when it caches a dataset) while the others wait in an
    unbounded barrier; run with a collective timeout of 1 s, which must not end the job."""
    import time
    if comm.rank == 0:
        time.sleep(3)
    comm.barrier(poll=0.01, bounded=False)
    (out / f"rank{comm.rank}.done").write_text("ok")


def _inject_fault(spec: str, rank: int) -> None:
    """Make this rank fail as CNN_GPU_TEST_FAULT says (see the module docstring)."""
    what, fault_rank, at_step = spec.split(":")
    if int(fault_rank) != rank:
        return
    import cnn_gpu.training.loop as loop
    plain, calls = loop.softmax_cross_entropy, [0]

    def failing(logits: Any, labels: Any, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] == int(at_step):
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "raise":
                raise MemoryError("simulated: out of memory in the forward pass")
            if what == "nan":
                loss, dlogits = plain(logits, labels, *args)
                return loss * np.nan, dlogits
        return plain(logits, labels, *args)

    loop.softmax_cross_entropy = failing


def cli_scenario(argv: list[str]) -> int:
    from cnn_gpu.cli import main
    from cnn_gpu.distributed import detect_launch
    if os.environ.get(FAULT_VAR):
        _inject_fault(os.environ[FAULT_VAR], detect_launch().rank)
    code = main(argv)
    print(f"mpi4py imported: {'mpi4py' in sys.modules}")  # a plain process must run without it
    return code


def main(argv: list[str]) -> int:
    if argv[0] == "cli":
        return cli_scenario(argv[2:])
    import cnn_gpu.distributed as dist
    comm = dist.init(array_backend="cupy" if argv[0] == "gpu" else "numpy")
    {"gpu": gpu_scenario, "wait": wait_scenario, "fit": fit_scenario}[argv[0]](comm, Path(argv[1]))
    return comm.finish(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
