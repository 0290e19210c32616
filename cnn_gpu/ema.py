"""A moving average of a model's weights, evaluated in their place (Polyak averaging).

    ema = WeightEMA(model, decay=0.999)
    for x, y in batches:
        ...; optimizer.step(); ema.update()
    with ema.applied():          # the model holds the averages; its trained weights return after
        evaluate(model, ...)

Each update moves the average of every parameter and buffer a part (1 - d) of the way to its
current value, with d = min(decay, (1 + n) / (10 + n)) at the n-th update, so the first updates
follow the weights closely instead of keeping the random initialization for ~1 / (1 - decay)
steps (TensorFlow's ExponentialMovingAverage with num_updates). An average over the last
~1 / (1 - decay) steps sits nearer the middle of the valley SGD bounces around in than any one
step's weights do. Batch norm's running statistics are averaged like the parameters: they
follow the weights slowly anyway (timm's ModelEmaV2 does the same).

The averages live on the model's device, keyed like Layer.state_dict(); build the WeightEMA after
the model has moved (Layer.to replaces the arrays it reads).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from . import cpu
from .backend import is_cupy_array, to_device, to_numpy
from .layers import Layer


class WeightEMA:
    """The exponential moving average of `model`'s parameters and buffers (see the module docstring)."""

    def __init__(self, model: Layer, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.updates = model, decay, 0
        self.averages = {key: value.copy() for key, value in self._live()}

    def _live(self) -> Iterator[tuple[str, Any]]:
        """(state key, the model's array) for every parameter and buffer, looked up anew."""
        for key, p in self.model.named_parameters():
            yield key, p.data
        for key, value, _, _ in self.model.named_buffers():
            yield key, value

    def rate(self) -> float:
        """The decay d of the next update: decay, or less while few updates have been made."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def update(self) -> None:
        """average += (1 - d) * (weights - average), for every parameter and buffer (after a step)."""
        step = 1.0 - self.rate()
        self.updates += 1
        for key, live in self._live():
            average = self.averages[key]
            if is_cupy_array(average):  # one launch per array, not three
                from .cuda import elementwise  # noqa: PLC0415 - CuPy only
                elementwise.ema_update(average, live, step)
            else:
                average += step * (live - average)

    def buffers(self) -> list[Any]:
        """The averages of the model's buffers (for averaging them over ranks)."""
        return [self.averages[key] for key, _, _, _ in self.model.named_buffers()]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model computes with the averages inside the block; its own weights come back after,
        bit for bit. Both are copied into the model's arrays in place, so whatever holds those
        arrays (an optimizer's flat views, a captured CUDA graph) sees the change."""
        trained = [(live, live.copy()) for _, live in self._live()]
        try:
            for key, live in self._live():
                live[...] = self.averages[key]
                if isinstance(live, np.ndarray):  # an average can decay into subnormals, slow on the CPU
                    cpu.flush_subnormals(live)
            yield
        finally:
            for live, own in trained:
                live[...] = own

    def state_dict(self) -> dict[str, np.ndarray]:
        """The averages as NumPy arrays, keyed like Layer.state_dict()."""
        return {key: to_numpy(value).copy() for key, value in self.averages.items()}

    def load_state_dict(self, state: dict[str, Any], updates: int) -> None:
        """Take a checkpoint's averages and update count (names, shapes and dtypes must match the model's)."""
        self.model.check_state(state)
        backend = self.model.backend
        self.averages = {key: to_device(np.array(to_numpy(state[key])), backend) for key in self.averages}
        self.updates = int(updates)
