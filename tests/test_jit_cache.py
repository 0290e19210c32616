"""cnn_gpu/cpu/jit.py: a compiled loop made for one shape, found again in Numba's disk cache by the
next process, and never another shape's loop in its place.

Before jit.calling, the chunk loops captured the kernels they call, and Numba keyed their cache
entries on a pickle of those kernels, which holds an id new in every process: each process
compiled every loop again (a ResNet-20's first step took 14 s with a warm cache)."""
import json
import os
import subprocess
import sys

from .conftest import requires_jit

pytestmark = requires_jit

# conv3x3_chunks at strides 1 and 2 for the same channels: loops with the same code and the same
# captured constants (the stride only picks the kernel), so only their kernels tell them apart
_CODE = """
import json
import numpy as np
from cnn_gpu.cpu import direct, spin
from cnn_gpu.functional import conv
from cnn_gpu.geometry import Window
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 9, 10, 16)).astype(np.float32)
w = direct.aligned(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
report = {}
for s in (1, 2):
    oh, ow = direct.output_hw(9, 10, s)
    y = direct.aligned_empty((3, oh, ow, 16))
    starts = np.array([0, 2, 3], np.int64)
    direct.conv3x3_chunks(x, w, y, starts, s)(spin.new_flags(spin.COUNTER_FLAGS), direct.padded_scratch(2, 9, 10, 16))
    window = Window.of((3, 3), s, 1, 1)
    expected, _ = conv.reference_forward(x.astype(float), w.astype(float), None, window, 1, (oh, ow))
    stats = direct._forward_chunks(16, 16, s).stats
    report[s] = {"error": float(np.abs(y - expected).max() / np.abs(expected).max()),
                 "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}
print(json.dumps(report))
"""


def _run(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", _CODE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_next_process_loads_each_loop_from_the_cache_and_not_another_strides(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    for s in ("1", "2"):
        assert first[s]["hits"] == 0 and first[s]["misses"] == 1, first  # compiled, then written
        assert second[s]["hits"] == 1 and second[s]["misses"] == 0, second  # read back
        # each stride its own loop: a loop of the other stride would be off by far more than rounding
        assert first[s]["error"] < 1e-5 and second[s]["error"] < 1e-5, (first, second)


def test_each_set_of_kernels_has_a_name_of_its_own_the_same_each_time():
    from cnn_gpu.cpu import batchnorm, direct, jit
    assert jit._identity({"KERNEL": direct._kernel(16, 16, 1)}) != jit._identity({"KERNEL": direct._kernel(16, 16, 2)})
    assert jit._identity({"KERNEL": direct._kernel(16, 32, 1)}) != jit._identity({"KERNEL": direct._kernel(16, 16, 1)})
    # the input gradient's kernel: the same channels and stride as a forward's, other taps
    taps = direct._input_grad_taps(1, 0, 0)
    assert jit._identity({"K": direct._kernel(16, 16, 1, taps)}) != jit._identity({"K": direct._kernel(16, 16, 1)})
    # made again from scratch (as in the next process): the same name
    again = direct._rows_then_tiles.__wrapped__(16, 16, direct.FORWARD_TAPS)
    assert again.py_func.__qualname__ == direct._rows_then_tiles(16, 16, direct.FORWARD_TAPS).py_func.__qualname__
    names = {batchnorm._parts_loop(k).py_func.__qualname__
             for k in (batchnorm._shifted_sums, batchnorm._shifted_sums_vectors, batchnorm._grad_sums)}
    assert len(names) == 3


def test_the_kernels_capture_only_constants():
    """What a loop's cache key and name are made of: a kernel that captured a compiled function
    (or any object without a value of its own) would be described by its address."""
    from cnn_gpu.cpu import direct
    for kernel in (direct._kernel(16, 16, 1), direct._kernel(16, 32, 2), direct._kernel(32, 16, 1),
                   direct._weight_grad_kernel(16, 16, 1), direct._forward_chunks(16, 16, 1),
                   direct._backward_chunks(16, 32, 2)):
        for cell in kernel.py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (int, tuple)), (kernel, cell.cell_contents)
