"""Max pooling over non-overlapping windows (stride == pool size, no padding), compiled by Numba.

    x (N, H, W, C) -> y (N, OH, OW, C), OH = H // KH, OW = W // KW

The same results as the NumPy code in cnn_gpu.functional.pool, bit for bit: the gradient
goes to the FIRST maximum of a window in row-major (kh, kw) order, and a NaN counts as a
maximum. Each kernel walks the windows once; for each window it runs over the KH*KW offsets
with the C channels innermost, so the compare-and-select compiles to SIMD over channels
and the window's running maximum stays in registers or L1.
"""
from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ..geometry import window_index_dtype

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _pick(v, best, at, k):  # pragma: no cover - compiled
    """The running (maximum, argmax) after seeing v at window offset k: strictly greater keeps the
    first maximum; a NaN beats all but an earlier NaN. Selects, not branches (SIMD)."""
    better = (v > best) | ((v != v) & (best == best))
    return (v if better else best), (k if better else at)


@_jit
def _forward(x, kh, kw, y, argmax, record):  # pragma: no cover - compiled; tested against NumPy
    """record False (evaluation): argmax is not written (pass any uint8 array)."""
    n, oh, ow, c = y.shape
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    y[b, i, j, ch] = x[b, i * kh, j * kw, ch]
                    if record:
                        argmax[b, i, j, ch] = 0
                for k in range(1, kh * kw):
                    r, s = i * kh + k // kw, j * kw + k % kw
                    for ch in range(c):
                        at = argmax[b, i, j, ch] if record else 0
                        y[b, i, j, ch], at = _pick(x[b, r, s, ch], y[b, i, j, ch], at, k)
                        if record:
                            argmax[b, i, j, ch] = at


@_jit
def _forward_2x2(x, y, argmax, record):  # pragma: no cover - compiled; tested against NumPy
    """_forward for 2x2 windows, the four offsets written out: the running maximum stays in a
    register instead of y (the seed network's first pool at batch 64: 0.5 -> 0.25 ms)."""
    n, oh, ow, c = y.shape
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                r, s = 2 * i, 2 * j
                for ch in range(c):
                    best, at = x[b, r, s, ch], np.uint8(0)
                    best, at = _pick(x[b, r, s + 1, ch], best, at, np.uint8(1))
                    best, at = _pick(x[b, r + 1, s, ch], best, at, np.uint8(2))
                    best, at = _pick(x[b, r + 1, s + 1, ch], best, at, np.uint8(3))
                    y[b, i, j, ch] = best
                    if record:
                        argmax[b, i, j, ch] = at


@_jit
def _backward(dy, argmax, kh, kw, dx):  # pragma: no cover - compiled; tested against NumPy
    n, oh, ow, c = dy.shape
    zero = dx.dtype.type(0)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for k in range(kh * kw):
                    r, s = i * kh + k // kw, j * kw + k % kw
                    for ch in range(c):
                        dx[b, r, s, ch] = dy[b, i, j, ch] if argmax[b, i, j, ch] == k else zero


def max_pool2d_forward(x: Any, kh: int, kw: int) -> tuple[Any, Any]:
    """x (N, H, W, C) -> y (N, H // KH, W // KW, C), argmax (same shape; uint8 for windows up to 256)."""
    x = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    y = np.empty((n, h // kh, w // kw, c), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=window_index_dtype(kh, kw))
    if (kh, kw) == (2, 2):
        _forward_2x2(x, y, argmax, True)
    else:
        _forward(x, kh, kw, y, argmax, True)
    return y, argmax


def max_pool2d(x: Any, kh: int, kw: int) -> Any:
    """x (N, H, W, C) -> y (N, H // KH, W // KW, C), with no argmax (evaluation)."""
    x = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    y = np.empty((n, h // kh, w // kw, c), dtype=x.dtype)
    unused = np.empty((1, 1, 1, 1), dtype=window_index_dtype(kh, kw))
    if (kh, kw) == (2, 2):
        _forward_2x2(x, y, unused, False)
    else:
        _forward(x, kh, kw, y, unused, False)
    return y


def max_pool2d_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...], kh: int, kw: int) -> Any:
    """dy (N, OH, OW, C) -> dx (N, H, W, C): each gradient to its window's argmax, zeros elsewhere."""
    dx = np.empty(x_shape, dtype=dy.dtype)
    oh, ow = dy.shape[1], dy.shape[2]
    dx[:, oh * kh:] = 0  # rows and columns no window covers
    dx[:, :, ow * kw:] = 0
    _backward(np.ascontiguousarray(dy), argmax, kh, kw, dx)
    return dx
