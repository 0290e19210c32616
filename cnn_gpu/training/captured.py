"""Training epochs and evaluations replayed from CUDA graphs: what fit(..., graph=True) runs on CuPy.

    reasons = capture_blockers(model, optimizer, train_images, augment)   # [] when it can be captured
    training = CapturedTraining(model, optimizer, train_images, train_labels, batch_size=256, seed=0,
                                norm_stats=stats, augment=augment, label_smoothing=0.1)
    result = training.train_epoch(epoch)           # EpochResult(loss, accuracy, seconds, steps)
    evaluation = CapturedEvaluation(model, val_images, val_labels, batch_size=500, norm_stats=stats)
    loss, accuracy = evaluation.run()

A step of the seed network is dozens of kernels of a few microseconds each, and launching each
from Python costs more than running it. Captured, the whole step is one graph launch. What a
captured step does, all on the device (no host work may happen inside a graph):
- the batch: gathered from the training set resident on the GPU, mirrored, shifted and
  normalized by one kernel that reads the step index from device memory (cnn_gpu.cuda.batches),
  with random draws keyed by (seed, epoch, step) (cnn_gpu.cuda.rng); the epoch's order is
  BatchIterator's, copied to the device once per epoch;
- forward, loss, backward: the model's own code, its GEMMs on our own cuBLAS handle
  (cnn_gpu.cuda.gemm);
- the update: SGD's or Adam's, its learning rate and bias corrections read from a per-step table
  on the device (cnn_gpu.cuda.device_optim), so a schedule needs no new capture;
- the loss and the count of right answers added into device sums, read once per epoch.
The first step of each batch size runs eagerly (it compiles every kernel and creates the
optimizer's state), then the step is captured (cnn_gpu.cuda.graph: a pool of its own for its
memory) and replayed; the short last batch of an epoch gets a graph of its own. A step that
cannot be captured runs eagerly, the same code, and the log says why, once.

Results do not depend on capture: every step, eager or replayed, launches the same kernels with
the same arguments, so a captured epoch equals the same epoch run eagerly (graph=False) bit for
bit on one card. Against fit's eager loop (BatchIterator, CuPy's matmul, the optimizers' step()),
the batches without augmentation are the same bit for bit and the GEMMs may round differently;
with augmentation the draws are Philox's, not NumPy's.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import layers as L
from ..backend import is_cupy_array, require_cupy
from ..cuda import gemm
from ..cuda.batches import DeviceBatches, check_augment
from ..cuda.device_optim import DeviceOptimizer, unsupported_reason
from ..cuda.graph import CaptureError, CapturedGraph, capture
from ..data import NormStats, is_on_disk
from ..functional import softmax_cross_entropy
from ..model import Graph
from ..optim import Optimizer

# Layers whose forward and backward on CuPy arrays launch kernels only (no host copies, reads or
# host generators): checked under capture by tests/test_captured.py.
CAPTURABLE_LAYERS = (L.Conv2D, L.Dense, L.BatchNorm1D, L.BatchNorm2D, L.MaxPool2D, L.GlobalAvgPool2D, L.ReLU,
                     L.LeakyReLU, L.Clip, L.Sigmoid, L.Tanh, L.SiLU, L.HardSigmoid, L.HardSwish, L.Softmax,
                     L.Identity, L.Flatten, L.Add, L.Concat, Graph)


def _why_not(layer: L.Layer, training: bool) -> str | None:
    """Why one layer cannot be captured (in training or in evaluation), or None."""
    if isinstance(layer, L.Dropout):
        # In eval mode, or with p = 0, dropout is the identity and draws nothing.
        return "draws its masks from a generator seeded on the host" if training and layer.p > 0 else None
    if isinstance(layer, L.AvgPool2D):
        return "copies its divisor from the host at every call"
    if not isinstance(layer, CAPTURABLE_LAYERS):
        return "has not been checked under capture"
    return None


def capture_blockers(model: L.Layer, optimizer: Optimizer | None = None, images: Any = None,
                     augment: Any = None, training: bool = True) -> list[str]:
    """Why a training step (training=True: with this optimizer, training images and augmentation)
    or an evaluation (training=False) of this model cannot be replayed from a CUDA graph: one
    reason per obstacle, [] when nothing stands in the way."""
    reasons = []
    if model.backend != "cupy":
        reasons.append("the model is on the CPU (CUDA graphs need the cupy backend)")
    for path, layer in model.named_layers():
        why = _why_not(layer, training)
        if why is not None:
            reasons.append(f"layer {path or 'model'} ({type(layer).__name__}) {why}")
    if optimizer is not None:
        reason = unsupported_reason(optimizer)
        if reason is not None:
            reasons.append(reason)
    if images is not None:
        if is_on_disk(images):
            reasons.append("the training images are read from disk (memory-mapped); a captured epoch needs "
                           "them resident on the GPU")
        elif images.dtype != np.uint8:
            reasons.append(f"the training images are {images.dtype}; the device pipeline takes uint8")
    try:
        check_augment(augment)
    except ValueError as exc:
        reasons.append(str(exc))
    return reasons


class DeviceSums:
    """The loss and the right answers of the steps so far, summed on the device; read once."""

    def __init__(self) -> None:
        cupy = require_cupy()
        self.loss = cupy.zeros((), dtype=np.float64)
        self.correct = cupy.zeros((), dtype=np.int64)

    def reset(self) -> None:
        self.loss.fill(0)
        self.correct.fill(0)

    def add(self, loss: Any, logits: Any, labels: Any, rows: int) -> None:
        """loss (0-d, the batch mean) * rows and the batch's right answers, into the sums (in place)."""
        self.loss += loss.astype(np.float64) * rows
        self.correct += (logits.argmax(axis=1) == labels).sum()

    def read(self) -> tuple[float, int]:
        """(loss sum, right answers): the one device-to-host read."""
        return float(self.loss), int(self.correct)


class _Steps:
    """A step body per batch size, run eagerly the first time, then replayed from its graph (or
    eagerly for good, once a capture has failed). Shared by training and evaluation."""

    def __init__(self, graph: bool, say: Callable[[str], None], what: str) -> None:
        self.use_graph, self.say, self.what = graph, say, what
        self.graphs: dict[int, CapturedGraph] = {}
        self.pool = require_cupy().cuda.MemoryPool() if graph else None  # the graphs' memory
        self.fallback: str | None = None if graph else "graph=False"

    def run(self, rows: int, body: Callable[[int], None]) -> None:
        graph = self.graphs.get(rows)
        if graph is not None:
            graph.launch()
            return
        with gemm.capturable():
            body(rows)  # eagerly: the first step of this size compiles what the capture will replay
        if self.fallback is not None:
            return
        try:
            self.graphs[rows] = capture(lambda: body(rows), self.pool)
        except CaptureError as exc:
            self.fallback = str(exc)
            self.say(f"cuda graph: the {self.what} runs eagerly: it could not be captured ({exc})")

    def reset(self) -> None:
        """Forget every graph (the arrays they were captured with were replaced)."""
        self.graphs.clear()
        if self.use_graph and self.fallback is None:
            self.pool = require_cupy().cuda.MemoryPool()

    @property
    def mode(self) -> str:
        return "graph" if self.fallback is None else f"eager ({self.fallback})"


class EpochResult(NamedTuple):
    loss: float       # mean training loss over the epoch (against smoothed targets with label smoothing)
    accuracy: float   # fraction of the epoch's training samples classified right
    seconds: float    # wall time of the epoch's steps, to the end of the one read of the sums
    steps: int


class CapturedTraining:
    """Training epochs of `model` on a GPU-resident training set, step after step from CUDA graphs.

    images (N, H, W, C) uint8 and labels (N,) integers, NumPy or CuPy (copied to the GPU once);
    norm_stats: the per-channel statistics fit normalizes with; augment: None or an Augmentation
    without erasing; graph=False runs the same steps eagerly (for comparison and as the fallback).
    The model, optimizer and schedule are the caller's: the optimizer's `lr` is read at each
    epoch's start, its `steps` advanced on the host, the parameters updated in place.
    """

    def __init__(self, model: L.Layer, optimizer: Optimizer, images: Any, labels: Any, *, batch_size: int,
                 seed: int, norm_stats: NormStats, augment: Any = None, label_smoothing: float = 0.0,
                 graph: bool = True, log: Callable[[str], None] | None = print) -> None:
        reasons = capture_blockers(model, optimizer, images, augment)
        if reasons:
            raise ValueError("a captured training step cannot run: " + "; ".join(reasons))
        self.model, self.optimizer, self.label_smoothing = model, optimizer, float(label_smoothing)
        self.data = DeviceBatches(images, labels, batch_size, seed, norm_stats, augment, dtype=model.dtype)
        self.updates = DeviceOptimizer(optimizer, self.data.step, capacity=self.data.steps)
        self.sums = DeviceSums()
        self._steps = _Steps(graph, log or (lambda _msg: None), "training step")
        self._arrays = self._addresses()

    @property
    def mode(self) -> str:
        """'graph', or 'eager (why)'."""
        return self._steps.mode

    def _body(self, rows: int) -> None:
        """One training step of `rows` samples, all on the device (the graph's contents)."""
        x, y = self.data.fill(rows)
        logits = self.model.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, y, self.label_smoothing)
        self.model.backward(dlogits)
        self.updates.update()
        self.optimizer.zero_grad()
        self.sums.add(loss, logits, y, rows)
        self.data.advance()

    def _addresses(self) -> tuple[int, ...]:
        """The device addresses a graph was captured with: parameters, optimizer state, buffers."""
        arrays = self.updates.state_arrays() + [value for _, value, _, _ in self.model.named_buffers()]
        return tuple(a.data.ptr for a in arrays if is_cupy_array(a))

    def train_epoch(self, epoch: int, progress: Callable[[int], None] | None = None) -> EpochResult:
        """Every step of epoch `epoch` (0-based; its order and draws depend on (seed, epoch)), then
        one read of the sums. progress(step) is called after each step, without waiting for it."""
        self.model.train()
        addresses = self._addresses()
        if addresses != self._arrays:  # e.g. load_state_dict replaced the parameters: capture anew
            self._steps.reset()
            self._arrays = addresses
        started = time.perf_counter()
        self.data.begin_epoch(epoch)
        self.updates.begin(self.data.steps)
        self.sums.reset()
        for step in range(self.data.steps):
            self._steps.run(self.data.rows(step), self._body)
            self.updates.stepped()
            if progress is not None:
                progress(step + 1)
        loss_sum, correct = self.sums.read()
        return EpochResult(loss_sum / self.data.n, correct / self.data.n, time.perf_counter() - started,
                           self.data.steps)


class CapturedEvaluation:
    """The mean loss and accuracy of `model` (in eval mode) on a GPU-resident split, batch after
    batch from CUDA graphs: fit's evaluate() without predictions. Arguments as CapturedTraining's."""

    def __init__(self, model: L.Layer, images: Any, labels: Any, *, batch_size: int, norm_stats: NormStats,
                 graph: bool = True, log: Callable[[str], None] | None = print) -> None:
        reasons = capture_blockers(model, None, images, training=False)
        if reasons:
            raise ValueError("a captured evaluation cannot run: " + "; ".join(reasons))
        self.model = model
        self.data = DeviceBatches(images, labels, batch_size, 0, norm_stats, dtype=model.dtype, shuffle=False)
        self.sums = DeviceSums()
        self._steps = _Steps(graph, log or (lambda _msg: None), "evaluation")
        self._arrays: tuple[int, ...] = ()

    @property
    def mode(self) -> str:
        return self._steps.mode

    def _body(self, rows: int) -> None:
        x, y = self.data.fill(rows)
        logits = self.model.forward(x)
        loss, _ = softmax_cross_entropy(logits, y)
        self.sums.add(loss, logits, y, rows)
        self.data.advance()

    def run(self) -> tuple[float, float]:
        """(mean loss, accuracy) over the split; the model's train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            addresses = tuple(a.data.ptr for a in [p.data for p in self.model.parameters()]
                              + [v for _, v, _, _ in self.model.named_buffers()])
            if addresses != self._arrays:
                self._steps.reset()
                self._arrays = addresses
            self.data.begin_epoch(0)
            self.sums.reset()
            for step in range(self.data.steps):
                self._steps.run(self.data.rows(step), self._body)
            loss_sum, correct = self.sums.read()
        finally:
            self.model.train(was_training)
        return loss_sum / self.data.n, correct / self.data.n


class CapturedForward:
    """model.forward(x) of a fixed input buffer, replayed from a CUDA graph: call() -> the output,
    the same array every time (overwritten by the next call). Fill `x` in place between calls."""

    def __init__(self, model: L.Layer, x: Any) -> None:
        self.model, self.x = model, x
        with gemm.capturable():
            model.forward(x)  # compile everything once, eagerly
        self.out: Any = None

        def body() -> None:
            self.out = model.forward(x)
        self.graph = capture(body, require_cupy().cuda.MemoryPool())

    def __call__(self) -> Any:
        self.graph.launch()
        return self.out


class CapturedStep:
    """One SGD training step on fixed device buffers x, y, replayed from a CUDA graph: forward,
    loss, backward and update, as the benchmark's eager step does (cnn_gpu.bench). The learning
    rate is the optimizer's at construction. The first step runs eagerly, at construction
    (first_loss is its loss); each call then replays one."""

    def __init__(self, model: L.Layer, optimizer: Optimizer, x: Any, y: Any, label_smoothing: float = 0.0) -> None:
        from ..optim import SGD  # noqa: PLC0415
        if type(optimizer) is not SGD:
            raise ValueError(f"CapturedStep takes SGD (fixed scalars); got {type(optimizer).__name__}")
        cupy = require_cupy()
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.updates = DeviceOptimizer(optimizer, cupy.zeros(1, dtype=np.int32), capacity=1)
        self.updates.begin(1)

        def step() -> Any:
            logits = model.forward(x)
            loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing)
            model.backward(dlogits)
            self.updates.update()
            optimizer.zero_grad()
            return loss
        with gemm.capturable():
            self.first_loss = step()
        self.updates.stepped()
        self.loss: Any = None

        def body() -> None:
            self.loss = step()  # the graph's loss buffer: written by each replay
        self.graph = capture(body, cupy.cuda.MemoryPool())

    def __call__(self) -> Any:
        """One step; returns the loss array (0-d, on the device, overwritten by the next step)."""
        self.graph.launch()
        self.updates.stepped()
        return self.loss
