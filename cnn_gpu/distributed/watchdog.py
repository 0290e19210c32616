"""A bounded wait for collectives, and the hook that turns one rank's exception into a stop of all.

What Open MPI 4.1 does when one rank fails (measured here with mpiexec -n 2, see
tests/test_distributed_failures.py):

- a rank killed by a signal (SIGKILL, the kernel's OOM killer): mpiexec sees it die, kills the
  others and exits, naming the rank ("process rank 1 ... exited on signal 9 (Killed)");
- a rank that calls os._exit(code != 0) without MPI_Finalize: the same, naming the rank;
- a rank that raises, or returns from main with sys.exit(code): Python's exit runs mpi4py's
  MPI_Finalize, which waits for the others, while they wait for it in their next collective:
  every rank hangs, for ever. Hence install_excepthook() (an uncaught exception calls MPI_Abort
  after the traceback and one line naming the rank) and Communicator.abort()/finish() for errors
  the program catches itself;
- a rank that hangs or stops calling collectives (a deadlock, a dead NFS mount, a peer on a
  machine that lost the network without mpiexec noticing, a Slurm step without
  --kill-on-bad-exit): only a timeout helps. The Watchdog below gives every collective a
  deadline; past it, the rank that waited aborts the job, naming itself and the collective.

The timeout must exceed the longest honest wait between two ranks (rank 0 writing a checkpoint
or evaluating while the others wait in their next collective): CNN_GPU_DIST_TIMEOUT seconds,
default DEFAULT_TIMEOUT, 0 for none.
"""
from __future__ import annotations

import collections
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

TIMEOUT_VAR = "CNN_GPU_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's and PyTorch's default for the same purpose
_POLL = 0.5  # seconds between looks at device events and asynchronous errors


def timeout_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The collective timeout in seconds from CNN_GPU_DIST_TIMEOUT (default DEFAULT_TIMEOUT;
    0 or 'none': no timeout, None)."""
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_VAR, "").strip().lower()
    if not text:
        return DEFAULT_TIMEOUT
    if text == "none":
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_VAR} must be a number of seconds (0 for none), got {text!r}") from None
    if not seconds >= 0:
        raise ValueError(f"{TIMEOUT_VAR} must be >= 0 seconds (0 for none), got {text!r}")
    return seconds or None


class DeviceEvent(Protocol):
    """What the watchdog needs of a recorded GPU event (cupy.cuda.Event has it)."""

    @property
    def done(self) -> bool: ...


class Watchdog:
    """Calls on_timeout(message) once when a guarded wait lasts longer than `timeout` seconds.

    Two kinds of wait:
    - guard(what): a blocking call on the host (an MPI collective); its deadline starts at entry;
    - watch_event(event, what): work queued on a GPU stream (an NCCL collective returns at once);
      its deadline starts when it is queued, and it ends when event.done turns true.
    check(), if given, returns an error message or None (NCCL's asynchronous errors, a peer that
    failed); a message ends the run like a timeout.

    A thread, started at the first guarded wait, looks every `poll` seconds (default: half a
    second, or a quarter of the timeout if less), so a wait is reported between timeout and
    timeout + poll seconds after it began. The waiting side only sets a field or appends to a
    deque, no lock and no wake-up: the watchdog costs a collective next to nothing. timeout None
    turns the deadlines off. on_timeout runs on the watchdog's thread and is expected not to
    return (it aborts the job).
    """

    def __init__(self, timeout: float | None, on_timeout: Callable[[str], Any],
                 check: Callable[[], str | None] | None = None, poll: float | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"the watchdog's timeout must be > 0 seconds or None, got {timeout}")
        self.timeout = timeout
        self._on_timeout, self._check = on_timeout, check
        self._poll = poll if poll is not None else min(_POLL, timeout / 4) if timeout is not None else _POLL
        self._host: tuple[str, float] | None = None  # (what, deadline) of the blocking call now running
        # (event, what, deadline) of queued device work, oldest first; appended by the caller's
        # thread, popped by the watchdog's (a deque is safe for that).
        self._events: collections.deque[tuple[DeviceEvent, str, float]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.fired: str | None = None  # the message, once it fired

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Bound the wait of the block inside (one blocking collective)."""
        if self.timeout is None:
            yield
            return
        self._start()
        self._host = (what, time.monotonic() + self.timeout)
        try:
            yield
        finally:
            self._host = None

    def watch_event(self, event: DeviceEvent, what: str) -> None:
        """Bound the wait for queued device work that ends with `event`."""
        if self.timeout is None and self._check is None:
            return
        self._start()
        deadline = time.monotonic() + self.timeout if self.timeout is not None else math.inf
        self._events.append((event, what, deadline))

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cnn_gpu-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the watchdog's thread (the communicator is closed); guarded waits are no longer bounded."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._poll):
            message = self._late()
            if message is None and self._check is not None:
                message = self._check()
            if message is not None:
                self.fired = message
                self._on_timeout(message)
                return

    def _late(self) -> str | None:
        """The message for a wait past its deadline, or None."""
        while self._events and self._events[0][0].done:  # stream order: the finished ones are the oldest
            self._events.popleft()
        waits = [self._host] if self._host is not None else []
        if self._events:
            _, what, deadline = self._events[0]
            waits.append((what, deadline))
        now = time.monotonic()
        for what, deadline in waits:
            if deadline <= now:
                return (f"{what} did not complete within {self.timeout:g} s: another rank has stopped, "
                        f"hung or fallen far behind ({TIMEOUT_VAR} sets this bound)")
        return None


def format_failure(rank: int, size: int, message: str) -> str:
    """The one line a failing rank prints: 'cnn-gpu: error: rank 1 of 4: ...'."""
    return f"cnn-gpu: error: rank {rank} of {size}: {message}"


def install_excepthook(abort: Callable[[str, int], Any]) -> Callable[..., Any]:
    """Make an uncaught exception print its traceback as usual, then call abort(message, 1),
    where message is 'ExceptionType: text' (abort prints the line naming the rank and stops
    every rank). Returns the hook it replaced."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        try:
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
        finally:
            abort(f"{kind.__name__}: {value}" if str(value) else kind.__name__, 1)

    sys.excepthook = hook
    return previous
