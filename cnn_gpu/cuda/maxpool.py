"""2-D max pooling on the GPU, channels-last: the kernels of kernels/maxpool2d.cu.

    out_hw = window.output_hw(h, w, "max_pool2d", ceil_mode)  # window: a geometry.Window
    y, argmax = max_pool2d_forward(x, window, out_hw)         # x (N, H, W, C)
    y = max_pool2d(x, window, out_hw)                         # evaluation
    dx = max_pool2d_backward(dy, argmax, x.shape, window)

The calls of cnn_gpu.cpu.maxpool, which functional.pool makes after checking the arguments
(kernel, stride, padding at most half the kernel, dilation, the output size); here only what the
kernels need is checked: CuPy float arrays, shapes that agree, sizes that fit their 32-bit ints.
Whatever the output size, the kernels read and write only inside the arrays. `argmax` is the cache
the backward needs: for each output, the row-major tap `kh * KW + kw` of the maximum inside its
window (taps outside the input counted), uint8 when KH*KW <= 256, else int32. Ties go to the first
maximum and a NaN counts as the maximum, as numpy.argmax over the flattened window does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy
from cnn_gpu.cuda import loader
from cnn_gpu.geometry import Window, window_index_dtype

KERNEL_FILE = "maxpool2d.cu"
THREADS = 256          # threads per block (a multiple of 32)
MAX_BLOCKS_PER_SM = 32  # grid cap for the grid-stride loops

_INDEX_CTYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int32): "int"}
# Index arithmetic: 32-bit whenever every flat index (plus one grid stride) fits, because
# 64-bit division is emulated on the GPU and made the kernels instruction-bound.
_OFFSET_TYPES = {"unsigned int": np.uint32, "unsigned long long": np.uint64}
KERNELS = ("max_pool2d_forward", "max_pool2d_backward", "max_pool2d_backward_scatter")
# Each thread step handles V channels: 16 bytes of floats (float4 / double2), else 1.
VECTOR_BYTES = 16


def argmax_dtype(window: Window) -> np.dtype:
    """uint8 when a window has at most 256 taps, else int32 (geometry.window_index_dtype)."""
    return window_index_dtype(window.kh, window.kw)


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


def _check_sizes(x_shape: tuple[int, ...], window: Any, out_hw: tuple[int, int]) -> None:
    """What the kernels need of the geometry: a Window, four axes, sizes that fit their 32-bit ints."""
    if not isinstance(window, Window):
        raise TypeError(f"max pooling takes a cnn_gpu.geometry.Window, got {type(window).__name__}")
    if len(x_shape) != 4:
        raise ValueError(f"max pooling takes (N, H, W, C) arrays, got shape {tuple(x_shape)}")
    if max(*x_shape[1:], *out_hw) >= 2**31:
        raise ValueError(f"an axis of {tuple(x_shape)} does not fit the kernels' 32-bit sizes")


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


def _geometry_args(h: int, w: int, c: int, oh: int, ow: int, window: Window) -> tuple:
    """H, W, C, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW: the kernels' int arguments, in their order
    (a Window's fields are KH, KW, SH, SW, PH, PW, DH, DW)."""
    return tuple(np.int32(v) for v in (h, w, c, oh, ow, *window))


def _forward_into(x: Any, y: Any, argmax: Any, window: Window) -> None:
    """Run the forward kernel into preallocated contiguous y and argmax (N, OH, OW, C)."""
    n, h, w, c = x.shape
    _, oh, ow, _ = y.shape
    offset = _offset_type(x, y)
    v = _vector_width(c, x, y, argmax)
    kernel = _kernel("max_pool2d_forward", x.dtype, argmax.dtype, offset, v)
    _launch(kernel, y.size // v, offset, (x, y, argmax) + _geometry_args(h, w, c, oh, ow, window))


def windows_overlap(window: Window) -> bool:
    """Whether two windows can share an input: a stride shorter than the dilated kernel."""
    return window.sh <= window.dh * (window.kh - 1) or window.sw <= window.dw * (window.kw - 1)


def windows_cover_input(h: int, w: int, window: Window, oh: int, ow: int) -> bool:
    """Whether the taps of OH x OW windows reach every input position (no zero-fill needed):
    undilated windows side by side (stride == kernel) from the top left, to the far edges."""
    return (window.dh == window.dw == 1 and (window.sh, window.sw) == (window.kh, window.kw)
            and (oh - 1) * window.sh - window.ph + window.kh >= h
            and (ow - 1) * window.sw - window.pw + window.kw >= w)


def _backward_into(dy: Any, argmax: Any, dx: Any, window: Window) -> None:
    """Run a backward kernel into a preallocated contiguous dx (N, H, W, C).

    Non-overlapping windows scatter from each output (dx zero-filled first unless the windows
    cover the input); overlapping ones gather at each input.
    """
    n, h, w, c = dx.shape
    _, oh, ow, _ = dy.shape
    offset = _offset_type(dx, dy)
    geometry = _geometry_args(h, w, c, oh, ow, window)
    v = _vector_width(c, dy, argmax, dx)
    if windows_overlap(window):
        kernel = _kernel("max_pool2d_backward", dy.dtype, argmax.dtype, offset, v)
        _launch(kernel, dx.size // v, offset, (dy, argmax, dx) + geometry)
        return
    if not windows_cover_input(h, w, window, oh, ow):
        dx.fill(0)
    kernel = _kernel("max_pool2d_backward_scatter", dy.dtype, argmax.dtype, offset, v)
    _launch(kernel, dy.size // v, offset, (dy, argmax, dx) + geometry)


def max_pool2d_forward(x: Any, window: Window, out_hw: tuple[int, int]) -> tuple[Any, Any]:
    """Max pooling. x (N, H, W, C) -> y (N, OH, OW, C) of x's dtype, argmax (N, OH, OW, C).

    out_hw: (OH, OW), geometry's output size for the window. Taps outside the input count as
    -inf. argmax: uint8 (KH*KW <= 256) or int32, the tap kh*KW + kw of each window's maximum.
    """
    cupy = require_cupy()
    x = _float_input(cupy, x, "x")
    oh, ow = (int(v) for v in out_hw)
    _check_sizes(x.shape, window, (oh, ow))
    n, _, _, c = x.shape
    y = cupy.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = cupy.empty((n, oh, ow, c), dtype=argmax_dtype(window))
    _forward_into(x, y, argmax, window)
    return y, argmax


def max_pool2d(x: Any, window: Window, out_hw: tuple[int, int]) -> Any:
    """Max pooling for evaluation: max_pool2d_forward's y (the kernel writes the argmax anyway)."""
    return max_pool2d_forward(x, window, out_hw)[0]


def max_pool2d_backward(dy: Any, argmax: Any, x_shape: tuple[int, ...], window: Window) -> Any:
    """Gradient of max pooling. dy, argmax (N, OH, OW, C) -> dx (N, H, W, C) of dy's dtype.

    Each dy goes to the input position its window's argmax names (dropped if that is outside
    the input); overlapping windows add up, by ascending tap (deterministic, no atomics).
    """
    cupy = require_cupy()
    dy = _float_input(cupy, dy, "dy")
    x_shape = tuple(int(v) for v in x_shape)
    if dy.ndim != 4 or len(x_shape) != 4 or (dy.shape[0], dy.shape[3]) != (x_shape[0], x_shape[3]):
        raise ValueError(f"dy has shape {dy.shape}, expected (N, OH, OW, C) with N, C of x {x_shape}")
    _check_sizes(x_shape, window, dy.shape[1:3])
    if not isinstance(argmax, cupy.ndarray) or argmax.shape != dy.shape:
        raise ValueError(f"argmax must be a cupy.ndarray of dy's shape {dy.shape}")
    if argmax.dtype != argmax_dtype(window):
        raise TypeError(f"argmax for a {window.kh}x{window.kw} window must be {argmax_dtype(window)}, "
                        f"got {argmax.dtype}")
    argmax = cupy.ascontiguousarray(argmax)
    dx = cupy.empty(x_shape, dtype=dy.dtype)
    _backward_into(dy, argmax, dx, window)
    return dx
