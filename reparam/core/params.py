"""Plain, immutable parameter containers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .checks import FloatArray, as_float_array
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

    @classmethod
    def from_torch(
        cls, state: Mapping[str, Any], prefix: str = "", *, eps: float = 1e-5
    ) -> BatchNorm:
        """Build from a PyTorch ``BatchNorm2d`` state dict (or a whole model's).

        Parameters
        ----------
        state : mapping of str to array_like
            Holds ``{prefix}weight``, ``{prefix}bias``, ``{prefix}running_mean``
            and ``{prefix}running_var`` (tensors are fine: CPU, no grad);
            other keys, such as ``num_batches_tracked``, are ignored.
        prefix : str, default ""
            The module's path in a larger state dict, e.g. ``"stage1.0.rbr_dense.bn"``
            (a trailing dot is added when missing).
        eps : float, default 1e-5
            The layer's ``eps`` (PyTorch's default is 1e-5; it is not in the state dict).

        Returns
        -------
        BatchNorm

        Raises
        ------
        ReparamError
            If a key is missing (the message lists what was found under the prefix).

        Examples
        --------
        >>> import numpy as np
        >>> state = {"bn.weight": np.ones(3), "bn.bias": np.zeros(3),
        ...          "bn.running_mean": np.zeros(3), "bn.running_var": np.ones(3)}
        >>> BatchNorm.from_torch(state, "bn").channels
        3
        """
        if prefix and not prefix.endswith("."):
            prefix += "."
        names = ("weight", "bias", "running_mean", "running_var")
        gamma, beta, mean, var = _lookup(
            state, [prefix + name for name in names], func="BatchNorm.from_torch"
        )
        return cls(gamma, beta, mean, var, eps=eps)

    @classmethod
    def from_keras(
        cls, weights: Mapping[str, Any] | Sequence[Any], *, epsilon: float = 1e-3
    ) -> BatchNorm:
        """Build from a Keras ``BatchNormalization`` layer's weights.

        Parameters
        ----------
        weights : mapping or sequence of array_like
            Either a mapping with ``moving_mean`` and ``moving_variance`` and,
            unless the layer had ``scale=False`` / ``center=False``, ``gamma``
            and ``beta``; or the list ``layer.get_weights()`` returns:
            ``[gamma, beta, moving_mean, moving_variance]``.
        epsilon : float, default 1e-3
            The layer's ``epsilon`` (Keras' default is 1e-3, not PyTorch's 1e-5).

        Returns
        -------
        BatchNorm
            A missing ``gamma`` becomes ones and a missing ``beta`` zeros.

        Raises
        ------
        ReparamError
            If a required array is missing or a list does not hold four arrays.

        Examples
        --------
        >>> import numpy as np
        >>> BatchNorm.from_keras([np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)]).eps
        0.001
        """
        func = "BatchNorm.from_keras"
        if not isinstance(weights, Mapping):
            arrays = list(weights)
            if len(arrays) != 4:
                raise ReparamError(
                    f"{func}: weights must be [gamma, beta, moving_mean, moving_variance]; got "
                    f"{len(arrays)} arrays, expected 4 (hint: for scale=False or center=False "
                    "pass a dict with the names instead)"
                )
            gamma, beta, mean, var = arrays
            return cls(gamma, beta, mean, var, eps=epsilon)
        mean, var = _lookup(weights, ["moving_mean", "moving_variance"], func=func)
        gamma, beta = _scale_and_shift(weights, "gamma", "beta", mean)
        return cls(gamma, beta, mean, var, eps=epsilon)

    @classmethod
    def from_flax(
        cls, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, epsilon: float = 1e-5
    ) -> BatchNorm:
        """Build from a Flax ``nn.BatchNorm`` layer's variables.

        Parameters
        ----------
        params : mapping
            The layer's entry in the ``params`` collection: ``scale`` and
            ``bias`` (either may be absent with ``use_scale=False`` /
            ``use_bias=False``).
        batch_stats : mapping
            The layer's entry in the ``batch_stats`` collection: ``mean`` and ``var``.
        epsilon : float, default 1e-5
            The layer's ``epsilon`` (Flax's default is 1e-5).

        Returns
        -------
        BatchNorm

        Raises
        ------
        ReparamError
            If ``mean`` or ``var`` is missing.

        Examples
        --------
        >>> import numpy as np
        >>> stats = {"mean": np.zeros(2), "var": np.ones(2)}
        >>> bn = BatchNorm.from_flax({"scale": np.ones(2)}, stats)
        >>> bn.beta
        array([0., 0.])
        """
        mean, var = _lookup(batch_stats, ["mean", "var"], func="BatchNorm.from_flax")
        gamma, beta = _scale_and_shift(params, "scale", "bias", mean)
        return cls(gamma, beta, mean, var, eps=epsilon)

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.gamma.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        """Common dtype of the four arrays."""
        return self.gamma.dtype

    def scale(self, dtype: npt.DTypeLike | None = None) -> FloatArray:
        """Return ``gamma / sqrt(var + eps)`` per channel, computed in float64, rounded once.

        Parameters
        ----------
        dtype : dtype, optional
            Of the result; the BatchNorm's own dtype by default.

        Returns
        -------
        ndarray, shape (C,)
        """
        factor = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.eps)
        return factor.astype(self.dtype if dtype is None else dtype)

    def output_at_zero(self, dtype: npt.DTypeLike | None = None) -> FloatArray:
        """Return the output for a zero input: ``beta - mean * gamma / sqrt(var + eps)``.

        Computed in float64 and rounded once. Diverse Branch Block pads with
        this value after a BatchNorm, so that the padding can move in front of
        the convolution before it (see :class:`reparam.core.algebra.Pad`).

        Examples
        --------
        >>> import numpy as np
        >>> BatchNorm(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]),
        ...           eps=0.0).output_at_zero()
        array([-2.])
        """
        value = self.beta.astype(np.float64) - self.mean.astype(np.float64) * self.scale(np.float64)
        return value.astype(self.dtype if dtype is None else dtype)

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


def _lookup(mapping: Mapping[str, Any], keys: list[str], *, func: str) -> list[Any]:
    """Return ``mapping[key]`` for every key, or one error listing all that are missing."""
    missing = [key for key in keys if key not in mapping]
    if missing:
        available = sorted(str(key) for key in mapping)
        shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
        raise ReparamError(
            f"{func}: missing {', '.join(repr(key) for key in missing)}; got keys [{shown}], "
            f"expected {', '.join(repr(key) for key in keys)}"
        )
    return [mapping[key] for key in keys]


def _scale_and_shift(
    mapping: Mapping[str, Any], scale_key: str, shift_key: str, like: Any
) -> tuple[Any, Any]:
    """Return the affine scale and shift (ones and zeros where the layer has none)."""
    reference = np.asarray(like)
    scale = mapping.get(scale_key)
    shift = mapping.get(shift_key)
    return (
        np.ones_like(reference) if scale is None else scale,
        np.zeros_like(reference) if shift is None else shift,
    )
