"""cnn_gpu.onnx.export: every file passes onnx.checker's full check, and onnxruntime (CPU) and
onnx.reference.ReferenceEvaluator compute our evaluation outputs from it, for the zoo and for each
layer and geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cnn_gpu.onnx as cnn_onnx
from cnn_gpu import layers as L
from cnn_gpu.checkpoint import Checkpoint, save_checkpoint
from cnn_gpu.config import LAYER_TYPES, layer_config
from cnn_gpu.model import Graph, Input, Sequential
from cnn_gpu.onnx import ChannelAffine, OnnxError, Pad2D, Reshape
from cnn_gpu.onnx.exporter import EXPORTERS
from cnn_gpu.onnx.layout import hwc_rows_to_chw

from .onnx_fixtures import ATOL, RTOL, ZOO, ours, randomize_batch_norm, run_ort, run_reference, zoo_model


def export_checked(model, tmp_path, input_shape, **kwargs):
    """Export, read the file back, and run onnx.checker's full check (with shape inference) on it."""
    path = cnn_onnx.export(model, tmp_path / "model.onnx", input_shape, **kwargs)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def assert_runtimes_agree(model, proto, input_shape, rng, batches=(1, 7), reference=True):
    for n in batches:
        x = rng.standard_normal((n, *input_shape)).astype(np.float32)
        expected = ours(model, x)
        np.testing.assert_allclose(run_ort(proto, x), expected, rtol=RTOL, atol=ATOL, err_msg=f"onnxruntime, batch {n}")
        if reference:
            np.testing.assert_allclose(run_reference(proto, x), expected, rtol=RTOL, atol=ATOL,
                                       err_msg=f"onnx.reference, batch {n}")


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("name,shape,extra", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_compute_the_same_in_onnxruntime_and_the_reference(name, shape, extra, batch_norm, tmp_path, rng):
    model = zoo_model(name, shape, extra, batch_norm)
    proto = export_checked(model, tmp_path, shape)
    assert proto.ir_version == 8 and [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(shape)  # (batch, H, W, C)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = [n.op_type for n in proto.graph.node]
    assert ops[0] == "Transpose" and ops.count("Transpose") == 1  # once, at the input; none before a dense
    assert ("BatchNormalization" in ops) == batch_norm
    assert_runtimes_agree(model, proto, shape, rng)


GEOMETRY = {  # (layer, input channels): every stride, padding, group, dilation and pooling mode we have
    "conv-stride2-pad1": (lambda: L.Conv2D(3, 4, 3, stride=2, padding=1), 3),
    "conv-rect-kernel": (lambda: L.Conv2D(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), 3),
    "conv-groups2": (lambda: L.Conv2D(4, 6, 3, padding=1, groups=2), 4),
    "conv-depthwise-x2-dilated": (lambda: L.Conv2D(4, 8, 3, padding=2, dilation=2, groups=4), 4),
    "conv-dilation-2x1": (lambda: L.Conv2D(3, 4, 3, dilation=(2, 1)), 3),
    "maxpool-3-s2-pad1": (lambda: L.MaxPool2D(3, 2, padding=1), 3),
    "maxpool-ceil": (lambda: L.MaxPool2D(2, 2, ceil_mode=True), 3),
    "maxpool-3-s2-pad1-ceil": (lambda: L.MaxPool2D(3, 2, padding=1, ceil_mode=True), 3),
    "maxpool-dilated": (lambda: L.MaxPool2D(2, 1, dilation=2), 3),
    "avgpool-3-s2-pad1": (lambda: L.AvgPool2D(3, 2, padding=1), 3),
    "avgpool-exclude-pad": (lambda: L.AvgPool2D(3, 2, padding=1, count_include_pad=False), 3),
    "avgpool-ceil": (lambda: L.AvgPool2D(2, 2, ceil_mode=True), 3),
    "avgpool-ceil-exclude-pad": (lambda: L.AvgPool2D(3, 2, padding=1, ceil_mode=True, count_include_pad=False), 3),
    "avgpool-ceil-include-pad": (lambda: L.AvgPool2D(3, 2, padding=1, ceil_mode=True), 3),
}


@pytest.mark.parametrize("case", list(GEOMETRY))
def test_geometry_of_convolutions_and_pools(case, tmp_path, rng):
    make, channels = GEOMETRY[case]
    model = Sequential([make()])  # an image output: the file transposes it back to (N, H, W, C)
    shape = (9, 9, channels)  # odd, so ceil mode has a partial window
    proto = export_checked(model, tmp_path, shape)
    assert_runtimes_agree(model, proto, shape, rng)


def test_every_layer_type_has_an_exporter():
    exportable = set(LAYER_TYPES.values()) - {Graph, Sequential}
    assert exportable <= set(EXPORTERS), sorted(t.__name__ for t in exportable - set(EXPORTERS))


def every_layer_model(rng) -> Graph:
    """A graph with every layer type, on (6, 6, 4) images."""
    x = Input((6, 6, 4))
    h = L.Conv2D(4, 4, 3, padding=1, rng=rng)(x, name="conv")
    h = L.BatchNorm2D(4)(h, name="bn")
    a = L.LeakyReLU(0.2)(h, name="leaky")
    b = L.ReLU6()(ChannelAffine(4)(h, name="affine"), name="relu6")
    c = L.Clip(-0.5, 0.7)(h, name="clip")
    h = L.Add()(a, b, c, name="add3")
    h = L.Concat()(L.Sigmoid()(h, name="sigmoid"), L.Tanh()(h, name="tanh"), name="concat")  # 8 channels
    h = L.ReLU()(L.SiLU()(h, name="silu"), name="relu")
    h = L.HardSwish()(L.HardSigmoid(0.3, 0.4)(h, name="hsig"), name="hswish")
    h = Pad2D((1, 0, 2, 1), value=0.5)(h, name="pad")  # (7, 9, 8)
    h = L.MaxPool2D(2)(L.Identity()(h, name="identity"), name="pool")  # (3, 4, 8)
    h = L.Softmax()(h, name="softmax_image")
    g = L.GlobalAvgPool2D()(h, name="gap")  # (8,)
    g = Reshape((1, 1, 8))(g, name="reshape")
    g = L.Conv2D(8, 8, 1, rng=rng)(g, name="conv1x1")
    f = L.Flatten()(h, name="flatten")  # (96,), in ONNX's (c, h, w) order
    f = L.BatchNorm1D(96)(f, name="bn1d")
    f = L.Dropout(0.3)(f, name="dropout")
    f = L.Dense(96, 8, rng=rng)(f, name="fc1")
    f = L.AvgPool2D(1)(Reshape((1, 1, 8))(f, name="reshape2"), name="avg")
    y = L.Flatten()(L.Add()(f, g, name="add2"), name="flatten2")
    y = L.Softmax()(L.Dense(8, 3, rng=rng)(y, name="fc2"), name="softmax")
    model = Graph(x, y)
    randomize_batch_norm(model, rng)
    for _, layer in model.named_layers():
        for p in layer.params.values():
            p.data = p.data + rng.uniform(-0.3, 0.3, p.shape).astype(p.data.dtype)  # no zero biases, no unit scales
    return model


def test_a_graph_of_every_layer_type(tmp_path, rng):
    model = every_layer_model(rng)
    assert {type(layer) for _, layer in model.named_layers()} >= set(LAYER_TYPES.values()) - {Sequential}
    proto = export_checked(model, tmp_path, (6, 6, 4))
    assert_runtimes_agree(model, proto, (6, 6, 4), rng)


def flatten_dense(rng, between=()) -> Sequential:
    """conv (2 -> 3 channels) on 4 x 3 images, flatten (36 = 4*3*3 features), [layers], dense 36 -> 5,
    with distinct weights everywhere."""
    conv = L.Conv2D(2, 3, 1, rng=rng)
    dense = L.Dense(36, 5, rng=rng)
    dense.params["weight"].data = rng.standard_normal((36, 5)).astype(np.float32)
    return Sequential([conv, L.Flatten(), *between, dense])


def test_the_dense_rows_after_a_flatten_are_permuted_to_nchw(tmp_path, rng):
    model = flatten_dense(rng)
    proto = export_checked(model, tmp_path, (4, 3, 2))
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Transpose", "Conv", "Flatten", "Gemm"], ops  # ONNX's flatten, no transpose before the dense
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = model.layers[2].params["weight"].data
    np.testing.assert_array_equal(weights["2.weight"], hwc_rows_to_chw(w, (4, 3, 3)))
    assert not np.array_equal(weights["2.weight"], w)
    assert_runtimes_agree(model, proto, (4, 3, 2), rng, reference=False)
    # The same file with the rows left in our order computes something else: the check above can fail.
    for t in proto.graph.initializer:
        if t.name == "2.weight":
            t.CopyFrom(onnx.numpy_helper.from_array(w, "2.weight"))
    x = rng.standard_normal((3, 4, 3, 2)).astype(np.float32)
    assert not np.allclose(run_ort(proto, x), ours(model, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("between", ["dropout-relu", "batchnorm", "affine-softmax", "none-but-output"])
def test_a_flatten_through_other_layers_keeps_our_order(between, tmp_path, rng):
    if between == "none-but-output":  # the flatten is the model's output: reordered to ours
        model = Sequential([L.Conv2D(2, 3, 1, rng=rng), L.Flatten()])
        expected_transposes = 2
    else:
        layers = {"dropout-relu": [L.Dropout(0.2), L.ReLU()], "batchnorm": [L.BatchNorm1D(36), L.ReLU()],
                  "affine-softmax": [ChannelAffine(36), L.Softmax()]}[between]
        model = flatten_dense(rng, layers)
        randomize_batch_norm(model, rng)
        for p in layers[0].params.values():  # per-feature vectors that differ from feature to feature
            p.data = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
        expected_transposes = 1  # they all take the (c, h, w) order: no reorder
    proto = export_checked(model, tmp_path, (4, 3, 2))
    assert [n.op_type for n in proto.graph.node].count("Transpose") == expected_transposes
    assert_runtimes_agree(model, proto, (4, 3, 2), rng)


def test_a_flatten_read_by_a_concat_is_reordered(tmp_path, rng):
    x = Input((4, 3, 2))
    a = L.Flatten()(L.Conv2D(2, 3, 1, rng=rng)(x, name="conv"), name="flat")  # (36,)
    b = L.Dense(36, 4, rng=rng)(a, name="fc")
    model = Graph(x, L.Dense(40, 2, rng=rng)(L.Concat()(a, b, name="cat"), name="out"))
    proto = export_checked(model, tmp_path, (4, 3, 2))
    assert_runtimes_agree(model, proto, (4, 3, 2), rng)


def test_a_flatten_changed_by_a_layer_then_reordered(tmp_path, rng):
    """flatten -> ReLU (which keeps ONNX's order) -> concat (which needs ours): the reorder starts
    from the ReLU's output, not from the image before the flatten."""
    x = Input((4, 3, 2))
    a = L.ReLU()(L.Flatten()(L.Conv2D(2, 3, 1, rng=rng)(x, name="conv"), name="flat"), name="relu")
    model = Graph(x, L.Dense(72, 2, rng=rng)(L.Concat()(a, a, name="cat"), name="out"))
    proto = export_checked(model, tmp_path, (4, 3, 2))
    assert_runtimes_agree(model, proto, (4, 3, 2), rng)


def test_a_graph_of_two_inputs(tmp_path, rng):
    image, vector = Input((5, 5, 2), name="image"), Input((3,), name="extra")
    h = L.Dense(4, 3, rng=rng)(L.GlobalAvgPool2D()(L.Conv2D(2, 4, 3, rng=rng)(image, name="conv"), name="gap"),
                               name="fc")
    model = Graph([image, vector], L.Add()(h, L.Tanh()(vector, name="tanh"), name="sum"))
    proto = export_checked(model, tmp_path, [(5, 5, 2), (3,)])
    assert [i.name for i in proto.graph.input] == ["image", "extra"]
    a = rng.standard_normal((4, 5, 5, 2)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    model.eval()
    import onnxruntime as ort
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"image": a, "extra": b})[0]
    np.testing.assert_allclose(y, model.forward(a, b), rtol=RTOL, atol=ATOL)


def test_a_float64_model_is_written_in_float32(tmp_path, rng):
    model = zoo_model("seed_cnn", (12, 12, 1), {"dtype": "float64"}, batch_norm=True)
    proto = export_checked(model, tmp_path, (12, 12, 1))
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))
    x = rng.standard_normal((3, 12, 12, 1))
    np.testing.assert_allclose(run_ort(proto, x.astype(np.float32)), ours(model, x), rtol=RTOL, atol=ATOL)


def test_a_model_of_vectors(tmp_path, rng):
    model = Sequential([L.Dense(6, 8, rng=rng), L.BatchNorm1D(8), L.Tanh(), L.Dense(8, 3, bias=False, rng=rng)])
    randomize_batch_norm(model, rng)
    proto = export_checked(model, tmp_path, (6,))
    assert proto.graph.node[0].op_type == "Gemm"  # no transpose of a vector input
    assert_runtimes_agree(model, proto, (6,), rng)


def test_metadata_props(tmp_path, rng):
    model = flatten_dense(rng)
    proto = export_checked(model, tmp_path, (4, 3, 2), metadata={"class_names": ["a", "b"], "note": "hello"})
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_layout"] == "NHWC" and json.loads(props["input_shape"]) == [4, 3, 2]
    assert json.loads(props["class_names"]) == ["a", "b"] and props["note"] == "hello"
    assert cnn_onnx.read_metadata(tmp_path / "model.onnx") == props


def test_export_checkpoint_carries_classes_and_normalization(tmp_path, rng):
    model = zoo_model("seed_cnn", (12, 12, 1), {}, batch_norm=True)
    classes = [f"class {k}" for k in range(5)]
    mean, std = np.array([0.25]), np.array([0.375])
    ckpt = Checkpoint(model_state=model.state_dict(), optimizer_state={}, schedule_state=None, epoch=3, seed=0,
                      norm_mean=mean, norm_std=std,
                      metadata={"architecture": layer_config(model), "input_shape": [12, 12, 1],
                                "class_names": classes, "dataset": "bars"})
    save_checkpoint(tmp_path / "best.npz", ckpt)
    path = cnn_onnx.export_checkpoint(tmp_path / "best.npz", tmp_path / "out" / "model.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    props = cnn_onnx.read_metadata(path)
    assert json.loads(props["class_names"]) == classes and props["dataset"] == "bars"
    assert json.loads(props["normalization_mean"]) == [0.25] and json.loads(props["normalization_std"]) == [0.375]
    assert json.loads(props["input_shape"]) == [12, 12, 1] and "pixels / 255" in props["preprocessing"]
    assert_runtimes_agree(model, proto, (12, 12, 1), rng, batches=(4,), reference=False)


def test_a_checkpoint_without_an_input_shape_is_refused(tmp_path):
    model = L.Dense(3, 2)
    ckpt = Checkpoint(model_state=model.state_dict(), optimizer_state={}, schedule_state=None, epoch=1, seed=0,
                      metadata={"architecture": layer_config(model)})
    save_checkpoint(tmp_path / "c.npz", ckpt)
    with pytest.raises(OnnxError, match="no input_shape"):
        cnn_onnx.export_checkpoint(tmp_path / "c.npz", tmp_path / "m.onnx")


class Odd(L.Layer):
    """A layer type the exporter does not know."""

    def forward(self, x):
        return x


def test_a_layer_that_cannot_be_exported_is_named_and_nothing_is_written(tmp_path, rng):
    block = Sequential([("conv", L.Conv2D(3, 3, 1, rng=rng)), ("odd", Odd())])
    model = Sequential([("stem", L.Conv2D(3, 3, 1, rng=rng)), ("block", block)])
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the old file")
    with pytest.raises(OnnxError, match=r"'block\.odd'.*Odd"):
        cnn_onnx.export(model, target, (4, 4, 3))
    assert target.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


def test_an_input_shape_the_model_does_not_take_is_refused(tmp_path, rng):
    with pytest.raises(OnnxError, match="does not take inputs of shape"):
        cnn_onnx.export(flatten_dense(rng), tmp_path / "m.onnx", (5, 3, 2))


def test_export_leaves_the_model_as_it_was(tmp_path, rng):
    model = zoo_model("seed_cnn", (12, 12, 1), {}, batch_norm=True)
    model.train()
    before = model.state_dict()
    cnn_onnx.export(model, tmp_path / "m.onnx", (12, 12, 1))
    assert all(layer.training for _, layer in model.named_layers())
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_names_are_the_layers_paths(tmp_path, rng):
    model = zoo_model("resnet20", (8, 8, 3), {"width": 4}, batch_norm=True)
    proto = export_checked(model, tmp_path, (8, 8, 3))
    names = {n.name for n in proto.graph.node}
    assert {"stage2.block0.conv1", "stage2.block0.shortcut.conv", "stage3.block2.add", "fc"} <= names
    initializers = {t.name for t in proto.graph.initializer}
    assert {key for key, _ in model.named_parameters()} <= initializers


def test_a_checkpoint_of_cnn_gpu_train_exports_with_what_it_needs(tmp_path):
    """`cnn-gpu train` writes a checkpoint; its export says how to preprocess, and onnxruntime on raw
    pixels preprocessed that way gives the checkpoint model's logits."""
    import contextlib
    import io

    from cnn_gpu.checkpoint import load_checkpoint
    from cnn_gpu.cli import main
    from cnn_gpu.data.transforms import NormStats, normalize

    from .train_fixtures import write_tiny_idx_dataset
    data = write_tiny_idx_dataset(tmp_path / "data", n_train=60, n_test=20)
    argv = ["train", "--data-dir", str(data), "--epochs", "1", "--limit-train", "40", "--val-size", "10",
            "--batch-size", "20", "--out", str(tmp_path / "run"), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    path = cnn_onnx.export_checkpoint(tmp_path / "run" / "last.npz", tmp_path / "model.onnx")
    props = cnn_onnx.read_metadata(path)
    assert len(json.loads(props["class_names"])) == 10 and json.loads(props["input_shape"]) == [28, 28, 1]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
    mean, std = (np.array(json.loads(props[k])) for k in ("normalization_mean", "normalization_std"))
    x = ((pixels / 255 - mean) / std).astype(np.float32)  # the file's preprocessing, as its metadata says
    ckpt = load_checkpoint(tmp_path / "run" / "last.npz")
    expected = ours(ckpt.build_model(), normalize(pixels, NormStats(ckpt.norm_mean, ckpt.norm_std)))
    np.testing.assert_allclose(run_ort(onnx.load(path), x), expected, rtol=RTOL, atol=ATOL)
