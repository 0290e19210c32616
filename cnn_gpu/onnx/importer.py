"""Import an ONNX CNN as a cnn_gpu Graph (cnn_gpu.onnx.load is the entry point).

The file's NCHW graph becomes a channels-last one once, at load time: each ONNX tensor is held by
one of our tensors in a *layout* that says how our array stores it,

    IMAGE    ONNX (N, C, H, W); ours (N, H, W, C)
    NHWC     ONNX (N, H, W, C); ours the same (a channels-last graph input before its Transpose to
             NCHW, as Keras exports and ours write, or an output transposed back)
    VECTOR   ONNX (N, D); ours the same
    FLAT     ONNX (N, C*H*W), the flatten of an IMAGE in (c, h, w) order; ours holds the (h, w, c)
             flatten. The Gemm or MatMul reading it gets its weight rows permuted to (h, w, c) at
             load time; elementwise ops, per-feature constants and batch norms keep the layout
             (their vectors permuted likewise)
    POOLED   ONNX (N, C, 1, 1), GlobalAveragePool's output; ours (N, C). A Flatten of it is ours
             as it is; a layer that needs an image gets a Reshape to (N, 1, 1, C)

so weights are transposed once and no activation is ever transposed at run time. Everything
computed from constants alone (initializers, Constant, ConstantOfShape, Shape of a tensor whose
sample shape is known, Gather, Unsqueeze, Concat, Cast, arithmetic, ...) is folded into NumPy
arrays at load time; the batch size, unknown until the model runs, is the marker BATCH, which may
pass through copies (Gather, Unsqueeze, Concat) into a Reshape's target and nowhere else.

Each operator is a converter function in CONVERTERS (and, for constant inputs, a folder in
FOLDERS); an operator, an attribute or an attribute value that cnn_gpu cannot compute raises
OnnxError naming the node and the operator, never a different model. The attributes and inputs
that moved over the opsets are read where each opset puts them (Clip's min/max, Reshape's shape,
Squeeze/Unsqueeze axes, Pad's pads and value, Dropout's ratio, the legacy broadcast of Add/Mul
before opset 7, Softmax's axis before opset 13).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import layers as L
from ..geometry import output_size
from ..layers import Parameter
from ..model import Graph, Node
from . import common
from . import layers as OL
from .common import OnnxError, require_onnx, unique_name
from .layout import chw_rows_to_hwc, conv_weight_from_onnx

onnx = require_onnx()
from onnx import TensorProto, helper, numpy_helper

IMAGE, NHWC, VECTOR, FLAT, POOLED = "image", "nhwc", "vector", "flat", "pooled"
BATCH = np.iinfo(np.int64).min  # the batch size in a folded shape: unknown until the model runs


class Value(NamedTuple):
    """An ONNX tensor as our graph holds it: our tensor `tensor` (a node or a graph input) in
    `layout` (see the module docstring); `shape` is ONNX's per-sample shape ((C, H, W) for an IMAGE,
    (H, W, C) for NHWC, (D,) for VECTOR and FLAT, (C, 1, 1) for POOLED); `image` is the (C, H, W)
    that a FLAT vector flattens."""

    tensor: str
    layout: str
    shape: tuple[int, ...]
    image: tuple[int, int, int] | None = None


class _Attrs:
    """A node's attributes as Python values; the converter asks for each one it understands, and
    any it did not ask for is refused afterwards (never silently ignored)."""

    def __init__(self, node: Any) -> None:
        self.values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.asked: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.asked.add(name)
        value = self.values.get(name, default)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [v.decode() if isinstance(v, bytes) else v for v in value]
        return value

    def unasked(self) -> list[str]:
        return sorted(set(self.values) - self.asked)


def describe(node: Any) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _clean(name: str) -> str:
    """An ONNX name as one of ours: letters, digits and '_' ('/layer1/conv/Conv' -> 'layer1_conv_Conv')."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")


class _Importer:
    """The state of one import: constants, the ONNX tensors' values, and our nodes so far."""

    def __init__(self, model: Any, input_shape: Sequence[int] | None) -> None:
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        if self.opset < common.MIN_IMPORT_OPSET:
            raise OnnxError(f"the model uses opset {self.opset}; cnn_gpu imports opset {common.MIN_IMPORT_OPSET} "
                            "and later (onnx.version_converter can upgrade it)")
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.layers: dict[str, L.Layer] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # our tensors' per-sample shapes
        self.taken: set[str] = set()
        self.producer = {name: node for node in self.graph.node for name in node.output if name}
        self.readers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = [o.name for o in self.graph.output]
        self.batch: int | None = None  # the file's fixed batch size, if it has one
        self.input_names, self.dtype = self._inputs(input_shape)
        self._images: dict[str, Value] = {}  # POOLED tensor -> its IMAGE (N, 1, 1, C) form

    # ---- graph inputs -----------------------------------------------------------------------------

    def _inputs(self, input_shape: Sequence[int] | None) -> tuple[list[str], np.dtype]:
        """Our graph inputs (their names) for the file's, and the float dtype they have."""
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if not inputs:
            raise OnnxError("the model has no graph input that is not an initializer")
        if input_shape is not None and len(inputs) != 1:
            raise OnnxError(f"input_shape is for a model of one input; this one has {len(inputs)}")
        names, dtypes = [], set()
        for info in inputs:
            elem = info.type.tensor_type.elem_type
            if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE):
                raise OnnxError(f"graph input {info.name!r} is of type {TensorProto.DataType.Name(elem)}; cnn_gpu "
                                "imports float and double models")
            dtypes.add(np.dtype(np.float32 if elem == TensorProto.FLOAT else np.float64))
            dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
            # A 4-D input whose only readers transpose it to NCHW is channels-last (Keras' and ours).
            readers = self.readers.get(info.name, [])
            nhwc = len(dims) == 4 and bool(readers) and all(
                r.op_type == "Transpose" and list(_Attrs(r).get("perm", [])) == [0, 3, 1, 2] for r in readers)
            sample = self._input_sample(info.name, dims, input_shape, nhwc)
            if dims[0] is not None:
                self.batch = dims[0]
            name = self._unique(_clean(info.name) or "input")
            layout = {1: VECTOR, 3: NHWC if nhwc else IMAGE}[len(sample)]
            self.values[info.name] = Value(name, layout, sample)
            self.shapes[name] = self._stored(self.values[info.name])
            names.append(name)
        if len(dtypes) > 1:
            raise OnnxError(f"the graph inputs mix float types {sorted(d.name for d in dtypes)}")
        return names, dtypes.pop()

    def _input_sample(self, name: str, dims: list[int | None], input_shape: Sequence[int] | None,
                      nhwc: bool) -> tuple[int, ...]:
        """ONNX's per-sample shape of a graph input, from its type or from input_shape (ours, (H, W, C))."""
        if len(dims) not in (2, 4):
            raise OnnxError(f"graph input {name!r} has rank {len(dims)}; cnn_gpu imports images (N, C, H, W) or "
                            "(N, H, W, C) and vectors (N, D)")
        sample = dims[1:]
        if input_shape is not None:
            given = tuple(int(s) for s in input_shape)
            if len(given) != len(sample):
                raise OnnxError(f"input_shape {given} does not fit graph input {name!r} of rank {len(dims)}")
            want = given if nhwc or len(given) == 1 else (given[2], given[0], given[1])  # ours (H, W, C)
            for have, new in zip(sample, want):
                if have is not None and have != new:
                    raise OnnxError(f"input_shape {given} contradicts graph input {name!r}'s fixed shape {dims}")
            sample = list(want)
        if any(d is None or d < 1 for d in sample):
            raise OnnxError(f"graph input {name!r} has shape {dims} with sizes that are not fixed; give "
                            "load(path, input_shape=(H, W, C))")
        return tuple(sample)

    # ---- looking up and adding tensors ---------------------------------------------------------------

    def _unique(self, name: str) -> str:
        return unique_name(name, self.taken)

    @staticmethod
    def _stored(v: Value) -> tuple[int, ...]:
        """Our per-sample shape of a value."""
        if v.layout == IMAGE:
            c, h, w = v.shape
            return (h, w, c)
        if v.layout == POOLED:
            return (v.shape[0],)
        return v.shape

    def data(self, node: Any, k: int) -> Value:
        """Input k of `node`, a computed tensor."""
        name = node.input[k] if k < len(node.input) else ""
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            raise OnnxError(f"{describe(node)}: input {k} ({name!r}) is a constant; cnn_gpu imports {node.op_type} "
                            "of computed tensors only")
        if name in self.producer:
            raise OnnxError(f"{describe(node)} reads {name!r}, an output of {describe(self.producer[name])} that "
                            "cnn_gpu does not compute (an optional output, such as a pool's indices or batch "
                            "norm's training statistics)")
        raise OnnxError(f"{describe(node)}: input {k} ({name!r}) is missing or produced by no node")

    def const(self, node: Any, k: int, what: str, required: bool = True) -> np.ndarray | None:
        """Input k of `node`, a constant (None when optional and absent)."""
        name = node.input[k] if k < len(node.input) else ""
        if not name:
            if required:
                raise OnnxError(f"{describe(node)}: input {k} ({what}) is missing")
            return None
        if name not in self.consts:
            raise OnnxError(f"{describe(node)}: input {k} ({what}, {name!r}) must be a constant (an initializer or "
                            "computed from constants only); cnn_gpu cannot import it as a computed tensor")
        return self.consts[name]

    def add(self, node: Any, layer: L.Layer, inputs: Sequence[str], suffix: str = "") -> str:
        """Our node running `layer` on our tensors `inputs`, named after the ONNX node; returns its name."""
        name = self._unique((_clean(node.name or node.output[0]) or node.op_type.lower()) + suffix)
        given = [self.shapes[i] for i in inputs]
        try:
            self.shapes[name] = tuple(layer.output_shape(*given))
        except ValueError as exc:
            raise OnnxError(f"{describe(node)}: {exc}") from None
        self.nodes.append(Node(name, layer, tuple(inputs)))
        self.layers[name] = layer
        return name

    def set(self, node: Any, value: Value, k: int = 0) -> None:
        self.values[node.output[k]] = value

    def image(self, node: Any, v: Value) -> Value:
        """v as an IMAGE: a POOLED (N, C) becomes (N, 1, 1, C) (once)."""
        if v.layout == IMAGE:
            return v
        if v.layout == POOLED:
            if v.tensor not in self._images:
                tensor = self.add(node, OL.Reshape((1, 1, v.shape[0])), [v.tensor], "_image")
                self._images[v.tensor] = Value(tensor, IMAGE, v.shape)
            return self._images[v.tensor]
        raise OnnxError(f"{describe(node)} needs an NCHW image (N, C, H, W); its input has shape "
                        f"(N, {', '.join(map(str, v.shape))}) in layout {v.layout}")

    def onnx_reads(self, tensor: str) -> int:
        """How many times ONNX nodes (and the graph's output) read our tensor, through any ONNX name."""
        names = [name for name, v in self.values.items() if v.tensor == tensor]
        return sum(len(self.readers.get(name, [])) + self.outputs.count(name) for name in names)

    def dtype_array(self, a: Any) -> np.ndarray:
        """A parameter's array: a writable copy in the model's dtype (onnx gives read-only views)."""
        return np.array(a, dtype=self.dtype, order="C")

    # ---- the whole graph ----------------------------------------------------------------------------

    def run(self) -> Graph:
        for node in self.graph.node:
            self.convert(node)
        if len(self.outputs) != 1:
            raise OnnxError(f"the model has {len(self.outputs)} outputs {self.outputs}; a cnn_gpu Graph has one")
        name = self.outputs[0]
        if name not in self.values:
            what = "a constant" if name in self.consts else "not computed"
            raise OnnxError(f"the graph's output {name!r} is {what}")
        out = self.values[name]
        if out.layout == POOLED:
            out = self.image(self.producer[name], out)
        if out.layout == FLAT:
            raise OnnxError(f"the graph's output {name!r} is the flatten of an image in NCHW (c, h, w) order, "
                            "which cnn_gpu's channels-last layers do not compute without a transpose")
        tensor = out.tensor
        if tensor in self.input_names:  # the output is an input (through Identity nodes): a graph needs a layer
            identity = Node(self._unique("output"), L.Identity(), (tensor,))
            self.nodes.append(identity)
            tensor = identity.name
        return Graph.from_nodes(_reaching(self.nodes, tensor), self.input_names, tensor)

    def convert(self, node: Any) -> None:
        if node.domain not in ("", "ai.onnx"):
            raise OnnxError(f"{describe(node)}: operators of domain {node.domain!r} are not supported")
        attrs = _Attrs(node)
        op = node.op_type
        given = [name for name in node.input if name]
        if op in FOLDERS and (op == "Shape" or all(name in self.consts for name in given)):
            results = FOLDERS[op](self, node, attrs, [self.consts.get(name) for name in node.input])
            for name, value in zip(node.output, results):
                self.consts[name] = value
        elif op in CONVERTERS:
            CONVERTERS[op](self, node, attrs)
        else:
            folded = ", ".join(sorted(set(FOLDERS) - set(CONVERTERS)))
            raise OnnxError(f"{describe(node)}: operator {op} is not supported; cnn_gpu imports "
                            f"{', '.join(sorted(CONVERTERS))} (and folds {folded} of constants)")
        unasked = attrs.unasked()
        if unasked:
            raise OnnxError(f"{describe(node)}: attribute(s) {unasked} are not supported")


def _reaching(nodes: list[Node], output: str) -> list[Node]:
    """The nodes on the way to `output`, in order (ONNX nodes whose results nothing reads drop out)."""
    needed = {output}
    for node in reversed(nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return [node for node in nodes if node.name in needed]


# ---- geometry: pads, auto_pad -----------------------------------------------------------------------

def _pads(node: Any, attrs: _Attrs, hw: tuple[int, int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> OL.Pads:
    """(top, bottom, left, right) from pads or auto_pad."""
    auto = attrs.get("auto_pad", "NOTSET")
    pads = attrs.get("pads")
    if auto in ("NOTSET", ""):
        pads = [0, 0, 0, 0] if pads is None else list(pads)
        if len(pads) != 4 or min(pads) < 0:
            raise OnnxError(f"{describe(node)}: pads {pads} are not four sizes >= 0 (2-D only)")
        return OL.Pads(pads[0], pads[2], pads[1], pads[3])
    if auto == "VALID":
        return OL.Pads(0, 0, 0, 0)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise OnnxError(f"{describe(node)}: auto_pad {auto!r} is not supported")
    out = []
    for size, k, s, d in zip(hw, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))  # UPPER: the extra at the end
    (t, b), (left, r) = out
    return OL.Pads(t, b, left, r)


def _pair_attr(node: Any, attrs: _Attrs, name: str, default: Sequence[int]) -> tuple[int, int]:
    value = list(attrs.get(name, default))
    if len(value) != 2:
        raise OnnxError(f"{describe(node)}: {name} {value} is not 2-D; cnn_gpu imports 2-D convolutions and pools")
    return int(value[0]), int(value[1])


def _symmetric(p: OL.Pads) -> bool:
    return p.top == p.bottom and p.left == p.right


# ---- converters: layers with weights ------------------------------------------------------------------

def _conv(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.image(node, imp.data(node, 0))
    w = imp.const(node, 1, "weight")
    b = imp.const(node, 2, "bias", required=False)
    if w.ndim != 4:
        raise OnnxError(f"{describe(node)}: weight of shape {w.shape}; cnn_gpu imports 2-D convolutions only")
    c, h, wd = x.shape
    out, per_group, kh, kw = w.shape
    groups = int(attrs.get("group", 1))
    kernel = _pair_attr(node, attrs, "kernel_shape", (kh, kw))
    if kernel != (kh, kw):
        raise OnnxError(f"{describe(node)}: kernel_shape {kernel} does not match the weight {w.shape}")
    if per_group * groups != c:
        raise OnnxError(f"{describe(node)}: the input has {c} channels but the weight {w.shape} with group={groups} "
                        f"expects {per_group * groups}")
    strides = _pair_attr(node, attrs, "strides", (1, 1))
    dilations = _pair_attr(node, attrs, "dilations", (1, 1))
    pads = _pads(node, attrs, (h, wd), kernel, strides, dilations)
    tensor = x.tensor
    if not _symmetric(pads):  # our convolution pads symmetrically: the rest as a layer before it
        tensor = imp.add(node, OL.Pad2D(pads), [tensor], "_pad")
        padding = (0, 0)
    else:
        padding = (pads.top, pads.left)
    layer = L.Conv2D(c, out, kernel, strides, padding, dilations, groups, bias=b is not None,
                     rng=np.random.default_rng(0), dtype=imp.dtype.name)
    layer.params["weight"].data = imp.dtype_array(conv_weight_from_onnx(w))
    if b is not None:
        layer.params["bias"].data = imp.dtype_array(b.reshape(out))
    y = imp.add(node, layer, [tensor])
    oh, ow, _ = imp.shapes[y]
    imp.set(node, Value(y, IMAGE, (out, oh, ow)))


def _dense(imp: _Importer, node: Any, x: Value, w: np.ndarray, bias: np.ndarray | None) -> None:
    """Our Dense for x @ w (+ bias), w (K, M) rows in ONNX's order of x's features."""
    if x.layout not in (VECTOR, FLAT):
        raise OnnxError(f"{describe(node)}: input of shape (N, {', '.join(map(str, x.shape))}); cnn_gpu imports "
                        f"{node.op_type} of a 2-D (N, features) input with a 2-D constant weight")
    if w.ndim != 2 or w.shape[0] != x.shape[0]:
        raise OnnxError(f"{describe(node)}: weight of shape {w.shape} does not take {x.shape[0]} input features")
    if x.layout == FLAT:  # ONNX's rows are in (c, h, w) order; ours reads the (h, w, c) flatten
        w = chw_rows_to_hwc(w, x.image)
    layer = L.Dense(w.shape[0], w.shape[1], bias=bias is not None, rng=np.random.default_rng(0),
                    dtype=imp.dtype.name)
    layer.params["weight"].data = imp.dtype_array(w)
    if bias is not None:
        layer.params["bias"].data = imp.dtype_array(bias)
    imp.set(node, Value(imp.add(node, layer, [x.tensor]), VECTOR, (w.shape[1],)))


def _gemm(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    b = imp.const(node, 1, "B (the weight)")
    c = imp.const(node, 2, "C (the bias)", required=False)
    if attrs.get("transA", 0):
        raise OnnxError(f"{describe(node)}: transA=1 (a transposed input) is not supported")
    attrs.get("broadcast")  # opset < 7: how C broadcasts, which the shape check below covers
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if b.ndim != 2:
        raise OnnxError(f"{describe(node)}: B of shape {b.shape} is not a matrix")
    w = (b.T if attrs.get("transB", 0) else b).astype(np.float64) * alpha  # (K, M)
    bias = None
    if c is not None:
        m = w.shape[1]
        if c.size not in (1, m) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            raise OnnxError(f"{describe(node)}: C of shape {c.shape} is not a bias of {m} outputs")
        bias = np.broadcast_to(c.astype(np.float64).reshape(-1), (m,)) * beta
    _dense(imp, node, x, w, bias)


def _matmul(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    w = imp.const(node, 1, "the weight (B)")
    _dense(imp, node, x, w, None)


def _batch_norm(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    scale, shift, mean, var = (imp.const(node, k, what) for k, what in
                               ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
    eps, momentum = float(attrs.get("epsilon", 1e-5)), float(attrs.get("momentum", 0.9))
    attrs.get("is_test")  # opset < 7: inference is what an import computes
    attrs.get("consumed_inputs")  # opset < 6 bookkeeping
    if attrs.get("training_mode", 0):
        raise OnnxError(f"{describe(node)}: training_mode=1 (batch statistics in inference) is not supported")
    spatial = attrs.get("spatial", 1)
    if x.layout in (IMAGE, POOLED) and not spatial and x.shape[1] * x.shape[2] > 1:
        raise OnnxError(f"{describe(node)}: spatial=0 (statistics per position, not per channel) is not supported")
    if x.layout == NHWC:
        raise OnnxError(f"{describe(node)}: batch norm of an NHWC tensor (channels in axis 1 = height) "
                        "is not supported")
    vectors = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (scale, shift, mean, var)]
    channels = x.shape[0]
    if any(len(v) != channels for v in vectors):
        raise OnnxError(f"{describe(node)}: parameters of sizes {[len(v) for v in vectors]} for {channels} channels")
    if x.layout == FLAT:  # per feature of a (c, h, w) flatten: to our (h, w, c) order
        vectors = [chw_rows_to_hwc(v, x.image) for v in vectors]
    cls = L.BatchNorm2D if x.layout == IMAGE else L.BatchNorm1D
    layer = cls(channels, momentum=round(1.0 - momentum, 12), eps=eps, dtype=imp.dtype.name)
    for (kind, key), v in zip((("p", "gamma"), ("p", "beta"), ("b", "running_mean"), ("b", "running_var")), vectors):
        if kind == "p":
            layer.params[key].data = imp.dtype_array(v)
        else:
            layer.buffers[key] = imp.dtype_array(v)
    imp.set(node, x._replace(tensor=imp.add(node, layer, [x.tensor])))


# ---- converters: pooling ----------------------------------------------------------------------------

def _pool(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    is_max = node.op_type == "MaxPool"
    x = imp.image(node, imp.data(node, 0))
    c, h, w = x.shape
    kernel = _pair_attr(node, attrs, "kernel_shape", ())
    strides = _pair_attr(node, attrs, "strides", (1, 1))
    dilations = _pair_attr(node, attrs, "dilations", (1, 1))
    ceil = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0)) if not is_max else True
    if is_max and attrs.get("storage_order", 0):
        raise OnnxError(f"{describe(node)}: storage_order=1 (column-major indices) is not supported")
    if not is_max and dilations != (1, 1):
        raise OnnxError(f"{describe(node)}: dilations {dilations} of an average pool are not supported")
    pads = _pads(node, attrs, (h, w), kernel, strides, dilations)
    tensor, padding = x.tensor, (pads.top, pads.left)
    fits = pads.top <= kernel[0] // 2 and pads.left <= kernel[1] // 2  # our pools pad at most half a window
    axes = ((h, kernel[0], strides[0], dilations[0], pads.top, pads.bottom, "height"),
            (w, kernel[1], strides[1], dilations[1], pads.left, pads.right, "width"))
    if not (_symmetric(pads) and fits):
        onnx_hw = [_onnx_pool_size(size, k, s, d, begin, end, ceil) for size, k, s, d, begin, end, _ in axes]
        # Extra padding at the end that positions do not count in (-inf of a max pool, left out of an
        # average without count_include_pad) is what ceil mode does: PyTorch writes its ceil-mode
        # pools that way. The windows are the same when there are as many.
        as_ceil = fits and (is_max or not include_pad) and pads.bottom >= pads.top and pads.right >= pads.left and \
            [output_size(size, k, s, begin, d, True, describe(node), axis)
             for size, k, s, d, begin, _, axis in axes] == onnx_hw
        if as_ceil:
            ceil = True
        elif is_max or include_pad:
            # Else the padding becomes a layer: -inf before a max pool, zeros before an average that
            # counts them; in ceil mode that is the same when ONNX's rule (drop a last window that
            # starts in the end padding) drops nothing.
            ours_hw = [output_size(size + begin + end, k, s, 0, d, ceil, describe(node), axis)
                       for size, k, s, d, begin, end, axis in axes]
            if ours_hw != onnx_hw:
                raise OnnxError(f"{describe(node)}: ceil_mode with pads {list(pads)} (top, bottom, left, right) is "
                                "not supported (our pools pad symmetrically)")
            tensor = imp.add(node, OL.Pad2D(pads, -np.inf if is_max else 0.0), [tensor], "_pad")
            padding = (0, 0)
        else:
            raise OnnxError(f"{describe(node)}: pads {list(pads)} (top, bottom, left, right) of an average pool "
                            "with count_include_pad=0 are not supported (only symmetric pads of at most half the "
                            "window, or extra end pads that ceil mode gives)")
    if is_max:
        layer: L.Layer = L.MaxPool2D(kernel, strides, padding, dilations, ceil_mode=ceil)
    else:
        layer = L.AvgPool2D(kernel, strides, padding, ceil_mode=ceil, count_include_pad=include_pad)
    y = imp.add(node, layer, [tensor])
    oh, ow, _ = imp.shapes[y]
    imp.set(node, Value(y, IMAGE, (c, oh, ow)))


def _onnx_pool_size(size: int, k: int, s: int, d: int, begin: int, end: int, ceil: bool) -> int:
    """ONNX's (and onnxruntime's) output size of a pool along one axis."""
    room = size + begin + end - (d * (k - 1) + 1)
    out = (-(-room // s) if ceil else room // s) + 1
    if ceil and (out - 1) * s >= size + begin:
        out -= 1
    return out


def _global_avg_pool(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.image(node, imp.data(node, 0))
    imp.set(node, Value(imp.add(node, L.GlobalAvgPool2D(), [x.tensor]), POOLED, (x.shape[0], 1, 1)))


# ---- converters: elementwise -------------------------------------------------------------------------

def _elementwise(make: Callable[[_Importer, Any, _Attrs], L.Layer | None]) -> Callable:
    """An op applied to each element: any layout passes through (make -> None: the identity)."""
    def convert(imp: _Importer, node: Any, attrs: _Attrs) -> None:
        x = imp.data(node, 0)
        layer = make(imp, node, attrs)
        imp.set(node, x if layer is None else x._replace(tensor=imp.add(node, layer, [x.tensor])))
    return convert


def _clip_layer(imp: _Importer, node: Any, attrs: _Attrs) -> L.Layer | None:
    if imp.opset < 11:
        low, high = attrs.get("min", -np.inf), attrs.get("max", np.inf)
    else:
        given = [imp.const(node, k, what, required=False) for k, what in ((1, "min"), (2, "max"))]
        low, high = (-np.inf if given[0] is None else given[0].item(), np.inf if given[1] is None else given[1].item())
    low, high = float(low), float(high)
    if (low, high) == (0.0, 6.0):
        return L.ReLU6()
    if low == 0.0 and high == np.inf:
        return L.ReLU()
    if (low, high) == (-np.inf, np.inf):
        return None
    return L.Clip(low, high)


def _dropout_layer(imp: _Importer, node: Any, attrs: _Attrs) -> L.Layer:
    attrs.get("is_test")  # opset < 7
    attrs.get("seed")
    if imp.opset < 12:
        p = float(attrs.get("ratio", 0.5))
    else:
        ratio = imp.const(node, 1, "ratio", required=False)
        training = imp.const(node, 2, "training_mode", required=False)
        if training is not None and bool(training):
            raise OnnxError(f"{describe(node)}: training_mode=True (dropout at inference) is not supported")
        p = 0.5 if ratio is None else float(ratio)
    return L.Dropout(p)


def _softmax(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    logical = (None, *x.shape)
    rank = len(logical)
    axis = int(attrs.get("axis", 1 if imp.opset < 13 else -1)) % rank
    # Before opset 13 a softmax runs over all the axes from `axis` on, flattened together: the same
    # as ours over the channels when the other axes it covers have size 1.
    covered = range(axis, rank) if imp.opset < 13 else [axis]
    channel = 3 if x.layout == NHWC else 1
    if axis == 0 or channel not in covered or any(logical[k] != 1 for k in covered if k != channel):
        raise OnnxError(f"{describe(node)}: a softmax over axis {axis}{' and after' if imp.opset < 13 else ''} of "
                        f"(N, {', '.join(map(str, x.shape))}) (layout {x.layout}) is not supported; only over the "
                        "channels")
    imp.set(node, x._replace(tensor=imp.add(node, L.Softmax(), [x.tensor])))


def _identity(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    imp.set(node, imp.data(node, 0))


def _cast(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    to = helper.tensor_dtype_to_np_dtype(attrs.get("to"))
    attrs.get("saturate")
    if np.dtype(to) != imp.dtype:
        raise OnnxError(f"{describe(node)}: a cast of a computed tensor to {np.dtype(to)} is not supported "
                        f"(the model computes in {imp.dtype})")
    imp.set(node, x)


# ---- converters: arithmetic --------------------------------------------------------------------------

def _per_channel(imp: _Importer, node: Any, attrs: _Attrs, x: Value, c: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against x as a per-channel (or, for vectors, per-feature) vector,
    in our order of x's last axis; OnnxError when it varies along anything else."""
    rank = 1 + len(x.shape)
    c = np.asarray(c, dtype=np.float64)
    if imp.opset < 7 and attrs.get("broadcast", 0):
        axis = attrs.get("axis")
        if axis is not None:  # legacy broadcast: c's axes line up from `axis`
            c = c.reshape(c.shape + (1,) * (rank - int(axis) - c.ndim))
    if c.ndim > rank:
        raise OnnxError(f"{describe(node)}: a constant of shape {c.shape} for a {rank}-D input")
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    logical = (1, *x.shape)
    axis = {IMAGE: 1, POOLED: 1, NHWC: 3, VECTOR: 1, FLAT: 1}[x.layout]
    others = [k for k in range(rank) if k != axis and c.shape[k] != 1]
    if others or c.shape[axis] not in (1, logical[axis]):
        raise OnnxError(f"{describe(node)}: the constant of shape {c.shape} varies along more than the channel "
                        f"axis of its (N, {', '.join(map(str, x.shape))}) input; cnn_gpu imports per-channel "
                        "constants only")
    vector = np.broadcast_to(c.reshape(-1), (logical[axis],)).copy()
    return chw_rows_to_hwc(vector, x.image) if x.layout == FLAT else vector


def _arithmetic(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    op = node.op_type
    a_const, b_const = (len(node.input) > k and node.input[k] in imp.consts for k in (0, 1))
    if not (a_const or b_const):
        _two_tensors(imp, node, attrs)
        return
    k_data = 1 if a_const else 0
    x = imp.data(node, k_data)
    vector = _per_channel(imp, node, attrs, x, imp.consts[node.input[1 - k_data]])
    scale = shift = None
    if op == "Add":
        shift = vector
    elif op == "Mul":
        scale = vector
    elif op == "Sub":
        scale, shift = (None, -vector) if k_data == 0 else (-np.ones_like(vector), vector)
    elif k_data == 0:  # Div
        scale = 1.0 / vector
    else:
        raise OnnxError(f"{describe(node)}: a constant divided by a computed tensor is not supported")
    if scale is None and _absorb_shift(imp, x, shift):
        imp.set(node, x)
        return
    layer = OL.ChannelAffine(len(vector), scale=scale is not None, shift=shift is not None, dtype=imp.dtype.name)
    if scale is not None:
        layer.params["scale"].data = imp.dtype_array(scale)
    if shift is not None:
        layer.params["shift"].data = imp.dtype_array(shift)
    imp.set(node, x._replace(tensor=imp.add(node, layer, [x.tensor])))


def _absorb_shift(imp: _Importer, x: Value, shift: np.ndarray) -> bool:
    """Add `shift` to the layer that computes x when that layer has no bias yet (a Conv or Gemm/MatMul
    without one, a Mul by a constant) and nothing else reads x: MatMul + Add becomes one Dense."""
    layer = imp.layers.get(x.tensor)
    if layer is None or imp.onnx_reads(x.tensor) != 1:
        return False
    if isinstance(layer, L.Conv2D):
        key, channels = "bias", layer.out_channels
    elif isinstance(layer, L.Dense):
        key, channels = "bias", layer.out_features
    elif isinstance(layer, OL.ChannelAffine):
        key, channels = "shift", layer.num_features
    else:
        return False
    if key in layer.params or len(shift) != channels:
        return False
    layer.params[key] = Parameter(imp.dtype_array(shift))
    return True


def _two_tensors(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    """Add of two computed tensors (a residual sum); Mul of x and sigmoid(x) (SiLU) or of x and
    hard_sigmoid(x) with PyTorch's constants (HardSwish, as opsets before 14 write it)."""
    a, b = imp.data(node, 0), imp.data(node, 1)
    if node.op_type == "Add":
        _sum(imp, node, [a, b])
        return
    if node.op_type == "Mul":
        for x_name, gate_name, x in ((node.input[0], node.input[1], a), (node.input[1], node.input[0], b)):
            gate = imp.producer.get(gate_name)
            if gate is None or list(gate.input[:1]) != [x_name]:
                continue
            layer: L.Layer | None = None
            if gate.op_type == "Sigmoid":
                layer = L.SiLU()
            elif gate.op_type == "HardSigmoid":
                g = _Attrs(gate)
                if np.isclose(g.get("alpha", 0.2), 1 / 6) and np.isclose(g.get("beta", 0.5), 0.5):
                    layer = L.HardSwish()
            if layer is not None:
                imp.set(node, x._replace(tensor=imp.add(node, layer, [x.tensor])))
                return
    raise OnnxError(f"{describe(node)}: {node.op_type} of two computed tensors is not supported (only x * sigmoid(x), "
                    "x * hard_sigmoid(x), and sums)")


def _sum(imp: _Importer, node: Any, xs: list[Value]) -> None:
    first = xs[0]
    for i, x in enumerate(xs[1:], start=1):
        if (x.layout, x.shape, x.image) != (first.layout, first.shape, first.image):
            raise OnnxError(f"{describe(node)}: input {i} of shape (N, {', '.join(map(str, x.shape))}) and input 0 "
                            f"of shape (N, {', '.join(map(str, first.shape))}) differ (in layout or with "
                            "broadcasting); cnn_gpu sums tensors of one shape")
    if len(xs) == 1:
        imp.set(node, first)
        return
    imp.set(node, first._replace(tensor=imp.add(node, L.Add(), [x.tensor for x in xs])))


def _sum_op(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    _sum(imp, node, [imp.data(node, k) for k in range(len(node.input))])


def _concat(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    xs = [imp.data(node, k) for k in range(len(node.input))]
    if len(xs) == 1:
        imp.set(node, xs[0])
        return
    if any(x.layout == IMAGE for x in xs):
        xs = [imp.image(node, x) for x in xs]
    layouts = {x.layout for x in xs}
    layout = layouts.pop() if len(layouts) == 1 else None
    rank = 1 + len(xs[0].shape)
    axis = int(attrs.get("axis", 1)) % rank
    channel = {IMAGE: 1, POOLED: 1, NHWC: 3, VECTOR: 1}.get(layout)
    if layout is None or channel is None or axis != channel:
        raise OnnxError(f"{describe(node)}: a concat along axis {axis} of inputs in layouts "
                        f"{sorted({x.layout for x in xs})} is not supported; only along the channels")
    y = imp.add(node, L.Concat(), [x.tensor for x in xs])
    stored = imp.shapes[y]
    shape = list(xs[0].shape)
    shape[axis - 1] = int(stored[-1])
    imp.set(node, Value(y, layout, tuple(shape)))


# ---- converters: shapes --------------------------------------------------------------------------------

def _flatten_value(imp: _Importer, node: Any, x: Value) -> Value:
    """x flattened to (N, features), in ONNX's order of them."""
    if x.layout in (VECTOR, FLAT):
        return x
    if x.layout == POOLED:
        return Value(x.tensor, VECTOR, (x.shape[0],))
    y = imp.add(node, L.Flatten(), [x.tensor])
    size = int(np.prod(x.shape))
    if x.layout == NHWC:  # ours flattens in (h, w, c) order, as ONNX does an NHWC tensor
        return Value(y, VECTOR, (size,))
    c, h, w = x.shape
    return Value(y, VECTOR, (size,)) if h * w == 1 or c == 1 else Value(y, FLAT, (size,), image=(c, h, w))


def _flatten(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    rank = 1 + len(x.shape)
    axis = int(attrs.get("axis", 1))
    if axis % rank != 1:
        raise OnnxError(f"{describe(node)}: a flatten from axis {axis} is not supported; only axis 1 (keep the batch)")
    imp.set(node, _flatten_value(imp, node, x))


def _reshape(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    if len(node.input) > 1:
        target = [int(v) for v in imp.const(node, 1, "shape").reshape(-1)]
    else:  # opset < 5
        target = [int(v) for v in attrs.get("shape", [])]
    allow_zero = attrs.get("allowzero", 0)
    logical = (None, *x.shape)
    if allow_zero and 0 in target:
        raise OnnxError(f"{describe(node)}: allowzero=1 with a 0 in the shape {target} is not supported")
    sample = [logical[k] if v == 0 and k < len(logical) else v for k, v in enumerate(target)][1:]
    first = target[0] if target else None
    keeps_batch = first in (BATCH, 0) or (first == -1 and -1 not in sample) or \
        (imp.batch is not None and first == imp.batch)  # a file exported at a fixed batch size
    size = int(np.prod(x.shape))
    if keeps_batch and -1 in sample:
        known = int(np.prod([v for v in sample if v != -1]))
        if known <= 0 or size % known:
            keeps_batch = False
        else:
            sample = [size // known if v == -1 else v for v in sample]
    if not keeps_batch or any(v < 1 for v in sample) or int(np.prod(sample)) != size:
        shown = ["N" if v == BATCH else v for v in target]
        raise OnnxError(f"{describe(node)}: a reshape of (N, {', '.join(map(str, x.shape))}) to {shown} is not "
                        "supported; cnn_gpu imports reshapes that keep the batch axis")
    sample = tuple(sample)
    if len(sample) == 1:
        imp.set(node, _flatten_value(imp, node, x))
    elif sample == x.shape:
        imp.set(node, x)
    elif len(sample) == 3 and x.layout in (VECTOR, POOLED) and sample[1:] == (1, 1):
        imp.set(node, Value(x.tensor, POOLED, sample))  # (N, C) is (N, C, 1, 1) in either order
    elif len(sample) == 3 and x.layout == FLAT and sample == x.image:
        c, h, w = sample
        imp.set(node, Value(imp.add(node, OL.Reshape((h, w, c)), [x.tensor]), IMAGE, sample))
    else:
        raise OnnxError(f"{describe(node)}: a reshape of (N, {', '.join(map(str, x.shape))}) (layout {x.layout}) "
                        f"to (N, {', '.join(map(str, sample))}) mixes channels with positions, which cnn_gpu's "
                        "(N, H, W, C) layout does not compute without a transpose")


def _axes(imp: _Importer, node: Any, attrs: _Attrs) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, the optional input 1 from then on."""
    if imp.opset < 13:
        axes = attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]
    axes = imp.const(node, 1, "axes", required=False)
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


def _squeeze(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    rank = 1 + len(x.shape)
    axes = _axes(imp, node, attrs)
    axes = sorted(a % rank for a in axes) if axes is not None else [k for k, s in enumerate((2, *x.shape)) if s == 1]
    if x.layout in (IMAGE, POOLED) and axes == [2, 3] and x.shape[1:] == (1, 1):
        imp.set(node, _flatten_value(imp, node, x))
        return
    raise OnnxError(f"{describe(node)}: squeezing axes {axes} of (N, {', '.join(map(str, x.shape))}) is not "
                    "supported (only the 1 x 1 spatial axes of a pooled image)")


def _unsqueeze(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    axes = _axes(imp, node, attrs)
    if x.layout == VECTOR and axes is not None and sorted(a % 4 for a in axes) == [2, 3]:
        imp.set(node, Value(x.tensor, POOLED, (x.shape[0], 1, 1)))
        return
    raise OnnxError(f"{describe(node)}: unsqueezing axes {axes} of (N, {', '.join(map(str, x.shape))}) is not "
                    "supported (only a vector to (N, C, 1, 1))")


def _transpose(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    perm = [int(p) for p in attrs.get("perm", list(range(len(x.shape), -1, -1)))]
    if perm == list(range(len(perm))):
        imp.set(node, x)
        return
    if x.layout == POOLED and perm == [0, 2, 3, 1]:
        x = imp.image(node, x)
    if x.layout == IMAGE and perm == [0, 2, 3, 1]:  # to NHWC: our array already is
        c, h, w = x.shape
        imp.set(node, Value(x.tensor, NHWC, (h, w, c)))
    elif x.layout == NHWC and perm == [0, 3, 1, 2]:  # to NCHW: the layout we hold images in
        h, w, c = x.shape
        imp.set(node, Value(x.tensor, IMAGE, (c, h, w)))
    else:
        raise OnnxError(f"{describe(node)}: a transpose {perm} of (N, {', '.join(map(str, x.shape))}) (layout "
                        f"{x.layout}) is not supported; only NHWC <-> NCHW")


def _pad(imp: _Importer, node: Any, attrs: _Attrs) -> None:
    x = imp.data(node, 0)
    mode = attrs.get("mode", "constant")
    if mode != "constant":
        raise OnnxError(f"{describe(node)}: Pad mode {mode!r} is not supported (only 'constant')")
    rank = 1 + len(x.shape)
    if imp.opset < 11:
        pads, value = list(attrs.get("pads", [])), float(attrs.get("value", 0.0))
    else:
        pads = [int(p) for p in imp.const(node, 1, "pads").reshape(-1)]
        v = imp.const(node, 2, "constant_value", required=False)
        value = 0.0 if v is None or v.size == 0 else float(v.reshape(-1)[0])
        axes = imp.const(node, 3, "axes", required=False)
        if axes is not None:  # opset 18: pads for these axes only
            full = [0] * (2 * rank)
            for k, a in enumerate(int(a) % rank for a in axes.reshape(-1)):
                full[a], full[a + rank] = pads[k], pads[k + len(axes)]
            pads = full
    if len(pads) != 2 * rank or min(pads) < 0:
        raise OnnxError(f"{describe(node)}: pads {pads} are not {2 * rank} sizes >= 0")
    spatial = {IMAGE: (2, 3), NHWC: (1, 2)}.get(x.layout)
    if spatial is None or any(pads[k] or pads[k + rank] for k in range(rank) if k not in spatial):
        raise OnnxError(f"{describe(node)}: pads {pads} of a (N, {', '.join(map(str, x.shape))}) tensor; cnn_gpu "
                        "pads images along their height and width only")
    (hk, wk) = spatial
    layer = OL.Pad2D((pads[hk], pads[hk + rank], pads[wk], pads[wk + rank]), value)
    y = imp.add(node, layer, [x.tensor])
    oh, ow, c = imp.shapes[y]
    imp.set(node, Value(y, x.layout, (c, oh, ow) if x.layout == IMAGE else (oh, ow, c)))


CONVERTERS: dict[str, Callable[[_Importer, Any, _Attrs], None]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_avg_pool,
    "Relu": _elementwise(lambda imp, node, attrs: L.ReLU()),
    "LeakyRelu": _elementwise(lambda imp, node, attrs: L.LeakyReLU(float(attrs.get("alpha", 0.01)))),
    "Sigmoid": _elementwise(lambda imp, node, attrs: L.Sigmoid()),
    "Tanh": _elementwise(lambda imp, node, attrs: L.Tanh()),
    "HardSigmoid": _elementwise(lambda imp, node, attrs: L.HardSigmoid(float(attrs.get("alpha", 0.2)),
                                                                       float(attrs.get("beta", 0.5)))),
    "HardSwish": _elementwise(lambda imp, node, attrs: L.HardSwish()),
    "Clip": _elementwise(_clip_layer),
    "Dropout": _elementwise(_dropout_layer),
    "Softmax": _softmax,
    "Identity": _identity,
    "Cast": _cast,
    "Add": _arithmetic,
    "Sub": _arithmetic,
    "Mul": _arithmetic,
    "Div": _arithmetic,
    "Sum": _sum_op,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Pad": _pad,
}


# ---- folding constants ------------------------------------------------------------------------------

Folder = Callable[[_Importer, Any, _Attrs, list], list]


def _no_batch(node: Any, *arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None and a.dtype == np.int64 and (a == BATCH).any():
            raise OnnxError(f"{describe(node)} computes with the batch size, which cnn_gpu does not know when it "
                            "loads a model (only a Reshape's target may hold it)")


def _fold_constant(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs.values:
            value = attrs.get(key)
            if key == "value":
                return [numpy_helper.to_array(value)]
            return [np.array(value, dtype=np.float32 if "float" in key else np.int64)]
    raise OnnxError(f"{describe(node)}: a Constant with {attrs.unasked() or 'no value'} is not supported")


def _fold_constant_of_shape(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    _no_batch(node, xs[0])
    value = attrs.get("value")
    fill = np.zeros(1, np.float32) if value is None else numpy_helper.to_array(value).reshape(-1)
    return [np.full([int(s) for s in xs[0].reshape(-1)], fill[0], dtype=fill.dtype)]


def _fold_shape(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    name = node.input[0]
    if name in imp.consts:
        shape = np.array(imp.consts[name].shape, dtype=np.int64)
    else:
        shape = np.array([BATCH, *imp.data(node, 0).shape], dtype=np.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return [shape[start:end]]


def _fold_gather(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    return [np.take(xs[0], xs[1].astype(np.int64), axis=int(attrs.get("axis", 0)))]


def _fold_unsqueeze(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    axes = _axes(imp, node, attrs)
    out = xs[0]
    rank = out.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        out = np.expand_dims(out, a)
    return [out]


def _fold_squeeze(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    axes = _axes(imp, node, attrs)
    return [np.squeeze(xs[0], axis=None if axes is None else tuple(a % xs[0].ndim for a in axes))]


def _fold_concat(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    return [np.concatenate([x for x in xs if x is not None], axis=int(attrs.get("axis", 0)))]


def _fold_cast(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    attrs.get("saturate")
    to = np.dtype(helper.tensor_dtype_to_np_dtype(attrs.get("to")))
    if to != np.int64:
        _no_batch(node, xs[0])
    return [xs[0].astype(to)]


def _fold_reshape(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    _no_batch(node, xs[1])
    attrs.get("allowzero")
    shape = [int(s) for s in xs[1].reshape(-1)]
    shape = [xs[0].shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return [xs[0].reshape(shape)]


def _fold_transpose(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    return [np.transpose(xs[0], attrs.get("perm"))]


def _fold_arithmetic(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    _no_batch(node, *xs)
    a, b = xs[0], xs[1]
    if imp.opset < 7 and attrs.get("broadcast", 0) and attrs.get("axis") is not None:
        b = b.reshape(b.shape + (1,) * (a.ndim - int(attrs.get("axis")) - b.ndim))
    if node.op_type == "Div" and np.issubdtype(a.dtype, np.integer):
        return [np.trunc(a / b).astype(a.dtype)]
    result = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[node.op_type](a, b)
    return [result.astype(np.result_type(a.dtype, b.dtype))]


def _fold_slice(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    data = xs[0]
    if imp.opset < 10:
        starts, ends = attrs.get("starts"), attrs.get("ends")
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = xs[1].reshape(-1).tolist(), xs[2].reshape(-1).tolist()
        axes = None if len(xs) < 4 or xs[3] is None else xs[3].reshape(-1).tolist()
        steps = None if len(xs) < 5 or xs[4] is None else xs[4].reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis) % data.ndim] = slice(int(start), int(end), int(step))
    return [data[tuple(index)]]


def _fold_identity(imp: _Importer, node: Any, attrs: _Attrs, xs: list) -> list:
    return [xs[0]]


FOLDERS: dict[str, Folder] = {
    "Constant": _fold_constant,
    "ConstantOfShape": _fold_constant_of_shape,
    "Shape": _fold_shape,
    "Gather": _fold_gather,
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Concat": _fold_concat,
    "Cast": _fold_cast,
    "Reshape": _fold_reshape,
    "Transpose": _fold_transpose,
    "Add": _fold_arithmetic,
    "Sub": _fold_arithmetic,
    "Mul": _fold_arithmetic,
    "Div": _fold_arithmetic,
    "Slice": _fold_slice,
    "Identity": _fold_identity,
}


# ---- reading files -------------------------------------------------------------------------------------

def read_model(source: str | os.PathLike | Any) -> Any:
    """An onnx.ModelProto from a path (or the proto itself), checked by onnx.checker; OnnxError for a
    file that is not readable ONNX (truncated, corrupted, another format)."""
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        try:
            model = onnx.load(path)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors, ... named below
            raise OnnxError(f"{path} is not a readable ONNX model (truncated, corrupted, or another format): "
                            f"{type(exc).__name__}: {exc}") from None
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        where = "the model" if isinstance(source, onnx.ModelProto) else str(source)
        raise OnnxError(f"{where} is not a valid ONNX model (truncated or corrupted?): {exc}") from None
    return model


def load_model(source: str | os.PathLike | Any, input_shape: Sequence[int] | None = None) -> Graph:
    return _Importer(read_model(source), input_shape).run()


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    model = read_model(path)
    return {p.key: p.value for p in model.metadata_props}
