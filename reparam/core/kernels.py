"""Kernels built or reshaped without touching their values: padding and the identity."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .checks import FloatArray, as_float_array, groups_divide, int_pair, positive_int
from .errors import ReparamError

__all__ = ["identity_kernel", "pad_kernel"]


def pad_kernel(kernel: npt.ArrayLike, size: int | tuple[int, int]) -> FloatArray:
    """Zero-pad a kernel, centred, to ``size x size`` (or ``size[0] x size[1]``).

    A ``k x k`` kernel applied with padding ``p - (K - k) // 2`` computes the
    same as the padded ``K x K`` kernel applied with padding ``p``: the extra
    taps are zero and the centre stays where it was.

    Parameters
    ----------
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)
        A floating kernel in OIHW layout.
    size : int or (int, int)
        Target height and width; each at least the kernel's and differing from
        it by an even number, so the kernel sits exactly in the centre.

    Returns
    -------
    ndarray, shape (C_out, C_in // groups, size_h, size_w)
        A new array of the kernel's dtype.

    Raises
    ------
    ReparamError
        If the kernel is not a 4-D floating array, or ``size`` is smaller than
        the kernel or of a parity that cannot centre it.

    Examples
    --------
    >>> import numpy as np
    >>> pad_kernel(np.full((1, 1, 1, 1), 7.0), 3)[0, 0]
    array([[0., 0., 0.],
           [0., 7., 0.],
           [0., 0., 0.]])
    """
    func = "pad_kernel"
    array = as_float_array(kernel, func=func, name="kernel", ndim=4)
    target = int_pair(size, func=func, name="size", minimum=1)
    current = array.shape[2:]
    for axis, (have, want) in enumerate(zip(current, target, strict=True)):
        dim = "height" if axis == 0 else "width"
        if want < have:
            raise ReparamError(
                f"{func}: size is smaller than the kernel; got kernel {dim} {have} and size "
                f"{want}, expected size >= {have}"
            )
        if (want - have) % 2:
            raise ReparamError(
                f"{func}: cannot centre a kernel of {dim} {have} in {want}; expected a size that "
                f"differs from {have} by an even number (e.g. {have + 1 + (want - have)})"
            )
    pad_h, pad_w = ((t - c) // 2 for t, c in zip(target, current, strict=True))
    return np.pad(array, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))


def identity_kernel(
    channels: int,
    *,
    groups: int = 1,
    size: int = 3,
    dtype: npt.DTypeLike = np.float64,
) -> FloatArray:
    """Build the kernel whose convolution returns its input unchanged.

    With ``g`` groups, output channel ``i`` belongs to group ``i // (C/g)`` and
    sees only that group's ``C/g`` input channels, numbered locally from 0.
    Input channel ``i`` is local channel ``i mod (C/g)`` of the same group, so
    the identity puts a single one at
    ``K[i, i mod (C/g), size // 2, size // 2]``. Depthwise (``g = C``) gives
    ``C/g = 1`` and a one in every kernel's centre.

    Parameters
    ----------
    channels : int
        ``C``, both the input and the output channel count.
    groups : int, default 1
        Convolution groups; must divide ``channels``.
    size : int, default 3
        Odd spatial size; use padding ``size // 2`` and stride 1.
    dtype : dtype, default float64
        A floating dtype for the result.

    Returns
    -------
    ndarray, shape (channels, channels // groups, size, size)

    Raises
    ------
    ReparamError
        If ``channels``, ``groups`` or ``size`` are not positive integers,
        ``groups`` does not divide ``channels``, ``size`` is even, or ``dtype``
        is not floating.

    Examples
    --------
    >>> identity_kernel(4, groups=2, size=1)[:, :, 0, 0]
    array([[1., 0.],
           [0., 1.],
           [1., 0.],
           [0., 1.]])
    """
    func = "identity_kernel"
    channels = positive_int(channels, func=func, name="channels")
    groups = positive_int(groups, func=func, name="groups")
    size = positive_int(size, func=func, name="size")
    groups_divide(groups, channels, func=func, what="channels")
    if size % 2 == 0:
        raise ReparamError(f"{func}: size must be odd to have a centre tap; got {size}")
    result_dtype: np.dtype[Any] = np.dtype(dtype)
    if not np.issubdtype(result_dtype, np.floating):
        raise ReparamError(f"{func}: dtype must be floating; got {result_dtype}")
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, size, size), dtype=result_dtype)
    out_channel = np.arange(channels)
    kernel[out_channel, out_channel % per_group, size // 2, size // 2] = 1
    return kernel
