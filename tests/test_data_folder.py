"""Tests of cnn_gpu/data/folder.py: layouts, hidden and stray entries, classes, mixed modes and
sizes, unreadable files, the seeded test split, and Fashion-MNIST exported to PNG files read back
through the folder path equal to its IDX files.

Every test runs isolated (HOME and XDG_CACHE_HOME under tmp_path). The cache itself is tested in
test_data_cache.py; here cache=False where the cache does not matter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import DatasetNotFoundError, ImageDecodeError, load_dataset, load_image_folder, scan_image_folder
from cnn_gpu.data.folder import cut_test_split
from tests.data_fixtures import FASHION_SYSTEM_DIR, isolate, random_pixels, save_image, write_class_tree

pytest.importorskip("PIL", reason="Pillow is the [images] extra")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


def pixels_by_path(folder, split: str) -> dict[str, np.ndarray]:
    ds = folder.split(split)
    return dict(zip(folder.split_paths(split), np.asarray(ds.images)))


def messy_tree(root: Path) -> dict[str, np.ndarray]:
    """Every kind of entry a real folder collects. Returns {path: pixels} of the images that count."""
    images = {}

    def put(rel: str, pixels: np.ndarray, mode: str | None = None, keep: bool = True) -> None:
        save_image(root / rel, pixels, mode)
        if keep:
            images[rel] = pixels

    put("cat/a.png", random_pixels(8, 8, 3, 1))
    put("cat/B.Png", random_pixels(8, 8, 3, 2))  # odd-case extensions
    put("cat/c.BMP", random_pixels(8, 8, 3, 3))
    put("cat/sub/deeper.png", random_pixels(8, 8, 3, 4))  # sub-folders of a class belong to it
    put("dog/x.PNG", random_pixels(8, 8, 3, 5))
    put("dog/y.tif", random_pixels(8, 8, 3, 6))
    put("bird/only.png", random_pixels(8, 8, 3, 7))  # a class with one image
    (root / "empty").mkdir()  # a class folder with no image
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image\n")  # a folder of non-images: no class either
    put("loose.png", random_pixels(8, 8, 3, 8), keep=False)  # outside any class folder
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / "labels.csv").write_text("a,cat\n")
    put("cat/._a.png", random_pixels(8, 8, 3, 9), keep=False)  # AppleDouble: a dot-name
    put("cat/.ipynb_checkpoints/a-checkpoint.png", random_pixels(8, 8, 3, 10), keep=False)
    put("__MACOSX/cat/._a.png", random_pixels(8, 8, 3, 11), keep=False)
    put(".hidden_class/h.png", random_pixels(8, 8, 3, 12), keep=False)
    return images


def test_classes_are_the_folders_that_hold_images_sorted(tmp_path: Path) -> None:
    root = tmp_path / "messy"
    expected = messy_tree(root)
    scan = scan_image_folder(root)
    assert scan.class_names == ("bird", "cat", "dog")
    assert scan.layout == "one folder"
    assert sorted(f.path for f in scan.files) == sorted(expected)
    notes = "\n".join(scan.notes)
    assert "empty, notes hold no images: skipped" in notes
    assert "ignored 1 image file(s) directly in" in notes and "loose.png" in notes
    assert ".csv (1)" in notes and ".txt (1)" in notes
    folder = load_image_folder(root, cache=False, test_fraction=0.0, progress=False)
    assert folder.n_train == len(expected) and len(folder.test) == 0
    for rel, pixels in pixels_by_path(folder, "train").items():
        np.testing.assert_array_equal(pixels, expected[rel])
    names = dict(zip(folder.split_paths("train"), folder.train.labels))
    assert names["bird/only.png"] == 0 and names["cat/sub/deeper.png"] == 1 and names["dog/y.tif"] == 2
    # Stored order: by class, then by path within the class.
    assert list(folder.split_paths("train")) == sorted(expected, key=lambda p: (p.split("/")[0], p))


def test_channels_default_to_what_most_images_have(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    save_image(root / "a" / "rgb1.png", random_pixels(4, 4, 3, 1))
    save_image(root / "a" / "rgba.png", random_pixels(4, 4, 4, 2), "RGBA")
    save_image(root / "b" / "gray.png", random_pixels(4, 4, 0, 3))
    save_image(root / "b" / "p.gif", random_pixels(4, 4, 3, 4))  # saved as a palette image
    colour = load_image_folder(root, cache=False, test_fraction=0.0, progress=False)
    assert colour.image_shape == (4, 4, 3) and colour.options["channels"] == 3
    notes = "\n".join(colour.notes)
    assert "channels 3, what most images have" in notes
    assert "converted RGBA -> RGB: 1 image(s)" in notes and "converted L -> RGB: 1 image(s)" in notes
    gray = pixels_by_path(colour, "train")["b/gray.png"]
    np.testing.assert_array_equal(gray, np.repeat(gray[..., :1], 3, axis=2))
    for name in ("g1.png", "g2.png"):
        save_image(root / "b" / name, random_pixels(4, 4, 0, 5))  # now 3 gray and 3 colour: colour wins ties
    assert load_image_folder(root, cache=False, test_fraction=0.0, progress=False).options["channels"] == 3
    save_image(root / "b" / "g3.png", random_pixels(4, 4, 0, 6))
    assert load_image_folder(root, cache=False, test_fraction=0.0, progress=False).options["channels"] == 1
    asked = load_image_folder(root, channels=3, cache=False, test_fraction=0.0, progress=False)
    assert asked.image_shape == (4, 4, 3)


def test_sizes_that_differ_need_an_image_size(tmp_path: Path) -> None:
    root = tmp_path / "sizes"
    write_class_tree(root, {"a": 3}, size=(8, 8))
    save_image(root / "b" / "wide.png", random_pixels(6, 10, 3, 1))
    save_image(root / "b" / "wide2.png", random_pixels(6, 10, 3, 2))
    with pytest.raises(ValueError) as info:
        load_image_folder(root, cache=False, progress=False)
    message = str(info.value)
    assert "differ in size (HxW): 8x8: 3 (e.g. a/000.png); 6x10: 2 (e.g. b/wide.png)" in message
    assert "--image-size" in message and "\n" not in message
    for resize in ("resize", "crop"):
        folder = load_image_folder(root, image_size="8x8", resize=resize, cache=False, test_fraction=0.0,
                                   progress=False)
        assert folder.image_shape == (8, 8, 3) and folder.options["resize"] == resize
        assert any("6x10 -> 8x8: 2 image(s)" in n for n in folder.notes)
    one = load_image_folder(root, image_size=(6, 10), cache=False, test_fraction=0.0, progress=False)
    np.testing.assert_array_equal(pixels_by_path(one, "train")["b/wide.png"], random_pixels(6, 10, 3, 1))


def test_an_unreadable_file_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    write_class_tree(root, {"a": 3, "b": 2})
    (root / "a" / "broken.png").write_text("not a png at all")
    cut = save_image(root / "b" / "cut.JPG", random_pixels(32, 32, 3, 1))
    cut.write_bytes(cut.read_bytes()[:300])
    for size in (None, (8, 8)):  # the header pass (size None) and the decode pass both name the file
        with pytest.raises(ImageDecodeError) as info:
            load_image_folder(root, image_size=size, cache=False, progress=False)
        message = str(info.value)
        assert isinstance(info.value, ValueError) and "\n" not in message
        assert str(root / "a" / "broken.png") in message and "skip_bad=True" in message
    folder = load_image_folder(root, image_size=(8, 8), skip_bad=True, cache=False, test_fraction=0.0,
                               progress=False)
    assert len(folder.train) == 5 and sorted(p for p, _ in folder.skipped) == ["a/broken.png", "b/cut.JPG"]
    assert any(n.startswith("skipped 2 unreadable file(s)") for n in folder.notes)
    assert "2 unreadable file(s) skipped" in folder.describe()
    only_header = load_image_folder(root, skip_bad=True, cache=False, test_fraction=0.0, progress=False)
    assert len(only_header.train) == 5 and len(only_header.skipped) == 2


def test_train_and_test_folders(tmp_path: Path) -> None:
    root = tmp_path / "split"
    train = write_class_tree(root / "train", {"cat": 4, "dog": 3, "empty": 0}, seed=1)
    test = write_class_tree(root / "test", {"cat": 2, "dog": 1}, seed=2)
    (root / "val").mkdir()
    save_image(root / "val" / "cat" / "v.png", random_pixels(8, 8, 3, 0))
    folder = load_image_folder(root, cache=False, progress=False)
    assert folder.layout == "train/test" and folder.class_names == ("cat", "dog")
    assert (len(folder.train), len(folder.test)) == (7, 3)
    for split, written in (("train", train), ("test", test)):
        got = pixels_by_path(folder, split)
        assert sorted(got) == sorted(f"{split}/{p}" for p in written)
        for rel, pixels in got.items():
            np.testing.assert_array_equal(pixels, written[rel.split("/", 1)[1]])
    np.testing.assert_array_equal(folder.test.labels, [0, 0, 1])
    notes = "\n".join(folder.notes)
    assert "ignored folder(s) val beside train/" in notes and "empty hold no images" in notes
    write_class_tree(root / "test", {"horse": 1})
    with pytest.raises(ValueError, match="test has class folder.s. horse that .*train lacks"):
        load_image_folder(root, cache=False, progress=False)


def test_train_folder_alone_gets_a_cut_test_split(tmp_path: Path) -> None:
    root = tmp_path / "trainonly"
    write_class_tree(root / "train", {"a": 10, "b": 5})
    folder = load_image_folder(root, cache=False, progress=False)
    assert folder.layout == "train only" and (len(folder.train), len(folder.test)) == (12, 3)
    assert any("cut from train/" in n for n in folder.notes)


def test_the_cut_test_split_is_seeded_stratified_and_stable(tmp_path: Path) -> None:
    root = tmp_path / "one"
    write_class_tree(root, {"big": 10, "small": 3, "single": 1})
    a = load_image_folder(root, cache=False, progress=False)
    b = load_image_folder(root, cache=False, progress=False)
    assert a.split_paths("test") == b.split_paths("test")
    per_class = {c: sum(1 for p in a.split_paths("test") if p.startswith(c + "/")) for c in a.class_names}
    assert per_class == {"big": 2, "single": 0, "small": 1}  # round(n * 0.2), and one image stays to train
    assert not set(a.split_paths("test")) & set(a.split_paths("train"))
    other = load_image_folder(root, split_seed=1, cache=False, progress=False)
    assert other.split_paths("test") != a.split_paths("test")
    half = load_image_folder(root, test_fraction=0.5, cache=False, progress=False)
    assert len(half.test) == 5 + 2 + 0
    # Adding an image moves at most one image of its class from test to train.
    paths = [f"big/{i:03d}.png" for i in range(10)]
    before = cut_test_split(paths, 0.2, 0)
    for extra in range(10, 40):
        after = cut_test_split(paths + [f"big/{extra:03d}.png"], 0.2, 0)
        assert len(before - after) <= 1


def test_load_dataset_reads_image_folders(tmp_path: Path) -> None:
    root = tmp_path / "via"
    write_class_tree(root, {"a": 5, "b": 5})
    train = load_dataset("images", "train", data_dir=root, cache=False, progress=False)
    test = load_dataset("images", "test", data_dir=root, cache=False)
    assert (len(train), len(test)) == (8, 2) and train.class_names == ("a", "b")
    assert train.name == "images" and train.source == root and train.options["channels"] == 3
    assert train.options["image_size"] == [8, 8] and train.images.shape == (8, 8, 8, 3)
    again = load_dataset("images", "train", data_dir=root, cache=False, **train.options)  # recorded -> same data
    np.testing.assert_array_equal(again.images, train.images)
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_dataset("images", "train")
    with pytest.raises(TypeError):
        load_dataset("images", "train", data_dir=root, label_mode="fine")


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no images found in"),
    (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"x")), "no images found in"),
])
def test_folders_without_images(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "nothing"
    make(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_image_folder(root, cache=False, progress=False)


def test_bad_options(tmp_path: Path) -> None:
    write_class_tree(tmp_path / "r", {"a": 2})
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        load_image_folder(tmp_path / "r", channels=4)
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image_folder(tmp_path / "r", resize="fit")
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        load_image_folder(tmp_path / "r", test_fraction=1.0)


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(),
                    reason=f"{FASHION_SYSTEM_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_as_png_files_equals_its_idx_files(tmp_path: Path) -> None:
    """300 images per split exported as root/{train,test}/<label>/<index>.png come back through the
    folder path (and its cache) as the same pixels and labels as load_dataset's IDX reading."""
    root = tmp_path / "fashion-png"
    idx = {split: load_dataset("fashion-mnist", split, download=False) for split in ("train", "test")}
    chosen = {}
    for split, ds in idx.items():
        chosen[split] = np.random.default_rng(0).choice(len(ds), size=300, replace=False)
        for i in chosen[split]:
            save_image(root / split / str(ds.labels[i]) / f"{i:05d}.png", ds.images[i, :, :, 0])
    folder = load_image_folder(root, progress=False)
    assert folder.class_names == tuple(str(k) for k in range(10)) and folder.image_shape == (28, 28, 1)
    for split, ds in idx.items():
        # The folder's order: by class, then by file name (the index in the IDX file).
        order = sorted(chosen[split], key=lambda i: (ds.labels[i], i))
        got = folder.split(split)
        np.testing.assert_array_equal(got.images, ds.images[order])
        np.testing.assert_array_equal(got.labels, ds.labels[order])
    again = load_image_folder(root, progress=False)
    assert again.cache_reused
    np.testing.assert_array_equal(again.images, folder.images)


def test_decoding_threads_change_nothing(tmp_path: Path) -> None:
    root = tmp_path / "threads"
    write_class_tree(root, {"a": 9, "b": 7, "c": 5}, size=(6, 6))
    (root / "b" / "003.png").write_text("broken")  # a bad file in the middle of the order
    save_image(root / "c" / "rgba.png", random_pixels(9, 6, 4, seed=3), "RGBA")
    results = [load_image_folder(root, image_size=(6, 6), skip_bad=True, cache=False, workers=w, progress=False)
               for w in (1, 2, 5)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.images, results[0].images)
        assert other.paths == results[0].paths and other.skipped == results[0].skipped
        assert other.notes == results[0].notes
    with pytest.raises(ImageDecodeError, match="003.png"):
        load_image_folder(root, image_size=(6, 6), cache=False, workers=3, progress=False)


def test_pillow_warnings_in_worker_threads_become_notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        recwarn: pytest.WarningsRecorder) -> None:
    from PIL import Image

    root = tmp_path / "bombs"
    write_class_tree(root, {"a": 4, "b": 4}, size=(12, 12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: Pillow warns for each image
    folder = load_image_folder(root, cache=False, workers=3, progress=False)
    assert len(folder.labels) == 8 and len(recwarn) == 0
    assert any(n.startswith("Pillow: DecompressionBombWarning") and n.endswith(": 8 image(s)") for n in folder.notes)
