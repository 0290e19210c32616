"""Who launched this process, as which rank, and which GPU it takes: read from the environment.

Distributed runs start the way MPI programs start, one process per rank:

    mpiexec -n 4 cnn-gpu train ...              # Open MPI or MPICH, one machine
    mpirun -H a,b -n 8 cnn-gpu train ...        # across machines
    srun -n 8 --gpus-per-task 1 cnn-gpu train ...

The launcher tells each process its rank in environment variables, so a process can know it is
one of several before (and without) importing mpi4py. A process that no launcher started runs
alone, exactly as before, and never imports mpi4py.

    Open MPI            OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
    MPICH, Intel MPI    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
    Slurm's srun        SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID

Slurm's size is the step's (SLURM_STEP_NUM_TASKS, which srun sets), not the job's SLURM_NTASKS:
a batch script of a 4-task job has SLURM_NTASKS=4 and SLURM_PROCID=0 in its own environment too,
and a plain `python train.py` there is one process, not rank 0 of 4.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import NamedTuple

from ..backend import cupy_unavailable_reason, require_cupy


class LaunchInfo(NamedTuple):
    """This process's place in a launch. local_rank/local_size: among the ranks on this machine
    (None where the launcher does not say; the MPI communicator then asks MPI)."""

    launcher: str           # "none", "openmpi", "mpich" or "slurm"
    rank: int
    size: int
    local_rank: int | None
    local_size: int | None
    variables: str          # the variables read, for messages: "OMPI_COMM_WORLD_RANK=1, ..."

    @property
    def distributed(self) -> bool:
        """True when a launcher started more than one rank."""
        return self.size > 1


# (launcher, rank, size, local rank, local size); the first whose rank and size are both set wins.
# Open MPI first: an mpirun inside a Slurm allocation also inherits the job's SLURM_* variables.
_LAUNCHERS = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
)

SINGLE = LaunchInfo("none", 0, 1, 0, 1, "")


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """This process's launch, from the environment (default os.environ); SINGLE when no launcher
    set its variables. Raises ValueError for variables that are not integers or out of range."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_var, local_size_var in _LAUNCHERS:
        if rank_var not in env or size_var not in env:
            continue
        names = [v for v in (rank_var, size_var, local_var, local_size_var) if v is not None and v in env]
        variables = ", ".join(f"{v}={env[v]}" for v in names)
        rank, size = _integer(env, rank_var, variables), _integer(env, size_var, variables)
        local_rank = _integer(env, local_var, variables) if local_var and local_var in env else None
        local_size = _integer(env, local_size_var, variables) if local_size_var and local_size_var in env else None
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"the launcher's variables make no sense: rank {rank} of {size} ({variables})")
        if local_rank is not None and local_rank < 0:
            raise ValueError(f"the launcher's local rank is negative ({variables})")
        return LaunchInfo(launcher, rank, size, local_rank, local_size, variables)
    return SINGLE


def _integer(env: Mapping[str, str], name: str, variables: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {env[name]!r} ({variables})") from None


def gpu_for_rank(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses: its rank on the machine modulo the GPUs it sees.

    With one GPU per rank (srun --gpus-per-task 1, or CUDA_VISIBLE_DEVICES set per rank) each rank
    sees one device and takes device 0; with all GPUs visible, local ranks 0, 1, ... take 0, 1, ...
    More ranks than GPUs share them round-robin (slower, but it runs).
    """
    if device_count < 1:
        raise ValueError(f"no GPU to choose from (device count {device_count})")
    if local_rank < 0:
        raise ValueError(f"local rank must be >= 0, got {local_rank}")
    return local_rank % device_count


def use_gpu_for_rank(local_rank: int) -> int:
    """Make this rank's GPU (gpu_for_rank) CuPy's current device, before anything is allocated
    on it. Returns the device id."""
    cupy = require_cupy()
    device = gpu_for_rank(local_rank, cupy.cuda.runtime.getDeviceCount())
    cupy.cuda.Device(device).use()
    return device


# ---- what can run here (for `cnn-gpu info`) -----------------------------------------------------

class BackendStatus(NamedTuple):
    """Whether a communication backend can run here; detail says what was found, or why not."""

    name: str      # "mpi" or "nccl"
    usable: bool
    detail: str


# Loads the MPI library without initializing MPI (MPI_Get_library_version may be called before
# MPI_Init), in a child process: a library that does not match mpi4py's build can crash on load.
_MPI_PROBE = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
              "print(MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()); print(mpi4py.__version__)")


def mpi_unavailable_reason() -> str | None:
    """Why mpi4py cannot run here (not installed, no MPI library), or None when it can. Probes in
    a child process, so this process never loads mpi4py."""
    usable, detail = _mpi_status()
    return None if usable else detail


def _mpi_status() -> tuple[bool, str]:
    if importlib.util.find_spec("mpi4py") is None:
        return False, ("mpi4py is not installed (pip install cnn_gpu[mpi], "
                       "and an MPI library, e.g. apt-get install openmpi-bin)")
    found = _probe_mpi()
    if isinstance(found, str):
        return False, found
    library, version = found
    return True, f"mpi4py {version}, {library}"


def _probe_mpi() -> tuple[str, str] | str:
    """(MPI library version line, mpi4py version), or a string saying why not."""
    try:
        done = subprocess.run([sys.executable, "-c", _MPI_PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mpi4py could not be probed ({exc})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"mpi4py is installed but no MPI library loads ({last})"
    library, version = (done.stdout.strip().splitlines() + ["?", "?"])[:2]
    return library, version


def backend_report(environ: Mapping[str, str] | None = None) -> list[BackendStatus]:
    """Which communication backends can run here, and why not: one BackendStatus for MPI
    (mpi4py installed? an MPI library found? launched under MPI?) and one for NCCL
    (cupy.cuda.nccl loads? a GPU?). For `cnn-gpu info`; never initializes MPI or NCCL."""
    launch = detect_launch(environ)
    where = (f"launched as rank {launch.rank} of {launch.size} by {launch.launcher}" if launch.launcher != "none"
             else "not launched under MPI (start with mpiexec -n N or srun to use it)")
    usable, detail = _mpi_status()
    mpi = BackendStatus("mpi", usable, f"{detail}; {where}" if usable else detail)
    return [mpi, BackendStatus("nccl", *_nccl_status())]


def nccl_unavailable_reason() -> str | None:
    """Why NCCL cannot run here (no GPU, cupy.cuda.nccl does not load libnccl), or None when it can."""
    usable, detail = _nccl_status()
    return None if usable else detail


def _nccl_status() -> tuple[bool, str]:
    gpu_reason = cupy_unavailable_reason()
    if gpu_reason is not None:
        return False, f"needs a GPU: {gpu_reason}"
    cupy = require_cupy()
    try:
        nccl = import_nccl()
    except ImportError as exc:
        return False, f"cupy.cuda.nccl does not import ({exc})"
    if not getattr(nccl, "available", False):
        return False, (f"CuPy {cupy.__version__} finds no NCCL library (libnccl.so.2); "
                       "pip install the nvidia-nccl wheel for CuPy's CUDA (e.g. nvidia-nccl-cu12)")
    try:
        version = nccl.get_version()
    except Exception as exc:  # a library that loads but does not answer
        return False, f"the NCCL library does not answer ({exc})"
    return True, f"NCCL {version // 10000}.{version // 100 % 100}.{version % 100} through CuPy {cupy.__version__}"


def import_nccl() -> ModuleType:
    """cupy.cuda.nccl (its `available` is False where no libnccl loads). Only once CuPy runs."""
    require_cupy()
    with warnings.catch_warnings():  # CuPy warns when libnccl is missing; the callers say why
        warnings.simplefilter("ignore")
        return importlib.import_module("cupy.cuda.nccl")
