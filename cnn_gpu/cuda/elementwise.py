"""Fused elementwise kernels (CuPy ElementwiseKernel) for the small per-step passes.

On the GPU a training step of the seed network is bound by kernel launches, not bytes: the
NumPy-style `v *= m; v += g; p -= lr * v` is three or four launches per parameter. Each
function here is one launch, and computes what its NumPy counterpart in cnn_gpu/optim.py or
cnn_gpu/functional/activation.py computes, up to the order of float rounding.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Any:
    cupy = require_cupy()
    params, body = _KERNELS[name]
    return cupy.ElementwiseKernel(*params, body, f"cnn_gpu_{name}")


_KERNELS = {
    # p, v in place. d = g + wd * p; v = momentum * v + d; p -= lr * (nesterov ? d + momentum * v : v)
    "sgd_momentum": (("T g, T lr, T momentum, T wd, bool nesterov", "T p, T v"), """
        T d = g + wd * p;
        v = momentum * v + d;
        p = p - lr * (nesterov ? d + momentum * v : v);
    """),
    # p in place. p -= lr * (g + wd * p)
    "sgd": (("T g, T lr, T wd", "T p"), "p = p - lr * (g + wd * p);"),
    # p, m, v in place; step = lr / (1 - beta1^t), bc2 = 1 - beta2^t.
    "adam": (("T g, T step, T beta1, T beta2, T eps, T wd, T bc2", "T p, T m, T v"), """
        T d = g + wd * p;
        m = beta1 * m + (T(1) - beta1) * d;
        v = beta2 * v + (T(1) - beta2) * d * d;
        p = p - step * m / (sqrt(v / bc2) + eps);
    """),
    # dx = dy where y > 0, else 0 (y is the ReLU's output).
    "relu_backward": (("T dy, T y", "T dx"), "dx = y > T(0) ? dy : T(0);"),
}


def sgd_update(p: Any, g: Any, v: Any | None, lr: float, momentum: float, wd: float, nesterov: bool) -> None:
    """One SGD step on p (and its velocity v, when momentum > 0), in place."""
    t = p.dtype.type
    if v is None:
        _kernel("sgd")(g, t(lr), t(wd), p)
    else:
        _kernel("sgd_momentum")(g, t(lr), t(momentum), t(wd), np.bool_(nesterov), p, v)


def adam_update(p: Any, g: Any, m: Any, v: Any, step: float, beta1: float, beta2: float, eps: float,
                wd: float, bc2: float) -> None:
    """One Adam step on p and its moments m, v, in place."""
    t = p.dtype.type
    _kernel("adam")(g, t(step), t(beta1), t(beta2), t(eps), t(wd), t(bc2), p, m, v)


def relu_backward(dy: Any, y: Any) -> Any:
    """dx (like dy): dy where y > 0, else 0."""
    return _kernel("relu_backward")(dy, y)
