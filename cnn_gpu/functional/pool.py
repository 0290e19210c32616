"""Max, average and global average pooling over the spatial axes of channels-last images.

    max_pool2d_forward, avg_pool2d_forward:  x (N, H, W, C) -> y (N, OH, OW, C)
    global_avg_pool2d_forward:               x (N, H, W, C) -> y (N, C)

The arguments are PyTorch's (torch.nn.functional.max_pool2d / avg_pool2d), so that a PyTorch or
ONNX model maps onto them argument by argument. A window has kernel_size taps, moves by stride
(default: kernel_size) over the input padded by `padding` on each side (at most half the kernel),
and its taps lie `dilation` apart (max pooling only). Window (oh, ow) reads tap (kh, kw) at input
position (oh*SH - PH + kh*DH, ow*SW - PW + kw*DW). Output sizes are geometry.output_size's, in
floor or ceil mode; in ceil mode a last window may reach past the padded input, and the taps it
reads there count as padding.

- Max pooling pads with -inf.
- Average pooling sums the window's input values and divides by, with count_include_pad=True,
  the window clipped to the padded input, (min(h0 + KH, H + PH) - h0) * (the same across), h0 =
  oh*SH - PH: KH*KW but for a ceil-mode window that reaches past the padding (PyTorch's rule);
  with count_include_pad=False, the number of input positions in the window.
- Global average pooling is the mean over all H x W positions, for any H and W.

Tie rule for max pooling: the gradient goes to the FIRST maximum of the window in row-major
(kh, kw) order -- the element numpy.argmax picks from the flattened window, padding included.
A NaN counts as a maximum (the first NaN wins). Every implementation follows this rule, so the
routing is identical on every path; and where windows overlap, every path adds the gradients an
input receives in the same order, by ascending tap index k = kh*KW + kw.

Max pooling runs one of four paths, chosen in one place (`_max_pool_path`), each with the same
three calls (forward, evaluation, backward):
- plain: the reference, one pass over the padded input per tap (Window.tap); it runs wherever
  nothing faster applies;
- blocks: NumPy, for windows that tile the input (stride == kernel, no padding or dilation: the
  usual 2x2/2), branch-free passes over a reshaped view;
- compiled: cnn_gpu.cpu.maxpool (Numba) on NumPy arrays, every geometry;
- cuda: cnn_gpu.cuda.maxpool (kernels/maxpool2d.cu) on CuPy arrays, every geometry.
Average and global average pooling are array code on both backends: the same order of sums on
every run, and no atomics.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..geometry import (Window, check_float, check_pool_padding, check_rank, pad_hw, pair, unpad_hw,
                        window_index_dtype)

POOL_CHUNK_BYTES = 1 << 20  # input per chunk of images: 1 MiB measured best (256 KiB and 4 MiB tried)

IntPair = int | tuple[int, int]


class MaxPoolCache(NamedTuple):
    """What max_pool2d_backward needs from the forward."""

    argmax: Any                   # (N, OH, OW, C) window_index_dtype: the tap kh*KW + kw of each maximum
    x_shape: tuple[int, ...]      # (N, H, W, C)
    window: Window


class AvgPoolCache(NamedTuple):
    """What avg_pool2d_backward needs from the forward."""

    x_shape: tuple[int, ...]      # (N, H, W, C)
    window: Window
    divisor: Any                  # (OH, OW, 1) of x's dtype: what each output's sum was divided by


class GlobalAvgPoolCache(NamedTuple):
    """What global_avg_pool2d_backward needs from the forward."""

    x_shape: tuple[int, ...]      # (N, H, W, C)


def _pool_window(x: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                 op: str) -> tuple[Window, tuple[int, int]]:
    """Check x and the window's arguments; return the window and (OH, OW)."""
    check_float(x, op)
    check_rank(x, 4, op, "(N, H, W, C)")
    kernel = pair(kernel_size, "kernel_size")
    window = Window(*kernel, *(kernel if stride is None else pair(stride, "stride")), *pair(padding, "padding"),
                    *pair(dilation, "dilation"))
    check_pool_padding((window.ph, window.pw), (window.kh, window.kw), op)
    return window, window.output_hw(x.shape[1], x.shape[2], op, ceil_mode)


def _check_dy(dy: Any, expected: tuple[int, ...], op: str) -> None:
    if tuple(dy.shape) != tuple(expected):
        raise ValueError(f"{op}: dy must have the forward's output shape {tuple(expected)}, "
                         f"got {tuple(dy.shape)}")


def _taps(window: Window, first: int = 0) -> Iterator[tuple[int, int, int]]:
    """Each tap k = kh*KW + kw of the window from `first` on, with its (kh, kw), in ascending k."""
    return ((k, k // window.kw, k % window.kw) for k in range(first, window.taps))


# ---- max pooling: the plain version (the reference) ----------------------------------------------

def _plain_forward(x: Any, window: Window, out_hw: tuple[int, int]) -> tuple[Any, Any]:
    """x (N, H, W, C) -> y, argmax (N, OH, OW, C): one pass over the -inf padded input per tap."""
    xp = get_array_module(x)
    h, w = x.shape[1:3]
    oh, ow = out_hw
    xpad = pad_hw(x, window, window.padded_hw(h, w, oh, ow), value=-xp.inf)
    y = xpad[window.tap(0, 0, oh, ow)].copy()
    argmax = xp.zeros(y.shape, dtype=window_index_dtype(window.kh, window.kw))
    y_is_nan = xp.isnan(y)
    for k, i, j in _taps(window, first=1):
        v = xpad[window.tap(i, j, oh, ow)]
        better = v > y  # strictly greater: a tie keeps the first maximum
        v_is_nan = xp.isnan(v)
        if v_is_nan.any():  # a NaN beats anything but an earlier NaN
            better |= v_is_nan & ~y_is_nan
            y_is_nan |= v_is_nan
        xp.copyto(y, v, where=better)
        xp.copyto(argmax, k, where=better, casting="unsafe")
    return y, argmax


def _plain_infer(x: Any, window: Window, out_hw: tuple[int, int]) -> Any:
    """x (N, H, W, C) -> y (N, OH, OW, C) with no argmax: a running maximum over the taps, a chunk
    of images at a time so that it stays in cache (one pass per tap instead of the forward's
    three). np.maximum propagates a NaN, so y is the forward's."""
    xp = get_array_module(x)
    n, h, w, c = x.shape
    oh, ow = out_hw
    xpad = pad_hw(x, window, window.padded_hw(h, w, oh, ow), value=-xp.inf)
    y = xp.empty((n, oh, ow, c), dtype=x.dtype)
    per = max(1, POOL_CHUNK_BYTES // max(x[:1].nbytes, 1))
    for start in range(0, n, per):
        part = slice(start, start + per)
        xpad_part, y_part = xpad[part], y[part]
        xp.copyto(y_part, xpad_part[window.tap(0, 0, oh, ow)])
        for _, i, j in _taps(window, first=1):
            xp.maximum(y_part, xpad_part[window.tap(i, j, oh, ow)], out=y_part)
    return y


def _plain_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...], window: Window) -> Any:
    """dy, argmax (N, OH, OW, C) -> dx (N, H, W, C): each dy to its window's argmax tap; one pass per
    tap k in ascending order, which is the order overlapping windows' gradients add up in."""
    xp = get_array_module(dy)
    n, h, w, c = x_shape
    oh, ow = dy.shape[1:3]
    dxpad = xp.zeros((n, *window.padded_hw(h, w, oh, ow), c), dtype=dy.dtype)
    for k, i, j in _taps(window):
        dxpad[window.tap(i, j, oh, ow)] += xp.where(argmax == k, dy, 0)
    return unpad_hw(dxpad, window, h, w)  # what reached the padding drops out


# ---- max pooling: windows that tile the input, on NumPy --------------------------------------------

def _windows_tile(window: Window, h: int, w: int, oh: int, ow: int) -> bool:
    """Non-overlapping windows side by side from the top left corner, all inside the input
    (stride == kernel, no padding, no dilation, no ceil-mode window past the edge)."""
    kh, kw, sh, sw, ph, pw, dh, dw = window
    return sh == kh and sw == kw and ph == pw == 0 and dh == dw == 1 and oh * kh <= h and ow * kw <= w


def _blocks(a: Any, kh: int, kw: int, oh: int, ow: int) -> Any:
    """(N, H, W, C) -> a view (N, OH, KH, OW, KW, C) of its tiling windows (rows and columns past
    OH*KH, OW*KW left out). Splitting an axis in two is always a view, never a copy."""
    n, c = a.shape[0], a.shape[3]
    return a[:, :oh * kh, :ow * kw, :].reshape(n, oh, kh, ow, kw, c)


def _blocks_forward(x: Any, window: Window, out_hw: tuple[int, int]) -> tuple[Any, Any]:
    """The plain forward's y and argmax for tiling windows, by a running maximum over the taps.

    Per tap: one compare, one np.maximum, and a branch-free argmax update: the argmax is the
    LAST tap k that beat the running maximum (strictly: ties keep the first maximum), so
    argmax = max over k of k * better_k, two byte-wide passes. np.copyto(where=) / np.where
    on a random mask cost several times more (branch mispredictions). The batch goes in chunks of about
    POOL_CHUNK_BYTES of input, so that the running maximum and the masks stay in cache across
    the taps. A NaN in the output hands over to the plain forward (its first-NaN rule).
    """
    xp = get_array_module(x)
    n, c = x.shape[0], x.shape[3]
    kh, kw = window.kh, window.kw
    oh, ow = out_hw
    v = _blocks(x, kh, kw, oh, ow)  # (N, OH, KH, OW, KW, C)
    y = xp.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = xp.zeros(y.shape, dtype=window_index_dtype(kh, kw))
    per = max(1, POOL_CHUNK_BYTES // max(x[:1].nbytes, 1))
    better = xp.empty((min(per, n), oh, ow, c), dtype=bool)
    for start in range(0, n, per):
        part = slice(start, min(start + per, n))
        y_part, argmax_part, better_part = y[part], argmax[part], better[:part.stop - part.start]
        xp.copyto(y_part, v[part, :, 0, :, 0, :])
        for k, i, j in _taps(window, first=1):
            vk = v[part, :, i, :, j, :]
            xp.greater(vk, y_part, out=better_part)
            xp.maximum(y_part, vk, out=y_part)
            xp.maximum(argmax_part, better_part * argmax.dtype.type(k), out=argmax_part)
        if xp.isnan(y_part.max()):  # max propagates a NaN: one read of the chunk, in cache
            return _plain_forward(x, window, out_hw)
    return y, argmax


def _blocks_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...], window: Window) -> Any:
    """The plain backward for tiling windows: every input belongs to at most one window, so each
    tap's gradient is written straight into its slot (dy * mask: branch-free, unlike np.where)
    and nothing is summed; only rows and columns no window covers are zeroed."""
    xp = get_array_module(dy)
    kh, kw = window.kh, window.kw
    oh, ow = dy.shape[1:3]
    dx = xp.empty(x_shape, dtype=dy.dtype)
    dx[:, oh * kh:] = 0
    dx[:, :, ow * kw:] = 0
    v = _blocks(dx, kh, kw, oh, ow)
    for k, i, j in _taps(window):
        xp.multiply(dy, argmax == k, out=v[:, :, i, :, j, :])
    return dx


# ---- max pooling: choosing the path ---------------------------------------------------------------

class _MaxPoolPath(NamedTuple):
    """A way to run max pooling: three calls, named as in cnn_gpu.cpu.maxpool and
    cnn_gpu.cuda.maxpool, which are paths too. They take the checked geometry: the window and the
    output size (OH, OW), floor or ceil mode's."""

    max_pool2d_forward: Callable[..., tuple[Any, Any]]  # (x, window, (OH, OW)) -> y, argmax
    max_pool2d: Callable[..., Any]                      # (x, window, (OH, OW)) -> y, for evaluation
    max_pool2d_backward: Callable[..., Any]             # (dy, argmax, x_shape, window) -> dx


_PLAIN = _MaxPoolPath(_plain_forward, _plain_infer, _plain_backward)
_BLOCKS = _MaxPoolPath(_blocks_forward, _plain_infer, _blocks_backward)


@functools.cache
def _kernels(backend: str) -> Any:
    """cnn_gpu.cuda.maxpool ('cuda') or cnn_gpu.cpu.maxpool ('compiled'): imported on first use, as
    CuPy and Numba are optional, and then looked up without running an import statement per call."""
    if backend == "cuda":
        from ..cuda import maxpool
    else:
        from ..cpu import maxpool
    return maxpool


def _max_pool_path(a: Any, window: Window, x_hw: tuple[int, int], out_hw: tuple[int, int]) -> Any:
    """How max pooling runs on `a` (x or dy): the one place that chooses. The CUDA kernels for
    CuPy arrays; the compiled CPU kernels for NumPy ones where they run; else NumPy code, the
    blocks for tiling windows, the plain version for the rest."""
    if is_cupy_array(a):
        return _kernels("cuda")
    if cpu.runs_on(a):
        return _kernels("compiled")
    if _windows_tile(window, *x_hw, *out_hw):
        return _BLOCKS
    return _PLAIN


# ---- max pooling: the ops -------------------------------------------------------------------------

def max_pool2d_forward(x: Any, kernel_size: IntPair = 2, stride: IntPair | None = None, padding: IntPair = 0,
                       dilation: IntPair = 1, ceil_mode: bool = False) -> tuple[Any, MaxPoolCache]:
    """x (N, H, W, C) -> y (N, OH, OW, C), cache: the maximum of each window (padding is -inf).

    kernel_size, stride (default kernel_size), padding (at most half the kernel), dilation: ints
    or (h, w) pairs; ceil_mode: round the output size up (see the module docstring).
    """
    window, out_hw = _pool_window(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    y, argmax = _max_pool_path(x, window, x.shape[1:3], out_hw).max_pool2d_forward(x, window, out_hw)
    return y, MaxPoolCache(argmax, x.shape, window)


def max_pool2d(x: Any, kernel_size: IntPair = 2, stride: IntPair | None = None, padding: IntPair = 0,
               dilation: IntPair = 1, ceil_mode: bool = False) -> Any:
    """x (N, H, W, C) -> y (N, OH, OW, C): max pooling for evaluation, with no argmax and no cache.
    The same y as max_pool2d_forward (a NaN in a window gives NaN)."""
    window, out_hw = _pool_window(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    return _max_pool_path(x, window, x.shape[1:3], out_hw).max_pool2d(x, window, out_hw)


def max_pool2d_backward(dy: Any, cache: MaxPoolCache) -> Any:
    """dy (N, OH, OW, C) -> dx (N, H, W, C): each gradient goes to its window's first maximum;
    where windows overlap, an input adds what it receives."""
    _check_dy(dy, cache.argmax.shape, "max_pool2d_backward")
    path = _max_pool_path(dy, cache.window, cache.x_shape[1:3], dy.shape[1:3])
    return path.max_pool2d_backward(dy, cache.argmax, cache.x_shape, cache.window)


# ---- average pooling ------------------------------------------------------------------------------

def _window_counts(size: int, kernel: int, stride: int, padding: int, out: int, count_include_pad: bool) -> Any:
    """Along one axis: how many positions each of the `out` windows averages (see the module
    docstring): (out,) ints."""
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)  # a ceil-mode window clipped to the padded input
    if not count_include_pad:
        start, end = np.maximum(start, 0), np.minimum(end, size)
    return end - start


def _avg_divisor(xp: Any, window: Window, h: int, w: int, oh: int, ow: int, count_include_pad: bool,
                 dtype: Any) -> Any:
    """(OH, OW, 1) of dtype: what the sum of each window is divided by."""
    rows = _window_counts(h, window.kh, window.sh, window.ph, oh, count_include_pad)
    cols = _window_counts(w, window.kw, window.sw, window.pw, ow, count_include_pad)
    return xp.asarray((rows[:, None] * cols[None, :])[:, :, None].astype(dtype))


def avg_pool2d_forward(x: Any, kernel_size: IntPair = 2, stride: IntPair | None = None, padding: IntPair = 0,
                       ceil_mode: bool = False, count_include_pad: bool = True) -> tuple[Any, AvgPoolCache]:
    """x (N, H, W, C) -> y (N, OH, OW, C), cache: the average of each window.

    kernel_size, stride (default kernel_size), padding (at most half the kernel): ints or (h, w)
    pairs. count_include_pad: divide by the window clipped to the padded input (PyTorch's default)
    rather than by the input positions in it. One pass over the zero-padded input per tap.
    """
    window, (oh, ow) = _pool_window(x, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d")
    xp = get_array_module(x)
    h, w = x.shape[1:3]
    xpad = pad_hw(x, window, window.padded_hw(h, w, oh, ow))  # zeros add nothing to the sums
    y = xpad[window.tap(0, 0, oh, ow)].copy()
    for _, i, j in _taps(window, first=1):
        y += xpad[window.tap(i, j, oh, ow)]
    divisor = _avg_divisor(xp, window, h, w, oh, ow, count_include_pad, x.dtype)
    y /= divisor
    return y, AvgPoolCache(x.shape, window, divisor)


def avg_pool2d_backward(dy: Any, cache: AvgPoolCache) -> Any:
    """dy (N, OH, OW, C) -> dx (N, H, W, C): each gradient, divided by its window's divisor, to
    every input position of the window (the padding's share drops out)."""
    n, h, w, c = cache.x_shape
    window, divisor = cache.window, cache.divisor
    oh, ow = divisor.shape[:2]
    _check_dy(dy, (n, oh, ow, c), "avg_pool2d_backward")
    xp = get_array_module(dy)
    share = dy / divisor
    dxpad = xp.zeros((n, *window.padded_hw(h, w, oh, ow), c), dtype=dy.dtype)
    for _, i, j in _taps(window):  # += : overlapping windows add up, in ascending tap order
        dxpad[window.tap(i, j, oh, ow)] += share
    return unpad_hw(dxpad, window, h, w)


# ---- global average pooling -----------------------------------------------------------------------

def global_avg_pool2d_forward(x: Any) -> tuple[Any, GlobalAvgPoolCache]:
    """x (N, H, W, C) -> y (N, C), cache: the mean of each image's channel over all H x W positions
    (PyTorch's adaptive_avg_pool2d(x, 1), flattened), for any H and W."""
    check_float(x, "global_avg_pool2d")
    check_rank(x, 4, "global_avg_pool2d", "(N, H, W, C)")
    if x.shape[1] * x.shape[2] == 0:
        raise ValueError(f"global_avg_pool2d: x must have at least one pixel, got shape {tuple(x.shape)}")
    # A reduction without atomics on both backends (CuPy's reduction kernels combine partial sums
    # in a fixed order): the same bits on every run.
    return x.mean(axis=(1, 2)), GlobalAvgPoolCache(x.shape)


def global_avg_pool2d_backward(dy: Any, cache: GlobalAvgPoolCache) -> Any:
    """dy (N, C) -> dx (N, H, W, C): each gradient spread evenly over its image's H x W positions."""
    n, h, w, c = cache.x_shape
    _check_dy(dy, (n, c), "global_avg_pool2d_backward")
    xp = get_array_module(dy)
    dx = xp.empty(cache.x_shape, dtype=dy.dtype)
    dx[...] = (dy / (h * w))[:, None, None, :]
    return dx
