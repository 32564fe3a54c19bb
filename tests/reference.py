"""Obviously-correct reference implementations the tests compare against.

Each function here is the *definition* of what it computes, written so a
reader can check it by eye: plain loops over Python floats (which are IEEE
float64), or a composition of well-known SciPy routines. They are slow and
are only ever called on tiny arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.signal  # type: ignore[import-untyped]

from reparam import BatchNorm

Array = npt.NDArray[np.float64]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d_loops(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Array:
    """The definition of a grouped, strided, dilated, zero-padded 2-D cross-correlation.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} x[n, g*Cg + c, i*sh + u*dh - ph, j*sw + v*dw - pw]
    * W[o, c, u, v]`` with ``g = o // (C_out / groups)``, ``Cg = C_in / groups``
    and ``x`` read as zero outside the image. Computed in float64 with loops
    over ``n, o, i, j, c, u, v``; padding is the bounds test, not a padded copy.
    """
    xs: list[Any] = np.asarray(x, dtype=np.float64).tolist()
    w_array = np.asarray(kernel, dtype=np.float64)
    ws: list[Any] = w_array.tolist()
    n_batch, c_in = len(xs), np.shape(x)[1]
    height, width = np.shape(x)[2], np.shape(x)[3]
    c_out, c_per_group, k_h, k_w = w_array.shape
    o_per_group = c_out // groups
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (height + 2 * p_h - d_h * (k_h - 1) - 1) // s_h + 1
    out_w = (width + 2 * p_w - d_w * (k_w - 1) - 1) // s_w + 1
    bs = [0.0] * c_out if bias is None else np.asarray(bias, dtype=np.float64).tolist()
    if c_in != c_per_group * groups:
        raise ValueError(f"reference: {c_in} channels do not match {c_per_group} x {groups}")
    y = np.zeros((n_batch, c_out, out_h, out_w), dtype=np.float64)
    for n in range(n_batch):
        for o in range(c_out):
            group = o // o_per_group
            for i in range(out_h):
                for j in range(out_w):
                    total = bs[o]
                    for c in range(c_per_group):
                        channel = xs[n][group * c_per_group + c]
                        for u in range(k_h):
                            row = i * s_h + u * d_h - p_h
                            if not 0 <= row < height:
                                continue
                            for v in range(k_w):
                                col = j * s_w + v * d_w - p_w
                                if 0 <= col < width:
                                    total += channel[row][col] * ws[o][c][u][v]
                    y[n, o, i, j] = total
    return y


def conv2d_scipy(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Array:
    """The same convolution by composition of SciPy's 2-D correlation (float64).

    Padding is an explicit zero pad, dilation inserts ``d - 1`` zeros between
    kernel taps, the ``valid`` correlation of each ``(n, o, c)`` plane is
    summed over ``c`` and the stride is a slice of the stride-1 result.
    """
    xs = np.asarray(x, dtype=np.float64)
    ws = np.asarray(kernel, dtype=np.float64)
    (s_h, s_w), (p_h, p_w), (d_h, d_w) = _pair(stride), _pair(padding), _pair(dilation)
    c_out, c_per_group, k_h, k_w = ws.shape
    dilated = np.zeros((c_out, c_per_group, d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1))
    dilated[:, :, ::d_h, ::d_w] = ws
    padded = np.pad(xs, ((0, 0), (0, 0), (p_h, p_h), (p_w, p_w)))
    o_per_group = c_out // groups
    planes = []
    for n in range(xs.shape[0]):
        outputs = []
        for o in range(c_out):
            group = o // o_per_group
            full = sum(
                scipy.signal.correlate2d(
                    padded[n, group * c_per_group + c], dilated[o, c], mode="valid"
                )
                for c in range(c_per_group)
            )
            outputs.append(np.asarray(full)[::s_h, ::s_w])
        planes.append(np.stack(outputs))
    out_h = (padded.shape[2] - dilated.shape[2]) // s_h + 1
    out_w = (padded.shape[3] - dilated.shape[3]) // s_w + 1
    result = np.stack(planes) if planes else np.zeros((0, c_out, out_h, out_w))
    if bias is not None:
        result = result + np.asarray(bias, dtype=np.float64)[:, None, None]
    return result


def batch_norm_loops(x: npt.ArrayLike, bn: BatchNorm) -> Array:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, in float64 scalars."""
    xs = np.asarray(x, dtype=np.float64)
    y = np.empty_like(xs)
    for c in range(xs.shape[1]):
        gamma, beta = float(bn.gamma[c]), float(bn.beta[c])
        mean, var = float(bn.mean[c]), float(bn.var[c])
        y[:, c] = gamma * (xs[:, c] - mean) / np.sqrt(var + bn.eps) + beta
    return y


def bn_scale(bn: BatchNorm) -> Array:
    """The per-channel factor ``gamma / sqrt(var + eps)`` in float64."""
    return np.asarray(
        bn.gamma.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps),
        dtype=np.float64,
    )


def conv_bn_magnitude(
    abs_conv: npt.ArrayLike, bn: BatchNorm, conv_bias: npt.ArrayLike | None = None
) -> Array:
    """Elementwise sum of the absolute values of the terms of ``bn(conv(x) + c)``.

    ``abs_conv`` is ``conv(|x|, |W|)``; the result is
    ``|s| * (conv(|x|, |W|) + |c| + |mean|) + |beta|`` with ``s`` the BN scale.
    """
    scale = np.abs(bn_scale(bn))[:, None, None]
    shift = np.abs(bn.mean.astype(np.float64))
    if conv_bias is not None:
        shift = shift + np.abs(np.asarray(conv_bias, dtype=np.float64))
    return np.asarray(
        scale * (np.asarray(abs_conv, dtype=np.float64) + shift[:, None, None])
        + np.abs(bn.beta.astype(np.float64))[:, None, None],
        dtype=np.float64,
    )


def conv_magnitude(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    **kwargs: Any,
) -> float:
    """The tolerance scale of a convolution: ``max(conv(|x|, |W|) + |b|)``.

    Why not ``max |result|``: the rounding error of a floating-point dot
    product is bounded by ``n * u * sum_i |x_i * w_i|`` (``u`` the unit
    roundoff), which is proportional to the sum of the magnitudes of the
    terms, not to the magnitude of the result. Where terms cancel the result
    can be tiny while its error is not; the absolute-value convolution is
    exactly that sum of term magnitudes, so it is the honest scale for
    ``tests.tolerances.assert_close(..., scale=)``.
    """
    abs_bias = None if bias is None else np.abs(np.asarray(bias, dtype=np.float64))
    magnitudes = conv2d_scipy(
        np.abs(np.asarray(x, dtype=np.float64)),
        np.abs(np.asarray(kernel, dtype=np.float64)),
        abs_bias,
        **kwargs,
    )
    return float(np.max(magnitudes, initial=0.0))
