"""Tests of cnn_gpu/data/datasets.py: the registry, where files are looked for, the checks on
what is read, the not-found message, and the real data where this machine has it.

Every test runs isolated (clean_env): HOME and XDG_CACHE_HOME under tmp_path, no CNN_GPU_DATA, and
registry mirrors that refuse connections, so nothing here touches ~/.cache or the network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnn_gpu.data import DATASETS, DatasetNotFoundError, find_dataset_files, load_dataset
from cnn_gpu.data.datasets import DATASET_NAMES, canonical_name, get_spec, search_locations, user_cache_dir
from cnn_gpu.data.idx import write_idx
from tests.data_fixtures import FASHION_SYSTEM_DIR, MNIST_T10K_DIR, isolate, set_system_dirs, write_split


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


def test_registry() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "cifar100"}
    assert DATASETS["mnist"].class_names == tuple("0123456789")
    assert DATASETS["fashion-mnist"].class_names == (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    for spec in DATASETS.values():
        assert sorted(spec.md5) == sorted({f for split in spec.files for f in spec.download_names(split)})
        assert all(len(s) == 32 for s in spec.md5.values())
        assert len(spec.class_names) == len(set(spec.class_names))
    assert len(DATASETS["cifar100"].class_names) == 100 and len(DATASETS["cifar100"].coarse_class_names) == 20


def test_dataset_names_and_aliases() -> None:
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "cifar10", "cifar100", "images")
    for alias, key in [("CIFAR-10", "cifar10"), ("cifar_100", "cifar100"), ("Fashion_MNIST", "fashion-mnist"),
                       ("images", "images")]:
        assert canonical_name(alias) == key
    with pytest.raises(ValueError, match="not a registry dataset"):
        get_spec("images")
    with pytest.raises(TypeError, match="takes no options"):
        load_dataset("mnist", "train", download=False, label_mode="fine")


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_data_dir(tmp_path: Path, gz: bool) -> None:
    images, labels = write_split(tmp_path / "d", 7, "test", gz=gz)
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "d", download=False)
    assert ds.images.shape == (7, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and len(ds) == 7 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert (ds.name, ds.split, ds.source) == ("mnist", "test", tmp_path / "d")


def test_names_accept_underscores_and_reject_unknowns(tmp_path: Path) -> None:
    write_split(tmp_path, 3, "train")
    assert load_dataset("Fashion_MNIST", data_dir=tmp_path, download=False).name == "fashion-mnist"
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known: mnist, fashion-mnist, cifar10"):
        load_dataset("svhn", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist", "validation", data_dir=tmp_path)


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data_dir beats $CNN_GPU_DATA beats the user cache beats the system directory.

    Each place holds a split of a different size, so the size tells which one was read."""
    places = {"data_dir": tmp_path / "arg", "env": tmp_path / "env",
              "cache": user_cache_dir("fashion-mnist"), "system": tmp_path / "system"}
    for size, directory in enumerate(places.values(), start=1):
        write_split(directory, size)
    monkeypatch.setenv("CNN_GPU_DATA", str(places["env"]))
    set_system_dirs(monkeypatch, "fashion-mnist", places["system"])

    def size_loaded(data_dir):
        return len(load_dataset("fashion-mnist", data_dir=data_dir, download=False))

    assert size_loaded(places["data_dir"]) == 1
    assert size_loaded(None) == 2
    monkeypatch.delenv("CNN_GPU_DATA")
    assert size_loaded(None) == 3
    for f in places["cache"].iterdir():
        f.unlink()
    assert size_loaded(None) == 4
    assert find_dataset_files("fashion-mnist", "train")[0].parent == places["system"]


def test_named_subfolder_is_searched_before_the_folder_itself(tmp_path: Path) -> None:
    write_split(tmp_path, 2)
    write_split(tmp_path / "mnist", 5)
    assert len(load_dataset("mnist", data_dir=tmp_path, download=False)) == 5
    assert len(load_dataset("mnist", data_dir=tmp_path / "mnist", download=False)) == 5


def test_a_folder_with_one_file_of_the_pair_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path / "half", 2)
    (tmp_path / "half" / "train-labels-idx1-ubyte.gz").unlink()
    write_split(tmp_path / "env", 3)
    monkeypatch.setenv("CNN_GPU_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", data_dir=tmp_path / "half", download=False)) == 3
    monkeypatch.delenv("CNN_GPU_DATA")
    with pytest.raises(DatasetNotFoundError, match="has train-images-idx3-ubyte.gz but not the other file"):
        load_dataset("mnist", data_dir=tmp_path / "half", download=False)


def test_xdg_cache_home_is_honoured_and_a_relative_one_ignored(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert user_cache_dir("mnist") == tmp_path / "xdg-cache" / "cnn_gpu" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert user_cache_dir("mnist") == tmp_path / "home" / ".cache" / "cnn_gpu" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir("fashion-mnist") == tmp_path / "home" / ".cache" / "cnn_gpu" / "fashion-mnist"


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "images"])
def test_a_data_dir_that_is_not_there_is_an_error_not_skipped(tmp_path: Path, dataset: str) -> None:
    # Searched past, a mistyped --data-dir would train silently on the cache's or the system's copy.
    with pytest.raises(DatasetNotFoundError, match="no-such-dir: no such folder or file") as info:
        load_dataset(dataset, "train", data_dir=tmp_path / "no-such-dir", download=False, progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("download", [False, True])
def test_offline_error_names_every_place_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  dataset: str, download: bool) -> None:
    set_system_dirs(monkeypatch, "fashion-mnist", tmp_path / "no-system-dir")
    monkeypatch.setenv("CNN_GPU_DATA", str(tmp_path / "env"))
    (tmp_path / "arg").mkdir()  # there, but empty (one that is not there is its own error: the test above)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(dataset, "test", data_dir=tmp_path / "arg", download=download, progress=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    locations = search_locations(dataset, tmp_path / "arg")
    assert len(locations) == (5 if dataset == "mnist" else 6)  # 2 + 2 user dirs, cache, system
    for directory, _ in locations:
        assert str(directory) in message
    assert "t10k-images-idx3-ubyte.gz" in message and "--data-dir" in message and "CNN_GPU_DATA" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (dataset == "fashion-mnist")
    if download:
        assert "Connection refused" in message or "refused" in message.lower()
        assert not any(user_cache_dir(dataset).iterdir())  # nothing partial left behind
    else:
        assert "download=False" in message


def test_image_and_label_counts_that_disagree(tmp_path: Path) -> None:
    images, _ = write_split(tmp_path, 5)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="holds 5 images but .*train-labels-idx1-ubyte.gz holds 4 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("file_name, array, message", [
    ("train-images-idx3-ubyte.gz", np.zeros((3, 28, 27), np.uint8),
     r"uint8 of shape \(N, 28, 28\); found uint8 of shape \(3, 28, 27\)"),
    ("train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.float32), r"found float32"),
    ("train-labels-idx1-ubyte.gz", np.zeros((3, 1), np.uint8), r"labels, uint8 of shape \(N,\)"),
    ("train-labels-idx1-ubyte.gz", np.array([0, 10, 1], np.uint8), r"labels must be in \[0, 10\), found 10"),
])
def test_content_that_is_not_the_dataset(tmp_path: Path, file_name: str, array: np.ndarray, message: str) -> None:
    write_split(tmp_path, 3)
    write_idx(tmp_path / file_name, array)
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_a_malformed_local_file_is_an_error_not_skipped(tmp_path: Path) -> None:
    write_split(tmp_path, 3)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="truncated gzip stream") as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(),
                    reason=f"{FASHION_SYSTEM_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    for split, n in [("train", 60000), ("test", 10000)]:
        ds = load_dataset("fashion-mnist", split, download=False)
        assert ds.source == FASHION_SYSTEM_DIR
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.all(np.bincount(ds.labels) == n // 10)  # Fashion-MNIST is balanced


@pytest.mark.skipif(not MNIST_T10K_DIR.is_dir(), reason=f"{MNIST_T10K_DIR} absent (only in this project's CI)")
def test_real_mnist_test_split_via_data_dir() -> None:
    ds = load_dataset("mnist", "test", data_dir=MNIST_T10K_DIR, download=False)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.labels.shape == (10000,)
    assert np.bincount(ds.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
