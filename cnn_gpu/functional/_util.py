"""Small argument helpers shared by the ops."""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module

FLOAT_DTYPES = ("float32", "float64")


def pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) pair of ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        h, w = value
    else:
        h = w = value
    if not all(isinstance(v, int) or hasattr(v, "__index__") for v in (h, w)):
        raise TypeError(f"{name} must be integers, got {value!r}")
    return int(h), int(w)


def check_float(x: Any, op: str, name: str = "x") -> None:
    """Ops compute in float32 or float64: reject integer, bool and complex arrays up front."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype.name not in FLOAT_DTYPES:
        got = dtype.name if dtype is not None else type(x).__name__
        raise TypeError(f"{op}: {name} must be a float32 or float64 array, got {got}")


def check_rank(x: Any, rank: int, op: str, layout: str, name: str = "x") -> None:
    """Reject arrays of the wrong rank with the layout the op expects, e.g. '(N, H, W, C)'."""
    if x.ndim != rank:
        raise ValueError(f"{op}: {name} must be {rank}-D {layout}, got shape {tuple(x.shape)}")


def output_size(size: int, kernel: int, stride: int, padding: int, op: str, axis: str) -> int:
    """Output length of a sliding window along one axis; errors when the window does not fit."""
    if kernel < 1 or stride < 1 or padding < 0:
        raise ValueError(f"{op}: kernel and stride must be >= 1 and padding >= 0, "
                         f"got kernel {kernel}, stride {stride}, padding {padding} along {axis}")
    padded = size + 2 * padding
    if padded < kernel:
        raise ValueError(f"{op}: input {axis} {size} (+2*{padding} padding) is smaller than "
                         f"the window {kernel}")
    return (padded - kernel) // stride + 1


def column_sum(a2d: Any) -> Any:
    """a2d (M, C) -> its sum over the rows (C,), as the BLAS matrix-vector product ones (M,) @ a2d.

    On NumPy ~6x faster than a2d.sum(axis=0), which adds the rows one after another on one
    core (biases' and batch norm's gradients sum over all N*H*W rows).
    """
    return get_array_module(a2d).ones(a2d.shape[0], dtype=a2d.dtype) @ a2d
