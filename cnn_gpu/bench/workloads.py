"""One benchmark step of each configuration, as a zero-argument function, for us and for PyTorch.

A configuration is (implementation, batch norm or not, batch size, mode, device):
    mode "train": forward, softmax cross-entropy, backward, SGD-with-momentum update
    mode "infer": eval-mode forward only
Inputs are standard-normal float32 images (N, 28, 28, 1) and uniform labels in [0, 10).
The functions return nothing and do not synchronize the GPU; the caller does.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..backend import module_for
from ..functional import softmax_cross_entropy
from ..models import seed_cnn
from ..optim import SGD

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LR, MOMENTUM = 0.01, 0.9


def random_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (N, 28, 28, 1) float32 standard normal, labels (N,) int64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *INPUT_SHAPE), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, batch)


def ours(batch_norm: bool, batch: int, mode: str, backend: str = "numpy") -> Callable[[], None]:
    """A step of seed_cnn on 'numpy' or 'cupy'."""
    xp = module_for(backend)
    model = seed_cnn(NUM_CLASSES, batch_norm=batch_norm).to("gpu" if backend == "cupy" else "cpu")
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


def torch_step(torch: Any, batch_norm: bool, batch: int, mode: str, device: str = "cpu",
               channels_last: bool = False) -> Callable[[], None]:
    """The same step in PyTorch (NCHW, or channels_last memory format)."""
    from .reference import torch_seed_cnn  # noqa: PLC0415
    model = torch_seed_cnn(torch, batch_norm, NUM_CLASSES).to(device)
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
