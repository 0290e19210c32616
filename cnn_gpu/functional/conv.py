"""2-D convolution as im2col + one GEMM over the whole batch (channels-last).

    x (N, H, W, C) * w (KH, KW, C, O) + b (O,) -> y (N, OH, OW, O)

im2col lays every receptive field out as one row of `cols` (N*OH*OW, KH*KW*C), so the
convolution is `cols @ w.reshape(KH*KW*C, O)`: one large GEMM that BLAS (or cuBLAS)
runs at full speed. Channels-last keeps C innermost in both x and the rows of cols,
so no transposes are needed anywhere.
"""
from __future__ import annotations

from typing import Any

from ..backend import get_array_module
from ._util import check_float, check_rank, output_size, pair


def pad_hw(x: Any, ph: int, pw: int, value: float = 0.0) -> Any:
    """Pad the two spatial axes of (N, H, W, C); returns x itself when there is nothing to pad."""
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.full((n, h + 2 * ph, w + 2 * pw, c), value, dtype=x.dtype)
    out[:, ph:ph + h, pw:pw + w, :] = x
    return out


def window_view(xpad: Any, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int) -> Any:
    """A strided view (N, OH, OW, KH, KW, C) of every window of a padded (N, Hp, Wp, C). No copy."""
    xp = get_array_module(xpad)
    sn, shh, sww, sc = xpad.strides
    n, c = xpad.shape[0], xpad.shape[3]
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(n, oh, ow, kh, kw, c), strides=(sn, shh * sh, sww * sw, shh, sww, sc))


def im2col(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> tuple[Any, int, int]:
    """x (N, H, W, C) -> cols (N*OH*OW, KH*KW*C), OH, OW. Row order (n, oh, ow); column order (kh, kw, c)."""
    n, h, w, c = x.shape
    oh = output_size(h, kh, sh, ph, "conv2d", "height")
    ow = output_size(w, kw, sw, pw, "conv2d", "width")
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0:
        return x.reshape(n * oh * ow, c), oh, ow  # a 1x1 convolution needs no copy
    xp = get_array_module(x)
    windows = window_view(pad_hw(xp.ascontiguousarray(x), ph, pw), kh, kw, sh, sw, oh, ow)
    return windows.reshape(n * oh * ow, kh * kw * c), oh, ow  # the one copy


def col2im(dcols: Any, x_shape: tuple[int, ...], kh: int, kw: int, sh: int, sw: int,
           ph: int, pw: int, oh: int, ow: int) -> Any:
    """Adjoint of im2col: dcols (N*OH*OW, KH*KW*C) -> dx (N, H, W, C), overlapping windows summed.

    One strided add per kernel offset (KH*KW vectorized passes), in a fixed order, so the
    result is deterministic on both backends.
    """
    xp = get_array_module(dcols)
    n, h, w, c = x_shape
    dcols = dcols.reshape(n, oh, ow, kh, kw, c)
    dxpad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcols[:, :, :, i, j, :]
    return dxpad[:, ph:ph + h, pw:pw + w, :] if (ph or pw) else dxpad


def conv2d_forward(x: Any, w: Any, b: Any = None, stride: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0) -> tuple[Any, tuple]:
    """x (N, H, W, C), w (KH, KW, C, O), b (O,) or None -> y (N, OH, OW, O), cache."""
    check_float(x, "conv2d")
    check_rank(x, 4, "conv2d", "(N, H, W, C)")
    check_rank(w, 4, "conv2d", "(KH, KW, C_in, C_out)", name="w")
    xp = get_array_module(x, w, b)
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    kh, kw, c, o = w.shape
    if x.shape[3] != c:
        raise ValueError(f"conv2d: x has {x.shape[3]} channels but w expects {c} "
                         f"(x shape {tuple(x.shape)}, w shape {tuple(w.shape)})")
    if x.dtype != w.dtype:
        raise TypeError(f"conv2d: x is {x.dtype} but w is {w.dtype}; use one dtype")
    cols, oh, ow = im2col(x, kh, kw, sh, sw, ph, pw)
    w2d = w.reshape(kh * kw * c, o)
    y = cols @ w2d  # (N*OH*OW, O): the GEMM
    if b is not None:
        y += b
    cache = (cols, w, b is not None, x.shape, (kh, kw, sh, sw, ph, pw, oh, ow))
    return y.reshape(x.shape[0], oh, ow, o), cache


def conv2d_backward(dy: Any, cache: tuple, need_dx: bool = True) -> tuple[Any, Any, Any]:
    """dy (N, OH, OW, O) -> dx (N, H, W, C) or None, dw (KH, KW, C, O), db (O,) or None.

    need_dx=False skips the input gradient (the first layer of a network has no use for it).
    """
    cols, w, has_bias, x_shape, (kh, kw, sh, sw, ph, pw, oh, ow) = cache
    o = w.shape[3]
    dy2d = dy.reshape(-1, o)  # (N*OH*OW, O)
    dw = (cols.T @ dy2d).reshape(w.shape)
    db = dy2d.sum(axis=0) if has_bias else None
    dx = None
    if need_dx:
        dcols = dy2d @ w.reshape(-1, o).T  # (N*OH*OW, KH*KW*C)
        if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0:
            dx = dcols.reshape(x_shape)
        else:
            dx = col2im(dcols, x_shape, kh, kw, sh, sw, ph, pw, oh, ow)
    return dx, dw, db
