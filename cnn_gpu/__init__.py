"""cnn_gpu: convolutional networks from scratch on NumPy (CPU) and CuPy (NVIDIA GPU)."""
__version__ = "0.1.0"
