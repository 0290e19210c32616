"""The global batch split over ranks, and the loss-gradient scale that keeps N ranks exact.

Every rank walks the same batches as one process would (the same BatchIterator, seed and
augmentation, so the same images in the same order) and keeps its shard of each batch: rank r
of N takes a contiguous slice, the first B % N ranks one image more than the others. The N
shards of a batch are disjoint, cover it, and concatenated in rank order are the batch itself.

Why the gradient needs a scale when N does not divide B. One process takes the mean loss over
the batch, L = (1/B) sum_i l_i, and its gradient g = (1/B) sum_i grad l_i. Rank r holds b_r
images and its loss is the mean over those, so its gradient is g_r = (1/b_r) sum_{i in r} grad l_i
(softmax_cross_entropy's dlogits carry the 1/b_r). Summing over ranks,

    sum_r b_r g_r = sum_i grad l_i = B g,   so   g = (1/N) sum_r (N b_r / B) g_r.

So each rank multiplies its loss gradient (dlogits) by grad_scale = N b_r / B, and the gradients
are averaged over ranks (summed, times 1/N: GradientAverager.average()). With B divisible by N
the scale is exactly 1 and this is the plain average. After the scale every image's dlogits row
is (N/B)(p_i - q_i) on every rank, the same factor everywhere, and the backward pass is linear in
dlogits, so the whole backward (batch norm whose statistics span ranks included, see
batchnorm.py) computes N times the single process's contributions, which the 1/N undoes: N ranks
give one process's gradient up to the order of the float sums.

Metrics are sums, never means of means: each rank adds loss * b_r, its right answers and b_r,
and Communicator.sum_scalars totals them over ranks.

A rank whose shard is empty (a last batch with fewer images than ranks) still has to take part
in every collective of the step; fit() should skip such batches on every rank (see shard_sizes).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple


def shard_sizes(batch_len: int, size: int) -> list[int]:
    """Images per rank for a batch of batch_len over `size` ranks: the first batch_len % size
    ranks hold one more. They sum to batch_len; some are 0 when batch_len < size."""
    if size < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {size}")
    if batch_len < 0:
        raise ValueError(f"the batch length must be >= 0, got {batch_len}")
    base, extra = divmod(batch_len, size)
    return [base + (r < extra) for r in range(size)]


def shard_slice(batch_len: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous part of a batch (or of any sequence) of batch_len items."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    base, extra = divmod(batch_len, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def grad_scale(batch_len: int, rank: int, size: int) -> float:
    """N * b_r / B: the factor for rank r's loss gradient (dlogits) so that averaging the
    gradients over ranks gives the single-process gradient of the whole batch. 1.0 when N
    divides B. (0.0 for an empty shard.)"""
    if batch_len < 1:
        raise ValueError(f"the batch length must be >= 1, got {batch_len}")
    shard = shard_sizes(batch_len, size)[rank]
    return 1.0 if shard * size == batch_len else size * shard / batch_len


class Shard(NamedTuple):
    """One rank's part of one global batch."""

    x: Any              # (b_r, ...) images
    y: Any              # (b_r,) labels
    batch_len: int      # B, the global batch's length
    grad_scale: float   # N * b_r / B (see grad_scale)


def shard_batches(batches: Iterable[tuple[Any, Any]], rank: int, size: int,
                  transform: Callable[[Any], Any] | None = None) -> Iterator[Shard]:
    """Rank `rank`'s shard of each global batch (x (B, ...), y (B,)) of `batches`.

    transform (e.g. normalization) runs on the shard only, after the split: give the loader
    transform=None and the transform here, so no rank normalizes images it will not use. Only
    an elementwise transform gives the same images as transforming the whole batch; augmentation,
    which draws random numbers per batch, must stay in the loader, on the whole batch, so every
    rank draws what one process would.
    """
    for x, y in batches:
        if len(x) != len(y):
            raise ValueError(f"a batch has {len(x)} images but {len(y)} labels")
        part = shard_slice(len(y), rank, size)
        xs = x[part]
        yield Shard(transform(xs) if transform is not None else xs, y[part], len(y),
                    grad_scale(len(y), rank, size) if len(y) else 0.0)
