"""fit(), evaluate() and the metrics, on small synthetic data (CPU, a few seconds in all)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cnn_gpu.backend import cupy_available, cupy_unavailable_reason
from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.data import Augmentation
from cnn_gpu.models import seed_cnn
from cnn_gpu.optim import SGD, CosineLR
from cnn_gpu.training import (DeviceOutOfMemory, TrainingDiverged, confusion_matrix, evaluate, fit,
                              is_out_of_memory, per_class_accuracy)

from .helpers import assert_same_predictions
from .train_fixtures import bars, small_cnn

HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                "test_accuracy", "lr", "seconds", "images_per_second", "ranks"}


def _run(out_dir, epochs=3, resume=None, lr=0.05, model=None, augment=None, **kwargs):
    model = model if model is not None else small_cnn()
    opt = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = CosineLR(opt, total_epochs=3)
    result = fit(model, opt, bars(192, 0), epochs=epochs, batch_size=32, schedule=schedule,
                 val_data=bars(64, 1), test_data=bars(64, 2), augment=augment, seed=5,
                 out_dir=out_dir, resume=resume, progress=False, log=None, **kwargs)
    return model, opt, result


def test_fit_lowers_the_loss_and_writes_history_and_checkpoints(tmp_path):
    model, _, result = _run(tmp_path, metadata={"dataset": "bars"})
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all(set(r) == HISTORY_KEYS for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.9  # three bars: a chance level of 1/3
    assert history[1]["lr"] < history[0]["lr"]  # the cosine schedule ran
    last = load_checkpoint(tmp_path / "last.npz")
    assert last.epoch == 3 and last.metadata["dataset"] == "bars" and "cnn_gpu_version" in last.metadata
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(last.model_state[key], value)
    assert (tmp_path / "best.npz").exists() and result.best_epoch >= 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_checkpoint_metadata_reads_without_pickle(tmp_path):
    _run(tmp_path, epochs=1, metadata={"model": {"name": "seed_cnn", "kwargs": {"num_classes": 3}}})
    with np.load(tmp_path / "last.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["metadata"]))
        assert data["metadata"].dtype.kind == "U"
        assert data["norm/mean"].shape == (1,) and data["norm/std"].shape == (1,)
    assert meta["model"] == {"name": "seed_cnn", "kwargs": {"num_classes": 3}}


def test_best_epoch_follows_validation_never_test(tmp_path):
    """Validation labels are right and test labels are shifted by one class, so as the model
    learns, validation accuracy rises while test accuracy falls: choosing on test would pick
    epoch 1; fit must pick the validation maximum."""
    train, val = bars(192, 0), bars(64, 1)
    test_x, test_y = bars(64, 2)
    model = small_cnn()
    opt = SGD(model.parameters(), lr=0.002)  # slow enough that accuracy moves over the epochs
    result = fit(model, opt, train, epochs=4, batch_size=32, val_data=val, test_data=(test_x, (test_y + 1) % 3),
                 seed=1, out_dir=tmp_path, progress=False, log=None)
    val_acc = [r["val_accuracy"] for r in result.history]
    test_acc = [r["test_accuracy"] for r in result.history]
    assert result.best_epoch == 1 + int(np.argmax(val_acc))  # the first maximum
    assert result.best_epoch != 1 + int(np.argmax(test_acc))
    best = load_checkpoint(tmp_path / "best.npz")
    assert best.epoch == result.best_epoch and best.best_score == max(val_acc)


def test_without_validation_best_is_last(tmp_path):
    model = small_cnn()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    result = fit(model, opt, bars(96, 0), epochs=2, batch_size=32, test_data=bars(32, 2), out_dir=tmp_path,
                 progress=False, log=None)
    assert result.best_epoch == 2 and "val_accuracy" not in result.history[0]
    assert load_checkpoint(tmp_path / "best.npz").epoch == 2


def test_resume_reproduces_the_straight_run_bit_for_bit(tmp_path):
    """3 epochs straight vs 1 epoch, stop, resume to 3: momentum, cosine schedule, batch-norm
    buffers, augmentation and dropout all continue identically."""
    augment = Augmentation(max_shift=1, hflip=True)
    make = lambda: small_cnn(dropout=True, batch_norm=True)  # noqa: E731
    straight, straight_opt, straight_result = _run(tmp_path / "straight", model=make(), augment=augment)
    _run(tmp_path / "split", epochs=1, model=make(), augment=augment)
    resumed, resumed_opt, resumed_result = _run(tmp_path / "split", model=make(), augment=augment,
                                                resume=tmp_path / "split" / "last.npz")
    for key, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    for key, value in straight_opt.state_dict().items():
        np.testing.assert_array_equal(resumed_opt.state_dict()[key], value, err_msg=key)
    timing = {"seconds", "images_per_second"}
    strip = lambda h: [{k: v for k, v in r.items() if k not in timing} for r in h]  # noqa: E731
    assert strip(resumed_result.history) == strip(straight_result.history)
    assert resumed_result.best_epoch == straight_result.best_epoch


def test_resume_past_the_end_does_nothing(tmp_path):
    _run(tmp_path, epochs=2)
    model, _, result = _run(tmp_path, epochs=2, resume=tmp_path / "last.npz")
    assert len(result.history) == 2


def test_nan_loss_stops_at_once_and_keeps_earlier_checkpoints(tmp_path):
    model = small_cnn()
    last_layer = model.layers[-1]
    calls = {"n": 0}
    original = last_layer.forward
    steps_per_epoch = 192 // 32

    def poisoned(x):
        calls["n"] += 1
        y = original(x)
        if calls["n"] == steps_per_epoch + 2 + 3:  # epoch 2, step 3 (after epoch 1's val and test passes)
            y = y * np.float32("nan")
        return y

    last_layer.forward = poisoned
    with pytest.raises(TrainingDiverged) as info:
        _run(tmp_path, model=model)
    assert (info.value.epoch, info.value.step) == (2, 3)
    message = str(info.value)
    assert "epoch 2" in message and "step 3" in message and "lower learning rate" in message
    ckpt = load_checkpoint(tmp_path / "last.npz")  # epoch 1's checkpoint is intact
    assert ckpt.epoch == 1 and len(json.loads((tmp_path / "history.json").read_text())) == 1
    assert all(np.isfinite(v).all() for v in ckpt.model_state.values())


def test_a_finite_but_exploding_loss_stops_too_and_keeps_earlier_checkpoints(tmp_path):
    """Logits scaled by -1e6 in epoch 2: the loss stays finite in float32 but is far above any loss
    a classifier starts from (divergence_threshold: 100x a uniform guess's)."""
    from cnn_gpu.training.loop import divergence_threshold
    model = small_cnn()
    last_layer, original = model.layers[-1], model.layers[-1].forward
    calls = {"n": 0}

    def exploding(x):
        calls["n"] += 1
        y = original(x)
        return y * np.float32(-1e6) if calls["n"] > 192 // 32 + 2 else y  # confidently wrong from epoch 2

    last_layer.forward = exploding
    with pytest.raises(TrainingDiverged, match="exploded to") as info:
        _run(tmp_path, model=model)
    assert info.value.epoch == 2 and divergence_threshold(3) == pytest.approx(100 * math.log(3))
    assert load_checkpoint(tmp_path / "last.npz").epoch == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way to inf
def test_huge_learning_rate_diverges(tmp_path):
    with pytest.raises(TrainingDiverged, match="lower learning rate"):
        _run(tmp_path, lr=1e6)


def test_labels_out_of_range_are_refused_before_training():
    model = small_cnn()
    images, labels = bars(32, 0)
    labels[3] = 7
    with pytest.raises(ValueError, match=r"training labels must be in \[0, 3\).*0 to 7"):
        fit(model, SGD(model.parameters(), lr=0.1), (images, labels), epochs=1, progress=False, log=None)


def test_out_of_memory_names_the_batch_size(tmp_path, monkeypatch):
    model = small_cnn()

    def no_memory(x):
        raise MemoryError("simulated")

    monkeypatch.setattr(model, "forward", no_memory)
    with pytest.raises(DeviceOutOfMemory, match="batch size 32.*--batch-size 16"):
        _run(tmp_path, model=model)


def test_cupy_out_of_memory_is_recognised_by_name():
    fake = type("OutOfMemoryError", (Exception,), {"__module__": "cupy.cuda.memory"})
    assert is_out_of_memory(fake("out of memory allocating 1 GiB")) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("no"))


def test_evaluate_matches_a_direct_forward_and_keeps_the_mode():
    model = small_cnn(batch_norm=True)
    images, labels = bars(50, 3)
    x = images.astype(np.float32) / 255
    model.train()
    loss, acc, predictions = evaluate(model, x, labels, batch_size=16)
    assert model.training  # restored
    model.eval()
    logits = model.forward(x)
    assert_same_predictions(predictions, logits)  # batches of 16 vs one of 50: equal to rounding
    assert acc == pytest.approx(float((predictions == labels).mean()))
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = -(shifted[np.arange(50), labels] - np.log(np.exp(shifted).sum(axis=1))).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_confusion_matrix_and_per_class_accuracy():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(labels, predictions, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    per_class = per_class_accuracy(labels, predictions, 4)
    np.testing.assert_allclose(per_class[:3], [0.5, 2 / 3, 1.0])
    assert math.isnan(per_class[3])


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason=f"needs CuPy and a CUDA device: {cupy_unavailable_reason()}")
def test_fit_on_the_gpu_matches_the_cpu(tmp_path):
    """The same run on CuPy and NumPy: the data goes to the device once, and the results agree
    to float32 rounding (not bit for bit: the GPU sums in another order)."""
    cpu_model, _, cpu = _run(tmp_path / "cpu", model=small_cnn(batch_norm=True), augment=Augmentation(1, True))
    gpu_model, _, gpu = _run(tmp_path / "gpu", model=small_cnn(batch_norm=True).to("gpu"),
                             augment=Augmentation(1, True))
    assert gpu_model.backend == "cupy"
    for c, g in zip(cpu.history, gpu.history):
        assert g["train_loss"] == pytest.approx(c["train_loss"], rel=1e-3, abs=1e-4)
        assert abs(g["test_accuracy"] - c["test_accuracy"]) <= 2 / 64
    ckpt = load_checkpoint(tmp_path / "gpu" / "last.npz")  # written from device arrays
    for key, value in cpu_model.state_dict().items():
        np.testing.assert_allclose(ckpt.model_state[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


def test_evaluate_with_hflip_averages_the_two_views(rng):
    """hflip=True: predictions and loss from the mean of the probabilities of x and of x mirrored."""
    from cnn_gpu.functional import softmax
    model = seed_cnn(seed=4, dtype="float64")
    x = rng.standard_normal((12, 28, 28, 1))
    y = rng.integers(0, 10, 12)
    loss, acc, predicted = evaluate(model, x, y, batch_size=5, hflip=True)
    model.eval()
    mean = (softmax(model.forward(x)) + softmax(model.forward(x[:, :, ::-1, :].copy()))) / 2
    assert_same_predictions(predicted, mean)  # batches of 5 vs one of 12: equal to rounding
    assert acc == pytest.approx((mean.argmax(axis=1) == y).mean())
    assert loss == pytest.approx(-np.log(mean[np.arange(12), y]).mean(), rel=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason=f"needs CuPy and a CUDA device: {cupy_unavailable_reason()}")
@pytest.mark.parametrize("batch_norm", [False, True])
def test_evaluate_with_hflip_on_the_gpu_matches_the_cpu(rng, batch_norm):
    """evaluate(hflip=True) on CuPy gives the CPU's predictions and loss (float32 rounding)."""
    cpu_model = seed_cnn(seed=4, batch_norm=batch_norm)
    gpu_model = seed_cnn(seed=4, batch_norm=batch_norm).to("gpu")
    x = rng.standard_normal((40, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    cpu_loss, cpu_acc, cpu_predicted = evaluate(cpu_model, x, y, batch_size=16, hflip=True)
    import cupy
    gpu_loss, gpu_acc, gpu_predicted = evaluate(gpu_model, cupy.asarray(x), cupy.asarray(y), batch_size=16,
                                                hflip=True)
    assert isinstance(gpu_predicted, np.ndarray)
    assert (gpu_predicted != cpu_predicted).sum() <= 1  # a near-tie may flip under float32
    assert gpu_acc == pytest.approx(cpu_acc, abs=1 / 40)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)


def test_the_bar_says_the_first_step_compiles_and_only_in_the_first_epoch(monkeypatch):
    """The first step of a run on the CPU compiles the kernels Numba's cache lacks (a minute for a
    ResNet-20 the first time): the bar says so meanwhile, instead of sitting at 0% unexplained."""
    pytest.importorskip("tqdm")
    from cnn_gpu import cpu
    from cnn_gpu.training import progress
    notes = []
    monkeypatch.setattr(progress.ProgressBar, "note", lambda self, text: notes.append(text))
    monkeypatch.setattr(cpu, "enabled", lambda: True)
    model = small_cnn()
    fit(model, SGD(model.parameters(), lr=0.05), bars(64, 0), epochs=2, batch_size=32, progress=True, log=None)
    assert len(notes) == 1 and "compiling" in notes[0], notes
    monkeypatch.setattr(cpu, "enabled", lambda: False)  # the NumPy code: nothing to compile
    notes.clear()
    fit(model, SGD(model.parameters(), lr=0.05), bars(64, 0), epochs=1, batch_size=32, progress=True, log=None)
    assert notes == []
