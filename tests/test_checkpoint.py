"""Checkpoint files: round trip, model rebuilding, and clear errors for damaged or foreign files."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cnn_gpu.checkpoint import Checkpoint, build_model, checkpoint_file, load_checkpoint, restore, save_checkpoint
from cnn_gpu.models import seed_cnn
from cnn_gpu.optim import SGD, StepLR

META = {"model": {"name": "seed_cnn", "kwargs": {"num_classes": 10, "batch_norm": True}},
        "dataset": "fashion-mnist", "class_names": [f"c{i}" for i in range(10)]}


def _checkpoint(model=None) -> Checkpoint:
    model = model or seed_cnn(batch_norm=True, seed=3)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # one step, so the momentum buffers exist
        p.grad = np.ones_like(p.data)
    opt.step()
    schedule = StepLR(opt, step_size=2)
    schedule.step()
    return Checkpoint(model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                      schedule_state=schedule.state_dict(), epoch=1, seed=7,
                      norm_mean=np.array([0.28]), norm_std=np.array([0.35]), metadata=META,
                      history=[{"epoch": 1, "train_loss": 0.5}], best_epoch=1, best_score=0.8)


def test_round_trip_and_rebuild(tmp_path):
    ckpt = _checkpoint()
    save_checkpoint(tmp_path / "c.npz", ckpt)
    loaded = load_checkpoint(tmp_path / "c.npz")
    assert (loaded.epoch, loaded.seed, loaded.best_epoch, loaded.best_score) == (1, 7, 1, 0.8)
    assert loaded.metadata == META and loaded.history == ckpt.history
    model = loaded.build_model()  # seed_cnn(batch_norm=True) from the metadata, weights loaded
    for key, value in ckpt.model_state.items():
        np.testing.assert_array_equal(model.state_dict()[key], value)
    opt = SGD(model.parameters(), lr=1.0, momentum=0.9)
    schedule = StepLR(opt, step_size=2)
    restore(loaded, model, opt, schedule)
    assert schedule.epoch == 1 and opt.steps == 1 and opt.lr == pytest.approx(0.1)
    np.testing.assert_array_equal(opt.state_dict()["0.velocity"], ckpt.optimizer_state["0.velocity"])


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "empty"])
def test_damaged_file_gives_a_clear_error(tmp_path, damage):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _checkpoint())
    data = path.read_bytes()
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip_bytes":
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, needle", [
    (b"shopping: milk, eggs\n", "not a .npz checkpoint (a zip archive): a file starting with b'shop'"),
    (None, "is a single .npy array, not a .npz checkpoint"),
])
def test_a_file_of_another_kind_is_named_without_a_pickle_hint(tmp_path, content, needle):
    # np.load reads anything that is neither a zip nor a .npy file as a pickle, and its own error
    # then suggests allow_pickle=True: the message must say what the file is, and nothing of that.
    path = tmp_path / "c.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="^" + re.escape(str(path))) as info:
        load_checkpoint(path)
    assert needle in str(info.value) and "pickle" not in str(info.value)


def test_missing_file_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.npz")
    seed_cnn().save(tmp_path / "weights.npz")  # a bare model state, not a training checkpoint
    with pytest.raises(ValueError, match="not a cnn_gpu training checkpoint"):
        load_checkpoint(tmp_path / "weights.npz")


def test_wrong_architecture_is_refused_by_name_and_shape(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _checkpoint())
    ckpt = load_checkpoint(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="state does not match the model"):
        restore(ckpt, seed_cnn(batch_norm=False))
    with pytest.raises(ValueError, match="model builder 'resnet'"):
        build_model({"model": {"name": "resnet"}})
    with pytest.raises(ValueError, match="does not say how to build"):
        build_model({})


def test_a_checkpoint_that_cannot_be_written_names_its_path(tmp_path):
    # atomic_write writes a temporary file beside the target first; the error must name the
    # target the user asked for, not that temporary name.
    (tmp_path / "taken").write_text("a file, not a folder")
    target = tmp_path / "taken" / "c.npz"
    with pytest.raises(OSError, match="^cannot write " + re.escape(str(target)) + ": ") as info:
        save_checkpoint(target, _checkpoint())
    assert ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]  # nothing left behind


def test_a_run_folder_stands_for_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    for name in ("best.npz", "last.npz"):
        save_checkpoint(run / name, _checkpoint())
    assert checkpoint_file(run) == run / "best.npz"
    assert checkpoint_file(run, "last.npz") == run / "last.npz"
    assert checkpoint_file(run / "last.npz") == run / "last.npz"  # a file is itself
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="other is a folder without best.npz"):
        checkpoint_file(tmp_path / "other")
