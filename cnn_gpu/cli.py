"""The `cnn-gpu` command: train, evaluate, predict, info, bench.

    cnn-gpu train --dataset fashion-mnist --epochs 15            # writes runs/fashion-mnist-<time>/
    cnn-gpu evaluate runs/fashion-mnist-<time>/best.npz          # accuracy, per class, confusion matrix
    cnn-gpu predict runs/.../best.npz images.npy shoe.png        # class names and probabilities
    cnn-gpu export runs/.../best.npz model.onnx                  # for onnxruntime, TensorRT
    cnn-gpu info                                                 # backend, device, versions, BLAS, MPI/NCCL
    cnn-gpu models                                               # the model zoo with parameter counts
    mpiexec -n 4 cnn-gpu train ...                               # data parallel on 4 ranks (see `train`)

Every error a user can cause ends in one `cnn-gpu: error: ...` line and a non-zero exit code; on
several ranks the line names the rank (`cnn-gpu: error: rank 1 of 4: ...`) and every rank stops.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import __version__, cpu, distributed
from .backend import (BackendUnavailableError, cupy_unavailable_reason, require_cupy, resolve_backend, to_device,
                      to_numpy)
from .checkpoint import Checkpoint, checkpoint_file, load_checkpoint
from .cpu import threads as cpu_threads
from .data import (DATASET_NAMES, IMAGE_FOLDER, RESIZE_MODES, Augmentation, DatasetNotFoundError, DownloadError,
                   NormStats, augmentation_defaults, augmentation_for, input_files, is_on_disk, load_dataset,
                   load_image_folder, normalize, read_input, subset, train_val_split)
from .data.datasets import canonical_name
from .functional import softmax
from .layers import Layer
from .models import DEFAULT_BATCH_NORM, MODELS, build, describe
from .optim import SGD, Adam, CosineLR, Optimizer, Schedule, StepLR, no_decay_parameters
from .recipes import DEFAULT_LR, LEGACY_SETTINGS, apply_recipe
from .distributed import Communicator, DistributedError, SingleProcess
from .training import DeviceOutOfMemory, TrainingDiverged, confusion_matrix, evaluate, fit, per_class_accuracy

PROG = "cnn-gpu"
DEFAULT_VAL_SIZE = 5000
WAIT_POLL = 0.01  # seconds between looks while the other ranks wait for rank 0 (reading data, writing plots)
# Settings a checkpoint records so that --resume continues the same run.
RUN_SETTINGS = ("model", "dataset", "channels", "image_size", "resize", "skip_bad_images", "label_mode",
                "batch_size", "lr", "momentum", "optimizer", "schedule", "weight_decay", "bias_decay", "batch_norm",
                "dropout", "augment", "max_shift", "label_smoothing", "erase", "ema", "val_size", "seed", "limit_train",
                "limit_test", "epochs")


Split = tuple[np.ndarray, np.ndarray]  # (images (N, H, W, C) uint8, labels (N,) int64)


class UsageError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit code 2."""


# ---- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train and use CNNs on MNIST and Fashion-MNIST "
                                     "with NumPy (CPU) or CuPy (GPU).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a model of the zoo; writes history, checkpoints and plots",
                           description="Train a model of the zoo. Under a launcher (mpiexec -n 4 cnn-gpu train "
                                       "..., srun, mpirun -H a,b) every rank trains its part of each batch: "
                                       "data parallel, one GPU per rank with --backend cupy.")
    train.add_argument("--model", choices=list(MODELS), default="seed_cnn",
                       help="the network (default seed_cnn; `cnn-gpu models` lists them)")
    train.add_argument("--dataset", choices=DATASET_NAMES, default="fashion-mnist",
                       help=f"a dataset, or {IMAGE_FOLDER!r}: a folder of your own images given as --data-dir, "
                            "sorted into one sub-folder per class (or train/ and test/ holding those)")
    train.add_argument("--data-dir", help="where the dataset's files are (default: searched, then downloaded); "
                                          "for --dataset images, the image folder")
    _add_image_options(train)
    train.add_argument("--epochs", type=_positive_int, default=None, help="default 15")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help="images per step over all ranks (default: the model's recipe, 64 for seed_cnn, "
                            "128 for the deeper networks)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                       help="default: the model's recipe (adam for the plain seed_cnn, sgd for the rest)")
    train.add_argument("--lr", type=_positive_float,
                       help="learning rate (default: the model's recipe: 0.001 with adam, 0.1 with sgd and batch "
                            "norm, 0.02 with sgd and without; `cnn_gpu/recipes.py`)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)")
    train.add_argument("--schedule", choices=("none", "step", "cosine"), default="cosine",
                       help="learning-rate schedule per epoch (default cosine; step: x0.1 every third of the run)")
    train.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="batch norm after each conv (default: off for seed_cnn, on for the others)")
    train.add_argument("--batch-norm-sync", choices=distributed.BATCH_NORM_SYNC, default="local",
                       help="on several ranks, batch norm's statistics: local, each rank's own images (default, "
                            "as PyTorch's DDP); sync, the whole batch's over all ranks (what one process computes)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random shifts (up to --max-shift pixels) and left-right flips where the dataset's "
                            "classes survive a mirror (not digits) (default on)")
    train.add_argument("--max-shift", type=_nonnegative_int, default=None,
                       help="with --augment: shift by up to this many pixels (default: the recipe's on the MNISTs, "
                            "0 for the plain seed_cnn, 1 with batch norm, 2 for the deeper networks; the dataset's "
                            "own elsewhere, 4 for CIFAR, an eighth of the side for an image folder)")
    train.add_argument("--dropout", type=_probability, default=0.0,
                       help="dropout probability before each dense layer of seed_cnn and vgg (default 0)")
    train.add_argument("--bias-decay", action=argparse.BooleanOptionalAction, default=None,
                       help="weight decay on biases and batch-norm scales and shifts too, not only on "
                            "weights (default off)")
    train.add_argument("--label-smoothing", type=_probability, default=None, metavar="S",
                       help="train towards (1 - S) * one-hot + S / classes (default: the recipe's, 0.1 for the "
                            "plain seed_cnn, else 0)")
    train.add_argument("--erase", type=_probability, default=None, metavar="P",
                       help="random erasing: noise over a random rectangle of each training image with "
                            "probability P (default 0)")
    train.add_argument("--ema", type=_decay, default=None, metavar="D",
                       help="keep a moving average of the weights (decay D per step, e.g. 0.999: about the "
                            "last 1000 steps) and evaluate, keep and export it (default: the recipe's, 0: none)")
    train.add_argument("--val-size", type=_nonnegative_int, default=None,
                       help=f"training images held out to choose the best epoch (default {DEFAULT_VAL_SIZE}, "
                            "a tenth of a smaller set; 0: no validation, best = last)")
    train.add_argument("--limit-train", type=_positive_int, metavar="N",
                       help="train on a random subset of N training images (quick tries, CI)")
    train.add_argument("--limit-test", type=_positive_int, metavar="N", help="evaluate on the first N test images")
    _add_backend(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="run directory (default runs/<dataset>-<date>-<time>)")
    train.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue a run from its last.npz (or the run folder holding it); its settings "
                            "come from the checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars; one line per epoch")
    train.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                       help="on the GPU: replay each training step and evaluation batch from a CUDA graph "
                            "(eager, with the reason logged, where it cannot be captured; not yet run on a GPU)")
    train.add_argument("--tf32", action="store_true",
                       help="on the GPU: float32 GEMMs on TF32 tensor cores (PyTorch's default for convolutions)")

    ev = sub.add_parser("evaluate", help="accuracy of a checkpoint on a dataset split, per class too")
    ev.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.npz)")
    ev.add_argument("--dataset", choices=DATASET_NAMES, help="default: the checkpoint's dataset")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test",
                    help="val: the validation images the run held out of the training split")
    ev.add_argument("--tta", action="store_true",
                    help="test-time augmentation: average the predictions for each image and its mirror "
                         "(datasets whose classes survive a mirror: not digits)")
    ev.add_argument("--data-dir", help="default: where the run read its data (an image folder) or the usual search")
    ev.add_argument("--batch-size", type=_positive_int, default=500)
    ev.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N images of the split")
    ev.add_argument("--plot", metavar="PNG", help="also write the confusion matrix as a PNG")
    _add_backend(ev)

    pr = sub.add_parser("predict", help="classify image files (PNG, JPEG, ...) or .npy/.npz arrays")
    pr.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.npz)")
    pr.add_argument("inputs", nargs="+", metavar="FILE",
                    help="files, or folders of them (every image and array inside, in name order): "
                         "images (PNG, JPEG, BMP, GIF, TIFF, WebP: needs Pillow), resized and converted to what "
                         "the model was trained on; or .npy/.npz arrays of that shape ((H, W), (N, H, W) or "
                         "(N, H, W, C)), uint8 0..255 or float 0..1")
    pr.add_argument("--top", type=_positive_int, default=3, help="how many classes to show per image")
    _add_backend(pr)

    exp = sub.add_parser("export", help="write a checkpoint's model as an ONNX file (onnxruntime, TensorRT)")
    exp.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.npz)")
    exp.add_argument("output", metavar="MODEL.onnx")

    sub.add_parser("info", help="backend, device, versions, BLAS, CPU count, MPI and NCCL")
    sub.add_parser("models", help="the model zoo: each network with its parameter count")
    sub.add_parser("bench", help="speed benchmarks (cnn_gpu.bench); arguments are passed on", add_help=False)
    return parser


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                        help="numpy (CPU) or cupy (GPU); auto picks cupy when a GPU is usable")


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="--dataset images: 1 (grey) or 3 (RGB) channels (default: what most images have)")
    parser.add_argument("--image-size", metavar="HxW", default=None,
                        help="--dataset images: the size every image is brought to (default: the size they share)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default=None,
                        help="--dataset images: how --image-size is reached: stretch (resize, the default) or "
                             "centre-crop to the aspect ratio, then scale (crop)")
    parser.add_argument("--skip-bad-images", action="store_true", default=None,
                        help="--dataset images: leave out files that cannot be decoded (and count them) "
                             "instead of stopping at the first")
    parser.add_argument("--label-mode", choices=("fine", "coarse"), default=None,
                        help="--dataset cifar100: the 100 fine classes (default) or the 20 coarse ones")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (0: none), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


# ---- main ------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # forwarded whole: its options belong to cnn_gpu.bench
        return _run_guarded(lambda: cmd_bench(argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed "cnn-gpu ...: error: ..." (2) or the help (0)
        return int(exc.code or 0)
    try:
        cpu_threads.count()  # a bad CNN_GPU_THREADS is a usage error, said before anything runs
    except ValueError as exc:
        _error(str(exc))
        return 2
    if args.command == "train":  # the one command that runs on several ranks
        try:
            comm = distributed.init(array_backend=resolve_backend(args.backend))  # before anything is on a GPU
        except (DistributedError, BackendUnavailableError, ValueError) as exc:
            _error(str(exc))  # no collective has run: each rank reports and stops on its own
            return 1
        return _run_guarded(lambda: cmd_train(args, comm), comm)
    commands = {"evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export, "info": cmd_info,
                "models": cmd_models}
    return _run_guarded(lambda: commands[args.command](args))


def _run_guarded(command: Any, comm: Communicator | None = None) -> int:
    """Run command() and return its exit code, turning the errors a user can cause into one line
    on stderr and an exit code.

    On several ranks (comm): an error on one rank prints the line naming that rank and stops every
    rank (comm.abort); a diverged loss, which every rank sees at the same step (its sums are
    reduced over ranks), is printed by rank 0 and ends every rank with its code (comm.finish with
    collective=True); a non-zero code returned by one rank stops the others (comm.finish).
    """
    comm = comm if comm is not None else SingleProcess()
    try:
        return comm.finish(command())
    except UsageError as exc:
        return _fail(comm, str(exc), 2)
    except TrainingDiverged as exc:
        if comm.rank == 0:
            _error(str(exc))
        return comm.finish(1, collective=True)
    except (ValueError, TypeError, DatasetNotFoundError, DownloadError, BackendUnavailableError,
            DeviceOutOfMemory, DistributedError,
            OSError) as exc:  # a missing or unwritable file, a full disk, a read-only folder
        return _fail(comm, str(exc), 1)
    except KeyboardInterrupt:
        return _fail(comm, "interrupted", 130)


def _fail(comm: Communicator, message: str, code: int) -> int:
    """One process: print the error line and return the code. Several ranks: comm.abort prints it
    naming this rank and stops every rank (returning would leave the others waiting for ever)."""
    if comm.size > 1:
        comm.abort(message, code)
    _error(message)
    return code


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# ---- train -----------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace, comm: Communicator | None = None) -> int:
    """Train one model; on several ranks (comm) every rank runs this, and rank 0 alone prints and
    writes (fit() does the same for its part)."""
    comm = comm if comm is not None else SingleProcess()
    say = print if comm.rank == 0 else _quiet
    _share_cores(comm, say)
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    resume: Checkpoint | None = None
    out = Path(args.out) if args.out else None
    if args.resume:
        resume_path = checkpoint_file(args.resume, "last.npz")  # a run folder: its last.npz
        resume = load_checkpoint(resume_path)  # on every rank
        recorded = resume.metadata.get("config")
        if not isinstance(recorded, dict):
            raise UsageError(f"{resume_path} records no run settings; it was not written by `{PROG} train`")
        settings = {**settings, **LEGACY_SETTINGS, **recorded, "epochs": args.epochs or recorded.get("epochs")}
        out = out or resume_path.resolve().parent
        say(f"resuming {resume_path} at epoch {resume.epoch}; the run's settings come from the checkpoint")
    settings["epochs"] = settings["epochs"] or 15
    shift_given = settings["max_shift"] is not None
    apply_recipe(settings)
    s = argparse.Namespace(**settings)
    backend = resolve_backend(args.backend)
    if out is None:
        out = Path("runs") / f"{s.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"

    with _rank0_first(comm):  # rank 0 finds (or downloads) the dataset; then the others read what it found
        train_set, (images, labels), val_data, (test_x, test_y) = _training_splits(s, args)
    val_size = 0 if val_data is None else len(val_data[1])
    if not shift_given and canonical_name(s.dataset) not in ("mnist", "fashion-mnist"):
        # The recipes' shifts were chosen on Fashion-MNIST; other data takes its own default
        # (CIFAR's 4-pixel crops, an eighth of the smaller side for an image folder).
        s.max_shift = augmentation_for(s.dataset, None, image_size=tuple(images.shape[1:3])).max_shift

    input_shape = tuple(int(d) for d in images.shape[1:])
    model_spec = {"name": s.model, "kwargs": _model_kwargs(s, train_set.num_classes, input_shape)}
    model = build(s.model, **model_spec["kwargs"])
    if backend == "cupy":
        model.to("gpu")
    optimizer = _optimizer(model, s)
    schedule = _schedule(optimizer, s)
    say(model.summary(tuple(images.shape[1:])))
    ranks = (f" | {comm.size} ranks ({comm.name}), {s.batch_size / comm.size:g} images each per step, "
             f"batch norm statistics {args.batch_norm_sync}") if comm.size > 1 else ""
    say(f"data: {s.dataset} from {train_set.source}: {len(labels)} training, {val_size} validation, "
        f"{len(test_y)} test images | backend {backend} | out {out}{ranks}")
    say(_describe_settings(s))
    metadata = {"model": model_spec, "input_shape": list(input_shape), "dataset": s.dataset,
                "data_options": dict(train_set.options), "data_dir": _recorded_dir(s.dataset, args.data_dir),
                "class_names": list(train_set.class_names), "config": {k: getattr(s, k) for k in RUN_SETTINGS},
                "batch_norm_sync": args.batch_norm_sync}
    started = time.perf_counter()
    if args.tf32:
        if backend != "cupy":
            raise UsageError("--tf32 is for the GPU (--backend cupy): the CPU has no TF32")
        from .cuda import gemm  # noqa: PLC0415 - the GPU's GEMM settings
        gemm.set_tf32(True)
    result = fit(model, optimizer, (images, labels), epochs=s.epochs, batch_size=s.batch_size,
                 schedule=schedule, val_data=val_data, test_data=(test_x, test_y),
                 augment=_augmentation(s), label_smoothing=s.label_smoothing, seed=s.seed, out_dir=out,
                 resume=resume, metadata=metadata, progress=not args.no_progress, comm=comm,
                 batch_norm_sync=args.batch_norm_sync, graph=args.cuda_graph, ema_decay=s.ema)
    wall = time.perf_counter() - started
    if result.history and comm.rank == 0:  # the files are rank 0's; the others wait for it
        _report_run(result, out, s, wall, val_data, (test_x, test_y), train_set.class_names, backend)
    comm.barrier(poll=WAIT_POLL, bounded=False)
    return 0


def _report_run(result: Any, out: Path, s: argparse.Namespace, wall: float, val_data: Split | None,
                test_data: Split, class_names: Sequence[str], backend: str) -> None:
    """After training: the final and best accuracies, mirror test-time augmentation, and the plots."""
    last, best = result.last, result.best
    test_x, test_y = test_data
    print(f"done in {wall / 60:.1f} min; history, last.npz and best.npz in {out}")
    print(f"final test accuracy (epoch {last['epoch']}): {last['test_accuracy']:.4f}")
    if val_data is not None:
        print(f"best validation epoch {best['epoch']} (val accuracy {best['val_accuracy']:.4f}): "
              f"test accuracy {best['test_accuracy']:.4f}")
    else:
        print("no validation split (--val-size 0): the best checkpoint is the last epoch")
    best_ckpt = load_checkpoint(out / "best.npz")
    best_model, stats = _model_from(best_ckpt, backend)
    if val_data is not None and _mirror_is_safe(s.dataset):
        _print_mirror_tta(best_model, stats, val_data, test_data, backend)
    _write_run_plots(out, result, best_model, stats, best_ckpt.epoch, test_x, test_y, class_names, backend)


@contextlib.contextmanager
def _rank0_first(comm: Communicator) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which wait at a barrier meanwhile,
    with no deadline: caching a large image folder may take longer than the collective timeout).
    An error on rank 0 stops every rank (_run_guarded), the waiting ones too."""
    if comm.rank != 0:
        comm.barrier(poll=WAIT_POLL, bounded=False)
    yield
    if comm.rank == 0:
        comm.barrier(poll=WAIT_POLL, bounded=False)


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _share_cores(comm: Communicator, say: Any = print) -> Any:
    """Several ranks on this machine: each rank's BLAS gets its share of the cores (those this
    process may run on, at most cores / ranks here), unless the environment chose a thread count
    (THREAD_VARS) or threadpoolctl is missing. N ranks each running a BLAS thread per core would
    fight over the cores. Returns threadpoolctl's limiter, or None where nothing changed."""
    if comm.local_size < 2 or any(v in os.environ for v in THREAD_VARS) or \
            importlib.util.find_spec("threadpoolctl") is None:
        return None
    from threadpoolctl import threadpool_limits

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, min(usable, (os.cpu_count() or 1) // comm.local_size))
    say(f"{comm.local_size} ranks on this machine: {threads} BLAS thread{'s' if threads > 1 else ''} each "
        f"(set OPENBLAS_NUM_THREADS to choose)")
    return threadpool_limits(limits=threads, user_api="blas")


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """print() on the ranks other than 0."""


def _training_splits(s: argparse.Namespace, args: argparse.Namespace) -> tuple[Any, Split, Split | None, Split]:
    """The dataset, and its (images, labels) for training, validation (None with --val-size 0)
    and test, after --limit-train / --limit-test. The validation images come out of the
    training split, the same ones for the same seed. An image folder's splits stay memory-mapped."""
    train_set, test_set = _load_splits(s.dataset, args.data_dir, _data_options(s), not args.no_progress)
    images, labels, val_data = _hold_out(train_set.images, train_set.labels, s.seed, s.limit_train, s.val_size)
    test_x, test_y = test_set.images, test_set.labels
    if s.limit_test is not None:
        test_x, test_y = subset(test_x, np.arange(min(s.limit_test, len(test_y)))), test_y[:s.limit_test]
    return train_set, (images, labels), val_data, (test_x, test_y)


def _data_options(s: argparse.Namespace) -> dict[str, Any]:
    """The data reader's options among the run's settings: an image folder's, CIFAR-100's label mode."""
    if canonical_name(s.dataset) == IMAGE_FOLDER:
        given = {"channels": s.channels, "image_size": s.image_size, "resize": s.resize, "skip_bad": s.skip_bad_images}
        return {k: v for k, v in given.items() if v is not None}
    for option in ("channels", "image_size", "resize", "skip_bad_images"):
        if getattr(s, option, None) is not None:
            raise UsageError(f"--{option.replace('_', '-')} is for --dataset images, not {s.dataset}")
    if s.label_mode is not None:
        if canonical_name(s.dataset) != "cifar100":
            raise UsageError(f"--label-mode is for --dataset cifar100, not {s.dataset}")
        return {"label_mode": s.label_mode}
    return {}


def _load_splits(dataset: str, data_dir: str | None, options: dict[str, Any], progress: bool) -> tuple[Any, Any]:
    """(train, test) Datasets; an image folder is read (or its cache reused) once, and what reading
    it did is printed."""
    if canonical_name(dataset) == IMAGE_FOLDER:
        if data_dir is None:
            raise UsageError("--dataset images reads the folder given as --data-dir (one sub-folder per class)")
        folder = load_image_folder(data_dir, progress=progress, **options)
        print(folder.describe())
        for note in folder.notes:
            print(f"note: {note}")
        return folder.train, folder.test
    return (load_dataset(dataset, "train", data_dir=data_dir, progress=progress, **options),
            load_dataset(dataset, "test", data_dir=data_dir, progress=progress, **options))


def _mirror_is_safe(dataset: str) -> bool:
    """Whether the dataset's classes survive a left-right mirror (its augmentation flips): then
    test-time augmentation by mirroring is offered."""
    return augmentation_defaults(canonical_name(dataset)).hflip


def _recorded_dir(dataset: str, data_dir: str | None) -> str | None:
    """An image folder's absolute path, recorded so that evaluate and --resume find it again."""
    if canonical_name(dataset) != IMAGE_FOLDER or data_dir is None:
        return None
    return str(Path(data_dir).resolve())


def _print_mirror_tta(model: Layer, stats: NormStats, val_data: Split, test_data: Split, backend: str) -> None:
    """The best checkpoint's accuracy with mirror test-time augmentation, validation first: it is
    the split that says whether the augmentation helps (BENCHMARKS.md: it did, for both networks)."""
    val_acc = _evaluate_arrays(model, stats, *val_data, backend, hflip=True)[1]
    test_acc = _evaluate_arrays(model, stats, *test_data, backend, hflip=True)[1]
    print(f"with mirror test-time augmentation (evaluate --tta): val accuracy {val_acc:.4f}, "
          f"test accuracy {test_acc:.4f}")


def _hold_out(images: np.ndarray, labels: np.ndarray, seed: int, limit_train: int | None,
              val_size: int | None) -> tuple[np.ndarray, np.ndarray, Split | None]:
    """The training split after --limit-train, less the validation images it holds out:
    (images, labels, (val_images, val_labels) or None). The same ones for the same settings, so
    `evaluate --split val` finds the images a run chose its best epoch on."""
    if limit_train is not None and limit_train < len(labels):
        keep = np.sort(np.random.default_rng([seed, 7]).permutation(len(labels))[:limit_train])
        images, labels = subset(images, keep), labels[keep]  # an on-disk set stays on disk
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE if len(labels) >= 10 * DEFAULT_VAL_SIZE else len(labels) // 10
    if val_size >= len(labels):
        raise UsageError(f"--val-size {val_size} leaves no training images (there are {len(labels)})")
    if val_size == 0:
        return images, labels, None
    images, labels, val_x, val_y = train_val_split(images, labels, val_size=val_size, seed=seed)
    return images, labels, (val_x, val_y)


def _model_kwargs(s: argparse.Namespace, num_classes: int, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The builder's arguments for the run's model; --dropout only where the model has dense layers."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "batch_norm": bool(s.batch_norm), "seed": s.seed}
    if tuple(input_shape) != (28, 28, 1) or s.model != "seed_cnn":
        kwargs["input_shape"] = list(input_shape)
    if s.dropout:
        if s.model not in ("seed_cnn", "vgg"):
            raise UsageError(f"--dropout applies to seed_cnn and vgg, not {s.model}")
        kwargs["dropout"] = s.dropout
    elif s.model == "seed_cnn":
        kwargs["dropout"] = 0.0
    return kwargs


def _describe_settings(s: argparse.Namespace) -> str:
    """The run's settings on one line, as `train` prints them."""
    decay = f"weight decay {s.weight_decay:g}" + ("" if s.bias_decay else " (weights only)")
    augment = _augmentation(s)
    return (f"settings: {s.optimizer} lr {s.lr:g}" + (f" momentum {s.momentum:g}" if s.optimizer == "sgd" else "")
            + f", {decay}, schedule {s.schedule}, batch {s.batch_size}, epochs {s.epochs}"
            + f" | augment: {augment.describe() if augment else 'none'}"
            + (f" | label smoothing {s.label_smoothing:g}" if s.label_smoothing else "")
            + (f" | weight average, decay {s.ema:g}" if s.ema else "")
            + f" | model {s.model}, batch norm {'on' if s.batch_norm else 'off'}"
            + (f" | dropout {s.dropout:g}" if s.dropout else "") + f" | seed {s.seed}")


def _augmentation(s: argparse.Namespace) -> Augmentation | None:
    """--augment's shifts and flips (the dataset says whether mirroring suits it), and --erase's
    random erasing (which works without --augment)."""
    if s.augment:
        return augmentation_for(s.dataset, s.max_shift, erase=s.erase)
    return Augmentation(erase=s.erase) if s.erase else None


def _optimizer(model: Layer, s: argparse.Namespace) -> Optimizer:
    lr = s.lr if s.lr is not None else DEFAULT_LR[s.optimizer]
    s.lr = lr
    no_decay = [] if s.bias_decay else no_decay_parameters(model)
    if s.optimizer == "adam":
        return Adam(model.parameters(), lr=lr, weight_decay=s.weight_decay, no_decay=no_decay)
    return SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay, no_decay=no_decay)


def _schedule(optimizer: Optimizer, s: argparse.Namespace) -> Schedule | None:
    if s.schedule == "cosine":
        return CosineLR(optimizer, total_epochs=s.epochs)
    if s.schedule == "step":
        return StepLR(optimizer, step_size=max(1, s.epochs // 3), gamma=0.1)
    return None


def _write_run_plots(out: Path, result: Any, model: Layer, stats: NormStats, epoch: int, test_x: np.ndarray,
                     test_y: np.ndarray, class_names: Sequence[str], backend: str) -> None:
    """learning_curves.png, and confusion_matrix.png of the best checkpoint (model, from `epoch`) on the test split."""
    from . import plots

    if not plots.matplotlib_available():
        print("note: matplotlib is not installed, so no plots were drawn (pip install cnn_gpu[plot])")
        return
    plots.plot_learning_curves(result.history, out / "learning_curves.png", best_epoch=result.best_epoch)
    _, acc, predictions = _evaluate_arrays(model, stats, test_x, test_y, backend)
    matrix = confusion_matrix(test_y, predictions, len(class_names))
    plots.plot_confusion_matrix(matrix, class_names, out / "confusion_matrix.png",
                                title=f"test split, epoch {epoch} (accuracy {acc:.4f})")
    print(f"plots: {out / 'learning_curves.png'}, {out / 'confusion_matrix.png'}")


# ---- evaluate --------------------------------------------------------------------------------------

def _model_from(ckpt: Checkpoint, backend: str) -> tuple[Layer, NormStats]:
    model = ckpt.build_model()
    if backend == "cupy":
        model.to("gpu")
    if ckpt.norm_mean is None:
        raise ValueError("the checkpoint holds no normalization statistics")
    return model, NormStats(mean=ckpt.norm_mean, std=ckpt.norm_std)


def _evaluate_arrays(model: Layer, stats: NormStats, images: Any, labels: Any, backend: str,
                     batch_size: int = 500, hflip: bool = False) -> tuple[float, float, np.ndarray]:
    if is_on_disk(images):  # evaluate reads and moves it a batch at a time
        x, y = images, np.asarray(labels, np.int64)
    else:
        x, y = to_device(images, backend), to_device(np.asarray(labels, np.int64), backend)
    return evaluate(model, x, y, batch_size=batch_size,
                    transform=lambda b: normalize(b, stats, dtype=model.dtype), hflip=hflip)


def _checkpoint_hold_out(ckpt: Checkpoint, images: np.ndarray, labels: np.ndarray) -> tuple:
    """The training split of a checkpoint's run, as _hold_out divided it: (images, labels, val or None).
    A checkpoint without the run's settings (not written by `train`) held nothing out."""
    config = ckpt.metadata.get("config")
    if not isinstance(config, dict):
        return images, labels, None
    return _hold_out(images, labels, int(config.get("seed", ckpt.seed)), config.get("limit_train"),
                     config.get("val_size"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(checkpoint_file(args.checkpoint, "best.npz"))
    backend = resolve_backend(args.backend)
    dataset = args.dataset or ckpt.metadata.get("dataset")
    if dataset is None:
        raise UsageError("the checkpoint does not name its dataset; give --dataset")
    if args.tta and not _mirror_is_safe(dataset):
        raise UsageError(f"--tta mirrors the images, which does not suit {dataset} (a mirrored digit is no digit)")
    options = ckpt.metadata.get("data_options") or {} if dataset == ckpt.metadata.get("dataset") else {}
    data_dir = args.data_dir or ckpt.metadata.get("data_dir")
    train_set, test_set = _load_splits(dataset, data_dir, dict(options), progress=False)
    data = test_set if args.split == "test" else train_set
    images, labels = data.images, data.labels
    if args.split != "test":
        images, labels, val_data = _checkpoint_hold_out(ckpt, images, labels)
        if args.split == "val":
            if val_data is None:
                raise UsageError(f"{args.checkpoint} was trained without a validation split (--val-size 0)")
            images, labels = val_data
    if args.limit is not None:
        images, labels = subset(images, np.arange(min(args.limit, len(labels)))), labels[:args.limit]
    model, stats = _model_from(ckpt, backend)
    num_classes = len(data.class_names)
    loss, acc, predictions = _evaluate_arrays(model, stats, images, labels, backend, args.batch_size, args.tta)
    print(f"{args.checkpoint} (epoch {ckpt.epoch}) on {dataset} {args.split} ({len(labels)} images"
          f"{', mirror test-time augmentation' if args.tta else ''}): accuracy {acc:.4f}, loss {loss:.4f}")
    per_class = per_class_accuracy(labels, predictions, num_classes)
    width = max(len(n) for n in data.class_names)
    print(f"\n{'class':<{width}}  accuracy  images")
    for name, value, count in zip(data.class_names, per_class, np.bincount(labels, minlength=num_classes)):
        print(f"{name:<{width}}  {value:8.4f}  {count:6d}")
    matrix = confusion_matrix(labels, predictions, num_classes)
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    print(_matrix_text(matrix, data.class_names))
    if args.plot:
        from . import plots

        if plots.matplotlib_available():
            plots.plot_confusion_matrix(matrix, data.class_names, args.plot,
                                        title=f"{dataset} {args.split} (accuracy {acc:.4f})")
            print(f"wrote {args.plot}")
        else:
            print("note: matplotlib is not installed, so no plot was drawn (pip install cnn_gpu[plot])")
    return 0


def _matrix_text(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    width = max(len(n) for n in class_names)
    cell = max(5, len(str(matrix.max())) + 1)
    header = " " * width + "".join(f"{i:>{cell}}" for i in range(len(class_names)))
    rows = [f"{name:<{width}}" + "".join(f"{v:>{cell}}" for v in row) + f"  ({i})"
            for i, (name, row) in enumerate(zip(class_names, matrix))]
    return "\n".join([header, *rows])


# ---- predict ---------------------------------------------------------------------------------------

def cmd_predict(args: argparse.Namespace) -> int:
    """Each file's top classes, after exactly the preprocessing the model was trained with: its
    input size and channels (images are resized and converted, and a note says so), its
    normalization statistics and class names, all read from the checkpoint."""
    ckpt = load_checkpoint(checkpoint_file(args.checkpoint, "best.npz"))
    backend = resolve_backend(args.backend)
    class_names = ckpt.metadata.get("class_names") or [str(i) for i in range(10)]
    input_shape = tuple(ckpt.metadata.get("input_shape") or (28, 28, 1))
    resize = (ckpt.metadata.get("data_options") or {}).get("resize", "resize")
    model, stats = _model_from(ckpt, backend)
    model.eval()
    top = min(args.top, len(class_names))
    for path in input_files(args.inputs):
        inputs = read_input(path, input_shape, resize)
        for note in inputs.notes:  # on stdout: stderr holds only errors
            print(f"note: {note}")
        x = to_device(inputs.images, backend)
        probs = np.concatenate([to_numpy(softmax(model.forward(normalize(x[i:i + 500], stats, dtype=model.dtype))))
                                for i in range(0, len(x), 500)])
        for name, p in zip(inputs.names, probs):
            order = np.argsort(-p)[:top]
            print(f"{name}: " + ", ".join(f"{class_names[k]} {p[k]:.3f}" for k in order))
    return 0


# ---- export ----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    """The checkpoint's model as ONNX (cnn_gpu.onnx): (N, H, W, C) float32 input, class names and the
    normalization in the file's metadata."""
    from . import onnx as cnn_onnx  # noqa: PLC0415 - needs the onnx package only here
    try:
        path = cnn_onnx.export_checkpoint(checkpoint_file(args.checkpoint, "best.npz"), args.output)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {path}: input (N, H, W, C) float32, normalized as its metadata_props say")
    return 0


# ---- info and bench --------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace | None = None) -> int:
    print(f"cnn_gpu   {__version__}")
    print(f"python    {platform.python_version()} ({platform.platform()})")
    print(f"numpy     {np.__version__}")
    reason = cupy_unavailable_reason()
    if reason is None:
        cupy = require_cupy()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"cupy      {cupy.__version__}, device {name} ({props['totalGlobalMem'] / 2**30:.1f} GiB)")
    else:
        print(f"cupy      not usable: {reason}")
    print(f"backend   {resolve_backend('auto')} (auto; set with --backend or $CNN_GPU_BACKEND)")
    print(f"blas      {_blas_info()}")
    print(f"cpu jit   {cpu.describe()}")
    print(f"threads   {cpu_threads.describe()}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"cpus      {os.cpu_count()}" + (f" ({affinity} usable by this process)" if affinity else ""))
    for status in distributed.backend_report():  # the communication backends of `mpiexec -n N cnn-gpu train`
        print(f"{status.name:<9} {'usable' if status.usable else 'not usable'}: {status.detail}")
    return 0


def cmd_models(args: argparse.Namespace | None = None) -> int:
    """The zoo: each model's parameters for 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR-10) images,
    10 classes, with its default batch norm setting and the other one."""
    print(f"{'model':10}  {'batch norm':10}  {'28x28x1':>9}  {'32x32x3':>9}  description")
    for name in MODELS:
        for batch_norm in (DEFAULT_BATCH_NORM[name], not DEFAULT_BATCH_NORM[name]):
            counts = [build(name, input_shape=shape, batch_norm=batch_norm).num_parameters()
                      for shape in ((28, 28, 1), (32, 32, 3))]
            note = describe(name) if batch_norm == DEFAULT_BATCH_NORM[name] else "(--" + (
                "" if batch_norm else "no-") + "batch-norm)"
            print(f"{name:10}  {'on' if batch_norm else 'off':10}  {counts[0]:9,}  {counts[1]:9,}  {note}")
    print("train one with `cnn-gpu train --model NAME`; in Python: cnn_gpu.models.build(NAME, input_shape=..., "
          "num_classes=...)")
    return 0


def _blas_info() -> str:
    """The BLAS numpy calls: threadpoolctl's view (with threads) when installed, else numpy's build config."""
    if importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_info

        found = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                 for i in threadpool_info() if i.get("user_api") == "blas"]
        if found:
            return "; ".join(found)
    try:
        config = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy or a differently shaped config
        return "unknown (numpy.show_config() prints the build details)"


def cmd_bench(argv: Sequence[str]) -> int:
    """Forward to cnn_gpu.bench.main(argv), which another part of the project provides."""
    try:
        bench = importlib.import_module("cnn_gpu.bench")  # lazily: the other commands never need it
    except ModuleNotFoundError as exc:
        if exc.name != "cnn_gpu.bench":
            raise
        _error("the bench command needs cnn_gpu.bench, which this installation does not have yet")
        return 1
    if not callable(getattr(bench, "main", None)):
        _error("cnn_gpu.bench has no main(argv) yet; run its modules directly, e.g. "
               "python -m cnn_gpu.bench.kernel_bandwidth")
        return 1
    return int(bench.main(list(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
