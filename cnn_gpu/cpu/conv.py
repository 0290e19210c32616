"""col2im on the CPU, compiled by Numba: the adjoint of im2col in one pass.

    dcols (B*OH*OW, KH*KW*C) -> dx (B, H, W, C), overlapping windows summed

NumPy's col2im (cnn_gpu.functional.conv.col2im, the reference) adds one kernel tap at a time
in loops of C elements, which for the seed network's conv2 costs more than the GEMM that makes
dcols; this loop adds the same terms, in the same (kh, kw) order, image by image with the
image's dx in cache. One group (groups == 1): the layout of the NumPy GEMM strategy's dcols.
"""
from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ..geometry import Window

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


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


def col2im(dcols: Any, window: Window, oh: int, ow: int, out: Any) -> Any:
    """Adjoint of im2col: dcols (B*OH*OW, KH*KW*C) -> out (B, H, W, C), a C-contiguous array
    (a batch slice of a larger one is fine) that is overwritten. Returns out."""
    _col2im(np.ascontiguousarray(dcols), window.kh, window.kw, window.sh, window.sw, window.ph, window.pw,
            window.dh, window.dw, oh, ow, out)
    return out
