"""Flatten: (N, ...) -> (N, prod(...)), a view on contiguous input."""
from __future__ import annotations

from typing import Any


def flatten_forward(x: Any) -> tuple[Any, tuple[int, ...]]:
    """x (N, d1, d2, ...) -> y (N, d1*d2*...), cache = x's shape."""
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(dy: Any, cache: tuple[int, ...]) -> Any:
    """dy (N, D) -> dx of the original shape."""
    return dy.reshape(cache)
