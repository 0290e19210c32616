"""The scaling benchmark: images/s of a training step on 1 rank and on N ranks of this machine,
measured in one run, and the time the N ranks spend averaging gradients.

    cnn-gpu bench --ranks 2                                   # launches mpiexec -n 2 itself
    cnn-gpu bench --ranks 2 --nets seed --batch 64 --json scaling.json
    mpiexec -n 2 python -m cnn_gpu.bench.scaling --nets seed  # the same, launched by hand
    OPENBLAS_NUM_THREADS=1 cnn-gpu bench --ranks 2            # one BLAS thread per rank

What a row measures (one network of workloads.NETS, `--batch` images per rank):
    1 rank    rank 0 alone runs training steps of `batch` images (forward, loss, backward, SGD with
              momentum), the plain single-process step, while the other ranks wait sleeping
    N ranks   every rank runs a step of `batch` images (a global batch of N x batch) with the
              gradient averaging of data-parallel training (cnn_gpu.distributed.Replicas)
    speedup   N-rank images/s over 1-rank images/s; efficiency: speedup / N
    averaging the time inside the gradient averaging per N-rank step (its share of the step):
              the allreduce, the packing, and any wait for a slower rank; "alone" times it on
              its own after a barrier, the communication without the wait
    cpu speedup  the speedup the CPU seconds of the computation predict (time.process_time, which
              does not count waiting for a core: what an otherwise idle machine would give, with the
              averaging "alone" added): on a shared machine the wall-clock speedup mostly measures
              the other load, this one the code
The two are timed in alternation, round after round after a warm-up, and each reports the median
over the rounds (a step's time is the slowest rank's): load from other processes on a shared
machine then hits both alike. Inputs are random (workloads.random_batch, another seed per rank).

On a machine shared with other work the N ranks advance in lockstep at the pace of whichever is
descheduled, and Open MPI's waits spin on their core meanwhile; `--mpiexec "mpiexec --mca
mpi_yield_when_idle 1"` makes them yield it. Neither changes the cpu speedup column.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import module_for, synchronize
from ..distributed import Communicator, Replicas, init
from ..functional import softmax_cross_entropy
from ..optim import SGD
from . import workloads
from .run import blas_threads, cpu_name, openblas_env_line

WAIT_POLL = 0.002  # seconds between looks of the ranks that wait while rank 0 runs alone


def training_step(model: Any, x: Any, labels: Any, replicas: Replicas | None,
                  averaging: list[float], computing: list[float]) -> Callable[[], None]:
    """One training step of model on (x, labels); with replicas, the gradients are averaged over
    the ranks and the seconds spent in it appended to `averaging`. The CPU seconds of the rest
    (forward, backward, update: time.process_time, which does not count time the process waits
    for a core) go to `computing`."""
    optimizer = SGD(model.parameters(), lr=workloads.LR, momentum=workloads.MOMENTUM)

    def step() -> None:
        cpu = time.process_time()
        _, dlogits = softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)
        synchronize()
        cpu = time.process_time() - cpu
        if replicas is not None:
            started = time.perf_counter()
            replicas.average_gradients()
            synchronize()
            averaging.append(time.perf_counter() - started)
        resumed = time.process_time()
        optimizer.step()
        optimizer.zero_grad()
        synchronize()
        computing.append(cpu + time.process_time() - resumed)
    return step


def _slowest(comm: Communicator, seconds: float) -> float:
    """The largest of every rank's `seconds`."""
    return float(comm.allgather(np.array([seconds], dtype=np.float64)).max())


def measure(comm: Communicator, net: str, batch: int, backend: str, batch_norm_sync: str, warmup: int,
            repeats: int, steps: int) -> dict[str, Any]:
    """One row: the 1-rank and N-rank step times of `net` at `batch` images per rank (medians)."""
    xp = module_for(backend)
    x, labels = (xp.asarray(a) for a in workloads.random_batch(batch, seed=comm.rank))
    alone = workloads.network(net).to("gpu" if backend == "cupy" else "cpu") if comm.rank == 0 else None
    model = workloads.network(net).to("gpu" if backend == "cupy" else "cpu")
    replicas = Replicas(comm, model, batch_norm_sync)
    averaging: list[float] = []
    computing_n: list[float] = []
    computing_1: list[float] = []
    step_n = training_step(model, x, labels, replicas, averaging, computing_n)
    step_1 = training_step(alone, x, labels, None, [], computing_1) if alone is not None else None

    def run_alone() -> float:
        """Seconds per step of rank 0 alone; the others wait, sleeping."""
        comm.barrier()
        seconds = 0.0
        if step_1 is not None:
            started = time.perf_counter()
            for _ in range(steps):
                step_1()
            synchronize()
            seconds = (time.perf_counter() - started) / steps
        comm.barrier(poll=WAIT_POLL)
        return seconds

    def run_together() -> tuple[float, float]:
        """(seconds per step, seconds of averaging per step), the slowest rank's."""
        comm.barrier()
        del averaging[:]
        started = time.perf_counter()
        for _ in range(steps):
            step_n()
        synchronize()
        seconds = (time.perf_counter() - started) / steps
        return _slowest(comm, seconds), _slowest(comm, sum(averaging) / steps)

    for _ in range(warmup):
        run_alone()
        run_together()
    del computing_1[:], computing_n[:]
    one, together, averaged = [], [], []
    for _ in range(repeats):
        one.append(run_alone())
        t, a = run_together()
        together.append(t)
        averaged.append(a)
    comm_alone = []
    for _ in range(repeats):  # the averaging by itself, every rank arriving together
        comm.barrier()
        synchronize()
        started = time.perf_counter()
        replicas.average_gradients()
        synchronize()
        comm_alone.append(_slowest(comm, time.perf_counter() - started))
    t1 = float(comm.allgather(np.array([statistics.median(one)]))[0, 0])  # rank 0's
    tn, avg = statistics.median(together), statistics.median(averaged)
    ips1, ipsn = batch / t1, comm.size * batch / tn
    # What the two would run at with a core each and no other load: the CPU seconds of the
    # computation (rank 0's alone; the slowest rank's together) plus the averaging on its own.
    cpu1 = float(comm.allgather(np.array([statistics.median(computing_1) if computing_1 else 0.0]))[0, 0])
    cpun = _slowest(comm, statistics.median(computing_n))
    alone_avg = statistics.median(comm_alone)
    grad_bytes = sum(int(np.prod(p.shape)) * p.data.dtype.itemsize for p in model.parameters())
    return {"net": net, "batch_per_rank": batch, "global_batch": comm.size * batch, "ranks": comm.size,
            "one_rank_step_s": t1, "n_rank_step_s": tn, "one_rank_images_per_s": ips1,
            "n_rank_images_per_s": ipsn, "speedup": ipsn / ips1, "efficiency": ipsn / ips1 / comm.size,
            "averaging_s": avg, "averaging_share": avg / tn, "averaging_alone_s": alone_avg,
            "one_rank_cpu_s": cpu1, "n_rank_cpu_s": cpun,
            "cpu_speedup": comm.size * cpu1 / (cpun + alone_avg),
            "gradient_bytes": grad_bytes, "buckets": len(replicas.averager.buckets),
            "spread_n_rank_step_s": [min(together), max(together)], "spread_one_rank_step_s": [min(one), max(one)]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cnn-gpu bench --ranks N", description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", choices=list(workloads.NETS), default=list(workloads.NETS))
    p.add_argument("--batch", type=int, default=64, help="images per rank per step (default 64)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--batch-norm-sync", choices=("local", "sync"), default="local")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported (default 7)")
    p.add_argument("--steps", type=int, default=3, help="training steps per round and phase (default 3)")
    p.add_argument("--json", help="write the rows here (rank 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    comm = init(array_backend=args.backend)
    say = print if comm.rank == 0 else (lambda *_a, **_k: None)
    if comm.size < 2:
        say("the scaling benchmark compares 1 rank with N: run it on 2 or more (cnn-gpu bench --ranks 2, "
            "or mpiexec -n 2 python -m cnn_gpu.bench.scaling)", file=sys.stderr)
        return comm.finish(2)
    threads, source, _ = blas_threads()
    say(f"# {cpu_name()}, {os.cpu_count()} cores; {comm.size} ranks over {comm.name}; {threads} BLAS threads per "
        f"rank ({source}); {args.backend}; batch norm {args.batch_norm_sync}")
    say(f"# {openblas_env_line()}")
    say(f"# medians of {args.repeats} rounds of {args.steps} steps per phase, after {args.warmup} warm-up rounds")
    say(f"{'net':9} {'batch':>5} {'global':>6} | {'1 rank img/s':>12} {f'{comm.size} ranks img/s':>13} "
        f"{'speedup':>7} {'effic.':>6} | {'averaging ms':>12} {'share':>6} {'alone ms':>8} | {'cpu speedup':>11} | "
        f"{'grad MB':>7}")
    rows = []
    for net in args.nets:
        try:
            workloads.network(net).forward(np.zeros((2, *workloads.INPUT_SHAPE), dtype=np.float32))
        except NotImplementedError as exc:  # e.g. mobilenet's grouped convolutions before they land
            say(f"{net:9} skipped: {exc}")
            rows.append({"net": net, "skipped": str(exc)})
            continue
        row = measure(comm, net, args.batch, args.backend, args.batch_norm_sync, args.warmup, args.repeats,
                      args.steps)
        rows.append(row)
        say(f"{net:9} {row['batch_per_rank']:5d} {row['global_batch']:6d} | {row['one_rank_images_per_s']:12.0f} "
            f"{row['n_rank_images_per_s']:13.0f} {row['speedup']:7.2f} {row['efficiency']:6.2f} | "
            f"{row['averaging_s'] * 1e3:12.2f} {row['averaging_share']:6.1%} {row['averaging_alone_s'] * 1e3:8.2f} | "
            f"{row['cpu_speedup']:11.2f} | {row['gradient_bytes'] / 2**20:7.2f}", flush=True)
    if args.json and comm.rank == 0:
        with open(args.json, "w") as f:
            json.dump({"ranks": comm.size, "backend": comm.name, "threads": threads, "rows": rows,
                       "command": "cnn-gpu bench --ranks " + str(comm.size) + " " + " ".join(argv or sys.argv[1:])},
                      f, indent=2)
        say(f"# wrote {args.json}")
    return comm.finish(0)


def launch(argv: list[str]) -> int:
    """`cnn-gpu bench --ranks N [--mpiexec CMD] ...`: run this module under `CMD -n N` (default
    mpiexec), passing the other arguments on. Returns mpiexec's exit code."""
    p = argparse.ArgumentParser(prog="cnn-gpu bench --ranks N", add_help=False)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--mpiexec", default="mpiexec",
                   help="the launcher and its options, e.g. 'mpiexec --oversubscribe' (default mpiexec)")
    known, rest = p.parse_known_args(argv)
    if known.ranks < 2:
        print("cnn-gpu: error: --ranks must be >= 2 (the benchmark compares 1 rank with N)", file=sys.stderr)
        return 2
    command = [*shlex.split(known.mpiexec), "-n", str(known.ranks), sys.executable, "-m", "cnn_gpu.bench.scaling",
               *rest]
    try:
        return subprocess.run(command).returncode
    except FileNotFoundError:
        print(f"cnn-gpu: error: {command[0]} not found: install an MPI (e.g. apt-get install openmpi-bin) "
              "or give --mpiexec", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
