"""One comparison helper and one gradient checker for every op test."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cnn_gpu.backend import to_numpy


def assert_close(actual, expected, rtol: float = 1e-7, atol: float = 0.0, what: str = "") -> None:
    """Compare arrays of either backend; the message gives the worst relative error."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)


def relative_error(actual, expected) -> float:
    """||a - e|| / ||e||, the measure the GPU parity tests use."""
    a, e = to_numpy(actual).astype(np.float64), to_numpy(expected).astype(np.float64)
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom else 1.0))


def numerical_gradients(f: Callable[..., object], inputs: Sequence, dy, eps: float = 1e-6) -> list:
    """Central differences of L = sum(f(*inputs) * dy) with respect to each input (float64 arrays).

    Inputs may live on either backend; each element is perturbed in turn.
    """
    grads = []
    for x in inputs:
        g = np.zeros(x.shape)
        flat = x.reshape(-1)  # a view: perturbing it perturbs x
        for k in range(flat.size):
            old = float(flat[k])
            flat[k] = old + eps
            plus = float((f(*inputs) * dy).sum())
            flat[k] = old - eps
            minus = float((f(*inputs) * dy).sum())
            flat[k] = old
            g.reshape(-1)[k] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def random(xp, rng: np.random.Generator, shape, dtype="float64", scale: float = 1.0):
    """Normal random array on the backend under test (drawn on the CPU so both backends see the same numbers)."""
    return xp.asarray((rng.standard_normal(shape) * scale).astype(dtype))


def assert_same_predictions(predictions, scores, margin: float = 1e-6) -> None:
    """predictions (N,) equal scores.argmax(axis=1) (scores (N, K)) wherever the top two scores
    differ by more than `margin` (relative to the row's largest magnitude).

    For predictions made by another computation than `scores` (another batch size, so other GEMM
    shapes): the two agree to rounding, and rounding may flip the argmax of a near tie.
    """
    p, s = to_numpy(predictions), to_numpy(scores).astype(np.float64)
    top2 = np.sort(s, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin * np.maximum(np.abs(s).max(axis=1), 1e-30)
    assert clear.mean() > 0.5, "almost every row is a near tie: the check would test nothing"
    np.testing.assert_array_equal(p[clear], s.argmax(axis=1)[clear])
