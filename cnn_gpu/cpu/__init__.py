"""Compiled CPU kernels (Numba) for the passes NumPy cannot fuse: the CPU's counterpart of cnn_gpu.cuda.

NumPy runs one operation per pass over memory: a 2x2 max pool with its argmax takes over a
dozen passes, a batch norm four forward and nine backward. A loop compiled by Numba does the same work
in one pass per result, several times faster on the seed network's first pool and batch norm
(BENCHMARKS.md, "Session 3: compiled CPU kernels"). The NumPy code stays the reference: tests compare
every kernel with it, and it runs wherever Numba is missing or switched off.

- `cnn_gpu.cpu.maxpool`: `max_pool2d_forward`, `max_pool2d`, `max_pool2d_backward`
  (every window geometry: stride, padding, dilation, ceil mode)
- `cnn_gpu.cpu.batchnorm`: `channel_mean_var`, `channel_grad_sums`,
  `batch_norm_normalize`, `batch_norm_backward_dx` (the four calls of cnn_gpu.cuda.batchnorm;
  with a ReLU after the batch norm, its forward and its mask in the same passes)
- `cnn_gpu.cpu.conv`: `im2col` and `col2im`, for the convolution's GEMMs and its input gradient
  (groups == 1, any stride, padding and dilation)
- `cnn_gpu.cpu.direct`: `conv3x3`, `conv3x3_weight_grad` (float32 3x3 convolutions at stride 1,
  padding 1, without im2col: micro-kernels on `cnn_gpu.cpu.simd`'s vectors of 8 or 16 floats,
  which Numba keeps in registers)
- `cnn_gpu.cpu.depthwise`: `depthwise_forward`, `depthwise_backward` (groups == C, any channel
  multiplier, stride, padding and dilation; the same calls as `cnn_gpu.cuda.conv`'s)
- `cnn_gpu.cpu.elementwise`: `relu`, `relu_backward`, `add_relu` (a residual sum and the ReLU
  after it), `bias_relu` (a 1x1 convolution's bias and ReLU), the SGD update
- `cnn_gpu.cpu.jit`: `specialized`, how a kernel compiled for one shape is named, and how a loop
  compiled around it calls it and is found again in Numba's disk cache by the next process
- `cnn_gpu.cpu.threads`: `for_each` over the parts of a batch on CNN_GPU_THREADS threads
  (plain Python and threadpoolctl: no Numba needed)
- `cnn_gpu.cpu.heap`: `keep_freed_memory`, run on import: glibc's malloc keeps freed arrays for
  the next step's instead of fresh pages from the kernel (CNN_GPU_MALLOC=system: its defaults)

Numba is optional (`pip install cnn_gpu[fast]`). Set CNN_GPU_JIT=0 to run the NumPy code
instead, or call `set_enabled(False)`. Each kernel is a serial loop, compiled on first use per
dtype, the direct convolution's per channel count (Numba caches the machine code on disk);
`cnn_gpu.cpu.threads` runs the parts of a batch
on several threads, the kernels' and the NumPy code's alike.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .heap import keep_freed_memory

keep_freed_memory()

ENV_VAR = "CNN_GPU_JIT"
DTYPES = (np.float32, np.float64)

_reason: str | None = None  # why the kernels cannot run, once we have looked
_probed = False
_enabled = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def unavailable_reason() -> str | None:
    """None when Numba imports; else why the compiled kernels cannot run (probed once)."""
    global _probed, _reason
    if not _probed:
        _probed = True
        try:
            import numba  # noqa: F401, PLC0415 - imported here only to probe
        except ImportError as exc:
            _reason = f"Numba is not installed ({exc}); install it with `pip install cnn_gpu[fast]`"
        except Exception as exc:  # installed but broken: a NumPy it does not support, a bad llvmlite
            _reason = f"Numba is installed but does not import ({type(exc).__name__}: {exc})"
    return _reason


def set_enabled(enabled: bool) -> bool:
    """Switch the compiled kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def enabled() -> bool:
    """Whether NumPy arrays go through the compiled kernels: switched on and Numba present."""
    return _enabled and unavailable_reason() is None


def describe() -> str:
    """One line for `cnn-gpu info` and the benchmark: whether the kernels run, and why not."""
    if enabled():
        import numba  # noqa: PLC0415 - present: enabled() probed it
        return f"on (Numba {numba.__version__}; {ENV_VAR}=0 switches them off)"
    return f"off ({unavailable_reason() or ENV_VAR + '=0'}): every op runs as NumPy code"


def runs_on(*arrays: Any) -> bool:
    """Whether the compiled kernels take these arrays: all NumPy, float32 or float64, one dtype."""
    if not enabled():
        return False
    dtype = arrays[0].dtype if isinstance(arrays[0], np.ndarray) else None
    return (dtype in DTYPES
            and all(isinstance(a, np.ndarray) and a.dtype == dtype for a in arrays))


def flush_subnormals(*arrays: Any) -> None:
    """Set the subnormal values of NumPy arrays to zero, in place (|x| < finfo.tiny: 1.2e-38 in float32).
    NumPy code, needing no Numba: the optimizers' NumPy path and checkpoint loading call it.

    Why: with weight decay, a weight whose input is always zero (a dead ReLU feature) decays towards
    zero through the subnormal range, and an x86 CPU computes with subnormals many times slower: in
    the seed network trained with Adam, a fifth of the dense layer's weights went subnormal and a
    training step took twice as long (BENCHMARKS.md, "Subnormal weights in real training").
    Flushing moves a value by under 1.2e-38. The GPU computes with subnormals at full speed, and its
    updates keep them.
    """
    for a in arrays:
        a[np.abs(a) < np.finfo(a.dtype).tiny] = 0
