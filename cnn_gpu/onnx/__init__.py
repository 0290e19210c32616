"""ONNX for cnn_gpu: export any model to a file that onnxruntime (servers, phones, browsers) and
TensorRT run, and import ONNX CNNs (PyTorch, Keras, the ONNX model zoo) as cnn_gpu Graphs that run
on either backend, show their layers, and fine-tune.

    import cnn_gpu.onnx
    cnn_gpu.onnx.export(model, "model.onnx", input_shape=(28, 28, 1))   # (N, 28, 28, 1) in, logits out
    cnn_gpu.onnx.export_checkpoint("runs/fashion/best.npz", "model.onnx")  # with class names and normalization
    model = cnn_gpu.onnx.load("resnet.onnx")                              # a Graph taking (N, H, W, C)
    cnn_gpu.onnx.read_metadata("model.onnx")                              # {"class_names": "[...]", ...}

Both directions keep our channels-last layout at the model's edges: an exported file's input is
(N, H, W, C) and an imported model takes (N, H, W, C) whatever the file's layout; the conversion to
and from ONNX's NCHW happens once, on the weights, never on every call (cnn_gpu/onnx/exporter.py
and importer.py say how; they are not named export and load, the names of the functions here).
The layers an import may add (Pad2D, ChannelAffine, Reshape) live in cnn_gpu.onnx.layers, which
needs no onnx package; the rest needs `pip install 'cnn_gpu[onnx]'`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import OnnxError
from .layers import ChannelAffine, Pad2D, Reshape

__all__ = ["ChannelAffine", "OnnxError", "Pad2D", "Reshape", "export", "export_checkpoint", "load", "read_metadata"]


def export(model: Any, path: str | os.PathLike, input_shape: Sequence[int] | Sequence[Sequence[int]],
           metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` (any cnn_gpu layer or model) in evaluation mode to an ONNX file, atomically.

    input_shape: one sample's (H, W, C) (or (D,) for a model of vectors), one per input of a
    multi-input Graph. The file has opset 17 (IR 8), float32 (a float64 model's weights are
    rounded), a dynamic batch axis, its input "input" in our (N, H, W, C) layout (a Graph's inputs
    keep their names) and its output "output" ((N, classes) for a classifier; an image output
    comes back as (N, H, W, C)). metadata: more metadata_props (a value that is not a string is
    written as JSON) besides input_layout and input_shape.
    Raises OnnxError naming the node (its path and type) of a layer that cannot be exported.
    Returns the path written.
    """
    from .exporter import export_model  # noqa: PLC0415 - onnx is needed from here on
    return export_model(model, path, input_shape, metadata)


def export_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Export a training checkpoint's model (`cnn-gpu export CKPT model.onnx`), with its input shape,
    class names, dataset and normalization (mean and std per channel, in [0, 1] pixel units, and the
    formula: x = (pixels / 255 - mean) / std) in the file's metadata_props. Returns the path written."""
    from .exporter import export_checkpoint_file  # noqa: PLC0415
    return export_checkpoint_file(ckpt_path, out_path)


def load(source: str | os.PathLike | Any, input_shape: Sequence[int] | None = None) -> Any:
    """An ONNX CNN (a file path or an onnx.ModelProto, opset 6 or later) as a cnn_gpu Graph, on the
    CPU, in training mode like a freshly built model (call .eval() to run it as the file does).

    The Graph takes (N, H, W, C) images (or (N, D) vectors) and gives images as (N, H, W, C); its
    parameters are ordinary Parameters, so it trains with cnn_gpu's optimizers, moves to the GPU
    with .to("gpu"), and writes to a config. input_shape (H, W, C): for a file whose input height,
    width or channels are not fixed. Raises OnnxError naming the node and operator (or attribute)
    that is not supported, and for files that are not readable ONNX.
    """
    from .importer import load_model  # noqa: PLC0415
    return load_model(source, input_shape)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's metadata_props as a dict of strings (cnn_gpu writes JSON lists in some)."""
    from .importer import read_metadata_props  # noqa: PLC0415
    return read_metadata_props(path)
