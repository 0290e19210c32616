"""cnn_gpu/cuda/gemm.py: the capturable GEMM.

Without a GPU: `plan` turns a row-major a @ b into a column-major cuBLAS call; here that call is
carried out by an emulation of cublasGemmStridedBatchedEx (column-major operands read from flat
buffers by leading dimension and batch stride, exactly as cuBLAS reads device memory), for
operands of every layout the ops produce: contiguous, transposed views, batched views with an
interleaved batch axis (a grouped convolution's weights), broadcast batches, vectors. The
emulation must give a @ b. And `matmul` outside `capturable()` is a @ b itself.

With a GPU: our handle's GEMM against CuPy's matmul, inside a captured CUDA graph, and TF32.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.cuda import gemm

from .conftest import requires_gpu


def _emulate(call: gemm.GemmPlan, a_buf: np.ndarray, a_off: int, b_buf: np.ndarray, b_off: int) -> np.ndarray:
    """cuBLAS's C' = op(A') op(B') per batch, column-major, with A' = b's memory, B' = a's memory
    (the plan's convention), C' written column-major with ldc: returns C' memory as C order (batch, M, N)."""
    def op(buf, off, trans, rows, cols, ld, stride, batch):
        # op(X) is (rows, cols); X itself is (rows, cols) (op N) or (cols, rows) (op T), column-major.
        i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        if trans == gemm.OP_N:
            index = i + j * ld
        else:
            index = j + i * ld
        return np.stack([buf[off + batch_index * stride + index] for batch_index in range(batch)])
    first = op(b_buf, b_off, call.transa, call.m, call.k, call.lda, call.stride_a, call.batch)   # (batch, m, k)
    second = op(a_buf, a_off, call.transb, call.k, call.n, call.ldb, call.stride_b, call.batch)  # (batch, k, n)
    c_prime = first @ second  # (batch, m', n') = (batch, N, M), column-major in memory with ldc = N
    assert call.ldc == call.m and call.stride_c == call.m * call.n
    flat = np.zeros(call.batch * call.stride_c)
    for batch_index in range(call.batch):
        i, j = np.meshgrid(np.arange(call.m), np.arange(call.n), indexing="ij")
        flat[batch_index * call.stride_c + i + j * call.ldc] = c_prime[batch_index]
    return flat.reshape(call.out_shape)


def _view(rng, shape, order_axes=None, interleave=None):
    """An array of `shape` as a view into a larger flat buffer: its axes laid out in memory in the
    order `order_axes` (a transposed view), optionally with padding between rows (ld > width).
    Returns (view, buffer, element offset of view[0, ...])."""
    order_axes = tuple(range(len(shape))) if order_axes is None else order_axes
    stored = tuple(shape[a] for a in order_axes)
    padded = stored[:-2] + (stored[-2], stored[-1] + (interleave or 0)) if len(stored) >= 2 else stored
    base = rng.standard_normal(int(np.prod(padded)) + 7)
    block = base[3:3 + int(np.prod(padded))].reshape(padded)
    block = block[(slice(None),) * (len(padded) - 1) + (slice(0, stored[-1]),)]
    view = block.transpose(np.argsort(order_axes))
    return view, base, (view.ctypes.data - base.ctypes.data) // 8


def _elements(strides):
    return tuple(s // 8 for s in strides)


CASES = [
    # (a shape, a axis order, a row padding, b shape, b axis order, b row padding)
    ((3, 4), None, 0, (4, 5), None, 0),            # both C-contiguous
    ((3, 4), (1, 0), 0, (4, 5), None, 0),          # a transposed (x.T @ dy in a backward)
    ((3, 4), None, 0, (4, 5), (1, 0), 0),          # b transposed (dy @ w.T)
    ((3, 4), (1, 0), 2, (4, 5), (1, 0), 3),        # both transposed, with ld > width
    ((3, 4), None, 5, (4, 5), None, 1),            # row padding (a slice of a wider matrix)
    ((1, 6), None, 0, (6, 2), None, 0),            # one row
    ((5, 1), None, 0, (1, 4), None, 0),            # K = 1
    ((2, 3, 4), None, 0, (2, 4, 5), None, 0),      # batched
    ((2, 3, 4), (0, 2, 1), 0, (2, 4, 5), None, 0),  # batched, a transposed per matrix (cols.T)
    ((3, 2, 4), (1, 0, 2), 0, (3, 4, 2), (1, 0, 2), 0),  # interleaved batch axes (grouped conv)
    ((2, 3, 4), None, 0, (4, 5), None, 0),         # b broadcast over a's batch
    ((3, 4), None, 0, (2, 4, 5), None, 0),         # a broadcast over b's batch
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_plan_computes_a_at_b_through_emulated_cublas(case):
    rng = np.random.default_rng(0)
    a_shape, a_order, a_pad, b_shape, b_order, b_pad = case
    a, a_buf, a_off = _view(rng, a_shape, a_order, a_pad)
    b, b_buf, b_off = _view(rng, b_shape, b_order, b_pad)
    call = gemm.plan(a.shape, _elements(a.strides), b.shape, _elements(b.strides))
    assert call is not None, (a.strides, b.strides)
    np.testing.assert_allclose(_emulate(call, a_buf, a_off, b_buf, b_off), a @ b, rtol=1e-12)


def test_vectors_take_the_shapes_matmul_gives():
    rng = np.random.default_rng(1)
    ones, m = np.ones(6), rng.standard_normal((6, 3))  # column_sum's ones (M,) @ a2d (M, C)
    call = gemm.plan(ones.shape, _elements(ones.strides), m.shape, _elements(m.strides))
    got = _emulate(call, ones, 0, m.reshape(-1), 0)
    assert gemm.result_shape(1, 2, call.out_shape) == (3,)
    np.testing.assert_allclose(got.reshape(3), ones @ m, rtol=1e-12)
    v = rng.standard_normal(3)
    call = gemm.plan(m.shape, _elements(m.strides), v.shape, _elements(v.strides))
    assert gemm.result_shape(2, 1, call.out_shape) == (6,)
    np.testing.assert_allclose(_emulate(call, m.reshape(-1), 0, v, 0).reshape(6), m @ v, rtol=1e-12)
    assert gemm.result_shape(1, 1, (1, 1)) == ()


def test_layouts_that_need_a_copy_are_refused():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 6))[:, ::2]           # a column stride of 2 elements
    b = rng.standard_normal((3, 5))
    assert gemm.plan(a.shape, _elements(a.strides), b.shape, _elements(b.strides)) is None
    broadcast = np.broadcast_to(rng.standard_normal(5), (3, 5))  # a zero row stride
    assert gemm.layout(3, 5, 0, 1) is None
    assert gemm.plan((2, 3), (3, 1), broadcast.shape, _elements(broadcast.strides)) is None
    assert gemm.plan((2, 3, 4), (-12, 4, 1), (4, 5), (5, 1)) is None  # a negative batch stride


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="a has 4 columns but b has 3 rows"):
        gemm.plan((2, 4), (4, 1), (3, 5), (5, 1))
    with pytest.raises(ValueError, match="batches of 2 and 3"):
        gemm.plan((2, 3, 4), (12, 4, 1), (3, 4, 5), (20, 5, 1))


def test_matmul_is_a_at_b_outside_the_route():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    assert not gemm.routed()
    np.testing.assert_array_equal(gemm.matmul(a, b), a @ b)
    ones = np.ones(3)
    np.testing.assert_array_equal(gemm.matmul(ones, a), ones @ a)


# ---- on a GPU ---------------------------------------------------------------------------------------

@pytest.fixture
def cp():
    from cnn_gpu.backend import require_cupy
    return require_cupy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.gpu
@requires_gpu
def test_own_handle_matches_cupy_matmul(cp, case, dtype):
    """Our handle against CuPy's matmul on the same views: both cuBLAS, possibly other algorithms
    (another call and workspace), so to float rounding of a K-term sum."""
    rng = np.random.default_rng(4)
    a_shape, a_order, a_pad, b_shape, b_order, b_pad = case
    a, _, _ = _view(rng, a_shape, a_order, a_pad)
    b, _, _ = _view(rng, b_shape, b_order, b_pad)
    a_dev, b_dev = _same_layout(cp, a, dtype), _same_layout(cp, b, dtype)
    with gemm.capturable():
        got = gemm.matmul(a_dev, b_dev)
    tol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(to_numpy(got), to_numpy(cp.matmul(a_dev, b_dev)), rtol=tol, atol=tol)


def _same_layout(cp, host_view, dtype):
    """host_view on the device, its axes in the same memory order (a transposed view where
    host_view is one; without the row padding, which a host-to-device copy does not keep)."""
    order = np.argsort(host_view.strides, kind="stable")[::-1]
    stored = cp.asarray(np.ascontiguousarray(host_view.transpose(order)), dtype=dtype)
    return stored.transpose(np.argsort(order))


@pytest.mark.gpu
@requires_gpu
def test_own_gemm_runs_inside_a_captured_graph(cp):
    rng = np.random.default_rng(5)
    a = cp.asarray(rng.standard_normal((2, 64, 48), dtype=np.float32))
    b = cp.asarray(rng.standard_normal((48, 32), dtype=np.float32))
    with gemm.capturable():
        eager = gemm.matmul(a, b)
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            gemm.handle_for(cp.cuda.Device().id).bind(stream.ptr)
            stream.begin_capture()
            out = gemm.matmul(a, b)
            graph = stream.end_capture()
        graph.launch()  # on the current stream, where a and b were written
        cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(to_numpy(out), to_numpy(eager))  # the same call: the same bits
    with pytest.raises(NotImplementedError):  # what the route exists for: CuPy's own matmul refuses
        with stream:
            stream.begin_capture()
            try:
                cp.matmul(a, b)
            finally:
                stream.end_capture()


@pytest.mark.gpu
@requires_gpu
def test_tf32_switch_changes_float32_results_only(cp):
    rng = np.random.default_rng(6)
    a = cp.asarray(rng.standard_normal((256, 512), dtype=np.float32))
    b = cp.asarray(rng.standard_normal((512, 256), dtype=np.float32))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    previous = gemm.set_tf32(True)
    try:
        assert gemm.tf32_enabled()
        with gemm.capturable():
            fast = gemm.matmul(a, b)
        cupy_fast = a @ b
    finally:
        gemm.set_tf32(previous)
    with gemm.capturable():
        full = gemm.matmul(a, b)
    err_fast = float(cp.abs(fast - exact).max() / cp.abs(exact).max())
    err_full = float(cp.abs(full - exact).max() / cp.abs(exact).max())
    err_cupy = float(cp.abs(cupy_fast - exact).max() / cp.abs(exact).max())
    assert err_full < 1e-5 < err_fast < 1e-2  # TF32 keeps 10 mantissa bits: ~1e-3 relative per term
    assert err_cupy > 1e-5  # CuPy's matmul follows the same switch
