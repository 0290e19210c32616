"""cnn_gpu/cpu/jit.py: a compiled loop made for one shape, found again in Numba's disk cache by the
next process, and never another shape's loop in its place.

Before jit.specialized, the chunk loops captured the kernels they call, and Numba keyed their cache
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


def _run(cache_dir, code: str = _CODE, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_next_process_loads_each_loop_from_the_cache_and_not_another_strides(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    for s in ("1", "2"):
        assert first[s]["hits"] == 0 and first[s]["misses"] == 1, first  # compiled, then written
        assert second[s]["hits"] == 1 and second[s]["misses"] == 0, second  # read back
        # each stride its own loop: a loop of the other stride would be off by far more than rounding
        assert first[s]["error"] < 1e-5 and second[s]["error"] < 1e-5, (first, second)


# conv3x3_chunks at stride 1 for the channel counts given, each against the reference
_SHAPES_CODE = """
import json, sys
import numpy as np
from cnn_gpu.cpu import direct, spin
from cnn_gpu.functional import conv
from cnn_gpu.geometry import Window
rng = np.random.default_rng(0)
errors = {}
for c in map(int, sys.argv[1:]):
    x = rng.standard_normal((3, 9, 10, c)).astype(np.float32)
    w = direct.aligned(rng.standard_normal((3, 3, c, 16)).astype(np.float32))
    y = direct.aligned_empty((3, 9, 10, 16))
    direct.conv3x3_chunks(x, w, y, np.array([0, 3], np.int64))(spin.new_flags(spin.COUNTER_FLAGS),
                                                               direct.padded_scratch(3, 9, 10, c))
    expected, _ = conv.reference_forward(x.astype(float), w.astype(float), None, Window.of((3, 3), 1, 1, 1), 1, (9, 10))
    errors[c] = float(np.abs(y - expected).max() / np.abs(expected).max())
print(json.dumps(errors))
"""


def test_loops_cached_by_two_processes_run_side_by_side_in_a_third(tmp_path):
    """Two processes that compile the same steps for other channels give the kernels inside their
    loops the same Numba serial numbers (which Numba puts in the functions' symbol names); the
    kernels' names must still differ, or a third process that loads both loops links both to one
    of the two kernels: a wrong result, or a crash. The first process compiles the helpers that
    every loop calls, so that the next two compile the very same steps (found so, at 0.98 error)."""
    assert _run(tmp_path, _SHAPES_CODE, "24")["24"] < 1e-5
    assert _run(tmp_path, _SHAPES_CODE, "16")["16"] < 1e-5
    assert _run(tmp_path, _SHAPES_CODE, "32")["32"] < 1e-5
    both = _run(tmp_path, _SHAPES_CODE, "16", "32")
    assert both["16"] < 1e-5 and both["32"] < 1e-5, both


def test_each_kernel_and_loop_has_a_name_of_its_own_the_same_each_time():
    from cnn_gpu.cpu import batchnorm, direct

    def name(compiled):
        return compiled.py_func.__qualname__

    grad_taps = direct._input_grad_taps(1, 0, 0)  # the input gradient's: the forward's channels, other taps
    kernels = [direct._kernel(16, 16, 1), direct._kernel(16, 16, 2), direct._kernel(16, 32, 1), direct._kernel(32, 16, 1),
               direct._kernel(16, 16, 1, grad_taps), direct._rows(16, 16, tuple(range(9)), 8),
               direct._rows(16, 16, tuple(range(9)), 7), direct._rows(32, 16, tuple(range(9)), 8),
               direct._tiles12(16, 16, 1, direct.FORWARD_TAPS), direct._tiles12(16, 16, 1, grad_taps),
               direct._weight_grad_kernel(16, 16, 1), direct._weight_grad_kernel(16, 16, 2)]
    loops = [direct._forward_chunks(16, 16, 1), direct._forward_chunks(16, 16, 2), direct._forward_chunks(32, 16, 1),
             direct._backward_chunks(16, 16, 1), direct._backward_chunks(16, 16, 2)]
    loops += [batchnorm._parts_loop(k) for k in (batchnorm._shifted_sums, batchnorm._shifted_sums_vectors,
                                                  batchnorm._grad_sums)]
    names = [name(f) for f in kernels + loops]
    assert len(set(names)) == len(names), names
    # made again from scratch, as in the next process: the same names
    assert name(direct._rows_then_tiles.__wrapped__(16, 16, direct.FORWARD_TAPS)) == name(kernels[0])
    assert name(direct._forward_chunks.__wrapped__(16, 16, 2)) == name(loops[1])


def test_the_kernels_capture_only_constants():
    """What a loop's cache key and name are made of: a kernel that captured a compiled function
    (or any object without a value of its own) would be described by its address."""
    from cnn_gpu.cpu import direct
    for kernel in (direct._kernel(16, 16, 1), direct._kernel(16, 32, 2), direct._kernel(32, 16, 1),
                   direct._weight_grad_kernel(16, 16, 1), direct._forward_chunks(16, 16, 1),
                   direct._backward_chunks(16, 32, 2)):
        for cell in kernel.py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (int, tuple)), (kernel, cell.cell_contents)
