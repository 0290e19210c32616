import numpy as np
import pytest

from cnn_gpu import SGD, Adam, CosineLR, Parameter, StepLR

from cnn_gpu.backend import to_numpy

from .helpers import assert_close

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off


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


@pytest.mark.parametrize("make", [lambda ps, nd: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, no_decay=nd),
                                  lambda ps, nd: Adam(ps, lr=0.1, weight_decay=0.1, no_decay=nd)])
def test_no_decay_parameters_step_as_without_weight_decay(xp, make):
    """A parameter in no_decay moves exactly as with weight_decay=0; the others still decay."""
    decayed, exempt = _param(xp, [1.0, -2.0], [0.5, 0.5]), _param(xp, [1.0, -2.0], [0.5, 0.5])
    opt = make([decayed, exempt], [exempt])
    reference = _param(xp, [1.0, -2.0], [0.5, 0.5])
    plain = type(opt)([reference], lr=0.1, **({"momentum": 0.9} if isinstance(opt, SGD) else {}))
    for _ in range(2):
        opt.step()
        plain.step()
    assert_close(exempt.data, reference.data, rtol=1e-12)
    assert not np.allclose(to_numpy(decayed.data), to_numpy(reference.data))


def test_no_decay_parameters_of_the_seed_network():
    from cnn_gpu import no_decay_parameters, seed_cnn
    model = seed_cnn(batch_norm=True)
    named = dict(model.named_parameters())
    exempt = {id(p) for p in no_decay_parameters(model)}
    assert {name for name, p in named.items() if id(p) in exempt} == \
        {name for name in named if not name.endswith("weight")}  # BN gamma/beta, the last dense's bias
    assert all(len(named[name].shape) > 1 for name in named if name.endswith("weight"))


def test_no_decay_must_name_optimized_parameters():
    p, stranger = _param(np, [1.0], [1.0]), _param(np, [1.0], [1.0])
    with pytest.raises(ValueError, match=r"no_decay names 1 parameter\(s\) that are not among"):
        SGD([p], lr=0.1, no_decay=[stranger])
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        Adam([p], weight_decay=-0.1)


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.1, weight_decay=1e-3),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: Adam(ps, lr=1e-3, weight_decay=5e-4),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_steps_leave_no_subnormal_values(make, dtype):
    """A weight whose gradient is zero decays through the subnormal range; on the CPU the update
    sets it to zero instead (cnn_gpu.cpu.flush_subnormals), in the parameter and in the state."""
    tiny = np.finfo(dtype).tiny
    p = Parameter(np.array([tiny * 4, -tiny * 1.5, 1.0, np.nan], dtype=dtype))
    p.grad = np.array([0.0, 0.0, 0.25, 0.0], dtype=dtype)
    opt = make([p])
    for _ in range(3):
        opt.step()
    for a in [p.data] + list(opt.state[0].values()):
        finite = a[np.isfinite(a)]
        assert not ((finite != 0) & (np.abs(finite) < tiny)).any(), a
    assert p.data[2] != 1.0 and np.isnan(p.data[3])  # normal values move; NaN stays NaN
