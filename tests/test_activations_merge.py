"""The elementwise activations (functional/activation.py), the merges (functional/merge.py) and the
softmax layer: NumPy references, float64 finite differences, PyTorch where it is installed, and
the layers that wrap them."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu import functional as F
from cnn_gpu import layers as L
from cnn_gpu.backend import to_numpy

from .helpers import assert_close, numerical_gradients, random


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# name -> (layer, NumPy reference of the forward, torch's function name and arguments)
ACTIVATIONS = {
    "relu": (lambda: L.ReLU(), lambda x: np.maximum(x, 0), ("relu", {})),
    "leaky_relu": (lambda: L.LeakyReLU(0.1), lambda x: np.where(x > 0, x, 0.1 * x), ("leaky_relu", {"negative_slope": 0.1})),
    "relu6": (lambda: L.ReLU6(), lambda x: np.clip(x, 0, 6), ("relu6", {})),
    "clip": (lambda: L.Clip(-1.5, 2.0), lambda x: np.clip(x, -1.5, 2.0), ("hardtanh", {"min_val": -1.5, "max_val": 2.0})),
    "sigmoid": (lambda: L.Sigmoid(), _sigmoid, ("sigmoid", {})),
    "tanh": (lambda: L.Tanh(), np.tanh, ("tanh", {})),
    "silu": (lambda: L.SiLU(), lambda x: x * _sigmoid(x), ("silu", {})),
    "hard_sigmoid": (lambda: L.HardSigmoid(), lambda x: np.clip(x / 6 + 0.5, 0, 1), ("hardsigmoid", {})),
    "hard_swish": (lambda: L.HardSwish(), lambda x: x * np.clip(x + 3, 0, 6) / 6, ("hardswish", {})),
    "softmax": (lambda: L.Softmax(), lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True), ("softmax", {"dim": -1})),
}


def _input(xp, rng, shape=(3, 4, 5)):
    """Values spread over [-8, 8], kept away from the kinks (0, +-3, the clip bounds), where finite
    differences are not defined."""
    x = rng.uniform(-8, 8, shape)
    for kink in (0.0, 3.0, -3.0, 6.0, -1.5, 2.0):
        near = np.abs(x - kink) < 1e-3
        x[near] += 1e-2
    return xp.asarray(x)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_forward_and_gradient(xp, rng, name):
    make, reference, _ = ACTIVATIONS[name]
    layer = make()
    x = _input(xp, rng)
    y = layer.forward(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, reference(to_numpy(x)), rtol=1e-12, atol=1e-14)
    dy = random(xp, rng, x.shape)
    dx = layer.backward(dy)
    numeric, = numerical_gradients(lambda a: make().forward(a), [x], dy)
    assert_close(dx, numeric, rtol=1e-6, atol=1e-8, what=name)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_pytorch(rng, name):
    torch = pytest.importorskip("torch")
    make, _, (fn, kwargs) = ACTIVATIONS[name]
    x = _input(np, rng).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = getattr(torch.nn.functional, fn)(tx, **kwargs)
    ty.backward(torch.tensor(dy))
    layer = make()
    # float32: PyTorch's kernels (vectorized exp, fused forms) round differently from NumPy's.
    np.testing.assert_allclose(layer.forward(x), ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_sigmoid_does_not_overflow():
    with np.errstate(over="raise"):
        y, _ = F.sigmoid_forward(np.array([-1000.0, 0.0, 1000.0], dtype=np.float32))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


def test_add_and_concat_gradients(xp, rng):
    a, b, c = (random(xp, rng, (2, 3, 3, k)) for k in (2, 2, 2))
    y, cache = F.add_forward(a, b, c)
    assert_close(y, to_numpy(a) + to_numpy(b) + to_numpy(c), rtol=1e-14)
    dy = random(xp, rng, y.shape)
    assert all(g is dy for g in F.add_backward(dy, cache))
    a, b = random(xp, rng, (2, 3, 3, 2)), random(xp, rng, (2, 3, 3, 5))
    y, cache = F.concat_forward([a, b])
    assert y.shape == (2, 3, 3, 7)
    dy = random(xp, rng, y.shape)
    da, db = F.concat_backward(dy, cache)
    numeric = numerical_gradients(lambda p, q: F.concat_forward([p, q])[0], [a, b], dy)
    assert_close(da, numeric[0], rtol=1e-6, atol=1e-7)  # central differences of a sum over 126 terms
    assert_close(db, numeric[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("inputs", [2, 3])
def test_add_with_relu_is_the_sums_maximum(xp, rng, inputs):
    """relu=True: max(a + b [+ c], 0), the same sums in the same order then the same maximum as
    np.maximum, so the same bits (two inputs: one compiled pass; three: the sum, then the ReLU)."""
    xs = [random(xp, rng, (2, 3, 3, 4)) for _ in range(inputs)]
    y, _ = F.add_forward(*xs, relu=True)
    total = to_numpy(xs[0]) + to_numpy(xs[1])
    for x in xs[2:]:
        total += to_numpy(x)
    np.testing.assert_array_equal(to_numpy(y), np.maximum(total, 0))


def test_merge_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"add: input 1 has shape \(2, 3\) but input 0 has \(2, 4\)"):
        F.add_forward(np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"concat: input 1 has shape \(2, 5, 3\) and input 0 has \(2, 4, 3\)"):
        F.concat_forward([np.zeros((2, 4, 3)), np.zeros((2, 5, 3))])
    with pytest.raises(ValueError, match="needs at least two inputs"):
        F.add_forward(np.zeros(3))


def test_global_average_pool(xp, rng):
    layer = L.GlobalAvgPool2D()
    x = random(xp, rng, (2, 3, 5, 4))
    assert_close(layer.forward(x), to_numpy(x).mean(axis=(1, 2)), rtol=1e-12)
    dy = random(xp, rng, (2, 4))
    dx = layer.backward(dy)
    numeric, = numerical_gradients(lambda a: F.global_avg_pool2d_forward(a)[0], [x], dy)
    assert_close(dx, numeric, rtol=1e-8, atol=1e-10)
    assert layer.output_shape((3, 5, 4)) == (4,)


def test_layers_without_parameters_have_configs_that_rebuild_them():
    for make, _, _ in ACTIVATIONS.values():
        layer = make()
        again = type(layer)(**layer.get_config())
        assert repr(again) == repr(layer) and again.get_config() == layer.get_config()
