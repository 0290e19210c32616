"""The same networks in PyTorch, for the benchmark's side-by-side columns and the tests'
cross-checks. torch is imported lazily: it is never a dependency of cnn_gpu, only of these
comparisons.

to_torch(model, input_shape) builds an nn.Module that computes what any cnn_gpu model computes
(Sequential or Graph, nested), in PyTorch's NCHW layout, from the model's own weights (or from
PyTorch's default initialization, with copy_weights=False, for a benchmark):
- conv weights (KH, KW, C_in/groups, C_out) -> (C_out, C_in/groups, KH, KW); dense (in, out) -> (out, in);
- a dense layer reading the flatten of an (H, W, C) map takes its rows permuted from our
  channels-last order (h, w, c) to PyTorch's (c, h, w), so nothing is transposed at run time;
- batch norm with its eps, momentum and running statistics.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import layers as L
from ..backend import to_numpy


def torch_or_reason() -> tuple[Any, str | None]:
    """(the torch module, None), or (None, why not)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None, "torch not installed"
    return torch, None


def torch_seed_cnn(torch: Any, batch_norm: bool, num_classes: int = 10) -> Any:
    """models.seed_cnn's architecture in NCHW PyTorch layers (PyTorch's default init), written out."""
    nn = torch.nn
    bias = not batch_norm
    layers = [nn.Conv2d(1, 32, 3, bias=bias)] + ([nn.BatchNorm2d(32)] if batch_norm else [])
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, bias=bias)]
    layers += [nn.BatchNorm2d(64)] if batch_norm else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128, bias=bias)]
    layers += [nn.BatchNorm1d(128)] if batch_norm else []
    layers += [nn.ReLU(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


def to_torch(model: L.Layer, input_shape: tuple[int, int, int], copy_weights: bool = True) -> Any:
    """An nn.Module computing `model` on NCHW input (see the module docstring), in the model's dtype."""
    import torch  # noqa: PLC0415
    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[np.dtype(model.dtype)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # modules are made in this dtype, so copied weights keep every digit
    try:
        return _TorchGraph(torch, model, [tuple(input_shape)], copy_weights)
    finally:
        torch.set_default_dtype(previous)


def _module(torch: Any, layer: L.Layer, input_shapes: list[tuple], copy: bool, flattened_from: tuple | None) -> Any:
    """The nn.Module for one of our layers, given its inputs' per-sample shapes (ours: (H, W, C))."""
    from ..model import Graph  # noqa: PLC0415 - model imports the layers this module reads
    nn = torch.nn
    if isinstance(layer, Graph):  # Sequential too
        return _TorchGraph(torch, layer, input_shapes, copy)
    if isinstance(layer, L.Conv2D):
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, bias="bias" in layer.params)
        _copy(torch, copy, m.weight, lambda: to_numpy(layer.params["weight"].data).transpose(3, 2, 0, 1))
        if "bias" in layer.params:
            _copy(torch, copy, m.bias, lambda: to_numpy(layer.params["bias"].data))
        return m
    if isinstance(layer, L.Dense):
        m = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)

        def weight() -> np.ndarray:
            w = to_numpy(layer.params["weight"].data)  # (in, out), rows in (h, w, c) order
            if flattened_from is not None and len(flattened_from) == 3:
                h, wd, c = flattened_from
                w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(h * wd * c, -1)  # rows in (c, h, w)
            return w.T
        _copy(torch, copy, m.weight, weight)
        if "bias" in layer.params:
            _copy(torch, copy, m.bias, lambda: to_numpy(layer.params["bias"].data))
        return m
    if isinstance(layer, (L.BatchNorm1D, L.BatchNorm2D)):
        cls = nn.BatchNorm2d if isinstance(layer, L.BatchNorm2D) else nn.BatchNorm1d
        m = cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        if copy:
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(to_numpy(layer.params["gamma"].data).copy()))
                m.bias.copy_(torch.from_numpy(to_numpy(layer.params["beta"].data).copy()))
                m.running_mean.copy_(torch.from_numpy(to_numpy(layer.buffers["running_mean"]).copy()))
                m.running_var.copy_(torch.from_numpy(to_numpy(layer.buffers["running_var"]).copy()))
        return m
    if isinstance(layer, L.MaxPool2D):
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation, ceil_mode=layer.ceil_mode)
    if isinstance(layer, L.AvgPool2D):
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode,
                            count_include_pad=layer.count_include_pad)
    if isinstance(layer, L.GlobalAvgPool2D):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if isinstance(layer, L.Flatten):
        return nn.Flatten()
    if isinstance(layer, L.Add):
        return _Sum(torch)
    if isinstance(layer, L.Concat):
        return _Cat(torch)
    simple = {L.ReLU: nn.ReLU, L.ReLU6: nn.ReLU6, L.Sigmoid: nn.Sigmoid, L.Tanh: nn.Tanh, L.SiLU: nn.SiLU,
              L.HardSwish: nn.Hardswish, L.Identity: nn.Identity}
    if type(layer) in simple:
        return simple[type(layer)]()
    if isinstance(layer, L.LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, L.Clip):
        return nn.Hardtanh(layer.low, layer.high)
    if isinstance(layer, L.Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, L.Softmax):
        return nn.Softmax(dim=1)
    raise ValueError(f"to_torch: no PyTorch counterpart for {layer!r}")


def _copy(torch: Any, copy: bool, target: Any, value: Any) -> None:
    if copy:
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(value())))


def _TorchGraph(torch: Any, graph: L.Layer, input_shapes: list[tuple], copy: bool) -> Any:  # noqa: N802
    """An nn.Module running a cnn_gpu Graph's nodes in order on NCHW tensors."""
    nn = torch.nn

    class TorchGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shapes = dict(zip(graph.input_names, input_shapes))
            producers: dict[str, L.Layer] = {}
            self.steps = []
            self.mods = nn.ModuleDict()
            for node in graph.nodes:
                given = [shapes[i] for i in node.inputs]
                source = node.inputs[0]
                flattened_from = shapes.get(_input_of(graph, source)) if isinstance(producers.get(source), L.Flatten) \
                    else None
                self.mods[node.name] = _module(torch, node.layer, given, copy, flattened_from)
                shapes[node.name] = tuple(node.layer.output_shape(*given))
                producers[node.name] = node.layer
                self.steps.append((node.name, node.inputs))
            self.input_names, self.output_name = graph.input_names, graph.output_name

        def forward(self, *xs: Any) -> Any:
            values = dict(zip(self.input_names, xs))
            for name, inputs in self.steps:
                values[name] = self.mods[name](*(values[i] for i in inputs))
            return values[self.output_name]

    return TorchGraph()


def _input_of(graph: Any, name: str) -> str:
    """The tensor read by the node that produces `name`."""
    return next(node.inputs[0] for node in graph.nodes if node.name == name)


def _Sum(torch: Any) -> Any:  # noqa: N802
    class Sum(torch.nn.Module):
        def forward(self, *xs: Any) -> Any:
            y = xs[0] + xs[1]
            for x in xs[2:]:
                y = y + x
            return y
    return Sum()


def _Cat(torch: Any) -> Any:  # noqa: N802
    class Cat(torch.nn.Module):
        def forward(self, *xs: Any) -> Any:
            return torch.cat(xs, dim=1)
    return Cat()
