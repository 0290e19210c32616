"""Batch normalization over every axis but the last (channels-last).

    x (..., C), gamma (C,), beta (C,) -> y (..., C)

One function serves (N, C) after a dense layer and (N, H, W, C) after a convolution:
the statistics are per channel over the M = x.size // C other positions.

Training uses the batch mean and the biased variance, and updates the running
statistics in place with the unbiased variance (PyTorch's convention):
    running = (1 - momentum) * running + momentum * batch_statistic
Evaluation normalizes with the running statistics.

The variance is a shifted two-pass sum: mean first, then mean((x - mean)^2), both on
values shifted by one sample so that the sums carry the spread, not the offset. An error
e in the mean only adds e^2 to the variance, so it stays accurate when |mean| >> std
(a one-pass E[x^2] - E[x]^2 loses every digit there). On CuPy the per-channel
reductions are the kernels in kernels/batchnorm.cu.
"""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module, is_cupy_array
from ._util import check_float


def _channel_mean_var(x2d: Any) -> tuple[Any, Any]:
    """x2d (M, C) -> per-channel mean (C,), biased variance (C,)."""
    if is_cupy_array(x2d):
        from ..cuda import batchnorm
        return batchnorm.channel_mean_var(x2d)
    # Shift by the first row before summing: the sums then see values of the size of the
    # spread, not of the mean, so a float32 sum over many rows keeps its digits.
    shift = x2d[0]
    d = x2d - shift
    mean_d = d.mean(axis=0)
    d -= mean_d
    var = (d * d).mean(axis=0)
    return shift + mean_d, var


def _channel_grad_sums(dy2d: Any, x2d: Any, mean: Any, inv_std: Any) -> tuple[Any, Any]:
    """sum(dy) (C,) and sum(dy * x_hat) (C,) over the M rows, x_hat = (x - mean) * inv_std."""
    if is_cupy_array(dy2d):
        from ..cuda import batchnorm
        return batchnorm.channel_grad_sums(dy2d, x2d, mean, inv_std)
    sum_dy = dy2d.sum(axis=0)
    sum_dy_xc = (dy2d * (x2d - mean)).sum(axis=0)
    return sum_dy, sum_dy_xc * inv_std


def batch_norm_forward(x: Any, gamma: Any, beta: Any, running_mean: Any = None,
                       running_var: Any = None, training: bool = True,
                       momentum: float = 0.1, eps: float = 1e-5) -> tuple[Any, tuple]:
    """x (..., C) -> y (..., C), cache. Updates running_mean / running_var in place when training."""
    check_float(x, "batch_norm")
    if x.ndim < 2:
        raise ValueError(f"batch_norm: x must be (N, C) or (N, H, W, C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"batch_norm: gamma and beta must have shape ({c},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    xp = get_array_module(x, gamma, beta, running_mean, running_var)
    x2d = x.reshape(-1, c)  # (M, C)
    m = x2d.shape[0]
    if training:
        if m < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, "
                             f"got x of shape {tuple(x.shape)}")
        mean, var = _channel_mean_var(x2d)
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean
        if running_var is not None:
            running_var *= 1 - momentum
            running_var += (momentum * m / (m - 1)) * var
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: evaluation (training=False) needs running_mean and running_var")
        mean, var = running_mean.astype(x.dtype, copy=False), running_var.astype(x.dtype, copy=False)
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    y = _normalize(x2d, mean, inv_std, gamma, beta)
    return y.reshape(x.shape), (x2d, mean, inv_std, gamma, training, x.shape)


def _normalize(x2d: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any) -> Any:
    """y = (x - mean) * inv_std * gamma + beta for x2d (M, C) and (C,) vectors."""
    if is_cupy_array(x2d):
        from ..cuda import batchnorm
        return batchnorm.batch_norm_normalize(x2d, mean, inv_std, gamma, beta)
    # Centring first: x * scale - mean * scale would cancel away the digits of a large mean.
    # In-place steps keep it to one temporary.
    y = x2d - mean
    y *= gamma * inv_std
    y += beta
    return y


def _train_dx(dy2d: Any, x2d: Any, mean: Any, inv_std: Any, gamma: Any, dbeta: Any, dgamma: Any) -> Any:
    """dx = gamma * inv_std * (dy - (sum(dy) + x_hat * sum(dy * x_hat)) / M), (M, C)."""
    if is_cupy_array(dy2d):
        from ..cuda import batchnorm
        return batchnorm.batch_norm_backward_dx(dy2d, x2d, mean, inv_std, gamma, dbeta, dgamma)
    # Written per element as dy * k + (x - mean) * a + b with per-channel k, a, b.
    m = x2d.shape[0]
    k = gamma * inv_std
    a = -k * inv_std * dgamma / m
    b = -k * dbeta / m
    dx = x2d - mean
    dx *= a
    dx += b
    dx += dy2d * k
    return dx


def batch_norm_backward(dy: Any, cache: tuple) -> tuple[Any, Any, Any]:
    """dy (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    x2d, mean, inv_std, gamma, training, shape = cache
    dy2d = dy.reshape(x2d.shape)
    dbeta, dgamma = _channel_grad_sums(dy2d, x2d, mean, inv_std)
    if not training:
        # The statistics were constants: y is an affine function of x.
        return (dy2d * (gamma * inv_std)).reshape(shape), dgamma, dbeta
    dx = _train_dx(dy2d, x2d, mean, inv_std, gamma, dbeta, dgamma)
    return dx.reshape(shape), dgamma, dbeta
