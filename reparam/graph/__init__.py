"""Graph folding: find every region of a graph that is one convolution, and fold it.

Layers inside the package, each importing only the ones before it:

- :mod:`reparam.graph.ir`: the framework-neutral DAG (:class:`Graph`, :class:`Op`);
- :mod:`reparam.graph.fold`: the region finder on the branch algebra
  (:func:`fold_graph`, :class:`FoldReport`);
- :mod:`reparam.graph.onnx`: the ONNX adapter (:func:`read_graph`,
  :func:`write_graph`, :func:`fold_onnx`, :func:`save_onnx`), which imports
  ``onnx`` only when called;
- :mod:`reparam.graph.torch`: the PyTorch adapter (:func:`fold_torch`), loaded
  on first use of ``reparam.graph.fold_torch`` (so ``import reparam.graph``
  never imports torch).
"""

from typing import TYPE_CHECKING, Any

from .fold import FoldedRegion, FoldReport, Refusal, fold_graph
from .ir import AFFINE_KINDS, Graph, Op
from .onnx import fold_onnx, read_graph, save_onnx, write_graph

if TYPE_CHECKING:
    from .torch import fold_torch

__all__ = [
    "AFFINE_KINDS",
    "FoldReport",
    "FoldedRegion",
    "Graph",
    "Op",
    "Refusal",
    "fold_graph",
    "fold_onnx",
    "fold_torch",
    "read_graph",
    "save_onnx",
    "write_graph",
]


def __getattr__(name: str) -> Any:
    """Load the PyTorch adapter on first use of ``fold_torch``."""
    if name == "fold_torch":
        from .torch import fold_torch

        return fold_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
