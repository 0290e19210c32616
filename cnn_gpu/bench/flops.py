"""FLOPs of a model, counted from its layers' shapes (Layer.flops) through its graph.

Only the GEMM work counts: a multiply-add is 2 FLOPs, in convolutions and dense layers.
Bias adds, ReLU, pooling, batch norm and the loss are elementwise passes, < 1% of the
arithmetic of the seed network, and are left out (the usual convention, and the one that
makes "% of the GEMM ceiling" meaningful).

Per layer, with F = 2 * (multiply-adds of the forward):
    forward            F
    backward, weights  F      (dW = X^T dY, the same multiply-adds)
    backward, input    F      (dX = dY W^T), except where no parameter lies upstream of the
                              layer's input: a model's backward never computes those input
                              gradients (nor does PyTorch: the input needs no grad)
so a training step is 3F per layer less the first layer's input gradient -- a little under 3x.
"""
from __future__ import annotations

from ..layers import Layer, Shape
from ..model import Graph


def layer_flops(model: Layer, input_shape: Shape) -> list[dict]:
    """Per leaf layer, in order: its path and repr, output shape, forward FLOPs per image (0 for
    layers without a GEMM), and whether its input gradient is computed in training."""
    rows: list[dict] = []
    _walk(model, [tuple(input_shape)], "", [False], rows)
    return rows


def model_flops(model: Layer, input_shape: Shape) -> dict[str, int]:
    """{'forward': FLOPs per image of an inference, 'training': of a training step (fwd + bwd)}."""
    rows = layer_flops(model, input_shape)
    forward = sum(r["forward_flops"] for r in rows)
    input_grads = sum(r["forward_flops"] for r in rows if r["input_gradient"])
    return {"forward": forward, "training": 2 * forward + input_grads}


def _walk(layer: Layer, input_shapes: list[Shape], path: str, upstream: list[bool],
          rows: list[dict]) -> tuple[bool, Shape]:
    """Append the rows of `layer`, given its inputs' shapes and whether a parameter lies upstream of
    each; return that flag for its output, and its output's shape."""
    if not isinstance(layer, Graph):
        out = tuple(layer.output_shape(*input_shapes))
        rows.append({"layer": f"{path} {layer!r}".strip(), "output_shape": out,
                     "forward_flops": layer.flops(*input_shapes), "input_gradient": any(upstream)})
        return any(upstream) or bool(layer.params), out
    shapes = dict(zip(layer.input_names, input_shapes))
    flags = dict(zip(layer.input_names, upstream))
    for node in layer.nodes:
        flags[node.name], shapes[node.name] = _walk(
            node.layer, [shapes[i] for i in node.inputs], f"{path}.{node.name}" if path else node.name,
            [flags[i] for i in node.inputs], rows)
    return flags[layer.output_name], shapes[layer.output_name]
