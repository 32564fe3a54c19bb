"""INT8 before deployment: which fused layers break under quantization, and why.

Pure NumPy. Three things, each on the deploy form that a runtime quantizes
(the train form, when known, says which branch is to blame):

- **weight statistics** per fused convolution (:func:`weight_stats`): each
  output channel's range ``max |w|``, the spread of those ranges (max over
  median), the kurtosis, the weight SQNR with one scale per tensor and per
  channel, and which branch (3x3, 1x1, identity) makes each channel's range;
- **simulated INT8** (:func:`simulate`), the arithmetic of onnxruntime's
  static QDQ quantization (MinMax calibration, int8) as its CPU provider runs
  it: integer convolutions, requantization rounding half to even;
- **sensitivity** (:func:`report`): the SQNR of the logits with only one
  layer quantized, and with all of them.

The scheme (onnxruntime's ``quantize_static``, QDQ format, MinMax, int8, as
it quantizes the ``reparam export`` graph):

- activations are asymmetric: the calibrated range ``[rmin, rmax]`` is
  widened to include 0, ``scale = (rmax - rmin) / 255`` and ``zero_point =
  round(-128 - rmin / scale)``. The input, every Conv output (its range
  measured *after* the ReLU, which is then dropped: the zero point -128 does
  the clamp), the GlobalAveragePool output and the logits are quantized;
- weights are symmetric, ``scale = max |w| / 127`` (per tensor, or per output
  channel, axis 0, the Gemm included); ``q = round(w / scale)``;
- biases are int32 at scale ``s_x * s_w``;
- QLinearConv, QLinearGlobalAveragePool and QGemm accumulate in int32 and
  requantize with the float32 multiplier ``(s_x * s_w) / s_y`` (``s_x /
  (s_y * H W)`` for the pool), rounding half to even.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..checkpoints.formats import shown_path, write_atomic
from ..checkpoints.layouts import Layout, block_prefix
from ..core.algebra import Node, Parallel, Sequential, fold
from ..core.checks import FloatArray
from ..core.conv import conv2d
from ..core.errors import ReparamError
from ..models.repvgg import DeployBlock, RepVGG
from .networks import Network, as_network

__all__ = [
    "FINE_DB",
    "MIN_CALIBRATION_SAMPLES",
    "ActivationQuant",
    "LayerQuant",
    "LayerReport",
    "QParams",
    "QuantReport",
    "WeightStats",
    "calibrate",
    "check_images",
    "check_plotting",
    "plot_report",
    "qparams_from_onnx",
    "report",
    "simulate",
    "sqnr_db",
    "weight_stats",
    "write_json",
]

#: Fewest calibration images accepted: MinMax ranges from fewer are noise.
MIN_CALIBRATION_SAMPLES = 8
#: A layer whose logits SQNR (only it quantized) reaches this is "fine" in a report.
FINE_DB = 30.0
#: Per-channel weights "fix" a layer when they gain at least this much logits SQNR.
_PER_CHANNEL_GAIN_DB = 6.0
_CHUNK = 32
_INT32 = (-(2**31), 2**31 - 1)
_F32 = np.float32
Float64Array = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- parameters


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


def _activation_quant(rmin: float, rmax: float) -> ActivationQuant:
    """Return onnxruntime's ``compute_scale_zp`` for an int8 activation (float32 range)."""
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


def _weight_scale(
    weight: FloatArray, *, per_channel: bool, reduce_range: bool = False
) -> npt.NDArray[np.float32]:
    """Symmetric int8 scales ``max |w| / 127`` (``/ 64`` with ``reduce_range``), float32.

    1.0 where a channel is all zero; computed as onnxruntime's ``compute_scale_zp``
    does, ``2 max |w| / (q_max - q_min)`` in float64.
    """
    rows = weight.astype(np.float32).reshape(weight.shape[0] if per_channel else 1, -1)
    absmax = np.abs(rows).max(axis=1)
    steps = 2.0 * _weight_limit(reduce_range)
    scale = (np.float64(2.0) * absmax.astype(np.float64) / steps).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, _F32(1.0), scale).astype(np.float32)


def _per_row(values: npt.NDArray[Any], ndim: int) -> npt.NDArray[Any]:
    """Shape ``(C,)`` (or ``(1,)``) to broadcast over axis 0 of an ``ndim``-D array."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


def _quantize_weight(
    weight: FloatArray, scale: npt.NDArray[np.float32], *, reduce_range: bool = False
) -> npt.NDArray[np.int8]:
    limit = _weight_limit(reduce_range)
    ratio = weight.astype(np.float32) / _per_row(scale, weight.ndim)
    quantized: npt.NDArray[np.int8] = np.clip(np.round(ratio), -limit, limit).astype(np.int8)
    return quantized


def _quantize_bias(
    bias: FloatArray, input_scale: float, weight_scale: npt.NDArray[np.float32], *, name: str
) -> npt.NDArray[np.int32]:
    step = (_F32(input_scale) * weight_scale).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ratio = np.round(bias.astype(np.float32) / step)
    outside = np.flatnonzero(~((ratio >= _INT32[0]) & (ratio <= _INT32[1])))
    if outside.size:
        channel = int(outside[0])
        raise ReparamError(
            f"{name}: cannot be quantized: the bias of channel {channel} "
            f"({float(bias[channel]):.4g}) is {float(ratio[channel]):.3g} steps of "
            f"s_x * s_w = {float(step[min(channel, step.size - 1)]):.3g}, beyond int32; the "
            "channel's weights are tiny against its bias"
        )
    return ratio.astype(np.int32)


# --------------------------------------------------------------------------- the network


class _Layers(NamedTuple):
    """The float32 deploy form, as the exported ONNX graph holds it."""

    names: tuple[str, ...]
    blocks: tuple[DeployBlock, ...]
    head_weight: npt.NDArray[np.float32]
    head_bias: npt.NDArray[np.float32]


def _layers(model: RepVGG, *, func: str) -> _Layers:
    """Return the float32 deploy form (fused in the model's precision, then cast, as to_onnx)."""
    deploy = model.reparameterize().astype(np.float32)
    blocks = []
    for name, block in deploy.blocks:
        if not isinstance(block, DeployBlock):  # pragma: no cover - reparameterize() guarantees it
            raise ReparamError(f"{func}: {name} is not a deploy block after conversion")
        bad = int(np.count_nonzero(~np.isfinite(block.kernel))) + int(
            np.count_nonzero(~np.isfinite(block.bias))
        )
        if bad:
            raise ReparamError(
                f"{func}: {name} cannot be quantized: its fused float32 kernel and bias hold "
                f"{bad} non-finite values"
            )
        blocks.append(block)
    weight = np.asarray(deploy.head.weight, dtype=np.float32)
    bias = np.asarray(deploy.head.bias, dtype=np.float32)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ReparamError(f"{func}: the head cannot be quantized: it holds non-finite values")
    names = tuple(name for name, _ in deploy.blocks)
    return _Layers(names, tuple(blocks), weight, bias)


def check_images(
    images: Any, model: RepVGG, *, func: str, name: str, minimum: int = MIN_CALIBRATION_SAMPLES
) -> npt.NDArray[np.float32]:
    """Check images for ``model`` and return them in float32 (what the runtime is fed).

    Parameters
    ----------
    images : array_like, shape (N, C_in, H, W)
    model : RepVGG
    func, name : str
        What the error starts with, and what it calls the images.
    minimum : int, default MIN_CALIBRATION_SAMPLES

    Returns
    -------
    ndarray of float32

    Raises
    ------
    ReparamError
        Unless ``images`` is a floating NCHW array with the model's channels,
        at least ``minimum`` images, every value finite.
    """
    array = np.asarray(images)
    if not np.issubdtype(array.dtype, np.floating):
        raise ReparamError(
            f"{func}: {name} must be floating images; got dtype {array.dtype}, expected float32 "
            "or float64 preprocessed as the model expects (hint: .astype(np.float32))"
        )
    if array.ndim != 4 or array.shape[1] != model.in_channels:
        raise ReparamError(
            f"{func}: {name} has the wrong shape; got {array.shape}, expected (N, "
            f"{model.in_channels}, H, W)"
        )
    if array.shape[0] < minimum:
        raise ReparamError(
            f"{func}: {name} has too few images; got {array.shape[0]}, expected at least "
            f"{minimum}" + (" (MinMax ranges from fewer are noise)" if minimum > 1 else "")
        )
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ReparamError(
            f"{func}: {name} has {bad:,} non-finite values (NaN or inf) of {array.size:,}"
        )
    if min(array.shape[2:]) < 1:
        raise ReparamError(f"{func}: {name} has no pixels; got shape {array.shape}")
    return array.astype(np.float32)


def _chunks(array: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    for start in range(0, array.shape[0], _CHUNK):
        yield array[start : start + _CHUNK]


def _conv(block: DeployBlock, x: Float64Array, kernel: Float64Array, bias: Float64Array) -> Any:
    padding = block.kernel.shape[2] // 2
    return conv2d(x, kernel, bias, stride=block.stride, padding=padding, groups=block.groups)


def _float_block(block: DeployBlock, x: Float64Array) -> Float64Array:
    out = _conv(block, x, block.kernel.astype(np.float64), block.bias.astype(np.float64))
    result: Float64Array = np.maximum(out, 0.0)
    return result


def _float_head(layers: _Layers, pooled: Float64Array) -> Float64Array:
    logits: Float64Array = pooled @ layers.head_weight.T.astype(np.float64) + layers.head_bias
    return logits


def _forward64(layers: _Layers, x: npt.NDArray[Any], *, func: str) -> list[Float64Array]:
    """Float64 activations: the input, each block's output (after ReLU), pooled, logits."""
    out = [np.asarray(x, dtype=np.float64)]
    for name, block in zip(layers.names, layers.blocks, strict=True):
        try:
            out.append(_float_block(block, out[-1]))
        except ReparamError as exc:
            raise ReparamError(f"{func}: {name}: {exc}") from None
    out.append(out[-1].mean(axis=(2, 3)))
    out.append(_float_head(layers, out[-1]))
    return out


# --------------------------------------------------------------------------- calibration


def _ranges(layers: _Layers, images: npt.NDArray[np.float32], *, func: str) -> list[list[float]]:
    """MinMax ranges, float64 forward: input, each block's output, pooled, logits."""
    ranges: list[list[float]] = []
    for chunk in _chunks(images):
        with np.errstate(over="ignore", invalid="ignore"):
            acts = _forward64(layers, chunk, func=func)
        for index, act in enumerate(acts):
            low, high = float(act.min()), float(act.max())
            if index == len(ranges):
                ranges.append([low, high])
            else:
                ranges[index] = [min(ranges[index][0], low), max(ranges[index][1], high)]
    for index, (low, high) in enumerate(ranges):
        if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > 3e38:
            where = ["the input", *layers.names, "the pooled features", "the logits"][index]
            raise ReparamError(
                f"{func}: the model cannot be quantized: {where} overflows float32 on the "
                "calibration data"
            )
    return ranges


def _build(
    layers: _Layers,
    ranges: list[list[float]],
    *,
    per_channel: bool,
    func: str,
    reduce_range: bool = False,
) -> QParams:
    acts = [_activation_quant(low, high) for low, high in ranges]
    built = []
    seven_bits = {"reduce_range": reduce_range}
    for index, (name, block) in enumerate(zip(layers.names, layers.blocks, strict=True)):
        scale = _weight_scale(block.kernel, per_channel=per_channel, **seven_bits)
        built.append(
            LayerQuant(
                name,
                _quantize_weight(block.kernel, scale, **seven_bits),
                scale,
                _quantize_bias(block.bias, acts[index].scale, scale, name=f"{func}: {name}"),
                acts[index],
                acts[index + 1],
            )
        )
    pool = acts[-2]
    scale = _weight_scale(layers.head_weight, per_channel=per_channel, **seven_bits)
    head = LayerQuant(
        "head",
        _quantize_weight(layers.head_weight, scale, **seven_bits),
        scale,
        _quantize_bias(layers.head_bias, pool.scale, scale, name=f"{func}: the head"),
        pool,
        acts[-1],
    )
    return QParams(tuple(built), pool, head, per_channel)


def calibrate(
    model: RepVGG | Network,
    calibration: npt.ArrayLike,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
) -> QParams:
    """Calibrate as onnxruntime's MinMax static quantization does, in float64.

    Parameters
    ----------
    model : RepVGG or Network
        Train or deploy form (a train form is fused first, then cast to
        float32 as ``reparam export`` writes it).
    calibration : array_like, shape (N, C_in, H, W)
        Floating images, ``N >= MIN_CALIBRATION_SAMPLES``, finite. They are
        cast to float32 (what the runtime is fed), then the network runs in
        float64 on them.
    per_channel : bool, default False
        One weight scale per output channel (axis 0; the Gemm included).
    reduce_range : bool, default False
        7-bit weights (-64..64, ``scale = max |w| / 64``), as onnxruntime's
        ``quantize_static(..., reduce_range=True)``. On x86 CPUs without VNNI,
        onnxruntime's int8 kernels add pairs of 8-bit products in 16 bits and
        saturate with full-range weights; 7-bit weights keep them exact.

    Returns
    -------
    QParams

    Raises
    ------
    ReparamError
        On calibration data of the wrong shape or dtype, too few images,
        non-finite values, or a model that cannot be quantized (non-finite
        weights, activations beyond float32, a bias beyond int32).

    Notes
    -----
    The ranges differ from onnxruntime's in the last float32 bits (its float32
    convolutions sum in another order), so a few scales differ by an ulp.
    """
    func = "calibrate"
    network = as_network(model, func=func)
    layers = _layers(network.model, func=func)
    images = check_images(
        calibration, network.model, func=func, name="calibration", minimum=MIN_CALIBRATION_SAMPLES
    )
    ranges = _ranges(layers, images, func=func)
    return _build(layers, ranges, per_channel=per_channel, func=func, reduce_range=reduce_range)


# --------------------------------------------------------------------------- integer arithmetic


def _quantize(x: npt.NDArray[Any], quant: ActivationQuant) -> Float64Array:
    """QuantizeLinear in float32 (``x / scale``, round half to even), as integers in float64."""
    low, high = quant.bounds
    with np.errstate(over="ignore"):
        ratio = np.asarray(x, dtype=np.float32) / _F32(quant.scale)
    q: Float64Array = np.clip(np.round(ratio) + quant.zero_point, low, high).astype(np.float64)
    return q


def _dequantize(q: Float64Array, quant: ActivationQuant) -> npt.NDArray[np.float32]:
    return (q - quant.zero_point).astype(np.float32) * _F32(quant.scale)


def _requantize(
    accumulator: Float64Array, multiplier: npt.NDArray[np.float32], quant: ActivationQuant
) -> Float64Array:
    """int32 accumulator -> float32, times the float32 multiplier, round half to even, clamp."""
    low, high = quant.bounds
    scaled = accumulator.astype(np.float32) * multiplier
    q: Float64Array = np.clip(np.round(scaled) + quant.zero_point, low, high).astype(np.float64)
    return q


def _check_accumulator(accumulator: Float64Array, name: str, *, func: str) -> None:
    if accumulator.size and (
        accumulator.min() < _INT32[0] or accumulator.max() > _INT32[1]
    ):  # pragma: no cover - needs fan-ins far beyond published models
        raise ReparamError(f"{func}: {name} cannot be quantized: its int32 accumulator overflows")


def _integer_logits(
    layers: _Layers, qparams: QParams, x: npt.NDArray[np.float32], *, func: str
) -> npt.NDArray[np.float32]:
    """Run the integer pipeline onnxruntime's CPU provider runs, on one chunk."""
    current = qparams.layers[0].input
    q = _quantize(x, current)
    for block, quant in zip(layers.blocks, qparams.layers, strict=True):
        if quant.input != current:  # a requantization the graph would hold
            q = _quantize(_dequantize(q, current), quant.input)
        accumulator = _conv(
            block,
            q - quant.input.zero_point,
            quant.weight.astype(np.float64),
            quant.bias.astype(np.float64),
        )
        _check_accumulator(accumulator, quant.name, func=func)
        multiplier = (_F32(quant.input.scale) * quant.weight_scale) / _F32(quant.output.scale)
        q = _requantize(accumulator, _per_row(multiplier.astype(np.float32), 3), quant.output)
        q = np.maximum(q, quant.output.zero_point)  # the ReLU (a no-op at zero point -128)
        current = quant.output
    pixels = q.shape[2] * q.shape[3]
    summed = (q - current.zero_point).sum(axis=(2, 3))
    multiplier = np.asarray(_F32(current.scale) / (_F32(qparams.pool.scale) * _F32(pixels)))
    q = _requantize(summed, multiplier.astype(np.float32), qparams.pool)
    head = qparams.head
    if head.input != qparams.pool:
        q = _quantize(_dequantize(q, qparams.pool), head.input)
    accumulator = (q - head.input.zero_point) @ head.weight.T.astype(np.float64) + head.bias
    _check_accumulator(accumulator, "head", func=func)
    multiplier = (_F32(head.input.scale) * head.weight_scale) / _F32(head.output.scale)
    return _dequantize(
        _requantize(accumulator, multiplier.astype(np.float32), head.output), head.output
    )


def _check_qparams(layers: _Layers, qparams: Any, *, func: str) -> QParams:
    if not isinstance(qparams, QParams):
        raise ReparamError(
            f"{func}: qparams must be a reparam.quant.QParams (from qparams_from_onnx or "
            f"calibrate); got {type(qparams).__name__}"
        )
    if len(qparams.layers) != len(layers.blocks):
        raise ReparamError(
            f"{func}: qparams do not fit the model; got {len(qparams.layers)} quantized convs, "
            f"expected {len(layers.blocks)} (one per block)"
        )
    pairs = [
        *zip(layers.names, (b.kernel.shape for b in layers.blocks), qparams.layers, strict=True),
        ("head", layers.head_weight.shape, qparams.head),
    ]
    for name, shape, quant in pairs:
        if quant.weight.shape != shape or quant.bias.shape != shape[:1]:
            raise ReparamError(
                f"{func}: qparams do not fit the model at {name}; got weight "
                f"{quant.weight.shape}, expected {shape}"
            )
    return qparams


def simulate(
    model: RepVGG | Network,
    x: npt.ArrayLike,
    *,
    calibration: npt.ArrayLike | None = None,
    qparams: QParams | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
) -> npt.NDArray[np.float32]:
    """Compute the logits onnxruntime's INT8 model of ``model`` computes, in NumPy.

    Parameters
    ----------
    model : RepVGG or Network
        Train or deploy form; a train form is fused first.
    x : array_like, shape (N, C_in, H, W)
        Floating images (cast to float32, as the runtime is fed).
    calibration : array_like, shape (M, C_in, H', W'), optional
        Images to calibrate on (:func:`calibrate`, float64). Give exactly one
        of ``calibration`` and ``qparams``.
    qparams : QParams, optional
        Parameters read from an onnxruntime-quantized model of the same
        network (:func:`qparams_from_onnx`): the result then equals
        onnxruntime's output.
    per_channel : bool, default False
        With ``calibration``: per-channel weight scales. With ``qparams`` it
        must agree with them.
    reduce_range : bool, default False
        With ``calibration``: 7-bit weights (see :func:`calibrate`). With
        ``qparams`` the weights are the ones read.

    Returns
    -------
    ndarray of float32, shape (N, num_classes)
        The dequantized logits.

    Raises
    ------
    ReparamError
        On bad images or calibration data, both or neither of
        ``calibration`` / ``qparams``, qparams that do not fit the model, or a
        model that cannot be quantized.

    Notes
    -----
    Integer convolutions are computed exactly (float64 holds every int32
    accumulator), converted to float32, multiplied by the float32
    ``(s_x * s_w) / s_y`` and rounded half to even; the pool multiplies by
    ``s_x / (s_y * H W)``.

    Examples
    --------
    >>> import numpy as np, reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> model = reparam.RepVGG.create(tiny, num_classes=3)
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    >>> logits = simulate(model, x, calibration=x)
    >>> logits.shape, logits.dtype
    ((16, 3), dtype('float32'))
    >>> bool(np.abs(logits - model(x)).max() < 0.1 * np.abs(model(x)).max())
    True
    """
    func = "simulate"
    network = as_network(model, func=func)
    if (calibration is None) == (qparams is None):
        raise ReparamError(
            f"{func}: give exactly one of calibration= (images to calibrate on) and qparams= "
            "(from qparams_from_onnx); got " + ("neither" if calibration is None else "both")
        )
    layers = _layers(network.model, func=func)
    images = check_images(x, network.model, func=func, name="x", minimum=1)
    if qparams is not None:
        params = _check_qparams(layers, qparams, func=func)
        if bool(per_channel) != params.per_channel:
            raise ReparamError(
                f"{func}: per_channel={per_channel} disagrees with the qparams, whose weight "
                f"scales are {'per channel' if params.per_channel else 'per tensor'}"
            )
    else:
        params = calibrate(
            network, np.asarray(calibration), per_channel=per_channel, reduce_range=reduce_range
        )
    parts = [_integer_logits(layers, params, chunk, func=func) for chunk in _chunks(images)]
    return np.concatenate(parts).astype(np.float32)


# --------------------------------------------------------------------------- reading onnxruntime


def _import_onnx(func: str) -> Any:
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise ReparamError(
            f"{func}: the onnx package is not installed; expected it to read ONNX models "
            "(hint: pip install onnx)"
        ) from None
    return onnx


def qparams_from_onnx(path: str | os.PathLike[str]) -> QParams:
    """Read onnxruntime's quantization parameters from a QDQ model of a ``reparam export`` graph.

    Parameters
    ----------
    path : str or path-like
        An ``.onnx`` file written by ``onnxruntime.quantization.quantize_static``
        (QDQ format, int8 or uint8 activations, symmetric int8 weights) from
        the graph ``reparam export`` writes.

    Returns
    -------
    QParams
        Integer weights and biases as stored, every scale and zero point;
        layer names from the Conv nodes (``"stage2.1"``).

    Raises
    ------
    ReparamError
        If ``onnx`` is missing, the file cannot be read, or the graph is not
        such a model (naming the node and what was expected).
    """
    func = "qparams_from_onnx"
    onnx = _import_onnx(func)
    name = shown_path(path)
    try:
        proto = onnx.load(os.fspath(path))
    except Exception as exc:
        raise ReparamError(f"{func}: cannot read {name} as ONNX ({exc})") from None
    graph = proto.graph
    tensors = {item.name: onnx.numpy_helper.to_array(item) for item in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    expected = "expected a QDQ model from onnxruntime's quantize_static of a reparam export graph"

    def fail(problem: str) -> ReparamError:
        return ReparamError(f"{func}: {name}: {problem}; {expected}")

    def initializer(tensor: str) -> npt.NDArray[Any]:
        if tensor not in tensors:
            raise fail(f"{tensor!r} is not an initializer")
        return np.asarray(tensors[tensor])

    def activation(scale: str, zero_point: str) -> ActivationQuant:
        zp = initializer(zero_point)
        if zp.size != 1 or zp.dtype not in (np.int8, np.uint8):
            raise fail(f"zero point {zero_point!r} is {zp.dtype} of shape {zp.shape}")
        return ActivationQuant(
            float(_F32(initializer(scale).reshape(()))), int(zp.reshape(())), zp.dtype == np.int8
        )

    def dequantized(tensor: str, what: str) -> tuple[Any, npt.NDArray[Any] | None]:
        node = producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            raise fail(f"{what} {tensor!r} does not come from a DequantizeLinear")
        return node, tensors.get(node.input[0])

    def input_of(tensor: str, what: str) -> ActivationQuant:
        node, _ = dequantized(tensor, what)
        return activation(node.input[1], node.input[2])

    def output_of(node: Any) -> ActivationQuant:
        tensor = node.output[0]
        users = consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == "Relu":
            tensor = users[0].output[0]
            users = consumers.get(tensor, [])
        quantizers = [user for user in users if user.op_type == "QuantizeLinear"]
        if len(quantizers) != 1:
            raise fail(f"the output of {node.name or node.op_type} is not quantized once")
        return activation(quantizers[0].input[1], quantizers[0].input[2])

    def layer(node: Any, label: str, weight_axis: int) -> LayerQuant:
        if len(node.input) < 3:
            raise fail(f"{node.name or node.op_type} has no bias")
        dq, weight = dequantized(node.input[1], "the weight of")
        if weight is None or weight.dtype != np.int8:
            raise fail(f"the weight of {node.name} is not an int8 initializer")
        zero = initializer(dq.input[2]) if len(dq.input) > 2 else np.zeros(1)
        if np.any(zero != 0):
            raise fail(f"the weight of {node.name} is not symmetric (zero point != 0)")
        scale = initializer(dq.input[1]).astype(np.float32).reshape(-1)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.size > 1 and (scale.size != weight.shape[0] or axis != weight_axis):
            raise fail(f"the weight scales of {node.name} are not per output channel")
        _, bias = dequantized(node.input[2], "the bias of")
        if bias is None or bias.dtype != np.int32:
            raise fail(f"the bias of {node.name} is not an int32 initializer")
        inputs = input_of(node.input[0], "the input of")
        return LayerQuant(label, weight, scale, bias, inputs, output_of(node))

    layers: list[LayerQuant] = []
    pool: ActivationQuant | None = None
    head: LayerQuant | None = None
    for node in graph.node:
        if node.op_type == "Conv":
            label = node.name.removesuffix("/Conv") or f"conv{len(layers)}"
            layers.append(layer(node, label, 0))
        elif node.op_type == "GlobalAveragePool":
            pool = output_of(node)
        elif node.op_type == "Gemm":
            attributes = {a.name: a for a in node.attribute}
            if "transB" not in attributes or attributes["transB"].i != 1:
                raise fail("the Gemm does not have transB=1")
            head = layer(node, "head", 0)
        elif node.op_type in ("QLinearConv", "QGemm", "QLinearGlobalAveragePool"):
            raise fail(f"{node.op_type} found (QOperator format)")
    if not layers or pool is None or head is None:
        raise fail("no Conv, GlobalAveragePool or Gemm found")
    per_channel = any(item.weight_scale.size > 1 for item in (*layers, head))
    if per_channel:
        layers = [_full_scale(item) for item in layers]
        head = _full_scale(head)
    return QParams(tuple(layers), pool, head, per_channel)


def _full_scale(quant: LayerQuant) -> LayerQuant:
    """Per-channel parameters with one scale per output channel (a single one repeated)."""
    scale = np.broadcast_to(quant.weight_scale, quant.weight.shape[:1]).astype(np.float32)
    return quant._replace(weight_scale=scale)


# --------------------------------------------------------------------------- statistics


def sqnr_db(reference: npt.ArrayLike, approximation: npt.ArrayLike) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum r^2 / sum (r - a)^2)`` in dB.

    Parameters
    ----------
    reference, approximation : array_like, same shape

    Returns
    -------
    float
        ``inf`` when they are equal (no noise); computed in float64.

    Examples
    --------
    >>> round(sqnr_db([3.0, 4.0], [3.0, 4.5]), 2)  # 25 / 0.25 = 100
    20.0
    """
    signal = np.asarray(reference, dtype=np.float64)
    noise = signal - np.asarray(approximation, dtype=np.float64)
    noise_energy = float(np.sum(noise * noise))
    if noise_energy == 0.0:
        return math.inf
    signal_energy = float(np.sum(signal * signal))
    return -math.inf if signal_energy == 0.0 else 10.0 * math.log10(signal_energy / noise_energy)


class WeightStats(NamedTuple):
    """Statistics of one fused kernel.

    Attributes
    ----------
    name : str
    kernel_shape : tuple of int
    channel_max : ndarray, shape (C_out,)
        ``max |w|`` of each output channel (the range each channel needs).
    range_spread : float
        ``max(channel_max) / median(channel_max)``: how many times the
        per-tensor step is larger than what the median channel needs.
    kurtosis : float
        Excess kurtosis of the kernel's entries (0 for a Gaussian; large
        when a few outliers set the range).
    weight_sqnr_per_tensor_db, weight_sqnr_per_channel_db : float
        SQNR of the int8 kernel, one scale per tensor or per output channel.
    branches : tuple of str
        The branches of the train form (``"3x3"``, ``"1x1"``, ``"identity"``),
        empty when it is unknown.
    shares : ndarray, shape (C_out, len(branches))
        Per output channel, each branch's share of the channel's range: at
        the tap with the largest ``|w|``, ``|w_b| / sum_b |w_b|``.
    worst_channel : int
        The channel with the largest range (it sets the per-tensor scale).
    position : int
        The layer's place in the network (0 for the first block; the head last).
    """

    name: str
    kernel_shape: tuple[int, ...]
    channel_max: Float64Array
    range_spread: float
    kurtosis: float
    weight_sqnr_per_tensor_db: float
    weight_sqnr_per_channel_db: float
    branches: tuple[str, ...]
    shares: Float64Array
    worst_channel: int
    position: int

    @property
    def dominant_branch(self) -> str | None:
        """The branch with the largest share of the worst channel's range (None if unknown)."""
        if not self.branches:
            return None
        return self.branches[int(np.argmax(self.shares[self.worst_channel]))]


def _branch_label(node: Node, kernel: FloatArray) -> str:
    name = getattr(node, "name", "") or ""
    if "identity" in name:
        return "identity"
    if "avg" in name:
        return "avg pool"
    return f"{kernel.shape[2]}x{kernel.shape[3]}"


def _branches(tree: Node) -> list[Node]:
    """Return the summed branches, each with what follows the sum (a post-sum BatchNorm)."""
    if isinstance(tree, Parallel):
        return list(tree.branches)
    if isinstance(tree, Sequential) and isinstance(tree.steps[0], Parallel):
        rest = tree.steps[1:]
        return [Sequential(branch, *rest) for branch in tree.steps[0].branches]
    return [tree]


def _as_fused(
    kernel: FloatArray, pads: Any, groups: int, block: DeployBlock
) -> Float64Array | None:
    """Place a branch kernel in the fused kernel's shape and groups (None if it does not fit)."""
    out_channels, per_group, size, _ = block.kernel.shape
    (top, _bottom), (left, _right) = pads
    row, col = size // 2 - top, size // 2 - left
    if row < 0 or col < 0 or row + kernel.shape[2] > size or col + kernel.shape[3] > size:
        return None
    if groups % block.groups or kernel.shape[0] != out_channels:
        return None
    in_channels = per_group * block.groups
    dense = np.zeros((out_channels, in_channels, size, size))
    out_per, in_per = out_channels // groups, kernel.shape[1]
    for g in range(groups):
        rows = slice(g * out_per, (g + 1) * out_per)
        dense[
            rows,
            g * in_per : (g + 1) * in_per,
            row : row + kernel.shape[2],
            col : col + kernel.shape[3],
        ] = kernel[rows]
    fused_out = out_channels // block.groups
    parts = [
        dense[g * fused_out : (g + 1) * fused_out, g * per_group : (g + 1) * per_group]
        for g in range(block.groups)
    ]
    return np.concatenate(parts)


def _attribution(tree: Node, block: DeployBlock) -> tuple[tuple[str, ...], Float64Array]:
    labels: list[str] = []
    kernels: list[Float64Array] = []
    for branch in _branches(tree):
        try:
            folded = fold(branch)
        except ReparamError:
            return (), np.zeros((block.kernel.shape[0], 0))
        placed = _as_fused(folded.kernel, folded.pads, folded.groups, block)
        if placed is None:
            return (), np.zeros((block.kernel.shape[0], 0))
        label = _branch_label(
            branch.steps[0] if isinstance(branch, Sequential) else branch, folded.kernel
        )
        while label in labels:
            label += "'"
        labels.append(label)
        kernels.append(placed)
    stacked = np.stack(kernels)  # (B, C_out, C_in/g, K, K)
    flat = stacked.reshape(len(kernels), block.kernel.shape[0], -1)
    fused = block.kernel.astype(np.float64).reshape(block.kernel.shape[0], -1)
    taps = np.argmax(np.abs(fused), axis=1)
    at_max = np.abs(flat[:, np.arange(fused.shape[0]), taps]).T  # (C_out, B)
    total = at_max.sum(axis=1, keepdims=True)
    shares = np.divide(at_max, total, out=np.zeros_like(at_max), where=total > 0)
    return tuple(labels), shares


def _weight_sqnr(weight: FloatArray, *, per_channel: bool) -> float:
    scale = _weight_scale(weight, per_channel=per_channel)
    restored = _quantize_weight(weight, scale).astype(np.float64) * _per_row(
        scale.astype(np.float64), weight.ndim
    )
    return sqnr_db(weight, restored)


def _kurtosis(values: FloatArray) -> float:
    centred = values.astype(np.float64).ravel() - float(np.mean(values, dtype=np.float64))
    variance = float(np.mean(centred**2))
    if variance == 0.0:
        return math.nan
    return float(np.mean(centred**4)) / variance**2 - 3.0


def _stats(
    name: str, weight: FloatArray, tree: Node | None, block: DeployBlock | None, position: int
) -> WeightStats:
    channel_max = np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).max(axis=1)
    median = float(np.median(channel_max))
    spread = float(channel_max.max()) / median if median > 0 else math.inf
    branches: tuple[str, ...] = ()
    shares = np.zeros((weight.shape[0], 0))
    if tree is not None and block is not None:
        branches, shares = _attribution(tree, block)
    return WeightStats(
        name,
        tuple(int(n) for n in weight.shape),
        channel_max,
        spread,
        _kurtosis(weight),
        _weight_sqnr(weight, per_channel=False),
        _weight_sqnr(weight, per_channel=True),
        branches,
        shares,
        int(np.argmax(channel_max)),
        position,
    )


def weight_stats(model: RepVGG | Network) -> tuple[WeightStats, ...]:
    """Statistics of every fused kernel (the blocks, then the head), as exported in float32.

    Parameters
    ----------
    model : RepVGG or Network
        A train form (or a Network with trees) also gives each channel's
        branch attribution.

    Returns
    -------
    tuple of WeightStats

    Examples
    --------
    >>> import numpy as np, reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> stats = weight_stats(reparam.RepVGG.create(tiny, num_classes=3))
    >>> [(s.name, s.branches) for s in stats]  # doctest: +NORMALIZE_WHITESPACE
    [('stage0', ('3x3', '1x1')), ('stage1.0', ('3x3', '1x1')),
     ('stage1.1', ('3x3', '1x1', 'identity')), ('head', ())]
    >>> bool(np.allclose(stats[2].shares.sum(axis=1), 1.0))
    True
    """
    network = as_network(model, func="weight_stats")
    layers = _layers(network.model, func="weight_stats")
    found = [
        _stats(
            _checkpoint_name(name, network.model.layout),
            block.kernel,
            network.trees.get(name),
            block,
            position,
        )
        for position, (name, block) in enumerate(zip(layers.names, layers.blocks, strict=True))
    ]
    found.append(_stats("head", layers.head_weight, None, None, len(found)))
    return tuple(found)


def _checkpoint_name(name: str, layout: Layout) -> str:
    """Spell a block name as its checkpoint does (``stages.1.0`` in timm's layout)."""
    try:
        return block_prefix(name, layout)
    except ReparamError:  # a custom name that no layout spells
        return name


# --------------------------------------------------------------------------- sensitivity


def _fake(x: Float64Array, quant: ActivationQuant) -> Float64Array:
    """Quantize and dequantize in float64 (for sensitivities)."""
    low, high = quant.bounds
    with np.errstate(over="ignore"):
        q = np.clip(np.round(x / quant.scale) + quant.zero_point, low, high)
    result: Float64Array = (q - quant.zero_point) * quant.scale
    return result


def _quantized_layer(
    layers: _Layers,
    index: int,
    x: Float64Array,
    quant: LayerQuant,
    *,
    weights: bool,
    activations: bool,
) -> Float64Array:
    """Run layer ``index`` (a block, or the head) with weights and/or activations quantized."""
    if activations:
        x = _fake(x, quant.input)
    scale = quant.weight_scale.astype(np.float64)
    if index < len(layers.blocks):
        block = layers.blocks[index]
        if weights:
            kernel = quant.weight.astype(np.float64) * _per_row(scale, 4)
            bias = quant.bias * (np.float64(_F32(quant.input.scale)) * scale)
        else:
            kernel, bias = block.kernel.astype(np.float64), block.bias.astype(np.float64)
        out: Float64Array = np.maximum(_conv(block, x, kernel, bias), 0.0)
    else:
        if weights:
            weight = quant.weight.astype(np.float64) * _per_row(scale, 2)
            bias = quant.bias * (np.float64(_F32(quant.input.scale)) * scale)
        else:
            weight = layers.head_weight.astype(np.float64)
            bias = layers.head_bias.astype(np.float64)
        out = x @ weight.T + bias
    return _fake(out, quant.output) if activations else out


def _finish(layers: _Layers, index: int, x: Float64Array) -> Float64Array:
    """Run the float64 network from the output of layer ``index`` to the logits."""
    if index == len(layers.blocks):
        return x
    for block in layers.blocks[index + 1 :]:
        x = _float_block(block, x)
    return _float_head(layers, x.mean(axis=(2, 3)))


class LayerReport(NamedTuple):
    """One layer of a :class:`QuantReport`.

    Attributes
    ----------
    stats : WeightStats
    sensitivity_db : float
        Logits SQNR with only this layer quantized (its weights, bias, input
        and output), with the report's weight scales.
    weight_only_db, weight_only_per_channel_db : float
        Logits SQNR with only this layer's weights (and bias) quantized, one
        scale per tensor or per channel.
    activation_only_db : float
        Logits SQNR with only this layer's input and output quantized.
    verdict : str
        In plain words; see :func:`report`.
    """

    stats: WeightStats
    sensitivity_db: float
    weight_only_db: float
    weight_only_per_channel_db: float
    activation_only_db: float
    verdict: str

    @property
    def name(self) -> str:
        """The block's name as in the checkpoint (``"stage2.1"``), or ``"head"``."""
        return self.stats.name


def _json_float(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


class QuantReport(NamedTuple):
    """What :func:`report` found.

    Attributes
    ----------
    layers : tuple of LayerReport
        Sorted by sensitivity, most sensitive (lowest SQNR) first.
    logits_sqnr_db : float
        Logits SQNR with every layer quantized (:func:`simulate`).
    top1_agreement : float
        Fraction of images whose top-1 class is unchanged by INT8.
    per_channel : bool
    samples : int
        Calibration images (the same images are evaluated).
    family : str
    """

    layers: tuple[LayerReport, ...]
    logits_sqnr_db: float
    top1_agreement: float
    per_channel: bool
    samples: int
    family: str

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON-ready data (infinite SQNR, i.e. no noise, is ``None``)."""
        layers = []
        for layer in self.layers:
            stats = layer.stats
            worst = stats.worst_channel
            layers.append(
                {
                    "name": stats.name,
                    "kernel_shape": list(stats.kernel_shape),
                    "channel_range_spread": _json_float(stats.range_spread),
                    "kurtosis": _json_float(stats.kurtosis),
                    "weight_sqnr_per_tensor_db": _json_float(stats.weight_sqnr_per_tensor_db),
                    "weight_sqnr_per_channel_db": _json_float(stats.weight_sqnr_per_channel_db),
                    "sensitivity_db": _json_float(layer.sensitivity_db),
                    "weight_only_db": _json_float(layer.weight_only_db),
                    "weight_only_per_channel_db": _json_float(layer.weight_only_per_channel_db),
                    "activation_only_db": _json_float(layer.activation_only_db),
                    "worst_channel": worst,
                    "worst_channel_max": _json_float(float(stats.channel_max[worst])),
                    "dominant_branch": stats.dominant_branch,
                    "branch_shares": {
                        label: _json_float(float(stats.shares[worst, i]))
                        for i, label in enumerate(stats.branches)
                    },
                    "verdict": layer.verdict,
                }
            )
        return {
            "layers": layers,
            "logits_sqnr_db": _json_float(self.logits_sqnr_db),
            "top1_agreement": self.top1_agreement,
            "per_channel": self.per_channel,
            "calibration_samples": self.samples,
            "family": self.family,
        }

    def table(self) -> str:
        """Return the report as a text table, most sensitive layer first, then the whole model."""

        def db(value: float) -> str:
            return "inf" if value == math.inf else f"{value:.1f}"

        header = (
            f"{'layer':<10} {'kernel':<16} {'spread':>7} {'wSQNR/t':>8} {'wSQNR/c':>8} "
            f"{'sens dB':>8}  {'worst channel':<16} verdict"
        )
        lines = [header]
        for layer in self.layers:
            stats = layer.stats
            shape = "x".join(str(n) for n in stats.kernel_shape)
            branch = stats.dominant_branch
            owner = (
                f"#{stats.worst_channel} {branch} {stats.shares[stats.worst_channel].max():.0%}"
                if branch
                else f"#{stats.worst_channel}"
            )
            lines.append(
                f"{stats.name:<10} {shape:<16} {stats.range_spread:>7.1f} "
                f"{db(stats.weight_sqnr_per_tensor_db):>8} "
                f"{db(stats.weight_sqnr_per_channel_db):>8} {db(layer.sensitivity_db):>8}  "
                f"{owner:<16} {layer.verdict}"
            )
        scheme = "per-channel" if self.per_channel else "per-tensor"
        lines.append(
            f"whole model ({scheme} weights, {self.samples} images): logits SQNR "
            f"{db(self.logits_sqnr_db)} dB, top-1 agreement {self.top1_agreement:.2%}"
        )
        return "\n".join(lines)


def _verdict(
    sensitivity: float,
    weights: float,
    per_channel_weights: float,
    activations: float,
    *,
    per_channel: bool,
) -> str:
    if sensitivity >= FINE_DB:
        return "fine"
    chosen = per_channel_weights if per_channel else weights
    if activations < chosen:
        return "activation range, not weights"
    if per_channel:
        return "weights, even per channel"
    if per_channel_weights >= FINE_DB and per_channel_weights >= weights + _PER_CHANNEL_GAIN_DB:
        return "per-channel weights fix this layer"
    return f"weights; per-channel weights gain {per_channel_weights - weights:.1f} dB"


def report(
    model: RepVGG | Network, calibration: npt.ArrayLike, *, per_channel: bool = False
) -> QuantReport:
    """Say which layers INT8 breaks, how badly, and why.

    Parameters
    ----------
    model : RepVGG or Network
        Train or deploy form (the train form adds the branch attribution).
    calibration : array_like, shape (N, C_in, H, W)
        Images to calibrate on (as :func:`calibrate`); the SQNRs are measured
        on the same images, against the float64 deploy form.
    per_channel : bool, default False
        Per-channel weight scales for ``sensitivity_db`` and the whole model.

    Returns
    -------
    QuantReport
        Layers sorted by sensitivity. Each verdict is one of ``"fine"``
        (sensitivity >= :data:`FINE_DB`), ``"activation range, not weights"``
        (quantizing only the layer's input and output costs more than only its
        weights), ``"per-channel weights fix this layer"`` (per tensor, the
        weights cost more, and with per-channel scales they alone reach
        :data:`FINE_DB`, gaining >= 6 dB), ``"weights; per-channel weights gain
        X dB"`` otherwise or, in a per-channel report, ``"weights, even per
        channel"``.

    Raises
    ------
    ReparamError
        As :func:`calibrate`.

    Notes
    -----
    Each layer's four sensitivities rerun the float64 network from that layer
    on; the whole report costs about two forward passes per layer.

    Examples
    --------
    >>> import numpy as np, reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> model = reparam.RepVGG.create(tiny, num_classes=3)
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    >>> found = report(model, x)
    >>> sorted(layer.name for layer in found.layers)
    ['head', 'stage0', 'stage1.0', 'stage1.1']
    >>> found.layers[0].sensitivity_db <= found.layers[-1].sensitivity_db
    True
    """
    func = "report"
    network = as_network(model, func=func)
    layers = _layers(network.model, func=func)
    images = check_images(
        calibration, network.model, func=func, name="calibration", minimum=MIN_CALIBRATION_SAMPLES
    )
    ranges = _ranges(layers, images, func=func)
    per_tensor_q = _build(layers, ranges, per_channel=False, func=func)
    per_channel_q = _build(layers, ranges, per_channel=True, func=func)
    chosen = per_channel_q if per_channel else per_tensor_q
    count = len(layers.blocks) + 1
    variants = (  # (parameters, weights, activations)
        (chosen, True, True),
        (per_tensor_q, True, False),
        (per_channel_q, True, False),
        (chosen, False, True),
    )
    signal = 0.0
    noise = np.zeros((count, len(variants)))
    whole_noise = 0.0
    agree = 0
    for chunk in _chunks(images):
        acts = _forward64(layers, chunk, func=func)
        reference = acts[-1]
        signal += float(np.sum(reference * reference))
        for index in range(count):
            x = acts[index] if index < count - 1 else acts[-2]
            for column, (params, weights, activations) in enumerate(variants):
                quant = params.layers[index] if index < count - 1 else params.head
                out = _quantized_layer(
                    layers, index, x, quant, weights=weights, activations=activations
                )
                error = _finish(layers, index, out) - reference
                noise[index, column] += float(np.sum(error * error))
        int8 = _integer_logits(layers, chosen, chunk, func=func).astype(np.float64)
        whole_noise += float(np.sum((int8 - reference) ** 2))
        agree += int(np.sum(int8.argmax(axis=1) == reference.argmax(axis=1)))

    def to_db(energy: float) -> float:
        if energy == 0.0:
            return math.inf
        return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / energy)

    stats = weight_stats(network)
    found = []
    for index, stat in enumerate(stats):
        full, weight_only, per_channel_only, activation_only = map(to_db, noise[index])
        verdict = _verdict(
            full, weight_only, per_channel_only, activation_only, per_channel=per_channel
        )
        found.append(
            LayerReport(stat, full, weight_only, per_channel_only, activation_only, verdict)
        )
    found.sort(key=lambda layer: layer.sensitivity_db)
    return QuantReport(
        tuple(found),
        to_db(whole_noise),
        agree / images.shape[0],
        bool(per_channel),
        int(images.shape[0]),
        network.family,
    )


# --------------------------------------------------------------------------- the figure


def check_plotting(*, func: str = "plot_report") -> None:
    """Check, before any work, that matplotlib can be imported for :func:`plot_report`.

    Raises
    ------
    ReparamError
        If matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ReparamError(
            f"{func}: --png needs matplotlib, which is not installed (hint: pip install matplotlib)"
        ) from None


def write_json(found: QuantReport, path: str | os.PathLike[str]) -> None:
    """Write :meth:`QuantReport.to_json` to ``path`` atomically (indented, ``null`` for no noise).

    Raises
    ------
    OSError
        If writing fails.
    """
    data = (json.dumps(found.to_json(), indent=2, allow_nan=False) + "\n").encode()

    def write(stream: IO[bytes]) -> None:
        stream.write(data)

    write_atomic(path, write)


def plot_report(found: QuantReport, path: str | os.PathLike[str]) -> None:
    """Draw the per-layer sensitivities as bars and write a PNG atomically.

    Parameters
    ----------
    found : QuantReport
    path : str or path-like
        Ends in ``.png``.

    Raises
    ------
    ReparamError
        If matplotlib is not installed (``pip install matplotlib``) or the
        path does not end in ``.png``.
    OSError
        If writing fails.
    """
    func = "plot_report"
    if Path(path).suffix.lower() != ".png":
        raise ReparamError(f"{func}: path must end in .png; got {shown_path(path)}")
    check_plotting(func=func)
    from matplotlib.figure import Figure

    order = sorted(found.layers, key=lambda layer: layer.stats.position)
    names = [layer.name for layer in order]
    series: Sequence[tuple[str, Callable[[LayerReport], float]]] = (
        ("only this layer", lambda layer: layer.sensitivity_db),
        ("only its weights, per tensor", lambda layer: layer.weight_only_db),
        ("only its weights, per channel", lambda layer: layer.weight_only_per_channel_db),
        ("only its activations", lambda layer: layer.activation_only_db),
    )
    figure = Figure(figsize=(max(6.0, 0.45 * len(names) + 2.0) + 2.5, 4.0))
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    cap = 80.0
    for offset, (label, value) in enumerate(series):
        heights = [min(value(layer), cap) for layer in order]
        positions = [i + (offset - 1.5) * width for i in range(len(names))]
        axes.bar(positions, heights, width=width, label=label)
    axes.axhline(FINE_DB, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(f"logits SQNR (dB, capped at {cap:.0f})")
    scheme = "per-channel" if found.per_channel else "per-tensor"
    axes.set_title(
        f"{found.family}: INT8 sensitivity per layer ({scheme}); whole model "
        f"{found.logits_sqnr_db:.1f} dB",
        fontsize=10,
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()

    def write(stream: IO[bytes]) -> None:
        figure.savefig(stream, format="png", dpi=110)

    write_atomic(path, write)
