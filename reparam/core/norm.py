"""Inference-time BatchNorm applied to an activation array."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .checks import FloatArray, as_float_array
from .errors import ReparamError
from .params import BatchNorm

__all__ = ["batch_norm"]


def batch_norm(x: npt.ArrayLike, bn: BatchNorm) -> FloatArray:
    """Apply an inference BatchNorm along axis 1 of ``x``.

    Parameters
    ----------
    x : array_like, shape (N, C, ...)
        Activations with channels on axis 1 (NCHW for images).
    bn : BatchNorm
        Parameters over ``C`` channels.

    Returns
    -------
    ndarray, shape (N, C, ...)
        ``gamma * (x - mean) / sqrt(var + eps) + beta`` as a new array of
        ``np.result_type(x, bn.dtype)``. The per-channel factor
        ``gamma / sqrt(var + eps)`` is computed in float64 and rounded once.

    Raises
    ------
    ReparamError
        If ``x`` is not floating with at least 2 dimensions, ``bn`` is not a
        :class:`BatchNorm`, or its channel count differs from ``x.shape[1]``.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]), eps=0.0)
    >>> batch_norm(np.full((1, 1, 1, 1), 5.0), bn).item()
    3.0
    """
    func = "batch_norm"
    inputs = as_float_array(x, func=func, name="x")
    if inputs.ndim < 2:
        raise ReparamError(
            f"{func}: x must have a channel axis 1; got shape {inputs.shape}, expected (N, C, ...)"
        )
    if not isinstance(bn, BatchNorm):
        raise ReparamError(f"{func}: bn must be a reparam.BatchNorm; got {type(bn).__name__}")
    if bn.channels != inputs.shape[1]:
        raise ReparamError(
            f"{func}: bn has {bn.channels} channels but x has {inputs.shape[1]}; got "
            f"x.shape={inputs.shape}, expected x.shape[1] == {bn.channels}"
        )
    dtype = np.result_type(inputs, bn.dtype)
    axes = (slice(None),) + (None,) * (inputs.ndim - 2)
    centred = inputs.astype(dtype) - bn.mean.astype(dtype)[axes]
    result: FloatArray = centred * bn.scale(dtype)[axes]
    result += bn.beta.astype(dtype)[axes]
    return result
