"""The benchmark: our seed network against the same network in PyTorch, on this machine.

    python -m cnn_gpu.bench                      # CPU, batch 64 and 256, table + bench.json
    python -m cnn_gpu.bench --breakdown          # also time each layer's forward and backward
    python -m cnn_gpu.bench --backend cupy       # the GPU (fair.py): FP32 and TF32 tables, eager and
                                                 #   CUDA-graph captured steps on both sides, batch 64, 256, 1024
    python -m cnn_gpu.bench.epoch                # a captured epoch of the seed network, validation included
    python -m cnn_gpu.bench.kernel_bandwidth     # the CUDA kernels against copy bandwidth
    cnn-gpu bench --ranks 2                      # 1 rank against 2 ranks: images/s, gradient averaging

See run.py for what each column means and how it is measured; BENCHMARKS.md keeps results.
"""
from .run import main

__all__ = ["main"]
