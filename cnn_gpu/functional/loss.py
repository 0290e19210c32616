"""Softmax cross-entropy on logits, the loss of a classifier."""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module, is_cupy_array
from ._util import check_float, check_rank


def log_softmax(logits: Any) -> Any:
    """logits (N, K) -> log-probabilities (N, K), stable for logits of any size."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)  # the largest logit becomes 0: exp cannot overflow
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: Any) -> Any:
    """logits (N, K) -> probabilities (N, K), rows summing to 1."""
    xp = get_array_module(logits)
    return xp.exp(log_softmax(logits))


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """logits (N, K), integer labels (N,) in [0, K) -> loss (0-d, mean over the batch), dlogits (N, K).

    dlogits = (softmax(logits) - one_hot(labels)) / N.
    """
    check_float(logits, "softmax_cross_entropy", "logits")
    check_rank(logits, 2, "softmax_cross_entropy", "(N, num_classes)", "logits")
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
        return elementwise.softmax_cross_entropy(logits, labels)
    logp = log_softmax(logits)
    rows = xp.arange(n)
    loss = -logp[rows, labels].mean()
    dlogits = xp.exp(logp)
    dlogits[rows, labels] -= 1
    dlogits *= dlogits.dtype.type(1.0 / n)
    return loss, dlogits
