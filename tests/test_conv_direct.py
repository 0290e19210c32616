"""cnn_gpu/cpu/direct.py (the 3x3 convolution in vector registers, on cnn_gpu/cpu/simd.py) and the
NUMPY_DIRECT strategy built on it, against the convolution's reference in float64.

The kernels sum in another order than the reference's GEMM (tap by tap, channel by channel, with
fused multiply-adds), so float32 results agree to rounding: relative to the largest value of each
result, 1e-5 for sums of up to 9 * 64 terms, and 1e-4 for the weight gradient, a sum over every
output position of the batch in one running total per weight."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cnn_gpu.functional import conv, conv2d_backward, conv2d_forward
from cnn_gpu.geometry import Window

from .conftest import requires_jit
from .helpers import assert_close

pytestmark = requires_jit



@pytest.fixture(scope="module")
def direct():
    from cnn_gpu.cpu import direct
    return direct


def _reference(x, w, dy=None, stride=1):
    """y, and (dx, dw) for dy, of the 3x3 padding-1 convolution at this stride, in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    window = Window.of((3, 3), stride, 1, 1)
    out_hw = window.output_hw(*x.shape[1:3], "test")
    y, _ = conv.reference_forward(x64, w64, None, window, 1, out_hw)
    if dy is None:
        return y
    dx, dw, _ = conv.reference_backward(dy.astype(np.float64), conv.ConvCache(x64, w64, False, window, 1, out_hw))
    return y, dx, dw


def _close(got, want, rtol=1e-5, what=""):
    assert got.dtype == np.float32 and got.shape == want.shape, what
    assert_close(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()), what=what)


def _shapes(lanes):
    # (N, H, W, C, O): every micro-kernel (12 positions x 1 vector: O = LANES; 6 x 2: 2 LANES; 6 x 4
    # on AVX-512: 4 LANES), several output blocks (3 LANES), one input channel, odd and tiny images
    # (tiles running across rows and images, a last tile past the end), batch 1; rows of 8 and 7
    # (O = LANES, or dx's C = LANES, at stride 1: a row of 11 is 8 by _rows and 3 by the tiles, one
    # of 16 two eights, one of 15 an eight and a seven; two vectors on AVX-512 by _rows_x2: 4 LANES
    # is two passes, a row of 10 is 8 and 2, of 7 one seven, of 22 an eight and two sevens)
    return [(2, 7, 5, 1, lanes), (3, 6, 9, 3, 2 * lanes), (1, 1, 1, 16, lanes), (2, 2, 3, 16, 4 * lanes),
            (2, 9, 8, 32, 3 * lanes), (4, 7, 7, 64, 4 * lanes), (2, 5, 13, 16, 2 * lanes),
            (2, 5, 11, 16, lanes), (2, 4, 16, lanes, 2 * lanes), (2, 3, 10, 8, 4 * lanes),
            (2, 3, 15, 16, lanes), (2, 3, 22, 16, 2 * lanes)]


def _cases(lanes):
    # (shape, stride): every shape at strides 1 and 2 (dx in 4 classes of 1, 2, 2 and 4 taps), two
    # at stride 3 (9 classes of one tap), one at stride 5 (input positions that no window reads).
    # Each (C, O, stride, taps) is a kernel compiled of its own, so the rarer strides get few shapes.
    shapes = _shapes(lanes)
    return [(shape, 1) for shape in shapes] + [(shape, 2) for shape in shapes] + \
        [(shapes[1], 3), (shapes[4], 3), (shapes[6], 5)]


def test_rows_take_stride_1_and_all_nine_taps(direct):
    """Which kernel each call gets: _rows_then_tiles exactly where _rows applies; how it splits a row."""
    lanes = direct.LANES
    assert direct._kernel(16, lanes, 1).__name__ == "rows_then_tiles"  # rows of 8, then the tiles
    assert direct._kernel(16, lanes, 2).__name__ == "tiles12"  # strided
    assert direct._kernel(16, 2 * lanes, 1).__name__ == ("rows_then_tiles" if lanes == 16 else "tiles6")  # 2 vectors: AVX-512
    assert direct._kernel(16, 2 * lanes, 2).__name__ == "tiles6"
    assert direct._kernel(16, 3 * lanes, 1).__name__ == "tiles12"  # an odd number of vectors
    assert direct._kernel(lanes, 16, 1, direct._input_grad_taps(1, 0, 0)).__name__ == "rows_then_tiles"  # dx at stride 1
    assert direct._kernel(lanes, 16, 1, direct._input_grad_taps(2, 0, 0)).__name__ == "tiles12"  # one of stride 2's classes
    assert direct._row_weights(direct.FORWARD_TAPS) == tuple(range(9))
    assert direct._row_weights(direct._input_grad_taps(1, 0, 0)) == tuple(range(8, -1, -1))  # flipped
    # (eights, sevens) covering the most columns, eights on a tie; the tiles take the rest
    splits = {6: (0, 0), 7: (0, 1), 8: (1, 0), 11: (1, 0), 14: (0, 2), 15: (1, 1), 22: (1, 2), 28: (0, 4),
              32: (4, 0), 56: (7, 0), 100: (9, 4)}
    assert {width: direct.row_split(width) for width in splits} == splits


def test_conv3x3_and_its_gradients_match_the_reference(direct, rng):
    for (n, h, w, c, o), stride in _cases(direct.LANES):
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        wt = rng.standard_normal((3, 3, c, o)).astype(np.float32)
        oh, ow = direct.output_hw(h, w, stride)
        dy = rng.standard_normal((n, oh, ow, o)).astype(np.float32)
        y_ref, dx_ref, dw_ref = _reference(x, wt, dy, stride)
        # a scratch for one image more than the batch, holding that image from another call: the
        # last tile's positions past the batch's end must neither read it nor be stored
        scratch = direct.padded_scratch(n + 1, h, w, c)
        direct.conv3x3(rng.standard_normal((n + 1, h, w, c)).astype(np.float32), wt,
                       np.empty((n + 1, oh, ow, o), np.float32), scratch, stride=stride)
        y = direct.conv3x3(x, wt, np.empty((n, oh, ow, o), np.float32), scratch, stride=stride)
        _close(y, y_ref, what=f"y {n, h, w, c, o} stride {stride}")
        if direct.supports(o, c):  # dx: C outputs
            dx = direct.conv3x3_input_grad(dy, direct.swap_channels(wt), np.empty_like(x),
                                           direct.padded_scratch(n, oh, ow, o), stride=stride)
            _close(dx, dx_ref, what=f"dx {n, h, w, c, o} stride {stride}")
        if direct.supports_weight_grad(c, o):
            _close(direct.conv3x3_weight_grad(x, dy, stride=stride), dw_ref, rtol=1e-4,
                   what=f"dw {n, h, w, c, o} stride {stride}")


@pytest.mark.parametrize("stride", [1, 2])
def test_the_chunk_loops_on_two_threads_give_the_whole_batch_bits(direct, rng, stride):
    """conv3x3_chunks and conv3x3_backward_chunks over uneven chunks, shared by two threads (each
    output position is summed on its own, whatever the chunk): y + bias through a ReLU as conv3x3 and
    bias_relu give it, dx + dx_plus as conv3x3_input_grad and an add, each chunk's dw as
    conv3x3_weight_grad of that chunk."""
    from cnn_gpu.cpu import elementwise, threads

    lanes = direct.LANES
    for n, h, w, c, o in [(5, 7, 9, 16, 2 * lanes), (6, 8, 8, lanes, lanes), (5, 14, 14, 2 * lanes, 4 * lanes)]:
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        wt = rng.standard_normal((3, 3, c, o)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        oh, ow = direct.output_hw(h, w, stride)
        dy = rng.standard_normal((n, oh, ow, o)).astype(np.float32)
        plus = rng.standard_normal(x.shape).astype(np.float32)
        starts = np.array([0, 2, 3, n], np.int64)
        threads.set_count(2)
        try:
            y = direct.aligned_empty((n, oh, ow, o))
            threads.on_each(direct.conv3x3_chunks(x, direct.aligned(wt), y, starts, stride, b, True),
                            lambda: direct.padded_scratch(3, h, w, c))
            dx, dw_t_parts = direct.aligned_empty(x.shape), direct.aligned_empty((3, 9 * o * c))
            if direct.supports(o, c) and direct.supports_weight_grad(c, o):
                threads.on_each(direct.conv3x3_backward_chunks(x, dy, direct.swap_channels(wt), dx, plus, dw_t_parts,
                                                               starts, stride),
                                lambda: direct.kept_padded_scratch(3, oh, ow, o))
        finally:
            threads.set_count(None)
        want = direct.conv3x3(x, wt, np.empty((n, oh, ow, o), np.float32), direct.padded_scratch(n, h, w, c), stride)
        elementwise.bias_relu(want.reshape(-1, o), b, True)
        np.testing.assert_array_equal(y, want)
        if not (direct.supports(o, c) and direct.supports_weight_grad(c, o)):
            continue
        dx_want = direct.conv3x3_input_grad(dy, direct.swap_channels(wt), np.empty_like(x),
                                            direct.padded_scratch(n, oh, ow, o), stride=stride)
        np.testing.assert_array_equal(dx, dx_want + plus)
        total = np.zeros(9 * o * c, np.float32)
        for k in range(3):
            part = slice(starts[k], starts[k + 1])
            np.testing.assert_array_equal(dw_t_parts[k].reshape(3, 3, o, c).transpose(0, 1, 3, 2),
                                          direct.conv3x3_weight_grad(x[part], dy[part], stride=stride))
            total += dw_t_parts[k]  # the sum in chunk order, as sum_weight_grads must make it
        np.testing.assert_array_equal(direct.sum_weight_grads(dw_t_parts, c, o),
                                      total.reshape(3, 3, o, c).transpose(0, 1, 3, 2))
        np.testing.assert_array_equal(direct.swap_channels(wt), wt.transpose(0, 1, 3, 2))


def test_a_thread_keeps_its_padded_scratch_per_shape_and_its_borders_stay_zero(direct, rng):
    import threading

    a = direct.kept_padded_scratch(2, 5, 6, 16)
    assert direct.kept_padded_scratch(2, 5, 6, 16) is a and direct.kept_padded_scratch(2, 5, 6, 32) is not a
    x = rng.standard_normal((2, 5, 6, 16)).astype(np.float32)
    wt = rng.standard_normal((3, 3, 16, direct.LANES)).astype(np.float32)
    y = direct.conv3x3(x, wt, np.empty((2, 5, 6, direct.LANES), np.float32), a)
    padded = a.reshape(2, 7, 8, 16)
    np.testing.assert_array_equal(padded[:, 1:6, 1:7], x)
    interior = np.zeros(padded.shape, bool)
    interior[:, 1:6, 1:7] = True
    assert not padded[~interior].any()  # the borders: still zero for the next call
    y2 = direct.conv3x3(x, wt, np.empty_like(y), direct.kept_padded_scratch(2, 5, 6, 16))
    np.testing.assert_array_equal(y, y2)
    other = []
    t = threading.Thread(target=lambda: other.append(direct.kept_padded_scratch(2, 5, 6, 16)))
    t.start()
    t.join()
    assert other[0] is not a  # each thread its own
    for k in range(direct.KEPT_SCRATCHES):  # as many other shapes: the first is let go
        direct.kept_padded_scratch(1, 1, 1 + k, 16)
    assert direct.kept_padded_scratch(2, 5, 6, 16) is not a


def test_the_weight_gradient_over_a_large_batch(direct, rng):
    """One running sum per weight over 32 x 28 x 28 positions: still float32's rounding."""
    x = rng.standard_normal((32, 28, 28, 16)).astype(np.float32)
    dy = rng.standard_normal((32, 28, 28, 16)).astype(np.float32)
    _, _, dw_ref = _reference(x, np.zeros((3, 3, 16, 16), np.float32), dy)
    _close(direct.conv3x3_weight_grad(x, dy), dw_ref, rtol=1e-4)


def test_what_the_kernels_take(direct):
    lanes = direct.LANES
    assert lanes in (8, 16)
    assert direct.supports(1, lanes) and direct.supports(3, 2 * lanes)
    assert not direct.supports(16, lanes + 4) and not direct.supports(0, lanes)
    assert direct.supports_weight_grad(lanes, 8) and direct.supports_weight_grad(2 * lanes, 24)
    assert not direct.supports_weight_grad(3, 16) and not direct.supports_weight_grad(lanes, 12)


def test_the_vector_loads_take_only_float32_vectors():
    import numba

    from cnn_gpu.cpu import simd

    @numba.njit
    def first_vector(a):
        out = np.empty(simd.LANES, a.dtype)
        simd.store(out, 0, simd.load(a, 0))
        return out

    a = np.arange(2 * simd.LANES, dtype=np.float32)
    np.testing.assert_array_equal(first_vector(a), a[:simd.LANES])
    with pytest.raises((TypeError, numba.core.errors.TypingError), match="expected a 1-D float32 array"):
        first_vector(np.arange(32.0))  # float64


# ---- NUMPY_DIRECT, through conv2d_forward / conv2d_backward -------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("c", [16, 3], ids=["c16", "c3"])  # c3: a first layer, dw and dx by the GEMM path
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_the_strategy_matches_the_reference(rng, bias, relu, c, stride):
    x = rng.standard_normal((37, 9, 11, c)).astype(np.float32)  # 37 images: several chunks, an uneven last
    wt = rng.standard_normal((3, 3, c, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32) if bias else None
    window = Window.of((3, 3), stride, 1, 1)
    assert conv.select(x, wt, 1, window, window.output_hw(9, 11, "test")) is conv.NUMPY_DIRECT
    y, cache = conv2d_forward(x, wt, b, stride=stride, padding=1, relu=relu)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv2d_backward(dy, cache)
    y_ref, dx_ref, dw_ref = _reference(x, wt, dy, stride)
    if bias:
        y_ref = y_ref + b
    if relu:
        y_ref = np.maximum(y_ref, 0)
    _close(y, y_ref, what="y")
    _close(dx, dx_ref, what="dx")
    _close(dw, dw_ref, rtol=1e-4, what="dw")
    if bias:
        _close(db, dy.astype(np.float64).sum(axis=(0, 1, 2)), what="db")
    else:
        assert db is None
    assert conv2d_backward(dy, cache, need_dx=False)[0] is None


def test_the_strategy_takes_strided_inputs_unchanged_and_an_empty_batch(rng):
    base = rng.standard_normal((4, 6, 7, 32)).astype(np.float32)
    x = base[..., ::2]  # 16 channels, not contiguous
    wt = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    copy = x.copy()
    y, cache = conv2d_forward(x, wt, padding=1)
    dy = rng.standard_normal((4, 6, 7, 32)).astype(np.float32)[..., ::2]
    dx, dw, _ = conv2d_backward(dy, cache)
    y_ref, dx_ref, dw_ref = _reference(np.ascontiguousarray(x), wt, np.ascontiguousarray(dy))
    _close(y, y_ref, what="y")
    _close(dx, dx_ref, what="dx")
    _close(dw, dw_ref, rtol=1e-4, what="dw")
    np.testing.assert_array_equal(x, copy)
    y, cache = conv2d_forward(x[:0], wt, padding=1)
    dx, dw, _ = conv2d_backward(y, cache)
    assert y.shape == (0, 6, 7, 16) and dx.shape == (0, 6, 7, 16) and not dw.any()


def test_the_strategy_gives_the_same_bits_twice(rng):
    x = rng.standard_normal((20, 8, 8, 16)).astype(np.float32)
    wt = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)

    def step():
        y, cache = conv2d_forward(x, wt, padding=1)
        return (y, *conv2d_backward(np.sin(y), cache))

    for a, b in zip(step(), step()):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_the_avx2_kernels_too():
    """The 8-lane kernels (AVX2 CPUs), compiled for a Haswell in a fresh process on any x86 CPU that
    has AVX2: NUMBA_CPU_NAME makes simd.LANES 8 (and batch norm's float64 vectors 4 lanes)."""
    import llvmlite.binding as llvm
    if not llvm.get_host_cpu_features().get("avx2", False):
        pytest.skip("needs an x86 CPU with AVX2 to run code compiled for a Haswell")
    code = (
        "import numpy as np\n"
        "from cnn_gpu.cpu import direct\n"
        "from cnn_gpu.functional import conv, conv2d_forward, conv2d_backward\n"
        "assert direct.LANES == 8, direct.LANES\n"
        "rng = np.random.default_rng(0)\n"
        # rows of 11: 8 by rows, 3 by tiles; of 15: a row of 8 and one of 7
        "for c, o, s, width in ((16, 8, 1, 11), (16, 8, 1, 15), (8, 16, 1, 11), (16, 24, 1, 11),\n"
        "                       (8, 16, 2, 11), (16, 32, 2, 11)):\n"
        "    x = rng.standard_normal((3, 7, width, c)).astype(np.float32)\n"
        "    w = rng.standard_normal((3, 3, c, o)).astype(np.float32)\n"
        "    y, cache = conv2d_forward(x, w, stride=s, padding=1)\n"
        "    assert conv.select(x, w, 1, cache.window, cache.out_hw) is conv.NUMPY_DIRECT\n"
        "    dx, dw, _ = conv2d_backward(np.cos(y), cache)\n"
        "    y64, c64 = conv2d_forward(x.astype(float), w.astype(float), stride=s, padding=1)\n"
        "    dx64, dw64, _ = conv2d_backward(np.cos(y).astype(float), c64)\n"
        "    for a, e in ((y, y64), (dx, dx64), (dw, dw64)):\n"
        "        assert np.abs(a - e).max() <= 1e-4 * np.abs(e).max(), (c, o)\n"
        "from cnn_gpu.cpu import batchnorm, simd\n"  # batch norm's float64 sums, 4 lanes
        "assert simd.LANES64 == 4, simd.LANES64\n"
        "x, dy = rng.standard_normal((2, 99, 12)).astype(np.float32) + 3\n"
        "mean, var = batchnorm.channel_mean_var(x)\n"
        "assert np.allclose(mean, x.astype(float).mean(0), rtol=1e-6) and np.allclose(var, x.astype(float).var(0), rtol=1e-5)\n"
        "r = np.maximum(x - 3, 0)\n"
        "s1, s2 = batchnorm.channel_grad_sums(dy, x, mean, 1 / np.sqrt(var), relu_out=r)\n"
        "g = np.where(r > 0, dy, 0).astype(float)\n"
        "assert np.allclose(s1, g.sum(0), rtol=1e-5, atol=1e-4)\n"
        "assert np.allclose(s2, (g * (x - mean.astype(float)) / np.sqrt(var)).sum(0), rtol=1e-5, atol=1e-4)\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", ""))
    env = {k: v for k, v in env.items() if v}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_aligned_empty_starts_on_a_cache_line(dtype):
    from cnn_gpu.cpu import simd
    for shape in [(1,), (3, 5), (2, 7, 9, 16)]:
        for _ in range(8):  # NumPy's allocations land at various offsets
            a = simd.aligned_empty(shape, dtype)
            assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
            assert a.ctypes.data % 64 == 0
