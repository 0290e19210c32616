"""A training set resident on the GPU, each batch gathered, augmented and normalized on the device.

A CUDA graph replays its kernels with the arguments they were captured with, and can neither copy
from the host nor draw from a host generator. So the steps of a captured epoch find everything on
the device: the images (uint8) and labels, the epoch's order (copied once per epoch), the step
index (a device int that the graph advances), and random draws from a counter-based generator
keyed by (seed, epoch, step) (cnn_gpu.cuda.rng). One launch of kernels/batch.cu then writes the
normalized batch into a fixed buffer, and one more its labels.

    data = DeviceBatches(images, labels, batch_size=256, seed=0, norm_stats=stats,
                         augment=Augmentation(max_shift=2, hflip=True), dtype=np.float32)
    data.begin_epoch(epoch)      # the epoch's order, BatchIterator's, onto the device; step = 0
    x, y = data.fill(rows)       # batch `step` into data.x[:rows], data.y[:rows] (rows: batch_size, or the last)
    data.advance()               # step += 1, on the device

The order is BatchIterator's (numpy.random.default_rng([seed, epoch]).permutation(N)), and
without augmentation the batches are those of BatchIterator + normalize, bit for bit. With
augmentation the draws come from Philox, not from BatchIterator's NumPy generator: the same
distribution (mirror with probability 1/2, shifts uniform in [-s, s]), other numbers.
`reference_batch` computes the same batch in NumPy, bit for bit.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import require_cupy
from ..data.transforms import Augmentation, NormStats
from . import loader, rng

AUGMENT_STREAM = 1  # word 2 of the draws' counter: (position, epoch, AUGMENT_STREAM, 0)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """BatchIterator's visiting order of epoch `epoch` (with shuffle): (N,) int64 on the host."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def check_augment(augment: Any) -> tuple[int, bool]:
    """(max_shift, hflip) of an augmentation the device can run: None, or an Augmentation without
    random erasing; a ValueError that says why for anything else."""
    if augment is None:
        return 0, False
    if not isinstance(augment, Augmentation):
        raise ValueError(f"the device pipeline runs cnn_gpu.data.Augmentation (mirrors and shifts), "
                         f"not {type(augment).__name__}")
    if augment.erase:
        raise ValueError(f"the device pipeline has no random erasing (erase={augment.erase:g})")
    return int(augment.max_shift), bool(augment.hflip)


class DeviceBatches:
    """Batches of a GPU-resident uint8 dataset, made on the device (see the module docstring)."""

    def __init__(self, images: Any, labels: Any, batch_size: int, seed: int, norm_stats: NormStats,
                 augment: Augmentation | None = None, dtype: Any = np.float32, shuffle: bool = True) -> None:
        cupy = require_cupy()
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"the device pipeline takes uint8 images (N, H, W, C), got {images.dtype} "
                             f"of shape {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_shift, self.hflip = check_augment(augment)
        self.dtype = np.dtype(dtype)
        loader.ctype(self.dtype)
        self.images = cupy.ascontiguousarray(cupy.asarray(images))
        self.labels = cupy.ascontiguousarray(cupy.asarray(labels, dtype=np.int64))
        self.n, self.batch_size, self.seed, self.shuffle = len(images), int(batch_size), int(seed), shuffle
        self.key = rng.key_of(self.seed)
        sample = tuple(int(s) for s in images.shape[1:])
        self.mean = cupy.asarray(norm_stats.mean, dtype=self.dtype)  # as cnn_gpu.data.normalize makes them
        self.inv_std = cupy.asarray(1.0 / norm_stats.std, dtype=self.dtype)
        if self.mean.shape != (sample[2],):
            raise ValueError(f"norm_stats have {self.mean.shape[0]} channels, the images {sample[2]}")
        self.scale = self.dtype.type(1.0 / 255.0)
        self.order = cupy.arange(self.n, dtype=np.int64)
        # The step of the epoch and the epoch, on the device: a graph replays its launches with the
        # arguments they were captured with, so what changes between steps is read from memory.
        self.step = cupy.zeros(1, dtype=np.int32)
        self.epoch = cupy.zeros(1, dtype=np.uint32)
        self.x = cupy.empty((self.batch_size, *sample), dtype=self.dtype)  # fixed buffers: the graph's input
        self.y = cupy.empty(self.batch_size, dtype=np.int64)

    @property
    def steps(self) -> int:
        """Batches per epoch (the last one may be short)."""
        return -(-self.n // self.batch_size)

    def rows(self, step: int) -> int:
        """How many samples batch `step` holds."""
        return min(self.batch_size, self.n - step * self.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        """Copy the epoch's order to the device and set the step to 0 (outside any graph)."""
        if not 0 <= epoch < 2**32:
            raise ValueError(f"epoch must be in [0, 2**32), got {epoch}")
        if self.shuffle:
            self.order.set(epoch_order(self.n, self.seed, epoch))
        self.epoch.fill(epoch)
        self.step.fill(0)

    def fill(self, rows: int) -> tuple[Any, Any]:
        """Write batch `step` (read on the device) into x[:rows], y[:rows]; return those views."""
        h, w, c = self.x.shape[1:]
        total = rows * h * w * c
        t = loader.ctype(self.dtype)
        x, y = self.x[:rows], self.y[:rows]
        rng.function(f"gather_augment_normalize<{t}>", self.dtype)(
            rng.grid(total), (rng.THREADS,),
            (self.images, self.order, self.step, x, np.int64(total), np.int32(self.batch_size), np.int32(h),
             np.int32(w), np.int32(c), np.int32(self.max_shift), np.int32(self.hflip), np.uint32(self.key[0]),
             np.uint32(self.key[1]), self.epoch, self.scale, self.mean, self.inv_std))
        rng.function("gather_labels<long long>", self.dtype)(
            rng.grid(rows), (rng.THREADS,),
            (self.labels, self.order, self.step, y, np.int32(rows), np.int32(self.batch_size)))
        return x, y

    def advance(self) -> None:
        """step += 1 on the device (one launch; captured with the rest of a step)."""
        self.step += 1


def reference_batch(images: np.ndarray, order: np.ndarray, step: int, batch_size: int, rows: int, seed: int,
                    epoch: int, max_shift: int, hflip: bool, mean: np.ndarray, inv_std: np.ndarray,
                    dtype: Any) -> np.ndarray:
    """The batch kernels/batch.cu writes, in NumPy: (rows, H, W, C) of dtype, bit for bit.
    mean and inv_std (C,) already of dtype (as DeviceBatches holds them)."""
    dtype = np.dtype(dtype)
    n_img, h, w, c = images.shape
    positions = step * batch_size + np.arange(rows)
    counters = np.zeros((rows, 4), dtype=np.uint32)
    counters[:, 0], counters[:, 1], counters[:, 2] = positions, epoch, AUGMENT_STREAM
    words = rng.philox4x32_10(counters, rng.key_of(seed)).astype(np.uint64)

    def shift(word: np.ndarray) -> np.ndarray:
        return ((word * np.uint64(2 * max_shift + 1)) >> np.uint64(32)).astype(np.int64) - max_shift

    dy = shift(words[:, 1]) if max_shift else np.zeros(rows, np.int64)
    dx = shift(words[:, 2]) if max_shift else np.zeros(rows, np.int64)
    flip = (words[:, 0] < 0x80000000) if hflip else np.zeros(rows, bool)
    r = np.arange(h)[None, :] - dy[:, None]                      # (rows, H): source row of each output row
    s = np.arange(w)[None, :] - dx[:, None]                      # (rows, W)
    s = np.where(flip[:, None], w - 1 - s, s)                    # the mirror came first
    inside = ((r >= 0) & (r < h))[:, :, None] & ((s >= 0) & (s < w))[:, None, :]  # (rows, H, W)
    gathered = images[order[positions][:, None, None], np.clip(r, 0, h - 1)[:, :, None],
                      np.clip(s, 0, w - 1)[:, None, :]]           # (rows, H, W, C)
    v = np.where(inside[..., None], gathered, 0).astype(dtype)
    return (v * dtype.type(1.0 / 255.0) - mean) * inv_std
