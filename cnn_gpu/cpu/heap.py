"""Freed arrays kept for the next step's: glibc malloc's two thresholds, fixed.

A training step allocates and frees tens of MB of activations, caches, scratch buffers and
gradients, most of them a few MB each. glibc serves an allocation above its mmap threshold with
fresh pages from the kernel and unmaps them on free; the threshold starts at 128 KiB and only
rises to the size of a freed block, and the top of the heap is given back past a trim threshold
of twice it. Either way the next step's arrays land on new pages, and each 4 KiB page costs a
fault and a zeroing by the kernel: about 15,000 faults a step for resnet20 at batch 64, 60 MB
of pages written twice (BENCHMARKS.md, "Session 12"). With the thresholds fixed (mallopt), a
freed block stays in the heap and the next allocation of its size reuses it.

The cost: the process keeps what it freed, up to its peak, instead of giving it back between
steps; the peak itself does not grow. Set CNN_GPU_MALLOC=system to leave glibc's defaults.
Elsewhere than glibc (macOS, musl, Windows) nothing changes. PyTorch's CPU tensors go through
the same malloc, so in one process both libraries get the settings.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "CNN_GPU_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64 bits): larger blocks are still mapped
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap (never more than the process's peak)

_applied: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process); True when they are set."""
    global _applied
    if _applied is None:
        _applied = os.environ.get(ENV_VAR, "").strip().lower() != "system" and _mallopt()
    return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (not glibc)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
