"""Mini-batches over a dataset, and a deterministic validation split.

Arrays may be NumPy or CuPy. With CuPy arrays the dataset stays on the GPU: each epoch's
order is drawn on the host and copied to the device once, and every batch is gathered on the
device by indexing with a slice of that device index array (no host copy per batch).

A dataset too large for memory stays on disk as a read-only np.memmap (an image folder's cache,
cnn_gpu.data.folder): each batch gathers only its own rows, and train_val_split returns Subsets,
row indices into the memory map, instead of copies. BatchIterator(device="cupy") gathers such a
batch on the host and moves it to the GPU, for data that is not (or cannot be) on the device.

    loader = BatchIterator(train_x, train_y, batch_size=128, seed=0, augment=augmentation_for("mnist"))
    for epoch in range(10):
        for x, y in loader:      # one epoch per loop; x (B, 28, 28, 1), y (B,)
            ...
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cnn_gpu.backend import get_array_module, is_cupy_array, to_device
from cnn_gpu.data.transforms import AugmentFn

_AUGMENT_STREAM = 1  # keeps augmentation draws apart from the shuffle's, so turning one on leaves the other as it was


class Subset:
    """Rows `index` of a host array (typically a memory map), gathered only when asked for.

    Behaves as an (len(index), *base.shape[1:]) array for what training does with one: len,
    shape, dtype, and indexing by an int, a slice or an index array, which gathers those rows
    from base (and nothing else). np.asarray(subset) gathers all of them (a copy in memory).
    A Subset of a Subset indexes the first one's base directly.
    """

    def __init__(self, base: Any, index: Any):
        index = np.asarray(index)
        if isinstance(base, Subset):
            base, index = base.base, base.index[index]
        if is_cupy_array(base):
            raise TypeError("Subset indexes host arrays (NumPy, np.memmap); index a CuPy array directly")
        if index.ndim != 1 or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
            raise ValueError(f"Subset: index must be a 1-D integer array, got {index.dtype} of shape {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= len(base)):
            raise IndexError(f"Subset: index out of range for {len(base)} rows "
                             f"(found {int(index.min())}..{int(index.max())})")
        self.base, self.index = base, index.astype(np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):  # rows first, then the rest of the key on what was gathered
            rows = self.index[key[0]]
            gathered = self.base[rows]
            return gathered[(slice(None), *key[1:])] if np.ndim(rows) else gathered[key[1:]]
        return self.base[self.index[key]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = np.asarray(self.base[self.index])
        return rows if dtype is None else rows.astype(dtype)

    def __repr__(self) -> str:
        return f"Subset({len(self.index)} of {len(self.base)} rows of {type(self.base).__name__} {self.base.shape[1:]})"


def is_on_disk(a: Any) -> bool:
    """True for data read lazily from disk, np.memmap or a Subset of one: keep it on the host and
    move batches, never the whole array (to_device / np.asarray would read all of it)."""
    return isinstance(a, (np.memmap, Subset))


def subset(images: Any, index: Any) -> Any:
    """Rows `index` of images: a Subset (no copy) of on-disk data, else images[index] (a gather)."""
    if is_on_disk(images):
        return Subset(images, index)
    return images[get_array_module(images).asarray(index)]


class BatchIterator:
    """Iterate (images, labels) batches, one epoch per `for` loop.

    images (N, ...) and labels (N,), both NumPy or both CuPy. Yields x (B, ...) and y (B,).

    Order: with shuffle, epoch e visits the samples in
    numpy.random.default_rng([seed, e]).permutation(N): it depends only on seed and e, so a
    run resumed at epoch k (start_epoch=k) sees the same order as one that never stopped.
    Without shuffle, the stored order. Each sample is visited exactly once per epoch.

    Last partial batch: kept by default (the last batch has N % batch_size samples);
    with drop_last=True it is dropped, so every batch has exactly batch_size samples.

    augment(x, rng) runs on each batch first (rng: one Generator per epoch, seeded with
    [seed, e, 1]); then transform(x), e.g. lambda x: normalize(x, stats).

    device: None keeps each batch where the data is. "cupy" (or "numpy") gathers each batch on
    the host from host data (NumPy, np.memmap, Subset) and moves x and y there before augment and
    transform, so the batches equal those of the same data held on that device, value for value.
    """

    def __init__(self, images: Any, labels: Any, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, augment: AugmentFn | None = None,
                 transform: Callable[[Any], Any] | None = None, start_epoch: int = 0,
                 device: str | None = None):
        self.xp = get_array_module(images, labels)  # also rejects a NumPy/CuPy mix
        if device is not None and self.xp is not np:
            raise ValueError("BatchIterator: device= moves host batches; these arrays are on the GPU already")
        self.device = device
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.augment, self.transform = augment, transform
        self.epoch = int(start_epoch)  # the epoch the next `for` loop runs

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices (N,) of one epoch, in visiting order, on the host."""
        n = len(self.labels)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        # Advance first, so breaking out of a loop early still moves on to the next epoch.
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.batches(epoch)

    def batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """The batches of a given epoch, without touching self.epoch."""
        order = self.xp.asarray(self.order(epoch))  # one host->device copy per epoch on CuPy
        rng = np.random.default_rng([self.seed, epoch, _AUGMENT_STREAM])
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.images[index], self.labels[index]  # gathered where the data lives
            if self.device is not None:
                x, y = to_device(np.asarray(x), self.device), to_device(np.asarray(y), self.device)
            if self.augment is not None:
                x = self.augment(x, rng)
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


def train_val_split(images: Any, labels: Any, val_fraction: float | None = None,
                    val_size: int | None = None, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """Split a validation set off the training data, the same way for the same seed.

    Give exactly one of val_fraction (of N, rounded) or val_size. images (N, ...), labels (N,)
    -> (train_images, train_labels, val_images, val_labels); each part keeps the stored order.
    Choose the best epoch on this validation split, never on the test split.
    On-disk images (np.memmap, Subset) give Subsets, which copy nothing; others are gathered.
    """
    xp = get_array_module(images, labels)
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"images and labels differ in length: {len(images)} vs {n}")
    if (val_fraction is None) == (val_size is None):
        raise ValueError("give exactly one of val_fraction and val_size")
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_size = round(n * val_fraction)
    if not 0 < val_size < n:  # type: ignore[operator]
        raise ValueError(f"the validation split must hold between 1 and {n - 1} samples, got {val_size}")
    permutation = np.random.default_rng(seed).permutation(n)
    val_index, train_index = np.sort(permutation[:val_size]), np.sort(permutation[val_size:])
    return (subset(images, train_index), labels[xp.asarray(train_index)],
            subset(images, val_index), labels[xp.asarray(val_index)])
