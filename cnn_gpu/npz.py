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


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz file, with pickles refused and a clear error for a damaged file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError...
        raise ValueError(f"{path} is not a readable .npz checkpoint (truncated or corrupted?): {exc}") from exc
