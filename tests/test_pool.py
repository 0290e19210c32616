"""cnn_gpu.functional.pool: max, average and global average pooling against the loop references
(tests/references.py), finite differences and PyTorch, on every path (NumPy with the compiled
kernels on and off, CuPy where a GPU is present)."""
import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import pool
from cnn_gpu.functional.pool import (AvgPoolCache, GlobalAvgPoolCache, MaxPoolCache, avg_pool2d_backward,
                                     avg_pool2d_forward, global_avg_pool2d_backward, global_avg_pool2d_forward,
                                     max_pool2d, max_pool2d_backward, max_pool2d_forward)
from cnn_gpu.geometry import Window, pair, window_index_dtype

from .helpers import assert_close, numerical_gradients, random
from .references import (avg_pool_loops, global_avg_pool_loops, max_pool_backward_loops, max_pool_loops,
                         pool_output_size)

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off

# (N, H, W, C, kernel, stride, padding, dilation, ceil_mode): windows that tile the input (2x2/2,
# 3x3/3), overlapping ones (the ImageNet stem's 3x3/2/1, stride 1), odd sizes, batch 1, non-square
# windows, ceil mode (a last window past the padded input), dilation, and gaps between windows.
MAX_CASES = [
    (2, 4, 4, 3, 2, None, 0, 1, False),
    (2, 11, 11, 3, 2, None, 0, 1, False),
    (2, 11, 11, 3, 2, None, 0, 1, True),
    (2, 7, 7, 3, 3, 3, 0, 1, False),
    (1, 7, 5, 2, 3, 2, 1, 1, False),
    (1, 8, 6, 2, 3, 2, 1, 1, True),
    (3, 5, 6, 1, 2, 1, 0, 1, False),
    (2, 9, 9, 2, 5, 2, 2, 1, True),
    (1, 6, 7, 3, (2, 3), (1, 2), (1, 1), 1, False),
    (2, 5, 5, 2, 1, 1, 0, 1, False),
    (2, 9, 8, 2, 3, 1, 1, 2, False),
    (1, 10, 9, 2, (3, 2), (2, 3), (1, 0), (2, 3), True),
    (2, 7, 8, 2, 2, 3, 1, 2, True),
]
# The same for average pooling, which has no dilation.
AVG_CASES = [case[:7] + (case[8],) for case in MAX_CASES if case[7] == 1]


def _ids(cases):
    return ["x".join(map(str, c[1:4])) + "-" + "-".join(str(v) for v in c[4:]) for c in cases]


def _pairs(kernel, stride, padding, dilation=1):
    """The four (h, w) pairs of a case, stride defaulting to the kernel."""
    return pair(kernel, "k"), pair(kernel if stride is None else stride, "s"), pair(padding, "p"), pair(dilation, "d")


def window_pairs(window):
    """A Window's kernel, stride, padding and dilation pairs, as the loop references take them."""
    return window[0:2], window[2:4], window[4:6], window[6:8]


def _values(xp, rng, shape, values, dtype="float64"):
    """continuous (no ties), ties (three values: most windows hold several maxima) or nan (ties and 5% NaN)."""
    if values == "continuous":
        return random(xp, rng, shape, dtype)
    x = rng.integers(0, 3, shape).astype(dtype)
    if values == "nan":
        x[rng.random(shape) < 0.05] = np.nan
    return xp.asarray(x)


# ---- max pooling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["continuous", "ties", "nan"])
@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_max_pool_matches_the_loops(xp, rng, case, values):
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = _values(xp, rng, (n, h, w, c), values)
    y, cache = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    y_ref, argmax_ref = max_pool_loops(to_numpy(x), *_pairs(kernel, stride, padding, dilation), ceil_mode)
    np.testing.assert_array_equal(to_numpy(y), y_ref)  # no rounding in a maximum; NaN == NaN here
    np.testing.assert_array_equal(to_numpy(cache.argmax).astype(np.int64), argmax_ref)
    assert cache.argmax.dtype == window_index_dtype(*pair(kernel, "k"))
    np.testing.assert_array_equal(to_numpy(max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)), y_ref)

    dy = random(xp, rng, y.shape)
    dx = max_pool2d_backward(dy, cache)
    dx_ref = max_pool_backward_loops(to_numpy(dy), argmax_ref, x.shape, *_pairs(kernel, stride, padding, dilation))
    # Overlapping windows add in another order than the loops' (by tap, not by window).
    assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_max_pool_gradients_match_finite_differences(xp, rng, case):
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = random(xp, rng, (n, h, w, c))  # continuous values: no ties, so max is differentiable
    args = (kernel, stride, padding, dilation, ceil_mode)
    y, cache = max_pool2d_forward(x, *args)
    dy = random(xp, rng, y.shape)
    (num,) = numerical_gradients(lambda a: max_pool2d_forward(a, *args)[0], [x], dy)
    assert_close(max_pool2d_backward(dy, cache), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_ties_go_to_the_first_maximum(xp, rng, case):
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = _values(xp, rng, (n, h, w, c), "ties", "float32")
    y, cache = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    _, argmax_ref = max_pool_loops(to_numpy(x), *_pairs(kernel, stride, padding, dilation), ceil_mode)
    np.testing.assert_array_equal(to_numpy(cache.argmax).astype(np.int64), argmax_ref)
    # Exactly one input of each window receives its gradient (a maximum is never a padded tap here).
    dx = max_pool2d_backward(xp.ones_like(y), cache)
    assert float(dx.sum()) == y.size


def test_nan_counts_as_the_maximum_and_the_first_nan_wins():
    x = np.array([1.0, np.nan, 3.0, np.nan]).reshape(1, 2, 2, 1)
    y, cache = max_pool2d_forward(x, 2)
    assert np.isnan(y).all() and int(cache.argmax.ravel()[0]) == 1
    dx = max_pool2d_backward(np.ones_like(y), cache)
    np.testing.assert_array_equal(dx.ravel(), [0.0, 1.0, 0.0, 0.0])


def test_a_window_of_minus_infinities_routes_to_its_first_tap():
    """Every value -inf: each window's argmax is tap 0, which may lie in the padding (dy dropped)."""
    x = np.full((1, 4, 4, 1), -np.inf)
    y, cache = max_pool2d_forward(x, 3, 2, 1)
    assert (cache.argmax == 0).all() and np.isneginf(y).all()
    dx = max_pool2d_backward(np.ones_like(y), cache)
    assert dx.sum() == 1.0 and dx[0, 1, 1, 0] == 1.0  # only window (1, 1) starts inside the input


def test_a_dilated_window_that_reads_only_padding_gives_minus_infinity(xp):
    """Taps 2 rows and 3 columns apart straddle a 1 x 2 input: the one window reads no input."""
    x = xp.asarray(np.array([5.0, 3.0]).reshape(1, 1, 2, 1))
    y, cache = max_pool2d_forward(x, 2, 1, 1, (2, 3))
    assert y.shape == (1, 1, 1, 1) and np.isneginf(to_numpy(y)).all() and int(cache.argmax[0, 0, 0, 0]) == 0
    assert not to_numpy(max_pool2d_backward(xp.ones_like(y), cache)).any()  # its dy drops out


def test_the_paths_are_chosen_in_one_place(rng):
    """NumPy arrays: the compiled kernels where they run, for every geometry; else the blocks for
    tiling windows and the plain version for the rest."""
    from cnn_gpu import cpu
    x = rng.standard_normal((1, 8, 8, 1))
    previous = cpu.set_enabled(False)
    try:
        assert pool._max_pool_path(x, Window.of(2, 2), (8, 8), (4, 4)) is pool._BLOCKS
        assert pool._max_pool_path(x, Window.of(2, 2), (7, 7), (4, 4)) is pool._PLAIN  # ceil mode: past the edge
        assert pool._max_pool_path(x, Window.of(3, 2, 1), (8, 8), (4, 4)) is pool._PLAIN
        assert pool._max_pool_path(x, Window.of(2, 2, 0, 2), (8, 8), (3, 3)) is pool._PLAIN
        if cpu.unavailable_reason() is None:
            cpu.set_enabled(True)
            from cnn_gpu.cpu import maxpool
            for window, out_hw in ((Window.of(2, 2), (4, 4)), (Window.of(3, 2, 1, 2), (3, 3))):
                assert pool._max_pool_path(x, window, (8, 8), out_hw) is maxpool
            assert pool._max_pool_path(x.astype(np.float16), Window.of(2, 2), (8, 8), (4, 4)) is pool._BLOCKS
    finally:
        cpu.set_enabled(previous)


@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_the_plain_version_is_the_reference_on_every_geometry(rng, case):
    """The plain version, called directly (elsewhere it runs only where nothing faster applies)."""
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = _values(np, rng, (n, h, w, c), "nan")
    window = Window.of(kernel, kernel if stride is None else stride, padding, dilation)
    out_hw = window.output_hw(h, w, "test", ceil_mode)
    y, argmax = pool._plain_forward(x, window, out_hw)
    y_ref, argmax_ref = max_pool_loops(x, *window_pairs(window), ceil_mode)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax.astype(np.int64), argmax_ref)
    np.testing.assert_array_equal(pool._plain_infer(x, window, out_hw), y_ref)
    dy = rng.standard_normal(y.shape)
    assert_close(pool._plain_backward(dy, argmax, x.shape, window),
                 max_pool_backward_loops(dy, argmax_ref, x.shape, *window_pairs(window)), rtol=1e-12, atol=1e-12)


# ---- average pooling ------------------------------------------------------------------------------

@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include-pad", "exclude-pad"])
@pytest.mark.parametrize("case", AVG_CASES, ids=_ids(AVG_CASES))
def test_avg_pool_matches_the_loops(xp, rng, case, count_include_pad):
    n, h, w, c, kernel, stride, padding, ceil_mode = case
    x = random(xp, rng, (n, h, w, c))
    y, cache = avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad)
    k, s, p, _ = _pairs(kernel, stride, padding)
    assert_close(y, avg_pool_loops(to_numpy(x), k, s, p, ceil_mode, count_include_pad), rtol=1e-12, atol=1e-12)
    assert isinstance(cache, AvgPoolCache)


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include-pad", "exclude-pad"])
@pytest.mark.parametrize("case", AVG_CASES, ids=_ids(AVG_CASES))
def test_avg_pool_gradients_match_finite_differences(xp, rng, case, count_include_pad):
    n, h, w, c, kernel, stride, padding, ceil_mode = case
    x = random(xp, rng, (n, h, w, c))
    args = (kernel, stride, padding, ceil_mode, count_include_pad)
    y, cache = avg_pool2d_forward(x, *args)
    dy = random(xp, rng, y.shape)
    (num,) = numerical_gradients(lambda a: avg_pool2d_forward(a, *args)[0], [x], dy)
    assert_close(avg_pool2d_backward(dy, cache), num, rtol=1e-6, atol=1e-8)


def test_avg_pool_divisors_follow_pytorch_in_ceil_mode():
    """Ceil mode adds a last window that reaches past the input (and past its padding): its sum is
    divided by the window clipped to the padded input, or by the input positions in it."""
    _, cache = avg_pool2d_forward(np.ones((1, 5, 5, 1)), 2, ceil_mode=True)  # windows at 0, 2, 4
    np.testing.assert_array_equal(cache.divisor[..., 0], [[4, 4, 2], [4, 4, 2], [2, 2, 1]])
    x = np.ones((1, 6, 6, 1))  # kernel 3, stride 2, padding 1: windows at -1, 1, 3 and 5 (ceil mode)
    _, cache = avg_pool2d_forward(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)
    np.testing.assert_array_equal(cache.divisor[0, :, 0], [9, 9, 9, 6])  # the last clipped to row 6
    _, cache = avg_pool2d_forward(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    np.testing.assert_array_equal(cache.divisor[0, :, 0], [4, 6, 6, 2])  # input positions only


# ---- global average pooling -----------------------------------------------------------------------

GLOBAL_SHAPES = [(2, 7, 7, 3), (1, 1, 1, 4), (3, 5, 9, 2), (2, 1, 6, 1)]


@pytest.mark.parametrize("shape", GLOBAL_SHAPES)
def test_global_avg_pool_matches_the_loops_and_finite_differences(xp, rng, shape):
    x = random(xp, rng, shape)
    y, cache = global_avg_pool2d_forward(x)
    assert y.shape == (shape[0], shape[3]) and isinstance(cache, GlobalAvgPoolCache)
    assert_close(y, global_avg_pool_loops(to_numpy(x)), rtol=1e-12, atol=1e-14)  # another order of sums
    dy = random(xp, rng, y.shape)
    (num,) = numerical_gradients(lambda a: global_avg_pool2d_forward(a)[0], [x], dy)
    assert_close(global_avg_pool2d_backward(dy, cache), num, rtol=1e-6, atol=1e-8)


def test_global_avg_pool_equals_avg_pool_over_the_whole_image(xp, rng):
    x = random(xp, rng, (2, 6, 5, 3))
    y, _ = global_avg_pool2d_forward(x)
    y_avg, _ = avg_pool2d_forward(x, (6, 5))
    assert_close(y, y_avg[:, 0, 0, :], rtol=1e-14, atol=1e-15)  # other orders of the same sums


# ---- every op -------------------------------------------------------------------------------------

def _run(kind, x):
    """Forward and backward of one op on x, with a fixed dy; (y, dx)."""
    if kind == "global":
        y, cache = global_avg_pool2d_forward(x)
        return y, global_avg_pool2d_backward(y * 0 + 1.5, cache)
    fwd, bwd, args = {"max": (max_pool2d_forward, max_pool2d_backward, (3, 2, 1, 1, True)),
                      "avg": (avg_pool2d_forward, avg_pool2d_backward, (3, 2, 1, True, False))}[kind]
    y, cache = fwd(x, *args)
    return y, bwd(y * 0 + 1.5, cache)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["max", "avg", "global"])
def test_dtype_preserved_input_untouched_and_non_contiguous_inputs(xp, rng, dtype, kind):
    base = random(xp, rng, (2, 7, 14, 5), dtype)
    x = base[:, :, ::2, 1:4]  # (2, 7, 7, 3), strided
    x_copy = x.copy()
    y, dx = _run(kind, x)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert_close(x, x_copy, rtol=0)
    y_contiguous, dx_contiguous = _run(kind, xp.ascontiguousarray(x))
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_contiguous))  # the same computation
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(dx_contiguous))


@pytest.mark.parametrize("case", MAX_CASES[:6], ids=_ids(MAX_CASES[:6]))
def test_float32_agrees_with_the_float64_loops(xp, rng, case):
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = random(xp, rng, (n, h, w, c), "float32")
    y, _ = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    x64 = to_numpy(x).astype(np.float64)
    np.testing.assert_array_equal(to_numpy(y), max_pool_loops(x64, *_pairs(kernel, stride, padding, dilation),
                                                              ceil_mode)[0].astype(np.float32))
    y, _ = avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, False)
    k, s, p, _ = _pairs(kernel, stride, padding)
    assert_close(y, avg_pool_loops(x64, k, s, p, ceil_mode, False), rtol=1e-6, atol=1e-6)  # float32 sums


def test_caches_are_named_and_the_keyword_names_are_pytorchs(rng):
    x = rng.standard_normal((2, 9, 9, 2))
    y, cache = max_pool2d_forward(x, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
    assert isinstance(cache, MaxPoolCache) and cache.window == Window(3, 3, 2, 2, 1, 1, 2, 2)
    assert cache.x_shape == x.shape and cache.argmax.shape == y.shape
    assert y.shape[1] == pool_output_size(9, 3, 2, 1, 2, ceil_mode=True)
    y, cache = avg_pool2d_forward(x, kernel_size=2, stride=1, padding=1, ceil_mode=True, count_include_pad=False)
    assert cache.x_shape == x.shape and cache.divisor.shape == (*y.shape[1:3], 1)
    assert max_pool2d_forward(x)[0].shape == (2, 4, 4, 2)  # kernel 2, stride = kernel


def test_rejects_bad_arguments():
    x = np.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="padding must be at most half"):
        max_pool2d_forward(x, 2, 2, 2)
    with pytest.raises(ValueError, match="padding must be at most half"):
        avg_pool2d_forward(x, 3, 1, 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        avg_pool2d_forward(x, 5)
    with pytest.raises(ValueError, match=r"smaller than the window 5 \(3 taps dilated by 2\)"):
        max_pool2d_forward(x, 3, dilation=2)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        max_pool2d(x, 2, dilation=0)
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        max_pool2d_forward(np.zeros((4, 4, 1)))
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        global_avg_pool2d_forward(np.zeros((4, 4, 1)))
    with pytest.raises(TypeError, match="float32 or float64"):
        global_avg_pool2d_forward(np.zeros((1, 2, 2, 1), dtype=np.int32))
    with pytest.raises(ValueError, match="at least one pixel"):
        global_avg_pool2d_forward(np.zeros((1, 0, 3, 1)))
    y, cache = max_pool2d_forward(x, 2)
    with pytest.raises(ValueError, match=r"dy must have the forward's output shape \(1, 2, 2, 1\)"):
        max_pool2d_backward(np.zeros((1, 3, 3, 1)), cache)
    y, cache = avg_pool2d_forward(x, 2)
    with pytest.raises(ValueError, match="dy must have"):
        avg_pool2d_backward(np.zeros((1, 2, 2, 2)), cache)
    y, cache = global_avg_pool2d_forward(x)
    with pytest.raises(ValueError, match=r"dy must have the forward's output shape \(1, 1\)"):
        global_avg_pool2d_backward(np.zeros((1, 2)), cache)


# ---- against PyTorch ------------------------------------------------------------------------------

def _torch_input(torch, x):
    """(N, H, W, C) -> a float64 (N, C, H, W) leaf tensor that records its gradient."""
    return torch.tensor(to_numpy(x).transpose(0, 3, 1, 2), requires_grad=True)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_max_pool_matches_torch(xp, rng, case):
    torch = pytest.importorskip("torch")
    n, h, w, c, kernel, stride, padding, dilation, ceil_mode = case
    x = random(xp, rng, (n, h, w, c))  # tie-free: the routing is then the same whatever the tie rule
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pairs(kernel, stride, padding, dilation)
    t = _torch_input(torch, x)
    y_t, index_t = torch.nn.functional.max_pool2d(t, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode,
                                                  return_indices=True)
    y, cache = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
    np.testing.assert_array_equal(to_numpy(y), _nhwc(y_t))
    # Our argmax is a tap of the window; torch's index is the input position r * W + s.
    k = to_numpy(cache.argmax).astype(np.int64)
    oh, ow = y.shape[1:3]
    rows = np.arange(oh)[None, :, None, None] * sh - ph + (k // kw) * dh
    cols = np.arange(ow)[None, None, :, None] * sw - pw + (k % kw) * dw
    np.testing.assert_array_equal(rows * w + cols, index_t.numpy().transpose(0, 2, 3, 1))
    dy = rng.standard_normal(y.shape)
    y_t.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    # The same gradients, added in another order where windows overlap.
    assert_close(max_pool2d_backward(xp.asarray(dy), cache), _nhwc(t.grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include-pad", "exclude-pad"])
@pytest.mark.parametrize("case", AVG_CASES, ids=_ids(AVG_CASES))
def test_avg_pool_matches_torch(xp, rng, case, count_include_pad):
    torch = pytest.importorskip("torch")
    n, h, w, c, kernel, stride, padding, ceil_mode = case
    x = random(xp, rng, (n, h, w, c))
    k, s, p, _ = _pairs(kernel, stride, padding)
    t = _torch_input(torch, x)
    y_t = torch.nn.functional.avg_pool2d(t, k, s, p, ceil_mode, count_include_pad)
    y, cache = avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad)
    assert_close(y, _nhwc(y_t), rtol=1e-13, atol=1e-15)  # the same sums, perhaps in another order
    dy = rng.standard_normal(y.shape)
    y_t.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    assert_close(avg_pool2d_backward(xp.asarray(dy), cache), _nhwc(t.grad), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", GLOBAL_SHAPES)
def test_global_avg_pool_matches_torch_adaptive_avg_pool(xp, rng, shape):
    torch = pytest.importorskip("torch")
    x = random(xp, rng, shape)
    t = _torch_input(torch, x)
    y_t = torch.nn.functional.adaptive_avg_pool2d(t, 1)  # (N, C, 1, 1)
    y, cache = global_avg_pool2d_forward(x)
    assert_close(y, y_t.detach().numpy()[:, :, 0, 0], rtol=1e-13, atol=1e-15)  # the sum in another order
    dy = rng.standard_normal(y.shape)
    y_t.backward(torch.tensor(dy[:, :, None, None]))
    assert_close(global_avg_pool2d_backward(xp.asarray(dy), cache), _nhwc(t.grad), rtol=1e-13, atol=1e-15)
