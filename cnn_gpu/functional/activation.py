"""Elementwise activations and dropout: shapes are unchanged, any rank."""
from __future__ import annotations

from typing import Any

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..geometry import check_float


def relu_forward(x: Any) -> tuple[Any, Any]:
    """y = max(x, 0). The cache is y itself: y > 0 exactly where the gradient passes."""
    check_float(x, "relu")
    xp = get_array_module(x)
    y = xp.maximum(x, 0)
    return y, y


def relu_backward(dy: Any, cache: Any) -> Any:
    """dx = dy where x > 0, else 0.

    dy * mask rather than where(mask, dy, 0): the same numbers for finite dy, ~8x faster on
    NumPy (np.where branches on each element and mispredicts half of a ReLU mask). A non-finite
    dy where x <= 0 gives NaN instead of 0; the step has diverged by then anyway. (The compiled
    kernel, cnn_gpu.cpu.elementwise, selects, and gives 0 there.)
    """
    if is_cupy_array(dy):  # one fused launch instead of a compare and a multiply
        from ..cuda import elementwise
        return elementwise.relu_backward(dy, cache)
    if cpu.runs_on(dy, cache) and dy.shape == cache.shape:  # one compiled pass, likewise
        from ..cpu import elementwise
        return elementwise.relu_backward(dy, cache)
    return dy * (cache > 0)


def dropout_forward(x: Any, p: float, training: bool, rng: Any) -> tuple[Any, Any]:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    At evaluation (training=False) or p == 0 it is the identity. `rng` is a
    numpy.random.Generator for NumPy arrays, or a cupy.random.Generator for CuPy arrays.
    The cache is the scaled mask (None for the identity).
    """
    check_float(x, "dropout")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dy: Any, cache: Any) -> Any:
    """dx = dy * mask (dy itself for the identity)."""
    return dy if cache is None else dy * cache
