import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import softmax_cross_entropy

from .helpers import assert_close, numerical_gradients, random


def test_loss_and_gradient(xp, rng):
    logits = random(xp, rng, (6, 5), scale=3.0)
    labels = xp.asarray(rng.integers(0, 5, 6))
    loss, d = softmax_cross_entropy(logits, labels)
    z = to_numpy(logits)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert_close(loss, -np.log(p[np.arange(6), to_numpy(labels)]).mean(), rtol=1e-12)
    (num,) = numerical_gradients(lambda a: softmax_cross_entropy(a, labels)[0], [logits], 1.0)
    assert_close(d, num, rtol=1e-6, atol=1e-9)


def test_stable_for_huge_logits(xp):
    logits = xp.asarray(np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]]))
    loss, d = softmax_cross_entropy(logits, xp.asarray([0, 1]))
    assert np.isfinite(float(loss)) and np.isfinite(to_numpy(d)).all()
    assert_close(loss, np.log(2) / 2, rtol=1e-12)


def test_dtype_preserved(xp, rng):
    logits = random(xp, rng, (4, 3), "float32")
    loss, d = softmax_cross_entropy(logits, xp.asarray([0, 1, 2, 0]))
    assert d.dtype == np.float32 and loss.dtype == np.float32


def test_rejects_bad_labels():
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got values from 0 to 4"):
        softmax_cross_entropy(logits, np.array([0, 1, 4]))
    with pytest.raises(TypeError, match="integer class indices"):
        softmax_cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        softmax_cross_entropy(logits, np.array([0, 1]))


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_label_smoothing_matches_its_definition(xp, rng, smoothing):
    """loss = -sum_k q_k log p_k with q = (1 - s) one_hot + s / K; its gradient checked numerically."""
    logits = random(xp, rng, (6, 5), scale=3.0)
    labels = xp.asarray(rng.integers(0, 5, 6))
    loss, d = softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    z = to_numpy(logits)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    q = np.full((6, 5), smoothing / 5) + (1 - smoothing) * np.eye(5)[to_numpy(labels)]
    assert_close(loss, -(q * logp).sum(1).mean(), rtol=1e-12)
    assert_close(d, (np.exp(logp) - q) / 6, rtol=1e-12, atol=1e-15)
    (num,) = numerical_gradients(lambda a: softmax_cross_entropy(a, labels, smoothing)[0], [logits], 1.0)
    assert_close(d, num, rtol=1e-6, atol=1e-9)


def test_label_smoothing_zero_is_the_plain_loss(xp, rng):
    logits = random(xp, rng, (4, 3))
    labels = xp.asarray([0, 2, 1, 2])
    plain, smoothed = softmax_cross_entropy(logits, labels), softmax_cross_entropy(logits, labels, 0.0)
    assert float(plain[0]) == float(smoothed[0])
    assert np.array_equal(to_numpy(plain[1]), to_numpy(smoothed[1]))


def test_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=1.0)
