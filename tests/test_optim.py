import numpy as np
import pytest

from cnn_gpu import SGD, Adam, CosineLR, Parameter, StepLR

from .helpers import assert_close


def _param(xp, values, grad):
    p = Parameter(xp.asarray(np.array(values, dtype=np.float64)))
    p.grad = xp.asarray(np.array(grad, dtype=np.float64))
    return p


def test_sgd_plain_and_weight_decay(xp):
    p = _param(xp, [1.0, -2.0], [0.5, 0.5])
    SGD([p], lr=0.1, weight_decay=0.1).step()
    # g = 0.5 + 0.1 * p -> [0.6, 0.3]; p -= 0.1 * g
    assert_close(p.data, [0.94, -2.03], rtol=1e-12)


def test_sgd_momentum_two_steps(xp):
    p = _param(xp, [1.0], [1.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    opt.step()  # v = 1, p = 0.9
    opt.step()  # v = 0.9 * 1 + 1 = 1.9, p = 0.9 - 0.19 = 0.71
    assert_close(p.data, [0.71], rtol=1e-12)


def test_sgd_nesterov_two_steps(xp):
    p = _param(xp, [1.0], [1.0])
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    opt.step()  # v = 1, step = 1 + 0.9 = 1.9, p = 0.81
    opt.step()  # v = 1.9, step = 1 + 1.71 = 2.71, p = 0.81 - 0.271 = 0.539
    assert_close(p.data, [0.539], rtol=1e-12)


def test_adam_two_steps(xp):
    p = _param(xp, [1.0], [2.0])
    opt = Adam([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    opt.step()
    # Step 1: m_hat = 2, v_hat = 4: p = 1 - 0.1 * 2 / (2 + 1e-8)
    expected = 1 - 0.1 * 2 / (2 + 1e-8)
    assert_close(p.data, [expected], rtol=1e-12)
    p.grad = xp.asarray(np.array([-1.0]))
    opt.step()
    m = 0.9 * 0.2 + 0.1 * -1.0
    v = 0.999 * 0.004 + 0.001 * 1.0
    m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
    assert_close(p.data, [expected - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)], rtol=1e-12)


def test_state_dict_round_trip_continues_identically(xp):
    p1, p2 = _param(xp, [1.0, 2.0], [0.3, -0.1]), _param(xp, [1.0, 2.0], [0.3, -0.1])
    a, b = Adam([p1], lr=0.01), Adam([p2], lr=0.01)
    a.step()
    b.load_state_dict(a.state_dict())
    p2.data = p1.data.copy()
    a.step(), b.step()
    assert_close(p1.data, p2.data, rtol=0)


def test_schedules():
    opt = SGD([Parameter(np.zeros(1))], lr=1.0)
    step = StepLR(opt, step_size=2, gamma=0.5)
    assert [step.step() for _ in range(4)] == [1.0, 0.5, 0.5, 0.25]
    opt = SGD([Parameter(np.zeros(1))], lr=1.0)
    cos = CosineLR(opt, total_epochs=4, min_lr=0.0)
    lrs = [cos.step() for _ in range(5)]
    np.testing.assert_allclose(lrs, [0.5 + 0.5 * np.cos(np.pi * e / 4) for e in (1, 2, 3, 4, 4)], atol=1e-12)
    restored = CosineLR(SGD([Parameter(np.zeros(1))], lr=1.0), total_epochs=4)
    restored.load_state_dict(cos.state_dict())
    assert restored.optimizer.lr == pytest.approx(lrs[-1])


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr must be > 0"):
        SGD([Parameter(np.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        SGD([Parameter(np.zeros(1))], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="no parameters"):
        SGD([], lr=0.1)
