"""Max and average pooling over the spatial axes of channels-last images.

    x (N, H, W, C) -> y (N, OH, OW, C),  OH = (H + 2*PH - KH) // SH + 1

Both CPU versions walk the KH*KW window offsets and do one vectorized pass over the
output per offset (no Python loop over the batch or pixels). Non-overlapping max pooling
(stride == pool, no padding: the usual 2x2/2) has a faster CPU path on a reshaped view, and,
when Numba is installed, compiled kernels (cnn_gpu/cpu/maxpool.py) of which that path is the
reference. On CuPy, max pooling runs the hand-written kernels in kernels/maxpool2d.cu; average
pooling is array code on both.

Tie rule for max pooling: the gradient goes to the FIRST maximum of the window in
row-major (kh, kw) order -- the element numpy.argmax picks from the flattened window.
A NaN counts as a maximum. The CUDA kernel follows the same rule, so routing is identical.
"""
from __future__ import annotations

from typing import Any

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..geometry import Window, check_float, check_rank, output_size, pad_hw, pair, window_index_dtype

POOL_CHUNK_BYTES = 1 << 20  # input per chunk of images: 1 MiB measured best (256 KiB and 4 MiB tried)


def _compiled(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> bool:
    """Whether cnn_gpu.cpu.maxpool takes this pooling: NumPy x, non-overlapping windows, no padding."""
    return (sh, sw) == (kh, kw) and ph == pw == 0 and cpu.runs_on(x)


def _not_yet(dilation: Any, ceil_mode: bool) -> None:
    if pair(dilation, "dilation") != (1, 1) or ceil_mode:
        raise NotImplementedError("pooling: dilation, ceil_mode and count_include_pad=False are not implemented yet")


def _pool_geometry(x: Any, pool_size, stride, padding, op: str):
    check_float(x, op)
    check_rank(x, 4, op, "(N, H, W, C)")
    kh, kw = pair(pool_size, "pool_size")
    sh, sw = pair(pool_size if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding must be at most half the pool size, got padding "
                         f"({ph}, {pw}) for pool ({kh}, {kw})")
    oh = output_size(x.shape[1], kh, sh, ph, op=op, axis="height")
    ow = output_size(x.shape[2], kw, sw, pw, op=op, axis="width")
    return (kh, kw), (sh, sw), (ph, pw), oh, ow


def max_pool2d(x: Any, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, dilation: Any = 1, ceil_mode: bool = False) -> Any:
    """x (N, H, W, C) -> y (N, OH, OW, C): max pooling for evaluation, with no argmax and no cache.

    The same y as max_pool2d_forward (a NaN in a window gives NaN). On NumPy: a running
    np.maximum over the KH*KW offsets, a chunk of images at a time so that the running maximum
    stays in cache (one pass per offset instead of the forward's three).
    """
    _not_yet(dilation, ceil_mode)
    (kh, kw), (sh, sw), (ph, pw), oh, ow = _pool_geometry(x, kernel_size, stride, padding, "max_pool2d")
    if is_cupy_array(x):
        return max_pool2d_forward(x, (kh, kw), (sh, sw), (ph, pw))[0]
    if _compiled(x, kh, kw, sh, sw, ph, pw):
        from ..cpu import maxpool
        return maxpool.max_pool2d(x, kh, kw)
    xp = get_array_module(x)
    xpad = pad_hw(x, Window(kh, kw, sh, sw, ph, pw), value=-xp.inf)
    y = xp.empty((x.shape[0], oh, ow, x.shape[3]), dtype=x.dtype)
    per = max(1, POOL_CHUNK_BYTES // max(x[:1].nbytes, 1))
    for i in range(0, x.shape[0], per):
        part = slice(i, i + per)
        xp.copyto(y[part], xpad[part][Window(kh, kw, sh, sw).tap(0, 0, oh, ow)])
        for k in range(1, kh * kw):
            xp.maximum(y[part], xpad[part][Window(kh, kw, sh, sw).tap(k // kw, k % kw, oh, ow)], out=y[part])
    return y


def max_pool2d_forward(x: Any, kernel_size: int | tuple[int, int] = 2,
                       stride: int | tuple[int, int] | None = None,
                       padding: int | tuple[int, int] = 0, dilation: Any = 1, ceil_mode: bool = False) -> tuple[Any, tuple]:
    """x (N, H, W, C) -> y (N, OH, OW, C), cache. stride defaults to pool_size; padding is -inf."""
    _not_yet(dilation, ceil_mode)
    (kh, kw), (sh, sw), (ph, pw), oh, ow = _pool_geometry(x, kernel_size, stride, padding, "max_pool2d")
    if is_cupy_array(x):
        from ..cuda import maxpool
        y, argmax = maxpool.max_pool2d_forward(x, (kh, kw), (sh, sw), (ph, pw))
    elif _compiled(x, kh, kw, sh, sw, ph, pw):
        from ..cpu import maxpool
        y, argmax = maxpool.max_pool2d_forward(x, kh, kw)
    else:
        y, argmax = _max_pool_numpy(x, kh, kw, sh, sw, ph, pw, oh, ow)
    return y, (argmax, x.shape, (kh, kw), (sh, sw), (ph, pw))


def _blocks(a: Any, kh: int, kw: int, oh: int, ow: int) -> Any:
    """(N, H, W, C) -> a view (N, OH, KH, OW, KW, C) of its non-overlapping windows (rows and
    columns past OH*KH, OW*KW left out). Splitting an axis in two is always a view, never a copy."""
    n, c = a.shape[0], a.shape[3]
    return a[:, :oh * kh, :ow * kw, :].reshape(n, oh, kh, ow, kw, c)


def _max_pool_blocks(x, kh, kw, oh, ow):
    """Non-overlapping windows, no padding: a running maximum over the KH*KW offsets.
    Returns None when the output holds a NaN (the general path's first-NaN rule applies).

    Per offset: one compare, one np.maximum, and a branch-free argmax update: the argmax is
    the LAST offset k that beat the running maximum (strictly: ties keep the first maximum),
    so argmax = max over k of k * better_k, two byte-wide passes. np.copyto(where=) / np.where
    on a random mask cost ~4x more (branch mispredictions). The batch goes in chunks of about
    POOL_CHUNK_BYTES of input, so that the running maximum and the masks stay in cache across
    the offsets (~1.4x at batch 256 on the seed network's first pool).
    """
    xp = get_array_module(x)
    n, c = x.shape[0], x.shape[3]
    v = _blocks(x, kh, kw, oh, ow)  # (N, OH, KH, OW, KW, C)
    y = xp.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = xp.zeros(y.shape, dtype=window_index_dtype(kh, kw))
    per = max(1, POOL_CHUNK_BYTES // max(x[:1].nbytes, 1))
    better = xp.empty((min(per, n), oh, ow, c), dtype=bool)
    for i in range(0, n, per):
        part = slice(i, min(i + per, n))
        y_part, argmax_part, better_part = y[part], argmax[part], better[:part.stop - part.start]
        xp.copyto(y_part, v[part, :, 0, :, 0, :])
        for k in range(1, kh * kw):
            vk = v[part, :, k // kw, :, k % kw, :]
            xp.greater(vk, y_part, out=better_part)
            xp.maximum(y_part, vk, out=y_part)
            xp.maximum(argmax_part, better_part * argmax.dtype.type(k), out=argmax_part)
        if xp.isnan(y_part.max()):  # max propagates a NaN: one read of the chunk, in cache
            return None
    return y, argmax


def _max_pool_numpy(x, kh, kw, sh, sw, ph, pw, oh, ow):
    xp = get_array_module(x)
    if (sh, sw) == (kh, kw) and ph == pw == 0:
        found = _max_pool_blocks(x, kh, kw, oh, ow)
        if found is not None:  # None: a NaN, which needs the general path's first-NaN rule
            return found
    xpad = pad_hw(x, Window(kh, kw, sh, sw, ph, pw), value=-xp.inf)
    y = xpad[Window(kh, kw, sh, sw).tap(0, 0, oh, ow)].copy()
    argmax = xp.zeros(y.shape, dtype=window_index_dtype(kh, kw))
    y_is_nan = xp.isnan(y)
    for k in range(1, kh * kw):
        v = xpad[Window(kh, kw, sh, sw).tap(k // kw, k % kw, oh, ow)]
        # Strictly greater keeps the first maximum; a NaN beats anything but an earlier NaN.
        better = v > y
        v_is_nan = xp.isnan(v)
        if v_is_nan.any():
            better |= v_is_nan & ~y_is_nan
            y_is_nan |= v_is_nan
        xp.copyto(y, v, where=better)
        xp.copyto(argmax, k, where=better, casting="unsafe")
    return y, argmax


def max_pool2d_backward(dy: Any, cache: tuple) -> Any:
    """dy (N, OH, OW, C) -> dx (N, H, W, C): each gradient goes to its window's argmax."""
    argmax, x_shape, (kh, kw), (sh, sw), (ph, pw) = cache
    if is_cupy_array(dy):
        from ..cuda import maxpool
        return maxpool.max_pool2d_backward(dy, argmax, x_shape, (kh, kw), (sh, sw), (ph, pw))
    if _compiled(dy, kh, kw, sh, sw, ph, pw):
        from ..cpu import maxpool
        return maxpool.max_pool2d_backward(dy, argmax, x_shape, kh, kw)
    xp = get_array_module(dy)
    n, h, w, c = x_shape
    oh, ow = dy.shape[1], dy.shape[2]
    if (sh, sw) == (kh, kw) and ph == pw == 0:
        # Non-overlapping windows: every element of dx belongs to at most one window, so each
        # offset's gradient is written straight into its slot (dy * mask: branch-free, unlike
        # np.where) and nothing is summed; only rows/columns no window covers are zeroed.
        dx = xp.empty(x_shape, dtype=dy.dtype)
        dx[:, oh * kh:] = 0
        dx[:, :, ow * kw:] = 0
        v = _blocks(dx, kh, kw, oh, ow)
        for k in range(kh * kw):
            xp.multiply(dy, argmax == k, out=v[:, :, k // kw, :, k % kw, :])
        return dx
    dxpad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dy.dtype)
    for k in range(kh * kw):
        # += so that overlapping windows (stride < pool) add up, in a fixed order.
        dxpad[Window(kh, kw, sh, sw).tap(k // kw, k % kw, oh, ow)] += xp.where(argmax == k, dy, 0)
    return dxpad[:, ph:ph + h, pw:pw + w, :] if (ph or pw) else dxpad


def avg_pool2d_forward(x: Any, kernel_size: int | tuple[int, int] = 2,
                       stride: int | tuple[int, int] | None = None,
                       padding: int | tuple[int, int] = 0, ceil_mode: bool = False,
                       count_include_pad: bool = True) -> tuple[Any, tuple]:
    """x (N, H, W, C) -> y (N, OH, OW, C), cache.

    Padding counts as zeros in the average (every window divides by KH*KW), as PyTorch's
    default count_include_pad=True does.
    """
    _not_yet(1, ceil_mode or not count_include_pad)
    (kh, kw), (sh, sw), (ph, pw), oh, ow = _pool_geometry(x, kernel_size, stride, padding, "avg_pool2d")
    xpad = pad_hw(x, Window(kh, kw, sh, sw, ph, pw))
    y = xpad[Window(kh, kw, sh, sw).tap(0, 0, oh, ow)].copy()
    for k in range(1, kh * kw):
        y += xpad[Window(kh, kw, sh, sw).tap(k // kw, k % kw, oh, ow)]
    y *= y.dtype.type(1.0 / (kh * kw))
    return y, (x.shape, (kh, kw), (sh, sw), (ph, pw))


def avg_pool2d_backward(dy: Any, cache: tuple) -> Any:
    """dy (N, OH, OW, C) -> dx (N, H, W, C): each gradient spread evenly over its window."""
    x_shape, (kh, kw), (sh, sw), (ph, pw) = cache
    xp = get_array_module(dy)
    n, h, w, c = x_shape
    oh, ow = dy.shape[1], dy.shape[2]
    share = dy * dy.dtype.type(1.0 / (kh * kw))
    dxpad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dy.dtype)
    for k in range(kh * kw):
        dxpad[Window(kh, kw, sh, sw).tap(k // kw, k % kw, oh, ow)] += share
    return dxpad[:, ph:ph + h, pw:pw + w, :] if (ph or pw) else dxpad


def global_avg_pool2d_forward(x: Any) -> tuple[Any, tuple[int, ...]]:
    """x (N, H, W, C) -> y (N, C), the mean over each image's H*W positions; cache = x's shape."""
    check_float(x, "global_avg_pool2d")
    check_rank(x, 4, "global_avg_pool2d", "(N, H, W, C)")
    n, h, w, c = x.shape
    return x.reshape(n, h * w, c).mean(axis=1), tuple(x.shape)


def global_avg_pool2d_backward(dy: Any, cache: tuple[int, ...]) -> Any:
    """dy (N, C) -> dx (N, H, W, C): each position gets dy / (H*W)."""
    xp = get_array_module(dy)
    n, h, w, c = cache
    return xp.broadcast_to((dy * dy.dtype.type(1.0 / (h * w)))[:, None, None, :], cache).copy()
