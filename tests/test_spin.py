"""cnn_gpu.cpu.spin: flags one thread raises and another waits for by spinning outside the GIL."""
import threading
import time

import numpy as np
import pytest

from cnn_gpu.cpu import spin


def test_flags_sit_on_lines_of_their_own_and_start_at_zero():
    flags = spin.new_flags(3)
    assert flags.dtype == np.int64 and flags.size == 3 * spin.LINE
    spin.publish(flags, 2, 7)
    assert [spin.load(flags, i) for i in range(3)] == [0, 0, 7]
    assert flags[2 * spin.LINE] == 7 and np.count_nonzero(flags) == 1  # flag i at i * LINE, nowhere else


def test_wait_for_sees_a_value_at_or_past_the_one_waited_for_and_gives_up_after_its_spins():
    flags = spin.new_flags(1)
    assert not spin.wait_for(flags, 0, 1, 1000)
    spin.publish(flags, 0, 5)
    assert spin.wait_for(flags, 0, 5, 0) and spin.wait_for(flags, 0, 3, 0)
    assert not spin.wait_for(flags, 0, 6, 10)


def test_wait_all_needs_every_flag_in_its_range():
    flags = spin.new_flags(4)
    for i in (1, 2):
        spin.publish(flags, i, 2)
    assert spin.wait_all(flags, 1, 3, 2, 0)
    assert not spin.wait_all(flags, 1, 4, 2, 100)
    assert not spin.wait_all(flags, 0, 3, 1, 100)


def test_a_flag_raised_by_another_thread_is_seen_by_a_spinning_one():
    """Ping-pong over two flags: a wait that cached the flag in a register would never end."""
    flags = spin.new_flags(2)
    rounds = 2000

    def other():
        for k in range(1, rounds + 1):
            assert spin.wait_for(flags, 0, k, 1 << 40)
            spin.publish(flags, 1, k)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    start = time.monotonic()
    for k in range(1, rounds + 1):
        spin.publish(flags, 0, k)
        assert spin.wait_for(flags, 1, k, 1 << 40)
    t.join(10)
    assert not t.is_alive() and time.monotonic() - start < 30


def test_publish_then_wait_reports_a_sleeper_or_the_next_value():
    flags = spin.new_flags(3)  # 0: done, 1: the waiter's asleep flag, 2: the next job
    assert spin.publish_then_wait(flags, 0, 1, 1, 2, 2, 10) == 0  # nobody asleep, no next job within 10 spins
    assert spin.load(flags, 0) == 1
    spin.publish(flags, 2, 2)
    assert spin.publish_then_wait(flags, 0, 1, 1, 2, 2, 10) == 1  # the next job is there
    spin.publish(flags, 1, 3)
    assert spin.publish_then_wait(flags, 0, 3, 1, 2, 4, 10) == -1  # the waiter sleeps: wake it


@pytest.mark.skipif(not spin.COMPILED, reason="take is an intrinsic for compiled code: needs Numba")
def test_take_gives_each_number_once_to_threads_that_share_a_counter():
    import numba

    @numba.njit(nogil=True)
    def take_until(flags, total, got):  # each number below total this thread took
        count = 0
        while True:
            k = spin.take(flags, 0)
            if k >= total:
                return count
            got[count] = k
            count += 1

    total = 200_000
    flags = spin.new_flags(1)
    got = [np.full(total, -1, np.int64) for _ in range(2)]
    counts = [0, 0]

    def run(i):
        counts[i] = take_until(flags, total, got[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    taken = np.concatenate([g[:c] for g, c in zip(got, counts)])
    np.testing.assert_array_equal(np.sort(taken), np.arange(total))  # every number once: none lost, none twice
    assert spin.load(flags, 0) == total + 2  # and each thread's last take, past the end


def test_without_numba_the_flags_are_plain_python_and_the_threads_still_run():
    """In a process where `import numba` fails: spin falls back to spin.plain, and for_each on two
    threads still gives every part's result."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['numba'] = None\n"
            "from cnn_gpu.cpu import spin, threads\n"
            "assert not spin.COMPILED and spin.wait_for is spin.plain.wait_for\n"
            "threads.set_count(2)\n"
            "assert threads.for_each(list(range(9)), lambda p, s: p + 1) == list(range(1, 10))\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.skipif(not spin.COMPILED, reason="spin.leave is compiled code: needs Numba")
def test_a_workers_loop_leaves_once_the_caller_waits_and_not_before():
    """spin.leave at the end of an on_each loop: on a worker's counter (WAITING after the three
    counter flags) it waits for the caller's announce_then_wait_all of the job posted, and gives up
    after SPINS hints; on the caller's counter (three flags, a view of the same ones) and on a
    lone thread's it waits for nothing."""
    flags = spin.new_flags(spin.WORKER_COUNTER_FLAGS + 1)
    worker, caller = flags[:spin.WORKER_COUNTER_FLAGS * spin.LINE], flags[:spin.COUNTER_FLAGS * spin.LINE]
    spin.publish(flags, spin.POSTED, 3)
    assert spin.leave(caller) and spin.leave(spin.new_flags(spin.COUNTER_FLAGS))
    assert not spin.leave(worker)  # job 3 posted, the caller waits for none yet: the hints run out
    spin.publish(flags, spin.WAITING, 2)
    assert not spin.leave(worker)  # it waits for an earlier job's end
    done = []
    t = threading.Thread(target=lambda: done.append(spin.announce_then_wait_all(flags, spin.WAITING, 3, 4, 5, 1 << 40)))
    t.start()  # the caller: raises WAITING to 3, then waits for flag 4 (a worker's DONE)
    while spin.load(flags, spin.WAITING) < 3:
        pass
    assert spin.leave(worker)
    spin.publish(flags, 4, 3)
    t.join(timeout=60)
    assert done == [True]
