"""Elementwise kernels on the CPU, compiled by Numba, where NumPy needs several passes.

    relu(x, out)                 # max(x, 0) into out: NumPy's maximum with a scalar 0 runs ~7x slower
    bias_relu(y, b, relu)        # y += b, then max(y, 0), in place: one pass (NumPy: two)
    dx = relu_backward(dy, y)    # dy where y > 0, else 0: one pass (NumPy: a mask, then a multiply)
    y = add_relu(a, b)           # max(a + b, 0): one pass (NumPy: a sum, then a maximum)
    (both in parts on cnn_gpu.cpu.threads)
    relu_loop(x, y), bias_relu_loop(y2d, b, relu)      # the compiled loops of the first two, for compiled callers
    sgd_update(p, g, v, lr, momentum, wd, nesterov)    # in place, one pass (NumPy: five or six)

The SGD update is cnn_gpu.optim's NumPy code (its reference) in one loop, with each scalar
rounded to the array's dtype first and the operations in the same order, so they agree bit for
bit; like that code it flushes subnormal results to zero (see cnn_gpu.cpu.flush_subnormals). Adam's
update has no kernel here: its memory traffic, not its passes, sets its time (a compiled one tied:
BENCHMARKS.md, speed notes).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import threads
from .simd import aligned_empty
from .jit import JIT as _jit  # cached on disk, without the GIL or bounds checks


@_jit
def relu_loop(x, y):  # pragma: no cover - compiled; tested against NumPy
    zero = y.dtype.type(0)
    for i in range(y.size):
        v = x[i]
        y[i] = v if (v > zero) | (v != v) else zero  # np.maximum(v, 0): NaN passes, -0.0 gives 0


def relu(x: Any, out: Any) -> Any:
    """out = max(x, 0), equal to np.maximum(x, 0) bit for bit; x and out: one shape and dtype,
    C-contiguous, and x may be out. One pass on this thread (callers cut their own parts).
    NumPy's maximum of a float32 array and the scalar 0 ran at 6.7 GB/s on an AVX2 machine, against
    35-50 GB/s for this loop or for maximum of two arrays (BENCHMARKS.md, session 7)."""
    relu_loop(x.reshape(-1), out.reshape(-1))
    return out


@_jit
def bias_relu_loop(y, b, relu):  # pragma: no cover - compiled; tested against NumPy
    m, c = y.shape
    zero = y.dtype.type(0)
    for r in range(m):
        for ch in range(c):
            v = y[r, ch] + b[ch]
            y[r, ch] = v if not relu or (v > zero) | (v != v) else zero


def bias_relu(y: Any, b: Any, relu: bool) -> Any:
    """y (M, C) += b (C,), then (relu) max(y, 0), in place and in one pass: equal bit for bit to
    NumPy's y += b and np.maximum(y, 0, out=y), two passes, the first a broadcast loop that restarts
    every C elements. y: C-contiguous. Returns y."""
    bias_relu_loop(y, b, relu)
    return y


@_jit
def _relu_backward(dy, y, dx):  # pragma: no cover - compiled; tested against NumPy
    zero = dx.dtype.type(0)
    for i in range(dx.size):
        dx[i] = dy[i] if y[i] > 0 else zero  # a select, not a branch: SIMD


def relu_backward(dy: Any, y: Any) -> Any:
    """dy, y (any shape, the same) -> dx: dy where the ReLU's output y > 0, else 0."""
    dx = np.empty(dy.shape, dtype=dy.dtype)
    d, v, out = np.ascontiguousarray(dy).reshape(-1), np.ascontiguousarray(y).reshape(-1), dx.reshape(-1)
    threads.for_each(threads.split(out.size, out.itemsize), lambda s, _: _relu_backward(d[s], v[s], out[s]))
    return dx


@_jit
def _add_relu(a, b, y):  # pragma: no cover - compiled; tested against NumPy
    zero = y.dtype.type(0)
    for i in range(y.size):
        v = a[i] + b[i]
        y[i] = v if (v > zero) | (v != v) else zero  # NumPy's maximum(v, 0): NaN passes, -0.0 gives 0


def add_relu(a: Any, b: Any) -> Any:
    """a, b (any shape, the same, one dtype) -> max(a + b, 0), with np.maximum's rule (NaN stays
    NaN, -0.0 becomes 0), so the result equals np.maximum(a + b, 0) bit for bit."""
    y = aligned_empty(a.shape, a.dtype)  # on a cache line: a convolution reading it loads whole lines
    u, v, out = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1), y.reshape(-1)
    threads.for_each(threads.split(out.size, out.itemsize), lambda s, _: _add_relu(u[s], v[s], out[s]))
    return y


@_jit
def _flushed(x, tiny, zero):  # pragma: no cover - compiled
    """x, or 0 where x is subnormal (|x| < tiny); NaN and infinities pass."""
    return x if (abs(x) >= tiny) | (x != x) else zero


@_jit
def _sgd(p, g, v, lr, momentum, wd, nesterov, use_momentum, tiny):  # pragma: no cover - compiled
    zero = p.dtype.type(0)
    for i in range(p.size):
        gi = g[i] + wd * p[i] if wd != 0 else g[i]
        if use_momentum:
            vi = _flushed(v[i] * momentum + gi, tiny, zero)
            v[i] = vi
            gi = gi + momentum * vi if nesterov else vi
        p[i] = _flushed(p[i] - lr * gi, tiny, zero)


def sgd_update(p: Any, g: Any, v: Any | None, lr: float, momentum: float, wd: float, nesterov: bool) -> None:
    """One SGD step on p (and its velocity v, when momentum > 0), in place."""
    t = p.dtype.type
    velocity = v if v is not None else p  # unread without momentum
    _sgd(p.reshape(-1), np.ascontiguousarray(g).reshape(-1), velocity.reshape(-1), t(lr), t(momentum), t(wd),
         nesterov, v is not None, t(np.finfo(p.dtype).tiny))
