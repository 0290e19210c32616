"""Shared fixtures: every op test runs on NumPy, and on CuPy where a GPU is present."""
import numpy as np
import pytest

from cnn_gpu.backend import cupy_available, cupy_unavailable_reason, module_for

GPU_REASON = "needs CuPy and a CUDA device"

requires_gpu = [pytest.mark.gpu,
                pytest.mark.skipif(not cupy_available(), reason=f"{GPU_REASON}: {cupy_unavailable_reason()}")]

BACKENDS = ["numpy", pytest.param("cupy", marks=requires_gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: numpy, or cupy on a machine with a GPU."""
    return module_for(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
