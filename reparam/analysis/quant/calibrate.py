"""Calibration: MinMax ranges of every activation, and the parameters they fix.

onnxruntime's MinMax calibration runs the float32 model on the calibration
images and keeps, for each quantized tensor, the smallest and largest value
seen. Here the chain runs in float64 on the images cast to float32 (what the
runtime is fed), a chunk of images at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ...core.errors import ReparamError
from .chain import Chain, Quantizable, chain_of, in_channels_of
from .scheme import (
    ActivationQuant,
    LayerQuant,
    QParams,
    activation_quant,
    quantize_bias,
    quantize_weight,
)
from .scheme import weight_scale as scales_of

__all__ = [
    "MIN_CALIBRATION_SAMPLES",
    "calibrate",
    "calibrate_chain",
    "check_images",
    "chunks",
    "ranges",
]

#: Fewest calibration images accepted: MinMax ranges from fewer are noise.
MIN_CALIBRATION_SAMPLES = 8
#: Images run through the float64 network at once.
_CHUNK = 32


def check_images(
    images: Any,
    model: Quantizable | None,
    *,
    func: str,
    name: str,
    minimum: int = MIN_CALIBRATION_SAMPLES,
) -> npt.NDArray[np.float32]:
    """Check images for ``model`` and return them in float32 (what the runtime is fed).

    Parameters
    ----------
    images : array_like, shape (N, C_in, H, W)
    model : RepVGG, Network, Graph, Chain or None
        Whose input channels the images must have; None checks everything
        else (so that images can be checked before a model is loaded).
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
    channels = None if model is None else in_channels_of(model, func=func)
    if array.ndim != 4 or (channels is not None and array.shape[1] != channels):
        raise ReparamError(
            f"{func}: {name} has the wrong shape; got {array.shape}, expected (N, "
            f"{'C' if channels is None else channels}, H, W)"
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


def chunks(array: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    """Yield ``array`` a chunk of images at a time."""
    for start in range(0, array.shape[0], _CHUNK):
        yield array[start : start + _CHUNK]


def ranges(chain: Chain, images: npt.NDArray[np.float32], *, func: str) -> list[list[float]]:
    """MinMax ranges, float64 forward: the input, each conv's output, pooled, logits.

    Raises
    ------
    ReparamError
        If an activation overflows float32 (it could not be quantized).
    """
    found: list[list[float]] = []
    for chunk in chunks(images):
        with np.errstate(over="ignore", invalid="ignore"):
            acts = chain.activations(chunk, func=func)
        for index, act in enumerate(acts):
            low, high = float(act.min()), float(act.max())
            if index == len(found):
                found.append([low, high])
            else:
                found[index] = [min(found[index][0], low), max(found[index][1], high)]
    for index, (low, high) in enumerate(found):
        if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > 3e38:
            where = ["the input", *chain.names, "the pooled features", "the logits"][index]
            raise ReparamError(
                f"{func}: the model cannot be quantized: {where} overflows float32 on the "
                "calibration data"
            )
    return found


def _layer(
    name: str,
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    inputs: ActivationQuant,
    outputs: ActivationQuant,
    *,
    per_channel: bool,
    reduce_range: bool,
    where: str,
) -> LayerQuant:
    scale = scales_of(weight, per_channel=per_channel, reduce_range=reduce_range)
    return LayerQuant(
        name,
        quantize_weight(weight, scale, reduce_range=reduce_range),
        scale,
        quantize_bias(bias, inputs.scale, scale, name=where),
        inputs,
        outputs,
    )


def calibrate_chain(
    chain: Chain,
    images: npt.NDArray[np.float32],
    *,
    per_channel: bool,
    reduce_range: bool = False,
    func: str,
) -> QParams:
    """:func:`calibrate` on a checked chain and checked float32 images."""
    acts = [activation_quant(low, high) for low, high in ranges(chain, images, func=func)]
    options = {"per_channel": per_channel, "reduce_range": reduce_range}
    layers = tuple(
        _layer(
            item.name,
            item.conv.kernel,
            item.conv.bias,
            acts[index],
            acts[index + 1],
            where=f"{func}: {item.name}",
            **options,
        )
        for index, item in enumerate(chain.convs)
    )
    pool = acts[-2]
    head = _layer(
        "head",
        chain.head_weight,
        chain.head_bias,
        pool,
        acts[-1],
        where=f"{func}: the head",
        **options,
    )
    return QParams(layers, pool, head, per_channel)


def calibrate(
    model: Quantizable,
    calibration: npt.ArrayLike,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
) -> QParams:
    """Calibrate as onnxruntime's MinMax static quantization does, in float64.

    Parameters
    ----------
    model : RepVGG, Network, Graph or Chain
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

    Examples
    --------
    >>> import numpy as np, reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> model = reparam.RepVGG.create(tiny, num_classes=3)
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    >>> params = calibrate(model, x, per_channel=True)
    >>> [layer.name for layer in params.layers], params.head.weight_scale.shape
    (['stage0', 'stage1.0', 'stage1.1'], (3,))
    >>> params.layers[0].output.zero_point  # measured after the ReLU: the clamp
    -128
    """
    func = "calibrate"
    chain = chain_of(model, func=func)
    images = check_images(calibration, chain, func=func, name="calibration")
    return calibrate_chain(
        chain, images, per_channel=per_channel, reduce_range=reduce_range, func=func
    )
