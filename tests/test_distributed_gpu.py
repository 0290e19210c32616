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

from . import distributed_fit_ranks as fit_ranks
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


# ---- fit() on GPUs: N ranks against one process on the CPU -----------------------------------------

def _launch_fit(n: int, backend: str, tmp_path) -> list[dict]:
    done = run_ranks(n, "gpu", tmp_path, timeout=300, env={"CNN_GPU_DIST_BACKEND": backend},
                     command_line=["-m", "tests.distributed_fit_ranks", "gpu", str(tmp_path)])
    assert done.returncode == 0, f"mpiexec -n {n} ({backend}) failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]


def _check_fit(found: list[dict]) -> None:
    """The weights and metrics of one CPU process, to the rounding of another device's sums;
    with local batch norm only the replicas' agreement."""
    for name in fit_ranks.GPU_CASES:
        model, result = fit_ranks.fit_case(fit_ranks.CASES[name], epochs=2, seed=100)
        for r, f in enumerate(found):
            assert bool(f[f"{name}_agree"]), f"{name}: rank {r} differs"
            if fit_ranks.CASES[name].batch_norm_sync == "local" and len(found) > 1:
                continue
            for key, value in model.state_dict().items():
                np.testing.assert_allclose(f[f"{name}/{key}"], value, rtol=1e-8, atol=1e-10, err_msg=f"{name} {key}")
            np.testing.assert_allclose(f[f"{name}_history"], [fit_ranks.numbers(rec) for rec in result.history],
                                       rtol=1e-8, atol=1e-10)


@requires_nccl
def test_fit_on_one_nccl_rank_equals_the_cpu(tmp_path):
    _check_fit(_launch_fit(1, "nccl", tmp_path))


def test_fit_on_two_ranks_with_mpi_host_copies_equals_one_cpu_process(tmp_path):
    _check_fit(_launch_fit(2, "mpi", tmp_path))


@requires_nccl
@pytest.mark.skipif(_gpu_count() < 2, reason="NCCL with two ranks needs two GPUs")
def test_fit_on_two_nccl_ranks_equals_one_cpu_process(tmp_path):
    found = _launch_fit(2, "nccl", tmp_path)
    assert [str(f["name"]) for f in found] == ["nccl", "nccl"]
    _check_fit(found)
