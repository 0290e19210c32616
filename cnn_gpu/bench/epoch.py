"""How long an epoch of the seed network takes on the GPU, validation included.

    python -m cnn_gpu.bench.epoch [--data-dir DIR] [--epochs 3] [--batch-size 256] [--json epoch.json]

The target: one Fashion-MNIST epoch (55,000 training images at batch 256, then the 5,000 held out
for validation) in under TARGET_SECONDS on an H100 or H200. Each epoch runs captured (cnn_gpu.
training.captured: every training step and every validation batch replayed from CUDA graphs), with
the seed network's recipe of `cnn-gpu train` (Adam 1e-3, weight decay 5e-4 on the weights, mirror
flips, label smoothing 0.1) and a cosine schedule; epoch 1 includes the first (eager) step of each
batch size and the captures, the later epochs are the steady state that the target is about.
For reference, one epoch of fit's eager loop (BatchIterator, normalize, Optimizer.step) with
eager evaluation follows.

Fashion-MNIST is read from --data-dir (or cnn_gpu's usual places) when it is there, else random
uint8 images of its shape stand in: an epoch's time does not depend on the pixels.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from ..backend import require_cupy, synchronize, to_device
from ..data import BatchIterator, augmentation_for, compute_norm_stats, load_dataset, normalize, train_val_split
from ..functional import softmax_cross_entropy
from ..models import seed_cnn
from ..optim import Adam, CosineLR, no_decay_parameters
from ..training.captured import CapturedEvaluation, CapturedTraining
from ..training.evaluate import evaluate

TARGET_SECONDS = 0.5
VAL_SIZE = 5000


def fashion_mnist(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (60000, 28, 28, 1) uint8, labels, where they came from)."""
    try:
        train = load_dataset("fashion-mnist", "train", data_dir=data_dir, download=False, progress=False)
        return train.images, train.labels, "Fashion-MNIST"
    except Exception as exc:  # no local copy: stand-ins of the same shape
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
        return images, rng.integers(0, 10, 60000).astype(np.int64), f"random images ({type(exc).__name__})"


def _recipe(model: Any, epochs: int) -> tuple[Adam, CosineLR]:
    opt = Adam(model.parameters(), lr=1e-3, weight_decay=5e-4, no_decay=no_decay_parameters(model))
    return opt, CosineLR(opt, epochs)


def captured_epochs(images: np.ndarray, labels: np.ndarray, val: tuple, epochs: int, batch_size: int) -> list[dict]:
    stats = compute_norm_stats(images)
    model = seed_cnn().to("gpu")
    opt, schedule = _recipe(model, epochs)
    training = CapturedTraining(model, opt, images, labels, batch_size=batch_size, seed=0, norm_stats=stats,
                                augment=augmentation_for("fashion-mnist", max_shift=0), label_smoothing=0.1)
    evaluation = CapturedEvaluation(model, *val, batch_size=500, norm_stats=stats)
    records = []
    for epoch in range(epochs):
        started = time.perf_counter()
        result = training.train_epoch(epoch)
        val_started = time.perf_counter()
        val_loss, val_accuracy = evaluation.run()
        done = time.perf_counter()
        schedule.step()
        records.append({"epoch": epoch + 1, "mode": training.mode, "evaluation_mode": evaluation.mode,
                        "train_seconds": val_started - started, "val_seconds": done - val_started,
                        "seconds": done - started, "images_per_second": len(labels) / result.seconds,
                        "train_loss": result.loss, "train_accuracy": result.accuracy,
                        "val_loss": val_loss, "val_accuracy": val_accuracy})
    return records


def eager_epoch(images: np.ndarray, labels: np.ndarray, val: tuple, batch_size: int) -> dict:
    """One epoch of fit's eager loop on the same data and recipe, with eager evaluation."""
    stats = compute_norm_stats(images)
    model = seed_cnn().to("gpu")
    opt, _ = _recipe(model, 1)
    augment = augmentation_for("fashion-mnist", max_shift=0)
    loader = BatchIterator(to_device(images, "cupy"), to_device(labels, "cupy"), batch_size, seed=0, augment=augment,
                           transform=lambda x: normalize(x, stats))
    val_x, val_y = to_device(val[0], "cupy"), to_device(val[1], "cupy")
    synchronize()
    started = time.perf_counter()
    for x, y in loader.batches(0):
        loss, d = softmax_cross_entropy(model.forward(x), y, 0.1)
        model.backward(d)
        opt.step()
        opt.zero_grad()
    synchronize()
    val_started = time.perf_counter()
    evaluate(model, val_x, val_y, batch_size=500, transform=lambda x: normalize(x, stats))
    done = time.perf_counter()
    return {"train_seconds": val_started - started, "val_seconds": done - val_started, "seconds": done - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_gpu.bench.epoch", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-eager", action="store_true", help="skip the eager reference epoch")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cupy = require_cupy()
    images, labels, source = fashion_mnist(args.data_dir)
    train_x, train_y, val_x, val_y = train_val_split(images, labels, val_size=VAL_SIZE, seed=0)
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    print(f"# {name.decode() if isinstance(name, bytes) else name}: seed network, {source}, {len(train_y)} training "
          f"and {len(val_y)} validation images, batch {args.batch_size}; target < {TARGET_SECONDS} s per epoch")
    records = captured_epochs(train_x, train_y, (val_x, val_y), args.epochs, args.batch_size)
    for r in records:
        print(f"captured epoch {r['epoch']}: train {r['train_seconds']:.3f} s + validation {r['val_seconds']:.3f} s "
              f"= {r['seconds']:.3f} s ({r['images_per_second']:.0f} img/s) | train loss {r['train_loss']:.4f} "
              f"acc {r['train_accuracy']:.4f} | val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.4f} | "
              f"{r['mode']}, evaluation {r['evaluation_mode']}", flush=True)
    eager = None if args.no_eager else eager_epoch(train_x, train_y, (val_x, val_y), args.batch_size)
    if eager is not None:
        print(f"eager epoch (fit's loop): train {eager['train_seconds']:.3f} s + validation "
              f"{eager['val_seconds']:.3f} s = {eager['seconds']:.3f} s")
    steady = min(r["seconds"] for r in records[1:]) if len(records) > 1 else records[0]["seconds"]
    verdict = "met" if steady < TARGET_SECONDS else "NOT met"
    print(f"target (< {TARGET_SECONDS} s per epoch, validation included): {verdict}: {steady:.3f} s "
          f"(the best epoch after the first)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "batch_size": args.batch_size, "captured": records, "eager": eager,
                       "target_seconds": TARGET_SECONDS, "steady_seconds": steady}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
