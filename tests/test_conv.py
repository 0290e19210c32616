"""conv2d_forward / conv2d_backward (cnn_gpu/functional/conv.py), the public op: against the loop
definition (tests/references.py), finite differences, and its own rules (out_size, need_dx,
inference, kept cols, errors). Each strategy against the reference: tests/test_conv_strategies.py;
against PyTorch: tests/test_conv_torch.py."""
import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import col2im, conv, conv2d_backward, conv2d_forward, im2col
from cnn_gpu.geometry import Window, pair

from .helpers import assert_close, numerical_gradients, random
from .references import conv2d_loops

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off

# (N, H, W, C, O, KH, KW, stride, padding): odd and non-square sizes, batch 1, kernels 1/3/5.
CASES = [
    (2, 5, 5, 3, 4, 3, 3, 1, 0),
    (1, 7, 6, 2, 3, 3, 3, 2, 1),
    (3, 6, 9, 1, 2, 5, 5, 1, 2),
    (2, 5, 7, 3, 2, 1, 1, 1, 0),
    (1, 8, 8, 2, 2, 1, 1, 2, 0),
    (2, 9, 7, 2, 3, 3, 5, (2, 1), (1, 2)),
    (1, 5, 5, 2, 1, 5, 3, 2, 1),
    (2, 6, 6, 1, 12, 3, 3, 1, 0),  # cols (K + 1 = 10 columns) no wider than y: the forward keeps it
]

# (N, H, W, C, O, KH, KW, stride, padding, dilation, groups): grouped, depthwise (multiplier 1
# and 2), dilated, strided and padded, alone and together.
GROUPED_CASES = [
    (2, 9, 8, 4, 6, 3, 3, 1, 1, 1, 2),             # two groups
    (2, 9, 9, 6, 9, 3, 3, 2, 1, 2, 3),             # three groups, strided, dilated
    (2, 7, 8, 4, 4, 3, 3, 1, 1, 1, 4),             # depthwise
    (1, 7, 8, 3, 6, 3, 3, 2, 1, 1, 3),             # depthwise, multiplier 2, strided
    (2, 11, 10, 3, 4, 3, 3, 1, 2, 2, 1),           # dilated
    (1, 10, 9, 2, 3, 3, 2, (1, 2), (2, 1), (2, 3), 1),  # dilated, non-square everything
    (2, 10, 9, 5, 5, 3, 3, (2, 1), (1, 0), (2, 1), 5),  # depthwise, dilated, non-square
    (1, 9, 9, 2, 4, 5, 5, 1, 2, 1, 2),             # depthwise 5x5, multiplier 2, padded
]


def _loops(x, w, b, stride, padding, dilation=1, groups=1):
    return conv2d_loops(to_numpy(x), to_numpy(w), None if b is None else to_numpy(b),
                        pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), groups)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_loops(xp, rng, case):
    n, h, w, c, o, kh, kw, stride, padding = case
    x, wt, b = random(xp, rng, (n, h, w, c)), random(xp, rng, (kh, kw, c, o)), random(xp, rng, (o,))
    y, _ = conv2d_forward(x, wt, b, stride, padding)
    assert_close(y, _loops(x, wt, b, stride, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_and_dilated_forward_matches_loops(xp, rng, case):
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random(xp, rng, (n, h, w, c)), random(xp, rng, (kh, kw, c // groups, o)), random(xp, rng, (o,))
    y, _ = conv2d_forward(x, wt, b, stride, padding, dilation, groups)
    assert_close(y, _loops(x, wt, b, stride, padding, dilation, groups), rtol=1e-12, atol=1e-12)


def _check_gradients(xp, rng, x_shape, w_shape, bias, **geometry):
    x, wt = random(xp, rng, x_shape), random(xp, rng, w_shape)
    b = random(xp, rng, (w_shape[3],)) if bias else None
    y, cache = conv2d_forward(x, wt, b, **geometry)
    dy = random(xp, rng, y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    inputs = [x, wt] + ([b] if bias else [])
    num = numerical_gradients(lambda *a: conv2d_forward(a[0], a[1], a[2] if bias else None, **geometry)[0],
                              inputs, dy)
    # A central difference of L = sum(y * dy) rounds to about ulp(L) / eps, which grows with the
    # sum, not with the element: a small element of a large gradient (dw[0, 1, 2, 1] = -0.0095 beside
    # entries of 20, on an AVX-512 BLAS) misses a fixed atol of 1e-8. So atol scales with the gradient.
    for got, want, what in zip((dx, dw, db), num, ("dx", "dw", "db")):
        assert_close(got, want, rtol=1e-6, atol=1e-8 * max(1.0, float(np.abs(want).max())), what=what)
    if not bias:
        assert db is None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_finite_differences(xp, rng, case, bias):
    n, h, w, c, o, kh, kw, stride, padding = case
    _check_gradients(xp, rng, (n, h, w, c), (kh, kw, c, o), bias, stride=stride, padding=padding)


@pytest.mark.parametrize("case", GROUPED_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_and_dilated_gradients_match_finite_differences(xp, rng, case, bias):
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    _check_gradients(xp, rng, (n, h, w, c), (kh, kw, c // groups, o), bias, stride=stride, padding=padding,
                     dilation=dilation, groups=groups)


def test_need_dx_false_skips_input_gradient(xp, rng):
    for groups, w_shape in ((1, (3, 3, 1, 2)), (2, (3, 3, 1, 4))):
        x, wt = random(xp, rng, (2, 5, 5, groups)), random(xp, rng, w_shape)
        y, cache = conv2d_forward(x, wt, groups=groups)
        dx, dw, _ = conv2d_backward(xp.ones_like(y), cache, need_dx=False)
        assert dx is None and dw.shape == wt.shape
        assert_close(dw, conv2d_backward(xp.ones_like(y), cache)[1], rtol=0)  # the same dw as with dx


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("groups", [1, 3])
def test_dtype_preserved_and_inputs_untouched(xp, rng, dtype, groups):
    x, wt = random(xp, rng, (2, 6, 6, 3), dtype), random(xp, rng, (3, 3, 3 // groups, 6), dtype)
    b = random(xp, rng, (6,), dtype)
    copies = [a.copy() for a in (x, wt, b)]
    y, cache = conv2d_forward(x, wt, b, 1, 1, groups=groups)
    dy = random(xp, rng, y.shape, dtype)
    dy_copy = dy.copy()
    grads = conv2d_backward(dy, cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for a, c in zip((x, wt, b, dy), copies + [dy_copy]):
        assert_close(a, c, rtol=0)


@pytest.mark.parametrize("groups", [1, 3])
def test_non_contiguous_input(xp, rng, groups):
    base = random(xp, rng, (2, 7, 7, 6))
    x = base[:, ::1, :, ::2]  # every other channel: not contiguous
    wt = random(xp, rng, (3, 3, 3 // groups, 3))
    y, cache = conv2d_forward(x, wt, None, 1, 1, groups=groups)
    assert_close(y, _loops(x, wt, None, 1, 1, 1, groups), rtol=1e-12, atol=1e-12)
    dy = random(xp, rng, y.shape)[:, :, ::-1]  # reversed columns: not contiguous either
    contiguous = conv2d_backward(xp.ascontiguousarray(dy), conv2d_forward(xp.ascontiguousarray(x), wt, None, 1, 1,
                                                                          groups=groups)[1])
    for got, ref in zip(conv2d_backward(dy, cache), contiguous):
        if ref is None:
            assert got is None
        else:
            assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_rejects_bad_input(rng):
    x, wt = np.zeros((2, 5, 5, 3)), np.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="3 channels but w expects 2"):
        conv2d_forward(x, wt)
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        conv2d_forward(np.zeros((5, 5, 3)), wt)
    with pytest.raises(TypeError, match="float32 or float64.*uint8"):
        conv2d_forward(np.zeros((2, 5, 5, 2), dtype=np.uint8), wt)
    with pytest.raises(ValueError, match="smaller than the window"):
        conv2d_forward(np.zeros((1, 2, 2, 2)), wt)
    with pytest.raises(ValueError, match=r"smaller than the window 5 \(3 taps dilated by 2\)"):
        conv2d_forward(np.zeros((1, 4, 9, 2)), wt, dilation=2)
    with pytest.raises(TypeError, match="x is float64 but w is float32"):
        conv2d_forward(np.zeros((1, 5, 5, 2)), wt.astype("float32"))


def test_rejects_bad_groups(rng):
    x = np.zeros((1, 5, 5, 6))
    with pytest.raises(ValueError, match=r"groups 4 must divide the input channels 6 and the output channels 8"):
        conv2d_forward(x, np.zeros((3, 3, 2, 8)), groups=4)
    with pytest.raises(ValueError, match=r"groups 3 must divide .* output channels 4 .*w shape \(3, 3, 2, 4\)"):
        conv2d_forward(x, np.zeros((3, 3, 2, 4)), groups=3)
    with pytest.raises(ValueError, match=r"x has 6 channels but w expects 9 \(3 groups of 3\) "
                                         r"\(x shape \(1, 5, 5, 6\), w shape \(3, 3, 3, 6\)\)"):
        conv2d_forward(x, np.zeros((3, 3, 3, 6)), groups=3)
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        conv2d_forward(x, np.zeros((3, 3, 6, 6)), groups=0)
    with pytest.raises(ValueError, match=r"b must have shape \(6,\) for w of shape \(3, 3, 2, 6\), got \(3,\)"):
        conv2d_forward(x, np.zeros((3, 3, 2, 6)), np.zeros(3), groups=3)


def test_backward_rejects_a_dy_of_another_shape(xp, rng):
    x, wt = random(xp, rng, (2, 6, 6, 2)), random(xp, rng, (3, 3, 2, 4))
    _, cache = conv2d_forward(x, wt)
    with pytest.raises(ValueError, match=r"dy has shape \(2, 4, 4, 3\) but the forward's output was \(2, 4, 4, 4\)"):
        conv2d_backward(xp.zeros((2, 4, 4, 3)), cache)


# (stride, padding, dilation, groups, out_size): what a following pool reads, with padding and dilation too
OUT_SIZE_CASES = [(1, 0, 1, 1, (4, 3)), (2, 0, 1, 1, (2, 2)), (1, 0, 1, 1, (5, 6)), (1, 1, 1, 1, (5, 4)),
                  (2, 1, 2, 1, (2, 3)), (1, 1, 1, 3, (4, 5)), (1, 2, 2, 6, (3, 3))]


@pytest.mark.parametrize("stride, padding, dilation, groups, out_size", OUT_SIZE_CASES)
def test_out_size_computes_a_corner_of_the_output(xp, rng, stride, padding, dilation, groups, out_size):
    """y is the corner of the full output; dx, dw, db are those of the full convolution with
    dy zero outside the corner (x keeps its shape, zero where no computed output reads it)."""
    x, wt, b = random(xp, rng, (2, 8, 9, 6)), random(xp, rng, (3, 2, 6 // groups, 6)), random(xp, rng, (6,))
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    full, full_cache = conv2d_forward(x, wt, b, **geometry)
    y, cache = conv2d_forward(x, wt, b, out_size=out_size, **geometry)
    rows, cols = out_size
    assert y.shape == (2, rows, cols, 6)
    assert_close(y, full[:, :rows, :cols], rtol=1e-12, atol=1e-12)
    dy = random(xp, rng, y.shape)
    dy_full = xp.zeros_like(full)
    dy_full[:, :rows, :cols] = dy
    for got, ref, what in zip(conv2d_backward(dy, cache), conv2d_backward(dy_full, full_cache), ("dx", "dw", "db")):
        assert_close(got, ref, rtol=1e-12, atol=1e-12, what=what)


def test_out_size_outside_the_output_is_refused(xp, rng):
    x, wt = random(xp, rng, (1, 6, 6, 1)), random(xp, rng, (3, 3, 1, 2))
    with pytest.raises(ValueError, match=r"out_size must be within the full output \(4, 4\), got \(5, 4\)"):
        conv2d_forward(x, wt, None, 1, 0, out_size=(5, 4))
    with pytest.raises(ValueError, match=r"out_size must be within the full output \(6, 6\), got \(0, 3\)"):
        conv2d_forward(x, wt, None, 1, 1, out_size=(0, 3))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape, w_shape", [((200, 28, 28, 1), (3, 3, 1, 32)), ((40, 13, 13, 32), (3, 3, 32, 64))])
def test_kept_cols_give_the_gradients_of_rebuilt_cols(rng, monkeypatch, bias, x_shape, w_shape):
    """The seed network's conv1 (cols no wider than y) and conv2 (cols under KEEP_COLS_BYTES) over
    several chunks: the backward from the cols the forward kept equals the one that rebuilds them."""
    x = rng.standard_normal(x_shape).astype("float32")
    wt, b = rng.standard_normal(w_shape).astype("float32"), rng.standard_normal(w_shape[3]).astype("float32")
    y, cache = conv2d_forward(x, wt, b if bias else None)
    row_bytes = y.shape[1] * y.shape[2] * int(np.prod(w_shape[:3])) * 4
    assert cache.cols is not None and len(conv._chunks(x.shape[0], row_bytes)) > 1
    dy = rng.standard_normal(y.shape).astype("float32")
    kept = conv2d_backward(dy, cache)
    monkeypatch.setattr(conv, "_keeps_cols", lambda *args: False)
    y_rebuilt, rebuilt_cache = conv2d_forward(x, wt, b if bias else None)
    assert rebuilt_cache.cols is None
    np.testing.assert_array_equal(y, y_rebuilt)  # the same GEMMs on the same cols: only where cols lives differs
    for got, ref in zip(kept, conv2d_backward(dy, rebuilt_cache)):
        if ref is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_cols_many_times_wider_than_the_output_are_rebuilt(rng):
    """A ResNet's 3x3 convolution with as many outputs as inputs: cols (K = 9*C) are 9 times as
    wide as y, so even under KEEP_COLS_BYTES the backward rebuilds them (a deep network of such
    layers would hold far more in cols than in activations); a 1->16 stem keeps its narrow cols.
    (float64: in float32 the direct kernels, which make no cols, take these layers.)"""
    x = rng.standard_normal((4, 7, 7, 16))
    _, cache = conv2d_forward(x, rng.standard_normal((3, 3, 16, 16)), None, padding=1)
    assert cache.cols is None and x.nbytes * 9 <= conv.KEEP_COLS_BYTES
    _, cache = conv2d_forward(x[..., :1], rng.standard_normal((3, 3, 1, 16)), None, padding=1)
    assert cache.cols is not None


def test_inference_keeps_no_cols(rng):
    """inference=True: the same y, and no cols held in the cache (nothing will backpropagate)."""
    x = rng.standard_normal((8, 13, 13, 32)).astype("float32")
    wt, b = rng.standard_normal((3, 3, 32, 64)).astype("float32"), rng.standard_normal(64).astype("float32")
    y, cache = conv2d_forward(x, wt, b)
    y_inference, inference_cache = conv2d_forward(x, wt, b, inference=True)
    assert cache.cols is not None and inference_cache.cols is None
    np.testing.assert_array_equal(y_inference, y)  # the same chunks and GEMMs; only the cols buffer is reused


def test_cache_names_its_fields(rng):
    x, wt = rng.standard_normal((2, 9, 9, 4)), rng.standard_normal((3, 3, 2, 6))
    _, cache = conv2d_forward(x, wt, None, 2, 1, 2, 2, out_size=(2, 3))
    assert isinstance(cache, conv.ConvCache)
    assert cache.x is x and cache.w is wt and not cache.has_bias and cache.groups == 2
    assert cache.window == Window(3, 3, 2, 2, 1, 1, 2, 2) and cache.out_hw == (2, 3)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_im2col_into_a_buffer_of_either_layout(rng, channels, layout):
    """_im2col_into writes the reference im2col's cols into a row-major buffer and into one stored
    column by column (what cols_buffer gives for one input channel), with dilation too."""
    x = rng.standard_normal((3, 9, 8, channels))
    for window in (Window(3, 2, 1, 1, 1, 0), Window(3, 2, 2, 1, 1, 2, 2, 3)):
        oh, ow = window.output_hw(9, 8, "test")
        expected = im2col(x, window, oh, ow)[0]  # one group
        shape = (3 * oh * ow, 3 * 2 * channels + 1)  # one column more, as the bias column takes
        buf = np.full(shape[::-1], np.nan).T if layout == "columns" else np.full(shape, np.nan)
        conv._im2col_into(x, window, oh, ow, out=buf[:, :-1])
        np.testing.assert_array_equal(buf[:, :-1], expected)
        assert np.isnan(buf[:, -1]).all()
    assert conv.cols_buffer(10, 4, 1, "float32").T.flags.c_contiguous
    assert conv.cols_buffer(10, 4, 2, "float32").flags.c_contiguous


@pytest.mark.parametrize("groups, window", [(1, Window(3, 3, 1, 1, 1, 1)), (2, Window(3, 2, 2, 1, 1, 2, 2, 1)),
                                            (4, Window(2, 3, 1, 2, 0, 1, 1, 2))])
def test_col2im_is_the_adjoint_of_im2col(xp, rng, groups, window):
    """<im2col(x), dcols> == <x, col2im(dcols)> for every x and dcols: col2im is im2col's transpose,
    so the input gradient it gives is exact."""
    x = random(xp, rng, (2, 7, 8, 4))
    oh, ow = window.output_hw(7, 8, "test")
    cols = im2col(x, window, oh, ow, groups)
    assert cols.shape == (groups, 2 * oh * ow, window.taps * 4 // groups)
    dcols = random(xp, rng, cols.shape)
    dx = col2im(dcols, x.shape, window, oh, ow)
    assert dx.shape == x.shape
    np.testing.assert_allclose(float((cols * dcols).sum()), float((x * dx).sum()), rtol=1e-12)
