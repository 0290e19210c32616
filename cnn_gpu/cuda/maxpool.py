"""2-D max pooling on the GPU, channels-last: the kernels of kernels/maxpool2d.cu.

    y, argmax = max_pool2d_forward(x, pool, stride, padding)   # x (N, H, W, C)
    dx = max_pool2d_backward(dy, argmax, x.shape, pool, stride, padding)

`argmax` is the cache the backward needs: for each output, the row-major index
`kh * KW + kw` of the maximum inside its window (padded positions counted), uint8 when
KH*KW <= 256, else int32. Ties go to the first maximum and a NaN counts as the maximum,
as numpy.argmax over the flattened window does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy
from cnn_gpu.cuda import loader
from cnn_gpu.geometry import output_size, window_index_dtype

KERNEL_FILE = "maxpool2d.cu"
THREADS = 256          # threads per block (a multiple of 32)
MAX_BLOCKS_PER_SM = 32  # grid cap for the grid-stride loops

Pair = tuple[int, int]
_INDEX_CTYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int32): "int"}
# Index arithmetic: 32-bit whenever every flat index (plus one grid stride) fits, because
# 64-bit division is emulated on the GPU and made the kernels instruction-bound.
_OFFSET_TYPES = {"unsigned int": np.uint32, "unsigned long long": np.uint64}
KERNELS = ("max_pool2d_forward", "max_pool2d_backward", "max_pool2d_backward_scatter")
# Each thread step handles V channels: 16 bytes of floats (float4 / double2), else 1.
VECTOR_BYTES = 16


def argmax_dtype(pool: Pair) -> np.dtype:
    """uint8 when a window has at most 256 positions, else int32 (geometry.window_index_dtype)."""
    return window_index_dtype(*pool)


def vector_widths(dtype: Any) -> tuple[int, int]:
    """The channel-vector widths V compiled for a float dtype: 1 and 16 bytes' worth (4 or 2)."""
    return (1, VECTOR_BYTES // np.dtype(dtype).itemsize)


def name_expressions(dtype: Any) -> tuple[str, ...]:
    """Every template instantiation of maxpool2d.cu for one float dtype."""
    t = loader.ctype(dtype)
    return tuple(f"{kernel}<{t}, {index}, {offset}, {v}>"
                 for kernel in KERNELS
                 for index in _INDEX_CTYPES.values()
                 for offset in _OFFSET_TYPES
                 for v in vector_widths(dtype))


def _offset_type(*arrays: Any) -> str:
    """'unsigned int' when the largest flat index plus a grid stride stays below 2**32."""
    largest = max(a.size for a in arrays)
    return "unsigned int" if largest + 2**26 < 2**32 else "unsigned long long"


def _vector_width(c: int, *arrays: Any) -> int:
    """Channels per thread step for arrays (..., C) whose first is the float one.

    The wide V of `vector_widths` when C % V == 0 and every array's address is a multiple of
    V of its elements -- then every vector the kernel touches (starting at pixel * C + k * V)
    is aligned for its vector load or store; else 1. CuPy's allocations are 256-byte aligned,
    so only views with an offset fall back.
    """
    v = vector_widths(arrays[0].dtype)[1]
    aligned = all(a.data.ptr % (v * a.itemsize) == 0 for a in arrays)
    return v if c % v == 0 and aligned else 1


def _kernel(kernel: str, dtype: np.dtype, index_dtype: np.dtype, offset: str, v: int) -> Any:
    module = loader.load_module(KERNEL_FILE, name_expressions(dtype))
    return module.get_function(
        f"{kernel}<{loader.ctype(dtype)}, {_INDEX_CTYPES[index_dtype]}, {offset}, {v}>")


def _check_geometry(shape: tuple[int, ...], pool: Pair, stride: Pair, padding: Pair) -> Pair:
    """Validate the window against an (N, H, W, C) shape; return (OH, OW)."""
    if len(shape) != 4:
        raise ValueError(f"max pooling takes (N, H, W, C) arrays, got shape {tuple(shape)}")
    _, h, w, c = shape
    for name, pair, low in (("pool", pool, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if len(pair) != 2 or any(int(v) != v or v < low for v in pair):
            raise ValueError(f"{name} must be two ints >= {low}, got {pair}")
    if padding[0] > pool[0] // 2 or padding[1] > pool[1] // 2:
        raise ValueError(f"padding {padding} must be at most half the pool {pool}")
    if h + 2 * padding[0] < pool[0] or w + 2 * padding[1] < pool[1]:
        raise ValueError(f"pool {pool} is larger than the padded input {(h, w)} + 2*{padding}")
    oh = output_size(h, pool[0], stride[0], padding[0])
    ow = output_size(w, pool[1], stride[1], padding[1])
    if max(h, w, c, oh, ow) >= 2**31:
        raise ValueError(f"an axis of {tuple(shape)} does not fit the kernels' 32-bit sizes")
    return oh, ow


def _float_input(cupy: Any, a: Any, name: str) -> Any:
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    loader.ctype(a.dtype)  # TypeError unless float32/float64
    return cupy.ascontiguousarray(a)


def _launch(kernel: Any, total: int, offset: str, args: tuple) -> None:
    """Launch over `total` work items (channel vectors), one per thread per grid-stride step."""
    if total == 0:
        return
    blocks = min(-(-total // THREADS), MAX_BLOCKS_PER_SM * loader.current_sm_count())
    kernel((blocks,), (THREADS,), (*args[:3], _OFFSET_TYPES[offset](total), *args[3:]))


def _geometry_args(h: int, w: int, c: int, oh: int, ow: int,
                   pool: Pair, stride: Pair, padding: Pair) -> tuple:
    ints = (h, w, c, oh, ow, pool[0], pool[1], stride[0], stride[1], padding[0], padding[1])
    return tuple(np.int32(v) for v in ints)


def _forward_into(x: Any, y: Any, argmax: Any,
                  pool: Pair, stride: Pair, padding: Pair) -> None:
    """Run the forward kernel into preallocated contiguous y and argmax (N, OH, OW, C)."""
    n, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    offset = _offset_type(x, y)
    v = _vector_width(c, x, y, argmax)
    kernel = _kernel("max_pool2d_forward", x.dtype, argmax.dtype, offset, v)
    _launch(kernel, y.size // v, offset,
            (x, y, argmax) + _geometry_args(h, w, c, oh, ow, pool, stride, padding))


def windows_overlap(pool: Pair, stride: Pair) -> bool:
    return stride[0] < pool[0] or stride[1] < pool[1]


def windows_cover_input(h: int, w: int, pool: Pair, stride: Pair, padding: Pair) -> bool:
    """True when non-overlapping windows tile every input position (no zero-fill needed)."""
    oh, ow = output_size(h, pool[0], stride[0], padding[0]), output_size(w, pool[1], stride[1], padding[1])
    return stride == pool and padding == (0, 0) and oh * pool[0] == h and ow * pool[1] == w


def _backward_into(dy: Any, argmax: Any, dx: Any,
                   pool: Pair, stride: Pair, padding: Pair) -> None:
    """Run a backward kernel into a preallocated contiguous dx (N, H, W, C).

    Non-overlapping windows scatter from each output (dx zero-filled first unless the windows
    tile the input); overlapping ones gather at each input.
    """
    n, h, w, c = dx.shape
    _, oh, ow, _ = dy.shape
    offset = _offset_type(dx, dy)
    geometry = _geometry_args(h, w, c, oh, ow, pool, stride, padding)
    v = _vector_width(c, dy, argmax, dx)
    if windows_overlap(pool, stride):
        kernel = _kernel("max_pool2d_backward", dy.dtype, argmax.dtype, offset, v)
        _launch(kernel, dx.size // v, offset, (dy, argmax, dx) + geometry)
        return
    if not windows_cover_input(h, w, pool, stride, padding):
        dx.fill(0)
    kernel = _kernel("max_pool2d_backward_scatter", dy.dtype, argmax.dtype, offset, v)
    _launch(kernel, dy.size // v, offset, (dy, argmax, dx) + geometry)


def max_pool2d_forward(x: Any, pool: Pair, stride: Pair, padding: Pair) -> tuple[Any, Any]:
    """Max pooling. x (N, H, W, C) -> y (N, OH, OW, C) of x's dtype, argmax (N, OH, OW, C).

    pool, stride, padding: (h, w) int pairs, padding <= pool // 2 (padded positions are -inf).
    argmax: uint8 (KH*KW <= 256) or int32, the index kh*KW + kw of each window's maximum.
    """
    cupy = require_cupy()
    x = _float_input(cupy, x, "x")
    oh, ow = _check_geometry(x.shape, pool, stride, padding)
    n, _, _, c = x.shape
    y = cupy.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = cupy.empty((n, oh, ow, c), dtype=argmax_dtype(pool))
    _forward_into(x, y, argmax, pool, stride, padding)
    return y, argmax


def max_pool2d_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...],
                        pool: Pair, stride: Pair, padding: Pair) -> Any:
    """Gradient of max pooling. dy, argmax (N, OH, OW, C) -> dx (N, H, W, C) of dy's dtype.

    Each dy goes to the input position its window's argmax names (dropped if that is in the
    padding); overlapping windows add up, in a fixed order (deterministic, no atomics).
    """
    cupy = require_cupy()
    dy = _float_input(cupy, dy, "dy")
    x_shape = tuple(int(v) for v in x_shape)
    oh, ow = _check_geometry(x_shape, pool, stride, padding)
    n, h, w, c = x_shape
    if dy.shape != (n, oh, ow, c):
        raise ValueError(f"dy has shape {dy.shape}, expected {(n, oh, ow, c)} for x {x_shape}")
    if not isinstance(argmax, cupy.ndarray) or argmax.shape != dy.shape:
        raise ValueError(f"argmax must be a cupy.ndarray of shape {dy.shape}")
    if argmax.dtype != argmax_dtype(pool):
        raise TypeError(f"argmax for pool {pool} must be {argmax_dtype(pool)}, got {argmax.dtype}")
    argmax = cupy.ascontiguousarray(argmax)
    dx = cupy.empty(x_shape, dtype=dy.dtype)
    _backward_into(dy, argmax, dx, pool, stride, padding)
    return dx
