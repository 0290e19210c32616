"""Layers: thin holders of parameters that call one functional op each way.

A layer keeps the cache of its last forward for its backward, its trained parameters
in `self.params` (name -> Parameter, which holds `.data` and `.grad`), and state that is
not trained (batch-norm running statistics) in `self.buffers` (name -> array).
`backward` overwrites each parameter's `.grad` (gradients are not accumulated).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import functional as F
from .backend import get_array_module, to_device
from .geometry import check_rank, output_size, pair
from .init import init_weight


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


class Layer:
    """Base class: no parameters, identity shape, train/eval flag, device moves."""

    def __init__(self) -> None:
        self.params: dict[str, Parameter] = {}
        self.buffers: dict[str, Any] = {}
        self.training = True
        self._cache: Any = None

    def forward(self, x: Any) -> Any:
        raise NotImplementedError

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        raise NotImplementedError

    def infer(self, x: Any, **options: Any) -> Any:
        """The forward for evaluation, when nothing will backpropagate: keeps no cache, and a
        layer may take a shortcut that gives the same output (MaxPool2D skips its argmax).
        options go to forward (Conv2D's out_size)."""
        y = self.forward(x, **options)
        self._cache = None
        return y

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one sample's output (no batch axis) for one sample's input shape."""
        return input_shape

    def to(self, backend: str) -> "Layer":
        """Move parameters, gradients and buffers to 'numpy' / 'cupy' (also 'cpu' / 'gpu')."""
        for p in self.params.values():
            p.data = to_device(p.data, backend)
            p.grad = None if p.grad is None else to_device(p.grad, backend)
        for key, value in self.buffers.items():
            self.buffers[key] = to_device(value, backend)
        self._cache = None
        return self

    def _set_grads(self, **grads: Any) -> None:
        """Store a backward's parameter gradients (None: the parameter does not exist) and drop the cache."""
        for name, grad in grads.items():
            if grad is not None:
                self.params[name].grad = grad
        self._cache = None

    def _folded(self, scale: Any, shift: Any) -> tuple[Any, Any]:
        """weight * scale and bias * scale + shift (shift alone without a bias), scale and shift
        per output channel: the parameters of this layer followed by y * scale + shift."""
        bias = self.params.get("bias")
        return self.params["weight"].data * scale, shift if bias is None else bias.data * scale + shift

    def _check_channels(self, x: Any, expected: int, what: str = "channels") -> None:
        if x.shape[-1] != expected:
            raise ValueError(f"{self!r}: expected input with {expected} {what} in the last axis, "
                             f"got shape {tuple(x.shape)}")

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class Conv2D(Layer):
    """2-D convolution on (N, H, W, C_in) -> (N, OH, OW, C_out); weight (KH, KW, C_in, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 bias: bool = True, init: str = "he", rng: np.random.Generator | None = None,
                 dtype: str = "float32") -> None:
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), pair(stride, "stride"), pair(padding, "padding")
        rng = rng if rng is not None else np.random.default_rng()
        fan_in, fan_out = kh * kw * in_channels, kh * kw * out_channels
        self.params["weight"] = Parameter(
            init_weight(init, (kh, kw, in_channels, out_channels), fan_in, fan_out, rng, dtype))
        if bias:
            self.params["bias"] = Parameter(np.zeros(out_channels, dtype=dtype))

    def forward(self, x: Any, out_size: tuple[int, int] | None = None, inference: bool = False) -> Any:
        """out_size (rows, cols): only that corner of the output, the part a following pool reads
        (Sequential passes it; see F.conv2d_forward). inference: no backward follows."""
        check_rank(x, 4, repr(self), "(N, H, W, C)")
        self._check_channels(x, self.in_channels)
        bias = self.params.get("bias")
        y, self._cache = F.conv2d_forward(x, self.params["weight"].data, None if bias is None else bias.data,
                                          stride=self.stride, padding=self.padding, out_size=out_size,
                                          inference=inference)
        return y

    def infer(self, x: Any, **options: Any) -> Any:
        return super().infer(x, inference=True, **options)

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx, dw, db = F.conv2d_backward(dout, self._cache, need_dx=need_dx)
        self._set_grads(weight=dw, bias=db)
        return dx

    def infer_folded(self, x: Any, scale: Any, shift: Any, out_size: tuple[int, int] | None = None) -> Any:
        """forward(x) * scale + shift per output channel (scale, shift: (C_out,)), for evaluation:
        the scale is folded into the filters and the shift into the bias, so it costs one
        convolution and no pass of its own (an eval-mode batch norm after this layer)."""
        check_rank(x, 4, repr(self), "(N, H, W, C)")
        self._check_channels(x, self.in_channels)
        y, _ = F.conv2d_forward(x, *self._folded(scale, shift), stride=self.stride, padding=self.padding,
                                out_size=out_size, inference=True)
        return y

    def output_shape(self, input_shape):
        h, w, c = input_shape
        if c != self.in_channels:
            raise ValueError(f"{self!r}: expected {self.in_channels} input channels, got shape {input_shape}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (output_size(h, kh, sh, ph, op=repr(self), axis="height"),
                output_size(w, kw, sw, pw, op=repr(self), axis="width"), self.out_channels)

    def __repr__(self) -> str:
        extra = "".join(f", {name}={value}" for name, value, default in
                        (("stride", self.stride, (1, 1)), ("padding", self.padding, (0, 0))) if value != default)
        return f"Conv2D({self.in_channels}, {self.out_channels}, {self.kernel_size[0]}x{self.kernel_size[1]}{extra})"


class Dense(Layer):
    """Fully connected: (N, in) -> (N, out); weight (in, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "he",
                 rng: np.random.Generator | None = None, dtype: str = "float32") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rng = rng if rng is not None else np.random.default_rng()
        self.params["weight"] = Parameter(
            init_weight(init, (in_features, out_features), in_features, out_features, rng, dtype))
        if bias:
            self.params["bias"] = Parameter(np.zeros(out_features, dtype=dtype))

    def forward(self, x: Any) -> Any:
        check_rank(x, 2, repr(self), "(N, features)")
        self._check_channels(x, self.in_features, "features")
        bias = self.params.get("bias")
        y, self._cache = F.linear_forward(x, self.params["weight"].data, None if bias is None else bias.data)
        return y

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx, dw, db = F.linear_backward(dout, self._cache, need_dx=need_dx)
        self._set_grads(weight=dw, bias=db)
        return dx

    def infer_folded(self, x: Any, scale: Any, shift: Any) -> Any:
        """forward(x) * scale + shift per output feature (see Conv2D.infer_folded)."""
        check_rank(x, 2, repr(self), "(N, features)")
        self._check_channels(x, self.in_features, "features")
        y, _ = F.linear_forward(x, *self._folded(scale, shift))
        return y

    def output_shape(self, input_shape):
        if input_shape != (self.in_features,):
            raise ValueError(f"{self!r}: expected input shape ({self.in_features},), got {input_shape}")
        return (self.out_features,)

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features})"


class _Pool2D(Layer):
    _forward = staticmethod(F.max_pool2d_forward)
    _backward = staticmethod(F.max_pool2d_backward)

    def __init__(self, pool_size: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.pool_size = pair(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")

    def forward(self, x: Any) -> Any:
        y, self._cache = self._forward(x, self.pool_size, self.stride, self.padding)
        return y

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx = self._backward(dout, self._cache) if need_dx else None
        self._cache = None
        return dx

    def input_extent(self, h: int, w: int) -> tuple[int, int]:
        """The rows and columns of an (h, w) input that some window reads: all of them with
        padding, else up to the last whole window (a 2x2 pool of 11 x 11 reads 10 x 10)."""
        (kh, kw), (sh, sw), (ph, pw) = self.pool_size, self.stride, self.padding
        if ph or pw:
            return h, w
        oh, ow = self.output_shape((h, w, 1))[:2]
        return (oh - 1) * sh + kh, (ow - 1) * sw + kw

    def output_shape(self, input_shape):
        h, w, c = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.pool_size, self.stride, self.padding
        return (output_size(h, kh, sh, ph, op=repr(self), axis="height"),
                output_size(w, kw, sw, pw, op=repr(self), axis="width"), c)

    def __repr__(self) -> str:
        extra = "".join(f", {name}={value}" for name, value, default in
                        (("stride", self.stride, self.pool_size), ("padding", self.padding, (0, 0))) if value != default)
        return f"{type(self).__name__}({self.pool_size[0]}x{self.pool_size[1]}{extra})"


class MaxPool2D(_Pool2D):
    """Max pooling on (N, H, W, C); the gradient goes to the first maximum of each window."""

    def infer(self, x: Any) -> Any:
        return F.max_pool2d(x, self.pool_size, self.stride, self.padding)  # no argmax: nothing backpropagates


class AvgPool2D(_Pool2D):
    """Average pooling on (N, H, W, C); padding counts as zeros."""
    _forward = staticmethod(F.avg_pool2d_forward)
    _backward = staticmethod(F.avg_pool2d_backward)


class _BatchNorm(Layer):
    _layout = ""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.params = {"gamma": Parameter(np.ones(num_features, dtype=dtype)),
                       "beta": Parameter(np.zeros(num_features, dtype=dtype))}
        self.buffers = {"running_mean": np.zeros(num_features, dtype=dtype),
                        "running_var": np.ones(num_features, dtype=dtype)}

    def forward(self, x: Any) -> Any:
        check_rank(x, len(self._layout.split(",")), repr(self), self._layout)
        self._check_channels(x, self.num_features)
        y, self._cache = F.batch_norm_forward(
            x, self.params["gamma"].data, self.params["beta"].data, self.buffers["running_mean"],
            self.buffers["running_var"], training=self.training, momentum=self.momentum, eps=self.eps)
        return y

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx, self.params["gamma"].grad, self.params["beta"].grad = F.batch_norm_backward(dout, self._cache)
        self._cache = None
        return dx

    def eval_scale_shift(self) -> tuple[Any, Any]:
        """Eval mode's batch norm as y = x * scale + shift per channel: scale = gamma / sqrt(running_var
        + eps), shift = beta - running_mean * scale; (C,) each, in the parameters' dtype (computed
        in float64)."""
        xp = get_array_module(self.params["gamma"].data)
        gamma, beta = (self.params[k].data.astype(np.float64) for k in ("gamma", "beta"))
        mean, var = (self.buffers[k].astype(np.float64) for k in ("running_mean", "running_var"))
        scale = gamma / xp.sqrt(var + self.eps)
        dtype = self.params["gamma"].data.dtype
        return scale.astype(dtype), (beta - mean * scale).astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features})"


class BatchNorm2D(_BatchNorm):
    """Batch norm of (N, H, W, C) over N, H, W per channel."""
    _layout = "(N, H, W, C)"


class BatchNorm1D(_BatchNorm):
    """Batch norm of (N, C) over N per feature."""
    _layout = "(N, C)"


class ReLU(Layer):
    """max(x, 0), any shape."""

    def forward(self, x: Any) -> Any:
        y, self._cache = F.relu_forward(x)
        return y

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx = F.relu_backward(dout, self._cache)
        self._cache = None
        return dx


class Flatten(Layer):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x: Any) -> Any:
        y, self._cache = F.flatten_forward(x)
        return y

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        return F.flatten_backward(dout, self._cache)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


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

    def backward(self, dout: Any, need_dx: bool = True) -> Any:
        dx = F.dropout_backward(dout, self._cache)
        self._cache = None
        return dx

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
