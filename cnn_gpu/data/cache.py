"""A decoded image folder on disk: one uint8 .npy read through a memory map, and a JSON index.

Decoding thousands of image files is slow; reading their pixels back from one .npy is not. A
cache is two files in one directory:

    <stem>.json                 the index: what was asked for, every source file's (path, size,
                                modification time), the labels, the splits, and the data file's name
    <stem>-<token>.npy          (N, H, W, C) uint8, written once, then opened with mmap_mode="r"

Writes are ordered so that a process killed at any moment leaves either a whole, valid cache or
one that open_cache rejects (and the caller rebuilds):
1. the .npy is streamed to a temporary file beside it, fsynced, and renamed into place
   (cnn_gpu.atomic.atomic_write); its name carries a fresh random token, so no index, old or
   new, can point at a half-written or different data file;
2. the index is written last, atomically, naming that data file and its shape.
An index that is missing, unparsable, of another format version, asks for other options, lists
other files, or names a data file that is absent or of the wrong size is not used.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write

CACHE_FORMAT = "cnn_gpu image cache"
CACHE_VERSION = 1
# The .npy header is padded to a fixed length, so the real image count can be written over the
# placeholder after the last image without moving the data (a skipped file lowers the count).
NPY_HEADER_BYTES = 128
# A temporary file not written to for this long belongs to a build that was killed.
STALE_TMP_SECONDS = 600


class CacheInvalid(Exception):
    """Why a cache on disk cannot be used (the caller rebuilds it)."""


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A NumPy format 1.0 header for a C-order uint8 array of `shape`, NPY_HEADER_BYTES long."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(int(d) for d in shape),)
    body = text.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def write_npy_stream(path: Path, item_shape: tuple[int, ...], items: Iterable[np.ndarray]) -> int:
    """Write the arrays of `items` (each `item_shape`, uint8) as one (N, *item_shape) .npy, atomically.

    Items are written as they come, so the whole array never sits in memory. Returns N. An
    exception from `items` (e.g. a file that cannot be decoded) leaves nothing at `path`.
    """
    item_shape = tuple(int(d) for d in item_shape)
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        f.write(npy_header((0, *item_shape)))  # placeholder; the count is known only at the end
        for item in items:
            if item.shape != item_shape or item.dtype != np.uint8:
                raise ValueError(f"cache: expected a uint8 image of shape {item_shape}, got {item.dtype} "
                                 f"{item.shape}")
            f.write(np.ascontiguousarray(item).data)
            count += 1
        f.seek(0)
        f.write(npy_header((count, *item_shape)))
        f.seek(0, os.SEEK_END)

    atomic_write(path, write)
    _share(path)
    return count


def _share(path: Path) -> None:
    """Readable by all, like any file written with the usual umask (the temporary file was 0600)."""
    try:
        os.chmod(path, 0o644)
    except OSError:
        pass


def open_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The cached array at path as a read-only memory map, after checking its size and shape."""
    if not path.is_file():
        raise CacheInvalid(f"its data file {path.name} is missing")
    expected = NPY_HEADER_BYTES + int(np.prod(shape, dtype=np.int64))
    found = path.stat().st_size
    if found != expected:
        raise CacheInvalid(f"its data file {path.name} holds {found} bytes, not the {expected} of {shape}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CacheInvalid(f"its data file {path.name} is not a readable .npy ({exc})") from exc
    if array.shape != tuple(shape) or array.dtype != np.uint8:
        raise CacheInvalid(f"its data file {path.name} holds {array.dtype} {array.shape}, not uint8 {tuple(shape)}")
    return array


def index_path(directory: Path, stem: str) -> Path:
    return directory / f"{stem}.json"


def new_data_name(stem: str) -> str:
    """A data file name no index has named before."""
    return f"{stem}-{secrets.token_hex(6)}.npy"


def read_index(directory: Path, stem: str) -> dict:
    """The index of a cache; CacheInvalid when it is missing, unparsable, or of another format."""
    path = index_path(directory, stem)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheInvalid("there is no cache yet") from None
    except (OSError, ValueError) as exc:
        raise CacheInvalid(f"its index {path.name} is unreadable ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
        raise CacheInvalid(f"its index {path.name} is not a version-{CACHE_VERSION} {CACHE_FORMAT}")
    return index


def write_index(directory: Path, stem: str, index: dict) -> Path:
    """Write the index atomically (the data file it names must be in place already)."""
    text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, **index}, separators=(",", ":"))
    path = atomic_write(index_path(directory, stem), lambda f: f.write(text), binary=False)
    _share(path)
    return path


def remove_stale_files(directory: Path, stem: str, keep: str | None) -> None:
    """Delete data files of `stem` other than `keep`, and temporary files of killed builds.

    A data file is deleted only when no index names it any more (a process still reading one has
    it mapped, which Linux and macOS keep readable after the unlink). A temporary file is deleted
    only once nobody has written to it for STALE_TMP_SECONDS, so a build under way keeps its own.
    """
    now = time.time()
    ours = re.compile(re.escape(stem) + r"-[0-9a-f]{12}\.npy(\..+\.tmp)?")
    for path in directory.glob(f"{stem}-*.npy*"):
        if not ours.fullmatch(path.name):
            continue
        try:
            if path.name.endswith(".tmp"):
                if now - path.stat().st_mtime > STALE_TMP_SECONDS:
                    path.unlink()
            elif path.name != keep:
                path.unlink()
        except OSError:  # gone already, or not ours to delete
            pass


def writable_directory(directory: Path) -> bool:
    """True when files can be created in directory (made if absent)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False
