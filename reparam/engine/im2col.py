"""im2col for strided, grouped and first layers: one gather copy, one GEMM with the bias row."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.checks import FloatArray
from .layers import Layer
from .memory import Arena

__all__ = [
    "gemm_nchw_shape",
    "gemm_shape",
    "gemm_weights",
    "gemm_weights_nchw",
    "im2col_nchw_task",
    "im2col_split_tasks",
    "im2col_task",
    "kernel_shape",
    "kernel_view",
    "kernel_weights",
    "reads_nchw",
    "split",
]


#: A first layer with at most this many input channels reads NCHW (see reads_nchw).
_NCHW_CHANNELS = 4


def gemm_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of :func:`gemm_weights`: ``(groups, 9 * I/g + 1, O/g)``."""
    per_group = layer.in_channels // layer.groups
    return (layer.groups, 9 * per_group + 1, layer.out_channels // layer.groups)


def gemm_weights(layer: Layer, out: FloatArray) -> None:
    """Fill ``out`` with the im2col weights: rows in (kh, kw, c) order, then the bias.

    Copied straight from the kernel into ``out``, rounded once to its dtype
    (no float64 or temporary copy of the layer's weights).
    """
    groups, rows, out_per_group = out.shape
    per_group = (rows - 1) // 9
    kernel = layer.kernel.reshape(groups, out_per_group, per_group, 3, 3)
    taps = out[:, :-1].reshape(groups, 3, 3, per_group, out_per_group)
    np.copyto(taps, kernel.transpose(0, 3, 4, 2, 1), casting="unsafe")
    np.copyto(out[:, -1], layer.bias.reshape(groups, out_per_group), casting="unsafe")


def gemm_nchw_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of :func:`gemm_weights_nchw`: ``(9 * I + 1, O)``."""
    return (9 * layer.in_channels + 1, layer.out_channels)


def gemm_weights_nchw(layer: Layer, out: FloatArray) -> None:
    """Fill ``out`` with the first layer's im2col weights: rows in (c, kh, kw) order, then bias."""
    taps = out.shape[0] - 1
    np.copyto(out[:-1], layer.kernel.reshape(layer.out_channels, taps).T, casting="unsafe")
    np.copyto(out[-1], layer.bias, casting="unsafe")


def kernel_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of :func:`kernel_weights`: ``(9 * I, O)``, rows in (c, kh, kw) order."""
    return (9 * layer.in_channels, layer.out_channels)


def kernel_weights(layer: Layer, out: FloatArray) -> None:
    """Fill ``out`` with the kernel as a ``(9 * I, O)`` matrix (another dtype than the kernel's)."""
    np.copyto(out, kernel_view(layer), casting="unsafe")


def kernel_view(layer: Layer) -> FloatArray:
    """Return the kernel itself as a ``(9 * I, O)`` matrix, rows in (c, kh, kw) order (a view).

    For layers whose weights outweigh their columns (few output pixels, many
    output channels: the last stride-2 layer on a 7x7 output), the columns are
    gathered in the kernel's own (c, kh, kw) order and the GEMM reads the
    deploy model's kernel in place (BLAS takes it transposed): the weights are
    held once, and the bias is added to the product instead.
    """
    return layer.kernel.reshape(layer.out_channels, -1).T


def reads_nchw(layer: Layer, algorithm: str) -> bool:
    """Whether the first layer gathers its columns straight from an NCHW buffer.

    With few input channels (an RGB stem) NHWC rows are too short for fast
    copies; NCHW planes give long rows both for the layout change on the way
    in and for the gather.
    """
    return algorithm == "im2col" and layer.groups == 1 and layer.in_channels <= _NCHW_CHANNELS


def _gather_views(
    source: FloatArray,
    layer: Layer,
    rows: tuple[int, int],
    columns: FloatArray,
    ow: int,
    *,
    kernel_order: bool = False,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(gathered, windows, ones)`` for output rows ``rows``: ``copyto(gathered, windows)``.

    ``columns`` is the full ``(groups, N * OH * OW, 9 * C/g + 1)`` column matrix
    of the call; the views cover the band's rows of it. ``kernel_order``
    gathers the taps in the kernel's (c, kh, kw) order (one group), for
    :func:`kernel_view` weights.
    """
    top, bottom = rows
    groups, stride = layer.groups, layer.stride
    per_group = layer.in_channels // groups
    taps = 9 * per_group
    n = source.shape[0]
    oh = columns.shape[1] // (n * ow)
    band = bottom - top
    source = source[:, top * stride : (bottom - 1) * stride + 3]
    if kernel_order:
        # (n, rows, Wp-2, C, 3, 3): already in (c, kh, kw) order per output pixel
        windows = sliding_window_view(source, (3, 3), axis=(1, 2))
        windows = windows[:, : (band - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]
        gathered = columns[0, :, :taps].reshape(n, oh, ow, per_group, 3, 3)[:, top:bottom]
    elif groups == 1:
        # NHWC rows hold (kw, c) contiguously: gather runs of 3 * C values at a time
        flat = source.reshape(n, source.shape[1], source.shape[2] * per_group)
        windows = sliding_window_view(flat, (3, 3 * per_group), axis=(1, 2))
        windows = windows[
            :,
            : (band - 1) * stride + 1 : stride,
            : (ow - 1) * stride * per_group + 1 : stride * per_group,
        ]
        gathered = columns[0, :, :taps].reshape(n, oh, ow, 3, 3 * per_group)[:, top:bottom]
    else:
        # (n, rows, Wp-2, C, 3, 3) -> strided, cropped -> (g, n, band, ow, 3, 3, Cg)
        windows = sliding_window_view(source, (3, 3), axis=(1, 2))
        windows = windows[:, : (band - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]
        windows = windows.reshape(n, band, ow, groups, per_group, 3, 3).transpose(
            3, 0, 1, 2, 5, 6, 4
        )
        gathered = columns[:, :, :taps].reshape(groups, n, oh, ow, 3, 3, per_group)[
            :, :, top:bottom
        ]
    ones = columns[:, :, taps].reshape(groups, n, oh, ow)[:, :, top:bottom]
    return gathered, windows, ones


def im2col_task(
    source: FloatArray,
    weights: FloatArray,
    layer: Layer,
    interior: FloatArray,
    rows: tuple[int, int],
    arena: Arena,
    bias: FloatArray | None = None,
) -> Callable[[], None]:
    """Output rows ``rows`` of ``interior = relu(conv(source) + bias)``: one gather, one GEMM.

    Each band of output rows gathers only the input rows it reads, into its own
    scratch (``arena``), so bands run side by side on worker threads.
    ``weights`` are :func:`gemm_weights` (bias row included), or
    :func:`kernel_view` with ``bias`` given.
    """
    top, bottom = rows
    interior = interior[:, top:bottom]
    n, oh, ow, out_channels = interior.shape
    groups = layer.groups
    out_per_group = out_channels // groups
    taps = 9 * layer.in_channels // groups
    count = n * oh * ow
    columns = arena.get("columns", (groups, count, taps + 1))
    gathered, windows, ones = _gather_views(
        source[:, top * layer.stride :], layer, (0, oh), columns, ow, kernel_order=bias is not None
    )
    product = arena.get("product", (groups, count, out_per_group))
    grouped = product.reshape(groups, n, oh, ow, out_per_group).transpose(1, 2, 3, 0, 4)
    out = interior.reshape(n, oh, ow, groups, out_per_group)
    if bias is not None:  # kernel_view weights: no bias row, the bias is added to the product
        return partial(
            _kernel_gemm,
            gathered,
            windows,
            columns[0, :, :taps],
            weights,
            product[0],
            bias,
            grouped,
            out,
        )

    def run() -> None:
        np.copyto(gathered, windows)
        ones.fill(1.0)
        np.matmul(columns, weights, out=product)
        np.maximum(grouped, 0, out=out)

    return run


def _kernel_gemm(
    gathered: FloatArray,
    windows: FloatArray,
    columns: FloatArray,
    weights: FloatArray,
    product: FloatArray,
    bias: FloatArray,
    grouped: FloatArray,
    out: FloatArray,
) -> None:
    np.copyto(gathered, windows)
    np.matmul(columns, weights, out=product)
    np.add(product, bias, out=product)
    np.maximum(grouped, 0, out=out)


def im2col_split_tasks(
    source: FloatArray,
    weights: FloatArray,
    layer: Layer,
    interior: FloatArray,
    arena: Arena,
    parts: int,
    bias: FloatArray | None = None,
) -> tuple[list[Callable[[], None]], list[Callable[[], None]]]:
    """One layer as two phases of parallel tasks: gather by row bands, then GEMM by channels.

    For layers whose GEMM has fewer rows (pixels) than columns (output
    channels), e.g. the last stride-2 layer on a 7x7 output: split by rows,
    every thread would stream all of the weights; split by output channels,
    each streams its share once. Every gather task of the first phase
    finishes before any product of the second starts.
    """
    n, oh, ow, out_channels = interior.shape
    groups = layer.groups
    out_per_group = out_channels // groups
    taps = 9 * layer.in_channels // groups
    count = n * oh * ow
    columns = arena.get("columns", (groups, count, taps + 1))
    product = arena.get("product", (groups, count, out_per_group))
    gathers: list[Callable[[], None]] = []
    kernel_order = bias is not None
    for band in split(oh, parts):
        gathered, windows, ones = _gather_views(
            source, layer, band, columns, ow, kernel_order=kernel_order
        )
        gathers.append(partial(_gather, gathered, windows, None if kernel_order else ones))
    grouped = product.reshape(groups, n, oh, ow, out_per_group).transpose(1, 2, 3, 0, 4)
    out = interior.reshape(n, oh, ow, groups, out_per_group)
    products: list[Callable[[], None]] = []
    for start, stop in split(out_per_group, parts):
        if bias is not None:
            products.append(
                partial(
                    _gemm_bias_relu,
                    columns[0, :, :taps],
                    weights[:, start:stop],
                    product[0, :, start:stop],
                    bias[start:stop],
                    out[..., 0, start:stop],
                )
            )
        else:
            products.append(
                partial(
                    _gemm_relu,
                    columns,
                    weights[:, :, start:stop],
                    product[:, :, start:stop],
                    grouped[..., start:stop],
                    out[..., start:stop],
                )
            )
    return gathers, products


def split(length: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into at most ``parts`` nonempty ``[start, stop)`` ranges."""
    count = max(1, min(parts, length))
    bounds = [length * k // count for k in range(count + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(count)]


def _gather(gathered: FloatArray, windows: FloatArray, ones: FloatArray | None) -> None:
    np.copyto(gathered, windows)
    if ones is not None:
        ones.fill(1.0)


def _gemm_bias_relu(
    columns: FloatArray, weights: FloatArray, product: FloatArray, bias: FloatArray, out: FloatArray
) -> None:
    np.matmul(columns, weights, out=product)
    np.add(product, bias, out=product)
    np.maximum(product.reshape(out.shape), 0, out=out)


def _gemm_relu(
    columns: FloatArray,
    weights: FloatArray,
    product: FloatArray,
    grouped: FloatArray,
    out: FloatArray,
) -> None:
    np.matmul(columns, weights, out=product)
    np.maximum(grouped, 0, out=out)


def im2col_nchw_task(
    source: FloatArray,
    weights: FloatArray,
    layer: Layer,
    interior: FloatArray,
    rows: tuple[int, int],
    arena: Arena,
) -> Callable[[], None]:
    """Output rows ``rows`` of the first layer, gathered from an NCHW padded buffer by planes."""
    top, bottom = rows
    stride, channels = layer.stride, layer.in_channels
    source = source[:, :, top * stride : (bottom - 1) * stride + 3]
    interior = interior[:, top:bottom]
    n, oh, ow, out_channels = interior.shape
    taps = 9 * channels
    count = n * oh * ow
    # transposed columns: one row per (c, kh, kw), holding that tap for every output pixel
    columns = arena.get("columns", (taps + 1, count))
    windows = sliding_window_view(source, (3, 3), axis=(2, 3))  # (n, C, Hp-2, Wp-2, 3, 3)
    windows = windows[:, :, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]
    windows = windows.transpose(1, 4, 5, 0, 2, 3)
    planes = columns[:taps].reshape(channels, 3, 3, n, oh, ow)
    ones = columns[taps]  # multiplies the bias row of the weights
    product = arena.get("product", (count, out_channels))
    pixels = product.reshape(n, oh, ow, out_channels)

    def run() -> None:
        np.copyto(planes, windows)
        ones.fill(1.0)
        np.matmul(columns.T, weights, out=product)
        np.maximum(pixels, 0, out=interior)

    return run
