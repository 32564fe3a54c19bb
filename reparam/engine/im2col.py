"""im2col for strided, grouped and first layers: one gather copy, one GEMM with the bias row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.checks import FloatArray
from .layers import Layer
from .memory import Arena
from .workers import Workers

__all__ = ["gemm_weights", "gemm_weights_nchw", "im2col_nchw_task", "im2col_task", "reads_nchw"]


#: A first layer with at most this many input channels reads NCHW (see reads_nchw).
_NCHW_CHANNELS = 4


def gemm_weights(layer: Layer, dtype: np.dtype[Any]) -> FloatArray:
    """im2col weights ``(groups, 9 * I/g + 1, O/g)``: rows in (kh, kw, c) order, then the bias."""
    groups = layer.groups
    out_per_group = layer.out_channels // groups
    per_group = layer.kernel.shape[1]
    kernel = layer.kernel.astype(np.float64).reshape(groups, out_per_group, per_group, 3, 3)
    matrix = np.empty((groups, 9 * per_group + 1, out_per_group))
    matrix[:, :-1] = kernel.transpose(0, 3, 4, 2, 1).reshape(groups, 9 * per_group, out_per_group)
    matrix[:, -1] = layer.bias.astype(np.float64).reshape(groups, out_per_group)
    return matrix.astype(dtype)


def gemm_weights_nchw(layer: Layer, dtype: np.dtype[Any]) -> FloatArray:
    """First-layer im2col weights ``(9 * I + 1, O)``: rows in (c, kh, kw) order, then the bias."""
    taps = 9 * layer.in_channels
    matrix = np.empty((taps + 1, layer.out_channels))
    matrix[:-1] = layer.kernel.astype(np.float64).reshape(layer.out_channels, taps).T
    matrix[-1] = layer.bias
    return matrix.astype(dtype)


def reads_nchw(layer: Layer, algorithm: str) -> bool:
    """Whether the first layer gathers its columns straight from an NCHW buffer.

    With few input channels (an RGB stem) NHWC rows are too short for fast
    copies; NCHW planes give long rows both for the layout change on the way
    in and for the gather.
    """
    return algorithm == "im2col" and layer.groups == 1 and layer.in_channels <= _NCHW_CHANNELS


def im2col_task(
    source: FloatArray,
    weights: FloatArray,
    layer: Layer,
    interior: FloatArray,
    arena: Arena,
    workers: Workers,
) -> Callable[[], None]:
    """``interior = relu(conv(source) + bias)`` by one gather copy and one (batched) GEMM."""
    n, oh, ow, out_channels = interior.shape
    groups, stride = layer.groups, layer.stride
    per_group = layer.in_channels // groups
    out_per_group = out_channels // groups
    taps = 9 * per_group
    rows = n * oh * ow
    columns = arena.get("columns", (groups, rows, taps + 1))
    if groups == 1:
        # NHWC rows hold (kw, c) contiguously: gather runs of 3 * C values at a time
        flat = source.reshape(n, source.shape[1], source.shape[2] * per_group)
        windows = sliding_window_view(flat, (3, 3 * per_group), axis=(1, 2))
        windows = windows[
            :,
            : (oh - 1) * stride + 1 : stride,
            : (ow - 1) * stride * per_group + 1 : stride * per_group,
        ]
        gathered = columns[0, :, :taps].reshape(n, oh, ow, 3, 3 * per_group)
        axis = 1
    else:
        # (n, Hp-2, Wp-2, C, 3, 3) -> strided, cropped -> (g, n, oh, ow, 3, 3, Cg)
        windows = sliding_window_view(source, (3, 3), axis=(1, 2))
        windows = windows[:, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]
        windows = windows.reshape(n, oh, ow, groups, per_group, 3, 3).transpose(3, 0, 1, 2, 5, 6, 4)
        gathered = columns[:, :, :taps].reshape(groups, n, oh, ow, 3, 3, per_group)
        axis = 2
    ones = columns[:, :, taps]  # multiplies the bias row of the weights
    product = arena.get("product", (groups, rows, out_per_group))
    grouped = product.reshape(groups, n, oh, ow, out_per_group).transpose(1, 2, 3, 0, 4)
    out = interior.reshape(n, oh, ow, groups, out_per_group)

    def run() -> None:
        workers.copyto(gathered, windows, axis=axis)
        ones.fill(1.0)
        np.matmul(columns, weights, out=product)
        workers.relu(out, grouped, axis=1)

    return run


def im2col_nchw_task(
    source: FloatArray, weights: FloatArray, layer: Layer, interior: FloatArray, arena: Arena
) -> Callable[[], None]:
    """Compute the first layer from an NCHW padded buffer, gathering one input plane at a time."""
    n, oh, ow, out_channels = interior.shape
    stride, channels = layer.stride, layer.in_channels
    taps = 9 * channels
    rows = n * oh * ow
    # transposed columns: one row per (c, kh, kw), holding that tap for every output pixel
    columns = arena.get("columns", (taps + 1, rows))
    windows = sliding_window_view(source, (3, 3), axis=(2, 3))  # (n, C, Hp-2, Wp-2, 3, 3)
    windows = windows[:, :, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]
    windows = windows.transpose(1, 4, 5, 0, 2, 3)
    planes = columns[:taps].reshape(channels, 3, 3, n, oh, ow)
    ones = columns[taps]  # multiplies the bias row of the weights
    product = arena.get("product", (rows, out_channels))
    pixels = product.reshape(n, oh, ow, out_channels)

    def run() -> None:
        np.copyto(planes, windows)
        ones.fill(1.0)
        np.matmul(columns.T, weights, out=product)
        np.maximum(pixels, 0, out=interior)

    return run
