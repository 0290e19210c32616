"""What a Graph's forward runs: a plan, built once per mode and input shape from the graph's structure.

Some of the fastest shortcuts depend on how layers are connected, not on any one layer. Each is
found here, from the nodes and the layers' capabilities (the methods of cnn_gpu.layers.Layer that
a layer overrides), so every model gets it wherever its structure allows, Sequential or Graph:

- fold (evaluation): a layer in eval mode that is a per-channel affine map (batch norm:
  affine_channels) whose only input is the output of a layer that can absorb one (a convolution
  or a dense layer with as many outputs: absorbs_affine) and that nothing else reads, runs as
  that layer with scaled weights and a shifted bias (infer_folded), costing no pass of its own;
- sum (training): a two-input sum (is_sum: a residual Add) that is the only reader of a layer's
  output, where that layer can add a tensor to its output in its own pass (absorbs_add: a batch
  norm in training, while it normalizes), runs as that layer with the sum's other input as a
  second one, when that input is computed before the layer runs; the sum is told so
  (sum_computed), and its backward hands the gradient on to both inputs as after its own forward.
  An activation after the sum is then the layer's too (below), but always with its own backward:
  the other input's gradient needs the activation's derivative as much as the layer's does;
- activation (training and evaluation): an elementwise activation layer (activation(): 'relu')
  whose only input is the output of a layer that can apply it in its own pass (absorbs_activation:
  a convolution, in its GEMM's chunks while they are in cache; a residual Add, in the same loop as
  the sum; a batch norm, in its normalize) and that nothing else reads, runs as that layer with
  activation=... . In training, the activation layer is handed the output (keep_output), so its
  backward runs as it would after its own forward; or, where the layer's backward applies the
  activation's derivative as it reads dy (absorbs_activation_gradient: batch norm), the
  activation's backward passes dy on (pass_gradient). Either way the training step's numbers are
  the same, bit for bit: the same maximum of the same values, the same select of the same dy;
- crop (training and evaluation): a layer that can compute the top-left part of its output
  (computes_part: an unpadded convolution) whose output only one layer reads, and that layer
  only in part (input_extent: a pool whose windows stop short of the edge, as a 2x2 pool of an
  11 x 11 map reads 10 x 10), computes only that part;
- slices (evaluation on the CPU): a batch whose largest activation exceeds EVAL_SLICE_BYTES runs
  in slices of equal size whose activations stay in cache from one layer to the next; every
  sample's output depends on that sample alone in eval mode, so the slices give the batch's.

Training keeps every layer's own forward (batch norm needs its batch statistics); evaluation runs
each layer's infer(), which keeps no cache. Both drop each tensor once its last reader has run
(in training the layers' caches keep what their backward needs; the plan's table of tensors need
not keep the rest, such as a batch norm's output that only its ReLU read).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from .layers import Layer, Shape

if TYPE_CHECKING:
    from .model import Graph

# Evaluation on the CPU runs a large batch in slices whose largest activation is about this size,
# so that each layer finds its input still in cache (a 2 MiB L2 holds it with room to spare).
EVAL_SLICE_BYTES = 1 << 23


class Step(NamedTuple):
    """Run `layer` (and the affine layer `folded` into it) on the tensors `inputs`, writing `output`."""

    output: str
    inputs: tuple[str, ...]
    layer: Layer
    folded: Layer | None = None  # evaluation: the batch norm whose node this step also computes
    summed: Layer | None = None  # training: the Add whose node this step also computes (inputs[1] is its other input)
    activation: Layer | None = None  # the activation layer whose node this step also computes
    options: dict[str, Any] = {}  # {"out_size": (rows, cols)} for a layer that computes part
    frees: tuple[str, ...] = ()  # tensors no later step reads, dropped after this one


class Plan(NamedTuple):
    training: bool
    steps: tuple[Step, ...]
    slice_size: int | None  # evaluation on the CPU: samples per slice; None: the batch runs whole


def run_step(step: Step, training: bool, xs: Sequence[Any]) -> Any:
    """One step on its input arrays: the layer's forward in training, else its inference form."""
    options = step.options
    if step.activation is not None:
        options = {**options, "activation": step.activation.activation()}
    if training:
        y = step.layer.forward(*xs, **options)
        if step.summed is not None:
            step.summed.sum_computed(2)
        if step.activation is not None and step.summed is None and step.layer.absorbs_activation_gradient():
            step.activation.pass_gradient()  # the layer's backward takes dy through the activation
        elif step.activation is not None:
            step.activation.keep_output(y)  # what its backward reads, as after its own forward
        return y
    if step.folded is not None:
        return step.layer.infer_folded(xs[0], *step.folded.eval_affine(), **options)
    return step.layer.infer(*xs, **options)


def build_plan(graph: "Graph", training: bool, input_shapes: Sequence[Shape], on_cpu: bool, itemsize: int,
               slice_bytes: int = EVAL_SLICE_BYTES) -> Plan:
    """The plan of `graph` for one mode, per-sample input shapes, backend and dtype size."""
    shapes = graph.tensor_shapes(*input_shapes)
    readers: dict[str, list[int]] = {name: [] for name in shapes}
    for k, node in enumerate(graph.nodes):
        for name in node.inputs:
            readers[name].append(k)
    nodes = graph.nodes
    made_by = {node.name: k for k, node in enumerate(nodes)}  # graph inputs are in none: there from the start

    def only_reader(name: str) -> int | None:
        """The one node reading tensor `name`, when exactly one does and it is not the graph's output."""
        ks = readers[name]
        return ks[0] if len(ks) == 1 and name != graph.output_name else None

    steps: list[Step] = []
    skip: set[int] = set()
    for k, node in enumerate(nodes):
        if k in skip:
            continue
        step = Step(node.name, node.inputs, node.layer)
        reader = only_reader(node.name)
        if not training and reader is not None:
            after = nodes[reader].layer
            channels = after.affine_channels()
            if channels is not None and node.layer.absorbs_affine(channels):
                step = step._replace(output=nodes[reader].name, folded=after)
                skip.add(reader)
        reader = only_reader(step.output)
        if reader is not None and nodes[reader].layer.is_sum() and len(nodes[reader].inputs) == 2 \
                and step.layer.absorbs_add(training):
            other = next((n for n in nodes[reader].inputs if n != step.output), None)  # None: Add(t, t)
            if other is not None and made_by.get(other, -1) < k:
                step = step._replace(output=nodes[reader].name, inputs=(*step.inputs, other),
                                     summed=nodes[reader].layer)
                skip.add(reader)
        reader = only_reader(step.output)
        if reader is not None:
            after = nodes[reader].layer
            kind = after.activation()
            if kind is not None and step.layer.absorbs_activation(kind, training):
                step = step._replace(output=nodes[reader].name, activation=after)
                skip.add(reader)
        reader = only_reader(step.output)
        if reader is not None and step.layer.computes_part():
            extent = nodes[reader].layer.input_extent(shapes[step.output])
            if extent is not None:
                step = step._replace(options={"out_size": extent})
        steps.append(step)

    steps = _with_frees(steps, graph.output_name)
    slice_size = None
    if not training and on_cpu:
        largest = max(int(np.prod(s)) for s in shapes.values()) * itemsize
        slice_size = max(1, slice_bytes // max(largest, 1))
    return Plan(training, tuple(steps), slice_size)


def _with_frees(steps: list[Step], output: str) -> list[Step]:
    """Each step marked with the tensors whose last reader it is (never the output)."""
    last_read: dict[str, int] = {}
    for k, step in enumerate(steps):
        for name in step.inputs:
            last_read[name] = k
    frees: dict[int, list[str]] = {}
    for name, k in last_read.items():
        if name != output:
            frees.setdefault(k, []).append(name)
    return [step._replace(frees=tuple(frees.get(k, ()))) for k, step in enumerate(steps)]
