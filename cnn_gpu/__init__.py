"""cnn_gpu: convolutional networks from scratch on NumPy (CPU) and CuPy (NVIDIA GPU)."""
__version__ = "0.1.0"

from . import functional
from .layers import AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Parameter, ReLU
from .model import Sequential
from .models import seed_cnn
from .optim import SGD, Adam, CosineLR, StepLR, no_decay_parameters

__all__ = [
    "Adam", "AvgPool2D", "BatchNorm1D", "BatchNorm2D", "Conv2D", "CosineLR", "Dense", "Dropout", "Flatten",
    "MaxPool2D", "Parameter", "ReLU", "SGD", "Sequential", "StepLR", "functional", "no_decay_parameters",
    "seed_cnn",
]
