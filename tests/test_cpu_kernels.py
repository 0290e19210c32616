"""The compiled CPU kernels (cnn_gpu.cpu, Numba) against the NumPy code they replace.

Max pooling must agree bit for bit (values, argmax, gradients; ties and NaNs included). Batch
norm sums in another order (float64 sums in one pass where NumPy sums float32 blocks), so it
agrees to float32 rounding, and is checked against float64 on inputs whose mean dwarfs their spread.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cnn_gpu import SGD, Parameter, cpu
from cnn_gpu.functional import (batch_norm_backward, col2im, conv2d_backward, conv2d_forward, batch_norm_forward, max_pool2d, max_pool2d_backward,
                                im2col, max_pool2d_forward)

from cnn_gpu.geometry import Window

from .conftest import requires_jit


def _numpy_code(function, *args, **kwargs):
    """function(*args) with the compiled kernels switched off: the NumPy reference."""
    previous = cpu.set_enabled(False)
    try:
        return function(*args, **kwargs)
    finally:
        cpu.set_enabled(previous)


@pytest.fixture
def jit():
    previous = cpu.set_enabled(True)
    yield
    cpu.set_enabled(previous)


# (N, H, W, C, kernel, stride, padding, dilation, ceil_mode): the seed network's two pools, odd
# sizes (a row and column no window covers), wide and one-channel inputs, non-square windows, a
# window over 256 taps (int32 argmax); overlapping windows (the ImageNet stem's 3x3/2/1, stride 1),
# ceil mode, dilation, and gaps between windows (the general kernels).
POOL_CASES = [(4, 26, 26, 32, 2, None, 0, 1, False), (3, 11, 11, 64, 2, None, 0, 1, False),
              (2, 7, 9, 3, 2, None, 0, 1, False), (2, 9, 9, 5, 3, None, 0, 1, False),
              (3, 6, 9, 1, (2, 3), None, 0, 1, False), (1, 17, 17, 2, 17, None, 0, 1, False),
              (2, 11, 11, 8, 2, None, 0, 1, True), (2, 13, 12, 16, 3, 2, 1, 1, False),
              (2, 14, 12, 16, 3, 2, 1, 1, True), (2, 8, 7, 3, 3, 1, 1, 1, False),
              (2, 9, 10, 4, 3, 1, 1, 2, False), (1, 10, 9, 3, (3, 2), (2, 3), (1, 0), (2, 3), True),
              (2, 8, 9, 3, 2, 3, 1, 2, True), (1, 20, 19, 2, 17, 3, 8, 1, True)]


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("case", POOL_CASES, ids=["x".join(map(str, c[1:4])) + "-" + "-".join(map(str, c[4:]))
                                                  for c in POOL_CASES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("values", ["continuous", "ties", "nan"])
def test_max_pool_kernels_equal_the_numpy_code(rng, case, dtype, values):
    """Values, argmax, evaluation and gradients, exactly: where windows overlap the kernels add an
    input's gradients in the NumPy code's order (by ascending tap), so the sums round alike."""
    n, h, w, c, *args = case
    if values == "continuous":
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
    else:
        x = rng.integers(0, 3, (n, h, w, c)).astype(dtype)  # many equal values in a window
        if values == "nan":
            x[rng.random(x.shape) < 0.05] = np.nan
    y, cache = max_pool2d_forward(x, *args)
    ref_y, ref_cache = _numpy_code(max_pool2d_forward, x, *args)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(cache.argmax, ref_cache.argmax)
    assert cache.argmax.dtype == ref_cache.argmax.dtype
    np.testing.assert_array_equal(max_pool2d(x, *args), ref_y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    # Equal values (the NumPy blocks write dy * 0 = -0.0 where the kernels write 0.0).
    np.testing.assert_array_equal(max_pool2d_backward(dy, cache), _numpy_code(max_pool2d_backward, dy, ref_cache))


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("args", [(2,), (3, 2, 1, 1, True)], ids=["2x2", "3x3-2-1-ceil"])
def test_max_pool_kernels_take_non_contiguous_inputs(rng, args):
    x = rng.standard_normal((4, 8, 8, 6)).astype("float32")[:, :, ::-1, 1:5]
    y, cache = max_pool2d_forward(x, *args)
    np.testing.assert_array_equal(y, _numpy_code(max_pool2d_forward, x, *args)[0])
    dy = rng.standard_normal(y.shape).astype("float32")[..., ::-1]
    np.testing.assert_array_equal(max_pool2d_backward(dy, cache), _numpy_code(max_pool2d_backward, dy, cache))


# (N, H, W, C, KH, KW, stride, padding, dilation): the seed network's conv2, strides, padding, dilation.
COL2IM_CASES = [(3, 13, 13, 32, 3, 3, 1, 0, 1), (2, 7, 6, 3, 3, 3, 2, 1, 1), (2, 9, 7, 2, 3, 5, (2, 1), (1, 2), 1),
                (1, 5, 5, 2, 5, 3, 2, 1, 1), (2, 11, 10, 3, 3, 3, 1, 2, 2),
                (1, 12, 11, 2, 3, 2, (2, 1), (1, 2), (2, 3))]


@requires_jit
@pytest.mark.parametrize("case", COL2IM_CASES)
def test_col2im_kernel_equals_the_numpy_code(rng, case):
    """The same terms added in the same (kh, kw) order: equal bit for bit."""
    from cnn_gpu.cpu import conv as cpu_conv
    n, h, w, c, kh, kw, stride, padding, dilation = case
    window = Window.of((kh, kw), stride, padding, dilation)
    oh, ow = window.output_hw(h, w, "test")
    cols = im2col(rng.standard_normal((n, h, w, c)).astype("float32"), window, oh, ow)[0]  # one group
    dcols = rng.standard_normal(cols.shape).astype("float32")
    out = np.full((n, h, w, c), np.nan, dtype="float32")  # every element must be written
    cpu_conv.col2im(dcols, window, oh, ow, out=out)
    np.testing.assert_array_equal(out, col2im(dcols[None], (n, h, w, c), window, oh, ow))


@requires_jit
@pytest.mark.usefixtures("jit")
def test_conv_input_gradient_through_col2im_matches_the_numpy_code(rng):
    """The seed network's conv2 at a batch of several chunks: dx from the compiled path."""
    x = rng.standard_normal((40, 13, 13, 32)).astype("float32")
    w, b = rng.standard_normal((3, 3, 32, 64)).astype("float32"), rng.standard_normal(64).astype("float32")
    y, cache = conv2d_forward(x, w, b)
    dy = rng.standard_normal(y.shape).astype("float32")
    for got, ref in zip(conv2d_backward(dy, cache), _numpy_code(conv2d_backward, dy, cache)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# (N, H, W, C, multiplier, kernel, stride, padding, dilation): MobileNet's depthwise 3x3 at stride 1
# and 2, a multiplier, a 5x5, dilation, and batch 1.
DEPTHWISE_CASES = [(4, 28, 28, 32, 1, 3, 1, 1, 1), (4, 14, 14, 64, 1, 3, 2, 1, 1), (3, 9, 8, 5, 2, 3, 1, 1, 1),
                   (2, 11, 10, 4, 1, 5, 2, 2, 1), (2, 12, 13, 3, 3, 3, (1, 2), (2, 1), (2, 1)),
                   (1, 7, 7, 128, 1, 3, 1, 1, 1)]


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_kernels_match_the_numpy_code(rng, case, dtype, bias):
    """cnn_gpu/cpu/depthwise.py against the NumPy per-tap code it replaces. Another summation
    order (padded taps skipped, not multiplied by zero; dw summed per image, then in float64), so
    equal to the dtype's rounding."""
    n, h, w, c, mult, k, stride, padding, dilation = case
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    wt, b = rng.standard_normal((k, k, 1, c * mult)).astype(dtype), rng.standard_normal(c * mult).astype(dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    y, cache = conv2d_forward(x, wt, b if bias else None, **geometry)
    ref_y, ref_cache = _numpy_code(conv2d_forward, x, wt, b if bias else None, **geometry)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(y, ref_y, rtol=tol, atol=tol * np.abs(ref_y).max())
    dy = rng.standard_normal(y.shape).astype(dtype)
    for need_dx in (True, False):
        got, ref = conv2d_backward(dy, cache, need_dx), _numpy_code(conv2d_backward, dy, ref_cache, need_dx)
        for g, r in zip(got, ref):
            if r is None:
                assert g is None
            else:
                assert g.dtype == dtype
                np.testing.assert_allclose(g, r, rtol=tol, atol=tol * np.abs(r).max())


# (shape, offset): the seed network's three batch norms, inputs far from zero, channels the float32
# sums' vector kernels do not take (3, 2: not a multiple of simd.LANES64; 8 on AVX-512: not of the
# gradient sums' 2 * LANES64), the 16 that they take, and an odd row count (105).
BN_CASES = [((8, 26, 26, 32), 0.0), ((16, 11, 11, 64), 0.0), ((64, 128), 0.0), ((5, 7, 3), 1e3), ((4, 6, 6, 2), 1e4),
            ((3, 5, 7, 16), 1e3), ((2, 5, 5, 8), 1e2)]


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("shape, offset", BN_CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_batch_norm_kernels_match_the_numpy_code(rng, shape, offset, training, relu):
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + offset).astype("float32")
    gamma = rng.uniform(0.5, 1.5, c).astype("float32")
    beta = rng.standard_normal(c).astype("float32")
    running = (np.full(c, offset, "float32"), rng.uniform(2.0, 6.0, c).astype("float32"))
    ref_running = tuple(v.copy() for v in running)  # each forward updates its own in place
    y, cache = batch_norm_forward(x, gamma, beta, *running, training=training, relu=relu)
    ref_y, ref_cache = _numpy_code(batch_norm_forward, x, gamma, beta, *ref_running, training=training, relu=relu)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
    for value, ref in zip(running, ref_running):
        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(shape).astype("float32")
    for got, ref in zip(batch_norm_backward(dy, cache), _numpy_code(batch_norm_backward, dy, ref_cache)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_batch_norm_kernels_statistics_match_float64(rng, offset):
    """float32 in, float64 sums: the mean and variance to float32 rounding of the exact ones."""
    x = (rng.standard_normal((64 * 26 * 26, 32)) * 0.5 + offset).astype("float32")
    from cnn_gpu.cpu import batchnorm
    mean, var = batchnorm.channel_mean_var(x)
    exact = x.astype(np.float64)
    assert mean.dtype == var.dtype == np.float32
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var, exact.var(axis=0), rtol=1e-5)


@requires_jit
@pytest.mark.usefixtures("jit")
def test_batch_norm_gradients_through_the_kernels_match_finite_differences(rng):
    """float64 all the way: the kernels' backward is the derivative of their forward."""
    from .helpers import numerical_gradients
    x = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    gamma, beta, dy = rng.standard_normal(2), rng.standard_normal(2), rng.standard_normal((3, 4, 5, 2))
    _, cache = batch_norm_forward(x, gamma, beta, training=True)
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    num_x, num_gamma, num_beta = numerical_gradients(
        lambda a, g, b: batch_norm_forward(a, g, b, training=True)[0], [x, gamma, beta], dy)
    np.testing.assert_allclose(dx, num_x, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, num_gamma, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, num_beta, rtol=1e-6, atol=1e-8)


@requires_jit
def test_the_kernels_run_only_where_they_apply(rng, monkeypatch):
    """Switched on: float32/float64 NumPy arrays of one dtype go through them, max pooling of
    every geometry included; other dtypes and mixed dtypes take the NumPy code. Switched off:
    nothing does."""
    from cnn_gpu.cpu import maxpool
    from cnn_gpu.geometry import Window
    calls = []
    real = maxpool.max_pool2d_forward
    monkeypatch.setattr(maxpool, "max_pool2d_forward", lambda *a: calls.append(a[1:]) or real(*a))
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    previous = cpu.set_enabled(True)
    try:
        assert cpu.runs_on(x, x.astype("float32")) and not cpu.runs_on(x, x.astype("float64"))
        assert not cpu.runs_on(x.astype("float16")) and not cpu.runs_on(x.tolist())
        max_pool2d_forward(x, 2)
        max_pool2d_forward(x, 3, 2, 1, ceil_mode=True)  # overlapping, padded, ceil mode
        assert calls == [(Window.of(2, 2), (3, 3)), (Window.of(3, 2, 1), (4, 4))]
        cpu.set_enabled(False)
        max_pool2d_forward(x, 2)
        assert len(calls) == 2 and not cpu.runs_on(x)
    finally:
        cpu.set_enabled(previous)


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_environment_switches_the_kernels_off(value):
    """CNN_GPU_JIT=0 in a fresh process: enabled() is False, whether or not Numba is installed."""
    code = "from cnn_gpu import cpu; print(cpu.enabled())"
    env = {**os.environ, cpu.ENV_VAR: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_backward_kernel_equals_the_numpy_code(rng, dtype):
    from cnn_gpu.functional import relu_backward, relu_forward
    x = rng.standard_normal((3, 13, 13, 32)).astype(dtype)
    x[0, 0, 0, :4] = 0.0  # the ReLU's kink: no gradient passes, as in the NumPy code
    _, cache = relu_forward(x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    got = relu_backward(dy, cache)
    np.testing.assert_array_equal(got, _numpy_code(relu_backward, dy, cache))
    assert got.dtype == np.dtype(dtype)


def test_without_numba_the_numpy_code_runs(rng, monkeypatch):
    """Numba missing: enabled() is False with the reason, and the ops run as NumPy code."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.setattr(cpu, "_probed", False)
    monkeypatch.setattr(cpu, "_reason", None)
    monkeypatch.setattr(cpu, "_enabled", True)
    assert "Numba is not installed" in cpu.unavailable_reason()
    assert not cpu.enabled() and not cpu.runs_on(np.zeros(3, np.float32))
    assert cpu.describe().startswith("off (Numba is not installed")
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    y, cache = max_pool2d_forward(x, 2)
    np.testing.assert_array_equal(y, x.reshape(2, 3, 2, 3, 2, 3).max(axis=(2, 4)))


@requires_jit
@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.05, weight_decay=1e-3),
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, no_decay=ps),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_kernel_equals_the_numpy_code(rng, make, dtype):
    """Five steps of the compiled update (cnn_gpu.cpu.elementwise) and of SGD's NumPy
    code from the same start: the same parameters and state, bit for bit, subnormals included."""
    start = rng.standard_normal(300).astype(dtype)
    start[:20] = np.finfo(dtype).tiny * rng.uniform(-8, 8, 20)  # some become subnormal on the way
    grads = [rng.standard_normal(300).astype(dtype) * (np.arange(300) >= 40) for _ in range(5)]
    results = []
    for enabled in (True, False):
        p = Parameter(start.copy())
        opt = make([p])
        previous = cpu.set_enabled(enabled)
        try:
            for g in grads:
                p.grad = g
                opt.step()
        finally:
            cpu.set_enabled(previous)
        results.append([p.data] + [opt.state[0][k] for k in sorted(opt.state[0])])
    for got, ref in zip(*results):
        np.testing.assert_array_equal(got, ref)


@requires_jit
@pytest.mark.parametrize("case", COL2IM_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ones_column", [False, True], ids=["cols", "cols-and-ones"])
def test_im2col_kernel_equals_the_numpy_code(rng, case, dtype, ones_column):
    """A copy (zeros in the padding): equal bit for bit, also into the first K columns of a
    buffer one column wider (the bias's column of ones, which it leaves alone)."""
    from cnn_gpu.cpu import conv as cpu_conv
    n, h, w, c, kh, kw, stride, padding, dilation = case
    window = Window.of((kh, kw), stride, padding, dilation)
    oh, ow = window.output_hw(h, w, "test")
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    expected = im2col(x, window, oh, ow)[0]  # the reference, one group
    k = expected.shape[1]
    out = np.full((n * oh * ow, k + ones_column), np.nan, dtype=dtype)  # every element must be written
    if ones_column:
        out[:, k] = 1
    cpu_conv.im2col(x, window, oh, ow, out)
    np.testing.assert_array_equal(out[:, :k], expected)
    if ones_column:
        assert (out[:, k] == 1).all()


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_kernel_equals_numpys_maximum(rng, dtype):
    """max(x, 0) into a new array and in place: np.maximum's bits, NaN and -0.0 included; and
    relu_forward and the convolution's epilogue, which call it, give np.maximum's values."""
    from cnn_gpu.cpu import elementwise
    from cnn_gpu.functional import conv2d_forward, relu_forward
    x = rng.standard_normal((3, 7, 7, 16)).astype(dtype)
    x[0, 0, 0, :4] = [np.nan, -0.0, 0.0, -np.inf]
    expected = np.maximum(x, 0)
    bits = f"u{x.itemsize}"
    np.testing.assert_array_equal(elementwise.relu(x, np.empty_like(x)).view(bits), expected.view(bits))
    np.testing.assert_array_equal(relu_forward(x)[0].view(bits), expected.view(bits))
    inplace = x.copy()
    assert elementwise.relu(inplace, inplace) is inplace
    np.testing.assert_array_equal(inplace.view(bits), expected.view(bits))
    w = rng.standard_normal((3, 3, 16, 8)).astype(dtype)
    fused, _ = conv2d_forward(x[1:], w, padding=1, relu=True)
    np.testing.assert_array_equal(fused, np.maximum(conv2d_forward(x[1:], w, padding=1)[0], 0))


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("relu", [False, True])
def test_bias_relu_kernel_equals_numpys_two_passes(rng, dtype, relu):
    """y += b, then max(y, 0): NumPy's bits; and a 1x1 convolution with a bias, whose epilogue it is."""
    from cnn_gpu.cpu import elementwise
    from cnn_gpu.functional import conv2d_forward
    y, b = rng.standard_normal((50, 24)).astype(dtype), rng.standard_normal(24).astype(dtype)
    y[0, :3], b[:3] = [np.nan, -0.0, 1.0], [1.0, -0.0, -1.0]
    expected = y + b
    if relu:
        expected = np.maximum(expected, 0)
    bits = f"u{y.itemsize}"
    np.testing.assert_array_equal(elementwise.bias_relu(y, b, relu).view(bits), expected.view(bits))
    x, w = rng.standard_normal((2, 5, 5, 6)).astype(dtype), rng.standard_normal((1, 1, 6, 24)).astype(dtype)
    plain = np.einsum("nhwc,co->nhwo", x, w[0, 0]) + b
    tol = 1e-5 if dtype == "float32" else 1e-12  # the conv's GEMM sums in another order than einsum
    np.testing.assert_allclose(conv2d_forward(x, w, b, relu=relu)[0], np.maximum(plain, 0) if relu else plain,
                               rtol=tol, atol=tol)


@requires_jit
@pytest.mark.usefixtures("jit")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_relu_kernel_equals_the_numpy_code(rng, dtype):
    """max(a + b, 0) in one pass: np.maximum's result bit for bit, NaN and -0.0 included."""
    from cnn_gpu.cpu import elementwise
    a, b = (rng.standard_normal((3, 7, 7, 16)).astype(dtype) for _ in range(2))
    a[0, 0, 0, :3], b[0, 0, 0, :3] = [np.nan, -0.0, 1.0], [1.0, -0.0, -1.0]  # NaN, -0.0 + -0.0, exactly 0
    got = elementwise.add_relu(a, b)
    expected = np.maximum(a + b, 0)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), expected.view(f"u{got.itemsize}"))  # the bits
    assert np.isnan(got[0, 0, 0, 0])


@requires_jit
@pytest.mark.parametrize("stride, padding, dilation, out_size", [(1, 1, 1, None), (2, 1, 1, None), (1, 0, 2, None),
                                                                 ((2, 1), (0, 2), (1, 2), None), (1, 1, 1, (4, 3))])
@pytest.mark.parametrize("relu", [False, True])
def test_depthwise_3x3_forward_equals_the_general_loop(rng, monkeypatch, stride, padding, dilation, out_size, relu):
    """_forward_3x3 (taps written out, padded taps adding zeros) against _forward (padded taps
    skipped): the same products summed in the same tap order, so equal (adding a padded tap's 0.0
    can only turn a sum of -0.0 into 0.0)."""
    from cnn_gpu.cpu import depthwise
    x = rng.standard_normal((3, 9, 8, 16)).astype("float32")
    wt, b = rng.standard_normal((3, 3, 1, 16)).astype("float32"), rng.standard_normal(16).astype("float32")
    window = Window.of((3, 3), stride, padding, dilation)
    out_hw = out_size or window.output_hw(9, 8, "test")
    y = depthwise.depthwise_forward(x, wt, b, window, out_hw, relu=relu)
    monkeypatch.setattr(depthwise, "_three_by_three", lambda x, w: False)
    np.testing.assert_array_equal(y, depthwise.depthwise_forward(x, wt, b, window, out_hw, relu=relu))
    assert (y == 0).any() == relu
