"""cnn_gpu.distributed on CuPy arrays: NCCL, and MPI with host copies. GPU machines only.

NCCL cannot put two ranks on one GPU, so with one GPU NCCL runs as one rank (every code path of
NCCLCommunicator: the unique id over MPI, allreduce, broadcast, allgather, the event watchdog)
and two ranks share the GPU over MPI's host copies; with two GPUs or more, two NCCL ranks.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import cupy_available, require_cupy
from cnn_gpu.distributed import nccl_unavailable_reason

from .conftest import requires_gpu
from .mpi_launch import requires_mpi, run_ranks
from .test_distributed_mpi import check_broadcast, check_collectives, check_gradient_average, check_sync_batch_norm

pytestmark = [pytest.mark.gpu, requires_gpu, requires_mpi]

NCCL_UNAVAILABLE = nccl_unavailable_reason()  # None, or why not (no GPU, no libnccl)
requires_nccl = pytest.mark.skipif(NCCL_UNAVAILABLE is not None, reason=f"needs NCCL: {NCCL_UNAVAILABLE}")


def _gpu_count() -> int:
    return require_cupy().cuda.runtime.getDeviceCount() if cupy_available() else 0


def _launch(n: int, backend: str, tmp_path) -> list[dict]:
    done = run_ranks(n, "gpu", tmp_path, timeout=300, env={"CNN_GPU_DIST_BACKEND": backend})
    assert done.returncode == 0, f"mpiexec -n {n} ({backend}) failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]


def _check(n: int, found: list[dict], name: str) -> None:
    for f in found:
        assert str(f["name"]) == name
    check_collectives(n, found)
    check_gradient_average(n, found)
    check_broadcast(found)
    check_sync_batch_norm(found)


@requires_nccl
def test_nccl_one_rank(tmp_path):
    _check(1, _launch(1, "nccl", tmp_path), "nccl")


def test_mpi_host_copies_two_ranks(tmp_path):
    found = _launch(2, "mpi", tmp_path)
    _check(2, found, "mpi")
    if _gpu_count() >= 2:
        assert [int(f["device"]) for f in found] == [0, 1]  # local rank modulo the GPUs


@requires_nccl
@pytest.mark.skipif(_gpu_count() < 2, reason="NCCL with two ranks needs two GPUs")
def test_nccl_two_ranks(tmp_path):
    found = _launch(2, "nccl", tmp_path)
    _check(2, found, "nccl")
    assert [int(f["device"]) for f in found] == [0, 1]
