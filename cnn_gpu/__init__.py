"""cnn_gpu: convolutional networks from scratch on NumPy (CPU) and CuPy (NVIDIA GPU)."""
__version__ = "0.2.0"

from . import functional
from .layers import (Add, AvgPool2D, BatchNorm1D, BatchNorm2D, Clip, Concat, Conv2D, Dense, Dropout, Flatten,
                     GlobalAvgPool2D, HardSigmoid, HardSwish, Identity, Layer, LeakyReLU, MaxPool2D, Parameter,
                     ReLU, ReLU6, Sigmoid, SiLU, Softmax, Tanh)
from .ema import WeightEMA
from .model import Graph, Input, Node, Sequential
from .models import MODELS, build, mobilenet, resnet20, seed_cnn, vgg
from .optim import SGD, Adam, CosineLR, StepLR, no_decay_parameters

__all__ = [
    "MODELS", "Adam", "Add", "AvgPool2D", "BatchNorm1D", "BatchNorm2D", "Clip", "Concat", "Conv2D", "CosineLR",
    "Dense", "Dropout", "Flatten", "GlobalAvgPool2D", "Graph", "HardSigmoid", "HardSwish", "Identity", "Input",
    "Layer", "LeakyReLU", "MaxPool2D", "Node", "Parameter", "ReLU", "ReLU6", "SGD", "Sequential", "SiLU",
    "Sigmoid", "Softmax", "StepLR", "Tanh", "WeightEMA", "build", "functional", "mobilenet", "no_decay_parameters",
    "resnet20", "seed_cnn", "vgg",
]
