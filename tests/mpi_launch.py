"""Launching tests/distributed_ranks.py under mpiexec from a test, with a bound on its time.

Tests that launch ranks carry `requires_mpi`, which skips them, saying why, where mpiexec or
mpi4py is missing. Each mpiexec start costs about a second, so a launch runs a whole scenario
and several tests read its files.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from cnn_gpu.distributed import mpi_unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = shutil.which("mpiexec")


def _unavailable() -> str | None:
    if MPIEXEC is None:
        return "mpiexec is not installed (apt-get install openmpi-bin)"
    return mpi_unavailable_reason()  # mpi4py missing, or no MPI library it can load


MPI_UNAVAILABLE = _unavailable()
requires_mpi = pytest.mark.skipif(MPI_UNAVAILABLE is not None, reason=f"needs MPI: {MPI_UNAVAILABLE}")


def _is_open_mpi() -> bool:
    done = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    return "open mpi" in (done.stdout + done.stderr).lower() or "openrte" in (done.stdout + done.stderr).lower()


class Launch(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_ranks(n: int, scenario: str, out: Path, timeout: float, env: dict[str, str] | None = None,
              command_line: list[str] | None = None) -> Launch:
    """mpiexec -n N python -m tests.distributed_ranks SCENARIO OUT, from the repository root
    (command_line: other arguments to python, e.g. ["-m", "cnn_gpu.distributed.bench", ...]).

    A launch still running after `timeout` seconds is killed with all its ranks, and the test
    fails saying so (a hang is what the failure tests look for). Open MPI gets --oversubscribe
    (more ranks than cores) and, as root, the two variables that allow it.
    """
    command = [MPIEXEC, "-n", str(n)]
    environ = rank_environment(env)
    if _is_open_mpi():
        command.append("--oversubscribe")
        # Containers often forbid the cross-process memory reads (CMA) that shared memory uses
        # for large messages ("Read -1, expected ..., errno = 1"): copy through buffers instead.
        environ.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            environ.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command += [sys.executable, *(command_line or ["-m", "tests.distributed_ranks", scenario, str(out)])]
    return _run(command, environ, timeout, f"mpiexec -n {n} ({scenario})")


def run_alone(command_line: list[str], timeout: float, env: dict[str, str] | None = None) -> Launch:
    """python COMMAND_LINE from the repository root in the environment of a rank, without mpiexec
    (a plain process, which runs without MPI)."""
    return _run([sys.executable, *command_line], rank_environment(env), timeout, "python " + " ".join(command_line))


def rank_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ for a rank: one thread (more ranks than cores here), and the NumPy code (the
    ranks need no compiled kernels, and importing Numba would cost each rank a second)."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
               "CNN_GPU_JIT": "0", **(env or {})}
    for var in [v for v in environ if v.startswith(("OMPI_COMM_WORLD", "PMI_", "SLURM_"))]:
        del environ[var]  # a test run under a launcher must not pass its own rank on
    return environ


def _run(command: list[str], environ: dict[str, str], timeout: float, what: str) -> Launch:
    process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # mpiexec and every rank it started
        stdout, stderr = process.communicate()
        pytest.fail(f"{what} still ran after {timeout:g} s: the ranks hung\n"
                    f"stdout:\n{stdout}\nstderr:\n{stderr}")
    return Launch(process.returncode, stdout, stderr)
