"""The time of the communication alone: an allreduce by message size, and the gradient averaging
of the zoo's networks, with the latency and bandwidth of the ring cost model fitted to them.

    mpiexec -n 2 python -m cnn_gpu.distributed.bench                 # NumPy arrays over MPI
    mpiexec -n 2 python -m cnn_gpu.distributed.bench --arrays cupy   # NCCL (or MPI's host copies)
    mpiexec -n 2 python -m cnn_gpu.distributed.bench --json out.json

Cost model (a ring allreduce of S bytes over N ranks: a reduce-scatter and an allgather, each of
N - 1 steps moving S / N bytes):

    t(S) = 2 (N - 1) * latency + 2 (N - 1) / N * S / bandwidth

A line t = a + b S fitted to the measured sizes (least squares of the relative error) gives
latency = a / (2 (N - 1)) and bandwidth = 2 (N - 1) / (N b). MPI may pick other algorithms (recursive doubling for small
messages, shared memory on one machine); the fitted numbers then describe this machine's
allreduce in the model's terms, which is what the cost model needs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .buckets import GradientAverager
from .comm import Communicator, init

SIZES = [1 << k for k in range(10, 25, 2)]  # bytes: 1 KiB ... 16 MiB
# Gradient sizes (float32 elements) of networks to time whole; those of the zoo are counted from
# the models where they exist.
OTHER_NETWORKS = {"resnet20 (CIFAR-10, about 0.27M; not in the zoo yet)": 272_474}


def _zoo() -> dict[str, list[tuple[tuple[int, ...], str]]]:
    """(shape, dtype) of each parameter of the zoo's networks."""
    from ..models import seed_cnn
    nets = {"seed_cnn": seed_cnn(), "seed_cnn --batch-norm": seed_cnn(batch_norm=True)}
    return {name: [(p.data.shape, str(p.data.dtype)) for p in net.parameters()] for name, net in nets.items()}


def _time(comm: Communicator, run: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    """The median over `repeats` of the slowest rank's seconds for one run()."""
    for _ in range(3):  # warm-up: connections, buffers
        run()
    sync()
    times = []
    for _ in range(repeats):
        comm.barrier()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    per_rank = comm.allgather(np.array(times))  # (ranks, repeats)
    return float(np.median(np.max(per_rank, axis=0)))


def fit_ring(sizes: list[int], seconds: list[float], n: int) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of the ring model fitted to t(S) by least squares of the
    relative error (plain least squares would let the largest message alone set the latency)."""
    t = np.asarray(seconds, dtype=np.float64)
    b, a = np.polyfit(np.asarray(sizes, dtype=np.float64), t, 1, w=1.0 / t)
    steps = 2 * (n - 1)
    return a / steps, steps / n / b


class _Param:
    def __init__(self, data: Any) -> None:
        self.data, self.grad = data, None


def run(arrays: str = "numpy", repeats: int = 20, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Time the allreduce sweep and the networks' gradient averaging; rank 0 logs a table.
    Returns the numbers (on every rank)."""
    comm = init(array_backend=arrays)
    if comm.size < 2:
        raise SystemExit("run this under a launcher with at least 2 ranks: mpiexec -n 2 python -m "
                         "cnn_gpu.distributed.bench")
    if arrays == "cupy":
        from ..backend import require_cupy
        xp = require_cupy()

        def sync() -> None:
            xp.cuda.get_current_stream().synchronize()
    else:
        xp = np

        def sync() -> None:
            pass
    say = log if comm.rank == 0 else (lambda _m: None)
    say(f"allreduce_sum over {comm.size} ranks, {comm.name}, {arrays} arrays; median of {repeats}, slowest rank")
    say(f"{'bytes':>10} {'us':>10} {'GB/s (bus)':>11}")
    sweep = []
    for size in SIZES:
        buffer = xp.ones(size // 4, dtype=np.float32)
        seconds = _time(comm, lambda b=buffer: comm.allreduce_sum(b), sync, repeats)
        bus = 2 * (comm.size - 1) / comm.size * size / seconds / 1e9  # the ring's bytes per link
        sweep.append({"bytes": size, "seconds": seconds})
        say(f"{size:>10} {seconds * 1e6:>10.1f} {bus:>11.3f}")
    latency, bandwidth = fit_ring([s["bytes"] for s in sweep], [s["seconds"] for s in sweep], comm.size)
    say(f"ring model fitted: latency {latency * 1e6:.2f} us per step, bandwidth {bandwidth / 1e9:.3f} GB/s")
    networks = {name: layout for name, layout in _zoo().items()}
    networks.update({name: [((count,), "float32")] for name, count in OTHER_NETWORKS.items()})
    say(f"{'gradient averaging (GradientAverager.average)':<52} {'params':>9} {'us':>10} {'model us':>9}")
    timed = []
    for name, layout in networks.items():
        params = [_Param(xp.zeros(shape, dtype=dtype)) for shape, dtype in layout]
        for p in params:
            p.grad = xp.ones(p.data.shape, dtype=p.data.dtype)
        averager = GradientAverager(comm, params)  # pack, allreduce, 1/N, unpack; .grad in place
        seconds = _time(comm, averager.average, sync, repeats)
        count = sum(int(np.prod(shape)) for shape, _ in layout)
        size = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout)
        model = 2 * (comm.size - 1) * latency + 2 * (comm.size - 1) / comm.size * size / bandwidth
        timed.append({"network": name, "parameters": count, "bytes": size, "buckets": len(averager.buckets),
                      "seconds": seconds, "model_seconds": model})
        say(f"{name:<52} {count:>9,} {seconds * 1e6:>10.1f} {model * 1e6:>9.1f}")
    return {"rank": comm.rank, "ranks": comm.size, "backend": comm.name, "arrays": arrays, "sweep": sweep,
            "latency_seconds": latency, "bandwidth_bytes_per_second": bandwidth, "networks": timed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn_gpu.distributed.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the numbers here (rank 0)")
    args = parser.parse_args(argv)
    results = run(args.arrays, args.repeats)
    if args.json and results["rank"] == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
