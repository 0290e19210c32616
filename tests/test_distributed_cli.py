"""`cnn-gpu train` under mpiexec: one rank equals a plain process bit for bit, a run resumes
across rank counts, rank 0 alone prints and writes, and a failing rank stops every rank.

Each launch runs tests/distributed_fit_ranks.py's `cli` scenario (cnn_gpu.cli.main on every
rank, with a fault injected where CNN_GPU_TEST_FAULT says) on a tiny IDX dataset.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.cli import main

from .distributed_fit_ranks import FAULT_VAR
from .mpi_launch import requires_mpi, run_alone, run_ranks
from .train_fixtures import write_tiny_idx_dataset

pytestmark = requires_mpi

LIMIT = 120.0  # seconds for a launch; a failing one stops in a few, a hang fails the test
CLI = ["-m", "tests.distributed_fit_ranks", "cli", "-"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_idx_dataset(tmp_path_factory.mktemp("data"))


def train_args(data, out, epochs: int = 1, *extra: str) -> list[str]:
    """100 training images in batches of 32 (4 steps an epoch: 32, 32, 32, 4), batch norm."""
    return ["train", "--data-dir", str(data), "--epochs", str(epochs), "--limit-train", "120", "--val-size", "20",
            "--limit-test", "30", "--batch-size", "32", "--batch-norm", "--no-progress", "--out", str(out), *extra]


def _in_process(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


def test_one_rank_under_mpiexec_trains_what_a_plain_process_trains_bit_for_bit(data, tmp_path):
    plain = run_alone(CLI + [*train_args(data, tmp_path / "plain", 2)], timeout=LIMIT)
    assert plain.returncode == 0, plain.stderr
    assert "mpi4py imported: False" in plain.stdout  # no MPI at all without a launcher
    one = run_ranks(1, "cli", tmp_path, timeout=LIMIT, env={"CNN_GPU_DIST_BACKEND": "mpi"},
                    command_line=CLI + train_args(data, tmp_path / "one", 2))
    assert one.returncode == 0, one.stderr
    assert "mpi4py imported: True" in one.stdout  # an MPI communicator of one rank
    a, b = load_checkpoint(tmp_path / "plain" / "last.npz"), load_checkpoint(tmp_path / "one" / "last.npz")
    for key, value in a.model_state.items():
        np.testing.assert_array_equal(b.model_state[key], value, err_msg=key)  # the same computation
    for key, value in a.optimizer_state.items():
        np.testing.assert_array_equal(b.optimizer_state[key], value, err_msg=key)
    timing = ("seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b.history]


def test_a_run_resumes_across_rank_counts_and_rank0_alone_prints_and_writes(data, tmp_path):
    """1 rank (in this process) -> 2 ranks -> 1 rank, each an epoch, in one run directory."""
    out = tmp_path / "run"
    _in_process(train_args(data, out, 1))
    two = run_ranks(2, "cli", tmp_path, timeout=LIMIT,
                    command_line=CLI + ["train", "--resume", str(out / "last.npz"), "--epochs", "2", "--no-progress",
                                        "--data-dir", str(data), "--batch-norm-sync", "sync"])
    assert two.returncode == 0, two.stderr
    # rank 0 alone prints: one summary of the model, one line for the epoch, one of the end
    assert two.stdout.count("total parameters") == 1 and two.stdout.count("epoch 2/2 |") == 1, two.stdout
    assert two.stdout.count("done in") == 1 and "| 2 ranks (mpi), 16 images each per step" in two.stdout
    middle = load_checkpoint(out / "last.npz")
    assert middle.epoch == 2 and middle.metadata["ranks"] == 2 and middle.metadata["batch_norm_sync"] == "sync"
    _in_process(["train", "--resume", str(out / "last.npz"), "--epochs", "3", "--no-progress", "--data-dir",
                 str(data)])
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3] and [r["ranks"] for r in history] == [1, 2, 1]
    assert load_checkpoint(out / "last.npz").metadata["ranks"] == 1
    assert (out / "learning_curves.png").is_file()


def test_a_killed_rank_stops_every_rank(data, tmp_path):
    done = run_ranks(2, "cli", tmp_path, timeout=LIMIT, env={FAULT_VAR: "kill:1:3"},
                     command_line=CLI + train_args(data, tmp_path / "run"))
    assert done.returncode != 0
    text = " ".join((done.stdout + done.stderr).split())
    assert "rank 1" in text and "signal 9" in text, text  # mpiexec names the rank and the signal
    assert not (tmp_path / "run" / "last.npz").exists()  # the epoch never ended


def test_running_out_of_memory_on_one_rank_stops_every_rank_with_one_line_naming_it(data, tmp_path):
    done = run_ranks(2, "cli", tmp_path, timeout=LIMIT, env={FAULT_VAR: "raise:1:3"},
                     command_line=CLI + train_args(data, tmp_path / "run"))
    assert done.returncode == 1, done.stderr
    assert "cnn-gpu: error: rank 1 of 2: out of memory on the host at batch size 32 (epoch 1); try a smaller " \
           "batch size, e.g. --batch-size 16" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr  # an error the CLI reports in one line, not a crash


def test_a_loss_that_diverges_on_one_rank_stops_every_rank_together(data, tmp_path):
    """A NaN loss on rank 0 alone reaches every rank through the reduced loss sums: all stop at
    the same step, rank 0 prints the error once, and the job ends with its code, without an abort."""
    done = run_ranks(2, "cli", tmp_path, timeout=LIMIT, env={FAULT_VAR: "nan:0:2"},
                     command_line=CLI + train_args(data, tmp_path / "run"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("cnn-gpu: error:") == 1, done.stderr
    assert "cnn-gpu: error: training diverged: the loss became nan at epoch 1, step 2 of 4" in done.stderr
    assert "MPI_ABORT" not in done.stderr


def test_the_scaling_benchmark_times_one_rank_against_n(tmp_path):
    out = tmp_path / "scaling.json"
    done = run_ranks(2, "scaling", tmp_path, timeout=LIMIT,
                     command_line=["-m", "cnn_gpu.bench.scaling", "--nets", "seed", "seed_bn", "--batch", "4",
                                   "--warmup", "0", "--repeats", "1", "--steps", "1", "--json", str(out)])
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["net"] for r in rows] == ["seed", "seed_bn"] and rows[0]["global_batch"] == 8
    for row in rows:
        assert row["ranks"] == 2 and row["buckets"] == 1 and 0 <= row["averaging_share"] <= 1
        assert row["one_rank_cpu_s"] > 0 and row["n_rank_cpu_s"] > 0 and row["cpu_speedup"] > 0
        assert row["speedup"] == pytest.approx(row["n_rank_images_per_s"] / row["one_rank_images_per_s"])
    assert done.stdout.count("seed_bn ") == 1  # the table, from rank 0 only


def test_bench_ranks_launches_the_scaling_benchmark_under_mpiexec(monkeypatch):
    import subprocess
    import sys

    from cnn_gpu.bench import main as bench_main
    launched = []
    monkeypatch.setattr(subprocess, "run",
                        lambda command: launched.append(command) or subprocess.CompletedProcess(command, 0))
    assert bench_main(["--ranks", "3", "--mpiexec", "mpirun --oversubscribe", "--nets", "seed"]) == 0
    assert launched == [["mpirun", "--oversubscribe", "-n", "3", sys.executable, "-m", "cnn_gpu.bench.scaling",
                         "--nets", "seed"]]
    assert bench_main(["--ranks", "1"]) == 2


def test_ranks_waiting_for_rank0_without_a_deadline_outlast_the_collective_timeout(tmp_path):
    """The waits of `train` for rank 0's own work (finding or caching the dataset, the plots) have
    no deadline; the 1-second timeout still bounds every other collective (test_distributed_failures)."""
    done = run_ranks(2, "wait", tmp_path, timeout=LIMIT, env={"CNN_GPU_DIST_TIMEOUT": "1"},
                     command_line=["-m", "tests.distributed_fit_ranks", "wait", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rank0.done").is_file() and (tmp_path / "rank1.done").is_file()
