"""Elementwise kernels on the CPU, compiled by Numba, where NumPy needs several passes.

    dx = relu_backward(dy, y)    # dy where y > 0, else 0: one pass (NumPy: a mask, then a multiply)
"""
from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _relu_backward(dy, y, dx):  # pragma: no cover - compiled; tested against NumPy
    zero = dx.dtype.type(0)
    for i in range(dx.size):
        dx[i] = dy[i] if y[i] > 0 else zero  # a select, not a branch: SIMD


def relu_backward(dy: Any, y: Any) -> Any:
    """dy, y (any shape, the same) -> dx: dy where the ReLU's output y > 0, else 0."""
    dx = np.empty(dy.shape, dtype=dy.dtype)
    _relu_backward(np.ascontiguousarray(dy).reshape(-1), np.ascontiguousarray(y).reshape(-1), dx.reshape(-1))
    return dx
