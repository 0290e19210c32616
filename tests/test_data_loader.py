"""Tests of cnn_gpu/data/loader.py: each sample once per epoch, an order that depends only on
(seed, epoch), the last-batch policy, and a deterministic, disjoint validation split."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.data.loader import BatchIterator, train_val_split
from cnn_gpu.data.transforms import augmentation_for
from tests.data_fixtures import skip_without_gpu


def dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose every pixel holds the sample's index, so a batch tells which samples it holds."""
    images = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None, None], (n, 4, 4, 1)).copy()
    return images, np.arange(n)


def epoch_labels(loader: BatchIterator) -> list[np.ndarray]:
    return [y for _, y in loader]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_sample_once_per_epoch(shuffle: bool) -> None:
    images, labels = dataset(103)
    loader = BatchIterator(images, labels, batch_size=10, shuffle=shuffle)
    for _ in range(3):
        batches = list(loader)
        for x, y in batches:
            np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images and labels stay paired
        seen = np.concatenate([y for _, y in batches])
        np.testing.assert_array_equal(np.sort(seen), labels)
        assert np.array_equal(seen, labels) != shuffle


@pytest.mark.parametrize("n, batch_size, drop_last, sizes", [
    (103, 10, False, [10] * 10 + [3]),
    (103, 10, True, [10] * 10),
    (100, 10, False, [10] * 10),
    (100, 10, True, [10] * 10),
    (7, 10, False, [7]),
    (7, 10, True, []),
])
def test_last_batch_policy(n: int, batch_size: int, drop_last: bool, sizes: list[int]) -> None:
    loader = BatchIterator(*dataset(n), batch_size=batch_size, drop_last=drop_last)
    assert [len(y) for y in epoch_labels(loader)] == sizes
    assert len(loader) == len(sizes)


def test_order_depends_only_on_seed_and_epoch() -> None:
    images, labels = dataset(50)
    a, b = BatchIterator(images, labels, 8, seed=3), BatchIterator(images, labels, 8, seed=3)
    epochs_a = [np.concatenate(epoch_labels(a)) for _ in range(3)]
    epochs_b = [np.concatenate(epoch_labels(b)) for _ in range(3)]
    for ea, eb in zip(epochs_a, epochs_b):
        np.testing.assert_array_equal(ea, eb)  # two instances, same seed: same orders
    assert not np.array_equal(epochs_a[0], epochs_a[1])  # epochs differ
    np.testing.assert_array_equal(epochs_a[2], np.random.default_rng([3, 2]).permutation(50))
    resumed = BatchIterator(images, labels, 8, seed=3, start_epoch=2)
    np.testing.assert_array_equal(np.concatenate(epoch_labels(resumed)), epochs_a[2])
    other_seed = BatchIterator(images, labels, 8, seed=4)
    assert not np.array_equal(np.concatenate(epoch_labels(other_seed)), epochs_a[0])


def test_breaking_out_early_still_moves_to_the_next_epoch() -> None:
    loader = BatchIterator(*dataset(50), batch_size=8, seed=1)
    for _ in loader:
        break
    assert loader.epoch == 1
    np.testing.assert_array_equal(np.concatenate(epoch_labels(loader)), loader.order(1))


def test_augment_and_transform_are_applied_per_batch_reproducibly() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(30, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(30)
    augment = augmentation_for("fashion-mnist")

    def run(seed: int) -> list[np.ndarray]:
        loader = BatchIterator(images, labels, 8, seed=seed, augment=augment,
                               transform=lambda x: x.astype(np.float32) / 255)
        return [x for x, _ in loader]

    first, again = run(0), run(0)
    assert all(x.dtype == np.float32 for x in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    plain = BatchIterator(images, labels, 8, seed=0)
    assert not all(np.array_equal(a, x / np.float32(255)) for a, (x, _) in zip(first, plain))
    # Augmenting does not change the order the samples are visited in.
    np.testing.assert_array_equal(
        np.concatenate(epoch_labels(BatchIterator(images, labels, 8, seed=0, augment=augment))),
        np.concatenate(epoch_labels(BatchIterator(images, labels, 8, seed=0))))


def test_bad_arguments() -> None:
    images, labels = dataset(10)
    with pytest.raises(ValueError, match="differ in length"):
        BatchIterator(images, labels[:9], 4)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(images, labels, 0)


def test_train_val_split_is_disjoint_complete_and_deterministic() -> None:
    images, labels = dataset(100)
    tx, ty, vx, vy = train_val_split(images, labels, val_fraction=0.2, seed=5)
    assert (len(ty), len(vy)) == (80, 20)
    np.testing.assert_array_equal(tx[:, 0, 0, 0], ty)
    np.testing.assert_array_equal(vx[:, 0, 0, 0], vy)
    assert not set(ty) & set(vy) and set(ty) | set(vy) == set(range(100))
    assert np.all(np.diff(ty) > 0) and np.all(np.diff(vy) > 0)  # stored order kept
    np.testing.assert_array_equal(train_val_split(images, labels, val_size=20, seed=5)[3], vy)
    assert not np.array_equal(train_val_split(images, labels, val_size=20, seed=6)[3], vy)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"val_fraction": 0.1, "val_size": 5}, "exactly one"),
    ({"val_fraction": 1.0}, r"in \(0, 1\)"),
    ({"val_size": 10}, "between 1 and 9"),
    ({"val_size": 0}, "between 1 and 9"),
])
def test_train_val_split_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_val_split(*dataset(10), **kwargs)


@pytest.mark.gpu
@skip_without_gpu
def test_cupy_batches_stay_on_the_device() -> None:
    from cnn_gpu.backend import to_device, to_numpy
    images = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(50)
    augment = augmentation_for("fashion-mnist")
    gpu = BatchIterator(to_device(images, "cupy"), to_device(labels, "cupy"), 16, seed=2, augment=augment)
    cpu = BatchIterator(images, labels, 16, seed=2, augment=augment)
    for (gx, gy), (cx, cy) in zip(gpu, cpu, strict=True):
        assert type(gx).__module__.startswith("cupy") and type(gy).__module__.startswith("cupy")
        np.testing.assert_array_equal(to_numpy(gx), cx)
        np.testing.assert_array_equal(to_numpy(gy), cy)
    tx, ty, vx, vy = train_val_split(to_device(images, "cupy"), to_device(labels, "cupy"), val_size=10, seed=1)
    np.testing.assert_array_equal(to_numpy(vy), train_val_split(images, labels, val_size=10, seed=1)[3])
    with pytest.raises(TypeError, match="both backends"):
        BatchIterator(to_device(images, "cupy"), labels, 16)


# ---- data on disk: Subset, copy-free splits of a memory map, batches moved to a device --------------

@pytest.fixture
def memmap(tmp_path) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, size=(40, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def test_subset_indexes_its_rows_of_the_base(memmap) -> None:
    from cnn_gpu.data import Subset

    index = np.array([5, 1, 30, 7, 7])
    s = Subset(memmap, index)
    assert len(s) == 5 and s.shape == (5, 4, 4, 3) and s.dtype == np.uint8 and s.ndim == 4
    np.testing.assert_array_equal(s[0], memmap[5])
    np.testing.assert_array_equal(s[1:3], memmap[[1, 30]])
    np.testing.assert_array_equal(s[np.array([4, 0])], memmap[[7, 5]])
    np.testing.assert_array_equal(s[-1], memmap[7])
    np.testing.assert_array_equal(s[1:4, 0, :, 2], memmap[[1, 30, 7], 0, :, 2])
    np.testing.assert_array_equal(s[2, 1], memmap[30, 1])
    np.testing.assert_array_equal(np.asarray(s), memmap[index])
    assert np.asarray(s, dtype=np.float32).dtype == np.float32
    nested = Subset(s, [2, 0])
    assert nested.base is memmap and nested.index.tolist() == [30, 5]
    with pytest.raises(IndexError, match="out of range for 40 rows"):
        Subset(memmap, [0, 40])
    with pytest.raises(ValueError, match="1-D integer array"):
        Subset(memmap, np.array([0.5]))


def test_train_val_split_of_a_memory_map_gives_subsets(memmap) -> None:
    from cnn_gpu.data import Subset, is_on_disk

    labels = np.arange(40)
    tx, ty, vx, vy = train_val_split(memmap, labels, val_size=8, seed=2)
    assert isinstance(tx, Subset) and isinstance(vx, Subset) and is_on_disk(tx) and is_on_disk(memmap)
    ram = train_val_split(np.array(memmap), labels, val_size=8, seed=2)
    assert type(ram[0]) is np.ndarray and not is_on_disk(ram[0])
    for got, expected in zip((tx, ty, vx, vy), ram):
        np.testing.assert_array_equal(np.asarray(got), expected)
    # A split of a split is a Subset of the same memory map.
    t2, _, v2, _ = train_val_split(tx, ty, val_size=4, seed=0)
    assert t2.base is memmap and v2.base is memmap


def test_device_numpy_moves_nothing_and_changes_nothing(memmap) -> None:
    labels = np.arange(40)
    augment = augmentation_for("cifar10")
    moved = BatchIterator(memmap, labels, 16, seed=4, augment=augment, device="numpy")
    plain = BatchIterator(np.array(memmap), labels, 16, seed=4, augment=augment)
    for (mx, my), (px, py) in zip(moved, plain, strict=True):
        assert type(mx) is np.ndarray and mx.tobytes() == px.tobytes() and my.tobytes() == py.tobytes()


@pytest.mark.gpu
@skip_without_gpu
def test_memory_map_batches_moved_to_the_gpu_equal_batches_of_gpu_data(memmap) -> None:
    from cnn_gpu.backend import to_device, to_numpy
    from cnn_gpu.data import compute_norm_stats, normalize

    labels = np.arange(40)
    stats = compute_norm_stats(memmap)
    kwargs = dict(batch_size=16, seed=5, augment=augmentation_for("cifar10", erase=0.5),
                  transform=lambda x: normalize(x, stats))
    moved = BatchIterator(memmap, labels, device="cupy", **kwargs)
    resident = BatchIterator(to_device(np.array(memmap), "cupy"), to_device(labels, "cupy"), **kwargs)
    for (mx, my), (rx, ry) in zip(moved, resident, strict=True):
        assert type(mx).__module__.startswith("cupy") and type(my).__module__.startswith("cupy")
        np.testing.assert_array_equal(to_numpy(mx), to_numpy(rx))  # the same ops on the same device
        np.testing.assert_array_equal(to_numpy(my), to_numpy(ry))
    with pytest.raises(ValueError, match="on the GPU already"):
        BatchIterator(to_device(np.array(memmap), "cupy"), to_device(labels, "cupy"), 8, device="cupy")
