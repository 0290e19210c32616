"""Property-based tests: random shapes, strides, paddings and window sizes against the loop
references, and invalid combinations rejected with the right error."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_gpu.functional import avg_pool2d_forward, batch_norm_forward, conv2d_forward, max_pool2d_backward, max_pool2d_forward

from .references import avg_pool_loops, batch_norm_loops, conv2d_loops, max_pool_backward_loops, max_pool_loops

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")


@st.composite
def conv_case(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 8))
    w = draw(st.integers(max(1, kw - 2 * pw), 8))
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, h, w, c, o, (kh, kw), (sh, sw), (ph, pw), seed


@given(conv_case())
def test_conv2d_matches_loops(case):
    n, h, w, c, o, (kh, kw), stride, padding, seed = case
    rng = np.random.default_rng(seed)
    x, wt, b = rng.standard_normal((n, h, w, c)), rng.standard_normal((kh, kw, c, o)), rng.standard_normal(o)
    y, _ = conv2d_forward(x, wt, b, stride, padding)
    np.testing.assert_allclose(y, conv2d_loops(x, wt, b, stride, padding), rtol=1e-10, atol=1e-10)


@st.composite
def pool_case(draw):
    """A pooling geometry the ops accept: padding at most half the kernel, an input the dilated
    window fits, floor or ceil mode."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 10))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 10))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, h, w, c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), draw(st.booleans()),
            draw(st.integers(0, 2**31 - 1)), draw(st.booleans()))


@given(pool_case())
def test_max_pool_matches_loops_and_routes_to_the_first_maximum(case):
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode, seed, ties = case
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (n, h, w, c)).astype(float) if ties else rng.standard_normal((n, h, w, c))
    y, cache = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    y_ref, argmax_ref = max_pool_loops(x, kernel, stride, padding, dilation, ceil_mode)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(cache.argmax, argmax_ref)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(max_pool2d_backward(dy, cache),  # the same sums in another order
                               max_pool_backward_loops(dy, argmax_ref, x.shape, kernel, stride, padding, dilation),
                               rtol=1e-12, atol=1e-12)


@given(pool_case(), st.booleans())
def test_avg_pool_matches_loops(case, count_include_pad):
    n, h, w, c, kernel, stride, padding, _, ceil_mode, seed, _ = case
    x = np.random.default_rng(seed).standard_normal((n, h, w, c))
    y, _ = avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad)
    np.testing.assert_allclose(y, avg_pool_loops(x, kernel, stride, padding, ceil_mode, count_include_pad),
                               rtol=1e-12, atol=1e-12)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.floats(-1e3, 1e3), st.floats(1e-2, 1e2))
def test_batch_norm_matches_loops(lead, c, seed, offset, scale):
    shape = tuple(lead) + (c,)
    if np.prod(lead) < 2:
        shape = (2,) + shape
    rng = np.random.default_rng(seed)
    x = offset + scale * rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    y, _ = batch_norm_forward(x, gamma, beta, training=True, eps=1e-5)
    np.testing.assert_allclose(y, batch_norm_loops(x, gamma, beta, 1e-5), rtol=1e-8, atol=1e-8)


@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 3))
def test_windows_larger_than_the_input_are_rejected(size, extra, padding):
    x = np.zeros((1, size, size, 1))
    kernel = size + 2 * padding + extra
    with pytest.raises(ValueError, match="smaller than the window"):
        conv2d_forward(x, np.zeros((kernel, kernel, 1, 1)), padding=padding)
    with pytest.raises(ValueError, match="smaller than the window|padding must be at most half"):
        max_pool2d_forward(x, kernel, 1, min(padding, kernel // 2))


@given(st.integers(1, 4), st.integers(1, 3))
def test_pool_padding_over_half_the_window_is_rejected(k, over):
    x = np.zeros((1, 9, 9, 1))
    with pytest.raises(ValueError, match="padding must be at most half"):
        avg_pool2d_forward(x, k, 1, k // 2 + over)


@given(st.sampled_from(["int32", "int64", "uint8", "bool", "complex64", "float16"]))
def test_non_float_images_are_rejected(dtype):
    x = np.zeros((1, 4, 4, 1), dtype=dtype)
    with pytest.raises(TypeError, match=f"float32 or float64 array, got {np.dtype(dtype).name}"):
        conv2d_forward(x, np.zeros((1, 1, 1, 1)))
    with pytest.raises(TypeError, match="float32 or float64"):
        max_pool2d_forward(x)
