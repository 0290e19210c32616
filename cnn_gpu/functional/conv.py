"""2-D convolution, channels-last, with stride, padding, dilation and groups.

    x (N, H, W, C) * w (KH, KW, C/G, O) + b (O,) -> y (N, OH, OW, O)

    y[n, oh, ow, o] = b[o] + sum over i, j, c of  xpad[n, oh*sh + i*dh, ow*sw + j*dw, g*C/G + c] * w[i, j, c, o]

xpad is x with ph zero rows above and below and pw zero columns left and right (geometry.py), and
g = o // (O/G) is the group of output channel o: the O/G outputs of group g read only its C/G input
channels g*C/G .. (g+1)*C/G - 1. That is PyTorch's convention: its weight (O, C/G, KH, KW)
transposed by (2, 3, 1, 0) is ours. Depthwise convolution is G = C, with O = multiplier * C.

The file reads top to bottom:

1. The reference: `im2col` lays each receptive field of a group out as one row of cols, so the
   convolution is one GEMM per group (a batched matmul over G), and `col2im`, its adjoint, takes
   the gradient back to x. `reference_forward` / `reference_backward` are the whole op in a dozen
   lines each. Every fast path is tested against them, and they run wherever none applies
   (1 < G < C on NumPy).
2. The fast paths, each a `Strategy` (a forward, and the backward that reads its cache):
   - NUMPY_GEMM (NumPy, G = 1): im2col + GEMM in cache-sized chunks of the batch (side by side on
     several threads, cnn_gpu.cpu.threads; the chunks' weight gradients added in order), the bias as a
     column of ones in the GEMM, cols kept for the backward when narrow or small, and an input
     gradient per kernel offset (NUMPY_GEMM), or with the compiled im2col and col2im of
     cnn_gpu/cpu/conv.py (NUMPY_GEMM_COMPILED).
   - NUMPY_DIRECT (NumPy float32, G = 1, 3x3, padding 1, any stride): no im2col; the kernels of
     cnn_gpu/cpu/direct.py sum each tile of outputs in vector registers, for y, dx (the same
     kernels on dy) and dw. A ResNet's 3x3 layers, its downsampling ones included.
   - DEPTHWISE (NumPy, G = C): one multiply-add over all channels per kernel tap instead of C
     tiny GEMMs; DEPTHWISE_COMPILED runs the loops of cnn_gpu/cpu/depthwise.py instead.
   - CUPY_GEMM: the reference itself, one batched GEMM over the whole batch (what a GPU wants),
     with the one-launch col2im of cnn_gpu/cuda/conv.py; CUPY_DEPTHWISE: that module's kernels;
     CUPY_IM2COL (what runs on CuPy): that module's im2col and col2im kernels around GEMMs that
     a CUDA graph can capture, the bias in the GEMM.
   Every forward takes relu=True for a ReLU after the convolution (the graph plan's activation
   rule), applied as y is made.
3. `select`, the one place that chooses a strategy.
4. `conv2d_forward` / `conv2d_backward`: the arguments are checked once, then the strategy runs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..cpu import threads
from ..geometry import Window, check_float, check_rank, pad_hw, pair, unpad_hw, window_view
from .activation import relu_into
from .reduce import column_sum


class ConvCache(NamedTuple):
    """What conv2d_backward needs from the forward."""

    x: Any                    # (N, H, W, C), the input as given
    w: Any                    # (KH, KW, C/G, O)
    has_bias: bool
    window: Window            # kernel, stride, padding, dilation
    groups: int
    out_hw: tuple[int, int]   # (OH, OW) computed: the full output, or out_size
    cols: Any = None          # NUMPY_GEMM's cols (N*OH*OW, K [+ 1]) when it keeps them (_keeps_cols)


# ---- 1. the reference: im2col, one GEMM per group, col2im -----------------------------------------

def im2col(x: Any, window: Window, oh: int, ow: int, groups: int = 1) -> Any:
    """x (N, H, W, C) -> cols (G, N*OH*OW, KH*KW*C/G): row (n, oh, ow) of cols[g] holds what output
    (n, oh, ow) of group g reads, in (kh, kw, c) order. The first OH x OW windows (all of them, or
    the corner that out_size asks for)."""
    n, c = x.shape[0], x.shape[3]
    windows = window_view(pad_hw(x, window), window, oh, ow)  # (N, OH, OW, KH, KW, C), a view
    windows = windows.reshape(n, oh, ow, window.kh, window.kw, groups, c // groups)
    k = window.taps * (c // groups)
    return windows.transpose(5, 0, 1, 2, 3, 4, 6).reshape(groups, n * oh * ow, k)  # the one copy


def col2im(dcols: Any, x_shape: tuple[int, ...], window: Window, oh: int, ow: int) -> Any:
    """Adjoint of im2col: dcols (G, N*OH*OW, KH*KW*C/G) -> dx (N, H, W, C), each input position
    summing the entries of the windows that read it, one kernel tap at a time in (kh, kw) order
    (a fixed order: deterministic, and the order the kernels of cpu/conv.py and cuda/conv.py keep)."""
    xp = get_array_module(dcols)
    n, h, w, c = x_shape
    groups = dcols.shape[0]
    # (G, N, OH, OW, KH, KW, C/G) -> (N, OH, OW, KH, KW, G, C/G): channel g*C/G + c, as in x
    taps = dcols.reshape(groups, n, oh, ow, window.kh, window.kw, c // groups).transpose(1, 2, 3, 4, 5, 0, 6)
    dxpad = xp.zeros((n, h + 2 * window.ph, w + 2 * window.pw, c), dtype=dcols.dtype)
    for i in range(window.kh):
        for j in range(window.kw):
            dxpad[window.tap(i, j, oh, ow)] += taps[:, :, :, i, j].reshape(n, oh, ow, c)
    return unpad_hw(dxpad, window, h, w)


def _grouped(w: Any, groups: int) -> Any:
    """w (KH, KW, C/G, O) -> (G, KH*KW*C/G, O/G): group g's filters as the right operand of its GEMM."""
    kh, kw, cg, o = w.shape
    return w.reshape(kh * kw * cg, groups, o // groups).transpose(1, 0, 2)


def reference_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                      inference: bool = False, relu: bool = False) -> tuple[Any, None]:
    """x (N, H, W, C), w (KH, KW, C/G, O), b (O,) or None -> y (N, OH, OW, O), and no kept cols
    (the backward rebuilds them from x); relu: max(y, 0) instead. Runs on either backend."""
    xp = get_array_module(x)
    (oh, ow), n, o = out_hw, x.shape[0], w.shape[3]
    cols = im2col(x, window, oh, ow, groups)                  # (G, M, K), M = N*OH*OW, K = KH*KW*C/G
    y = xp.matmul(cols, _grouped(w, groups))                   # (G, M, O/G): one GEMM per group
    y = y.transpose(1, 0, 2).reshape(n, oh, ow, o)             # output channel g*O/G + its index in g
    if b is not None:
        y += b
    if relu:
        xp.maximum(y, 0, out=y)
    return y, None


def reference_backward(dy: Any, cache: ConvCache, need_dx: bool = True,
                       col2im: Callable[..., Any] = col2im) -> tuple[Any, Any, Any]:
    """dy (N, OH, OW, O) -> dx (N, H, W, C) or None, dw (KH, KW, C/G, O), db (O,) or None.

    col2im: the adjoint of im2col that takes dcols to dx (CUPY_GEMM passes its one-launch kernel)."""
    xp = get_array_module(dy)
    x, w, groups, (oh, ow) = cache.x, cache.w, cache.groups, cache.out_hw
    o = w.shape[3]
    m = dy.shape[0] * oh * ow
    cols = im2col(x, cache.window, oh, ow, groups)                         # (G, M, K), as in the forward
    dy_groups = dy.reshape(m, groups, o // groups).transpose(1, 0, 2)      # (G, M, O/G)
    dw = xp.matmul(cols.transpose(0, 2, 1), dy_groups)                     # (G, K, O/G)
    dw = dw.transpose(1, 0, 2).reshape(w.shape)
    db = dy.reshape(m, o).sum(axis=0) if cache.has_bias else None
    dx = None
    if need_dx:
        dcols = xp.matmul(dy_groups, _grouped(w, groups).transpose(0, 2, 1))  # (G, M, K)
        dx = col2im(dcols, x.shape, cache.window, oh, ow)
    return dx, dw, db


class Strategy(NamedTuple):
    """One way to run the convolution: a forward, and the backward that reads its ConvCache."""

    name: str
    # (x, w, b, window, groups, out_hw, inference, relu) -> (y, cols to keep in the cache or None);
    # relu: y is max(conv, 0), the ReLU after the convolution applied as y is made (an epilogue)
    forward: Callable[..., tuple[Any, Any]]
    # (dy, cache, need_dx) -> (dx or None, dw, db or None)
    backward: Callable[..., tuple[Any, Any, Any]]
    # backward takes dx_plus= too and returns dx + dx_plus, adding while dx is in cache
    adds_dx: bool = False


REFERENCE = Strategy("reference", reference_forward, reference_backward)


# ---- 2a. NumPy, groups == 1: chunked im2col + GEMM ------------------------------------------------
#
# The batch is cut into chunks whose cols fit in the CPU's L2 cache (CHUNK_BYTES): each chunk's
# im2col copy is written and read back by the GEMM from cache instead of memory, and the GEMM
# itself runs faster on the smaller operand. The forward then keeps x (not cols, ~KH*KW times
# larger) for the backward, which rebuilds each chunk's cols: the copy is cheap in cache, and a
# training step holds far less memory. Where cols is no larger than the output y (few input
# channels: the seed network's conv1 has K + 1 = 10 columns for 32 outputs), or small in all
# (KEEP_COLS_BYTES) and at most KEEP_COLS_WIDTH times as wide as y, the forward keeps cols
# instead: rebuilding it costs more than keeping it. The width bound is for deep networks: a
# 3x3 convolution with as many outputs as inputs (a ResNet's) has cols 9 times as wide as y, and
# twenty such layers keeping theirs would hold far more than all the activations together.

CHUNK_BYTES = 1 << 21      # cols per chunk: 2 MiB measured best (1 to 16 MiB tried; BENCHMARKS.md)
MIN_CHUNKS = 8             # ... and a batch in up to 8 chunks: parts for up to 8 threads,
MIN_CHUNK_BYTES = 1 << 19  # ... of at least 512 KiB of cols (a thread's part costs ~0.1 ms to hand over)
KEEP_COLS_BYTES = 1 << 24  # a batch's cols up to 16 MiB is kept for the backward (see _keeps_cols)
KEEP_COLS_WIDTH = 5        # ... when it is at most 5 times as wide as the output


def _is_pointwise(x: Any, window: Window, out_hw: tuple[int, int]) -> bool:
    """A 1x1 convolution, stride 1, no padding, every output: cols is x itself, reshaped."""
    return (window.kh, window.kw, window.sh, window.sw, window.ph, window.pw) == (1, 1, 1, 1, 0, 0) \
        and tuple(out_hw) == tuple(x.shape[1:3])


def _bias_in_gemm(has_bias: bool, pointwise: bool) -> bool:
    """Whether the bias rides in the GEMM: cols gets a column of ones and w2d the bias as one more
    row, so y = [cols, 1] @ [w2d; b] needs no pass of its own over y (for the seed's conv1 that
    pass cost more than the GEMM), and the backward's cols.T @ dy gives db as its last row. Not
    for a 1x1 convolution, whose cols is x itself."""
    return has_bias and not pointwise


def _keeps_cols(columns: int, outputs: int, cols_bytes: int) -> bool:
    """Whether the forward keeps cols, `columns` wide, for the backward instead of the backward
    rebuilding it from x: when it is no wider than the output (`outputs` wide), so keeping it at
    most doubles what the layer holds, or when the whole batch's cols is at most KEEP_COLS_BYTES
    and at most KEEP_COLS_WIDTH times as wide as the output."""
    return columns <= outputs or (cols_bytes <= KEEP_COLS_BYTES and columns <= KEEP_COLS_WIDTH * outputs)


def _chunks(n: int, row_bytes: int) -> list[slice]:
    """Slices of a batch of n, each holding about CHUNK_BYTES of cols (row_bytes per image; at
    least one image per chunk), and up to MIN_CHUNKS of at least MIN_CHUNK_BYTES when the batch
    would fit in fewer, so that a layer whose whole batch fits in one chunk still has parts for
    several threads (cnn_gpu.cpu.threads). Fixed by the sizes alone: the same chunks on any
    number of threads."""
    per = max(1, min(CHUNK_BYTES // max(row_bytes, 1),
                     max(-(-n // MIN_CHUNKS), MIN_CHUNK_BYTES // max(row_bytes, 1))))
    return threads.ranges(n, per)


def cols_buffer(rows: int, columns: int, channels: int, dtype: Any) -> np.ndarray:
    """An empty (rows, columns) array for _im2col_into. With one input channel it is stored
    column by column (its transpose is C-contiguous): each of _im2col_into's per-tap copies then
    writes one contiguous run, and BLAS takes the transposed operand as it is."""
    if channels == 1:
        return np.empty((columns, rows), dtype=dtype).T
    return np.empty((rows, columns), dtype=dtype)


def _im2col_into(x: np.ndarray, window: Window, oh: int, ow: int, out: np.ndarray) -> np.ndarray:
    """im2col of one group: x (B, H, W, C) -> out[:, :KH*KW*C] of out (B*OH*OW, >= KH*KW*C), an
    array of either layout (a view of a larger buffer is fine; a column of ones after the K
    columns is left alone). Returns out."""
    n, c = x.shape[0], x.shape[3]
    out = out[:, :window.taps * c]
    xpad = pad_hw(x, window)
    if c == 1:
        # One input channel: a copy per kernel tap (one column of cols) runs along image rows (OW
        # elements per inner loop) instead of KW elements per window row, and one contiguous run
        # per tap when cols is stored column by column (cols_buffer).
        for i in range(window.kh):
            for j in range(window.kw):
                column = out[:, i * window.kw + j].reshape(n, oh, ow)  # a view: one stride, any layout
                np.copyto(column, xpad[window.tap(i, j, oh, ow)][..., 0])
    else:
        np.copyto(out.reshape(n, oh, ow, window.kh, window.kw, c), window_view(xpad, window, oh, ow))
    return out


def _im2col_compiled(x: np.ndarray, window: Window, oh: int, ow: int, out: np.ndarray) -> np.ndarray:
    """_im2col_into's result through the compiled loop of cnn_gpu/cpu/conv.py, which reads x in
    place (no padded copy) and writes each row's runs of C channels in turn; one input channel
    keeps _im2col_into's copy per tap into column-major cols (cols_buffer), which runs along
    whole image rows. out: C-contiguous rows when C > 1 (what cols_buffer gives)."""
    if x.shape[3] == 1:
        return _im2col_into(x, window, oh, ow, out)
    from ..cpu import conv as cpu_conv
    cpu_conv.im2col(x, window, oh, ow, out)
    return out


def _part_cols(x: np.ndarray, part: slice, window: Window, out_hw: tuple[int, int], ones_column: bool,
               buf: Any, into: Any = None, im2col: Callable[..., Any] = _im2col_into) -> Any:
    """The cols of one chunk of the batch (see _chunks): (B*OH*OW, K), or (B*OH*OW, K + 1) ending in
    a column of ones, written into buf (a chunk's cols_buffer, with the ones column already set),
    or into its rows of `into`, the whole batch's (N*OH*OW, K [+ 1]) array, when given. A 1x1
    convolution's cols is x itself, reshaped. im2col: _im2col_into or _im2col_compiled, which
    write the same values."""
    (oh, ow), c = out_hw, x.shape[3]
    if _is_pointwise(x, window, out_hw):
        return x[part].reshape(-1, c)  # a 1x1 convolution needs no copy
    rows = (part.stop - part.start) * oh * ow
    first = part.start * oh * ow if into is not None else 0
    cols = (into if into is not None else buf)[first:first + rows]
    im2col(x[part], window, oh, ow, cols)
    return cols


def _cols_scratch(x: np.ndarray, window: Window, out_hw: tuple[int, int], chunks: list[slice],
                  ones_column: bool) -> Callable[[], Any]:
    """A maker of one thread's chunk buffer for _part_cols (None for a 1x1 convolution or an
    empty batch): cols_buffer of the largest chunk, its column of ones set."""
    (oh, ow), c = out_hw, x.shape[3]
    k = window.taps * c
    if not chunks or _is_pointwise(x, window, out_hw):
        return lambda: None

    def make() -> np.ndarray:
        buf = cols_buffer((chunks[0].stop - chunks[0].start) * oh * ow, k + ones_column, c, x.dtype)
        if ones_column:
            buf[:, k] = 1
        return buf
    return make


def _gemm_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                  inference: bool, relu: bool = False, *, im2col: Callable[..., Any]) -> tuple[Any, Any]:
    """groups == 1 on NumPy: y (N, OH, OW, O) chunk by chunk, y[chunk] = [cols, 1] @ [w2d; b]
    (relu: its maximum with 0, while the chunk is in cache), the chunks on cnn_gpu.cpu.threads.
    Returns y and the batch's cols when _keeps_cols (never with inference=True), else None."""
    x = np.ascontiguousarray(x)
    (oh, ow), n, o = out_hw, x.shape[0], w.shape[3]
    pointwise = _is_pointwise(x, window, out_hw)
    fold = _bias_in_gemm(b is not None, pointwise)
    k = w.shape[0] * w.shape[1] * w.shape[2]
    w2d = w.reshape(k, o)
    if fold:
        w2d = np.concatenate([w2d, b.reshape(1, o)])  # (K + 1, O)
    kept = None
    if not inference and not pointwise and _keeps_cols(k + fold, o, n * oh * ow * (k + fold) * x.itemsize):
        kept = cols_buffer(n * oh * ow, k + fold, x.shape[3], x.dtype)
        if fold:
            kept[:, k] = 1
    y = np.empty((n, oh, ow, o), dtype=x.dtype)
    chunks = _chunks(n, oh * ow * k * x.itemsize)

    def run(part: slice, buf: Any) -> None:
        cols = _part_cols(x, part, window, out_hw, fold, buf, into=kept, im2col=im2col)
        y_part = y[part].reshape(-1, o)  # a view: the GEMM writes into y
        np.matmul(cols, w2d, out=y_part)  # (B*OH*OW, K [+ 1]) @ (K [+ 1], O)
        if b is not None and not fold and cpu.runs_on(y_part, b):
            _cpu_elementwise().bias_relu(y_part, b, relu)  # both in one pass
            return
        if b is not None and not fold:
            y_part += b
        if relu:
            relu_into(y_part, y_part)

    scratch = (lambda: None) if kept is not None else _cols_scratch(x, window, out_hw, chunks, fold)
    threads.for_each(chunks, run, scratch)
    return y, kept


def _input_grad_by_offset(dy2d: np.ndarray, w: np.ndarray, window: Window, out_hw: tuple[int, int],
                          out: np.ndarray, scratch: np.ndarray) -> None:
    """dy2d (B*OH*OW, O) -> out (B, H, W, C), without dcols: per kernel tap (i, j), one GEMM
    dy2d @ w[i, j].T -> (B*OH*OW, C), added into the positions that tap read, in col2im's (i, j)
    order. col2im adds dcols (B*OH*OW, KH*KW*C) in loops of C elements; at stride 1 these adds
    run over whole rows of OW*C elements. scratch: at least B*OH*OW*C elements."""
    (oh, ow), c = out_hw, w.shape[2]
    b, h, wd, _ = out.shape
    padded = window.ph or window.pw
    dxpad = np.zeros((b, h + 2 * window.ph, wd + 2 * window.pw, c), dtype=out.dtype) if padded else out
    if not padded:
        dxpad[...] = 0
    term = scratch[:dy2d.shape[0] * c].reshape(dy2d.shape[0], c)
    for i in range(window.kh):
        for j in range(window.kw):
            np.matmul(dy2d, w[i, j].T, out=term)
            dxpad[window.tap(i, j, oh, ow)] += term.reshape(b, oh, ow, c)
    if padded:
        out[...] = unpad_hw(dxpad, window, h, wd)


def _input_grad_compiled(dy2d: np.ndarray, w: np.ndarray, window: Window, out_hw: tuple[int, int],
                         out: np.ndarray, scratch: np.ndarray) -> None:
    """dy2d (B*OH*OW, O) -> out (B, H, W, C): dcols = dy2d @ w2d.T into scratch (in cache), then the
    compiled col2im (cnn_gpu/cpu/conv.py) adds it into out in one pass. scratch: B*OH*OW*K elements."""
    from ..cpu import conv as cpu_conv
    k = w.shape[0] * w.shape[1] * w.shape[2]
    dcols = np.matmul(dy2d, w.reshape(k, -1).T, out=scratch[:dy2d.shape[0] * k].reshape(-1, k))
    cpu_conv.col2im(dcols, window, *out_hw, out=out)


def _dcols_scratch(images: int, x: np.ndarray, w: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """input_grad's scratch for _input_grad_by_offset and _input_grad_compiled: dcols of a chunk."""
    return np.empty(images * out_hw[0] * out_hw[1] * w.shape[0] * w.shape[1] * w.shape[2], dtype=x.dtype)


def _gemm_backward(dy: Any, cache: ConvCache, need_dx: bool, *, input_grad: Callable[..., None],
                   im2col: Callable[..., Any],
                   input_grad_scratch: Callable[..., Any] = _dcols_scratch) -> tuple[Any, Any, Any]:
    """The backward of _gemm_forward, chunk by chunk (on cnn_gpu.cpu.threads) over the forward's
    cols or cols rebuilt from x (by im2col). input_grad: _input_grad_by_offset,
    _input_grad_compiled or _input_grad_direct, writing each chunk's dx with the buffer that
    input_grad_scratch(images per chunk, x, w, out_hw) makes once per thread. The chunks' weight
    gradients are summed in chunk order, whichever thread made them."""
    x, w, window, out_hw = np.ascontiguousarray(cache.x), cache.w, cache.window, cache.out_hw
    (oh, ow), n, c, o = out_hw, x.shape[0], x.shape[3], w.shape[3]
    k = window.taps * c
    pointwise = _is_pointwise(x, window, out_hw)
    fold = _bias_in_gemm(cache.has_bias, pointwise)
    chunks = _chunks(n, oh * ow * k * x.itemsize)
    dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None  # C-contiguous, so each batch slice is too
    make_cols = (lambda: None) if cache.cols is not None else _cols_scratch(x, window, out_hw, chunks, fold)

    def scratch() -> tuple[Any, Any]:  # (cols buffer, input_grad's buffer)
        needed = need_dx and chunks and not pointwise
        return make_cols(), input_grad_scratch(chunks[0].stop - chunks[0].start, x, w, out_hw) if needed else None

    def run(part: slice, bufs: tuple[Any, Any]) -> Any:
        cols = _part_cols(x, part, window, out_hw, fold, bufs[0], into=cache.cols, im2col=im2col)
        dy2d = np.ascontiguousarray(dy[part]).reshape(-1, o)  # (B*OH*OW, O)
        if need_dx:
            if pointwise:
                np.matmul(dy2d, w.reshape(c, o).T, out=dx[part].reshape(-1, c))
            else:
                input_grad(dy2d, w, window, out_hw, dx[part], bufs[1])
        return cols.T @ dy2d  # this chunk's (K [+ 1], O)

    parts_dw = threads.for_each(chunks, run, scratch)
    dw = None  # (K, O), or (K + 1, O) with db as its last row when the bias rode in the GEMM
    for part_dw in parts_dw:  # in chunk order: the same sum on any number of threads
        if dw is None:
            dw = part_dw
        else:
            dw += part_dw
    if dw is None:  # an empty batch
        dw = np.zeros((k + fold, o), dtype=w.dtype)
    if fold:
        dw, db = dw[:k], dw[k].copy()  # db's own array, not a view of dw's
    else:
        db = column_sum(dy.reshape(-1, o)) if cache.has_bias else None
    return dx, dw.reshape(w.shape), db


NUMPY_GEMM = Strategy("numpy-gemm", functools.partial(_gemm_forward, im2col=_im2col_into),
                      functools.partial(_gemm_backward, input_grad=_input_grad_by_offset, im2col=_im2col_into))
NUMPY_GEMM_COMPILED = Strategy("numpy-gemm, compiled im2col and col2im",
                               functools.partial(_gemm_forward, im2col=_im2col_compiled),
                               functools.partial(_gemm_backward, input_grad=_input_grad_compiled,
                                                 im2col=_im2col_compiled))


# ---- 2b. NumPy, float32 3x3 convolutions: computed directly in vector registers ------------------
#
# At a ResNet's 16-32 channels im2col + GEMM spends as long copying receptive fields as the GEMM
# takes, and the GEMM, only 16-32 outputs wide, runs well below the BLAS's peak. The kernels of
# cnn_gpu/cpu/direct.py sum each tile of outputs in registers from a zero-padded copy of x instead.
# The input gradient is a convolution of dy too (at stride 1 with the flipped, channel-swapped
# kernel; at stride s one per class of input positions, each with the taps that reach it), so the
# backward runs the same kernels for dx; the weight gradient has a kernel of its own (a sum over
# positions, x's windows times dy).

DIRECT_MAX_CHANNELS = 64  # measured up to 64 (resnet20's widest); wider layers keep the GEMM
DIRECT_CHUNK_BYTES = 1 << 19  # of padded input per chunk


def _cpu_direct() -> Any:
    from ..cpu import direct
    return direct


def _direct_applies(x: Any, w: Any, window: Window, out_hw: tuple[int, int]) -> bool:
    """NUMPY_DIRECT's case: float32, a 3x3 kernel with padding 1 at one stride along both axes, no
    dilation, every output, at most DIRECT_MAX_CHANNELS channels in and out, and output channels
    the kernels take."""
    c, o = x.shape[3], w.shape[3]
    return (x.dtype == np.float32 and tuple(out_hw) == window.output_hw(x.shape[1], x.shape[2], "conv2d")
            and (window.kh, window.kw, window.ph, window.pw, window.dh, window.dw) == (3, 3, 1, 1, 1, 1)
            and window.sh == window.sw
            and max(c, o) <= DIRECT_MAX_CHANNELS and _cpu_direct().supports(c, o))


def _direct_chunks(n: int, image_bytes: int) -> list[slice]:
    """Slices of a batch of n: at most DIRECT_CHUNK_BYTES of padded images each, and at least
    MIN_CHUNKS of them, so that two threads get even shares (three chunks would leave one thread
    doing two). Fixed by the sizes: the same chunks, and the same sum of their weight gradients,
    on any number of threads."""
    return threads.ranges(n, min(DIRECT_CHUNK_BYTES // image_bytes, -(-n // MIN_CHUNKS)))


def _direct_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                    inference: bool, relu: bool = False) -> tuple[Any, None]:
    """x (N, H, W, C), w (3, 3, C, O) -> y (N, OH, OW, O), in chunks of the batch whose padded copy
    fits DIRECT_CHUNK_BYTES, each chunk's bias and ReLU applied while it is in cache; each thread
    takes chunks in one compiled call (direct.conv3x3_chunks on cnn_gpu.cpu.threads.on_each).
    Keeps no cols: the backward has kernels of its own."""
    direct = _cpu_direct()
    n, h, wd, c = x.shape
    o = w.shape[3]
    y = direct.aligned_empty((n, *out_hw, o))
    chunks = _direct_chunks(n, (h + 2) * (wd + 2) * c * x.itemsize)
    starts = _starts(chunks, n)
    x, w = np.ascontiguousarray(x), direct.aligned(w)  # once, not a copy per chunk
    bias = None if b is None else np.ascontiguousarray(b, dtype=np.float32)
    per_chunk = chunks[0].stop - chunks[0].start if chunks else 0
    threads.on_each(direct.conv3x3_chunks(x, w, y, starts, window.sh, bias, relu),
                    lambda: direct.kept_padded_scratch(per_chunk, h, wd, c))
    return y, None


def _starts(chunks: list[slice], n: int) -> np.ndarray:
    """Where each chunk begins, and n at the end: the chunk loops' int64 bounds."""
    return np.array([part.start for part in chunks] + [n], np.int64)


def _padded_dy_scratch(images: int, x: np.ndarray, w: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    return _cpu_direct().padded_scratch(images, out_hw[0], out_hw[1], w.shape[3])


def _input_grad_direct(dy2d: np.ndarray, w: np.ndarray, window: Window, out_hw: tuple[int, int],
                       out: np.ndarray, scratch: np.ndarray) -> None:
    """dy2d (B*OH*OW, O) -> out (B, H, W, C) by the direct kernels (conv3x3_input_grad);
    scratch: _padded_dy_scratch."""
    direct = _cpu_direct()
    direct.conv3x3_input_grad(dy2d.reshape(out.shape[0], *out_hw, -1), direct.swap_channels(w), out, scratch,
                              stride=window.sh)


def _direct_backward(dy: Any, cache: ConvCache, need_dx: bool, dx_plus: Any = None) -> tuple[Any, Any, Any]:
    """dx by the direct kernels (conv3x3_input_grad) and dw by the weight-gradient kernel, chunk by
    chunk (at strides 1 and 2 in one compiled call per thread, direct.conv3x3_backward_chunks; else
    a call per chunk, on cnn_gpu.cpu.threads), the chunks' dw summed in chunk order; db a column
    sum. dx_plus:
    added to each chunk of dx while it is in cache. Where the weight-gradient kernel does not take
    the channels (C not a multiple of LANES: a network's first layer), NUMPY_GEMM_COMPILED's
    backward, with dx by the direct kernels where they take C."""
    direct = _cpu_direct()
    x, w, window, out_hw = np.ascontiguousarray(cache.x), cache.w, cache.window, cache.out_hw
    n, h, wd, c = x.shape
    o = w.shape[3]
    dx_direct = direct.supports(o, c)  # dx has C outputs
    if not (dx_direct and direct.supports_weight_grad(c, o)):
        dx, dw, db = _gemm_backward(dy, cache, need_dx, im2col=_im2col_compiled,
                                    input_grad=_input_grad_direct if dx_direct else _input_grad_compiled,
                                    input_grad_scratch=_padded_dy_scratch if dx_direct else _dcols_scratch)
        return _plus(dx, dx_plus), dw, db
    dy = np.ascontiguousarray(dy)
    w_t = direct.swap_channels(w)
    dx = direct.aligned_empty(x.shape) if need_dx else None
    chunks = _direct_chunks(n, (h + 2) * (wd + 2) * max(c, o) * x.itemsize)  # as the forward's, for dy too
    per_chunk = chunks[0].stop - chunks[0].start if chunks else 0

    def scratch() -> np.ndarray | None:  # padded dy (the weight gradient reads x as it is)
        return direct.kept_padded_scratch(per_chunk, *out_hw, o) if need_dx else None

    if window.sh in direct.CHUNKED_STRIDES:  # the chunks in compiled loops, one call per thread
        starts, plus = _starts(chunks, n), None if dx_plus is None else np.ascontiguousarray(dx_plus)
        dw_t_parts = direct.aligned_empty((len(chunks), 9 * o * c))
        threads.on_each(direct.conv3x3_backward_chunks(x, dy, w_t, dx, plus, dw_t_parts, starts, window.sh), scratch)
        dw = direct.sum_weight_grads(dw_t_parts, c, o)  # in chunk order: the same sum on any thread count
        db = column_sum(dy.reshape(-1, o)) if cache.has_bias else None
        return dx, dw, db

    def run(part: slice, padded_dy: np.ndarray | None) -> np.ndarray:
        if need_dx:
            direct.conv3x3_input_grad(dy[part], w_t, dx[part], padded_dy, stride=window.sh)
            if dx_plus is not None:
                np.add(dx[part], dx_plus[part], out=dx[part])
        return direct.conv3x3_weight_grad(x[part], dy[part], stride=window.sh)

    dw = np.zeros(w.shape, dtype=w.dtype)
    for part_dw in threads.for_each(chunks, run, scratch):  # in chunk order: the same sum on any thread count
        dw += part_dw
    db = column_sum(dy.reshape(-1, o)) if cache.has_bias else None
    return dx, dw, db


NUMPY_DIRECT = Strategy("numpy-direct 3x3, vector kernels", _direct_forward, _direct_backward, adds_dx=True)


# ---- 2c. NumPy, depthwise (groups == C): a multiply-add per kernel tap ----------------------------
#
# A depthwise convolution's GEMMs are C products of (M, KH*KW) by (KH*KW, multiplier): far too
# small for BLAS. Instead each of the KH*KW taps is one pass over all channels at once,
# (N, OH, OW, C, 1) * w[i, j] (C, multiplier), in chunks of the batch that stay in cache.

DEPTHWISE_CHUNK_BYTES = 1 << 18  # of output per chunk, so a chunk and its term stay in L2


def _depthwise_chunks(n: int, image_bytes: int) -> list[slice]:
    return threads.ranges(n, DEPTHWISE_CHUNK_BYTES // max(image_bytes, 1))


def _depthwise_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                       inference: bool, relu: bool = False) -> tuple[Any, None]:
    """x (N, H, W, C), w (KH, KW, 1, C*M) -> y (N, OH, OW, C*M): y[..., c*M + m] reads channel c
    (relu: its maximum with 0, chunk by chunk)."""
    (oh, ow), (n, _, _, c), o = out_hw, x.shape, w.shape[3]
    mult = o // c
    xpad = pad_hw(x, window)
    y = np.empty((n, oh, ow, c, mult), dtype=x.dtype)
    chunks = _depthwise_chunks(n, y[:1].nbytes)
    term = np.empty_like(y[:chunks[0].stop]) if chunks else None
    for part in chunks:
        y_part, term_part, x_part = y[part], term[:part.stop - part.start], xpad[part]
        for i in range(window.kh):
            for j in range(window.kw):
                tap = x_part[window.tap(i, j, oh, ow)][..., None]  # (B, OH, OW, C, 1)
                first = i == 0 and j == 0
                np.multiply(tap, w[i, j, 0].reshape(c, mult), out=y_part if first else term_part)
                if not first:
                    y_part += term_part
        if b is not None:
            y_part += b.reshape(c, mult)
        if relu:
            relu_into(y_part, y_part)
    return y.reshape(n, oh, ow, o), None


def _depthwise_backward(dy: Any, cache: ConvCache, need_dx: bool) -> tuple[Any, Any, Any]:
    """dy (N, OH, OW, C*M) -> dx (N, H, W, C) or None, dw (KH, KW, 1, C*M), db or None."""
    x, w, window, (oh, ow) = cache.x, cache.w, cache.window, cache.out_hw
    (n, h, wd, c), o = x.shape, w.shape[3]
    mult = o // c
    xpad = pad_hw(x, window)
    dy5 = np.ascontiguousarray(dy).reshape(n, oh, ow, c, mult)
    dw = np.zeros((window.kh, window.kw, c, mult), dtype=x.dtype)
    dxpad = np.zeros(xpad.shape, dtype=x.dtype) if need_dx else None
    chunks = _depthwise_chunks(n, dy5[:1].nbytes)
    term = np.empty_like(dy5[:chunks[0].stop]) if chunks else None
    for part in chunks:
        dy_part, term_part, x_part = dy5[part], term[:part.stop - part.start], xpad[part]
        for i in range(window.kh):
            for j in range(window.kw):
                index = window.tap(i, j, oh, ow)
                np.multiply(x_part[index][..., None], dy_part, out=term_part)  # (B, OH, OW, C, M)
                dw[i, j] += column_sum(term_part.reshape(-1, o)).reshape(c, mult)
                if need_dx:
                    np.multiply(dy_part, w[i, j, 0].reshape(c, mult), out=term_part)
                    dxpad[part][index] += term_part.sum(axis=-1) if mult > 1 else term_part[..., 0]
    db = column_sum(dy.reshape(-1, o)) if cache.has_bias else None
    dx = unpad_hw(dxpad, window, h, wd) if need_dx else None
    return dx, dw.reshape(w.shape), db


DEPTHWISE = Strategy("depthwise", _depthwise_forward, _depthwise_backward)


# ---- 2d. Compiled depthwise kernels: cnn_gpu/cpu/depthwise.py (Numba), cnn_gpu/cuda/conv.py (CuPy) ---

def _cpu_depthwise() -> Any:
    from ..cpu import depthwise
    return depthwise


def _cpu_elementwise() -> Any:
    from ..cpu import elementwise
    return elementwise


def _cuda_conv() -> Any:
    from ..cuda import conv
    return conv


def _depthwise_compiled_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                                inference: bool, relu: bool = False) -> tuple[Any, None]:
    return _cpu_depthwise().depthwise_forward(x, w, b, window, out_hw, relu=relu), None  # relu in its loop


def _cupy_depthwise_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                            inference: bool, relu: bool = False) -> tuple[Any, None]:
    y = _cuda_conv().depthwise_forward(x, w, b, window, out_hw)
    if relu:
        get_array_module(y).maximum(y, 0, out=y)
    return y, None


def _depthwise_kernels_backward(dy: Any, cache: ConvCache, need_dx: bool,
                                kernels: Callable[[], Any]) -> tuple[Any, Any, Any]:
    dx, dw = kernels().depthwise_backward(dy, cache.x, cache.w, cache.window, need_dx)
    db = column_sum(dy.reshape(-1, cache.w.shape[3])) if cache.has_bias else None
    return dx, dw, db


DEPTHWISE_COMPILED = Strategy("depthwise, compiled", _depthwise_compiled_forward,
                              functools.partial(_depthwise_kernels_backward, kernels=_cpu_depthwise))
CUPY_DEPTHWISE = Strategy("cupy-depthwise", _cupy_depthwise_forward,
                          functools.partial(_depthwise_kernels_backward, kernels=_cuda_conv))


# ---- 2e. CuPy, any groups: the reference's whole-batch batched GEMM, with a one-launch col2im -------

def _cupy_col2im(dcols: Any, x_shape: tuple[int, ...], window: Window, oh: int, ow: int) -> Any:
    return _cuda_conv().col2im(dcols, x_shape, window, oh, ow)


CUPY_GEMM = Strategy("cupy-gemm", reference_forward, functools.partial(reference_backward, col2im=_cupy_col2im))


# ---- 2f. CuPy, groups < C: im2col and col2im kernels, the bias in the GEMM, GEMMs that can be captured --

def _im2col_forward(x: Any, w: Any, b: Any, window: Window, groups: int, out_hw: tuple[int, int],
                    inference: bool, relu: bool = False) -> tuple[Any, Any]:
    y, cols = _cuda_conv().gemm_forward(x, w, b, window, groups, out_hw, inference)
    if relu:
        get_array_module(y).maximum(y, 0, out=y)
    return y, cols


def _im2col_backward(dy: Any, cache: ConvCache, need_dx: bool) -> tuple[Any, Any, Any]:
    return _cuda_conv().gemm_backward(dy, cache, need_dx)


CUPY_IM2COL = Strategy("cupy-im2col", _im2col_forward, _im2col_backward)


# ---- 3. the choice ---------------------------------------------------------------------------------

def select(x: Any, w: Any, groups: int, window: Window, out_hw: tuple[int, int]) -> Strategy:
    """The strategy that runs a convolution of these arrays (the backward asks again, with the
    cache's x and w, so switching the compiled CPU kernels off in between is fine: the strategies
    of one backend and one groups share their cache)."""
    depthwise = groups == x.shape[3] and groups > 1
    if is_cupy_array(x):
        return CUPY_DEPTHWISE if depthwise else CUPY_IM2COL
    compiled = cpu.runs_on(x, w)
    if groups == 1 and compiled and _direct_applies(x, w, window, out_hw):
        return NUMPY_DIRECT
    if groups == 1:
        return NUMPY_GEMM_COMPILED if compiled else NUMPY_GEMM
    if depthwise:
        return DEPTHWISE_COMPILED if compiled else DEPTHWISE
    return REFERENCE  # 1 < groups < C: one GEMM per group over the whole batch


# ---- 4. the op -------------------------------------------------------------------------------------

def _check_arguments(x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any, groups: Any,
                     out_size: Any) -> tuple[Window, tuple[int, int]]:
    """Every check a user's arguments need, with the shapes in the message; returns the window
    and the (OH, OW) to compute."""
    check_float(x, "conv2d")
    check_float(w, "conv2d", name="w")
    check_rank(x, 4, "conv2d", "(N, H, W, C)")
    check_rank(w, 4, "conv2d", "(KH, KW, C_in / groups, C_out)", name="w")
    get_array_module(x, w, b)  # a TypeError for arrays of both backends
    shapes = f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)})"
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"conv2d: groups must be an int >= 1, got {groups!r}")
    kh, kw, cg, o = w.shape
    c = x.shape[3]
    if c % groups or o % groups:
        raise ValueError(f"conv2d: groups {groups} must divide the input channels {c} and the output "
                         f"channels {o} {shapes}")
    if cg * groups != c:
        per_group = f" ({groups} groups of {cg})" if groups > 1 else ""
        raise ValueError(f"conv2d: x has {c} channels but w expects {cg * groups}{per_group} {shapes}")
    if x.dtype != w.dtype:
        raise TypeError(f"conv2d: x is {x.dtype} but w is {w.dtype}; use one dtype")
    if b is not None:
        if tuple(b.shape) != (o,):
            raise ValueError(f"conv2d: b must have shape ({o},) for w of shape {tuple(w.shape)}, "
                             f"got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"conv2d: x is {x.dtype} but b is {b.dtype}; use one dtype")
    window = Window.of((kh, kw), stride, padding, dilation)
    oh, ow = window.output_hw(x.shape[1], x.shape[2], "conv2d")
    if out_size is None:
        return window, (oh, ow)
    rows, cols = pair(out_size, "out_size")
    if not (0 < rows <= oh and 0 < cols <= ow):
        raise ValueError(f"conv2d: out_size must be within the full output ({oh}, {ow}), got {(rows, cols)}")
    return window, (rows, cols)


def conv2d_forward(x: Any, w: Any, b: Any = None, stride: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
                   out_size: tuple[int, int] | None = None, inference: bool = False,
                   relu: bool = False) -> tuple[Any, ConvCache]:
    """x (N, H, W, C), w (KH, KW, C/groups, O), b (O,) or None -> y (N, OH, OW, O), cache.

    stride, padding (zeros, on each side), dilation: an int or an (h, w) pair. groups divides C
    and O; output channel o reads the C/groups input channels of its group o // (O/groups) (see
    the module docstring); groups == C is a depthwise convolution.

    out_size (rows, cols): compute only the first rows x cols outputs, y (N, rows, cols, O), from
    the input they read: a 2x2 pool after the seed network's conv2 reads 10 x 10 of its 11 x 11
    outputs. The backward's dx still has x's shape, zero where no computed output read x.

    inference=True: no backward will follow, so no cols are kept for it.

    relu=True: y = max(conv, 0), the output of a ReLU after the convolution, applied as y is made
    (the backward is unchanged: the ReLU's own backward runs before it, on this y).
    """
    window, out_hw = _check_arguments(x, w, b, stride, padding, dilation, groups, out_size)
    y, cols = select(x, w, groups, window, out_hw).forward(x, w, b, window, groups, out_hw, inference, bool(relu))
    return y, ConvCache(x, w, b is not None, window, groups, out_hw, cols)


def _plus(dx: Any, dx_plus: Any) -> Any:
    return dx if dx_plus is None else dx + dx_plus


def conv2d_backward(dy: Any, cache: ConvCache, need_dx: bool = True, dx_plus: Any = None) -> tuple[Any, Any, Any]:
    """dy (N, OH, OW, O) -> dx (N, H, W, C) or None, dw (KH, KW, C/groups, O), db (O,) or None.

    need_dx=False skips the input gradient (the first layer of a network has no use for it).
    dx_plus (N, H, W, C): the gradient x has from its other readers; the dx returned is then
    dx + dx_plus (each element rounded once, as a separate sum would: the same numbers), computed
    by the direct strategy chunk by chunk while dx is in cache instead of in a pass of its own.
    dx_plus is read, not written.
    """
    x, w = cache.x, cache.w
    get_array_module(dy, x)  # a TypeError for arrays of both backends
    expected = (x.shape[0], *cache.out_hw, w.shape[3])
    if tuple(dy.shape) != expected:
        raise ValueError(f"conv2d backward: dy has shape {tuple(dy.shape)} but the forward's output "
                         f"was {expected}")
    if dy.dtype != x.dtype:
        raise TypeError(f"conv2d backward: dy is {dy.dtype} but x is {x.dtype}; use one dtype")
    if dx_plus is not None:
        if not need_dx:
            raise ValueError("conv2d backward: dx_plus is added to dx, but need_dx is False")
        if tuple(dx_plus.shape) != tuple(x.shape) or dx_plus.dtype != x.dtype:
            raise ValueError(f"conv2d backward: dx_plus is {dx_plus.dtype} {tuple(dx_plus.shape)} but x is "
                             f"{x.dtype} {tuple(x.shape)}")
    strategy = select(x, w, cache.groups, cache.window, cache.out_hw)
    if strategy.adds_dx:
        return strategy.backward(dy, cache, need_dx, dx_plus=dx_plus)
    dx, dw, db = strategy.backward(dy, cache, need_dx)
    return _plus(dx, dx_plus), dw, db
