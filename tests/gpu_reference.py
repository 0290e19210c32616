"""Plain NumPy references for the CUDA kernels in cnn_gpu.cuda (loops over windows, float64 sums).

Same signatures and semantics as the kernels, written for clarity, not speed:
    max_pool2d_ref(x, window, ceil_mode) -> y, argmax             # x (N, H, W, C), a geometry.Window
    max_pool2d_backward_ref(dy, argmax, x_shape, window) -> dx (float64)
    channel_mean_var_ref(x2d) -> mean, var                         # float64, biased var
    channel_grad_sums_ref(dy2d, x2d, mean, inv_std) -> sum_dy, sum_dy_xhat (float64)
"""
from __future__ import annotations

import numpy as np

from cnn_gpu.geometry import Window

from .references import max_pool_backward_loops, max_pool_loops


def _argmax_dtype(window: Window) -> type:
    return np.uint8 if window.kh * window.kw <= 256 else np.int32


def max_pool2d_ref(x: np.ndarray, window: Window, ceil_mode: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x (N, H, W, C) -> y (N, OH, OW, C), argmax (N, OH, OW, C): numpy.argmax over each row-major
    flattened window, taps outside the input reading -inf (first maximum wins, NaN is the max);
    tests/references.py's loops, in the kernels' dtypes."""
    y, argmax = max_pool_loops(x, window[0:2], window[2:4], window[4:6], window[6:8], ceil_mode)
    return y, argmax.astype(_argmax_dtype(window))


def max_pool2d_backward_ref(dy: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...],
                            window: Window) -> np.ndarray:
    """dy, argmax (N, OH, OW, C) -> dx (N, H, W, C) in float64: each dy added at its argmax tap."""
    return max_pool_backward_loops(dy, argmax, x_shape, window[0:2], window[2:4], window[4:6], window[6:8])


def channel_mean_var_ref(x2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x2d (M, C) -> mean (C,), biased var (C,), both float64 (two-pass)."""
    x = x2d.astype(np.float64)
    mean = x.mean(axis=0)
    return mean, ((x - mean) ** 2).mean(axis=0)


def channel_grad_sums_ref(dy2d: np.ndarray, x2d: np.ndarray, mean: np.ndarray,
                          inv_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy2d, x2d (M, C); mean, inv_std (C,) -> sum(dy), sum(dy * x_hat) over M, float64."""
    dy = dy2d.astype(np.float64)
    x_hat = (x2d.astype(np.float64) - mean) * inv_std
    return dy.sum(axis=0), (dy * x_hat).sum(axis=0)


def batch_norm_backward_dx_ref(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                               inv_std: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Training-mode dx of y = gamma * x_hat + beta over all rows, in float64. dy, x (M, C)."""
    dy64, x_hat = dy.astype(np.float64), (x.astype(np.float64) - mean) * inv_std
    m = x.shape[0]
    return gamma * inv_std / m * (m * dy64 - dy64.sum(0) - x_hat * (dy64 * x_hat).sum(0))
