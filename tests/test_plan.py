"""The graph plan (cnn_gpu/plan.py): which steps its rules make, and that a model runs the same
numbers through them as through each layer's own forward.

The activation rule hands a ReLU to the layer before it (a convolution's epilogue, a residual
Add's sum, a batch norm's normalize, whose backward then applies the ReLU's mask itself), and
the sum rule hands a residual Add to the batch norm before it in training; the training step
must stay exact, so fused and unfused runs are compared bit for
bit, on NumPy with the compiled kernels on and off.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu import layers as L
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.model import Graph, Input, Sequential
from cnn_gpu.models import basic_block, mobilenet, resnet20, seed_cnn

from .helpers import assert_close, numerical_gradients

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _unfused(monkeypatch) -> None:
    """No layer offers itself as an activation or a sum to fuse: every plan runs each node on its own."""
    monkeypatch.setattr(L.ReLU, "activation", lambda self: None)
    monkeypatch.setattr(L.Add, "is_sum", lambda self: False)


def _clear_plans(model) -> None:
    for _, layer in model.named_layers():
        if isinstance(layer, Graph):
            layer._plans.clear()


def _step_and_eval(model, x, labels):
    """Logits and every gradient of one training step, then the eval-mode output."""
    _clear_plans(model)
    model.train()
    logits = model.forward(x)
    model.backward(softmax_cross_entropy(logits, labels)[1])
    grads = [p.grad.copy() for p in model.parameters()]
    model.eval()
    return logits, grads, model.forward(x)


def test_a_basic_block_fuses_its_relus_and_its_sum():
    """Training: bn1 computes relu1, and bn2 the Add (of the block's input) and relu2.
    Evaluation: conv1 with bn1 folded computes relu1, conv2 computes bn2, and the Add computes relu2."""
    block = basic_block(8, 8, 1, True, np.random.default_rng(0), "float32")
    h = np.zeros((2, 6, 6, 8), dtype="float32")
    steps = block.plan_for([h]).steps
    assert [(s.output, type(s.layer).__name__, s.activation is not None) for s in steps] == [
        ("conv1", "Conv2D", False), ("relu1", "BatchNorm2D", True),
        ("conv2", "Conv2D", False), ("relu2", "BatchNorm2D", True)]
    assert steps[3].inputs == ("conv2", "input") and type(steps[3].summed).__name__ == "Add"
    assert steps[1].frees == ("conv1",) and steps[2].frees == ("relu1",)  # training too drops what no later step reads
    assert set(steps[3].frees) == {"conv2", "input"}
    block.eval()
    steps = block.plan_for([h]).steps
    assert [(s.output, type(s.layer).__name__, s.folded is not None, s.activation is not None) for s in steps] == [
        ("relu1", "Conv2D", True, True), ("bn2", "Conv2D", True, False), ("relu2", "Add", False, True)]


def test_a_sum_whose_other_input_comes_later_is_not_fused():
    """A downsampling block's shortcut (a 1x1 conv) is computed after bn2, so bn2 cannot add it;
    the Add then computes relu2 as before."""
    block = basic_block(8, 16, 2, True, np.random.default_rng(0), "float32")
    steps = block.plan_for([np.zeros((2, 6, 6, 8), dtype="float32")]).steps
    assert [(s.output, type(s.layer).__name__) for s in steps][-3:] == [
        ("bn2", "BatchNorm2D"), ("shortcut", "Sequential"), ("relu2", "Add")]
    assert all(s.summed is None for s in steps)


def test_a_fused_residual_sum_in_training_matches_finite_differences(rng):
    """bn2 + the block's input + relu2 in one step: the gradients of every parameter and of the
    input, through the ReLU's own backward and the Add's two branches, against finite
    differences (float64)."""
    block = basic_block(3, 3, 1, True, rng, "float64")
    x = rng.standard_normal((2, 5, 5, 3))
    assert any(s.summed is not None for s in block.plan_for([x]).steps)
    dy = rng.standard_normal((2, 5, 5, 3))
    block.forward(x)
    dx = block.backward(dy, need_dx=True)
    analytic = [p.grad.copy() for p in block.parameters()]

    numeric = numerical_gradients(lambda *_: block.forward(x), [p.data for p in block.parameters()] + [x], dy)
    for (name, _), a, n in zip(block.named_parameters(), analytic, numeric):
        assert_close(a, n, rtol=1e-5, atol=1e-8, what=name)
    assert_close(dx, numeric[-1], rtol=1e-5, atol=1e-8, what="dx")


def test_an_activation_read_elsewhere_or_output_is_not_fused():
    """The rule needs the ReLU to be the only reader of the tensor it replaces, and that tensor
    not to be the graph's output."""
    rng = np.random.default_rng(1)
    x = Input((6, 6, 2))
    conv = L.Conv2D(2, 3, 3, padding=1, rng=rng, dtype="float64")(x, name="conv")
    graph = Graph(x, L.Add()(L.ReLU()(conv, name="relu"), conv, name="add"))  # conv is read twice
    steps = graph.plan_for([np.zeros((1, 6, 6, 2))]).steps
    assert all(s.activation is None for s in steps)
    x = Input((6, 6, 2))
    graph = Graph(x, L.Conv2D(2, 3, 3, padding=1, rng=rng, dtype="float64")(x, name="conv"))
    assert graph.plan_for([np.zeros((1, 6, 6, 2))]).steps[0].activation is None


@pytest.mark.parametrize("build, batch_norm", [(resnet20, True), (resnet20, False), (mobilenet, True), (seed_cnn, True)],
                         ids=["resnet20", "resnet20-no-bn", "mobilenet", "seed_cnn-bn"])  # seed_cnn: BatchNorm1D too
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_steps_give_the_numbers_of_the_layers_own(monkeypatch, build, batch_norm, dtype):
    """A training step (logits, every gradient) and an evaluation through the fused plan equal,
    bit for bit, the same model run with every ReLU on its own: the fused ops apply the same
    maximum to the same sums, and each ReLU's backward reads the same output."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 12, 12, 1)).astype(dtype)
    labels = rng.integers(0, 10, 3)
    fused = build(batch_norm=batch_norm, dtype=dtype, input_shape=(12, 12, 1), seed=1)
    got = _step_and_eval(fused, x, labels)
    assert any(step.activation is not None for _, g in fused.named_layers() if isinstance(g, Graph)
               for plan in g._plans.values() for step in plan.steps)  # the fused plans ran
    _unfused(monkeypatch)
    expected = _step_and_eval(build(batch_norm=batch_norm, dtype=dtype, input_shape=(12, 12, 1), seed=1), x, labels)
    np.testing.assert_array_equal(got[0], expected[0])
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(got[2], expected[2])


def test_a_conv_relu_in_training_matches_finite_differences(rng):
    """Without batch norm the convolution computes its ReLU in training: the gradients through
    the fused step against finite differences (float64)."""
    model = Sequential([L.Conv2D(2, 3, 3, padding=1, rng=rng, dtype="float64"), L.ReLU(),
                        L.Conv2D(3, 2, 3, rng=rng, dtype="float64"), L.ReLU(), L.Flatten(),
                        L.Dense(32, 3, init="glorot", rng=rng, dtype="float64")])
    x, labels = rng.standard_normal((2, 6, 6, 2)), np.array([0, 2])
    steps = model.plan_for([x]).steps
    assert [s.activation is not None for s in steps] == [True, True, False, False]
    _, d = softmax_cross_entropy(model.forward(x), labels)
    model.backward(d)
    analytic = [p.grad.copy() for p in model.parameters()]
    numeric = numerical_gradients(lambda *_: softmax_cross_entropy(model.forward(x), labels)[0],
                                  [p.data for p in model.parameters()], 1.0)
    for (name, _), a, n in zip(model.named_parameters(), analytic, numeric):
        assert_close(a, n, rtol=1e-5, atol=1e-8, what=name)


def test_layers_refuse_an_activation_they_do_not_compute(rng):
    conv = L.Conv2D(2, 3, 3, rng=rng)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'tanh'"):
        conv.forward(np.zeros((1, 5, 5, 2), dtype="float32"), activation="tanh")
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        L.Add().forward(np.zeros(3), np.zeros(3), activation="sigmoid")
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        L.BatchNorm2D(2).forward(np.zeros((2, 3, 3, 2), dtype="float32"), activation="tanh")
    assert L.BatchNorm2D(3).absorbs_activation("relu", True) and L.Add().absorbs_activation("relu", False)
    assert not L.BatchNorm2D(3).absorbs_activation("sigmoid", True)
