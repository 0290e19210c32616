"""Stateless ops, each a forward/backward pair: the forward returns (out, cache), the backward takes (dout, cache).

Layout is channels-last: images (N, H, W, C), conv filters (KH, KW, C_in, C_out),
dense weights (in, out). Every op keeps the input dtype and never modifies its inputs.
"""
from .activation import dropout_backward, dropout_forward, relu_backward, relu_forward
from .batchnorm import batch_norm_backward, batch_norm_forward
from .conv import col2im, conv2d_backward, conv2d_forward, im2col
from .linear import linear_backward, linear_forward
from .loss import log_softmax, softmax, softmax_cross_entropy
from .pool import (avg_pool2d_backward, avg_pool2d_forward, global_avg_pool2d_backward, global_avg_pool2d_forward,
                   max_pool2d, max_pool2d_backward, max_pool2d_forward)
from .shape import flatten_backward, flatten_forward

__all__ = [
    "avg_pool2d_backward", "avg_pool2d_forward", "batch_norm_backward", "batch_norm_forward",
    "col2im", "conv2d_backward", "conv2d_forward", "dropout_backward", "dropout_forward",
    "flatten_backward", "flatten_forward", "global_avg_pool2d_backward", "global_avg_pool2d_forward",
    "im2col", "linear_backward", "linear_forward",
    "log_softmax", "max_pool2d", "max_pool2d_backward", "max_pool2d_forward", "relu_backward", "relu_forward",
    "softmax", "softmax_cross_entropy",
]
