"""Without a GPU: every kernel launch passes exactly the arguments its .cu signature declares.

A wrong scalar type (np.int32 where the kernel takes long long) or a missing argument would
not fail loudly on the GPU; it would read garbage. Here CuPy is replaced by a NumPy-backed
stand-in and each compiled kernel by a recorder that checks, against the parameter list
parsed from the .cu source: the count, each pointer's dtype and contiguity, each scalar's
exact NumPy type, and the launch shape (block a multiple of 32 and <= 1024 threads,
grid within CUDA's limits). Nothing is computed.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from cnn_gpu import backend
from cnn_gpu.cuda import batchnorm, loader, maxpool
from cnn_gpu.geometry import Window

CTYPES = {"float": np.float32, "double": np.float64, "unsigned char": np.uint8,
          "int": np.int32, "long long": np.int64, "unsigned int": np.uint32,
          "unsigned long long": np.uint64}


class FakeArray(np.ndarray):
    """Stands in for cupy.ndarray."""

    @property
    def data(self):  # cupy.ndarray.data is a MemoryPointer; the kernels' callers read .ptr
        return SimpleNamespace(ptr=self.ctypes.data)


def _fake(a):
    return np.asarray(a).view(FakeArray)


FAKE_CUPY = SimpleNamespace(
    ndarray=FakeArray,
    ascontiguousarray=lambda a: _fake(np.ascontiguousarray(a)),
    asarray=lambda a, dtype=None: _fake(np.asarray(a, dtype=dtype)),
    empty=lambda shape, dtype=np.float64: _fake(np.empty(shape, dtype=dtype)),
    cuda=SimpleNamespace(Device=lambda i=0: SimpleNamespace(
        id=0, attributes={"MultiProcessorCount": 132})),
)


def kernel_signature(source: str, name: str) -> tuple[list[str], list[tuple[bool, str]]]:
    """(template parameter names, [(is_pointer, C type)]) of a __global__ template."""
    m = re.search(r"template <([^>]*)>\s*__global__ void(?:\s+__launch_bounds__\([^)]*\))?\s+"
                  + name + r"\(([^)]*)\)", source)
    assert m, f"no __global__ template {name} in the source"
    tparams = [p.split()[-1] for p in m.group(1).split(",")]
    params = []
    for p in m.group(2).split(","):
        words = p.replace("__restrict__", " ").replace("const ", " ").replace("*", " * ").split()
        pointer = "*" in words
        params.append((pointer, " ".join(w for w in words[:-1] if w != "*")))
    return tparams, params


class Recorder:
    """Checks each launch of one instantiation against its signature."""

    def __init__(self, source: str, expression: str, launches: list):
        name, targs = expression.split("<", 1)
        tparams, self.params = kernel_signature(source, name)
        self.subst = dict(zip(tparams, (t.strip() for t in targs.rstrip(">").split(","))))
        self.expression, self.launches = expression, launches

    def __call__(self, grid, block, args):
        assert len(args) == len(self.params), (self.expression, len(args), len(self.params))
        for i, (arg, (pointer, ctype)) in enumerate(zip(args, self.params)):
            want = CTYPES[self.subst.get(ctype, ctype)]
            where = f"{self.expression} argument {i}"
            if pointer:
                assert isinstance(arg, FakeArray), f"{where}: {type(arg).__name__}"
                assert arg.dtype == want and arg.flags.c_contiguous, f"{where}: {arg.dtype}"
            else:
                assert type(arg) is want, f"{where}: {type(arg).__name__}, needs {want.__name__}"
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        threads = block[0] * block[1] * block[2]
        assert threads % 32 == 0 and threads <= 1024, block
        assert 1 <= grid[0] < 2**31 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535, grid
        self.launches.append(self.expression)


@pytest.fixture
def launches(monkeypatch):
    recorded: list[str] = []

    def load_module(filename, expressions):
        source = loader.kernel_source(filename)
        kernels = {e: Recorder(source, e, recorded) for e in expressions}
        return SimpleNamespace(get_function=kernels.__getitem__)

    monkeypatch.setattr(backend, "_cupy", FAKE_CUPY)
    monkeypatch.setattr(backend, "_cupy_reason", None)
    monkeypatch.setattr(loader, "load_module", load_module)
    return recorded


def _aligned_zeros(shape, dtype, offset_elements=0):
    """Zeros at a 256-byte-aligned address (as CuPy allocates), plus an offset in elements."""
    itemsize = np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    raw = np.zeros(size * itemsize + 512, np.uint8)
    start = -raw.ctypes.data % 256 + offset_elements * itemsize
    return _fake(raw[start:start + size * itemsize].view(dtype).reshape(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", [(2, 2), (17, 17)])  # uint8 and int32 argmax
@pytest.mark.parametrize("c", [3, 4, 6, 64])
def test_max_pool_launches_match_signatures(launches, dtype, pool, c):
    x = _aligned_zeros((2, 20, 19, c), dtype)
    window = Window.of(pool, 2, 1)
    y, argmax = maxpool.max_pool2d_forward(x, window, window.output_hw(20, 19, "test"))
    maxpool.max_pool2d_backward(_aligned_zeros(y.shape, dtype), argmax, x.shape, window)
    index = "unsigned char" if pool == (2, 2) else "int"
    t = loader.ctype(dtype)
    wide = 16 // np.dtype(dtype).itemsize
    v = wide if c % wide == 0 else 1
    backward = "max_pool2d_backward_scatter" if pool == (2, 2) else "max_pool2d_backward"  # overlap?
    assert launches == [f"max_pool2d_forward<{t}, {index}, unsigned int, {v}>",
                        f"{backward}<{t}, {index}, unsigned int, {v}>"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_misaligned_input_takes_the_scalar_path(launches, dtype):
    # x starts one element past an aligned address: vector loads of x would fault.
    x = _aligned_zeros((2, 8, 8, 8), dtype, offset_elements=1)
    window = Window.of(2, 2)
    y, argmax = maxpool.max_pool2d_forward(x, window, (4, 4))
    maxpool.max_pool2d_backward(_aligned_zeros(y.shape, dtype, 1), argmax, x.shape, window)
    maxpool.max_pool2d_backward(_aligned_zeros(y.shape, dtype), argmax, x.shape, window)
    wide = 16 // np.dtype(dtype).itemsize
    assert [e.rsplit(", ", 1)[1] for e in launches] == ["1>", "1>", f"{wide}>"]


@pytest.mark.parametrize("window, ceil_mode, backward", [
    (Window.of(2, 2), False, "max_pool2d_backward_scatter"),
    (Window.of(2, 2), True, "max_pool2d_backward_scatter"),
    (Window.of(2, 3, 0, 2), False, "max_pool2d_backward_scatter"),  # taps 2 apart, stride 3: disjoint
    (Window.of(2, 2, 0, 2), True, "max_pool2d_backward"),           # taps 2 apart, stride 2: overlap
    (Window.of(3, 2, 1), True, "max_pool2d_backward"),
    (Window.of((3, 2), (3, 2), 0, (1, 2)), False, "max_pool2d_backward"),  # disjoint down, not across
])
def test_max_pool_backward_gathers_exactly_where_windows_overlap(launches, window, ceil_mode, backward):
    x = _aligned_zeros((2, 11, 13, 4), np.float32)
    y, argmax = maxpool.max_pool2d_forward(x, window, window.output_hw(11, 13, "test", ceil_mode))
    maxpool.max_pool2d_backward(_aligned_zeros(y.shape, np.float32), argmax, x.shape, window)
    assert launches == ["max_pool2d_forward<float, unsigned char, unsigned int, 4>",
                        f"{backward}<float, unsigned char, unsigned int, 4>"]


def test_windows_cover_the_input_only_when_their_taps_reach_every_position():
    assert maxpool.windows_cover_input(8, 8, Window.of(2, 2), 4, 4)
    assert not maxpool.windows_cover_input(9, 9, Window.of(2, 2), 4, 4)  # the last row and column
    assert maxpool.windows_cover_input(9, 9, Window.of(2, 2), 5, 5)      # ceil mode: a window past the edge
    assert maxpool.windows_cover_input(5, 5, Window.of(2, 2, 1), 3, 3)   # windows at -1, 1, 3
    assert not maxpool.windows_cover_input(8, 8, Window.of(2, 2, 0, 2), 3, 3)  # dilated: holes
    assert not maxpool.windows_cover_input(9, 9, Window.of(2, 3), 3, 3)  # gaps between windows


def test_vector_width_needs_every_pointer_aligned():
    x = _aligned_zeros((1, 4, 4, 8), np.float32)
    am = _aligned_zeros((1, 2, 2, 8), np.int32)
    assert maxpool._vector_width(8, x, am) == 4
    assert maxpool._vector_width(8, x, _aligned_zeros((1, 2, 2, 8), np.int32, 2)) == 1  # 8 B
    assert maxpool._vector_width(8, x, _aligned_zeros((1, 2, 2, 8), np.uint8, 4)) == 4  # 4 B
    assert maxpool._vector_width(6, _aligned_zeros((1, 4, 4, 6), np.float32)) == 1  # C % 4
    assert maxpool._vector_width(6, _aligned_zeros((1, 4, 4, 6), np.float64)) == 2


def test_max_pool_uses_64_bit_offsets_past_32_bits(monkeypatch, launches):
    x = _fake(np.zeros((1, 4, 4, 1), np.float32))
    monkeypatch.setattr(maxpool, "_offset_type", lambda *a: "unsigned long long")
    maxpool.max_pool2d_forward(x, Window.of(2, 2), (2, 2))
    assert launches == ["max_pool2d_forward<float, unsigned char, unsigned long long, 1>"]


def test_offset_type_threshold():
    small, large = SimpleNamespace(size=2**31), SimpleNamespace(size=2**32)
    assert maxpool.__dict__["_offset_type"](small) == "unsigned int"
    assert maxpool.__dict__["_offset_type"](large) == "unsigned long long"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,c", [(1, 1), (7, 3), (100_000, 64), (50, 3000)])
def test_batch_norm_launches_match_signatures(launches, dtype, m, c):
    x = _fake(np.zeros((m, c), dtype))
    mean, var = batchnorm.channel_mean_var(x)
    batchnorm.channel_grad_sums(x, x, mean, var)
    assert [e.split("<")[0] for e in launches] == list(batchnorm.KERNELS)
