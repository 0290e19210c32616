import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import linear_backward, linear_forward

from .helpers import assert_close, numerical_gradients, random


@pytest.mark.parametrize("n, d_in, d_out", [(1, 3, 2), (5, 7, 4)])
def test_forward_and_gradients(xp, rng, n, d_in, d_out):
    x, w, b = random(xp, rng, (n, d_in)), random(xp, rng, (d_in, d_out)), random(xp, rng, (d_out,))
    y, cache = linear_forward(x, w, b)
    assert_close(y, to_numpy(x) @ to_numpy(w) + to_numpy(b), rtol=1e-12)
    dy = random(xp, rng, y.shape)
    grads = linear_backward(dy, cache)
    num = numerical_gradients(lambda a, ww, bb: linear_forward(a, ww, bb)[0], [x, w, b], dy)
    for got, want in zip(grads, num):
        assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_rejects_wrong_features():
    with pytest.raises(ValueError, match="x has 3 features but w expects 4"):
        linear_forward(np.zeros((2, 3)), np.zeros((4, 5)))
