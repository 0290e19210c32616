"""cnn_gpu.onnx.load: ONNX files become Graphs that take (N, H, W, C) and compute what onnxruntime
computes from the file; our own exports come back as the models they were; imports train, move to
the GPU and write configs; old opsets read their attributes; what cannot be imported is refused by
name."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

import cnn_gpu.onnx as cnn_onnx
from cnn_gpu import SGD
from cnn_gpu import layers as L
from cnn_gpu.backend import to_numpy
from cnn_gpu.config import from_json, to_json
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.model import Graph
from cnn_gpu.onnx import ChannelAffine, OnnxError, Pad2D

from .onnx_fixtures import ATOL, RTOL, ZOO, ours, run_ort, zoo_model

F32 = TensorProto.FLOAT


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_nhwc(y: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1)) if y.ndim == 4 else y


def make(nodes, input_shape, initializers=None, opset=17, output="y", input_name="x", ir_version=None,
         batch="N"):
    """A model of `nodes` reading input x (N, *input_shape) and writing `output`; initializers name -> array."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    inputs = [helper.make_tensor_value_info(input_name, F32, [batch, *input_shape])]
    if ir_version is not None and ir_version < 4:  # IR 3: initializers are graph inputs too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info(output)], inits)
    ir = ir_version or {6: 3, 7: 3, 8: 3, 9: 4, 11: 6, 13: 7}.get(opset, 8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    model = onnx.shape_inference.infer_shapes(model)  # the output's type, which the checker wants
    onnx.checker.check_model(model)
    return model


def assert_imports_as_onnxruntime_computes(model_proto, x_nchw, expected=None):
    """load() of the file, in eval mode, on (N, H, W, C), equals onnxruntime's output (made NHWC)."""
    graph = cnn_onnx.load(model_proto)
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)) if x_nchw.ndim == 4 else x_nchw
    y = ours(graph, x)
    reference = run_ort(model_proto, x_nchw) if expected is None else expected
    np.testing.assert_allclose(y, to_nhwc(reference), rtol=RTOL, atol=ATOL)
    return graph


def conv_weights(rng, out, cin, k=3):
    return rng.standard_normal((out, cin, k, k)).astype(np.float32) * 0.5


# ---- our own exports come back -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("name,shape,extra", ZOO, ids=[z[0] for z in ZOO])
def test_export_then_import_gives_back_the_model(name, shape, extra, batch_norm, tmp_path, rng):
    model = zoo_model(name, shape, extra, batch_norm)
    path = cnn_onnx.export(model, tmp_path / "m.onnx", shape)
    again = cnn_onnx.load(path)
    assert again.num_parameters() == model.num_parameters()
    kinds = [type(layer).__name__ for _, layer in model.named_layers() if not isinstance(layer, Graph)]
    assert [type(node.layer).__name__ for node in again.nodes] == kinds  # layer for layer, flattened
    assert all("." not in node.name for node in again.nodes)
    x = rng.standard_normal((5, *shape)).astype(np.float32)
    # The same layers with the same weights in the same order: equal but for how the plans slice
    # the batch, which may round differently.
    np.testing.assert_allclose(ours(again, x), ours(model, x), rtol=1e-5, atol=1e-6)


def test_an_imported_model_fine_tunes_and_writes_its_config(tmp_path, rng):
    model = zoo_model("resnet20", (8, 8, 3), {"width": 4}, batch_norm=True)
    imported = cnn_onnx.load(cnn_onnx.export(model, tmp_path / "m.onnx", (8, 8, 3)))
    x, labels = rng.standard_normal((16, 8, 8, 3)).astype(np.float32), rng.integers(0, 5, 16)
    imported.train()
    opt = SGD(imported.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss, d = softmax_cross_entropy(imported.forward(x), labels)
        imported.backward(d)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    again = from_json(to_json(imported))
    again.load_state_dict(imported.state_dict())
    np.testing.assert_array_equal(ours(again, x), ours(imported, x))  # the same layers and weights


def test_an_import_with_our_onnx_layers_writes_its_config(rng):
    # SAME_UPPER padding of a stride-2 convolution (a Pad2D) and a per-channel Mul/Add (a ChannelAffine)
    w = conv_weights(rng, 4, 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    proto = make(nodes, (3, 6, 6), {"w": w, "s": rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
                                   "t": rng.standard_normal((4, 1, 1)).astype(np.float32)})
    graph = cnn_onnx.load(proto)
    assert [type(n.layer) for n in graph.nodes] == [Pad2D, L.Conv2D, ChannelAffine]  # Mul and Add: one layer
    again = from_json(to_json(graph))
    again.load_state_dict(graph.state_dict())
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(ours(again, x), ours(graph, x))
    np.testing.assert_allclose(ours(graph, x), to_nhwc(run_ort(proto, nchw(x))), rtol=RTOL, atol=ATOL)


def test_an_imported_model_runs_on_either_backend(xp, tmp_path, rng):
    model = zoo_model("seed_cnn", (12, 12, 1), {}, batch_norm=True)
    imported = cnn_onnx.load(cnn_onnx.export(model, tmp_path / "m.onnx", (12, 12, 1))).eval()
    x = rng.standard_normal((3, 12, 12, 1)).astype(np.float32)
    expected = imported.forward(x)
    imported.to("gpu" if xp.__name__ == "cupy" else "cpu")
    y = to_numpy(imported.forward(xp.asarray(x)))
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)  # the GPU sums in another order


# ---- operators and their attributes against onnxruntime ---------------------------------------------------

@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID", "pads"])
@pytest.mark.parametrize("size", [7, 8])
def test_conv_padding_modes(auto_pad, size, rng):
    attrs = {"pads": [0, 1, 2, 1]} if auto_pad == "pads" else {"auto_pad": auto_pad}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], **attrs)]
    proto = make(nodes, (3, size, size), {"w": conv_weights(rng, 4, 3), "b": rng.standard_normal(4).astype(np.float32)})
    assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((2, 3, size, size)).astype(np.float32))


@pytest.mark.parametrize("op,extra", [("MaxPool", {}), ("AveragePool", {"count_include_pad": 1}),
                                      ("AveragePool", {"count_include_pad": 0})])
@pytest.mark.parametrize("pads", [{"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}, {"pads": [1, 1, 1, 1]},
                                  {"pads": [0, 1, 1, 0]}, {"pads": [1, 1, 1, 1], "ceil_mode": 1}],
                         ids=["same-upper", "same-lower", "symmetric", "asymmetric", "ceil"])
def test_pool_padding_modes(op, extra, pads, rng):
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], **pads, **extra)
    proto = make([node], (2, 8, 8))
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    # More padding at the start than at the end, left out of the averages: neither our padding nor
    # ceil mode (extra padding at the end) computes that.
    more_at_start = pads.get("auto_pad") == "SAME_LOWER" or pads.get("pads") == [0, 1, 1, 0]
    if op == "AveragePool" and not extra["count_include_pad"] and more_at_start:
        with pytest.raises(OnnxError, match="count_include_pad=0"):
            cnn_onnx.load(proto)
        return
    assert_imports_as_onnxruntime_computes(proto, x)


def test_per_channel_constants(rng):
    c = 3
    col = rng.uniform(0.5, 2.0, c).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["v", "axes"], ["v3"]),  # (C,) -> (C, 1, 1), as exporters shape them
        helper.make_node("Sub", ["x", "v3"], ["a"]),  # x - mean
        helper.make_node("Div", ["a", "std"], ["b"]),  # / std (shape (1, C, 1, 1))
        helper.make_node("Mul", ["half", "b"], ["m"]),  # a scalar in front
        helper.make_node("Sub", ["one", "m"], ["y"]),  # a constant minus the tensor
    ]
    proto = make(nodes, (c, 4, 5), {"v": rng.standard_normal(c).astype(np.float32), "axes": np.array([1, 2]),
                                   "std": col.reshape(1, c, 1, 1), "half": np.float32(0.5),
                                   "one": np.ones((c, 1, 1), np.float32)}, opset=13)
    graph = assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((2, c, 4, 5)).astype(np.float32))
    assert all(isinstance(n.layer, ChannelAffine) for n in graph.nodes)


def test_a_constant_that_varies_over_positions_is_refused(rng):
    proto = make([helper.make_node("Add", ["x", "p"], ["y"], name="posbias")], (2, 3, 3),
                 {"p": rng.standard_normal((2, 3, 3)).astype(np.float32)})
    with pytest.raises(OnnxError, match="'posbias' \\(Add\\).*varies along more than the channel"):
        cnn_onnx.load(proto)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_attributes_and_a_flatten_before_it(trans_b, rng):
    w = rng.standard_normal((5, 2 * 3 * 4)).astype(np.float32)  # (M, K): rows of ONNX's (c, h, w) flatten
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "c"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)]
    proto = make(nodes, (2, 3, 4), {"w": w if trans_b else w.T.copy(),
                                   "c": rng.standard_normal((1, 5)).astype(np.float32)})
    graph = assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((3, 2, 3, 4)).astype(np.float32))
    assert [type(n.layer) for n in graph.nodes] == [L.ReLU, L.Flatten, L.Dense]


def test_matmul_then_add_is_one_dense_layer(rng):
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    proto = make(nodes, (2, 2, 2), {"w": rng.standard_normal((8, 3)).astype(np.float32),
                                   "b": rng.standard_normal(3).astype(np.float32)})
    graph = assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((4, 2, 2, 2)).astype(np.float32))
    assert [type(n.layer) for n in graph.nodes] == [L.Flatten, L.Dense] and "bias" in graph.nodes[1].layer.params


def test_a_reshape_computed_from_the_shape(rng):
    """x.view(x.size(0), -1) as PyTorch writes it: Shape, Gather, Unsqueeze, Concat, Reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    proto = make(nodes, (3, 2, 2), {"zero": np.array(0), "axes": np.array([0]), "minus1": np.array([-1]),
                                   "w": rng.standard_normal((4, 12)).astype(np.float32)})
    assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((5, 3, 2, 2)).astype(np.float32))


@pytest.mark.parametrize("target", [[0, -1], [-1, 12], [1, -1]], ids=["copy-batch", "infer-batch", "fixed-batch"])
def test_reshape_targets(target, rng):
    nodes = [helper.make_node("Reshape", ["x", "t"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    batch = 1 if target[0] == 1 else "N"
    proto = make(nodes, (3, 2, 2), {"t": np.array(target), "w": rng.standard_normal((4, 12)).astype(np.float32)},
                 batch=batch)
    assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((1, 3, 2, 2)).astype(np.float32))


def test_a_reshape_that_mixes_channels_and_positions_is_refused():
    proto = make([helper.make_node("Reshape", ["x", "t"], ["y"], name="mix")], (2, 3, 4), {"t": np.array([0, 3, 2, 4])})
    with pytest.raises(OnnxError, match="'mix' \\(Reshape\\).*mixes channels with positions"):
        cnn_onnx.load(proto)


def test_pooled_features_feed_a_convolution(rng):
    """GlobalAveragePool -> 1x1 Conv -> Flatten -> Softmax, as SqueezeNet-style heads do."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Conv", ["g", "w1", "b1"], ["h"]),
             helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("Softmax", ["f"], ["y"], axis=1)]
    proto = make(nodes, (3, 5, 5), {"w0": conv_weights(rng, 6, 3), "w1": conv_weights(rng, 4, 6, k=1),
                                   "b1": rng.standard_normal(4).astype(np.float32)})
    graph = assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    assert [type(n.layer).__name__ for n in graph.nodes] == ["Conv2D", "GlobalAvgPool2D", "Reshape", "Conv2D",
                                                            "Flatten", "Softmax"]


def test_a_channels_last_graph_as_keras_writes_it(rng):
    """Input (N, H, W, C) transposed to NCHW inside the file, output transposed back: no layer for either."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])]
    proto = make(nodes, (5, 6, 3), {"w": conv_weights(rng, 4, 3)})
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    graph = cnn_onnx.load(proto)
    assert [type(n.layer) for n in graph.nodes] == [L.Conv2D]
    np.testing.assert_allclose(ours(graph, x), run_ort(proto, x), rtol=RTOL, atol=ATOL)


def test_merges_pads_and_the_other_operators(rng):
    """Pad (opset 11 inputs), Concat of channels, Sum of three, BatchNormalization of a flatten,
    Clip with min/max inputs, Dropout with a ratio input, LeakyRelu and HardSigmoid defaults,
    HardSwish and x * sigmoid(x)."""
    nodes = [
        helper.make_node("Pad", ["x", "pads", "pad_value"], ["p"], mode="constant"),  # (N, 2, 5, 6)
        helper.make_node("Conv", ["p", "wa"], ["a"]), helper.make_node("Conv", ["p", "wb"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),  # (N, 4, 3, 4)
        helper.make_node("LeakyRelu", ["ab"], ["l"]), helper.make_node("HardSigmoid", ["ab"], ["hs"]),
        helper.make_node("HardSwish", ["ab"], ["hw"]),
        helper.make_node("Sum", ["l", "hs", "hw"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["sig"]), helper.make_node("Mul", ["s", "sig"], ["silu"]),
        helper.make_node("Clip", ["silu", "lo", ""], ["clip"]),
        helper.make_node("Flatten", ["clip"], ["f"]),
        helper.make_node("BatchNormalization", ["f", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Dropout", ["bn", "ratio"], ["d"]),
        helper.make_node("Gemm", ["d", "w"], ["y"]),
    ]
    k = 48
    proto = make(nodes, (2, 4, 4), {
        "pads": np.array([0, 0, 1, 0, 0, 0, 0, 2]), "pad_value": np.float32(0.5),
        "wa": conv_weights(rng, 2, 2), "wb": conv_weights(rng, 2, 2), "lo": np.float32(-0.1),
        "g": rng.uniform(0.5, 1.5, k).astype(np.float32), "beta": rng.standard_normal(k).astype(np.float32),
        "mean": rng.standard_normal(k).astype(np.float32), "var": rng.uniform(0.5, 2, k).astype(np.float32),
        "ratio": np.float32(0.25), "w": rng.standard_normal((k, 3)).astype(np.float32)})
    graph = assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((3, 2, 4, 4)).astype(np.float32))
    kinds = {type(n.layer).__name__ for n in graph.nodes}
    assert {"Pad2D", "Concat", "Add", "SiLU", "HardSwish", "Clip", "BatchNorm1D", "Dropout"} <= kinds
    assert "Sigmoid" not in kinds  # folded into the SiLU
    assert graph.nodes[-2].layer.p == 0.25


@pytest.mark.parametrize("clip", [(0.0, 6.0, L.ReLU6), (0.0, None, L.ReLU), (None, 1.5, L.Clip)])
def test_clip_forms(clip, rng):
    low, high, kind = clip
    names = ["x", "lo" if low is not None else "", "hi" if high is not None else ""]
    inits = {k: np.float32(v) for k, v in (("lo", low), ("hi", high)) if v is not None}
    proto = make([helper.make_node("Clip", names, ["y"])], (2, 3, 3), inits)
    graph = assert_imports_as_onnxruntime_computes(proto, 4 * rng.standard_normal((2, 2, 3, 3)).astype(np.float32))
    assert type(graph.nodes[0].layer) is kind


# ---- old opsets ---------------------------------------------------------------------------------------------

def small_net(opset: int, rng) -> onnx.ModelProto:
    """The same network in the forms of an old opset (6) and a current one (13): Conv + per-channel
    bias by legacy broadcast, BatchNormalization, Clip, MaxPool, Mul by a per-channel scale, Reshape,
    Gemm with a bias, Dropout, Softmax."""
    w = np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
    bias = np.random.default_rng(6).standard_normal(4).astype(np.float32)
    inits = {"w": w, "g": np.full(4, 1.5, np.float32), "beta": np.full(4, 0.1, np.float32),
             "mean": np.linspace(-0.5, 0.5, 4).astype(np.float32), "var": np.linspace(0.5, 2, 4).astype(np.float32),
             "fc": np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32),
             "fcb": np.arange(3, dtype=np.float32), "shape": np.array([0, -1])}
    scale = np.linspace(0.5, 1.0, 4).astype(np.float32)
    if opset < 7:
        inits.update(b=bias, scale=scale)
        add = helper.make_node("Add", ["c", "b"], ["cb"], broadcast=1, axis=1)
        bn = helper.make_node("BatchNormalization", ["cb", "g", "beta", "mean", "var"], ["n"], epsilon=1e-3,
                              is_test=1, momentum=0.9, spatial=1)
        clip = helper.make_node("Clip", ["n"], ["r"], min=0.0, max=6.0)
        mul = helper.make_node("Mul", ["p", "scale"], ["ps"], broadcast=1, axis=1)
        gemm = helper.make_node("Gemm", ["f", "fc", "fcb"], ["z"], transB=1, broadcast=1)
        dropout = helper.make_node("Dropout", ["z"], ["d"], is_test=1, ratio=0.3)
    else:
        inits.update(b=bias.reshape(4, 1, 1), scale=scale.reshape(1, 4, 1, 1), lo=np.float32(0), hi=np.float32(6))
        add = helper.make_node("Add", ["c", "b"], ["cb"])
        bn = helper.make_node("BatchNormalization", ["cb", "g", "beta", "mean", "var"], ["n"], epsilon=1e-3)
        clip = helper.make_node("Clip", ["n", "lo", "hi"], ["r"])
        mul = helper.make_node("Mul", ["p", "scale"], ["ps"])
        gemm = helper.make_node("Gemm", ["f", "fc", "fcb"], ["z"], transB=1)
        dropout = helper.make_node("Dropout", ["z"], ["d"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), add, bn, clip,
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), mul,
             helper.make_node("Reshape", ["ps", "shape"], ["f"]), gemm, dropout,
             helper.make_node("Softmax", ["d"], ["y"], axis=1)]
    return make(nodes, (3, 4, 4), inits, opset=opset, ir_version=3 if opset < 9 else None)


def test_an_old_opset_model_reads_its_attributes(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    old, new = small_net(6, rng), small_net(13, rng)
    expected = run_ort(new, x)  # onnxruntime no longer runs opset 6: the same net in today's forms
    assert_imports_as_onnxruntime_computes(old, x, expected)
    assert_imports_as_onnxruntime_computes(new, x)


@pytest.mark.parametrize("opset", [7, 8])
def test_opsets_7_and_8(opset, rng):
    """Clip and Unsqueeze by attributes, MaxPool-8 with its indices unused, Sum-8."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Unsqueeze", ["b"], ["b3"], axes=[1, 2]),
             helper.make_node("Add", ["c", "b3"], ["cb"]),
             helper.make_node("Clip", ["cb"], ["r"], min=-1.0, max=1.0),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sum", ["p", "p"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    proto = make(nodes, (3, 4, 4), {"w": conv_weights(rng, 4, 3), "b": rng.standard_normal(4).astype(np.float32)},
                 opset=opset, ir_version=3)
    assert_imports_as_onnxruntime_computes(proto, rng.standard_normal((2, 3, 4, 4)).astype(np.float32))


def test_an_opset_before_6_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F32, [1, 2])],
                              [helper.make_tensor_value_info("y", F32, [1, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 5)], ir_version=3)
    with pytest.raises(OnnxError, match="opset 5"):
        cnn_onnx.load(proto)


# ---- names ---------------------------------------------------------------------------------------------------

def test_node_names_become_valid_unique_names(rng):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/features/block.0/Relu"),
             helper.make_node("Relu", ["a"], ["b"], name="/features/block.0/Relu"),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    graph = cnn_onnx.load(make(nodes, (2, 3, 3)))
    assert [n.name for n in graph.nodes] == ["features_block_0_Relu", "features_block_0_Relu_2", "y"]


# ---- refusals ------------------------------------------------------------------------------------------------

def test_a_truncated_file_is_refused_by_name(tmp_path, rng):
    path = cnn_onnx.export(zoo_model("seed_cnn", (12, 12, 1), {}, True), tmp_path / "m.onnx", (12, 12, 1))
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxError, match="cut.onnx"):
        cnn_onnx.load(tmp_path / "cut.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(OnnxError, match="text.onnx"):
        cnn_onnx.load(tmp_path / "text.onnx")
    with pytest.raises(FileNotFoundError):
        cnn_onnx.load(tmp_path / "missing.onnx")


def test_an_unsupported_operator_is_named_with_its_node():
    proto = make([helper.make_node("LRN", ["x"], ["y"], size=3, name="norm1")], (2, 4, 4))
    with pytest.raises(OnnxError, match="node 'norm1' \\(LRN\\): operator LRN is not supported"):
        cnn_onnx.load(proto)


@pytest.mark.parametrize("node,what", [
    (helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="n"), "mode 'reflect'"),
    (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], storage_order=1, name="n"), "storage_order=1"),
    (helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_SIDEWAYS", name="n"), "auto_pad 'SAME_SIDEWAYS'"),
    (helper.make_node("Flatten", ["x"], ["y"], axis=2, name="n"), "from axis 2"),
    (helper.make_node("Softmax", ["x"], ["y"], axis=2, name="n"), "softmax over axis 2"),
    (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2], name="n"), "transpose \\[0, 1, 3, 2\\]"),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2], name="n"), "dilations"),
], ids=["pad-reflect", "storage-order", "auto-pad", "flatten-axis", "softmax-axis", "transpose", "avgpool-dilation"])
def test_an_unsupported_attribute_value_is_named_with_its_node(node, what, rng):
    inits = {"pads": np.zeros(8, np.int64), "w": conv_weights(rng, 2, 2)}
    proto = make([node], (2, 4, 4), {k: v for k, v in inits.items() if k in node.input}, opset=19)
    with pytest.raises(OnnxError, match=f"node 'n' \\({node.op_type}\\).*{what}"):
        cnn_onnx.load(proto)


def test_an_unread_optional_output_is_fine_and_a_read_one_is_refused():
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2], name="pool"),
             helper.make_node("Cast", ["idx"], ["y"], to=F32)]
    proto = make(nodes, (2, 4, 4))
    with pytest.raises(OnnxError, match="'idx', an output of node 'pool' \\(MaxPool\\)"):
        cnn_onnx.load(proto)
    fine = make([helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])], (2, 4, 4))
    assert [type(n.layer) for n in cnn_onnx.load(fine).nodes] == [L.MaxPool2D]


def test_an_output_in_nchw_flatten_order_is_refused(rng):
    proto = make([helper.make_node("Flatten", ["x"], ["y"])], (2, 3, 3))
    with pytest.raises(OnnxError, match="flatten of an image in NCHW"):
        cnn_onnx.load(proto)


def test_a_file_without_fixed_sizes_needs_an_input_shape(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(conv_weights(rng, 2, 3), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 3, "H", "W"])],
                              [helper.make_empty_tensor_value_info("y")], inits)
    proto = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    with pytest.raises(OnnxError, match="input_shape"):
        cnn_onnx.load(proto)
    model = cnn_onnx.load(proto, input_shape=(5, 6, 3))
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(ours(model, nchw_to_nhwc(x)), to_nhwc(run_ort(proto, x)), rtol=RTOL, atol=ATOL)
    with pytest.raises(OnnxError, match="contradicts"):
        cnn_onnx.load(make(nodes, (3, 5, 6), {"w": conv_weights(rng, 2, 3)}), input_shape=(5, 6, 4))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
