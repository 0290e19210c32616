"""cnn_gpu.model.Graph: building, running and differentiating DAGs of layers, and their errors."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.layers import (Add, BatchNorm2D, Concat, Conv2D, Dense, Flatten, GlobalAvgPool2D, Identity, MaxPool2D,
                            ReLU)
from cnn_gpu.model import Graph, Input, Node, Sequential
from cnn_gpu.models import basic_block

from .helpers import assert_close, numerical_gradients, random


def _residual_block(rng, dtype="float64", channels=3):
    """relu(bn(conv(relu(conv(x)))) + x), written with symbolic tensors."""
    x = Input((5, 5, channels))
    h = Conv2D(channels, channels, 3, padding=1, rng=rng, dtype=dtype)(x, name="conv1")
    h = ReLU()(h, name="relu1")
    h = Conv2D(channels, channels, 3, padding=1, bias=False, rng=rng, dtype=dtype)(h, name="conv2")
    h = BatchNorm2D(channels, dtype=dtype)(h, name="bn")
    return Graph(x, ReLU()(Add()(h, x, name="add"), name="out"))


def _branchy(rng, dtype="float64"):
    """x feeds three layers (two convs and the concat): an Inception-style split and merge,
    then a classifier. x (N, 6, 6, 2) -> (N, 4)."""
    x = Input((6, 6, 2))
    a = ReLU()(Conv2D(2, 3, 1, rng=rng, dtype=dtype)(x, name="a"), name="a_relu")
    b = Conv2D(2, 2, 3, padding=1, rng=rng, dtype=dtype)(x, name="b")
    merged = Concat()(a, b, x, name="concat")  # x itself is a third branch
    h = GlobalAvgPool2D()(merged, name="pool")
    return Graph(x, Dense(7, 4, init="glorot", rng=rng, dtype=dtype)(h, name="fc"))


def test_a_residual_block_computes_its_definition(xp, rng):
    block = _residual_block(np.random.default_rng(0)).to("cpu" if xp is np else "gpu")
    x = random(xp, rng, (2, 5, 5, 3))
    layers = {node.name: node.layer for node in block.nodes}
    h = layers["relu1"].forward(layers["conv1"].forward(x))
    h = layers["bn"].forward(layers["conv2"].forward(h))
    expected = np.maximum(to_numpy(h) + to_numpy(x), 0)
    assert_close(block.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert [n.name for n in block.nodes] == ["conv1", "relu1", "conv2", "bn", "add", "out"]
    assert block.nodes[4].inputs == ("bn", "input")


@pytest.mark.parametrize("make", [_residual_block, _branchy], ids=["residual", "branch-and-merge"])
def test_graph_gradients_match_finite_differences(xp, rng, make):
    """Parameters and the input (need_dx=True): a tensor read by several layers gets the sum of
    their gradients."""
    model = make(np.random.default_rng(1)).to("cpu" if xp is np else "gpu")
    shape = (3, 5, 5, 3) if make is _residual_block else (3, 6, 6, 2)
    x = random(xp, rng, shape)
    dy = random(xp, rng, model.forward(x).shape)
    dx = model.backward(dy, need_dx=True)
    analytic = [to_numpy(p.grad).copy() for p in model.parameters()]
    numeric = numerical_gradients(lambda *_: model.forward(x), [p.data for p in model.parameters()] + [x], dy)
    for (name, _), a, n in zip(model.named_parameters(), analytic, numeric):
        assert_close(a, n, rtol=1e-5, atol=1e-8, what=name)
    assert_close(dx, numeric[-1], rtol=1e-5, atol=1e-8, what="dx")


def test_backward_is_deterministic_and_computes_no_unneeded_gradient(rng):
    model = _branchy(np.random.default_rng(2))
    x = rng.standard_normal((4, 6, 6, 2))
    grads = []
    for _ in range(2):
        model.forward(x)
        assert model.backward(np.ones((4, 4))) is None  # need_dx defaults to False for a model
        grads.append([p.grad.copy() for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)  # the same computation twice


def test_gradient_sum_does_not_modify_a_shared_array(rng):
    """Add sends one dy to both inputs; the graph must add into a new array, not into dy."""
    x = Input((3,))
    h = Identity()(x, name="i")
    model = Graph(x, Add()(h, x, name="add"))
    dy = rng.standard_normal((2, 3))
    before = dy.copy()
    model.forward(rng.standard_normal((2, 3)))
    dx = model.backward(dy, need_dx=True)
    np.testing.assert_array_equal(dy, before)
    np.testing.assert_allclose(dx, 2 * dy)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_convolution_adds_the_other_readers_gradient_into_its_own_bit_for_bit(monkeypatch, rng, dtype):
    """An identity block's input is read by conv1 and by the Add: conv1's backward is handed the
    Add's gradient (dx_plus) and adds it as it makes dx. The gradients are those of the graph's own
    sum, bit for bit (one rounding per element either way), and the Add's dy is left as it was."""
    model = basic_block(16, 16, stride=1, batch_norm=True, dtype=dtype, rng=np.random.default_rng(4))
    x = rng.standard_normal((6, 8, 8, 16)).astype(dtype)
    dy = rng.standard_normal((6, 8, 8, 16)).astype(dtype)
    calls = []
    conv_backward = Conv2D.backward

    def recording(self, grad, need_dx=True, dx_plus=None):
        calls.append(dx_plus is not None)
        return conv_backward(self, grad, need_dx, dx_plus)
    monkeypatch.setattr(Conv2D, "backward", recording)

    def run():
        model.forward(x)
        dx = model.backward(dy.copy(), need_dx=True)
        return [p.grad.copy() for p in model.parameters()] + [dx]
    fused = run()
    assert calls == [False, True]  # conv2, then conv1 with the Add's gradient
    monkeypatch.setattr(Conv2D, "backward_adds_dx", lambda self: False)
    calls.clear()
    plain = run()
    assert calls == [False, False]
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(a, b)


def test_conv2d_backward_dx_plus_is_dx_plus_the_other_gradient_and_is_checked(rng):
    from cnn_gpu.functional import conv2d_backward, conv2d_forward
    for c, dtype in ((16, "float32"), (3, "float32"), (4, "float64")):  # direct; the GEMM path inside it; GEMM
        x = rng.standard_normal((5, 7, 6, c)).astype(dtype)
        w = rng.standard_normal((3, 3, c, 16)).astype(dtype)
        y, cache = conv2d_forward(x, w, padding=1)
        dy = rng.standard_normal(y.shape).astype(dtype)
        other = rng.standard_normal(x.shape).astype(dtype)
        before = other.copy()
        dx, dw, _ = conv2d_backward(dy, cache)
        dx_sum, dw_sum, _ = conv2d_backward(dy, cache, dx_plus=other)
        np.testing.assert_array_equal(dx_sum, dx + other)
        np.testing.assert_array_equal(dw_sum, dw)
        np.testing.assert_array_equal(other, before)
        with pytest.raises(ValueError, match="dx_plus is float32 \\(5, 7, 6, 1\\) but x is"):
            conv2d_backward(dy, cache, dx_plus=np.zeros((5, 7, 6, 1), np.float32))
        with pytest.raises(ValueError, match="need_dx is False"):
            conv2d_backward(dy, cache, need_dx=False, dx_plus=other)


def test_nested_graphs_have_path_names_and_recurse(rng):
    inner = _residual_block(np.random.default_rng(3))
    model = Sequential([("stem", Conv2D(1, 3, 3, padding=1, dtype="float64")), ("block0", inner),
                        ("pool", GlobalAvgPool2D()), ("fc", Dense(3, 2, dtype="float64"))])
    keys = list(model.state_dict())
    assert "block0.conv1.weight" in keys and "block0.bn.running_var" in keys and keys[0] == "stem.weight"
    model.eval()
    assert all(not layer.training for _, layer in model.named_layers())
    model.train()
    assert inner.nodes[3].layer.training
    other = Sequential([("stem", Conv2D(1, 3, 3, padding=1, dtype="float64")), ("block0", _residual_block(rng)),
                        ("pool", GlobalAvgPool2D()), ("fc", Dense(3, 2, dtype="float64"))])
    other.load_state_dict(model.state_dict())
    x = rng.standard_normal((2, 5, 5, 1))
    np.testing.assert_array_equal(other.forward(x), model.forward(x))  # the same weights, the same computation
    text = model.summary((5, 5, 1))
    assert "block0.add Add() <- bn, input" in text and f"total parameters: {model.num_parameters():,}" in text


def test_a_state_of_another_architecture_is_refused_by_name():
    model = Sequential([Conv2D(1, 4, 3), ReLU()])
    with pytest.raises(ValueError, match=r"state entry '0.weight': the model expects float32 \(3, 3, 1, 4\), got "
                                         r"float32 \(3, 3, 1, 8\)"):
        model.load_state_dict(Sequential([Conv2D(1, 8, 3), ReLU()]).state_dict())
    with pytest.raises(ValueError, match=r"another architecture.*missing \['0.bias'\]"):
        model.load_state_dict(Sequential([Conv2D(1, 4, 3, bias=False), ReLU()]).state_dict())


def test_add_of_two_shapes_is_named_when_the_graph_is_built():
    x = Input((8, 8, 3))
    h = Conv2D(3, 4, 3, padding=1)(x, name="conv")
    with pytest.raises(ValueError, match=r"node 'add' \(Add\(\)\): Add: input 1 has shape \(8, 8, 3\) but input 0 "
                                         r"has \(8, 8, 4\)"):
        Add()(h, x, name="add")


def test_add_of_two_shapes_is_named_when_shapes_come_later():
    x = Input()
    model = Graph(x, Add()(Conv2D(3, 4, 3, padding=1)(x, name="conv"), x, name="add"))
    with pytest.raises(ValueError, match=r"node 'add' \(Add\(\)\) reading 'conv' \(8, 8, 4\), 'input' \(8, 8, 3\)"):
        model.output_shape((8, 8, 3))


def test_node_lists_are_sorted_and_their_errors_name_the_node():
    conv, relu = Conv2D(1, 2, 3), ReLU()
    model = Graph.from_nodes([Node("relu", relu, ("conv",)), Node("conv", conv, ("x",))], ["x"], "relu")
    assert [n.name for n in model.nodes] == ["conv", "relu"]
    with pytest.raises(ValueError, match="cycle through nodes 'a', 'b'"):
        Graph.from_nodes([("a", ReLU(), ("b",)), ("b", ReLU(), ("a",))], ["x"], "b")
    with pytest.raises(ValueError, match="node 'b' reads 'nowhere', which no node produces"):
        Graph.from_nodes([("a", ReLU(), ("x",)), ("b", ReLU(), ("nowhere",))], ["x"], "b")
    with pytest.raises(ValueError, match=r"nodes \['a'\] do not lead to the output 'b'"):
        Graph.from_nodes([("a", ReLU(), ("x",)), ("b", ReLU(), ("x",))], ["x"], "b")
    with pytest.raises(ValueError, match="nodes .* share one"):
        shared = ReLU()
        Graph.from_nodes([("a", shared, ("x",)), ("b", shared, ("a",))], ["x"], "b")
    with pytest.raises(ValueError, match=r"node 'add' \(Add\(\)\) takes two or more input\(s\), got 1"):
        Graph.from_nodes([("add", Add(), ("x",))], ["x"], "add")
    with pytest.raises(ValueError, match="repeated: \\['x'\\]"):
        Graph.from_nodes([("x", ReLU(), ("x",))], ["x"], "x")


def test_symbolic_errors():
    x = Input((4, 4, 1))
    with pytest.raises(ValueError, match="takes 1 input"):
        ReLU()(x, x)
    other = Input((4, 4, 1), name="other")
    with pytest.raises(ValueError, match="depends on input 'other', which is not among the Graph's inputs"):
        Graph(x, Add()(x, other))
    with pytest.raises(TypeError, match="symbolic Tensors only"):
        ReLU()(x, np.zeros(3))


def test_unnamed_nodes_get_names_by_type_and_order():
    x = Input()
    model = Graph(x, ReLU()(Conv2D(1, 2, 3)(ReLU()(x))))
    assert [n.name for n in model.nodes] == ["re_lu_0", "conv2_d_0", "re_lu_1"]


def test_a_graph_with_two_inputs(rng):
    a, b = Input((3,), name="a"), Input((3,), name="b")
    model = Graph([a, b], Dense(6, 2, dtype="float64")(Concat()(a, b, name="cat"), name="fc"))
    xa, xb = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    y = model.forward(xa, xb)
    w = model.nodes[1].layer.params["weight"].data
    np.testing.assert_allclose(y, np.concatenate([xa, xb], axis=1) @ w, rtol=1e-12)
    dxa, dxb = model.backward(np.ones((4, 2)), need_dx=True)
    np.testing.assert_allclose(dxa, np.ones((4, 2)) @ w[:3].T)
    with pytest.raises(ValueError, match=r"takes 2 input\(s\) \['a', 'b'\], got 1"):
        model.forward(xa)


def test_resnet_basic_block_trains_on_either_path(rng):
    """A basic block with a projection shortcut as part of a classifier: one SGD step lowers the loss."""
    from cnn_gpu import SGD
    r = np.random.default_rng(4)
    model = Sequential([("block", basic_block(1, 4, 2, True, r, "float64")), ("pool", MaxPool2D(2)),
                        ("flat", Flatten()), ("fc", Dense(16, 3, dtype="float64", rng=r))])
    x, labels = rng.standard_normal((8, 8, 8, 1)), rng.integers(0, 3, 8)
    opt = SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss, d = softmax_cross_entropy(model.forward(x), labels)
        model.backward(d)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
