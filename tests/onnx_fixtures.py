"""What the ONNX tests share: the runtimes that check our files, small zoo models, and our own
evaluation output (skipped, saying why, where an op of a branch not merged yet is needed)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cnn_gpu import layers as L
from cnn_gpu.models import build

# float32 through two implementations (other summation orders): the tolerance of the issue
RTOL, ATOL = 1e-4, 1e-5

# Small members of the zoo: (builder name, input shape, extra builder arguments).
ZOO = [
    ("seed_cnn", (28, 28, 1), {}),
    ("resnet20", (12, 12, 3), {"width": 4}),
    ("mobilenet", (12, 12, 2), {"stages": ((8, 1), (16, 2))}),
    ("vgg", (16, 16, 3), {"widths": (4, 8), "hidden": 16}),
]


def zoo_model(name: str, shape: tuple, extra: dict, batch_norm: bool, seed: int = 0) -> L.Layer:
    model = build(name, input_shape=shape, num_classes=5, batch_norm=batch_norm, seed=seed, **extra)
    randomize_batch_norm(model, np.random.default_rng(seed + 100))
    return model


def randomize_batch_norm(model: L.Layer, rng: np.random.Generator) -> None:
    """Running statistics and affine parameters away from 0 and 1, so batch norm is not the identity."""
    for _, layer in model.named_layers():
        if isinstance(layer, (L.BatchNorm1D, L.BatchNorm2D)):
            c = layer.num_features
            dtype = layer.params["gamma"].data.dtype
            layer.params["gamma"].data = rng.uniform(0.5, 1.5, c).astype(dtype)
            layer.params["beta"].data = rng.uniform(-0.5, 0.5, c).astype(dtype)
            layer.buffers["running_mean"] = rng.uniform(-0.5, 0.5, c).astype(dtype)
            layer.buffers["running_var"] = rng.uniform(0.5, 2.0, c).astype(dtype)


def ours(model: L.Layer, x: np.ndarray) -> np.ndarray:
    """The model's evaluation output; a skip naming the missing op where main does not compute it
    yet (grouped or dilated convolution: branch conv; pooling with dilation or ceil mode: branch pool)."""
    model.eval()
    try:
        return np.asarray(model.forward(x))
    except NotImplementedError as exc:
        pytest.skip(f"needs an op that is not on this branch yet: {exc}")


def run_ort(model_proto: Any, x: np.ndarray, input_name: str | None = None) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = input_name or session.get_inputs()[0].name
    return session.run(None, {name: x})[0]


def run_reference(model_proto: Any, x: np.ndarray) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator
    evaluator = ReferenceEvaluator(model_proto)
    return evaluator.run(None, {model_proto.graph.input[0].name: x})[0]
