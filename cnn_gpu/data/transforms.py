"""Preprocessing and augmentation of image batches (N, H, W, C), on NumPy or CuPy alike.

The array module comes from the input (cnn_gpu.backend.get_array_module), so a batch on the
GPU is transformed on the GPU. Random draws come from a numpy.random.Generator on the host, so
a seed gives the same augmentation on either backend.

Intended order per batch: augment the uint8 images (0 is background, so pixels shifted in are
background), then normalize with the *training* split's statistics:

    stats = compute_norm_stats(train.images)       # from the training images only
    x = normalize(augment(batch, rng), stats)      # (N, 28, 28, 1) float32
    x_test = normalize(test.images, stats)         # the test split uses the train stats too
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnn_gpu.backend import get_array_module, to_numpy
from cnn_gpu.data.datasets import get_spec

# An augmentation takes a batch (N, H, W, C) and a Generator and returns a new batch of that shape.
AugmentFn = Callable[[Any, np.random.Generator], Any]


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and std of images scaled to [0, 1]; each of shape (C,), float64, on the host."""

    mean: np.ndarray
    std: np.ndarray


def to_unit_float(images: Any, dtype: Any = np.float32) -> Any:
    """uint8 (N, H, W, C) in [0, 255] -> dtype in [0, 1]. Float input is taken as already in [0, 1]."""
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(dtype) * np.dtype(dtype).type(1.0 / 255.0)
    return images.astype(dtype)


def compute_norm_stats(train_images: Any) -> NormStats:
    """Per-channel mean and std of training images (N, H, W, C), in [0, 1] units.

    Compute these on the training split only and apply them to every split.
    """
    xp = get_array_module(train_images)
    axes = tuple(range(train_images.ndim - 1))  # all but the channel axis
    n = int(np.prod(train_images.shape[:-1]))
    if train_images.dtype == np.uint8:
        # Exact integer sums (x**2 <= 255**2 fits uint16) instead of a float64 copy of the whole
        # set (60000x28x28 pixels would be 376 MB) or np.var, which is ~30x slower here.
        total = to_numpy(train_images.sum(axis=axes, dtype=xp.uint64)).astype(object)
        squares = to_numpy(xp.square(train_images, dtype=xp.uint16).sum(axis=axes, dtype=xp.uint64))
        var_255 = (n * squares.astype(object) - total * total) / (n * n)  # Python ints: no rounding
        mean = total.astype(np.float64) / n / 255.0
        std = np.sqrt(var_255.astype(np.float64)) / 255.0
    else:
        scaled = to_unit_float(train_images, np.float64)
        mean, std = to_numpy(scaled.mean(axis=axes)), to_numpy(scaled.std(axis=axes))
    if np.any(std == 0):
        raise ValueError(f"a channel of the training images is constant (std {std}); cannot normalize")
    return NormStats(mean=mean, std=std)


def normalize(images: Any, stats: NormStats, dtype: Any = np.float32) -> Any:
    """(to_unit_float(images) - mean) / std per channel: (N, H, W, C) -> (N, H, W, C) of dtype."""
    xp = get_array_module(images)
    x = to_unit_float(images, dtype)
    mean = xp.asarray(stats.mean, dtype=dtype)
    inv_std = xp.asarray(1.0 / stats.std, dtype=dtype)
    return (x - mean) * inv_std


def random_shift(images: Any, max_shift: int, rng: np.random.Generator, fill: Any = 0) -> Any:
    """Shift each image by its own (dy, dx), each uniform in [-max_shift, max_shift]; fill the gap.

    images (N, H, W, C) -> (N, H, W, C), same dtype: out[n, i, j] = images[n, i - dy, j - dx],
    fill where that falls outside. One gather from a padded copy, no loop over images.
    """
    xp = get_array_module(images)
    n, h, w, _ = images.shape
    k = int(max_shift)
    if k < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    shifts = rng.integers(-k, k + 1, size=(n, 2))
    if k == 0:
        return images.copy()
    dy, dx = xp.asarray(shifts[:, 0]), xp.asarray(shifts[:, 1])
    padded = xp.pad(images, ((0, 0), (k, k), (k, k), (0, 0)), constant_values=fill)  # (N, H+2k, W+2k, C)
    rows = xp.arange(h)[None, :] + k - dy[:, None]  # (N, H) rows to read from padded
    cols = xp.arange(w)[None, :] + k - dx[:, None]  # (N, W)
    batch = xp.arange(n)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_hflip(images: Any, rng: np.random.Generator, p: float = 0.5) -> Any:
    """Mirror each image left-right with probability p: (N, H, W, C) -> (N, H, W, C)."""
    xp = get_array_module(images)
    flip = xp.asarray(rng.random(images.shape[0]) < p)
    return xp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_erase(images: Any, rng: np.random.Generator, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.25), aspect: tuple[float, float] = (0.3, 3.3)) -> Any:
    """Random erasing (Zhong et al., 2017): with probability p per image, fill one rectangle with noise.

    images (N, H, W, C) uint8 -> same shape and dtype. The rectangle covers a fraction of the
    image drawn uniformly from `area`, its height/width ratio is drawn log-uniformly from `aspect`,
    and its pixels become uniform random values in [0, 255]. A mask built by broadcasting row
    and column ranges does all images at once.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_erase: p must be in [0, 1], got {p}")
    if images.dtype != np.uint8:
        raise TypeError(f"random_erase: expects uint8 images, got {images.dtype}")
    xp = get_array_module(images)
    n, h, w, c = images.shape
    erase = rng.random(n) < p
    fraction = rng.uniform(*area, size=n)
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]), size=n))
    eh = np.clip(np.round(np.sqrt(fraction * h * w * ratio)), 1, h).astype(np.int64)
    ew = np.clip(np.round(np.sqrt(fraction * h * w / ratio)), 1, w).astype(np.int64)
    top = (rng.random(n) * (h - eh + 1)).astype(np.int64)  # uniform in [0, h - eh]
    left = (rng.random(n) * (w - ew + 1)).astype(np.int64)
    noise = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    rows = np.arange(h)[None, :]
    cols = np.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
    mask = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return xp.where(xp.asarray(mask)[..., None], xp.asarray(noise), images)


@dataclass(frozen=True)
class Augmentation:
    """A per-batch augmentation policy; call it as policy(images, rng) -> images."""

    max_shift: int = 0  # pixels; 0 turns shifts off
    hflip: bool = False  # left-right mirror with probability 1/2
    erase: float = 0.0  # probability of random erasing per image; 0 turns it off

    def __call__(self, images: Any, rng: np.random.Generator) -> Any:
        if self.hflip:
            images = random_hflip(images, rng)
        if self.max_shift:
            images = random_shift(images, self.max_shift, rng)
        if self.erase:
            images = random_erase(images, rng, self.erase)
        return images

    def describe(self) -> str:
        """In words, e.g. "flips, shifts up to 1 px" or "none"."""
        parts = (["flips"] if self.hflip else []) + ([f"shifts up to {self.max_shift} px"] if self.max_shift else [])
        parts += [f"random erasing p={self.erase:g}"] if self.erase else []
        return ", ".join(parts) or "none"


def augmentation_for(dataset_name: str, max_shift: int = 2, erase: float = 0.0) -> Augmentation:
    """The augmentation that suits a dataset: small shifts for both, left-right flips for
    Fashion-MNIST only (a mirrored shirt is a shirt; a mirrored digit is not a digit), and
    random erasing with probability `erase` if asked for."""
    name = get_spec(dataset_name).name
    return Augmentation(max_shift=max_shift, hflip=(name == "fashion-mnist"), erase=erase)
