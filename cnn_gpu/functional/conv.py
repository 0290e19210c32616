"""2-D convolution as im2col + one GEMM over the whole batch (channels-last).

    x (N, H, W, C) * w (KH, KW, C, O) + b (O,) -> y (N, OH, OW, O)

im2col lays every receptive field out as one row of `cols` (N*OH*OW, KH*KW*C), so the
convolution is `cols @ w.reshape(KH*KW*C, O)`: one large GEMM that BLAS (or cuBLAS)
runs at full speed. Channels-last keeps C innermost in both x and the rows of cols,
so no transposes are needed anywhere.

On NumPy the batch is cut into chunks whose cols fit in the CPU's L2 cache (CHUNK_BYTES):
each chunk's im2col copy is written and read back by the GEMM from cache instead of
memory, and the GEMM itself runs faster on the smaller operand. The forward then keeps x
(not cols, ~KH*KW times larger) for the backward, which rebuilds each chunk's cols: the
copy is cheap in cache, and a training step holds far less memory. Where cols is no larger
than the output y (few input channels: the seed network's conv1 has K + 1 = 10 columns for
32 outputs), or small in all (KEEP_COLS_BYTES), the forward keeps cols instead: rebuilding it
costs more than keeping it there.
On CuPy the whole batch is one chunk (one large GEMM suits the GPU).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..geometry import check_float, check_rank, output_size, pair
from .reduce import column_sum


def pad_hw(x: Any, ph: int, pw: int, value: float = 0.0) -> Any:
    """Pad the two spatial axes of (N, H, W, C); returns x itself when there is nothing to pad."""
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.full((n, h + 2 * ph, w + 2 * pw, c), value, dtype=x.dtype)
    out[:, ph:ph + h, pw:pw + w, :] = x
    return out


def window_view(xpad: Any, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int) -> Any:
    """A strided view (N, OH, OW, KH, KW, C) of every window of a padded (N, Hp, Wp, C). No copy."""
    xp = get_array_module(xpad)
    sn, shh, sww, sc = xpad.strides
    n, c = xpad.shape[0], xpad.shape[3]
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(n, oh, ow, kh, kw, c), strides=(sn, shh * sh, sww * sw, shh, sww, sc))


def im2col(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
           out: Any = None) -> tuple[Any, int, int]:
    """x (N, H, W, C) -> cols (N*OH*OW, KH*KW*C), OH, OW. Row order (n, oh, ow); column order (kh, kw, c).

    out: an (N*OH*OW, KH*KW*C) array (a view of a larger buffer is fine) to write cols into.
    """
    n, h, w, c = x.shape
    oh = output_size(h, kh, sh, ph, op="conv2d", axis="height")
    ow = output_size(w, kw, sw, pw, op="conv2d", axis="width")
    if out is None and _is_pointwise(kh, kw, sh, sw, ph, pw):
        return x.reshape(n * oh * ow, c), oh, ow  # a 1x1 convolution needs no copy
    xp = get_array_module(x)
    xpad = pad_hw(xp.ascontiguousarray(x), ph, pw)
    if out is None:
        windows = window_view(xpad, kh, kw, sh, sw, oh, ow)
        return windows.reshape(n * oh * ow, kh * kw * c), oh, ow  # the one copy
    if c == 1:
        # One input channel: a copy per kernel offset (one column of cols) runs along image rows
        # (OW elements per inner loop) instead of KW elements per window row: 1.6x faster on the
        # seed's conv1, and 3.8x more when cols is stored column by column (cols_buffer).
        for i in range(kh):
            for j in range(kw):
                column = out[:, i * kw + j].reshape(n, oh, ow)  # a view: one stride, any layout
                xp.copyto(column, xpad[_offset_slice(i, j, sh, sw, oh, ow)][..., 0])
    else:
        xp.copyto(out.reshape(n, oh, ow, kh, kw, c), window_view(xpad, kh, kw, sh, sw, oh, ow))
    return out, oh, ow


def cols_buffer(xp: Any, rows: int, columns: int, channels: int, dtype: Any) -> Any:
    """An empty (rows, columns) array for im2col's out. With one input channel it is stored
    column by column (its transpose is C-contiguous): each of im2col's per-offset copies then
    writes one contiguous run (the seed network's conv1 at batch 64: im2col 0.50 -> 0.13 ms),
    and BLAS takes the transposed operand as it is (the GEMM's time does not change)."""
    if channels == 1:
        return xp.empty((columns, rows), dtype=dtype).T
    return xp.empty((rows, columns), dtype=dtype)


def col2im(dcols: Any, x_shape: tuple[int, ...], kh: int, kw: int, sh: int, sw: int,
           ph: int, pw: int, oh: int, ow: int) -> Any:
    """Adjoint of im2col: dcols (N*OH*OW, KH*KW*C) -> dx (N, H, W, C), overlapping windows summed.

    One strided add per kernel offset (KH*KW vectorized passes), in a fixed order, so the
    result is deterministic. On CuPy one gather kernel (cnn_gpu/cuda/elementwise.py) adds the
    same terms in the same order.
    """
    if is_cupy_array(dcols):
        from ..cuda import elementwise
        return elementwise.col2im(dcols, x_shape, kh, kw, sh, sw, ph, pw, oh, ow)
    xp = get_array_module(dcols)
    n, h, w, c = x_shape
    dcols = dcols.reshape(n, oh, ow, kh, kw, c)
    dxpad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcols[:, :, :, i, j, :]
    return dxpad[:, ph:ph + h, pw:pw + w, :] if (ph or pw) else dxpad


CHUNK_BYTES = 1 << 21  # cols per chunk on the CPU: 2 MiB measured best (1 to 16 MiB tried)


def _offset_slice(i: int, j: int, sh: int, sw: int, oh: int, ow: int) -> tuple:
    """Index of window element (i, j) of every window in a padded (N, Hp, Wp, C) array."""
    return (slice(None), slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw), slice(None))


def _bias_in_gemm(x: Any, has_bias: bool, pointwise: bool) -> bool:
    """Whether the bias rides in the GEMM: cols gets a column of ones and w2d the bias as one
    more row, so y = [cols, 1] @ [w2d; b] needs no pass of its own over y (for the seed's conv1
    that pass cost more than the GEMM), and the backward's cols.T @ dy gives db as its last row.
    NumPy only (not yet tried on CuPy), and not for a 1x1 convolution, whose cols is x itself."""
    return has_bias and not is_cupy_array(x) and not pointwise


def _chunk_cols(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, oh: int, ow: int,
                ones_column: bool, into: Any = None):
    """Yield (batch slice, cols) per chunk (see _chunks): cols (B*OH*OW, K), or (B*OH*OW, K + 1)
    ending in a column of ones. On NumPy every chunk's cols is written into one buffer, so a
    chunk's cols is only valid until the next one is yielded; unless `into`, the whole batch's
    (N*OH*OW, K [+ 1]) array, is given: then each chunk's cols is its rows of `into`."""
    xp = get_array_module(x)
    k = kh * kw * x.shape[3]
    chunks = _chunks(x, oh * ow * k * x.itemsize)
    if is_cupy_array(x) or _is_pointwise(kh, kw, sh, sw, ph, pw) or not chunks:
        for part in chunks:  # one fresh cols (CuPy), or x itself (1x1)
            yield part, im2col(x[part], kh, kw, sh, sw, ph, pw)[0]
        return
    buf = into if into is not None else cols_buffer(xp, (chunks[0].stop - chunks[0].start) * oh * ow,
                                                    k + ones_column, x.shape[3], x.dtype)
    if ones_column:
        buf[:, k] = 1
    for part in chunks:
        rows = slice(part.start * oh * ow, part.stop * oh * ow) if into is not None else \
            slice(0, (part.stop - part.start) * oh * ow)
        cols = buf[rows]
        im2col(x[part], kh, kw, sh, sw, ph, pw, out=cols[:, :k])
        yield part, cols


KEEP_COLS_BYTES = 1 << 24  # a batch's cols up to 16 MiB is kept for the backward (see _keeps_cols)


def _keeps_cols(x: Any, columns: int, outputs: int, pointwise: bool, cols_bytes: int) -> bool:
    """Whether the forward keeps cols for the backward (NumPy), instead of the backward rebuilding
    it from x: when cols, `columns` wide, is no wider than the output (`outputs` wide), so keeping
    it at most doubles what the layer holds; or when the whole batch's cols is at most
    KEEP_COLS_BYTES. Measured on the seed network's conv2: forward + backward 9.2 -> 8.65 ms at
    batch 64 (cols 8.9 MB), 44.2 -> 43.7 ms at 256 (36 MB: not worth the memory)."""
    return not is_cupy_array(x) and not pointwise and (columns <= outputs or cols_bytes <= KEEP_COLS_BYTES)


def _chunks(x: Any, row_bytes: int) -> list[slice]:
    """Slices of the batch axis, each holding about CHUNK_BYTES of cols (at least one image)."""
    n = x.shape[0]
    per = n if is_cupy_array(x) else max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def _is_pointwise(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> bool:
    """A 1x1 convolution, stride 1, no padding: cols is x itself reshaped, nothing to copy."""
    return kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0


def conv2d_forward(x: Any, w: Any, b: Any = None, stride: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1,
                   out_size: tuple[int, int] | None = None, inference: bool = False) -> tuple[Any, tuple]:
    """x (N, H, W, C), w (KH, KW, C, O), b (O,) or None -> y (N, OH, OW, O), cache.

    inference=True: no backward will follow, so cols is never kept (see _keeps_cols), and the
    im2col of each chunk reuses one cache-sized buffer.

    out_size (rows, cols), padding 0 only: compute just the first rows x cols output positions,
    y (N, rows, cols, O), from the input rows and columns they read. A 2x2 pool after the seed
    network's conv2 reads 10 x 10 of its 11 x 11 outputs: 17% of its FLOPs are never used. The
    backward's dx still has x's shape, zero where x was not read.
    """
    if pair(dilation, "dilation") != (1, 1) or groups != 1:
        raise NotImplementedError("conv2d: dilation and groups are not implemented yet")
    check_float(x, "conv2d")
    check_rank(x, 4, "conv2d", "(N, H, W, C)")
    check_rank(w, 4, "conv2d", "(KH, KW, C_in, C_out)", name="w")
    xp = get_array_module(x, w, b)
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    kh, kw, c, o = w.shape
    if x.shape[3] != c:
        raise ValueError(f"conv2d: x has {x.shape[3]} channels but w expects {c} "
                         f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)})")
    if x.dtype != w.dtype:
        raise TypeError(f"conv2d: x is {x.dtype} but w is {w.dtype}; use one dtype")
    n, x_shape = x.shape[0], tuple(x.shape)
    oh = output_size(x.shape[1], kh, sh, ph, op="conv2d", axis="height")
    ow = output_size(x.shape[2], kw, sw, pw, op="conv2d", axis="width")
    if out_size is not None and tuple(out_size) != (oh, ow):
        rows, cols = out_size
        if not (0 < rows <= oh and 0 < cols <= ow) or ph or pw:
            raise ValueError(f"conv2d: out_size must be within the full output ({oh}, {ow}) and needs "
                             f"padding 0, got out_size {tuple(out_size)} with padding ({ph}, {pw})")
        x = x[:, :(rows - 1) * sh + kh, :(cols - 1) * sw + kw]  # the rows and columns they read
        oh, ow = rows, cols
    k = kh * kw * c
    w2d = w.reshape(k, o)
    fold = _bias_in_gemm(x, b is not None, _is_pointwise(kh, kw, sh, sw, ph, pw))
    if fold:
        w2d = xp.concatenate([w2d, b.reshape(1, o)])  # (K + 1, O)
    y = xp.empty((n, oh, ow, o), dtype=x.dtype)
    kept = None
    if not inference and _keeps_cols(x, k + fold, o, _is_pointwise(kh, kw, sh, sw, ph, pw),
                                     n * oh * ow * (k + fold) * x.itemsize):
        kept = cols_buffer(xp, n * oh * ow, k + fold, c, x.dtype)
    for part, cols in _chunk_cols(x, kh, kw, sh, sw, ph, pw, oh, ow, fold, into=kept):
        y_part = y[part].reshape(-1, o)  # a view: the GEMM writes into y
        xp.matmul(cols, w2d, out=y_part)  # the GEMM: (B*OH*OW, K [+ 1]) @ (K [+ 1], O)
        if b is not None and not fold:
            y_part += b
    cache = (x, x_shape, w, b is not None, (kh, kw, sh, sw, ph, pw, oh, ow), kept)
    return y, cache


def _input_grad_by_offset(dy2d: Any, w: Any, x_shape: tuple[int, ...], sh: int, sw: int,
                          ph: int, pw: int, oh: int, ow: int) -> Any:
    """dy2d (B*OH*OW, O), w (KH, KW, C, O) -> dx (B, H, W, C) on NumPy, without dcols.

    Per kernel offset (i, j): one GEMM dy2d @ w[i, j].T -> (B*OH*OW, C), added into the window
    positions of dx, in the same (i, j) order as col2im. col2im adds dcols (B*OH*OW, KH*KW*C)
    in loops of C elements; at stride 1 these adds run over whole rows of OW*C elements
    (conv2 of the seed network: 1.57 -> 1.24 ms per chunk).
    """
    kh, kw, c, _ = w.shape
    n, h, wd, _ = x_shape
    dxpad = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=dy2d.dtype)
    term = np.empty((dy2d.shape[0], c), dtype=dy2d.dtype)
    for i in range(kh):
        for j in range(kw):
            np.matmul(dy2d, w[i, j].T, out=term)
            dxpad[_offset_slice(i, j, sh, sw, oh, ow)] += term.reshape(n, oh, ow, c)
    return dxpad[:, ph:ph + h, pw:pw + wd, :] if (ph or pw) else dxpad


def conv2d_backward(dy: Any, cache: tuple, need_dx: bool = True) -> tuple[Any, Any, Any]:
    """dy (N, OH, OW, O) -> dx (N, H, W, C) or None, dw (KH, KW, C, O), db (O,) or None.

    need_dx=False skips the input gradient (the first layer of a network has no use for it).
    """
    x, x_shape, w, has_bias, (kh, kw, sh, sw, ph, pw, oh, ow), kept = cache
    xp = get_array_module(dy, x)
    o = w.shape[3]
    w2d = w.reshape(-1, o)  # (KH*KW*C, O)
    k = w2d.shape[0]
    pointwise = _is_pointwise(kh, kw, sh, sw, ph, pw)
    fold = _bias_in_gemm(x, has_bias, pointwise)
    dw = None  # (K, O), or (K + 1, O) with db as its last row when the bias rode in the GEMM
    # On NumPy with the compiled col2im (cnn_gpu.cpu.conv): each chunk's dcols = dy @ w2d.T goes
    # into one buffer, in cache, and col2im adds it into the chunk's slice of dx in one pass.
    compiled = need_dx and not pointwise and cpu.runs_on(dy, w)
    dcols_buffer = None
    if compiled:
        from ..cpu import conv as cpu_conv
        dx = np.empty(x.shape, dtype=x.dtype)  # C-contiguous, so each batch slice is too
    elif need_dx and len(_chunks(x, oh * ow * k * x.itemsize)) > 1:
        dx = xp.empty_like(x)
    else:  # one chunk (always on the GPU): dx is col2im's result itself, no copy into a buffer
        dx = None
    # Each chunk's cols: the forward's, or rebuilt from x (see the module docstring).
    if kept is not None:  # the same chunks, as row slices of the whole batch's cols
        chunks = ((part, kept[part.start * oh * ow:part.stop * oh * ow])
                  for part in _chunks(x, oh * ow * k * x.itemsize))
    else:
        chunks = _chunk_cols(x, kh, kw, sh, sw, ph, pw, oh, ow, fold)
    for part, cols in chunks:
        dy2d = xp.ascontiguousarray(dy[part]).reshape(-1, o)  # (B*OH*OW, O)
        part_dw = cols.T @ dy2d
        if dw is None:
            dw = part_dw
        else:
            dw += part_dw
        if not need_dx:
            continue
        if compiled:
            if dcols_buffer is None:
                dcols_buffer = np.empty((dy2d.shape[0], k), dtype=dy2d.dtype)
            dcols = np.matmul(dy2d, w2d.T, out=dcols_buffer[:dy2d.shape[0]])  # (B*OH*OW, KH*KW*C)
            cpu_conv.col2im(dcols, kh, kw, sh, sw, ph, pw, oh, ow, out=dx[part])
            continue
        part_shape = (cols.shape[0] // (oh * ow),) + tuple(x.shape[1:])
        if pointwise:
            part_dx = (dy2d @ w2d.T).reshape(part_shape)
        elif is_cupy_array(dy2d):
            dcols = dy2d @ w2d.T  # (B*OH*OW, KH*KW*C)
            part_dx = col2im(dcols, part_shape, kh, kw, sh, sw, ph, pw, oh, ow)
        else:
            part_dx = _input_grad_by_offset(dy2d, w, part_shape, sh, sw, ph, pw, oh, ow)
        if dx is None:
            dx = part_dx
        else:
            dx[part] = part_dx
    if dw is None:  # an empty batch
        dw, dx = xp.zeros((k + fold, o), dtype=w.dtype), xp.empty_like(x) if need_dx else None
    if fold:
        dw, db = dw[:k], dw[k].copy()  # db's own array, not a view of dw's
    else:
        db = column_sum(dy.reshape(-1, o)) if has_bias else None
    if dx is not None and tuple(dx.shape) != x_shape:  # out_size: x was read in part
        full = xp.zeros(x_shape, dtype=dx.dtype)
        full[:, :dx.shape[1], :dx.shape[2]] = dx
        dx = full
    return dx, dw.reshape(w.shape), db
