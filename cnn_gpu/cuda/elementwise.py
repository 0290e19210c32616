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
def kernel(name: str) -> Any:
    """The ElementwiseKernel _KERNELS[name], built once (compiled by CuPy at its first call)."""
    cupy = require_cupy()
    params, body = _KERNELS[name]
    return cupy.ElementwiseKernel(*params, body, f"cnn_gpu_{name}")


_KERNELS = {
    # batch norm (cnn_gpu/cuda/batchnorm.py): mean .. beta are (C,) vectors broadcast over x (..., C)
    "batch_norm_normalize": (("T x, T mean, T inv_std, T gamma, T beta", "T y"), """
        y = (x - mean) * inv_std * gamma + beta;
    """),
    "batch_norm_backward_dx": (("T dy, T x, T mean, T inv_std, T gamma, T sum_dy, T sum_dy_xhat, T inv_m", "T dx"), """
        dx = gamma * inv_std * (dy - inv_m * (sum_dy + (x - mean) * inv_std * sum_dy_xhat));
    """),
    # p, v in place. d = g + wd * p; v = momentum * v + d; p -= lr * (nesterov ? d + momentum * v : v)
    "sgd_momentum": (("T g, T lr, T momentum, T wd, bool nesterov", "T p, T v"), """
        T d = g + wd * p;
        v = momentum * v + d;
        p = p - lr * (nesterov ? d + momentum * v : v);
    """),
    # p in place. p -= lr * (g + wd * p)
    "sgd": (("T g, T lr, T wd", "T p"), "p = p - lr * (g + wd * p);"),
    # a weight average in place (cnn_gpu/ema.py): a += rate * (x - a), rate = 1 - decay
    "ema_update": (("T x, T rate", "T a"), "a = a + rate * (x - a);"),
    # p, m, v in place; step = lr / (1 - beta1^t), bc2 = 1 - beta2^t.
    "adam": (("T g, T step, T beta1, T beta2, T eps, T wd, T bc2", "T p, T m, T v"), """
        T d = g + wd * p;
        m = beta1 * m + (T(1) - beta1) * d;
        v = beta2 * v + (T(1) - beta2) * d * d;
        p = p - step * m / (sqrt(v / bc2) + eps);
    """),
    # The same three updates for a captured step (cnn_gpu/cuda/device_optim.py): the per-step
    # scalars come from a table on the device, row step[0], so that a CUDA graph replayed step
    # after step reads each step's own learning rate (and Adam's bias corrections). The arithmetic
    # is the kernels' above, term for term.
    "sgd_at": (("T g, raw T rates, raw int32 step, T wd", "T p"), """
        const T lr = rates[step[0]];
        p = p - lr * (g + wd * p);
    """),
    "sgd_momentum_at": (("T g, raw T rates, raw int32 step, T momentum, T wd, bool nesterov", "T p, T v"), """
        const T lr = rates[step[0]];
        T d = g + wd * p;
        v = momentum * v + d;
        p = p - lr * (nesterov ? d + momentum * v : v);
    """),
    # rates (steps, 2): row s is (lr / (1 - beta1^t), 1 - beta2^t) for the step's t.
    "adam_at": (("T g, raw T rates, raw int32 step, T beta1, T beta2, T eps, T wd", "T p, T m, T v"), """
        const T step_size = rates[2 * step[0]];
        const T bc2 = rates[2 * step[0] + 1];
        T d = g + wd * p;
        m = beta1 * m + (T(1) - beta1) * d;
        v = beta2 * v + (T(1) - beta2) * d * d;
        p = p - step_size * m / (sqrt(v / bc2) + eps);
    """),
    # dx = dy where y > 0, else 0 (y is the ReLU's output).
    "relu_backward": (("T dy, T y", "T dx"), "dx = y > T(0) ? dy : T(0);"),
    # Batch norm's running statistics (in place) and 1 / sqrt(var + eps), per channel:
    # running = (1 - momentum) * running + momentum * batch value (var scaled to unbiased by unbias).
    "batch_norm_running_update": (("T mean, T var, T keep, T momentum, T momentum_unbiased, T eps",
                                   "T running_mean, T running_var, T inv_std"), """
        running_mean = running_mean * keep + momentum * mean;
        running_var = running_var * keep + momentum_unbiased * var;
        inv_std = T(1) / sqrt(var + eps);
    """),
    # Softmax cross-entropy, one thread per row of logits (N, K): the row's loss term
    # lse - shifted[label] and its gradient row (softmax - one_hot) / N.
    "softmax_cross_entropy": (("raw T logits, raw I labels, int32 K, T on_label, T spread, T inv_n",
                               "raw T dlogits, T row_loss"), """
        // target q_k = on_label * (k == label) + spread (label smoothing; spread 0 is one-hot)
        const long long row = i * (long long)K;
        T top = logits[row];
        for (int k = 1; k < K; ++k) {  // shift by the largest logit: exp cannot overflow below
            const T z = logits[row + k];
            top = z > top ? z : top;
        }
        T total = T(0), shifted_sum = T(0);
        for (int k = 0; k < K; ++k) {
            const T z = logits[row + k] - top;
            total += exp(z);
            shifted_sum += z;
        }
        const T lse = log(total);
        const long long label = (long long)labels[i];
        // -sum_k q_k (z_k - lse), with sum_k q_k = 1
        row_loss = lse - on_label * (logits[row + label] - top) - spread * shifted_sum;
        for (int k = 0; k < K; ++k)
            dlogits[row + k] = (exp(logits[row + k] - top - lse) - (k == label ? on_label : T(0)) - spread) * inv_n;
    """),
}


def sgd_update(p: Any, g: Any, v: Any | None, lr: float, momentum: float, wd: float, nesterov: bool) -> None:
    """One SGD step on p (and its velocity v, when momentum > 0), in place."""
    t = p.dtype.type
    if v is None:
        kernel("sgd")(g, t(lr), t(wd), p)
    else:
        kernel("sgd_momentum")(g, t(lr), t(momentum), t(wd), np.bool_(nesterov), p, v)


def adam_update(p: Any, g: Any, m: Any, v: Any, step: float, beta1: float, beta2: float, eps: float,
                wd: float, bc2: float) -> None:
    """One Adam step on p and its moments m, v, in place."""
    t = p.dtype.type
    kernel("adam")(g, t(step), t(beta1), t(beta2), t(eps), t(wd), t(bc2), p, m, v)


def ema_update(average: Any, x: Any, rate: float) -> None:
    """average += rate * (x - average), in place: one launch instead of three."""
    kernel("ema_update")(x, average.dtype.type(rate), average)


def relu_backward(dy: Any, y: Any) -> Any:
    """dx (like dy): dy where y > 0, else 0."""
    return kernel("relu_backward")(dy, y)


def softmax_cross_entropy(logits: Any, labels: Any, label_smoothing: float = 0.0) -> tuple[Any, Any]:
    """logits (N, K), integer labels (N,) -> mean loss (0-d), dlogits (N, K): one launch and a mean."""
    cupy = require_cupy()
    n, k = logits.shape
    t = logits.dtype.type
    logits = cupy.ascontiguousarray(logits)
    dlogits = cupy.empty_like(logits)
    row_loss = cupy.empty(n, dtype=logits.dtype)
    kernel("softmax_cross_entropy")(logits, cupy.ascontiguousarray(labels), np.int32(k), t(1.0 - label_smoothing),
                                     t(label_smoothing / k), t(1.0 / n), dlogits, row_loss)
    return row_loss.mean(), dlogits


def batch_norm_running_update(mean: Any, var: Any, running_mean: Any, running_var: Any, momentum: float,
                              momentum_unbiased: float, eps: float) -> Any:
    """Update running_mean / running_var (C,, of mean's dtype) in place; return inv_std = 1 / sqrt(var + eps)."""
    cupy = require_cupy()
    t = mean.dtype.type
    inv_std = cupy.empty_like(mean)
    kernel("batch_norm_running_update")(mean, var, t(1 - momentum), t(momentum), t(momentum_unbiased), t(eps),
                                         running_mean, running_var, inv_std)
    return inv_std
