"""A model that is a graph: a small residual network built with symbolic tensors, trained with
fit() on Fashion-MNIST, written to JSON, rebuilt from it, and exported to ONNX.

    python examples/graph_model.py        # about a minute on a laptop CPU (3000 training images)

A block reads its input twice (the convolutions and the shortcut); the backward adds the two
gradients of that tensor, in a fixed order. Every layer is an ordinary forward/backward pair.
"""
import numpy as np

from cnn_gpu import (SGD, Add, BatchNorm2D, Conv2D, CosineLR, Dense, GlobalAvgPool2D, Graph, Input, ReLU, Sequential,
                     no_decay_parameters)
from cnn_gpu.config import from_json, to_json
from cnn_gpu.data import augmentation_for, load_dataset, train_val_split
from cnn_gpu.training import fit

rng = np.random.default_rng(0)


def residual_block(channels: int) -> Graph:
    """relu(bn(conv(relu(bn(conv(x))))) + x): the basic block of a ResNet."""
    x = Input()
    h = ReLU()(BatchNorm2D(channels)(Conv2D(channels, channels, 3, padding=1, bias=False, rng=rng)(x, name="conv1"),
                                     name="bn1"), name="relu1")
    h = BatchNorm2D(channels)(Conv2D(channels, channels, 3, padding=1, bias=False, rng=rng)(h, name="conv2"),
                              name="bn2")
    return Graph(x, ReLU()(Add()(h, x, name="add"), name="relu2"))


model = Sequential([
    ("stem", Conv2D(1, 16, 3, padding=1, rng=rng)), ("relu", ReLU()),
    ("block1", residual_block(16)), ("down", Conv2D(16, 32, 3, stride=2, padding=1, rng=rng)),
    ("block2", residual_block(32)), ("pool", GlobalAvgPool2D()), ("fc", Dense(32, 10, init="glorot", rng=rng)),
])
print(model.summary((28, 28, 1)))  # names are paths: block1.conv1, block2.add, ...

train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
x, y, val_x, val_y = train_val_split(train.images[:3500], train.labels[:3500], val_size=500)
opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, no_decay=no_decay_parameters(model))
result = fit(model, opt, (x, y), epochs=3, batch_size=64, schedule=CosineLR(opt, 3), val_data=(val_x, val_y),
             test_data=(test.images[:2000], test.labels[:2000]), augment=augmentation_for("fashion-mnist"))

again = from_json(to_json(model))  # the architecture as JSON (no pickle), rebuilt with fresh weights
again.load_state_dict(model.state_dict())
model.eval(), again.eval()
batch = ((test.images[:8] / 255.0 - 0.286) / 0.353).astype(np.float32)
assert np.array_equal(model.forward(batch), again.forward(batch))
try:
    from cnn_gpu import onnx as cnn_onnx
    cnn_onnx.export(model, "graph_model.onnx", input_shape=(28, 28, 1))
    print("wrote graph_model.onnx")
except ImportError as exc:  # the [onnx] extra is not installed
    print(f"no ONNX export: {exc}")
