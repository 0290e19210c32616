"""Merges of several tensors into one, for graphs that branch: a residual sum and a channel concat.

    add:    x_1, ..., x_k (all the same shape) -> y = x_1 + ... + x_k
    concat: x_1 (..., C_1), ..., x_k (..., C_k) -> y (..., C_1 + ... + C_k)   (the channel axis, last)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import cpu
from ..backend import get_array_module
from ..geometry import check_float
from .activation import relu_into


def add_forward(*xs: Any, relu: bool = False) -> tuple[Any, int]:
    """x_1 .. x_k of one shape -> their sum (a new array), cache = k. Summed left to right.

    relu=True: max(sum, 0), the output of a ReLU after the sum (what the plan asks for in a
    residual block), with NumPy's maximum's rule (NaN stays NaN); on NumPy with the compiled
    kernels, two inputs take one pass (cnn_gpu.cpu.elementwise.add_relu) instead of two. The
    backward is the same either way: the ReLU's own backward runs before it."""
    if len(xs) < 2:
        raise ValueError(f"add: needs at least two inputs, got {len(xs)}")
    for i, x in enumerate(xs):
        check_float(x, "add", f"input {i}")
        if x.shape != xs[0].shape:
            raise ValueError(f"add: input {i} has shape {tuple(x.shape)} but input 0 has {tuple(xs[0].shape)}; "
                             "the inputs of a sum must have one shape")
    xp = get_array_module(*xs)  # rejects mixed backends
    if relu and len(xs) == 2 and cpu.runs_on(*xs):
        from ..cpu import elementwise
        return elementwise.add_relu(xs[0], xs[1]), 2
    y = xs[0] + xs[1]
    for x in xs[2:]:
        y += x
    if relu and xp is np:
        relu_into(y, y)  # the compiled select: NumPy's maximum against a scalar misses its SIMD loop
    elif relu:
        xp.maximum(y, 0, out=y)
    return y, len(xs)


def add_backward(dy: Any, cache: int) -> tuple[Any, ...]:
    """dy -> (dy, ..., dy), one per input: the same array k times (read-only for the caller)."""
    return (dy,) * cache


class ConcatCache(NamedTuple):
    sizes: tuple[int, ...]  # each input's size along the concatenated axis
    axis: int


def concat_forward(xs: Sequence[Any], axis: int = -1) -> tuple[Any, ConcatCache]:
    """x_1 .. x_k, equal but for `axis` -> y, their concatenation along it (default: channels)."""
    if len(xs) < 2:
        raise ValueError(f"concat: needs at least two inputs, got {len(xs)}")
    ndim = xs[0].ndim
    axis = axis % ndim
    for i, x in enumerate(xs):
        check_float(x, "concat", f"input {i}")
        others = tuple(s for k, s in enumerate(x.shape) if k != axis)
        first = tuple(s for k, s in enumerate(xs[0].shape) if k != axis)
        if x.ndim != ndim or others != first:
            raise ValueError(f"concat: input {i} has shape {tuple(x.shape)} and input 0 has "
                             f"{tuple(xs[0].shape)}; they may differ only along axis {axis}")
    xp = get_array_module(*xs)
    return xp.concatenate(xs, axis=axis), ConcatCache(tuple(int(x.shape[axis]) for x in xs), axis)


def concat_backward(dy: Any, cache: ConcatCache) -> tuple[Any, ...]:
    """dy -> each input's slice of it along the axis (contiguous copies)."""
    xp = get_array_module(dy)
    out, start = [], 0
    for size in cache.sizes:
        index = (slice(None),) * cache.axis + (slice(start, start + size),)
        out.append(xp.ascontiguousarray(dy[index]))
        start += size
    return tuple(out)
