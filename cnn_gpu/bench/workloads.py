"""One benchmark step of each configuration, as a zero-argument function, for us and for PyTorch.

A configuration is (implementation, network, batch size, mode, device):
    mode "train": forward, softmax cross-entropy, backward, SGD-with-momentum update
    mode "infer": eval-mode forward only
Networks (NETS): the seed CNN with and without batch norm, and the zoo's resnet20 and depthwise
mobilenet, all on 28x28x1 images (Fashion-MNIST's). Inputs are standard-normal float32 images
(N, 28, 28, 1) and uniform labels in [0, 10). PyTorch runs the seed network as a hand-written
nn.Sequential, and the zoo's networks as cnn_gpu.bench.reference.to_torch builds them, from our
weights (so both sides start from the same loss).
The functions return nothing and do not synchronize the GPU; the caller does.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..backend import module_for
from ..functional import softmax_cross_entropy
from ..layers import Layer
from ..models import build
from ..optim import SGD

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LR, MOMENTUM = 0.01, 0.9
# benchmark name -> (zoo model, batch norm)
NETS: dict[str, tuple[str, bool]] = {"seed": ("seed_cnn", False), "seed_bn": ("seed_cnn", True),
                                     "resnet20": ("resnet20", True), "mobilenet": ("mobilenet", True)}


def network(net: str) -> Layer:
    """Our model of a benchmark network (seeded: the same weights every time)."""
    name, batch_norm = NETS[net]
    return build(name, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, batch_norm=batch_norm, seed=0)


def random_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (N, 28, 28, 1) float32 standard normal, labels (N,) int64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *INPUT_SHAPE), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, batch)


def ours(net: str, batch: int, mode: str, backend: str = "numpy") -> Callable[[], None]:
    """A step of our network on 'numpy' or 'cupy'."""
    xp = module_for(backend)
    model = network(net).to("gpu" if backend == "cupy" else "cpu")
    x, labels = (xp.asarray(a) for a in random_batch(batch))
    if mode == "infer":
        model.eval()
        model.forward(x[:2])  # compiles the CPU kernels (cnn_gpu.cpu) once, outside what is measured
        return lambda: model.forward(x)
    _, dlogits = softmax_cross_entropy(model.forward(x[:2]), labels[:2])  # likewise, on 2 images
    model.backward(dlogits)
    model.zero_grad()
    opt = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> None:
        _, dlogits = softmax_cross_entropy(model.forward(x), labels)
        model.backward(dlogits)
        opt.step()
        opt.zero_grad()
    return step


def torch_network(torch: Any, net: str) -> Any:
    """The same network in PyTorch (NCHW)."""
    name, batch_norm = NETS[net]
    if name == "seed_cnn":
        from .reference import torch_seed_cnn  # noqa: PLC0415
        return torch_seed_cnn(torch, batch_norm, NUM_CLASSES)
    from .reference import to_torch  # noqa: PLC0415
    return to_torch(network(net), INPUT_SHAPE)


def torch_step(torch: Any, net: str, batch: int, mode: str, device: str = "cpu",
               channels_last: bool = False) -> Callable[[], None]:
    """The same step in PyTorch (NCHW, or channels_last memory format)."""
    model = torch_network(torch, net).to(device)
    xn, ln = random_batch(batch)
    x = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy()).to(device)  # (N, 1, 28, 28)
    labels = torch.from_numpy(ln).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()
        opt.step()
    return step
