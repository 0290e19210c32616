import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward

from .helpers import assert_close, numerical_gradients, random
from .references import max_pool_argmax_loops, pool_loops

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off

# (N, H, W, C, pool, stride, padding): overlapping windows, odd sizes, batch 1, padding.
CASES = [
    (2, 4, 4, 3, 2, None, 0),
    (1, 7, 5, 2, 3, 2, 1),
    (3, 5, 6, 1, 2, 1, 0),
    (2, 9, 9, 2, 5, 2, 2),
    (1, 6, 7, 3, (2, 3), (1, 2), (1, 1)),
    (2, 5, 5, 2, 1, 1, 0),
]


def _pairs(pool, stride, padding):
    p = lambda v: v if isinstance(v, tuple) else (v, v)
    return p(pool), p(pool if stride is None else stride), p(padding)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_forward_matches_loops(xp, rng, case, kind):
    n, h, w, c, pool, stride, padding = case
    x = random(xp, rng, (n, h, w, c))
    fwd = max_pool2d_forward if kind == "max" else avg_pool2d_forward
    y, _ = fwd(x, pool, stride, padding)
    ref = pool_loops(to_numpy(x), *_pairs(pool, stride, padding), np.max if kind == "max" else np.mean)
    assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_gradients_match_finite_differences(xp, rng, case, kind):
    n, h, w, c, pool, stride, padding = case
    x = random(xp, rng, (n, h, w, c))  # continuous values: no ties, so max is differentiable
    fwd, bwd = (max_pool2d_forward, max_pool2d_backward) if kind == "max" else (avg_pool2d_forward, avg_pool2d_backward)
    y, cache = fwd(x, pool, stride, padding)
    dy = random(xp, rng, y.shape)
    (num,) = numerical_gradients(lambda a: fwd(a, pool, stride, padding)[0], [x], dy)
    assert_close(bwd(dy, cache), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES)
def test_ties_go_to_the_first_maximum(xp, rng, case):
    n, h, w, c, pool, stride, padding = case
    x = xp.asarray(rng.integers(0, 3, (n, h, w, c)).astype("float32"))  # many equal values
    y, cache = max_pool2d_forward(x, pool, stride, padding)
    ref = max_pool_argmax_loops(to_numpy(x), *_pairs(pool, stride, padding))
    np.testing.assert_array_equal(to_numpy(cache[0]).astype(np.int64), ref)
    # Exactly one element of each window receives its gradient.
    dx = max_pool2d_backward(xp.ones_like(y), cache)
    assert float(dx.sum()) == y.size


def test_nan_counts_as_maximum():
    x = np.array([1.0, np.nan, 3.0, np.nan]).reshape(1, 2, 2, 1)
    y, cache = max_pool2d_forward(x, 2)
    assert np.isnan(y).all() and int(cache[0].ravel()[0]) == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_dtype_preserved_and_input_untouched(xp, rng, dtype, kind):
    fwd, bwd = (max_pool2d_forward, max_pool2d_backward) if kind == "max" else (avg_pool2d_forward, avg_pool2d_backward)
    x = random(xp, rng, (2, 6, 6, 3), dtype)
    x_copy = x.copy()
    y, cache = fwd(x, 3, 2, 1)
    dx = bwd(xp.ones_like(y), cache)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert_close(x, x_copy, rtol=0)


def test_rejects_bad_arguments():
    x = np.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="padding must be at most half"):
        max_pool2d_forward(x, 2, 2, 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        avg_pool2d_forward(x, 5)
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        max_pool2d_forward(np.zeros((4, 4, 1)))
