"""A NumPy 2-D convolution: im2col with ``sliding_window_view``, then one matrix multiply."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from ._checks import (
    FloatArray,
    as_float_array,
    bias_vector,
    groups_divide,
    int_pair,
    positive_int,
)
from .errors import ReparamError

__all__ = ["conv2d", "conv_output_size"]

#: Upper bound on the im2col buffer of one chunk. Large batches (and large
#: images) are processed in chunks so memory does not grow with the batch.
COLUMN_BUFFER_BYTES = 32 * 2**20


def conv_output_size(size: int, kernel: int, *, stride: int, padding: int, dilation: int) -> int:
    """Output length along one axis: ``(size + 2p - d(k - 1) - 1) // s + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """NumPy has no fast float16 matmul: float16 is computed in float32."""
    return np.promote_types(dtype, np.float32)


def conv2d(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> FloatArray:
    """2-D cross-correlation (a deep-learning "convolution") of an NCHW batch.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} x_pad[n, g*Cg + c, i*sh + u*dh, j*sw + v*dw]
    * W[o, c, u, v]`` where ``g = o // (C_out / groups)`` is the output
    channel's group, ``Cg = C_in / groups`` and ``x_pad`` is ``x`` zero-padded
    by ``padding`` on each side.

    Parameters
    ----------
    x : array_like, shape (N, C_in, H, W)
        Input batch, any ``N >= 0``.
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)
        Weights in OIHW layout.
    bias : array_like, shape (C_out,), optional
        Added to every output pixel of its channel.
    stride, padding, dilation : int or (int, int)
        Per axis (height, width). Stride and dilation >= 1, padding >= 0
        (zero padding on both sides).
    groups : int, default 1
        Must divide ``C_in`` and ``C_out``. ``groups == C_in`` is depthwise.

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out)
        A new array of ``np.result_type(x, kernel, bias)``, with
        ``H_out = (H + 2p - d(kH - 1) - 1) // s + 1`` (likewise ``W_out``).

    Raises
    ------
    ReparamError
        On a non-floating or wrongly ranked input, channels that do not match
        the kernel and ``groups``, a bias of the wrong length, stride or
        dilation < 1, padding < 0, or a (dilated) kernel larger than the
        padded input.

    Notes
    -----
    im2col: one read-only strided view gathers every receptive field, a copy
    lays out a chunk of them as rows of a ``(groups, N*H_out*W_out,
    C_in/groups*kH*kW)`` matrix, and one batched matrix multiply per chunk
    does the sum. Chunks hold at most ``COLUMN_BUFFER_BYTES`` of columns.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> conv2d(x, np.ones((1, 1, 2, 2)), stride=2)[0, 0]
    array([[10., 18.],
           [42., 50.]])
    """
    func = "conv2d"
    inputs = as_float_array(x, func=func, name="x", ndim=4)
    weights = as_float_array(kernel, func=func, name="kernel", ndim=4)
    groups = positive_int(groups, func=func, name="groups")
    stride_h, stride_w = int_pair(stride, func=func, name="stride", minimum=1)
    pad_h, pad_w = int_pair(padding, func=func, name="padding", minimum=0)
    dil_h, dil_w = int_pair(dilation, func=func, name="dilation", minimum=1)
    batch, in_channels, height, width = inputs.shape
    out_channels, per_group, kernel_h, kernel_w = weights.shape
    groups_divide(groups, in_channels, func=func, what="C_in (x.shape[1])")
    groups_divide(groups, out_channels, func=func, what="C_out (kernel.shape[0])")
    if per_group * groups != in_channels:
        raise ReparamError(
            f"{func}: x has {in_channels} channels but the kernel expects "
            f"C_in // groups = {per_group} with groups={groups}; got x.shape[1]={in_channels}, "
            f"expected {per_group * groups}"
        )
    arrays: list[Any] = [inputs, weights]
    if bias is not None:
        bias_array = bias_vector(
            bias, length=out_channels, func=func, name="bias", what="kernel.shape[0]"
        )
        arrays.append(bias_array)
    span_h, span_w = dil_h * (kernel_h - 1) + 1, dil_w * (kernel_w - 1) + 1
    if span_h > height + 2 * pad_h or span_w > width + 2 * pad_w:
        raise ReparamError(
            f"{func}: kernel is larger than the padded input; got a kernel spanning "
            f"{span_h}x{span_w} (dilation {dil_h}x{dil_w}) and a padded input of "
            f"{height + 2 * pad_h}x{width + 2 * pad_w}, expected the span to fit"
        )
    result_dtype = np.result_type(*arrays)
    compute = _compute_dtype(result_dtype)
    out_h = conv_output_size(height, kernel_h, stride=stride_h, padding=pad_h, dilation=dil_h)
    out_w = conv_output_size(width, kernel_w, stride=stride_w, padding=pad_w, dilation=dil_w)
    out_per_group = out_channels // groups
    taps = per_group * kernel_h * kernel_w
    # (groups, taps, out_per_group): each group's kernels as the columns of a matrix
    matrix = weights.astype(compute).reshape(groups, out_per_group, taps).transpose(0, 2, 1)
    output = np.empty((batch, out_channels, out_h, out_w), dtype=compute)

    padded = np.pad(
        inputs.astype(compute, copy=False), ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w))
    )
    bytes_per_row = out_w * in_channels * kernel_h * kernel_w * compute.itemsize
    rows_per_chunk = max(1, COLUMN_BUFFER_BYTES // max(1, bytes_per_row))
    images_per_chunk = max(1, rows_per_chunk // max(1, out_h))
    rows_per_chunk = min(rows_per_chunk, out_h)
    for start in range(0, batch, images_per_chunk):
        stop = min(batch, start + images_per_chunk)
        windows = sliding_window_view(padded[start:stop], (span_h, span_w), axis=(2, 3))
        # (n, C_in, out_h, out_w, kernel_h, kernel_w) after stride and dilation
        windows = windows[:, :, ::stride_h, ::stride_w, ::dil_h, ::dil_w]
        for row in range(0, out_h, rows_per_chunk):
            row_stop = min(out_h, row + rows_per_chunk)
            output[start:stop, :, row:row_stop] = _conv_chunk(
                windows[:, :, row:row_stop], matrix, groups=groups
            )
    if bias is not None:
        output += bias_array.astype(compute)[:, None, None]
    return output.astype(result_dtype, copy=False)


def _conv_chunk(windows: FloatArray, matrix: FloatArray, *, groups: int) -> FloatArray:
    """One im2col copy and one batched matmul for a chunk of receptive fields."""
    n, in_channels, rows, cols, kernel_h, kernel_w = windows.shape
    per_group = in_channels // groups
    out_per_group = matrix.shape[2]
    grouped = windows.reshape(n, groups, per_group, rows, cols, kernel_h, kernel_w)
    columns = grouped.transpose(1, 0, 3, 4, 2, 5, 6).reshape(
        groups, n * rows * cols, per_group * kernel_h * kernel_w
    )
    product: FloatArray = np.matmul(columns, matrix)  # (groups, n*rows*cols, out_per_group)
    result = product.reshape(groups, n, rows, cols, out_per_group).transpose(1, 0, 4, 2, 3)
    return result.reshape(n, groups * out_per_group, rows, cols)
