"""CUDA kernels for the cupy backend, loaded from the .cu files in kernels/.

Each module pairs a forward with its backward and takes/returns CuPy arrays:

- `cnn_gpu.cuda.maxpool`: `max_pool2d_forward`, `max_pool2d_backward`
- `cnn_gpu.cuda.batchnorm`: `channel_mean_var`, `channel_grad_sums`,
  `batch_norm_normalize`, `batch_norm_backward_dx`
- `cnn_gpu.cuda.conv`: the convolution's col2im gather (groups, dilation) and the depthwise kernels
- `cnn_gpu.cuda.elementwise`: fused one-launch updates for SGD and Adam, and ReLU's backward

Importing these modules does not import CuPy; the first call does (through
`cnn_gpu.backend.require_cupy()`), and compiles its kernel file once per process and dtype.
"""
