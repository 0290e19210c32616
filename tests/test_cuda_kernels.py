"""The CUDA kernels against the NumPy references in tests/gpu_reference.py (needs a GPU).

Outputs (and the batch-norm partials) are poisoned before each launch, through the
modules' `_*_into` helpers, so an element a kernel forgets to write shows up. Max-pool
routing must match exactly (argmax compared as integers, ties included); sums match to a
tolerance set by the dtype and the size of the terms.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu import backend
from cnn_gpu.cuda import batchnorm, loader, maxpool
from cnn_gpu.geometry import Window
from tests.conftest import requires_gpu
from tests.gpu_reference import (batch_norm_backward_dx_ref, channel_grad_sums_ref,
                                 channel_mean_var_ref, max_pool2d_backward_ref,
                                 max_pool2d_ref)

pytestmark = [pytest.mark.gpu, requires_gpu]

FLOATS = (np.float32, np.float64)
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture(scope="module")
def cp():
    return backend.require_cupy()


def _ids(v):
    return np.dtype(v).name if isinstance(v, type) else str(v)


def _bits(a) -> bytes:
    return backend.to_numpy(a).tobytes()


# ---------------------------------------------------------------- max pooling

def _pool_cases():
    """(window, ceil_mode): square kernels 1, 2, 3, 5 x strides 1, 2, 3 x every padding 0..k//2,
    in floor mode and, where it adds a window, ceil mode; non-square windows; dilation."""
    cases = [(Window.of(k, s, p), False) for k in (1, 2, 3, 5) for s in (1, 2, 3) for p in range(k // 2 + 1)]
    cases += [(Window.of(k, s, p), True) for k in (2, 3, 5) for s in (2, 3) for p in range(k // 2 + 1)]
    cases += [(Window.of((2, 3), (1, 2), (1, 1)), False), (Window.of((3, 1), (2, 1), (1, 0)), True),
              (Window.of((1, 4), (1, 3), (0, 2)), False), (Window.of((5, 3), (3, 2), (2, 0)), True)]
    cases += [(Window.of(3, 1, 1, 2), False), (Window.of(3, 2, 1, 2), True), (Window.of(2, 3, 1, 2), True),
              (Window.of((3, 2), (2, 3), (1, 0), (2, 3)), True), (Window.of(2, 1, 0, (1, 3)), False)]
    return cases


def _case_id(case):
    window, ceil_mode = case
    dilation = f"d{window.dh}x{window.dw}" if (window.dh, window.dw) != (1, 1) else ""
    return (f"k{window.kh}x{window.kw}s{window.sh}x{window.sw}p{window.ph}x{window.pw}{dilation}"
            + ("-ceil" if ceil_mode else ""))


POOL_CASES = _pool_cases()
SHAPES = [(2, 9, 7, 3), (1, 13, 10, 5), (3, 8, 11, 1), (2, 11, 6, 33), (1, 5, 12, 64)]


def _input(rng, shape, dtype, ties):
    if ties:  # few distinct values: most windows hold several equal maxima
        return rng.integers(-2, 3, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _poisoned_forward(cp, x, window, ceil_mode=False):
    n, h, w, c = x.shape
    oh, ow = window.output_hw(h, w, "test", ceil_mode)
    y = cp.full((n, oh, ow, c), np.nan, dtype=x.dtype)
    index = maxpool.argmax_dtype(window)
    argmax = cp.full((n, oh, ow, c), np.iinfo(index).max, dtype=index)
    maxpool._forward_into(x, y, argmax, window)
    return y, argmax


def _poisoned_backward(cp, dy, argmax, x_shape, window):
    dx = cp.full(x_shape, np.nan, dtype=dy.dtype)
    maxpool._backward_into(dy, argmax, dx, window)
    return dx


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("case", range(len(POOL_CASES)), ids=[_case_id(c) for c in POOL_CASES])
def test_max_pool_matches_reference(cp, case, dtype, ties):
    window, ceil_mode = POOL_CASES[case]
    rng = np.random.default_rng(case)
    shape = SHAPES[case % len(SHAPES)]
    x = _input(rng, shape, dtype, ties)
    y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)

    y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
    assert argmax.dtype == argmax_ref.dtype
    np.testing.assert_array_equal(argmax.get(), argmax_ref)
    np.testing.assert_array_equal(y.get(), y_ref)

    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = max_pool2d_backward_ref(dy, argmax_ref, shape, window)
    dx = _poisoned_backward(cp, cp.asarray(dy), argmax, shape, window)
    np.testing.assert_allclose(dx.get(), dx_ref, rtol=RTOL[np.dtype(dtype)],
                               atol=RTOL[np.dtype(dtype)])

    # the public functions give the same bits
    out_hw = window.output_hw(*shape[1:3], "test", ceil_mode)
    y2, argmax2 = maxpool.max_pool2d_forward(cp.asarray(x), window, out_hw)
    assert _bits(y2) == _bits(y) and _bits(argmax2) == _bits(argmax)
    assert _bits(maxpool.max_pool2d(cp.asarray(x), window, out_hw)) == _bits(y)
    dx2 = maxpool.max_pool2d_backward(cp.asarray(dy), argmax2, shape, window)
    assert _bits(dx2) == _bits(dx)


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("case", [(Window.of(3, 2, 1), True), (Window.of(3, 1, 1, 2), False),
                                  (Window.of((3, 2), (2, 3), (1, 0), (2, 3)), True), (Window.of(5, 2, 2), False)],
                         ids=["3x3s2p1-ceil", "3x3s1p1d2", "3x2-dilated-ceil", "5x5s2p2"])
def test_max_pool_backward_adds_in_the_numpy_codes_order(cp, dtype, case):
    """Overlapping windows: the gather adds an input's gradients by ascending tap, as the NumPy
    code does, so the two agree to the last bit (float64: no flush-to-zero to tell them apart)."""
    from cnn_gpu.functional.pool import _plain_backward
    window, ceil_mode = case
    rng = np.random.default_rng(21)
    x = rng.integers(-1, 2, size=(2, 15, 14, 8)).astype(dtype)  # ties: inputs that win several windows
    y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = _poisoned_backward(cp, cp.asarray(dy), argmax, x.shape, window)
    dx_numpy = _plain_backward(dy, argmax.get(), x.shape, window)
    if dtype == np.float64:
        np.testing.assert_array_equal(dx.get(), dx_numpy)
    else:  # float32 sums on the GPU flush subnormals (-ftz=true): equal to rounding
        np.testing.assert_allclose(dx.get(), dx_numpy, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c", [5, 8])  # the scalar and the 4-channel vector path
@pytest.mark.parametrize("case", [(Window.of(2, 2), False), (Window.of(3, 2, 1), True), (Window.of(2, 3, 1), False),
                                  (Window.of(3, 1, 1, 2), False)], ids=_case_id)
def test_max_pool_64_bit_offsets_give_the_same_result(cp, monkeypatch, case, c):
    # The 64-bit instantiations only run for tensors past 2**32 elements; force them here.
    window, ceil_mode = case
    x = np.random.default_rng(3).standard_normal((2, 9, 8, c)).astype(np.float32)
    y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)
    dy = np.random.default_rng(4).standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = max_pool2d_backward_ref(dy, argmax_ref, x.shape, window)
    monkeypatch.setattr(maxpool, "_offset_type", lambda *arrays: "unsigned long long")
    y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
    np.testing.assert_array_equal(y.get(), y_ref)
    np.testing.assert_array_equal(argmax.get(), argmax_ref)
    dx = _poisoned_backward(cp, cp.asarray(dy), argmax, x.shape, window)
    np.testing.assert_allclose(dx.get(), dx_ref, rtol=1e-6, atol=1e-6)


# Channel counts on both sides of the vector width (4 floats / 2 doubles per thread step).
VECTOR_CHANNELS = ([(np.float32, c) for c in (1, 3, 4, 8, 64)]
                   + [(np.float64, c) for c in (1, 2, 3, 64)])
# Overlapping (gather) and non-overlapping (scatter) windows, with padding, with gaps
# between windows (stride > pool), windows cut by the padded border, ceil mode and dilation.
VECTOR_POOLS = [(Window.of(2, 2), False), (Window.of(3, 2, 1), False), (Window.of(3, 1, 1), False),
                (Window.of((2, 3), (3, 2), (1, 1)), False), (Window.of((3, 2), (4, 3), (1, 0)), False),
                (Window.of(5, (2, 3), (2, 1)), False), (Window.of(3, 2, 1), True), (Window.of(2, 2), True),
                (Window.of(3, 1, 1, 2), False), (Window.of(2, 3, 1, 2), True)]


@pytest.mark.parametrize("values", ["distinct", "ties", "specials"])
@pytest.mark.parametrize("dtype,c", VECTOR_CHANNELS,
                         ids=[f"{np.dtype(d).name}-C{c}" for d, c in VECTOR_CHANNELS])
def test_max_pool_vector_path_matches_reference_and_scalar_path(cp, monkeypatch, dtype, c, values):
    """V channels per thread: the very bits of the reference (forward) and of V = 1 (both)."""
    rng = np.random.default_rng(c)
    shape = (3, 11, 9, c)  # odd H and W: windows cut by the border, uncovered rows/columns
    x = _input(rng, shape, dtype, ties=values != "distinct")
    if values == "specials":
        specials = rng.choice([np.nan, np.inf, -np.inf], size=shape)
        x = np.where(rng.random(shape) < 0.2, specials, x).astype(dtype)
    wide = 16 // np.dtype(dtype).itemsize
    x_gpu = cp.asarray(x)
    assert maxpool._vector_width(c, x_gpu) == (wide if c % wide == 0 else 1)
    for window, ceil_mode in VECTOR_POOLS:
        y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)
        dy = cp.asarray(rng.standard_normal(y_ref.shape).astype(dtype))
        y, argmax = _poisoned_forward(cp, x_gpu, window, ceil_mode)
        np.testing.assert_array_equal(argmax.get(), argmax_ref)
        np.testing.assert_array_equal(y.get(), y_ref)  # NaN == NaN here
        dx = _poisoned_backward(cp, dy, argmax, shape, window)
        dx_ref = max_pool2d_backward_ref(dy.get(), argmax_ref, shape, window)
        np.testing.assert_allclose(dx.get(), dx_ref, rtol=RTOL[np.dtype(dtype)],
                                   atol=RTOL[np.dtype(dtype)])
        with monkeypatch.context() as m:  # the same launches with V = 1
            m.setattr(maxpool, "_vector_width", lambda c, *arrays: 1)
            y1, argmax1 = _poisoned_forward(cp, x_gpu, window, ceil_mode)
            dx1 = _poisoned_backward(cp, dy, argmax1, shape, window)
        assert _bits(y1) == _bits(y) and _bits(argmax1) == _bits(argmax)
        assert _bits(dx1) == _bits(dx), (window, ceil_mode)


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
def test_max_pool_misaligned_view_falls_back_to_the_scalar_path(cp, dtype):
    """A contiguous view one element into its buffer cannot take vector loads."""
    shape, window = (2, 7, 10, 8), Window.of(3, 2, 1)
    rng = np.random.default_rng(12)
    flat = cp.asarray(rng.standard_normal(1 + int(np.prod(shape))).astype(dtype))
    x = flat[1:].reshape(shape)
    assert x.flags.c_contiguous and maxpool._vector_width(8, x) == 1
    y_ref, argmax_ref = max_pool2d_ref(x.get(), window)
    y, argmax = maxpool.max_pool2d_forward(x, window, window.output_hw(7, 10, "test"))
    np.testing.assert_array_equal(argmax.get(), argmax_ref)
    np.testing.assert_array_equal(y.get(), y_ref)
    dy_flat = cp.asarray(rng.standard_normal(1 + y.size).astype(dtype))
    dy = dy_flat[1:].reshape(y.shape)
    dx = maxpool.max_pool2d_backward(dy, argmax, shape, window)
    assert _bits(dx) == _bits(maxpool.max_pool2d_backward(dy.copy(), argmax, shape, window))


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
def test_max_pool_nan_and_infinities_follow_numpy_argmax(cp, dtype):
    rng = np.random.default_rng(7)
    x = rng.integers(-1, 2, size=(2, 10, 9, 4)).astype(dtype)
    specials = rng.choice([np.nan, np.inf, -np.inf], size=x.shape)
    x = np.where(rng.random(x.shape) < 0.2, specials, x).astype(dtype)
    for window, ceil_mode in [(Window.of(2, 2), False), (Window.of(3, 1, 1), False),
                              (Window.of((3, 2), (2, 1), (1, 1)), False), (Window.of(3, 2, 1, 2), True)]:
        y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)
        y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
        np.testing.assert_array_equal(argmax.get(), argmax_ref)
        np.testing.assert_array_equal(y.get(), y_ref)  # NaN == NaN here


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("channels", [5, 8], ids=["C5-scalar", "C8-vector"])
def test_max_pool_subnormals_and_signed_zeros_follow_numpy_argmax(cp, dtype, channels):
    """CuPy compiles with -ftz=true; the comparison must still see subnormals (and -0 == 0),
    on the one-channel path (C=5) and the vector path (C=8)."""
    rng = np.random.default_rng(9)
    tiny = np.finfo(dtype).smallest_subnormal
    x = (rng.integers(-3, 4, size=(2, 9, 8, channels)) * tiny).astype(dtype)
    x[rng.random(x.shape) < 0.2] = -0.0
    for window in [Window.of(2, 2), Window.of(3, 1, 1)]:
        y_ref, argmax_ref = max_pool2d_ref(x, window)
        y, argmax = _poisoned_forward(cp, cp.asarray(x), window)
        np.testing.assert_array_equal(argmax.get(), argmax_ref)
        assert _bits(y) == y_ref.tobytes()  # the very same values, -0.0 included


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("case", [(Window.of(3, (1, 2), 1), False), (Window.of(2, 1, 1, (2, 3)), False)],
                         ids=["padding", "dilated-window-of-padding-alone"])
def test_max_pool_all_minus_inf_routes_to_the_first_tap_or_drops(cp, dtype, case):
    """Windows of -inf pick tap 0, which may lie outside the input: that dy is dropped. In the
    dilated case the 1 x 2 input leaves a window with no input position at all."""
    window, ceil_mode = case
    shape = (1, 6, 5, 2) if window.dh == 1 else (1, 1, 2, 2)
    x = np.full(shape, -np.inf, dtype=dtype)
    y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)
    assert (argmax_ref == 0).all()
    y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
    np.testing.assert_array_equal(argmax.get(), argmax_ref)
    np.testing.assert_array_equal(y.get(), y_ref)
    dy = np.arange(1, y_ref.size + 1, dtype=dtype).reshape(y_ref.shape)
    dx = _poisoned_backward(cp, cp.asarray(dy), argmax, shape, window)
    np.testing.assert_array_equal(dx.get(), max_pool2d_backward_ref(dy, argmax_ref, shape, window))


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
def test_max_pool_large_window_uses_int32_argmax(cp, dtype):
    shape, window = (2, 20, 23, 3), Window.of(17, (3, 5), (8, 0))
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    for ceil_mode in (False, True):
        y_ref, argmax_ref = max_pool2d_ref(x, window, ceil_mode)
        assert argmax_ref.dtype == np.int32
        y, argmax = _poisoned_forward(cp, cp.asarray(x), window, ceil_mode)
        np.testing.assert_array_equal(argmax.get(), argmax_ref)
        np.testing.assert_array_equal(y.get(), y_ref)
        dy = rng.standard_normal(y_ref.shape).astype(dtype)
        dx = _poisoned_backward(cp, cp.asarray(dy), argmax, shape, window)
        np.testing.assert_allclose(dx.get(), max_pool2d_backward_ref(dy, argmax_ref, shape, window),
                                   rtol=RTOL[np.dtype(dtype)], atol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("window", [Window.of(5, 2, 2), Window.of(3, 1, 1, 2)], ids=["5x5s2p2", "3x3s1p1d2"])
def test_max_pool_overlapping_backward_is_deterministic(cp, dtype, window):
    """stride < pool: up to 9 windows feed one input; two runs give the same bits."""
    shape = (4, 33, 31, 67)
    rng = np.random.default_rng(11)
    x = cp.asarray(rng.integers(-2, 3, size=shape).astype(dtype))
    y, argmax = _poisoned_forward(cp, x, window)
    dy = cp.asarray(rng.standard_normal(y.shape).astype(dtype))
    first = _poisoned_backward(cp, dy, argmax, shape, window)
    second = _poisoned_backward(cp, dy, argmax, shape, window)
    assert _bits(first) == _bits(second)
    ref = max_pool2d_backward_ref(dy.get(), argmax.get(), shape, window)
    np.testing.assert_allclose(first.get(), ref, rtol=RTOL[np.dtype(dtype)],
                               atol=RTOL[np.dtype(dtype)])


def test_max_pool_non_contiguous_input_and_input_untouched(cp):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 10, 18, 6)).astype(np.float32)
    x_host = base[:, :, ::2, :]                       # (2, 10, 9, 6), strided
    x = cp.asarray(base)[:, :, ::2, :]
    assert not x.flags.c_contiguous
    window = Window.of((3, 2), 2, (1, 0))
    y, argmax = maxpool.max_pool2d_forward(x, window, window.output_hw(10, 9, "test", ceil_mode=True))
    y_ref, argmax_ref = max_pool2d_ref(x_host, window, True)
    np.testing.assert_array_equal(argmax.get(), argmax_ref)
    np.testing.assert_array_equal(y.get(), y_ref)
    np.testing.assert_array_equal(x.get(), x_host)


def test_max_pool_rejects_bad_inputs(cp):
    window = Window.of(2, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        maxpool.max_pool2d_forward(cp.zeros((1, 4, 4, 1), dtype=cp.float16), window, (2, 2))
    with pytest.raises(TypeError, match="cupy.ndarray"):
        maxpool.max_pool2d_forward(np.zeros((1, 4, 4, 1), np.float32), window, (2, 2))
    with pytest.raises(TypeError, match="geometry.Window"):
        maxpool.max_pool2d_forward(cp.zeros((1, 4, 4, 1), cp.float32), ((2, 2), (2, 2), (0, 0)), (2, 2))
    with pytest.raises(ValueError, match="32-bit"):
        maxpool.max_pool2d_forward(cp.zeros((1, 4, 4, 1), cp.float32), window, (2**31, 2))
    y, argmax = maxpool.max_pool2d_forward(cp.zeros((1, 4, 4, 1), cp.float32), window, (2, 2))
    with pytest.raises(TypeError, match="argmax"):
        maxpool.max_pool2d_backward(y, argmax.astype(cp.int32), (1, 4, 4, 1), window)
    with pytest.raises(ValueError, match="dy has shape"):
        maxpool.max_pool2d_backward(y, argmax, (1, 4, 4, 2), window)
    with pytest.raises(ValueError, match="argmax must be"):
        maxpool.max_pool2d_backward(y, argmax[:, :1], (1, 4, 4, 1), window)


def test_max_pool_empty_batch(cp):
    window = Window.of(2, 2)
    y, argmax = maxpool.max_pool2d_forward(cp.zeros((0, 4, 4, 3), cp.float32), window, (2, 2))
    assert y.shape == argmax.shape == (0, 2, 2, 3)
    dx = maxpool.max_pool2d_backward(y, argmax, (0, 4, 4, 3), window)
    assert dx.shape == (0, 4, 4, 3)


# ---------------------------------------------------------------- batch norm

BN_SIZES = [(m, c) for c in (1, 3, 32, 64) for m in (1, 7, 1000, 1_000_000)]
BN_SIZES += [(1, 1000), (7, 1000), (20_000, 1000), (300, 33)]


def _parts_choices(m, c, blocks_per_sm):
    """The planned grid, a single block, and more blocks than there are rows to give out."""
    planned, _ = batchnorm.plan(m, c, blocks_per_sm * loader.current_sm_count())
    return sorted({planned, 1, 3 * planned + 1})


def _poisoned_mean_var(cp, x, parts):
    m, c = x.shape
    mean = cp.full(c, np.nan, dtype=x.dtype)
    var = cp.full(c, np.nan, dtype=x.dtype)
    batchnorm._mean_var_into(x, mean, var,
                             cp.full((parts, c), 2**62, dtype=cp.int64),
                             cp.full((parts, c), np.nan, dtype=x.dtype),
                             cp.full((parts, c), np.nan, dtype=x.dtype))
    return mean, var


def _poisoned_grad_sums(cp, dy, x, mean, inv_std, parts):
    c = x.shape[1]
    sum_dy = cp.full(c, np.nan, dtype=x.dtype)
    sum_dy_xhat = cp.full(c, np.nan, dtype=x.dtype)
    batchnorm._grad_sums_into(dy, x, mean, inv_std, sum_dy, sum_dy_xhat,
                              cp.full((parts, c), np.nan, dtype=x.dtype),
                              cp.full((parts, c), np.nan, dtype=x.dtype))
    return sum_dy, sum_dy_xhat


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("m,c", BN_SIZES, ids=[f"M{m}xC{c}" for m, c in BN_SIZES])
def test_channel_mean_var_matches_reference(cp, m, c, dtype):
    rng = np.random.default_rng(m + c)
    x_host = (rng.standard_normal((m, c), dtype=np.float32) * 2.5 + 3.0).astype(dtype)
    mean_ref, var_ref = channel_mean_var_ref(x_host)
    rtol = RTOL[np.dtype(dtype)]
    x = cp.asarray(x_host)
    results = []
    for parts in _parts_choices(m, c, batchnorm.MEAN_VAR_BLOCKS_PER_SM):
        mean, var = _poisoned_mean_var(cp, x, parts)
        np.testing.assert_allclose(mean.get(), mean_ref, rtol=rtol, atol=rtol * 3.0)
        np.testing.assert_allclose(var.get(), var_ref, rtol=rtol, atol=rtol * 1e-3)
        results.append((mean, var))
    mean, var = batchnorm.channel_mean_var(x)
    again = batchnorm.channel_mean_var(x)
    assert _bits(mean) == _bits(again[0]) and _bits(var) == _bits(again[1])  # deterministic
    np.testing.assert_allclose(var.get(), var_ref, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_array_equal(x.get(), x_host)  # input untouched


@pytest.mark.parametrize("c", [3, 64])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-3), (np.float64, 1e-10)], ids=_ids)
def test_channel_var_stays_accurate_when_mean_is_1e4_std(cp, dtype, tol, c):
    rng = np.random.default_rng(c)
    x_host = (1e4 + rng.standard_normal((200_000, c))).astype(dtype)
    mean_ref, var_ref = channel_mean_var_ref(x_host)
    mean, var = batchnorm.channel_mean_var(cp.asarray(x_host))
    rel = np.abs(var.get() - var_ref) / var_ref
    assert rel.max() < tol, f"relative error of var up to {rel.max():.3g}"
    np.testing.assert_allclose(mean.get(), mean_ref, rtol=tol)


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
@pytest.mark.parametrize("m,c", BN_SIZES, ids=[f"M{m}xC{c}" for m, c in BN_SIZES])
def test_channel_grad_sums_match_reference(cp, m, c, dtype):
    rng = np.random.default_rng(10 * m + c)
    x_host = (rng.standard_normal((m, c), dtype=np.float32) * 2.0 + 5.0).astype(dtype)
    dy_host = rng.standard_normal((m, c), dtype=np.float32).astype(dtype)
    mean64, var64 = channel_mean_var_ref(x_host)
    mean_host = mean64.astype(dtype)
    inv_std_host = (1.0 / np.sqrt(var64 + 1e-5)).astype(dtype)
    sum_dy_ref, sum_dy_xhat_ref = channel_grad_sums_ref(dy_host, x_host, mean_host, inv_std_host)
    # tolerance in units of the sum of |terms|: what rounding can reach whatever the order
    scale_dy = np.abs(dy_host.astype(np.float64)).sum(0)
    scale_xhat = np.abs(dy_host * ((x_host - mean_host) * inv_std_host)).astype(np.float64).sum(0)
    rtol = RTOL[np.dtype(dtype)]
    dy, x = cp.asarray(dy_host), cp.asarray(x_host)
    mean, inv_std = cp.asarray(mean_host), cp.asarray(inv_std_host)
    for parts in _parts_choices(m, c, batchnorm.GRAD_SUMS_BLOCKS_PER_SM):
        s, sx = _poisoned_grad_sums(cp, dy, x, mean, inv_std, parts)
        assert (np.abs(s.get() - sum_dy_ref) <= rtol * scale_dy + 1e-30).all()
        assert (np.abs(sx.get() - sum_dy_xhat_ref) <= rtol * scale_xhat + 1e-30).all()
    s, sx = batchnorm.channel_grad_sums(dy, x, mean, inv_std)
    s2, sx2 = batchnorm.channel_grad_sums(dy, x, mean, inv_std)
    assert _bits(s) == _bits(s2) and _bits(sx) == _bits(sx2)
    assert (np.abs(sx.get() - sum_dy_xhat_ref) <= rtol * scale_xhat + 1e-30).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
def test_batch_norm_elementwise_kernels(cp, dtype):
    rng = np.random.default_rng(2)
    n, h, w, c = 4, 5, 3, 16
    x_host = (rng.standard_normal((n, h, w, c)) * 3 + 1).astype(dtype)
    dy_host = rng.standard_normal((n, h, w, c)).astype(dtype)
    gamma_host = rng.standard_normal(c).astype(dtype)
    beta_host = rng.standard_normal(c).astype(dtype)
    mean64, var64 = channel_mean_var_ref(x_host.reshape(-1, c))
    inv_std64 = 1.0 / np.sqrt(var64 + 1e-5)
    x, dy = cp.asarray(x_host), cp.asarray(dy_host)
    mean, inv_std = cp.asarray(mean64.astype(dtype)), cp.asarray(inv_std64.astype(dtype))
    gamma, beta = cp.asarray(gamma_host), cp.asarray(beta_host)
    rtol = 1e-5 if dtype == np.float32 else 1e-12

    y = batchnorm.batch_norm_normalize(x, mean, inv_std, gamma, beta)
    y_ref = (x_host - mean64) * inv_std64 * gamma_host + beta_host
    np.testing.assert_allclose(y.get(), y_ref, rtol=rtol, atol=rtol * 10)

    s, sx = batchnorm.channel_grad_sums(dy.reshape(-1, c), x.reshape(-1, c), mean, inv_std)
    dx = batchnorm.batch_norm_backward_dx(dy, x, mean, inv_std, gamma, s, sx)
    dx_ref = batch_norm_backward_dx_ref(dy_host.reshape(-1, c), x_host.reshape(-1, c),
                                        mean64, inv_std64, gamma_host.astype(np.float64))
    np.testing.assert_allclose(dx.get().reshape(-1, c), dx_ref, rtol=10 * rtol, atol=10 * rtol)


def test_batch_norm_non_contiguous_and_bad_inputs(cp):
    rng = np.random.default_rng(4)
    x_host = rng.standard_normal((500, 40)).astype(np.float64)
    x = cp.asfortranarray(cp.asarray(x_host))
    mean, var = batchnorm.channel_mean_var(x)
    mean_ref, var_ref = channel_mean_var_ref(x_host)
    np.testing.assert_allclose(var.get(), var_ref, rtol=1e-12)
    np.testing.assert_allclose(mean.get(), mean_ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="float32 or float64"):
        batchnorm.channel_mean_var(x.astype(cp.float16))
    with pytest.raises(ValueError, match="2-D"):
        batchnorm.channel_mean_var(x.reshape(10, 50, 40))
    with pytest.raises(ValueError, match="at least one row"):
        batchnorm.channel_mean_var(cp.zeros((0, 4), cp.float32))
    empty_mean, empty_var = batchnorm.channel_mean_var(cp.zeros((5, 0), cp.float32))
    assert empty_mean.shape == empty_var.shape == (0,)
