"""The wheel ships the CUDA sources, and the installed loader finds them there.

Builds the wheel with `pip wheel` (the first run fetches hatchling into pip's isolated build
environment, so it needs the package index), installs it into a temporary target, and asks
a fresh interpreter that cannot see this checkout where the kernels are.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KERNELS = ("maxpool2d.cu", "batchnorm.cu")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)])
    wheels = list(out.glob("cnn_gpu-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in KERNELS:
        assert f"cnn_gpu/kernels/{kernel}" in names, sorted(names)
    assert "cnn_gpu/cuda/loader.py" in names
    assert "cnn_gpu/backend.py" in names


def test_installed_loader_finds_the_installed_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
          "--target", str(target), str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    script = ("from cnn_gpu.cuda import loader\n"
              "for name in %r:\n"
              "    print(loader.kernel_path(name))\n"
              "print(len(loader.kernel_source(%r)))\n" % (KERNELS, KERNELS[0]))
    result = _run([sys.executable, "-c", script], cwd=tmp_path, env=env)
    *paths, size = result.stdout.split()
    for kernel, path in zip(KERNELS, paths):
        assert Path(path) == target / "cnn_gpu" / "kernels" / kernel
    assert int(size) == len((REPO / "kernels" / KERNELS[0]).read_text(encoding="utf-8"))
