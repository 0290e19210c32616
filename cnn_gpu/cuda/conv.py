"""2-D convolution's GPU kernels (CuPy ElementwiseKernel): im2col and col2im, the im2col
strategy around them, and depthwise convolution.

    cols = im2col(x, window, oh, ow, groups, ones)         # x (N, H, W, C) -> (G, N*OH*OW, KH*KW*C/G [+ 1])
    dx = col2im(dcols, x_shape, window, oh, ow)            # dcols (G, N*OH*OW, KH*KW*C/G)
    y, cols = gemm_forward(x, w, b, window, groups, out_hw, inference)   # the CUPY_IM2COL strategy
    dx, dw, db = gemm_backward(dy, cache, need_dx)
    y = depthwise_forward(x, w, b, window, (oh, ow))       # x (N, H, W, C), w (KH, KW, 1, C*M)
    dx, dw = depthwise_backward(dy, x, w, window, need_dx)

The convolution's GEMMs run in cuBLAS, through cnn_gpu.cuda.gemm.matmul (CuPy's handle, or our
own inside a capture); im2col and col2im are the passes around them, one launch each, and the
depthwise convolution's kernels replace its C tiny GEMMs. gemm_forward folds the bias into the
GEMM (a column of ones in cols, the bias as one more row of the weights, when groups == 1) and keeps
cols for the backward, which then gets dw and db from one GEMM: five launches fewer per layer and
step than the reference's pad, strided copy, bias pass and bias sum. The same
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
from cnn_gpu.cuda import gemm
from cnn_gpu.geometry import Window

FILTER_GRAD_THREADS = 1 << 18  # threads the filter gradient's first step aims for (blocks of positions)
KEEP_COLS_BYTES = 1 << 28  # gemm_forward keeps cols up to this size for the backward; larger, it is rebuilt


@functools.lru_cache(maxsize=None)
def kernel(name: str) -> Any:
    """The ElementwiseKernel _KERNELS[name], built once (compiled by CuPy at its first call)."""
    cupy = require_cupy()
    params, body = _KERNELS[name]
    return cupy.ElementwiseKernel(*params, body, f"cnn_gpu_conv_{name}")


# The window's eight sizes, in Window's order, as the kernels take them.
_WINDOW_PARAMS = "int32 KH, int32 KW, int32 SH, int32 SW, int32 PH, int32 PW, int32 DH, int32 DW"

_KERNELS = {
    # im2col: cols (G, N*OH*OW, KC) from x (N, H, W, C), one thread per element of cols. Column k
    # < KH*KW*C/G of row (n, oh, ow) of group g holds tap (kh, kw) = divmod(k / (C/G), KW), channel
    # g*C/G + k % (C/G), of the zero-padded input, as the NumPy im2col lays it out; column
    # KH*KW*C/G, when KC has it, is 1 (the bias's column). Consecutive threads write consecutive
    # columns: the stores are coalesced, the reads gathered (C consecutive channels per tap).
    "im2col": ((f"raw T x, int32 N, int32 H, int32 W, int32 C, int32 G, int32 OH, int32 OW, {_WINDOW_PARAMS}, "
                "int32 KC", "T cols"), """
        const long long row_g = i / KC;  // (g, n, oh, ow)
        const int k = (int)(i - row_g * KC);
        const int cg = C / G;
        if (k >= KH * KW * cg) {
            cols = T(1);
        } else {
            const long long rows = (long long)N * OH * OW;
            const long long g = row_g / rows;
            const long long row = row_g - g * rows;
            const long long nh = row / OW;
            const int ow = (int)(row - nh * OW);
            const int oh = (int)(nh % OH);
            const long long n = nh / OH;
            const int tap = k / cg;
            const int c = k - tap * cg;
            const int kh = tap / KW;
            const int r = oh * SH - PH + kh * DH;
            const int s = ow * SW - PW + (tap - kh * KW) * DW;
            cols = (r >= 0 && r < H && s >= 0 && s < W) ? x[((n * H + r) * W + s) * C + g * cg + c] : T(0);
        }
    """),
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


def im2col(x: Any, window: Window, oh: int, ow: int, groups: int = 1, ones: bool = False) -> Any:
    """x (N, H, W, C) -> cols (G, N*OH*OW, KH*KW*C/G), with a last column of ones when `ones`: the
    NumPy im2col's cols (the first OH x OW windows), in one launch."""
    cupy = require_cupy()
    n, h, w, c = x.shape
    kc = window.taps * (c // groups) + int(ones)
    cols = cupy.empty((groups, n * oh * ow, kc), dtype=x.dtype)
    kernel("im2col")(cupy.ascontiguousarray(x), *_int32s(n, h, w, c, groups, oh, ow, *window, kc), cols)
    return cols


def _pointwise(x_shape: tuple[int, ...], window: Window, groups: int, out_hw: tuple[int, int]) -> bool:
    """A 1x1 convolution, stride 1, no padding, every output, one group: cols is x itself."""
    return (groups == 1 and (window.kh, window.kw, window.sh, window.sw, window.ph, window.pw) == (1, 1, 1, 1, 0, 0)
            and tuple(out_hw) == tuple(x_shape[1:3]))


def _grouped(w: Any, groups: int) -> Any:
    """w (KH, KW, C/G, O) -> (G, KH*KW*C/G, O/G): group g's filters, a view."""
    kh, kw, cg, o = w.shape
    return w.reshape(kh * kw * cg, groups, o // groups).transpose(1, 0, 2)


def _per_group(a: Any, b: Any) -> Any:
    """a (G, M, K) @ b (G, K, N) -> (G, M, N): one GEMM per group, a single 2-D GEMM for G = 1 (CuPy
    runs 2-D GEMMs on transposed views without copying them, and in TF32 when asked, which its
    batched GEMM does not)."""
    if a.shape[0] == 1:
        return gemm.matmul(a[0], b[0])[None]
    return gemm.matmul(a, b)


def gemm_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                 inference: bool) -> tuple[Any, Any]:
    """The CUPY_IM2COL strategy's forward: x (N, H, W, C), w (KH, KW, C/G, O), b (O,) or None ->
    y (N, OH, OW, O), and cols (G, N*OH*OW, K [+ 1]) to keep for the backward (None with
    inference=True, for a 1x1 convolution, or above KEEP_COLS_BYTES).

    y = [cols, 1] @ [w; b] per group: the bias rides in the GEMM when groups == 1."""
    cupy = require_cupy()
    (oh, ow), n, o = out_hw, x.shape[0], w.shape[3]
    x = cupy.ascontiguousarray(x)
    pointwise = _pointwise(x.shape, window, groups, out_hw)
    fold = b is not None and groups == 1 and not pointwise
    cols = x.reshape(1, n * oh * ow, x.shape[3]) if pointwise else im2col(x, window, oh, ow, groups, fold)
    weights = _grouped(w, groups)                                      # (G, K, O/G)
    if fold:
        weights = cupy.concatenate([weights[0], b.reshape(1, o)])[None]  # (1, K + 1, O)
    y = _per_group(cols, weights)                                      # (G, M, O/G)
    y = y.reshape(n, oh, ow, o) if groups == 1 else y.transpose(1, 0, 2).reshape(n, oh, ow, o)
    if b is not None and not fold:
        y += b
    keep = not inference and not pointwise and cols.nbytes <= KEEP_COLS_BYTES
    return y, cols if keep else None


def gemm_backward(dy: Any, cache: Any, need_dx: bool) -> tuple[Any, Any, Any]:
    """The CUPY_IM2COL strategy's backward: dy (N, OH, OW, O) and the forward's ConvCache ->
    dx (N, H, W, C) or None, dw (KH, KW, C/G, O), db (O,) or None. With the bias in the GEMM,
    cols.T @ dy gives dw and, as its last row, db (db is that row, a view)."""
    cupy = require_cupy()
    x, w, window, groups, (oh, ow) = cache.x, cache.w, cache.window, cache.groups, cache.out_hw
    (n, _, _, c), o = x.shape, w.shape[3]
    m, k = n * oh * ow, window.taps * (c // groups)
    pointwise = _pointwise(x.shape, window, groups, cache.out_hw)
    fold = cache.has_bias and groups == 1 and not pointwise
    cols = cache.cols
    if cols is None:
        cols = cupy.ascontiguousarray(x).reshape(1, m, c) if pointwise else im2col(x, window, oh, ow, groups, fold)
    dy2d = cupy.ascontiguousarray(dy).reshape(m, o)
    dy_groups = dy2d.reshape(m, groups, o // groups).transpose(1, 0, 2)  # (G, M, O/G), a view
    dw = _per_group(cols.transpose(0, 2, 1), dy_groups)                  # (G, K [+ 1], O/G)
    db = None
    if fold:
        dw, db = dw[:, :k], dw[0, k]
    elif cache.has_bias:
        db = gemm.matmul(cupy.ones(m, dtype=dy.dtype), dy2d)  # column_sum's GEMV
    dw = dw.transpose(1, 0, 2).reshape(w.shape)
    dx = None
    if need_dx:
        dcols = _per_group(dy_groups, _grouped(w, groups).transpose(0, 2, 1))  # (G, M, K)
        dx = dcols.reshape(x.shape) if pointwise else col2im(dcols, x.shape, window, oh, ow)
    return dx, dw, db


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
