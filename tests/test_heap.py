"""cnn_gpu.cpu.heap: after `import cnn_gpu`, a freed array's pages serve the next one of its size.

Each case runs in a fresh interpreter, since malloc's settings are the process's: a loop that
allocates, writes and frees 4 MiB arrays, as a training step does its activations, counting the
page faults (Linux getrusage): ten arrays alive at once, then all freed, five times. With glibc's
defaults the freed top of the heap (40 MiB) exceeds its trim threshold and goes back to the kernel,
so every round faults on fresh pages (~1000 a 4 MiB array); with the thresholds fixed, each round
reuses the last one's blocks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnn_gpu.cpu import heap

pytestmark = pytest.mark.skipif(not heap.keep_freed_memory(),
                                reason="glibc's mallopt is not there (not Linux with glibc)")

LOOP = """
import json, resource, numpy as np
import cnn_gpu
from cnn_gpu.cpu import heap
def round():
    arrays = [np.ones(1 << 20, np.float32) for _ in range(10)]  # 4 MiB each, written
    del arrays
round()  # the first round's pages are new either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "applied": heap.keep_freed_memory()}))
"""


def _faults(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != heap.ENV_VAR}
    if setting is not None:
        env[heap.ENV_VAR] = setting
    done = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_freed_arrays_are_reused_after_import():
    kept = _faults(None)
    assert kept["applied"] and kept["faults"] < 500  # 50 arrays of 1024 pages each


def test_the_system_setting_leaves_glibcs_defaults():
    system = _faults("system")
    assert not system["applied"] and system["faults"] > 10 * 1000  # of 50 arrays, at least 10 on fresh pages (25 here)
