"""Tests of the image-folder cache (cnn_gpu/data/cache.py, through cnn_gpu/data/folder.py): reuse,
rebuilds when the folder or the options change, caches killed half-written, where it lives, and
training batches from the memory map equal to batches from memory, byte for byte."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import (
    BatchIterator,
    Subset,
    augmentation_for,
    compute_norm_stats,
    is_on_disk,
    load_image_folder,
    normalize,
    train_val_split,
)
from cnn_gpu.data import cache as cache_files
from cnn_gpu.data import folder as folder_module
from cnn_gpu.data.folder import BESIDE_STEM, CACHE_SUBDIR
from tests.data_fixtures import isolate, random_pixels, save_image, write_class_tree

pytest.importorskip("PIL", reason="Pillow is the [images] extra")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_class_tree(tmp_path / "photos", {"cat": 6, "dog": 5, "owl": 4})
    return tmp_path / "photos"


def load(root: Path, **kwargs):
    return load_image_folder(root, progress=False, **kwargs)


def cache_dir(root: Path) -> Path:
    return root / CACHE_SUBDIR


def index(root: Path) -> dict:
    return json.loads((cache_dir(root) / f"{BESIDE_STEM}.json").read_text())


def data_file(root: Path) -> Path:
    return cache_dir(root) / index(root)["data"]


def rebuilt_because(folder) -> str:
    assert not folder.cache_reused
    reasons = [n for n in folder.notes if n.startswith("cache rebuilt")]
    assert len(reasons) == 1, folder.notes
    return reasons[0]


def touch_later(path: Path) -> None:
    """Move a file's modification time on, as an edit would (filesystems may round to seconds)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_built_once_then_reused(root: Path) -> None:
    first = load(root)
    assert not first.cache_reused and first.cache_path == cache_dir(root) / "images.json"
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable
    second = load(root)
    assert second.cache_reused and any(n.startswith("read from the cache") for n in second.notes)
    assert isinstance(second.train.images, np.memmap)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.split_paths("test") == first.split_paths("test")
    in_memory = load(root, cache=False)
    assert not isinstance(in_memory.images, np.memmap) and in_memory.cache_path is None
    np.testing.assert_array_equal(in_memory.images, first.images)
    # The data file is a plain .npy: its header gives the shape of what was kept.
    assert np.load(data_file(root), mmap_mode="r").shape == (15, 8, 8, 3)
    assert sorted(p.name for p in cache_dir(root).iterdir()) == sorted(["images.json", index(root)["data"]])


def test_a_changed_file_rebuilds(root: Path) -> None:
    load(root)
    new = random_pixels(8, 8, 3, seed=99)
    save_image(root / "cat" / "002.png", new)
    touch_later(root / "cat" / "002.png")
    folder = load(root)
    assert "1 changed" in rebuilt_because(folder)
    got = dict(zip(folder.paths, folder.images))
    np.testing.assert_array_equal(got["cat/002.png"], new)
    assert load(root).cache_reused


def test_an_added_or_removed_file_rebuilds(root: Path) -> None:
    load(root)
    save_image(root / "owl" / "new.png", random_pixels(8, 8, 3, seed=5))
    added = load(root)
    assert "1 added" in rebuilt_because(added) and len(added.labels) == 16
    (root / "dog" / "000.png").unlink()
    (root / "dog" / "001.png").unlink()
    removed = load(root)
    assert "2 removed" in rebuilt_because(removed) and len(removed.labels) == 14
    assert "dog/000.png" not in removed.paths
    # Hidden files and the cache itself are not part of the folder: adding one changes nothing.
    (root / "cat" / ".DS_Store").write_bytes(b"x")
    assert load(root).cache_reused


@pytest.mark.parametrize("change, needle", [
    ({"channels": 1}, "channels 1 differs"),
    ({"image_size": (4, 6)}, "image_size [4, 6] differs"),
    ({"resize": "crop"}, "resize 'crop' differs"),
    ({"test_fraction": 0.5}, "test_fraction 0.5 differs"),
    ({"split_seed": 3}, "split_seed 3 differs"),
])
def test_other_options_rebuild(root: Path, change: dict, needle: str) -> None:
    base = load(root)
    folder = load(root, **change)
    assert needle in rebuilt_because(folder)
    assert needle.split()[0] in folder.options
    if "channels" in change:
        assert folder.image_shape == (8, 8, 1)
    if "image_size" in change:
        assert folder.image_shape == (4, 6, 3)
    back = load(root)  # one cache per folder: going back rebuilds again
    assert not back.cache_reused
    np.testing.assert_array_equal(back.images, base.images)


def test_the_recorded_options_reuse_the_cache(root: Path) -> None:
    """A run records Dataset.options (channels and size as decided); giving them back reads the same cache."""
    first = load(root)
    assert first.options["channels"] == 3 and first.options["image_size"] == [8, 8]
    assert load(root, **first.options).cache_reused
    assert load(root, channels=3, image_size="8x8", skip_bad=True).cache_reused  # nothing was skipped


def test_skipped_files_are_remembered(root: Path) -> None:
    (root / "cat" / "bad.png").write_text("not a png")
    with_skips = load(root, skip_bad=True)
    assert len(with_skips.skipped) == 1
    again = load(root, skip_bad=True)
    assert again.cache_reused and again.skipped == with_skips.skipped
    assert any("skipped 1 unreadable file(s)" in n for n in again.notes)
    with pytest.raises(ValueError, match="bad.png: not a readable png file"):
        load(root)  # without skip_bad the cache that left the file out does not serve


def test_a_truncated_data_file_is_rebuilt(root: Path) -> None:
    expected = np.array(load(root).images)  # a copy: the file is cut below, under any map of it
    path = data_file(root)
    path.write_bytes(path.read_bytes()[:-100])
    folder = load(root)
    assert "holds" in rebuilt_because(folder) and "not the" in rebuilt_because(folder)
    np.testing.assert_array_equal(folder.images, expected)
    assert not path.exists()  # the old data file is cleaned up


def test_a_missing_index_is_rebuilt_and_its_orphan_removed(root: Path) -> None:
    first = load(root)
    orphan = data_file(root)
    (cache_dir(root) / "images.json").unlink()  # killed after the data file, before the index
    folder = load(root)
    assert not folder.cache_reused and not any(n.startswith("cache rebuilt") for n in folder.notes)
    np.testing.assert_array_equal(folder.images, first.images)
    assert not orphan.exists() and data_file(root).exists()


@pytest.mark.parametrize("corrupt, needle", [
    (lambda ix: {**ix, "shape": [ix["shape"][0] + 1, *ix["shape"][1:]]}, "not the"),
    (lambda ix: {**ix, "shape": [ix["shape"][0], 8, 4, 6]}, "holds uint8"),
    (lambda ix: {**ix, "data": "images-000000000000.npy"}, "is missing"),
    (lambda ix: {**ix, "version": 0}, "is not a version-1"),
    (lambda ix: {k: v for k, v in ix.items() if k != "kept"}, "malformed"),
])
def test_an_index_that_does_not_match_its_data_is_rebuilt(root: Path, corrupt, needle: str) -> None:
    first = load(root)
    path = cache_dir(root) / "images.json"
    path.write_text(json.dumps(corrupt(json.loads(path.read_text()))))
    folder = load(root)
    assert needle in rebuilt_because(folder)
    np.testing.assert_array_equal(folder.images, first.images)
    assert load(root).cache_reused


def test_an_unparsable_index_is_rebuilt(root: Path) -> None:
    load(root)
    (cache_dir(root) / "images.json").write_text('{"format": "cnn_gpu image cache", "vers')
    assert "unreadable" in rebuilt_because(load(root))


def test_a_build_killed_midway_leaves_the_old_cache_and_no_temporary_file(root: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(root)
    old_index = (cache_dir(root) / "images.json").read_text()
    save_image(root / "owl" / "new.png", random_pixels(8, 8, 3, seed=5))
    real_decode = folder_module.decode_image
    calls = []

    def dies_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C during the build
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(folder_module, "decode_image", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        load(root)
    assert (cache_dir(root) / "images.json").read_text() == old_index
    assert sorted(p.name for p in cache_dir(root).iterdir()) == sorted(["images.json", index(root)["data"]])
    monkeypatch.setattr(folder_module, "decode_image", real_decode)
    folder = load(root)
    assert "1 added" in rebuilt_because(folder) and len(folder.labels) == len(first.labels) + 1


def test_stale_temporary_files_of_killed_builds_are_removed(root: Path) -> None:
    load(root)
    stale = cache_dir(root) / "images-0123456789ab.npy.a1b2c3.tmp"  # what atomic_write names its temporary file
    fresh = cache_dir(root) / "images-ba9876543210.npy.d4e5f6.tmp"
    other = cache_dir(root) / "images-other-0123456789ab.npy"  # another cache's file: not ours
    for path in (stale, fresh, other):
        path.write_bytes(b"\0" * 10)
    old = time.time() - 2 * cache_files.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    save_image(root / "owl" / "new.png", random_pixels(8, 8, 3, seed=5))
    load(root)  # a rebuild cleans up
    assert not stale.exists() and fresh.exists() and other.exists()


def test_where_the_cache_lives(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "my-cache"
    folder = load(root, cache_dir=elsewhere)
    assert folder.cache_path.parent == elsewhere and folder.cache_path.name.startswith("photos-")
    assert load(root, cache_dir=elsewhere).cache_reused
    # A folder that cannot be written to: the user cache (XDG_CACHE_HOME under tmp_path here).
    monkeypatch.setattr(cache_files, "writable_directory", lambda directory: False)
    read_only = load(root)
    assert read_only.cache_path.parent == tmp_path / "xdg-cache" / "cnn_gpu" / "images"
    assert load(root).cache_reused
    assert not (root / CACHE_SUBDIR).exists()


def test_npy_header_has_a_fixed_length() -> None:
    for shape in [(0, 1, 1, 1), (12, 32, 32, 3), (10**12, 4096, 4096, 3)]:
        header = cache_files.npy_header(shape)
        assert len(header) == cache_files.NPY_HEADER_BYTES and header.endswith(b"\n")


# ---- training from the memory map ---------------------------------------------------------------

class Spy:
    """An array that records how it is indexed and refuses to be read whole."""

    def __init__(self, base: np.ndarray):
        self.base, self.keys = base, []
        self.shape, self.dtype, self.ndim = base.shape, base.dtype, base.ndim

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        self.keys.append(key)
        return self.base[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was asked for")

    def rows_read(self) -> list[int]:
        return [len(np.arange(len(self.base))[k]) for k in self.keys]


def batches(images, labels, **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    loader = BatchIterator(images, labels, **kwargs)
    return [(x, y) for _ in range(2) for x, y in loader]  # two epochs


def test_batches_from_the_memory_map_equal_batches_from_memory(root: Path) -> None:
    folder = load(root)
    mm = folder.train.images
    ram = np.array(mm)  # the same data held in memory
    labels = folder.train.labels
    assert is_on_disk(mm) and not is_on_disk(ram)
    stats_mm, stats_ram = compute_norm_stats(mm), compute_norm_stats(ram)
    np.testing.assert_array_equal(stats_mm.mean, stats_ram.mean)  # exact integer sums either way
    np.testing.assert_array_equal(stats_mm.std, stats_ram.std)
    augment = augmentation_for("images", image_size=(8, 8), erase=0.5)
    kwargs = dict(batch_size=4, seed=3, augment=augment, transform=lambda x: normalize(x, stats_mm))
    from_disk, from_ram = batches(mm, labels, **kwargs), batches(ram, labels, **kwargs)
    assert len(from_disk) == len(from_ram) == 2 * 3
    for (xd, yd), (xr, yr) in zip(from_disk, from_ram, strict=True):
        assert xd.dtype == xr.dtype == np.float32 and type(xd) is np.ndarray
        assert xd.tobytes() == xr.tobytes() and yd.tobytes() == yr.tobytes()


def test_the_validation_split_of_a_memory_map_copies_nothing(root: Path) -> None:
    folder = load(root)
    mm, labels = folder.train.images, folder.train.labels
    ram = np.array(mm)
    tx, ty, vx, vy = train_val_split(mm, labels, val_size=3, seed=1)
    rx, ry, rvx, rvy = train_val_split(ram, labels, val_size=3, seed=1)
    assert isinstance(tx, Subset) and isinstance(vx, Subset) and tx.base is mm
    assert tx.shape == rx.shape and len(vx) == 3
    np.testing.assert_array_equal(np.asarray(tx), rx)
    np.testing.assert_array_equal(np.asarray(vx), rvx)
    np.testing.assert_array_equal(ty, ry)
    np.testing.assert_array_equal(vy, rvy)
    kwargs = dict(batch_size=4, seed=0, augment=augmentation_for("images", image_size=(8, 8)))
    for (xd, yd), (xr, yr) in zip(batches(tx, ty, **kwargs), batches(rx, ry, **kwargs), strict=True):
        assert xd.tobytes() == xr.tobytes() and yd.tobytes() == yr.tobytes()
    np.testing.assert_array_equal(compute_norm_stats(tx).std, compute_norm_stats(rx).std)


def test_batches_and_statistics_never_read_the_whole_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a Spy: BatchIterator gathers batch by batch, a Subset of it gathers only its own
    rows, and compute_norm_stats reads chunks; none asks for the whole array."""
    from cnn_gpu.data import transforms

    images = np.random.default_rng(0).integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(50)
    spy = Spy(images)
    for x, y in BatchIterator(spy, labels, batch_size=8, seed=1):
        np.testing.assert_array_equal(x, images[y])
    assert spy.rows_read() == [8] * 6 + [2]
    spy.keys.clear()
    tx, ty, _, _ = train_val_split(Subset(spy, np.arange(50)), labels, val_size=10, seed=0)
    for x, y in BatchIterator(tx, ty, batch_size=16, seed=2):
        np.testing.assert_array_equal(x, images[y])
    assert spy.rows_read() == [16, 16, 8]
    spy.keys.clear()
    monkeypatch.setattr(transforms, "NORM_STATS_CHUNK_VALUES", 4 * 4 * 3 * 7)  # 7 images a chunk
    stats = compute_norm_stats(spy)
    assert max(spy.rows_read()) == 7 and sum(spy.rows_read()) == 50
    np.testing.assert_array_equal(stats.mean, compute_norm_stats(images).mean)
    np.testing.assert_array_equal(stats.std, compute_norm_stats(images).std)
