"""Converters between the array layouts frameworks use.

reparam works in PyTorch's layouts: kernels OIHW ``(C_out, C_in // groups,
kH, kW)`` and activations NCHW. TensorFlow/Keras and Flax/JAX store kernels as
HWIO ``(kH, kW, C_in // groups, C_out)`` and activations as NHWC. Convert at
the edge, once: ``hwio_to_oihw`` on the way in, ``oihw_to_hwio`` on the way
out. Every function returns a new C-contiguous array, never a view.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .checks import FloatArray, as_float_array

__all__ = ["hwio_to_oihw", "nchw_to_nhwc", "nhwc_to_nchw", "oihw_to_hwio"]


def _transpose(
    array: npt.ArrayLike, axes: tuple[int, int, int, int], *, func: str, name: str
) -> FloatArray:
    checked = as_float_array(array, func=func, name=name, ndim=4)
    return np.array(checked.transpose(axes), order="C", copy=True)


def hwio_to_oihw(kernel: npt.ArrayLike) -> FloatArray:
    """Turn a Keras/Flax kernel ``(kH, kW, C_in // groups, C_out)`` into OIHW.

    Parameters
    ----------
    kernel : array_like, shape (kH, kW, C_in // groups, C_out)

    Returns
    -------
    ndarray, shape (C_out, C_in // groups, kH, kW)

    Raises
    ------
    ReparamError
        If ``kernel`` is not a 4-D floating array.

    Examples
    --------
    >>> hwio_to_oihw(np.zeros((3, 3, 4, 8))).shape
    (8, 4, 3, 3)
    """
    return _transpose(kernel, (3, 2, 0, 1), func="hwio_to_oihw", name="kernel")


def oihw_to_hwio(kernel: npt.ArrayLike) -> FloatArray:
    """Turn an OIHW kernel into Keras/Flax's ``(kH, kW, C_in // groups, C_out)``.

    Parameters
    ----------
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)

    Returns
    -------
    ndarray, shape (kH, kW, C_in // groups, C_out)

    Raises
    ------
    ReparamError
        If ``kernel`` is not a 4-D floating array.

    Examples
    --------
    >>> oihw_to_hwio(np.zeros((8, 4, 3, 3))).shape
    (3, 3, 4, 8)
    """
    return _transpose(kernel, (2, 3, 1, 0), func="oihw_to_hwio", name="kernel")


def nhwc_to_nchw(x: npt.ArrayLike) -> FloatArray:
    """Turn channels-last activations ``(N, H, W, C)`` into NCHW.

    Parameters
    ----------
    x : array_like, shape (N, H, W, C)

    Returns
    -------
    ndarray, shape (N, C, H, W)

    Raises
    ------
    ReparamError
        If ``x`` is not a 4-D floating array.

    Examples
    --------
    >>> nhwc_to_nchw(np.zeros((2, 5, 6, 3))).shape
    (2, 3, 5, 6)
    """
    return _transpose(x, (0, 3, 1, 2), func="nhwc_to_nchw", name="x")


def nchw_to_nhwc(x: npt.ArrayLike) -> FloatArray:
    """Turn NCHW activations into channels-last ``(N, H, W, C)``.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)

    Returns
    -------
    ndarray, shape (N, H, W, C)

    Raises
    ------
    ReparamError
        If ``x`` is not a 4-D floating array.

    Examples
    --------
    >>> nchw_to_nhwc(np.zeros((2, 3, 5, 6))).shape
    (2, 5, 6, 3)
    """
    return _transpose(x, (0, 2, 3, 1), func="nchw_to_nhwc", name="x")
