"""cnn_gpu.geometry: output sizes (floor and ceil mode, dilation), taps and window views."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cnn_gpu.geometry import Window, output_size, pad_hw, pair, unpad_hw, window_index_dtype, window_view


def _ceil_size_by_hand(size, k, s, p, d):
    """PyTorch's pooling_output_shape with ceil_mode=True, written out."""
    out = math.ceil((size + 2 * p - d * (k - 1) - 1) / s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return out


@pytest.mark.parametrize("size", [5, 6, 7, 11, 28])
@pytest.mark.parametrize("k, s, p, d", [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2), (3, 3, 1, 1), (2, 3, 1, 2), (1, 2, 0, 1)])
def test_output_size_floor_and_ceil(size, k, s, p, d):
    assert output_size(size, k, s, p, d) == (size + 2 * p - d * (k - 1) - 1) // s + 1
    assert output_size(size, k, s, p, d, ceil_mode=True) == _ceil_size_by_hand(size, k, s, p, d)


def test_ceil_mode_drops_a_window_that_would_start_in_the_padding():
    # size 5, pool 2, stride 2, padding 1: the padded input is 7; floor gives 3, ceil 4, whose last
    # window would start at padded row 6, inside the bottom padding: dropped, as in PyTorch.
    assert output_size(5, 2, 2, 1) == 3 and output_size(5, 2, 2, 1, ceil_mode=True) == 3
    assert output_size(6, 3, 2, 0, ceil_mode=True) == 3 and output_size(6, 3, 2, 0) == 2


def test_output_size_errors_name_the_op_and_axis():
    with pytest.raises(ValueError, match="conv2d: input width 2 is smaller than the window 5 \\(3 taps dilated by 2\\)"):
        output_size(2, 3, dilation=2, op="conv2d", axis="width")
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        output_size(8, 3, stride=0, op="pool", axis="height")


def test_pair_and_index_dtype():
    assert pair(3, "k") == (3, 3) and pair((2, 1), "k") == (2, 1) and pair(np.int64(2), "k") == (2, 2)
    with pytest.raises(TypeError):
        pair(True, "k")
    with pytest.raises(ValueError):
        pair((1, 2, 3), "k")
    assert window_index_dtype(16, 16) == np.uint8 and window_index_dtype(17, 16) == np.int32


def test_window_view_and_taps_read_what_the_definition_says(rng):
    x = rng.standard_normal((2, 9, 8, 3))
    win = Window.of((3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 3))
    oh, ow = win.output_hw(9, 8, "test")
    xpad = pad_hw(x, win)
    view = window_view(xpad, win, oh, ow)
    assert view.shape == (2, oh, ow, 3, 2, 3)
    for i in range(oh):
        for j in range(ow):
            for a in range(3):
                for b in range(2):
                    r, c = i * 2 - 1 + a * 2, j * 1 + b * 3  # input position of tap (a, b)
                    expected = x[:, r, c] if 0 <= r < 9 else np.zeros((2, 3))
                    np.testing.assert_array_equal(view[:, i, j, a, b], expected)
                    np.testing.assert_array_equal(xpad[win.tap(a, b, oh, ow)][:, i, j], expected)
    assert unpad_hw(xpad, win, 9, 8).shape == x.shape and np.array_equal(unpad_hw(xpad, win, 9, 8), x)


def test_padded_hw_grows_for_a_ceil_mode_window():
    win = Window.of(3, 2)
    oh, ow = win.output_hw(6, 6, "pool", ceil_mode=True)
    assert (oh, ow) == (3, 3) and win.padded_hw(6, 6, oh, ow) == (7, 7)
    assert pad_hw(np.ones((1, 6, 6, 1)), win, (7, 7), value=-np.inf)[0, 6, 6, 0] == -np.inf
