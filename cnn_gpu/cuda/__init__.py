"""CUDA kernels for the cupy backend, loaded from the .cu files in kernels/.

Each module pairs a forward with its backward and takes/returns CuPy arrays:

- `cnn_gpu.cuda.maxpool`: `max_pool2d_forward`, `max_pool2d_backward`
- `cnn_gpu.cuda.batchnorm`: `channel_mean_var`, `channel_grad_sums`,
  `batch_norm_normalize`, `batch_norm_backward_dx`
- `cnn_gpu.cuda.conv`: the convolution's im2col and col2im (groups, dilation), the im2col strategy
  around them, and the depthwise kernels
- `cnn_gpu.cuda.elementwise`: fused one-launch updates for SGD and Adam (also with the per-step
  scalars read from the device), and ReLU's backward
- `cnn_gpu.cuda.gemm`: `matmul`, the one function the ops' GEMMs go through, and the cuBLAS handle
  of our own that lets a CUDA graph capture them; `set_tf32`
- `cnn_gpu.cuda.graph`: `capture` a step into a CUDA graph, with a memory pool of its own
- `cnn_gpu.cuda.rng`, `cnn_gpu.cuda.batches`: Philox4x32-10, and batches gathered, augmented and
  normalized on the device (kernels/batch.cu), for captured steps
- `cnn_gpu.cuda.device_optim`: SGD's and Adam's update with the per-step scalars on the device

Importing these modules does not import CuPy; the first call does (through
`cnn_gpu.backend.require_cupy()`), and compiles its kernel file once per process and dtype.
"""
