"""Fully connected layer: x (N, D_in) @ w (D_in, D_out) + b (D_out,) -> y (N, D_out).

On the CPU each GEMM runs in blocks of rows on cnn_gpu.cpu.threads (the BLAS is held at one
thread while a model runs): y and dx by rows of the batch, dw by rows of w. The blocks are fixed
by the sizes (ROW_BLOCKS), not the thread count: OpenBLAS computes a small GEMM's rows with
other kernels, in another order, when it is given fewer of them, so a cut that followed the
thread count would change the last bits with it."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import get_array_module
from ..cpu import threads
from ..cuda.gemm import matmul  # a @ b; inside a CUDA graph capture, GEMMs that can be captured
from ..geometry import check_float, check_rank
from .reduce import column_sum


def linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, tuple]:
    """x (N, D_in), w (D_in, D_out), b (D_out,) or None -> y (N, D_out), cache."""
    check_float(x, "linear")
    check_rank(x, 2, "linear", "(N, D_in)")
    get_array_module(x, w, b)  # rejects mixed backends
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[1]} features but w expects {w.shape[0]} "
                         f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)})")
    y = _rows_matmul(x, w)
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy: Any, cache: tuple, need_dx: bool = True) -> tuple[Any, Any, Any]:
    """dy (N, D_out) -> dx (N, D_in) or None, dw (D_in, D_out), db (D_out,) or None."""
    x, w, has_bias = cache
    dw = _rows_matmul(x.T, dy)
    db = column_sum(dy) if has_bias else None
    dx = _rows_matmul(dy, w.T) if need_dx else None
    return dx, dw, db


ROW_BLOCKS = 8               # a GEMM's rows in up to 8 blocks ...
MIN_BLOCK_BYTES = 1 << 18    # ... each reading at least 256 KiB of a (handing over a block costs ~0.1 ms)


def _rows_matmul(a: Any, b: Any) -> Any:
    """a @ b; on NumPy, in fixed blocks of a's rows, side by side on cnn_gpu.cpu.threads."""
    if not isinstance(a, np.ndarray):
        return matmul(a, b)
    m = a.shape[0]
    row_bytes = a.shape[1] * a.itemsize
    parts = threads.ranges(m, max(-(-m // ROW_BLOCKS), MIN_BLOCK_BYTES // max(row_bytes, 1)))
    if len(parts) <= 1:
        return a @ b
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    threads.for_each(parts, lambda rows, _: np.matmul(a[rows], b, out=out[rows]))
    return out
