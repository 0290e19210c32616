"""The array conversions between our channels-last layout and ONNX's (and PyTorch's) NCHW one.

    conv weights    ours (KH, KW, C_in/groups, C_out)  <->  ONNX (C_out, C_in/groups, KH, KW)
    dense weights   ours (in, out)                      ==   ONNX Gemm's B with transB=0 (K, N)
    a flattened image: ours in (h, w, c) order, ONNX's in (c, h, w) order; the rows of the dense
                    weight that reads it (and any per-feature vector) are permuted once, so neither
                    side transposes an activation at run time.

Plain NumPy, no onnx import: the export, the import and cnn_gpu.bench.reference can share these.
"""
from __future__ import annotations

import numpy as np


def conv_weight_to_onnx(w: np.ndarray) -> np.ndarray:
    """(KH, KW, C_in/groups, C_out) -> (C_out, C_in/groups, KH, KW), contiguous."""
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def conv_weight_from_onnx(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in/groups, KH, KW) -> (KH, KW, C_in/groups, C_out), contiguous."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def hwc_rows_to_chw(a: np.ndarray, hwc: tuple[int, int, int]) -> np.ndarray:
    """Rows (axis 0) of `a`, indexed by the (h, w, c) flatten of an (H, W, C) image, reordered to
    its (c, h, w) flatten: a (H*W*C, ...) -> (C*H*W, ...), contiguous."""
    h, w, c = hwc
    rest = a.shape[1:]
    return np.ascontiguousarray(a.reshape(h, w, c, *rest).transpose(2, 0, 1, *range(3, 3 + len(rest)))
                                .reshape(a.shape))


def chw_rows_to_hwc(a: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """The inverse of hwc_rows_to_chw for a (C, H, W) image: rows in (c, h, w) order -> (h, w, c)."""
    c, h, w = chw
    rest = a.shape[1:]
    return np.ascontiguousarray(a.reshape(c, h, w, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest)))
                                .reshape(a.shape))
