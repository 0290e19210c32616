"""A 3x3 convolution with padding 1, computed directly in vector registers: no im2col.

    scratch = padded_scratch(B, H, W, C)       # a flat zeroed buffer for B padded images
    y = aligned_empty((B, OH, OW, O))          # outputs on 64-byte boundaries, for the vector stores
    conv3x3(x, w, y, scratch, stride=1)        # x (B, H, W, C), w (3, 3, C, O) -> y (B, OH, OW, O)
    conv3x3_input_grad(dy, swap_channels(w), dx, dy_scratch, stride=1)   # dy (B, OH, OW, O) -> dx

The float32 path of a ResNet's 3x3 convolutions (cnn_gpu.functional.conv, strategy NUMPY_DIRECT).
im2col + GEMM copies every receptive field (cols is 9 times x) and then runs a GEMM whose output
is only 16-64 channels wide, which OpenBLAS runs well below its peak; at 16 channels the copies
cost as much as the GEMM (BENCHMARKS.md, "Why resnet20 stays below 1.0x"). Here each output tile
is summed in registers straight from x:

    for each tile of P consecutive output positions (of the whole batch), each block of output channels:
        acc[P][block] = 0
        for each tap (p, q), each input channel c:
            acc[k] += x[window k + tap (p, q), c] * w[p, q, c, block]    # a broadcast and a vector FMA
        store acc to the P rows of y

x is first copied into a zero-bordered buffer of (H + 2, W + 2) images (the padding). A tile is P
consecutive positions of the dense (B, OH, OW) output grid, so it may run across rows and images;
each position keeps the address where its window starts (at stride s, output (i, j) reads from
padded row s i, column s j), set by stepping from the tile's first position, and tap (p, q) is a
fixed offset from every start. The last tile's positions past the end read the last window again
and are not stored.

The micro-kernels are written out as BLAS micro-kernels are (Numba has no arrays of registers),
and compiled for each (C, O, stride) they meet (_kernel): 6 positions x 4 vectors of output
channels (24 accumulators, for AVX-512's 32 registers) for O a multiple of 4 * LANES on AVX-512;
6 x 2 (12 accumulators) for O a multiple of 2 * LANES; 12 x 1 for O a multiple of LANES (ResNet's
16 channels on AVX-512). 12 accumulators, two weight vectors and a broadcast fit AVX2's 16 registers.
At stride 1, 8 or 7 positions of one row (_rows, _rows_x2 for two vectors on AVX-512) share each
broadcast among the three taps of a tap row that read it (rows of 7 cover the 28, 14 and 7 columns
of a Fashion-MNIST ResNet's maps whole), and the tiles take what is left of each row.

    dw = conv3x3_weight_grad(x, dy, stride=1)            # (3, 3, C, O): x's windows times dy, summed

The weight gradient's kernel (_weight_grad_kernel) turns the roles round: its vectors run over
input channels, dy is broadcast, and each pass over the batch sums one row of taps for LANES
input channels and 8 output channels. It reads x itself, not a padded copy: a row of taps
outside the image is skipped, and a column outside it is a vector of zeros (the padded copy's
numbers, without a pass to make it).

Over a batch cut into chunks (cnn_gpu.functional.conv, strategy NUMPY_DIRECT), each thread makes
one call that takes chunks from a shared counter (cnn_gpu.cpu.threads.on_each) and pads, convolves
and adds the bias of each, or makes its dx and weight gradient, with no Python between chunks:

    run = conv3x3_chunks(x, w, y, starts, stride, bias, relu)          # run(counter, scratch) on each thread
    run = conv3x3_backward_chunks(x, dy, w_t, dx, dx_plus, dw_t_parts, starts, stride)
    scratch = kept_padded_scratch(B, H, W, C)    # a thread's own, kept from op to op
"""
from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Callable

import numba
import numpy as np

from . import elementwise, simd, spin
from .jit import JIT, KERNEL_JIT, specialized
from .simd import LANES, aligned_empty, broadcast, fma, load, zeros

# The kernels that a compiled loop below calls by these names, bound for each shape (jit.specialized)
ROWS8 = ROWS7 = REST = KERNEL = K0 = K1 = K2 = K3 = WEIGHT_GRAD = None


def supports(in_channels: int, out_channels: int) -> bool:
    """Whether conv3x3 computes O = out_channels outputs (a multiple of LANES; C is any), at any stride."""
    return out_channels % simd.LANES == 0 and in_channels > 0


def supports_weight_grad(in_channels: int, out_channels: int) -> bool:
    """Whether conv3x3_weight_grad takes these channels: C a multiple of LANES, O of 8."""
    return in_channels % simd.LANES == 0 and out_channels % 8 == 0 and out_channels > 0


@numba.njit(inline="always", boundscheck=False)
def _next(b, i, j, n, gh, gw):  # pragma: no cover - compiled, tested
    """The grid position after (b, i, j) in (image, row, column) order; the last stays the last."""
    if j + 1 < gw:
        return b, i, j + 1
    if i + 1 < gh:
        return b, i + 1, 0
    if b + 1 < n:
        return b + 1, 0, 0
    return b, i, j


@numba.njit(inline="always", boundscheck=False)
def _window(b, i, j, hp, wp, s, c):  # pragma: no cover - compiled, tested
    """Where grid position (b, i, j)'s window starts in the flat padded images: at (s i, s j)."""
    return ((b * hp + i * s) * wp + j * s) * c


@numba.njit(inline="always", boundscheck=False)
def _place(b, i, j, oh, ow, spread, row0, col0, o):  # pragma: no cover - compiled, tested
    """Where grid position (b, i, j)'s output goes in the flat (n, oh, ow, o) output: at (spread i +
    row0, spread j + col0); a convolution's grid is its output (spread 1, row0 = col0 = 0)."""
    return ((b * oh + spread * i + row0) * ow + spread * j + col0) * o


@functools.lru_cache(maxsize=None)
def _tiles6(c: int, o: int, s: int, taps: tuple) -> Callable[..., None]:
    """6 positions x 4 vectors (O a multiple of 4 * LANES, on AVX-512) or x 2 vectors (of 2 * LANES)."""
    vectors = 4 if LANES == 16 and o % (4 * LANES) == 0 else 2

    def tiles6(x, w, y, n, hp, wp, gh, gw, spread, row0, col0, oh, ow):  # pragma: no cover - compiled, tested
        per_image = gh * gw
        total = n * per_image
        for f0 in range(0, total, 6):
            b = f0 // per_image
            i = (f0 - b * per_image) // gw
            j = f0 - b * per_image - i * gw
            x0, d0 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x1, d1 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x2, d2 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x3, d3 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x4, d4 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x5, d5 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            for o0 in range(0, o, vectors * LANES):
                a00, a01, a02, a03 = zeros(), zeros(), zeros(), zeros()
                a10, a11, a12, a13 = zeros(), zeros(), zeros(), zeros()
                a20, a21, a22, a23 = zeros(), zeros(), zeros(), zeros()
                a30, a31, a32, a33 = zeros(), zeros(), zeros(), zeros()
                a40, a41, a42, a43 = zeros(), zeros(), zeros(), zeros()
                a50, a51, a52, a53 = zeros(), zeros(), zeros(), zeros()
                for tap in range(len(taps)):
                    di, dj, tw = taps[tap]
                    t = (di * wp + dj) * c  # the tap's offset from each window's start
                    wt = tw * c * o + o0  # its weights, w[tw // 3, tw % 3]
                    for ch in range(c):
                        w0, w1 = load(w, wt + ch * o), load(w, wt + ch * o + LANES)
                        if vectors == 4:
                            w2, w3 = load(w, wt + ch * o + 2 * LANES), load(w, wt + ch * o + 3 * LANES)
                        v = broadcast(x, x0 + t + ch)
                        a00, a01 = fma(v, w0, a00), fma(v, w1, a01)
                        if vectors == 4:
                            a02, a03 = fma(v, w2, a02), fma(v, w3, a03)
                        v = broadcast(x, x1 + t + ch)
                        a10, a11 = fma(v, w0, a10), fma(v, w1, a11)
                        if vectors == 4:
                            a12, a13 = fma(v, w2, a12), fma(v, w3, a13)
                        v = broadcast(x, x2 + t + ch)
                        a20, a21 = fma(v, w0, a20), fma(v, w1, a21)
                        if vectors == 4:
                            a22, a23 = fma(v, w2, a22), fma(v, w3, a23)
                        v = broadcast(x, x3 + t + ch)
                        a30, a31 = fma(v, w0, a30), fma(v, w1, a31)
                        if vectors == 4:
                            a32, a33 = fma(v, w2, a32), fma(v, w3, a33)
                        v = broadcast(x, x4 + t + ch)
                        a40, a41 = fma(v, w0, a40), fma(v, w1, a41)
                        if vectors == 4:
                            a42, a43 = fma(v, w2, a42), fma(v, w3, a43)
                        v = broadcast(x, x5 + t + ch)
                        a50, a51 = fma(v, w0, a50), fma(v, w1, a51)
                        if vectors == 4:
                            a52, a53 = fma(v, w2, a52), fma(v, w3, a53)
                for k, d, acc in ((0, d0, (a00, a01, a02, a03)), (1, d1, (a10, a11, a12, a13)),
                                  (2, d2, (a20, a21, a22, a23)), (3, d3, (a30, a31, a32, a33)),
                                  (4, d4, (a40, a41, a42, a43)), (5, d5, (a50, a51, a52, a53))):
                    if f0 + k < total:
                        for v in range(vectors):
                            simd.store(y, d + o0 + v * LANES, acc[v])
    return specialized(tiles6, KERNEL_JIT)


@functools.lru_cache(maxsize=None)
def _tiles12(c: int, o: int, s: int, taps: tuple) -> Callable[..., None]:
    """12 positions x 1 vector (O a multiple of LANES)."""
    def tiles12(x, w, y, n, hp, wp, gh, gw, spread, row0, col0, oh, ow):  # pragma: no cover - compiled, tested
        per_image = gh * gw
        total = n * per_image
        for f0 in range(0, total, 12):
            b = f0 // per_image
            i = (f0 - b * per_image) // gw
            j = f0 - b * per_image - i * gw
            x0, d0 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x1, d1 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x2, d2 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x3, d3 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x4, d4 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x5, d5 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x6, d6 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x7, d7 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x8, d8 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x9, d9 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x10, d10 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            b, i, j = _next(b, i, j, n, gh, gw)
            x11, d11 = _window(b, i, j, hp, wp, s, c), _place(b, i, j, oh, ow, spread, row0, col0, o)
            for o0 in range(0, o, LANES):
                a0, a1, a2, a3, a4, a5 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
                a6, a7, a8, a9, a10, a11 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
                for tap in range(len(taps)):
                    di, dj, tw = taps[tap]
                    t = (di * wp + dj) * c
                    wt = tw * c * o + o0
                    for ch in range(c):
                        w0 = load(w, wt + ch * o)
                        a0 = fma(broadcast(x, x0 + t + ch), w0, a0)
                        a1 = fma(broadcast(x, x1 + t + ch), w0, a1)
                        a2 = fma(broadcast(x, x2 + t + ch), w0, a2)
                        a3 = fma(broadcast(x, x3 + t + ch), w0, a3)
                        a4 = fma(broadcast(x, x4 + t + ch), w0, a4)
                        a5 = fma(broadcast(x, x5 + t + ch), w0, a5)
                        a6 = fma(broadcast(x, x6 + t + ch), w0, a6)
                        a7 = fma(broadcast(x, x7 + t + ch), w0, a7)
                        a8 = fma(broadcast(x, x8 + t + ch), w0, a8)
                        a9 = fma(broadcast(x, x9 + t + ch), w0, a9)
                        a10 = fma(broadcast(x, x10 + t + ch), w0, a10)
                        a11 = fma(broadcast(x, x11 + t + ch), w0, a11)
                for k, d, acc in ((0, d0, a0), (1, d1, a1), (2, d2, a2), (3, d3, a3), (4, d4, a4), (5, d5, a5),
                                  (6, d6, a6), (7, d7, a7), (8, d8, a8), (9, d9, a9), (10, d10, a10), (11, d11, a11)):
                    if f0 + k < total:
                        simd.store(y, d + o0, acc)
    return specialized(tiles12, KERNEL_JIT)


FORWARD_TAPS = tuple((p, q, 3 * p + q) for p in range(3) for q in range(3))  # (row, column, weight) of each tap


@functools.lru_cache(maxsize=None)
def _rows(c: int, o: int, weights: tuple, r: int) -> Callable[..., None]:
    """r = 8 or 7 positions of one output row x 1 vector (O = LANES) at stride 1, for a full 3 x 3
    set of taps; weights[3 di + dj]: the weights w[tw // 3, tw % 3] that tap (di, dj) reads.

    Along a row, input column u of tap row di is read by output j0 + k at tap column dj = u - k,
    so each broadcast of x feeds up to three accumulators, each with its own weight vector: per
    tap row and input channel, r + 2 broadcasts and 3 weight loads for 3 r FMAs, where 12 positions
    x 1 vector (_tiles12) makes 13 loads for 12 FMAs and ran at load-port speed (BENCHMARKS.md,
    "Session 13"). r is a constant of the compiled code: at r = 7 the lines for a7 are not there."""
    def rows(x, w, y, n, hp, wp, gh, gw, full):  # pragma: no cover - compiled, tested
        # x: n padded images (hp, wp, c), flat; y: (n, gh, gw, o), flat; columns 0..full-1 of each row
        for b in range(n):
            for i in range(gh):
                for j0 in range(0, full, r):
                    a0, a1, a2, a3, a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
                    for di in range(3):
                        base = ((b * hp + i + di) * wp + j0) * c
                        w_0, w_1, w_2 = weights[3 * di] * c * o, weights[3 * di + 1] * c * o, weights[3 * di + 2] * c * o
                        for ch in range(c):
                            w0, w1, w2 = load(w, w_0 + ch * o), load(w, w_1 + ch * o), load(w, w_2 + ch * o)
                            v = broadcast(x, base + ch)
                            a0 = fma(v, w0, a0)
                            v = broadcast(x, base + c + ch)
                            a1, a0 = fma(v, w0, a1), fma(v, w1, a0)
                            v = broadcast(x, base + 2 * c + ch)
                            a2, a1, a0 = fma(v, w0, a2), fma(v, w1, a1), fma(v, w2, a0)
                            v = broadcast(x, base + 3 * c + ch)
                            a3, a2, a1 = fma(v, w0, a3), fma(v, w1, a2), fma(v, w2, a1)
                            v = broadcast(x, base + 4 * c + ch)
                            a4, a3, a2 = fma(v, w0, a4), fma(v, w1, a3), fma(v, w2, a2)
                            v = broadcast(x, base + 5 * c + ch)
                            a5, a4, a3 = fma(v, w0, a5), fma(v, w1, a4), fma(v, w2, a3)
                            v = broadcast(x, base + 6 * c + ch)
                            a6, a5, a4 = fma(v, w0, a6), fma(v, w1, a5), fma(v, w2, a4)
                            v = broadcast(x, base + 7 * c + ch)
                            a6, a5 = fma(v, w1, a6), fma(v, w2, a5)
                            if r == 8:
                                a7 = fma(v, w0, a7)
                            v = broadcast(x, base + 8 * c + ch)
                            a6 = fma(v, w2, a6)
                            if r == 8:
                                a7 = fma(v, w1, a7)
                                v = broadcast(x, base + 9 * c + ch)
                                a7 = fma(v, w2, a7)
                    out = ((b * gh + i) * gw + j0) * o
                    simd.store(y, out, a0)
                    simd.store(y, out + o, a1)
                    simd.store(y, out + 2 * o, a2)
                    simd.store(y, out + 3 * o, a3)
                    simd.store(y, out + 4 * o, a4)
                    simd.store(y, out + 5 * o, a5)
                    simd.store(y, out + 6 * o, a6)
                    if r == 8:
                        simd.store(y, out + 7 * o, a7)
    return specialized(rows, KERNEL_JIT)


@functools.lru_cache(maxsize=None)
def _rows_x2(c: int, o: int, weights: tuple, r: int) -> Callable[..., None]:
    """_rows for two vectors of outputs at a time (O a multiple of 2 * LANES, on AVX-512): 2 r
    accumulators, 6 weight vectors and a broadcast, at most 23 of the 32 registers; r + 2
    broadcasts and 6 weight loads for 6 r FMAs, against 6 x 2 tiles' 8 loads for 12
    (BENCHMARKS.md, "Session 13")."""
    def rows_x2(x, w, y, n, hp, wp, gh, gw, full):  # pragma: no cover - compiled, tested
        for b in range(n):
            for i in range(gh):
                for j0 in range(0, full, r):
                    for o0 in range(0, o, 2 * LANES):
                        a0, a1, a2, a3, a4, a5, a6, a7 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
                        e0, e1, e2, e3, e4, e5, e6, e7 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
                        for di in range(3):
                            base = ((b * hp + i + di) * wp + j0) * c
                            w_0 = weights[3 * di] * c * o + o0
                            w_1 = weights[3 * di + 1] * c * o + o0
                            w_2 = weights[3 * di + 2] * c * o + o0
                            for ch in range(c):
                                w0, w1, w2 = load(w, w_0 + ch * o), load(w, w_1 + ch * o), load(w, w_2 + ch * o)
                                u0 = load(w, w_0 + ch * o + LANES)
                                u1 = load(w, w_1 + ch * o + LANES)
                                u2 = load(w, w_2 + ch * o + LANES)
                                v = broadcast(x, base + ch)
                                a0, e0 = fma(v, w0, a0), fma(v, u0, e0)
                                v = broadcast(x, base + c + ch)
                                a1, a0, e1, e0 = fma(v, w0, a1), fma(v, w1, a0), fma(v, u0, e1), fma(v, u1, e0)
                                v = broadcast(x, base + 2 * c + ch)
                                a2, a1, a0 = fma(v, w0, a2), fma(v, w1, a1), fma(v, w2, a0)
                                e2, e1, e0 = fma(v, u0, e2), fma(v, u1, e1), fma(v, u2, e0)
                                v = broadcast(x, base + 3 * c + ch)
                                a3, a2, a1 = fma(v, w0, a3), fma(v, w1, a2), fma(v, w2, a1)
                                e3, e2, e1 = fma(v, u0, e3), fma(v, u1, e2), fma(v, u2, e1)
                                v = broadcast(x, base + 4 * c + ch)
                                a4, a3, a2 = fma(v, w0, a4), fma(v, w1, a3), fma(v, w2, a2)
                                e4, e3, e2 = fma(v, u0, e4), fma(v, u1, e3), fma(v, u2, e2)
                                v = broadcast(x, base + 5 * c + ch)
                                a5, a4, a3 = fma(v, w0, a5), fma(v, w1, a4), fma(v, w2, a3)
                                e5, e4, e3 = fma(v, u0, e5), fma(v, u1, e4), fma(v, u2, e3)
                                v = broadcast(x, base + 6 * c + ch)
                                a6, a5, a4 = fma(v, w0, a6), fma(v, w1, a5), fma(v, w2, a4)
                                e6, e5, e4 = fma(v, u0, e6), fma(v, u1, e5), fma(v, u2, e4)
                                v = broadcast(x, base + 7 * c + ch)
                                a6, a5, e6, e5 = fma(v, w1, a6), fma(v, w2, a5), fma(v, u1, e6), fma(v, u2, e5)
                                if r == 8:
                                    a7, e7 = fma(v, w0, a7), fma(v, u0, e7)
                                v = broadcast(x, base + 8 * c + ch)
                                a6, e6 = fma(v, w2, a6), fma(v, u2, e6)
                                if r == 8:
                                    a7, e7 = fma(v, w1, a7), fma(v, u1, e7)
                                    v = broadcast(x, base + 9 * c + ch)
                                    a7, e7 = fma(v, w2, a7), fma(v, u2, e7)
                        out = ((b * gh + i) * gw + j0) * o + o0
                        for k, low, high in ((0, a0, e0), (1, a1, e1), (2, a2, e2), (3, a3, e3),
                                             (4, a4, e4), (5, a5, e5), (6, a6, e6), (7, a7, e7)):
                            if k < r:
                                simd.store(y, out + k * o, low)
                                simd.store(y, out + k * o + LANES, high)
    return specialized(rows_x2, KERNEL_JIT)


def _row_weights(taps: tuple) -> tuple | None:
    """weights[3 di + dj] for _rows when the taps are all nine (di, dj) offsets once; else None."""
    by_offset = {(di, dj): tw for di, dj, tw in taps}
    if len(taps) != 9 or set(by_offset) != {(di, dj) for di in range(3) for dj in range(3)}:
        return None
    return tuple(by_offset[(di, dj)] for di in range(3) for dj in range(3))


def _rows_apply(o: int, s: int, taps: tuple) -> bool:
    """Whether _rows_then_tiles takes this kernel: stride 1, all nine taps, and O one vector
    (_rows) or, on AVX-512, a multiple of two (_rows_x2: AVX2's 16 registers would not hold it)."""
    vectors = o == LANES or (LANES == 16 and o % (2 * LANES) == 0)
    return vectors and s == 1 and _row_weights(taps) is not None


@JIT
def row_split(width):  # pragma: no cover - compiled, tested
    """(eights, sevens): rows of 8 and then of 7 that cover the most of a row of this width (more
    eights on a tie); the tiles take the rest. 28 = 4 x 7, 14 = 2 x 7, 32 = 4 x 8, 15 = 8 + 7.
    Compiled: the kernels call it, and Python too."""
    best_eights, best_sevens = 0, 0
    for sevens in range(min(7, width // 7) + 1):  # 8 sevens would be 7 eights
        eights = (width - 7 * sevens) // 8
        if 8 * eights + 7 * sevens > 8 * best_eights + 7 * best_sevens:
            best_eights, best_sevens = eights, sevens
    return best_eights, best_sevens


@functools.lru_cache(maxsize=None)
def _rows_then_tiles(c: int, o: int, taps: tuple) -> Callable[..., None]:
    """The tiles kernels' call at stride 1 with all nine taps (_rows_apply): rows of 8 and then of 7
    over each row's first columns (row_split), the tiles over the rest (x and y, or the columns,
    offset to where each part begins)."""
    weights = _row_weights(taps)
    rows, rest = (_rows, _tiles12(c, o, 1, taps)) if o == LANES else (_rows_x2, _tiles6(c, o, 1, taps))

    def rows_then_tiles(x, w, y, n, hp, wp, gh, gw, spread, row0, col0, oh, ow):  # pragma: no cover - compiled, tested
        eights, sevens = row_split(gw) if spread == 1 and row0 == 0 and col0 == 0 else (0, 0)
        if eights:
            ROWS8(x, w, y, n, hp, wp, gh, gw, 8 * eights)
        start = 8 * eights
        if sevens:  # window j of x[start * c:] starts at padded column start + j; y likewise
            ROWS7(x[start * c:], w, y[start * o:], n, hp, wp, gh, gw, 7 * sevens)
        start += 7 * sevens
        if start < gw:  # the tiles: the rest of each row, or (no rows) all of it
            REST(x[start * c:], w, y, n, hp, wp, gh, gw - start, spread, row0, col0 + start, oh, ow)
    return specialized(rows_then_tiles, KERNEL_JIT, ROWS8=rows(c, o, weights, 8), ROWS7=rows(c, o, weights, 7), REST=rest)


def _kernel(c: int, o: int, s: int, taps: tuple = FORWARD_TAPS) -> Callable[..., None]:
    """The micro-kernel loop for c input channels, o output channels, windows s pixels apart and
    these taps ((row, column) offsets from a window's start, and the index p * 3 + q of the
    weights w[p, q] each reads), compiled for them: as constants they turn every address of the
    inner loop into a register plus a fixed offset (BENCHMARKS.md, session 9). Compiled on first
    use, into the chunk loop that calls it (cached on disk with the loop: cnn_gpu.cpu.jit), or
    alone when Python calls it (conv3x3, conv3x3_input_grad). At stride 1 with all nine taps (a
    ResNet's layers and their input gradients) the kernel runs along rows (_rows_then_tiles)."""
    if _rows_apply(o, s, taps):
        return _rows_then_tiles(c, o, taps)
    return _tiles12(c, o, s, taps) if o % (2 * LANES) else _tiles6(c, o, s, taps)


def _input_grad_taps(s: int, row0: int, col0: int) -> tuple:
    """The taps that reach the input positions (s m + row0, s n + col0) of a stride-s convolution,
    as offsets into dy padded by one (see conv3x3_input_grad): input row Y is read by output row i
    at tap p where s i + p - 1 = Y, so for Y = s m + row0, by i = m + (row0 + 1 - p) / s, padded row
    m + 1 + (row0 + 1 - p) / s, for each p with row0 + 1 - p a multiple of s."""
    rows = [(1 + (row0 + 1 - p) // s, p) for p in range(3) if (row0 + 1 - p) % s == 0]
    cols = [(1 + (col0 + 1 - q) // s, q) for q in range(3) if (col0 + 1 - q) % s == 0]
    return tuple((di, dj, 3 * p + q) for di, p in rows for dj, q in cols)


@functools.lru_cache(maxsize=None)
def _weight_grad_kernel(c: int, o: int, s: int = 1) -> Callable[..., None]:
    """The weight gradient's loop for c input and o output channels at stride s (compiled as
    _kernel is):
    for one row p of taps, LANES input channels and 8 output channels at a time, 24 accumulators
    acc[q][k] (a vector over the input channels of dw[p, q, :, o0 + k]) summed over every output
    position: per position three vector loads of x (one per tap q) and 8 broadcasts of dy for 24
    FMAs, where a GEMM of cols.T @ dy first needs cols. On AVX2's 16 registers the 24 accumulators
    spill: the same sums, slower (not measured: no AVX2 machine this session)."""
    def weight_grad(x, dy, dw_t, n, h, w, oh, ow):  # pragma: no cover - compiled, tested
        # x: (n, h, w, c), flat; dy: (n, oh, ow, o), flat; dw_t: (3, 3, o, c), flat, overwritten
        # (channels last, so that each accumulator is stored as one vector). Output (i, j) reads
        # input row s i + p - 1 and columns s j - 1, s j, s j + 1 at taps (p, 0), (p, 1), (p, 2).
        outside = zeros()
        for p in range(3):
            for c0 in range(0, c, LANES):
                for o0 in range(0, o, 8):
                    a00, a01, a02, a03, a04, a05, a06, a07 = (zeros(), zeros(), zeros(), zeros(),
                                                              zeros(), zeros(), zeros(), zeros())
                    a10, a11, a12, a13, a14, a15, a16, a17 = (zeros(), zeros(), zeros(), zeros(),
                                                              zeros(), zeros(), zeros(), zeros())
                    a20, a21, a22, a23, a24, a25, a26, a27 = (zeros(), zeros(), zeros(), zeros(),
                                                              zeros(), zeros(), zeros(), zeros())
                    for b in range(n):
                        for i in range(oh):
                            r = s * i + p - 1
                            if r < 0 or r >= h:  # the padding's row: it adds nothing
                                continue
                            row = ((b * h + r) * w) * c + c0
                            dy_row = ((b * oh + i) * ow) * o + o0
                            for j in range(ow):
                                col = s * j
                                x0 = load(x, row + (col - 1) * c) if col >= 1 else outside
                                x1 = load(x, row + col * c)
                                x2 = load(x, row + (col + 1) * c) if col + 1 < w else outside
                                d = broadcast(dy, dy_row + j * o + 0)
                                a00, a10, a20 = fma(x0, d, a00), fma(x1, d, a10), fma(x2, d, a20)
                                d = broadcast(dy, dy_row + j * o + 1)
                                a01, a11, a21 = fma(x0, d, a01), fma(x1, d, a11), fma(x2, d, a21)
                                d = broadcast(dy, dy_row + j * o + 2)
                                a02, a12, a22 = fma(x0, d, a02), fma(x1, d, a12), fma(x2, d, a22)
                                d = broadcast(dy, dy_row + j * o + 3)
                                a03, a13, a23 = fma(x0, d, a03), fma(x1, d, a13), fma(x2, d, a23)
                                d = broadcast(dy, dy_row + j * o + 4)
                                a04, a14, a24 = fma(x0, d, a04), fma(x1, d, a14), fma(x2, d, a24)
                                d = broadcast(dy, dy_row + j * o + 5)
                                a05, a15, a25 = fma(x0, d, a05), fma(x1, d, a15), fma(x2, d, a25)
                                d = broadcast(dy, dy_row + j * o + 6)
                                a06, a16, a26 = fma(x0, d, a06), fma(x1, d, a16), fma(x2, d, a26)
                                d = broadcast(dy, dy_row + j * o + 7)
                                a07, a17, a27 = fma(x0, d, a07), fma(x1, d, a17), fma(x2, d, a27)
                    accumulators = ((a00, a01, a02, a03, a04, a05, a06, a07),
                                    (a10, a11, a12, a13, a14, a15, a16, a17),
                                    (a20, a21, a22, a23, a24, a25, a26, a27))
                    for q in range(3):
                        for k in range(8):
                            simd.store(dw_t, ((p * 3 + q) * o + o0 + k) * c + c0, accumulators[q][k])
    return specialized(weight_grad, KERNEL_JIT)


@KERNEL_JIT
def _pad_into(x, b0, b1, scratch, h, wd, c):  # pragma: no cover - compiled, tested
    """Images b0..b1-1 of x (flat (N, h, wd, c)) into the interiors of scratch's first b1 - b0
    padded images (flat (h + 2, wd + 2, c) each); the borders are scratch's zeros."""
    hp, wp, row = h + 2, wd + 2, wd * c
    for b in range(b1 - b0):
        for i in range(h):
            src, dst = ((b0 + b) * h + i) * row, ((b * hp + i + 1) * wp + 1) * c
            scratch[dst:dst + row] = x[src:src + row]


@functools.lru_cache(maxsize=None)
def _forward_chunks(c: int, o: int, s: int) -> Callable[..., None]:
    """conv3x3's work over chunks of a batch, each chunk taken from a shared counter: pad it, run
    the kernel, add the bias and apply the ReLU while the chunk's outputs are in cache."""
    def forward_chunks(x, w, y, bias, relu, scratch, starts, counter, h, wd, oh, ow):  # pragma: no cover - compiled, tested
        per_image = oh * ow * o
        while True:
            k = spin.next_part(counter)
            if k + 1 >= len(starts):
                spin.leave(counter)
                return
            b0, b1 = starts[k], starts[k + 1]
            _pad_into(x, b0, b1, scratch, h, wd, c)
            out = y[b0 * per_image:b1 * per_image]
            KERNEL(scratch, w, out, b1 - b0, h + 2, wd + 2, oh, ow, 1, 0, 0, oh, ow)
            if len(bias):
                elementwise.bias_relu_loop(out.reshape((-1, o)), bias, relu)
            elif relu:
                elementwise.relu_loop(out, out)
    return specialized(forward_chunks, KERNEL=_kernel(c, o, s))


CHUNKED_STRIDES = (1, 2)  # the strides whose backward runs as compiled chunk loops (others: conv3x3_input_grad's)


@functools.lru_cache(maxsize=None)
def _backward_chunks(c: int, o: int, s: int) -> Callable[..., None]:
    """The backward's work over chunks taken from a shared counter: dx of each chunk by the input
    gradient's kernels (conv3x3_input_grad's: at stride 2, one per class of input positions), plus
    another gradient while it is in cache, and the chunk's weight gradient into its own row."""
    assert s in CHUNKED_STRIDES
    classes = [(row0, col0, _kernel(o, c, 1, _input_grad_taps(s, row0, col0))) for row0 in range(s) for col0 in range(s)]
    k0, k1, k2, k3 = [kernel for _, _, kernel in classes] + [classes[0][2]] * (4 - len(classes))

    def backward_chunks(x, dy, w_t, dx, plus, dw_t_parts, scratch, starts, counter, h, wd, oh, ow):  # pragma: no cover - compiled, tested
        per_x, per_dy = h * wd * c, oh * ow * o
        while True:
            k = spin.next_part(counter)
            if k + 1 >= len(starts):
                spin.leave(counter)
                return
            b0, b1 = starts[k], starts[k + 1]
            n = b1 - b0
            if len(dx):
                _pad_into(dy, b0, b1, scratch, oh, ow, o)
                out = dx[b0 * per_x:b1 * per_x]
                if s == 1:
                    K0(scratch, w_t, out, n, oh + 2, ow + 2, h, wd, 1, 0, 0, h, wd)
                else:  # the four classes (row mod 2, column mod 2), each with its own taps
                    gh0, gh1, gw0, gw1 = (h + 1) // 2, h // 2, (wd + 1) // 2, wd // 2
                    K0(scratch, w_t, out, n, oh + 2, ow + 2, gh0, gw0, 2, 0, 0, h, wd)
                    if gw1:
                        K1(scratch, w_t, out, n, oh + 2, ow + 2, gh0, gw1, 2, 0, 1, h, wd)
                    if gh1:
                        K2(scratch, w_t, out, n, oh + 2, ow + 2, gh1, gw0, 2, 1, 0, h, wd)
                    if gh1 and gw1:
                        K3(scratch, w_t, out, n, oh + 2, ow + 2, gh1, gw1, 2, 1, 1, h, wd)
                if len(plus):
                    more = plus[b0 * per_x:b1 * per_x]
                    for i in range(len(out)):
                        out[i] = out[i] + more[i]
            WEIGHT_GRAD(x[b0 * per_x:b1 * per_x], dy[b0 * per_dy:b1 * per_dy], dw_t_parts[k], n, h, wd, oh, ow)
    return specialized(backward_chunks, K0=k0, K1=k1, K2=k2, K3=k3, WEIGHT_GRAD=_weight_grad_kernel(c, o, s))


def aligned(a: np.ndarray) -> np.ndarray:
    """a itself when it is C-contiguous float32 on a 64-byte boundary, else such a copy."""
    if a.flags.c_contiguous and a.dtype == np.float32 and a.ctypes.data % 64 == 0:
        return a
    out = aligned_empty(a.shape)
    out[...] = a
    return out


def padded_scratch(n: int, h: int, w: int, c: int) -> np.ndarray:
    """A flat float32 buffer of zeros for conv3x3: n images of (h + 2, w + 2, c). conv3x3 writes only
    the images' interiors, so the borders stay zero from call to call, and a batch of fewer than n
    images uses the buffer's head. One buffer serves one channel count c: with another, its
    borders fall where interiors were written."""
    scratch = aligned_empty((n * (h + 2) * (w + 2) * c,))
    scratch[:] = 0
    return scratch


def output_hw(h: int, w: int, stride: int = 1) -> tuple[int, int]:
    """(OH, OW) of a 3x3 convolution with padding 1 at this stride."""
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def _padded(x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """x (B, H, W, C) copied into the interiors of scratch's first B padded images (_pad_into, as
    the chunk loops copy them); returns scratch, whose borders are its zeros."""
    n, h, wd, c = x.shape
    _pad_into(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), 0, n, scratch, h, wd, c)
    return scratch


def conv3x3(x: np.ndarray, w: np.ndarray, out: np.ndarray, scratch: np.ndarray, stride: int = 1) -> np.ndarray:
    """out (B, OH, OW, O) = the 3x3 convolution of x (B, H, W, C) with w (3, 3, C, O), zero padding
    1, no bias, at this stride (OH, OW: output_hw); float32, O a multiple of LANES (supports), out
    C-contiguous (a batch slice of a larger array is fine; on a 64-byte boundary, from aligned_empty,
    is faster). scratch: padded_scratch(n >= B, H, W, C). Returns out. (The kernel called from
    Python, compiled for each process: the strategy's conv3x3_chunks compiles it into a loop that
    the disk cache keeps.)"""
    n, h, wd, c = x.shape
    o = w.shape[3]
    oh, ow = output_hw(h, wd, stride)
    _kernel(c, o, stride)(_padded(x, scratch), aligned(w).reshape(-1), out.reshape(-1),
                          n, h + 2, wd + 2, oh, ow, 1, 0, 0, oh, ow)
    return out


def _scratch_floats(starts: np.ndarray, h: int, w: int, c: int) -> int:
    """What a scratch needs for the largest chunk of starts: its padded images of (h, w, c)."""
    return int(np.diff(starts).max(initial=0)) * (h + 2) * (w + 2) * c


def _check_scratch(scratch: np.ndarray, floats: int) -> None:
    if scratch.size < floats:
        raise ValueError(f"conv3x3: the scratch holds {scratch.size} floats, and the largest chunk's padded images "
                         f"need {floats}")


def conv3x3_chunks(x: np.ndarray, w: np.ndarray, y: np.ndarray, starts: np.ndarray, stride: int = 1,
                   bias: np.ndarray | None = None, relu: bool = False) -> Callable[[np.ndarray, np.ndarray], None]:
    """conv3x3 over the chunks of a batch, as a thread's share: run(counter, scratch) takes chunk
    after chunk k from counter (spin.next_part; on_each's counter, or spin.new_flags(spin.COUNTER_FLAGS)
    for one thread alone) until none is left, and computes images starts[k]..starts[k + 1] - 1 of
    x (N, H, W, C) into those of y (N, OH, OW, O), plus bias (O,) and then max(y, 0) where asked.
    Threads that share one counter share the chunks, each in one call: no Python between chunks,
    so the threads do not pass the GIL back and forth at every chunk (cnn_gpu.cpu.threads.on_each).
    x and y as conv3x3's, w aligned(w); starts int64, N at its end; scratch: this thread's
    padded_scratch(>= the largest chunk, H, W, C). The arguments are checked here, once."""
    n, h, wd, c = x.shape
    o = w.shape[3]
    oh, ow = output_hw(h, wd, stride)
    if not y.flags.c_contiguous or y.shape != (n, oh, ow, o):
        raise ValueError(f"conv3x3: out must be C-contiguous of shape {(n, oh, ow, o)}, got {y.shape}")
    loop, floats = _forward_chunks(c, o, stride), _scratch_floats(starts, h, wd, c)
    xf, wf, yf = np.ascontiguousarray(x).reshape(-1), w.reshape(-1), y.reshape(-1)
    b = np.empty(0, np.float32) if bias is None else bias

    def run(counter: np.ndarray, scratch: np.ndarray) -> None:
        _check_scratch(scratch, floats)
        loop(xf, wf, yf, b, relu, scratch, starts, counter, h, wd, oh, ow)
    return run


def conv3x3_backward_chunks(x: np.ndarray, dy: np.ndarray, w_t: np.ndarray, dx: np.ndarray | None,
                            dx_plus: np.ndarray | None, dw_t_parts: np.ndarray, starts: np.ndarray,
                            stride: int = 1) -> Callable[[np.ndarray, np.ndarray | None], None]:
    """The backward of conv3x3 over the chunks of a batch, as a thread's share (run(counter,
    scratch), as conv3x3_chunks's): for chunk k, dx of its images (conv3x3_input_grad's numbers,
    plus dx_plus's where given) unless dx is None, and its weight gradient into dw_t_parts[k] (as
    (3, 3, O, C), flat: aligned_empty((chunks, 9 * O * C))), which the caller sums in chunk order.
    stride in CHUNKED_STRIDES; C a multiple of LANES and O of 8 (supports_weight_grad, and
    supports(O, C) for dx); scratch: padded_scratch(>= the largest chunk, OH, OW, O), or None
    when dx is not wanted."""
    n, h, wd, c = x.shape
    _, oh, ow, o = dy.shape
    none = np.empty(0, np.float32)
    loop, floats = _backward_chunks(c, o, stride), _scratch_floats(starts, oh, ow, o) if dx is not None else 0
    xf, dyf, wf = np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(dy).reshape(-1), w_t.reshape(-1)
    dxf = none if dx is None else dx.reshape(-1)
    plus = none if dx_plus is None else np.ascontiguousarray(dx_plus).reshape(-1)

    def run(counter: np.ndarray, scratch: np.ndarray | None) -> None:
        scratch = none if scratch is None else scratch
        _check_scratch(scratch, floats)
        loop(xf, dyf, wf, dxf, plus, dw_t_parts, scratch, starts, counter, h, wd, oh, ow)
    return run


_kept = threading.local()  # each thread's padded scratches (kept_padded_scratch)
KEPT_SCRATCHES = 8  # shapes a thread keeps: a ResNet's stages, forward and backward, fit


def kept_padded_scratch(n: int, h: int, w: int, c: int) -> np.ndarray:
    """padded_scratch(n, h, w, c), this thread's own, kept for the thread's next call with that
    shape: the kernels write only the images' interiors, so the borders stay zero, and an op
    allocates and zeroes no buffer (~10 us a thread, on the path by which a second thread joins an
    op). Up to KEPT_SCRATCHES shapes a thread, the least recently used let go first."""
    kept = getattr(_kept, "buffers", None)
    if kept is None:
        kept = _kept.buffers = collections.OrderedDict()
    key = (n, h, w, c)
    buffer = kept.pop(key, None)
    if buffer is None:
        buffer = padded_scratch(n, h, w, c)
        if len(kept) >= KEPT_SCRATCHES:
            kept.popitem(last=False)
    kept[key] = buffer
    return buffer


def swap_channels(w: np.ndarray) -> np.ndarray:
    """w (3, 3, C, O) -> (3, 3, O, C) on a 64-byte boundary: the weights conv3x3_input_grad reads."""
    _, _, c, o = w.shape
    out = aligned_empty((3, 3, o, c))
    _transpose_taps(np.ascontiguousarray(w, dtype=np.float32).reshape(9, c, o), out.reshape(9, o, c))
    return out


@JIT
def _transpose_taps(a, out):  # pragma: no cover - compiled, tested
    # a (T, P, Q) -> out (T, Q, P): a copy by rows of out (NumPy's strided copy ran ~4x slower here)
    taps, p, q = a.shape
    for t in range(taps):
        for j in range(q):
            for i in range(p):
                out[t, j, i] = a[t, i, j]


def sum_weight_grads(dw_t_parts: np.ndarray, c: int, o: int) -> np.ndarray:
    """conv3x3_backward_chunks's dw_t_parts (P, 9 * O * C) -> dw (3, 3, C, O): the parts summed in
    part order from zero (float32, as dw += part would), and turned back to (C, O) per tap."""
    dw = np.empty((3, 3, c, o), np.float32)
    _sum_transposed(dw_t_parts.reshape(len(dw_t_parts), 9, o, c), dw.reshape(9, c, o))
    return dw


@JIT
def _sum_transposed(parts, out):  # pragma: no cover - compiled, tested
    # parts (P, T, Q, R) -> out (T, R, Q) = parts[0] + parts[1] + ..., in that order, from zero
    n, taps, q, r = parts.shape
    zero = out.dtype.type(0)
    for t in range(taps):
        for j in range(q):
            for i in range(r):
                total = zero
                for k in range(n):
                    total = total + parts[k, t, j, i]
                out[t, i, j] = total


def conv3x3_input_grad(dy: np.ndarray, w_t: np.ndarray, out: np.ndarray, scratch: np.ndarray,
                       stride: int = 1) -> np.ndarray:
    """out (B, H, W, C) = dx of y = conv3x3(x, w, stride=stride) for dy (B, OH, OW, O): the same
    kernels, gathering for each input position the taps that read it. At stride s the input
    positions fall into s x s classes by (row mod s, column mod s); each class is read by its own
    taps at the same offsets (_input_grad_taps: at stride 1, all nine, flipped; at stride 2,
    one, two or four), so each is one kernel call over a grid of dy windows. w_t: swap_channels(w),
    each w[p, q] as (O, C). C a multiple of LANES (supports(O, C)); scratch: padded_scratch(n >= B,
    OH, OW, O). Returns out."""
    n, oh, ow, o = dy.shape
    h, wd, c = out.shape[1:]
    padded, w_t = _padded(dy, scratch), w_t.reshape(-1)
    for row0 in range(stride):
        for col0 in range(stride):
            gh, gw = -(-(h - row0) // stride), -(-(wd - col0) // stride)
            taps = _input_grad_taps(stride, row0, col0)
            if gh <= 0 or gw <= 0:
                continue
            if not taps:  # a stride above 3: no window reads these positions
                out[:, row0::stride, col0::stride] = 0
                continue
            _kernel(o, c, 1, taps)(padded, w_t, out.reshape(-1), n, oh + 2, ow + 2, gh, gw, stride, row0, col0, h, wd)
    return out


def conv3x3_weight_grad(x: np.ndarray, dy: np.ndarray, stride: int = 1) -> np.ndarray:
    """dw (3, 3, C, O) of y = conv3x3(x, w, stride=stride): sum over every output position of x's
    3x3 window (zero padded) times dy there. x (B, H, W, C) and dy (B, OH, OW, O) float32, C a
    multiple of LANES, O of 8 (supports_weight_grad); x on a 64-byte boundary (aligned_empty) is
    faster. Returns a new array."""
    n, h, wd, c = x.shape
    o = dy.shape[3]
    dw_t = aligned_empty((3, 3, o, c))
    _weight_grad_kernel(c, o, stride)(np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(dy).reshape(-1),
                                      dw_t.reshape(-1), n, h, wd, *output_hw(h, wd, stride))
    return np.ascontiguousarray(dw_t.transpose(0, 1, 3, 2))
