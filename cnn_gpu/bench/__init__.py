"""Benchmarks. `python -m cnn_gpu.bench.kernel_bandwidth` times the CUDA kernels."""
