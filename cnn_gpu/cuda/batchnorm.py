"""Batch normalization on the GPU: the per-channel reductions of kernels/batchnorm.cu
and two fused elementwise kernels.

x and dy are viewed as (M, C): M = N*H*W rows of C contiguous channels (reshape (N, H, W, C)
or (N, C) inputs with `.reshape(-1, C)` first).

    mean, var = channel_mean_var(x2d)                       # forward statistics (biased var)
    y = batch_norm_normalize(x, mean, inv_std, gamma, beta)
    sum_dy, sum_dy_xhat = channel_grad_sums(dy2d, x2d, mean, inv_std)
    dx = batch_norm_backward_dx(dy, x, mean, inv_std, gamma, sum_dy, sum_dy_xhat)

The reductions are deterministic (a fixed merge order, no atomics) and use Welford/Chan
merging, so the variance stays accurate when |mean| is far larger than the std.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy
from cnn_gpu.cuda import elementwise, loader

KERNEL_FILE = "batchnorm.cu"
# These must equal the constants of the same names in kernels/batchnorm.cu.
LANES, ROWS = 32, 8              # stage-1 blockDim (BN_LANES, BN_ROWS)
MEAN_VAR_BLOCKS_PER_SM = 4       # BN_MEAN_VAR_MIN_BLOCKS: resident 256-thread blocks per SM
GRAD_SUMS_BLOCKS_PER_SM = 8      # BN_GRAD_SUMS_MIN_BLOCKS
FINISH_THREADS = 256       # stage-2 blockDim (one thread per channel)
MAX_TILES = 65535          # gridDim.y limit: C <= 65535 * 32 channels

KERNELS = ("channel_mean_var_partial", "channel_mean_var_finish",
           "channel_grad_sums_partial", "channel_grad_sums_finish")


def name_expressions(dtype: Any) -> tuple[str, ...]:
    """Every template instantiation of batchnorm.cu for one float dtype."""
    t = loader.ctype(dtype)
    return tuple(f"{kernel}<{t}>" for kernel in KERNELS)


def _kernel(kernel: str, dtype: np.dtype) -> Any:
    module = loader.load_module(KERNEL_FILE, name_expressions(dtype))
    return module.get_function(f"{kernel}<{loader.ctype(dtype)}>")


def plan(m: int, c: int, resident_blocks: int) -> tuple[int, int]:
    """Stage-1 grid (parts, tiles) for an (M, C) input, C >= 1.

    tiles = ceil(C / min(C, 32)) block columns of channels; parts = blocks along M, enough
    that parts * tiles reaches `resident_blocks` (SMs x blocks per SM: one full wave, even
    for C = 32 or 64), but no more than there are groups of 8 warp-rows to read.
    """
    cw = min(c, LANES)
    tiles = -(-c // cw)
    rows_per_block = ROWS * (LANES // cw)
    parts = max(1, min(-(-resident_blocks // tiles), -(-m // rows_per_block)))
    return parts, tiles


def _matrix(cupy: Any, a: Any, name: str) -> Any:
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    loader.ctype(a.dtype)  # TypeError unless float32/float64
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (M, C); reshape with .reshape(-1, C), got {a.shape}")
    return cupy.ascontiguousarray(a)


def _vector(cupy: Any, a: Any, c: int, dtype: np.dtype, name: str) -> Any:
    a = cupy.asarray(a, dtype=dtype)
    if a.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},), got {a.shape}")
    return cupy.ascontiguousarray(a)


def _check_size(m: int, c: int) -> None:
    if m == 0:
        raise ValueError("batch statistics need at least one row (M = 0)")
    if c > MAX_TILES * LANES:
        raise ValueError(f"C = {c} channels exceeds the kernels' limit of {MAX_TILES * LANES}")


def _finish_blocks(c: int) -> int:
    return min(-(-c // FINISH_THREADS), 65535)


def _mean_var_into(x: Any, mean: Any, var: Any,
                   part_n: Any, part_mean: Any, part_m2: Any) -> None:
    """Both stages into preallocated arrays; parts = part_n.shape[0] (any value >= 1 works)."""
    m, c = x.shape
    parts = part_n.shape[0]
    tiles = -(-c // min(c, LANES))
    _kernel("channel_mean_var_partial", x.dtype)(
        (parts, tiles), (LANES, ROWS),
        (x, np.int64(m), np.int32(c), part_n, part_mean, part_m2))
    _kernel("channel_mean_var_finish", x.dtype)(
        (_finish_blocks(c),), (FINISH_THREADS,),
        (part_n, part_mean, part_m2, np.int32(parts), np.int32(c), mean, var))


def channel_mean_var(x2d: Any) -> tuple[Any, Any]:
    """Per-channel mean and biased variance. x2d (M, C) -> mean (C,), var (C,), x's dtype."""
    cupy = require_cupy()
    x = _matrix(cupy, x2d, "x2d")
    m, c = x.shape
    _check_size(m, c)
    mean = cupy.empty(c, dtype=x.dtype)
    var = cupy.empty(c, dtype=x.dtype)
    if c == 0:
        return mean, var
    parts, _ = plan(m, c, MEAN_VAR_BLOCKS_PER_SM * loader.current_sm_count())
    _mean_var_into(x, mean, var,
                   cupy.empty((parts, c), dtype=np.int64),
                   cupy.empty((parts, c), dtype=x.dtype),
                   cupy.empty((parts, c), dtype=x.dtype))
    return mean, var


def _grad_sums_into(dy: Any, x: Any, mean: Any, inv_std: Any, sum_dy: Any, sum_dy_xhat: Any,
                    part_dy: Any, part_dyxc: Any) -> None:
    """Both stages into preallocated arrays; parts = part_dy.shape[0] (any value >= 1 works)."""
    m, c = x.shape
    parts = part_dy.shape[0]
    tiles = -(-c // min(c, LANES))
    _kernel("channel_grad_sums_partial", x.dtype)(
        (parts, tiles), (LANES, ROWS),
        (dy, x, mean, np.int64(m), np.int32(c), part_dy, part_dyxc))
    _kernel("channel_grad_sums_finish", x.dtype)(
        (_finish_blocks(c),), (FINISH_THREADS,),
        (part_dy, part_dyxc, inv_std, np.int32(parts), np.int32(c), sum_dy, sum_dy_xhat))


def channel_grad_sums(dy2d: Any, x2d: Any, mean: Any, inv_std: Any) -> tuple[Any, Any]:
    """The two sums batch norm's backward needs, in one pass over dy and x.

    dy2d, x2d (M, C); mean, inv_std (C,) -> sum_dy (C,) = sum over M of dy,
    sum_dy_xhat (C,) = sum over M of dy * (x - mean) * inv_std. Dtype of x.
    """
    cupy = require_cupy()
    x = _matrix(cupy, x2d, "x2d")
    dy = _matrix(cupy, dy2d, "dy2d")
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy2d {dy.shape} {dy.dtype} must match x2d {x.shape} {x.dtype}")
    m, c = x.shape
    _check_size(m, c)
    mean = _vector(cupy, mean, c, x.dtype, "mean")
    inv_std = _vector(cupy, inv_std, c, x.dtype, "inv_std")
    sum_dy = cupy.empty(c, dtype=x.dtype)
    sum_dy_xhat = cupy.empty(c, dtype=x.dtype)
    if c == 0:
        return sum_dy, sum_dy_xhat
    parts, _ = plan(m, c, GRAD_SUMS_BLOCKS_PER_SM * loader.current_sm_count())
    _grad_sums_into(dy, x, mean, inv_std, sum_dy, sum_dy_xhat,
                    cupy.empty((parts, c), dtype=x.dtype), cupy.empty((parts, c), dtype=x.dtype))
    return sum_dy, sum_dy_xhat


def batch_norm_normalize(x: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any) -> Any:
    """y = (x - mean) * inv_std * gamma + beta. x (..., C); the others (C,) -> y like x."""
    cupy = require_cupy()
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"x must be a cupy.ndarray, got {type(x).__name__}")
    loader.ctype(x.dtype)
    c = x.shape[-1]
    vectors = [_vector(cupy, v, c, x.dtype, name)
               for v, name in ((mean, "mean"), (inv_std, "inv_std"), (gamma, "gamma"), (beta, "beta"))]
    return elementwise.kernel("batch_norm_normalize")(x, *vectors)


def batch_norm_backward_dx(dy: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                           sum_dy: Any, sum_dy_xhat: Any) -> Any:
    """Training-mode input gradient. dy, x (..., C); the others (C,) -> dx like x.

    dx = gamma * inv_std * (dy - (sum_dy + x_hat * sum_dy_xhat) / M),
    x_hat = (x - mean) * inv_std, M = x.size // C (the rows the statistics were taken over).
    """
    cupy = require_cupy()
    for a, name in ((dy, "dy"), (x, "x")):
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    loader.ctype(x.dtype)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy {dy.shape} {dy.dtype} must match x {x.shape} {x.dtype}")
    c = x.shape[-1]
    m = x.size // c if c else 0
    if m == 0:
        raise ValueError("batch statistics need at least one row (M = 0)")
    vectors = [_vector(cupy, v, c, x.dtype, name)
               for v, name in ((mean, "mean"), (inv_std, "inv_std"), (gamma, "gamma"),
                               (sum_dy, "sum_dy"), (sum_dy_xhat, "sum_dy_xhat"))]
    return elementwise.kernel("batch_norm_backward_dx")(dy, x, *vectors, x.dtype.type(1.0 / m))
