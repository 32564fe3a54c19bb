"""Graph folding: find every region of a graph that is one convolution, and fold it.

Layers inside the package, each importing only the ones before it:

- :mod:`reparam.graph.ir`: the framework-neutral DAG (:class:`Graph`, :class:`Op`);
- :mod:`reparam.graph.fold`: the region finder on the branch algebra
  (:func:`fold_graph`, :class:`FoldReport`);
- :mod:`reparam.graph.onnx`: the ONNX adapter (:func:`fold_onnx`), which
  imports ``onnx`` only when called.
"""

from .fold import FoldedRegion, FoldReport, Refusal, fold_graph
from .ir import AFFINE_KINDS, Graph, Op

__all__ = [
    "AFFINE_KINDS",
    "FoldReport",
    "FoldedRegion",
    "Graph",
    "Op",
    "Refusal",
    "fold_graph",
]
