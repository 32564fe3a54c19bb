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

One module per concern, each working on the :class:`Chain` of folded
convolutions that :func:`chain_of` reads from a network:

- :mod:`.scheme`: the INT8 scheme (scales, zero points, rounding);
- :mod:`.chain`: the chain, and the one function that reads a network;
- :mod:`.calibrate`: MinMax calibration;
- :mod:`.simulate`: the integer arithmetic;
- :mod:`.qdq`: onnxruntime's own parameters, read from its QDQ model;
- :mod:`.stats`: weight statistics and branch attribution;
- :mod:`.sensitivity`: per-layer sensitivities and the report;
- :mod:`.output`: the report's records, JSON, table and figure.
"""

from .calibrate import MIN_CALIBRATION_SAMPLES, calibrate, check_images
from .chain import Chain, ChainConv, chain_of
from .output import FINE_DB, LayerReport, QuantReport, check_plotting, plot_report, write_json
from .qdq import qparams_from_onnx
from .scheme import ActivationQuant, LayerQuant, QParams
from .sensitivity import Progress, report
from .simulate import simulate
from .stats import WeightStats, sqnr_db, weight_stats

__all__ = [
    "FINE_DB",
    "MIN_CALIBRATION_SAMPLES",
    "ActivationQuant",
    "Chain",
    "ChainConv",
    "LayerQuant",
    "LayerReport",
    "Progress",
    "QParams",
    "QuantReport",
    "WeightStats",
    "calibrate",
    "chain_of",
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
