"""Models written by another exporter: small PyTorch CNNs through torch.onnx.export (the TorchScript
exporter, dynamo=False: the dynamo one needs onnxscript) at opsets 9, 13 and 17, with batch norm
kept as BatchNormalization or folded into the convolutions, import and give PyTorch's outputs."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
nn = torch.nn

import cnn_gpu.onnx as cnn_onnx

from .onnx_fixtures import ATOL, RTOL, ours


class Plain(nn.Module):
    """conv/bn/relu, a residual add, a concat of two branches, max pool, x.view(N, -1), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.left, self.right = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = self.pool(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(x.view(x.size(0), -1))


class Depthwise(nn.Module):
    """MobileNet's block: a depthwise conv (groups = channels) with ReLU6, a pointwise conv, global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(12, 4))

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))))


class Activations(nn.Module):
    """Asymmetric zero padding, ceil-mode pools, average pooling without the padding, the
    activations the library has, constants, and a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 0, 2, 1))  # left, right, top, bottom
        self.conv = nn.Conv2d(3, 6, 3)
        self.avg = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.max = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = self.conv(self.pad(x))  # (N, 6, 9, 8)
        x = nn.functional.hardswish(torch.tanh(x) * 2 + 0.5)
        x = nn.functional.silu(nn.functional.leaky_relu(self.avg(x), 0.1))  # (N, 6, 5, 5)
        x = torch.sigmoid(self.max(x)) - 0.25  # (N, 6, 3, 3)
        return torch.softmax(self.fc(torch.flatten(x, 1)), dim=1)


MODELS = {"plain": (Plain, (3, 8, 8)), "depthwise": (Depthwise, (3, 8, 8)), "activations": (Activations, (3, 8, 9))}


def exported(module, shape, opset, fold):
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):  # running statistics away from 0 and 1
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    module.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (torch.randn(1, *shape),), f, opset_version=opset, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                          do_constant_folding=fold)
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "batchnorm-kept"])
@pytest.mark.parametrize("opset", [9, 13, 17])
@pytest.mark.parametrize("name", list(MODELS))
def test_pytorch_exports_import_and_match_pytorch(name, opset, fold, rng):
    torch.manual_seed(1)
    cls, shape = MODELS[name]
    module = cls()
    proto = exported(module, shape, opset, fold)
    ops = {n.op_type for n in proto.graph.node}
    if name != "activations":
        assert ("BatchNormalization" in ops) == (not fold)  # both forms are covered
    graph = cnn_onnx.load(proto)
    assert all("." not in node.name and "/" not in node.name for node in graph.nodes)
    for n in (1, 7):
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        y = ours(graph, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))  # ours takes (N, H, W, C)
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL, err_msg=f"{name} opset {opset} batch {n}")


def test_an_imported_pytorch_model_fine_tunes(rng):
    from cnn_gpu import SGD
    from cnn_gpu.functional import softmax_cross_entropy
    module = Plain()
    graph = cnn_onnx.load(exported(module, (3, 8, 8), 13, fold=False)).train()
    assert graph.num_parameters() == sum(p.numel() for p in module.parameters())
    x, labels = rng.standard_normal((8, 8, 8, 3)).astype(np.float32), rng.integers(0, 5, 8)
    opt = SGD(graph.parameters(), lr=0.02)
    first, _ = softmax_cross_entropy(graph.forward(x), labels)
    for _ in range(3):
        loss, d = softmax_cross_entropy(graph.forward(x), labels)
        graph.backward(d)
        opt.step()
        opt.zero_grad()
    assert float(loss) < float(first)
