"""Tests of cnn_gpu/data/inputs.py, predict's reader: image files prepared exactly as an image
folder's training images were, arrays checked against the trained shape, and one line per bad file
(the messages tests/test_cli_errors.py expects from `cnn-gpu predict`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import input_files, load_image_folder, read_input, read_inputs
from tests.data_fixtures import isolate, random_pixels, save_image, write_class_tree

pytest.importorskip("PIL", reason="Pillow is the [images] extra")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


@pytest.mark.parametrize("resize", ["resize", "crop"])
def test_an_image_is_prepared_as_the_training_folder_was(tmp_path: Path, resize: str) -> None:
    """The pixels predict gives a file equal the pixels its image folder was trained on."""
    root = tmp_path / "photos"
    save_image(root / "a" / "wide.png", random_pixels(30, 50, 4, seed=1), "RGBA")
    save_image(root / "a" / "gray.jpg", random_pixels(40, 20, 0, seed=2))
    save_image(root / "b" / "p.gif", random_pixels(16, 16, 3, seed=3))
    folder = load_image_folder(root, image_size=(12, 10), resize=resize, channels=3, test_fraction=0.0,
                               progress=False)
    trained = dict(zip(folder.paths, folder.images))
    inputs = read_inputs([root / p for p in folder.paths], folder.image_shape, resize=resize)
    assert inputs.images.shape == (3, 12, 10, 3) and inputs.images.dtype == np.uint8
    for path, pixels in zip(folder.paths, inputs.images):
        np.testing.assert_array_equal(pixels, trained[path])
    what = "resized" if resize == "resize" else "centre-cropped and resized"
    assert inputs.notes[folder.paths.index("a/wide.png")] == \
        f"{root / 'a' / 'wide.png'}: converted RGBA -> RGB, {what} 30x50 -> 12x10"
    assert inputs.names == [str(root / p) for p in folder.paths] and inputs.errors == []


def test_colour_for_a_grayscale_model_and_an_image_already_the_right_size(tmp_path: Path) -> None:
    colour = save_image(tmp_path / "shirt.PNG", random_pixels(28, 28, 3, seed=4))
    same = save_image(tmp_path / "digit.png", random_pixels(28, 28, 0, seed=5))
    inputs = read_inputs([colour, same], (28, 28, 1))
    assert inputs.images.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(inputs.images[1, :, :, 0], random_pixels(28, 28, 0, seed=5))
    assert inputs.notes == [f"{colour}: converted RGB -> L"]  # nothing to say about the second


def test_arrays_of_the_trained_shape(tmp_path: Path) -> None:
    one = random_pixels(32, 32, 3, seed=1)
    many = np.stack([random_pixels(32, 32, 3, seed=s) for s in range(4)])
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "many.npy", many)
    np.savez(tmp_path / "both.npz", a=one, b=many)
    inputs = read_inputs([tmp_path / "one.npy", tmp_path / "many.npy", tmp_path / "both.npz"], (32, 32, 3))
    assert inputs.images.shape == (10, 32, 32, 3) and inputs.images.dtype == np.uint8
    np.testing.assert_array_equal(inputs.images[0], one)
    np.testing.assert_array_equal(inputs.images[1:5], many)
    assert inputs.names[:2] == [str(tmp_path / "one.npy"), f"{tmp_path / 'many.npy'}[0]"]
    # As `cnn-gpu predict` names them: an index whenever a file holds more than one image or array.
    assert inputs.names[5:7] == [f"{tmp_path / 'both.npz'}[a][0]", f"{tmp_path / 'both.npz'}[b][0]"]
    gray = random_pixels(28, 28, 0, seed=6)
    for array, n in [(gray, 1), (np.stack([gray] * 3), 3), (np.stack([gray] * 2)[..., None], 2),
                     (gray[..., None], 1)]:
        np.save(tmp_path / "g.npy", array)
        got = read_input(tmp_path / "g.npy", (28, 28, 1)).images
        assert got.shape == (n, 28, 28, 1)
        np.testing.assert_array_equal(got[-1, :, :, 0], gray)


def test_float_arrays_make_everything_float(tmp_path: Path) -> None:
    pixels = random_pixels(28, 28, 0, seed=7)
    save_image(tmp_path / "a.png", pixels)
    np.save(tmp_path / "f.npy", np.full((28, 28), 0.5, np.float32))
    np.save(tmp_path / "i.npy", pixels.astype(np.int64))
    inputs = read_inputs([tmp_path / "a.png", tmp_path / "f.npy", tmp_path / "i.npy"], (28, 28, 1))
    assert inputs.images.dtype == np.float32
    np.testing.assert_allclose(inputs.images[0, :, :, 0], pixels / 255, rtol=1e-6)  # uint8 / 255, as normalize
    assert np.all(inputs.images[1] == 0.5)
    np.testing.assert_array_equal(inputs.images[2], inputs.images[0])


@pytest.mark.parametrize("name, content, input_shape, message", [
    ("notes.png", b"shopping: milk, eggs\n", (28, 28, 1), "not a readable png file"),
    ("garbage.npy", b"not an array at all", (28, 28, 1), "not a NumPy .npy file"),
    ("broken.npz", b"PK\x03\x04 not really a zip", (28, 28, 1), "not a readable npz file"),
    # np.load takes these for pickles; the message says what they are, with no unpickling hint
    ("notes.npz", b"shopping: milk, eggs\n", (28, 28, 1), "not a NumPy .npz file (a file starting with b'shop')"),
    ("array.npz", b"\x93NUMPY\x01\x00", (28, 28, 1), "not a NumPy .npz file (a .npy file)"),
    ("doc.txt", b"hello", (28, 28, 1), "unsupported file type '.txt'"),
])
def test_bad_files_are_one_line_naming_them(tmp_path: Path, name, content, input_shape, message) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_inputs([path], input_shape)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("array, input_shape, message", [
    (np.full((28, 28), np.nan, np.float32), (28, 28, 1), "784 of 784 are NaN"),
    (np.full((28, 28), 2.0), (28, 28, 1), r"float pixels must be in \[0, 1\]; got 2.0..2.0"),
    (np.full((28, 28), 300), (28, 28, 1), "integer pixels must be in 0..255, got 300..300"),
    (np.zeros((28, 28), bool), (28, 28, 1), "expected numeric pixels, got dtype bool"),
    (np.zeros((3, 5), np.uint8), (28, 28, 1), r"expected 28x28 grayscale images, shape \(28, 28\), \(N, 28, 28\), "
                                              r"\(28, 28, 1\) or \(N, 28, 28, 1\); got shape \(3, 5\)"),
    (np.zeros((28, 28), np.uint8), (32, 32, 3), r"expected 32x32 3-channel images, shape \(32, 32, 3\) or "
                                                r"\(N, 32, 32, 3\); got shape \(28, 28\)"),
    (np.zeros((4, 32, 32, 1), np.uint8), (32, 32, 3), r"got shape \(4, 32, 32, 1\)"),
])
def test_arrays_that_do_not_fit(tmp_path: Path, array, input_shape, message) -> None:
    path = tmp_path / "x.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as info:
        read_inputs([path], input_shape)
    assert str(info.value).startswith(str(path))


def test_skip_bad_collects_one_line_per_bad_file(tmp_path: Path) -> None:
    good = save_image(tmp_path / "ok.png", random_pixels(28, 28, 0, seed=1))
    (tmp_path / "bad.png").write_text("nope")
    inputs = read_inputs([tmp_path / "bad.png", good, tmp_path / "missing.png"], (28, 28, 1), skip_bad=True)
    assert inputs.names == [str(good)] and len(inputs.images) == 1
    assert len(inputs.errors) == 2 and "not a readable png file" in inputs.errors[0]
    assert inputs.errors[1] == f"no such file: {tmp_path / 'missing.png'}"
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_inputs([tmp_path / "missing.png"], (28, 28, 1))
    empty = read_inputs([tmp_path / "bad.png"], (8, 8, 3), skip_bad=True)
    assert empty.images.shape == (0, 8, 8, 3) and empty.names == []


def test_bad_arguments(tmp_path: Path) -> None:
    write_class_tree(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
        read_input(tmp_path / "a" / "000.png", (8, 8))
    with pytest.raises(ValueError, match="resize must be one of"):
        read_input(tmp_path / "a" / "000.png", (8, 8, 3), resize="pad")


def test_input_files_expands_folders_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    (tmp_path / "pics" / ".hidden").mkdir()
    for name in ("pics/b.png", "pics/a.npy", "pics/sub/c.JPG", "pics/.hidden/d.png", "pics/notes.txt", "one.npz"):
        (tmp_path / name).write_bytes(b"")
    got = input_files([tmp_path / "one.npz", tmp_path / "pics"])
    assert got == [tmp_path / "one.npz", tmp_path / "pics" / "a.npy", tmp_path / "pics" / "b.png",
                   tmp_path / "pics" / "sub" / "c.JPG"]  # no .txt, nothing hidden
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: a folder with no images"):
        input_files([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*typo"):
        input_files([tmp_path / "typo"])
