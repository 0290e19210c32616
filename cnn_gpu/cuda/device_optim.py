"""SGD's and Adam's update for a captured training step: the per-step scalars on the device.

A CUDA graph replays each kernel with the arguments it was captured with, so an update that
takes the learning rate (and Adam's bias corrections, which change every step) as launch
arguments would replay the first step's forever. Here they sit in a table on the device, one row
per step of the coming epoch, written by the host before the epoch (a copy outside the graph) and
read by the update kernels at the row of the device step index the graph advances:

    updates = DeviceOptimizer(optimizer, step)   # step: the (1,) int32 device index of the step
    updates.begin(steps)                         # rows for the next `steps` steps: optimizer.lr, optimizer.steps
    updates.update()                             # every parameter with a gradient (inside the graph)
    updates.stepped()                            # optimizer.steps += 1, on the host, after each step

So a learning-rate schedule (set per epoch, or per step) needs no new capture. The rows are what
the eager optimizer computes on the host (rate_table), rounded to the parameters' dtype as it
passes them, and the kernels (cnn_gpu/cuda/elementwise.py, *_at) do its arithmetic term for term:
a captured step updates the parameters as SGD.step / Adam.step would, bit for bit on one card.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import require_cupy
from ..optim import SGD, Adam, Optimizer
from . import elementwise

SUPPORTED = (SGD, Adam)


def unsupported_reason(optimizer: Optimizer) -> str | None:
    """Why a captured step cannot run this optimizer's update, or None when it can."""
    if type(optimizer) not in SUPPORTED:
        return (f"the captured step updates with SGD or Adam only, not {type(optimizer).__name__} "
                "(a subclass may change the update)")
    return None


def rate_table(optimizer: Optimizer, steps: int, dtype: Any) -> np.ndarray:
    """The per-step scalars of the next `steps` steps, as the eager optimizer computes them:
    SGD (steps,): lr; Adam (steps, 2): lr / (1 - beta1^t), 1 - beta2^t for t = optimizer.steps + 1, ...
    in float64 on the host, then rounded to `dtype` (as the eager kernels' scalar arguments are)."""
    t = np.dtype(dtype).type
    if isinstance(optimizer, Adam):
        rows = []
        for s in range(steps):
            count = optimizer.steps + s + 1
            rows.append((t(optimizer.lr / (1 - optimizer.beta1 ** count)), t(1 - optimizer.beta2 ** count)))
        return np.array(rows, dtype=dtype).reshape(steps, 2)
    return np.full(steps, t(optimizer.lr), dtype=dtype)


class DeviceOptimizer:
    """An SGD or Adam optimizer's update, reading its per-step scalars from the device."""

    def __init__(self, optimizer: Optimizer, step: Any, capacity: int) -> None:
        reason = unsupported_reason(optimizer)
        if reason is not None:
            raise ValueError(reason)
        cupy = require_cupy()
        self.optimizer, self.step, self.capacity = optimizer, step, int(capacity)
        dtypes = {np.dtype(p.data.dtype) for p in optimizer.params}
        width = 2 if isinstance(optimizer, Adam) else 1
        # One table per parameter dtype, allocated once: the graph holds its address.
        self.tables = {dt: cupy.zeros((self.capacity, width), dtype=dt) for dt in dtypes}
        # The state arrays now (zeros, as the first eager step would make them), so that their
        # addresses are fixed before any step is captured.
        names = ("m", "v") if isinstance(optimizer, Adam) else ("velocity",) if optimizer.momentum else ()
        for i in range(len(optimizer.params)):
            for name in names:
                optimizer._buffer(i, name)

    def begin(self, steps: int) -> None:
        """Write the rows of the next `steps` steps (at most the capacity), from row 0."""
        if not 0 < steps <= self.capacity:
            raise ValueError(f"DeviceOptimizer: {steps} steps do not fit its table of {self.capacity}")
        for dtype, table in self.tables.items():
            rows = rate_table(self.optimizer, steps, dtype).reshape(steps, -1)
            table[:steps].set(rows)

    def update(self) -> None:
        """One step on every parameter that has a gradient, in the optimizer's order."""
        opt = self.optimizer
        for i, p in enumerate(opt.params):
            if p.grad is None:
                continue
            t, rates = p.data.dtype.type, self.tables[np.dtype(p.data.dtype)]
            decay = t(opt.decay[i])
            if isinstance(opt, Adam):
                m, v = opt._buffer(i, "m"), opt._buffer(i, "v")
                elementwise.kernel("adam_at")(p.grad, rates, self.step, t(opt.beta1), t(opt.beta2), t(opt.eps),
                                              decay, p.data, m, v)
            elif opt.momentum:
                v = opt._buffer(i, "velocity")
                elementwise.kernel("sgd_momentum_at")(p.grad, rates, self.step, t(opt.momentum), decay,
                                                      np.bool_(opt.nesterov), p.data, v)
            else:
                elementwise.kernel("sgd_at")(p.grad, rates, self.step, decay, p.data)

    def stepped(self, count: int = 1) -> None:
        """Count `count` steps on the host optimizer (its `steps`, which checkpoints keep)."""
        self.optimizer.steps += count

    def state_arrays(self) -> list[Any]:
        """Every array the update reads or writes: the graph's addresses, which must not change."""
        arrays = [p.data for p in self.optimizer.params] + list(self.tables.values())
        for state in self.optimizer.state:
            arrays += list(state.values())
        return arrays
