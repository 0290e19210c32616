"""Without a GPU: every ElementwiseKernel body in cnn_gpu/cuda/elementwise.py and cnn_gpu/cuda/conv.py compiles.

CuPy generates the kernel around the body at the first call, which needs a device. Here each
body is wrapped the same way by hand -- a grid-stride loop over `i`, raw parameters as
pointers, other parameters as one element of type T (CuPy passes scalars and array elements
alike) and outputs as references -- and nvcc compiles it for float and double with warnings as
errors. A typo or a type error in a body fails here instead of on the first GPU run.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from cnn_gpu.cuda import conv, elementwise

_KERNELS = {**elementwise._KERNELS, **conv._KERNELS}

NVCC = shutil.which("nvcc")
CTYPE = {"int32": "int", "bool": "bool"}


def wrap(name: str, in_params: str, out_params: str, body: str) -> str:
    """A template __global__ function with CuPy's elementwise structure around `body`."""
    args, binds = [], []
    for direction, params in (("in", in_params), ("out", out_params)):
        for param in params.split(","):
            words = param.split()
            raw = words[0] == "raw"
            ctype, var = (words[1:] if raw else words)
            ctype = CTYPE.get(ctype, ctype)
            const = "const " if direction == "in" else ""
            if raw:
                args.append(f"{const}{ctype}* {var}")
            else:
                args.append(f"{const}{ctype}* {var}_p")
                binds.append(f"{const}{ctype}& {var} = {var}_p[i];")
    return (f"template <typename T, typename I>\n__global__ void {name}({', '.join(args)}, long long n) {{\n"
            f"  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;"
            f" i += (long long)gridDim.x * blockDim.x) {{\n    {' '.join(binds)}\n{body}\n  }}\n}}\n"
            f"template __global__ void {name}<float, long long>({', '.join(a.replace('T', 'float').replace('I*', 'long long*') for a in args)}, long long);\n"
            f"template __global__ void {name}<double, long long>({', '.join(a.replace('T', 'double').replace('I*', 'long long*') for a in args)}, long long);\n")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("name", sorted(_KERNELS))
def test_elementwise_body_compiles(tmp_path, name):
    (in_params, out_params), body = _KERNELS[name]
    source = tmp_path / f"{name}.cu"
    source.write_text(wrap(f"k_{name}", in_params, out_params, body))
    result = subprocess.run([NVCC, "-std=c++17", "-Werror", "all-warnings", "-arch=sm_90", "-c",
                             str(source), "-o", str(tmp_path / f"{name}.o")], capture_output=True, text=True)
    assert result.returncode == 0, source.read_text() + result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
def test_a_broken_body_fails(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text(wrap("k_broken", "T x", "T y", "y = x +;"))
    result = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-c", str(source), "-o", str(tmp_path / "b.o")],
                            capture_output=True, text=True)
    assert result.returncode != 0
