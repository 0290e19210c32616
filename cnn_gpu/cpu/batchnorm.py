"""Batch normalization on the CPU, compiled by Numba: the four calls of cnn_gpu.cuda.batchnorm.

x and dy are viewed as (M, C): M = N*H*W rows of C contiguous channels.

    mean, var = channel_mean_var(x2d)                       # forward statistics (biased var)
    y = batch_norm_normalize(x2d, mean, inv_std, gamma, beta)
    sum_dy, sum_dy_xhat = channel_grad_sums(dy2d, x2d, mean, inv_std)
    dx = batch_norm_backward_dx(dy2d, x2d, mean, inv_std, gamma, sum_dy, sum_dy_xhat)

With a ReLU after the batch norm (cnn_gpu.functional.batch_norm_forward(..., relu=True)), the
normalize takes relu=True and gives max(y, 0) in the same pass; the two backward calls take the
ReLU's output as relu_out=, and take dy (the gradient at the ReLU's output) through the ReLU as
they load it: dy where relu_out > 0, else 0. The ReLU's own forward and backward passes are gone.

Each is one pass over its (M, C) operands with the channels innermost (SIMD over C), in parts of
the rows of about 256 KiB; on several threads (cnn_gpu.cpu.threads), each thread takes parts in
one compiled call (threads.on_each) once a pass has ON_EACH_MIN_BYTES. The sums are float64 whatever the input's dtype, added part by
part in order, and the variance's are shifted by one row of x (see _mean_var), so it keeps its
digits when |mean| is far larger than the std. For float32 with C a multiple of simd.LANES64 the
statistics run in float64 vector registers (_shifted_sums_vectors), and so do the gradient sums
where C is a multiple of 2 * LANES64 up to GRAD_SUMS_VECTOR_MAX_CHANNELS (_grad_sums_vectors); the
plain loops, which serve every dtype and C, are their reference.
"""
from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from . import spin, threads
from .jit import JIT as _jit, specialized  # _jit: cached on disk, without the GIL or bounds checks
from .simd import LANES64, aligned_empty, fma64, load64, store64, where_positive, widen, zeros64

KERNEL = None  # the kernel that _parts_loop's loop calls, bound for each kernel (jit.specialized)

TAKES_RELU = True  # batch_norm_normalize takes relu=, the backward's two calls relu_out= (see the top)


@_jit
def _shifted_sums(x2d, shift, rows_per_part, first, last, total, squares):  # pragma: no cover - compiled
    # parts first..last-1 of rows_per_part rows: float64 sums of d = x - shift and d^2 into
    # total[part] and squares[part] (P, C). The sums run in arrays of this loop's own, which
    # alias nothing: SIMD over the channels, as in one pass over all rows.
    m, c = x2d.shape
    t = np.empty(c, np.float64)
    q = np.empty(c, np.float64)
    for part in range(first, last):
        t[:] = 0.0
        q[:] = 0.0
        for r in range(part * rows_per_part, min((part + 1) * rows_per_part, m)):
            for ch in range(c):
                d = x2d[r, ch] - shift[ch]
                t[ch] += d
                q[ch] += d * d
        total[part] = t
        squares[part] = q


@_jit
def _grad_sums(dy2d, x2d, mean, relu_out, masked, scale, shift, recomputed, rows_per_part, first, last,
               sum_dy, sum_dy_xc):  # pragma: no cover
    # parts first..last-1: float64 sums of dy and dy * (x - mean) into sum_dy[part], sum_dy_xc[part];
    # masked: dy is the gradient at a ReLU's output relu_out, taken through the ReLU first;
    # recomputed: the ReLU's mask from x, as the forward computed its input (_relu_kept)
    m, c = x2d.shape
    zero = dy2d.dtype.type(0)
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    for part in range(first, last):
        s1[:] = 0.0
        s2[:] = 0.0
        for r in range(part * rows_per_part, min((part + 1) * rows_per_part, m)):
            for ch in range(c):
                d = x2d[r, ch] - mean[ch]
                if recomputed:
                    keep = d * scale[ch] + shift[ch] > zero
                else:
                    keep = not masked or relu_out[r, ch] > zero
                g = dy2d[r, ch] if keep else zero
                s1[ch] += g
                s2[ch] += g * d
        sum_dy[part] = s1
        sum_dy_xc[part] = s2


# The two sums again, for float32 data with C a multiple of LANES64 (_vectors_apply): the same
# float64 sums, with the accumulators in float64 vector registers. The loops above keep theirs
# in (C,) arrays, reloaded and stored again for every row, and that chain from one row to the next
# ran them at half the speed of a pass that only reads (BENCHMARKS.md, sessions 9 and 10-11). Per
# part, the statistics: for each group of LANES64 channels, two accumulators (even and odd rows,
# added at the end) over the part's rows, which are in L2 from the first group on; the gradient
# sums: two groups of channels a row, so that each row's read is a whole cache line.

@_jit
def _shifted_sums_vectors(x, c, shift, rows_per_part, first, last, total, squares):  # pragma: no cover
    # x: (M, C) float32, flat; shift (C,) float64; total, squares: (P, C) float64, flat
    m = x.size // c
    for part in range(first, last):
        r0, r1 = part * rows_per_part, min((part + 1) * rows_per_part, m)
        for c0 in range(0, c, LANES64):
            sh = load64(shift, c0)
            t0, t1, q0, q1 = zeros64(), zeros64(), zeros64(), zeros64()
            r = r0
            while r + 2 <= r1:
                d = widen(x, r * c + c0) - sh
                e = widen(x, (r + 1) * c + c0) - sh
                t0, q0 = t0 + d, fma64(d, d, q0)
                t1, q1 = t1 + e, fma64(e, e, q1)
                r += 2
            if r < r1:
                d = widen(x, r * c + c0) - sh
                t0, q0 = t0 + d, fma64(d, d, q0)
            store64(total, part * c + c0, t0 + t1)
            store64(squares, part * c + c0, q0 + q1)


@_jit
def _grad_sums_vectors(dy, x, mean, relu_out, masked, c, rows_per_part, first, last, sum_dy, sum_dy_xc):  # pragma: no cover
    # dy, x, relu_out: (M, C) float32, flat, C a multiple of 2 * LANES64; mean (C,) float64;
    # sums: (P, C) float64, flat. Two groups of channels a row (64 bytes of each array on AVX-512,
    # a cache line), one row a step.
    m = x.size // c
    for part in range(first, last):
        r0, r1 = part * rows_per_part, min((part + 1) * rows_per_part, m)
        for c0 in range(0, c, 2 * LANES64):
            c1 = c0 + LANES64
            mu, nu = load64(mean, c0), load64(mean, c1)
            s0, s1, p0, p1 = zeros64(), zeros64(), zeros64(), zeros64()
            for r in range(r0, r1):
                i, k = r * c + c0, r * c + c1
                g, h = widen(dy, i), widen(dy, k)
                if masked:
                    g, h = where_positive(widen(relu_out, i), g), where_positive(widen(relu_out, k), h)
                s0, p0 = s0 + g, fma64(g, widen(x, i) - mu, p0)
                s1, p1 = s1 + h, fma64(h, widen(x, k) - nu, p1)
            store64(sum_dy, part * c + c0, s0)
            store64(sum_dy_xc, part * c + c0, p0)
            store64(sum_dy, part * c + c1, s1)
            store64(sum_dy_xc, part * c + c1, p1)


# The gradient sums' vector kernel walks each pair of channel groups down the rows of three
# arrays; past 16 channels it ties the scalar loops at 32-64 and loses at 128 and more
# (BENCHMARKS.md, sessions 10-11), so wider layers keep the scalar kernel.
GRAD_SUMS_VECTOR_MAX_CHANNELS = 16


def _vectors_apply(*arrays: Any, groups: int = 1, max_channels: int | None = None) -> bool:
    """Whether the vector kernels take these (M, C) arrays: float32, C a multiple of groups * LANES64
    (and at most max_channels)."""
    c = arrays[0].shape[1]
    return (all(a.dtype == np.float32 for a in arrays) and c % (groups * LANES64) == 0
            and (max_channels is None or c <= max_channels))


def _summed(kernel: Any, args: tuple[Any, ...], rows: int, row_bytes: int, c: int,
            flat: bool = False) -> tuple[Any, Any]:
    """Two float64 (C,) sums over `rows` rows of (M, C) arrays, by kernel(*args, rows_per_part,
    first, last, sums_1, sums_2). The rows are cut into parts fixed by their size
    (cnn_gpu.cpu.threads.row_parts), each part's sums go to its own row of two (P, C) arrays, and
    those rows are added in part order: the same result on any number of threads. On one thread
    the kernel runs once over every part; on several, each thread takes parts in one compiled call
    (_parts_loop, on threads.on_each) when there are ON_EACH_MIN_BYTES of rows. flat: the kernel
    takes the (P, C) sums flat (the vector kernels)."""
    parts = threads.row_parts(rows, row_bytes)
    rows_per_part = parts[0].stop if parts else 1
    first, second = np.zeros((len(parts), c), np.float64), np.zeros((len(parts), c), np.float64)
    into = (first.reshape(-1), second.reshape(-1)) if flat else (first, second)
    if _shared(rows * row_bytes, len(parts)):
        loop = _parts_loop(kernel)
        threads.on_each(lambda counter, _: loop(args, rows_per_part, len(parts), counter, *into))
    else:
        kernel(*args, rows_per_part, 0, len(parts), *into)
    return first.sum(axis=0), second.sum(axis=0)  # the same P rows, whichever threads made them


ON_EACH_MIN_BYTES = 1 << 19  # of rows, before the parts of a pass are shared by the threads: below
                             # it, the second thread's start (~25 us, threads.on_each) outweighs its half


def _shared(nbytes: int, parts: int) -> bool:
    """Whether a pass of nbytes in `parts` parts is shared by the threads."""
    return parts > 1 and nbytes >= ON_EACH_MIN_BYTES and threads.count() > 1


@functools.lru_cache(maxsize=None)
def _parts_loop(kernel: Any) -> Any:
    """kernel(*args, rows_per_part, k, k + 1, sums_1, sums_2) for each part k this thread takes
    from counter (spin.next_part), compiled around this kernel (jit.specialized)."""
    def parts_loop(args, rows_per_part, parts, counter, sums_1, sums_2):  # pragma: no cover - compiled, tested
        while True:
            k = spin.next_part(counter)
            if k >= parts:
                spin.leave(counter)
                return
            KERNEL(*args, rows_per_part, k, k + 1, sums_1, sums_2)
    return specialized(parts_loop, KERNEL=kernel)


def _mean_var(x2d: Any) -> tuple[Any, Any]:
    """float64 mean and biased variance (C,) of x2d (M, C).

    One pass: float64 sums of d = x - shift and d^2, with the first row as the shift, so the
    sums carry the spread, not the offset. var = E[d^2] - E[d]^2 then loses digits only as
    (mean - shift)^2 / var grows: float64 keeps float32's 7 digits up to a shift 10^4 standard
    deviations from the mean, and one row of the batch is seldom more than a few away."""
    m, c = x2d.shape
    shift = x2d[0].astype(np.float64)
    if _vectors_apply(x2d):
        total, squares = _summed(_shifted_sums_vectors, (x2d.reshape(-1), c, shift), m, c * 4, c, flat=True)
    else:
        total, squares = _summed(_shifted_sums, (x2d, shift), m, c * x2d.itemsize, c)
    rest = total / m
    return shift + rest, np.maximum(squares / m - rest * rest, 0.0)


@_jit
def _affine(x2d, mean, scale, shift, relu, add2d, added, y):  # pragma: no cover - compiled; tested against NumPy
    # added: + add2d[r, ch], rounded as a separate sum (the numbers of an Add after the batch norm);
    # relu: max(v, 0) with np.maximum's rule (NaN stays NaN, -0.0 becomes 0), as relu_forward gives
    m, c = x2d.shape
    zero = y.dtype.type(0)
    for r in range(m):
        for ch in range(c):
            v = (x2d[r, ch] - mean[ch]) * scale[ch] + shift[ch]
            if added:
                v = v + add2d[r, ch]
            y[r, ch] = v if not relu or (v > zero) | (v != v) else zero


@_jit
def _train_dx(dy2d, x2d, mean, k, a, b, relu_out, masked, shift, recomputed, dx):  # pragma: no cover - compiled
    # masked: dy2d is the gradient at a ReLU's output relu_out, taken through the ReLU first;
    # recomputed: the mask from x (k is the forward's scale, gamma * inv_std; see _relu_kept)
    m, c = x2d.shape
    zero = dx.dtype.type(0)
    for r in range(m):
        for ch in range(c):
            d = x2d[r, ch] - mean[ch]
            if recomputed:
                keep = d * k[ch] + shift[ch] > zero
            else:
                keep = not masked or relu_out[r, ch] > zero
            g = dy2d[r, ch] if keep else zero
            dx[r, ch] = g * k[ch] + d * a[ch] + b[ch]


@numba.njit(inline="always")
def _next_rows(counter, rows_per_part, m):  # pragma: no cover - compiled
    """Rows r0..r1-1 of the next part this thread takes from counter (spin.next_part); r0 >= r1:
    none is left."""
    r0 = spin.next_part(counter) * rows_per_part
    return r0, min(r0 + rows_per_part, m)


@_jit
def _affine_parts(x2d, mean, scale, shift, relu, add2d, added, y, rows_per_part, counter):  # pragma: no cover
    # _affine over the parts of rows_per_part rows this thread takes from counter
    while True:
        r0, r1 = _next_rows(counter, rows_per_part, x2d.shape[0])
        if r0 >= r1:
            spin.leave(counter)
            return
        _affine(x2d[r0:r1], mean, scale, shift, relu, add2d[r0:r1], added, y[r0:r1])


@_jit
def _train_dx_parts(dy2d, x2d, mean, k, a, b, relu_out, masked, shift, recomputed, dx, rows_per_part,
                    counter):  # pragma: no cover - compiled
    # _train_dx over the parts this thread takes, as _affine_parts
    while True:
        r0, r1 = _next_rows(counter, rows_per_part, x2d.shape[0])
        if r0 >= r1:
            spin.leave(counter)
            return
        _train_dx(dy2d[r0:r1], x2d[r0:r1], mean, k, a, b, relu_out[r0:r1], masked, shift, recomputed, dx[r0:r1])


def channel_mean_var(x2d: Any) -> tuple[Any, Any]:
    """x2d (M, C) -> mean (C,), biased variance (C,), in x2d's dtype."""
    mean, var = _mean_var(np.ascontiguousarray(x2d))
    return mean.astype(x2d.dtype), var.astype(x2d.dtype)


# The ReLU's mask, relu_out > 0, is also v > 0 for its input v = (x - mean) * scale + shift, which
# the backward can compute again from x, which it reads anyway, with the forward's own float
# operations (_affine's): the same v, so the same mask, bit for bit, and one array fewer to read
# in each of the backward's two passes (they stream from memory, not cache, inside a training step).
# The caller passes relu_affine=(scale, shift) for that: the scale as the forward computed it,
# gamma * inv_std, and beta. The vector kernel reads relu_out still.

def _relu_kept(relu_affine: Any, like: Any) -> tuple[Any, Any, bool]:
    """(scale, shift, recomputed) for the kernels: relu_affine's, or unread stand-ins."""
    if relu_affine is None:
        stand_in = np.zeros(like.shape[1], like.dtype)
        return stand_in, stand_in, False
    scale, shift = relu_affine
    return np.ascontiguousarray(scale, like.dtype), np.ascontiguousarray(shift, like.dtype), True


def _through_relu(dy2d: Any, relu_out: Any) -> tuple[Any, Any, bool]:
    """dy2d, and the (relu_out, masked) pair the kernels take: relu_out (M, C) when given, else dy2d
    itself, unread (one array type either way: one compiled kernel)."""
    dy2d = np.ascontiguousarray(dy2d)
    if relu_out is None:
        return dy2d, dy2d, False
    return dy2d, np.ascontiguousarray(relu_out).reshape(dy2d.shape), True


def channel_grad_sums(dy2d: Any, x2d: Any, mean: Any, inv_std: Any, relu_out: Any = None,
                      relu_affine: Any = None) -> tuple[Any, Any]:
    """sum(dy) (C,) and sum(dy * x_hat) (C,) over the M rows, x_hat = (x - mean) * inv_std.
    relu_out (M, C): dy is the gradient at the output of a ReLU after the batch norm, and the sums
    are of dy where relu_out > 0, else 0. relu_affine (scale, shift), with relu_out: that mask
    recomputed from x where the scalar kernel runs (see _relu_kept's comment)."""
    dy2d, relu_out, masked = _through_relu(dy2d, relu_out)
    x2d = np.ascontiguousarray(x2d)
    m, c = x2d.shape
    if _vectors_apply(dy2d, x2d, relu_out, groups=2, max_channels=GRAD_SUMS_VECTOR_MAX_CHANNELS):
        args = (dy2d.reshape(-1), x2d.reshape(-1), mean.astype(np.float64), relu_out.reshape(-1), masked, c)
        sum_dy, sum_dy_xc = _summed(_grad_sums_vectors, args, m, c * 4, c, flat=True)
    else:
        scale, shift, recomputed = _relu_kept(relu_affine if masked else None, x2d)
        args = (dy2d, x2d, mean, relu_out, masked, scale, shift, recomputed)
        sum_dy, sum_dy_xc = _summed(_grad_sums, args, m, c * x2d.itemsize, c)
    return sum_dy.astype(x2d.dtype), (sum_dy_xc * inv_std).astype(x2d.dtype)


def batch_norm_normalize(x2d: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any, relu: bool = False,
                         add2d: Any = None) -> Any:
    """y = (x - mean) * inv_std * gamma + beta: (M, C) -> (M, C); add2d (M, C): y + add2d; relu:
    max(y, 0), last; all in the same pass. Centring first: x * scale - mean * scale would cancel
    away the digits of a large mean."""
    y = aligned_empty(x2d.shape, x2d.dtype)  # on a cache line: a convolution reading it loads whole lines
    x2d, scale = np.ascontiguousarray(x2d), gamma * inv_std
    added = add2d is not None
    add2d = np.ascontiguousarray(add2d) if added else x2d  # x2d unread: one array type, one compiled kernel
    rows_per_part = threads.rows_per_part(y.shape[1] * y.itemsize)  # each row on its own: any cut
    if _shared(y.nbytes, -(-len(y) // rows_per_part)):
        threads.on_each(lambda counter, _: _affine_parts(x2d, mean, scale, beta, relu, add2d, added, y,
                                                         rows_per_part, counter))
    else:
        _affine(x2d, mean, scale, beta, relu, add2d, added, y)
    return y


def batch_norm_backward_dx(dy2d: Any, x2d: Any, mean: Any, inv_std: Any, gamma: Any,
                           sum_dy: Any, sum_dy_xhat: Any, relu_out: Any = None, beta: Any = None) -> Any:
    """dx = gamma * inv_std * (dy - (sum_dy + x_hat * sum_dy_xhat) / M), all (M, C),
    written per element as dy * k + (x - mean) * a + b with per-channel k, a, b. relu_out: as in
    channel_grad_sums, dy where relu_out > 0, else 0; with beta, that mask recomputed from x as
    (x - mean) * k + beta > 0 (k = gamma * inv_std, the forward's scale; see _relu_kept's comment)."""
    m = x2d.shape[0]
    k = gamma * inv_std
    a = -k * inv_std * sum_dy_xhat / m
    b = -k * sum_dy / m
    dx = np.empty(x2d.shape, dtype=x2d.dtype)
    dy2d, relu_out, masked = _through_relu(dy2d, relu_out)
    x2d = np.ascontiguousarray(x2d)
    _, shift, recomputed = _relu_kept((k, beta) if masked and beta is not None else None, x2d)
    rows_per_part = threads.rows_per_part(dx.shape[1] * dx.itemsize)
    if _shared(dx.nbytes, -(-len(dx) // rows_per_part)):
        threads.on_each(lambda counter, _: _train_dx_parts(dy2d, x2d, mean, k, a, b, relu_out, masked, shift,
                                                           recomputed, dx, rows_per_part, counter))
    else:
        _train_dx(dy2d, x2d, mean, k, a, b, relu_out, masked, shift, recomputed, dx)
    return dx
