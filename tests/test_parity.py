"""GPU against CPU: the same op on the same numbers, on both backends.

Tolerances (relative error ||gpu - cpu|| / ||cpu||): float32 under 1e-5 for pooling and
1e-4 for the rest, float64 under 1e-10; max-pool routing identical. These run only where
CuPy and a CUDA device are present (`pytest -m gpu`).
"""
import numpy as np
import pytest

import cnn_gpu.functional as F
from cnn_gpu import SGD, seed_cnn
from cnn_gpu.backend import module_for, to_numpy

from .conftest import requires_gpu
from .helpers import relative_error

pytestmark = [pytest.mark.gpu, requires_gpu]

DTYPES = ["float32", "float64"]
TOL = {("pool", "float32"): 1e-5, ("other", "float32"): 1e-4, ("pool", "float64"): 1e-10, ("other", "float64"): 1e-10}


def _both(rng, shape, dtype, scale=1.0):
    host = (rng.standard_normal(shape) * scale).astype(dtype)
    return host, module_for("cupy").asarray(host)


def _check(cpu_out, gpu_out, kind, dtype, what):
    for c, g in zip(cpu_out, gpu_out):
        if c is None:
            assert g is None, what
            continue
        err = relative_error(g, c)
        assert err < TOL[(kind, dtype)], f"{what}: relative error {err:.2e}"


def _random_geometry(rng):
    n, h, w, c = rng.integers(1, 5), rng.integers(5, 16), rng.integers(5, 16), rng.integers(1, 9)
    k = int(rng.choice([1, 2, 3, 5]))
    return int(n), int(h), int(w), int(c), k, int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_conv2d(dtype, seed):
    rng = np.random.default_rng(seed)
    n, h, w, c, k, s, p = _random_geometry(rng)
    o = int(rng.integers(1, 17))
    (xc, xg), (wc, wg), (bc, bg) = _both(rng, (n, h, w, c), dtype), _both(rng, (k, k, c, o), dtype), _both(rng, (o,), dtype)
    yc, cc = F.conv2d_forward(xc, wc, bc, s, p)
    yg, cg = F.conv2d_forward(xg, wg, bg, s, p)
    _check([yc], [yg], "other", dtype, "conv2d forward")
    dyc, dyg = _both(rng, yc.shape, dtype)
    _check(F.conv2d_backward(dyc, cc), F.conv2d_backward(dyg, cg), "other", dtype, "conv2d backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["grouped", "depthwise"])
def test_conv2d_groups_and_dilation(dtype, seed, kind):
    """Grouped (CUPY_GEMM's batched GEMM) and depthwise (CUPY_DEPTHWISE's kernels) convolutions,
    dilated on odd seeds, with out_size on every third, against the CPU."""
    rng = np.random.default_rng(100 + seed)
    n, h, w, _, k, s, p = _random_geometry(rng)
    groups = int(rng.integers(2, 5))
    c = groups * (1 if kind == "depthwise" else int(rng.integers(1, 4)))
    o = groups * int(rng.integers(1, 4))  # depthwise: a multiplier of 1 to 3
    d = 1 + seed % 2
    h, w = max(h, d * (k - 1) + 1), max(w, d * (k - 1) + 1)
    (xc, xg), (wc, wg), (bc, bg) = (_both(rng, (n, h, w, c), dtype), _both(rng, (k, k, c // groups, o), dtype),
                                    _both(rng, (o,), dtype))
    out_size = (1, 2) if seed % 3 == 0 and (h + 2 * p - d * (k - 1) - 1) // s >= 1 else None
    geometry = dict(stride=s, padding=p, dilation=d, groups=groups, out_size=out_size)
    yc, cc = F.conv2d_forward(xc, wc, bc, **geometry)
    yg, cg = F.conv2d_forward(xg, wg, bg, **geometry)
    _check([yc], [yg], "other", dtype, f"{kind} conv2d forward")
    dyc, dyg = _both(rng, yc.shape, dtype)
    _check(F.conv2d_backward(dyc, cc), F.conv2d_backward(dyg, cg), "other", dtype, f"{kind} conv2d backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling(dtype, seed, kind):
    rng = np.random.default_rng(seed)
    n, h, w, c, k, s, p = _random_geometry(rng)
    ceil_mode = bool(seed % 4 >= 2)
    if kind == "max":  # dilation 2 where the input has room for it
        dilation = 2 if seed % 3 == 0 and min(h, w) + 2 * p >= 2 * (k - 1) + 1 else 1
        fwd, bwd, args = F.max_pool2d_forward, F.max_pool2d_backward, (k, s, p, dilation, ceil_mode)
    else:
        fwd, bwd, args = F.avg_pool2d_forward, F.avg_pool2d_backward, (k, s, p, ceil_mode, seed % 3 != 1)
    xc, xg = _both(rng, (n, h, w, c), dtype)
    if seed % 2:  # integer values: many ties, so the tie rule decides routing
        xc = np.round(xc).astype(dtype)
        xg = module_for("cupy").asarray(xc)
    yc, cc = fwd(xc, *args)
    yg, cg = fwd(xg, *args)
    _check([yc], [yg], "pool", dtype, f"{kind} pool forward {args}")
    if kind == "max":
        np.testing.assert_array_equal(to_numpy(cg.argmax), cc.argmax, err_msg="max-pool routing differs")
    dyc, dyg = _both(rng, yc.shape, dtype)
    _check([bwd(dyc, cc)], [bwd(dyg, cg)], "pool", dtype, f"{kind} pool backward {args}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7, 7, 64), (2, 13, 5, 3), (3, 1, 1, 8)])
def test_global_avg_pooling(dtype, shape):
    rng = np.random.default_rng(shape[1])
    xc, xg = _both(rng, shape, dtype)
    yc, cc = F.global_avg_pool2d_forward(xc)
    yg, cg = F.global_avg_pool2d_forward(xg)
    _check([yc], [yg], "pool", dtype, "global avg pool forward")
    assert to_numpy(F.global_avg_pool2d_forward(xg)[0]).tobytes() == to_numpy(yg).tobytes()  # deterministic
    dyc, dyg = _both(rng, yc.shape, dtype)
    _check([F.global_avg_pool2d_backward(dyc, cc)], [F.global_avg_pool2d_backward(dyg, cg)], "pool", dtype,
           "global avg pool backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 10), (8, 13, 11, 32), (16, 7, 7, 64), (3, 5, 5, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(dtype, shape, training):
    rng = np.random.default_rng(len(shape) * 7 + shape[-1])
    c = shape[-1]
    (xc, xg), (gc, gg), (bc, bg) = _both(rng, shape, dtype, 3.0), _both(rng, (c,), dtype), _both(rng, (c,), dtype)
    xc, xg = xc + 5, xg + 5
    stats_c = [np.zeros(c, dtype), np.ones(c, dtype)]
    stats_g = [module_for("cupy").asarray(a) for a in stats_c]
    yc, cc = F.batch_norm_forward(xc, gc, bc, *stats_c, training=training)
    yg, cg = F.batch_norm_forward(xg, gg, bg, *stats_g, training=training)
    _check([yc] + stats_c, [yg] + stats_g, "other", dtype, "batch norm forward and running statistics")
    dyc, dyg = _both(rng, shape, dtype)
    _check(F.batch_norm_backward(dyc, cc), F.batch_norm_backward(dyg, cg), "other", dtype, "batch norm backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_relu_loss(dtype):
    rng = np.random.default_rng(5)
    (xc, xg), (wc, wg), (bc, bg) = _both(rng, (32, 20), dtype), _both(rng, (20, 10), dtype), _both(rng, (10,), dtype)
    labels = rng.integers(0, 10, 32)
    lc, cc = F.linear_forward(xc, wc, bc)
    lg, cg = F.linear_forward(xg, wg, bg)
    rc, rcc = F.relu_forward(lc)
    rg, rcg = F.relu_forward(lg)
    loss_c, dc = F.softmax_cross_entropy(rc, labels)
    loss_g, dg = F.softmax_cross_entropy(rg, module_for("cupy").asarray(labels))
    _check([lc, rc, np.asarray(loss_c), dc], [lg, rg, loss_g, dg], "other", dtype, "dense/relu/loss forward")
    _check(F.linear_backward(F.relu_backward(dc, rcc), cc), F.linear_backward(F.relu_backward(dg, rcg), cg),
           "other", dtype, "dense/relu backward")


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-8), ("float32", 1e-3)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_seed_network_trains_the_same_on_both_backends(dtype, rtol, batch_norm):
    rng = np.random.default_rng(0)
    cpu = seed_cnn(batch_norm=batch_norm, seed=7, dtype=dtype)
    gpu = seed_cnn(batch_norm=batch_norm, seed=7, dtype=dtype).to("gpu")
    # A learning rate at which training is stable: on a diverging trajectory float32 rounding
    # differences grow exponentially, whichever two implementations are compared.
    opt_c, opt_g = SGD(cpu.parameters(), 0.01, momentum=0.9), SGD(gpu.parameters(), 0.01, momentum=0.9)
    cp = module_for("cupy")
    for step in range(20):
        x = rng.standard_normal((16, 28, 28, 1)).astype(dtype)
        y = rng.integers(0, 10, 16)
        losses = []
        for model, opt, xx, yy in ((cpu, opt_c, x, y), (gpu, opt_g, cp.asarray(x), cp.asarray(y))):
            loss, d = F.softmax_cross_entropy(model.forward(xx), yy)
            model.backward(d)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        assert abs(losses[1] - losses[0]) <= rtol * abs(losses[0]), f"step {step}: cpu {losses[0]} gpu {losses[1]}"
