"""Stateless ops, each a forward/backward pair: the forward returns (out, cache), the backward takes (dout, cache).

Layout is channels-last: images (N, H, W, C), conv filters (KH, KW, C_in/groups, C_out),
dense weights (in, out). Every op keeps the input dtype and never modifies its inputs.
"""
from .activation import (clip_backward, clip_forward, dropout_backward, dropout_forward, hard_sigmoid_backward,
                         hard_sigmoid_forward, hard_swish_backward, hard_swish_forward, leaky_relu_backward,
                         leaky_relu_forward, relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
                         silu_backward, silu_forward, tanh_backward, tanh_forward)
from .batchnorm import batch_norm_backward, batch_norm_forward
from .conv import col2im, conv2d_backward, conv2d_forward, im2col
from .linear import linear_backward, linear_forward
from .loss import log_softmax, softmax, softmax_backward, softmax_cross_entropy, softmax_forward
from .merge import add_backward, add_forward, concat_backward, concat_forward
from .pool import (avg_pool2d_backward, avg_pool2d_forward, global_avg_pool2d_backward, global_avg_pool2d_forward,
                   max_pool2d, max_pool2d_backward, max_pool2d_forward)
from .shape import flatten_backward, flatten_forward

__all__ = [
    "add_backward", "add_forward", "avg_pool2d_backward", "avg_pool2d_forward", "batch_norm_backward",
    "batch_norm_forward", "clip_backward", "clip_forward", "col2im", "concat_backward", "concat_forward",
    "conv2d_backward", "conv2d_forward", "dropout_backward", "dropout_forward", "flatten_backward",
    "flatten_forward", "global_avg_pool2d_backward", "global_avg_pool2d_forward", "hard_sigmoid_backward",
    "hard_sigmoid_forward", "hard_swish_backward", "hard_swish_forward", "im2col", "leaky_relu_backward",
    "leaky_relu_forward", "linear_backward", "linear_forward", "log_softmax", "max_pool2d", "max_pool2d_backward",
    "max_pool2d_forward", "relu_backward", "relu_forward", "sigmoid_backward", "sigmoid_forward", "silu_backward",
    "silu_forward", "softmax", "softmax_backward", "softmax_cross_entropy", "softmax_forward", "tanh_backward",
    "tanh_forward",
]
