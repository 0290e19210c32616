"""The model zoo (cnn_gpu.models): every model builds for any input, round-trips through its JSON
config, trains a step, and computes what the same architecture computes in PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn_gpu import SGD
from cnn_gpu.config import from_config, from_json, layer_config, to_json
from cnn_gpu.functional import softmax_cross_entropy
from cnn_gpu.models import DEFAULT_BATCH_NORM, MODELS, build

ZOO = sorted(MODELS)
SHAPES = [(28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("input_shape", SHAPES, ids=["28x28x1", "32x32x3"])
def test_every_model_builds_for_any_input(name, input_shape, rng):
    model = build(name, input_shape=input_shape, num_classes=7)
    assert model.output_shape(input_shape) == (7,)
    x = rng.standard_normal((2, *input_shape)).astype(np.float32)
    y = model.forward(x)
    assert y.shape == (2, 7) and y.dtype == np.float32
    assert f"total parameters: {model.num_parameters():,}" in model.summary(input_shape)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_config_round_trip_gives_the_same_model(name, batch_norm, rng):
    model = build(name, input_shape=(28, 28, 1), batch_norm=batch_norm, seed=1)
    text = to_json(model)
    json.loads(text)  # plain JSON
    again = from_json(text)
    assert layer_config(again) == layer_config(model)
    again.load_state_dict(model.state_dict())
    x = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
    model.eval(), again.eval()
    np.testing.assert_array_equal(again.forward(x), model.forward(x))  # the same weights and computation


def test_same_seed_same_weights():
    for name in ZOO:
        a, b = build(name, seed=3), build(name, seed=3)
        for (key, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            np.testing.assert_array_equal(pa.data, pb.data, err_msg=f"{name} {key}")


@pytest.mark.parametrize("name", ZOO)
def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch(name, rng):
    model = build(name, input_shape=(16, 16, 3), num_classes=4, dtype="float64", seed=2)
    x, labels = rng.standard_normal((16, 16, 16, 3)), rng.integers(0, 4, 16)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        loss, d = softmax_cross_entropy(model.forward(x), labels)
        model.backward(d)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_models_match_pytorch(name, mode, rng):
    """The same weights in the same architecture in PyTorch (cnn_gpu.bench.reference.to_torch):
    outputs and every parameter's gradient, in float64 (two implementations: rounding only)."""
    torch = pytest.importorskip("torch")
    from cnn_gpu.bench.reference import to_torch
    shape = (12, 12, 3) if name != "vgg" else (16, 16, 3)
    model = build(name, input_shape=shape, num_classes=5, dtype="float64", seed=4,
                  batch_norm=DEFAULT_BATCH_NORM[name])
    x, labels = rng.standard_normal((6, *shape)), rng.integers(0, 5, 6)
    if mode == "eval":  # running statistics away from 0 and 1, then the eval plan (batch norm folded)
        model.forward(x)
        model.eval()
    reference = to_torch(model, shape).double()
    reference.train(mode == "train")
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    logits = model.forward(x)
    tlogits = reference(tx)
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-9, atol=1e-10)
    if mode == "eval":
        return
    _, d = softmax_cross_entropy(logits, labels)
    model.backward(d)
    torch.nn.functional.cross_entropy(tlogits, torch.tensor(labels)).backward()
    torch_params = list(reference.named_parameters())
    ours = model.named_parameters()
    assert len(torch_params) == len(ours)
    for (key, p), (tkey, tp) in zip(ours, torch_params):
        g, w = p.grad, p.data
        if g.ndim == 4:
            g, w = g.transpose(3, 2, 0, 1), w.transpose(3, 2, 0, 1)
        elif g.ndim == 2:  # (in, out) -> (out, in); after a flatten PyTorch's columns are our rows in
            # (c, h, w) order instead of (h, w, c): match them through the (distinct, random) weights
            row_of = {tuple(row): r for r, row in enumerate(w)}
            order = [row_of[tuple(col)] for col in tp.detach().numpy().T]
            g, w = g[order].T, w[order].T
        np.testing.assert_array_equal(w, tp.detach().numpy())  # the same weights, copied exactly
        np.testing.assert_allclose(g, tp.grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=f"{key} vs {tkey}")


def test_unknown_model_and_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown model 'resnet99'; known: "):
        build("resnet99")
    config = layer_config(build("resnet20"))
    config["args"]["layers"][3]["layer"]["args"]["layers"][0]["layer"]["args"]["nodes"][0]["layer"]["type"] = "Conv3D"
    with pytest.raises(ValueError, match=r"stage1.block0.conv1: unknown layer type 'Conv3D'"):
        from_config(config)
    with pytest.raises(ValueError, match=r"fc: Dense takes no argument\(s\) \['units'\]"):
        from_config({"type": "Sequential", "args": {"layers": [
            {"name": "fc", "layer": {"type": "Dense", "args": {"in_features": 3, "out_features": 2, "units": 4}}}]}})
    with pytest.raises(ValueError, match="not valid JSON"):
        from_json("{")
