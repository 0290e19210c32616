"""Elementwise activations and dropout: shapes are unchanged, any rank."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..cpu import threads
from ..geometry import check_float


def relu_forward(x: Any) -> tuple[Any, Any]:
    """y = max(x, 0). The cache is y itself: y > 0 exactly where the gradient passes."""
    check_float(x, "relu")
    xp = get_array_module(x)
    if xp is not np or x.ndim == 0:
        y = xp.maximum(x, 0)
        return y, y
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)  # in parts on cnn_gpu.cpu.threads
    threads.for_each(threads.split(flat_y.size, flat_y.itemsize), lambda s, _: relu_into(flat_x[s], flat_y[s]))
    return y, y


def relu_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = max(x, 0) for NumPy arrays of one shape (x may be out): the compiled loop of
    cnn_gpu.cpu.elementwise where it runs and both are C-contiguous, else np.maximum; the same
    values. The convolution's ReLU epilogue calls it too. Returns out."""
    if cpu.runs_on(x, out) and x.flags.c_contiguous and out.flags.c_contiguous:
        from ..cpu import elementwise
        return elementwise.relu(x, out)
    return np.maximum(x, 0, out=out)


def relu_backward(dy: Any, cache: Any) -> Any:
    """dx = dy where x > 0, else 0.

    dy * mask rather than where(mask, dy, 0): the same numbers for finite dy, much faster on
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


# The other activations ResNets, MobileNets and imported ONNX models use. Each caches what its
# backward needs: the input x, or its output y where the derivative is a function of y.

def leaky_relu_forward(x: Any, negative_slope: float = 0.01) -> tuple[Any, Any]:
    """y = x where x > 0, else negative_slope * x. The cache is x."""
    check_float(x, "leaky_relu")
    xp = get_array_module(x)
    return xp.where(x > 0, x, x * x.dtype.type(negative_slope)), x


def leaky_relu_backward(dy: Any, cache: Any, negative_slope: float = 0.01) -> Any:
    """dx = dy where x > 0, else negative_slope * dy."""
    xp = get_array_module(dy)
    return xp.where(cache > 0, dy, dy * dy.dtype.type(negative_slope))


def clip_forward(x: Any, low: float, high: float) -> tuple[Any, Any]:
    """y = min(max(x, low), high); ReLU6 is clip(x, 0, 6). The cache is x."""
    check_float(x, "clip")
    xp = get_array_module(x)
    return xp.clip(x, x.dtype.type(low), x.dtype.type(high)), x


def clip_backward(dy: Any, cache: Any, low: float, high: float) -> Any:
    """dx = dy where low < x < high, else 0 (the gradient of a clipped value is zero)."""
    return dy * ((cache > low) & (cache < high))


def sigmoid_forward(x: Any) -> tuple[Any, Any]:
    """y = 1 / (1 + exp(-x)), computed without overflow for large |x|. The cache is y."""
    check_float(x, "sigmoid")
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]: never overflows
    y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return y, y


def sigmoid_backward(dy: Any, cache: Any) -> Any:
    """dx = dy * y * (1 - y)."""
    return dy * cache * (1 - cache)


def tanh_forward(x: Any) -> tuple[Any, Any]:
    """y = tanh(x). The cache is y."""
    check_float(x, "tanh")
    y = get_array_module(x).tanh(x)
    return y, y


def tanh_backward(dy: Any, cache: Any) -> Any:
    """dx = dy * (1 - y^2)."""
    return dy * (1 - cache * cache)


def silu_forward(x: Any) -> tuple[Any, Any]:
    """y = x * sigmoid(x) (also called swish). The cache is (x, sigmoid(x))."""
    s, _ = sigmoid_forward(x)
    return x * s, (x, s)


def silu_backward(dy: Any, cache: Any) -> Any:
    """dx = dy * (s + x * s * (1 - s)), s = sigmoid(x)."""
    x, s = cache
    return dy * (s * (1 + x * (1 - s)))


def hard_sigmoid_forward(x: Any, alpha: float = 1 / 6, beta: float = 0.5) -> tuple[Any, Any]:
    """y = clip(alpha * x + beta, 0, 1). PyTorch's hardsigmoid is alpha = 1/6, beta = 1/2 (ONNX's
    HardSigmoid defaults to alpha = 0.2). The cache is x."""
    check_float(x, "hard_sigmoid")
    xp = get_array_module(x)
    t = x.dtype.type
    return xp.clip(x * t(alpha) + t(beta), t(0), t(1)), x


def hard_sigmoid_backward(dy: Any, cache: Any, alpha: float = 1 / 6, beta: float = 0.5) -> Any:
    """dx = alpha * dy where 0 < alpha * x + beta < 1, else 0."""
    t = dy.dtype.type
    z = cache * t(alpha) + t(beta)
    return dy * ((z > 0) & (z < 1)) * t(alpha)


def hard_swish_forward(x: Any) -> tuple[Any, Any]:
    """y = x * relu6(x + 3) / 6 (MobileNetV3's h-swish, PyTorch's hardswish). The cache is x."""
    check_float(x, "hard_swish")
    xp = get_array_module(x)
    t = x.dtype.type
    return x * xp.clip(x + t(3), t(0), t(6)) * t(1 / 6), x


def hard_swish_backward(dy: Any, cache: Any) -> Any:
    """dx = dy * (0 for x <= -3; (2x + 3) / 6 for -3 < x < 3; 1 for x >= 3), as PyTorch defines it."""
    xp = get_array_module(dy)
    t = dy.dtype.type
    x = cache
    slope = xp.where(x <= -3, t(0), xp.where(x >= 3, t(1), (2 * x + t(3)) * t(1 / 6)))
    return dy * slope


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
