"""Layers: thin holders of parameters that call one functional op each way, and the base class
through which layers compose into models.

A layer keeps
    params    name -> Parameter (a trained array: .data and its .grad)
    buffers   name -> array (state that is not trained: batch norm's running statistics)
    children  name -> Layer (the layers it is made of, for a model or a residual block)
and everything that walks a model recurses through `children`: parameters, state_dict and
load_state_dict (keys are paths such as 'stage2.block0.conv1.weight'), train/eval, .to(device)
and summary(). `forward` keeps what `backward` needs in self._cache; `backward(dy, need_dx)`
returns dL/dx (None when need_dx is False) and overwrites each parameter's `.grad` (gradients
are not accumulated).

Calling a layer on arrays runs its forward; calling it on symbolic Tensors (from
cnn_gpu.model.Input) records a node of a graph under construction, as in Keras' functional API:

    x = Input((28, 28, 1))
    y = ReLU()(Conv2D(1, 16, 3, padding=1)(x, name="conv"), name="relu")
    model = Graph(x, y)

Every layer can say how to rebuild it: get_config() gives its constructor's arguments as JSON
values (cnn_gpu.config writes whole models that way).
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from . import cpu
from . import functional as F
from .backend import backend_of, get_array_module, to_device, to_numpy
from .geometry import Window, check_pool_padding, check_rank, pair
from .init import init_weight
from .npz import load_npz, save_npz_atomic

DEVICE_ALIASES = {"cpu": "numpy", "numpy": "numpy", "gpu": "cupy", "cuda": "cupy", "cupy": "cupy"}
Shape = tuple[int, ...]  # one sample's shape, without the batch axis: (H, W, C) or (features,)


class Parameter:
    """A trained array and its gradient, on the same backend. Optimizers hold these,
    so moving a model between devices (which replaces `.data`) keeps them valid."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.grad: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


class Tensor:
    """A symbolic tensor of a graph being built: a graph input (from cnn_gpu.model.Input) or the
    output of `layer(*tensors, name=...)`. `shape` is one sample's shape when it is known."""

    _created = itertools.count()  # creation order: a tensor is always made after its inputs

    def __init__(self, layer: "Layer | None", inputs: tuple["Tensor", ...], name: str | None,
                 shape: Shape | None) -> None:
        self.layer, self.inputs, self.name, self.shape = layer, inputs, name, shape
        self.order = next(Tensor._created)

    def __repr__(self) -> str:
        what = "input" if self.layer is None else repr(self.layer)
        return f"Tensor({self.name or '?'}: {what}, shape={self.shape})"


class Layer:
    """Base class of every layer and model (see the module docstring)."""

    num_inputs: int | None = 1  # None: two or more (merge layers)

    def __init__(self) -> None:
        self.params: dict[str, Parameter] = {}
        self.buffers: dict[str, Any] = {}
        self.children: dict[str, Layer] = {}
        self.training = True
        self._cache: Any = None

    # ---- what each layer defines -------------------------------------------------------------

    def forward(self, *xs: Any) -> Any:
        raise NotImplementedError

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        raise NotImplementedError

    def infer(self, *xs: Any, **options: Any) -> Any:
        """The forward for evaluation, when nothing will backpropagate: keeps no cache, and a layer
        may take a shortcut that gives the same output (MaxPool2D skips its argmax)."""
        y = self.forward(*xs, **options)
        self._cache = None
        return y

    def output_shape(self, *input_shapes: Shape) -> Shape:
        """One sample's output shape for its input shape(s); a ValueError naming the layer when
        they do not fit."""
        return input_shapes[0]

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON values: type(self)(**get_config()) rebuilds the layer
        (with fresh weights)."""
        return {}

    def flops(self, *input_shapes: Shape) -> int:
        """Forward FLOPs per sample of the GEMM-like work (2 per multiply-add); 0 for the rest."""
        return 0

    # ---- capabilities that cnn_gpu.plan looks for (a layer that has one overrides it) ----------

    def affine_channels(self) -> int | None:
        """C when this layer in eval mode is y = x * scale + shift per channel (eval_affine() gives
        the two (C,) vectors); else None."""
        return None

    def eval_affine(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def absorbs_affine(self, channels: int) -> bool:
        """Whether infer_folded(x, scale, shift) can run this layer followed by y * scale + shift
        with `channels` scales, at the cost of the layer alone."""
        return False

    def infer_folded(self, x: Any, scale: Any, shift: Any, **options: Any) -> Any:
        raise NotImplementedError

    def computes_part(self) -> bool:
        """Whether forward/infer take out_size=(rows, cols) and compute only that top-left part."""
        return False

    def input_extent(self, input_shape: Shape) -> tuple[int, int] | None:
        """The top-left (rows, cols) of an (H, W, C) input that this layer reads, when it reads
        less than all of it; else None."""
        return None

    def activation(self) -> str | None:
        """The name of the elementwise activation this layer is ('relu'), when the layer before it
        may compute it in its own pass (absorbs_activation) and hand this layer the result
        (keep_output); else None."""
        return None

    def keep_output(self, y: Any) -> None:
        """Training: y is this activation's output, computed by the layer before it; keep what
        backward needs, as forward would have."""
        raise NotImplementedError

    def absorbs_activation(self, name: str, training: bool) -> bool:
        """Whether forward/infer (and infer_folded) take activation=name and apply that activation
        to their output in the same pass, giving the numbers of the activation layer after them."""
        return False

    def absorbs_activation_gradient(self) -> bool:
        """Training, after forward(..., activation=name): whether backward takes the gradient at
        the activation's output and applies the activation's derivative itself (the activation
        layer is then told to pass_gradient); if not, the activation layer keeps the output
        (keep_output) and its own backward applies the derivative."""
        return False

    def pass_gradient(self) -> None:
        """Training: the layer before computed this activation and applies its derivative in its
        own backward; this layer's next backward returns dy unchanged."""
        raise NotImplementedError

    def backward_adds_dx(self) -> bool:
        """Whether backward(dy, need_dx, dx_plus=g) takes g, the gradient the input already has
        from its other readers (N, ...), and returns dx + g (so a graph adds no pass of its own)."""
        return False

    def is_sum(self) -> bool:
        """Whether this layer is the elementwise sum of its inputs (Add), which the layer before
        one of them may compute (absorbs_add) and then hand on (sum_computed)."""
        return False

    def sum_computed(self, count: int) -> None:
        """Training: the layer before computed this sum of `count` inputs; keep what backward
        needs, as forward would have."""
        raise NotImplementedError

    def absorbs_add(self, training: bool) -> bool:
        """Whether forward(x, t) can return this layer's output + t in its own pass (with
        activation= applied after the sum), giving the numbers of a two-input Add after it."""
        return False

    # ---- building graphs ---------------------------------------------------------------------

    def __call__(self, *args: Any, name: str | None = None, **options: Any) -> Any:
        """On arrays: forward(*args). On symbolic Tensors: a new graph node, named `name`."""
        if not any(isinstance(a, Tensor) for a in args):
            return self.forward(*args, **options)
        if not all(isinstance(a, Tensor) for a in args) or options:
            raise TypeError(f"{self!r}: a graph node takes symbolic Tensors only, got "
                            f"{[type(a).__name__ for a in args]}" + (f" and options {options}" if options else ""))
        self._check_input_count(len(args), name)
        shapes = [a.shape for a in args]
        shape = None
        if all(s is not None for s in shapes):
            try:
                shape = self.output_shape(*shapes)
            except ValueError as exc:
                raise ValueError(f"node {name or '(unnamed)'!r} ({self!r}): {exc}") from None
        return Tensor(self, tuple(args), name, shape)

    def _check_input_count(self, count: int, node: str | None) -> None:
        expected = self.num_inputs
        if (expected is None and count < 2) or (expected is not None and count != expected):
            want = "two or more" if expected is None else str(expected)
            raise ValueError(f"node {node or '(unnamed)'!r} ({self!r}) takes {want} input(s), got {count}")

    # ---- recursion through children ------------------------------------------------------------

    def add_child(self, name: str, layer: "Layer") -> "Layer":
        if not isinstance(layer, Layer):
            raise TypeError(f"{self!r}: child {name!r} must be a Layer, got {type(layer).__name__}")
        if not name or "." in name or name in self.children:
            raise ValueError(f"{self!r}: child name {name!r} is empty, has a '.', or is taken")
        self.children[name] = layer
        return layer

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, "Layer"]]:
        """(path, layer) for this layer and every layer below it, parents before their children."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        return [(f"{path}.{name}" if path else name, p)
                for path, layer in self.named_layers() for name, p in layer.params.items()]

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> list[tuple[str, Any, "Layer", str]]:
        """(key, array, owning layer, buffer name) for every buffer below this layer."""
        return [(f"{path}.{name}" if path else name, value, layer, name)
                for path, layer in self.named_layers() for name, value in layer.buffers.items()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Layer":
        for _, layer in self.named_layers():
            layer.training = mode
        return self

    def eval(self) -> "Layer":
        return self.train(False)

    def to(self, device: str) -> "Layer":
        """Move every parameter, gradient and buffer to 'cpu'/'numpy' or 'gpu'/'cuda'/'cupy'."""
        if device not in DEVICE_ALIASES:
            raise ValueError(f"device must be one of {sorted(DEVICE_ALIASES)}, got {device!r}")
        backend = DEVICE_ALIASES[device]
        for _, layer in self.named_layers():
            for p in layer.params.values():
                p.data = to_device(p.data, backend)
                p.grad = None if p.grad is None else to_device(p.grad, backend)
            for key, value in layer.buffers.items():
                layer.buffers[key] = to_device(value, backend)
            layer._cache = None
        return self

    @property
    def backend(self) -> str:
        """'numpy' or 'cupy': where the parameters live."""
        params = self.parameters()
        return backend_of(params[0].data) if params else "numpy"

    @property
    def dtype(self) -> np.dtype:
        params = self.parameters()
        return params[0].data.dtype if params else np.dtype("float32")

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter and buffer as NumPy arrays, keyed by path ('0.weight', 'stage1.block0.bn1.running_mean')."""
        state = {key: to_numpy(p.data).copy() for key, p in self.named_parameters()}
        state.update({key: to_numpy(value).copy() for key, value, _, _ in self.named_buffers()})
        return state

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError unless `state` has exactly this model's state keys, each with the
        model's shape and dtype (what load_state_dict and a weight average's load check)."""
        expected = {key: (tuple(p.data.shape), p.data.dtype) for key, p in self.named_parameters()}
        expected.update({key: (tuple(v.shape), v.dtype) for key, v, _, _ in self.named_buffers()})
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state does not match the model (another architecture?): missing "
                             f"{missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        for key, (shape, dtype) in expected.items():
            value = state[key]
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"state entry {key!r}: the model expects {dtype} {shape}, "
                                 f"got {value.dtype} {tuple(value.shape)}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into the model (onto its device), checking names, shapes and dtypes first.
        On the CPU, subnormal parameter values become zero (see cnn_gpu.cpu.flush_subnormals)."""
        self.check_state(state)
        backend = self.backend
        for key, p in self.named_parameters():
            p.data = to_device(np.array(to_numpy(state[key])), backend)
            p.grad = None
            if backend == "numpy":  # e.g. weights trained on a GPU, which keeps subnormals
                cpu.flush_subnormals(p.data)
        for key, _, layer, name in self.named_buffers():
            layer.buffers[name] = to_device(np.array(to_numpy(state[key])), backend)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a .npz file atomically: a crash leaves the old file or the new one."""
        save_npz_atomic(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> "Layer":
        """Load a state written by save() (never unpickles)."""
        self.load_state_dict(load_npz(path))
        return self

    # ---- description ---------------------------------------------------------------------------

    def summary_rows(self, input_shapes: Sequence[Shape], path: str) -> tuple[list[tuple[str, str, str]], Shape]:
        """Rows (name, output shape, parameter count) for this layer and its output shape. A model
        gives a row per node (cnn_gpu.model)."""
        shape = self.output_shape(*input_shapes)
        count = sum(int(np.prod(p.shape)) for p in self.parameters())
        label = f"{path} {self!r}" if path else repr(self)
        return [(label, str(shape), f"{count:,}")], shape

    def summary(self, input_shape: Shape) -> str:
        """A table of each layer's output shape (per sample) and parameter count."""
        rows, _ = self.summary_rows([tuple(input_shape)], "")
        rows = [("layer", "output shape", "params"), ("input", str(tuple(input_shape)), "")] + rows
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {self.num_parameters():,}")
        return "\n".join(lines)

    def _set_grads(self, **grads: Any) -> None:
        """Store a backward's parameter gradients (None: the parameter does not exist) and drop the cache."""
        for name, grad in grads.items():
            if grad is not None:
                self.params[name].grad = grad
        self._cache = None

    def _check_channels(self, x: Any, expected: int, what: str = "channels") -> None:
        if x.shape[-1] != expected:
            raise ValueError(f"{self!r}: expected input with {expected} {what} in the last axis, "
                             f"got shape {tuple(x.shape)}")

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


def _extras(values: Sequence[tuple[str, Any, Any]]) -> str:
    """', name=value' for each value that is not its default, for reprs."""
    def shown(value: Any) -> Any:
        return value[0] if isinstance(value, tuple) and len(set(value)) == 1 else value
    return "".join(f", {name}={shown(value)}" for name, value, default in values if value != default)


# ---- layers with weights ----------------------------------------------------------------------------

class Conv2D(Layer):
    """2-D convolution on (N, H, W, C_in) -> (N, OH, OW, C_out); weight (KH, KW, C_in // groups, C_out).

    groups > 1 splits the channels into groups convolved apart (groups == C_in: depthwise, with
    C_out // C_in filters per input channel), as PyTorch's nn.Conv2d does; dilation spreads the taps.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, init: str = "he",
                 rng: np.random.Generator | None = None, dtype: str = "float32") -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2D: groups ({groups}) must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        kh, kw = pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = (kh, kw), pair(stride, "stride")
        self.padding, self.dilation = pair(padding, "padding"), pair(dilation, "dilation")
        self.init, self.dtype_name = init, np.dtype(dtype).name
        rng = rng if rng is not None else np.random.default_rng()
        fan_in, fan_out = kh * kw * in_channels // groups, kh * kw * out_channels // groups
        self.params["weight"] = Parameter(
            init_weight(init, (kh, kw, in_channels // groups, out_channels), fan_in, fan_out, rng, dtype))
        if bias:
            self.params["bias"] = Parameter(np.zeros(out_channels, dtype=dtype))

    def _conv(self, x: Any, weight: Any, bias: Any, out_size: tuple[int, int] | None, inference: bool,
              activation: str | None) -> tuple:
        check_rank(x, 4, repr(self), "(N, H, W, C)")
        self._check_channels(x, self.in_channels)
        return F.conv2d_forward(x, weight, bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                                groups=self.groups, out_size=out_size, inference=inference,
                                relu=_relu_option(self, activation))

    def forward(self, x: Any, out_size: tuple[int, int] | None = None, inference: bool = False,
                activation: str | None = None) -> Any:
        """out_size (rows, cols): only that corner of the output, the part a following pool reads
        (the plan passes it; see F.conv2d_forward). inference: no backward follows. activation
        'relu': max(y, 0), applied as the output is made (the plan passes it for a ReLU after this
        layer; see absorbs_activation)."""
        bias = self.params.get("bias")
        y, self._cache = self._conv(x, self.params["weight"].data, None if bias is None else bias.data,
                                    out_size, inference, activation)
        return y

    def infer(self, x: Any, **options: Any) -> Any:
        return super().infer(x, inference=True, **options)

    def backward(self, dy: Any, need_dx: bool = True, dx_plus: Any = None) -> Any:
        dx, dw, db = F.conv2d_backward(dy, self._cache, need_dx=need_dx, dx_plus=dx_plus)
        self._set_grads(weight=dw, bias=db)
        return dx

    def backward_adds_dx(self) -> bool:
        return True

    def absorbs_affine(self, channels: int) -> bool:
        return channels == self.out_channels

    def infer_folded(self, x: Any, scale: Any, shift: Any, out_size: tuple[int, int] | None = None,
                     activation: str | None = None) -> Any:
        """forward(x) * scale + shift per output channel (scale, shift: (C_out,)), for evaluation:
        the scale is folded into the filters and the shift into the bias, so it costs one
        convolution and no pass of its own (an eval-mode batch norm after this layer); then the
        activation, if one is given."""
        y, _ = self._conv(x, *_folded(self, scale, shift), out_size, True, activation)
        return y

    def absorbs_activation(self, name: str, training: bool) -> bool:
        return name == "relu"

    def computes_part(self) -> bool:
        return True

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3 or input_shape[2] != self.in_channels:
            raise ValueError(f"{self!r}: expected an (H, W, {self.in_channels}) input, got {input_shape}")
        h, w, _ = input_shape
        window = Window(*self.kernel_size, *self.stride, *self.padding, *self.dilation)
        return (*window.output_hw(h, w, repr(self)), self.out_channels)

    def flops(self, input_shape: Shape) -> int:
        oh, ow, o = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        return 2 * oh * ow * kh * kw * (self.in_channels // self.groups) * o

    def get_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": "bias" in self.params,
                "init": self.init, "dtype": self.dtype_name}

    def __repr__(self) -> str:
        extra = _extras((("stride", self.stride, (1, 1)), ("padding", self.padding, (0, 0)),
                         ("dilation", self.dilation, (1, 1)), ("groups", self.groups, 1)))
        return f"Conv2D({self.in_channels}, {self.out_channels}, {self.kernel_size[0]}x{self.kernel_size[1]}{extra})"


class Dense(Layer):
    """Fully connected: (N, in) -> (N, out); weight (in, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "he",
                 rng: np.random.Generator | None = None, dtype: str = "float32") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init, self.dtype_name = init, np.dtype(dtype).name
        rng = rng if rng is not None else np.random.default_rng()
        self.params["weight"] = Parameter(
            init_weight(init, (in_features, out_features), in_features, out_features, rng, dtype))
        if bias:
            self.params["bias"] = Parameter(np.zeros(out_features, dtype=dtype))

    def _check(self, x: Any) -> None:
        check_rank(x, 2, repr(self), "(N, features)")
        self._check_channels(x, self.in_features, "features")

    def forward(self, x: Any) -> Any:
        self._check(x)
        bias = self.params.get("bias")
        y, self._cache = F.linear_forward(x, self.params["weight"].data, None if bias is None else bias.data)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx, dw, db = F.linear_backward(dy, self._cache, need_dx=need_dx)
        self._set_grads(weight=dw, bias=db)
        return dx

    def absorbs_affine(self, channels: int) -> bool:
        return channels == self.out_features

    def infer_folded(self, x: Any, scale: Any, shift: Any) -> Any:
        """forward(x) * scale + shift per output feature (see Conv2D.infer_folded)."""
        self._check(x)
        y, _ = F.linear_forward(x, *_folded(self, scale, shift))
        return y

    def output_shape(self, input_shape: Shape) -> Shape:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"{self!r}: expected input shape ({self.in_features},), got {input_shape}")
        return (self.out_features,)

    def flops(self, input_shape: Shape) -> int:
        return 2 * self.in_features * self.out_features

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": "bias" in self.params,
                "init": self.init, "dtype": self.dtype_name}

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features})"


def _relu_option(layer: Layer, activation: str | None) -> bool:
    """activation=None or 'relu' (what absorbs_activation offers) as the functional ops' relu flag."""
    if activation not in (None, "relu"):
        raise ValueError(f"{layer!r}: activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _folded(layer: Layer, scale: Any, shift: Any) -> tuple[Any, Any]:
    """weight * scale and bias * scale + shift (shift alone without a bias), scale and shift per
    output channel (the last axis of the weight): the parameters of `layer` followed by y * scale + shift."""
    bias = layer.params.get("bias")
    return layer.params["weight"].data * scale, shift if bias is None else bias.data * scale + shift


class LocalStatistics:
    """Batch norm with the statistics of this process's batch: the functional pair. The default
    of every batch-norm layer; cnn_gpu.distributed.SyncBatchNorm has the same two calls with the
    statistics of every rank's shard (see _BatchNorm.statistics)."""

    forward = staticmethod(F.batch_norm_forward)
    backward = staticmethod(F.batch_norm_backward)

    def __repr__(self) -> str:
        return "LocalStatistics()"


LOCAL_STATISTICS = LocalStatistics()


class BatchNormLayerCache(NamedTuple):
    """What a batch-norm layer's backward needs: which statistics ran the forward, and their cache."""

    statistics: Any  # LOCAL_STATISTICS or a SyncBatchNorm: its backward runs
    cache: Any


class _BatchNorm(Layer):
    """Batch norm of the layout's every axis but the last, per channel.

    statistics: where training takes the batch statistics from: LOCAL_STATISTICS (this process's
    batch, the default) or a cnn_gpu.distributed.SyncBatchNorm (the global batch over every
    rank's shard; cnn_gpu.distributed.set_batch_norm_sync sets it on a whole model). Evaluation
    always normalizes with the running statistics, with no communication.
    """

    _layout = ""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.dtype_name = np.dtype(dtype).name
        self.params = {"gamma": Parameter(np.ones(num_features, dtype=dtype)),
                       "beta": Parameter(np.zeros(num_features, dtype=dtype))}
        self.buffers = {"running_mean": np.zeros(num_features, dtype=dtype),
                        "running_var": np.ones(num_features, dtype=dtype)}
        self.statistics: Any = LOCAL_STATISTICS

    def forward(self, x: Any, add: Any = None, activation: str | None = None) -> Any:
        """activation 'relu': max(y, 0), and backward then takes the gradient at the ReLU's output
        (the plan passes it for a ReLU after this layer; see absorbs_activation). add: y + add,
        before the activation, whose backward then runs on its own (the plan passes it for a
        residual Add after this layer; see absorbs_add)."""
        relu = _relu_option(self, activation)
        check_rank(x, len(self._layout.split(",")), repr(self), self._layout)
        self._check_channels(x, self.num_features)
        statistics = self.statistics if self.training else LOCAL_STATISTICS
        y, cache = statistics.forward(
            x, self.params["gamma"].data, self.params["beta"].data, self.buffers["running_mean"],
            self.buffers["running_var"], training=self.training, momentum=self.momentum, eps=self.eps,
            relu=relu, add=add)
        self._cache = BatchNormLayerCache(statistics, cache)
        return y

    def absorbs_activation(self, name: str, training: bool) -> bool:
        return name == "relu"

    def absorbs_activation_gradient(self) -> bool:
        return True

    def absorbs_add(self, training: bool) -> bool:
        return training  # evaluation folds batch norm into the layer before it instead (plan.py)

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx, dgamma, dbeta = self._cache.statistics.backward(dy, self._cache.cache)
        self._set_grads(gamma=dgamma, beta=dbeta)
        return dx

    def affine_channels(self) -> int:
        return self.num_features

    def eval_affine(self) -> tuple[Any, Any]:
        """Eval mode's batch norm as y = x * scale + shift per channel: scale = gamma / sqrt(running_var
        + eps), shift = beta - running_mean * scale; (C,) each, in the parameters' dtype (computed
        in float64)."""
        xp = get_array_module(self.params["gamma"].data)
        gamma, beta = (self.params[k].data.astype(np.float64) for k in ("gamma", "beta"))
        mean, var = (self.buffers[k].astype(np.float64) for k in ("running_mean", "running_var"))
        scale = gamma / xp.sqrt(var + self.eps)
        dtype = self.params["gamma"].data.dtype
        return scale.astype(dtype), (beta - mean * scale).astype(dtype)

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != len(self._layout.split(",")) - 1 or input_shape[-1] != self.num_features:
            raise ValueError(f"{self!r}: expected a {self._layout} input with {self.num_features} channels, "
                             f"got one sample of shape {input_shape}")
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps,
                "dtype": self.dtype_name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features})"


class BatchNorm2D(_BatchNorm):
    """Batch norm of (N, H, W, C) over N, H, W per channel."""
    _layout = "(N, H, W, C)"


class BatchNorm1D(_BatchNorm):
    """Batch norm of (N, C) over N per feature."""
    _layout = "(N, C)"


# ---- pooling ----------------------------------------------------------------------------------------

class _Pool2D(Layer):
    def __init__(self, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding, self.ceil_mode = pair(padding, "padding"), bool(ceil_mode)
        check_pool_padding(self.padding, self.kernel_size, type(self).__name__)

    dilation = (1, 1)

    def _window(self) -> Window:
        return Window(*self.kernel_size, *self.stride, *self.padding, *self.dilation)

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"{self!r}: expected an (H, W, C) input, got {input_shape}")
        h, w, c = input_shape
        return (*self._window().output_hw(h, w, repr(self), self.ceil_mode), c)

    def input_extent(self, input_shape: Shape) -> tuple[int, int] | None:
        """Without padding or ceil mode, the windows read rows and columns up to the last whole one
        (a 2x2 pool of 11 x 11 reads 10 x 10); None when they read everything."""
        if self.padding != (0, 0) or self.ceil_mode:
            return None
        oh, ow, _ = self.output_shape(input_shape)
        extent = self._window().read_extent(oh, ow)
        return None if extent == tuple(input_shape[:2]) else extent

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = self._backward(dy, self._cache) if need_dx else None
        self._cache = None
        return dx

    def _base_config(self) -> dict[str, Any]:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "ceil_mode": self.ceil_mode}

    def _repr_extras(self) -> tuple:
        return (("stride", self.stride, self.kernel_size), ("padding", self.padding, (0, 0)),
                ("dilation", self.dilation, (1, 1)), ("ceil_mode", self.ceil_mode, False))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kernel_size[0]}x{self.kernel_size[1]}{_extras(self._repr_extras())})"


class MaxPool2D(_Pool2D):
    """Max pooling on (N, H, W, C), padding counting as -inf; the gradient goes to the first maximum of
    each window."""

    def __init__(self, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 ceil_mode: bool = False) -> None:
        self.dilation = pair(dilation, "dilation")
        super().__init__(kernel_size, stride, padding, ceil_mode)

    def _args(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                **({"dilation": self.dilation} if self.dilation != (1, 1) else {}),
                **({"ceil_mode": True} if self.ceil_mode else {})}

    def forward(self, x: Any) -> Any:
        y, self._cache = F.max_pool2d_forward(x, **self._args())
        return y

    def infer(self, x: Any) -> Any:
        return F.max_pool2d(x, **self._args())  # no argmax: nothing backpropagates

    _backward = staticmethod(F.max_pool2d_backward)

    def get_config(self) -> dict[str, Any]:
        return {**self._base_config(), "dilation": list(self.dilation)}


class AvgPool2D(_Pool2D):
    """Average pooling on (N, H, W, C). count_include_pad (default, as PyTorch's): padding counts as zeros
    in each average; without it a window averages only the input positions it covers."""

    def __init__(self, kernel_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def _args(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                **({"ceil_mode": True} if self.ceil_mode else {}),
                **({"count_include_pad": False} if not self.count_include_pad else {})}

    def forward(self, x: Any) -> Any:
        y, self._cache = F.avg_pool2d_forward(x, **self._args())
        return y

    _backward = staticmethod(F.avg_pool2d_backward)

    def get_config(self) -> dict[str, Any]:
        return {**self._base_config(), "count_include_pad": self.count_include_pad}

    def _repr_extras(self) -> tuple:
        return super()._repr_extras() + (("count_include_pad", self.count_include_pad, True),)


class GlobalAvgPool2D(Layer):
    """(N, H, W, C) -> (N, C): the mean of each channel over the image, whatever its size."""

    def forward(self, x: Any) -> Any:
        check_rank(x, 4, repr(self), "(N, H, W, C)")
        y, self._cache = F.global_avg_pool2d_forward(x)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = F.global_avg_pool2d_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return dx

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ValueError(f"{self!r}: expected an (H, W, C) input, got {input_shape}")
        return (input_shape[2],)


# ---- elementwise -------------------------------------------------------------------------------------

class _Activation(Layer):
    """An elementwise layer: y = f(x) of any shape, with its functional pair (_forward, _backward)."""

    def _options(self) -> dict[str, Any]:
        return {}

    def forward(self, x: Any) -> Any:
        y, self._cache = self._forward(x, **self._options())
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = self._backward(dy, self._cache, **self._options()) if need_dx else None
        self._cache = None
        return dx

    def get_config(self) -> dict[str, Any]:
        return self._options()

    def __repr__(self) -> str:
        return type(self).__name__ + "(" + ", ".join(f"{k}={v:g}" for k, v in self._options().items()) + ")"


class ReLU(_Activation):
    """max(x, 0)."""
    _forward, _backward = staticmethod(F.relu_forward), staticmethod(F.relu_backward)

    def activation(self) -> str:
        return "relu"

    def keep_output(self, y: Any) -> None:
        self._cache = y  # relu_forward's cache: its output

    def pass_gradient(self) -> None:
        self._cache = _PASS_GRADIENT

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        if self._cache is _PASS_GRADIENT:
            self._cache = None
            return dy if need_dx else None
        return super().backward(dy, need_dx)


# ReLU._cache when the layer before applies the ReLU's derivative (see Layer.pass_gradient).
_PASS_GRADIENT = object()


class LeakyReLU(_Activation):
    """x where x > 0, else negative_slope * x."""
    _forward, _backward = staticmethod(F.leaky_relu_forward), staticmethod(F.leaky_relu_backward)

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def _options(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}


class Clip(_Activation):
    """min(max(x, low), high) (ONNX's Clip)."""
    _forward, _backward = staticmethod(F.clip_forward), staticmethod(F.clip_backward)

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not low < high:
            raise ValueError(f"Clip: low must be below high, got {low} and {high}")
        self.low, self.high = float(low), float(high)

    def _options(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


class ReLU6(Clip):
    """min(max(x, 0), 6), MobileNet's activation."""

    def __init__(self) -> None:
        super().__init__(0.0, 6.0)

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return "ReLU6()"


class Sigmoid(_Activation):
    """1 / (1 + exp(-x))."""
    _forward, _backward = staticmethod(F.sigmoid_forward), staticmethod(F.sigmoid_backward)


class Tanh(_Activation):
    """tanh(x)."""
    _forward, _backward = staticmethod(F.tanh_forward), staticmethod(F.tanh_backward)


class SiLU(_Activation):
    """x * sigmoid(x) (swish)."""
    _forward, _backward = staticmethod(F.silu_forward), staticmethod(F.silu_backward)


class HardSigmoid(_Activation):
    """clip(alpha * x + beta, 0, 1); PyTorch's defaults (alpha 1/6, beta 1/2)."""
    _forward, _backward = staticmethod(F.hard_sigmoid_forward), staticmethod(F.hard_sigmoid_backward)

    def __init__(self, alpha: float = 1 / 6, beta: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def _options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}


class HardSwish(_Activation):
    """x * relu6(x + 3) / 6 (MobileNetV3)."""
    _forward, _backward = staticmethod(F.hard_swish_forward), staticmethod(F.hard_swish_backward)


class Softmax(_Activation):
    """The softmax over the last axis (N, K) -> (N, K), for models that end in probabilities (ONNX
    imports). A classifier trains on logits: leave it out, the loss applies it."""
    _forward, _backward = staticmethod(F.softmax_forward), staticmethod(F.softmax_backward)


class Identity(Layer):
    """y = x (ONNX's Identity; a placeholder where a block has no shortcut layer)."""

    def forward(self, x: Any) -> Any:
        return x

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        return dy if need_dx else None


class Dropout(Layer):
    """Inverted dropout with probability p; the identity in eval mode."""

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
        self._rng: Any = None
        self._rng_module: Any = None

    def reseed(self, seed: int | None) -> None:
        """Draw the following masks from a fresh generator seeded with `seed` (fit() reseeds per epoch)."""
        self.seed, self._rng = seed, None

    def _generator(self, x: Any) -> Any:
        xp = get_array_module(x)
        if self._rng is None or self._rng_module is not xp:  # a generator of x's own backend
            self._rng, self._rng_module = xp.random.default_rng(self.seed), xp
        return self._rng

    def forward(self, x: Any) -> Any:
        rng = self._generator(x) if self.training and self.p > 0 else None
        y, self._cache = F.dropout_forward(x, self.p, self.training, rng)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        dx = F.dropout_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return dx

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p}

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


# ---- shapes and merges --------------------------------------------------------------------------------

class Flatten(Layer):
    """(N, ...) -> (N, prod(...)), in the channels-last order (h, w, c)."""

    def forward(self, x: Any) -> Any:
        y, self._cache = F.flatten_forward(x)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        return F.flatten_backward(dy, self._cache) if need_dx else None

    def output_shape(self, input_shape: Shape) -> Shape:
        return (int(np.prod(input_shape)),)


class Add(Layer):
    """x_1 + ... + x_k of one shape: the merge of a residual connection."""

    num_inputs = None

    def forward(self, *xs: Any, activation: str | None = None) -> Any:
        """The sum; with activation 'relu', max(sum, 0) in the same pass (see absorbs_activation)."""
        y, self._cache = F.add_forward(*xs, relu=_relu_option(self, activation))
        return y

    def absorbs_activation(self, name: str, training: bool) -> bool:
        return name == "relu"

    def is_sum(self) -> bool:
        return True

    def sum_computed(self, count: int) -> None:
        self._cache = count  # add_backward's cache: the number of inputs

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        grads = F.add_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return grads

    def output_shape(self, *input_shapes: Shape) -> Shape:
        for i, shape in enumerate(input_shapes[1:], start=1):
            if tuple(shape) != tuple(input_shapes[0]):
                raise ValueError(f"Add: input {i} has shape {tuple(shape)} but input 0 has "
                                 f"{tuple(input_shapes[0])}")
        return input_shapes[0]


class Concat(Layer):
    """The concatenation of k inputs along the channel axis (the last): (..., C_1), ... -> (..., sum C_i)."""

    num_inputs = None

    def forward(self, *xs: Any) -> Any:
        y, self._cache = F.concat_forward(xs, axis=-1)
        return y

    def backward(self, dy: Any, need_dx: bool = True) -> Any:
        grads = F.concat_backward(dy, self._cache) if need_dx else None
        self._cache = None
        return grads

    def output_shape(self, *input_shapes: Shape) -> Shape:
        first = tuple(input_shapes[0])
        for i, shape in enumerate(input_shapes[1:], start=1):
            if len(shape) != len(first) or tuple(shape[:-1]) != first[:-1]:
                raise ValueError(f"Concat: input {i} has shape {tuple(shape)} and input 0 has {first}; "
                                 "they may differ only in their channels (the last axis)")
        return (*first[:-1], sum(int(s[-1]) for s in input_shapes))
