"""What a report is and how it is shown: the records, JSON, the text table, the figure."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from ...checkpoints.formats import shown_path, write_atomic
from ...core.errors import ReparamError
from .stats import WeightStats

__all__ = [
    "FINE_DB",
    "LayerReport",
    "QuantReport",
    "check_plotting",
    "plot_report",
    "write_json",
]

#: A layer whose logits SQNR (only it quantized) reaches this is "fine" in a report.
FINE_DB = 30.0
#: Bars of the figure are cut at this many dB (a layer without noise is infinite).
_CAP_DB = 80.0


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
        In plain words; see :func:`~reparam.analysis.quant.report`.
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


def _db(value: float) -> str:
    return "inf" if value == math.inf else f"{value:.1f}"


class QuantReport(NamedTuple):
    """What :func:`~reparam.analysis.quant.report` found.

    Attributes
    ----------
    layers : tuple of LayerReport
        Sorted by sensitivity, most sensitive (lowest SQNR) first.
    logits_sqnr_db : float
        Logits SQNR with every layer quantized (:func:`~reparam.analysis.quant.simulate`).
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
                f"{_db(stats.weight_sqnr_per_tensor_db):>8} "
                f"{_db(stats.weight_sqnr_per_channel_db):>8} {_db(layer.sensitivity_db):>8}  "
                f"{owner:<16} {layer.verdict}"
            )
        scheme = "per-channel" if self.per_channel else "per-tensor"
        lines.append(
            f"whole model ({scheme} weights, {self.samples} images): logits SQNR "
            f"{_db(self.logits_sqnr_db)} dB, top-1 agreement {self.top1_agreement:.2%}"
        )
        return "\n".join(lines)


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

    Four bars per layer, in network order (the logits SQNR with only the
    layer quantized, only its weights per tensor and per channel, only its
    activations), capped at 80 dB; the dashed line is :data:`FINE_DB`, at or
    above which a layer is ``"fine"``.

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
    for offset, (label, value) in enumerate(series):
        heights = [min(value(layer), _CAP_DB) for layer in order]
        positions = [i + (offset - 1.5) * width for i in range(len(names))]
        axes.bar(positions, heights, width=width, label=label)
    axes.axhline(
        FINE_DB,
        color="black",
        linewidth=0.8,
        linestyle="--",
        label=f'{FINE_DB:.0f} dB: a layer at or above is "fine"',
    )
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(f"logits SQNR (dB, capped at {_CAP_DB:.0f})")
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
