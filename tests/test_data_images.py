"""Tests of cnn_gpu/data/images.py: every Pillow mode to 1 or 3 channels, each format, the two
resize modes, and bad files as one-line errors with no Pillow warning escaping."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data.images import (
    ImageDecodeError,
    channels_of_mode,
    decode_image,
    is_image_file,
    parse_image_size,
    read_header,
)
from tests.data_fixtures import random_pixels, save_image

Image = pytest.importorskip("PIL.Image", reason="Pillow is the [images] extra")


def decode_quietly(*args, **kwargs):
    """decode_image, failing the test if any warning reaches the caller."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decode_image(*args, **kwargs)
    assert not caught, [str(w.message) for w in caught]
    return result


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma in float64, (H, W, 3) -> (H, W)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


RGB = random_pixels(6, 5, 3, seed=1)  # H 6, W 5: a swapped H and W changes the shape


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".webp", ".PNG", ".Tif"])
def test_lossless_formats_give_the_stored_pixels(tmp_path: Path, ext: str) -> None:
    path = save_image(tmp_path / f"a{ext}", RGB)
    out = decode_quietly(path, 3)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (6, 5, 3)
    np.testing.assert_array_equal(out.pixels, RGB)
    assert out.notes == []


def test_jpeg_is_close_to_the_stored_pixels(tmp_path: Path) -> None:
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 16, 3)).copy()
    for ext in (".jpg", ".JPG", ".jpeg"):
        out = decode_quietly(save_image(tmp_path / f"a{ext}", smooth, quality=95), 3)
        assert out.pixels.shape == (16, 16, 3)
        assert np.abs(out.pixels.astype(int) - smooth).max() <= 8  # lossy: close, not equal


def test_gif_palette_is_looked_up(tmp_path: Path) -> None:
    index = np.arange(30, dtype=np.uint8).reshape(6, 5) % 7
    palette = np.random.default_rng(3).integers(0, 256, size=(256, 3), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    im.save(tmp_path / "a.gif")
    out = decode_quietly(tmp_path / "a.gif", 3)
    np.testing.assert_array_equal(out.pixels, palette[index])
    assert out.notes == ["converted P -> RGB"]


def test_gray_to_rgb_repeats_the_channel(tmp_path: Path) -> None:
    gray = RGB[..., 0]
    out = decode_quietly(save_image(tmp_path / "g.png", gray), 3)
    np.testing.assert_array_equal(out.pixels, np.repeat(gray[..., None], 3, axis=2))
    assert out.notes == ["converted L -> RGB"]
    same = decode_quietly(tmp_path / "g.png", 1)
    np.testing.assert_array_equal(same.pixels[..., 0], gray)
    assert same.notes == []


def test_rgb_to_gray_is_luma(tmp_path: Path) -> None:
    out = decode_quietly(save_image(tmp_path / "c.png", RGB), 1)
    assert out.pixels.shape == (6, 5, 1) and out.notes == ["converted RGB -> L"]
    # Pillow's fixed-point luma against the float formula: at most one step apart.
    assert np.abs(out.pixels[..., 0].astype(float) - luma(RGB.astype(float))).max() <= 1.0


def test_alpha_is_dropped(tmp_path: Path) -> None:
    alpha = random_pixels(6, 5, 0, seed=9)
    rgba = save_image(tmp_path / "a.png", np.dstack([RGB, alpha]), "RGBA")
    out = decode_quietly(rgba, 3)
    np.testing.assert_array_equal(out.pixels, RGB)  # the colour under each pixel, whatever its alpha
    assert out.notes == ["converted RGBA -> RGB"]
    la = save_image(tmp_path / "la.png", np.dstack([RGB[..., 0], alpha]), "LA")
    np.testing.assert_array_equal(decode_quietly(la, 1).pixels[..., 0], RGB[..., 0])


def test_palette_with_transparency_goes_through_rgba_without_a_warning(tmp_path: Path) -> None:
    palette = np.random.default_rng(4).integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = (np.arange(30, dtype=np.uint8).reshape(6, 5) * 3) % 11
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    im.info["transparency"] = bytes([0, 128] + [255] * 254)  # per-entry alpha: the form Pillow warns about
    im.save(tmp_path / "t.png", transparency=bytes([0, 128] + [255] * 254))
    with Image.open(tmp_path / "t.png") as check:
        assert check.mode == "P" and isinstance(check.info.get("transparency"), bytes)
    out = decode_quietly(tmp_path / "t.png", 3)
    np.testing.assert_array_equal(out.pixels, palette[index])
    assert out.notes == ["converted P -> RGB"]  # no "Pillow: UserWarning: Palette images with Transparency ..."
    gray = decode_quietly(tmp_path / "t.png", 1)
    assert np.abs(gray.pixels[..., 0] - luma(palette[index].astype(float))).max() <= 1.0


def test_bilevel_is_0_or_255(tmp_path: Path) -> None:
    bits = RGB[..., 0] > 127
    out = decode_quietly(save_image(tmp_path / "b.png", bits), 1)
    np.testing.assert_array_equal(out.pixels[..., 0], np.where(bits, 255, 0))
    assert out.notes == ["converted 1 -> L"]


@pytest.mark.parametrize("name, dtype", [("a.png", np.uint16), ("a.tif", np.int32)])
def test_16_bit_is_scaled_not_clipped(tmp_path: Path, name: str, dtype) -> None:
    """I;16 (16-bit PNG) and I (32-bit TIFF) hold 0..65535: v -> round(v / 257)."""
    values = np.array([[0, 1, 128, 129, 257], [32767, 32768, 65278, 65407, 65535]], dtype=np.int64)
    path = save_image(tmp_path / name, values.astype(dtype))
    with Image.open(path) as im:
        assert im.mode == ("I;16" if dtype == np.uint16 else "I")
    out = decode_quietly(path, 1)
    np.testing.assert_array_equal(out.pixels[..., 0], np.round(values / 257).astype(np.uint8))
    assert out.notes[0].startswith("converted I")
    np.testing.assert_array_equal(decode_quietly(path, 3).pixels, np.repeat(out.pixels, 3, axis=2))


def test_float_images_hold_0_to_1(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    out = decode_quietly(save_image(tmp_path / "f.tif", values), 1)
    np.testing.assert_array_equal(out.pixels[..., 0], np.round(values.astype(np.float64) * 255).astype(np.uint8))
    save_image(tmp_path / "big.tif", values * 300)
    with pytest.raises(ImageDecodeError, match=r"big.tif: .*must be in \[0, 1\]"):
        decode_image(tmp_path / "big.tif", 1)
    save_image(tmp_path / "nan.tif", np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ImageDecodeError, match="4 NaN or infinite"):
        decode_image(tmp_path / "nan.tif", 3)


def test_cmyk_converts_to_rgb(tmp_path: Path) -> None:
    """Pillow's RGB -> CMYK is C = 255 - R, ..., K = 0, which its CMYK -> RGB undoes exactly."""
    path = tmp_path / "c.tif"
    Image.fromarray(RGB).convert("CMYK").save(path)
    out = decode_quietly(path, 3)
    np.testing.assert_array_equal(out.pixels, RGB)
    assert out.notes == ["converted CMYK -> RGB"]
    assert decode_quietly(path, 1).notes == ["converted CMYK -> L"]


def test_first_frame_of_an_animation(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = decode_quietly(tmp_path / "anim.gif", 1)
    assert np.all(out.pixels == 10) and "first of 2 frames" in out.notes


def test_resize_stretches_and_keeps_orientation(tmp_path: Path) -> None:
    """'resize' to (H, W): rows stay rows and columns stay columns (a swapped H and W fails)."""
    h, w = 20, 40
    ramp = np.zeros((h, w), np.uint8)
    ramp[:, w // 2:] = 200  # right half bright
    ramp[h // 2:, :] += 50  # bottom half brighter
    out = decode_quietly(save_image(tmp_path / "r.png", ramp), 1, size=(10, 5))
    assert out.pixels.shape == (10, 5, 1)
    p = out.pixels[..., 0].astype(int)
    assert p[0, 0] < p[0, -1] and p[0, 0] < p[-1, 0]  # right and bottom are brighter
    assert out.notes == ["resized 20x40 -> 10x5"]
    flat = decode_quietly(save_image(tmp_path / "flat.png", np.full((13, 7, 3), 77, np.uint8)), 3, size=(32, 32))
    assert np.all(flat.pixels == 77)  # a constant image stays constant: the filter's weights sum to one


def test_crop_takes_the_centre_of_the_target_shape(tmp_path: Path) -> None:
    """A 40x20 (tall) image cropped to 20x20 is its rows 10..29 unscaled: exactly those pixels."""
    tall = random_pixels(40, 20, 3, seed=5)
    path = save_image(tmp_path / "tall.png", tall)
    out = decode_quietly(path, 3, size=(20, 20), resize="crop")
    np.testing.assert_array_equal(out.pixels, tall[10:30])
    assert out.notes == ["centre-cropped and resized 40x20 -> 20x20"]
    stretched = decode_quietly(path, 3, size=(20, 20), resize="resize").pixels
    assert not np.array_equal(stretched, out.pixels)
    wide = decode_quietly(save_image(tmp_path / "wide.png", tall.transpose(1, 0, 2)), 3, size=(20, 20),
                          resize="crop")
    np.testing.assert_array_equal(wide.pixels, tall.transpose(1, 0, 2)[:, 10:30])


def test_same_size_is_not_resampled(tmp_path: Path) -> None:
    out = decode_quietly(save_image(tmp_path / "a.png", RGB), 3, size=(6, 5), resize="crop")
    np.testing.assert_array_equal(out.pixels, RGB)
    assert out.notes == []


@pytest.mark.parametrize("content, needle", [
    (b"shopping: milk, eggs\n", "UnidentifiedImageError"),
    (b"", "UnidentifiedImageError"),
])
def test_a_file_that_is_not_an_image(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path, 3)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: not a readable png file") and needle in message
    assert "\n" not in message
    with pytest.raises(ImageDecodeError, match="not a readable png file"):
        read_header(path)


def test_a_truncated_image(tmp_path: Path) -> None:
    path = save_image(tmp_path / "cut.png", random_pixels(64, 64, 3, seed=2))
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageDecodeError, match="cut.png: not a readable png file") as info:
        decode_image(path, 3)
    assert "\n" not in str(info.value)


def test_decompression_bomb_warning_becomes_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / "big.png", random_pixels(12, 12, 3, seed=0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the limit, under twice it
    out = decode_quietly(path, 3)
    assert any("DecompressionBombWarning" in n for n in out.notes)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # over twice the limit: Pillow refuses
    with pytest.raises(ImageDecodeError, match="DecompressionBombError"):
        decode_quietly(path, 3)


def test_header_and_helpers(tmp_path: Path) -> None:
    header = read_header(save_image(tmp_path / "a.png", RGB))
    assert header.mode == "RGB" and header.size == (6, 5)
    assert [channels_of_mode(m) for m in ("L", "I;16", "F", "1", "LA", "RGB", "RGBA", "P", "CMYK")] == \
        [1, 1, 1, 1, 1, 3, 3, 3, 3]
    assert is_image_file("x.JPG") and is_image_file("x.WebP") and not is_image_file("x.txt")
    assert parse_image_size("32x48") == (32, 48) and parse_image_size("28") == (28, 28)
    assert parse_image_size((8, 9)) == (8, 9) and parse_image_size(None) is None
    for bad in ("32x", "0x4", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="image size"):
            parse_image_size(bad)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(tmp_path / "a.png", 2)
    with pytest.raises(ValueError, match="resize must be one of"):
        decode_image(tmp_path / "a.png", 3, size=(4, 4), resize="squash")
