"""Capturing work into a CUDA graph and replaying it, with the memory the graph needs.

    pool = cupy.cuda.MemoryPool()               # the graph's own memory (see below)
    graph = capture(body, pool)                 # body() runs once under capture: nothing executes yet
    graph.launch()                              # replays every kernel body() launched, on the current stream

What capture needs, and what this module does about it:
- a stream of its own (capture cannot run on the legacy default stream): a non-blocking stream,
  made here; the replays then run on whatever stream is current, ordered with the eager work there;
- GEMMs that cuBLAS may capture: body() runs inside cnn_gpu.cuda.gemm.capturable(), and our
  handle is put on the capture stream, with its workspace, before the capture begins;
- memory that stays the graph's: every array body() allocates comes from `pool`, a pool used by
  nothing else, so no eager allocation can be handed an address the graph writes when replayed.
  Blocks that body() frees are reused by its later allocations, in stream order, as in an eager
  step. The pool lives as long as the graph (CapturedGraph holds it; graphs that never run at
  the same time may share one);
- no host work in body(): a host-device copy, a host read of a device value or a host generator
  cannot be captured. CuPy raises for them (or the capture is invalidated); capture() then ends
  the capture and raises CaptureError, whose message says what refused, and the caller runs
  eagerly instead.
Kernels must be compiled before the capture (a warm-up run of body(), eagerly): compiling and
loading a module while capturing is not something to rely on.
"""
from __future__ import annotations

from typing import Any, Callable

from ..backend import require_cupy
from . import gemm


class CaptureError(RuntimeError):
    """Work could not be captured into a CUDA graph; the message says what refused."""


class CapturedGraph:
    """A replayable CUDA graph and the memory pool its addresses belong to."""

    def __init__(self, graph: Any, pool: Any, stream: Any) -> None:
        self.graph, self.pool, self.stream = graph, pool, stream

    def launch(self) -> None:
        """Replay the graph on the current stream (asynchronously, as an eager step runs)."""
        self.graph.launch(require_cupy().cuda.get_current_stream())


def capture(body: Callable[[], Any], pool: Any) -> CapturedGraph:
    """Capture the kernels body() launches into a CUDA graph, allocating from `pool`; body()'s
    GEMMs through cnn_gpu.cuda.gemm's own handle. Raises CaptureError when something in body()
    cannot be captured (nothing has run then, on the device)."""
    cupy = require_cupy()
    cupy.cuda.get_current_stream().synchronize()  # eager work before the capture is done
    stream = cupy.cuda.Stream(non_blocking=True)
    with gemm.capturable() as handle, cupy.cuda.using_allocator(pool.malloc), stream:
        handle.bind(stream.ptr)  # cublasSetStream, then cublasSetWorkspace: before capture begins
        stream.begin_capture()
        try:
            body()
        except Exception as exc:
            _abandon(stream)
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
        try:
            graph = stream.end_capture()  # also instantiates the graph
        except Exception as exc:  # an operation invalidated the capture (a legacy-stream sync), or instantiation failed
            raise CaptureError(f"the capture could not be ended: {type(exc).__name__}: {exc}") from exc
    return CapturedGraph(graph, pool, stream)


def _abandon(stream: Any) -> None:
    """End a capture that failed midway, so that the stream can be used (and freed) again."""
    try:
        stream.end_capture()
    except Exception:  # an invalidated capture raises here; it is ended all the same
        pass
