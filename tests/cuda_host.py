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


# ---- ElementwiseKernel bodies ------------------------------------------------------------------------

_ELEMENT_CTYPES = {"T": None, "int32": "int", "bool": "bool", "int64": "long long", "uint8": "unsigned char"}
_ELEMENT_DTYPES = {"int32": np.dtype(np.int32), "bool": np.dtype(np.bool_), "int64": np.dtype(np.int64),
                   "uint8": np.dtype(np.uint8)}


class HostElementwise:
    """cupy.ElementwiseKernel(in_params, out_params, body, name) on NumPy arrays: the body compiled
    for the host inside a loop over the output's elements i, bound as CuPy binds it -- a raw
    parameter as a pointer, any other as an array broadcast to the output's shape (a scalar too)
    read at i, outputs as references. Types: T (the output's float type), int32, int64, uint8, bool.
    Called as the kernel is: f(*inputs, *outputs); the last argument is the output that sets the size."""

    _built: dict = {}

    def __init__(self, in_params: str, out_params: str, body: str, name: str, directory: Path) -> None:
        self.params = []  # (raw, type, name, is_output)
        for is_output, params in ((False, in_params), (True, out_params)):
            for param in params.split(","):
                words = param.split()
                raw = words[0] == "raw"
                kind, var = words[1:] if raw else words
                assert kind in _ELEMENT_CTYPES, f"{name}: type {kind} is not handled here"
                self.params.append((raw, kind, var, is_output))
        self.body, self.name, self.directory = body, name, directory

    def _function(self, ctype: str) -> Any:
        key = (self.name, ctype, self.body)
        if key not in self._built:
            args, binds = [], []
            for raw, kind, var, is_output in self.params:
                c = ctype if kind == "T" else _ELEMENT_CTYPES[kind]
                const = "" if is_output else "const "
                if raw:
                    args.append(f"{const}{c}* {var}")
                else:
                    args.append(f"{const}{c}* {var}_p")
                    binds.append(f"{const}{c}& {var} = {var}_p[i];")
            source = (f"{SHIM}\ntypedef {ctype} T;\nextern \"C\" void run({', '.join(args)}, long long n) {{\n"
                      f"  for (long long i = 0; i < n; ++i) {{\n    {' '.join(binds)}\n{self.body}\n  }}\n}}\n")
            stem = f"{self.name}_{ctype}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
            path, library = self.directory / f"{stem}.cpp", self.directory / f"{stem}.so"
            path.write_text(source)
            result = subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Werror", "-shared",
                                     "-fPIC", str(path), "-o", str(library)], capture_output=True, text=True)
            assert result.returncode == 0, source + result.stderr
            self._built[key] = ctypes.CDLL(str(library)).run
        return self._built[key]

    def __call__(self, *args: Any) -> Any:
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)}"
        out = args[-1]
        float_type = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[out.dtype]
        pointers, keep = [], []
        for (raw, kind, var, is_output), value in zip(self.params, args):
            dtype = out.dtype if kind == "T" else _ELEMENT_DTYPES[kind]
            where = f"{self.name}: {var}"
            if raw:
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous, f"{where}: a C-contiguous array"
                assert value.dtype == dtype, f"{where} is {value.dtype}, the kernel takes {dtype}"
                array = value
            elif is_output:
                assert value.shape == out.shape and value.dtype == dtype and value.flags.c_contiguous, where
                array = value
            else:
                if not isinstance(value, np.ndarray):  # a scalar: CuPy takes its NumPy type as it is
                    assert np.dtype(type(value)) == dtype, f"{where}: {type(value).__name__}, want {dtype}"
                else:
                    assert value.dtype == dtype, f"{where} is {value.dtype}, the kernel takes {dtype}"
                array = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=dtype), out.shape))
            keep.append(array)
            pointers.append(ctypes.c_void_p(array.ctypes.data))
        self._function(float_type)(*pointers, ctypes.c_longlong(out.size))
        return out


class HostArray(np.ndarray):
    """A NumPy array with cupy.ndarray's set() (a host-to-device copy, here a copy)."""

    def set(self, values: Any) -> None:
        self[...] = values


def host_array(a: Any) -> HostArray:
    return np.asarray(a).view(HostArray)
