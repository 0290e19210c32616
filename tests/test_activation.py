import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import (dropout_backward, dropout_forward, flatten_backward, flatten_forward,
                                relu_backward, relu_forward)

from .helpers import assert_close, numerical_gradients, random

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off


def test_relu_forward_and_gradient(xp, rng):
    x = random(xp, rng, (3, 4, 5, 2))
    y, cache = relu_forward(x)
    assert_close(y, np.maximum(to_numpy(x), 0), rtol=0)
    dy = random(xp, rng, y.shape)
    (num,) = numerical_gradients(lambda a: relu_forward(a)[0], [x], dy)
    assert_close(relu_backward(dy, cache), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_is_inverted_and_matches_its_mask(xp, dtype):
    rng = xp.random.default_rng(0)
    x = xp.ones((200, 100), dtype=dtype)
    y, mask = dropout_forward(x, 0.3, True, rng)
    kept = to_numpy(y) != 0
    assert y.dtype == dtype
    assert abs(kept.mean() - 0.7) < 0.02
    assert_close(to_numpy(y)[kept], np.full(kept.sum(), 1 / 0.7), rtol=1e-6)
    dy = xp.asarray(np.random.default_rng(1).standard_normal((200, 100)).astype(dtype))
    assert_close(dropout_backward(dy, mask), to_numpy(dy) * to_numpy(mask), rtol=0)
    # Finite differences through a fixed mask.
    xs = random(xp, np.random.default_rng(2), (3, 4))
    ys, m = dropout_forward(xs, 0.5, True, xp.random.default_rng(5))
    (num,) = numerical_gradients(lambda a: a * m, [xs], xp.ones_like(ys))
    assert_close(dropout_backward(xp.ones_like(ys), m), num, rtol=1e-6)


def test_dropout_identity_in_eval(xp):
    x = xp.ones((4, 4))
    y, mask = dropout_forward(x, 0.5, False, None)
    assert y is x and mask is None and dropout_backward(x, mask) is x


def test_flatten_round_trip(xp, rng):
    x = random(xp, rng, (2, 3, 4, 5))
    y, cache = flatten_forward(x)
    assert y.shape == (2, 60)
    assert flatten_backward(y, cache).shape == x.shape
