"""im2col and col2im on the CPU, compiled by Numba: each in one pass.

    cols = im2col(x, window, oh, ow, out)       x (B, H, W, C) -> cols (B*OH*OW, KH*KW*C)
    dx = col2im(dcols, window, oh, ow, out)     dcols (B*OH*OW, KH*KW*C) -> dx (B, H, W, C), overlaps summed

NumPy's im2col (cnn_gpu.functional.conv._im2col_into, and the reference's im2col) pads x into a
new array, then copies a strided window view whose innermost runs are C elements; this loop
reads x where it is and writes each output row's KH*KW runs of C channels in turn, zeros where
a tap falls in the padding: the same values, a copy. NumPy's col2im adds one kernel tap at a
time in loops of C elements, which for the seed network's conv2 costs more than the GEMM that
makes dcols; this loop adds the same terms, in the same (kh, kw) order, image by image with the
image's dx in cache. One group (groups == 1): the layout of the NumPy GEMM strategy's cols.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import Window
from .jit import JIT as _jit  # cached on disk, without the GIL or bounds checks


@_jit
def _col2im(dcols, kh, kw, sh, sw, ph, pw, dil_h, dil_w, oh, ow, dx):  # pragma: no cover - compiled, tested
    n, h, w, c = dx.shape
    for b in range(n):
        dx[b] = 0
        for p in range(kh):
            for q in range(kw):
                base = (p * kw + q) * c  # this tap's columns in a row of dcols
                for i in range(oh):
                    r = i * sh + p * dil_h - ph
                    if r < 0 or r >= h:
                        continue  # the tap falls in the padding
                    for j in range(ow):
                        s = j * sw + q * dil_w - pw
                        if s < 0 or s >= w:
                            continue
                        row = (b * oh + i) * ow + j
                        for ch in range(c):
                            dx[b, r, s, ch] += dcols[row, base + ch]


@_jit
def _im2col(x, kh, kw, sh, sw, ph, pw, dil_h, dil_w, oh, ow, cols):  # pragma: no cover - compiled, tested
    n, h, w, c = x.shape
    zero = cols.dtype.type(0)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for p in range(kh):
                    r = i * sh + p * dil_h - ph
                    for q in range(kw):
                        s = j * sw + q * dil_w - pw
                        base = (p * kw + q) * c  # this tap's columns in the row
                        if r < 0 or r >= h or s < 0 or s >= w:  # the tap falls in the padding
                            for ch in range(c):
                                cols[row, base + ch] = zero
                        else:
                            for ch in range(c):
                                cols[row, base + ch] = x[b, r, s, ch]


def im2col(x: Any, window: Window, oh: int, ow: int, out: Any) -> Any:
    """x (B, H, W, C) -> out (B*OH*OW, KH*KW*C), a C-contiguous array, or a C-contiguous block of
    columns of a wider one (a view whose rows are strided), that is overwritten: row (b, oh, ow)
    holds what output (b, oh, ow) reads, in (kh, kw, c) order, the first OH x OW windows. Returns out."""
    _im2col(np.ascontiguousarray(x), window.kh, window.kw, window.sh, window.sw, window.ph, window.pw,
            window.dh, window.dw, oh, ow, out)
    return out


def col2im(dcols: Any, window: Window, oh: int, ow: int, out: Any) -> Any:
    """Adjoint of im2col: dcols (B*OH*OW, KH*KW*C) -> out (B, H, W, C), a C-contiguous array
    (a batch slice of a larger one is fine) that is overwritten. Returns out."""
    _col2im(np.ascontiguousarray(dcols), window.kh, window.kw, window.sh, window.sw, window.ph, window.pw,
            window.dh, window.dw, oh, ow, out)
    return out
