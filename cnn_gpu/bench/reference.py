"""The seed network in PyTorch, for the side-by-side columns. torch is imported lazily:
it is never a dependency of cnn_gpu, only of this comparison."""
from __future__ import annotations

from typing import Any


def torch_or_reason() -> tuple[Any, str | None]:
    """(the torch module, None), or (None, why not)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None, "torch not installed"
    return torch, None


def torch_seed_cnn(torch: Any, batch_norm: bool, num_classes: int = 10) -> Any:
    """models.seed_cnn's architecture in NCHW PyTorch layers (PyTorch's default init)."""
    nn = torch.nn
    bias = not batch_norm
    layers = [nn.Conv2d(1, 32, 3, bias=bias)] + ([nn.BatchNorm2d(32)] if batch_norm else [])
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, bias=bias)]
    layers += [nn.BatchNorm2d(64)] if batch_norm else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128, bias=bias)]
    layers += [nn.BatchNorm1d(128)] if batch_norm else []
    layers += [nn.ReLU(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)
