"""Evaluation of a classifier: loss, accuracy and predictions over a whole split, in batches."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..backend import get_array_module, module_for, to_device, to_numpy
from ..data import is_on_disk, subset
from ..distributed import Communicator, shard_slice
from ..functional import softmax, softmax_cross_entropy
from ..layers import Layer


def evaluate(model: Layer, images: Any, labels: Any, batch_size: int = 500,
             transform: Callable[[Any], Any] | None = None, hflip: bool = False) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and predicted classes of a model on a split, in eval mode.

    images (N, H, W, C) and labels (N,) on the model's backend; transform(x) runs on each batch
    first (e.g. normalization of uint8 images). Returns loss (float), accuracy in [0, 1] (float)
    and predictions (N,) int64 on the host. The loss is summed on the device and read once.
    The model's train/eval mode is restored afterwards.

    hflip: test-time augmentation: the prediction is the mean of the class probabilities of each
    image and of its left-right mirror, and the loss is the cross-entropy of that mean. For data
    whose classes survive mirroring (Fashion-MNIST, not digits); choose it on a validation split.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("evaluate: the split is empty")
    loss_sum, correct, predictions = evaluate_sums(model, images, labels, batch_size, transform, hflip)
    return loss_sum / n, correct / n, predictions


def evaluate_sums(model: Layer, images: Any, labels: Any, batch_size: int = 500,
                  transform: Callable[[Any], Any] | None = None,
                  hflip: bool = False) -> tuple[float, int, np.ndarray]:
    """evaluate()'s sums: the loss summed over the images (float), the count of right answers
    (int) and the predictions (N,) int64 on the host. An empty split gives (0.0, 0, empty)."""
    backend = model.backend
    xp = module_for(backend)
    if is_on_disk(images):  # a memory-mapped split: read and moved a batch at a time
        labels = to_device(np.asarray(labels), backend)
    else:
        xp = get_array_module(images, labels)
    was_training = model.training
    model.eval()
    try:
        loss_sum = xp.zeros((), dtype=np.float64)
        predictions = [xp.zeros(0, dtype=np.int64)]
        for start in range(0, len(labels), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            if xp is not get_array_module(x):
                x = to_device(np.asarray(x), backend)
            x = transform(x) if transform is not None else x
            logits = model.forward(x)
            if hflip:  # log of the mean probability of the two views, as logits
                mirrored = model.forward(xp.ascontiguousarray(x[:, :, ::-1, :]))
                mean = (softmax(logits) + softmax(mirrored)) * logits.dtype.type(0.5)
                logits = xp.log(xp.maximum(mean, np.finfo(mean.dtype).tiny))
            loss, _ = softmax_cross_entropy(logits, y)
            loss_sum += loss.astype(np.float64) * len(y)
            predictions.append(logits.argmax(axis=1))
        predicted = xp.concatenate(predictions).astype(np.int64)
        correct = (predicted == labels).sum()
        return float(loss_sum), int(correct), to_numpy(predicted)
    finally:
        model.train(was_training)


def evaluate_on_ranks(model: Layer, images: Any, labels: Any, comm: Communicator, batch_size: int = 500,
                      transform: Callable[[Any], Any] | None = None) -> tuple[float, float]:
    """Mean loss and accuracy on a split evaluated by comm's ranks together: each evaluates its
    contiguous slice (shard_slice) and the sums and counts are totalled over ranks, so every rank
    returns the whole split's numbers (one process: evaluate()'s, exactly). Every rank calls it."""
    n = len(labels)
    if n == 0:
        raise ValueError("evaluate: the split is empty")
    part = shard_slice(n, comm.rank, comm.size)
    rows = subset(images, np.arange(part.start, part.stop)) if is_on_disk(images) else images[part]
    loss_sum, correct, _ = evaluate_sums(model, rows, labels[part], batch_size, transform)
    loss_sum, correct = comm.sum_scalars([loss_sum, correct])
    return loss_sum / n, correct / n


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    labels, predictions = to_numpy(labels).astype(np.int64), to_numpy(predictions).astype(np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """(K,) float64: the fraction of each true class predicted right (NaN for a class with no samples)."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
