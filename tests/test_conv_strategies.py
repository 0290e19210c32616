"""Every strategy of cnn_gpu/functional/conv.py against its reference (reference_forward /
reference_backward, themselves checked against the loop definition and finite differences in
tests/test_conv.py), over a sweep of geometries, dtypes, bias on and off, and non-contiguous
inputs that must come back unmodified; and `select`, the one place that picks a strategy."""
import numpy as np
import pytest

from cnn_gpu import cpu
from cnn_gpu.backend import module_for, to_numpy
from cnn_gpu.functional import conv, conv2d_backward, conv2d_forward
from cnn_gpu.geometry import Window, pair

from .conftest import requires_gpu, requires_jit
from .helpers import assert_close
from .references import conv2d_loops

# (N, H, W, C, O, KH, KW, stride, padding, dilation, groups)
SWEEP = [
    (2, 7, 6, 3, 4, 3, 3, 1, 0, 1, 1),                     # plain
    (1, 9, 8, 2, 3, 3, 3, 2, 1, 1, 1),                     # strided, padded, batch 1
    (3, 6, 9, 1, 2, 5, 5, 1, 2, 1, 1),                     # 5x5, one input channel (column-major cols)
    (2, 5, 7, 3, 2, 1, 1, 1, 0, 1, 1),                     # 1x1: cols is x itself
    (1, 8, 8, 2, 2, 1, 1, 2, 0, 1, 1),                     # 1x1, strided
    (2, 9, 7, 2, 3, 3, 5, (2, 1), (1, 2), 1, 1),           # non-square kernel, stride, padding
    (2, 11, 10, 3, 4, 3, 3, 1, 2, 2, 1),                   # dilated
    (1, 12, 11, 1, 3, 3, 2, (1, 2), (2, 1), (2, 3), 1),    # dilated non-square, one channel
    (2, 6, 6, 1, 12, 3, 3, 1, 0, 1, 1),                    # seed conv1-like: depthwise too (C = G = 1, multiplier 12)
    (2, 8, 9, 4, 6, 3, 3, 1, 1, 1, 2),                     # two groups
    (2, 9, 9, 6, 9, 3, 3, 2, 1, 2, 3),                     # three groups, strided, dilated
    (2, 7, 8, 4, 4, 3, 3, 1, 1, 1, 4),                     # depthwise, multiplier 1
    (2, 7, 8, 4, 8, 3, 3, 2, 1, 1, 4),                     # depthwise, multiplier 2, strided
    (1, 9, 9, 3, 6, 5, 5, 1, 2, 1, 3),                     # depthwise 5x5, multiplier 2
    (2, 10, 9, 5, 5, 3, 3, (2, 1), (1, 0), (2, 1), 5),     # depthwise, dilated, non-square
    (2, 6, 6, 3, 3, 1, 1, 1, 0, 1, 3),                     # depthwise 1x1
    (2, 5, 6, 4, 4, 3, 3, 1, 3, 1, 4),                     # depthwise, padding larger than half the kernel
]

NUMPY = [pytest.param(conv.REFERENCE, id="reference"), pytest.param(conv.NUMPY_GEMM, id="numpy-gemm"),
         pytest.param(conv.NUMPY_GEMM_COMPILED, id="numpy-gemm-compiled", marks=requires_jit),
         pytest.param(conv.DEPTHWISE, id="depthwise"),
         pytest.param(conv.DEPTHWISE_COMPILED, id="depthwise-compiled", marks=requires_jit)]
CUPY = [pytest.param(s, id=s.name, marks=[pytest.mark.gpu, requires_gpu])
        for s in (conv.CUPY_GEMM, conv.CUPY_DEPTHWISE, conv.CUPY_IM2COL)]
STRATEGIES = NUMPY + CUPY


def _applies(strategy: conv.Strategy, c: int, groups: int) -> bool:
    if strategy in (conv.NUMPY_GEMM, conv.NUMPY_GEMM_COMPILED):
        return groups == 1
    if strategy in (conv.DEPTHWISE, conv.DEPTHWISE_COMPILED, conv.CUPY_DEPTHWISE):
        return groups == c
    return True  # the reference, CUPY_GEMM and CUPY_IM2COL take any groups


def _applicable(cases, channels, groups) -> list:
    """(strategy, case) parameters for every strategy and every case it takes, with ids."""
    return [pytest.param(strategy.values[0], case, id=f"{strategy.id}-case{i}", marks=strategy.marks)
            for strategy in STRATEGIES for i, case in enumerate(cases)
            if _applies(strategy.values[0], channels(case), groups(case))]


def _xp(strategy: conv.Strategy):
    return module_for("cupy" if strategy in (conv.CUPY_GEMM, conv.CUPY_DEPTHWISE, conv.CUPY_IM2COL) else "numpy")


def _run(strategy, monkeypatch, x, w, b, dy_of, need_dx=True, **geometry):
    """Forward and backward through the public functions with `strategy` forced."""
    monkeypatch.setattr(conv, "select", lambda *args: strategy)
    y, cache = conv2d_forward(x, w, b, **geometry)
    return (y, *conv2d_backward(dy_of(y), cache, need_dx=need_dx))


def _tolerance(dtype: str) -> dict:
    # Another summation order than the reference's GEMMs (taps skipped or multiplied by zero in the
    # padding, per-tap passes, blocked dot products): float64 rounding, or float32's relative to
    # the largest value of each result.
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-5}


def _strided(xp, host: np.ndarray):
    """The same values as `host` in a non-contiguous array: every other element of a wider last axis."""
    wide = xp.zeros(host.shape[:-1] + (2 * host.shape[-1],), dtype=host.dtype)
    wide[..., ::2] = xp.asarray(host)
    return wide[..., ::2]


@pytest.mark.parametrize("strategy, case", _applicable(SWEEP, channels=lambda case: case[3],
                                                       groups=lambda case: case[10]))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_strategy_matches_the_reference(monkeypatch, rng, strategy, case, dtype, bias, layout):
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    xp = _xp(strategy)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    host = [rng.standard_normal(s).astype(dtype) for s in ((n, h, w, c), (kh, kw, c // groups, o), (o,))]
    place = (lambda a: _strided(xp, a)) if layout == "strided" else xp.asarray
    x, wt, b = (place(a) for a in host)
    b = b if bias else None
    dy_host = {}

    def dy_of(y):
        dy_host.setdefault("dy", rng.standard_normal(y.shape).astype(dtype))
        return place(dy_host["dy"])

    copies = [to_numpy(a).copy() for a in (x, wt, b) if a is not None]
    got = _run(strategy, monkeypatch, x, wt, b, dy_of, **geometry)
    ref = _run(conv.REFERENCE, monkeypatch, *(a.astype("float64") for a in host[:2]),
               host[2].astype("float64") if bias else None, lambda y: dy_host["dy"].astype("float64"), **geometry)
    for g, r, what in zip(got, ref, ("y", "dx", "dw", "db")):
        if r is None:
            assert g is None, what
            continue
        assert g.dtype == dtype and g.shape == r.shape, what
        scale = float(np.abs(r).max()) or 1.0
        tol = _tolerance(dtype)
        assert_close(g, r, rtol=tol["rtol"], atol=tol["atol"] * scale, what=f"{strategy.name} {what}")
    for a, copy in zip([a for a in (x, wt, b) if a is not None], copies):
        np.testing.assert_array_equal(to_numpy(a), copy)  # inputs untouched


# (stride, padding, dilation, kernel, groups, out_size) on x (2, 9, 8, 4)
OUT_SIZE_CASES = [(1, 0, 1, 3, 1, (4, 3)), (2, 1, 2, 3, 1, (2, 3)), (1, 0, 1, 1, 1, (6, 5)), (1, 1, 1, 3, 2, (6, 6)),
                  (1, 1, 1, 3, 4, (5, 4)), (1, 2, 2, 3, 4, (5, 2))]


@pytest.mark.parametrize("strategy, case", _applicable(OUT_SIZE_CASES, channels=lambda case: 4,
                                                       groups=lambda case: case[4]))
def test_strategy_out_size_is_the_corner_of_the_reference(monkeypatch, rng, strategy, case):
    """out_size (padding and dilation included): y is the reference's corner; the gradients are the
    reference's with dy zero outside the corner."""
    stride, padding, dilation, kernel, groups, out_size = case
    c = 4
    xp = _xp(strategy)
    x = rng.standard_normal((2, 9, 8, c))
    wt, b = rng.standard_normal((kernel, kernel, c // groups, 8)), rng.standard_normal(8)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dy = {}
    got = _run(strategy, monkeypatch, xp.asarray(x), xp.asarray(wt), xp.asarray(b),
               lambda y: xp.asarray(dy.setdefault("dy", rng.standard_normal(y.shape))), out_size=out_size, **geometry)

    def dy_full(y):
        full = np.zeros(y.shape)
        full[:, :out_size[0], :out_size[1]] = dy["dy"]
        return full

    ref = _run(conv.REFERENCE, monkeypatch, x, wt, b, dy_full, **geometry)
    assert got[0].shape == (2, *out_size, 8)
    assert_close(got[0], ref[0][:, :out_size[0], :out_size[1]], rtol=1e-12, atol=1e-12, what="y")
    for g, r, what in zip(got[1:], ref[1:], ("dx", "dw", "db")):
        assert_close(g, r, rtol=1e-12, atol=1e-12, what=what)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_skips_the_input_gradient_and_takes_an_empty_batch(monkeypatch, rng, strategy):
    xp = _xp(strategy)
    groups = 1 if strategy in (conv.NUMPY_GEMM, conv.NUMPY_GEMM_COMPILED) else 3
    x, wt, b = xp.asarray(rng.standard_normal((2, 6, 7, 3))), xp.asarray(rng.standard_normal((3, 3, 3 // groups, 6))), \
        xp.asarray(rng.standard_normal(6))
    _, dx, dw, db = _run(strategy, monkeypatch, x, wt, b, xp.ones_like, need_dx=False, padding=1, groups=groups)
    assert dx is None
    _, _, dw_with_dx, db_with_dx = _run(strategy, monkeypatch, x, wt, b, xp.ones_like, padding=1, groups=groups)
    assert_close(dw, dw_with_dx, rtol=1e-12, atol=1e-12)
    assert_close(db, db_with_dx, rtol=1e-12, atol=1e-12)
    y, dx, dw, db = _run(strategy, monkeypatch, x[:0], wt, b, xp.ones_like, padding=1, groups=groups)
    assert y.shape == (0, 6, 7, 6) and dx.shape == (0, 6, 7, 3)
    assert_close(dw, np.zeros(dw.shape), rtol=0) and float(abs(db).sum()) == 0.0


@pytest.mark.parametrize("case", SWEEP, ids=[f"case{i}" for i in range(len(SWEEP))])
def test_reference_matches_the_loop_definition(rng, case):
    """The reference strategy itself, on the definition (the public op's tests check it too, on
    whichever strategy select picks)."""
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = rng.standard_normal((n, h, w, c)), rng.standard_normal((kh, kw, c // groups, o)), rng.standard_normal(o)
    window = Window.of((kh, kw), stride, padding, dilation)
    y, kept = conv.reference_forward(x, wt, b, window, groups, window.output_hw(h, w, "test"))
    assert kept is None
    loops = conv2d_loops(x, wt, b, pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"), groups)
    np.testing.assert_allclose(y, loops, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("jit", [pytest.param(True, marks=requires_jit), False], ids=["jit", "numpy-code"])
def test_select_picks_one_strategy_per_case(jit):
    previous = cpu.set_enabled(jit)
    try:
        gemm = conv.NUMPY_GEMM_COMPILED if jit else conv.NUMPY_GEMM
        depthwise = conv.DEPTHWISE_COMPILED if jit else conv.DEPTHWISE
        x = np.zeros((1, 5, 5, 4), dtype="float32")
        same = Window.of((3, 3), 1, 1, 1)  # 3x3, stride 1, padding 1: every output, the input's size

        def pick(x, w_shape, groups, window=same, dtype="float32"):
            return conv.select(x, np.zeros(w_shape, dtype=dtype), groups, window, window.output_hw(5, 5, "test"))

        assert pick(x, (3, 3, 4, 12), 1) is gemm  # 12 outputs: no multiple of the vector width (8 or 16)
        assert pick(x, (3, 3, 1, 8), 4) is depthwise
        assert pick(x, (3, 3, 2, 8), 2) is conv.REFERENCE
        assert pick(x[..., :1], (3, 3, 1, 36), 1) is gemm  # C = G = 1: the GEMM
        # the compiled kernels take float32 and float64 of one dtype; else the NumPy code runs
        assert pick(x, (3, 3, 1, 8), 4, dtype="float64") is conv.DEPTHWISE
        # float32 3x3, padding 1, one stride, outputs a multiple of the vectors: the direct kernels
        direct = conv.NUMPY_DIRECT if jit else conv.NUMPY_GEMM
        assert pick(x, (3, 3, 4, 32), 1) is direct
        assert pick(x.astype("float64"), (3, 3, 4, 32), 1, dtype="float64") is gemm
        assert pick(x, (3, 3, 4, 32), 1, window=Window.of((3, 3), 2, 1, 1)) is direct  # strided
        assert pick(x, (3, 3, 4, 32), 1, window=Window.of((3, 3), (2, 1), 1, 1)) is gemm  # two strides
        assert pick(x, (3, 3, 4, 32), 1, window=Window.of((3, 3), 1, 0, 1)) is gemm  # no padding
        assert pick(x, (3, 3, 4, 32), 1, window=Window.of((3, 3), 1, 2, 2)) is gemm  # dilated
        assert pick(x, (3, 3, 4, 128), 1) is gemm  # past DIRECT_MAX_CHANNELS
    finally:
        cpu.set_enabled(previous)


@pytest.mark.gpu
@requires_gpu
def test_select_picks_the_cupy_strategies():
    cupy = module_for("cupy")
    x = cupy.zeros((1, 5, 5, 4))
    window = Window.of((3, 3), 1, 1, 1)
    assert conv.select(x, cupy.zeros((3, 3, 4, 16)), 1, window, (5, 5)) is conv.CUPY_IM2COL  # never the CPU's direct
    assert conv.select(x, cupy.zeros((3, 3, 2, 4)), 2, window, (5, 5)) is conv.CUPY_IM2COL
    assert conv.select(x, cupy.zeros((3, 3, 1, 8)), 4, window, (5, 5)) is conv.CUPY_DEPTHWISE


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("strategy", [conv.CUPY_GEMM, conv.CUPY_DEPTHWISE, conv.CUPY_IM2COL], ids=lambda s: s.name)
def test_cupy_strategies_are_deterministic(monkeypatch, rng, strategy):
    """No atomics: the same call twice gives the same bits."""
    cupy = module_for("cupy")
    x = cupy.asarray(rng.standard_normal((4, 14, 14, 8)).astype("float32"))
    wt = cupy.asarray(rng.standard_normal((3, 3, 1, 16)).astype("float32"))
    dy = cupy.asarray(rng.standard_normal((4, 7, 7, 16)).astype("float32"))
    runs = [_run(strategy, monkeypatch, x, wt, None, lambda y: dy, stride=2, padding=1, groups=8) for _ in range(2)]
    for a, b in zip(*runs):
        if a is not None:
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("strategy, case", _applicable(SWEEP, channels=lambda case: case[3],
                                                       groups=lambda case: case[10]))
def test_strategy_relu_is_the_maximum_of_its_output(monkeypatch, rng, strategy, case):
    """relu=True (a ReLU the plan hands to the convolution): max(y, 0) of the same strategy's y,
    bit for bit (the same GEMMs and sums, then one maximum), and the same cache for the backward."""
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    xp = _xp(strategy)
    x, wt, b = (xp.asarray(rng.standard_normal(s).astype("float32")) for s in ((n, h, w, c), (kh, kw, c // groups, o),
                                                                               (o,)))
    monkeypatch.setattr(conv, "select", lambda *args: strategy)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y, cache = conv2d_forward(x, wt, b, **geometry)
    y_relu, cache_relu = conv2d_forward(x, wt, b, relu=True, **geometry)
    np.testing.assert_array_equal(to_numpy(y_relu), np.maximum(to_numpy(y), 0))
    assert (to_numpy(y) < 0).any()  # the maximum changed something
    dy = xp.asarray(rng.standard_normal(y.shape).astype("float32"))
    for g, r in zip(conv2d_backward(dy, cache_relu), conv2d_backward(dy, cache)):
        np.testing.assert_array_equal(to_numpy(g), to_numpy(r))
