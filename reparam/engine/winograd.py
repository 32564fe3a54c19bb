"""Winograd's minimal filtering F(m x m, 3 x 3) for stride-1 layers (Lavin & Gray, 2016)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.checks import FloatArray
from ..core.errors import ReparamError
from .layers import Layer
from .memory import Arena

__all__ = [
    "tile_side",
    "transforms",
    "winograd_matrices",
    "winograd_shape",
    "winograd_task",
    "winograd_weights",
]


def winograd_matrices(tile: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return the transforms ``(B^T, G, A^T)`` of Winograd's F(m x m, 3 x 3), ``m = tile``.

    Parameters
    ----------
    tile : {2, 4}
        Output tile side ``m``; the input tile side is ``t = m + 2``.

    Returns
    -------
    tuple of ndarray, shapes (t, t), (t, 3), (m, t)
        Input transform ``B^T``, kernel transform ``G`` and output transform
        ``A^T`` in float64, such that a 1-D correlation of a length-``t``
        input ``d`` with a 3-tap kernel ``g`` is ``A^T [(G g) * (B^T d)]``.

    Raises
    ------
    ReparamError
        If ``tile`` is not 2 or 4.

    Notes
    -----
    The interpolation points are 0, 1, -1 (and 2, -2 for ``m = 4``) and
    infinity, the choice of Lavin & Gray (2016) that keeps the coefficients
    small. The 2-D algorithm nests the 1-D one: ``Y = A^T [(G g G^T) *
    (B^T d B)] A``.

    Examples
    --------
    >>> import numpy as np
    >>> bt, g, at = winograd_matrices(2)
    >>> d, k = np.arange(4.0), np.array([1.0, 2.0, 3.0])
    >>> at @ ((g @ k) * (bt @ d))
    array([ 8., 14.])
    """
    if tile == 2:
        bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float)
        g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
        at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)
        return bt, g, at
    if tile == 4:
        bt = np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            float,
        )
        g = np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ]
        )
        at = np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
            float,
        )
        return bt, g, at
    raise ReparamError(f"winograd_matrices: unsupported tile; got {tile!r}, expected 2 or 4")


def winograd_shape(layer: Layer, *, tile: int) -> tuple[int, ...]:
    """Shape of :func:`winograd_weights`: ``(t * t, I, O)``, ``t = tile + 2``."""
    return ((tile + 2) ** 2, layer.in_channels, layer.out_channels)


def winograd_weights(layer: Layer, out: FloatArray, *, tile: int) -> None:
    """Fill ``out`` with the transformed kernels ``U = G k G^T``, ``(t * t, I, O)``, in float64.

    Computed in float64 and rounded once to ``out``'s dtype; the float64
    intermediates are one layer's, freed before the next layer's.
    """
    _, g, _ = winograd_matrices(tile)
    side = tile + 2
    kernel = layer.kernel.astype(np.float64)  # (O, I, 3, 3)
    # two large products (not millions of 3x3 ones): contract the rows, then the columns
    rows = np.tensordot(g, kernel, axes=(1, 2))  # (t, O, I, 3)
    del kernel
    transformed = np.tensordot(rows, g, axes=(3, 1))  # (t, O, I, t)
    del rows
    matrix = out.reshape(side, side, layer.in_channels, layer.out_channels)
    np.copyto(matrix, transformed.transpose(0, 3, 2, 1), casting="unsafe")


_TRANSFORMS: dict[tuple[int, np.dtype[Any]], tuple[FloatArray, FloatArray]] = {}


def transforms(tile: int, dtype: np.dtype[Any]) -> tuple[FloatArray, FloatArray]:
    """``(B^T, A^T)`` in ``dtype`` (their entries are small integers: exact in any float)."""
    key = (tile, np.dtype(dtype))
    if key not in _TRANSFORMS:
        bt, _, at = winograd_matrices(tile)
        _TRANSFORMS[key] = (bt.astype(dtype), at.astype(dtype))
    return _TRANSFORMS[key]


def tile_side(algorithm: str) -> int:
    """Output tile side of a Winograd algorithm."""
    return 2 if algorithm == "winograd2" else 4


def winograd_task(
    source: FloatArray,
    weights: FloatArray,
    bias: FloatArray,
    target: FloatArray,
    origin: int,
    rows: tuple[int, int],
    width: int,
    arena: Arena,
    tile: int,
) -> Callable[[], None]:
    """Output rows ``rows`` of ``relu(conv(source) + bias)`` by Winograd F(tile x tile, 3 x 3).

    Whole tiles are written into ``target`` (from ``origin``); what falls
    beyond the image is zeroed again, so a zero border stays zero.
    """
    bt, at = transforms(tile, target.dtype)
    side = tile + 2
    top, bottom = rows
    n, channels = source.shape[0], source.shape[3]
    out_channels = target.shape[3]
    th, tw = -(-(bottom - top) // tile), -(-width // tile)
    tiles = n * th * tw
    # every (side x side) input tile, overlapping by 2: d[a, b] = pixel (a, b) of each tile
    band = source[:, top : top + th * tile + 2]
    windows = sliding_window_view(band, (side, side), axis=(1, 2))
    windows = windows[:, : (th - 1) * tile + 1 : tile, : (tw - 1) * tile + 1 : tile]
    windows = windows.transpose(4, 5, 0, 1, 2, 3)
    # two scratch slots, each array written once the one before it in its slot is dead:
    # d -> v -> z in one, e -> m -> y in the other (less scratch: more images per call)
    d = arena.get("gathered", (side, side, n, th, tw, channels))
    e = arena.get("product", (side, side, tiles * channels))
    v = arena.get("gathered", (side, side, tiles * channels))  # d is dead: e holds it
    m = arena.get("product", (side * side, tiles, out_channels))  # e is dead: v holds it
    z = arena.get("gathered", (side, tile, tiles * out_channels))  # v is dead
    y = arena.get("product", (tile, tile, n, th, tw, out_channels))  # m is dead: z holds it
    # the output region, whole tiles, seen as (i, j, n, tile row, tile column, channel)
    region = target[:, origin + top : origin + top + th * tile, origin : origin + tw * tile]
    out = region.reshape(n, th, tile, tw, tile, out_channels).transpose(2, 4, 0, 1, 3, 5)
    beyond = []  # parts of whole tiles outside the image
    if top + th * tile > bottom:
        beyond.append(target[:, origin + bottom : origin + top + th * tile, origin:])
    if tw * tile > width:
        beyond.append(target[:, origin + top : origin + top + th * tile, origin + width :])

    def run() -> None:
        np.copyto(d, windows)
        # input transform B^T d B as two small matrix products over all tiles and channels
        # (stacks of small products: each stays in cache, and BLAS runs it on one core)
        np.matmul(bt, d.reshape(side, side, -1).transpose(1, 0, 2), out=e)  # e[b, i]
        np.matmul(bt, e.transpose(1, 0, 2), out=v)  # v[i, j] = sum_b bt[j, b] e[b, i]
        np.matmul(v.reshape(side * side, tiles, channels), weights, out=m)
        # column 1 of A^T is all ones, so a bias added to m[1, 1] reaches every output pixel
        np.add(m[side + 1], bias, out=m[side + 1])
        # output transform A^T m A, the same way, then ReLU into the target
        np.matmul(at, m.reshape(side, side, -1).transpose(1, 0, 2), out=z)  # z[b, i]
        np.matmul(at, z.transpose(1, 0, 2), out=y.reshape(tile, tile, -1))  # y[i, j]
        np.maximum(y, 0, out=out)
        for part in beyond:
            part.fill(0.0)

    return run
