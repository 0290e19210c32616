"""fit(): the epoch loop, with evaluation, history, checkpoints, resume and clear failures.

    result = fit(model, SGD(model.parameters(), lr=0.05, momentum=0.9), (train_x, train_y),
                 epochs=15, val_data=(val_x, val_y), test_data=(test_x, test_y), out_dir="runs/x")

Images are uint8 (N, H, W, C); fit normalizes each batch with the training split's statistics.
Randomness: epoch e's shuffle, augmentation and dropout masks all derive from (seed, e) alone,
so stopping after epoch k and resuming from its checkpoint gives the same weights, bit for bit
on the CPU, as a run that never stopped.

Honest accuracy: the best epoch is the one with the highest *validation* accuracy (a split held
out of the training data); the test split is only reported, never used to choose. Without a
validation split the best epoch is the last.

Several ranks (comm, from cnn_gpu.distributed.init under mpiexec or srun): every rank calls fit()
with the same arguments and trains its shard of each global batch of batch_size images
(cnn_gpu.distributed.Replicas keeps the replicas identical); losses, accuracies and the
divergence check are sums over ranks; validation and test are split over the ranks; only rank 0
logs, shows progress and writes files. N ranks match one process on the same global batches up
to the order of float sums, with batch_norm_sync="sync" for models with batch norm, and except
for dropout, whose masks each rank draws for itself (see _seed_dropout). One process runs
exactly the single-process loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import __version__, cpu
from ..backend import module_for, to_device, to_numpy
from ..checkpoint import Checkpoint, load_checkpoint, restore, save_checkpoint, write_json_atomic
from ..data import BatchIterator, NormStats, compute_norm_stats, is_on_disk, normalize
from ..distributed import Communicator, Replicas, SingleProcess
from ..ema import WeightEMA
from ..functional import softmax_cross_entropy
from ..config import layer_config
from ..layers import Layer
from ..optim import Optimizer, Schedule
from .errors import DeviceOutOfMemory, TrainingDiverged, is_out_of_memory
from .evaluate import evaluate_on_ranks
from .progress import ProgressBar

Split = tuple[Any, Any]  # (images (N, H, W, C), labels (N,))
AugmentFn = Callable[[Any, np.random.Generator], Any]

_DROPOUT_STREAM = 2  # BatchIterator uses stream 1 of (seed, epoch) for augmentation


@dataclass
class FitResult:
    """What fit() leaves behind: one record per epoch and the epoch chosen on validation."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 when no epoch ran
    out_dir: Path | None = None

    @property
    def best(self) -> dict[str, Any] | None:
        """The history record of the best epoch."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), None)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


def fit(model: Layer, optimizer: Optimizer, train_data: Split, *, epochs: int,
        batch_size: int = 64, schedule: Schedule | None = None, val_data: Split | None = None,
        test_data: Split | None = None, norm_stats: NormStats | None = None,
        augment: AugmentFn | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | Checkpoint | None = None, metadata: dict[str, Any] | None = None,
        progress: bool = True, eval_batch_size: int = 500, label_smoothing: float = 0.0,
        log: Callable[[str], None] | None = print, comm: Communicator | None = None,
        batch_norm_sync: str = "local", graph: bool = False, ema_decay: float = 0.0) -> FitResult:
    """Train `model` for `epochs` epochs (in total, counting those of a resumed checkpoint).

    train_data, val_data, test_data: (images uint8 (N, H, W, C), labels int (N,)) on the host;
        they are copied to the model's device once, except images on disk (a memory-mapped image
        folder, cnn_gpu.data.is_on_disk), which are read a batch at a time.
    batch_size: images per step over all ranks (the global batch).
    norm_stats: per-channel mean/std; default: computed from train_data's images.
    augment(x, rng): applied to each uint8 training batch before normalization.
    out_dir: where history.json, last.npz and best.npz go (None: nothing is written).
    resume: a checkpoint (path or loaded) whose model, optimizer, schedule, epoch, seed, history
        and normalization statistics replace the ones given; training continues after its epoch.
        A checkpoint written by any number of ranks resumes on any other.
    metadata: stored in checkpoints as JSON (e.g. {"model": {"name": "seed_cnn", "kwargs": {...}},
        "dataset": ..., "class_names": [...]}); the architecture, library version and number of
        ranks are added.
    progress: a tqdm bar per epoch when tqdm is installed. log: where the one-line-per-epoch
        summaries go (None: silent).
    graph: on CuPy, replay each training step and evaluation batch from a CUDA graph
        (cnn_gpu.training.captured: the dataset resident on the GPU, each batch gathered and
        augmented there); where that cannot be done the eager loop runs and the log says why.
    label_smoothing: the training loss's target is (1 - s) * one_hot + s / num_classes
        (a regularizer); train_loss is that smoothed loss, val_loss and test_loss the plain one.
    ema_decay: with d in (0, 1), keep an exponential moving average of the weights (cnn_gpu.ema,
        updated after every step) and evaluate, choose the best epoch and export with it; the
        weights as trained are evaluated too, as raw_val_* and raw_test_* in each record, and
        both are in the checkpoints. 0: no average.
    comm: the communicator of a run on several ranks (cnn_gpu.distributed.init); None: one process.
    batch_norm_sync: "local" (each rank's own shard's batch statistics, the default) or "sync"
        (the global batch's); see cnn_gpu.distributed.replicas for how the running statistics
        stay equal on every rank in both.

    Raises TrainingDiverged on a NaN, infinite or exploding loss (on every rank at the same step),
    DeviceOutOfMemory when a batch does not fit, ValueError for labels outside [0, num_classes).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    comm = comm if comm is not None else SingleProcess()
    if batch_size < comm.size or len(train_data[1]) < comm.size:
        raise ValueError(f"every rank needs images of each batch: batch_size {batch_size} and the "
                         f"{len(train_data[1])} training images must be at least the {comm.size} ranks")
    say = log if log is not None and comm.rank == 0 else (lambda _msg: None)
    # 1. Where the run starts: fresh, or from a checkpoint's states, history and statistics (every
    #    rank reads it); then rank 0's weights and buffers on every rank.
    run = _RunState(seed=seed, norm_stats=norm_stats, metadata=dict(metadata or {}))
    ckpt = None if resume is None else resume if isinstance(resume, Checkpoint) else load_checkpoint(resume)
    if ckpt is not None:
        run.resume_from(ckpt, model, optimizer, schedule, say)
    replicas = Replicas(comm, model, batch_norm_sync)
    ema = _weight_average(model, ema_decay, ckpt, say)  # after the broadcast: the same on every rank
    # 2. The data: checked once on the host, then on the model's device, normalized per batch there
    #    (per shard: each rank normalizes only the images it trains on).
    num_classes = _num_classes(model, tuple(train_data[0].shape[1:]))
    for name, split in (("training", train_data), ("validation", val_data), ("test", test_data)):
        if split is not None:
            _check_labels(split, num_classes, name)
    if run.norm_stats is None:
        run.norm_stats = compute_norm_stats(train_data[0])
    run.metadata.update(architecture=layer_config(model), cnn_gpu_version=__version__, ranks=comm.size)
    backend, dtype, stats = model.backend, model.dtype, run.norm_stats
    train_x, train_y = _to(train_data, backend)
    val, test = _to(val_data, backend), _to(test_data, backend)

    def transform(x: Any) -> Any:
        return normalize(x, stats, dtype=dtype)

    loader = BatchIterator(train_x, train_y, batch_size, shuffle=True, seed=run.seed, augment=augment,
                           device=backend if is_on_disk(train_x) else None)
    out = Path(out_dir) if out_dir is not None else None
    result = FitResult(history=run.history, best_epoch=run.best_epoch, out_dir=out)
    if run.start_epoch >= epochs:
        say(f"the checkpoint has already trained {run.start_epoch} epochs (>= {epochs}); nothing to do")
        return result
    captured = _captured_steps(graph, model, optimizer, train_x, train_y, val, test, batch_size, eval_batch_size,
                               run, augment, label_smoothing, comm, say, ema)
    # 3. The epochs: train, evaluate, step the schedule, keep the best by validation, save.
    for epoch in range(run.start_epoch, epochs):  # 0-based here, 1-based in records and messages
        started, lr = time.perf_counter(), optimizer.lr
        with _out_of_memory_as_error(backend, batch_size, epoch):
            _seed_dropout(model, run.seed, epoch, comm)
            if captured is not None:  # the same steps replayed from CUDA graphs
                loss, acc, seconds = captured.train_epoch(epoch, num_classes, optimizer.lr)
            else:
                loss, acc, seconds = _train_epoch(model, optimizer, loader, transform, replicas, epoch, epochs,
                                                  progress, label_smoothing, num_classes, ema,
                                                  first=epoch == run.start_epoch)
            replicas.share_running_statistics(ema.buffers() if ema is not None else ())
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss, "train_accuracy": acc}
            if label_smoothing:
                record["label_smoothing"] = label_smoothing  # train_loss is against smoothed targets
            splits = {"val": val, "test": test}
            if ema is not None:  # the weights as trained, then their average (which the checkpoints evaluate)
                record.update(_evaluate(model, splits, captured, comm, eval_batch_size, transform, prefix="raw_"))
                record["ema_decay"] = ema.decay
            with ema.applied() if ema is not None else contextlib.nullcontext():
                record.update(_evaluate(model, splits, captured, comm, eval_batch_size, transform))
        if schedule is not None:
            schedule.step()
        record.update(lr=lr, seconds=time.perf_counter() - started,
                      images_per_second=len(train_y) / seconds if seconds > 0 else float("nan"), ranks=comm.size)
        improved = run.add(record, has_validation=val is not None)
        result.best_epoch = run.best_epoch
        say(_epoch_line(record, epochs, improved and val is not None))
        if out is not None:
            replicas.on_rank0(lambda: _save_epoch(out, run, model, optimizer, schedule, epoch + 1, improved, ema))
    return result


def _weight_average(model: Layer, decay: float, ckpt: Checkpoint | None,
                    say: Callable[[str], None]) -> WeightEMA | None:
    """fit's weight average: None for decay 0; else the checkpoint's averages when it kept them,
    or a fresh average of the current weights."""
    if not decay:
        return None
    ema = WeightEMA(model, decay)
    if ckpt is not None and ckpt.ema_state is not None:
        ema.load_state_dict(ckpt.ema_state, ckpt.ema_updates)
    elif ckpt is not None:
        say(f"the checkpoint kept no weight average; the average (decay {decay:g}) starts from its weights")
    return ema


def _evaluate(model: Layer, splits: dict[str, Split | None], captured: "_Captured | None", comm: Communicator,
              batch_size: int, transform: Callable[[Any], Any], prefix: str = "") -> dict[str, float]:
    """{prefix + 'val_loss': ..., prefix + 'val_accuracy': ..., and test's}: the model as it
    holds its weights now, over the ranks (a captured evaluation replays what it captured, reading
    the same arrays)."""
    record = {}
    for name, split in splits.items():
        if split is None:
            continue
        if captured is not None and name in captured.evaluations:
            loss, acc = captured.evaluations[name].run()
        else:
            loss, acc = evaluate_on_ranks(model, *split, comm, batch_size=batch_size, transform=transform)
        record[f"{prefix}{name}_loss"], record[f"{prefix}{name}_accuracy"] = loss, acc
    return record


class _Captured:
    """fit(graph=True) on CuPy: training epochs and evaluations replayed from CUDA graphs
    (cnn_gpu.training.captured), with divergence checked on the epoch's mean loss."""

    def __init__(self, training: Any, evaluations: dict[str, Any]) -> None:
        self.training, self.evaluations = training, evaluations

    def train_epoch(self, epoch: int, num_classes: int, lr: float) -> tuple[float, float, float]:
        r = self.training.train_epoch(epoch)
        if not r.loss <= divergence_threshold(num_classes):  # NaN compares False
            raise TrainingDiverged(f"training diverged: the loss became {r.loss:g} over epoch {epoch + 1}; "
                                   f"try a lower learning rate (it was {lr:g})", epoch + 1, r.steps)
        return r.loss, r.accuracy, r.seconds


def _captured_steps(graph: bool, model: Layer, optimizer: Optimizer, train_x: Any, train_y: Any,
                    val: Split | None, test: Split | None, batch_size: int, eval_batch_size: int,
                    run: "_RunState", augment: AugmentFn | None, label_smoothing: float, comm: Communicator,
                    say: Callable[[str], None], ema: WeightEMA | None = None) -> _Captured | None:
    """The captured steps when graph=True and nothing stands in the way; else None (the eager loop
    runs), with the reason said once."""
    if not graph:
        return None
    from .captured import CapturedEvaluation, CapturedTraining, capture_blockers  # noqa: PLC0415 - CuPy only
    reasons = capture_blockers(model, optimizer, train_x, augment)
    reasons += ["several ranks train it (data parallel steps are not captured)"] if comm.size > 1 else []
    reasons += ["it keeps a weight average (updated between captured steps)"] if ema is not None else []
    if reasons:
        say("cuda graph: training runs eagerly: " + "; ".join(reasons))
        return None
    training = CapturedTraining(model, optimizer, train_x, train_y, batch_size=batch_size, seed=run.seed,
                                norm_stats=run.norm_stats, augment=augment, label_smoothing=label_smoothing, log=say)
    evaluations = {}
    if not capture_blockers(model, training=False):
        for name, split in (("val", val), ("test", test)):
            if split is not None and not is_on_disk(split[0]):
                evaluations[name] = CapturedEvaluation(model, *split, batch_size=eval_batch_size,
                                                       norm_stats=run.norm_stats, log=say)
    return _Captured(training, evaluations)


@dataclass
class _RunState:
    """What a run carries from epoch to epoch, and what its checkpoints hold besides the states."""

    seed: int
    norm_stats: NormStats | None
    metadata: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf

    def resume_from(self, ckpt: Checkpoint, model: Layer, optimizer: Optimizer, schedule: Schedule | None,
                    say: Callable[[str], None]) -> None:
        restore(ckpt, model, optimizer, schedule)
        if ckpt.seed != self.seed:
            say(f"resuming with the checkpoint's seed {ckpt.seed} (not {self.seed}) to continue identically")
        self.seed, self.start_epoch, self.history = ckpt.seed, ckpt.epoch, list(ckpt.history)
        self.best_epoch = ckpt.best_epoch
        self.best_score = -math.inf if math.isnan(ckpt.best_score) else ckpt.best_score
        if ckpt.norm_mean is not None:
            self.norm_stats = NormStats(mean=ckpt.norm_mean, std=ckpt.norm_std)
        self.metadata = {**ckpt.metadata, **self.metadata}
        say(f"resumed from epoch {self.start_epoch} of a run with seed {self.seed}")

    def add(self, record: dict[str, Any], has_validation: bool) -> bool:
        """Append an epoch's record; True when it is the new best: the highest validation accuracy
        (the earliest on ties), or without validation, the last epoch."""
        self.history.append(record)
        score = record.get("val_accuracy", math.inf)
        improved = not has_validation or score > self.best_score
        if improved:
            self.best_epoch, self.best_score = record["epoch"], score
        return improved


def _save_epoch(out: Path, run: _RunState, model: Layer, optimizer: Optimizer, schedule: Schedule | None,
                epoch: int, improved: bool, ema: WeightEMA | None = None) -> None:
    """best.npz (when improved), last.npz and history.json, each written atomically."""
    ckpt = Checkpoint(
        model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
        schedule_state=schedule.state_dict() if schedule is not None else None,
        epoch=epoch, seed=run.seed, norm_mean=run.norm_stats.mean, norm_std=run.norm_stats.std,
        metadata=run.metadata, history=run.history, best_epoch=run.best_epoch,
        best_score=run.best_score if math.isfinite(run.best_score) else float("nan"),
        ema_state=ema.state_dict() if ema is not None else None, ema_updates=ema.updates if ema is not None else 0)
    # best before last: a crash between the two leaves last.npz one epoch behind, and resuming
    # from it redoes that epoch identically.
    if improved:
        save_checkpoint(out / "best.npz", ckpt)
    save_checkpoint(out / "last.npz", ckpt)
    write_json_atomic(out / "history.json", run.history)


@contextlib.contextmanager
def _out_of_memory_as_error(backend: str, batch_size: int, epoch: int) -> Iterator[None]:
    """Turn running out of memory (MemoryError, CuPy's OutOfMemoryError) into DeviceOutOfMemory,
    which says what to change."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        where = "GPU" if backend == "cupy" else "host"
        raise DeviceOutOfMemory(
            f"out of memory on the {where} at batch size {batch_size} (epoch {epoch + 1}); "
            f"try a smaller batch size, e.g. --batch-size {max(1, batch_size // 2)}", batch_size) from exc


# A training loss this many times that of a uniform guess (log K for K classes) has diverged,
# though its dtype still holds it: the right class then has probability below e^(-100 log K).
DIVERGED_LOSS_FACTOR = 100.0


def divergence_threshold(num_classes: int) -> float:
    """The mean training loss above which fit() stops with TrainingDiverged (finite or not)."""
    return DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))


def _train_epoch(model: Layer, optimizer: Optimizer, loader: BatchIterator, transform: Callable[[Any], Any],
                 replicas: Replicas, epoch: int, epochs: int, progress: bool, label_smoothing: float,
                 num_classes: int, ema: WeightEMA | None = None, first: bool = False) -> tuple[float, float, float]:
    """One pass over the training data. Returns (mean loss, accuracy, seconds), over all ranks.
    first: the run's first epoch in this process, whose first step compiles the CPU kernels that
    Numba's disk cache does not hold yet (a minute for a ResNet-20's, the first time): the bar says
    so until that step is done.

    The loss and the count of right answers are summed on the device and read only when the
    progress bar is refreshed (every step on the CPU, where reading costs nothing; every
    `sync_every` steps on the GPU, where each read waits for the queued work), then totalled over
    ranks. The mean loss of the steps since the last read is checked then: NaN, infinite, or above
    divergence_threshold() raises TrainingDiverged, on every rank at the same step. NumPy's
    overflow and invalid-value warnings are silenced meanwhile: an exploding step trips them
    before its loss is read, and this check is what reports it.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _train_steps(model, optimizer, loader, transform, replicas, epoch, epochs, progress,
                            label_smoothing, num_classes, ema, first)


def _train_steps(model: Layer, optimizer: Optimizer, loader: BatchIterator, transform: Callable[[Any], Any],
                 replicas: Replicas, epoch: int, epochs: int, progress: bool, label_smoothing: float,
                 num_classes: int, ema: WeightEMA | None = None, first: bool = False) -> tuple[float, float, float]:
    model.train()
    limit = divergence_threshold(num_classes)
    xp = module_for(model.backend)  # the loader's images may be a memory map on the host
    on_gpu = xp is not np
    sync_every = 50 if on_gpu else 1
    steps = len(loader)
    loss_sum, correct = xp.zeros((), dtype=np.float64), xp.zeros((), dtype=np.int64)
    seen, synced_step, synced_seen, synced_loss = 0, 0, 0.0, 0.0
    started = time.perf_counter()
    with ProgressBar(steps, f"epoch {epoch + 1}/{epochs}", enabled=progress and replicas.is_rank0) as bar:
        if first and not on_gpu and cpu.enabled():
            bar.note("compiling the CPU kernels not yet in Numba's cache")
        for step, shard in enumerate(replicas.shards(loader.batches(epoch), transform), start=1):
            if replicas.trains_on(shard):
                logits = model.forward(shard.x)
                loss, dlogits = softmax_cross_entropy(logits, shard.y, label_smoothing)
                model.backward(replicas.scaled(dlogits, shard))
                replicas.average_gradients()
                optimizer.step()
                optimizer.zero_grad()
                if ema is not None:
                    ema.update()
                loss_sum += loss.astype(np.float64) * len(shard.y)
                correct += (logits.argmax(axis=1) == shard.y).sum()
                seen += len(shard.y)
            if step % sync_every == 0 or step == steps:
                # the one device->host read per refresh, and the totals over ranks
                total, right, count = replicas.comm.sum_scalars([float(loss_sum), int(correct), seen])
                if count > synced_seen:  # else every step since the last read was skipped
                    recent = (total - synced_loss) / (count - synced_seen)  # mean loss since the last read
                    _check_divergence(recent, limit, epoch, step, synced_step, steps, optimizer.lr)
                synced_loss, synced_seen = total, count
                elapsed = time.perf_counter() - started
                bar.update(step - synced_step, loss=total / count, acc=right / count,
                           img_s=count / elapsed if elapsed > 0 else 0.0)
                synced_step = step
    return total / count, right / count, time.perf_counter() - started


def _check_divergence(recent: float, limit: float, epoch: int, step: int, synced_step: int, steps: int,
                      lr: float) -> None:
    """Raise TrainingDiverged when the mean loss of steps synced_step + 1 .. step is NaN,
    infinite or above limit."""
    if recent <= limit:  # NaN compares False
        return
    where = f"step {step}" if synced_step + 1 == step else f"a step in {synced_step + 1}..{step}"
    what = f"became {recent:g}" if not math.isfinite(recent) else \
        f"exploded to {recent:.3g} (above {limit:.0f}, {DIVERGED_LOSS_FACTOR:.0f}x a uniform guess's)"
    raise TrainingDiverged(
        f"training diverged: the loss {what} at epoch {epoch + 1}, {where} "
        f"of {steps}; try a lower learning rate (it was {lr:g})", epoch + 1, step)


def _epoch_line(record: dict[str, Any], epochs: int, best: bool) -> str:
    width = len(str(epochs))
    parts = [f"epoch {record['epoch']:>{width}}/{epochs}",
             f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}"]
    for name in ("val", "test"):
        if f"{name}_loss" in record:
            raw = f" (as trained {record['raw_' + name + '_accuracy']:.4f})" if f"raw_{name}_accuracy" in record else ""
            parts.append(f"{name} loss {record[name + '_loss']:.4f} acc {record[name + '_accuracy']:.4f}{raw}")
    parts.append(f"lr {record['lr']:.4g}")
    parts.append(f"{record['images_per_second']:.0f} img/s {record['seconds']:.1f}s")
    return " | ".join(parts) + (" *best" if best else "")


def _to(split: Split | None, backend: str) -> Split | None:
    """A split on the model's device; images on disk (a memory-mapped image folder) stay there,
    with their labels on the host, and are read and moved a batch at a time."""
    if split is None:
        return None
    images, labels = split
    if is_on_disk(images):
        return images, np.asarray(labels, np.int64)
    return to_device(images, backend), to_device(np.asarray(labels, np.int64), backend)


def _num_classes(model: Layer, sample_shape: tuple[int, ...]) -> int:
    """The width of the model's output for one sample of this shape (checks the shapes fit, too)."""
    shape = model.output_shape(sample_shape)
    if len(shape) != 1:
        raise ValueError(f"the model's output per sample has shape {shape}; a classifier needs (num_classes,)")
    return shape[0]


def _check_labels(split: Split, num_classes: int, name: str) -> None:
    """Once per run, on the host: on the GPU the loss does not check labels (it would sync every step)."""
    images, labels = split
    labels = to_numpy(labels)
    if len(images) != len(labels):
        raise ValueError(f"the {name} split has {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"the {name} split is empty")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"the {name} labels must be integers, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"the {name} labels must be in [0, {num_classes}) for this model, "
                         f"got values from {low} to {high}")


def _seed_dropout(model: Layer, seed: int, epoch: int, comm: Communicator) -> None:
    """Give each layer that draws random numbers (Dropout: reseed) a generator derived from
    (seed, epoch, its place in the model), so a resumed run draws the same masks as one that never
    stopped. With several ranks the rank joins the seed: each rank draws masks for its own
    images (the same seed everywhere would give the i-th image of every shard the same mask)."""
    rank = [comm.rank] if comm.size > 1 else []
    for i, (_, layer) in enumerate(model.named_layers()):
        if hasattr(layer, "reseed"):
            layer.reseed(int(np.random.SeedSequence([seed, epoch, _DROPOUT_STREAM, i, *rank]).generate_state(1)[0]))
