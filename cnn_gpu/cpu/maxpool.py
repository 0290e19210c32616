"""Max pooling compiled by Numba, for every window geometry (kernel, stride, padding, dilation, ceil mode).

    x (N, H, W, C) -> y (N, OH, OW, C);  window (oh, ow) reads tap (kh, kw) at input position
    (oh*SH - PH + kh*DH, ow*SW - PW + kw*DW), and a tap outside the input counts as -inf.

The same results as the plain NumPy code in cnn_gpu.functional.pool, bit for bit: the gradient
goes to the FIRST maximum of a window in row-major (kh, kw) order, a NaN counts as a maximum, and
where windows overlap an input adds its gradients in ascending tap order k = kh*KW + kw. The three
calls are functional.pool's paths: they take the geometry checked there, a geometry.Window and the
output size (OH, OW), and are memory-safe whatever it is (no tap outside x is read).

Each kernel walks the windows once; for each window it runs over the taps with the C channels
innermost, so the compare-and-select compiles to SIMD over channels and the window's running
maximum stays in L1. Windows that tile the input (stride == kernel, no padding or dilation), the
seed network's 2x2 pools, have kernels of their own: no bounds, and the 2x2 forward keeps its
running maximum in a register.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import Window, window_index_dtype
from . import threads
from .jit import JIT as _jit  # cached on disk, without the GIL or bounds checks

_NO_ARGMAX = np.zeros((1, 1, 1, 1), np.uint8)  # what evaluation passes for the argmax: never read or written


@_jit
def _pick(v, best, at, k):  # pragma: no cover - compiled
    """The running (maximum, argmax) after seeing v at tap k: strictly greater keeps the first
    maximum; a NaN beats all but an earlier NaN. Selects, not branches (SIMD)."""
    better = (v > best) | ((v != v) & (best == best))
    return (v if better else best), (k if better else at)


@_jit
def _taps_inside(start, kernel, dilation, size):  # pragma: no cover - compiled
    """Along one axis, the taps t in [lo, hi) of a window at `start` (< size; < 0 in the padding)
    whose positions start + t*dilation lie inside [0, size)."""
    lo = (-start + dilation - 1) // dilation if start < 0 else 0
    hi = min(kernel, (size - 1 - start) // dilation + 1)
    return lo, hi


@_jit
def _forward(x, kh, kw, sh, sw, ph, pw, dh, dw, y, argmax, record):  # pragma: no cover - compiled
    """Any geometry; y (N, OH, OW, C) gives OH and OW. record False (evaluation): argmax is not
    written (pass any array of its dtype). Taps outside the input are skipped: -inf never beats
    the running maximum, which starts at -inf with argmax 0 -- the plain code's answer when a
    window holds nothing but -inf."""
    n, h, w, c = x.shape
    oh, ow = y.shape[1], y.shape[2]
    neg_inf = x.dtype.type(-np.inf)
    for b in range(n):
        for i in range(oh):
            h0 = i * sh - ph
            th_lo, th_hi = _taps_inside(h0, kh, dh, h)
            for j in range(ow):
                w0 = j * sw - pw
                tw_lo, tw_hi = _taps_inside(w0, kw, dw, w)
                for ch in range(c):
                    y[b, i, j, ch] = neg_inf
                    if record:
                        argmax[b, i, j, ch] = 0
                for th in range(th_lo, th_hi):
                    r = h0 + th * dh
                    for tw in range(tw_lo, tw_hi):
                        s, k = w0 + tw * dw, th * kw + tw
                        for ch in range(c):
                            at = argmax[b, i, j, ch] if record else 0
                            y[b, i, j, ch], at = _pick(x[b, r, s, ch], y[b, i, j, ch], at, k)
                            if record:
                                argmax[b, i, j, ch] = at


@_jit
def _forward_2x2(x, y, argmax, record):  # pragma: no cover - compiled
    """_forward for 2x2 windows that tile the input, the four taps written out: the running
    maximum stays in a register instead of y."""
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
def _backward(dy, argmax, kh, kw, sh, sw, ph, pw, dh, dw, dx):  # pragma: no cover - compiled
    """Any geometry; dx (N, H, W, C) must hold zeros. The windows go in reverse row-major order:
    an input's windows then come by ascending tap k (a later window reads it at an earlier tap),
    the order in which the plain code adds them -- the same sums, bit for bit. Adding zero where
    the argmax points elsewhere changes no bits (dx never holds -0.0) and keeps the loop SIMD."""
    n, oh, ow, c = dy.shape
    h, w = dx.shape[1], dx.shape[2]
    zero = dx.dtype.type(0)
    for b in range(n):
        for i in range(oh - 1, -1, -1):
            h0 = i * sh - ph
            th_lo, th_hi = _taps_inside(h0, kh, dh, h)
            for j in range(ow - 1, -1, -1):
                w0 = j * sw - pw
                tw_lo, tw_hi = _taps_inside(w0, kw, dw, w)
                for th in range(th_lo, th_hi):
                    r = h0 + th * dh
                    for tw in range(tw_lo, tw_hi):
                        s, k = w0 + tw * dw, th * kw + tw
                        for ch in range(c):
                            dx[b, r, s, ch] += dy[b, i, j, ch] if argmax[b, i, j, ch] == k else zero


@_jit
def _backward_tiles(dy, argmax, kh, kw, dx):  # pragma: no cover - compiled
    """Windows that tile the input: each input is in one window at most, so its dy or 0 is
    written, not added; rows and columns past the last window are left to the caller."""
    n, oh, ow, c = dy.shape
    zero = dx.dtype.type(0)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for k in range(kh * kw):
                    r, s = i * kh + k // kw, j * kw + k % kw
                    for ch in range(c):
                        dx[b, r, s, ch] = dy[b, i, j, ch] if argmax[b, i, j, ch] == k else zero


def _windows_tile(window: Window, h: int, w: int, oh: int, ow: int) -> bool:
    """Stride == kernel, no padding, no dilation, every window inside the input."""
    kh, kw, sh, sw, ph, pw, dh, dw = window
    return sh == kh and sw == kw and ph == pw == 0 and dh == dw == 1 and oh * kh <= h and ow * kw <= w


def _run_forward(x: Any, window: Window, y: Any, argmax: Any, record: bool) -> None:
    """The forward in parts of the batch on cnn_gpu.cpu.threads."""
    tiles = (window.kh, window.kw) == (2, 2) and _windows_tile(window, x.shape[1], x.shape[2], y.shape[1], y.shape[2])

    def run(images: slice, _: Any) -> None:
        at = argmax[images] if record else argmax
        if tiles:
            _forward_2x2(x[images], y[images], at, record)
        else:
            _forward(x[images], *window, y[images], at, record)
    threads.for_each(threads.split(x.shape[0], x[:1].nbytes), run)


def max_pool2d_forward(x: Any, window: Window, out_hw: tuple[int, int]) -> tuple[Any, Any]:
    """x (N, H, W, C) -> y (N, OH, OW, C), argmax (same shape, window_index_dtype: the tap kh*KW + kw
    of each maximum). out_hw: (OH, OW), geometry's output size for the window (floor or ceil mode)."""
    x = np.ascontiguousarray(x)
    shape = (x.shape[0], *out_hw, x.shape[3])
    y = np.empty(shape, dtype=x.dtype)
    argmax = np.empty(shape, dtype=window_index_dtype(window.kh, window.kw))
    _run_forward(x, window, y, argmax, True)
    return y, argmax


def max_pool2d(x: Any, window: Window, out_hw: tuple[int, int]) -> Any:
    """x (N, H, W, C) -> y (N, OH, OW, C), with no argmax (evaluation)."""
    x = np.ascontiguousarray(x)
    y = np.empty((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)
    _run_forward(x, window, y, _NO_ARGMAX, False)
    return y


def max_pool2d_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...], window: Window) -> Any:
    """dy, argmax (N, OH, OW, C) -> dx (N, H, W, C): each gradient to its window's argmax tap (one
    outside the input drops out); where windows overlap, an input adds what it receives."""
    dy, argmax = np.ascontiguousarray(dy), np.ascontiguousarray(argmax)
    oh, ow = dy.shape[1], dy.shape[2]
    tiles = _windows_tile(window, x_shape[1], x_shape[2], oh, ow)
    if tiles:
        dx = np.empty(x_shape, dtype=dy.dtype)
        dx[:, oh * window.kh:] = 0  # rows and columns no window covers
        dx[:, :, ow * window.kw:] = 0
    else:
        dx = np.zeros(x_shape, dtype=dy.dtype)

    def run(images: slice, _: Any) -> None:  # each image's dx reads only that image's dy
        if tiles:
            _backward_tiles(dy[images], argmax[images], window.kh, window.kw, dx[images])
        else:
            _backward(dy[images], argmax[images], *window, dx[images])
    threads.for_each(threads.split(dx.shape[0], dx[:1].nbytes), run)
    return dx
