"""The counter-based generator and the device data pipeline (cnn_gpu/cuda/rng.py, cuda/batches.py,
kernels/batch.cu).

Without a GPU: the NumPy Philox against Random123's known-answer vectors; kernels/batch.cu compiled
for the host (tests/cuda_host.py) and run through the modules' own launchers behind a NumPy stand-in
for CuPy, against the NumPy references, bit for bit; the pipeline without augmentation against
BatchIterator + normalize, bit for bit; the draws' distribution. With a GPU: the same comparisons
on the device, and the batches of a captured graph replayed step after step.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cnn_gpu.backend import to_numpy
from cnn_gpu.cuda import batches, rng
from cnn_gpu.data import Augmentation, BatchIterator, NormStats, normalize

from .conftest import requires_gpu
from .cuda_host import CXX, host_loader

# Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words) -> 4 words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
FLOATS = ["float32", "float64"]
AUGMENTS = {"none": None, "shift": Augmentation(max_shift=2), "flip": Augmentation(hflip=True),
            "both": Augmentation(max_shift=1, hflip=True)}
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on the PATH")


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_numpy_philox_gives_random123s_known_answers(counter, key, expected):
    np.testing.assert_array_equal(rng.philox4x32_10(counter, key), np.array(expected, dtype=np.uint32))


def test_numpy_philox_is_elementwise_over_counters():
    counters = np.array([k[0] for k in KAT[:1]] * 3 + [KAT[2][0]], dtype=np.uint32)
    out = rng.philox4x32_10(counters, KAT[0][1])
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[3], rng.philox4x32_10(KAT[2][0], KAT[0][1]))


def test_uniforms_lie_in_zero_one_and_look_uniform():
    for dtype in FLOATS:
        u = rng.uniform_reference(200_000, seed=7, c1=3, dtype=dtype)
        assert u.dtype == dtype and u.min() >= 0 and u.max() < 1
        counts = np.histogram(u, bins=10, range=(0, 1))[0]
        assert np.all(np.abs(counts - 20_000) < 5 * np.sqrt(20_000)), counts  # 5 sigma of a binomial


def test_seeds_and_streams_give_other_numbers():
    a = rng.uniform_reference(64, seed=1)
    assert not np.array_equal(a, rng.uniform_reference(64, seed=2))
    assert not np.array_equal(a, rng.uniform_reference(64, seed=1, c1=1))
    assert rng.key_of(2**32 + 5) == (5, 1)
    with pytest.raises(ValueError, match="seed must be in"):
        rng.key_of(-1)


def test_epoch_order_is_batch_iterators():
    loader = BatchIterator(np.zeros((37, 2, 2, 1), np.uint8), np.zeros(37, np.int64), 8, seed=5)
    for epoch in (0, 3):
        np.testing.assert_array_equal(batches.epoch_order(37, 5, epoch), loader.order(epoch))


def test_augmentations_the_device_cannot_run_are_named():
    assert batches.check_augment(None) == (0, False)
    assert batches.check_augment(Augmentation(max_shift=3, hflip=True)) == (3, True)
    with pytest.raises(ValueError, match="no random erasing"):
        batches.check_augment(Augmentation(erase=0.5))
    with pytest.raises(ValueError, match="not function"):
        batches.check_augment(lambda x, r: x)


def _dataset(seed=0, n=23, h=6, w=5, c=2):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    stats = NormStats(mean=g.uniform(0.2, 0.5, c), std=g.uniform(0.2, 0.4, c))
    return images, g.integers(0, 10, n).astype(np.int64), stats


def test_reference_without_augmentation_is_batch_iterator_and_normalize():
    images, labels, stats = _dataset()
    loader = BatchIterator(images, labels, 8, seed=3, transform=lambda x: normalize(x, stats))
    order = batches.epoch_order(len(labels), 3, 1)
    mean, inv_std = np.asarray(stats.mean, np.float32), np.asarray(1.0 / stats.std, np.float32)
    for step, (x, _) in enumerate(loader.batches(1)):
        got = batches.reference_batch(images, order, step, 8, len(x), 3, 1, 0, False, mean, inv_std, np.float32)
        np.testing.assert_array_equal(got, x)


def test_reference_shifts_and_mirrors_like_the_host_augmentation():
    """Each row of an augmented batch is its image mirrored or not, then shifted by some (dy, dx) in
    [-s, s]^2 with zeros shifted in: the host's random_hflip and random_shift, for that row's draws."""
    images, _, stats = _dataset(n=40)
    order = np.arange(40)
    out = batches.reference_batch(images, order, 0, 40, 40, 11, 2, 1, True, np.zeros(2, np.float64),
                                  np.full(2, 255.0), np.float64)
    seen_flip, seen_shift = set(), set()
    for b in range(40):
        candidates = []
        for flip in (False, True):
            img = images[b, :, ::-1] if flip else images[b]
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    shifted = np.zeros_like(img)
                    shifted[max(dy, 0):img.shape[0] + min(dy, 0), max(dx, 0):img.shape[1] + min(dx, 0)] = \
                        img[max(-dy, 0):img.shape[0] - max(dy, 0), max(-dx, 0):img.shape[1] - max(dx, 0)]
                    if np.allclose(out[b], shifted, rtol=0, atol=1e-9):  # pixel units: v / 255 * 255
                        candidates.append((flip, dy, dx))
        assert candidates, f"row {b} is no mirror/shift of its image"
        seen_flip.add(candidates[0][0])
        seen_shift.add(candidates[0][1:])
    assert seen_flip == {False, True} and len(seen_shift) >= 6


def test_draws_are_uniform_over_the_shifts_and_fair_for_the_mirror():
    n, s = 90_000, 2
    counters = np.zeros((n, 4), np.uint32)
    counters[:, 0], counters[:, 1], counters[:, 2] = np.arange(n), 4, batches.AUGMENT_STREAM
    words = rng.philox4x32_10(counters, rng.key_of(9)).astype(np.uint64)
    dy = ((words[:, 1] * np.uint64(2 * s + 1)) >> np.uint64(32)).astype(np.int64) - s
    counts = np.bincount(dy + s, minlength=2 * s + 1)
    assert counts.shape == (5,) and np.all(np.abs(counts - n / 5) < 5 * np.sqrt(n / 5)), counts
    flips = (words[:, 0] < 0x80000000).mean()
    assert abs(flips - 0.5) < 5 * 0.5 / np.sqrt(n)


# ---- kernels/batch.cu on the host --------------------------------------------------------------------

class _HostArray(np.ndarray):
    """A NumPy array with cupy.ndarray's set()."""

    def set(self, values):
        self[...] = values


def _host(a):
    return np.asarray(a).view(_HostArray)


@pytest.fixture
def host_cuda(monkeypatch, tmp_path_factory):
    """cuda/rng.py and cuda/batches.py with a NumPy stand-in for cupy and batch.cu compiled for the host."""
    directory = tmp_path_factory.getbasetemp() / "batch_host_kernels"
    directory.mkdir(exist_ok=True)
    fake = SimpleNamespace(
        empty=lambda shape, dtype=np.float64: _host(np.empty(shape, dtype)),
        zeros=lambda shape, dtype=np.float64: _host(np.zeros(shape, dtype)),
        arange=lambda n, dtype=None: _host(np.arange(n, dtype=dtype)),
        asarray=lambda a, dtype=None: _host(np.asarray(a, dtype=dtype)),
        ascontiguousarray=lambda a: _host(np.ascontiguousarray(a)))
    for module in (rng, batches):
        monkeypatch.setattr(module, "require_cupy", lambda: fake)
    monkeypatch.setattr(rng.loader, "load_module", host_loader(directory))
    return fake


@needs_cxx
@pytest.mark.parametrize("dtype", FLOATS)
def test_uniform_kernel_on_the_host_is_the_reference_bit_for_bit(host_cuda, dtype):
    got = rng.uniform(1000, seed=2**40 + 3, c1=1, c2=2, c3=3, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(got), rng.uniform_reference(1000, 2**40 + 3, 1, 2, 3, dtype))


@needs_cxx
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("augment", list(AUGMENTS), ids=list(AUGMENTS))
def test_pipeline_on_the_host_is_the_reference_bit_for_bit(host_cuda, augment, dtype):
    images, labels, stats = _dataset()
    data = batches.DeviceBatches(images, labels, 8, seed=4, norm_stats=stats, augment=AUGMENTS[augment], dtype=dtype)
    shift, flip = batches.check_augment(AUGMENTS[augment])
    for epoch in (0, 1):
        data.begin_epoch(epoch)
        order = batches.epoch_order(23, 4, epoch)
        for step in range(data.steps):  # 8, 8, then the last 7
            x, y = data.fill(data.rows(step))
            expected = batches.reference_batch(images, order, step, 8, data.rows(step), 4, epoch, shift, flip,
                                               np.asarray(data.mean), np.asarray(data.inv_std), dtype)
            np.testing.assert_array_equal(np.asarray(x), expected)
            np.testing.assert_array_equal(np.asarray(y), labels[order[step * 8:step * 8 + data.rows(step)]])
            data.advance()
        assert int(data.step[0]) == 3


@needs_cxx
def test_pipeline_without_augmentation_is_batch_iterators_batches(host_cuda):
    images, labels, stats = _dataset(n=20)
    data = batches.DeviceBatches(images, labels, 6, seed=1, norm_stats=stats)
    loader = BatchIterator(images, labels, 6, seed=1, transform=lambda x: normalize(x, stats))
    data.begin_epoch(2)
    for step, (x, y) in enumerate(loader.batches(2)):
        got_x, got_y = data.fill(data.rows(step))
        np.testing.assert_array_equal(np.asarray(got_x), x)
        np.testing.assert_array_equal(np.asarray(got_y), y)
        data.advance()


def test_pipeline_refuses_what_it_cannot_take(host_cuda):
    images, labels, stats = _dataset()
    with pytest.raises(ValueError, match="uint8 images"):
        batches.DeviceBatches(images.astype(np.float32), labels, 4, 0, stats)
    with pytest.raises(ValueError, match="channels"):
        batches.DeviceBatches(images, labels, 4, 0, NormStats(np.zeros(3), np.ones(3)))


# ---- on a GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_uniform_kernel_on_the_gpu_is_the_reference_bit_for_bit(dtype):
    np.testing.assert_array_equal(to_numpy(rng.uniform(5000, 12, 1, 0, 2, dtype)),
                                  rng.uniform_reference(5000, 12, 1, 0, 2, dtype))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("augment", list(AUGMENTS), ids=list(AUGMENTS))
def test_pipeline_on_the_gpu_is_the_reference_bit_for_bit(augment, dtype):
    images, labels, stats = _dataset(n=50, h=28, w=28, c=1)
    data = batches.DeviceBatches(images, labels, 16, seed=6, norm_stats=stats, augment=AUGMENTS[augment], dtype=dtype)
    shift, flip = batches.check_augment(AUGMENTS[augment])
    data.begin_epoch(5)
    order = batches.epoch_order(50, 6, 5)
    for step in range(data.steps):
        x, y = data.fill(data.rows(step))
        expected = batches.reference_batch(images, order, step, 16, data.rows(step), 6, 5, shift, flip,
                                           to_numpy(data.mean), to_numpy(data.inv_std), dtype)
        np.testing.assert_array_equal(to_numpy(x), expected)
        np.testing.assert_array_equal(to_numpy(y), labels[order[step * 16:step * 16 + data.rows(step)]])
        data.advance()


@pytest.mark.gpu
@requires_gpu
def test_a_captured_graph_makes_the_batch_of_each_step():
    """The graph reads the step and the epoch from the device and advances the step: replayed three
    times per epoch it writes the batches of steps 0, 1, 2 of each epoch (what makes a captured
    epoch see a new batch every step, and every epoch new draws)."""
    from cnn_gpu.backend import require_cupy
    cupy = require_cupy()
    images, labels, stats = _dataset(n=48, h=8, w=8, c=3)
    data = batches.DeviceBatches(images, labels, 16, seed=2, norm_stats=stats, augment=AUGMENTS["both"])
    data.begin_epoch(0)
    data.fill(16)  # compile outside the capture
    data.step.fill(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        data.fill(16)
        data.advance()
        graph = stream.end_capture()
    for epoch in (0, 1):  # the epoch too is read from the device: its order and its draws change
        data.begin_epoch(epoch)
        order = batches.epoch_order(48, 2, epoch)
        for step in range(3):
            graph.launch()  # on the current stream, after begin_epoch's copies on it
            cupy.cuda.get_current_stream().synchronize()
            expected = batches.reference_batch(images, order, step, 16, 16, 2, epoch, 1, True, to_numpy(data.mean),
                                               to_numpy(data.inv_std), np.float32)
            np.testing.assert_array_equal(to_numpy(data.x), expected)
        assert int(data.step[0]) == 3


@needs_cxx
def test_the_host_stand_in_refuses_arguments_the_kernel_does_not_declare(host_cuda):
    """The launch check can fail: a scalar of the wrong type, or an array of the wrong dtype."""
    f = rng.function("gather_labels<long long>", np.float32)
    labels, order, y = np.zeros(4, np.int64), np.arange(4, dtype=np.int64), np.zeros(4, np.int64)
    step = np.zeros(1, np.int32)
    f((1,), (32,), (labels, order, step, y, np.int32(4), np.int32(4)))
    with pytest.raises(AssertionError, match="want int32"):
        f((1,), (32,), (labels, order, step, y, np.int64(4), np.int32(4)))
    with pytest.raises(AssertionError, match="want int32"):
        f((1,), (32,), (labels, order, step.astype(np.int64), y, np.int32(4), np.int32(4)))
