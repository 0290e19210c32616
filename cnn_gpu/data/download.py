"""Download one file atomically, checked against an md5, with an optional progress bar.

The file is streamed to a temporary file beside its destination and checked, and only then
renamed into place (cnn_gpu.atomic.atomic_write). Whatever goes wrong on the way - a dropped
connection, a timeout, a bad checksum, Ctrl-C - the temporary file is removed, so the
destination either holds a verified file or nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..atomic import atomic_write

CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT_S = 30.0
USER_AGENT = "cnn_gpu-data/0.1 (python urllib)"


class DownloadError(RuntimeError):
    """A download failed: unreachable, cut short, or not the expected content."""


def md5_of_file(path: str | os.PathLike) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _NoProgress:
    """progress=False: nothing at all."""

    def __init__(self, total: int | None, url: str):
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainProgress(_NoProgress):
    """Fallback when tqdm is absent: one line when a download starts, nothing per chunk."""

    def __init__(self, total: int | None, url: str):
        size = f" ({total / 1e6:.1f} MB)" if total else ""
        print(f"Downloading {url}{size}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress_bar(total: int | None, url: str, name: str, enabled: bool) -> Iterator:
    """A tqdm bar in bytes when tqdm is importable (an optional extra), else the quiet fallback."""
    if not enabled:
        bar = _NoProgress(total, url)
    else:
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional dependency
            bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                       leave=False, file=sys.stderr)
        except ImportError:
            bar = _PlainProgress(total, url)
    try:
        yield bar
    finally:
        bar.close()


def _stream_to(url: str, out, timeout: float, progress: bool, name: str) -> str:
    """Copy the body at url into the open file out; return its md5. Checks the Content-Length."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.md5()
    received = 0
    # timeout bounds the connect and every read: a server that stalls cannot hang us.
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with _progress_bar(total, url, name, progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the server closes early.
    if total is not None and received != total:
        raise DownloadError(f"{url}: connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S, progress: bool = True) -> Path:
    """Download url to dest atomically; with md5 given, keep the file only if its md5 matches.

    Creates dest's directory. Raises DownloadError (the temporary file removed) when the server
    cannot be reached, answers with an error, stalls past timeout seconds, closes early, or
    sends content whose md5 differs.
    """
    def write_checked(out) -> None:  # runs on the temporary file; raising leaves dest untouched
        try:
            found_md5 = _stream_to(url, out, timeout, progress, Path(dest).name)
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            raise DownloadError(f"{url}: {exc}") from exc
        if md5 is not None and found_md5 != md5.lower():
            raise DownloadError(f"{url}: md5 mismatch: expected {md5}, got {found_md5}")

    return atomic_write(dest, write_checked)
