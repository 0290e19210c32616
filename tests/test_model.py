import numpy as np
import pytest

from cnn_gpu import SGD, seed_cnn
from cnn_gpu.backend import to_numpy
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.layers import AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from cnn_gpu.model import Sequential

from .helpers import assert_close, numerical_gradients, random


def _small_net(batch_norm=True, dtype="float64"):
    rng = np.random.default_rng(0)
    layers = [Conv2D(2, 3, 3, padding=1, rng=rng, dtype=dtype)]
    layers += [BatchNorm2D(3, dtype=dtype)] if batch_norm else []
    layers += [ReLU(), MaxPool2D(2), AvgPool2D(2, 1), Flatten(), Dense(3, 4, init="glorot", rng=rng, dtype=dtype)]
    return Sequential(layers)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_model_gradients_match_finite_differences(xp, rng, batch_norm):
    model = _small_net(batch_norm).to("cpu" if xp is np else "gpu")
    x = random(xp, rng, (3, 4, 4, 2))
    labels = xp.asarray(np.array([0, 3, 1]))
    loss_of = lambda: softmax_cross_entropy(model.forward(x), labels)[0]
    _, d = softmax_cross_entropy(model.forward(x), labels)
    model.backward(d)
    params = model.parameters()
    analytic = [to_numpy(p.grad).copy() for p in params]
    numeric = numerical_gradients(lambda *_: loss_of(), [p.data for p in params], 1.0)
    for (name, _), a, n in zip(model.named_parameters(), analytic, numeric):
        assert_close(a, n, rtol=1e-5, atol=1e-8, what=name)


def test_seed_cnn_shapes_and_summary():
    model = seed_cnn(batch_norm=True)
    text = model.summary((28, 28, 1))
    assert "(5, 5, 64)" in text and "(1600,)" in text and "(10,)" in text
    plain = seed_cnn()
    # conv 1x3x3x32 + 32, conv 32x3x3x64 + 64, dense 1600x128 + 128, dense 128x10 + 10
    assert plain.num_parameters() == (288 + 32) + (18432 + 64) + (204800 + 128) + (1280 + 10)
    y = plain.forward(np.zeros((2, 28, 28, 1), dtype=np.float32))
    assert y.shape == (2, 10) and y.dtype == np.float32


def test_same_seed_same_weights_different_seed_different():
    a, b, c = seed_cnn(seed=3), seed_cnn(seed=3), seed_cnn(seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert not np.array_equal(a.parameters()[0].data, c.parameters()[0].data)


def test_save_load_round_trip_reproduces_outputs(tmp_path, rng):
    model = seed_cnn(batch_norm=True, seed=1)
    x = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
    model.train()
    model.forward(x)  # moves the running statistics away from their initial values
    model.eval()
    before = model.forward(x)
    model.save(tmp_path / "m.npz")
    other = seed_cnn(batch_norm=True, seed=99).eval()
    other.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(other.forward(x), before)


def test_load_rejects_mismatched_state(tmp_path):
    seed_cnn(batch_norm=True).save(tmp_path / "bn.npz")
    with pytest.raises(ValueError, match="missing.*unexpected"):
        seed_cnn(batch_norm=False).load(tmp_path / "bn.npz")
    state = seed_cnn().state_dict()
    state["0.weight"] = state["0.weight"].astype(np.float64)
    with pytest.raises(ValueError, match="'0.weight'.*float32"):
        seed_cnn().load_state_dict(state)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        seed_cnn().load(tmp_path / "broken.npz")


def test_layers_name_what_they_expected():
    with pytest.raises(ValueError, match=r"Conv2D\(3, 8, 3x3\).*expected input with 3 channels.*\(2, 8, 8, 1\)"):
        Conv2D(3, 8, 3).forward(np.zeros((2, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Dense\(10, 2\).*expected input with 10 features"):
        Dense(10, 2).forward(np.zeros((2, 9), dtype=np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2D\(4\).*4-D"):
        BatchNorm2D(4).forward(np.zeros((2, 4), dtype=np.float32))


def test_dropout_layer_train_and_eval():
    layer = Dropout(0.5, seed=0)
    x = np.ones((100, 100), dtype=np.float32)
    assert (layer.forward(x) == 0).any()
    layer.training = False
    assert layer.forward(x) is x


@pytest.mark.parametrize("batch_norm", [False, True])
def test_seed_network_learns_a_fixed_batch(batch_norm):
    rng = np.random.default_rng(0)
    x = rng.random((32, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    model = seed_cnn(batch_norm=batch_norm, seed=0)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(300):  # stops as soon as the loss is near zero
        loss, d = softmax_cross_entropy(model.forward(x), y)
        losses.append(float(loss))
        if losses[-1] < 0.01:
            break
        model.backward(d)
        opt.step()
        opt.zero_grad()
    assert losses[0] > 1.5 and losses[-1] < 0.01, (losses[0], losses[-1], len(losses))


def test_eval_forward_keeps_no_caches():
    model = seed_cnn(batch_norm=True).eval()
    model.forward(np.zeros((2, 28, 28, 1), dtype=np.float32))
    assert all(layer._cache is None for layer in model.layers)
    model.train()
    model.forward(np.zeros((2, 28, 28, 1), dtype=np.float32))
    assert all(layer._cache is not None for layer in model.layers)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_seed_cnn_pool_before_relu_is_the_seed_order(xp, rng, batch_norm):
    """seed_cnn runs max-pool before ReLU; the seed's conv, ReLU, pool order gives the same
    outputs and gradients (ReLU is monotone), all-negative windows included."""
    model = seed_cnn(batch_norm=batch_norm, dtype="float64").to("cpu" if xp is np else "gpu")
    swapped = [i for i, layer in enumerate(model.layers)
               if isinstance(layer, MaxPool2D) and isinstance(model.layers[i + 1], ReLU)]
    assert len(swapped) == 2
    seed_order = list(model.layers)
    for i in swapped:
        seed_order[i], seed_order[i + 1] = seed_order[i + 1], seed_order[i]
    reference = Sequential(seed_order)
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints load either way
    x = random(xp, rng, (4, 28, 28, 1))
    labels = xp.asarray(np.array([0, 3, 1, 9]))
    results = []
    for net in (model, reference):
        logits = net.forward(x)
        _, d = softmax_cross_entropy(logits, labels)
        net.backward(d)
        results.append([to_numpy(logits)] + [to_numpy(p.grad).copy() for p in net.parameters()])
    # Not bit for bit: conv2 computes only the 10 x 10 outputs its pool reads when the pool follows
    # it directly (not in the seed order), so the two networks run GEMMs of other shapes, whose
    # kernels (picked by BLAS per shape and CPU model, or by cuBLAS) may round a float64 sum of
    # K = 288 terms differently in the last bit (1 ulp: 1e-16 relative).
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    # The input really has windows whose four values are all negative (zero gradient in both orders).
    h = x
    for layer in model.layers[:swapped[0]]:  # conv 1 [and its batch norm]: (4, 26, 26, 32)
        h = layer.forward(h)
    all_negative = (to_numpy(h).reshape(4, 13, 2, 13, 2, 32) < 0).all(axis=(2, 4))
    assert all_negative.any() and not all_negative.all()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_eval_in_slices_equals_the_whole_batch(monkeypatch, batch_norm):
    """Eval mode on NumPy runs the batch in slices (cnn_gpu.plan.EVAL_SLICE_BYTES); the result
    is the one of running each sample alone, including a short last slice."""
    import cnn_gpu.model as model_module
    rng = np.random.default_rng(3)
    model = seed_cnn(batch_norm=batch_norm, seed=1, dtype="float64")
    x = rng.standard_normal((23, 28, 28, 1))
    model.forward(x)  # a training step's forward: batch-norm running statistics move off 0 and 1
    model.eval()
    alone = np.concatenate([model.forward(x[i:i + 1]) for i in range(len(x))])
    per_sample = max(int(np.prod(s)) for s in model.tensor_shapes((28, 28, 1)).values()) * 8
    monkeypatch.setattr(model_module, "EVAL_SLICE_BYTES", 5 * per_sample)  # slices of 5: 5+5+5+5+3
    model._plans.clear()  # plans are built once per mode and shape: rebuild with the new slice size
    calls = []
    monkeypatch.setattr(model, "_run", lambda plan, xs, inner=model._run: calls.append(len(xs[0])) or inner(plan, xs))
    sliced = model.forward(x)
    assert calls == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(sliced, alone, rtol=1e-12, atol=1e-12)
    model.train()
    calls.clear()
    model.forward(x)
    assert calls == [23]  # training mode: one batch through forward (batch norm needs all of it)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_eval_shortcuts_give_the_layers_outputs(batch_norm):
    """Eval mode folds each batch norm into the conv or dense layer before it and pools without
    an argmax; the output is the one of running every layer's own forward in eval mode."""
    rng = np.random.default_rng(4)
    model = seed_cnn(batch_norm=batch_norm, seed=2, dtype="float64")
    x = rng.standard_normal((9, 28, 28, 1))
    for _ in range(3):  # training steps move the running statistics and scales away from 0 and 1
        model.forward(x)
    for layer in model.layers:
        if "gamma" in layer.params:
            layer.params["gamma"].data = rng.uniform(0.5, 2.0, layer.num_features)
            layer.params["beta"].data = rng.standard_normal(layer.num_features)
    model.eval()
    reference = x
    for layer in model.layers:
        reference = layer.forward(reference)
        layer._cache = None
    np.testing.assert_allclose(model.forward(x), reference, rtol=1e-10, atol=1e-12)
    assert all(layer._cache is None for layer in model.layers)  # eval keeps no activations


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("pool, stride, padding", [(2, None, 0), (3, 2, 1), (2, 1, 0)])
def test_max_pool_for_evaluation_equals_the_forward(xp, rng, pool, stride, padding):
    x = random(xp, rng, (5, 9, 8, 3))
    x[1, 2, 3, 1] = np.nan
    layer = MaxPool2D(pool, stride, padding)
    expected = layer.forward(x)
    y = layer.infer(x)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(expected))  # NaN where the forward has NaN
    assert np.isnan(to_numpy(y)).any()


def _net_whose_pool_reads_part_of_a_conv(dtype="float64"):
    """Conv 2x2 on 6 x 6 -> 5 x 5, of which the 2x2 pool reads 4 x 4."""
    rng = np.random.default_rng(7)
    return Sequential([Conv2D(2, 3, 2, rng=rng, dtype=dtype), MaxPool2D(2), ReLU(), Flatten(),
                       Dense(12, 4, init="glorot", rng=rng, dtype=dtype)])


def test_a_conv_computes_only_what_its_pool_reads(xp, rng):
    """Sequential asks the conv for the 4 x 4 corner; the gradients still match finite differences."""
    model = _net_whose_pool_reads_part_of_a_conv().to("cpu" if xp is np else "gpu")
    x = random(xp, rng, (3, 6, 6, 2))
    assert model.plan_for([x]).steps[0].options == {"out_size": (4, 4)}
    labels = xp.asarray(np.array([0, 3, 1]))
    pool, seen = model.layers[1], []
    pool.forward = lambda h, inner=pool.forward: seen.append(h.shape) or inner(h)
    _, d = softmax_cross_entropy(model.forward(x), labels)
    assert seen == [(3, 4, 4, 3)]  # the pool saw the corner only
    model.backward(d)
    analytic = [to_numpy(p.grad).copy() for p in model.parameters()]
    numeric = numerical_gradients(lambda *_: softmax_cross_entropy(model.forward(x), labels)[0],
                                  [p.data for p in model.parameters()], 1.0)
    for (name, _), a, n in zip(model.named_parameters(), analytic, numeric):
        assert_close(a, n, rtol=1e-5, atol=1e-8, what=name)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_seed_network_training_step_equals_the_layers_own_forwards(batch_norm):
    """The training forward with conv2 cropped to what its pool reads (plain network; with batch
    norm nothing is cropped): the logits and every gradient of running each layer in full."""
    rng = np.random.default_rng(5)
    model = seed_cnn(batch_norm=batch_norm, seed=3, dtype="float64")
    x, labels = rng.standard_normal((6, 28, 28, 1)), rng.integers(0, 10, 6)
    conv2 = next(step for step in model.plan_for([x]).steps if getattr(step.layer, "in_channels", 0) == 32)
    assert conv2.options == ({"out_size": (10, 10)} if not batch_norm else {})  # read by its pool directly
    logits = model.forward(x)
    model.backward(softmax_cross_entropy(logits, labels)[1])
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    reference = x
    for layer in model.layers:
        reference = layer.forward(reference)  # full outputs: no out_size
    np.testing.assert_allclose(logits, reference, rtol=1e-12, atol=1e-12)
    dout = softmax_cross_entropy(reference, labels)[1]
    for i in range(len(model.layers) - 1, -1, -1):
        dout = model.layers[i].backward(dout, need_dx=i > 0)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad, rtol=1e-10, atol=1e-12, err_msg=name)


def test_pool_input_extent_is_what_its_windows_read():
    assert MaxPool2D(2).input_extent((11, 11, 3)) == (10, 10)
    assert MaxPool2D(2).input_extent((12, 13, 3)) == (12, 12)
    assert AvgPool2D(3, 2).input_extent((8, 9, 3)) == (7, 9)
    assert MaxPool2D(2).input_extent((12, 12, 3)) is None  # every row and column is read
    assert MaxPool2D(3, 2, 1).input_extent((8, 8, 3)) is None  # padded: every row is read


def test_loading_on_the_cpu_flushes_subnormal_weights():
    """Subnormal weights (a GPU keeps them) would slow every CPU GEMM: loading sets them to zero."""
    model = seed_cnn(seed=1)
    state = model.state_dict()
    tiny = np.finfo(np.float32).tiny
    state["7.weight"][:3, 0] = [tiny / 4, -tiny / 2, tiny]  # two subnormal, one normal
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.layers[7].params["weight"].data[:3, 0], [0.0, 0.0, tiny])
    np.testing.assert_array_equal(model.layers[7].params["weight"].data[3:], state["7.weight"][3:])
