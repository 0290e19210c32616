"""Architectures as data: every model written to JSON and rebuilt from it, with no pickle.

A layer's config is {"type": <class name>, "args": <its constructor's arguments>}; a Graph's
args hold its nodes ({"name", "layer", "inputs"}), inputs and output, a Sequential's its layers,
each with a config of its own, so a config is a tree of plain JSON values:

    config = layer_config(model)          # dict, json.dumps-able
    again = from_config(config)           # the same architecture, with fresh weights
    again.load_state_dict(model.state_dict())

Checkpoints store the config, so `cnn-gpu evaluate/predict/train --resume` rebuild any model from
the checkpoint alone. LAYER_TYPES lists every type a config may name (explicitly: no lookup by
reflection); an unknown type, a missing argument, a cycle or a missing tensor fails with an error
that names the node.
"""
from __future__ import annotations

import inspect
import json
from typing import Any

from . import layers as L
from .model import Graph, Sequential
from .onnx import layers as onnx_layers

LAYER_TYPES: dict[str, type[L.Layer]] = {cls.__name__: cls for cls in (
    L.Conv2D, L.Dense, L.BatchNorm1D, L.BatchNorm2D, L.MaxPool2D, L.AvgPool2D, L.GlobalAvgPool2D,
    L.ReLU, L.LeakyReLU, L.ReLU6, L.Clip, L.Sigmoid, L.Tanh, L.SiLU, L.HardSigmoid, L.HardSwish, L.Softmax,
    L.Identity, L.Dropout, L.Flatten, L.Add, L.Concat, Graph, Sequential,
    onnx_layers.Pad2D, onnx_layers.ChannelAffine, onnx_layers.Reshape,  # what an ONNX import may add
)}


def layer_config(layer: L.Layer) -> dict[str, Any]:
    """{"type": ..., "args": ...} for a layer of a type in LAYER_TYPES."""
    name = type(layer).__name__
    if LAYER_TYPES.get(name) is not type(layer):
        raise ValueError(f"{layer!r}: layer type {name!r} cannot be written to a config; known: "
                         f"{', '.join(sorted(LAYER_TYPES))}")
    return {"type": name, "args": layer.get_config()}


def from_config(config: Any, path: str = "") -> L.Layer:
    """The layer (or model) a config describes, with fresh weights; `path` names it in errors."""
    where = path or "model"
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{where}: a layer config must be a dict with 'type' and 'args', got {config!r:.80}")
    name, args = config["type"], config.get("args", {})
    cls = LAYER_TYPES.get(name)
    if cls is None:
        raise ValueError(f"{where}: unknown layer type {name!r}; known: {', '.join(sorted(LAYER_TYPES))}")
    if not isinstance(args, dict):
        raise ValueError(f"{where}: the args of {name} must be a dict, got {args!r:.80}")
    if cls in (Graph, Sequential):
        return cls.from_config(args, from_config, path)
    parameters = inspect.signature(cls).parameters
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise ValueError(f"{where}: {name} takes no argument(s) {unknown}; it takes {sorted(parameters)}")
    try:
        return cls(**args)
    except TypeError as exc:  # a missing argument
        raise ValueError(f"{where}: {name}{tuple(args)}: {exc}") from None


def to_json(model: L.Layer) -> str:
    return json.dumps(layer_config(model))


def from_json(text: str) -> L.Layer:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the model config is not valid JSON: {exc}") from None
    return from_config(config)
