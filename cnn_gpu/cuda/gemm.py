"""GEMMs that a CUDA graph can capture: cuBLAS called on a handle of our own, with a fixed workspace.

    y = gemm.matmul(a, b)          # a @ b, on either backend: the one function the ops call
    with gemm.capturable():        # in here, GEMMs of CuPy arrays run on our own cuBLAS handle
        y = gemm.matmul(a, b)      #   (also while a stream is being captured into a CUDA graph)
    gemm.set_tf32(True)            # float32 GEMMs on TF32 tensor cores, CuPy's and ours alike

Why not CuPy's matmul: every cuBLAS call in cupy_backends.cuda.libs.cublas first calls
cublasSetStream, and CuPy's wrapper of that raises NotImplementedError while the stream is
capturing (cupy/cupy#6290). cuBLAS itself supports capture, on two conditions: the handle's
stream is set before the capture starts, and the handle has a workspace of its own
(cublasSetWorkspace), since otherwise cuBLAS may allocate one while capturing; and
cublasSetStream resets the workspace to cuBLAS's own pool, so the two are set in that order
whenever the stream changes. This module calls libcublas (the library CuPy loaded, found the
same way, through cuda.pathfinder) directly through ctypes: cublasGemmStridedBatchedEx, whose
compute type also selects TF32.

Layout: the arrays are row-major (C order) and cuBLAS is column-major, so C = A @ B is computed
as C^T = B^T A^T: a row-major (r, c) matrix with row stride ld is, read column-major, its
transpose with leading dimension ld; a transposed view (column stride ld, unit row stride) is
itself. `plan` works this out from shapes and strides alone (tests check it against an
emulation of cuBLAS on the host); operands laid out otherwise are copied first.

Outside `capturable()` matmul is `a @ b` (CuPy's cuBLAS for CuPy arrays); inside, CuPy arrays
go to this module's handle. Results on one card are deterministic either way (cuBLAS gives the
same bits for the same call, handle settings and workspace), but the two may differ from each
other in the last bits: they are different calls.

Importing this module imports neither CuPy nor cuBLAS; the first GEMM on our handle does.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
from types import SimpleNamespace
from typing import Any, Iterator, NamedTuple

import numpy as np

from ..backend import is_cupy_array, require_cupy

# cuBLAS enums (cublas_api.h, library_types.h; the values CuPy's cublas.pxd declares).
OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_64F = 0, 1
COMPUTE_32F, COMPUTE_32F_FAST_TF32, COMPUTE_64F = 68, 77, 70
GEMM_DEFAULT = -1
_DATA_TYPES = {np.dtype(np.float32): CUDA_R_32F, np.dtype(np.float64): CUDA_R_64F}

# The workspace each handle owns: NVIDIA's recommendation for Hopper (and enough for older cards).
WORKSPACE_BYTES = 32 << 20
INT_MAX = 2**31 - 1

ROW, COL = "row", "col"  # how a matrix lies in memory: X[i, j] at i*ld + j, or at i + j*ld

_route: contextvars.ContextVar["Gemm | None"] = contextvars.ContextVar("cnn_gpu_gemm_route", default=None)


# ---- the one function the ops call ---------------------------------------------------------------

def matmul(a: Any, b: Any) -> Any:
    """a @ b for 1-D to 3-D NumPy or CuPy arrays: (M, K) @ (K, N) -> (M, N), batched over a leading
    axis, a 1-D operand as a row (left) or column (right). Inside `capturable()`, CuPy arrays
    run on this module's cuBLAS handle (capturable); everywhere else, as a @ b."""
    gemm = _route.get()
    if gemm is None or not is_cupy_array(a):
        return a @ b
    return gemm.matmul(a, b)


@contextlib.contextmanager
def capturable() -> Iterator["Gemm"]:
    """Route matmul's CuPy GEMMs to the current device's own handle while the block runs."""
    gemm = handle_for(require_cupy().cuda.Device().id)
    token = _route.set(gemm)
    try:
        yield gemm
    finally:
        _route.reset(token)


def routed() -> bool:
    """Whether matmul is routed to our handle here (inside `capturable()`)."""
    return _route.get() is not None


def set_tf32(enabled: bool) -> bool:
    """Let float32 GEMMs use TF32 tensor cores (True) or keep full float32 (False, CuPy's default and
    PyTorch's for matmul), for CuPy's matmul and our handle alike: both read CuPy's compute type
    for float32 (cupy._core.set_compute_type, which CUPY_TF32=1 also sets). Returns the previous
    setting. Needs a device (CuPy checks that it has tensor cores)."""
    cupy = require_cupy()
    core = cupy._core
    previous = tf32_enabled()
    linalg = core._routines_linalg
    core.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    return previous


def tf32_enabled() -> bool:
    """Whether float32 GEMMs may use TF32 (CuPy's compute type for float32, see set_tf32)."""
    core = require_cupy()._core
    return core.get_compute_type(np.float32) == core._routines_linalg.COMPUTE_TYPE_TF32


# ---- the layout of a call ------------------------------------------------------------------------

def layout(rows: int, cols: int, row_stride: int, col_stride: int) -> tuple[str, int] | None:
    """How an (rows, cols) matrix with these element strides lies in memory: (ROW, ld) when
    X[i, j] is at i*ld + j with ld >= cols, (COL, ld) when at i + j*ld with ld >= rows, None
    otherwise (a copy is needed). A single row or column may have any stride along its length 1."""
    if (col_stride == 1 or cols == 1) and (rows == 1 or row_stride >= max(cols, 1)):
        return ROW, (row_stride if rows > 1 else max(cols, 1))
    if (row_stride == 1 or rows == 1) and (cols == 1 or col_stride >= max(rows, 1)):
        return COL, (col_stride if cols > 1 else max(rows, 1))
    return None


class GemmPlan(NamedTuple):
    """The arguments of cublasGemmStridedBatchedEx for C = A @ B (all row-major), computed as
    C^T = B^T A^T: cuBLAS's first operand is B, its second A. Strides and ld in elements."""

    transa: int       # op on B's memory
    transb: int       # op on A's memory
    m: int            # cuBLAS's m = N (columns of C)
    n: int            # cuBLAS's n = M (rows of C)
    k: int
    lda: int          # B's leading dimension
    stride_a: int     # B's batch stride (0: one matrix for every batch)
    ldb: int          # A's leading dimension
    stride_b: int     # A's batch stride
    ldc: int          # = N: C is C-contiguous (batch, M, N)
    stride_c: int     # = M * N
    batch: int
    out_shape: tuple[int, ...]


def plan(a_shape: tuple[int, ...], a_strides: tuple[int, ...], b_shape: tuple[int, ...],
         b_strides: tuple[int, ...]) -> GemmPlan | None:
    """The cuBLAS call for a @ b from shapes and element strides, or None when an operand must be
    made contiguous first. Shapes as matmul's: 1-D to 3-D, a leading batch axis broadcast when
    one operand has none or a batch of 1."""
    if len(a_shape) == 1:  # a row vector: (K,) -> (1, K)
        a_shape, a_strides = (1, a_shape[0]), (0, a_strides[0])
    if len(b_shape) == 1:  # a column vector: (K,) -> (K, 1)
        b_shape, b_strides = (b_shape[0], 1), (b_strides[0], 0)
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: a has {k} columns but b has {k2} rows (shapes {a_shape} and {b_shape})")
    batch_a = a_shape[0] if len(a_shape) == 3 else 1
    batch_b = b_shape[0] if len(b_shape) == 3 else 1
    if batch_a != batch_b and 1 not in (batch_a, batch_b):
        raise ValueError(f"matmul: batches of {batch_a} and {batch_b} matrices do not broadcast")
    batch = max(batch_a, batch_b)
    a_layout = layout(m, k, a_strides[-2], a_strides[-1])
    b_layout = layout(k, n, b_strides[-2], b_strides[-1])
    if a_layout is None or b_layout is None:
        return None
    stride_a = a_strides[0] if len(a_shape) == 3 and batch_a > 1 else 0
    stride_b = b_strides[0] if len(b_shape) == 3 and batch_b > 1 else 0
    if stride_a < 0 or stride_b < 0:
        return None
    # B row-major is B^T column-major: op N; B column-major: op T. Likewise for A.
    transa = OP_N if b_layout[0] == ROW else OP_T
    transb = OP_N if a_layout[0] == ROW else OP_T
    out_shape = (batch, m, n) if len(a_shape) == 3 or len(b_shape) == 3 else (m, n)
    return GemmPlan(transa, transb, n, m, k, b_layout[1], stride_b, a_layout[1], stride_a, max(n, 1), m * n,
                    batch, out_shape)


def result_shape(a_ndim: int, b_ndim: int, plan_shape: tuple[int, ...]) -> tuple[int, ...]:
    """matmul's result shape from the plan's (batch, M, N) or (M, N): a 1-D operand's axis dropped."""
    shape = list(plan_shape)
    if b_ndim == 1:
        del shape[-1]
    if a_ndim == 1:
        del shape[-2 if b_ndim != 1 else -1]
    return tuple(shape)


# ---- the handle ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _library() -> SimpleNamespace:
    """The four functions called here, from libcublas: the copy CuPy uses (importing CuPy's cublas
    module loads it through cuda.pathfinder, which then returns the library already loaded)."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401, PLC0415 - loads CuPy's libcublas first
    from cuda.pathfinder import load_nvidia_dynamic_lib  # noqa: PLC0415 - CuPy's own dependency
    loaded = load_nvidia_dynamic_lib("cublas")
    # The handle pathfinder already holds (its path may be unknown when another component loaded it).
    lib = ctypes.CDLL(loaded.abs_path or "libcublas", handle=loaded._handle_uint)
    handle, vp, i32, i64, size = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
    prototypes = {  # name -> (the exported symbols to try, in order; the argument types)
        "create": (("cublasCreate_v2", "cublasCreate"), (ctypes.POINTER(handle),)),
        "set_stream": (("cublasSetStream_v2", "cublasSetStream"), (handle, vp)),
        "set_workspace": (("cublasSetWorkspace_v2", "cublasSetWorkspace"), (handle, vp, size)),
        "gemm": (("cublasGemmStridedBatchedEx",), (handle, i32, i32, i32, i32, i32, vp, vp, i32, i32, i64, vp, i32,
                                                    i32, i64, vp, vp, i32, i32, i64, i32, i32, i32)),
    }
    functions = {}
    for name, (symbols, argtypes) in prototypes.items():
        found = next((getattr(lib, s) for s in symbols if hasattr(lib, s)), None)
        if found is None:
            raise RuntimeError(f"libcublas ({lib._name}) exports none of {symbols}")
        found.argtypes, found.restype = list(argtypes), ctypes.c_int
        functions[name] = found
    return SimpleNamespace(**functions)


# cublasStatus_t values (cublas_api.h), for error messages.
STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 11: "MAPPING_ERROR",
          13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {call} failed: CUBLAS_STATUS_{STATUS.get(status, status)}")


class Gemm:
    """A cuBLAS handle of our own on one device, with its workspace: GEMMs on it can be captured."""

    def __init__(self, device_id: int) -> None:
        cupy = require_cupy()
        self.device_id = device_id
        self._lib = _library()
        with cupy.cuda.Device(device_id):
            handle = ctypes.c_void_p()
            _check(self._lib.create(ctypes.byref(handle)), "cublasCreate")
            self.handle = handle
            self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=np.uint8)  # lives as long as the handle
        self._stream: int | None = None
        self._one = {CUDA_R_32F: ctypes.c_float(1.0), CUDA_R_64F: ctypes.c_double(1.0)}
        self._zero = {CUDA_R_32F: ctypes.c_float(0.0), CUDA_R_64F: ctypes.c_double(0.0)}

    def bind(self, stream_ptr: int) -> None:
        """Put the handle on a stream, and its workspace back (cublasSetStream resets it): before
        any GEMM on that stream, so also before a capture on it begins."""
        if stream_ptr == self._stream:
            return
        _check(self._lib.set_stream(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
        _check(self._lib.set_workspace(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                               ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
        self._stream = stream_ptr

    def matmul(self, a: Any, b: Any) -> Any:
        """a @ b (CuPy arrays, float32 or float64, 1-D to 3-D) on this handle, on the current stream."""
        cupy = require_cupy()
        if a.dtype != b.dtype or a.dtype not in _DATA_TYPES:
            raise TypeError(f"matmul: float32 or float64 operands of one dtype, got {a.dtype} and {b.dtype}")
        if not 1 <= a.ndim <= 3 or not 1 <= b.ndim <= 3:
            raise ValueError(f"matmul: 1-D to 3-D operands, got shapes {a.shape} and {b.shape}")
        call = _plan_of(a, b)
        if call is None:
            a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
            call = _plan_of(a, b)
        out = cupy.empty(call.out_shape, dtype=a.dtype)
        if out.size and call.k == 0:
            out.fill(0)  # an empty sum
        elif out.size:
            self._launch(call, a, b, out)
        return out.reshape(result_shape(a.ndim, b.ndim, call.out_shape))

    def _launch(self, call: GemmPlan, a: Any, b: Any, out: Any) -> None:
        if max(call.m, call.n, call.k, call.lda, call.ldb, call.ldc, call.batch) > INT_MAX:
            raise ValueError(f"matmul: a dimension of {call} exceeds cuBLAS's 32-bit sizes")
        cupy = require_cupy()
        self.bind(cupy.cuda.get_current_stream().ptr)
        dtype = _DATA_TYPES[a.dtype]
        compute = COMPUTE_64F if dtype == CUDA_R_64F else (COMPUTE_32F_FAST_TF32 if tf32_enabled() else COMPUTE_32F)
        status = self._lib.gemm(
            self.handle, call.transa, call.transb, call.m, call.n, call.k, ctypes.byref(self._one[dtype]),
            ctypes.c_void_p(b.data.ptr), dtype, call.lda, call.stride_a,
            ctypes.c_void_p(a.data.ptr), dtype, call.ldb, call.stride_b,
            ctypes.byref(self._zero[dtype]), ctypes.c_void_p(out.data.ptr), dtype, call.ldc, call.stride_c,
            call.batch, compute, GEMM_DEFAULT)
        _check(status, "cublasGemmStridedBatchedEx")


def _plan_of(a: Any, b: Any) -> GemmPlan | None:
    """plan() for two arrays, or None (copy them first) when a stride is not a whole, non-negative
    number of elements, or an empty operand leaves the layout undefined."""
    item = a.itemsize
    if a.size == 0 or b.size == 0 or any(s < 0 or s % item for s in (*a.strides, *b.strides)):
        if a.flags.c_contiguous and b.flags.c_contiguous:
            return plan(a.shape, _c_strides(a.shape), b.shape, _c_strides(b.shape))
        return None
    return plan(a.shape, tuple(s // item for s in a.strides), b.shape, tuple(s // item for s in b.strides))


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element strides of a C-contiguous array of this shape, zero-size axes counted as 1."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=None)
def handle_for(device_id: int) -> Gemm:
    """The Gemm of a device, created on first use and kept for the process (cuBLAS frees it at exit)."""
    return Gemm(device_id)
