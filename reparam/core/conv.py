"""A NumPy 2-D convolution: im2col with ``sliding_window_view``, then one matrix multiply."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from .checks import (
    FloatArray,
    as_float_array,
    bias_vector,
    groups_divide,
    int_pair,
    positive_int,
)
from .errors import ReparamError

__all__ = [
    "Pads",
    "avg_pool2d",
    "centred_padding",
    "conv2d",
    "conv_output_size",
    "normalize_padding",
    "pad_input",
]

#: Upper bound on the im2col buffer of one chunk. Large batches (and large
#: images) are processed in chunks so memory does not grow with the batch.
COLUMN_BUFFER_BYTES = 32 * 2**20

#: Padding per side, ``((top, bottom), (left, right))``; a negative side crops.
Pads = tuple[tuple[int, int], tuple[int, int]]


def centred_padding(kernel_size: int) -> int:
    """Return ``K // 2``: the padding that keeps an odd ``K``-tap kernel centred.

    Examples
    --------
    >>> centred_padding(3), centred_padding(31)
    (1, 15)
    """
    return kernel_size // 2


def conv_output_size(
    size: int, kernel: int, *, stride: int, padding: int | tuple[int, int], dilation: int = 1
) -> int:
    """Output length along one axis: ``(size + p_before + p_after - d(k - 1) - 1) // s + 1``.

    ``padding`` is one int (both sides) or a ``(before, after)`` pair.
    """
    before, after = (padding, padding) if isinstance(padding, int) else padding
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def normalize_padding(padding: Any, *, func: str, name: str = "padding") -> Pads:
    """Turn ``p``, ``(ph, pw)`` or ``((top, bottom), (left, right))`` into per-side pairs.

    Negative values are allowed and mean a crop of that many rows or columns.

    Examples
    --------
    >>> normalize_padding(1, func="f"), normalize_padding((1, 0), func="f")
    (((1, 1), (1, 1)), ((1, 1), (0, 0)))
    >>> normalize_padding(((0, 1), (2, -1)), func="f")
    ((0, 1), (2, -1))
    """

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if is_int(padding):
        return ((int(padding), int(padding)), (int(padding), int(padding)))
    try:
        items = tuple(padding)
    except TypeError:
        items = ()
    if len(items) == 2 and all(is_int(v) for v in items):
        h, w = int(items[0]), int(items[1])
        return ((h, h), (w, w))
    if len(items) == 2:
        pairs = []
        for axis in items:
            try:
                pair = tuple(axis)
            except TypeError:
                pair = ()
            if len(pair) != 2 or not all(is_int(v) for v in pair):
                break
            pairs.append((int(pair[0]), int(pair[1])))
        else:
            return (pairs[0], pairs[1])
    raise ReparamError(
        f"{func}: {name} must be an int, a pair (ph, pw) or ((top, bottom), (left, right)); "
        f"got {padding!r}"
    )


def _pad_values(value: Any, channels: int, *, func: str) -> FloatArray | None:
    """None for zero padding, else one padding value per channel (float64)."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return None if float(array) == 0.0 else np.full(channels, float(array))
    if array.shape != (channels,):
        raise ReparamError(
            f"{func}: pad_value must be a scalar or one value per input channel; got shape "
            f"{array.shape}, expected ({channels},)"
        )
    if not np.isfinite(array).all():
        raise ReparamError(f"{func}: pad_value must be finite; got {array}")
    return None if not array.any() else array


def pad_input(x: FloatArray, pads: Pads, pad_value: FloatArray | None = None) -> FloatArray:
    """Pad (positive sides) and crop (negative sides) the spatial axes of an NCHW array.

    Along each axis, padded position ``j`` holds ``x[j - before]`` where that
    index exists and the pad value elsewhere, for ``0 <= j < n + before +
    after`` (so a crop deeper than the input reads padding, as the definition
    says). ``pad_value`` is None (zeros) or one value per channel. Always
    returns a new array (never a view of ``x``).
    """
    (top, bottom), (left, right) = pads
    height, width = x.shape[2:]
    out_h, out_w = height + top + bottom, width + left + right
    out = np.zeros((x.shape[0], x.shape[1], max(0, out_h), max(0, out_w)), dtype=x.dtype)
    if pad_value is not None:
        out[...] = pad_value.astype(x.dtype)[None, :, None, None]
    rows = (max(0, top), min(out_h, top + height))
    cols = (max(0, left), min(out_w, left + width))
    if rows[0] < rows[1] and cols[0] < cols[1]:
        out[:, :, rows[0] : rows[1], cols[0] : cols[1]] = x[
            :, :, rows[0] - top : rows[1] - top, cols[0] - left : cols[1] - left
        ]
    return out


def _compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """NumPy has no fast float16 matmul: float16 is computed in float32."""
    return np.promote_types(dtype, np.float32)


def _check_span(
    span: tuple[int, int], size: tuple[int, int], pads: Pads, *, func: str, what: str
) -> None:
    padded = tuple(n + before + after for n, (before, after) in zip(size, pads, strict=True))
    if padded[0] < 1 or padded[1] < 1 or span[0] > padded[0] or span[1] > padded[1]:
        raise ReparamError(
            f"{func}: {what} is larger than the padded input; got a {what.split(' (')[0]} spanning "
            f"{span[0]}x{span[1]} and a padded input of {padded[0]}x{padded[1]}, expected the "
            "window to fit"
        )


def _windows(
    padded: FloatArray, span: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> FloatArray:
    """Every receptive field as a read-only view: (n, C, out_h, out_w, k_h, k_w)."""
    windows = sliding_window_view(padded, span, axis=(2, 3))
    return windows[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def conv2d(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | Pads = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    pad_value: float | npt.ArrayLike | None = None,
) -> FloatArray:
    """2-D cross-correlation (a deep-learning "convolution") of an NCHW batch.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} x_pad[n, g*Cg + c, i*sh + u*dh, j*sw + v*dw]
    * W[o, c, u, v]`` where ``g = o // (C_out / groups)`` is the output
    channel's group, ``Cg = C_in / groups`` and ``x_pad`` is ``x`` padded by
    ``padding`` (with zeros, or with ``pad_value`` per channel).

    Parameters
    ----------
    x : array_like, shape (N, C_in, H, W)
        Input batch, any ``N >= 0``.
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)
        Weights in OIHW layout.
    bias : array_like, shape (C_out,), optional
        Added to every output pixel of its channel.
    stride, dilation : int or (int, int)
        Per axis (height, width), each >= 1.
    padding : int, (int, int) or ((int, int), (int, int))
        Both sides of both axes, both sides per axis ``(ph, pw)``, or every
        side ``((top, bottom), (left, right))``. A negative side crops the
        input instead (ACNet's asymmetric branches do that).
    groups : int, default 1
        Must divide ``C_in`` and ``C_out``. ``groups == C_in`` is depthwise.
    pad_value : float or array_like of shape (C_in,), optional
        What the padded border holds, per input channel; zero by default.
        (Diverse Branch Block pads with a BatchNorm's output at zero input.)

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out)
        A new array of ``np.result_type(x, kernel, bias)``, with
        ``H_out = (H + top + bottom - d(kH - 1) - 1) // s + 1`` (likewise ``W_out``).

    Raises
    ------
    ReparamError
        On a non-floating or wrongly ranked input, channels that do not match
        the kernel and ``groups``, a bias or pad value of the wrong length,
        stride or dilation < 1, malformed padding, or a (dilated) kernel
        larger than the padded input.

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
    >>> conv2d(np.zeros((1, 1, 1, 1)), np.ones((1, 1, 3, 3)), padding=1, pad_value=2.0)[0, 0]
    array([[16.]])
    """
    func = "conv2d"
    inputs = as_float_array(x, func=func, name="x", ndim=4)
    weights = as_float_array(kernel, func=func, name="kernel", ndim=4)
    groups = positive_int(groups, func=func, name="groups")
    stride_h, stride_w = int_pair(stride, func=func, name="stride", minimum=1)
    pads = normalize_padding(padding, func=func)
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
    values = _pad_values(pad_value, in_channels, func=func)
    arrays: list[Any] = [inputs, weights]
    if bias is not None:
        bias_array = bias_vector(
            bias, length=out_channels, func=func, name="bias", what="kernel.shape[0]"
        )
        arrays.append(bias_array)
    span_h, span_w = dil_h * (kernel_h - 1) + 1, dil_w * (kernel_w - 1) + 1
    _check_span((span_h, span_w), (height, width), pads, func=func, what="kernel")
    result_dtype = np.result_type(*arrays)
    compute = _compute_dtype(result_dtype)
    out_h = conv_output_size(height, kernel_h, stride=stride_h, padding=pads[0], dilation=dil_h)
    out_w = conv_output_size(width, kernel_w, stride=stride_w, padding=pads[1], dilation=dil_w)
    out_per_group = out_channels // groups
    taps = per_group * kernel_h * kernel_w
    # (groups, taps, out_per_group): each group's kernels as the columns of a matrix
    matrix = weights.astype(compute).reshape(groups, out_per_group, taps).transpose(0, 2, 1)
    output = np.empty((batch, out_channels, out_h, out_w), dtype=compute)

    padded = pad_input(inputs.astype(compute, copy=False), pads, values)
    bytes_per_row = out_w * in_channels * kernel_h * kernel_w * compute.itemsize
    rows_per_chunk = max(1, COLUMN_BUFFER_BYTES // max(1, bytes_per_row))
    images_per_chunk = max(1, rows_per_chunk // max(1, out_h))
    rows_per_chunk = min(rows_per_chunk, out_h)
    for start in range(0, batch, images_per_chunk):
        stop = min(batch, start + images_per_chunk)
        windows = _windows(
            padded[start:stop], (span_h, span_w), (stride_h, stride_w), (dil_h, dil_w)
        )
        for row in range(0, out_h, rows_per_chunk):
            row_stop = min(out_h, row + rows_per_chunk)
            output[start:stop, :, row:row_stop] = _conv_chunk(
                windows[:, :, row:row_stop], matrix, groups=groups
            )
    if bias is not None:
        output += bias_array.astype(compute)[:, None, None]
    return output.astype(result_dtype, copy=False)


def avg_pool2d(
    x: npt.ArrayLike,
    size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] | Pads = 0,
    count_include_pad: bool = True,
) -> FloatArray:
    """Average pooling of an NCHW batch, each channel on its own.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    size : int or (int, int)
        Window height and width.
    stride : int or (int, int), optional
        The window size by default (as in PyTorch).
    padding : int, (int, int) or ((int, int), (int, int))
        Zero padding per side, as in :func:`conv2d`.
    count_include_pad : bool, default True
        Divide by the whole window (padded zeros included), as PyTorch's
        default; False divides by the number of real pixels under the window.

    Returns
    -------
    ndarray, shape (N, C, H_out, W_out)
        In ``x``'s dtype, sizes as in :func:`conv2d`.

    Raises
    ------
    ReparamError
        On a non-floating or non-4-D input, a non-positive size or stride,
        malformed padding, or a window larger than the padded input.

    Notes
    -----
    With ``count_include_pad=True`` this is the depthwise convolution with a
    ``1 / (kH * kW)`` kernel, and that is what it computes here.

    Examples
    --------
    >>> import numpy as np
    >>> avg_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    func = "avg_pool2d"
    inputs = as_float_array(x, func=func, name="x", ndim=4)
    size_h, size_w = int_pair(size, func=func, name="size", minimum=1)
    stride_pair = (size_h, size_w) if stride is None else stride
    stride_h, stride_w = int_pair(stride_pair, func=func, name="stride", minimum=1)
    pads = normalize_padding(padding, func=func)
    _check_span((size_h, size_w), inputs.shape[2:], pads, func=func, what="pooling window (size)")
    compute = _compute_dtype(inputs.dtype)
    padded = pad_input(inputs.astype(compute, copy=False), pads)
    windows = _windows(padded, (size_h, size_w), (stride_h, stride_w), (1, 1))
    total = windows.sum(axis=(4, 5))
    if count_include_pad:
        result = total / compute.type(size_h * size_w)
    else:
        ones = pad_input(np.ones((1, 1, *inputs.shape[2:]), dtype=compute), pads)
        counts = _windows(ones, (size_h, size_w), (stride_h, stride_w), (1, 1)).sum(axis=(4, 5))
        result = total / counts
    return np.asarray(result, dtype=inputs.dtype)


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
