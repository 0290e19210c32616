"""Softmax cross-entropy on logits, the loss of a classifier."""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module, is_cupy_array
from ..geometry import check_float, check_rank


def log_softmax(logits: Any) -> Any:
    """logits (N, K) -> log-probabilities (N, K), stable for logits of any size."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)  # the largest logit becomes 0: exp cannot overflow
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: Any) -> Any:
    """logits (N, K) -> probabilities (N, K), rows summing to 1."""
    xp = get_array_module(logits)
    return xp.exp(log_softmax(logits))


def softmax_cross_entropy(logits: Any, labels: Any, label_smoothing: float = 0.0) -> tuple[Any, Any]:
    """logits (N, K), integer labels (N,) in [0, K) -> loss (0-d, mean over the batch), dlogits (N, K).

    The target of each row is q = (1 - s) * one_hot(label) + s / K for label_smoothing s
    (0: the plain one-hot target). loss = mean over rows of -sum_k q_k log softmax(logits)_k,
    dlogits = (softmax(logits) - q) / N.
    """
    check_float(logits, "softmax_cross_entropy", "logits")
    check_rank(logits, 2, "softmax_cross_entropy", "(N, num_classes)", "logits")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    xp = get_array_module(logits, labels)
    n, k = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"softmax_cross_entropy: labels must have shape ({n},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"softmax_cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if not is_cupy_array(labels) and n and (labels.min() < 0 or labels.max() >= k):
        # On the GPU this check would cost a device sync every step; fit() checks the dataset once.
        raise ValueError(f"softmax_cross_entropy: labels must be in [0, {k}), "
                         f"got values from {labels.min()} to {labels.max()}")
    if is_cupy_array(logits):  # one fused launch instead of about fifteen
        from ..cuda import elementwise
        return elementwise.softmax_cross_entropy(logits, labels, label_smoothing)
    logp = log_softmax(logits)
    rows = xp.arange(n)
    on_label, spread = 1.0 - label_smoothing, label_smoothing / k  # q = on_label * one_hot + spread
    loss = -on_label * logp[rows, labels].mean()
    if label_smoothing:
        loss = loss - spread * logp.sum(axis=1).mean()
    dlogits = xp.exp(logp)
    dlogits[rows, labels] -= dlogits.dtype.type(on_label)
    if label_smoothing:
        dlogits -= dlogits.dtype.type(spread)
    dlogits *= dlogits.dtype.type(1.0 / n)
    return loss, dlogits


def softmax_forward(x: Any) -> tuple[Any, Any]:
    """x (..., K) -> y (..., K), the softmax over the last axis; the cache is y. (A classifier's
    training loss takes logits instead: softmax_cross_entropy.)"""
    check_float(x, "softmax")
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dy: Any, cache: Any) -> Any:
    """dx = y * (dy - sum(dy * y)) over the last axis."""
    y = cache
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))
