"""Shared test helpers.

GPU tests carry two marks: `gpu` (select them with `pytest -m gpu`) and `requires_gpu`,
which skips them, saying why, where CuPy cannot run:

    pytestmark = [pytest.mark.gpu, requires_gpu]
"""
from __future__ import annotations

import pytest

from cnn_gpu.backend import cupy_unavailable_reason

GPU_UNAVAILABLE = cupy_unavailable_reason()  # None where CuPy and a CUDA device work
requires_gpu = pytest.mark.skipif(GPU_UNAVAILABLE is not None,
                                  reason=f"needs a CUDA device: {GPU_UNAVAILABLE}")
