"""One rank fails; every rank must stop within a bounded time, with an error naming the rank.

Each test launches mpiexec -n 2 (tests/distributed_ranks.py) with a time limit far above what a
clean stop takes: a launch that outlives it fails the test as a hang. For the exception, the
kill and the exit code, the collective timeout stays at its default (10 minutes), so only the
mechanism under test (the excepthook's MPI_Abort, mpiexec's teardown, finish()) can stop the
job in time; the hang is stopped by a 2-second collective timeout.
"""
from __future__ import annotations

from .mpi_launch import requires_mpi, run_ranks

pytestmark = requires_mpi

LIMIT = 60.0  # seconds; a clean stop takes about one (mostly mpiexec's start)


def test_an_exception_on_one_rank_stops_every_rank(tmp_path):
    done = run_ranks(2, "raise", tmp_path, timeout=LIMIT)
    assert done.returncode != 0
    assert "cnn-gpu: error: rank 1 of 2: MemoryError: simulated: out of memory" in done.stderr, done.stderr
    assert "Traceback" in done.stderr  # the traceback comes first, as without MPI


def test_a_killed_rank_stops_every_rank(tmp_path):
    done = run_ranks(2, "kill", tmp_path, timeout=LIMIT)
    assert done.returncode != 0
    # mpiexec's own report names the rank and the signal.
    text = " ".join((done.stdout + done.stderr).split())
    assert "rank 1" in text and "signal 9" in text, text


def test_a_hung_rank_is_ended_by_the_collective_timeout(tmp_path):
    done = run_ranks(2, "hang", tmp_path, timeout=LIMIT, env={"CNN_GPU_DIST_TIMEOUT": "2"})
    assert done.returncode != 0
    # Rank 0 names itself and the collective it waited in (rank 1 is alive but says nothing).
    assert "cnn-gpu: error: rank 0 of 2: " in done.stderr, done.stderr
    assert "did not complete within 2 s: another rank has stopped, hung or fallen far behind" in done.stderr


def test_an_error_exit_code_on_one_rank_stops_every_rank(tmp_path):
    # Without finish(), rank 1's exit would wait in MPI_Finalize and rank 0 in its allreduce, for ever.
    done = run_ranks(2, "exit", tmp_path, timeout=LIMIT)
    assert done.returncode == 3
    assert "cnn-gpu: error: rank 1 of 2: exited with code 3" in done.stderr, done.stderr


def test_an_error_every_rank_saw_ends_with_its_code_and_no_abort(tmp_path):
    done = run_ranks(2, "exit_all", tmp_path, timeout=LIMIT)
    assert done.returncode == 4
    assert done.stderr.count("cnn-gpu: error:") == 1, done.stderr  # said once, by rank 0
    assert "MPI_ABORT" not in done.stderr
