"""Tests of cnn_gpu/data/transforms.py: scaling and normalization with the training split's
statistics, and the seeded augmentations checked against plain per-image references."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.data.transforms import (
    Augmentation,
    augmentation_for,
    compute_norm_stats,
    normalize,
    random_erase,
    random_hflip,
    random_shift,
    to_unit_float,
)
from tests.data_fixtures import skip_without_gpu


def images_uint8(n: int = 16, h: int = 28, w: int = 28, c: int = 1, seed: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(n, h, w, c), dtype=np.uint8)


def shift_reference(images: np.ndarray, shifts: np.ndarray, fill=0) -> np.ndarray:
    """One image at a time: out[n, i, j] = images[n, i - dy, j - dx], fill outside."""
    out = np.full_like(images, fill)
    h, w = images.shape[1:3]
    for n, (dy, dx) in enumerate(shifts):
        out[n, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            images[n, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_to_unit_float() -> None:
    x = np.array([[[[0], [128], [255]]]], dtype=np.uint8)
    y = to_unit_float(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y.ravel(), [0.0, 128 / 255, 1.0], rtol=1e-6)
    assert to_unit_float(x, np.float64).dtype == np.float64


@pytest.mark.parametrize("channels", [1, 3])
def test_compute_norm_stats_matches_numpy(channels: int) -> None:
    x = images_uint8(50, c=channels, high=200)
    stats = compute_norm_stats(x)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    float_stats = compute_norm_stats(ref)  # float input is taken as already in [0, 1]
    np.testing.assert_allclose(float_stats.mean, stats.mean, rtol=1e-12)
    np.testing.assert_allclose(float_stats.std, stats.std, rtol=1e-12)


def test_normalize_uses_the_training_statistics() -> None:
    train = images_uint8(64, seed=1, high=128)  # darker than the test split
    test = images_uint8(32, seed=2)
    stats = compute_norm_stats(train)
    train_x, test_x = normalize(train, stats), normalize(test, stats)
    assert train_x.dtype == np.float32 and train_x.shape == train.shape
    assert abs(train_x.mean()) < 1e-4 and abs(train_x.std() - 1) < 1e-4
    expected = (test.astype(np.float64) / 255 - stats.mean) / stats.std
    np.testing.assert_allclose(test_x, expected, rtol=1e-5, atol=1e-5)
    assert test_x.mean() > 0.5  # not re-centred on its own statistics
    assert normalize(test, stats, dtype=np.float64).dtype == np.float64


def test_constant_training_images_cannot_be_normalized() -> None:
    with pytest.raises(ValueError, match="constant"):
        compute_norm_stats(np.zeros((2, 28, 28, 1), np.uint8))


@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_random_shift_matches_the_reference(max_shift: int) -> None:
    x = images_uint8(40, c=2)
    before = x.copy()
    y = random_shift(x, max_shift, np.random.default_rng(5))
    shifts = np.random.default_rng(5).integers(-max_shift, max_shift + 1, size=(40, 2))
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y, shift_reference(x, shifts))
    np.testing.assert_array_equal(x, before)  # input untouched
    assert np.abs(shifts).max() == max_shift  # the full range is drawn


def test_random_shift_moves_content() -> None:
    x = np.zeros((200, 28, 28, 1), np.uint8)
    x[:, 14, 14] = 255  # one bright pixel in the middle
    y = random_shift(x, 3, np.random.default_rng(0))
    rows, cols = np.nonzero(y[..., 0])[1:]
    assert len(rows) == 200  # every pixel is still there: a shift of 3 cannot push it out
    assert set(rows - 14) == set(cols - 14) == set(range(-3, 4))
    z = random_shift(np.full((4, 5, 5, 1), 9, np.uint8), 2, np.random.default_rng(1), fill=7)
    assert set(np.unique(z)) <= {7, 9}
    np.testing.assert_array_equal(random_shift(x, 0, np.random.default_rng(0)), x)


def test_random_hflip() -> None:
    x = images_uint8(400)
    y = random_hflip(x, np.random.default_rng(3))
    flipped = np.array([np.array_equal(b, a[:, ::-1]) for a, b in zip(x, y)])
    kept = np.array([np.array_equal(b, a) for a, b in zip(x, y)])
    assert np.all(flipped ^ kept)
    np.testing.assert_array_equal(flipped, np.random.default_rng(3).random(400) < 0.5)
    assert 150 < flipped.sum() < 250


def erased_boxes(original: np.ndarray, erased: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Per image, the bounding box (top, left, height, width) of the pixels that changed, or None."""
    boxes = []
    for a, b in zip(original, erased):
        rows, cols = np.nonzero((a != b).any(axis=-1))
        boxes.append(None if rows.size == 0 else
                     (rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
    return boxes


def test_random_erase_fills_one_rectangle_per_chosen_image() -> None:
    x = np.zeros((400, 28, 28, 1), np.uint8)  # all background: every erased pixel shows as noise
    y = random_erase(x, np.random.default_rng(5), p=0.5)
    assert y.shape == x.shape and y.dtype == np.uint8
    boxes = erased_boxes(x, y)
    erased = np.array([b is not None for b in boxes])
    assert 150 < erased.sum() < 250
    for image, box in zip(y, boxes):
        if box is None:
            continue
        top, left, h, w = box
        inside = image[top:top + h, left:left + w]
        assert (image != 0).sum() == (inside != 0).sum()  # nothing changed outside the box
        assert (inside == 0).sum() <= max(2, 0.05 * inside.size)  # noise: about 1/256 of it is 0 by chance
        assert 0.02 * 784 * 0.5 <= h * w <= 0.25 * 784 * 1.5  # area fraction in [0.02, 0.25], rounded


def test_random_erase_edge_cases() -> None:
    x = images_uint8(8)
    np.testing.assert_array_equal(random_erase(x, np.random.default_rng(0), p=0.0), x)
    assert all(b is not None for b in erased_boxes(x, random_erase(x, np.random.default_rng(0), p=1.0)))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        random_erase(x, np.random.default_rng(0), p=1.5)
    with pytest.raises(TypeError, match="expects uint8 images, got float32"):
        random_erase(x.astype(np.float32), np.random.default_rng(0))


def test_augmentation_is_reproducible_from_the_seed() -> None:
    x = images_uint8(32)
    policy = augmentation_for("fashion-mnist")
    a = policy(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, policy(x, np.random.default_rng(7)))
    assert not np.array_equal(a, policy(x, np.random.default_rng(8)))


def test_flips_only_for_fashion_mnist() -> None:
    assert augmentation_for("fashion-mnist") == Augmentation(max_shift=2, hflip=True)
    assert augmentation_for("mnist") == Augmentation(max_shift=2, hflip=False)
    assert augmentation_for("mnist", 1, erase=0.5) == Augmentation(max_shift=1, hflip=False, erase=0.5)
    x = images_uint8(64)
    digits = augmentation_for("mnist", max_shift=0)(x, np.random.default_rng(0))
    np.testing.assert_array_equal(digits, x)  # a digit is never mirrored
    clothes = augmentation_for("fashion-mnist", max_shift=0)(x, np.random.default_rng(0))
    assert not np.array_equal(clothes, x)


@pytest.mark.parametrize("max_shift, erase", [(0, 0.0), (2, 0.0), (1, 0.5)])
@pytest.mark.parametrize("policy", ["mnist", "fashion-mnist"])
@pytest.mark.gpu
@skip_without_gpu
def test_gpu_matches_cpu(max_shift: int, erase: float, policy: str) -> None:
    from cnn_gpu.backend import to_device, to_numpy
    x = images_uint8(64, seed=4)
    x_gpu = to_device(x, "cupy")
    augment = augmentation_for(policy, max_shift=max_shift, erase=erase)
    cpu = augment(x, np.random.default_rng(11))
    gpu = augment(x_gpu, np.random.default_rng(11))
    assert type(gpu) is type(x_gpu)
    np.testing.assert_array_equal(to_numpy(gpu), cpu)
    stats = compute_norm_stats(x_gpu)
    cpu_stats = compute_norm_stats(x)
    np.testing.assert_allclose(stats.mean, cpu_stats.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, cpu_stats.std, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(normalize(x_gpu, stats)), normalize(x, cpu_stats), rtol=1e-6, atol=1e-6)


# ---- colour, memory maps, random crops, per-dataset defaults ---------------------------------------

def test_norm_stats_per_channel_of_a_memory_map_in_chunks(tmp_path, monkeypatch) -> None:
    """C = 3 with channels of different statistics, read 5 images at a time from a memory map: the
    same bits as the in-memory computation (exact integer sums), and per channel the float64 reference."""
    from cnn_gpu.data import transforms

    rng = np.random.default_rng(3)
    x = np.stack([rng.integers(0, 64, (23, 6, 5)), rng.integers(100, 256, (23, 6, 5)),
                  rng.integers(0, 256, (23, 6, 5))], axis=-1).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    whole = compute_norm_stats(x)
    monkeypatch.setattr(transforms, "NORM_STATS_CHUNK_VALUES", 5 * 6 * 5 * 3)
    chunked = compute_norm_stats(mm)
    np.testing.assert_array_equal(chunked.mean, whole.mean)
    np.testing.assert_array_equal(chunked.std, whole.std)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(chunked.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(chunked.std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    assert chunked.mean[0] < 0.25 and chunked.mean[1] > 0.5  # really per channel
    # Float input, chunked: two passes in float64 against NumPy's one (other summation order).
    floats = compute_norm_stats(ref)
    np.testing.assert_allclose(floats.std, ref.std(axis=(0, 1, 2)), rtol=1e-12)
    normalized = normalize(mm[:4], chunked)
    np.testing.assert_allclose(normalized, (ref[:4] - chunked.mean) / chunked.std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no training images"):
        compute_norm_stats(np.zeros((0, 4, 4, 3), np.uint8))


def crop_reference(images: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Pad every side with zeros, then cut the (H, W) window at offset (i, j) of each image."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return np.stack([padded[n, i:i + h, j:j + w] for n, (i, j) in enumerate(offsets)])


def test_random_crop_is_a_padded_crop() -> None:
    from cnn_gpu.data import random_crop

    x = images_uint8(64, 8, 6, 3, seed=7)
    out = random_crop(x, 4, np.random.default_rng(1))
    shifts = np.random.default_rng(1).integers(-4, 5, size=(64, 2))  # the draws random_shift makes
    np.testing.assert_array_equal(out, crop_reference(x, 4, 4 - shifts))
    offsets = 4 - shifts
    assert offsets.min() == 0 and offsets.max() == 8  # every window position of the padded image


def test_augmentation_defaults_per_dataset() -> None:
    from cnn_gpu.data import AUGMENT_DEFAULTS, augmentation_defaults

    assert set(AUGMENT_DEFAULTS) == {"mnist", "fashion-mnist", "cifar10", "cifar100", "images"}
    assert augmentation_for("cifar10") == Augmentation(max_shift=4, hflip=True)
    assert augmentation_for("CIFAR-100", erase=0.25) == Augmentation(max_shift=4, hflip=True, erase=0.25)
    assert augmentation_for("images", image_size=(32, 32)) == Augmentation(max_shift=4, hflip=True)
    assert augmentation_for("images", image_size=(64, 48)).max_shift == 6
    assert augmentation_for("images", image_size=(5, 5)).max_shift == 1
    assert augmentation_for("images", max_shift=0, hflip=False) == Augmentation()
    assert augmentation_for("fashion-mnist", hflip=False) == Augmentation(max_shift=2)
    assert augmentation_defaults("mnist").hflip is False and augmentation_defaults("cifar10").hflip is True
    with pytest.raises(ValueError, match="give image_size"):
        augmentation_for("images")
    with pytest.raises(ValueError, match="unknown dataset"):
        augmentation_for("svhn")


def test_colour_augmentation_keeps_the_channels_together() -> None:
    """A flip or crop moves whole pixels: each channel of an augmented colour batch is that channel
    augmented alone with the same draws."""
    x = images_uint8(32, 8, 8, 1, seed=3)
    colour = np.concatenate([x, 255 - x, x // 2], axis=-1)
    policy = augmentation_for("cifar10", max_shift=2)
    out = policy(colour, np.random.default_rng(0))
    for k in range(3):
        np.testing.assert_array_equal(out[..., k:k + 1], policy(colour[..., k:k + 1], np.random.default_rng(0)))
    assert not np.array_equal(out, colour)
