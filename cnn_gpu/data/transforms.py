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
from cnn_gpu.data.datasets import IMAGE_FOLDER, canonical_name

# An augmentation takes a batch (N, H, W, C) and a Generator and returns a new batch of that shape.
AugmentFn = Callable[[Any, np.random.Generator], Any]
# compute_norm_stats reads this many pixel values at a time, so a memory-mapped dataset is
# streamed through in pieces instead of read (and squared) whole.
NORM_STATS_CHUNK_VALUES = 1 << 24


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

    Compute these on the training split only and apply them to every split. The images are
    read NORM_STATS_CHUNK_VALUES values at a time (rows train_images[i:j]), so a np.memmap or
    Subset is never held in memory whole; uint8 sums are exact integers, so the result does
    not depend on the chunking.
    """
    xp = get_array_module(train_images)
    shape = tuple(train_images.shape)
    axes = tuple(range(len(shape) - 1))  # all but the channel axis
    n = int(np.prod(shape[:-1]))
    if n == 0:
        raise ValueError(f"compute_norm_stats: no training images (shape {shape})")
    step = max(1, NORM_STATS_CHUNK_VALUES // max(1, int(np.prod(shape[1:]))))
    chunks = [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
    if train_images.dtype == np.uint8:
        # Exact integer sums (x**2 <= 255**2 fits uint16) instead of a float64 copy of the whole
        # set (60000x28x28 pixels would be 376 MB) or np.var, which is far slower.
        total = np.zeros(shape[-1], dtype=object)
        squares = np.zeros(shape[-1], dtype=object)
        for i, j in chunks:
            chunk = train_images[i:j]
            total += to_numpy(chunk.sum(axis=axes, dtype=xp.uint64)).astype(object)
            squares += to_numpy(xp.square(chunk, dtype=xp.uint16).sum(axis=axes, dtype=xp.uint64)).astype(object)
        var_255 = (n * squares - total * total) / (n * n)  # Python ints: no rounding
        mean = total.astype(np.float64) / n / 255.0
        std = np.sqrt(var_255.astype(np.float64)) / 255.0
    else:  # two passes in float64: the mean, then the squared deviations from it
        mean = sum(to_numpy(to_unit_float(train_images[i:j], np.float64).sum(axis=axes)) for i, j in chunks) / n
        mean_xp = xp.asarray(mean)
        deviations = sum(to_numpy(xp.square(to_unit_float(train_images[i:j], np.float64) - mean_xp).sum(axis=axes))
                         for i, j in chunks)
        std = np.sqrt(deviations / n)
    if np.any(std == 0):
        raise ValueError(f"a channel of the training images is constant (std {std}); cannot normalize")
    return NormStats(mean=np.asarray(mean, dtype=np.float64), std=np.asarray(std, dtype=np.float64))


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


def random_crop(images: Any, padding: int, rng: np.random.Generator, fill: Any = 0) -> Any:
    """Random crop with padding, CIFAR's usual augmentation (padding 4): pad each image by
    `padding` pixels of `fill` on every side and cut an (H, W) window at a uniformly random offset.

    images (N, H, W, C) -> (N, H, W, C). The window at offset (i, j) in [0, 2p]^2 holds
    out[y, x] = images[y + i - p, x + j - p]: exactly a shift by (p - i, p - j), each uniform in
    [-p, p] with the gap filled, so this is random_shift(images, padding, ...) (the same draws,
    the same output; torchvision's RandomCrop(size, padding=p) draws from the same distribution).
    """
    return random_shift(images, padding, rng, fill=fill)


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


@dataclass(frozen=True)
class AugmentDefaults:
    """A dataset's usual augmentation, read by augmentation_for and by the training recipes."""

    max_shift: int | None  # pixels of random shift (= random-crop padding); None: an eighth of the smaller side
    hflip: bool  # whether its classes survive a left-right mirror (also what mirror TTA needs)


AUGMENT_DEFAULTS: dict[str, AugmentDefaults] = {
    "mnist": AugmentDefaults(max_shift=2, hflip=False),  # a mirrored digit is not a digit
    "fashion-mnist": AugmentDefaults(max_shift=2, hflip=True),  # a mirrored shirt is a shirt
    "cifar10": AugmentDefaults(max_shift=4, hflip=True),  # the usual CIFAR recipe: 4-pixel padded crops, flips
    "cifar100": AugmentDefaults(max_shift=4, hflip=True),
    # Photos of objects: flips, and crops padded by an eighth of the side (4 px at 32x32, as CIFAR).
    # Text, digits or anything with a handedness should turn flips off (hflip=False).
    IMAGE_FOLDER: AugmentDefaults(max_shift=None, hflip=True),
}


def augmentation_defaults(dataset_name: str) -> AugmentDefaults:
    """The AUGMENT_DEFAULTS entry of a dataset name (any spelling load_dataset accepts)."""
    return AUGMENT_DEFAULTS[canonical_name(dataset_name)]


def augmentation_for(dataset_name: str, max_shift: int | None = None, erase: float = 0.0,
                     hflip: bool | None = None, image_size: tuple[int, int] | None = None) -> Augmentation:
    """The augmentation that suits a dataset (AUGMENT_DEFAULTS), each part overridable.

    max_shift: pixels of random shift, the same as a random crop with that padding (None: the
    dataset's default: 2 for the MNISTs, 4 for CIFAR, an eighth of the smaller side of
    image_size (H, W) for an image folder). hflip: left-right flips (None: the default, on for
    all but MNIST). erase: the probability of random erasing per image (0: off).
    """
    defaults = augmentation_defaults(dataset_name)
    if max_shift is None:
        max_shift = defaults.max_shift
        if max_shift is None:
            if image_size is None:
                raise ValueError(f"augmentation_for({dataset_name!r}): give image_size (H, W) or max_shift; "
                                 "the default shift is an eighth of the smaller side")
            max_shift = max(1, round(min(image_size) / 8))
    return Augmentation(max_shift=int(max_shift), hflip=defaults.hflip if hflip is None else bool(hflip),
                        erase=erase)
