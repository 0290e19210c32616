"""Plain NumPy references for the CUDA kernels in cnn_gpu.cuda (loops over windows, float64 sums).

Same signatures and semantics as the kernels, written for clarity, not speed:
    max_pool2d_ref(x, pool, stride, padding) -> y, argmax         # x (N, H, W, C)
    max_pool2d_backward_ref(dy, argmax, x_shape, pool, stride, padding) -> dx (float64)
    channel_mean_var_ref(x2d) -> mean, var                         # float64, biased var
    channel_grad_sums_ref(dy2d, x2d, mean, inv_std) -> sum_dy, sum_dy_xhat (float64)
"""
from __future__ import annotations

import numpy as np

Pair = tuple[int, int]


def _argmax_dtype(pool: Pair) -> type:
    return np.uint8 if pool[0] * pool[1] <= 256 else np.int32


def max_pool2d_ref(x: np.ndarray, pool: Pair, stride: Pair, padding: Pair
                   ) -> tuple[np.ndarray, np.ndarray]:
    """x (N, H, W, C) -> y (N, OH, OW, C), argmax (N, OH, OW, C): numpy.argmax over each
    row-major flattened window of the -inf padded input (first maximum wins, NaN is the max)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw) = pool, stride, padding
    xp = np.full((n, h + 2 * ph, w + 2 * pw, c), -np.inf, dtype=x.dtype)
    xp[:, ph:ph + h, pw:pw + w, :] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = np.empty((n, oh, ow, c), dtype=_argmax_dtype(pool))
    for i in range(oh):
        for j in range(ow):
            window = xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :].reshape(n, kh * kw, c)
            k = np.argmax(window, axis=1)                       # (N, C)
            argmax[:, i, j, :] = k
            y[:, i, j, :] = np.take_along_axis(window, k[:, None, :], axis=1)[:, 0, :]
    return y, argmax


def max_pool2d_backward_ref(dy: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...],
                            pool: Pair, stride: Pair, padding: Pair) -> np.ndarray:
    """dy, argmax (N, OH, OW, C) -> dx (N, H, W, C) in float64: each dy added at its argmax."""
    n, h, w, c = x_shape
    (kh, kw), (sh, sw), (ph, pw) = pool, stride, padding
    dxp = np.zeros((n, h + 2 * ph, w + 2 * pw, c))
    nn, cc = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")   # (N, C)
    for i in range(dy.shape[1]):
        for j in range(dy.shape[2]):
            k = argmax[:, i, j, :].astype(np.int64)
            np.add.at(dxp, (nn, i * sh + k // kw, j * sw + k % kw, cc), dy[:, i, j, :])
    return dxp[:, ph:ph + h, pw:pw + w, :]


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
