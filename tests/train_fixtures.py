"""Small, learnable synthetic data and models for the training, checkpoint and CLI tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnn_gpu.data import write_idx
from cnn_gpu.layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from cnn_gpu.model import Sequential


def bars(n: int, seed: int, size: int = 12, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """n noisy uint8 images (n, size, size, 1) whose class k is a bright bar at rows 3k+2..3k+4;
    labels (n,) int64. A small CNN learns it in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 90, (n, size, size, 1)).astype(np.uint8)
    for k in range(classes):
        images[labels == k, 2 + 3 * k:5 + 3 * k, 3:size - 3, 0] += 120
    return images, labels.astype(np.int64)


def small_cnn(seed: int = 0, classes: int = 3, dropout: bool = False, batch_norm: bool = False) -> Sequential:
    """(N, 12, 12, 1) -> (N, classes): conv 8, [batch norm], ReLU, pool, flatten, [dropout], dense."""
    rng = np.random.default_rng(seed)
    layers = [Conv2D(1, 8, 3, rng=rng)]
    layers += [BatchNorm2D(8)] if batch_norm else []
    layers += [ReLU(), MaxPool2D(2), Flatten()]
    layers += [Dropout(0.3)] if dropout else []
    layers += [Dense(5 * 5 * 8, classes, init="glorot", rng=rng)]
    return Sequential(layers)


def write_tiny_idx_dataset(root: Path, name: str = "fashion-mnist", n_train: int = 240, n_test: int = 60,
                           seed: int = 0) -> Path:
    """Canonical IDX .gz files of a learnable 28x28 10-class dataset under root/<name>/; returns root."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, images_file, labels_file in (
            ("train", n_train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            ("test", n_test, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        rng = np.random.default_rng([seed, len(split)])
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k in range(10):  # class k: a bright square in cell k of a 4x3 grid
            r, c = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
            images[labels == k, r:r + 5, c:c + 5] = 220
        write_idx(directory / images_file, images)
        write_idx(directory / labels_file, labels)
    return root
