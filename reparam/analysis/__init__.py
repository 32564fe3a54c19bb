"""Analyses of a network before deployment: INT8 quantization (:mod:`reparam.analysis.quant`).

``reparam.quant`` is :mod:`reparam.analysis.quant`.
"""

from . import quant
from .networks import Network, as_network
from .quant import QParams, QuantReport, qparams_from_onnx, report, simulate, weight_stats

__all__ = [
    "Network",
    "QParams",
    "QuantReport",
    "as_network",
    "qparams_from_onnx",
    "quant",
    "report",
    "simulate",
    "weight_stats",
]
