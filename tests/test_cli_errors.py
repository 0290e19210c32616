"""Bad inputs through the real `cnn-gpu` process: each ends in one `cnn-gpu: error:` line on
stderr, a non-zero exit code, and nothing else there (no traceback, no library warning)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .train_fixtures import write_tiny_idx_dataset

REPO = Path(__file__).resolve().parents[1]


def run_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), MPLBACKEND="Agg")
    env.pop("CNN_GPU_DATA", None)
    env.pop("PYTHONWARNINGS", None)  # what a user sees: Python's default warning filters
    return subprocess.run([sys.executable, "-m", "cnn_gpu.cli", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("cnn-gpu: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a one-epoch run of the seed network."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_tiny_idx_dataset(root / "data", n_train=100, n_test=20)
    proc = run_cli(root, "train", "--backend", "numpy", "--data-dir", str(data), "--epochs", "1", "--val-size",
                   "20", "--batch-size", "20", "--out", str(root / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return root / "run" / "best.npz"


def test_a_loss_that_explodes_but_stays_finite_is_divergence(tmp_path):
    """--lr 1e6 with the default Adam recipe: the loss grows to ~1e30, finite in float32."""
    data = write_tiny_idx_dataset(tmp_path / "data", n_train=200, n_test=20)
    proc = run_cli(tmp_path, "train", "--backend", "numpy", "--data-dir", str(data), "--epochs", "2",
                   "--val-size", "20", "--batch-size", "20", "--lr", "1e6", "--out", str(tmp_path / "run"),
                   "--no-progress")
    assert_one_error_line(proc, "training diverged", "epoch 1", "lower learning rate")


def test_predict_on_a_text_file_named_png(checkpoint, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("shopping: milk, eggs\n")
    proc = run_cli(tmp_path, "predict", str(checkpoint), str(notes))
    assert_one_error_line(proc, str(notes), "not a readable png file")


def test_predict_on_an_all_nan_array(checkpoint, tmp_path):
    path = tmp_path / "nan.npy"
    np.save(path, np.full((28, 28), np.nan, dtype=np.float32))
    proc = run_cli(tmp_path, "predict", str(checkpoint), str(path))
    assert_one_error_line(proc, str(path), "784 of 784 are NaN")


def test_predict_on_a_file_that_is_not_npy(checkpoint, tmp_path):
    path = tmp_path / "garbage.npy"
    path.write_bytes(b"not an array at all")
    proc = run_cli(tmp_path, "predict", str(checkpoint), str(path))
    assert_one_error_line(proc, str(path), "not a NumPy .npy file")


def test_export_into_a_folder_that_cannot_be_made_names_the_target(checkpoint, tmp_path):
    (tmp_path / "taken").write_text("a file where the folder would go")
    target = tmp_path / "taken" / "model.onnx"
    proc = run_cli(tmp_path, "export", str(checkpoint), str(target))
    line = assert_one_error_line(proc, f"cannot write {target}")
    assert ".tmp" not in line  # not the temporary file beside it


def test_train_with_a_data_dir_that_is_not_there(tmp_path):
    proc = run_cli(tmp_path, "train", "--data-dir", str(tmp_path / "typo"), "--epochs", "1", "--no-progress")
    assert_one_error_line(proc, f"{tmp_path / 'typo'}: no such folder or file")
    assert not (tmp_path / "runs").exists()  # stopped before a run folder was made


def test_bench_threads_works_with_the_extras_the_readme_installs(tmp_path):
    """threadpoolctl comes with [all] and [test]: --threads must not ask the user to install it."""
    pytest.importorskip("threadpoolctl", reason="installed by the [test] extra; run .ci/run")
    proc = run_cli(tmp_path, "bench", "--threads", "1", "--batch-sizes", "2", "--repeats", "1", "--warmup", "0",
                   "--no-torch", "--no-memory", "--gemm-size", "32", "--nets", "seed", "--modes", "infer",
                   "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "threadpoolctl" not in proc.stderr
    assert "OPENBLAS_CORETYPE" in proc.stdout and "OPENBLAS_L2_SIZE" in proc.stdout


def test_a_thread_count_that_is_not_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_GPU_THREADS", "many")
    proc = run_cli(tmp_path, "info")
    assert_one_error_line(proc, "CNN_GPU_THREADS must be a whole number of threads, got 'many'")
    assert proc.returncode == 2
