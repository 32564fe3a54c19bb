"""A framework-neutral DAG of tensor operations: what the region finder reads and writes.

An adapter (ONNX, PyTorch) translates its graph into a :class:`Graph` of
:class:`Op` records, each op one of the :data:`AFFINE_KINDS` with its
attributes normalised, or ``"opaque"`` (anything else: a nonlinearity, a
reshape, a concat). Tensors are named by strings; a tensor named in
:attr:`Graph.constants` is a parameter (an initializer, a ``Constant``, a
module's weight), every other tensor is computed.

Operands and attributes of each kind (tensors in NCHW, kernels OIHW):

============  =====================================  ==========================================
kind          inputs                                 attrs
============  =====================================  ==========================================
conv          ``(x, weight[, bias])``                ``stride``, ``pads``, ``groups``,
                                                     ``dilation``
linear        ``(x, weight[, bias])``: ``x`` of      (none)
              shape (N, C_in), ``weight``
              (C_out, C_in)
batch_norm    ``(x, gamma, beta, mean, var)``        ``eps``
add, sub      ``(a, b)``: two computed tensors, or   (none)
              one and a constant
mul, div      ``(a, b)``: a computed tensor and a    (none)
              constant (either order for mul)
neg           ``(x,)``                               (none)
pad           ``(x,)``                               ``pads``, ``value`` (a float)
avg_pool      ``(x,)``                               ``size``, ``stride``, ``pads``,
                                                     ``count_include_pad``
identity      ``(x,)``                               (none): Identity, inference Dropout
opaque        anything                               (none)
============  =====================================  ==========================================

``stride``, ``dilation`` and ``size`` are ``(h, w)`` pairs; ``pads`` is
``((top, bottom), (left, right))``. Computed tensors are NCHW images, or
``(N, C)`` features for ``linear`` and for the channelwise kinds around it
(``batch_norm``, the arithmetic, ``identity``): a classifier head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError

__all__ = ["AFFINE_KINDS", "Graph", "Op"]

AFFINE_KINDS = frozenset(
    {
        "conv",
        "linear",
        "batch_norm",
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "pad",
        "avg_pool",
        "identity",
    }
)
_KINDS = AFFINE_KINDS | {"opaque"}


@dataclass(frozen=True)
class Op:
    """One operation of a :class:`Graph`.

    Parameters
    ----------
    name : str
        Unique within the graph; reports name ops by it.
    kind : str
        One of :data:`AFFINE_KINDS` or ``"opaque"``.
    inputs, outputs : tuple of str
        Tensor names; ``""`` is an omitted optional input.
    attrs : mapping
        The kind's attributes (see the module's table).
    label : str, default ""
        The source framework's op type (``"Conv"``, ``"BatchNormalization"``,
        ``"Relu"``), for reports.
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ReparamError(
                f"Op {self.name!r}: unknown kind {self.kind!r}; expected one of {sorted(_KINDS)}"
            )

    @property
    def shown(self) -> str:
        """``Conv 'blk/conv1'``: the label (or kind) and the name, as reports show an op."""
        return f"{self.label or self.kind} {self.name!r}"


@dataclass(frozen=True)
class Graph:
    """A DAG of :class:`Op` records with its parameters and known shapes.

    Parameters
    ----------
    ops : tuple of Op
        In any order; every computed tensor has exactly one producer.
    inputs, outputs : tuple of str
        The graph's computed inputs and its outputs.
    constants : mapping of str to ndarray
        Parameters by tensor name. Never modified: a fold writes new ones.
    shapes : mapping of str to tuple
        Known shapes of computed tensors (``None`` for a dynamic dimension).
    """

    ops: tuple[Op, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: Mapping[str, npt.NDArray[Any]]
    shapes: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [op.name for op in self.ops]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            twice = next(name for name in names if name in seen or seen.add(name))  # type: ignore[func-returns-value]
            raise ReparamError(f"Graph: op names must be unique; {twice!r} appears twice")
        producers: dict[str, str] = {}
        for op in self.ops:
            for tensor in op.outputs:
                if tensor in producers or tensor in self.constants or tensor in self.inputs:
                    raise ReparamError(
                        f"Graph: tensor {tensor!r} is produced twice (by {op.shown} and "
                        f"{producers.get(tensor, 'the graph inputs or constants')})"
                    )
                producers[tensor] = op.shown

    def producers(self) -> dict[str, Op]:
        """Return the op that computes each computed tensor."""
        return {tensor: op for op in self.ops for tensor in op.outputs if tensor}

    def consumers(self) -> dict[str, list[Op]]:
        """Return the ops that read each tensor, in graph order."""
        found: dict[str, list[Op]] = {}
        for op in self.ops:
            for tensor in dict.fromkeys(op.inputs):
                if tensor:
                    found.setdefault(tensor, []).append(op)
        return found

    def constant(self, name: str) -> npt.NDArray[Any] | None:
        """Return the parameter named ``name``, or None for a computed tensor."""
        value = self.constants.get(name)
        return None if value is None else np.asarray(value)
