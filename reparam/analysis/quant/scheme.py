"""The INT8 scheme: onnxruntime's static QDQ quantization (MinMax, int8), as numbers.

This is how ``onnxruntime.quantization.quantize_static`` (QDQ format, MinMax
calibration, int8) quantizes the graph ``reparam export`` writes, and how its
CPU provider computes:

- activations are asymmetric: the calibrated range ``[rmin, rmax]`` is
  widened to include 0, ``scale = (rmax - rmin) / 255`` and ``zero_point =
  round(-128 - rmin / scale)``. The input, every Conv output (its range
  measured *after* the ReLU, which is then dropped: the zero point -128 does
  the clamp), the GlobalAveragePool output and the logits are quantized;
- weights are symmetric, ``scale = max |w| / 127`` (per tensor, or per output
  channel, axis 0, the Gemm included), ``/ 64`` with ``reduce_range``;
  ``q = round(w / scale)``;
- biases are int32 at scale ``s_x * s_w``;
- QLinearConv, QLinearGlobalAveragePool and QGemm accumulate in int32 and
  requantize with the float32 multiplier ``(s_x * s_w) / s_y`` (``s_x /
  (s_y * H W)`` for the pool), rounding half to even.

Every rounding here is NumPy's ``np.round``: half to even, as onnxruntime rounds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ...core.checks import FloatArray
from ...core.errors import ReparamError

__all__ = [
    "INT32",
    "ActivationQuant",
    "Float64Array",
    "LayerQuant",
    "QParams",
    "activation_quant",
    "dequantize",
    "fake_quantize",
    "per_row",
    "quantize",
    "quantize_bias",
    "quantize_weight",
    "requantize",
    "weight_scale",
]

#: The int32 accumulator's and bias's range.
INT32 = (-(2**31), 2**31 - 1)
_F32 = np.float32
Float64Array = npt.NDArray[np.float64]


class ActivationQuant(NamedTuple):
    """Asymmetric 8-bit quantization of one activation tensor.

    Attributes
    ----------
    scale : float
        A float32 value (stored exactly as a Python float).
    zero_point : int
    signed : bool, default True
        int8 (-128..127) or uint8 (0..255).
    """

    scale: float
    zero_point: int
    signed: bool = True

    @property
    def bounds(self) -> tuple[int, int]:
        """``(qmin, qmax)``."""
        return (-128, 127) if self.signed else (0, 255)


class LayerQuant(NamedTuple):
    """A quantized Conv (or the Gemm head): integer weights, bias and the activations around it.

    Attributes
    ----------
    name : str
        The block's name (``"stage2.1"``) or ``"head"``.
    weight : ndarray of int8, shape (C_out, C_in // groups, K, K) or (classes, C)
    weight_scale : ndarray of float32, shape (1,) or (C_out,)
        One scale per tensor or per output channel; zero points are 0.
    bias : ndarray of int32, shape (C_out,)
        At scale ``input.scale * weight_scale``.
    input, output : ActivationQuant
    """

    name: str
    weight: npt.NDArray[np.int8]
    weight_scale: npt.NDArray[np.float32]
    bias: npt.NDArray[np.int32]
    input: ActivationQuant
    output: ActivationQuant


class QParams(NamedTuple):
    """Everything a QDQ-quantized ``reparam export`` graph fixes.

    Attributes
    ----------
    layers : tuple of LayerQuant
        One per block, in order; ``layers[0].input`` quantizes the image.
    pool : ActivationQuant
        The GlobalAveragePool output.
    head : LayerQuant
        The Gemm; ``head.output`` quantizes the logits.
    per_channel : bool
        Whether weight scales are per output channel.
    """

    layers: tuple[LayerQuant, ...]
    pool: ActivationQuant
    head: LayerQuant
    per_channel: bool


def activation_quant(rmin: float, rmax: float) -> ActivationQuant:
    """Return onnxruntime's ``compute_scale_zp`` for an int8 activation (float32 range).

    Examples
    --------
    >>> activation_quant(-1.0, 2.0).zero_point  # round(-128 + 1 / (3 / 255))
    -43
    >>> activation_quant(0.0, 0.0)  # an empty range
    ActivationQuant(scale=1.0, zero_point=0, signed=True)
    """
    low = min(_F32(rmin), _F32(0.0))
    high = max(_F32(rmax), _F32(0.0))
    scale = np.float64(_F32(high - low)) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return ActivationQuant(1.0, 0)
    zero_point = int(np.round(-128.0 - np.float64(low) / scale))
    return ActivationQuant(float(_F32(scale)), zero_point)


def _weight_limit(reduce_range: bool) -> int:
    """Return the largest weight step: 127, or 64 with onnxruntime's 7-bit ``reduce_range``."""
    return 64 if reduce_range else 127


def per_row(values: npt.NDArray[Any], ndim: int) -> npt.NDArray[Any]:
    """Shape ``(C,)`` (or ``(1,)``) to broadcast over axis 0 of an ``ndim``-D array."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


def weight_scale(
    weight: FloatArray, *, per_channel: bool, reduce_range: bool = False
) -> npt.NDArray[np.float32]:
    """Symmetric int8 scales ``max |w| / 127`` (``/ 64`` with ``reduce_range``), float32.

    Parameters
    ----------
    weight : ndarray, shape (C_out, ...)
    per_channel : bool
        One scale per output channel (axis 0), or one for the tensor.
    reduce_range : bool, default False

    Returns
    -------
    ndarray of float32, shape (C_out,) or (1,)
        1.0 where a channel is all zero; computed as onnxruntime's
        ``compute_scale_zp`` does, ``2 max |w| / (q_max - q_min)`` in float64.
    """
    rows = weight.astype(np.float32).reshape(weight.shape[0] if per_channel else 1, -1)
    absmax = np.abs(rows).max(axis=1)
    steps = 2.0 * _weight_limit(reduce_range)
    scale = (np.float64(2.0) * absmax.astype(np.float64) / steps).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, _F32(1.0), scale).astype(np.float32)


def quantize_weight(
    weight: FloatArray, scale: npt.NDArray[np.float32], *, reduce_range: bool = False
) -> npt.NDArray[np.int8]:
    """Return ``clip(round(w / scale), -127, 127)`` (``-64..64`` with ``reduce_range``), int8."""
    limit = _weight_limit(reduce_range)
    ratio = weight.astype(np.float32) / per_row(scale, weight.ndim)
    quantized: npt.NDArray[np.int8] = np.clip(np.round(ratio), -limit, limit).astype(np.int8)
    return quantized


def quantize_bias(
    bias: FloatArray, input_scale: float, scale: npt.NDArray[np.float32], *, name: str
) -> npt.NDArray[np.int32]:
    """Return the int32 bias ``round(b / (s_x * s_w))``.

    Raises
    ------
    ReparamError
        Starting with ``name``, if a channel's bias is beyond int32 at that step.
    """
    step = (_F32(input_scale) * scale).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ratio = np.round(bias.astype(np.float32) / step)
    outside = np.flatnonzero(~((ratio >= INT32[0]) & (ratio <= INT32[1])))
    if outside.size:
        channel = int(outside[0])
        raise ReparamError(
            f"{name}: cannot be quantized: the bias of channel {channel} "
            f"({float(bias[channel]):.4g}) is {float(ratio[channel]):.3g} steps of "
            f"s_x * s_w = {float(step[min(channel, step.size - 1)]):.3g}, beyond int32; the "
            "channel's weights are tiny against its bias"
        )
    return ratio.astype(np.int32)


def quantize(x: npt.NDArray[Any], quant: ActivationQuant) -> Float64Array:
    """QuantizeLinear in float32 (``x / scale``, round half to even), as integers in float64."""
    low, high = quant.bounds
    with np.errstate(over="ignore"):
        ratio = np.asarray(x, dtype=np.float32) / _F32(quant.scale)
    q: Float64Array = np.clip(np.round(ratio) + quant.zero_point, low, high).astype(np.float64)
    return q


def dequantize(q: Float64Array, quant: ActivationQuant) -> npt.NDArray[np.float32]:
    """DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    return (q - quant.zero_point).astype(np.float32) * _F32(quant.scale)


def requantize(
    accumulator: Float64Array, multiplier: npt.NDArray[np.float32], quant: ActivationQuant
) -> Float64Array:
    """int32 accumulator -> float32, times the float32 multiplier, round half to even, clamp.

    Examples
    --------
    >>> requantize(np.array([1.0, 3.0, 5.0]), np.array([0.5], np.float32), ActivationQuant(1.0, 0))
    array([0., 2., 2.])
    """
    low, high = quant.bounds
    scaled = accumulator.astype(np.float32) * multiplier
    q: Float64Array = np.clip(np.round(scaled) + quant.zero_point, low, high).astype(np.float64)
    return q


def fake_quantize(x: Float64Array, quant: ActivationQuant) -> Float64Array:
    """Quantize and dequantize in float64 (what the sensitivities run)."""
    low, high = quant.bounds
    with np.errstate(over="ignore"):
        q = np.clip(np.round(x / quant.scale) + quant.zero_point, low, high)
    result: Float64Array = (q - quant.zero_point) * quant.scale
    return result
