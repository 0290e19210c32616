"""2-D convolution's GPU kernels (CuPy ElementwiseKernel): col2im, and depthwise convolution.

    dx = col2im(dcols, x_shape, window, oh, ow)            # dcols (G, N*OH*OW, KH*KW*C/G)
    y = depthwise_forward(x, w, b, window, (oh, ow))       # x (N, H, W, C), w (KH, KW, 1, C*M)
    dx, dw = depthwise_backward(dy, x, w, window, need_dx)

The convolution's GEMMs run in cuBLAS (cupy.matmul in cnn_gpu/functional/conv.py); these are the
passes around them, and the depthwise convolution, whose GEMMs would be C tiny ones. The same
calls as cnn_gpu/cpu/conv.py and cnn_gpu/cpu/depthwise.py, and the same definitions as the NumPy
reference in cnn_gpu/functional/conv.py (see its docstring for the index conventions).

Every kernel gathers: one thread per element of the result, which adds its terms itself in a
fixed order, so there are no atomics and the results are deterministic. Flat indices are
64-bit; the sizes passed as int32 are single axes. The depthwise filter gradient sums over all
N*OH*OW output positions, so it runs in two steps: one thread per (block of ROWS positions, tap,
output channel) sums its block, then cupy sums the blocks (a fixed-order tree reduction).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy
from cnn_gpu.geometry import Window

FILTER_GRAD_THREADS = 1 << 18  # threads the filter gradient's first step aims for (blocks of positions)


@functools.lru_cache(maxsize=None)
def kernel(name: str) -> Any:
    """The ElementwiseKernel _KERNELS[name], built once (compiled by CuPy at its first call)."""
    cupy = require_cupy()
    params, body = _KERNELS[name]
    return cupy.ElementwiseKernel(*params, body, f"cnn_gpu_conv_{name}")


# The window's eight sizes, in Window's order, as the kernels take them.
_WINDOW_PARAMS = "int32 KH, int32 KW, int32 SH, int32 SW, int32 PH, int32 PW, int32 DH, int32 DW"

_KERNELS = {
    # col2im as a gather: each dx (N, H, W, C) element sums the dcols entries of the windows that
    # read it, in (kh, kw) order -- the order in which the NumPy col2im adds them, so both give
    # the same sums. dcols (G, N*OH*OW, KH*KW*C/G): channel c is channel c % (C/G) of group c / (C/G).
    "col2im": ((f"raw T dcols, int32 N, int32 H, int32 W, int32 C, int32 G, int32 OH, int32 OW, {_WINDOW_PARAMS}",
                "T dx"), """
        const long long nhw = i / C;
        const int c = (int)(i - nhw * C);
        const long long nh = nhw / W;
        const int hp = (int)(nh % H) + PH;  // position in the padded input
        const int wp = (int)(nhw - nh * W) + PW;
        const long long n = nh / H;
        const int cg = C / G;
        const int g = c / cg;
        const long long group_base = (long long)g * N * OH * OW;  // group g's first row of dcols
        T acc = T(0);
        for (int kh = 0; kh < KH; ++kh) {
            const int th = hp - kh * DH;  // = oh * SH for a window whose tap kh reads this row
            if (th < 0 || th % SH != 0 || th / SH >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int tw = wp - kw * DW;
                if (tw < 0 || tw % SW != 0 || tw / SW >= OW) continue;
                const long long row = group_base + (n * OH + th / SH) * OW + tw / SW;
                acc += dcols[(row * KH * KW + kh * KW + kw) * cg + (c - g * cg)];
            }
        }
        dx = acc;
    """),
    # Depthwise forward: y (N, OH, OW, O) from x (N, H, W, C), w (KH, KW, O), O = C * M; output
    # channel o reads input channel o / M. Taps in the padding are skipped; the sum runs in
    # (kh, kw) order and the bias (broadcast over y's last axis) is added last.
    "depthwise_forward": ((f"raw T x, raw T w, T bias, int32 H, int32 W, int32 C, int32 OH, int32 OW, "
                           f"int32 O, {_WINDOW_PARAMS}", "T y"), """
        const long long pixel = i / O;
        const int o = (int)(i - pixel * O);
        const long long nh = pixel / OW;
        const int ow = (int)(pixel - nh * OW);
        const int oh = (int)(nh % OH);
        const long long n = nh / OH;
        const int c = o / (O / C);
        T acc = T(0);
        for (int kh = 0; kh < KH; ++kh) {
            const int r = oh * SH - PH + kh * DH;
            if (r < 0 || r >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int s = ow * SW - PW + kw * DW;
                if (s < 0 || s >= W) continue;
                acc += x[((n * H + r) * W + s) * C + c] * w[(kh * KW + kw) * O + o];
            }
        }
        y = acc + bias;
    """),
    # Depthwise input gradient: each dx (N, H, W, C) element gathers dy * w over the taps that
    # read it, in (kh, kw) order, and over its M output channels c*M .. c*M + M - 1.
    "depthwise_backward_input": ((f"raw T dy, raw T w, int32 H, int32 W, int32 C, int32 OH, int32 OW, "
                                  f"int32 O, {_WINDOW_PARAMS}", "T dx"), """
        const long long pixel = i / C;
        const int c = (int)(i - pixel * C);
        const long long nh = pixel / W;
        const int wi = (int)(pixel - nh * W);
        const int hi = (int)(nh % H);
        const long long n = nh / H;
        const int mult = O / C;
        T acc = T(0);
        for (int kh = 0; kh < KH; ++kh) {
            const int th = hi + PH - kh * DH;  // = oh * SH for an output whose tap kh reads this row
            if (th < 0 || th % SH != 0 || th / SH >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int tw = wi + PW - kw * DW;
                if (tw < 0 || tw % SW != 0 || tw / SW >= OW) continue;
                const long long row = ((n * OH + th / SH) * OW + tw / SW) * O;
                for (int m = 0; m < mult; ++m) {
                    const int o = c * mult + m;
                    acc += dy[row + o] * w[(kh * KW + kw) * O + o];
                }
            }
        }
        dx = acc;
    """),
    # Depthwise filter gradient, first step: partial (BLOCKS, KH*KW*O); element (k, tap, o) sums
    # x * dy over output positions k*ROWS .. (k+1)*ROWS - 1 of the N*OH*OW, in order.
    "depthwise_filter_partial": ((f"raw T x, raw T dy, int32 N, int32 H, int32 W, int32 C, int32 OH, int32 OW, "
                                  f"int32 O, {_WINDOW_PARAMS}, int32 ROWS", "T partial"), """
        const int per_block = KH * KW * O;
        const long long block = i / per_block;
        const int rest = (int)(i - block * per_block);
        const int tap = rest / O;
        const int o = rest - tap * O;
        const int kh = tap / KW;
        const int kw = tap - kh * KW;
        const int c = o / (O / C);
        const long long positions = (long long)N * OH * OW;
        const long long first = block * ROWS;
        const long long last = first + ROWS < positions ? first + ROWS : positions;
        T acc = T(0);
        for (long long p = first; p < last; ++p) {
            const long long nh = p / OW;
            const int ow = (int)(p - nh * OW);
            const int oh = (int)(nh % OH);
            const long long n = nh / OH;
            const int r = oh * SH - PH + kh * DH;
            const int s = ow * SW - PW + kw * DW;
            if (r < 0 || r >= H || s < 0 || s >= W) continue;
            acc += x[((n * H + r) * W + s) * C + c] * dy[p * O + o];
        }
        partial = acc;
    """),
}


def _int32s(*values: int) -> tuple:
    if max(values, default=0) >= 2**31:
        raise ValueError(f"a size in {values} does not fit the kernels' 32-bit axis sizes")
    return tuple(np.int32(v) for v in values)


def col2im(dcols: Any, x_shape: tuple[int, ...], window: Window, oh: int, ow: int) -> Any:
    """Adjoint of im2col: dcols (G, N*OH*OW, KH*KW*C/G) -> dx (N, H, W, C), in one launch."""
    cupy = require_cupy()
    n, h, w, c = x_shape
    dx = cupy.empty(tuple(x_shape), dtype=dcols.dtype)
    kernel("col2im")(cupy.ascontiguousarray(dcols), *_int32s(n, h, w, c, dcols.shape[0], oh, ow, *window), dx)
    return dx


def _taps(cupy: Any, w: Any) -> Any:
    """w (KH, KW, 1, O) -> C-contiguous (KH, KW, O)."""
    return cupy.ascontiguousarray(w).reshape(w.shape[0], w.shape[1], w.shape[3])


def depthwise_forward(x: Any, w: Any, b: Any, window: Window, out_hw: tuple[int, int]) -> Any:
    """x (N, H, W, C), w (KH, KW, 1, C*M), b (C*M,) or None -> y (N, OH, OW, C*M): the first
    OH x OW outputs."""
    cupy = require_cupy()
    (n, h, wd, c), o = x.shape, w.shape[3]
    y = cupy.empty((n, *out_hw, o), dtype=x.dtype)
    bias = cupy.zeros(o, dtype=x.dtype) if b is None else b
    kernel("depthwise_forward")(cupy.ascontiguousarray(x), _taps(cupy, w), bias,
                                *_int32s(h, wd, c, *out_hw, o, *window), y)
    return y


def depthwise_backward(dy: Any, x: Any, w: Any, window: Window, need_dx: bool) -> tuple[Any, Any]:
    """dy (N, OH, OW, C*M) -> dx (N, H, W, C) or None, dw (KH, KW, 1, C*M)."""
    cupy = require_cupy()
    (n, h, wd, c), (_, oh, ow, o) = x.shape, dy.shape
    x, dy, taps = cupy.ascontiguousarray(x), cupy.ascontiguousarray(dy), _taps(cupy, w)
    geometry = _int32s(h, wd, c, oh, ow, o, *window)
    dx = None
    if need_dx:
        dx = cupy.empty(x.shape, dtype=x.dtype)
        kernel("depthwise_backward_input")(dy, taps, *geometry, dx)
    positions = n * oh * ow
    per_block = window.kh * window.kw * o
    blocks = max(1, min(positions, FILTER_GRAD_THREADS // per_block))
    rows = -(-positions // blocks) if positions else 1
    blocks = -(-positions // rows) if positions else 1
    partial = cupy.empty((blocks, per_block), dtype=x.dtype)
    kernel("depthwise_filter_partial")(x, dy, *_int32s(n), *geometry, *_int32s(rows), partial)
    return dx, partial.sum(axis=0).reshape(w.shape)
