"""cnn_gpu/cuda/device_optim.py: SGD's and Adam's update with the per-step scalars on the device.

Without a GPU: the per-step table is what the eager optimizers compute on the host; the *_at kernels
of cnn_gpu/cuda/elementwise.py, compiled for the host (tests/cuda_host.py), run through
DeviceOptimizer over several steps and a learning-rate change, and equal the eager CUDA kernels
(sgd, sgd_momentum, adam, called as SGD.step and Adam.step call them) bit for bit, and the NumPy
optimizers to float rounding. With a GPU: the same on the device, and inside a captured graph.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.cuda import device_optim, elementwise
from cnn_gpu.layers import Parameter
from cnn_gpu.optim import SGD, Adam, Optimizer

from .conftest import requires_gpu
from .cuda_host import CXX, HostElementwise, host_array

OPTIMIZERS = {
    "sgd": lambda ps: SGD(ps, lr=0.1),
    "sgd-wd": lambda ps: SGD(ps, lr=0.1, weight_decay=1e-2, no_decay=ps[1:]),
    "momentum": lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3, no_decay=ps[1:]),
}


def _params(xp, rng, dtype):
    return [Parameter(xp.asarray(rng.standard_normal(shape).astype(dtype))) for shape in ((4, 3), (3,), (2, 2, 5))]


def _grads(rng, params, step, dtype):
    return [rng.standard_normal(p.shape).astype(dtype) * (1 + step) for p in params]


def test_rate_table_is_what_the_eager_optimizers_pass():
    params = [Parameter(np.zeros(2, np.float32))]
    adam = Adam(params, lr=3e-3, betas=(0.8, 0.99))
    adam.steps = 7
    table = device_optim.rate_table(adam, 3, np.float32)
    for s in range(3):
        t = 8 + s  # Adam.step counts first, then computes with the new count
        assert table[s, 0] == np.float32(3e-3 / (1 - 0.8 ** t)) and table[s, 1] == np.float32(1 - 0.99 ** t)
    sgd = SGD(params, lr=0.07)
    np.testing.assert_array_equal(device_optim.rate_table(sgd, 4, np.float64), np.full(4, 0.07))


def test_only_sgd_and_adam_are_taken():
    class Custom(SGD):
        pass
    params = [Parameter(np.zeros(2, np.float32))]
    assert device_optim.unsupported_reason(SGD(params, lr=0.1)) is None
    assert "not Custom" in device_optim.unsupported_reason(Custom(params, lr=0.1))
    assert "not Optimizer" in device_optim.unsupported_reason(Optimizer(params, lr=0.1))


@pytest.fixture
def host_kernels(monkeypatch, tmp_path_factory):
    directory = tmp_path_factory.getbasetemp() / "elementwise_host_kernels"
    directory.mkdir(exist_ok=True)
    fake = SimpleNamespace(
        ElementwiseKernel=lambda i, o, body, name: HostElementwise(i, o, body, name, directory),
        zeros=lambda shape, dtype=np.float64: host_array(np.zeros(shape, dtype)))
    monkeypatch.setattr(elementwise, "require_cupy", lambda: fake)
    monkeypatch.setattr(device_optim, "require_cupy", lambda: fake)
    elementwise.kernel.cache_clear()
    yield
    elementwise.kernel.cache_clear()


def _eager_cuda_step(opt: Optimizer) -> None:
    """Optimizer.step as it runs on CuPy arrays: its fused kernels (here compiled for the host)."""
    opt.steps += 1
    for i, p in enumerate(opt.params):
        if isinstance(opt, Adam):
            step = opt.lr / (1 - opt.beta1 ** opt.steps)
            elementwise.adam_update(p.data, p.grad, opt._buffer(i, "m"), opt._buffer(i, "v"), step, opt.beta1,
                                    opt.beta2, opt.eps, opt.decay[i], 1 - opt.beta2 ** opt.steps)
        else:
            v = opt._buffer(i, "velocity") if opt.momentum else None
            elementwise.sgd_update(p.data, p.grad, v, opt.lr, opt.momentum, opt.decay[i], opt.nesterov)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on the PATH")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_table_updates_on_the_host_equal_the_eager_kernels_bit_for_bit(host_kernels, name, dtype):
    rng = np.random.default_rng(0)
    ours = OPTIMIZERS[name](_params(np, np.random.default_rng(1), dtype))
    eager = OPTIMIZERS[name](_params(np, np.random.default_rng(1), dtype))
    numpy_code = OPTIMIZERS[name](_params(np, np.random.default_rng(1), dtype))
    step = host_array(np.zeros(1, np.int32))
    updates = device_optim.DeviceOptimizer(ours, step, capacity=3)
    for epoch, lr in enumerate((ours.lr, ours.lr / 4)):  # a schedule's change between two "epochs"
        for opt in (ours, eager, numpy_code):
            opt.lr = lr
        updates.begin(3)
        step[0] = 0
        for s in range(3):
            grads = _grads(rng, ours.params, 3 * epoch + s, dtype)
            for opt in (ours, eager, numpy_code):
                for p, g in zip(opt.params, grads):
                    p.grad = g.copy()
            updates.update()
            updates.stepped()
            step[0] += 1
            _eager_cuda_step(eager)
            numpy_code.step()
    assert ours.steps == eager.steps == 6
    tol = 1e-5 if dtype == "float32" else 1e-12  # the NumPy code adds its terms in another order
    for a, b, c in zip(ours.params, eager.params, numpy_code.params):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_allclose(a.data, c.data, rtol=tol, atol=tol)


def test_a_table_too_short_is_refused(host_kernels):
    opt = SGD([Parameter(np.zeros(3, np.float32))], lr=0.1)
    updates = device_optim.DeviceOptimizer(opt, host_array(np.zeros(1, np.int32)), capacity=2)
    with pytest.raises(ValueError, match="3 steps do not fit its table of 2"):
        updates.begin(3)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_table_updates_on_the_gpu_equal_the_optimizers_step_bit_for_bit(name):
    """On the device, replayed from a graph: DeviceOptimizer's steps equal Optimizer.step's (the same
    arithmetic, the same scalars) bit for bit."""
    from cnn_gpu.backend import require_cupy
    from cnn_gpu.cuda.graph import capture
    cupy = require_cupy()
    rng = np.random.default_rng(2)
    ours = OPTIMIZERS[name](_params(cupy, np.random.default_rng(3), "float32"))
    eager = OPTIMIZERS[name](_params(cupy, np.random.default_rng(3), "float32"))
    step = cupy.zeros(1, dtype=np.int32)
    updates = device_optim.DeviceOptimizer(ours, step, capacity=4)
    updates.begin(4)
    grads = [cupy.empty(p.data.shape, dtype=np.float32) for p in ours.params]  # the graph's inputs

    def body():
        for p, g in zip(ours.params, grads):
            p.grad = g
        updates.update()
        step[...] += 1
    body_graph = None
    for s in range(4):
        host_grads = _grads(rng, ours.params, s, "float32")
        for g, h in zip(grads, host_grads):
            g.set(h)
        if body_graph is None:
            body()  # eagerly first, then captured
            body_graph = capture(body, cupy.cuda.MemoryPool())
        else:
            body_graph.launch()
        updates.stepped()
        for p, h in zip(eager.params, host_grads):
            p.grad = cupy.asarray(h)
        eager.step()
    for a, b in zip(ours.params, eager.params):
        np.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data))
