"""Lost work and determinism: a training process killed with SIGKILL at an arbitrary moment
and resumed ends with the same weights as a run that never stopped; the same seed gives
bit-identical runs on the CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.checkpoint import load_checkpoint

from .train_fixtures import write_tiny_idx_dataset

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnn_gpu.cli", "train", "--backend", "numpy", "--data-dir", str(data),
            "--epochs", str(EPOCHS), "--val-size", "100", "--batch-size", "16", "--lr", "0.02",
            "--batch-norm", "--augment", "--seed", "5", "--out", str(out), "--no-progress", *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), MPLBACKEND="Agg")
    env.pop("CNN_GPU_DATA", None)
    return env


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    data = write_tiny_idx_dataset(tmp_path / "data", n_train=1100, n_test=50)
    env = _env(tmp_path)

    straight = tmp_path / "straight"
    subprocess.run(_train_argv(data, straight), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_argv(data, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _epochs_done(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch, maybe into a checkpoint write: it must not matter
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(killed / "last.npz").epoch
    assert 1 <= stopped_at < EPOCHS
    for path in killed.glob("*.npz"):  # a kill may leave a stray temporary file, never a broken .npz
        load_checkpoint(path)

    subprocess.run(_train_argv(data, killed, "--resume", str(killed / "last.npz")), env=env, check=True,
                   capture_output=True, timeout=600)
    want, got = load_checkpoint(straight / "last.npz"), load_checkpoint(killed / "last.npz")
    assert got.epoch == want.epoch == EPOCHS
    for key, value in want.model_state.items():
        np.testing.assert_array_equal(got.model_state[key], value, err_msg=key)
    for key, value in want.optimizer_state.items():
        np.testing.assert_array_equal(got.optimizer_state[key], value, err_msg=key)


def test_same_seed_same_run_bit_for_bit(tmp_path):
    data = write_tiny_idx_dataset(tmp_path / "data", n_train=300, n_test=50)
    env = _env(tmp_path)
    for name in ("a", "b"):
        argv = _train_argv(data, tmp_path / name)
        argv[argv.index("--epochs") + 1] = "2"
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
    a, b = load_checkpoint(tmp_path / "a" / "last.npz"), load_checkpoint(tmp_path / "b" / "last.npz")
    for key, value in a.model_state.items():
        np.testing.assert_array_equal(b.model_state[key], value, err_msg=key)
