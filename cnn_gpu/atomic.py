"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call write(f) on a temporary file beside `path`, flush and fsync it, rename it over `path`,
    then fsync the directory so that the rename itself survives a power cut. Returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file asked for, not the temporary one beside it
        error = type(exc)(f"cannot write {path}: {exc.strerror or exc}")  # FileNotFoundError, ...
        error.errno = exc.errno  # kept for callers that test it; str(error) stays one plain line
        raise error from exc
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory; the file itself is safe
        pass
    return path
