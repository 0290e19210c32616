"""cnn_gpu/training/captured.py: training epochs and evaluations replayed from CUDA graphs.

Without a GPU: which models, optimizers, data and augmentations can be captured, and the reasons
given for the rest. With a GPU, for the benchmark's four networks (small versions), SGD and Adam,
with and without augmentation, over epochs with a short last batch and a learning-rate change:
- the captured epochs equal the same epochs run eagerly (graph=False) bit for bit: parameters,
  batch-norm statistics, optimizer state, the epoch's loss and accuracy;
- against fit's eager loop (BatchIterator, normalize, CuPy's matmul, Optimizer.step) in float64,
  to float64 rounding (the GEMMs are other calls);
- a step that cannot be captured falls back to eager, said once, with the same results;
- evaluation, forward and the benchmark's single step likewise; and every layer type that
  capture_blockers lets through, under capture.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu import layers as L
from cnn_gpu.backend import to_numpy
from cnn_gpu.data import Augmentation, BatchIterator, compute_norm_stats, normalize
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.model import Graph, Input, Sequential
from cnn_gpu.models import mobilenet, resnet20, seed_cnn
from cnn_gpu.optim import SGD, Adam
from cnn_gpu.training import captured
from cnn_gpu.training.evaluate import evaluate

from .conftest import requires_gpu


def _images(n=70, seed=0, shape=(28, 28, 1)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


# ---- without a GPU: what can be captured ---------------------------------------------------------

class _OnGPU:
    """Makes capture_blockers see a model on the GPU without one (only .backend is read)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @property
    def backend(self):
        return "cupy"


def test_the_benchmark_networks_can_be_captured():
    images, _ = _images(4)
    for model in (seed_cnn(), seed_cnn(batch_norm=True), resnet20(input_shape=(28, 28, 1), width=4),
                  mobilenet(stages=((8, 1), (16, 2)))):
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        assert captured.capture_blockers(_OnGPU(model), opt, images, Augmentation(max_shift=2, hflip=True)) == []
        assert captured.capture_blockers(_OnGPU(model), Adam(model.parameters()), images) == []


def test_what_cannot_be_captured_is_named():
    model = seed_cnn(dropout=0.3)
    images, _ = _images(4)
    reasons = captured.capture_blockers(model, SGD(model.parameters(), lr=0.1), images.astype(np.float32),
                                        Augmentation(erase=0.5))
    assert any("on the CPU" in r for r in reasons)
    assert sum("(Dropout) draws its masks" in r for r in reasons) == 2
    assert any("images are float32" in r for r in reasons)
    assert any("no random erasing" in r for r in reasons)
    # In evaluation dropout draws nothing: only the CPU stands in the way.
    assert captured.capture_blockers(model, training=False) == [reasons[0]]


def test_layers_and_optimizers_never_checked_under_capture_are_refused():
    class Custom(L.Layer):
        def forward(self, x):
            return x

    class MySGD(SGD):
        pass
    model = Sequential([L.Conv2D(1, 2, 3), L.AvgPool2D(2), Custom(), L.Flatten(), L.Dense(2 * 13 * 13, 3)])
    reasons = captured.capture_blockers(_OnGPU(model), MySGD(model.parameters(), lr=0.1))
    assert any("layer 1 (AvgPool2D) copies its divisor" in r for r in reasons)
    assert any("layer 2 (Custom) has not been checked" in r for r in reasons)
    assert any("not MySGD" in r for r in reasons)


def test_images_on_disk_are_refused(tmp_path):
    images, _ = _images(4)
    path = tmp_path / "images.u8"
    mapped = np.memmap(path, dtype=np.uint8, mode="w+", shape=images.shape)
    mapped[:] = images
    model = seed_cnn()
    reasons = captured.capture_blockers(_OnGPU(model), SGD(model.parameters(), lr=0.1), mapped)
    assert reasons and "read from disk" in reasons[0]


# ---- on a GPU --------------------------------------------------------------------------------------

NETS = {
    "seed": lambda dtype: seed_cnn(dtype=dtype),
    "seed_bn": lambda dtype: seed_cnn(batch_norm=True, dtype=dtype),
    "resnet20": lambda dtype: resnet20(input_shape=(28, 28, 1), width=4, dtype=dtype),
    "mobilenet": lambda dtype: mobilenet(stages=((8, 1), (16, 2)), dtype=dtype),
}
OPTIMIZERS = {
    "sgd": lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda ps: Adam(ps, lr=1e-3, weight_decay=5e-4),
}
BASE_LR = {"sgd": 0.05, "adam": 1e-3}
SCHEDULE = (1.0, 0.3, 0.1)  # the learning rate of each epoch, as a fraction of the first


def _gpu_model(net, dtype="float32"):
    return NETS[net](dtype).to("gpu")


def _state(model, opt):
    state = dict(model.state_dict())
    state.update({f"opt.{k}": v for k, v in opt.state_dict().items() if k not in ("lr",)})
    return state


def _assert_same(a, b, rtol=0.0, what=""):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for key in a:
        if rtol:
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol, err_msg=f"{what} {key}")
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what} {key}")


def _captured_run(net, opt_name, graph, augment=None, dtype="float32", epochs=2, log=None):
    images, labels = _images()
    model = _gpu_model(net, dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    stats = compute_norm_stats(images)
    messages = []
    training = captured.CapturedTraining(model, opt, images, labels, batch_size=16, seed=3, norm_stats=stats,
                                         augment=augment, label_smoothing=0.1, graph=graph,
                                         log=messages.append if log is None else log)
    results = []
    for epoch in range(epochs):
        opt.lr = BASE_LR[opt_name] * SCHEDULE[epoch]  # as a schedule sets it between epochs
        results.append(training.train_epoch(epoch))
    return model, opt, training, results, messages


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("augment", [None, Augmentation(max_shift=2, hflip=True)], ids=["plain", "augmented"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("net", list(NETS))
def test_captured_epochs_equal_the_same_epochs_run_eagerly_bit_for_bit(net, opt_name, augment):
    model_g, opt_g, training_g, results_g, messages = _captured_run(net, opt_name, True, augment)
    model_e, opt_e, _, results_e, _ = _captured_run(net, opt_name, False, augment)
    assert training_g.mode == "graph" and messages == []
    assert set(training_g._steps.graphs) == {16, 6}  # the full batch and the short last one (70 = 4 * 16 + 6)
    for rg, re in zip(results_g, results_e):
        assert (rg.loss, rg.accuracy, rg.steps) == (re.loss, re.accuracy, re.steps)
    assert opt_g.steps == opt_e.steps == 10
    _assert_same(_state(model_g, opt_g), _state(model_e, opt_e), what=f"{net} {opt_name}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("net", ["seed", "seed_bn", "resnet20"])
def test_captured_epochs_follow_fits_eager_loop(net, opt_name):
    """fit's loop: the same batches (no augmentation), CuPy's GEMMs and the optimizers' own step. In
    float64 the two differ by GEMM rounding only, carried through ten steps."""
    model_g, opt_g, _, results_g, _ = _captured_run(net, opt_name, True, dtype="float64")
    images, labels = _images()
    stats = compute_norm_stats(images)
    model = _gpu_model(net, "float64")
    opt = OPTIMIZERS[opt_name](model.parameters())
    from cnn_gpu.backend import to_device
    loader = BatchIterator(to_device(images, "cupy"), to_device(labels, "cupy"), 16, seed=3,
                           transform=lambda x: normalize(x, stats, dtype=np.float64))
    for epoch in range(2):
        opt.lr = BASE_LR[opt_name] * SCHEDULE[epoch]
        loss_sum = 0.0
        for x, y in loader.batches(epoch):
            logits = model.forward(x)
            loss, d = softmax_cross_entropy(logits, y, 0.1)
            model.backward(d)
            opt.step()
            opt.zero_grad()
            loss_sum += float(loss) * len(y)
        assert abs(loss_sum / 70 - results_g[epoch].loss) < 1e-9
    _assert_same(_state(model_g, opt_g), _state(model, opt), rtol=1e-8, what=f"{net} {opt_name}")


@pytest.mark.gpu
@requires_gpu
def test_two_captured_runs_give_the_same_bits():
    first = _captured_run("seed_bn", "sgd", True, Augmentation(max_shift=1, hflip=True))
    second = _captured_run("seed_bn", "sgd", True, Augmentation(max_shift=1, hflip=True))
    _assert_same(_state(first[0], first[1]), _state(second[0], second[1]))


@pytest.mark.gpu
@requires_gpu
def test_a_step_that_cannot_be_captured_runs_eagerly_said_once(monkeypatch):
    """A host read inside the step (here planted in ReLU's forward) makes the capture fail: the
    epoch runs eagerly, the log says so once, and the results are the graph=False run's."""
    original = L.ReLU.forward

    def reads_the_host(self, x):
        float(x.ravel()[0])  # a device-to-host copy: refused under capture
        return original(self, x)
    monkeypatch.setattr(L.ReLU, "forward", reads_the_host)
    model_g, opt_g, training_g, results_g, messages = _captured_run("seed", "sgd", True)
    model_e, opt_e, _, results_e, _ = _captured_run("seed", "sgd", False)
    assert training_g.mode.startswith("eager (") and training_g._steps.graphs == {}
    assert len(messages) == 1 and "runs eagerly: it could not be captured" in messages[0]
    _assert_same(_state(model_g, opt_g), _state(model_e, opt_e))
    assert [r.loss for r in results_g] == [r.loss for r in results_e]


@pytest.mark.gpu
@requires_gpu
def test_replaced_parameters_are_captured_anew():
    """load_state_dict replaces the parameters' arrays: the next epoch captures again, and still
    equals the eager run."""
    images, labels = _images()
    stats = compute_norm_stats(images)
    runs = []
    for graph in (True, False):
        model = _gpu_model("seed_bn")
        opt = OPTIMIZERS["sgd"](model.parameters())
        training = captured.CapturedTraining(model, opt, images, labels, batch_size=16, seed=1, norm_stats=stats,
                                             graph=graph, log=None)
        training.train_epoch(0)
        model.load_state_dict(model.state_dict())
        old = dict(training._steps.graphs)
        training.train_epoch(1)
        if graph:
            assert training._steps.graphs and all(training._steps.graphs[k] is not old[k] for k in old)
        runs.append(_state(model, opt))
    _assert_same(*runs)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("net", list(NETS))
def test_captured_evaluation_equals_evaluate(net):
    images, labels = _images(n=45, seed=4)
    stats = compute_norm_stats(images)
    model = _gpu_model(net, "float64")
    evaluation = captured.CapturedEvaluation(model, images, labels, batch_size=20, norm_stats=stats, log=None)
    loss, accuracy = evaluation.run()
    loss2, accuracy2 = evaluation.run()  # replayed from the graphs this time
    assert evaluation.mode == "graph" and set(evaluation._steps.graphs) == {20, 5}
    from cnn_gpu.backend import to_device
    ref_loss, ref_accuracy, _ = evaluate(model, to_device(images, "cupy"), to_device(labels, "cupy"),
                                         batch_size=20, transform=lambda x: normalize(x, stats, dtype=np.float64))
    assert (loss, accuracy) == (loss2, accuracy2)
    assert accuracy == ref_accuracy and abs(loss - ref_loss) < 1e-10
    assert model.training  # restored


@pytest.mark.gpu
@requires_gpu
def test_captured_forward_and_step_equal_eager_ones_bit_for_bit():
    from cnn_gpu.backend import require_cupy
    from cnn_gpu.cuda import gemm
    cupy = require_cupy()
    rng = np.random.default_rng(5)
    x = cupy.asarray(rng.standard_normal((32, 28, 28, 1), dtype=np.float32))
    y = cupy.asarray(rng.integers(0, 10, 32))
    model = _gpu_model("seed_bn").eval()
    forward = captured.CapturedForward(model, x)
    with gemm.capturable():
        expected = model.forward(x)
    np.testing.assert_array_equal(to_numpy(forward()), to_numpy(expected))

    models = [_gpu_model("seed_bn").train() for _ in range(2)]
    opts = [SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    step = captured.CapturedStep(models[0], opts[0], x, y)  # its first step runs at construction
    losses = [float(step()) for _ in range(3)]
    eager_losses = []
    from cnn_gpu.cuda.device_optim import DeviceOptimizer
    updates = DeviceOptimizer(opts[1], cupy.zeros(1, dtype=np.int32), capacity=1)
    updates.begin(1)
    with gemm.capturable():
        for _ in range(4):
            logits = models[1].forward(x)
            loss, d = softmax_cross_entropy(logits, y)
            models[1].backward(d)
            updates.update()
            opts[1].zero_grad()
            eager_losses.append(float(loss))
    assert losses == eager_losses[1:]
    _assert_same(models[0].state_dict(), models[1].state_dict())


@pytest.mark.gpu
@requires_gpu
def test_every_layer_capture_blockers_lets_through_is_captured():
    """A graph of every other capturable layer type (activations, Identity, Concat, Softmax),
    trained captured and eagerly: the same bits."""
    def build():
        rng = np.random.default_rng(0)
        x = Input((12, 12, 2))
        a = L.LeakyReLU(0.1)(L.Conv2D(2, 4, 3, padding=1, rng=rng)(x, name="ca"), name="la")
        b = L.SiLU()(L.Conv2D(2, 4, 3, padding=1, rng=rng)(x, name="cb"), name="sb")
        h = L.Concat()(a, b, name="cat")
        h = L.HardSwish()(L.MaxPool2D(2)(h, name="pool"), name="hs")
        h = L.HardSigmoid()(L.Tanh()(L.Identity()(h, name="id"), name="tanh"), name="hsig")
        h = L.ReLU6()(L.Sigmoid()(h, name="sig"), name="r6")
        h = L.Dropout(0.0)(L.GlobalAvgPool2D()(h, name="gap"), name="drop")
        h = L.Softmax()(L.Dense(8, 5, rng=rng)(h, name="fc1"), name="soft")
        return Graph(x, L.Dense(5, 10, rng=rng)(h, name="fc2")).to("gpu")
    images, labels = _images(n=40, shape=(12, 12, 2))
    stats = compute_norm_stats(images)
    states = []
    for graph in (True, False):
        model = build()
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        training = captured.CapturedTraining(model, opt, images, labels, batch_size=16, seed=0, norm_stats=stats,
                                             graph=graph, log=None)
        assert captured.capture_blockers(model, opt, images) == []
        training.train_epoch(0)
        training.train_epoch(1)
        assert training.mode == ("graph" if graph else "eager (graph=False)")
        states.append(_state(model, opt))
    _assert_same(*states)
