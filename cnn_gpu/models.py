"""Ready-made networks."""
from __future__ import annotations

import numpy as np

from .layers import BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .model import Sequential


def seed_cnn(num_classes: int = 10, batch_norm: bool = False, seed: int = 0,
             dtype: str = "float32", input_shape: tuple[int, int, int] = (28, 28, 1),
             dropout: float = 0.0) -> Sequential:
    """The seed's sample network for 28x28x1 images.

    conv 32 3x3 + ReLU, max-pool 2, conv 64 3x3 + ReLU, max-pool 2, dense 128 + ReLU,
    dense num_classes (the softmax is in the loss). With batch_norm=True a batch norm follows
    each conv and the dense 128 (before the ReLU), and the layers before it drop their bias,
    which the batch norm's beta replaces. dropout > 0 puts a Dropout(dropout) before each dense
    layer (a regularizer for longer training; 0 keeps the seed's network exactly).

    The layers run max-pool 2 BEFORE the ReLU after each conv (the seed writes conv, ReLU,
    pool): the same function, with the same gradients. ReLU is monotone, so
    relu(max(window)) == max(relu(window)); backward, both orders send the gradient to the
    window's first maximum when that maximum is > 0 and send none when it is <= 0 (an
    all-negative window gives zero gradient either way). Pooling first lets ReLU touch 4x
    fewer elements, forward and backward. Parameter layers keep their indices, so the
    state_dict keys are those of the seed order. tests/test_model.py checks the equivalence.
    """
    h, w, c = input_shape
    rng = np.random.default_rng(seed)
    bias = not batch_norm
    flat = ((h - 2) // 2 - 2) // 2 * (((w - 2) // 2 - 2) // 2) * 64
    layers = [Conv2D(c, 32, 3, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm2D(32, dtype=dtype)] if batch_norm else []
    layers += [MaxPool2D(2), ReLU(), Conv2D(32, 64, 3, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm2D(64, dtype=dtype)] if batch_norm else []
    drop = [Dropout(dropout, seed=seed)] if dropout > 0 else []
    layers += [MaxPool2D(2), ReLU(), Flatten(), *drop, Dense(flat, 128, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm1D(128, dtype=dtype)] if batch_norm else []
    drop = [Dropout(dropout, seed=seed + 1)] if dropout > 0 else []
    layers += [ReLU(), *drop, Dense(128, num_classes, init="glorot", rng=rng, dtype=dtype)]
    return Sequential(layers)
