"""The weight average (cnn_gpu.ema) alone and inside fit(): the recurrence, evaluating with it,
checkpoints and resume, and `cnn-gpu train --ema`."""
from __future__ import annotations

import numpy as np
import pytest

from cnn_gpu.backend import cupy_available, cupy_unavailable_reason, to_device
from cnn_gpu.checkpoint import load_checkpoint
from cnn_gpu.ema import WeightEMA
from cnn_gpu.optim import SGD, CosineLR
from cnn_gpu.training import evaluate, fit

from .train_fixtures import bars, small_cnn


def _state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def test_update_follows_the_recurrence_with_its_warm_up():
    """After each step, average <- d * average + (1 - d) * weights with d = min(decay, (1+n)/(10+n)),
    computed here in float64 from the weights of every step."""
    model = small_cnn(batch_norm=True).to("cpu")
    rng = np.random.default_rng(0)
    ema = WeightEMA(model, decay=0.6)
    expected = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    for n in range(1, 8):
        for p in model.parameters():
            p.data += rng.standard_normal(p.shape).astype(p.data.dtype)
        for _, value, _, _ in model.named_buffers():
            value += 0.5
        d = min(0.6, (1 + n) / (10 + n))  # 0.18, 0.25, ... then 0.6 from n = 12.5: the warm-up throughout
        assert ema.rate() == d
        ema.update()
        for key, value in model.state_dict().items():
            expected[key] = d * expected[key] + (1 - d) * value
    assert ema.updates == 7
    for key, average in ema.state_dict().items():
        np.testing.assert_allclose(average, expected[key], rtol=1e-6, atol=1e-6, err_msg=key)  # float32 steps


def test_the_rate_reaches_the_decay():
    ema = WeightEMA(small_cnn(), decay=0.9)
    ema.updates = 1000
    assert ema.rate() == 0.9


def test_applied_evaluates_the_averages_and_gives_the_weights_back_bit_for_bit():
    model = small_cnn(batch_norm=True)
    ema = WeightEMA(model, decay=0.5)
    for p in model.parameters():
        p.data *= 1.5
    ema.update()
    trained = _state(model)
    x, y = bars(32, 1)
    with ema.applied():
        inside = _state(model)
        averaged_accuracy = evaluate(model, x.astype(np.float32), y)[1]
    for key, value in ema.state_dict().items():
        np.testing.assert_array_equal(inside[key], value, err_msg=key)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)
    assert any(not np.array_equal(inside[k], trained[k]) for k in trained)  # the swap did something
    assert 0.0 <= averaged_accuracy <= 1.0


def test_applied_gives_the_weights_back_after_an_error():
    model = small_cnn()
    ema = WeightEMA(model, decay=0.5)
    for p in model.parameters():
        p.data += 1.0
    trained = _state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied():
            raise RuntimeError("inside")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, trained[key])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_a_decay_outside_zero_to_one_is_refused(decay):
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightEMA(small_cnn(), decay=decay)


def test_averages_of_another_model_are_refused_naming_the_entry():
    ema = WeightEMA(small_cnn(), decay=0.9)
    state = ema.state_dict()
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({k: v for k, v in list(state.items())[1:]}, 3)
    key = next(iter(state))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ema.load_state_dict({**state, key: state[key].astype(np.float64)}, 3)


# ---- inside fit() --------------------------------------------------------------------------------

def _fit(out_dir, epochs=3, resume=None, ema_decay=0.9):
    model = small_cnn(batch_norm=True)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    result = fit(model, opt, bars(192, 0), epochs=epochs, batch_size=32, schedule=CosineLR(opt, total_epochs=3),
                 val_data=bars(64, 1), test_data=bars(64, 2), seed=5, out_dir=out_dir, resume=resume,
                 progress=False, log=None, ema_decay=ema_decay)
    return model, result


def test_fit_evaluates_the_average_and_records_the_trained_weights_too(tmp_path):
    model, result = _fit(tmp_path)
    record = result.history[-1]
    for name in ("val", "test"):
        assert {f"{name}_accuracy", f"raw_{name}_accuracy", f"{name}_loss", f"raw_{name}_loss"} <= set(record)
    assert record["ema_decay"] == 0.9
    last = load_checkpoint(tmp_path / "last.npz")
    assert last.ema_state is not None and last.ema_updates == 3 * 6  # 192 images in batches of 32
    for key, value in model.state_dict().items():  # model/ holds the weights as trained
        np.testing.assert_array_equal(last.model_state[key], value)
    # what the record's val accuracy measured: the averages, which build_model() loads
    built = last.build_model()
    for key, value in built.state_dict().items():
        np.testing.assert_array_equal(value, last.ema_state[key])
    x, y = bars(64, 1)
    from cnn_gpu.data import NormStats, normalize
    stats = NormStats(mean=last.norm_mean, std=last.norm_std)
    loss, acc = evaluate(built, normalize(x, stats, dtype=np.float32), y)[:2]
    # One batch of 64 here, of 500 in fit: other GEMM shapes, so the two agree to rounding (an
    # argmax may flip on a near tie), not bit for bit.
    assert abs(acc - record["val_accuracy"]) <= 1 / 64
    assert loss == pytest.approx(record["val_loss"], rel=1e-5)


def test_fit_without_an_average_records_no_raw_figures(tmp_path):
    _, result = _fit(tmp_path, epochs=1, ema_decay=0.0)
    assert not any(k.startswith("raw_") for k in result.history[0])
    assert load_checkpoint(tmp_path / "last.npz").ema_state is None


def test_resume_continues_the_average_bit_for_bit(tmp_path):
    straight, straight_result = _fit(tmp_path / "straight")
    _fit(tmp_path / "split", epochs=1)
    resumed, resumed_result = _fit(tmp_path / "split", resume=tmp_path / "split" / "last.npz")
    a, b = load_checkpoint(tmp_path / "straight" / "last.npz"), load_checkpoint(tmp_path / "split" / "last.npz")
    assert a.ema_updates == b.ema_updates
    for key, value in a.ema_state.items():
        np.testing.assert_array_equal(b.ema_state[key], value, err_msg=key)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in h]  # noqa: E731
    assert strip(resumed_result.history) == strip(straight_result.history)


def test_resuming_a_run_without_an_average_starts_one_and_says_so(tmp_path):
    _fit(tmp_path, epochs=1, ema_decay=0.0)
    said = []
    model = small_cnn(batch_norm=True)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    fit(model, opt, bars(192, 0), epochs=2, batch_size=32, schedule=CosineLR(opt, total_epochs=3),
        val_data=bars(64, 1), seed=5, resume=tmp_path / "last.npz", progress=False, log=said.append, ema_decay=0.9)
    assert any("kept no weight average" in line for line in said)


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason=f"needs CuPy and a CUDA device: {cupy_unavailable_reason()}")
def test_the_average_on_the_gpu_matches_the_cpu():
    """The same weights and updates on CuPy (one fused kernel per array) and NumPy: the averages
    agree to float32 rounding (the GPU kernel may contract a multiply-add), and applied() swaps them
    into the device arrays and back."""
    cpu_model, gpu_model = small_cnn(batch_norm=True), small_cnn(batch_norm=True).to("gpu")
    cpu_ema, gpu_ema = WeightEMA(cpu_model, 0.8), WeightEMA(gpu_model, 0.8)
    rng = np.random.default_rng(3)
    for _ in range(5):
        for c, g in zip(cpu_model.parameters(), gpu_model.parameters()):
            step = rng.standard_normal(c.shape).astype(c.data.dtype)
            c.data += step
            g.data += to_device(step, "cupy")
        cpu_ema.update()
        gpu_ema.update()
    for key, value in cpu_ema.state_dict().items():
        np.testing.assert_allclose(gpu_ema.state_dict()[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    trained = gpu_model.state_dict()
    with gpu_ema.applied():
        inside = gpu_model.state_dict()
    for key, value in gpu_ema.state_dict().items():
        np.testing.assert_array_equal(inside[key], value)
    for key, value in gpu_model.state_dict().items():
        np.testing.assert_array_equal(value, trained[key])
