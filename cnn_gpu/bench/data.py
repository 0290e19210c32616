"""Image-folder decoding throughput, and an epoch of batches from the memory-mapped cache vs memory.

    python -m cnn_gpu.bench.data [--images 2000] [--epoch-images 50000] [--batch-size 64] [--workers 1,8]
                                 [--json out.json]

1. Decoding: a generated folder of `--images` images per kind (32x32 RGB and 28x28 grayscale, each
   as PNG and as JPEG; smooth content with some noise, like photos rather than pure noise) is read
   by load_image_folder into a fresh cache, channels and size decided from the headers (the CLI's
   default), with each of the --workers decoding thread counts. "cold" means no cache yet; the
   files themselves are in the OS page cache, having just been written. Then the same folder
   again, which only checks the index against the files.
2. Epochs: `--epoch-images` (N, 32, 32, 3) uint8 images, written as a cache file and read as a
   memory map, against the same array in memory: one epoch of BatchIterator batches (gather, the
   CIFAR augmentation of flips and 4-pixel crops, normalize to float32), the median of --repeats.
   The memory-mapped file is in the page cache, so this is the cost of gathering from a map, not
   of a disk.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cnn_gpu.data import BatchIterator, augmentation_for, compute_norm_stats, load_image_folder, normalize
from cnn_gpu.data import cache as cache_files
from cnn_gpu.data.folder import default_workers

KINDS = (("32x32 RGB PNG", (32, 32), 3, ".png"), ("32x32 RGB JPEG", (32, 32), 3, ".jpg"),
         ("28x28 gray PNG", (28, 28), 1, ".png"), ("28x28 gray JPEG", (28, 28), 1, ".jpg"))


def smooth_images(n: int, size: tuple[int, int], channels: int, seed: int) -> np.ndarray:
    """(n, H, W, C) uint8: 4x4 random colours stretched bilinearly over the image, plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.uniform(0, 255, size=(n, 4, 4, channels))
    ys, xs = np.linspace(0, 3, h), np.linspace(0, 3, w)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 2)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = coarse[:, y0][:, :, x0] * (1 - fx) + coarse[:, y0][:, :, x0 + 1] * fx
    bottom = coarse[:, y0 + 1][:, :, x0] * (1 - fx) + coarse[:, y0 + 1][:, :, x0 + 1] * fx
    images = top * (1 - fy) + bottom * fy + rng.normal(0, 8, size=(n, h, w, channels))
    return np.ascontiguousarray(np.clip(np.round(images), 0, 255).astype(np.uint8))  # as a dataset is stored


def write_folder(root: Path, n: int, size: tuple[int, int], channels: int, ext: str) -> None:
    """root/<class k>/<i><ext> for n images over 10 classes."""
    from PIL import Image

    images = smooth_images(n, size, channels, seed=n)
    for i, pixels in enumerate(images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"{i:06d}{ext}", quality=90)


def bench_decoding(work: Path, n: int, workers: list[int]) -> list[dict[str, Any]]:
    """Per kind of folder and per thread count: a cold read into a new cache, then a reuse."""
    rows = []
    for name, size, channels, ext in KINDS:
        root = work / name.replace(" ", "-")
        write_folder(root, n, size, channels, ext)
        for w in workers:
            cache_dir = work / f"cache-{w}"
            started = time.perf_counter()
            folder = load_image_folder(root, cache_dir=cache_dir, progress=False, workers=w)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            again = load_image_folder(root, cache_dir=cache_dir, progress=False, workers=w)
            warm = time.perf_counter() - started
            assert again.cache_reused and again.image_shape == (*size, channels)
            rows.append({"kind": name, "workers": w, "images": len(folder.labels), "cold_s": cold,
                         "cold_images_per_s": n / cold, "reuse_s": warm})
    return rows


def epoch_seconds(images: Any, labels: np.ndarray, batch_size: int, repeats: int) -> list[float]:
    stats = compute_norm_stats(images)
    loader = BatchIterator(images, labels, batch_size, seed=0, augment=augmentation_for("cifar10"),
                           transform=lambda x: normalize(x, stats))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _x, _y in loader:
            pass
        times.append(time.perf_counter() - started)
    return times


def bench_epochs(work: Path, n: int, batch_size: int, repeats: int) -> dict[str, Any]:
    data = smooth_images(n, (32, 32), 3, seed=1)
    path = work / "epoch-0123456789ab.npy"
    cache_files.write_npy_stream(path, data.shape[1:], iter(data))
    mapped = cache_files.open_npy(path, data.shape)
    labels = np.arange(n) % 10
    epoch_seconds(mapped, labels, batch_size, 1)  # warm both: the page cache, allocator, first-call costs
    epoch_seconds(data, labels, batch_size, 1)
    mm, ram = [], []
    for _ in range(repeats):  # alternate, so a slow moment of the machine hits both alike
        mm += epoch_seconds(mapped, labels, batch_size, 1)
        ram += epoch_seconds(data, labels, batch_size, 1)
    mm_s, ram_s = statistics.median(mm), statistics.median(ram)
    return {"images": n, "batch_size": batch_size, "memmap_s": mm_s, "memory_s": ram_s,
            "memmap_over_memory": mm_s / ram_s, "memmap_all_s": mm, "memory_all_s": ram}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn_gpu.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per kind in the decoding folders")
    parser.add_argument("--epoch-images", type=int, default=50000, help="images in the epoch benchmark")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", default=f"1,{default_workers()}",
                        help="decoding thread counts to compare, comma-separated (default: 1 and default_workers())")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    workers = sorted({int(w) for w in args.workers.split(",")})
    with tempfile.TemporaryDirectory(prefix="cnn_gpu-bench-data-") as tmp:
        work = Path(tmp)
        decoding = bench_decoding(work, args.images, workers)
        header = f"{'folder':<16} {'threads':>7} {'images':>6}  {'cold (decode + cache)':>22}"
        print(header + f"  {'again (index check)':>20}")
        for row in decoding:
            print(f"{row['kind']:<16} {row['workers']:>7} {row['images']:>6}  {row['cold_s']:>8.2f} s "
                  f"{row['cold_images_per_s']:>7.0f} img/s  {row['reuse_s'] * 1000:>17.1f} ms")
        epochs = bench_epochs(work, args.epoch_images, args.batch_size, args.repeats)
        print(f"\none epoch of {epochs['images']} 32x32x3 images, batch {epochs['batch_size']} (gather, flips + "
              f"4-px crops, normalize), median of {args.repeats}:")
        print(f"  from the memory-mapped cache  {epochs['memmap_s']:.3f} s")
        print(f"  from memory                   {epochs['memory_s']:.3f} s")
        print(f"  memory map / memory           {epochs['memmap_over_memory']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"decoding": decoding, "epochs": epochs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
