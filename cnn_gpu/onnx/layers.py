"""The layers an ONNX import needs beyond cnn_gpu.layers, each with its forward/backward pair.

    Pad2D(pads, value)            constant padding of (N, H, W, C), any amount on each side: the
                                  asymmetric pads of a convolution or a pool (SAME_UPPER), and ONNX's Pad
    ChannelAffine(C, scale, shift) y = x * scale + shift per channel (the last axis): Mul, Add, Sub, Div
                                  by constants; trainable, and folded into the convolution before it
                                  in evaluation (cnn_gpu.plan), like a batch norm
    Reshape(shape)                (N, ...) -> (N, *shape): a vector back to a (1, 1, C) image

They are ordinary layers: configs name them (cnn_gpu.config.LAYER_TYPES), optimizers train them,
they run on NumPy and CuPy alike (the array module comes from the input), and cnn_gpu.onnx
exports them. Importing this module needs no onnx package.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from ..geometry import check_float, check_rank
from ..layers import Layer, Parameter, Shape

# ---- padding --------------------------------------------------------------------------------------


class Pads(NamedTuple):
    """Rows added above and below, columns added left and right."""

    top: int
    bottom: int
    left: int
    right: int


def pad2d_forward(x: Any, pads: Pads, value: float = 0.0) -> tuple[Any, Pads]:
    """x (N, H, W, C) -> y (N, top + H + bottom, left + W + right, C), `value` around x; cache = pads."""
    check_float(x, "pad2d")
    check_rank(x, 4, "pad2d", "(N, H, W, C)")
    n, h, w, c = x.shape
    xp = get_array_module(x)
    y = xp.full((n, pads.top + h + pads.bottom, pads.left + w + pads.right, c), value, dtype=x.dtype)
    y[:, pads.top:pads.top + h, pads.left:pads.left + w, :] = x
    return y, pads


def pad2d_backward(dy: Any, cache: Pads) -> Any:
    """dy (N, Hp, Wp, C) -> dx (N, H, W, C): the interior, copied (the padding has no input)."""
    t, b, left, r = cache
    xp = get_array_module(dy)
    return xp.ascontiguousarray(dy[:, t:dy.shape[1] - b, left:dy.shape[2] - r, :])


class Pad2D(Layer):
    """Constant padding of (N, H, W, C) images: pads = (top, bottom, left, right) >= 0, filled with
    `value` (0 before a convolution or an average pool, -inf before a max pool)."""

    def __init__(self, pads: Sequence[int], value: float = 0.0) -> None:
        super().__init__()
        if len(pads) != 4 or any(int(p) != p or p < 0 for p in pads):
            raise ValueError(f"Pad2D: pads must be four integers (top, bottom, left, right) >= 0, got {pads!r}")
        self.pads, self.value = Pads(*(int(p) for p in pads)), float(value)

    def forward(self, x: Any) -> Any:
        y, self._cache = pad2d_forward(x, self.pads, self.value)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = pad2d_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return dx

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"{self!r}: expected an (H, W, C) input, got {input_shape}")
        h, w, c = input_shape
        t, b, left, r = self.pads
        return (t + h + b, left + w + r, c)

    def get_config(self) -> dict[str, Any]:
        return {"pads": list(self.pads), "value": self.value}

    def __repr__(self) -> str:
        value = "" if self.value == 0 else f", value={self.value:g}"
        return f"Pad2D({tuple(self.pads)}{value})"


# ---- per-channel scale and shift --------------------------------------------------------------------


class AffineCache(NamedTuple):
    x: Any  # the input, for the scale's gradient (None without a scale)
    scale: Any  # (C,) or None


def channel_affine_forward(x: Any, scale: Any | None, shift: Any | None) -> tuple[Any, AffineCache]:
    """x (..., C) -> y = x * scale + shift, scale and shift (C,) or None (none: 1 and 0)."""
    check_float(x, "channel_affine")
    if scale is None and shift is None:
        raise ValueError("channel_affine: needs a scale, a shift, or both")
    y = x if scale is None else x * scale
    if shift is not None:
        y = y + shift
    return y, AffineCache(x if scale is not None else None, scale)


def channel_affine_backward(dy: Any, cache: AffineCache, need_dx: bool = True) -> tuple[Any, Any, Any]:
    """dy (..., C) -> (dx, dscale, dshift): dx = dy * scale, dscale = sum(dy * x), dshift = sum(dy),
    the sums over every axis but the last (dscale None without a scale; dshift computed always,
    the caller drops it without a shift)."""
    axes = tuple(range(dy.ndim - 1))
    dshift = dy.sum(axis=axes)
    dscale = None if cache.scale is None else (dy * cache.x).sum(axis=axes)
    dx = None if not need_dx else (dy if cache.scale is None else dy * cache.scale)
    return dx, dscale, dshift


class ChannelAffine(Layer):
    """y = x * scale + shift per channel (the last axis) of any input (N, ..., C), with trainable
    scale (C,) and shift (C,); scale=False or shift=False leaves that parameter out."""

    def __init__(self, num_features: int, scale: bool = True, shift: bool = True, dtype: str = "float32") -> None:
        super().__init__()
        if not (scale or shift):
            raise ValueError("ChannelAffine: needs a scale, a shift, or both")
        self.num_features, self.dtype_name = int(num_features), np.dtype(dtype).name
        if scale:
            self.params["scale"] = Parameter(np.ones(num_features, dtype=dtype))
        if shift:
            self.params["shift"] = Parameter(np.zeros(num_features, dtype=dtype))

    def _data(self, name: str) -> Any:
        p = self.params.get(name)
        return None if p is None else p.data

    def forward(self, x: Any) -> Any:
        self._check_channels(x, self.num_features)
        y, self._cache = channel_affine_forward(x, self._data("scale"), self._data("shift"))
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx, dscale, dshift = channel_affine_backward(dy, self._cache, need_dx)
        self._set_grads(scale=dscale, shift=dshift if "shift" in self.params else None)
        return dx

    def affine_channels(self) -> int:
        return self.num_features

    def eval_affine(self) -> tuple[Any, Any]:
        like = next(iter(self.params.values())).data
        xp = get_array_module(like)
        scale, shift = self._data("scale"), self._data("shift")
        return (xp.ones_like(like) if scale is None else scale, xp.zeros_like(like) if shift is None else shift)

    def output_shape(self, input_shape: Shape) -> Shape:
        if not input_shape or input_shape[-1] != self.num_features:
            raise ValueError(f"{self!r}: expected {self.num_features} channels in the last axis, got {input_shape}")
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "scale": "scale" in self.params, "shift": "shift" in self.params,
                "dtype": self.dtype_name}

    def __repr__(self) -> str:
        parts = "".join(f", {k}=False" for k in ("scale", "shift") if k not in self.params)
        return f"ChannelAffine({self.num_features}{parts})"


# ---- reshape ----------------------------------------------------------------------------------------


def reshape_forward(x: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """x (N, ...) -> y (N, *shape) (one entry may be -1), a view of contiguous x; cache = x's shape."""
    return x.reshape(x.shape[0], *shape), x.shape


def reshape_backward(dy: Any, cache: tuple[int, ...]) -> Any:
    return dy.reshape(cache)


class Reshape(Layer):
    """(N, ...) -> (N, *shape) in the channels-last order of our arrays (one entry may be -1). An
    ONNX import uses it where the orders of NCHW and NHWC agree: (N, C) -> (N, 1, 1, C)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or any(s == 0 or s < -1 for s in self.shape) or self.shape.count(-1) > 1:
            raise ValueError(f"Reshape: shape must be positive sizes with at most one -1, got {shape!r}")

    def forward(self, x: Any) -> Any:
        y, self._cache = reshape_forward(x, self.shape)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = reshape_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return dx

    def output_shape(self, input_shape: Shape) -> Shape:
        size, known = int(np.prod(input_shape)), int(np.prod([s for s in self.shape if s != -1]))
        if -1 in self.shape and known and size % known == 0:
            return tuple(size // known if s == -1 else s for s in self.shape)
        if -1 not in self.shape and known == size:
            return self.shape
        raise ValueError(f"{self!r}: cannot reshape {input_shape} ({size} values per sample) to {self.shape}")

    def get_config(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"Reshape({self.shape})"
