"""Find the CUDA sources, compile them with NVRTC through CuPy, and cache the modules.

The .cu files live in `<repo>/kernels/` in a checkout and are shipped as
`cnn_gpu/kernels/` inside the wheel; the installed copy is looked for first.
Kernels are C++ templates; each caller names the instantiations it needs (name
expressions such as ``"max_pool2d_forward<float, unsigned char, unsigned int, 4>"``) and
gets one `cupy.RawModule` per (file, instantiations), compiled once per process.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy

# The one set of NVRTC options; tests compile with exactly these (plus an -arch).
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../cnn_gpu
KERNEL_DIRS: tuple[Path, ...] = (
    _PACKAGE_DIR / "kernels",         # installed wheel: cnn_gpu/kernels/
    _PACKAGE_DIR.parent / "kernels",  # checkout: <repo root>/kernels/
)

# C type of each supported array dtype, as it appears in a name expression.
CTYPES: dict[np.dtype, str] = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_path(filename: str) -> Path:
    """Where `filename` (e.g. 'maxpool2d.cu') is: the installed copy first, then the checkout."""
    for directory in KERNEL_DIRS:
        path = directory / filename
        if path.is_file():
            return path
    looked = ", ".join(str(d) for d in KERNEL_DIRS)
    raise FileNotFoundError(f"CUDA source {filename!r} not found (looked in {looked})")


def kernel_source(filename: str) -> str:
    """The text of a kernel file."""
    return kernel_path(filename).read_text(encoding="utf-8")


def ctype(dtype: Any) -> str:
    """'float' or 'double' for a float32/float64 dtype; TypeError for anything else."""
    dt = np.dtype(dtype)
    if dt not in CTYPES:
        raise TypeError(f"CUDA kernels take float32 or float64 arrays, got {dt}")
    return CTYPES[dt]


@functools.lru_cache(maxsize=None)
def load_module(filename: str, name_expressions: tuple[str, ...]) -> Any:
    """The compiled `cupy.RawModule` for one kernel file and a set of template instantiations.

    Cached per process: each distinct (filename, name_expressions) compiles once (CuPy also
    keeps the cubin on disk, under ~/.cupy/kernel_cache, across processes).
    """
    cupy = require_cupy()
    module = cupy.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS,
                            name_expressions=list(name_expressions))
    module.compile()  # compile now, so a source error surfaces here and not at first launch
    return module


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors on a device (132 on an H100 SXM), for sizing grids."""
    cupy = require_cupy()
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def current_sm_count() -> int:
    """`sm_count` of the current device."""
    return sm_count(require_cupy().cuda.Device().id)
