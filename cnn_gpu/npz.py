""".npz files of named arrays: written atomically, read without ever unpickling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file beside `path`, fsync, then rename over it: a crash leaves the
    old file or the new one."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


ZIP_MAGIC = b"PK\x03\x04"    # a .npz is a zip archive of .npy files
NPY_MAGIC = b"\x93NUMPY"      # a single array, np.save's format


def file_kind(path: str | os.PathLike) -> str:
    """'npz' or 'npy' from a file's first bytes, else what it is in a few words ('an empty file',
    "a file starting with b'shop'"). np.load takes whatever is neither for a pickle, and its error
    then suggests unpickling it: callers check the kind first and say what the file is instead."""
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head.startswith(ZIP_MAGIC):
        return "npz"
    if head.startswith(NPY_MAGIC):
        return "npy"
    return "an empty file" if not head else f"a file starting with {head[:4]!r}"


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz file, with pickles refused and a clear error for a damaged file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = file_kind(path)
    if kind == "npy":
        raise ValueError(f"{path} is a single .npy array, not a .npz checkpoint of named arrays")
    if kind != "npz":
        raise ValueError(f"{path} is not a .npz checkpoint (a zip archive): {kind} (truncated or corrupted?)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError...
        raise ValueError(f"{path} is not a readable .npz checkpoint (truncated or corrupted?): {exc}") from exc
