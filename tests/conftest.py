"""Shared fixtures and marks.

Every op test takes the `xp` fixture and runs on NumPy, and on CuPy where a GPU is present.
GPU-only tests carry two marks: `gpu` (select them with `pytest -m gpu`) and
`requires_gpu`, which skips them, saying why, where CuPy cannot run:

    pytestmark = [pytest.mark.gpu, requires_gpu]

Modules of ops that have compiled CPU kernels (cnn_gpu.cpu) run every test twice on NumPy,
through the kernels and through the NumPy code, with `pytestmark = pytest.mark.usefixtures("cpu_kernels")`.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu import cpu
from cnn_gpu.backend import cupy_unavailable_reason, module_for

GPU_UNAVAILABLE = cupy_unavailable_reason()  # None where CuPy and a CUDA device work
requires_gpu = pytest.mark.skipif(GPU_UNAVAILABLE is not None,
                                  reason=f"needs a CUDA device: {GPU_UNAVAILABLE}")

BACKENDS = ["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, requires_gpu])]

JIT_UNAVAILABLE = cpu.unavailable_reason()  # None where Numba imports
requires_jit = pytest.mark.skipif(JIT_UNAVAILABLE is not None,
                                  reason=f"needs Numba for the compiled CPU kernels: {JIT_UNAVAILABLE}")


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: numpy, or cupy on a machine with a GPU."""
    return module_for(request.param)


@pytest.fixture(params=[pytest.param(True, id="jit", marks=requires_jit), pytest.param(False, id="numpy-code")])
def cpu_kernels(request):
    """Runs the test with cnn_gpu.cpu's compiled kernels switched on, then off (NumPy arrays only)."""
    previous = cpu.set_enabled(request.param)
    yield request.param
    cpu.set_enabled(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
