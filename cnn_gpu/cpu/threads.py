"""Threads over the parts of a batch, for the CPU ops that already work part by part.

    results = for_each(parts, work, scratch)    # [work(part, s) for part in parts], s: the thread's own scratch()
    on_each(work, scratch)                      # work(counter, s) once per thread: a compiled loop takes its own parts
    parts = split(n, item_bytes)                # a slice of range(n) per thread, of at least 1 MiB
    parts = row_parts(rows, row_bytes)          # slices of about PART_BYTES, the same on any thread count

The convolution cuts its batch into cache-sized chunks (cnn_gpu.functional.conv) and the compiled
kernels loop over images; each chunk's im2col, GEMM and col2im depend on no other chunk. NumPy's
BLAS threads only the GEMMs, and on a chunk's narrow GEMM (a ResNet's 16 output channels) a
second BLAS thread gains little, while the copies around it stay on one thread. So on several
threads the parts run side by side instead, each with the BLAS on one thread inside, and the ops
that release the GIL (BLAS, Numba's nogil kernels, NumPy's loops over large arrays) run at once.

How many threads: set_count(n), or CNN_GPU_THREADS=n (read once); by default one, and the BLAS
threads its own GEMMs as it always has. Which is faster depends on the network (BENCHMARKS.md,
"Session 6", two cores): ours ran resnet20 1.45-1.6x and mobilenet 1.15-1.3x as fast as the
BLAS's threads, but the seed networks 0.8-1.1x, since their few wide GEMMs are what OpenBLAS
threads well and their small layers leave little to share. Without threadpoolctl (which holds the
BLAS at one thread) the parts run in turn.

With N > 1, a model's whole forward and backward run inside `blas_held()` (cnn_gpu.model.Graph):
the BLAS stays on one thread from the first layer to the last, not only inside the parts. OpenBLAS's
threads spin for a while after each call they share, and one left spinning after a GEMM outside
the parts (a dense layer's) takes a core from the parts that follow: resnet20's training step
on two threads ran no faster than on one until the BLAS was held for the whole step
(BENCHMARKS.md, "Session 6").

The threads are a team made once (_Team): count() - 1 workers and the caller, who takes a share
too. Waiting threads spin on flags outside the GIL (cnn_gpu.cpu.spin) for about a millisecond
before they sleep, as OpenMP's runtimes do: on a virtual machine whose idle CPUs halt, waking a
sleeping thread took ~50 us, and the pool of threads this replaced spent ~0.1 ms handing out and
collecting the parts of each op, as long as a small batch norm's pass (BENCHMARKS.md, "Session 13").
One thread of Python's at a time has the team; another's parts meanwhile run on its own thread.

Results do not depend on the thread count. An op whose outputs are each computed on their own
(a ReLU, a pool, a batch norm's normalization) may be cut anywhere: split() gives one part per
thread, so one thread makes one call. An op that sums over its parts (a convolution's weight
gradient over chunks, a batch norm's statistics over rows) uses parts fixed by sizes, computes
each as it would be alone, and adds them in part order. Threads take the next part as they
finish one, so an uneven split costs at most one part's time.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import Any, Callable, Iterator, Sequence, TypeVar

from . import spin

ENV_VAR = "CNN_GPU_THREADS"

P = TypeVar("P")
R = TypeVar("R")

_lock = threading.Lock()
_blas: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS libraries
# Per thread: .inside, it is running a part (no threads within threads); .held, the thread count
# while blas_held() keeps the BLAS on one thread (None when no hold is on).
_state = threading.local()


def _blas_controllers() -> list[Any]:
    global _blas
    if _blas is None:
        try:
            import numpy  # noqa: F401, PLC0415 - loads NumPy's BLAS, so that threadpoolctl sees it
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - optional
            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # not installed, or no BLAS it knows: the parts run in turn
            _blas = []
    return _blas


def _from_env() -> int | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a whole number of threads, got {value!r}") from None


_chosen: int | None = None  # set_count's number, else CNN_GPU_THREADS's (read once: count() runs at every op)
_chosen_read = False


def set_count(threads: int | None) -> int | None:
    """Run the CPU ops on `threads` threads from now on (None: the default, one, with the BLAS
    threading its GEMMs), over CNN_GPU_THREADS. Returns the previous choice."""
    global _chosen, _chosen_read
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"the thread count must be an int >= 1 or None, got {threads!r}")
    previous = _chosen if _chosen_read else None
    _chosen, _chosen_read = threads, True
    return previous


def _choice() -> int | None:
    global _chosen, _chosen_read
    if not _chosen_read:
        _chosen, _chosen_read = _from_env(), True
    return _chosen


def count() -> int:
    """How many threads for_each uses now: 1 inside a part; the hold's count inside blas_held();
    else set_count's or CNN_GPU_THREADS's number, else 1; 1 without threadpoolctl."""
    if getattr(_state, "inside", False):
        return 1
    held = getattr(_state, "held", None)
    if held is not None:
        return held
    chosen = _choice()
    if chosen is None or chosen <= 1 or not _blas_controllers():
        return 1
    return chosen


def describe() -> str:
    """One line for `cnn-gpu info` and the benchmark."""
    chosen = _choice()
    if chosen is None:
        return f"1 (the default: the BLAS threads its GEMMs; {ENV_VAR}=N runs the ops on N threads)"
    if chosen > 1 and not _blas_controllers():
        return (f"1 ({ENV_VAR}={chosen}, but threadpoolctl is not installed: it holds the BLAS at one thread "
                "while the ops share the cores)")
    return f"{chosen} ({ENV_VAR} or set_count; the BLAS held at one thread while a model runs)"


def _set_blas(counts: Sequence[int]) -> None:
    for c, n in zip(_blas_controllers(), counts):
        c.set_num_threads(n)


# The BLAS's thread count is one per process, but Python threads of a user's (two models served
# side by side) may each hold it: the first hold saves the count and sets 1, the last gives it back.
_holders = 0
_saved_counts: list[int] = []


@contextlib.contextmanager
def blas_held() -> Iterator[None]:
    """Inside: the BLAS on one thread, and for_each on count() threads (as counted on entry).
    A hold inside a hold or inside a part changes nothing; so does one on a single thread. Holds
    in several Python threads at once share one: the BLAS gets its count back when the last ends."""
    global _holders, _saved_counts
    threads = count()
    if threads <= 1 or getattr(_state, "held", None) is not None:
        yield
        return
    with _lock:
        if _holders == 0:
            _saved_counts = [c.get_num_threads() for c in _blas_controllers()]
            _set_blas([1] * len(_saved_counts))
        _holders += 1
    _state.held = threads
    try:
        yield
    finally:
        _state.held = None
        with _lock:
            _holders -= 1
            if _holders == 0:
                _set_blas(_saved_counts)


SPINS = spin.SPINS  # spin-wait hints a waiting thread gives before it sleeps (~1.5 ms)


class _Team:
    """`size - 1` worker threads and the caller, who run one job at a time: job() in each of them.

    The caller posts a job by raising POSTED to the job's number and runs it too; each worker,
    spinning on POSTED (cnn_gpu.cpu.spin), runs it and raises its DONE flag; the caller spins
    until every DONE has the job's number. A thread that spun SPINS hints in vain sleeps on a
    condition and says so in its ASLEEP flag, and whoever raises what it waits for wakes it
    (each side stores its flag, then loads the other's, both sequentially consistent, so one of
    them sees the other). After raising DONE a worker spins for the next job in the same compiled
    call, outside the GIL: the caller, who waited for DONE, then takes the GIL at once instead of
    sleeping on it (a wake costs ~50 us on these machines; spin.py). One caller at a time: `busy`.

    A job of on_each's is posted later: its number is left PENDING, and the caller's compiled loop
    posts it as it takes its first part (spin.next_part), when the caller has let the GIL go; a
    worker that then wakes takes the GIL at once, where one woken at once would find the caller
    running Python and sleep for the GIL until the caller's loop starts (~70 us of the 0.2-2 ms of a
    convolution's chunks, seen in a step's timeline). The flags begin with the counter of parts that
    such a loop takes from (spin.PART, spin.PENDING, spin.POSTED), which each thread's job(counter)
    gets: the workers with spin.WAITING after it, which the caller raises as it starts to wait for
    the job's end outside the GIL, and a worker's loop waits for (spin.leave) before it takes the
    GIL back; the caller's without (a view of the first three flags)."""

    POSTED, CALLER_ASLEEP = spin.POSTED, spin.WAITING + 1

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers = size - 1
        self.flags = spin.new_flags(spin.WAITING + 2 + 2 * self.workers)
        self.caller_counter = self.flags[:spin.COUNTER_FLAGS * spin.LINE]  # the same flags, without WAITING
        self.job: Callable[[Any], None] = lambda _: None
        self.jobs = 0
        self.closed = False
        self.busy = threading.Lock()  # held by the thread whose job runs
        self.wake = threading.Condition()  # the sleeping workers wait on it, the sleeping caller too
        self.threads = [threading.Thread(target=self._work, args=(w,), daemon=True, name=f"cnn_gpu-cpu-{w}")
                        for w in range(self.workers)]
        for t in self.threads:
            t.start()

    def _done(self, w: int) -> int:
        return self.CALLER_ASLEEP + 1 + w

    def _asleep(self, w: int) -> int:
        return self.CALLER_ASLEEP + 1 + self.workers + w

    def _sleep_until(self, asleep: int, satisfied: Callable[[], bool], job: int) -> None:
        with self.wake:
            spin.publish(self.flags, asleep, job)
            while not satisfied():
                self.wake.wait(0.1)  # the timeout only guards against a lost wake

    def _work(self, w: int) -> None:
        _state.inside = True
        flags, job = self.flags, 1
        seen = spin.wait_for(flags, self.POSTED, job, SPINS)
        while True:
            if not seen:
                self._sleep_until(self._asleep(w), lambda: spin.load(flags, self.POSTED) >= job, job)
            if self.closed:
                return
            self.job(self.flags)  # the counter, WAITING and the rest: a worker's (spin.leave)
            woke = spin.publish_then_wait(flags, self._done(w), job, self.CALLER_ASLEEP, self.POSTED, job + 1, SPINS)
            if woke < 0:  # the caller sleeps: wake it, then wait for the next job as before
                with self.wake:
                    self.wake.notify_all()
                seen = spin.wait_for(flags, self.POSTED, job + 1, SPINS)
            else:
                seen = woke == 1
            job += 1

    def _post(self, job: Callable[[Any], None], later: bool = False) -> int:
        """Post the next job now, or (later) leave it PENDING for the caller's compiled loop to post,
        unless a worker sleeps (it must be woken after the post)."""
        self.jobs += 1
        self.job = job
        spin.publish(self.flags, spin.PART, 0)
        if later and not self._sleepers(self.jobs):
            spin.publish(self.flags, spin.PENDING, self.jobs)
        else:
            self._post_now(self.jobs)
        return self.jobs

    def _sleepers(self, job: int) -> bool:
        return any(spin.load(self.flags, self._asleep(w)) >= job for w in range(self.workers))

    def _post_now(self, job: int) -> None:
        spin.publish(self.flags, self.POSTED, job)
        if self._sleepers(job):
            with self.wake:
                self.wake.notify_all()

    def run(self, job: Callable[[Any], None], post_later: bool = False) -> None:
        """job(counter) on every thread of the team, this one included; returns when all have
        returned. The caller holds `busy`. post_later: job's compiled loop posts it (on_each)."""
        n = self._post(job, post_later)
        try:
            job(self.caller_counter)
        finally:
            if spin.load(self.flags, self.POSTED) < n or (post_later and self._sleepers(n)):
                self._post_now(n)  # the loop never ran, or a worker fell asleep before it posted
            done = lambda: spin.wait_all(self.flags, self._done(0), self._done(self.workers), n, 0)  # noqa: E731
            if not spin.announce_then_wait_all(self.flags, spin.WAITING, n, self._done(0), self._done(self.workers),
                                               SPINS):
                self._sleep_until(self.CALLER_ASLEEP, done, n)

    def close(self) -> None:
        """Let the workers end (after the job they run, if any)."""
        with self.busy:
            self.closed = True
            self._post(lambda _: None)


_team: _Team | None = None


def _get_team(size: int) -> _Team:
    global _team
    with _lock:
        old = _team
        if old is None or old.size != size:
            _team = _Team(size)
        team = _team
    if old is not None and old is not team:
        old.close()  # outside _lock: it waits for a job of the old team's, whose caller may need _lock
    return team


def _forget_team() -> None:
    global _team
    _team = None  # a forked child has none of its parent's threads: it starts a team of its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_team)


def for_each(parts: Sequence[P], work: Callable[[P, Any], R], scratch: Callable[[], Any] = lambda: None) -> list[R]:
    """[work(part, s) for part in parts], in part order. s is scratch() made once per thread (a
    buffer the thread reuses from part to part). On count() > 1 threads, with two or more parts,
    the parts run side by side with the BLAS held at one thread; else in turn, as written."""
    return _share(parts, lambda part, s, _: work(part, s), scratch, post_later=False)


def on_each(work: Callable[[Any, Any], None], scratch: Callable[[], Any] = lambda: None) -> None:
    """work(counter, s) once on each of count() threads, s: that thread's scratch(), counter: the
    flags (spin.COUNTER_FLAGS of them) from which a compiled loop takes its parts with
    spin.next_part until none is left, shared by all the threads. for_each's threads run Python
    at every part, and of two threads that want the GIL at once one sleeps for it (~20 us to wake
    here); here each thread makes one call into compiled code, and the parts pass between the
    threads there. A thread that comes late finds fewer parts, or none, left: the same parts, the
    same results. The loop must take parts fixed by sizes, as for_each's callers do."""
    _share(range(count()), lambda _, s, counter: work(counter, s), scratch, post_later=True)


def _share(parts: Sequence[P], work: Callable[[P, Any, Any], R], scratch: Callable[[], Any],
           post_later: bool) -> list[R]:
    """[work(part, s, counter) for part in parts] on count() threads (for_each, on_each)."""
    threads = min(count(), len(parts))
    if threads <= 1:
        s, counter = scratch(), spin.new_flags(spin.COUNTER_FLAGS) if post_later else None
        return [work(part, s, counter) for part in parts]
    results: list[Any] = [None] * len(parts)
    errors: list[BaseException] = []
    order = itertools.count()  # next() is atomic under the GIL: each part is taken once

    def share(counter: Any) -> None:
        inside = getattr(_state, "inside", False)
        _state.inside = True
        try:
            s = scratch()
            while not errors and (i := next(order)) < len(parts):
                results[i] = work(parts[i], s, counter)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread, below
            errors.append(e)
        finally:
            _state.inside = inside

    team = _get_team(count())
    if team.busy.acquire(blocking=False):
        try:
            with blas_held():
                team.run(share, post_later)  # each thread's counter: the team's first flags
        finally:
            team.busy.release()
    else:  # another Python thread's parts run on the team now: these run here, in turn (the same results)
        share(spin.new_flags(spin.COUNTER_FLAGS) if post_later else None)
    if errors:
        raise errors[0]
    return results


def ranges(total: int, per: int) -> list[slice]:
    """range(total) cut into slices of `per` (the last may be shorter): parts fixed by sizes, so
    whatever is summed over them is summed the same way on any number of threads."""
    per = max(1, per)
    return [slice(i, min(i + per, total)) for i in range(0, total, per)]


PART_BYTES = 1 << 18  # of rows per part of a sum: 256 KiB, in L2 with its operands


def row_parts(rows: int, row_bytes: int) -> list[slice]:
    """Fixed parts of `rows` rows (images, or rows of an (M, C) view) of about PART_BYTES each:
    for ops that sum over the parts."""
    return ranges(rows, rows_per_part(row_bytes))


def rows_per_part(row_bytes: int) -> int:
    """Rows of row_bytes in each of row_parts' parts (at least one)."""
    return max(1, PART_BYTES // max(row_bytes, 1))


SPLIT_MIN_BYTES = 1 << 20  # what split() gives a thread at the least: handing a part to another
                           # thread costs about 0.1 ms, the time to stream 1 MiB (BENCHMARKS.md, "Session 6")


def split(total: int, item_bytes: int) -> list[slice]:
    """range(total) in up to count() slices of nearly equal size, each at least SPLIT_MIN_BYTES
    of items of item_bytes (so a small array is one slice, run here): for ops whose every output
    is computed on its own (a ReLU, a pool), where the cut changes no result and one call per
    thread costs least."""
    threads = max(1, min(count(), total * max(item_bytes, 1) // SPLIT_MIN_BYTES))
    return [slice(total * i // threads, total * (i + 1) // threads) for i in range(threads)]
