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


def pool_loops(x, pool, stride, padding, reduce):
    """reduce is np.max or np.mean over each window; max pads with -inf, mean with 0."""
    (kh, kw), (sh, sw), (ph, pw) = pool, stride, padding
    fill = -np.inf if reduce is np.max else 0.0
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=fill)
    n, h, wd, c = x.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j, :] = reduce(x[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :], axis=(1, 2))
    return out


def max_pool_argmax_loops(x, pool, stride, padding):
    """Window argmax (kh*KW + kw) by numpy.argmax over each flattened window: the tie rule."""
    (kh, kw), (sh, sw), (ph, pw) = pool, stride, padding
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=-np.inf)
    n, h, wd, c = x.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, oh, ow, c), dtype=np.int64)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    out[b, i, j, ch] = np.argmax(x[b, i * sh:i * sh + kh, j * sw:j * sw + kw, ch].reshape(-1))
    return out


def batch_norm_loops(x, gamma, beta, eps):
    """The seed's batch_normalization, per channel over every other axis."""
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    out = np.empty_like(flat)
    for k in range(c):
        col = flat[:, k]
        out[:, k] = gamma[k] * (col - col.mean()) / np.sqrt(col.var() + eps) + beta[k]
    return out.reshape(x.shape)
