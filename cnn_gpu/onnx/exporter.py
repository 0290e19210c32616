"""Export any cnn_gpu model to ONNX (opset 17, IR 8, float32) for onnxruntime,
TensorRT and the rest; cnn_gpu.onnx.export and export_checkpoint are the entry points.

The file computes the model's evaluation mode:
- the graph input is ours, (N, H, W, C) with a dynamic batch axis N, and one Transpose turns it
  into ONNX's NCHW; image outputs are transposed back, so the file takes and gives what the model
  does (a vector input (N, D) and vector outputs need no transpose);
- conv weights are stored as ONNX's (C_out, C_in/groups, KH, KW), pads explicitly, ceil mode,
  dilation and groups as ours;
- a Flatten of an image is ONNX's, in (c, h, w) order, and the dense layer reading it has its rows
  permuted from our (h, w, c) order to that one, so no transpose runs before it (the same holds
  through the elementwise layers, batch norms and sums between them); a flatten read by anything
  else is reordered to ours by a Transpose first;
- batch norm is BatchNormalization in inference form, with its epsilon (and its momentum in ONNX's
  convention, 1 - ours);
- node names are the layers' paths ('stage1.block0.conv1'), initializers the parameters' names.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import __version__
from .. import layers as L
from ..atomic import atomic_write
from ..backend import to_numpy
from ..model import Graph
from . import common
from . import layers as OL
from .common import OnnxError, require_onnx, unique_name
from .layout import conv_weight_to_onnx, hwc_rows_to_chw

onnx = require_onnx()
from onnx import TensorProto, helper, numpy_helper

IMAGE, FLAT, CHW = "image", "flat", "chw"


class Value(NamedTuple):
    """One of our tensors as the ONNX graph holds it.

    name: the ONNX tensor; shape: our per-sample shape, (H, W, C) or (D,); form:
      IMAGE  an (H, W, C) image held as ONNX's (N, C, H, W)
      FLAT   a vector (N, D) in our order
      CHW    the flatten of the image `image` (H, W, C), held in ONNX's (c, h, w) order
    source: for CHW made by a Flatten, the ONNX image it flattens (to reorder it cheaply)."""

    name: str
    shape: tuple[int, ...]
    form: str
    image: tuple[int, int, int] | None = None
    source: str | None = None

    def computed(self, name: str) -> Value:
        """The value of a layer that keeps this one's shape and form (its source no longer holds it)."""
        return self._replace(name=name, source=None)


class _Builder:
    """The nodes and initializers of the ONNX graph under construction, with unique tensor names."""

    def __init__(self, reserved: Sequence[str]) -> None:
        self.dtype = np.dtype(np.float32)  # of every float initializer: what deployment runs
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.taken: set[str] = set(reserved)
        self._plain: dict[str, Value] = {}

    def unique(self, name: str) -> str:
        return unique_name(name, self.taken)

    def const(self, name: str, array: Any, dtype: Any = None) -> str:
        """An initializer of `array` (float32 unless told) named after `name`."""
        a = np.array(array, dtype=self.dtype if dtype is None else dtype, order="C")  # 0-d stays 0-d
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(a, name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """A node of operator `op` named `name` (made unique) whose one output has its name."""
        name = self.unique(name)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def plain(self, v: Value, path: str) -> Value:
        """v as a FLAT vector in our order: a CHW one is reordered (Transpose to NHWC, Flatten)."""
        if v.form != CHW:
            return v
        if v.name not in self._plain:
            h, w, c = v.image
            source = v.source
            if source is None:  # back to the image first
                shape = self.const(f"{path}/image_shape", [-1, c, h, w], np.int64)
                source = self.node("Reshape", [v.name, shape], f"{path}/to_image")
            nhwc = self.node("Transpose", [source], f"{path}/to_nhwc", perm=[0, 2, 3, 1])
            self._plain[v.name] = Value(self.node("Flatten", [nhwc], f"{path}/flatten_nhwc", axis=1), v.shape, FLAT)
        return self._plain[v.name]


# ---- one layer --------------------------------------------------------------------------------------

Exporter = Callable[[_Builder, Any, str, list[Value]], Value]


def _image(v: Value, path: str, layer: L.Layer) -> Value:
    if v.form != IMAGE:
        raise OnnxError(f"cannot export node {path!r} ({type(layer).__name__}: {layer!r}): it reads a vector "
                        f"of shape {v.shape}, but exports only on an (H, W, C) image")
    return v


def _conv(b: _Builder, layer: L.Conv2D, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer)
    inputs = [x.name, b.const(f"{path}.weight", conv_weight_to_onnx(to_numpy(layer.params["weight"].data)))]
    if "bias" in layer.params:
        inputs.append(b.const(f"{path}.bias", to_numpy(layer.params["bias"].data)))
    (ph, pw), (dh, dw) = layer.padding, layer.dilation
    y = b.node("Conv", inputs, path, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
               pads=[ph, pw, ph, pw], dilations=[dh, dw], group=layer.groups)
    return Value(y, layer.output_shape(x.shape), IMAGE)


def _dense(b: _Builder, layer: L.Dense, path: str, xs: list[Value]) -> Value:
    x = xs[0]
    w = to_numpy(layer.params["weight"].data)  # (in, out), Gemm's B with transB=0
    if x.form == CHW:
        w = hwc_rows_to_chw(w, x.image)  # rows in the (c, h, w) order of the ONNX flatten it reads
    inputs = [x.name, b.const(f"{path}.weight", w)]
    if "bias" in layer.params:
        inputs.append(b.const(f"{path}.bias", to_numpy(layer.params["bias"].data)))
    return Value(b.node("Gemm", inputs, path), layer.output_shape(x.shape), FLAT)


def _per_feature(v: Value, vector: np.ndarray) -> np.ndarray:
    """A per-channel (C,) vector shaped to broadcast over v as ONNX holds it: (C, 1, 1) for an
    image, (D,) for a vector (in (c, h, w) order for a CHW one)."""
    if v.form == IMAGE:
        return vector.reshape(-1, 1, 1)
    if v.form == CHW:
        return hwc_rows_to_chw(vector, v.image)
    return vector


def _batch_norm(b: _Builder, layer: Any, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer) if isinstance(layer, L.BatchNorm2D) else xs[0]
    if isinstance(layer, L.BatchNorm1D) and x.form == IMAGE:
        raise OnnxError(f"cannot export node {path!r} (BatchNorm1D): it reads an image {x.shape}")
    arrays = {"gamma": to_numpy(layer.params["gamma"].data), "beta": to_numpy(layer.params["beta"].data),
              "running_mean": to_numpy(layer.buffers["running_mean"]),
              "running_var": to_numpy(layer.buffers["running_var"])}
    if x.form == CHW:  # per feature of a flatten in (c, h, w) order: the vectors follow it
        arrays = {k: hwc_rows_to_chw(v, x.image) for k, v in arrays.items()}
    inputs = [x.name] + [b.const(f"{path}.{k}", v) for k, v in arrays.items()]
    y = b.node("BatchNormalization", inputs, path, epsilon=float(layer.eps), momentum=1.0 - float(layer.momentum))
    return x.computed(y)


def _max_pool(b: _Builder, layer: L.MaxPool2D, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer)
    (ph, pw) = layer.padding
    y = b.node("MaxPool", [x.name], path, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
               pads=[ph, pw, ph, pw], dilations=list(layer.dilation), ceil_mode=int(layer.ceil_mode))
    return Value(y, layer.output_shape(x.shape), IMAGE)


def _avg_pool(b: _Builder, layer: L.AvgPool2D, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer)
    (ph, pw) = layer.padding
    y = b.node("AveragePool", [x.name], path, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
               pads=[ph, pw, ph, pw], ceil_mode=int(layer.ceil_mode),
               count_include_pad=int(layer.count_include_pad))
    return Value(y, layer.output_shape(x.shape), IMAGE)


def _global_avg_pool(b: _Builder, layer: L.GlobalAvgPool2D, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer)
    pooled = b.node("GlobalAveragePool", [x.name], path)  # (N, C, 1, 1)
    return Value(b.node("Flatten", [pooled], f"{path}/flatten", axis=1), layer.output_shape(x.shape), FLAT)


def _clip(b: _Builder, layer: L.Clip, path: str, xs: list[Value]) -> Value:
    low, high = b.const(f"{path}.min", np.float64(layer.low)), b.const(f"{path}.max", np.float64(layer.high))
    return xs[0].computed(b.node("Clip", [xs[0].name, low, high], path))


def _silu(b: _Builder, layer: L.SiLU, path: str, xs: list[Value]) -> Value:
    gate = b.node("Sigmoid", [xs[0].name], f"{path}/sigmoid")
    return xs[0].computed(b.node("Mul", [xs[0].name, gate], path))


def _softmax(b: _Builder, layer: L.Softmax, path: str, xs: list[Value]) -> Value:
    # Over our last axis: the channels of an image (ONNX's axis 1), the features of a vector (a CHW
    # vector's features are permuted, which a softmax over all of them does not see).
    return xs[0].computed(b.node("Softmax", [xs[0].name], path, axis=1))


def _dropout(b: _Builder, layer: L.Dropout, path: str, xs: list[Value]) -> Value:
    ratio = b.const(f"{path}.ratio", np.float64(layer.p))  # the identity in inference
    return xs[0].computed(b.node("Dropout", [xs[0].name, ratio], path))


def _flatten(b: _Builder, layer: L.Flatten, path: str, xs: list[Value]) -> Value:
    x = xs[0]
    if x.form != IMAGE:
        return x  # a vector flattens to itself
    h, w, c = x.shape
    y = b.node("Flatten", [x.name], path, axis=1)  # (N, C*H*W) in (c, h, w) order
    if h * w == 1 or c == 1:  # the two orders agree
        return Value(y, (h * w * c,), FLAT)
    return Value(y, (h * w * c,), CHW, image=(h, w, c), source=x.name)


def _add(b: _Builder, layer: L.Add, path: str, xs: list[Value]) -> Value:
    if not all(x.form == CHW and x.image == xs[0].image for x in xs):
        xs = [b.plain(x, path) for x in xs]
    y = b.node("Add" if len(xs) == 2 else "Sum", [x.name for x in xs], path)
    return xs[0].computed(y)


def _concat(b: _Builder, layer: L.Concat, path: str, xs: list[Value]) -> Value:
    xs = [b.plain(x, path) for x in xs]
    shape = layer.output_shape(*(x.shape for x in xs))
    return Value(b.node("Concat", [x.name for x in xs], path, axis=1), shape, xs[0].form)


def _pad(b: _Builder, layer: OL.Pad2D, path: str, xs: list[Value]) -> Value:
    x = _image(xs[0], path, layer)
    t, bottom, left, r = layer.pads
    pads = b.const(f"{path}.pads", [0, 0, t, left, 0, 0, bottom, r], np.int64)
    value = b.const(f"{path}.value", np.float64(layer.value))
    return Value(b.node("Pad", [x.name, pads, value], path, mode="constant"), layer.output_shape(x.shape), IMAGE)


def _channel_affine(b: _Builder, layer: OL.ChannelAffine, path: str, xs: list[Value]) -> Value:
    x = xs[0]
    y = x.name
    if "scale" in layer.params:
        scale = b.const(f"{path}.scale", _per_feature(x, to_numpy(layer.params["scale"].data)))
        y = b.node("Mul", [y, scale], path if "shift" not in layer.params else f"{path}/scale")
    if "shift" in layer.params:
        shift = b.const(f"{path}.shift", _per_feature(x, to_numpy(layer.params["shift"].data)))
        y = b.node("Add", [y, shift], path)
    return x.computed(y)


def _reshape(b: _Builder, layer: OL.Reshape, path: str, xs: list[Value]) -> Value:
    x = xs[0]
    shape = layer.output_shape(x.shape)
    if len(shape) == 1:  # a flatten
        return _flatten(b, L.Flatten(), path, xs)
    if len(shape) != 3:
        raise OnnxError(f"cannot export node {path!r} ({layer!r}): ONNX export takes reshapes to a vector or "
                        f"an (H, W, C) image, not to {shape}")
    h, w, c = shape
    if x.form == CHW and x.image == shape:  # un-flatten the ONNX flatten: its own order
        target = b.const(f"{path}.shape", [-1, c, h, w], np.int64)
        return Value(b.node("Reshape", [x.name, target], path), shape, IMAGE)
    x = b.plain(x, path)
    if x.form == IMAGE:
        x = Value(b.node("Transpose", [x.name], f"{path}/to_nhwc", perm=[0, 2, 3, 1]), x.shape, FLAT)
    target = b.const(f"{path}.shape", [-1, h, w, c], np.int64)
    y = b.node("Reshape", [x.name, target], f"{path}/nhwc")  # our order, then to NCHW
    return Value(b.node("Transpose", [y], path, perm=[0, 3, 1, 2]), shape, IMAGE)


def _simple(op: str) -> Exporter:
    def export(b: _Builder, layer: L.Layer, path: str, xs: list[Value]) -> Value:
        return xs[0].computed(b.node(op, [xs[0].name], path))
    return export


def _with_attrs(op: str, attrs: Callable[[Any], dict[str, Any]]) -> Exporter:
    def export(b: _Builder, layer: L.Layer, path: str, xs: list[Value]) -> Value:
        return xs[0].computed(b.node(op, [xs[0].name], path, **attrs(layer)))
    return export


# Each layer type's exporter, by exact type (ReLU6 is a Clip, exported as one).
EXPORTERS: dict[type, Exporter] = {
    L.Conv2D: _conv,
    L.Dense: _dense,
    L.BatchNorm1D: _batch_norm,
    L.BatchNorm2D: _batch_norm,
    L.MaxPool2D: _max_pool,
    L.AvgPool2D: _avg_pool,
    L.GlobalAvgPool2D: _global_avg_pool,
    L.ReLU: _simple("Relu"),
    L.LeakyReLU: _with_attrs("LeakyRelu", lambda layer: {"alpha": layer.negative_slope}),
    L.ReLU6: _clip,
    L.Clip: _clip,
    L.Sigmoid: _simple("Sigmoid"),
    L.Tanh: _simple("Tanh"),
    L.SiLU: _silu,
    L.HardSigmoid: _with_attrs("HardSigmoid", lambda layer: {"alpha": layer.alpha, "beta": layer.beta}),
    L.HardSwish: _simple("HardSwish"),
    L.Softmax: _softmax,
    L.Identity: _simple("Identity"),
    L.Dropout: _dropout,
    L.Flatten: _flatten,
    L.Add: _add,
    L.Concat: _concat,
    OL.Pad2D: _pad,
    OL.ChannelAffine: _channel_affine,
    OL.Reshape: _reshape,
}


# The layers whose exporter takes a CHW vector (a flatten in ONNX's order) as it is: elementwise ones,
# those with per-feature vectors that follow the permutation, and the dense layer that undoes it.
# Every other layer reads a CHW vector reordered to ours first.
READS_CHW = {L.Dense, L.BatchNorm1D, L.ReLU, L.LeakyReLU, L.ReLU6, L.Clip, L.Sigmoid, L.Tanh, L.SiLU,
             L.HardSigmoid, L.HardSwish, L.Softmax, L.Identity, L.Dropout, L.Flatten, L.Add, OL.ChannelAffine,
             OL.Reshape}


def _export_layer(b: _Builder, layer: L.Layer, path: str, xs: list[Value]) -> Value:
    if isinstance(layer, Graph):  # Sequential too: its nodes, inline, named by their paths
        values = dict(zip(layer.input_names, xs))
        for node in layer.nodes:
            values[node.name] = _export_layer(b, node.layer, f"{path}.{node.name}" if path else node.name,
                                              [values[i] for i in node.inputs])
        return values[layer.output_name]
    exporter = EXPORTERS.get(type(layer))
    if exporter is None:
        raise OnnxError(f"cannot export node {path or '(the model)'!r}: layer type {type(layer).__name__} "
                        f"({layer!r}) has no ONNX exporter; exported types: "
                        f"{', '.join(sorted(t.__name__ for t in EXPORTERS))}, Graph, Sequential")
    if type(layer) not in READS_CHW:
        xs = [b.plain(x, path) for x in xs]
    return exporter(b, layer, path, xs)


# ---- the whole model ----------------------------------------------------------------------------------

def to_onnx(model: L.Layer, input_shape: Sequence[int] | Sequence[Sequence[int]],
            metadata: dict[str, Any] | None = None) -> Any:
    """The onnx.ModelProto of `model` in evaluation mode (see the module docstring); input_shape is
    one sample's (H, W, C) or (D,), or one such shape per input of a multi-input Graph."""
    input_names = list(model.input_names) if isinstance(model, Graph) else ["input"]
    shapes = _input_shapes(input_shape, len(input_names))
    try:
        output_shape = tuple(model.output_shape(*shapes))
    except ValueError as exc:
        raise OnnxError(f"cannot export: the model does not take inputs of shape {shapes}: {exc}") from None
    elem = TensorProto.FLOAT  # a float64 model's weights are rounded to float32
    b = _Builder(reserved=[*input_names, "output"])
    graph_inputs, values = [], []
    for name, shape in zip(input_names, shapes):
        graph_inputs.append(helper.make_tensor_value_info(name, elem, ["batch", *shape]))
        if len(shape) == 3:  # ours (N, H, W, C) -> ONNX's (N, C, H, W), once
            values.append(Value(b.node("Transpose", [name], f"{name}/to_nchw", perm=[0, 3, 1, 2]), shape, IMAGE))
        elif len(shape) == 1:
            values.append(Value(name, shape, FLAT))
        else:
            raise OnnxError(f"cannot export: input {name!r} has per-sample shape {shape}; an image (H, W, C) "
                            "or a vector (D,) is expected")
    if isinstance(model, Graph):
        y = _export_layer(b, model, "", values)
    else:
        y = _export_layer(b, model, type(model).__name__.lower(), values)
    y = b.plain(y, "output")
    if y.form == IMAGE:  # back to ours, (N, H, W, C)
        y = y._replace(name=b.node("Transpose", [y.name], "output/to_nhwc", perm=[0, 2, 3, 1]))
    if y.name in input_names:
        y = y._replace(name=b.node("Identity", [y.name], "output/identity"))
    _rename(b.nodes, y.name, "output")
    graph = helper.make_graph(
        b.nodes, "cnn_gpu", graph_inputs,
        [helper.make_tensor_value_info("output", elem, ["batch", *output_shape])], b.initializers)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", common.OPSET)],
                                    ir_version=common.IR_VERSION, producer_name="cnn_gpu",
                                    producer_version=__version__,
                                    doc_string=f"{type(model).__name__} exported by cnn_gpu {__version__}")
    props = {common.INPUT_LAYOUT: "NHWC" if len(shapes[0]) == 3 else "NC",
             common.INPUT_SHAPE: list(shapes[0])}
    props.update(metadata or {})
    helper.set_model_props(model_proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def _input_shapes(input_shape: Any, count: int) -> list[tuple[int, ...]]:
    shapes = [input_shape] if input_shape and isinstance(input_shape[0], (int, np.integer)) else list(input_shape)
    if len(shapes) != count:
        raise OnnxError(f"cannot export: the model has {count} input(s), got {len(shapes)} input shape(s) {shapes}")
    return [tuple(int(s) for s in shape) for shape in shapes]


def _rename(nodes: list[Any], old: str, new: str) -> None:
    for node in nodes:
        for field in (node.input, node.output):
            for k, name in enumerate(field):
                if name == old:
                    field[k] = new


def export_model(model: L.Layer, path: str | os.PathLike, input_shape: Sequence[int] | Sequence[Sequence[int]],
                 metadata: dict[str, Any] | None = None) -> Path:
    model_proto = to_onnx(model, input_shape, metadata)
    data = model_proto.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


def checkpoint_metadata(ckpt: Any) -> dict[str, Any]:
    """What a checkpoint says about its inputs and outputs, as metadata_props: class names, input
    shape, dataset, the normalization and how to apply it."""
    meta = ckpt.metadata
    props: dict[str, Any] = {}
    if meta.get("class_names"):
        props[common.CLASS_NAMES] = list(meta["class_names"])
    if meta.get("dataset"):
        props["dataset"] = str(meta["dataset"])
    if ckpt.norm_mean is not None:
        props[common.NORM_MEAN] = [float(v) for v in ckpt.norm_mean]
        props[common.NORM_STD] = [float(v) for v in ckpt.norm_std]
        props[common.PREPROCESSING] = ("x = (pixels / 255 - normalization_mean) / normalization_std per channel; "
                                       "pixels in [0, 255], x float32 (N, H, W, C)")
    props["cnn_gpu_epoch"] = str(ckpt.epoch)
    return props


def export_checkpoint_file(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    from ..checkpoint import load_checkpoint  # noqa: PLC0415 - checkpoint imports the training stack
    ckpt = load_checkpoint(ckpt_path)
    input_shape = ckpt.metadata.get("input_shape")
    if not input_shape:
        raise OnnxError(f"{ckpt_path}: the checkpoint's metadata has no input_shape; export the model with "
                        "cnn_gpu.onnx.export(model, path, input_shape=(H, W, C)) instead")
    model = ckpt.build_model()
    return export_model(model, out_path, tuple(input_shape), checkpoint_metadata(ckpt))
