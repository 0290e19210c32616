"""Training checkpoints: one .npz file that holds everything needed to continue a run.

A checkpoint holds, under flat keys (np.load(path, allow_pickle=False) reads every one):

    model/<path>.<name>       the model's parameters and buffers (Layer.state_dict: '0.weight',
                              'stage1.block0.conv1.weight', ...)
    optimizer/<key>           the optimizer's lr, step count and momentum/Adam arrays
    schedule/<key>            the learning-rate schedule's epoch and base lr (absent: no schedule)
    epoch                     () int64, epochs completed
    seed                      () int64, the run's seed; every random draw of epoch e derives
                              from (seed, e), so (seed, epoch) *is* the random state to continue
    best_epoch, best_score    () the best epoch so far and its validation accuracy (NaN: none yet)
    ema/<path>.<name>,        with a weight average (fit(ema_decay=...), cnn_gpu.ema): the averaged
    ema_updates               parameters and buffers, keyed as model/, and () int64 its update count;
                              these are the weights that were evaluated, so build_model() loads them
    norm/mean, norm/std       (C,) float64, the training split's normalization statistics
    metadata                  () unicode: JSON with the architecture (cnn_gpu.config: every layer and
                              its arguments), the model builder and its kwargs, the input shape, the
                              dataset, class names, library version, and the run's settings
    history                   () unicode: JSON list of the per-epoch records so far

Files are written atomically (temporary file, fsync, rename), so a crash leaves the previous
checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_write
from .config import from_config
from .layers import Layer
from .models import MODELS
from .npz import load_npz, save_npz_atomic
from .optim import Optimizer, Schedule

FORMAT_VERSION = 1


_SCALARS = ("epoch", "seed", "best_epoch", "best_score", "metadata", "history", "format_version")


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as NumPy arrays and plain Python values."""

    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    schedule_state: dict[str, np.ndarray] | None
    epoch: int
    seed: int
    norm_mean: np.ndarray | None = None  # (C,) float64
    norm_std: np.ndarray | None = None  # (C,) float64
    metadata: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0: no best yet
    best_score: float = float("nan")
    ema_state: dict[str, np.ndarray] | None = None  # the weight averages (None: the run kept none)
    ema_updates: int = 0

    @property
    def evaluated_state(self) -> dict[str, np.ndarray]:
        """The weights the history's accuracies were measured with: the averages when the run
        kept them, else the trained weights."""
        return self.ema_state if self.ema_state is not None else self.model_state

    def build_model(self) -> Layer:
        """A new model from the metadata's builder, with the evaluated weights loaded."""
        model = build_model(self.metadata)
        model.load_state_dict(self.evaluated_state)
        return model


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write a checkpoint atomically (see the module docstring for the keys)."""
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in ckpt.model_state.items()}
    arrays.update({f"optimizer/{k}": v for k, v in ckpt.optimizer_state.items()})
    if ckpt.schedule_state is not None:
        arrays.update({f"schedule/{k}": v for k, v in ckpt.schedule_state.items()})
    if ckpt.ema_state is not None:
        arrays.update({f"ema/{k}": v for k, v in ckpt.ema_state.items()})
        arrays["ema_updates"] = np.array(ckpt.ema_updates, dtype=np.int64)
    if ckpt.norm_mean is not None:
        arrays["norm/mean"] = np.asarray(ckpt.norm_mean, dtype=np.float64)
        arrays["norm/std"] = np.asarray(ckpt.norm_std, dtype=np.float64)
    arrays.update(
        format_version=np.array(FORMAT_VERSION, dtype=np.int64),
        epoch=np.array(ckpt.epoch, dtype=np.int64),
        seed=np.array(ckpt.seed, dtype=np.int64),
        best_epoch=np.array(ckpt.best_epoch, dtype=np.int64),
        best_score=np.array(ckpt.best_score, dtype=np.float64),
        # JSON in a numpy unicode array: readable with allow_pickle=False, unlike an object array.
        metadata=np.array(json.dumps(ckpt.metadata)),
        history=np.array(json.dumps(ckpt.history)),
    )
    save_npz_atomic(path, arrays)


def checkpoint_file(path: str | os.PathLike, in_run: str = "best.npz") -> Path:
    """The checkpoint a user means by `path`: the file itself, or for a run folder (what
    `cnn-gpu train --out` writes) its `in_run` file (best.npz to evaluate, last.npz to resume).
    Raises FileNotFoundError naming what was looked for."""
    path = Path(path)
    if not path.is_dir():
        return path  # a file, or nothing: load_checkpoint says which
    inside = path / in_run
    if not inside.is_file():
        raise FileNotFoundError(f"{path} is a folder without {in_run}: give a checkpoint file, or a run folder "
                                "that `cnn-gpu train` wrote")
    return inside


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint.

    Raises FileNotFoundError when there is no file, and ValueError naming the file when it is
    truncated, corrupted, or not a training checkpoint (e.g. a bare model state from Layer.save).
    """
    arrays = load_npz(path)  # refuses pickles; a clear ValueError for a damaged zip
    missing = [k for k in _SCALARS if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not a cnn_gpu training checkpoint: missing {', '.join(missing)}")
    version = int(arrays["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {version}; this cnn_gpu ({__version__}) "
                         f"reads up to {FORMAT_VERSION}; upgrade cnn_gpu")
    try:
        metadata = json.loads(str(arrays["metadata"]))
        history = json.loads(str(arrays["history"]))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the checkpoint's metadata is not valid JSON: {exc}") from exc

    def section(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    schedule, ema = section("schedule/"), section("ema/")
    return Checkpoint(
        model_state=section("model/"), optimizer_state=section("optimizer/"),
        schedule_state=schedule or None, epoch=int(arrays["epoch"]), seed=int(arrays["seed"]),
        norm_mean=arrays.get("norm/mean"), norm_std=arrays.get("norm/std"),
        metadata=metadata, history=history, best_epoch=int(arrays["best_epoch"]),
        best_score=float(arrays["best_score"]), ema_state=ema or None,
        ema_updates=int(arrays["ema_updates"]) if "ema_updates" in arrays else 0)


def build_model(metadata: dict[str, Any]) -> Layer:
    """The model a checkpoint's metadata describes, with fresh weights: from its architecture (a
    cnn_gpu.config dict), or, for checkpoints written before architectures were stored, from its
    builder {"model": {"name": "seed_cnn", "kwargs": {...}}}."""
    architecture = metadata.get("architecture")
    if architecture is not None:
        return from_config(architecture)
    spec = metadata.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("the checkpoint's metadata does not say how to build the model "
                         "(expected an 'architecture', or {'model': {'name': ..., 'kwargs': {...}}})")
    name = spec["name"]
    if name not in MODELS:
        raise ValueError(f"the checkpoint names model builder {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**spec.get("kwargs", {}))


def restore(ckpt: Checkpoint, model: Layer, optimizer: Optimizer | None = None,
            schedule: Schedule | None = None) -> None:
    """Load a checkpoint's states into an existing model, optimizer and schedule (names, shapes
    and dtypes are checked first by Layer.load_state_dict)."""
    model.load_state_dict(ckpt.model_state)
    if optimizer is not None:
        if not ckpt.optimizer_state:
            raise ValueError("the checkpoint holds no optimizer state")
        optimizer.load_state_dict(ckpt.optimizer_state)
    if schedule is not None:
        if ckpt.schedule_state is None:
            raise ValueError("the checkpoint holds no schedule state, but a schedule was given")
        schedule.load_state_dict(ckpt.schedule_state)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """json.dump to a temporary file beside `path`, fsync, then rename over it."""
    def write(f: Any) -> None:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
    atomic_write(path, write, binary=False)
