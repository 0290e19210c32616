"""Without a GPU: cnn_gpu/cuda/conv.py run on the CPU, its ElementwiseKernel bodies compiled for the
host by a C++ compiler, against the NumPy reference.

CuPy runs a body once per element `i` of the output, with raw parameters as pointers, other
array parameters broadcast to the output's shape and read at `i`, and scalars by value. Here a
stand-in for cupy (NumPy arrays, and an ElementwiseKernel that compiles the body into a C++ loop
over i with exactly that binding) lets the module's own launchers run: their argument order,
the index arithmetic of every body, the filter gradient's blocks and the CuPy strategies
(CUPY_GEMM, CUPY_DEPTHWISE, CUPY_IM2COL: its GEMMs are NumPy's here, cnn_gpu.cuda.gemm.matmul outside
a capture being a @ b) are all checked here, where no GPU is. What this cannot see: CUDA
itself (launch configuration, the device's float rounding), which the GPU tests check.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from cnn_gpu.cuda import conv as cuda_conv
from cnn_gpu.functional import conv, conv2d_backward, conv2d_forward
from cnn_gpu.geometry import Window

from .test_conv_strategies import SWEEP

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on the PATH")

_CTYPES = {"int32": ("int", ctypes.c_int)}


def _host_source(in_params: str, out_params: str, body: str, ctype: str) -> str:
    """extern "C" run(...): the body inside a loop over i, bound as CuPy's ElementwiseKernel binds it."""
    args, binds = [], []
    for direction, params in (("in", in_params), ("out", out_params)):
        for param in params.split(","):
            words = param.split()
            raw = words[0] == "raw"
            kind, var = words[1:] if raw else words
            const = "const " if direction == "in" else ""
            if kind in _CTYPES:  # a scalar, by value
                args.append(f"{_CTYPES[kind][0]} {var}")
            elif raw:
                args.append(f"{const}T* {var}")
            else:  # an array broadcast to the output's shape, read (or written) at i
                args.append(f"{const}T* {var}_p")
                binds.append(f"{const}T& {var} = {var}_p[i];")
    return (f"typedef {ctype} T;\n"
            f"extern \"C\" void run({', '.join(args)}, long long n) {{\n"
            f"  for (long long i = 0; i < n; ++i) {{\n    {' '.join(binds)}\n{body}\n  }}\n}}\n")


class _HostKernel:
    """cupy.ElementwiseKernel's call, on NumPy arrays, through the body compiled for the host."""

    _built: dict = {}

    def __init__(self, in_params: str, out_params: str, body: str, name: str, directory) -> None:
        self.params = [(p.split()[0] == "raw", p.split()[-2], p.split()[-1])
                       for p in (in_params + "," + out_params).split(",")]
        self.n_in = len(in_params.split(","))
        self.source = (in_params, out_params, body)
        self.name, self.directory = name, directory

    def _function(self, ctype: str):
        key = (self.name, ctype)
        if key not in self._built:
            source = self.directory / f"{self.name}_{ctype}.cpp"
            library = self.directory / f"{self.name}_{ctype}.so"
            source.write_text(_host_source(*self.source, ctype))
            result = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                                     str(source), "-o", str(library)], capture_output=True, text=True)
            assert result.returncode == 0, source.read_text() + result.stderr
            self._built[key] = ctypes.CDLL(str(library)).run
        return self._built[key]

    def __call__(self, *args):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)} parameters"
        out = args[-1]
        ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[out.dtype]
        c_args, keep = [], []
        for (raw, kind, var), value in zip(self.params, args):
            if kind in _CTYPES:
                assert isinstance(value, np.int32), f"{self.name}: {var} must be np.int32, got {type(value)}"
                c_args.append(_CTYPES[kind][1](int(value)))
                continue
            assert value.dtype == out.dtype, f"{self.name}: {var} is {value.dtype}, the output {out.dtype}"
            if raw:
                assert value.flags.c_contiguous, f"{self.name}: raw {var} must be C-contiguous"
                array = value
            elif value is out:
                assert out.flags.c_contiguous
                array = out
            else:
                array = np.ascontiguousarray(np.broadcast_to(value, out.shape))
            keep.append(array)
            c_args.append(ctypes.c_void_p(array.ctypes.data))
        self._function(ctype)(*c_args, ctypes.c_longlong(out.size))
        return out


@pytest.fixture
def host_cupy(monkeypatch, tmp_path_factory):
    """cnn_gpu.cuda.conv with a NumPy stand-in for cupy, its kernels compiled for the host."""
    directory = tmp_path_factory.getbasetemp() / "conv_host_kernels"
    directory.mkdir(exist_ok=True)
    fake = SimpleNamespace(empty=np.empty, zeros=np.zeros, ones=np.ones, ascontiguousarray=np.ascontiguousarray,
                           concatenate=np.concatenate,
                           ElementwiseKernel=lambda i, o, body, name: _HostKernel(i, o, body, name, directory))
    monkeypatch.setattr(cuda_conv, "require_cupy", lambda: fake)
    cuda_conv.kernel.cache_clear()
    yield cuda_conv
    cuda_conv.kernel.cache_clear()


def _run(monkeypatch, strategy, x, w, b, dy, **geometry):
    monkeypatch.setattr(conv, "select", lambda *args: strategy)
    y, cache = conv2d_forward(x, w, b, **geometry)
    return (y, *conv2d_backward(dy if dy is not None else np.ones_like(y), cache))


@pytest.mark.parametrize("strategy, case", [
    pytest.param(strategy, case, id=f"{strategy.name}-case{i}")
    for strategy in (conv.CUPY_GEMM, conv.CUPY_DEPTHWISE, conv.CUPY_IM2COL) for i, case in enumerate(SWEEP)
    if strategy is not conv.CUPY_DEPTHWISE or case[3] == case[10]])  # CUPY_DEPTHWISE: groups == C only
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_strategy_on_the_host_matches_the_reference(host_cupy, monkeypatch, rng, strategy, case, dtype):
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, wt, b = (rng.standard_normal(s).astype(dtype) for s in ((n, h, w, c), (kh, kw, c // groups, o), (o,)))
    y_ref = conv2d_forward(x.astype("float64"), wt.astype("float64"), b.astype("float64"), **geometry)[0]
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    got = _run(monkeypatch, strategy, x, wt, b, dy, **geometry)
    ref = _run(monkeypatch, conv.REFERENCE, *(a.astype("float64") for a in (x, wt, b, dy)), **geometry)
    tol = 1e-12 if dtype == "float64" else 2e-5  # another summation order than the reference's GEMMs
    for g, r, what in zip(got, ref, ("y", "dx", "dw", "db")):
        assert g.dtype == dtype, what
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(np.abs(r).max()), err_msg=f"{strategy.name} {what}")


def test_col2im_kernel_on_the_host_equals_the_numpy_col2im(host_cupy, rng):
    """The gather adds the same terms in the same (kh, kw) order as the NumPy col2im: equal bit for bit."""
    window = Window.of((3, 2), (2, 1), (1, 2), (2, 3))
    oh, ow = window.output_hw(11, 10, "test")
    dcols = rng.standard_normal((3, 2 * oh * ow, window.taps * 2))  # three groups of two channels
    np.testing.assert_array_equal(host_cupy.col2im(dcols, (2, 11, 10, 6), window, oh, ow),
                                  conv.col2im(dcols, (2, 11, 10, 6), window, oh, ow))


@pytest.mark.parametrize("ones", [False, True])
def test_im2col_kernel_on_the_host_equals_the_numpy_im2col(host_cupy, rng, ones):
    """A copy: equal bit for bit, the ones column (the bias's) included; padding, stride, dilation,
    groups, and only the first OH x OW windows (out_size)."""
    window = Window.of((3, 2), (2, 1), (1, 2), (2, 3))
    oh, ow = window.output_hw(11, 10, "test")
    x = rng.standard_normal((2, 11, 10, 6))
    for groups, (rows, cols) in ((1, (oh, ow)), (3, (oh, ow)), (2, (oh - 1, ow - 2))):
        expected = conv.im2col(x, window, rows, cols, groups)
        if ones:
            expected = np.concatenate([expected, np.ones(expected.shape[:2] + (1,))], axis=2)
        np.testing.assert_array_equal(host_cupy.im2col(x, window, rows, cols, groups, ones), expected)


def test_filter_gradient_blocks_cover_every_position(host_cupy, monkeypatch, rng):
    """With blocks of a few positions (a small thread target), the filter gradient still sums every
    output position once: the last block is partial, none is empty."""
    monkeypatch.setattr(host_cupy, "FILTER_GRAD_THREADS", 3 * 9 * 6)
    x, wt = rng.standard_normal((2, 7, 5, 3)), rng.standard_normal((3, 3, 1, 6))
    dy = rng.standard_normal((2, 7, 5, 6))
    window = Window.of(3, 1, 1)
    _, dw = host_cupy.depthwise_backward(dy, x, wt, window, need_dx=False)
    _, cache = conv2d_forward(x, wt, None, 1, 1, groups=3)
    np.testing.assert_allclose(dw, conv.reference_backward(dy, cache)[1], rtol=1e-12, atol=1e-12)


def test_a_wrong_argument_is_caught(host_cupy):
    """The stand-in refuses what CuPy would: a Python int where the kernel takes an int32."""
    with pytest.raises(AssertionError, match="must be np.int32"):
        host_cupy.kernel("col2im")(np.zeros(4), *([1] * 15), np.zeros(4))
