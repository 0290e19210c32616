"""conv2d_forward / conv2d_backward against torch.nn.functional.conv2d and its autograd gradients,
in float64, over groups (depthwise with a multiplier included), dilation, stride and padding.

PyTorch is NCHW with weights (O, C/G, KH, KW); ours is NHWC with weights (KH, KW, C/G, O), so x
goes over by transpose(0, 3, 1, 2) and w by transpose(3, 2, 0, 1) (ours is PyTorch's transposed
by (2, 3, 1, 0)): the same numbers, nothing else converted."""
import numpy as np
import pytest

from cnn_gpu.functional import conv2d_backward, conv2d_forward

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # compiled CPU kernels on, then off

# (N, H, W, C, O, KH, KW, stride, padding, dilation, groups)
CASES = [
    (2, 9, 8, 3, 4, 3, 3, 1, 1, 1, 1),
    (2, 10, 11, 4, 6, 3, 3, 2, 1, 2, 2),
    (1, 12, 9, 6, 6, 3, 2, (2, 1), (1, 2), (2, 3), 3),
    (2, 8, 8, 4, 4, 3, 3, 1, 1, 1, 4),          # depthwise
    (2, 9, 9, 4, 8, 5, 5, 2, 2, 1, 4),          # depthwise, multiplier 2
    (1, 11, 10, 3, 9, 3, 3, 1, 2, 2, 3),        # depthwise, multiplier 3, dilated
    (2, 7, 7, 8, 16, 1, 1, 2, 0, 1, 1),         # 1x1, strided (a ResNet shortcut)
    (3, 28, 28, 1, 32, 3, 3, 1, 0, 1, 1),       # the seed network's conv1
    (2, 13, 13, 32, 64, 3, 3, 1, 0, 1, 1),      # the seed network's conv2
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_torch_forward_and_gradients(rng, case, bias):
    n, h, w, c, o, kh, kw, stride, padding, dilation, groups = case
    x, wt = rng.standard_normal((n, h, w, c)), rng.standard_normal((kh, kw, c // groups, o))
    b = rng.standard_normal(o) if bias else None
    y, cache = conv2d_forward(x, wt, b, stride, padding, dilation, groups)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv2d_backward(dy, cache)

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(wt.transpose(3, 2, 0, 1), requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if bias else None
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride, padding, dilation, groups)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))

    # Other summation orders (their GEMMs or direct loops, ours): float64 rounding apart.
    close = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), **close, err_msg="y")
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), **close, err_msg="dx")
    np.testing.assert_allclose(dw, tw.grad.numpy().transpose(2, 3, 1, 0), **close, err_msg="dw")
    if bias:
        np.testing.assert_allclose(db, tb.grad.numpy(), **close, err_msg="db")
    else:
        assert db is None


def test_a_torch_weight_transposed_is_ours(rng):
    """A depthwise weight with a multiplier (O, 1, KH, KW) -> (KH, KW, 1, O): output channel o of
    both reads input channel o // multiplier."""
    x = rng.standard_normal((1, 6, 6, 2))
    tw = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    tw[:, 0, 0, 0] = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    y, _ = conv2d_forward(x, tw.numpy().transpose(2, 3, 1, 0), groups=2)
    np.testing.assert_allclose(y, x[..., [0, 0, 1, 1]] * np.array([1.0, 10.0, 100.0, 1000.0]), rtol=1e-15)
