"""The layers an ONNX import adds (cnn_gpu/onnx/layers.py): forward against plain NumPy (and
PyTorch's padding where torch is importable), gradients against finite differences in float64, on
every backend, and their configs."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.config import from_config, layer_config
from cnn_gpu.onnx.layers import (
    ChannelAffine,
    Pad2D,
    Pads,
    Reshape,
    channel_affine_backward,
    channel_affine_forward,
    pad2d_backward,
    pad2d_forward,
)

from .helpers import assert_close, numerical_gradients, random


@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 0, 2, 3), (0, 2, 0, 1)])
def test_pad2d_forward_and_backward(xp, rng, pads):
    x = random(xp, rng, (2, 3, 4, 2))
    pads = Pads(*pads)
    y, cache = pad2d_forward(x, pads, value=-1.5)
    expected = np.pad(to_numpy(x), ((0, 0), pads[:2], pads[2:], (0, 0)), constant_values=-1.5)
    assert_close(y, expected)
    dy = random(xp, rng, y.shape)
    (numeric,) = numerical_gradients(lambda a: pad2d_forward(a, pads, -1.5)[0], [x], dy)
    assert_close(pad2d_backward(dy, cache), numeric, rtol=1e-6, atol=1e-8)


def test_pad2d_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 4, 5))
    y, _ = pad2d_forward(x, Pads(1, 2, 3, 0), value=0.25)
    t = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)), (3, 0, 1, 2), value=0.25)
    np.testing.assert_array_equal(y, t.numpy().transpose(0, 2, 3, 1))  # copies only


@pytest.mark.parametrize("parts", [(True, True), (True, False), (False, True)], ids=["both", "scale", "shift"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (7, 6)], ids=["image", "vector"])
def test_channel_affine_forward_and_backward(xp, rng, parts, shape):
    x = random(xp, rng, shape)
    scale = random(xp, rng, (6,)) if parts[0] else None
    shift = random(xp, rng, (6,)) if parts[1] else None
    y, cache = channel_affine_forward(x, scale, shift)
    expected = to_numpy(x) * (1 if scale is None else to_numpy(scale)) + (0 if shift is None else to_numpy(shift))
    assert_close(y, expected, rtol=1e-12)
    dy = random(xp, rng, shape)
    dx, dscale, dshift = channel_affine_backward(dy, cache)
    inputs = [x] + [v for v in (scale, shift) if v is not None]

    def f(x, *vectors):
        it = iter(vectors)
        return channel_affine_forward(x, next(it) if parts[0] else None, next(it) if parts[1] else None)[0]
    numeric = numerical_gradients(f, inputs, dy)
    assert_close(dx, numeric[0], rtol=1e-6, atol=1e-8)
    if parts[0]:
        assert_close(dscale, numeric[1], rtol=1e-6, atol=1e-8)
    if parts[1]:
        assert_close(dshift, numeric[-1], rtol=1e-6, atol=1e-8)


def test_channel_affine_layer_trains_and_folds(rng):
    layer = ChannelAffine(3, dtype="float64")
    layer.params["scale"].data = rng.uniform(0.5, 2, 3)
    layer.params["shift"].data = rng.standard_normal(3)
    x = rng.standard_normal((4, 2, 2, 3))
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    np.testing.assert_allclose(layer.params["shift"].grad, np.full(3, 16.0))
    np.testing.assert_allclose(layer.params["scale"].grad, x.sum(axis=(0, 1, 2)))
    scale, shift = layer.eval_affine()
    np.testing.assert_allclose(x * scale + shift, y)
    only_shift = ChannelAffine(3, scale=False, dtype="float64")
    np.testing.assert_array_equal(only_shift.eval_affine()[0], np.ones(3))
    with pytest.raises(ValueError, match="needs a scale, a shift"):
        ChannelAffine(3, scale=False, shift=False)


def test_reshape_layer(rng):
    layer = Reshape((1, 1, -1))
    x = rng.standard_normal((5, 6))
    y = layer.forward(x)
    assert y.shape == (5, 1, 1, 6) and layer.output_shape((6,)) == (1, 1, 6)
    np.testing.assert_array_equal(layer.backward(y), x)
    with pytest.raises(ValueError, match="cannot reshape"):
        Reshape((4, -1)).output_shape((6,))
    with pytest.raises(ValueError, match="at most one -1"):
        Reshape((-1, -1))


@pytest.mark.parametrize("layer,shape", [(Pad2D((1, 0, 2, 1), value=-np.inf), (2, 2, 4)),
                                         (ChannelAffine(4, shift=False, dtype="float64"), (2, 2, 4)),
                                         (Reshape((2, 2, 1)), (4,))], ids=["pad", "affine", "reshape"])
def test_configs_rebuild_the_layers(layer, shape):
    again = from_config(layer_config(layer))
    assert type(again) is type(layer) and again.get_config() == layer.get_config()
    assert again.output_shape(shape) == layer.output_shape(shape)


def test_pad2d_rejects_negative_pads():
    with pytest.raises(ValueError, match="four integers"):
        Pad2D((1, -1, 0, 0))


def test_configs_and_the_layers_need_no_onnx_package():
    """Without onnx installed: cnn_gpu.config (which names these layers) imports, and export/load say
    how to install what they need."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['onnx'] = None\n"  # `import onnx` now fails, as where it is missing
            "import cnn_gpu.config, cnn_gpu.onnx\n"
            "assert 'Pad2D' in cnn_gpu.config.LAYER_TYPES\n"
            "try:\n    cnn_gpu.onnx.load('model.onnx')\nexcept ImportError as exc:\n    print(exc)\n")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent  # this checkout's cnn_gpu
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "pip install 'cnn_gpu[onnx]'" in result.stdout
