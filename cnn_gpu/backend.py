"""The backend shim: NumPy on the CPU, CuPy on an NVIDIA GPU.

Ops never consult a global flag: they take the array module from their inputs
(`get_array_module(x)`), so the same function runs on either backend. The one
global choice here, `default_backend()`, only says where *new* arrays go (model
parameters, datasets) when the caller does not say.

This is the only module that imports CuPy.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("numpy", "cupy", "auto")
ENV_VAR = "CNN_GPU_BACKEND"


class BackendUnavailableError(RuntimeError):
    """CuPy was asked for where it cannot run (not installed, or no CUDA device)."""


_cupy: ModuleType | None = None
_cupy_reason: str | None = None  # why CuPy cannot run, once we have looked
_chosen: str | None = None  # set by set_backend(); None means "read the environment"


def _probe_cupy() -> tuple[ModuleType | None, str | None]:
    """Import CuPy and look for a device, once per process."""
    global _cupy, _cupy_reason
    if _cupy is not None or _cupy_reason is not None:
        return _cupy, _cupy_reason
    try:
        import cupy  # noqa: PLC0415 - the one place CuPy is imported
    except ImportError as exc:
        _cupy_reason = (f"CuPy is not installed ({exc}); install it with "
                        "`pip install cnn_gpu[gpu]` (cupy-cuda12x) or the cupy wheel for your CUDA")
        return None, _cupy_reason
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing driver library
        _cupy_reason = f"CuPy {cupy.__version__} is installed but no CUDA device can be used ({exc})"
        return None, _cupy_reason
    if count < 1:
        _cupy_reason = f"CuPy {cupy.__version__} is installed but no CUDA device is present"
        return None, _cupy_reason
    _cupy = cupy
    return _cupy, None


def cupy_available() -> bool:
    """True when CuPy imports and a CUDA device is present."""
    return _probe_cupy()[0] is not None


def cupy_unavailable_reason() -> str | None:
    """Why CuPy cannot run here, or None when it can."""
    return _probe_cupy()[1]


def require_cupy() -> ModuleType:
    """The cupy module, or a BackendUnavailableError that says why not."""
    cupy, reason = _probe_cupy()
    if cupy is None:
        raise BackendUnavailableError(f"the cupy backend was asked for but cannot run: {reason}")
    return cupy


def resolve_backend(name: str | None = None) -> str:
    """Turn 'numpy' | 'cupy' | 'auto' | None (the environment, then 'auto') into 'numpy' or 'cupy'.

    'auto' picks CuPy when it imports and a device is present, else NumPy.
    An explicit 'cupy' that cannot run raises BackendUnavailableError.
    """
    if name is None:
        name = _chosen or os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = f" (from ${ENV_VAR})" if name == os.environ.get(ENV_VAR, "").strip().lower() else ""
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}{source}")
    if name == "auto":
        return "cupy" if cupy_available() else "numpy"
    if name == "cupy":
        require_cupy()
    return name


def set_backend(name: str | None) -> str:
    """Choose where new arrays go; None returns to the environment's choice. Returns the resolved name."""
    global _chosen
    resolved = resolve_backend(name)
    _chosen = None if name is None else name
    return resolved


def default_backend() -> str:
    """'numpy' or 'cupy': where new arrays go when the caller does not say."""
    return resolve_backend(None)


def module_for(name: str | None = None) -> ModuleType:
    """The array module (numpy or cupy) for a backend name (None: the default backend)."""
    return require_cupy() if resolve_backend(name) == "cupy" else np


def is_cupy_array(a: Any) -> bool:
    """True for a cupy.ndarray, also one made by the user before the backend looked for CuPy.

    Reads the type's module name, so it never imports CuPy itself.
    """
    return type(a).__module__.startswith("cupy") and type(a).__name__ == "ndarray"


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy or cupy, from the arrays given (as cupy.get_array_module does).

    Arrays of both backends in one call are an error: they would be copied silently
    or fail deep inside an op.
    """
    on_gpu = [is_cupy_array(a) for a in arrays if a is not None]
    if any(on_gpu):
        if not all(on_gpu):
            kinds = ", ".join(type(a).__module__.split(".")[0] + "." + type(a).__name__
                              for a in arrays if a is not None)
            raise TypeError(f"arrays of both backends were mixed in one call ({kinds}); "
                            "move them to one device first with cnn_gpu.backend.to_device()")
        return sys.modules["cupy"]
    return np


def backend_of(a: Any) -> str:
    """'cupy' or 'numpy', the backend an array lives on."""
    return "cupy" if is_cupy_array(a) else "numpy"


def to_device(a: Any, backend: str | None = None) -> Any:
    """Copy an array to a backend ('numpy', 'cupy', 'auto', None for the default). No copy if it is there."""
    target = resolve_backend(backend)
    if target == "cupy":
        return require_cupy().asarray(a)
    return to_numpy(a)


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array (a device-to-host copy for CuPy)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def synchronize(a: Any = None) -> None:
    """Wait for the GPU to finish queued work (a no-op on the CPU). For timing."""
    cupy = sys.modules.get("cupy")
    if cupy is not None and _cupy is not None:
        cupy.cuda.get_current_stream().synchronize()
