"""Sliding-window geometry and argument checks, shared by the ops (cnn_gpu.functional), their
compiled CPU kernels (cnn_gpu.cpu) and their CUDA launchers (cnn_gpu.cuda).

A leaf module: it imports NumPy and cnn_gpu.backend only, so each of those packages imports it
and none of them imports another for a size or a check.

A window along one axis has a kernel k, a stride s, a padding p (added at both ends) and a
dilation d (the gap between the taps it reads: its span is d*(k-1)+1). Output i reads the input
positions  i*s - p + j*d  for j = 0..k-1, and there are

    out = floor((size + 2p - d*(k-1) - 1) / s) + 1            (the default)
    out = ceil((size + 2p - d*(k-1) - 1) / s) + 1             (ceil_mode, pooling only)

outputs; in ceil mode a last window that would start inside the bottom (right) padding is
dropped, as PyTorch and ONNX do. A ceil-mode window may then reach past the padded input: the
positions it reads there count as padding (-inf for max pooling, outside the average for
average pooling without count_include_pad).

Layout is channels-last throughout: (N, H, W, C).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .backend import get_array_module

FLOAT_DTYPES = ("float32", "float64")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # compared as dtypes: dtype.name costs more than the op


# ---- arguments ------------------------------------------------------------------------------------

def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) pair of ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        h, w = value
    else:
        h = w = value
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
        raise TypeError(f"{name} must be integers, got {value!r}")
    return int(h), int(w)


def check_float(x: Any, op: str, name: str = "x") -> None:
    """Ops compute in float32 or float64: reject integer, bool and complex arrays up front."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype not in _FLOATS:
        got = dtype.name if dtype is not None else type(x).__name__
        raise TypeError(f"{op}: {name} must be a float32 or float64 array, got {got}")


def check_rank(x: Any, rank: int, op: str, layout: str, name: str = "x") -> None:
    """Reject arrays of the wrong rank with the layout the op expects, e.g. '(N, H, W, C)'."""
    if x.ndim != rank:
        raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got shape {tuple(x.shape)}")


# ---- one axis -------------------------------------------------------------------------------------

def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                ceil_mode: bool = False, op: str = "window", axis: str = "axis") -> int:
    """Outputs of a sliding window along one axis (see the module docstring); a ValueError naming
    the op and the axis when the window does not fit or an argument is out of range."""
    if kernel < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(f"{op}: kernel, stride and dilation must be >= 1 and padding >= 0, got kernel "
                         f"{kernel}, stride {stride}, dilation {dilation}, padding {padding} along {axis}")
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    if room < 0:
        extra = f" (+2*{padding} padding)" if padding else ""
        raise ValueError(f"{op}: input {axis} {size}{extra} is smaller than the window {span}"
                         + (f" ({kernel} taps dilated by {dilation})" if dilation > 1 else ""))
    if not ceil_mode:
        return room // stride + 1
    out = -(-room // stride) + 1
    if (out - 1) * stride >= size + padding:  # the last window would start in the bottom padding
        out -= 1
    return out


def check_pool_padding(padding: tuple[int, int], kernel: tuple[int, int], op: str) -> None:
    """Pooling pads at most half a window on each side (PyTorch's rule): a window of padding alone
    would have no input to pool."""
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{op}: padding must be at most half the pool size, got padding "
                         f"{padding} for pool {kernel}")


def window_index_dtype(kh: int, kw: int) -> np.dtype:
    """The dtype of max pooling's argmax, the index kh * KW + kw of a window's maximum: one byte
    when the window has at most 256 taps (a quarter of the memory of int32), else int32."""
    return np.dtype(np.uint8) if kh * kw <= 256 else np.dtype(np.int32)


# ---- two axes -------------------------------------------------------------------------------------

class Window(NamedTuple):
    """A 2-D window: kernel (kh, kw), stride (sh, sw), padding (ph, pw) on each side, dilation (dh, dw)."""

    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    ph: int = 0
    pw: int = 0
    dh: int = 1
    dw: int = 1

    @classmethod
    def of(cls, kernel: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> "Window":
        """From ints or (h, w) pairs, as the ops take them."""
        return cls(*pair(kernel, "kernel_size"), *pair(stride, "stride"), *pair(padding, "padding"),
                   *pair(dilation, "dilation"))

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    def output_hw(self, h: int, w: int, op: str, ceil_mode: bool = False) -> tuple[int, int]:
        """(OH, OW) for an (h, w) input."""
        return (output_size(h, self.kh, self.sh, self.ph, self.dh, ceil_mode, op, "height"),
                output_size(w, self.kw, self.sw, self.pw, self.dw, ceil_mode, op, "width"))

    def padded_hw(self, h: int, w: int, oh: int, ow: int) -> tuple[int, int]:
        """The padded input's (Hp, Wp) that OH x OW windows read: h + 2*ph, or more in ceil mode,
        where the last window may reach past the bottom (right) padding."""
        return (max(h + 2 * self.ph, (oh - 1) * self.sh + self.dh * (self.kh - 1) + 1),
                max(w + 2 * self.pw, (ow - 1) * self.sw + self.dw * (self.kw - 1) + 1))

    def read_extent(self, oh: int, ow: int) -> tuple[int, int]:
        """The rows and columns of the padded input that OH x OW outputs read (from the top left)."""
        return (oh - 1) * self.sh + self.dh * (self.kh - 1) + 1, (ow - 1) * self.sw + self.dw * (self.kw - 1) + 1

    def tap(self, i: int, j: int, oh: int, ow: int) -> tuple[slice, slice, slice, slice]:
        """The index, into a padded (N, Hp, Wp, C) array, of tap (i, j) of all OH x OW windows:
        a strided view (N, OH, OW, C)."""
        top, left = i * self.dh, j * self.dw
        return (slice(None), slice(top, top + self.sh * (oh - 1) + 1, self.sh),
                slice(left, left + self.sw * (ow - 1) + 1, self.sw), slice(None))


def pad_hw(x: Any, window: Window, padded_hw: tuple[int, int] | None = None, value: float = 0.0) -> Any:
    """x (N, H, W, C) -> (N, Hp, Wp, C) with `value` around it: ph rows on top and pw columns on the
    left, and enough at the bottom and right to reach padded_hw (default: ph and pw again).
    Returns x itself when there is nothing to pad."""
    n, h, w, c = x.shape
    hp, wp = padded_hw if padded_hw is not None else (h + 2 * window.ph, w + 2 * window.pw)
    if (hp, wp) == (h, w):
        return x
    out = get_array_module(x).full((n, hp, wp, c), value, dtype=x.dtype)
    out[:, window.ph:window.ph + h, window.pw:window.pw + w, :] = x
    return out


def unpad_hw(xpad: Any, window: Window, h: int, w: int) -> Any:
    """The (N, h, w, C) interior of a padded array (a view): pad_hw's adjoint for gradients."""
    if xpad.shape[1:3] == (h, w):
        return xpad
    return xpad[:, window.ph:window.ph + h, window.pw:window.pw + w, :]


def window_view(xpad: Any, window: Window, oh: int, ow: int) -> Any:
    """A strided view (N, OH, OW, KH, KW, C) of every window of a padded (N, Hp, Wp, C); no copy."""
    xp = get_array_module(xpad)
    sn, shh, sww, sc = xpad.strides
    n, c = xpad.shape[0], xpad.shape[3]
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(n, oh, ow, window.kh, window.kw, c),
        strides=(sn, shh * window.sh, sww * window.sw, shh * window.dh, sww * window.dw, sc))
