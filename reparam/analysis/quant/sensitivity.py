"""Sensitivity: what quantizing one layer alone costs the logits, and why (the report).

For each layer (each conv, then the head) the float64 network runs from that
layer's input with only the layer quantized, four ways: its weights and
activations with the report's scales, only its weights per tensor, only its
weights per channel, only its input and output. The logits SQNR of each, and
of the integer pipeline with every layer quantized, make the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from .calibrate import MIN_CALIBRATION_SAMPLES, calibrate_chain, check_images, chunks
from .chain import Chain, Quantizable, chain_of
from .output import FINE_DB, LayerReport, QuantReport
from .scheme import Float64Array, LayerQuant, QParams, fake_quantize, per_row
from .simulate import integer_logits
from .stats import chain_stats

__all__ = ["Progress", "report"]

#: Per-channel weights "fix" a layer when they gain at least this much logits SQNR.
_PER_CHANNEL_GAIN_DB = 6.0
_F32 = np.float32

#: ``progress(done, total, layer)``: called by :func:`report` each time a layer is measured.
Progress: TypeAlias = Callable[[int, int, str], None]


def _quantized_layer(
    chain: Chain,
    index: int,
    x: Float64Array,
    quant: LayerQuant,
    *,
    weights: bool,
    activations: bool,
) -> Float64Array:
    """Run layer ``index`` (a conv, or the head) with weights and/or activations quantized."""
    if activations:
        x = fake_quantize(x, quant.input)
    scale = quant.weight_scale.astype(np.float64)
    if weights:
        weight = quant.weight.astype(np.float64) * per_row(scale, quant.weight.ndim)
        bias = quant.bias * (np.float64(_F32(quant.input.scale)) * scale)
    else:
        weight, bias = chain.float64[index]
    if index < len(chain.convs):
        out: Float64Array = np.maximum(chain.convolve(index, x, weight, bias), 0.0)
    else:
        out = x @ weight.T + bias
    return fake_quantize(out, quant.output) if activations else out


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
    model: Quantizable,
    calibration: npt.ArrayLike,
    *,
    per_channel: bool = False,
    progress: Progress | None = None,
) -> QuantReport:
    """Say which layers INT8 breaks, how badly, and why.

    Parameters
    ----------
    model : RepVGG, Network, Graph or Chain
        Train or deploy form (the train form adds the branch attribution).
    calibration : array_like, shape (N, C_in, H, W)
        Images to calibrate on (as :func:`calibrate`); the SQNRs are measured
        on the same images, against the float64 deploy form.
    per_channel : bool, default False
        Per-channel weight scales for ``sensitivity_db`` and the whole model.
    progress : callable, optional
        ``progress(done, total, layer)``, called once per layer (the convs in
        order, then ``"head"``) for each chunk of up to 32 images, when that
        layer's sensitivities on the chunk are measured: ``done`` counts from
        1 to ``total`` (the layers times the chunks).

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
    >>> found = report(model, x, progress=lambda done, total, layer: print(done, total, layer))
    1 4 stage0
    2 4 stage1.0
    3 4 stage1.1
    4 4 head
    >>> sorted(layer.name for layer in found.layers)
    ['head', 'stage0', 'stage1.0', 'stage1.1']
    >>> found.layers[0].sensitivity_db <= found.layers[-1].sensitivity_db
    True
    """
    func = "report"
    chain = chain_of(model, func=func)
    images = check_images(
        calibration, chain, func=func, name="calibration", minimum=MIN_CALIBRATION_SAMPLES
    )
    per_tensor_q = calibrate_chain(chain, images, per_channel=False, func=func)
    per_channel_q = calibrate_chain(chain, images, per_channel=True, func=func)
    chosen: QParams = per_channel_q if per_channel else per_tensor_q
    count = len(chain.convs) + 1
    shown = [item.shown for item in chain.convs] + ["head"]
    variants = (  # (parameters, weights, activations)
        (chosen, True, True),
        (per_tensor_q, True, False),
        (per_channel_q, True, False),
        (chosen, False, True),
    )
    batches = list(chunks(images))
    steps = count * len(batches)
    done = 0
    signal = 0.0
    noise = np.zeros((count, len(variants)))
    whole_noise = 0.0
    agree = 0
    for chunk in batches:
        acts = chain.activations(chunk, func=func)
        reference = acts[-1]
        signal += float(np.sum(reference * reference))
        for index in range(count):
            x = acts[index] if index < count - 1 else acts[-2]
            for column, (params, weights, activations) in enumerate(variants):
                quant = params.layers[index] if index < count - 1 else params.head
                out = _quantized_layer(
                    chain, index, x, quant, weights=weights, activations=activations
                )
                error = chain.finish(index, out) - reference
                noise[index, column] += float(np.sum(error * error))
            done += 1
            if progress is not None:
                progress(done, steps, shown[index])
        int8 = integer_logits(chain, chosen, chunk, func=func).astype(np.float64)
        whole_noise += float(np.sum((int8 - reference) ** 2))
        agree += int(np.sum(int8.argmax(axis=1) == reference.argmax(axis=1)))

    def to_db(energy: float) -> float:
        if energy == 0.0:
            return math.inf
        return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / energy)

    found = []
    for index, stat in enumerate(chain_stats(chain)):
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
        chain.family,
    )
