"""Batch norm whose statistics span every rank's shard ("sync batch norm").

    x (..., C) on each rank, its shard of the global batch -> y (..., C)

With the statistics of the whole global batch, N ranks compute what one process computes on the
whole batch (cnn_gpu.functional.batch_norm_forward/backward), up to the order of float sums; with
per-rank statistics they would not (and would drift apart with small shards).

Forward. Each rank reduces its rows to (count, mean, M2) per channel, M2 = sum (x - mean)^2, with
a two-pass sum that stays accurate when |mean| >> std. One allgather brings every rank's triple
to every rank, and each merges them in rank order (combine_moments, Chan et al.'s update for
groups: the global M2 is the sum of the groups' M2 plus the spread of their means about the global
mean, never E[x^2] - mean^2, which loses every digit when |mean| >> std). All ranks merge the same
numbers the same way, so they hold the same statistics, bit for bit, and update their running
statistics identically (the unbiased variance uses the global count).

Backward. dx needs two per-channel sums over the global batch, sum dy and sum dy * x_hat:

    dx = gamma * inv_std * (dy - (sum dy + x_hat * sum dy x_hat) / M)        (M: global rows)

so one allreduce of a (2, C) array per layer. dgamma and dbeta are returned as this rank's own
sums: the gradient averaging that follows the backward (GradientAverager) sums them over ranks
like every other gradient. The loss-gradient scale of sharding.py makes that sum the single
process's gradient; see there.

In a model: set_batch_norm_sync(model, comm, "sync") gives every batch-norm layer a
SyncBatchNorm as its `statistics`; "local" gives them back their own batch's (cnn_gpu.layers).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from ..functional.activation import relu_backward
from ..functional.batchnorm import check_batch_norm_inputs
from ..layers import LOCAL_STATISTICS, Layer
from .comm import Communicator


class Moments(NamedTuple):
    """Per-channel moments of some rows: count (0-d or int), mean (C,), m2 (C,) = sum (x - mean)^2."""

    count: Any
    mean: Any
    m2: Any


def channel_moments(x2d: Any) -> Moments:
    """x2d (M, C) -> Moments(M, mean (C,), M2 (C,)), by a corrected two-pass sum: a first mean,
    then the sums of d = x - mean and of d^2; the rounding error e left in the first mean adds
    M e^2 to sum d^2, which sum(d)^2 / M takes off again. M = 0 gives mean 0 and M2 0."""
    xp = get_array_module(x2d)
    m, c = x2d.shape
    if m == 0:
        return Moments(0, xp.zeros(c, dtype=x2d.dtype), xp.zeros(c, dtype=x2d.dtype))
    first = x2d.mean(axis=0)
    d = x2d - first
    sum_d = d.sum(axis=0)
    m2 = xp.maximum(xp.einsum("ij,ij->j", d, d) - sum_d * sum_d / m, 0)  # rounding: a hair below 0
    return Moments(m, first + sum_d / m, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of two groups of rows together (Chan, Golub and LeVeque 1979):
    n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n. An empty group changes nothing. The pairwise form,
    for reference; combine_moments merges all ranks at once."""
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * (b.count / n), a.m2 + b.m2 + delta * delta * (a.count * b.count / n))


def combine_moments(counts: Any, means: Any, m2s: Any) -> Moments:
    """counts (R,), means (R, C), m2s (R, C) of R groups -> Moments(n (0-d), mean (C,), M2 (C,)).

    Chan et al.'s update for R groups at once: mean = sum_r (n_r / n) mean_r and
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2. An error e in the computed mean adds only
    n e^2 (the cross term sum_r n_r (mean_r - mean) is 0), as in a two-pass variance. Groups with
    n_r = 0 count for nothing (their mean may be anything). No host round trip on the GPU.
    """
    xp = get_array_module(counts, means, m2s)
    n = counts.sum()
    present = (counts > 0)[:, None]  # (R, 1)
    means = xp.where(present, means, 0)
    mean = ((counts / n)[:, None] * means).sum(axis=0)
    d = xp.where(present, means - mean, 0)
    m2 = xp.where(present, m2s, 0).sum(axis=0) + (counts[:, None] * d * d).sum(axis=0)
    return Moments(n, mean, m2)


def allgather_moments(comm: Communicator, local: Moments) -> Moments:
    """Every rank's moments merged (combine_moments, in rank order), the same on every rank.
    One allgather of (2C + 1,) float64 per call; the result is float64."""
    xp = get_array_module(local.mean)
    c = local.mean.shape[0]
    packed = xp.empty(2 * c + 1, dtype=np.float64)  # [count, mean (C), M2 (C)]
    packed[0] = local.count
    packed[1:c + 1] = local.mean
    packed[c + 1:] = local.m2
    rows = comm.allgather(packed)  # (R, 2C + 1)
    return combine_moments(rows[:, 0], rows[:, 1:c + 1], rows[:, c + 1:])


class SyncBatchNormCache(NamedTuple):
    """What sync_batch_norm_backward needs from the forward."""

    xc: Any          # (M_r, C) x - mean, this rank's rows
    inv_std: Any     # (C,) 1 / sqrt(var + eps)
    gamma: Any       # (C,)
    count: Any       # 0-d: M, the rows over all ranks
    training: bool
    shape: tuple[int, ...]
    relu_out: Any = None  # relu=True: y, the ReLU's output, whose > 0 is its mask


def sync_batch_norm_forward(comm: Communicator, x: Any, gamma: Any, beta: Any, running_mean: Any = None,
                            running_var: Any = None, training: bool = True, momentum: float = 0.1,
                            eps: float = 1e-5,
                            moments: Callable[[Any], Moments] = channel_moments,
                            relu: bool = False, add: Any = None) -> tuple[Any, SyncBatchNormCache]:
    """x (..., C), this rank's shard -> y (..., C), cache; the statistics are those of the global
    batch (all ranks' x). Same arguments and conventions as functional.batch_norm_forward:
    biased variance to normalize, running statistics updated in place with the unbiased one
    (here over the global count), running statistics used when training is False (then with no
    communication). moments: how the local rows are reduced (a faster implementation of
    channel_moments can be given). relu: y = max(batch norm, 0), and the backward takes the
    gradient at the ReLU's output. add: y = batch norm + add before the ReLU, whose backward then
    runs on its own (as in functional.batch_norm_forward). Every rank must call it, also one
    with an empty shard.
    """
    c = check_batch_norm_inputs(x, gamma, beta, "sync_batch_norm")
    xp = get_array_module(x, gamma, beta, running_mean, running_var)
    x2d = x.reshape(-1, c)  # (M_r, C)
    if training:
        total = allgather_moments(comm, moments(x2d))
        count = total.count
        var = total.m2 / count  # biased, float64 (C,)
        mean = total.mean
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += (momentum * mean).astype(running_mean.dtype)
        if running_var is not None:
            running_var *= 1 - momentum
            running_var += (momentum * var * (count / (count - 1))).astype(running_var.dtype)
        mean, inv_std = mean.astype(x.dtype), (1.0 / xp.sqrt(var + eps)).astype(x.dtype)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("sync_batch_norm: evaluation (training=False) needs running_mean and running_var")
        count = xp.asarray(x2d.shape[0], dtype=np.float64)
        mean = running_mean.astype(x.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(running_var.astype(x.dtype, copy=False) + eps)).astype(x.dtype)
    xc = x2d - mean  # centring first: x * scale - mean * scale would cancel the digits of a large mean
    y = (xc * (gamma * inv_std) + beta).reshape(x.shape)
    if add is not None:
        y += add
    if relu:
        xp.maximum(y, 0, out=y)  # relu_forward's maximum
    relu_out = y if relu and add is None else None
    return y, SyncBatchNormCache(xc, inv_std, gamma, count, training, tuple(x.shape), relu_out)


def sync_batch_norm_backward(comm: Communicator, dy: Any, cache: SyncBatchNormCache) -> tuple[Any, Any, Any]:
    """dy (..., C) -> dx (..., C), dgamma (C,), dbeta (C,). dx is the global batch's (one
    allreduce of sum dy and sum dy * x_hat); dgamma and dbeta are this rank's sums, to be summed
    over ranks by the gradient averaging with every other gradient."""
    xp = get_array_module(dy, cache.xc)
    if cache.relu_out is not None:
        dy = relu_backward(dy, cache.relu_out)  # the ReLU's own backward first
    dy2d = dy.reshape(cache.xc.shape)
    k = cache.gamma * cache.inv_std  # (C,)
    sums = xp.stack([dy2d.sum(axis=0), xp.einsum("ij,ij->j", dy2d, cache.xc) * cache.inv_std])  # (2, C)
    dbeta, dgamma = sums[0].copy(), sums[1].copy()  # this rank's, before the allreduce
    if not cache.training:  # the statistics were constants: y is affine in x
        return (dy2d * k).reshape(cache.shape), dgamma, dbeta
    comm.allreduce_sum(sums)
    m = cache.count.astype(dy.dtype)
    x_hat = cache.xc * cache.inv_std
    dx = k * (dy2d - (sums[0] + x_hat * sums[1]) / m)
    return dx.reshape(cache.shape), dgamma, dbeta


class SyncBatchNorm:
    """sync_batch_norm_forward/backward bound to a communicator, with the call signatures of
    functional.batch_norm_forward/backward, for a batch-norm layer to call instead of those:

        norm = SyncBatchNorm(comm)      # or the functional pair when comm.size == 1
        y, cache = norm.forward(x, gamma, beta, running_mean, running_var, training, momentum, eps)
        dx, dgamma, dbeta = norm.backward(dy, cache)
    """

    def __init__(self, comm: Communicator, moments: Callable[[Any], Moments] = channel_moments) -> None:
        self.comm, self.moments = comm, moments

    def forward(self, x: Any, gamma: Any, beta: Any, running_mean: Any = None, running_var: Any = None,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                relu: bool = False, add: Any = None) -> tuple[Any, SyncBatchNormCache]:
        return sync_batch_norm_forward(self.comm, x, gamma, beta, running_mean, running_var, training,
                                       momentum, eps, self.moments, relu, add)

    def backward(self, dy: Any, cache: SyncBatchNormCache) -> tuple[Any, Any, Any]:
        return sync_batch_norm_backward(self.comm, dy, cache)


BATCH_NORM_SYNC = ("local", "sync")


def set_batch_norm_sync(model: Layer, comm: Communicator, mode: str) -> list[str]:
    """Where every batch-norm layer of `model` takes its training statistics from: "local", each
    rank's own shard (the layers' default, and DDP's); "sync", the global batch over comm's
    ranks (one SyncBatchNorm shared by the layers). With one rank both are the local statistics,
    the plain functional path. Returns the paths of the layers set (those with `statistics`)."""
    if mode not in BATCH_NORM_SYNC:
        raise ValueError(f"batch norm sync must be one of {BATCH_NORM_SYNC}, got {mode!r}")
    statistics = SyncBatchNorm(comm) if mode == "sync" and comm.size > 1 else LOCAL_STATISTICS
    paths = []
    for path, layer in model.named_layers():
        if hasattr(layer, "statistics"):
            layer.statistics = statistics
            paths.append(path)
    return paths
