"""The cnn-gpu command, run in-process through main([...]) on a tiny IDX dataset in tmp_path."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from cnn_gpu.cli import main
from cnn_gpu.data import read_idx

from .train_fixtures import write_tiny_idx_dataset


@pytest.fixture(autouse=True)
def _no_real_cache(tmp_path, monkeypatch):
    """Nothing under the real ~/.cache or $CNN_GPU_DATA, and runs/ lands in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CNN_GPU_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny `cnn-gpu train` run shared by the tests that need a checkpoint:
    (data dir, run dir, its argv, its exit code, its stdout)."""
    root = tmp_path_factory.mktemp("cli")
    data = write_tiny_idx_dataset(root / "data")
    out = root / "run"
    argv = ["train", "--data-dir", str(data), "--epochs", "2", "--limit-train", "120", "--val-size", "20",
            "--batch-size", "20", "--lr", "0.02", "--out", str(out), "--no-progress", "--seed", "3"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return data, out, argv, code, stdout.getvalue()


def test_train_end_to_end(trained_run):
    data, out, argv, code, text = trained_run
    assert code == 0
    assert "total parameters: 225,034" in text  # the model summary
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert "final test accuracy (epoch 2): " in text and "best validation epoch" in text
    assert "with mirror test-time augmentation (evaluate --tta): val accuracy " in text
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and {"val_accuracy", "test_accuracy"} <= set(history[0])
    assert (out / "last.npz").exists() and (out / "best.npz").exists()
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "confusion_matrix.png").exists()


def test_evaluate_prints_accuracy_per_class_and_confusion(trained_run, capsys):
    data, out, *_ = trained_run
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data)]) == 0
    text = capsys.readouterr().out
    assert "on fashion-mnist test (60 images): accuracy" in text
    assert "Ankle boot" in text and "confusion matrix" in text


def test_predict_on_npy_and_png(trained_run, tmp_path, capsys):
    data, out, *_ = trained_run
    images = read_idx(data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")[:3]
    np.save(tmp_path / "three.npy", images)
    np.save(tmp_path / "one.npy", images[0].astype(np.float32) / 255)
    assert main(["predict", str(out / "best.npz"), str(tmp_path / "three.npy"), str(tmp_path / "one.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"{tmp_path / 'three.npy'}[0]: ")
    probabilities = [float(part.rsplit(" ", 1)[1]) for part in lines[3].split(": ", 1)[1].split(", ")]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    pytest.importorskip("matplotlib")
    import matplotlib.image

    matplotlib.image.imsave(tmp_path / "shirt.png", images[0], cmap="gray", vmin=0, vmax=255)
    assert main(["predict", str(out / "best.npz"), str(tmp_path / "shirt.png"), "--top", "1"]) == 0
    note, prediction = capsys.readouterr().out.strip().splitlines()
    assert note == f"note: {tmp_path / 'shirt.png'}: converted RGBA -> L"  # imsave writes RGBA; the model takes grey
    assert prediction.startswith(f"{tmp_path / 'shirt.png'}: ")


def test_a_run_folder_and_a_folder_of_inputs(trained_run, tmp_path, capsys):
    data, out, *_ = trained_run
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data)]) == 0
    by_file = capsys.readouterr().out
    assert main(["evaluate", str(out), "--data-dir", str(data)]) == 0  # the run folder: its best.npz
    assert capsys.readouterr().out.replace(str(out), str(out / "best.npz")) == by_file
    images = read_idx(data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")[:3]
    (tmp_path / "in" / "more").mkdir(parents=True)
    np.save(tmp_path / "in" / "b.npy", images[:2])
    np.save(tmp_path / "in" / "more" / "a.npy", images[2])
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    files = [str(tmp_path / "in" / "b.npy"), str(tmp_path / "in" / "more" / "a.npy")]  # name order
    assert main(["predict", str(out), *files]) == 0
    listed = capsys.readouterr().out
    assert main(["predict", str(out), str(tmp_path / "in")]) == 0
    assert capsys.readouterr().out == listed and len(listed.splitlines()) == 3


def test_predict_refuses_a_wrong_image_size(trained_run, tmp_path, capsys):
    out = trained_run[1]
    np.save(tmp_path / "big.npy", np.zeros((32, 32), np.uint8))
    assert main(["predict", str(out / "best.npz"), str(tmp_path / "big.npy")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnn-gpu: error: ") and "28x28 grayscale" in err and len(err.splitlines()) == 1


def test_resume_continues_the_run(trained_run, tmp_path, capsys):
    data, out, argv, *_ = trained_run
    split_out = tmp_path / "split"
    first = [*argv[:argv.index("--out")], "--out", str(split_out), "--no-progress", "--seed", "3"]
    first[first.index("--epochs") + 1] = "1"
    assert main(first) == 0
    # the run folder stands for its last.npz (checkpoint_file)
    assert main(["train", "--resume", str(split_out), "--epochs", "2", "--data-dir", str(data),
                 "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    straight = json.loads((out / "history.json").read_text())
    resumed = json.loads((split_out / "history.json").read_text())
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in straight]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]


def test_info_runs(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "numpy" in text and "blas" in text and "cpus" in text and "backend" in text


@pytest.mark.parametrize("argv, code, needle", [
    (["train", "--epochs", "0"], 2, "--epochs: must be >= 1"),
    (["train", "--dropout", "1.5"], 2, "--dropout: must be in [0, 1)"),
    (["train", "--dataset", "cifar"], 2, "invalid choice"),
    (["frobnicate"], 2, "invalid choice"),
    (["train", "--ema", "1"], 2, "--ema: expected a decay in [0, 1) (0: none), got 1"),
    (["evaluate", "missing.npz"], 1, "cnn-gpu: error: no checkpoint at missing.npz"),
    (["train", "--data-dir", "nowhere", "--epochs", "1", "--dataset", "mnist", "--no-progress"], 1, "cnn-gpu: error:"),
])
def test_user_errors_end_in_one_line(argv, code, needle, capsys, monkeypatch):
    from cnn_gpu.data import datasets

    # No network: every mirror refuses at once, so a missing dataset fails fast.
    for name, spec in list(datasets.DATASETS.items()):
        monkeypatch.setitem(datasets.DATASETS, name, datasets.DatasetSpec(
            **{**spec.__dict__, "mirrors": ("http://127.0.0.1:9/",), "system_dirs": ()}))
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bench_without_the_bench_module_says_so(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cnn_gpu.bench", None)  # makes `import cnn_gpu.bench` fail
    assert main(["bench", "--quick"]) == 1
    assert "cnn_gpu.bench" in capsys.readouterr().err


def test_bench_forwards_its_arguments(capsys, monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("cnn_gpu.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cnn_gpu.bench", fake)
    assert main(["bench", "--batch-sizes", "64", "--json", "out.json"]) == 0
    assert seen == [["--batch-sizes", "64", "--json", "out.json"]]


def test_train_without_matplotlib_or_validation(trained_run, tmp_path, capsys, monkeypatch):
    from cnn_gpu import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    data = trained_run[0]
    assert main(["train", "--data-dir", str(data), "--epochs", "1", "--limit-train", "60", "--val-size", "0",
                 "--batch-size", "30", "--out", str(tmp_path / "r"), "--no-progress", "--no-augment"]) == 0
    text = capsys.readouterr().out
    assert "matplotlib is not installed" in text and "best checkpoint is the last epoch" in text
    assert not (tmp_path / "r" / "learning_curves.png").exists() and (tmp_path / "r" / "best.npz").exists()


def test_train_with_dropout_and_flips_only_records_them(trained_run, tmp_path, capsys):
    data, _, _, _, _ = trained_run
    out = tmp_path / "drop"
    assert main(["train", "--data-dir", str(data), "--epochs", "1", "--limit-train", "60", "--val-size", "10",
                 "--batch-size", "20", "--dropout", "0.3", "--augment", "--max-shift", "0", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "augment: flips |" in text and "dropout 0.3" in text and "Dropout(p=0.3)" in text
    from cnn_gpu.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out / "last.npz")
    assert ckpt.metadata["model"]["kwargs"]["dropout"] == 0.3 and ckpt.metadata["config"]["max_shift"] == 0
    assert sum(type(layer).__name__ == "Dropout" for layer in ckpt.build_model().layers) == 2


def test_train_with_label_smoothing_erasing_and_no_bias_decay_records_them(trained_run, tmp_path, capsys):
    data = trained_run[0]
    out = tmp_path / "smooth"
    assert main(["train", "--data-dir", str(data), "--epochs", "1", "--limit-train", "60", "--val-size", "10",
                 "--batch-size", "20", "--label-smoothing", "0.1", "--erase", "0.5", "--no-augment",
                 "--no-bias-decay", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "weight decay 0.0005 (weights only)" in text
    assert "augment: random erasing p=0.5 | label smoothing 0.1 |" in text
    from cnn_gpu.checkpoint import load_checkpoint
    config = load_checkpoint(out / "last.npz").metadata["config"]
    assert config["label_smoothing"] == 0.1 and config["erase"] == 0.5 and config["augment"] is False
    assert config["bias_decay"] is False
    history = json.loads((out / "history.json").read_text())
    assert history[0]["label_smoothing"] == 0.1  # its train_loss is against smoothed targets


def test_train_with_a_weight_average_evaluates_it_and_evaluate_uses_it(trained_run, tmp_path, capsys):
    """--ema: the history has both figures, best.npz's weights are the averages, and `evaluate
    --split val` on it reproduces the history's (averaged) validation accuracy."""
    data = trained_run[0]
    out = tmp_path / "ema"
    assert main(["train", "--data-dir", str(data), "--epochs", "2", "--limit-train", "80", "--val-size", "20",
                 "--batch-size", "20", "--ema", "0.9", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| weight average, decay 0.9 |" in text and "(as trained " in text
    history = json.loads((out / "history.json").read_text())
    assert all("raw_val_accuracy" in r and r["ema_decay"] == 0.9 for r in history)
    from cnn_gpu.checkpoint import load_checkpoint
    best = load_checkpoint(out / "best.npz")
    assert best.metadata["config"]["ema"] == 0.9 and best.ema_state is not None
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data), "--split", "val"]) == 0
    record = history[best.epoch - 1]
    assert f"(20 images): accuracy {record['val_accuracy']:.4f}" in capsys.readouterr().out


def test_erasing_without_augment_is_the_only_augmentation():
    import argparse

    from cnn_gpu.cli import _augmentation
    from cnn_gpu.data import Augmentation
    s = argparse.Namespace(dataset="fashion-mnist", augment=False, max_shift=2, erase=0.25)
    assert _augmentation(s) == Augmentation(erase=0.25)
    assert _augmentation(argparse.Namespace(**{**vars(s), "erase": 0.0})) is None
    assert _augmentation(argparse.Namespace(**{**vars(s), "augment": True})) == \
        Augmentation(max_shift=2, hflip=True, erase=0.25)


def test_resuming_a_checkpoint_from_before_the_newer_settings_keeps_its_training(trained_run, tmp_path, capsys):
    """A checkpoint whose config predates label smoothing, erasing and --bias-decay resumes without them."""
    import dataclasses

    from cnn_gpu.checkpoint import load_checkpoint, save_checkpoint
    data, out, *_ = trained_run
    ckpt = load_checkpoint(out / "last.npz")
    old = {k: v for k, v in ckpt.metadata["config"].items() if k not in ("label_smoothing", "erase", "bias_decay")}
    path = tmp_path / "old.npz"
    save_checkpoint(path, dataclasses.replace(ckpt, metadata={**ckpt.metadata, "config": old}))
    assert main(["train", "--resume", str(path), "--epochs", "3", "--data-dir", str(data), "--no-progress",
                 "--out", str(tmp_path / "resumed")]) == 0
    text = capsys.readouterr().out
    settings = next(line for line in text.splitlines() if line.startswith("settings:"))
    assert "label smoothing" not in settings and "erasing" not in settings and "weights only" not in settings
    config = load_checkpoint(tmp_path / "resumed" / "last.npz").metadata["config"]
    assert (config["label_smoothing"], config["erase"], config["bias_decay"]) == (0.0, 0.0, True)


def test_evaluate_on_the_held_out_validation_split_matches_the_history(trained_run, capsys):
    """--split val rebuilds the run's validation images: best.npz scores there what history.json says."""
    data, out, *_ = trained_run
    history = json.loads((out / "history.json").read_text())
    best = max(history, key=lambda r: r["val_accuracy"])
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert f"on fashion-mnist val (20 images): accuracy {best['val_accuracy']:.4f}" in text
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data), "--split", "train"]) == 0
    assert "on fashion-mnist train (100 images)" in capsys.readouterr().out  # 120 trained on, less 20


def test_evaluate_with_mirror_test_time_augmentation(trained_run, capsys):
    data, out, *_ = trained_run
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data), "--tta"]) == 0
    assert "(60 images, mirror test-time augmentation): accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data), "--tta", "--dataset", "mnist"]) == 2
    assert "--tta mirrors the images, which does not suit mnist" in capsys.readouterr().err


def test_models_lists_the_zoo_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in ("seed_cnn", "resnet20", "mobilenet", "vgg"):
        assert name in text
    assert "225,034" in text and "272,186" in text  # seed_cnn and resnet20 on 28x28x1


def test_train_another_model_then_evaluate_predict_and_resume_from_the_checkpoint_alone(trained_run, tmp_path,
                                                                                       capsys):
    """--model resnet20: the checkpoint records the architecture, and every command rebuilds it."""
    data, *_ = trained_run
    out = tmp_path / "resnet"
    argv = ["train", "--model", "resnet20", "--data-dir", str(data), "--epochs", "1", "--limit-train", "60",
            "--val-size", "20", "--batch-size", "20", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "stage3.block2.relu2" in text and "model resnet20, batch norm on" in text
    from cnn_gpu.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out / "last.npz")
    assert ckpt.metadata["architecture"]["type"] == "Sequential" and ckpt.metadata["model"]["name"] == "resnet20"
    assert main(["evaluate", str(out / "best.npz"), "--data-dir", str(data)]) == 0
    assert "accuracy" in capsys.readouterr().out
    images = read_idx(data / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")[:2]
    np.save(tmp_path / "two.npy", images)
    assert main(["predict", str(out / "best.npz"), str(tmp_path / "two.npy")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["train", "--resume", str(out / "last.npz"), "--epochs", "2", "--data-dir", str(data),
                 "--no-progress"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out


def test_dropout_on_a_model_without_dense_layers_is_a_usage_error(trained_run, capsys):
    data, *_ = trained_run
    assert main(["train", "--model", "resnet20", "--dropout", "0.2", "--data-dir", str(data)]) == 2
    assert "--dropout applies to seed_cnn and vgg, not resnet20" in capsys.readouterr().err


def test_export_writes_an_onnx_file_that_onnxruntime_runs(trained_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra")
    data, out, *_ = trained_run
    assert main(["export", str(out / "best.npz"), str(tmp_path / "model.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
    assert session.run(None, {"input": x})[0].shape == (3, 10)
    assert main(["export", str(tmp_path / "missing.npz"), str(tmp_path / "m.onnx")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_cuda_graph_on_the_cpu_says_why_it_runs_eagerly_and_tf32_is_refused(trained_run, tmp_path, capsys):
    data, *_ = trained_run
    argv = ["train", "--data-dir", str(data), "--epochs", "1", "--limit-train", "60", "--val-size", "20",
            "--batch-size", "20", "--out", str(tmp_path / "g"), "--no-progress", "--backend", "numpy"]
    assert main(argv + ["--cuda-graph"]) == 0
    assert "cuda graph: training runs eagerly: the model is on the CPU" in capsys.readouterr().out
    assert main(argv + ["--tf32"]) == 2
    assert "--tf32 is for the GPU" in capsys.readouterr().err
