"""The .cu files compile, with no GPU needed: with NVRTC exactly as cupy.RawModule will
(same source text, same options, the same name expressions), and with nvcc -Werror.

NVRTC comes from pip (`cupy-cuda12x` for the cupy_backends wrapper and
`nvidia-cuda-nvrtc-cu12` for the library); neither needs a driver. Each part skips, with
the reason, where its compiler is missing.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import numpy as np
import pytest

from cnn_gpu.cuda import batchnorm, loader, maxpool, rng

# kernel file -> its name expressions for one dtype (what the loader compiles)
KERNEL_FILES: dict[str, Callable[[object], tuple[str, ...]]] = {
    maxpool.KERNEL_FILE: maxpool.name_expressions,
    batchnorm.KERNEL_FILE: batchnorm.name_expressions,
    rng.KERNEL_FILE: rng.name_expressions,
}
DTYPES = (np.float32, np.float64)
# What cupy.RawModule appends to our options before NVRTC sees them (cupy/cuda/compiler.py);
# it adds '-arch=sm_XX' for the device too, for which the tests substitute fixed targets.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
NVRTC_ARCHS = ("-arch=compute_90", "-arch=sm_80", "-arch=sm_90")
NVCC_ARCHS = ("sm_80", "sm_90")


class CompileError(Exception):
    """NVRTC rejected a program; the message holds its log."""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        pytest.skip(f"cupy_backends is not importable ({exc}); pip install cupy-cuda12x")
    try:
        nvrtc.getVersion()
    except Exception as exc:  # the library is found only when the call is made
        pytest.skip(f"the NVRTC library cannot be loaded ({exc}); "
                    "pip install nvidia-cuda-nvrtc-cu12")
    return nvrtc


def nvrtc_compile(source: str, name: str, expressions: tuple[str, ...],
                  options: tuple[str, ...]) -> dict[str, str]:
    """Compile like RawModule(code=source, name_expressions=...) does; return the lowered names."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        for expression in expressions:
            nvrtc.addNameExpression(prog, expression)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"{exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return {e: nvrtc.getLoweredName(prog, e) for e in expressions}
    finally:
        nvrtc.destroyProgram(prog)


def test_nvrtc_is_available():
    nvrtc = _nvrtc()
    major, minor = nvrtc.getVersion()
    assert major >= 12, f"NVRTC {major}.{minor} is older than the CUDA 12 the wheels target"


@pytest.mark.parametrize("arch", NVRTC_ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("filename", sorted(KERNEL_FILES))
def test_nvrtc_compiles_every_instantiation(filename, dtype, arch):
    expressions = KERNEL_FILES[filename](dtype)
    options = loader.COMPILE_OPTIONS + CUPY_ADDED_OPTIONS + (arch,)
    lowered = nvrtc_compile(loader.kernel_source(filename), filename, expressions, options)
    assert set(lowered) == set(expressions)
    assert len(set(lowered.values())) == len(expressions), lowered
    for expression, mangled in lowered.items():
        kernel = expression.split("<")[0]
        assert mangled.startswith("_Z") and kernel in mangled, (expression, mangled)


def test_nvrtc_rejects_a_broken_kernel():
    """The compile test can fail: one missing semicolon must be reported."""
    source = loader.kernel_source(maxpool.KERNEL_FILE)
    broken = source.replace("store<V>(dx + i * V, acc);", "store<V>(dx + i * V, acc)", 1)
    assert broken != source
    options = loader.COMPILE_OPTIONS + CUPY_ADDED_OPTIONS + ("-arch=compute_90",)
    with pytest.raises(CompileError, match="error"):
        nvrtc_compile(broken, maxpool.KERNEL_FILE, maxpool.name_expressions(np.float32), options)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH (install the CUDA toolkit to run this check)")
    return nvcc


def _every_instantiation(filename: str) -> list[str]:
    """The distinct name expressions of a file over both dtypes (one that takes no float type,
    such as gather_labels<long long>, is in both lists)."""
    return sorted({expression for dtype in DTYPES for expression in KERNEL_FILES[filename](dtype)})


def _instantiating_wrapper(filename: str) -> str:
    """A .cu that includes the kernel file and takes the address of every instantiation."""
    lines = [f'#include "{loader.kernel_path(filename)}"', "", "void cnn_gpu_instantiate_all()", "{"]
    lines += [f"    (void)&{expression};" for expression in _every_instantiation(filename)]
    return "\n".join(lines + ["}", ""])


@pytest.mark.parametrize("arch", NVCC_ARCHS)
@pytest.mark.parametrize("filename", sorted(KERNEL_FILES))
def test_nvcc_compiles_without_warnings_or_spills(filename, arch, tmp_path):
    nvcc = _nvcc()
    wrapper = tmp_path / f"instantiate_{filename}"
    wrapper.write_text(_instantiating_wrapper(filename))
    cmd = [nvcc, "-std=c++17", "-Werror", "all-warnings", f"-arch={arch}", "-Xptxas", "-v",
           "-c", str(wrapper), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)}\n{log}"
    # ptxas -v reports every kernel it compiled, and whether registers spilled to memory.
    entries = re.findall(r"Compiling entry function '(\w+)'", log)
    expected = len(_every_instantiation(filename))
    assert len(entries) == expected, log
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), f"register spills:\n{log}"


def _every_kernel_file() -> list[str]:
    """Every .cu in kernels/, found on disk, so that a new file cannot escape these tests."""
    directory = loader.kernel_path(maxpool.KERNEL_FILE).parent
    return sorted(path.name for path in directory.glob("*.cu"))


def test_every_kernel_file_is_compiled_by_these_tests():
    assert set(_every_kernel_file()) == set(KERNEL_FILES), \
        "add the new .cu file and its name_expressions to KERNEL_FILES"


@pytest.mark.parametrize("filename", _every_kernel_file())
def test_nvcc_compiles_each_file_as_it_is_without_warnings(filename, tmp_path):
    """The file alone, as a user's `nvcc -Werror all-warnings` sees it: no template is
    instantiated, so the host pass checks what only templates use (warning #177 and the like)."""
    nvcc = _nvcc()
    cmd = [nvcc, "-std=c++17", "-Werror", "all-warnings", "-arch=sm_90", "-c",
           str(loader.kernel_path(filename)), "-o", str(tmp_path / "alone.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"


def test_nvcc_warning_check_can_fail(tmp_path):
    """A namespace-scope constant used only inside a template is the warning the check exists for."""
    nvcc = _nvcc()
    source = tmp_path / "unreferenced.cu"
    source.write_text("constexpr int UNUSED = 8;\ntemplate <typename T> __global__ void k(T* p) { p[0] = UNUSED; }\n")
    result = subprocess.run([nvcc, "-std=c++17", "-Werror", "all-warnings", "-arch=sm_90", "-c", str(source),
                             "-o", str(tmp_path / "u.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "177" in result.stdout + result.stderr
