"""Integer arithmetic: the logits onnxruntime's INT8 model computes, in NumPy.

The pipeline onnxruntime's CPU provider runs on a QDQ graph of a chain:
QuantizeLinear on the image; per conv an int32 accumulation (QLinearConv),
the float32 multiplier ``(s_x * s_w) / s_y``, rounding half to even and the
clamp (the ReLU is the clamp at zero point -128, or a ``max`` with the zero
point); QLinearGlobalAveragePool (sum, times ``s_x / (s_y * H W)``); QGemm.
Integer convolutions are computed exactly in float64 (which holds every int32
accumulator).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ...core.errors import ReparamError
from .calibrate import calibrate_chain, check_images, chunks
from .chain import Chain, Quantizable, chain_of
from .scheme import (
    INT32,
    Float64Array,
    QParams,
    dequantize,
    per_row,
    quantize,
    requantize,
)

__all__ = ["check_qparams", "integer_logits", "simulate"]

_F32 = np.float32


def _check_accumulator(accumulator: Float64Array, name: str, *, func: str) -> None:
    if accumulator.size and (
        accumulator.min() < INT32[0] or accumulator.max() > INT32[1]
    ):  # pragma: no cover - needs fan-ins far beyond published models
        raise ReparamError(f"{func}: {name} cannot be quantized: its int32 accumulator overflows")


def integer_logits(
    chain: Chain, qparams: QParams, x: npt.NDArray[np.float32], *, func: str
) -> npt.NDArray[np.float32]:
    """Run the integer pipeline onnxruntime's CPU provider runs, on one chunk of images.

    Parameters
    ----------
    chain : Chain
    qparams : QParams
        Fitting ``chain`` (see :func:`check_qparams`).
    x : ndarray of float32, shape (N, C_in, H, W)

    Returns
    -------
    ndarray of float32, shape (N, classes)
        The dequantized logits.
    """
    current = qparams.layers[0].input
    q = quantize(x, current)
    for index, quant in enumerate(qparams.layers):
        if quant.input != current:  # a requantization the graph would hold
            q = quantize(dequantize(q, current), quant.input)
        accumulator = chain.convolve(
            index,
            q - quant.input.zero_point,
            quant.weight.astype(np.float64),
            quant.bias.astype(np.float64),
        )
        _check_accumulator(accumulator, quant.name, func=func)
        multiplier = (_F32(quant.input.scale) * quant.weight_scale) / _F32(quant.output.scale)
        q = requantize(accumulator, per_row(multiplier.astype(np.float32), 3), quant.output)
        q = np.maximum(q, quant.output.zero_point)  # the ReLU (a no-op at zero point -128)
        current = quant.output
    pixels = q.shape[2] * q.shape[3]
    summed = (q - current.zero_point).sum(axis=(2, 3))
    multiplier = np.asarray(_F32(current.scale) / (_F32(qparams.pool.scale) * _F32(pixels)))
    q = requantize(summed, multiplier.astype(np.float32), qparams.pool)
    head = qparams.head
    if head.input != qparams.pool:
        q = quantize(dequantize(q, qparams.pool), head.input)
    accumulator = (q - head.input.zero_point) @ head.weight.T.astype(np.float64) + head.bias
    _check_accumulator(accumulator, "head", func=func)
    multiplier = (_F32(head.input.scale) * head.weight_scale) / _F32(head.output.scale)
    return dequantize(
        requantize(accumulator, multiplier.astype(np.float32), head.output), head.output
    )


def check_qparams(chain: Chain, qparams: Any, *, func: str) -> QParams:
    """Return ``qparams`` if they fit ``chain``: one quantized conv per conv, same shapes.

    Raises
    ------
    ReparamError
        If ``qparams`` is not a QParams or does not fit, naming the layer.
    """
    if not isinstance(qparams, QParams):
        raise ReparamError(
            f"{func}: qparams must be a reparam.quant.QParams (from qparams_from_onnx or "
            f"calibrate); got {type(qparams).__name__}"
        )
    if len(qparams.layers) != len(chain.convs):
        raise ReparamError(
            f"{func}: qparams do not fit the model; got {len(qparams.layers)} quantized convs, "
            f"expected {len(chain.convs)} (one per block)"
        )
    for (name, shape), quant in zip(chain.shapes, (*qparams.layers, qparams.head), strict=True):
        if quant.weight.shape != shape or quant.bias.shape != shape[:1]:
            raise ReparamError(
                f"{func}: qparams do not fit the model at {name}; got weight "
                f"{quant.weight.shape}, expected {shape}"
            )
    return qparams


def simulate(
    model: Quantizable,
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
    model : RepVGG, Network, Graph or Chain
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
    if (calibration is None) == (qparams is None):
        raise ReparamError(
            f"{func}: give exactly one of calibration= (images to calibrate on) and qparams= "
            "(from qparams_from_onnx); got " + ("neither" if calibration is None else "both")
        )
    chain = chain_of(model, func=func)
    images = check_images(x, chain, func=func, name="x", minimum=1)
    if qparams is not None:
        params = check_qparams(chain, qparams, func=func)
        if bool(per_channel) != params.per_channel:
            raise ReparamError(
                f"{func}: per_channel={per_channel} disagrees with the qparams, whose weight "
                f"scales are {'per channel' if params.per_channel else 'per tensor'}"
            )
    else:
        reference = check_images(calibration, chain, func=func, name="calibration")
        params = calibrate_chain(
            chain, reference, per_channel=per_channel, reduce_range=reduce_range, func=func
        )
    parts = [integer_logits(chain, params, chunk, func=func) for chunk in chunks(images)]
    return np.concatenate(parts).astype(np.float32)
