"""The inputs of `predict`: image files and arrays, prepared exactly as the model's training images were.

    inputs = read_inputs(["cat.jpg", "batch.npy"], input_shape=(32, 32, 3), resize="resize")
    inputs.images   # (N, 32, 32, 3) uint8, or float32 in [0, 1] when a float array was given
    inputs.names    # ["cat.jpg", "batch.npy[0]", "batch.npy[1]", ...]
    inputs.notes    # ["cat.jpg: converted RGBA -> RGB, resized 480x640 -> 32x32"]

input_shape is the (H, W, C) the model was trained on and resize the mode its image folder was
read with (cnn_gpu.data.images): an image file of another size or mode is converted and resized
the same way, and each thing done is noted. Arrays (.npy, .npz) are taken as already prepared:
they must have the trained H, W and C ((H, W) and (N, H, W) too when C = 1), uint8 or integer
pixels in 0..255, or float pixels in [0, 1]; nothing is resized. .npy files are read without
pickle. Every problem is one line naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..npz import file_kind
from .images import IMAGE_EXTENSIONS, check_resize_mode, decode_image, is_hidden, is_image_file, pillow_available
from .transforms import to_unit_float

ARRAY_EXTENSIONS = (".npy", ".npz")


class Inputs(NamedTuple):
    images: np.ndarray  # (N, H, W, C): uint8, or float32 in [0, 1] when any float array was given
    names: list[str]  # one per image
    notes: list[str]  # one line per file that had to be converted or resized
    errors: list[str]  # with skip_bad: one line per file left out


def _accepted_shapes(shape: tuple[int, int, int]) -> str:
    h, w, c = shape
    shapes = [f"({h}, {w})", f"(N, {h}, {w})"] if c == 1 else []
    shapes += [f"({h}, {w}, {c})", f"(N, {h}, {w}, {c})"]
    return ", ".join(shapes[:-1]) + " or " + shapes[-1]


def as_images(a: np.ndarray, label: str, shape: tuple[int, int, int]) -> np.ndarray:
    """An array of one or more images -> (N, H, W, C), uint8 or float32 in [0, 1], after checking
    its shape against shape = (H, W, C), its dtype, and its range."""
    h, w, c = shape
    if c == 1 and a.ndim == 2 and a.shape == (h, w):
        a = a[None, :, :, None]
    elif c == 1 and a.ndim == 3 and a.shape[1:] == (h, w) and a.shape != (h, w, c):
        a = a[..., None]
    elif a.ndim == 3 and a.shape == (h, w, c):
        a = a[None]
    if a.ndim != 4 or a.shape[1:] != (h, w, c):
        kind = "grayscale" if c == 1 else f"{c}-channel"
        raise ValueError(f"{label}: expected {h}x{w} {kind} images, shape {_accepted_shapes(shape)}; "
                         f"got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{label}: expected numeric pixels, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{label}: integer pixels must be in 0..255, got {a.min()}..{a.max()}")
        return a.astype(np.uint8)
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(f"{label}: float pixels must be in [0, 1]; {int((~finite).sum())} of {a.size} "
                         "are NaN or infinite")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{label}: float pixels must be in [0, 1]; got {a.min()}..{a.max()}")
    return a.astype(np.float32)


def _read_arrays(path: Path, suffix: str) -> dict[str, np.ndarray]:
    """key -> array of a .npy ('' as key) or .npz file; ValueError naming the file when unreadable."""
    kind = file_kind(path)  # else np.load guesses it is a pickle
    if kind != suffix[1:]:
        what = f"a .{kind} file" if kind in ("npy", "npz") else kind
        raise ValueError(f"{path}: not a NumPy {suffix} file ({what})")
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except ValueError as exc:
        if str(exc).startswith(str(path)):  # already names the file
            raise
        raise ValueError(f"{path}: not a readable {suffix[1:]} file ({exc})") from exc
    except Exception as exc:  # the readers' own errors: zipfile's BadZipFile, EOFError, OSError
        message = " ".join(str(exc).split())
        raise ValueError(f"{path}: not a readable {suffix[1:]} file ({type(exc).__name__}: {message})") from exc


def input_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files that paths name, in the order given: a file as it is, a folder as every image
    and array file under it (sub-folders too, hidden ones skipped), in name order. Raises
    FileNotFoundError for a path that is not there, or a folder holding no such file."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if not path.is_dir():
            files.append(path)
            continue
        inside = sorted(p for p in path.rglob("*") if p.is_file() and _readable_kind(p)
                        and not any(is_hidden(part) for part in p.relative_to(path).parts))
        if not inside:
            raise FileNotFoundError(f"{path}: a folder with no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                    f"or arrays ({', '.join(ARRAY_EXTENSIONS)}) in it")
        files += inside
    return files


def _readable_kind(path: Path) -> bool:
    return path.suffix.lower() in ARRAY_EXTENSIONS or is_image_file(path)


def read_input(path: str | os.PathLike, input_shape: Sequence[int] = (28, 28, 1),
               resize: str = "resize") -> Inputs:
    """One file (an image, .npy or .npz) -> Inputs for a model trained on input_shape (H, W, C).

    Raises FileNotFoundError for a missing file and ValueError (one line naming the file) for
    an unsupported type, an undecodable image, or an array of the wrong shape, type or range.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, C) with C 1 or 3, got {tuple(input_shape)}")
    check_resize_mode(resize)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in ARRAY_EXTENSIONS:
        arrays = _read_arrays(path, suffix)
        images, names = [], []
        for key, a in arrays.items():
            label = f"{path}" + (f"[{key}]" if key else "")
            a = as_images(np.asarray(a), label, shape)  # type: ignore[arg-type]
            images.append(a)
            names += [label] if len(arrays) == 1 and len(a) == 1 else [f"{label}[{i}]" for i in range(len(a))]
        if not images:
            raise ValueError(f"{path}: the archive holds no arrays")
        if len({a.dtype for a in images}) > 1:
            images = [to_unit_float(a) for a in images]
        return Inputs(images=np.concatenate(images), names=names, notes=[], errors=[])
    if not is_image_file(path):
        raise ValueError(f"{path}: unsupported file type {suffix!r}; give .npy, .npz or an image "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    if not pillow_available():
        raise ValueError(f"{path}: reading images needs Pillow: pip install 'cnn_gpu[images]'; or give a .npy array")
    h, w, c = shape
    decoded = decode_image(path, c, (h, w), resize)
    notes = [f"{path}: {', '.join(decoded.notes)}"] if decoded.notes else []
    return Inputs(images=decoded.pixels[None], names=[str(path)], notes=notes, errors=[])


def read_inputs(paths: Sequence[str | os.PathLike], input_shape: Sequence[int] = (28, 28, 1),
                resize: str = "resize", skip_bad: bool = False) -> Inputs:
    """Several files (read_input each) -> one Inputs, in the order given.

    All uint8 stays uint8; when any file gives float pixels, all become float32 in [0, 1]
    (uint8 / 255, as normalize would scale them). skip_bad: a file that cannot be read is left
    out and its one-line error goes to .errors (else it is raised).
    """
    parts: list[Inputs] = []
    errors: list[str] = []
    for path in paths:
        try:
            parts.append(read_input(path, input_shape, resize))
        except (ValueError, FileNotFoundError) as exc:
            if not skip_bad:
                raise
            errors.append(str(exc))
    h, w, c = (int(d) for d in input_shape)
    if not parts:
        return Inputs(images=np.zeros((0, h, w, c), np.uint8), names=[], notes=[], errors=errors)
    images = [p.images for p in parts]
    if len({a.dtype for a in images}) > 1:
        images = [to_unit_float(a) for a in images]
    return Inputs(images=np.concatenate(images), names=[n for p in parts for n in p.names],
                  notes=[n for p in parts for n in p.notes], errors=errors)
