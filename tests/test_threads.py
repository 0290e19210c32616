"""cnn_gpu.cpu.threads: parts of a batch side by side, and results that do not depend on how many
threads ran them (the parts are fixed by sizes, and what is summed over them is summed in part
order). Each op below is run on one thread and on two, with the BLAS on one thread both times, and
must give the same bits: the same computation, scheduled differently."""
import threading
import time

import numpy as np
import pytest

from cnn_gpu.cpu import threads
from cnn_gpu.functional import (avg_pool2d_backward, avg_pool2d_forward, batch_norm_backward, batch_norm_forward,
                                conv2d_backward, conv2d_forward, max_pool2d_backward, max_pool2d_forward,
                                relu_backward, relu_forward)
from cnn_gpu.models import build

threadpoolctl = pytest.importorskip("threadpoolctl", reason="installed by the [test] extra; run .ci/run")


@pytest.fixture
def on_threads(monkeypatch):
    """on_threads(n, fn): fn() with cnn_gpu's CPU ops on n threads and the BLAS on one. split()
    cuts arrays of a few KiB too, so that these small ones are cut as a large one would be."""
    monkeypatch.setattr(threads, "SPLIT_MIN_BYTES", 1 << 10)

    def run(n, fn):
        threads.set_count(n)
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            assert threads.count() == n
            return fn()
    yield run
    threads.set_count(None)


def blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def assert_same(a, b):
    for u, v in zip(a, b):
        if u is None:
            assert v is None
        else:
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---- the pool itself ------------------------------------------------------------------------------

@pytest.fixture
def count():
    """count(n): cnn_gpu's CPU ops on n threads for the test."""
    yield threads.set_count
    threads.set_count(None)


def test_for_each_runs_every_part_once_in_order_on_two_threads(count):
    count(2)
    both = threading.Barrier(2, timeout=10)  # the first two parts wait for each other: two threads or a timeout
    seen, scratches = [], []

    def work(part, scratch):
        if part < 2:
            both.wait()
        seen.append(part)
        scratch.append(part)
        return part * part, threading.get_ident()

    def scratch():
        s = []
        scratches.append(s)
        return s

    results = threads.for_each(list(range(9)), work, scratch)
    assert [r[0] for r in results] == [p * p for p in range(9)]
    assert sorted(seen) == list(range(9))
    assert len({r[1] for r in results}) == 2
    assert len(scratches) == 2 and sorted(sum(scratches, [])) == list(range(9))  # one scratch per thread


def test_on_each_calls_each_thread_once_with_one_shared_counter(count):
    for n in (1, 2):
        count(n)
        calls, scratches = [], []
        threads.on_each(lambda counter, s: calls.append((id(counter), s, threading.get_ident())),
                        lambda: scratches.append(object()) or scratches[-1])
        assert len(calls) == n and len({c[0] for c in calls}) == 1  # one counter for all
        assert len(scratches) <= n and all(any(c[1] is s for s in scratches) for c in calls)
        by_thread = {}
        for _, s, thread in calls:  # each thread's calls get its own scratch (a late thread may find no part left)
            assert by_thread.setdefault(thread, s) is s
        assert len({id(s) for s in by_thread.values()}) == len(by_thread)


def test_for_each_on_one_thread_is_a_loop(count):
    count(1)
    idents = threads.for_each([1, 2, 3], lambda p, s: threading.get_ident())
    assert set(idents) == {threading.get_ident()}


def test_a_part_that_raises_raises_here_and_the_blas_gets_its_threads_back(count):
    count(2)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()

        def work(part, _):
            if part == 3:
                raise RuntimeError("part 3 failed")
            return part
        with pytest.raises(RuntimeError, match="part 3 failed"):
            threads.for_each(list(range(6)), work)
        assert blas_threads() == before


def test_blas_held_keeps_the_count_and_gives_the_blas_back(count):
    count(2)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert threads.count() == 2
        with threads.blas_held():
            assert set(blas_threads()) == {1}
            assert threads.count() == 2  # the parts still use two threads
            with threads.blas_held():  # nested: nothing changes
                assert set(blas_threads()) == {1}
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}


def test_holds_in_two_python_threads_give_the_blas_back_when_the_last_ends(monkeypatch, count):
    """A enters, B enters, A leaves (B still holds: the BLAS stays on one thread), B leaves: the
    BLAS has its count again, not the 1 that B would have found and restored. A stand-in BLAS
    controller records the counts (OpenBLAS's own, set from other threads than the one that set
    it last, read back inconsistently here)."""
    class Blas:
        n = 4

        def get_num_threads(self):
            return self.n

        def set_num_threads(self, n):
            self.n = n

    blas = Blas()
    monkeypatch.setattr(threads, "_blas", [blas])
    count(2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with threads.blas_held():
            seen["a inside"] = blas.n
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with threads.blas_held():
            b_in.set()
            a_out.wait(10)
            seen["after a left"] = blas.n

    workers = [threading.Thread(target=f) for f in (a, b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert seen == {"a inside": 1, "after a left": 1}
    assert blas.n == 4


def test_the_team_runs_parts_on_both_threads_and_sleeps_and_wakes_when_the_spins_run_out(monkeypatch, count):
    """With SPINS at 1, every wait of the team's (the workers' for a job, the caller's for the
    workers) ends in the sleep and wake path: each part must still run once, in order, and parts
    run on the worker too."""
    count(2)
    monkeypatch.setattr(threads, "SPINS", 1)
    monkeypatch.setattr(threads, "_team", None)  # a team made under this SPINS
    for _ in range(20):
        names = threads.for_each(list(range(8)), lambda p, s: (p, threading.current_thread().name))
        assert [p for p, _ in names] == list(range(8))
    seen = set()
    for _ in range(50):  # a part that waits gives the worker time to take one
        seen |= {n for _, n in threads.for_each([0.002] * 4, lambda p, s: (time.sleep(p), threading.current_thread().name))}
    assert len(seen) == 2
    threads._team.close()


def test_the_team_without_numba_sleeps_and_wakes_and_gives_the_same_results(monkeypatch, count):
    """spin.plain (what runs without Numba) never spins: every wait is the sleep and wake path."""
    from cnn_gpu.cpu import spin
    count(2)
    monkeypatch.setattr(threads, "spin", spin.plain)
    monkeypatch.setattr(threads, "_team", None)
    for _ in range(20):
        assert threads.for_each(list(range(7)), lambda p, s: p * 3) == [p * 3 for p in range(7)]
    threads._team.close()


@pytest.mark.parametrize("spins", [1, threads.SPINS])
def test_on_each_loops_post_their_job_and_share_the_parts(monkeypatch, count, spins):
    """A compiled loop on each thread takes parts with spin.next_part, whose first call posts the
    job to the worker: every part once, on both threads; with SPINS at 1 the workers are asleep
    at every job, so the job is posted and they are woken at once (or after the loop)."""
    numba = pytest.importorskip("numba")
    from cnn_gpu.cpu import spin
    if not spin.COMPILED:
        pytest.skip("next_part is compiled code: needs Numba")

    @numba.njit(nogil=True)
    def loop(counter, total, owner, me, sums):
        while True:
            k = spin.next_part(counter)
            if k >= total:
                return
            owner[k] = me
            acc = 0.0
            for i in range(20_000):  # ~20 us of work, in order (no reassociation), so that both threads take parts
                acc += i * 1e-9
            sums[k] = acc

    count(2)
    monkeypatch.setattr(threads, "SPINS", spins)
    monkeypatch.setattr(threads, "_team", None)
    seen = set()
    for _ in range(100):
        owner, sums = np.full(64, -1, np.int64), np.zeros(64)
        threads.on_each(lambda counter, me: loop(counter, 64, owner, me, sums), threading.get_ident)
        assert (owner >= 0).all()
        seen |= set(owner.tolist())
    assert len(seen) == 2
    threads._team.close()


def test_for_each_from_two_python_threads_at_once_gives_each_its_results(count):
    """One caller at a time runs on the team; another's parts run on its own thread meanwhile."""
    count(2)
    results, errors = {}, []

    def caller(k):
        try:
            for i in range(30):
                got = threads.for_each(list(range(6)), lambda p, s: (time.sleep(0.0002), k * 100 + p + i)[1])
                assert got == [k * 100 + p + i for p in range(6)]
            results[k] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    callers = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(60)
    assert not errors and results == {0: True, 1: True, 2: True}


def test_another_count_replaces_the_team_and_its_workers_end(count):
    count(2)
    threads.for_each([0, 1], lambda p, s: p)
    old = threads._team
    count(3)
    assert threads.for_each(list(range(9)), lambda p, s: p * p) == [p * p for p in range(9)]
    assert threads._team is not old and threads._team.size == 3
    for t in old.threads:
        t.join(10)
        assert not t.is_alive()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_makes_a_team_of_its_own(count):
    """The parent's workers do not exist in a forked child: its first for_each must not wait for them."""
    import os
    count(2)
    threads.for_each([0, 1], lambda p, s: p)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a result on the pipe, then out without running pytest's exit handlers
        try:
            ok = threads.for_each(list(range(6)), lambda p, s: p + 1) == [1, 2, 3, 4, 5, 6]
            os.write(write, b"ok" if ok else b"wrong")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child's for_each hung")
        time.sleep(0.01)
    assert os.read(read, 10) == b"ok"


def test_inside_a_part_there_is_one_thread(count):
    count(2)
    counts = threads.for_each(list(range(4)), lambda p, s: threads.count())
    assert counts == [1, 1, 1, 1]


def test_one_thread_by_default_with_the_blas_left_alone(count):
    count(None)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert threads.count() == 1 and "the default" in threads.describe()
        with threads.blas_held():
            assert set(blas_threads()) == {2}  # nothing to hold for


def test_thread_count_from_the_environment_and_set_count(monkeypatch, count):
    monkeypatch.setattr(threads, "_chosen_read", False)  # as at the first op of a process
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.count() == 3 and threads.ENV_VAR in threads.describe()
    assert count(2) == 3 and threads.count() == 2  # set_count is over the variable
    monkeypatch.setattr(threads, "_chosen_read", False)
    monkeypatch.setenv(threads.ENV_VAR, "many")
    with pytest.raises(ValueError, match=r"CNN_GPU_THREADS must be a whole number of threads, got 'many'"):
        threads.count()
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="the thread count must be an int >= 1 or None"):
            count(bad)


def test_without_threadpoolctl_the_parts_run_in_turn(monkeypatch, count):
    count(2)
    monkeypatch.setattr(threads, "_blas", [])  # what _blas_controllers finds without threadpoolctl
    assert threads.count() == 1
    assert "threadpoolctl" in threads.describe()
    assert threads.for_each([1, 2], lambda p, s: threading.get_ident()) == [threading.get_ident()] * 2


def test_ranges_cover_the_total_in_fixed_slices():
    assert threads.ranges(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert threads.ranges(0, 4) == []
    assert threads.row_parts(3, 1 << 30) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least a row each


def test_split_gives_one_part_per_thread_of_at_least_a_mebibyte(count):
    mib = threads.SPLIT_MIN_BYTES
    count(3)
    assert threads.split(10, mib) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert threads.split(2, mib) == [slice(0, 1), slice(1, 2)]
    assert threads.split(8, mib // 4) == [slice(0, 4), slice(4, 8)]  # 2 MiB in all: two parts
    assert threads.split(10, 1) == [slice(0, 10)]  # a small array runs here, whole
    count(1)
    assert threads.split(10, mib) == [slice(0, 10)]


# ---- the ops give the same bits on one thread and on two ------------------------------------------

@pytest.mark.usefixtures("cpu_kernels")  # the compiled kernels, then the NumPy code
@pytest.mark.parametrize("case", [
    # (N, H, W, C, O, kernel, stride, padding, groups): a ResNet's 3x3 (many chunks), a strided one,
    # a 1x1, a depthwise one
    (48, 14, 14, 16, 16, 3, 1, 1, 1),
    (40, 12, 12, 8, 16, 3, 2, 1, 1),
    (40, 10, 10, 16, 24, 1, 1, 0, 1),
    (40, 12, 12, 16, 16, 3, 1, 1, 16),
])
def test_conv_is_the_same_on_one_thread_and_two(on_threads, case):
    n, h, w, c, o, k, stride, padding, groups = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    wt = rng.standard_normal((k, k, c // groups, o), dtype=np.float32)
    b = rng.standard_normal(o, dtype=np.float32)

    def step():
        y, cache = conv2d_forward(x, wt, b, stride=stride, padding=padding, groups=groups)
        return (y, *conv2d_backward(np.sin(y), cache))

    assert_same(on_threads(1, step), on_threads(2, step))


@pytest.mark.usefixtures("cpu_kernels")
def test_pool_relu_and_batch_norm_are_the_same_on_one_thread_and_two(on_threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16, 16, 16), dtype=np.float32) * 3 + 1
    gamma, beta = rng.standard_normal(16, dtype=np.float32), rng.standard_normal(16, dtype=np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)

    def step():
        out = []
        y, cache = max_pool2d_forward(x, 3, stride=2, padding=1)
        out += [y, max_pool2d_backward(np.cos(y), cache)]
        y, cache = max_pool2d_forward(x, 2)
        out += [y, max_pool2d_backward(np.cos(y), cache)]
        y, cache = avg_pool2d_forward(x, 2)
        out += [y, avg_pool2d_backward(np.cos(y), cache)]
        y, cache = relu_forward(x)
        out += [y, relu_backward(np.cos(x), cache)]
        y, cache = batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training=True)
        out += [y, *batch_norm_backward(np.cos(y), cache)]
        return out

    assert_same(on_threads(1, step), on_threads(2, step))


@pytest.mark.parametrize("name", ["resnet20", "mobilenet", "seed_cnn"])
def test_a_training_step_is_the_same_on_one_thread_and_two(on_threads, name):
    x = np.random.default_rng(2).standard_normal((32, 28, 28, 1), dtype=np.float32)

    def step():
        model = build(name, input_shape=(28, 28, 1), num_classes=10, seed=0)
        y = model.forward(x)
        model.backward(np.cos(y))
        return [y] + [p.grad for p in model.parameters()]

    assert_same(on_threads(1, step), on_threads(2, step))


@pytest.mark.parametrize("name", ["mobilenet", "seed_cnn"])
def test_evaluation_in_slices_side_by_side_is_the_same_as_in_turn(monkeypatch, on_threads, name):
    """Eval mode on the CPU runs a batch in slices; on two threads the slices run side by side,
    each slice's layers on one thread. The slices follow from the sizes alone: the same bits."""
    import cnn_gpu.model as model_module
    monkeypatch.setattr(model_module, "EVAL_SLICE_BYTES", 1 << 17)  # a few images per slice
    x = np.random.default_rng(3).standard_normal((20, 28, 28, 1), dtype=np.float32)
    model = build(name, input_shape=(28, 28, 1), num_classes=10, seed=0).eval()
    runs = []  # the thread of each slice's first layer
    first = model.nodes[0].layer
    forward = first.infer
    monkeypatch.setattr(first, "infer", lambda *a, **k: (runs.append(threading.get_ident()), forward(*a, **k))[1])

    def evaluate():
        for _, layer in model.named_layers():
            if hasattr(layer, "_plans"):
                layer._plans.clear()
        return [model.forward(x)]

    one = on_threads(1, evaluate)
    assert len(runs) > 2 and len(set(runs)) == 1
    runs.clear()
    two = on_threads(2, evaluate)
    assert len(set(runs)) == 2  # side by side
    assert_same(one, two)


def test_changing_the_count_while_another_thread_runs_parts_does_not_deadlock(count):
    """A thread that sets another count makes a new team and closes the old one, which waits for the
    job running on it; that job's caller takes the module's lock when it lets the BLAS go."""
    count(2)
    started, finish, errors = threading.Event(), threading.Event(), []

    def slow(part, _):
        started.set()
        finish.wait(10)
        return part

    def caller():
        try:
            assert threads.for_each([0, 1, 2], slow) == [0, 1, 2]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=caller)
    t.start()
    assert started.wait(10)
    threads.set_count(3)
    other = threading.Thread(target=lambda: threads.for_each([0, 1, 2], lambda p, s: p))
    other.start()  # makes the team of 3 and closes the team of 2 while its job runs
    time.sleep(0.05)
    finish.set()
    t.join(20)
    other.join(20)
    assert not t.is_alive() and not other.is_alive() and not errors
