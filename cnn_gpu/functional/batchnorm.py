"""Batch normalization over every axis but the last (channels-last).

    x (..., C), gamma (C,), beta (C,) -> y (..., C)

One function serves (N, C) after a dense layer and (N, H, W, C) after a convolution:
the statistics are per channel over the M = x.size // C other positions.

Training uses the batch mean and the biased variance, and updates the running
statistics in place with the unbiased variance (PyTorch's convention):
    running = (1 - momentum) * running + momentum * batch_statistic
Evaluation normalizes with the running statistics.

relu=True gives max(y, 0), a ReLU after the batch norm, and the backward then takes the gradient
at the ReLU's output: the pair computes batch norm + ReLU, with the ReLU in the batch norm's own
passes on NumPy's compiled kernels (the plan hands a model's BatchNorm -> ReLU to it,
cnn_gpu/plan.py), and composed of the two ops' own steps on the other paths.

add=t gives batch norm + t (then max(., 0) with relu): a residual block's sum, computed while
the normalized values are in registers instead of in a pass of its own (the plan hands a batch
norm the two-input Add that alone reads its output). The backward takes the gradient at the
batch norm's output, which is the sum's (a sum passes its gradient on to each input), and with
add the ReLU is not taken through: the gradient of the skip connection needs the ReLU's
derivative too, so the ReLU's own backward runs first, once, for both.

The variance is a shifted two-pass sum: a first estimate of the mean, then the sums of
d = x - estimate and of d^2, so that they carry the spread, not the offset. An error e in
the estimate only adds e^2 to mean(d^2), and is taken off exactly, so it stays accurate
when |mean| >> std (a one-pass E[x^2] - E[x]^2 loses every digit there). On CuPy the per-channel
reductions are the kernels in kernels/batchnorm.cu; on NumPy, when Numba is installed, each
step is one compiled pass (cnn_gpu/cpu/batchnorm.py) and the code below is their reference.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import cpu
from ..backend import get_array_module, is_cupy_array
from ..geometry import check_float
from .activation import relu_backward
from .reduce import column_sum


BLOCK_BYTES = 1 << 18  # rows per block on the CPU: 256 KiB, so a block and its temporaries stay in L2


def _kernels(*arrays: Any) -> Any:
    """The module that runs batch norm's four steps on these arrays: cnn_gpu.cuda.batchnorm for
    CuPy arrays, cnn_gpu.cpu.batchnorm for NumPy ones when its compiled kernels run; else None,
    and the NumPy code below runs. The two modules take the same calls."""
    if is_cupy_array(arrays[0]):
        from ..cuda import batchnorm
        return batchnorm
    if cpu.runs_on(*arrays):
        from ..cpu import batchnorm
        return batchnorm
    return None


def _takes_relu(kernels: Any) -> bool:
    """Whether the kernels module computes the ReLU in its own passes (relu=, relu_out=):
    cnn_gpu.cpu.batchnorm does; on CuPy the ReLU's own kernels run beside batch norm's."""
    return getattr(kernels, "TAKES_RELU", False)


def _row_blocks(a2d: Any, *vectors: Any) -> tuple[list[slice], list[Any]]:
    """a2d (M, C), vectors (C,) -> slices of the rows, each about BLOCK_BYTES, and each vector
    repeated to a whole block's shape (rows, C); a shorter last block takes tile[:rows].

    Two tricks of the NumPy path, each a measured gain on (M, 32) arrays: a chain of passes
    over a large array reads and writes memory once per pass, while run block by block every
    pass after the first finds the block in cache; and NumPy's loop over a broadcast (C,)
    operand restarts every C elements, while same-shape operands run one long SIMD loop.
    """
    m, c = a2d.shape
    per = max(1, min(m, BLOCK_BYTES // max(c * a2d.itemsize, 1)))
    tiles = [np.broadcast_to(v.astype(a2d.dtype, copy=False), (per, c)).copy() for v in vectors]
    return [slice(i, min(i + per, m)) for i in range(0, m, per)], tiles


def _channel_stats(x2d: Any) -> tuple[Any, Any, Any, Any]:
    """x2d (M, C) -> xs (M, C), ref (C,), mean (C,), biased var (C,), with xs - ref = x2d - mean.

    The backward reads the centred input as xs - ref: x2d itself and the mean, on both
    backends (on CuPy the kernels in kernels/batchnorm.cu give mean and var).
    """
    kernels = _kernels(x2d)
    if kernels is not None:
        mean, var = kernels.channel_mean_var(x2d)
        return x2d, mean, mean, var
    m = x2d.shape[0]
    # Shift by a first estimate of the mean before the sums: they then see values of the size
    # of the spread, not of the mean, so float32 sums over many rows keep their digits. An
    # error e left in the estimate only adds e^2 to E[d^2], and is taken off again exactly.
    estimate = column_sum(x2d) / m
    sum_d, sum_dd = np.zeros_like(estimate), np.zeros_like(estimate)
    blocks, (estimate_t,) = _row_blocks(x2d, estimate)
    d = np.empty_like(estimate_t)  # one block of d at a time, summed while in cache; never all of it
    for rows in blocks:
        d_rows = np.subtract(x2d[rows], estimate_t[:rows.stop - rows.start], out=d[:rows.stop - rows.start])
        sum_d += column_sum(d_rows)
        sum_dd += np.einsum("ij,ij->j", d_rows, d_rows)  # reads d once, no temporary
    rest = sum_d / m
    var = sum_dd / m - rest * rest
    return x2d, estimate + rest, estimate + rest, np.maximum(var, 0)  # rounding: a hair below 0


def _channel_grad_sums(dy2d: Any, xs: Any, ref: Any, inv_std: Any, relu_out: Any = None,
                       gamma: Any = None, beta: Any = None) -> tuple[Any, Any]:
    """sum(dy) (C,) and sum(dy * x_hat) (C,) over the M rows, x_hat = (xs - ref) * inv_std;
    relu_out: as in _train_dx; gamma and beta: the compiled kernels may recompute its mask."""
    kernels = _kernels(dy2d, xs, ref, inv_std)
    if _takes_relu(kernels):
        affine = (gamma * inv_std, beta) if relu_out is not None and beta is not None else None
        return kernels.channel_grad_sums(dy2d, xs, ref, inv_std, relu_out, affine)
    if kernels is not None:
        return kernels.channel_grad_sums(dy2d, xs, ref, inv_std)
    sum_dy, sum_dy_xc = np.zeros_like(ref), np.zeros_like(ref)
    blocks, (ref_t,) = _row_blocks(xs, ref)
    xc = np.empty_like(ref_t)  # one block of xs - ref at a time, in cache
    for rows in blocks:
        n = rows.stop - rows.start
        np.subtract(xs[rows], ref_t[:n], out=xc[:n])
        sum_dy += column_sum(dy2d[rows])
        sum_dy_xc += np.einsum("ij,ij->j", dy2d[rows], xc[:n])  # no temporary
    return sum_dy, sum_dy_xc * inv_std


class BatchNormCache(NamedTuple):
    """What batch_norm_backward needs from batch_norm_forward."""

    xs: Any        # (M, C) the input, or a shifted copy: xs - ref = x - mean (see _channel_stats)
    ref: Any       # (C,)
    inv_std: Any   # (C,) 1 / sqrt(var + eps)
    gamma: Any     # (C,)
    training: bool  # whether the statistics were the batch's (else constants)
    shape: tuple[int, ...]  # x's shape
    relu_out: Any = None  # relu=True: y, the ReLU's output (..., C), whose > 0 is the ReLU's mask
    beta: Any = None  # (C,), with relu_out: the compiled kernels recompute the mask from xs instead of reading it


def check_batch_norm_inputs(x: Any, gamma: Any, beta: Any, op: str) -> int:
    """The channel count C of x (..., C), after checking x's dtype and rank and that gamma and beta
    are (C,); the errors name `op` and both shapes."""
    check_float(x, op)
    if x.ndim < 2:
        raise ValueError(f"{op}: x must be (N, C) or (N, H, W, C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"{op}: gamma and beta must have shape ({c},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    return c


def batch_norm_forward(x: Any, gamma: Any, beta: Any, running_mean: Any = None,
                       running_var: Any = None, training: bool = True,
                       momentum: float = 0.1, eps: float = 1e-5, relu: bool = False,
                       add: Any = None) -> tuple[Any, BatchNormCache]:
    """x (..., C) -> y (..., C), cache. Updates running_mean / running_var in place when training.
    relu: y = max(batch norm, 0), with np.maximum's values (a ReLU after it). add (..., C): y =
    batch norm + add, before the ReLU (see the top)."""
    c = check_batch_norm_inputs(x, gamma, beta, "batch_norm")
    if add is not None and tuple(add.shape) != tuple(x.shape):
        raise ValueError(f"batch_norm: add must have x's shape {tuple(x.shape)}, got {tuple(add.shape)}")
    xp = get_array_module(x, gamma, beta, running_mean, running_var)
    x2d = x.reshape(-1, c)  # (M, C)
    m = x2d.shape[0]
    if training:
        if m < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, "
                             f"got x of shape {tuple(x.shape)}")
        xs, ref, mean, var = _channel_stats(x2d)
        if (is_cupy_array(x2d) and running_mean is not None and running_var is not None
                and running_mean.dtype == running_var.dtype == x.dtype):
            from ..cuda import elementwise  # the two updates and inv_std in one launch, not eight
            inv_std = elementwise.batch_norm_running_update(mean, var, running_mean, running_var,
                                                            momentum, momentum * m / (m - 1), eps)
        else:
            if running_mean is not None:
                running_mean *= 1 - momentum
                running_mean += momentum * mean
            if running_var is not None:
                running_var *= 1 - momentum
                running_var += (momentum * m / (m - 1)) * var
            inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: evaluation (training=False) needs running_mean and running_var")
        mean, var = running_mean.astype(x.dtype, copy=False), running_var.astype(x.dtype, copy=False)
        xs, ref = x2d, mean
        inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    add2d = None if add is None else add.reshape(-1, c)
    y = _normalize(xs, ref, inv_std, gamma, beta, relu, add2d).reshape(x.shape)
    relu_out = y if relu and add is None else None  # with add, the ReLU's own backward runs (see the top)
    return y, BatchNormCache(xs, ref, inv_std, gamma, training, tuple(x.shape), relu_out, beta)


def _normalize(xs: Any, ref: Any, inv_std: Any, gamma: Any, beta: Any, relu: bool, add2d: Any = None) -> Any:
    """y = (xs - ref) * inv_std * gamma + beta for xs (M, C) and (C,) vectors; xs - ref = x - mean.
    add2d (M, C): y + add2d. relu: max(y, 0), last."""
    kernels = _kernels(xs, ref, inv_std, gamma, beta)
    if _takes_relu(kernels):
        return kernels.batch_norm_normalize(xs, ref, inv_std, gamma, beta, relu, add2d)  # one fused pass
    if kernels is not None:
        y = kernels.batch_norm_normalize(xs, ref, inv_std, gamma, beta)
        if add2d is not None:
            y += add2d
        return get_array_module(y).maximum(y, 0, out=y) if relu else y  # relu_forward's maximum
    # Centring first: x * scale - mean * scale would cancel away the digits of a large mean.
    # Three in-place steps per block of rows: the block stays in cache between them.
    y = np.empty_like(xs)
    blocks, (ref_t, scale_t, beta_t) = _row_blocks(xs, ref, gamma * inv_std, beta)
    for rows in blocks:
        n = rows.stop - rows.start
        y_rows = np.subtract(xs[rows], ref_t[:n], out=y[rows])
        y_rows *= scale_t[:n]
        y_rows += beta_t[:n]
        if add2d is not None:
            y_rows += add2d[rows]
        if relu:
            np.maximum(y_rows, 0, out=y_rows)
    return y


def _train_dx(dy2d: Any, xs: Any, ref: Any, inv_std: Any, gamma: Any, dbeta: Any, dgamma: Any,
              relu_out: Any = None, beta: Any = None) -> Any:
    """dx = gamma * inv_std * (dy - (sum(dy) + x_hat * sum(dy * x_hat)) / M), all (M, C);
    relu_out: only with the compiled CPU kernels, which take dy through the ReLU as they read it
    (or, given beta, recompute its mask from xs: cnn_gpu/cpu/batchnorm.py, _relu_kept)."""
    kernels = _kernels(dy2d, xs, ref, inv_std, gamma, dbeta, dgamma)
    if _takes_relu(kernels):
        return kernels.batch_norm_backward_dx(dy2d, xs, ref, inv_std, gamma, dbeta, dgamma, relu_out, beta)
    if kernels is not None:
        return kernels.batch_norm_backward_dx(dy2d, xs, ref, inv_std, gamma, dbeta, dgamma)
    # Written per element as dy * k + (x - mean) * a + b with per-channel k, a, b.
    m = xs.shape[0]
    k = gamma * inv_std
    a = -k * inv_std * dgamma / m
    b = -k * dbeta / m
    dx = np.empty_like(xs)
    blocks, (ref_t, a_t, b_t, k_t) = _row_blocks(xs, ref, a, b, k)
    for rows in blocks:  # block by block: the steps and dy * k stay in cache
        n = rows.stop - rows.start
        dx_rows = np.subtract(xs[rows], ref_t[:n], out=dx[rows])
        dx_rows *= a_t[:n]
        dx_rows += b_t[:n]
        dx_rows += dy2d[rows] * k_t[:n]
    return dx


def batch_norm_backward(dy: Any, cache: BatchNormCache) -> tuple[Any, Any, Any]:
    """dy (..., C) -> dx (..., C), dgamma (C,), dbeta (C,). After relu=True, dy is the gradient at
    the ReLU's output."""
    xs, ref, inv_std, gamma = cache.xs, cache.ref, cache.inv_std, cache.gamma  # xs - ref = x - mean
    dy2d = dy.reshape(xs.shape)
    relu_out = None if cache.relu_out is None else cache.relu_out.reshape(xs.shape)
    if relu_out is not None and (not _takes_relu(_kernels(dy2d, xs)) or not cache.training):
        dy2d, relu_out = relu_backward(dy2d, relu_out), None  # the ReLU's own backward, then batch norm's
    dbeta, dgamma = _channel_grad_sums(dy2d, xs, ref, inv_std, relu_out, gamma, cache.beta)
    if not cache.training:
        # The statistics were constants: y is an affine function of x.
        return (dy2d * (gamma * inv_std)).reshape(cache.shape), dgamma, dbeta
    dx = _train_dx(dy2d, xs, ref, inv_std, gamma, dbeta, dgamma, relu_out, cache.beta)
    return dx.reshape(cache.shape), dgamma, dbeta
