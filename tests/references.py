"""Straightforward loop implementations, like the seed's loops, batched. Slow and obviously right."""
from __future__ import annotations

import numpy as np


def conv2d_loops(x, w, b, stride, padding, dilation=(1, 1), groups=1):
    """The definition, one output channel and position at a time: x (N, H, W, C), w (KH, KW, C/G, O)
    -> (N, OH, OW, O); output channel o reads input channels g*C/G .. (g+1)*C/G - 1, g = o // (O/G)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    n, h, wd, _ = x.shape
    kh, kw, cg, o = w.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, oh, ow, o))
    for i in range(oh):
        for j in range(ow):
            # (N, KH, KW, C): the taps of window (i, j), dh rows and dw columns apart
            region = x[:, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw, :]
            for k in range(o):
                g = k // (o // groups)
                out[:, i, j, k] = np.sum(region[..., g * cg:(g + 1) * cg] * w[:, :, :, k], axis=(1, 2, 3))
    if b is not None:
        out += b
    return out


def pool_output_size(size, kernel, stride, padding, dilation=1, ceil_mode=False):
    """PyTorch's pooling_output_shape, written out: floor or ceil, and in ceil mode no last window
    that would start in the bottom (right) padding."""
    room = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_taps(x_hw, out_hw, kernel, stride, padding, dilation):
    """For each output (i, j): the list of (k, r, s), tap k = a*KW + b of the window at input position
    (r, s), with r or s out of range where the tap falls outside the input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return {(i, j): [(a * kw + b, i * sh - ph + a * dh, j * sw - pw + b * dw) for a in range(kh) for b in range(kw)]
            for i in range(out_hw[0]) for j in range(out_hw[1])}


def _out_hw(x, kernel, stride, padding, dilation, ceil_mode):
    return tuple(pool_output_size(x.shape[1 + a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
                 for a in range(2))


def max_pool_loops(x, kernel, stride, padding, dilation=(1, 1), ceil_mode=False):
    """x (N, H, W, C) -> y (N, OH, OW, C) of x's dtype, argmax (N, OH, OW, C) int64: numpy.argmax
    over each window's taps in row-major order, a tap outside the input reading -inf (first maximum
    wins, NaN is the maximum)."""
    n, h, w, c = x.shape
    oh, ow = _out_hw(x, kernel, stride, padding, dilation, ceil_mode)
    y = np.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = np.empty((n, oh, ow, c), dtype=np.int64)
    for (i, j), taps in _pool_taps((h, w), (oh, ow), kernel, stride, padding, dilation).items():
        values = np.stack([x[:, r, s, :] if 0 <= r < h and 0 <= s < w else np.full((n, c), -np.inf, x.dtype)
                           for _, r, s in taps], axis=1)  # (N, taps, C)
        argmax[:, i, j, :] = np.argmax(values, axis=1)
        y[:, i, j, :] = np.take_along_axis(values, argmax[:, i, j, None, :], axis=1)[:, 0, :]
    return y, argmax


def max_pool_backward_loops(dy, argmax, x_shape, kernel, stride, padding, dilation=(1, 1)):
    """dy, argmax (N, OH, OW, C) -> dx (N, H, W, C) float64: each dy added at its argmax tap's input
    position (dropped outside the input), window after window in row-major order."""
    n, h, w, c = x_shape
    dx = np.zeros(x_shape)
    nn, cc = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")  # (N, C)
    for (i, j), window in _pool_taps((h, w), dy.shape[1:3], kernel, stride, padding, dilation).items():
        rows, cols = np.array([r for _, r, _ in window]), np.array([s for _, _, s in window])
        k = argmax[:, i, j, :].astype(np.int64)  # (N, C)
        r, s = rows[k], cols[k]
        inside = (0 <= r) & (r < h) & (0 <= s) & (s < w)
        np.add.at(dx, (nn[inside], r[inside], s[inside], cc[inside]), dy[:, i, j, :][inside])
    return dx


def avg_pool_loops(x, kernel, stride, padding, ceil_mode=False, count_include_pad=True):
    """x (N, H, W, C) -> y (N, OH, OW, C) float64: each window's sum over its input positions,
    divided as PyTorch's avg_pool2d divides: by the window clipped to the padded input
    (count_include_pad), or by the number of input positions in it."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = _out_hw(x, kernel, stride, padding, (1, 1), ceil_mode)
    y = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, s0 = i * sh - ph, j * sw - pw
            r1, s1 = min(r0 + kh, h + ph), min(s0 + kw, w + pw)
            inside_r, inside_s = range(max(r0, 0), min(r1, h)), range(max(s0, 0), min(s1, w))
            total = sum((x[:, r, s, :].astype(np.float64) for r in inside_r for s in inside_s), np.zeros((n, c)))
            divisor = (r1 - r0) * (s1 - s0) if count_include_pad else len(inside_r) * len(inside_s)
            y[:, i, j, :] = total / divisor
    return y


def global_avg_pool_loops(x):
    """x (N, H, W, C) -> y (N, C) float64: the mean over every pixel."""
    n, h, w, c = x.shape
    total = np.zeros((n, c))
    for r in range(h):
        for s in range(w):
            total += x[:, r, s, :]
    return total / (h * w)


def batch_norm_loops(x, gamma, beta, eps):
    """The seed's batch_normalization, per channel over every other axis."""
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    out = np.empty_like(flat)
    for k in range(c):
        col = flat[:, k]
        out[:, k] = gamma[k] * (col - col.mean()) / np.sqrt(col.var() + eps) + beta[k]
    return out.reshape(x.shape)
