"""CIFAR-10 and CIFAR-100 from their binary distributions: fixed-size records, never a pickle.

    cifar-10-binary.tar.gz   -> cifar-10-batches-bin/data_batch_1.bin ... data_batch_5.bin, test_batch.bin
    cifar-100-binary.tar.gz  -> cifar-100-binary/train.bin, test.bin

Each file is a run of records, one per image, with nothing before, between or after them:

    CIFAR-10:   1 label byte                          + 3072 pixel bytes   (3073 bytes)
    CIFAR-100:  1 coarse label byte, 1 fine label byte + 3072 pixel bytes   (3074 bytes)

The 3072 pixel bytes are planar: the 1024 red values, then the 1024 green, then the 1024 blue,
each a 32x32 plane in row-major order (the first 32 bytes are the top row). So one record's
pixels are a (C, H, W) = (3, 32, 32) array, transposed here to channels-last (32, 32, 3).

The Python versions of the datasets (cifar-10-python.tar.gz) are pickles, which can run code when
loaded; they are never read. load_dataset("cifar10", ...) takes the binary archive itself (.tar.gz,
or a .tar), its extracted folder, or a directory holding either (see cnn_gpu.data.datasets for
the places searched and the download).
"""
from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from .datasets import Dataset, check_split, fetch_or_explain, get_spec, search_locations
from .download import DEFAULT_TIMEOUT_S

HEIGHT = WIDTH = 32
CHANNELS = 3
RECORD_PIXELS = CHANNELS * HEIGHT * WIDTH
LABEL_MODES = ("fine", "coarse")


class CifarSource(NamedTuple):
    """Where a split's record files are: an archive, or a folder holding them."""

    path: Path
    kind: str  # "archive" or "folder"


def parse_records(data: bytes, label_bytes: int, source: str, title: str = "CIFAR") -> tuple[np.ndarray, np.ndarray]:
    """One record file's bytes -> images (N, 32, 32, 3) uint8 and labels (N, label_bytes) int64.

    Raises ValueError naming `source` when the bytes are not a whole, non-zero number of records.
    """
    record = label_bytes + RECORD_PIXELS
    if len(data) == 0 or len(data) % record:
        whole = len(data) // record
        raise ValueError(f"{source}: {len(data)} bytes is not a whole number of {record}-byte {title} records "
                         f"({label_bytes} label byte{'s' if label_bytes > 1 else ''} + {RECORD_PIXELS} pixel "
                         f"bytes; {whole} whole records and {len(data) - whole * record} bytes over): the file is "
                         f"truncated or is not {title}'s binary version")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)  # (N, record)
    labels = rows[:, :label_bytes].astype(np.int64)
    planes = rows[:, label_bytes:].reshape(-1, CHANNELS, HEIGHT, WIDTH)  # (N, C, H, W): R plane, G, B
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))  # -> (N, H, W, C)
    return images, labels


def _holds_split(folder: Path, names: Sequence[str]) -> bool:
    return folder.is_dir() and all((folder / n).is_file() for n in names)


def find_cifar(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> CifarSource | None:
    """The first place, in search_locations order, holding a split's files, or None.

    In each place: the place itself when it is a file (data_dir given as the archive), its
    extracted folder (<place>/cifar-10-batches-bin/), the place itself holding the record
    files (data_dir given as the extracted folder), then the archive (<place>/cifar-10-binary.tar.gz,
    or the same name without .gz)."""
    spec = get_spec(name)
    names = spec.files[check_split(split)]
    for place, _ in search_locations(spec.name, data_dir):
        if place.is_file():
            return CifarSource(place, "archive")
        for folder in (place / spec.folder, place):
            if _holds_split(folder, names):
                return CifarSource(folder, "folder")
        for archive in (place / spec.archive, place / spec.archive.removesuffix(".gz")):
            if archive.is_file():
                return CifarSource(archive, "archive")
    return None


def read_archive_members(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the members of a .tar/.tar.gz whose file names (the last path part) are in names.

    Reads the archive front to back once (a gzip stream cannot seek back cheaply). Raises
    ValueError naming the archive when it is truncated, corrupt, or lacks one of the names."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = PurePosixPath(member.name).name
                if member.isfile() and base in wanted and base not in found:
                    handle = tar.extractfile(member)
                    found[base] = handle.read() if handle is not None else b""
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        message = " ".join(str(exc).split()) or "no details"
        raise ValueError(f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {message})") from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{archive}: the archive holds no {', '.join(missing)}")
    return found


def read_split_files(name: str, split: str, source: CifarSource) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (N, 32, 32, 3) uint8 and raw labels (N, label_bytes) int64, files in order."""
    spec = get_spec(name)
    names = spec.files[split]
    if source.kind == "archive":
        contents = read_archive_members(source.path, names)
        parts = [parse_records(contents[n], spec.label_bytes, f"{source.path}:{n}", spec.title) for n in names]
    else:
        parts = [parse_records((source.path / n).read_bytes(), spec.label_bytes, str(source.path / n), spec.title)
                 for n in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def load_cifar(name: str, split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True,
               progress: bool = True, mirrors: Sequence[str] | None = None, md5: Mapping[str, str] | None = None,
               timeout: float = DEFAULT_TIMEOUT_S, label_mode: str = "fine") -> Dataset:
    """One split of CIFAR-10 or CIFAR-100 (load_dataset calls this; the arguments are its own).

    Returns images (N, 32, 32, 3) uint8 RGB and labels (N,) int64. label_mode (CIFAR-100 only):
    'fine', the 100 classes (default), or 'coarse', the 20 superclasses; class_names follow.
    Raises ValueError naming the file for a truncated or foreign file or a label out of range.
    """
    spec = get_spec(name)
    check_split(split)
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if label_mode == "coarse" and not spec.coarse_class_names:
        raise ValueError(f"{spec.title} has no coarse labels (only CIFAR-100 does)")
    source = find_cifar(spec.name, split, data_dir)
    if source is None:
        cache = fetch_or_explain(spec.name, split, data_dir, download, progress, mirrors, md5, timeout)
        source = CifarSource(cache / spec.archive, "archive")
    images, raw_labels = read_split_files(spec.name, split, source)
    # CIFAR-100's two label bytes are (coarse, fine); CIFAR-10's one byte is its label.
    columns = {"coarse": (0, spec.coarse_class_names), "fine": (spec.label_bytes - 1, spec.class_names)}
    for column, names in (columns["coarse"], columns["fine"]) if spec.coarse_class_names else (columns["fine"],):
        if raw_labels[:, column].max() >= len(names):
            raise ValueError(f"{source.path}: {spec.title} labels in byte {column} of each record must be in "
                             f"[0, {len(names)}), found {int(raw_labels[:, column].max())}")
    column, class_names = columns[label_mode]
    options = {"label_mode": label_mode} if spec.coarse_class_names else {}
    return Dataset(images=images, labels=np.ascontiguousarray(raw_labels[:, column]), class_names=class_names,
                   name=spec.name, split=split, source=source.path, options=options)
