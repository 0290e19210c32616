"""Flags that threads wait on by spinning, outside the GIL: how cnn_gpu.cpu.threads hands out parts.

    flags = new_flags(n)                   # n int64 flags, each on a cache line of its own, all 0
    publish(flags, i, value)               # flags[i] = value (an atomic store); load(flags, i) reads one
    seen = wait_for(flags, i, value, spins)  # spin until flags[i] >= value, at most `spins` pauses
    seen = wait_all(flags, first, last, value, spins)   # the same for flags first..last-1
    got = publish_then_wait(flags, i, value, asleep, j, next_value, spins)  # both, in one call
    k = take(flags, i)                     # in compiled code: flags[i] += 1, atomically; the value before
    k = next_part(counter)                 # in compiled code: the next part of an on_each loop (below)
    leave(counter)                         # in compiled code: an on_each loop's last call (below)
    seen = announce_then_wait_all(flags, i, value, first, last, spins)   # flags[i] = value, then wait_all

Why spin: a thread asleep on a lock or a condition takes ~50 us to wake on a virtual machine
whose idle CPUs halt at once (no halt polling: this project's machines are such), so every hand-off
of parts to a sleeping thread and back cost ~0.1 ms, as long as the pass of one of resnet20's
smaller batch norms (BENCHMARKS.md, "Session 13"). A thread spinning on a flag sees it change in
well under a microsecond. OpenMP's runtimes (PyTorch's threads) do the same: spin for a while, then sleep.
The spins run in compiled code that releases the GIL, so a waiting thread holds back no other.

The loads and stores are LLVM atomics (sequentially consistent) on int64s: a compiled loop may not
keep a flag in a register, what a thread wrote before publishing is seen by the thread that
waited for it, and of two threads that each store a flag and then load the other's, at least one
sees the other's store (how a sleeping thread is never left asleep: cnn_gpu.cpu.threads._Team).
Between loads the CPU's spin-wait hint (x86 `pause`, Arm `yield`) keeps the loop from flooding
the core's pipeline.

Without Numba (or with a Numba that does not import) the same calls are plain Python that holds
the GIL, so they cannot spin: each wait looks once and reports what it saw, and the team in
cnn_gpu.cpu.threads sleeps and wakes as a pool of threads does.
"""
from __future__ import annotations

import platform

import numpy as np

from . import unavailable_reason

LINE = 8  # int64s in a 64-byte cache line: flag i lives at flags[i * LINE], alone on its line

# A counter of parts (cnn_gpu.cpu.threads.on_each) is the first three flags of a team's: the number
# of the next part, the job that waits to be posted, and the job posted (what the team's other
# threads wait for). A compiled loop's first next_part posts the pending job: the other threads
# then come for the GIL when this one has let it go, instead of sleeping on it while it runs Python.
PART, PENDING, POSTED = 0, 1, 2
COUNTER_FLAGS = 3
# A team's workers get a fourth: the job whose end the caller waits for now, outside the GIL. A
# worker whose loop ends first spins (leave) until it is raised, and then takes the GIL back at
# once; otherwise it would come for the GIL while the caller still runs Python after its own loop,
# sleep on it, and take ~20-50 us to wake once the caller lets it go, at the end of every job.
WAITING = 3
WORKER_COUNTER_FLAGS = 4
SPINS = 100_000  # hints before a wait gives up: ~1.5 ms here, longer than the gaps between a step's ops
                 # (cnn_gpu.cpu.threads' waits before they sleep, and leave's)

# The spin-wait hint as an LLVM intrinsic (Numba's JIT takes no inline assembly): x86's pause,
# Arm's hint #1 (yield); elsewhere none.
_MACHINE = platform.machine().lower()
_HINT = ("llvm.x86.sse2.pause" if _MACHINE in ("x86_64", "amd64", "i386", "i686")
         else "llvm.aarch64.hint" if _MACHINE in ("aarch64", "arm64") else None)


def new_flags(n: int) -> np.ndarray:
    """n flags, each alone on a 64-byte line (two threads writing neighbours would share one)."""
    return np.zeros(n * LINE, np.int64)


class plain:
    """The same calls in Python, for when Numba is missing: they hold the GIL, so each wait looks once."""

    new_flags = staticmethod(new_flags)
    PART, PENDING, POSTED, COUNTER_FLAGS, WAITING, LINE = PART, PENDING, POSTED, COUNTER_FLAGS, WAITING, LINE
    WORKER_COUNTER_FLAGS = WORKER_COUNTER_FLAGS

    @staticmethod
    def publish(flags, i, value):
        flags[i * LINE] = value

    @staticmethod
    def load(flags, i):
        return int(flags[i * LINE])

    @staticmethod
    def wait_for(flags, i, value, spins):
        return plain.load(flags, i) >= value

    @staticmethod
    def wait_all(flags, first, last, value, spins):
        return all(plain.load(flags, i) >= value for i in range(first, last))

    @staticmethod
    def announce_then_wait_all(flags, i, value, first, last, spins):
        plain.publish(flags, i, value)
        return plain.wait_all(flags, first, last, value, spins)

    @staticmethod
    def publish_then_wait(flags, i, value, asleep, j, next_value, spins):
        plain.publish(flags, i, value)
        if plain.load(flags, asleep) >= value:
            return -1
        return 1 if plain.wait_for(flags, j, next_value, spins) else 0


COMPILED = unavailable_reason() is None  # Numba imports: the waits spin outside the GIL

if COMPILED:
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .simd import element_address

    def _check(flags) -> None:
        if not (isinstance(flags, types.Array) and flags.ndim == 1 and flags.dtype == types.int64):
            raise TypeError(f"cnn_gpu.cpu.spin: expected new_flags()'s 1-D int64 array, got {flags}")


    def _flag_address(context, builder, flags_type, flags, i):
        """A pointer to flag i: flags[i * LINE]."""
        return element_address(context, builder, flags_type, flags, builder.mul(i, ir.Constant(i.type, LINE)))

    @intrinsic
    def _load(typingctx, flags, i):
        _check(flags)

        def codegen(context, builder, sig, args):
            return builder.load_atomic(_flag_address(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
        return types.int64(flags, types.intp), codegen


    @intrinsic
    def _store(typingctx, flags, i, value):
        _check(flags)

        def codegen(context, builder, sig, args):
            builder.store_atomic(args[2], _flag_address(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
            return context.get_dummy_value()
        return types.void(flags, types.intp, types.int64), codegen


    @intrinsic
    def take(typingctx, flags, i):
        """flags[i] += 1 as one atomic step, returning the value before: threads that each take
        from one counter get each number once (compiled loops that hand out their own parts,
        cnn_gpu.cpu.direct). For compiled code only: an intrinsic has no Python form."""
        _check(flags)

        def codegen(context, builder, sig, args):
            address = _flag_address(context, builder, sig.args[0], args[0], args[1])
            return builder.atomic_rmw("add", address, ir.Constant(ir.IntType(64), 1), "seq_cst")
        return types.int64(flags, types.intp), codegen


    @njit(inline="always")
    def next_part(counter):  # pragma: no cover - compiled, tested
        """The next part's number, from counter[PART] (take); first posts counter[PENDING] to
        counter[POSTED] if it is not there yet. For compiled code (take is an intrinsic)."""
        pending = _load(counter, PENDING)
        if pending > _load(counter, POSTED):
            _store(counter, POSTED, pending)
        return take(counter, PART)

    @njit(inline="always")
    def leave(counter):  # pragma: no cover - compiled, tested
        """An on_each loop's last call, when next_part has no part left. On a team's worker (whose
        counter has WORKER_COUNTER_FLAGS flags; the caller's and a lone thread's have COUNTER_FLAGS):
        spin until the caller waits for the job's end outside the GIL (counter[WAITING] reaches the
        job posted), at most SPINS hints, so that the worker takes the GIL back when it is free.
        Returns False when the hints ran out first, else True."""
        if len(counter) < WORKER_COUNTER_FLAGS * LINE:
            return True
        job = _load(counter, POSTED)
        for _ in range(SPINS):
            if _load(counter, WAITING) >= job:
                return True
            _hint()
        return _load(counter, WAITING) >= job


    @intrinsic
    def _hint(typingctx):
        def codegen(context, builder, sig, args):
            if _HINT == "llvm.x86.sse2.pause":
                builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), _HINT), [])
            elif _HINT is not None:
                i32 = ir.IntType(32)
                builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i32]), _HINT),
                             [ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(), codegen


    _jit = njit(cache=True, nogil=True)
    # publish and load keep the GIL: a store or a load takes nanoseconds, and a call that let the GIL
    # go would let a woken thread take it, and this one then sleep to get it back
    _jit_gil = njit(cache=True)


    @_jit_gil
    def publish(flags, i, value):  # pragma: no cover - compiled, tested
        _store(flags, i, value)


    @_jit_gil
    def load(flags, i):  # pragma: no cover - compiled, tested
        return _load(flags, i)


    @_jit
    def wait_for(flags, i, value, spins):  # pragma: no cover - compiled, tested
        for _ in range(spins):
            if _load(flags, i) >= value:
                return True
            _hint()
        return _load(flags, i) >= value


    @_jit
    def wait_all(flags, first, last, value, spins):  # pragma: no cover - compiled, tested
        for i in range(first, last):
            while _load(flags, i) < value:
                if spins <= 0:
                    return False
                spins -= 1
                _hint()
        return True


    @_jit
    def announce_then_wait_all(flags, i, value, first, last, spins):  # pragma: no cover - compiled, tested
        """flags[i] = value once the GIL is let go (this call's first step), then wait_all: the
        caller's wait for a job's end, which the workers' leave() waits for."""
        _store(flags, i, value)
        return wait_all(flags, first, last, value, spins)


    @_jit
    def publish_then_wait(flags, i, value, asleep, j, next_value, spins):  # pragma: no cover - compiled, tested
        """flags[i] = value; then -1 if flags[asleep] >= value (the thread waiting for it has gone to
        sleep: wake it), else whether flags[j] reached next_value within `spins` (1 or 0). All outside
        the GIL: the thread that waited for flags[i] takes the GIL at once, while this one spins."""
        _store(flags, i, value)
        if _load(flags, asleep) >= value:
            return -1
        return 1 if wait_for(flags, j, next_value, spins) else 0

else:
    publish, load, wait_for, wait_all, announce_then_wait_all, publish_then_wait = (
        plain.publish, plain.load, plain.wait_for, plain.wait_all, plain.announce_then_wait_all,
        plain.publish_then_wait)
