import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import conv2d_backward, conv2d_forward, im2col

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


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_loops(xp, rng, case):
    n, h, w, c, o, kh, kw, stride, padding = case
    x, wt, b = random(xp, rng, (n, h, w, c)), random(xp, rng, (kh, kw, c, o)), random(xp, rng, (o,))
    y, _ = conv2d_forward(x, wt, b, stride, padding)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    ref = conv2d_loops(to_numpy(x), to_numpy(wt), to_numpy(b), pair(stride), pair(padding))
    assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_finite_differences(xp, rng, case, bias):
    n, h, w, c, o, kh, kw, stride, padding = case
    x, wt = random(xp, rng, (n, h, w, c)), random(xp, rng, (kh, kw, c, o))
    b = random(xp, rng, (o,)) if bias else None
    y, cache = conv2d_forward(x, wt, b, stride, padding)
    dy = random(xp, rng, y.shape)
    dx, dw, db = conv2d_backward(dy, cache)
    inputs = [x, wt] + ([b] if bias else [])
    num = numerical_gradients(lambda *a: conv2d_forward(a[0], a[1], a[2] if bias else None, stride, padding)[0],
                              inputs, dy)
    assert_close(dx, num[0], rtol=1e-6, atol=1e-8, what="dx")
    assert_close(dw, num[1], rtol=1e-6, atol=1e-8, what="dw")
    if bias:
        assert_close(db, num[2], rtol=1e-6, atol=1e-8, what="db")
    else:
        assert db is None


def test_need_dx_false_skips_input_gradient(xp, rng):
    x, wt = random(xp, rng, (2, 5, 5, 1)), random(xp, rng, (3, 3, 1, 2))
    y, cache = conv2d_forward(x, wt)
    dx, dw, _ = conv2d_backward(xp.ones_like(y), cache, need_dx=False)
    assert dx is None and dw.shape == wt.shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_preserved_and_inputs_untouched(xp, rng, dtype):
    x, wt, b = random(xp, rng, (2, 6, 6, 3), dtype), random(xp, rng, (3, 3, 3, 4), dtype), random(xp, rng, (4,), dtype)
    copies = [a.copy() for a in (x, wt, b)]
    y, cache = conv2d_forward(x, wt, b, 1, 1)
    dy = random(xp, rng, y.shape, dtype)
    dy_copy = dy.copy()
    grads = conv2d_backward(dy, cache)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    for a, c in zip((x, wt, b, dy), copies + [dy_copy]):
        assert_close(a, c, rtol=0)


def test_non_contiguous_input(xp, rng):
    base = random(xp, rng, (2, 7, 7, 6))
    x = base[:, ::1, :, ::2]  # every other channel: not contiguous
    wt = random(xp, rng, (3, 3, 3, 2))
    y, _ = conv2d_forward(x, wt, None, 1, 1)
    ref = conv2d_loops(to_numpy(x), to_numpy(wt), None, (1, 1), (1, 1))
    assert_close(y, ref, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("stride, out_size", [(1, (4, 3)), (2, (2, 2)), (1, (5, 6))])
def test_out_size_computes_a_corner_of_the_output(xp, rng, stride, out_size):
    """y is the corner of the full output; dx, dw, db are those of the full convolution with
    dy zero outside the corner (x keeps its shape, zero where no computed output reads it)."""
    x, wt, b = random(xp, rng, (2, 8, 9, 3)), random(xp, rng, (3, 2, 3, 4)), random(xp, rng, (4,))
    full, full_cache = conv2d_forward(x, wt, b, stride)
    y, cache = conv2d_forward(x, wt, b, stride, 0, out_size=out_size)
    rows, cols = out_size
    assert y.shape == (2, rows, cols, 4)
    assert_close(y, full[:, :rows, :cols], rtol=1e-12, atol=1e-12)
    dy = random(xp, rng, y.shape)
    dy_full = xp.zeros_like(full)
    dy_full[:, :rows, :cols] = dy
    for got, ref, what in zip(conv2d_backward(dy, cache), conv2d_backward(dy_full, full_cache), ("dx", "dw", "db")):
        assert_close(got, ref, rtol=1e-12, atol=1e-12, what=what)


def test_out_size_outside_the_output_or_with_padding_is_refused(xp, rng):
    x, wt = random(xp, rng, (1, 6, 6, 1)), random(xp, rng, (3, 3, 1, 2))
    with pytest.raises(ValueError, match=r"out_size must be within the full output \(4, 4\)"):
        conv2d_forward(x, wt, None, 1, 0, out_size=(5, 4))
    with pytest.raises(ValueError, match="needs padding 0"):
        conv2d_forward(x, wt, None, 1, 1, out_size=(3, 3))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape, w_shape", [((200, 28, 28, 1), (3, 3, 1, 32)), ((40, 13, 13, 32), (3, 3, 32, 64))])
def test_kept_cols_give_the_gradients_of_rebuilt_cols(rng, monkeypatch, bias, x_shape, w_shape):
    """The seed network's conv1 (cols no wider than y) and conv2 (cols under KEEP_COLS_BYTES) over
    several chunks: the backward from the cols the forward kept equals the one that rebuilds them."""
    from cnn_gpu.functional import conv
    x = rng.standard_normal(x_shape).astype("float32")
    wt, b = rng.standard_normal(w_shape).astype("float32"), rng.standard_normal(w_shape[3]).astype("float32")
    y, cache = conv2d_forward(x, wt, b if bias else None)
    row_bytes = y.shape[1] * y.shape[2] * int(np.prod(w_shape[:3])) * 4
    assert cache[-1] is not None and len(conv._chunks(x, row_bytes)) > 1
    dy = rng.standard_normal(y.shape).astype("float32")
    kept = conv2d_backward(dy, cache)
    monkeypatch.setattr(conv, "_keeps_cols", lambda *args: False)
    y_rebuilt, rebuilt_cache = conv2d_forward(x, wt, b if bias else None)
    assert rebuilt_cache[-1] is None
    np.testing.assert_array_equal(y, y_rebuilt)  # the same GEMMs on the same cols: only where cols lives differs
    for got, ref in zip(kept, conv2d_backward(dy, rebuilt_cache)):
        if ref is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_inference_keeps_no_cols(rng):
    """inference=True: the same y, and no cols held in the cache (nothing will backpropagate)."""
    x = rng.standard_normal((8, 13, 13, 32)).astype("float32")
    wt, b = rng.standard_normal((3, 3, 32, 64)).astype("float32"), rng.standard_normal(64).astype("float32")
    y, cache = conv2d_forward(x, wt, b)
    y_inference, inference_cache = conv2d_forward(x, wt, b, inference=True)
    assert cache[-1] is not None and inference_cache[-1] is None
    np.testing.assert_array_equal(y_inference, y)  # the same chunks and GEMMs; only the cols buffer is reused


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_im2col_into_a_buffer_of_either_layout(rng, channels, layout):
    """im2col(out=...) writes the same cols into a row-major buffer and into one stored column
    by column (what cols_buffer gives for one input channel)."""
    from cnn_gpu.functional import conv
    x = rng.standard_normal((3, 7, 6, channels))
    expected, oh, ow = im2col(x, 3, 2, 1, 1, 1, 0)
    shape = (3 * oh * ow, 3 * 2 * channels + 1)  # one column more, as the bias column takes
    buf = np.full(shape[::-1], np.nan).T if layout == "columns" else np.full(shape, np.nan)
    im2col(x, 3, 2, 1, 1, 1, 0, out=buf[:, :-1])
    np.testing.assert_array_equal(buf[:, :-1], expected)
    assert np.isnan(buf[:, -1]).all()
    assert conv.cols_buffer(np, 10, 4, 1, "float32").T.flags.c_contiguous
    assert conv.cols_buffer(np, 10, 4, 2, "float32").flags.c_contiguous
