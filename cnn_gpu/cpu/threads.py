"""Threads over the parts of a batch, for the CPU ops that already work part by part.

    results = for_each(parts, work, scratch)    # [work(part, s) for part in parts], s: the thread's own scratch()
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence, TypeVar

ENV_VAR = "CNN_GPU_THREADS"

P = TypeVar("P")
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
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


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=size, thread_name_prefix="cnn_gpu-cpu"), size
        return _pool


def for_each(parts: Sequence[P], work: Callable[[P, Any], R], scratch: Callable[[], Any] = lambda: None) -> list[R]:
    """[work(part, s) for part in parts], in part order. s is scratch() made once per thread (a
    buffer the thread reuses from part to part). On count() > 1 threads, with two or more parts,
    the parts run side by side with the BLAS held at one thread; else in turn, as written."""
    threads = min(count(), len(parts))
    if threads <= 1:
        s = scratch()
        return [work(part, s) for part in parts]
    results: list[Any] = [None] * len(parts)
    order = itertools.count()  # next() is atomic under the GIL: each part is taken once

    def worker() -> None:
        _state.inside = True
        try:
            s = scratch()
            while (i := next(order)) < len(parts):
                results[i] = work(parts[i], s)
        finally:
            _state.inside = False

    with blas_held():
        futures = [_executor(threads).submit(worker) for _ in range(threads - 1)]
        try:
            worker()  # this thread is one of them
        finally:
            for f in futures:
                f.exception()  # waits: no part is still running when the BLAS is given back
        for f in futures:
            f.result()  # re-raises a part's exception here
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
    return ranges(rows, PART_BYTES // max(row_bytes, 1))


SPLIT_MIN_BYTES = 1 << 20  # what split() gives a thread at the least: handing a part to another
                           # thread costs about 0.1 ms, the time to stream 1 MiB (BENCHMARKS.md, "Session 6")


def split(total: int, item_bytes: int) -> list[slice]:
    """range(total) in up to count() slices of nearly equal size, each at least SPLIT_MIN_BYTES
    of items of item_bytes (so a small array is one slice, run here): for ops whose every output
    is computed on its own (a ReLU, a pool), where the cut changes no result and one call per
    thread costs least."""
    threads = max(1, min(count(), total * max(item_bytes, 1) // SPLIT_MIN_BYTES))
    return [slice(total * i // threads, total * (i + 1) // threads) for i in range(threads)]
