"""Decode one image file into a (H, W, C) uint8 array with the channels and size asked for.

Pillow (the `[images]` extra) reads PNG, JPEG, BMP, GIF, TIFF and WebP. Every image goes through
the same three steps, for training folders and for `predict` alike, so a model sees its inputs
prepared exactly as its training images were:

1. mode -> channels. channels=1: luma, L = (299 R + 587 G + 114 B) / 1000 (ITU-R 601-2, Pillow's
   "L"); channels=3: RGB, a grayscale image repeated in the three channels. Alpha is dropped (the
   colour under a transparent pixel is kept), as torchvision's ImageFolder and Keras do. 16-bit
   images (I;16, I) are scaled 0..65535 -> 0..255 (round(v / 257)), not clipped; float images (F)
   must hold values in [0, 1] and are scaled by 255. CMYK, YCbCr and palette images go through
   Pillow's RGB conversion; a palette with transparency goes through RGBA first (Pillow warns
   otherwise). A multi-frame GIF or TIFF gives its first frame. EXIF orientation is not applied
   (as in torchvision and Keras): a photo is read as stored.
2. size -> (H, W), when a size is asked for and differs, by one of RESIZE_MODES:
   "resize": stretched to H x W, aspect ratio not kept (Keras' image_dataset_from_directory default);
   "crop": the largest centred region of the target's aspect ratio, scaled to H x W (nothing is
   stretched, the edges of the longer side are cut; torchvision's Resize + CenterCrop, Keras'
   crop_to_aspect_ratio). Both resample once, bilinearly with Pillow's antialiasing filter.
3. Pillow's warnings are caught and returned as notes, never printed; a file that cannot be
   decoded raises ImageDecodeError, one line naming the file.

Sizes in messages are H x W (rows x columns), as --image-size takes them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Lower-case; a file's extension is compared lower-cased, so .JPG and .Png count.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESIZE_MODES = ("resize", "crop")

# Pillow modes whose images have one channel; every other mode is read as colour.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(ValueError):
    """A file that cannot be read as an image: the message is one line naming the file."""


def pillow_available() -> bool:
    return importlib.util.find_spec("PIL") is not None


def require_pillow() -> Any:
    """The PIL.Image module, or a one-line error saying how to install it."""
    if not pillow_available():
        raise ImportError("reading images needs Pillow: pip install 'cnn_gpu[images]' (or pip install pillow)")
    from PIL import Image  # noqa: PLC0415 - optional dependency

    return Image


def is_hidden(name: str) -> bool:
    """A file or folder name to skip when reading a folder: '.DS_Store', '.ipynb_checkpoints',
    a Mac archive's '__MACOSX'."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(name: str | os.PathLike) -> bool:
    """True for a name with one of IMAGE_EXTENSIONS, in any case (photo.JPG)."""
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def channels_of_mode(mode: str) -> int:
    """1 for Pillow's grayscale modes (GRAY_MODES), else 3."""
    return 1 if mode in GRAY_MODES else 3


def parse_image_size(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'32x48', '32', (32, 48) or None -> (H, W) or None. A single number means a square."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = text.lower().replace("*", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"image size must be HxW (e.g. 32x32) or one number, got {text!r}") from None
    else:
        values = [int(v) for v in text]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"image size must be two positive numbers H and W, got {text!r}")
    return values[0], values[1]


def check_resize_mode(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize


def hw(size: tuple[int, int]) -> str:
    """(H, W) -> 'HxW'."""
    return f"{size[0]}x{size[1]}"


class ImageHeader(NamedTuple):
    """What an image file says about itself before its pixels are decoded."""

    mode: str  # Pillow's mode, e.g. "RGB", "L", "P", "I;16"
    size: tuple[int, int]  # (H, W)


class DecodedImage(NamedTuple):
    pixels: np.ndarray  # (H, W, C) uint8
    notes: list[str]  # what had to be done, e.g. "converted RGBA -> RGB", "resized 480x640 -> 32x32"


def _describe_failure(path: Path, exc: BaseException) -> str:
    kind = path.suffix.lower().lstrip(".") or "image"
    message = " ".join(str(exc).split()) or "no details"  # one line, whatever the decoder said
    return f"{path}: not a readable {kind} file ({type(exc).__name__}: {message})"


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Mode and (H, W) of an image, from its header (the pixels are not decoded).

    Raises ImageDecodeError naming the file when Pillow cannot identify it.
    """
    Image = require_pillow()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning; decode_image reports them
        try:
            with Image.open(path) as im:
                w, h = im.size
                return ImageHeader(mode=im.mode, size=(h, w))
        except Exception as exc:  # Pillow raises many types for bad files: OSError, SyntaxError, ValueError...
            raise ImageDecodeError(_describe_failure(path, exc)) from exc


def _to_channels(im: Any, channels: int, notes: list[str]) -> Any:
    """A Pillow image of any mode -> mode "L" (channels=1) or "RGB" (channels=3)."""
    Image = require_pillow()
    target = "L" if channels == 1 else "RGB"
    mode = im.mode
    if mode == target:
        return im
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        a = np.asarray(im)
        if mode == "F":
            finite = np.isfinite(a)
            if not finite.all() or a.min() < 0 or a.max() > 1:
                bad = f"{int((~finite).sum())} NaN or infinite" if not finite.all() else f"{a.min()}..{a.max()}"
                raise ValueError(f"float pixels (mode F) must be in [0, 1], got {bad}")
            gray = np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
        else:
            a = a.astype(np.int64)
            if a.min() < 0 or a.max() > 65535:
                raise ValueError(f"mode {mode} pixels must be in 0..65535, got {a.min()}..{a.max()}")
            gray = ((a + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
        notes.append(f"converted {mode} -> 8-bit" + ("" if channels == 1 else " RGB"))
        im = Image.fromarray(gray, mode="L")
        return im if channels == 1 else im.convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns when a palette with transparency goes straight to RGB
    if channels == 1 and mode not in GRAY_MODES:
        im = im.convert("RGB")  # CMYK, YCbCr, palette...: to RGB first, then luma
    notes.append(f"converted {mode} -> {target}")
    return im.convert(target)


def _fit(im: Any, size: tuple[int, int], resize: str, notes: list[str]) -> Any:
    """Resize a Pillow image to (H, W) by the resize mode; unchanged when it already has that size."""
    Image = require_pillow()
    h, w = size
    src_w, src_h = im.size
    if (src_h, src_w) == (h, w):
        return im
    box = None
    if resize == "crop":  # the centred region of the target's aspect ratio: (left, top, right, bottom)
        scale = min(src_w / w, src_h / h)
        crop_w, crop_h = w * scale, h * scale
        left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    notes.append(f"{'resized' if resize == 'resize' else 'centre-cropped and resized'} "
                 f"{hw((src_h, src_w))} -> {hw(size)}")
    return im.resize((w, h), Image.Resampling.BILINEAR, box=box)


def warning_note(w: warnings.WarningMessage) -> str:
    """A caught Pillow warning as a one-line note."""
    return f"Pillow: {w.category.__name__}: {' '.join(str(w.message).split())}"


def decode_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None = None,
                 resize: str = "resize", catch_warnings: bool = True) -> DecodedImage:
    """Decode an image file -> DecodedImage(pixels (H, W, channels) uint8, notes).

    channels: 1 or 3. size: (H, W) to resize to by `resize` (RESIZE_MODES), or None to keep
    the stored size. Raises ImageDecodeError (a ValueError), one line naming the file, when the
    file cannot be decoded, is truncated, or holds pixels outside its mode's range.
    catch_warnings: turn Pillow's warnings into notes. warnings.catch_warnings is not thread-safe,
    so threads decoding together pass False and catch them once around all of them.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    check_resize_mode(resize)
    Image = require_pillow()
    path = Path(path)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) if catch_warnings else contextlib.nullcontext([]) as caught:
        if catch_warnings:
            warnings.simplefilter("always")
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                out = _fit(_to_channels(im, channels, notes), size, resize, notes) if size else \
                    _to_channels(im, channels, notes)
                pixels = np.asarray(out, dtype=np.uint8)
        except Exception as exc:  # Pillow raises many types for bad files: OSError, SyntaxError, ValueError...
            raise ImageDecodeError(_describe_failure(path, exc)) from exc
    if frames > 1:
        notes.append(f"first of {frames} frames")
    notes += [warning_note(w) for w in caught]
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return DecodedImage(pixels=pixels, notes=notes)
