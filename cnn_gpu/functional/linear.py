"""Fully connected layer: x (N, D_in) @ w (D_in, D_out) + b (D_out,) -> y (N, D_out)."""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module
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
    y = matmul(x, w)
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy: Any, cache: tuple, need_dx: bool = True) -> tuple[Any, Any, Any]:
    """dy (N, D_out) -> dx (N, D_in) or None, dw (D_in, D_out), db (D_out,) or None."""
    x, w, has_bias = cache
    dw = matmul(x.T, dy)
    db = column_sum(dy) if has_bias else None
    dx = matmul(dy, w.T) if need_dx else None
    return dx, dw, db
