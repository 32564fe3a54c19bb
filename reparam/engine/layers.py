"""One deploy layer as the engine sees it: a 3x3 kernel, its bias, stride and groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checks import FloatArray, as_float_array, positive_int
from ..core.errors import ReparamError

__all__ = ["Layer", "check_layer", "output_size", "winograd_allowed"]


@dataclass(frozen=True)
class Layer:
    """One validated deploy layer and its precomputed float64 weights."""

    kernel: FloatArray  # (O, I/g, 3, 3), read-only: the caller's array if it was read-only
    bias: FloatArray  # (O,)
    stride: int
    groups: int

    @property
    def in_channels(self) -> int:
        """``kernel.shape[1] * groups``."""
        return int(self.kernel.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        """``kernel.shape[0]``."""
        return int(self.kernel.shape[0])


def output_size(size: int, stride: int) -> int:
    """Output length of a 3-tap, padding-1 convolution."""
    return (size - 1) // stride + 1


def check_layer(index: int, entry: Any, *, func: str) -> Layer:
    """Validate one ``(kernel, bias, stride, groups)`` entry (or a deploy block) as a Layer."""
    where = f"layer {index}"
    if all(hasattr(entry, name) for name in ("kernel", "bias", "stride", "groups")):
        entry = (entry.kernel, entry.bias, entry.stride, entry.groups)
    try:
        kernel_like, bias_like, stride, groups = entry
    except (TypeError, ValueError) as exc:
        raise ReparamError(
            f"{func}: {where} must be a (kernel, bias, stride, groups) tuple; got {entry!r:.80}"
        ) from exc
    kernel = as_float_array(kernel_like, func=func, name=f"{where} kernel", ndim=4)
    bias = as_float_array(bias_like, func=func, name=f"{where} bias", ndim=1)
    stride = positive_int(stride, func=func, name=f"{where} stride")
    groups = positive_int(groups, func=func, name=f"{where} groups")
    out_channels, per_group, kh, kw = kernel.shape
    if (kh, kw) != (3, 3):
        raise ReparamError(
            f"{func}: {where} kernel must be 3x3; got shape {kernel.shape}, "
            "expected (C_out, C_in // groups, 3, 3) (hint: fuse the block first)"
        )
    if stride not in (1, 2):
        raise ReparamError(f"{func}: {where} stride must be 1 or 2; got {stride}")
    if out_channels % groups != 0 or per_group < 1:
        raise ReparamError(
            f"{func}: {where} groups={groups} does not divide C_out={out_channels}; "
            f"expected a divisor of {out_channels}"
        )
    if bias.shape[0] != out_channels:
        raise ReparamError(
            f"{func}: {where} bias has the wrong length; got {bias.shape[0]}, "
            f"expected {out_channels} (kernel.shape[0])"
        )
    return Layer(_held(kernel), _held(bias), stride, groups)


def _held(array: FloatArray) -> FloatArray:
    """Return ``array`` itself if read-only and C-contiguous, else a read-only copy.

    A deploy model's kernels are read-only already: the stack shares them
    instead of holding a second copy of every weight (RepVGG-B1: 190 MiB).
    """
    if array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
        array.setflags(write=False)
    return array


def winograd_allowed(layer: Layer) -> bool:
    """Whether Winograd applies: stride 1 and one group."""
    return layer.stride == 1 and layer.groups == 1
