"""Communicators: the collectives data parallelism needs, over MPI, NCCL or nothing.

Every communicator has the same members:

    rank, size, local_rank, local_size, name      # name: "single", "mpi" or "nccl"
    broadcast(a, root=0)        # in place: every rank's a becomes root's
    allreduce_sum(a)            # in place: every rank's a becomes the sum over ranks
    allgather(a) -> (size, *a.shape), row r from rank r
    barrier(poll=None, bounded=True)   # poll: sleep between looks; bounded=False: no deadline (MPICommunicator)
    sum_scalars([x, y, ...]) -> (sum x, sum y, ...) as floats (metrics: loss sums and counts)
    abort(message, exit_code)   # prints 'cnn-gpu: error: rank r of n: message', stops every rank
    finish(exit_code) -> exit_code   # the end of main(): a non-zero code on one rank stops all
    close()

Arrays are NumPy or CuPy, C-contiguous (the results are written into them). Which communicator
runs (choose_backend, init):
- one process: SingleProcess, where every collective is the identity and mpi4py is never imported;
- NumPy arrays: MPICommunicator (mpi4py's buffer-based Allreduce/Bcast/Allgather/Barrier, never
  the pickle-based lowercase methods);
- CuPy arrays: NCCLCommunicator (cupy.cuda.nccl on the current stream; MPI only sets it up and
  carries host arrays), or where NCCL cannot run, MPICommunicator, which copies GPU arrays to the
  host and back around each collective, said once in the log.

All ranks must call the same collectives in the same order with arrays of the same shapes and
dtypes; a collective that waits longer than the timeout (watchdog.py) aborts the job.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import numpy as np

from ..backend import get_array_module, is_cupy_array, require_cupy
from .launch import LaunchInfo, detect_launch, import_nccl, nccl_unavailable_reason, use_gpu_for_rank
from .watchdog import Watchdog, format_failure, install_excepthook, timeout_from_env

BACKENDS = ("auto", "single", "mpi", "nccl")
BACKEND_VAR = "CNN_GPU_DIST_BACKEND"


class DistributedError(RuntimeError):
    """A distributed run cannot start or go on (a missing library, ranks that disagree)."""


def _check_buffer(a: Any, what: str) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: the array must be C-contiguous (the result is written into it), "
                         f"got one of shape {tuple(a.shape)} and strides {tuple(a.strides)}")


class Communicator:
    """What every communicator shares: its place in the job, and how it stops."""

    name = "?"

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank {self.rank} of {self.size}, "
                f"local rank {self.local_rank} of {self.local_size})")

    def sum_scalars(self, values: Sequence[float]) -> tuple[float, ...]:
        """The sums over ranks of a few numbers (loss sums, counts of right answers and of images).
        Counts are exact up to 2**53: they travel as float64."""
        buffer = np.array([float(v) for v in values], dtype=np.float64)
        self.allreduce_sum(buffer)
        return tuple(float(v) for v in buffer)

    def abort(self, message: str, exit_code: int = 1) -> NoReturn:
        """Print 'cnn-gpu: error: rank r of n: message' on stderr and stop every rank."""
        sys.stderr.write(format_failure(self.rank, self.size, message) + "\n")
        sys.stderr.flush()
        self._stop_all(exit_code)

    def finish(self, exit_code: int, collective: bool = False) -> int:
        """Call with main()'s exit code before returning it. With several ranks a non-zero code
        stops every rank (returning would leave the others waiting for this one for ever).

        collective=True says every rank ends here with the same code (an error all ranks saw,
        e.g. a diverged loss reduced over ranks): they meet in a barrier and return it, and
        mpiexec ends with it, without an abort."""
        if exit_code and self.size > 1:
            if collective:
                self.barrier()
                return exit_code
            self.abort(f"exited with code {exit_code}", exit_code)
        return exit_code

    def _stop_all(self, exit_code: int) -> NoReturn:
        raise SystemExit(exit_code)

    def close(self) -> None:
        """Release what the communicator holds (NCCL's communicator); collectives end here."""

    # The collectives, which each communicator implements (see the module's docstring).
    def broadcast(self, a: Any, root: int = 0) -> None:
        raise NotImplementedError

    def allreduce_sum(self, a: Any) -> None:
        raise NotImplementedError

    def allgather(self, a: Any) -> Any:
        raise NotImplementedError

    def barrier(self, poll: float | None = None, bounded: bool = True) -> None:
        raise NotImplementedError


class SingleProcess(Communicator):
    """One process: every collective is the identity. abort() raises SystemExit."""

    name = "single"

    def __init__(self) -> None:
        super().__init__(rank=0, size=1, local_rank=0, local_size=1)

    def broadcast(self, a: Any, root: int = 0) -> None:
        if root != 0:
            raise ValueError(f"broadcast: root must be a rank in [0, 1), got {root}")

    def allreduce_sum(self, a: Any) -> None:
        pass

    def allgather(self, a: Any) -> Any:
        """a (...) -> (1, ...), a copy."""
        return a[None].copy()

    def barrier(self, poll: float | None = None, bounded: bool = True) -> None:
        pass


class MPICommunicator(Communicator):
    """MPI through mpi4py's buffer-based collectives. CuPy arrays are copied to the host and back
    around each collective (an MPI build that reads GPU memory is not assumed).

    Importing this module does not import mpi4py; creating one does (and so initializes MPI).
    """

    name = "mpi"

    def __init__(self, timeout: float | None = None) -> None:
        from mpi4py import MPI  # here, not at the top: only where MPI was asked for or launched
        self._MPI = MPI
        if not MPI.Is_initialized():  # mpi4py.rc.initialize was turned off before the import
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
            atexit.register(lambda: MPI.Is_finalized() or MPI.Finalize())
        self._comm = MPI.COMM_WORLD
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._comm.Get_rank())  # the ranks on this machine
        super().__init__(self._comm.Get_rank(), self._comm.Get_size(), node.Get_rank(), node.Get_size())
        node.Free()
        # Abort from the watchdog's thread is allowed only where MPI runs with THREAD_MULTIPLE
        # (mpi4py's default); elsewhere the watchdog ends this process, and mpiexec the others.
        self._threads_ok = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.watchdog = Watchdog(timeout, self._timed_out)

    def close(self) -> None:
        self.watchdog.stop()

    def broadcast(self, a: Any, root: int = 0) -> None:
        """a on every rank becomes a on root (in place)."""
        self._check_root(root, "broadcast")
        _check_buffer(a, "broadcast")
        if is_cupy_array(a):
            host = a.get()
            with self.watchdog.guard("broadcast"):
                self._comm.Bcast(host, root=root)
            a.set(host)
            return
        with self.watchdog.guard("broadcast"):
            self._comm.Bcast(a, root=root)

    def allreduce_sum(self, a: Any) -> None:
        """a on every rank becomes the sum of a over ranks (in place)."""
        _check_buffer(a, "allreduce_sum")
        if is_cupy_array(a):
            host = a.get()
            with self.watchdog.guard("allreduce_sum"):
                self._comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
            a.set(host)
            return
        with self.watchdog.guard("allreduce_sum"):
            self._comm.Allreduce(self._MPI.IN_PLACE, a, op=self._MPI.SUM)

    def allgather(self, a: Any) -> Any:
        """a (...) -> (size, ...): row r is rank r's a. A new array, on a's device."""
        xp = get_array_module(a)
        send = np.ascontiguousarray(a.get() if is_cupy_array(a) else a)
        out = np.empty((self.size,) + send.shape, dtype=send.dtype)
        with self.watchdog.guard("allgather"):
            self._comm.Allgather(send, out)
        return xp.asarray(out)

    def barrier(self, poll: float | None = None, bounded: bool = True) -> None:
        """Every rank reaches this point. poll: seconds to sleep between looks at a non-blocking
        barrier, for a wait of seconds (the other ranks while rank 0 writes files or evaluates
        alone): MPI's own wait spins on a core, which a shared machine wants back. None: MPI's wait.
        bounded=False: no watchdog deadline, for a wait on rank 0's own work of unknown length
        (reading or caching a dataset, plotting), where rank 0's failure stops every rank anyway."""
        with self.watchdog.guard("barrier") if bounded else contextlib.nullcontext():
            if poll is None:
                self._comm.Barrier()
                return
            request = self._comm.Ibarrier()
            while not request.Test():
                time.sleep(poll)

    def _check_root(self, root: int, what: str) -> None:
        if not 0 <= root < self.size:
            raise ValueError(f"{what}: root must be a rank in [0, {self.size}), got {root}")

    def _timed_out(self, message: str) -> None:
        self.abort(message, 1)

    def _stop_all(self, exit_code: int) -> NoReturn:
        if self._threads_ok or threading.current_thread() is threading.main_thread():
            self._comm.Abort(exit_code)  # mpiexec kills every rank
        os._exit(exit_code)  # mpiexec sees a rank end without MPI_Finalize and kills the others


# NCCL's datatype for each NumPy dtype character (cupy.cuda.nccl constants), looked up by name
# so that this table needs no NCCL to be read.
_NCCL_TYPES = {"b": "NCCL_INT8", "B": "NCCL_UINT8", "i": "NCCL_INT32", "I": "NCCL_UINT32",
               "l": "NCCL_INT64", "L": "NCCL_UINT64", "q": "NCCL_INT64", "Q": "NCCL_UINT64",
               "e": "NCCL_FLOAT16", "f": "NCCL_FLOAT32", "d": "NCCL_FLOAT64"}
NCCL_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES: the size of the id every rank needs to join


class NCCLCommunicator(Communicator):
    """NCCL on CuPy arrays, queued on the current CUDA stream (so ordered with the kernels that
    make and use the arrays; the host does not wait). The unique id that joins the ranks is
    broadcast over MPI, and NumPy arrays given to it go over MPI too.

    The current CuPy device must be this rank's GPU when it is created (init() sees to that).
    Each collective records an event that the watchdog polls: a collective still running after
    the timeout, or an asynchronous NCCL error, aborts the job.
    """

    name = "nccl"

    def __init__(self, mpi: MPICommunicator) -> None:
        super().__init__(mpi.rank, mpi.size, mpi.local_rank, mpi.local_size)
        self._cupy = require_cupy()
        self._nccl = import_nccl()
        if not getattr(self._nccl, "available", False):
            raise DistributedError(f"NCCL cannot run: {nccl_unavailable_reason()}")
        self.mpi = mpi
        unique_id = np.zeros(NCCL_ID_BYTES, dtype=np.int64)  # signed chars, one per element
        if mpi.rank == 0:
            id_bytes = self._nccl.get_unique_id()
            if len(id_bytes) != NCCL_ID_BYTES:
                raise DistributedError(f"NCCL's unique id has {len(id_bytes)} bytes, expected {NCCL_ID_BYTES}")
            unique_id[:] = id_bytes
        mpi.broadcast(unique_id, root=0)
        with mpi.watchdog.guard("NCCL's set-up (ncclCommInitRank)"):
            self._comm = self._nccl.NcclCommunicator(mpi.size, tuple(int(v) for v in unique_id), mpi.rank)
        self.device = self._cupy.cuda.Device().id
        self._types = {char: getattr(self._nccl, name) for char, name in _NCCL_TYPES.items()}
        self.watchdog = Watchdog(mpi.watchdog.timeout, self._timed_out, check=self._async_error)

    def broadcast(self, a: Any, root: int = 0) -> None:
        """a on every rank becomes a on root (in place); queued on the current stream."""
        if not is_cupy_array(a):
            self.mpi.broadcast(a, root)
            return
        self.mpi._check_root(root, "broadcast")
        _check_buffer(a, "broadcast")
        stream = self._cupy.cuda.get_current_stream()
        self._comm.bcast(a.data.ptr, a.size, self._type(a), root, stream.ptr)
        self._watch(stream, "broadcast")

    def allreduce_sum(self, a: Any) -> None:
        """a on every rank becomes the sum over ranks (in place); queued on the current stream."""
        if not is_cupy_array(a):
            self.mpi.allreduce_sum(a)
            return
        _check_buffer(a, "allreduce_sum")
        stream = self._cupy.cuda.get_current_stream()
        self._comm.allReduce(a.data.ptr, a.data.ptr, a.size, self._type(a), self._nccl.NCCL_SUM, stream.ptr)
        self._watch(stream, "allreduce_sum")

    def allgather(self, a: Any) -> Any:
        """a (...) -> (size, ...): row r is rank r's a; queued on the current stream."""
        if not is_cupy_array(a):
            return self.mpi.allgather(a)
        send = self._cupy.ascontiguousarray(a)
        out = self._cupy.empty((self.size,) + send.shape, dtype=send.dtype)
        stream = self._cupy.cuda.get_current_stream()
        self._comm.allGather(send.data.ptr, out.data.ptr, send.size, self._type(send), stream.ptr)
        self._watch(stream, "allgather")
        return out

    def barrier(self, poll: float | None = None, bounded: bool = True) -> None:
        """Every rank's host reaches this point (queued GPU work may still be running)."""
        self.mpi.barrier(poll, bounded)

    def sum_scalars(self, values: Sequence[float]) -> tuple[float, ...]:
        return self.mpi.sum_scalars(values)  # a few host numbers: MPI, without a device round trip

    def close(self) -> None:
        self.watchdog.stop()
        self._comm.destroy()

    def _type(self, a: Any) -> int:
        try:
            return self._types[a.dtype.char]
        except KeyError:
            raise TypeError(f"NCCL has no type for {a.dtype}; use one of "
                            f"{sorted({str(np.dtype(c)) for c in _NCCL_TYPES})}") from None

    def _watch(self, stream: Any, what: str) -> None:
        event = self._cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self.watchdog.watch_event(event, f"NCCL {what}")

    def _async_error(self) -> str | None:
        try:
            self._comm.check_async_error()
        except Exception as exc:  # NcclError: a peer failed, or the network did
            return f"NCCL reported an error: {exc}"
        return None

    def _timed_out(self, message: str) -> None:
        self.abort(message, 1)

    def _stop_all(self, exit_code: int) -> NoReturn:
        try:
            self._comm.abort()  # frees GPUs blocked in NCCL kernels
        finally:
            self.mpi._stop_all(exit_code)


# ---- choosing and starting one --------------------------------------------------------------------

class BackendChoice(NamedTuple):
    """The communicator to start, and a note for the log (None when there is nothing to say)."""

    name: str  # "single", "mpi" or "nccl"
    note: str | None


def choose_backend(requested: str, array_backend: str, launch: LaunchInfo,
                   nccl_reason: str | None) -> BackendChoice:
    """Which communicator to start, from what was asked for and what can run.

    requested: "auto" | "single" | "mpi" | "nccl". array_backend: where the model trains,
    "numpy" or "cupy". nccl_reason: why NCCL cannot run here, None when it can (only read for
    "cupy"). "auto" picks: one process -> single; CuPy -> NCCL, else MPI with host copies;
    NumPy -> MPI. Raises DistributedError for a choice that cannot run.
    """
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        raise ValueError(f"the communication backend must be one of {BACKENDS}, got {requested!r}")
    if array_backend not in ("numpy", "cupy"):
        raise ValueError(f"array_backend must be 'numpy' or 'cupy', got {array_backend!r}")
    host_copies = (f"NCCL cannot run ({nccl_reason}); GPU arrays are copied to the host and back "
                   "around each MPI collective")
    if requested == "single" or (requested == "auto" and not launch.distributed):
        if launch.distributed:
            raise DistributedError(f"the single-process backend was asked for, but {launch.launcher} started "
                                   f"{launch.size} ranks ({launch.variables}); each would train alone")
        return BackendChoice("single", None)
    if requested == "nccl":
        if array_backend != "cupy":
            raise DistributedError("NCCL was asked for, but the model trains on NumPy arrays; "
                                   "NCCL needs the cupy backend (or ask for mpi)")
        if nccl_reason is not None:
            raise DistributedError(f"NCCL was asked for but cannot run: {nccl_reason}")
        return BackendChoice("nccl", None)
    if array_backend == "cupy" and (requested == "mpi" or nccl_reason is not None):
        return BackendChoice("mpi", host_copies if nccl_reason is not None else
                             "MPI was asked for: GPU arrays are copied to the host and back around each collective")
    return BackendChoice("nccl" if array_backend == "cupy" else "mpi", None)


def init(array_backend: str = "numpy", backend: str | None = None, environ: Mapping[str, str] | None = None,
         timeout: float | None | str = "env", log: Callable[[str], Any] | None = print) -> Communicator:
    """Start this process's communicator. Call it before anything is put on a GPU: with CuPy it
    makes this rank's GPU (local rank modulo the GPUs seen) the current device.

    array_backend: "numpy" or "cupy", where the model trains. backend: "auto" | "single" | "mpi" |
    "nccl" (None: $CNN_GPU_DIST_BACKEND, else "auto"). timeout: seconds a collective may wait
    ("env": $CNN_GPU_DIST_TIMEOUT, default 600; None: no bound). log: where the one note about
    the choice goes, printed by rank 0 only (None: nowhere).

    A process that no launcher started gets SingleProcess (and mpi4py is not imported) unless MPI
    or NCCL is asked for. With several ranks an uncaught exception on any rank prints its
    traceback and one line naming the rank, then stops every rank (install_excepthook).
    """
    env = os.environ if environ is None else environ
    launch = detect_launch(env)
    requested = backend if backend is not None else env.get(BACKEND_VAR, "auto")
    if choose_backend(requested, array_backend, launch, None).name == "single":
        return SingleProcess()
    seconds = timeout_from_env(env) if timeout == "env" else timeout
    try:
        mpi = MPICommunicator(timeout=seconds)  # type: ignore[arg-type]
    except ImportError as exc:
        raise DistributedError(f"{_launched(launch)} but mpi4py cannot run ({exc}); install it with "
                               "pip install cnn_gpu[mpi], built for the MPI whose mpiexec started the job") from exc
    if launch.distributed and mpi.size != launch.size:
        raise DistributedError(f"{_launched(launch)} but MPI sees {mpi.size}: mpi4py's MPI library is not the "
                               "launcher's (start with that MPI's own mpiexec, or srun --mpi=pmix)")
    if mpi.size > 1:
        install_excepthook(mpi.abort)  # from here on, one rank's exception must not leave the others waiting
    comm: Communicator = mpi
    note = None
    if array_backend == "cupy":
        use_gpu_for_rank(mpi.local_rank)
        choice = choose_backend(requested, array_backend, launch, _nccl_reason(mpi))
        note = choice.note
        if choice.name == "nccl":
            comm = NCCLCommunicator(mpi)
            if mpi.size > 1:
                install_excepthook(comm.abort)  # NCCL's abort too
    if log is not None and note is not None and comm.rank == 0:
        log(f"distributed: {note}")
    return comm


def shared_devices(keys: Any) -> list[list[int]]:
    """keys (ranks, k): one row per rank naming its GPU (machine and PCI address) -> the groups
    of ranks (two or more) whose rows are equal, i.e. that share a GPU."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank, row in enumerate(np.asarray(keys).tolist()):
        groups.setdefault(tuple(row), []).append(rank)
    return [ranks for ranks in groups.values() if len(ranks) > 1]


def _nccl_reason(mpi: MPICommunicator) -> str | None:
    """Why NCCL cannot run on these ranks, the same answer on every rank (one allgather), or None.
    It cannot where any rank lacks it (no libnccl, no GPU) or where two ranks share a GPU (NCCL
    refuses them). A GPU is named by its machine and PCI address: with one visible device per
    rank every rank sees "device 0", so device numbers alone cannot tell."""
    local = nccl_unavailable_reason()
    cupy = require_cupy()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    host = int.from_bytes(hashlib.blake2b(socket.gethostname().encode(), digest_size=7).digest(), "little")
    row = np.array([local is None, host, props["pciDomainID"], props["pciBusID"], props["pciDeviceID"]],
                   dtype=np.int64)
    rows = mpi.allgather(row)  # (ranks, 5)
    missing = [r for r in range(mpi.size) if not rows[r, 0]]
    if missing:
        return f"ranks {missing} cannot run it" + (f" (here: {local})" if local is not None else "")
    shared = shared_devices(rows[:, 1:])
    if shared:
        return (f"ranks {shared[0]} share one GPU and NCCL needs a GPU of its own for each rank "
                "(start at most as many ranks per machine as it has GPUs)")
    return None


def _launched(launch: LaunchInfo) -> str:
    if not launch.distributed:
        return "MPI was asked for"
    return f"{launch.launcher} started {launch.size} ranks ({launch.variables})"
