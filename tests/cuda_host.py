"""CUDA kernels run on the CPU, for tests without a GPU: a .cu file compiled for the host by g++.

Kernels written as grid-stride loops (every kernel of kernels/batch.cu, and the ElementwiseKernel
bodies CuPy wraps in such a loop) compute the same thing whatever the grid: with one block of one
thread the loop visits every element in order. A small header makes CUDA's qualifiers empty,
threadIdx/blockIdx/blockDim/gridDim constants (0 and 1) and the device intrinsics their exact
host equivalents (__fmul_rn is an IEEE multiply: the host is compiled with -ffp-contract=off, so
nothing is fused either), and a generated file takes the address of every instantiation. Each
launch is checked against the kernel's parameter list parsed from the source (count, pointer
dtypes and contiguity, each scalar's exact NumPy type), then called through ctypes.

What this cannot see: CUDA itself (shared memory, warps, the launch configuration, the device's
own rounding of transcendental functions), which the GPU tests check.

    module = HostModule("batch.cu", ("gather_labels<long long>",), tmp_dir)
    module.get_function("gather_labels<long long>")((1,), (256,), (labels, order, step, y, np.int32(4), np.int32(4)))
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from cnn_gpu.cuda import loader

from .test_cuda_launch_abi import CTYPES, kernel_signature

CXX = shutil.which("g++") or shutil.which("c++")

SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
struct cnn_gpu_dim3 { unsigned int x, y, z; };
static const cnn_gpu_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static const cnn_gpu_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dadd_rn(double a, double b) { return a + b; }
using std::max;
using std::min;
"""

_CTYPES_OF = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.uint8: ctypes.c_uint8,
              np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.uint32: ctypes.c_uint32,
              np.uint64: ctypes.c_uint64}


class HostFunction:
    """One instantiation, called as cupy's RawKernel is: f(grid, block, args)."""

    def __init__(self, expression: str, source: str, address: int) -> None:
        name, targs = expression.split("<", 1)
        tparams, self.params = kernel_signature(source, name)
        subst = dict(zip(tparams, (t.strip() for t in targs.rstrip(">").split(","))))
        self.dtypes = [np.dtype(CTYPES[subst.get(ctype, ctype)]) for _, ctype in self.params]
        argtypes = [ctypes.c_void_p if pointer else _CTYPES_OF[dtype.type]
                    for (pointer, _), dtype in zip(self.params, self.dtypes)]
        self.expression = expression
        self._call = ctypes.CFUNCTYPE(None, *argtypes)(address)
        self.launches = 0

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        assert len(args) == len(self.params), f"{self.expression}: {len(args)} arguments for {len(self.params)}"
        assert all(g >= 1 for g in grid) and all(b >= 1 for b in block), (grid, block)
        converted = []
        for i, (arg, (pointer, _), dtype) in enumerate(zip(args, self.params, self.dtypes)):
            where = f"{self.expression} argument {i}"
            if pointer:
                assert isinstance(arg, np.ndarray), f"{where}: an array, got {type(arg).__name__}"
                assert arg.dtype == dtype and arg.flags.c_contiguous, f"{where}: {arg.dtype}, want {dtype}"
                converted.append(ctypes.c_void_p(arg.ctypes.data))
            else:
                assert type(arg) is dtype.type, f"{where}: {type(arg).__name__}, want {dtype.name}"
                converted.append(_CTYPES_OF[dtype.type](arg.item()))
        self._call(*converted)
        self.launches += 1


class HostModule:
    """A kernels/ file compiled for the host, standing in for loader.load_module's RawModule."""

    _built: dict = {}

    def __init__(self, filename: str, expressions: tuple[str, ...], directory: Path) -> None:
        if CXX is None:
            raise RuntimeError("no C++ compiler (g++) on the PATH")
        source = loader.kernel_source(filename)
        key = hashlib.sha1((source + "\n".join(expressions)).encode()).hexdigest()[:16]
        library = directory / f"{Path(filename).stem}_{key}.so"
        if key not in self._built:
            lines = [SHIM, f'#include "{loader.kernel_path(filename)}"', 'extern "C" {']
            lines += [f"void* cnn_gpu_kernel_{i} = (void*)&{e};" for i, e in enumerate(expressions)]
            wrapper = directory / f"{Path(filename).stem}_{key}.cpp"
            wrapper.write_text("\n".join(lines + ["}", ""]))
            result = subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Werror",
                                     "-Wno-unused-function", "-shared", "-fPIC", str(wrapper), "-o", str(library)],
                                    capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            self._built[key] = ctypes.CDLL(str(library))
        lib = self._built[key]
        self.functions = {e: HostFunction(e, source, ctypes.c_void_p.in_dll(lib, f"cnn_gpu_kernel_{i}").value)
                          for i, e in enumerate(expressions)}

    def get_function(self, expression: str) -> HostFunction:
        return self.functions[expression]


def host_loader(directory: Path) -> Any:
    """A stand-in for loader.load_module that compiles for the host."""
    def load_module(filename: str, expressions: tuple[str, ...]) -> HostModule:
        return HostModule(filename, tuple(expressions), directory)
    return load_module
