"""`cnn-gpu train/evaluate/predict` on the datasets beyond the MNISTs: a folder of the user's own
colour images, and CIFAR-10 from its binary records (generated here in the real format)."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.cli import main

from .data_fixtures import cifar_record_bytes, save_image

pytest.importorskip("PIL", reason="image folders need Pillow (the [images] extra)")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CNN_GPU_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def _colour_folder(root, per_class=24, size=(20, 20)):
    """root/<red|green|blue>/<i>.png: images whose class is their dominant colour (learnable)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("blue", "green", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (*size, 3)).astype(np.uint8)
            pixels[..., 2 - k] += 140  # red: channel 0, green 1, blue 2
            save_image(root / name / f"{i:03d}.png", pixels)
    (root / ".DS_Store").write_bytes(b"\0\1")
    return root


def test_train_on_an_image_folder_then_evaluate_and_predict(tmp_path, capsys):
    folder = _colour_folder(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "images", "--data-dir", str(folder), "--epochs", "2", "--val-size", "6",
                 "--batch-size", "16", "--out", str(out), "--no-progress", "--lr", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "(20, 20, 3)" in text and "3 classes, 57 training and 15 test images of 20x20x3" in text
    ckpt = load_checkpoint(out / "best.npz")
    assert ckpt.metadata["class_names"] == ["blue", "green", "red"] and ckpt.metadata["input_shape"] == [20, 20, 3]
    assert ckpt.metadata["data_dir"] == str(folder.resolve()) and ckpt.norm_mean.shape == (3,)
    # evaluate finds the folder (and its cache) from the checkpoint alone
    assert main(["evaluate", str(out / "best.npz")]) == 0
    assert "on images test" in capsys.readouterr().out
    # predict brings a larger RGBA picture to the trained 20x20x3, and says so
    picture = np.zeros((40, 30, 4), np.uint8)
    picture[..., 0], picture[..., 3] = 230, 255
    save_image(tmp_path / "big.png", picture)
    assert main(["predict", str(out / "best.npz"), str(tmp_path / "big.png"), "--top", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"note: {tmp_path / 'big.png'}: converted RGBA -> RGB, resized 40x30 -> 20x20"
    assert lines[-1].startswith(f"{tmp_path / 'big.png'}: ")


def test_image_options_belong_to_image_folders(tmp_path, capsys):
    assert main(["train", "--channels", "3", "--epochs", "1"]) == 2
    assert "--channels is for --dataset images, not fashion-mnist" in capsys.readouterr().err
    assert main(["train", "--dataset", "images", "--epochs", "1"]) == 2
    assert "--dataset images reads the folder given as --data-dir" in capsys.readouterr().err


def test_a_corrupt_image_is_named_or_skipped(tmp_path, capsys):
    folder = _colour_folder(tmp_path / "photos", per_class=8)
    (folder / "red" / "broken.png").write_text("not a picture")
    argv = ["train", "--dataset", "images", "--data-dir", str(folder), "--epochs", "1", "--val-size", "3",
            "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.png" in err
    assert main(argv + ["--skip-bad-images"]) == 0
    assert "1 unreadable file(s) skipped" in capsys.readouterr().out


def test_train_on_cifar10_binary_records(tmp_path, capsys):
    """Generated cifar-10-batches-bin/: 5 training files and a test file of the real record format."""
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    first = 0
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = [((first + k) * 3) % 10 for k in range(12)]
        (folder / name).write_bytes(cifar_record_bytes(first, 12, [(lab,) for lab in labels]))
        first += 12
    (folder / "batches.meta.txt").write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                        "frog", "horse", "ship", "truck"]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "resnet20",
                 "--epochs", "1", "--val-size", "10", "--batch-size", "25", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(32, 32, 3)" in text and "50 training, 10 validation, 12 test images" in text
    assert "shifts up to 4 px" in text  # CIFAR's own default, not the Fashion-MNIST recipe's
    ckpt = load_checkpoint(out / "last.npz")
    assert ckpt.metadata["class_names"][0] == "airplane" and ckpt.metadata["input_shape"] == [32, 32, 3]
