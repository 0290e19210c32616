import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import batch_norm_backward, batch_norm_forward, relu_backward, relu_forward

from .helpers import assert_close, numerical_gradients, random
from .references import batch_norm_loops

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off

SHAPES = [(4, 3), (1, 5, 3, 2), (3, 4, 5, 3), (7, 1)]


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_training_forward_matches_loops(xp, rng, shape):
    x = random(xp, rng, shape, scale=3.0) + 2.0
    c = shape[-1]
    gamma, beta = random(xp, rng, (c,)), random(xp, rng, (c,))
    y, _ = batch_norm_forward(x, gamma, beta, training=True)
    assert_close(y, batch_norm_loops(to_numpy(x), to_numpy(gamma), to_numpy(beta), 1e-5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(xp, rng, shape, training):
    if training and np.prod(shape[:-1]) < 2:
        pytest.skip("training needs two values per channel")
    c = shape[-1]
    x, gamma, beta = random(xp, rng, shape), random(xp, rng, (c,)), random(xp, rng, (c,))
    rm, rv = random(xp, rng, (c,)), xp.asarray(rng.uniform(0.5, 2.0, c))
    # Running statistics change during training forwards; give each call fresh copies.
    f = lambda a, g, b: batch_norm_forward(a, g, b, rm.copy(), rv.copy(), training=training)[0]
    y, cache = batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training)
    dy = random(xp, rng, y.shape)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    num = numerical_gradients(f, [x, gamma, beta], dy)
    for got, want, name in zip((dx, dgamma, dbeta), num, ("dx", "dgamma", "dbeta")):
        assert_close(got, want, rtol=1e-6, atol=1e-7, what=name)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("training", [True, False])
def test_relu_gradients_match_finite_differences(xp, rng, shape, training):
    """batch_norm_forward(relu=True) is max(batch norm, 0), and its backward takes dy at the ReLU's
    output (float64; random values sit far from the ReLU's kink, 1e-6 away with tiny odds)."""
    c = shape[-1]
    x, gamma, beta = random(xp, rng, shape), random(xp, rng, (c,)), random(xp, rng, (c,))
    rm, rv = random(xp, rng, (c,)), xp.asarray(rng.uniform(0.5, 2.0, c))
    f = lambda a, g, b: batch_norm_forward(a, g, b, rm.copy(), rv.copy(), training=training, relu=True)[0]
    y, cache = batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training, relu=True)
    assert float(y.min()) == 0.0 and float(y.max()) > 0  # the ReLU cut some values, passed others
    dy = random(xp, rng, y.shape)
    num = numerical_gradients(f, [x, gamma, beta], dy)
    for got, want, name in zip(batch_norm_backward(dy, cache), num, ("dx", "dgamma", "dbeta")):
        assert_close(got, want, rtol=1e-6, atol=1e-7, what=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("c", [16, 32])
def test_relu_gives_the_numbers_of_the_two_ops_bit_for_bit(xp, rng, dtype, training, c):
    """The fused pair against batch norm then relu_forward, and relu_backward then batch norm's
    backward: the same maximum of the same values and the same select of the same dy, so the same
    bits (what lets the plan fuse them in training). A batch big enough for several parts of the
    CPU kernels' sums, a beta that sends half the values below 0, and zeros in dy. The compiled
    kernels recompute the ReLU's mask from x (the gradient sums' vector kernel at 16 float32
    channels reads it from the output instead): the same mask, bit for bit."""
    shape = (6, 9, 9, c)
    x = random(xp, rng, shape, scale=2.0).astype(dtype)
    gamma, beta = random(xp, rng, (c,)).astype(dtype), xp.asarray(np.linspace(-1, 1, c), dtype=dtype)
    stats = lambda: (xp.zeros(c, dtype=dtype), xp.ones(c, dtype=dtype))
    dy = random(xp, rng, shape).astype(dtype)
    dy[0, 0] = 0
    y, cache = batch_norm_forward(x, gamma, beta, *stats(), training=training, relu=True)
    bn, bn_cache = batch_norm_forward(x, gamma, beta, *stats(), training=training)
    relu, relu_cache = relu_forward(bn)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(relu))
    for got, want in zip(batch_norm_backward(dy, cache), batch_norm_backward(relu_backward(dy, relu_cache), bn_cache)):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("relu", [False, True])
def test_add_gives_the_numbers_of_batch_norm_then_the_sum_bit_for_bit(xp, rng, dtype, relu):
    """add=t against batch norm, then t added (add_forward's sum), then the ReLU: the same two
    roundings of the same values. The backward takes dy at batch norm's own output (the ReLU's
    backward is the caller's): the plain batch norm's backward of the same dy."""
    from cnn_gpu.functional import add_forward
    shape, c = (5, 7, 7, 16), 16
    x, t = random(xp, rng, shape, scale=2.0).astype(dtype), random(xp, rng, shape).astype(dtype)
    gamma, beta = random(xp, rng, (c,)).astype(dtype), xp.asarray(np.linspace(-1, 1, c), dtype=dtype)
    stats = lambda: (xp.zeros(c, dtype=dtype), xp.ones(c, dtype=dtype))
    y, cache = batch_norm_forward(x, gamma, beta, *stats(), relu=relu, add=t)
    bn, bn_cache = batch_norm_forward(x, gamma, beta, *stats())
    np.testing.assert_array_equal(to_numpy(y), to_numpy(add_forward(bn, t, relu=relu)[0]))
    assert cache.relu_out is None
    dy = random(xp, rng, shape).astype(dtype)
    for got, want in zip(batch_norm_backward(dy, cache), batch_norm_backward(dy, bn_cache)):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_add_of_another_shape_is_refused(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"add must have x's shape \(4, 3\), got \(4, 2\)"):
        batch_norm_forward(x, np.ones(3), np.zeros(3), add=np.zeros((4, 2)))


def test_running_statistics_hand_computed(xp):
    # Channel 0 holds 1, 2, 3, 4 (mean 2.5, biased var 1.25, unbiased 5/3); channel 1 holds 0, 0, 2, 2.
    x = xp.asarray(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [4.0, 2.0]]))
    gamma, beta = xp.ones(2), xp.zeros(2)
    rm, rv = xp.zeros(2), xp.ones(2)
    y, _ = batch_norm_forward(x, gamma, beta, rm, rv, training=True, momentum=0.1, eps=0.0)
    assert_close(rm, [0.25, 0.1], rtol=1e-12)
    assert_close(rv, [0.9 + 0.1 * 5 / 3, 0.9 + 0.1 * 4 / 3], rtol=1e-12)
    assert_close(y[:, 0], (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), rtol=1e-12)
    assert_close(y[:, 1], [-1, -1, 1, 1], rtol=1e-12)


def test_eval_uses_running_statistics_and_leaves_them(xp):
    x = xp.asarray(np.array([[1.0, 5.0], [3.0, 7.0]]))
    gamma, beta = xp.asarray([2.0, 1.0]), xp.asarray([0.5, -1.0])
    rm, rv = xp.asarray([1.0, 6.0]), xp.asarray([4.0, 1.0])
    y, _ = batch_norm_forward(x, gamma, beta, rm, rv, training=False, eps=0.0)
    assert_close(y, [[0.5, -2.0], [2.5, 0.0]], rtol=1e-12)
    assert_close(rm, [1.0, 6.0], rtol=0) and assert_close(rv, [4.0, 1.0], rtol=0)


# float32: the inputs themselves are quantized at 1e-3 near 1e4; the GPU's Welford merge
# measured 1.2e-4 relative error on an H200, the CPU's shifted two passes under 1e-4.
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 1e-3)])
def test_large_mean_stays_accurate(xp, rng, dtype, rtol):
    # mean = 1e4 x std: a one-pass E[x^2] - E[x]^2 loses every digit here.
    x = xp.asarray((1e4 + rng.standard_normal((512, 4, 4, 8))).astype(dtype))
    gamma, beta = xp.ones(8, dtype=dtype), xp.zeros(8, dtype=dtype)
    rm, rv = xp.zeros(8, dtype=dtype), xp.ones(8, dtype=dtype)
    y, _ = batch_norm_forward(x, gamma, beta, rm, rv, training=True, momentum=1.0, eps=1e-12)
    xd = to_numpy(x).astype(np.float64).reshape(-1, 8)
    assert_close(rv, xd.var(axis=0, ddof=1), rtol=rtol)
    assert_close(rm, xd.mean(axis=0), rtol=100 * np.finfo(dtype).eps)
    yd = to_numpy(y).reshape(-1, 8)
    assert np.abs(yd.mean(axis=0)).max() < 10 * rtol and np.abs(yd.std(axis=0) - 1).max() < 10 * rtol


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_preserved_inputs_untouched(xp, rng, dtype):
    x = random(xp, rng, (3, 4, 4, 2), dtype)
    gamma, beta = random(xp, rng, (2,), dtype), random(xp, rng, (2,), dtype)
    copies = [a.copy() for a in (x, gamma, beta)]
    y, cache = batch_norm_forward(x, gamma, beta)
    grads = batch_norm_backward(xp.ones_like(y), cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for a, c in zip((x, gamma, beta), copies):
        assert_close(a, c, rtol=0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm_forward(np.zeros((1, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"gamma and beta must have shape \(3,\)"):
        batch_norm_forward(np.zeros((4, 3)), np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="needs running_mean"):
        batch_norm_forward(np.zeros((4, 3)), np.ones(3), np.zeros(3), training=False)
