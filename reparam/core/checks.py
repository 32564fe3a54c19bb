"""Input checks shared by the public functions of every layer (core, families, models, engine).

Every check raises :class:`~reparam.ReparamError` with a message of
the form ``function: problem; got X, expected Y``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ReparamError

FloatArray = npt.NDArray[np.floating[Any]]


def as_float_array(value: Any, *, func: str, name: str, ndim: int | None = None) -> FloatArray:
    """Return ``value`` as a floating NumPy array (no copy yet), checking dtype and rank."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # e.g. a tensor that needs .detach() first
        raise ReparamError(
            f"{func}: {name} cannot be converted to a NumPy array ({exc}); "
            "hint: pass a NumPy array or a CPU tensor (PyTorch: tensor.detach().cpu())"
        ) from exc
    if not np.issubdtype(array.dtype, np.floating):
        raise ReparamError(
            f"{func}: {name} must have a floating dtype; got {array.dtype}, "
            "expected float16, float32 or float64 (hint: convert with .astype(np.float32))"
        )
    if ndim is not None and array.ndim != ndim:
        raise ReparamError(
            f"{func}: {name} must be {ndim}-D; got shape {array.shape} ({array.ndim}-D), "
            f"expected {ndim} dimensions"
        )
    return array


def positive_int(value: Any, *, func: str, name: str) -> int:
    """Return ``value`` as an int >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ReparamError(f"{func}: {name} must be an integer; got {value!r}")
    if value < 1:
        raise ReparamError(f"{func}: {name} must be >= 1; got {value}")
    return int(value)


def int_pair(value: Any, *, func: str, name: str, minimum: int) -> tuple[int, int]:
    """Return an int or a pair of ints as a pair, each >= ``minimum``."""
    items = (value, value) if isinstance(value, (int, np.integer)) else value
    try:
        pair = tuple(items)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in pair
    ):
        raise ReparamError(f"{func}: {name} must be an int or a pair of ints; got {value!r}")
    first, second = int(pair[0]), int(pair[1])
    if first < minimum or second < minimum:
        raise ReparamError(f"{func}: {name} must be >= {minimum}; got {value!r}")
    return first, second


def groups_divide(groups: int, channels: int, *, func: str, what: str) -> None:
    """Check that ``groups`` divides ``channels``."""
    if channels % groups != 0:
        raise ReparamError(
            f"{func}: groups={groups} does not divide {what}={channels}; "
            f"expected a divisor of {channels}"
        )


def bias_vector(value: Any, *, length: int, func: str, name: str, what: str) -> FloatArray:
    """Return ``value`` as a 1-D floating array of ``length`` entries (one per ``what``)."""
    array = as_float_array(value, func=func, name=name, ndim=1)
    if array.shape[0] != length:
        raise ReparamError(
            f"{func}: {name} has the wrong length; got {array.shape[0]}, expected {length} ({what})"
        )
    return array
