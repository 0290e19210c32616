"""Shared helpers for the tests of cnn_gpu.data: small IDX fixture files, an isolated
environment (no real cache, no network), and a local HTTP server."""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.backend import cupy_available, cupy_unavailable_reason
from cnn_gpu.data.datasets import DATASETS, STANDARD_FILES
from cnn_gpu.data.idx import write_idx

# The real data, where a machine has it (see the module docstrings of the tests that use it).
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_T10K_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/mnist-t10k"

# Use with @pytest.mark.gpu, so that `-m gpu` selects these tests and a CPU-only run skips them.
skip_without_gpu = pytest.mark.skipif(not cupy_available(), reason=f"no GPU: {cupy_unavailable_reason()}")


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (n, 28, 28) uint8 images and (n,) uint8 labels in [0, 10)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


def write_split(directory: Path, n: int, split: str = "train", gz: bool = True,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a split's two IDX files (canonical names, .gz or not) of n samples; return the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n, seed)
    images_name, labels_name = STANDARD_FILES[split]
    if not gz:
        images_name, labels_name = images_name.removesuffix(".gz"), labels_name.removesuffix(".gz")
    write_idx(directory / images_name, images)
    write_idx(directory / labels_name, labels)
    return images, labels


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens, so a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep a test off the real machine (call it from an autouse fixture): HOME and XDG_CACHE_HOME under tmp_path, no
    CNN_GPU_DATA, and every registry mirror pointing where nothing answers (no real network).
    The system directories are left as they are; see no_system_dirs."""
    monkeypatch.delenv("CNN_GPU_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    dead = refused_url()
    for name, spec in list(DATASETS.items()):
        monkeypatch.setitem(DATASETS, name, replace(spec, mirrors=(dead,)))
    return tmp_path


def set_system_dirs(monkeypatch: pytest.MonkeyPatch, name: str, *dirs: Path) -> None:
    """Point a dataset's system directories (e.g. the Debian package's) somewhere else."""
    monkeypatch.setitem(DATASETS, name, replace(DATASETS[name], system_dirs=tuple(str(d) for d in dirs)))


class _Handler(BaseHTTPRequestHandler):
    """Serves server.routes: path -> (body, how many of its bytes to send before closing).

    Content-Length is always the whole body, so a route that sends fewer bytes breaks off
    midway, like a dropped connection. A route with stall=True sends headers and then waits."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        route = self.server.routes.get(self.path)  # type: ignore[attr-defined]
        if route is None:
            self.send_error(404, "not here")
            return
        body, sent, stall = route
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if stall:
            self.server.release.wait(timeout=10)  # type: ignore[attr-defined]
            return
        self.wfile.write(body[:sent])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


class LocalServer:
    """An HTTP server on 127.0.0.1 in a background thread; add files with serve()."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes = {}  # type: ignore[attr-defined]
        self.httpd.release = threading.Event()  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{prefix}"

    def serve(self, path: str, body: bytes, sent: int | None = None, stall: bool = False) -> None:
        """Serve body at /path; with sent, only its first `sent` bytes, then close."""
        self.httpd.routes["/" + path.lstrip("/")] = (body, len(body) if sent is None else sent, stall)

    def clear(self) -> None:
        self.httpd.routes.clear()

    def close(self) -> None:
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def running_server() -> Iterator[LocalServer]:
    """A LocalServer for the with-block, stopped after it."""
    server = LocalServer()
    try:
        yield server
    finally:
        server.close()


# ---- image files, image folders and CIFAR records -------------------------------------------------

def save_image(path: Path, pixels: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Write pixels ((H, W) or (H, W, C) uint8, or another dtype for 16-bit/float modes) as an
    image file whose format Pillow takes from the extension (in any case)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".bmp": "BMP",
           ".gif": "GIF", ".webp": "WEBP"}[path.suffix.lower()]
    if fmt == "WEBP":
        save_kwargs.setdefault("lossless", True)
    image.save(path, format=fmt, **save_kwargs)
    return path


def random_pixels(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """(H, W, C) uint8 noise; (H, W) when c == 0."""
    shape = (h, w) if c == 0 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_class_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (8, 8), channels: int = 3,
                     ext: str = ".png", seed: int = 0) -> dict[str, np.ndarray]:
    """root/<class>/<i>.png for each class: counts[class] random images. Returns {relative path: pixels (H, W, C)}."""
    written = {}
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = random_pixels(*size, channels, seed=seed * 1000 + k * 100 + i)
            rel = f"{name}/{i:03d}{ext}"
            save_image(root / rel, pixels if channels != 1 else pixels[..., 0])
            written[rel] = pixels
    return written


def cifar_pixel(n: int, y: int, x: int, c: int) -> int:
    """The value the CIFAR tests put at image n, row y, column x, channel c: every index moves
    it differently, so a transposed, interleaved or channel-swapped read gives other values."""
    return (n * 31 + c * 97 + y * 7 + x * 3 + (y * x) % 5) % 256


def cifar_record_bytes(first: int, count: int, labels: list[tuple[int, ...]]) -> bytes:
    """count records in the distribution's byte order, written out element by element: the
    label bytes, then channel 0 (red) row by row, then green, then blue."""
    out = bytearray()
    for k in range(count):
        out += bytes(labels[k])
        for c in range(3):
            for y in range(32):
                out += bytes(cifar_pixel(first + k, y, x, c) for x in range(32))
    return bytes(out)


def expected_cifar_images(first: int, count: int) -> np.ndarray:
    """(count, 32, 32, 3) uint8 of cifar_pixel, channels-last."""
    n, y, x, c = np.meshgrid(np.arange(first, first + count), np.arange(32), np.arange(32), np.arange(3),
                             indexing="ij")
    return ((n * 31 + c * 97 + y * 7 + x * 3 + (y * x) % 5) % 256).astype(np.uint8)
