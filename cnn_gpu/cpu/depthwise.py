"""Depthwise convolution on the CPU, compiled by Numba: the forward, and both gradients in one pass.

    x (N, H, W, C), w (KH, KW, 1, C*M), b (C*M,) -> y (N, OH, OW, C*M)
    y[n, oh, ow, c*M + m] = b[c*M + m] + sum over i, j of
                            x[n, oh*sh - ph + i*dh, ow*sw - pw + j*dw, c] * w[i, j, 0, c*M + m]

(groups == C, channel multiplier M.) NumPy's version (cnn_gpu.functional.conv, DEPTHWISE, the
reference for these loops) makes one pass over the whole output per kernel tap; here each output
row takes all its taps while it is in L1, and the loops innermost run over the contiguous channels
(SIMD over C). Taps that fall in the padding are skipped, not multiplied by zero. The backward
visits each output once and adds into both dx and dw; dw sums one image at a time in the input's
dtype and the images' sums in float64. Both run in parts of the batch on cnn_gpu.cpu.threads (dw:
one float64 sum per part, added in part order). A 3x3 kernel with multiplier 1 (MobileNet's) runs
_forward_3x3, whose nine taps are one expression per channel, summed in a register.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import Window
from . import threads
from .jit import JIT as _jit  # cached on disk, without the GIL or bounds checks


@_jit
def _forward(x, w, b, sh, sw, ph, pw, dil_h, dil_w, relu, y):  # pragma: no cover - compiled; tested against NumPy
    # x (N, H, W, C), w (KH, KW, O), b (O,) -> y (N, OH, OW, O), O = C * mult; relu: max(y, 0) per row
    n, h, wd, c = x.shape
    _, oh, ow, o = y.shape
    kh, kw = w.shape[0], w.shape[1]
    mult = o // c
    for bi in range(n):
        for i in range(oh):
            for j in range(ow):
                for k in range(o):
                    y[bi, i, j, k] = b[k]
            for p in range(kh):
                r = i * sh - ph + p * dil_h
                if r < 0 or r >= h:
                    continue  # the tap falls in the padding
                for q in range(kw):
                    for j in range(ow):
                        s = j * sw - pw + q * dil_w
                        if s < 0 or s >= wd:
                            continue
                        if mult == 1:
                            for k in range(o):
                                y[bi, i, j, k] += x[bi, r, s, k] * w[p, q, k]
                        else:
                            for ch in range(c):
                                v = x[bi, r, s, ch]
                                for m in range(mult):
                                    y[bi, i, j, ch * mult + m] += v * w[p, q, ch * mult + m]
            if relu:  # NumPy's maximum(v, 0): NaN passes, -0.0 gives 0
                zero = y.dtype.type(0)
                for j in range(ow):
                    for k in range(o):
                        v = y[bi, i, j, k]
                        y[bi, i, j, k] = v if (v > zero) | (v != v) else zero


@_jit
def _backward(dy, x, w, sh, sw, ph, pw, dil_h, dil_w, need_dx, dx, dw):  # pragma: no cover - compiled
    # dy (N, OH, OW, O), x (N, H, W, C), w (KH, KW, O) -> dx (N, H, W, C) when need_dx, dw (KH, KW, O) float64
    n, h, wd, c = x.shape
    _, oh, ow, o = dy.shape
    kh, kw = w.shape[0], w.shape[1]
    mult = o // c
    image_dw = np.empty((kh, kw, o), dtype=dy.dtype)
    dw[:] = 0.0
    for bi in range(n):
        image_dw[:] = 0
        if need_dx:
            dx[bi] = 0
        for i in range(oh):
            for p in range(kh):
                r = i * sh - ph + p * dil_h
                if r < 0 or r >= h:
                    continue
                for q in range(kw):
                    for j in range(ow):
                        s = j * sw - pw + q * dil_w
                        if s < 0 or s >= wd:
                            continue
                        if mult == 1 and need_dx:  # one loop for both: dy and the loop's overhead once
                            for k in range(o):
                                g = dy[bi, i, j, k]
                                image_dw[p, q, k] += x[bi, r, s, k] * g
                                dx[bi, r, s, k] += g * w[p, q, k]
                        elif mult == 1:
                            for k in range(o):
                                image_dw[p, q, k] += x[bi, r, s, k] * dy[bi, i, j, k]
                        else:
                            for ch in range(c):
                                v = x[bi, r, s, ch]
                                acc = 0.0  # the M products into one input channel, summed in float64
                                for m in range(mult):
                                    g = dy[bi, i, j, ch * mult + m]
                                    image_dw[p, q, ch * mult + m] += v * g
                                    acc += g * w[p, q, ch * mult + m]
                                if need_dx:
                                    dx[bi, r, s, ch] += acc
        for p in range(kh):
            for q in range(kw):
                for k in range(o):
                    dw[p, q, k] += image_dw[p, q, k]


# ---- 3x3, multiplier 1 (MobileNet's depthwise layers): the forward with every tap written out ----
#
# Each image is first copied into a zero-padded scratch image (it stays in L2), so that every
# output reads all nine taps and the loop over channels, innermost, is one expression of nine
# products whose running sum the compiler keeps in a vector register: no accumulator goes through
# memory between taps, as it does in _forward. The padded taps add zeros, which changes no sum.

@_jit
def _padded_image(x, bi, ph, pw, xpad):  # pragma: no cover - compiled
    # x[bi] (H, W, C) -> the interior of xpad (Hp, Wp, C), whose border stays zero
    _, h, wd, c = x.shape
    for r in range(h):
        for s in range(wd):
            for k in range(c):
                xpad[r + ph, s + pw, k] = x[bi, r, s, k]


@_jit
def _forward_3x3(x, w, b, sh, sw, ph, pw, dil_h, dil_w, relu, y):  # pragma: no cover - compiled; tested
    # x (N, H, W, C), w (3, 3, C), b (C,) -> y (N, OH, OW, C); relu: max(y, 0)
    n, h, wd, c = x.shape
    _, oh, ow, _ = y.shape
    hp = max(h + 2 * ph, (oh - 1) * sh + 2 * dil_h + 1)
    wp = max(wd + 2 * pw, (ow - 1) * sw + 2 * dil_w + 1)
    xpad = np.zeros((hp, wp, c), dtype=x.dtype)
    zero = y.dtype.type(0)
    for bi in range(n):
        _padded_image(x, bi, ph, pw, xpad)
        for i in range(oh):
            r0 = i * sh
            r1 = r0 + dil_h
            r2 = r1 + dil_h
            for j in range(ow):
                s0 = j * sw
                s1 = s0 + dil_w
                s2 = s1 + dil_w
                for k in range(c):
                    acc = b[k] + xpad[r0, s0, k] * w[0, 0, k]
                    acc += xpad[r0, s1, k] * w[0, 1, k]
                    acc += xpad[r0, s2, k] * w[0, 2, k]
                    acc += xpad[r1, s0, k] * w[1, 0, k]
                    acc += xpad[r1, s1, k] * w[1, 1, k]
                    acc += xpad[r1, s2, k] * w[1, 2, k]
                    acc += xpad[r2, s0, k] * w[2, 0, k]
                    acc += xpad[r2, s1, k] * w[2, 1, k]
                    acc += xpad[r2, s2, k] * w[2, 2, k]
                    if relu and not ((acc > zero) | (acc != acc)):  # NumPy's maximum(acc, 0)
                        acc = zero
                    y[bi, i, j, k] = acc


def _three_by_three(x: Any, w: Any) -> bool:
    """Whether the written-out 3x3 forward applies: a 3x3 kernel, channel multiplier 1."""
    return w.shape[:2] == (3, 3) and w.shape[3] == x.shape[3]


def _taps(w: Any) -> Any:
    """w (KH, KW, 1, O) -> (KH, KW, O), C-contiguous."""
    return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1], w.shape[3]))


def depthwise_forward(x: Any, w: Any, b: Any, window: Window, out_hw: tuple[int, int], relu: bool = False) -> Any:
    """x (N, H, W, C), w (KH, KW, 1, C*M), b (C*M,) or None -> y (N, OH, OW, C*M): the first
    OH x OW outputs; relu: max(y, 0), each output row while it is in L1."""
    n, o = x.shape[0], w.shape[3]
    y = np.empty((n, *out_hw, o), dtype=x.dtype)
    bias = np.zeros(o, dtype=x.dtype) if b is None else np.ascontiguousarray(b)
    forward = _forward_3x3 if _three_by_three(x, w) else _forward
    x, taps = np.ascontiguousarray(x), _taps(w)

    def run(images: slice, _: Any) -> None:
        forward(x[images], taps, bias, window.sh, window.sw, window.ph, window.pw, window.dh, window.dw,
                bool(relu), y[images])
    threads.for_each(threads.split(n, y[:1].nbytes), run)  # a part of the batch per thread
    return y


def depthwise_backward(dy: Any, x: Any, w: Any, window: Window, need_dx: bool) -> tuple[Any, Any]:
    """dy (N, OH, OW, C*M) -> dx (N, H, W, C) or None, dw (KH, KW, 1, C*M)."""
    dx = np.empty(x.shape, dtype=x.dtype) if need_dx else np.empty((0, 0, 0, 0), dtype=x.dtype)
    dy, x, taps = np.ascontiguousarray(dy), np.ascontiguousarray(x), _taps(w)

    def run(images: slice, _: Any) -> Any:  # this part's dx, and its float64 dw (KH, KW, O)
        dw = np.empty(taps.shape, dtype=np.float64)
        _backward(dy[images], x[images], taps, window.sh, window.sw, window.ph, window.pw, window.dh,
                  window.dw, need_dx, dx[images] if need_dx else dx, dw)
        return dw

    parts = threads.for_each(threads.row_parts(x.shape[0], dy[:1].nbytes), run)
    dw = np.zeros(taps.shape, dtype=np.float64)
    for part_dw in parts:  # in part order: the same sum on any number of threads
        dw += part_dw
    return (dx if need_dx else None), dw.astype(x.dtype).reshape(w.shape)
