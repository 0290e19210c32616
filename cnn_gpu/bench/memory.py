"""Peak memory of one configuration, measured in a fresh process.

    python -m cnn_gpu.bench.memory IMPL NET BATCH MODE THREADS [channels_last]

prints one JSON object. The measure, the same for both implementations: the process's
resident-set high-water mark (VmHWM; getrusage's ru_maxrss elsewhere) after a few steps, minus its resident
set just before the first step (after imports, the model and the input batch are built, and
our compiled CPU kernels have run once on two images: Numba's compiler is a library too).
So it counts what the steps add: activations and caches, gradients, optimizer state,
library scratch buffers -- not the interpreter, the libraries or the parameters.
For our implementation it also reports tracemalloc's peak over the same steps, which sees
exactly the bytes NumPy allocates (NumPy reports its data buffers to tracemalloc).

A fresh process per configuration keeps one configuration's freed-but-kept pages from
hiding another's.
"""
from __future__ import annotations

import json
import os
import resource
import sys

STEPS = 3


def _rss_now() -> int:
    """Current resident set in bytes (Linux /proc), or the high-water mark where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss()


def _maxrss() -> int:
    """Resident-set high-water mark in bytes.

    Linux: VmHWM of /proc/self/status, the peak of this process image. getrusage's ru_maxrss
    is not used there: it survives exec, so a child forked from a large parent (one that has
    imported torch, say) starts with the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure(impl: str, net: str, batch: int, mode: str, threads: int,
            channels_last: bool = False) -> dict:
    import tracemalloc  # noqa: PLC0415

    from . import workloads  # noqa: PLC0415
    if impl == "torch":
        import torch  # noqa: PLC0415
        torch.set_num_threads(threads)
        step = workloads.torch_step(torch, net, batch, mode, channels_last=channels_last)
    else:
        step = workloads.ours(net, batch, mode)
    before = _rss_now()
    for _ in range(STEPS):
        step()
    result = {"rss_peak_delta_bytes": max(0, _maxrss() - before)}
    if impl == "ours":
        tracemalloc.start()
        step()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        step()
        result["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return result


if __name__ == "__main__":
    impl, net, batch, mode, threads = sys.argv[1:6]
    cl = len(sys.argv) > 6 and sys.argv[6] == "channels_last"
    # NumPy's BLAS threads are fixed by the caller through OPENBLAS_NUM_THREADS & co. in our
    # environment: NumPy is already imported here (by cnn_gpu/__init__), too late to set them.
    print(json.dumps(measure(impl, net, int(batch), mode, int(threads), cl)))
