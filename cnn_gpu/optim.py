"""Optimizers that update parameters in place, on whichever backend they live, and
learning-rate schedules.

A training step reads:
    logits = model.forward(x)
    loss, d = softmax_cross_entropy(logits, y)
    model.backward(d)
    opt.step()
    opt.zero_grad()
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from . import cpu
from .backend import backend_of, get_array_module, is_cupy_array, to_device, to_numpy
from .layers import Parameter


def _fused_updates(*arrays: Any) -> Any:
    """The module whose sgd_update runs one step in one pass: cnn_gpu.cuda.elementwise for CuPy
    arrays, cnn_gpu.cpu.elementwise for NumPy ones when its compiled kernels run; else None, and
    the NumPy code of SGD (their reference) runs."""
    if is_cupy_array(arrays[0]):
        from .cuda import elementwise
        return elementwise
    if cpu.runs_on(*arrays) and all(a.flags.c_contiguous for a in arrays):  # updated through flat views
        from .cpu import elementwise
        return elementwise
    return None


class Optimizer:
    """Holds the parameters, the learning rate and per-parameter state arrays.

    weight_decay (L2, added to the gradient) applies to every parameter except those in
    no_decay: e.g. biases and batch-norm scales and shifts, which weight decay only pulls
    towards zero without limiting what the network can fit (`no_decay_parameters(model)`).

    On the CPU an update sets subnormal values of the parameters and the state to zero
    (`cnn_gpu.cpu.flush_subnormals`: they would slow every later step several-fold).
    """

    def __init__(self, params: Iterable[Parameter], lr: float, weight_decay: float = 0.0,
                 no_decay: Iterable[Parameter] = ()) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimize")
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        exempt = {id(p) for p in no_decay}
        unknown = exempt - {id(p) for p in self.params}
        if unknown:
            raise ValueError(f"{type(self).__name__}: no_decay names {len(unknown)} parameter(s) "
                             "that are not among the parameters to optimize")
        self.decay = [0.0 if id(p) in exempt else self.weight_decay for p in self.params]  # per parameter
        self.steps = 0
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def _buffer(self, i: int, name: str) -> Any:
        """State array `name` of parameter i, created as zeros, kept on the parameter's device."""
        p, state = self.params[i], self.state[i]
        buf = state.get(name)
        if buf is None:
            buf = state[name] = get_array_module(p.data).zeros_like(p.data)
        elif backend_of(buf) != backend_of(p.data):  # the model moved since the last step
            buf = state[name] = to_device(buf, backend_of(p.data))
        return buf

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.steps += 1
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p)

    def _update(self, i: int, p: Parameter) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Learning rate, step count and every state array, as NumPy arrays in one flat dict."""
        out = {"lr": np.array(self.lr), "steps": np.array(self.steps)}
        for i, state in enumerate(self.state):
            for name, buf in state.items():
                out[f"{i}.{name}"] = to_numpy(buf).copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        self.state = [{} for _ in self.params]
        for key, value in state.items():
            if key in ("lr", "steps"):
                continue
            index, name = key.split(".", 1)
            i = int(index)
            if i >= len(self.params) or tuple(value.shape) != self.params[i].shape:
                raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} does not "
                                 f"match the model's parameters")
            self.state[i][name] = to_device(np.array(value), backend_of(self.params[i].data))


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay,
    as PyTorch defines them:  v = momentum * v + g;  p -= lr * (g + momentum * v if nesterov else v)."""

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, no_decay: Iterable[Parameter] = ()) -> None:
        super().__init__(params, lr, weight_decay, no_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("SGD: nesterov needs a momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def _update(self, i: int, p: Parameter) -> None:
        decay = self.decay[i]
        v = self._buffer(i, "velocity") if self.momentum else None
        fused = _fused_updates(p.data, p.grad, *([] if v is None else [v]))
        if fused is not None:  # one pass instead of three or four
            fused.sgd_update(p.data, p.grad, v, self.lr, self.momentum, decay, self.nesterov)
            return
        g = p.grad
        if decay:
            g = g + decay * p.data
        if v is not None:
            v *= self.momentum
            v += g
            cpu.flush_subnormals(v)
            g = g + self.momentum * v if self.nesterov else v
        p.data -= p.data.dtype.type(self.lr) * g
        cpu.flush_subnormals(p.data)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction; weight_decay adds L2 to the gradient."""

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, no_decay: Iterable[Parameter] = ()) -> None:
        super().__init__(params, lr, weight_decay, no_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def _update(self, i: int, p: Parameter) -> None:
        m, v = self._buffer(i, "m"), self._buffer(i, "v")
        decay = self.decay[i]
        step_size = self.lr / (1 - self.beta1 ** self.steps)
        bc2 = 1 - self.beta2 ** self.steps
        if is_cupy_array(p.data):  # one fused launch instead of about ten
            from .cuda import elementwise
            elementwise.adam_update(p.data, p.grad, m, v, step_size, self.beta1, self.beta2, self.eps, decay, bc2)
            return
        g = p.grad
        if decay:
            g = g + decay * p.data
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        cpu.flush_subnormals(m, v)
        xp = get_array_module(p.data)
        denom = xp.sqrt(v / bc2) + self.eps
        p.data -= p.data.dtype.type(step_size) * m / denom
        cpu.flush_subnormals(p.data)


def no_decay_parameters(model: Any) -> list[Parameter]:
    """The parameters of a model that are vectors (ndim 1): biases and batch-norm gamma and beta."""
    return [p for p in model.parameters() if len(p.shape) == 1]


class Schedule:
    """Sets optimizer.lr from the epoch: call step() once at the end of each epoch."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        self.epoch += 1
        self.optimizer.lr = self.lr_at(self.epoch)
        return self.optimizer.lr

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"epoch": np.array(self.epoch), "base_lr": np.array(self.base_lr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.base_lr = int(state["epoch"]), float(state["base_lr"])
        self.optimizer.lr = self.lr_at(self.epoch)


class StepLR(Schedule):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineLR(Schedule):
    """lr falls from base_lr to min_lr along half a cosine over total_epochs, then stays at min_lr."""

    def __init__(self, optimizer: Optimizer, total_epochs: int, min_lr: float = 0.0) -> None:
        super().__init__(optimizer)
        if total_epochs < 1:
            raise ValueError(f"CosineLR: total_epochs must be >= 1, got {total_epochs}")
        self.total_epochs, self.min_lr = total_epochs, min_lr

    def lr_at(self, epoch: int) -> float:
        t = min(epoch, self.total_epochs) / self.total_epochs
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
