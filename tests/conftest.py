"""Shared fixtures and marks.

Every op test takes the `xp` fixture and runs on NumPy, and on CuPy where a GPU is present.
GPU-only tests carry two marks: `gpu` (select them with `pytest -m gpu`) and
`requires_gpu`, which skips them, saying why, where CuPy cannot run:

    pytestmark = [pytest.mark.gpu, requires_gpu]
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import cupy_unavailable_reason, module_for

GPU_UNAVAILABLE = cupy_unavailable_reason()  # None where CuPy and a CUDA device work
requires_gpu = pytest.mark.skipif(GPU_UNAVAILABLE is not None,
                                  reason=f"needs a CUDA device: {GPU_UNAVAILABLE}")

BACKENDS = ["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, requires_gpu])]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: numpy, or cupy on a machine with a GPU."""
    return module_for(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
