"""The reference run: a zoo model trained in PyTorch with the recipe `cnn-gpu train` uses, on the
same batches, for the accuracy tables of BENCHMARKS.md.

    python -m cnn_gpu.bench.torch_train --model resnet20 --json runs/torch-resnet20.json

Everything but the network's arithmetic is cnn_gpu's own, so the two runs differ only in it: the
dataset and its validation split (cli._hold_out), the normalization statistics, the shuffle and
the augmentation of each batch (BatchIterator with the run's seed), the starting weights (our
seeded initialization, copied by bench.reference.to_torch), the optimizer's settings (SGD with
momentum or Adam, weight decay on weights only, the learning rate set per epoch by the same
cosine schedule), label smoothing, the weight average (cnn_gpu.ema's recurrence, over parameters
and batch-norm statistics, evaluated beside the weights as trained), and the best epoch chosen
on validation accuracy. torch is
imported here only; cnn_gpu never depends on it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from typing import Any

import numpy as np

from ..data import BatchIterator, augmentation_for, compute_norm_stats, load_dataset, normalize
from ..models import build
from ..optim import SGD, CosineLR, no_decay_parameters
from ..recipes import apply_recipe
from .reference import to_torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn_gpu.bench.torch_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-shift", type=int, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--erase", type=float, default=None, help="random erasing probability (default: the recipe's)")
    p.add_argument("--ema", type=float, default=None, help="weight average decay (default: the recipe's; 0: none)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--json", default=None, help="where to write the per-epoch history")
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415

    from ..cli import DEFAULT_VAL_SIZE, _hold_out  # noqa: PLC0415 - the CLI's own split
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: dict[str, Any] = {"model": args.model, "batch_norm": args.batch_norm, "optimizer": None, "lr": args.lr,
                                "batch_size": args.batch_size, "max_shift": args.max_shift,
                                "label_smoothing": args.label_smoothing, "erase": args.erase, "ema": args.ema}
    apply_recipe(settings)
    train = load_dataset(args.dataset, "train")
    test = load_dataset(args.dataset, "test")
    images, labels, (val_x, val_y) = _hold_out(train.images, train.labels, args.seed, args.limit_train, None)
    stats = compute_norm_stats(images)
    shape = tuple(images.shape[1:])
    ours = build(args.model, input_shape=shape, num_classes=train.num_classes, batch_norm=settings["batch_norm"],
                 seed=args.seed)
    net = to_torch(ours, shape)
    # The optimizer's settings as ours: weight decay on weights only (no_decay: vectors).
    exempt = {id(p) for p in no_decay_parameters(ours)}
    pairs = list(zip(ours.parameters(), net.parameters()))
    groups = [{"params": [t for o, t in pairs if id(o) not in exempt], "weight_decay": args.weight_decay},
              {"params": [t for o, t in pairs if id(o) in exempt], "weight_decay": 0.0}]
    if settings["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=settings["lr"], momentum=args.momentum)
    else:
        opt = torch.optim.Adam(groups, lr=settings["lr"])
    # The learning rate of each epoch, from our own schedule (on a stand-in optimizer).
    schedule = CosineLR(SGD(ours.parameters(), lr=settings["lr"]), args.epochs)
    lrs = [settings["lr"]] + [schedule.step() for _ in range(args.epochs)]
    augment = augmentation_for(args.dataset, settings["max_shift"], erase=settings["erase"]) \
        if settings["augment"] else None
    loader = BatchIterator(images, labels, settings["batch_size"], shuffle=True, seed=args.seed, augment=augment,
                           transform=lambda x: normalize(x, stats))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"])

    def to_nchw(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    # The weight average: cnn_gpu.ema's recurrence on every float entry of the state (a torch
    # module's integer batch counter is left as trained; nothing reads it in eval mode).
    averaged = copy.deepcopy(net) if settings["ema"] else None
    updates = 0

    def update_average() -> None:
        nonlocal updates
        updates += 1
        d = min(settings["ema"], (1 + updates) / (10 + updates))
        with torch.no_grad():
            for average, live in zip(averaged.state_dict().values(), net.state_dict().values()):
                if average.is_floating_point():
                    average.lerp_(live, 1.0 - d)

    def evaluate(x: np.ndarray, y: np.ndarray, net: Any = net) -> tuple[float, float]:
        net.eval()
        loss, correct = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(y), 500):
                logits = net(to_nchw(normalize(x[i:i + 500], stats)))
                target = torch.from_numpy(np.asarray(y[i:i + 500], np.int64))
                loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(1) == target).sum())
        return loss / len(y), correct / len(y)

    history, best = [], None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | {args.model} batch norm "
          f"{settings['batch_norm']} | {settings['optimizer']} lr {settings['lr']} batch {settings['batch_size']} "
          f"shift {settings['max_shift']} smoothing {settings['label_smoothing']} erase {settings['erase']} "
          f"ema {settings['ema']} | "
          f"{len(labels)} train, "
          f"{len(val_y)} val (DEFAULT_VAL_SIZE {DEFAULT_VAL_SIZE}), {len(test.labels)} test", flush=True)
    for epoch in range(args.epochs):
        for group in opt.param_groups:
            group["lr"] = lrs[epoch]
        net.train()
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for x, y in loader.batches(epoch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(to_nchw(x)), torch.from_numpy(np.asarray(y, np.int64)))
            loss.backward()
            opt.step()
            if averaged is not None:
                update_average()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        if not math.isfinite(loss_sum):
            raise SystemExit(f"diverged at epoch {epoch + 1}")
        seconds = time.perf_counter() - started
        evaluated = averaged if averaged is not None else net  # as cnn-gpu train: the average when kept
        val_loss, val_acc = evaluate(val_x, val_y, evaluated)
        test_loss, test_acc = evaluate(test.images, test.labels, evaluated)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_loss": val_loss, "val_accuracy": val_acc,
                  "test_loss": test_loss, "test_accuracy": test_acc, "lr": lrs[epoch], "seconds": seconds}
        raw = ""
        if averaged is not None:
            record["raw_val_accuracy"] = evaluate(val_x, val_y)[1]
            record["raw_test_accuracy"] = evaluate(test.images, test.labels)[1]
            raw = f" (as trained {record['raw_val_accuracy']:.4f} / {record['raw_test_accuracy']:.4f})"
        history.append(record)
        if best is None or val_acc > best["val_accuracy"]:
            best = record
        print(f"epoch {epoch + 1:2d}/{args.epochs} | train loss {record['train_loss']:.4f} | val {val_acc:.4f} | "
              f"test {test_acc:.4f}{raw} | lr {lrs[epoch]:.4g} | {seconds:.0f}s", flush=True)
    print(f"best validation epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}): "
          f"test accuracy {best['test_accuracy']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "history": history, "best": best}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
