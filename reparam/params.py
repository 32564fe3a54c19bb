"""Plain, immutable parameter containers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._checks import FloatArray, as_float_array
from .errors import ReparamError

__all__ = ["BatchNorm", "ConvBias"]

_BN_FIELDS = ("gamma", "beta", "mean", "var")


class ConvBias(NamedTuple):
    """A convolution with bias: what every fusion step returns.

    Attributes
    ----------
    kernel : ndarray, shape (C_out, C_in // groups, kH, kW)
        Convolution weights (OIHW layout).
    bias : ndarray, shape (C_out,)
        One bias per output channel.
    """

    kernel: FloatArray
    bias: FloatArray


def _frozen_copy(array: FloatArray, dtype: np.dtype[Any]) -> FloatArray:
    copy = np.array(array, dtype=dtype, copy=True)
    copy.setflags(write=False)
    return copy


@dataclass(frozen=True, init=False, eq=False)
class BatchNorm:
    """Inference parameters of one BatchNorm layer over ``C`` channels.

    At inference a BatchNorm is the per-channel affine map
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.

    Parameters
    ----------
    gamma, beta, mean, var : array_like, shape (C,)
        Scale, shift, running mean and running variance. Floating dtypes
        only; they are copied (the caller's arrays are never referenced) and
        stored read-only in their common dtype ``np.result_type``.
    eps : float, default 1e-5
        Added to the variance (PyTorch and Flax default 1e-5, Keras 1e-3).
        Stored as a Python float, so a ``np.float64`` eps never upcasts
        float32 arrays under NumPy 2 promotion rules.

    Raises
    ------
    ReparamError
        If an array is not 1-D or not floating, the lengths differ, a value is
        not finite, a variance is negative, ``eps`` is negative or not finite,
        or ``var + eps`` is not positive for some channel.

    Notes
    -----
    Unpacks like a tuple: ``gamma, beta, mean, var, eps = bn``.

    Examples
    --------
    >>> import numpy as np
    >>> bn = BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2))
    >>> bn.channels, bn.eps
    (2, 1e-05)
    """

    gamma: FloatArray
    beta: FloatArray
    mean: FloatArray
    var: FloatArray
    eps: float

    def __init__(
        self,
        gamma: npt.ArrayLike,
        beta: npt.ArrayLike,
        mean: npt.ArrayLike,
        var: npt.ArrayLike,
        eps: float = 1e-5,
    ) -> None:
        func = "BatchNorm"
        arrays = {
            name: as_float_array(value, func=func, name=name, ndim=1)
            for name, value in zip(_BN_FIELDS, (gamma, beta, mean, var), strict=True)
        }
        lengths = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ReparamError(
                f"{func}: gamma, beta, mean and var must have one length C; got lengths "
                + ", ".join(f"{name}={n}" for name, n in lengths.items())
            )
        eps = _check_eps(eps)
        for name, a in arrays.items():
            bad = ~np.isfinite(a)
            if bad.any():
                raise ReparamError(
                    f"{func}: {name} must be finite; got {a[bad][0]} at channel "
                    f"{int(np.flatnonzero(bad)[0])}"
                )
        var_array = arrays["var"]
        if (var_array < 0).any():
            index = int(np.flatnonzero(var_array < 0)[0])
            raise ReparamError(
                f"{func}: var must be >= 0 (a variance); got {var_array[index]} at channel {index}"
            )
        denominator = var_array.astype(np.float64) + eps
        if (denominator <= 0).any():
            index = int(np.flatnonzero(denominator <= 0)[0])
            raise ReparamError(
                f"{func}: var + eps must be > 0; got var={var_array[index]} and eps={eps} at "
                f"channel {index} (hint: use the eps the layer was trained with, e.g. 1e-5)"
            )
        dtype = np.result_type(*arrays.values())
        for name, a in arrays.items():
            object.__setattr__(self, name, _frozen_copy(a, dtype))
        object.__setattr__(self, "eps", eps)

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.gamma.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        """Common dtype of the four arrays."""
        return self.gamma.dtype

    def astype(self, dtype: npt.DTypeLike) -> BatchNorm:
        """Return a copy whose arrays have ``dtype`` (eps unchanged)."""
        return BatchNorm(
            self.gamma.astype(dtype),
            self.beta.astype(dtype),
            self.mean.astype(dtype),
            self.var.astype(dtype),
            eps=self.eps,
        )

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``gamma, beta, mean, var, eps``."""
        return iter((self.gamma, self.beta, self.mean, self.var, self.eps))

    def __repr__(self) -> str:
        return f"BatchNorm(channels={self.channels}, dtype={self.dtype}, eps={self.eps})"


def _check_eps(eps: Any) -> float:
    real = (int, float, np.integer, np.floating)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, real):
        raise ReparamError(f"BatchNorm: eps must be a real number; got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ReparamError(f"BatchNorm: eps must be finite and >= 0; got {value}")
    return value
