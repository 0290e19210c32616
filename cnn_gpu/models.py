"""The model zoo: ready-made networks for images of any size and channel count.

    MODELS                              # name -> builder
    model = build("resnet20", input_shape=(32, 32, 3), num_classes=10)

Every builder takes input_shape (H, W, C), num_classes, batch_norm, seed and dtype, and returns a
Sequential (whose stages may be Graphs). Weights are drawn from a generator seeded with `seed`, so
a model built twice with the same arguments starts from the same numbers on either backend.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .layers import (Add, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, Layer,
                     MaxPool2D, ReLU)
from .model import Graph, Input, Sequential

Shape3 = tuple[int, int, int]


def seed_cnn(num_classes: int = 10, batch_norm: bool = False, seed: int = 0,
             dtype: str = "float32", input_shape: Shape3 = (28, 28, 1),
             dropout: float = 0.0) -> Sequential:
    """The seed's sample network, for 28x28x1 images (any size that survives the two pools).

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
    layers: list[Layer] = [Conv2D(c, 32, 3, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm2D(32, dtype=dtype)] if batch_norm else []
    layers += [MaxPool2D(2), ReLU(), Conv2D(32, 64, 3, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm2D(64, dtype=dtype)] if batch_norm else []
    drop = [Dropout(dropout, seed=seed)] if dropout > 0 else []
    layers += [MaxPool2D(2), ReLU(), Flatten(), *drop, Dense(flat, 128, bias=bias, init="he", rng=rng, dtype=dtype)]
    layers += [BatchNorm1D(128, dtype=dtype)] if batch_norm else []
    drop = [Dropout(dropout, seed=seed + 1)] if dropout > 0 else []
    layers += [ReLU(), *drop, Dense(128, num_classes, init="glorot", rng=rng, dtype=dtype)]
    return Sequential(layers)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, batch_norm: bool, rng: np.random.Generator,
                  dtype: str, groups: int = 1, relu: bool = True) -> list[tuple[str, Layer]]:
    """conv [+ batch norm] [+ ReLU] as named layers; the conv keeps its bias only without batch norm."""
    layers: list[tuple[str, Layer]] = [("conv", Conv2D(cin, cout, kernel, stride, padding=kernel // 2, groups=groups,
                                                       bias=not batch_norm, rng=rng, dtype=dtype))]
    layers += [("bn", BatchNorm2D(cout, dtype=dtype))] if batch_norm else []
    layers += [("relu", ReLU())] if relu else []
    return layers


def basic_block(cin: int, cout: int, stride: int, batch_norm: bool, rng: np.random.Generator,
                dtype: str) -> Graph:
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convs.

    The shortcut is x itself, or where the block changes the shape (stride 2, more channels) a
    1x1 convolution with batch norm (option B of He et al. 2016; their CIFAR nets pad x with zero
    channels instead, option A, which has no parameters).
    """
    x = Input(name="input")
    h = x
    for i, s in ((1, stride), (2, 1)):
        h = Conv2D(cin if i == 1 else cout, cout, 3, s, padding=1, bias=not batch_norm, rng=rng,
                   dtype=dtype)(h, name=f"conv{i}")
        if batch_norm:
            h = BatchNorm2D(cout, dtype=dtype)(h, name=f"bn{i}")
        if i == 1:
            h = ReLU()(h, name="relu1")
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = Sequential(_conv_bn_relu(cin, cout, 1, stride, batch_norm, rng, dtype, relu=False))(
            x, name="shortcut")
    return Graph(x, ReLU()(Add()(h, shortcut, name="add"), name="relu2"))


def resnet20(num_classes: int = 10, batch_norm: bool = True, seed: int = 0, dtype: str = "float32",
             input_shape: Shape3 = (32, 32, 3), width: int = 16) -> Sequential:
    """The CIFAR ResNet-20 of He et al. 2016 (section 4.2): a 3x3 conv of `width` channels, three
    stages of three basic blocks with width, 2*width and 4*width channels (the second and third
    halve the image), global average pooling and a dense layer: 6*3+2 = 20 weighted layers.
    Any input size and channel count (28x28x1 Fashion-MNIST: 28 -> 14 -> 7)."""
    rng = np.random.default_rng(seed)
    c = input_shape[2]
    layers: list[tuple[str, Layer]] = [(name, layer) for name, layer in
                                       _conv_bn_relu(c, width, 3, 1, batch_norm, rng, dtype)]
    cin = width
    for stage in range(3):
        cout = width * 2 ** stage
        blocks = [(f"block{b}", basic_block(cin if b == 0 else cout, cout, 2 if (stage and b == 0) else 1,
                                            batch_norm, rng, dtype)) for b in range(3)]
        layers.append((f"stage{stage + 1}", Sequential(blocks)))
        cin = cout
    layers += [("pool", GlobalAvgPool2D()), ("fc", Dense(cin, num_classes, init="glorot", rng=rng, dtype=dtype))]
    return Sequential(layers)


def mobilenet(num_classes: int = 10, batch_norm: bool = True, seed: int = 0, dtype: str = "float32",
              input_shape: Shape3 = (28, 28, 1),
              stages: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))) -> Sequential:
    """A depthwise-separable network in the style of MobileNet (Howard et al. 2017), sized for small
    images: a 3x3 conv of 32 channels, then per (channels, stride) of `stages` a 3x3 depthwise conv
    (one filter per channel, groups = channels) and a 1x1 pointwise conv to the new channel count,
    each with batch norm and ReLU; global average pooling and a dense layer."""
    rng = np.random.default_rng(seed)
    layers: list[tuple[str, Layer]] = [("stem", Sequential(_conv_bn_relu(input_shape[2], 32, 3, 1, batch_norm,
                                                                         rng, dtype)))]
    cin = 32
    for i, (cout, stride) in enumerate(stages):
        block = _conv_bn_relu(cin, cin, 3, stride, batch_norm, rng, dtype, groups=cin)
        block = [(f"dw_{name}", layer) for name, layer in block]
        block += [(f"pw_{name}", layer) for name, layer in _conv_bn_relu(cin, cout, 1, 1, batch_norm, rng, dtype)]
        layers.append((f"block{i}", Sequential(block)))
        cin = cout
    layers += [("pool", GlobalAvgPool2D()), ("fc", Dense(cin, num_classes, init="glorot", rng=rng, dtype=dtype))]
    return Sequential(layers)


def vgg(num_classes: int = 10, batch_norm: bool = True, seed: int = 0, dtype: str = "float32",
        input_shape: Shape3 = (28, 28, 1), widths: tuple[int, ...] = (32, 64, 128), hidden: int = 256,
        dropout: float = 0.0) -> Sequential:
    """A VGG-style network (Simonyan & Zisserman 2015): per width, two 3x3 convs [with batch norm]
    and ReLU, then a 2x2 max pool; then a dense layer of `hidden` units with ReLU [and dropout] and
    the classifier."""
    rng = np.random.default_rng(seed)
    h, w, cin = input_shape
    layers: list[tuple[str, Layer]] = []
    for i, width in enumerate(widths):
        block = [(f"{name}{j}", layer) for j in (1, 2)
                 for name, layer in _conv_bn_relu(cin if j == 1 else width, width, 3, 1, batch_norm, rng, dtype)]
        layers.append((f"block{i}", Sequential(block + [("pool", MaxPool2D(2))])))
        cin, h, w = width, h // 2, w // 2
    layers += [("flatten", Flatten()),
               ("fc1", Dense(h * w * cin, hidden, bias=not batch_norm, rng=rng, dtype=dtype))]
    layers += [("bn", BatchNorm1D(hidden, dtype=dtype))] if batch_norm else []
    layers += [("relu", ReLU())] + ([("dropout", Dropout(dropout, seed=seed))] if dropout > 0 else [])
    layers += [("fc2", Dense(hidden, num_classes, init="glorot", rng=rng, dtype=dtype))]
    return Sequential(layers)


# name -> builder, each taking input_shape, num_classes, batch_norm, seed and dtype.
MODELS: dict[str, Callable[..., Sequential]] = {
    "seed_cnn": seed_cnn,
    "resnet20": resnet20,
    "mobilenet": mobilenet,
    "vgg": vgg,
}
# Whether each builder uses batch norm when not told.
DEFAULT_BATCH_NORM = {"seed_cnn": False, "resnet20": True, "mobilenet": True, "vgg": True}


def build(name: str, **kwargs: object) -> Sequential:
    """MODELS[name](**kwargs), with a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


DESCRIPTIONS = {
    "seed_cnn": "the seed's network: 2 convs, 2 max pools, 2 dense layers",
    "resnet20": "He et al.'s CIFAR ResNet-20: 3 stages of 3 residual blocks, global average pool",
    "mobilenet": "depthwise-separable convs in the MobileNet style, global average pool",
    "vgg": "VGG-style: 3 blocks of two 3x3 convs and a max pool, 2 dense layers",
}


def describe(name: str) -> str:
    """One line on what the model is, for `cnn-gpu models`."""
    return DESCRIPTIONS[name]
