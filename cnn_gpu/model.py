"""Models: a Graph of layers over named tensors, and Sequential, the graph that is a chain.

A Graph is a directed acyclic graph whose nodes are (name, layer, input names); each node's
output is the tensor of its own name, the graph's inputs are tensors of their own names, and one
tensor is the output. Build one with symbolic tensors, in the spirit of Keras' functional API:

    x = Input((32, 32, 16))
    h = ReLU()(BatchNorm2D(16)(Conv2D(16, 16, 3, padding=1, bias=False)(x, name="conv1"), name="bn1"), name="relu1")
    h = BatchNorm2D(16)(Conv2D(16, 16, 3, padding=1, bias=False)(h, name="conv2"), name="bn2")
    block = Graph(x, ReLU()(Add()(h, x, name="add"), name="relu2"))    # a residual block

or from a list of nodes (Graph.from_nodes, which is what a JSON config or an ONNX file gives).
A graph is itself a Layer, so a block is a node of a larger model, and parameter names are paths
through the nodes ('stage1.block0.conv1.weight').

The forward runs the steps of a plan (cnn_gpu/plan.py) built once per mode and input shape from
the graph's structure: in order, each node's layer on the tensors it reads. The backward runs the
nodes in reverse order with each layer's own backward: a node receives the gradient of its
output, which is the sum of what every node reading that tensor sent back, added in one fixed
order (the reverse of the nodes' order), so the result is deterministic; and it passes on the
gradients of its inputs. Where a reader after the first in that order is a layer that adds into
its own input gradient (backward_adds_dx: a convolution), it is handed the sum so far and adds it
as it makes its dx: the same numbers, without a pass of their own. There is no tape: the layers'
forward/backward pairs are the autograd, and the graph's order is the schedule. Gradients are computed only where they lead to a
parameter (or to the graph's input, with need_dx=True).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .backend import backend_of
from .cpu import threads
from .layers import Layer, Shape, Tensor
from .plan import EVAL_SLICE_BYTES, Plan, build_plan, run_step


class Node(NamedTuple):
    """One node of a Graph: `layer` reads the tensors named `inputs` and writes the tensor `name`."""

    name: str
    layer: Layer
    inputs: tuple[str, ...]


def Input(shape: Shape | None = None, name: str = "input") -> Tensor:  # noqa: N802 - reads as a layer
    """A graph input: a symbolic tensor of one sample's shape (optional; given, every node's output
    shape is checked as the graph is built)."""
    return Tensor(None, (), name, None if shape is None else tuple(int(s) for s in shape))


class Graph(Layer):
    """A DAG of layers over named tensors (see the module docstring)."""

    def __init__(self, inputs: Tensor | Sequence[Tensor], output: Tensor) -> None:
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        nodes = _collect_nodes(inputs, output)
        self._setup(nodes, [t.name for t in inputs], _name_of(output, nodes))

    @classmethod
    def from_nodes(cls, nodes: Iterable[Node | tuple], inputs: Sequence[str], output: str) -> "Graph":
        """A graph from (name, layer, input names) nodes in any order; they are sorted so that each
        node comes after the nodes it reads (ties keep the given order)."""
        graph = cls.__new__(cls)
        graph._setup(_topological([Node(n, layer, tuple(i)) for n, layer, i in nodes], list(inputs), output),
                     list(inputs), output)
        return graph

    def _setup(self, nodes: list[Node], input_names: list[str], output: str) -> None:
        Layer.__init__(self)
        self.nodes, self.input_names, self.output_name = tuple(nodes), tuple(input_names), output
        self.num_inputs = len(input_names) if len(input_names) > 1 else 1
        _validate(self.nodes, self.input_names, output)
        for node in self.nodes:
            self.add_child(node.name, node.layer)
        # Which tensors need a gradient: those a parameter lies upstream of (the inputs' own
        # flag is need_dx, given to each backward).
        has_params = {node.name: bool(node.layer.parameters()) for node in self.nodes}
        self._upstream_params: dict[str, bool] = {name: False for name in self.input_names}
        for node in self.nodes:
            self._upstream_params[node.name] = has_params[node.name] or any(
                self._upstream_params[i] for i in node.inputs)
        self._plans: dict[tuple, Plan] = {}

    # ---- forward and backward ----------------------------------------------------------------

    def forward(self, *xs: Any) -> Any:
        """The output for inputs xs (one array per graph input). In eval mode the plan folds batch
        norms into the layer before them and, on the CPU, runs large batches in slices; the numbers
        are those of each layer's forward, up to rounding."""
        if len(xs) != len(self.input_names):
            raise ValueError(f"{self!r} takes {len(self.input_names)} input(s) {list(self.input_names)}, "
                             f"got {len(xs)}")
        plan = self.plan_for(xs)
        with threads.blas_held():  # the BLAS on one thread while the layers thread over parts
            if plan.slice_size is not None and len(xs[0]) > plan.slice_size:
                return self._forward_in_slices(plan, xs)
            return self._run(plan, xs)

    def _run(self, plan: Plan, xs: Sequence[Any]) -> Any:
        values = dict(zip(self.input_names, xs))
        for step in plan.steps:
            values[step.output] = run_step(step, plan.training, [values[name] for name in step.inputs])
            for name in step.frees:
                del values[name]
        return values[self.output_name]

    def _forward_in_slices(self, plan: Plan, xs: Sequence[Any]) -> Any:
        """Evaluation slice by slice of the batch: in eval mode each sample's output depends on that
        sample alone, and each slice's activations stay in cache from one layer to the next. On
        several threads (cnn_gpu.cpu.threads) the slices run side by side, each slice's layers on
        one thread: one handover per slice instead of one per part of every layer. The slices
        follow from the sizes alone, so any number of threads gives the same bits."""
        n = len(xs[0])
        size = -(-n // -(-n // plan.slice_size))  # as many slices as needed, of equal size
        outs = threads.for_each(threads.ranges(n, size), lambda part, _: self._run(plan, [x[part] for x in xs]))
        return np.concatenate(outs)

    def backward(self, dy: Any, need_dx: bool = False) -> Any:
        """Backpropagate dL/d(output): fills every parameter's .grad, and returns dL/d(input) (a
        tuple for several inputs) when need_dx; a model's own input needs none, so False is the
        default (a graph inside another graph is called with need_dx as its parent needs)."""
        with threads.blas_held():  # as in forward
            return self._backward(dy, need_dx)

    def _backward(self, dy: Any, need_dx: bool) -> Any:
        # A tensor needs its gradient when a parameter lies upstream of it, or the input does and
        # need_dx asks for the input's (every node descends from an input).
        needs = {name: need_dx for name in self.input_names}
        needs.update({node.name: self._upstream_params[node.name] or need_dx for node in self.nodes})
        grads: dict[str, Any] = {self.output_name: dy}
        owned: set[str] = set()  # gradients that are sums made here, safe to add into in place
        for node in reversed(self.nodes):
            grad = grads.pop(node.name, None)
            owned.discard(node.name)
            if grad is None or not needs[node.name]:
                node.layer._cache = None  # nothing upstream of this node wants a gradient
                continue
            want = [needs[name] for name in node.inputs]
            if want == [True] and node.inputs[0] in grads and node.layer.backward_adds_dx():
                # the input has a gradient from its other readers: the layer adds it to its dx as
                # it makes it (a convolution, chunk by chunk in cache), and the sum is a new array
                name = node.inputs[0]
                grads[name] = node.layer.backward(grad, need_dx=True, dx_plus=grads[name])
                owned.add(name)
                continue
            dxs = node.layer.backward(grad, need_dx=any(want))
            if not any(want):
                continue
            for name, dx, wanted in zip(node.inputs, dxs if len(node.inputs) > 1 else (dxs,), want):
                if not wanted:
                    continue
                if name not in grads:
                    grads[name] = dx
                elif name in owned:
                    grads[name] += dx
                else:  # the first gradient may be shared (Add sends dy to each input): add into a new array
                    grads[name] = grads[name] + dx
                    owned.add(name)
        if not need_dx:
            return None
        dxs = tuple(grads.get(name) for name in self.input_names)
        return dxs if len(dxs) > 1 else dxs[0]

    # ---- the plan ------------------------------------------------------------------------------

    def plan_for(self, xs: Sequence[Any]) -> Plan:
        """The plan for these inputs' mode, per-sample shapes and backend (built once, then reused)."""
        training = any(layer.training for _, layer in self.named_layers())
        shapes = tuple(tuple(int(s) for s in x.shape[1:]) for x in xs)
        on_cpu = backend_of(xs[0]) == "numpy"
        key = (training, shapes, on_cpu, xs[0].dtype.itemsize)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(self, training, shapes, on_cpu, xs[0].dtype.itemsize,
                                                 EVAL_SLICE_BYTES)
        return plan

    # ---- shapes and description ------------------------------------------------------------------

    def tensor_shapes(self, *input_shapes: Shape) -> dict[str, Shape]:
        """Every tensor's per-sample shape, for per-sample input shapes; a ValueError naming the node
        and the shapes it was given when a layer cannot take them."""
        if len(input_shapes) != len(self.input_names):
            raise ValueError(f"{self!r} takes {len(self.input_names)} input shape(s), got {len(input_shapes)}")
        shapes = {name: tuple(s) for name, s in zip(self.input_names, input_shapes)}
        for node in self.nodes:
            given = [shapes[i] for i in node.inputs]
            try:
                shapes[node.name] = tuple(node.layer.output_shape(*given))
            except ValueError as exc:
                reads = ", ".join(f"{i!r} {shapes[i]}" for i in node.inputs)
                raise ValueError(f"node {node.name!r} ({node.layer!r}) reading {reads}: {exc}") from None
        return shapes

    def output_shape(self, *input_shapes: Shape) -> Shape:
        return self.tensor_shapes(*input_shapes)[self.output_name]

    def flops(self, *input_shapes: Shape) -> int:
        shapes = self.tensor_shapes(*input_shapes)
        return sum(node.layer.flops(*(shapes[i] for i in node.inputs)) for node in self.nodes)

    def summary_rows(self, input_shapes: Sequence[Shape], path: str) -> tuple[list[tuple[str, str, str]], Shape]:
        shapes = {name: tuple(s) for name, s in zip(self.input_names, input_shapes)}
        rows: list[tuple[str, str, str]] = []
        previous = self.input_names[0]
        for node in self.nodes:
            node_rows, shapes[node.name] = node.layer.summary_rows(
                [shapes[i] for i in node.inputs], f"{path}.{node.name}" if path else node.name)
            if node.inputs != (previous,):  # a node that does not read the one before it says what it reads
                label, shape, count = node_rows[0]
                node_rows[0] = (f"{label} <- {', '.join(node.inputs)}", shape, count)
            rows += node_rows
            previous = node.name
        return rows, shapes[self.output_name]

    def get_config(self) -> dict[str, Any]:
        from .config import layer_config  # noqa: PLC0415 - config imports this module
        return {"inputs": list(self.input_names), "output": self.output_name,
                "nodes": [{"name": n.name, "layer": layer_config(n.layer), "inputs": list(n.inputs)}
                          for n in self.nodes]}

    @classmethod
    def from_config(cls, args: dict[str, Any], build: Any, path: str) -> "Graph":
        """Rebuild from get_config()'s dict; build(config, path) makes each node's layer."""
        try:
            nodes = [(n["name"], build(n["layer"], f"{path}.{n['name']}" if path else n["name"]), n["inputs"])
                     for n in args["nodes"]]
            inputs, output = args["inputs"], args["output"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path or 'model'}: a Graph config needs 'inputs', 'output' and 'nodes' of "
                             f"'name', 'layer', 'inputs' ({type(exc).__name__}: {exc})") from None
        return cls.from_nodes(nodes, inputs, output)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.nodes)} nodes)"


class Sequential(Graph):
    """Layers applied in order: the graph that is a chain. Children are named '0', '1', ... unless
    (name, layer) pairs are given. forward(x) -> the last layer's output; backward(dy) fills every
    parameter's grad (and computes no input gradient for the first layer)."""

    def __init__(self, layers: Iterable[Layer | tuple[str, Layer]]) -> None:
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(layers)]
        if not named:
            raise ValueError("Sequential: needs at least one layer")
        nodes, previous = [], "input"
        for name, layer in named:
            nodes.append(Node(name, layer, (previous,)))
            previous = name
        self._setup(nodes, ["input"], previous)

    @property
    def layers(self) -> list[Layer]:
        return [node.layer for node in self.nodes]

    def get_config(self) -> dict[str, Any]:
        from .config import layer_config  # noqa: PLC0415 - config imports this module
        return {"layers": [{"name": n.name, "layer": layer_config(n.layer)} for n in self.nodes]}

    @classmethod
    def from_config(cls, args: dict[str, Any], build: Any, path: str) -> "Sequential":
        try:
            return cls([(item["name"], build(item["layer"], f"{path}.{item['name']}" if path else item["name"]))
                        for item in args["layers"]])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path or 'model'}: a Sequential config needs 'layers' of 'name' and 'layer' "
                             f"({type(exc).__name__}: {exc})") from None

    def __repr__(self) -> str:
        return "Sequential(\n" + "".join(f"  ({n.name}) {n.layer!r}\n" for n in self.nodes) + ")"


# ---- building and checking the node list ------------------------------------------------------------

def _collect_nodes(inputs: list[Tensor], output: Tensor) -> list[Node]:
    """The nodes between symbolic inputs and an output, in creation order (a topological order),
    with names given to unnamed nodes (the layer's type and a count: 'conv2d_0')."""
    for t in inputs:
        if not isinstance(t, Tensor) or t.layer is not None:
            raise TypeError(f"Graph inputs must be tensors from Input(), got {t!r}")
    if not isinstance(output, Tensor):
        raise TypeError(f"a Graph's output must be a symbolic Tensor, got {type(output).__name__}")
    seen: dict[int, Tensor] = {}
    stack = [output]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen[id(t)] = t
        if t.layer is None:
            if not any(t is i for i in inputs):
                raise ValueError(f"the output depends on input {t.name!r}, which is not among the Graph's "
                                 f"inputs {[i.name for i in inputs]}")
            continue
        stack.extend(t.inputs)
    ordered = sorted((t for t in seen.values() if t.layer is not None), key=lambda t: t.order)
    names: dict[int, str] = {id(t): t.name for t in inputs}
    counts: dict[str, int] = {}
    taken = {t.name for t in seen.values() if t.name}
    for t in ordered:
        name = t.name
        if name is None:
            base = _snake(type(t.layer).__name__)
            while name is None or name in taken:
                name = f"{base}_{counts.get(base, 0)}"
                counts[base] = counts.get(base, 0) + 1
            taken.add(name)
        names[id(t)] = name
    return [Node(names[id(t)], t.layer, tuple(names[id(i)] for i in t.inputs)) for t in ordered]


def _name_of(output: Tensor, nodes: list[Node]) -> str:
    if output.layer is None:
        raise ValueError("a Graph needs at least one layer between its input and its output")
    return next(node.name for node in nodes if node.layer is output.layer)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i and not name[i - 1].isupper() else c.lower()
                   for i, c in enumerate(name))


def _topological(nodes: list[Node], inputs: list[str], output: str) -> list[Node]:
    """The nodes in an order where each comes after the nodes it reads, as close to the given
    order as that allows; a ValueError names a missing tensor or the nodes on a cycle."""
    produced = {name for name in inputs}
    names = [node.name for node in nodes]
    known = set(names) | produced
    for node in nodes:
        for i in node.inputs:
            if i not in known:
                raise ValueError(f"node {node.name!r} reads {i!r}, which no node produces and which is not "
                                 f"a graph input (inputs: {inputs})")
    ordered, waiting = [], list(nodes)
    while waiting:  # the first node whose inputs exist, one at a time: a valid order is kept as it is
        k = next((k for k, node in enumerate(waiting) if all(i in produced for i in node.inputs)), None)
        if k is None:
            raise ValueError("the graph has a cycle through nodes " + ", ".join(repr(n.name) for n in waiting))
        node = waiting.pop(k)
        ordered.append(node)
        produced.add(node.name)
    return ordered


def _validate(nodes: Sequence[Node], inputs: Sequence[str], output: str) -> None:
    """Unique names; each layer in one node; every node on the way to the output; the output exists."""
    names = list(inputs) + [node.name for node in nodes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tensor names must be unique in a graph; repeated: {duplicates}")
    if len({id(node.layer) for node in nodes}) != len(nodes):
        shared = [node.name for node in nodes if sum(n.layer is node.layer for n in nodes) > 1]
        raise ValueError(f"a layer object may be one node only (its cache holds one call); nodes {shared} share one")
    for node in nodes:
        node.layer._check_input_count(len(node.inputs), node.name)
    if output not in names:
        raise ValueError(f"the graph's output {output!r} is neither a node nor an input")
    used = {output}
    for node in reversed(nodes):
        if node.name in used:
            used.update(node.inputs)
    unused = [node.name for node in nodes if node.name not in used]
    if unused:
        raise ValueError(f"nodes {unused} do not lead to the output {output!r}")
    missing = [name for name in inputs if name not in used]
    if missing:
        raise ValueError(f"graph inputs {missing} are read by no node on the way to the output")
