"""How close the CUDA kernels come to the GPU's memory bandwidth.

Each kernel is memory-bound, so its useful measure is bytes moved per second: the minimum
bytes (every input read once, every output written once) over the median time of several
runs, timed with CUDA events after warm-up, on tensors of about 1 GiB (many times the
50-60 MB L2 of an H100/H200, so the data really comes from HBM). The baseline is a
device-to-device copy of a buffer of the same size (bytes read + written).

    python -m cnn_gpu.bench.kernel_bandwidth [--dtype float32|float64] [--gib 1.0]

Timed through the public functions, so each time includes the small host-side cost of a
call (argument checks, output allocation from CuPy's pool).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from cnn_gpu.backend import require_cupy
from cnn_gpu.cuda import batchnorm, maxpool
from cnn_gpu.geometry import Window

GIB = 1 << 30
WARMUP, REPEATS = 3, 10


def _median_ms(cupy: Any, fn: Callable[[], Any]) -> float:
    """Median wall time of fn on the GPU, in ms, from CUDA events around each run."""
    for _ in range(WARMUP):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(REPEATS):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def _row(name: str, shape: tuple[int, ...], ms: float, nbytes: int, copy_gbs: float | None) -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"name": name, "shape": shape, "ms": ms, "bytes": nbytes, "GB/s": gbs,
            "% of copy": 100.0 * gbs / copy_gbs if copy_gbs else 100.0}


def _free(cupy: Any) -> None:
    cupy.get_default_memory_pool().free_all_blocks()


def measure(dtype: str = "float32", gib: float = 1.0) -> list[dict]:
    """Time the kernels on ~`gib` GiB inputs of `dtype`; one dict per kernel.

    Keys: name, shape (of the main input), ms (median), bytes (min bytes moved),
    GB/s, % of copy (of the device-to-device copy's GB/s, the first row).
    """
    cupy = require_cupy()
    dt = np.dtype(dtype)
    target = int(gib * GIB)
    rows = []

    # Baseline: copy a buffer of the same size, bytes read + written.
    n = target // dt.itemsize
    src = cupy.ones(n, dtype=dt)
    dst = cupy.empty_like(src)
    ms = _median_ms(cupy, lambda: cupy.copyto(dst, src))
    rows.append(_row("device-to-device copy", src.shape, ms, 2 * src.nbytes, None))
    copy_gbs = rows[0]["GB/s"]
    del src, dst
    _free(cupy)

    # Max pooling, x (N, 128, 128, 64): a typical early CNN feature map.
    h = w = 128
    c = 64
    batch = max(1, target // (h * w * c * dt.itemsize))
    x = cupy.random.standard_normal((batch, h, w, c), dtype=dt)
    for pool, stride, padding in (((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))):
        tag = f"pool {pool[0]}x{pool[1]} stride {stride[0]} pad {padding[0]}"
        window = Window.of(pool, stride, padding)
        out_hw = window.output_hw(h, w, "max_pool2d")
        y, argmax = maxpool.max_pool2d_forward(x, window, out_hw)
        ms = _median_ms(cupy, lambda: maxpool.max_pool2d_forward(x, window, out_hw))
        rows.append(_row(f"max_pool2d_forward {tag}", x.shape, ms,
                         x.nbytes + y.nbytes + argmax.nbytes, copy_gbs))
        dy = cupy.random.standard_normal(y.shape, dtype=dt)
        ms = _median_ms(cupy, lambda: maxpool.max_pool2d_backward(dy, argmax, x.shape, window))
        rows.append(_row(f"max_pool2d_backward {tag}", x.shape, ms,
                         dy.nbytes + argmax.nbytes + x.nbytes, copy_gbs))
        del y, argmax, dy
        _free(cupy)
    del x
    _free(cupy)

    # Batch-norm reductions, x (M, C) viewed from (N, H, W, C).
    for c in (64, 256):
        m = target // (c * dt.itemsize)
        x2d = cupy.random.standard_normal((m, c), dtype=dt)
        mean, var = batchnorm.channel_mean_var(x2d)
        ms = _median_ms(cupy, lambda: batchnorm.channel_mean_var(x2d))
        rows.append(_row(f"channel_mean_var C={c}", x2d.shape, ms,
                         x2d.nbytes + mean.nbytes + var.nbytes, copy_gbs))
        dy = cupy.random.standard_normal((m, c), dtype=dt)
        inv_std = 1.0 / cupy.sqrt(var + 1e-5)
        s, sx = batchnorm.channel_grad_sums(dy, x2d, mean, inv_std)
        ms = _median_ms(cupy, lambda: batchnorm.channel_grad_sums(dy, x2d, mean, inv_std))
        rows.append(_row(f"channel_grad_sums C={c}", x2d.shape, ms,
                         dy.nbytes + x2d.nbytes + mean.nbytes + inv_std.nbytes
                         + s.nbytes + sx.nbytes, copy_gbs))
        del x2d, dy, mean, var, inv_std, s, sx
        _free(cupy)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'kernel':<44} {'shape':<22} {'ms':>8} {'GB/s':>8} {'% copy':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<44} {str(r['shape']):<22} {r['ms']:>8.3f} "
                     f"{r['GB/s']:>8.0f} {r['% of copy']:>6.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the main input (GiB)")
    args = parser.parse_args(argv)
    cupy = require_cupy()
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"device {device.id}: {name}, compute capability {device.compute_capability}, "
          f"CuPy {cupy.__version__}")
    for dtype in (["float32", "float64"] if args.dtype == "both" else [args.dtype]):
        print(f"\n{dtype}, ~{args.gib:g} GiB inputs, median of {REPEATS} after {WARMUP} warm-up runs")
        print(format_table(measure(dtype, args.gib)))


if __name__ == "__main__":
    main()
