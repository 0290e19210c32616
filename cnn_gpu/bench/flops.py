"""FLOPs of a Sequential, counted from its layers' shapes.

Only the GEMM work counts: a multiply-add is 2 FLOPs, in convolutions and dense layers.
Bias adds, ReLU, pooling, batch norm and the loss are elementwise passes, < 1% of the
arithmetic of the seed network, and are left out (the usual convention, and the one that
makes "% of the GEMM ceiling" meaningful).

Per layer, with F = 2 * (multiply-adds of the forward):
    forward            F
    backward, weights  F      (dW = X^T dY, the same multiply-adds)
    backward, input    F      (dX = dY W^T), except for the first layer: Sequential.backward
                              never computes the input gradient of layer 0 (PyTorch does not
                              either, the input needs no grad)
so a training step is 3F per layer less the first layer's input gradient -- a little under 3x.
"""
from __future__ import annotations

from ..layers import Conv2D, Dense
from ..model import Sequential


def layer_flops(model: Sequential, input_shape: tuple[int, ...]) -> list[dict]:
    """Per layer: name, output shape, forward FLOPs per image (0 for layers without a GEMM)."""
    rows, shape = [], tuple(input_shape)
    for layer in model.layers:
        out = layer.output_shape(shape)
        if isinstance(layer, Conv2D):
            kh, kw = layer.kernel_size
            oh, ow, o = out
            fwd = 2 * oh * ow * kh * kw * layer.in_channels * o
        elif isinstance(layer, Dense):
            fwd = 2 * layer.in_features * layer.out_features
        else:
            fwd = 0
        rows.append({"layer": repr(layer), "output_shape": out, "forward_flops": fwd})
        shape = out
    return rows


def model_flops(model: Sequential, input_shape: tuple[int, ...]) -> dict[str, int]:
    """{'forward': FLOPs per image of an inference, 'training': of a training step (fwd + bwd)}."""
    per_layer = [r["forward_flops"] for r in layer_flops(model, input_shape)]
    forward = sum(per_layer)
    first = per_layer[0] if per_layer else 0  # layer 0 computes no input gradient
    return {"forward": forward, "training": 3 * forward - first}
