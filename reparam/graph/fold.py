"""The region finder: every maximal part of a graph that is one convolution, folded into one.

A *region* is a set of affine ops (:data:`~reparam.graph.ir.AFFINE_KINDS`
whose parameters are constants) that

1. reads one computed tensor from outside (its *source*),
2. produces one tensor that anything outside reads (its *output*): every other
   tensor it computes is read only by its own ops and is not a graph output,
3. holds at least one convolution.

Such a region computes ``conv(x, W) + b`` of its source: each op is a leaf
of the branch algebra (:mod:`reparam.core.algebra`), an ``add`` of two of
its tensors is a :class:`~reparam.core.algebra.Parallel`, a chain is a
:class:`~reparam.core.algebra.Sequential`, and :func:`~reparam.core.algebra.fold`
turns the tree into one conv. A nonlinearity is not affine and a tensor read
outside is not private, so either ends a region: that is the whole rule.

The finder works in rounds. It merges each op into the region of its
consumers when its output is private to that region; a region that reads
several computed tensors is cut at the sums that mix them (each part folds
alone); a region that the algebra refuses is cut where the refusal names
(:attr:`~reparam.core.algebra.FoldError.node`); a region whose fold would cost
more multiply-adds than its parts is cut between its convolutions. Rounds
repeat until every region folds, and each cut is reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.algebra import (
    AvgPool,
    Conv,
    FoldedConv,
    FoldError,
    Identity,
    Linear,
    Node,
    Norm,
    Pad,
    Parallel,
    Scale,
    Sequential,
    fold,
    output_size,
)
from ..core.algebra import multiply_adds as tree_multiply_adds
from ..core.errors import ReparamError
from ..core.params import BatchNorm
from .ir import AFFINE_KINDS, Graph, Op

__all__ = ["FoldReport", "FoldedRegion", "Refusal", "fold_graph"]

_NOMINAL_SIZE = 64  # input side for cost comparisons when the graph's shapes are dynamic
_COST_PREFIX = "left apart for cost"


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class FoldedRegion:
    """One region folded into one convolution.

    Attributes
    ----------
    conv : Op
        The new ``conv`` op (a ``linear`` op where the region works on ``(N, C)``
        features).
    replaced : tuple of str
        Names of the ops it replaces, in graph order.
    input, output : str
        The region's source tensor and its output tensor.
    parameters_before, parameters_after : int
        Numbers stored in the region's constants (BatchNorm statistics included), and in
        the new kernel and bias.
    multiply_adds_before, multiply_adds_after : int
        Per image, at the graph's input size (or ``image_size``, or 64x64 when dynamic).
    """

    conv: Op
    replaced: tuple[str, ...]
    input: str
    output: str
    parameters_before: int
    parameters_after: int
    multiply_adds_before: int
    multiply_adds_after: int

    def line(self) -> str:
        """One line: what was folded into what."""
        if self.conv.kind == "linear":
            return (
                f"folded {len(self.replaced)} ops into a linear layer {self.conv.name!r}: "
                + ", ".join(self.replaced)
            )
        stride, pads = self.conv.attrs["stride"], self.conv.attrs["pads"]
        kernel = self.conv.attrs["kernel_shape"]
        return (
            f"folded {len(self.replaced)} ops into Conv {self.conv.name!r} "
            f"({kernel[2]}x{kernel[3]}, {kernel[1] * self.conv.attrs['groups']}->{kernel[0]}, "
            f"stride {stride}, pads {pads}, groups {self.conv.attrs['groups']}): "
            + ", ".join(self.replaced)
        )


@dataclass(frozen=True)
class Refusal:
    """A candidate region, or part of one, that was not folded as a whole.

    Attributes
    ----------
    ops : tuple of str
        The candidate's ops.
    at : str
        The op where it stops being one convolution.
    reason : str
        Why; reasons about cost start with ``"left apart for cost"``.
    """

    ops: tuple[str, ...]
    at: str
    reason: str

    def line(self) -> str:
        """One line: where and why."""
        return f"not folded at {self.at!r}: {self.reason}"


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_graph` did.

    Attributes
    ----------
    folded : tuple of FoldedRegion
    refused : tuple of Refusal
        Refused candidates, near misses (a nonlinearity inside a branch) and
        compositions left apart for cost.
    ops_before, ops_after : int
    parameters_before, parameters_after : int
        Numbers stored in the constants the ops read.
    multiply_adds_before, multiply_adds_after : int or None
        Of every convolution and average pool per image, when the graph's
        shapes are static (None otherwise).
    """

    folded: tuple[FoldedRegion, ...]
    refused: tuple[Refusal, ...]
    ops_before: int
    ops_after: int
    parameters_before: int
    parameters_after: int
    multiply_adds_before: int | None
    multiply_adds_after: int | None

    def lines(self) -> list[str]:
        """Return the report as text lines: a summary, then each region and each refusal."""
        macs = ""
        if self.multiply_adds_before is not None and self.multiply_adds_after is not None:
            macs = (
                f"; multiply-adds {_count(self.multiply_adds_before)} -> "
                f"{_count(self.multiply_adds_after)}"
            )
        summary = (
            f"{len(self.folded)} regions folded; ops {self.ops_before} -> {self.ops_after}; "
            f"parameters {_count(self.parameters_before)} -> {_count(self.parameters_after)}" + macs
        )
        return [summary] + [r.line() for r in self.folded] + [r.line() for r in self.refused]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _count(number: int) -> str:
    return f"{number:,}"


# --------------------------------------------------------------------------- analysis


@dataclass
class _Analysis:
    """Facts about a graph that every round reads."""

    graph: Graph
    producers: dict[str, Op]
    consumers: dict[str, list[Op]]
    order: dict[str, int]  # op name -> topological position
    channels: dict[str, int]
    outputs: frozenset[str]
    affine: dict[str, str | None] = field(default_factory=dict)  # op -> None or why not

    def computed(self, op: Op) -> list[str]:
        return [t for t in op.inputs if t and t not in self.graph.constants]

    def constant(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(self.graph.constants[name])


def _topological(graph: Graph) -> list[Op]:
    """Return the ops so that every tensor is produced before it is read (stable order)."""
    producers = graph.producers()
    known = set(graph.inputs) | set(graph.constants)
    for op in graph.ops:
        for tensor in op.inputs:
            if tensor and tensor not in known and tensor not in producers:
                raise ReparamError(
                    f"fold_graph: {op.shown} reads tensor {tensor!r}, which no op produces "
                    "and which is neither a graph input nor a constant"
                )
    waiting = {
        op.name: {producers[t].name for t in op.inputs if t in producers} for op in graph.ops
    }
    readers: dict[str, list[str]] = {}
    for name, needs in waiting.items():
        for need in needs:
            readers.setdefault(need, []).append(name)
    index = {op.name: i for i, op in enumerate(graph.ops)}
    by_name = {op.name: op for op in graph.ops}
    ready = sorted((index[n] for n, needs in waiting.items() if not needs), reverse=True)
    result: list[Op] = []
    while ready:
        name = graph.ops[ready.pop()].name
        result.append(by_name[name])
        for reader in readers.get(name, []):
            waiting[reader].discard(name)
            if not waiting[reader]:
                ready.append(index[reader])
                ready.sort(reverse=True)
    if len(result) != len(graph.ops):
        stuck = sorted(set(by_name) - {op.name for op in result})
        raise ReparamError(
            f"fold_graph: the graph has a cycle through {', '.join(map(repr, stuck[:5]))}"
            + (f" and {len(stuck) - 5} more" if len(stuck) > 5 else "")
        )
    return result


def _analyse(graph: Graph) -> _Analysis:
    ordered = _topological(graph)
    analysis = _Analysis(
        graph=graph,
        producers=graph.producers(),
        consumers=graph.consumers(),
        order={op.name: i for i, op in enumerate(ordered)},
        channels=_channels(graph, ordered),
        outputs=frozenset(graph.outputs),
    )
    for op in ordered:
        analysis.affine[op.name] = _why_not_affine(op, analysis)
    return analysis


def _channels(graph: Graph, ordered: list[Op]) -> dict[str, int]:
    """Channels of each computed tensor: from the known shapes, else from the parameters."""
    found: dict[str, int] = {}
    for tensor, shape in graph.shapes.items():
        if len(shape) == 4 and isinstance(shape[1], int):
            found[tensor] = shape[1]
    for _ in range(2):  # forward, then again for what a later op's parameters told
        for op in ordered:
            if op.kind not in AFFINE_KINDS or not op.outputs:
                continue
            out = op.outputs[0]
            params = [np.asarray(graph.constants[t]) for t in op.inputs[1:] if t in graph.constants]
            if op.kind == "conv" and params and np.ndim(params[0]) == 4:
                weight = np.shape(params[0])
                found.setdefault(out, int(weight[0]))
                found.setdefault(op.inputs[0], int(weight[1]) * int(op.attrs.get("groups", 1)))
            elif op.kind == "linear" and params and np.ndim(params[0]) == 2:
                weight = np.shape(params[0])
                found.setdefault(out, int(weight[0]))
                found.setdefault(op.inputs[0], int(weight[1]))
            elif op.kind == "batch_norm" and params:
                found.setdefault(out, int(np.size(params[0])))
                found.setdefault(op.inputs[0], int(np.size(params[0])))
            else:
                for tensor in op.inputs:
                    if tensor in found and tensor not in graph.constants:
                        found.setdefault(out, found[tensor])
                if out in found:
                    for tensor in op.inputs:
                        if tensor and tensor not in graph.constants:
                            found.setdefault(tensor, found[out])
    return found


def _per_channel(value: npt.NDArray[Any], channels: int | None, rank: int) -> bool:
    """Whether ``value`` broadcasts against an NCHW (or NC) tensor as one number per channel."""
    if value.ndim > rank or value.size == 0:
        return False
    shape = (1,) * (rank - value.ndim) + value.shape
    return shape[0] == 1 and all(n == 1 for n in shape[2:]) and shape[1] in (1, channels)


_FEATURE_KINDS = frozenset({"linear", "batch_norm", "add", "sub", "mul", "div", "neg", "identity"})


def _rank(op: Op, a: _Analysis) -> int | None:
    """Return the rank ``op`` computes on: 4 (images), 2 (features), or None (neither)."""
    if op.kind == "linear":
        return 2
    ranks = {len(a.graph.shapes[t]) for t in [*a.computed(op), *op.outputs] if t in a.graph.shapes}
    if len(ranks) > 1:
        return None
    rank = ranks.pop() if ranks else 4
    return rank if rank == 4 or (rank == 2 and op.kind in _FEATURE_KINDS) else None


def _why_not_affine(op: Op, a: _Analysis) -> str | None:
    """None when ``op`` is an affine map of its computed input(s) here, else the reason."""
    if op.kind not in AFFINE_KINDS:
        return f"{op.shown} is not linear"
    computed = a.computed(op)
    out = op.outputs[0] if op.outputs else ""
    if len([t for t in op.outputs if t]) != 1:
        return f"{op.shown} has {len(op.outputs)} outputs"
    rank = _rank(op, a)
    if rank is None:
        shapes = [a.graph.shapes.get(t) for t in [*computed, out]]
        return f"{op.shown} works on tensors of shapes {shapes}, neither NCHW images nor features"
    consts = [a.constant(t) for t in op.inputs if t in a.graph.constants]
    if any(not np.issubdtype(c.dtype, np.floating) for c in consts):
        return f"{op.shown} has a parameter that is not floating-point"
    if any(not np.isfinite(c).all() for c in consts):
        return f"{op.shown} has a parameter that is not finite"
    channels = a.channels.get(out)
    if op.kind == "conv":
        if len(computed) != 1 or op.inputs[0] != computed[0]:
            return f"{op.shown} computes its weight or bias; only constant parameters fold"
        if consts[0].ndim != 4:
            return f"{op.shown} is not a 2-D convolution"
        return None
    if op.kind == "linear":
        if len(computed) != 1 or op.inputs[0] != computed[0]:
            return f"{op.shown} computes its weight or bias; only constant parameters fold"
        if consts[0].ndim != 2 or (len(consts) > 1 and consts[1].ndim != 1):
            return f"{op.shown} has a weight of shape {consts[0].shape}; expected (C_out, C_in)"
        return None
    if op.kind == "batch_norm":
        if len(computed) != 1 or op.inputs[0] != computed[0] or len(consts) != 4:
            return f"{op.shown} computes its statistics; only constant parameters fold"
        return None
    if op.kind in ("add", "sub"):
        if len(computed) == 2 or (len(computed) == 1 and _per_channel(consts[0], channels, rank)):
            return None
        return f"{op.shown} adds a constant that is not one value per channel"
    if op.kind in ("mul", "div"):
        if len(computed) != 1:
            return f"{op.shown} multiplies two computed tensors"
        if op.kind == "div" and op.inputs[0] != computed[0]:
            return f"{op.shown} divides a constant by a computed tensor"
        if not _per_channel(consts[0], channels, rank):
            return f"{op.shown} scales by a constant that is not one value per channel"
        if op.kind == "div" and not np.all(consts[0] != 0):
            return f"{op.shown} divides by zero"
        return None
    if len(computed) != 1:
        return f"{op.shown} reads {len(computed)} computed tensors"
    if op.kind == "avg_pool" and not op.attrs.get("count_include_pad", True):
        pads = op.attrs.get("pads", ((0, 0), (0, 0)))
        if any(side > 0 for axis in pads for side in axis):
            return (
                f"{op.shown} has count_include_pad=0 and padding {pads}: its border divides by "
                "fewer pixels than the window, which no convolution does"
            )
    return None


# --------------------------------------------------------------------------- regions


@dataclass
class _Region:
    ops: list[Op]  # topological order; the last is the sink
    source: str
    output: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops)


def _merge(a: _Analysis, cuts: set[str], excluded: set[str]) -> list[list[Op]]:
    """Group affine ops: an op joins its consumers' group when its output is private to it."""
    ordered = sorted(a.graph.ops, key=lambda op: a.order[op.name])
    group: dict[str, int] = {}
    members: dict[int, list[Op]] = {}
    for op in reversed(ordered):
        if a.affine[op.name] is not None or op.name in excluded:
            continue
        out = op.outputs[0]
        readers = a.consumers.get(out, [])
        target: int | None = None
        if out not in cuts and out not in a.outputs and readers:
            groups = {group.get(reader.name) for reader in readers}
            if len(groups) == 1 and None not in groups:
                target = groups.pop()
        if target is None:
            target = len(members)
            members[target] = []
        group[op.name] = target
        members[target].append(op)
    return [sorted(ops, key=lambda op: a.order[op.name]) for ops in members.values()]


def _sources(ops: list[Op], a: _Analysis) -> list[str]:
    inside = {t for op in ops for t in op.outputs}
    return list(dict.fromkeys(t for op in ops for t in a.computed(op) if t not in inside))


def _mixing_cuts(ops: list[Op], a: _Analysis) -> set[str]:
    """Cut a region that reads several tensors at each sum that mixes them."""
    inside = {op.outputs[0]: op for op in ops}
    depends: dict[str, frozenset[str]] = {}

    def sources_of(tensor: str) -> frozenset[str]:
        return depends[tensor] if tensor in inside else frozenset({tensor})

    cuts: set[str] = set()
    for op in ops:  # topological order
        inputs = a.computed(op)
        deps = [sources_of(t) for t in inputs]
        depends[op.outputs[0]] = frozenset().union(*deps)
        if len(inputs) == 2 and deps[0] != deps[1]:
            cuts.update(t for t in inputs if t in inside)
            cuts.add(op.outputs[0])
    return cuts


def _regions(a: _Analysis, cuts: set[str], excluded: set[str]) -> list[_Region]:
    """Single-source regions of the affine ops, the cuts growing until each has one source."""
    while True:
        groups = _merge(a, cuts, excluded)
        more: set[str] = set()
        for ops in groups:
            if len(_sources(ops, a)) > 1:
                more |= _mixing_cuts(ops, a)
        if not more - cuts:
            break
        cuts |= more
    regions = []
    for ops in groups:
        sources = _sources(ops, a)
        if len(sources) == 1:
            regions.append(_Region(ops, sources[0], ops[-1].outputs[0]))
    return regions


def _features(region: _Region, a: _Analysis) -> bool:
    """Whether the region works on ``(N, C)`` features (it holds a linear layer, or shapes say)."""
    return any(op.kind == "linear" or _rank(op, a) == 2 for op in region.ops)


# --------------------------------------------------------------------------- trees


class _TreeBuilder:
    """The algebra tree of a region: each tensor an expression of the source."""

    def __init__(self, region: _Region, a: _Analysis) -> None:
        self.a = a
        self.region = region
        self.inside = {op.outputs[0]: op for op in region.ops}
        channels = a.channels.get(region.source)
        if channels is None:
            raise FoldError(
                f"the channels of {region.source!r} are unknown (no shape and no parameter "
                "tells them)",
                node=None,
            )
        self.source = Identity(channels, name=region.source)
        self.memo: dict[str, Node] = {}

    def tree(self) -> Node:
        return self.expr(self.region.output)

    def expr(self, tensor: str) -> Node:
        if tensor == self.region.source:
            return self.source
        if tensor not in self.memo:
            self.memo[tensor] = self._build(self.inside[tensor])
        return self.memo[tensor]

    def _then(self, tensor: str, leaf: Node) -> Node:
        before = self.expr(tensor)
        if before is self.source:
            return leaf
        return Sequential(before, leaf, name=getattr(leaf, "name", ""))

    def _vector(self, name: str, channels: int) -> npt.NDArray[np.float64]:
        value = self.a.constant(name).astype(np.float64)
        return np.broadcast_to(value.reshape(-1), (channels,)).copy()

    def _build(self, op: Op) -> Node:
        a = self.a
        computed = a.computed(op)
        channels = a.channels.get(op.outputs[0])
        x = computed[0]
        name = op.name
        attrs = op.attrs
        if op.kind == "conv":
            bias = a.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
            leaf: Node = Conv(
                a.constant(op.inputs[1]),
                bias,
                stride=attrs.get("stride", 1),
                padding=attrs.get("pads", 0),
                groups=attrs.get("groups", 1),
                dilation=attrs.get("dilation", 1),
                name=name,
            )
            return self._then(x, leaf)
        if op.kind == "linear":
            bias = a.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else None
            return self._then(x, Linear(a.constant(op.inputs[1]), bias, name=name))
        if op.kind == "batch_norm":
            gamma, beta, mean, var = (a.constant(t) for t in op.inputs[1:5])
            bn = BatchNorm(gamma, beta, mean, var, eps=float(attrs.get("eps", 1e-5)))
            return self._then(x, Norm(bn, name=name))
        if channels is None:
            raise FoldError(f"the channels of {op.shown}'s output are unknown", node=None)
        if op.kind in ("add", "sub") and len(computed) == 2:
            left, right = self.expr(op.inputs[0]), self.expr(op.inputs[1])
            if op.kind == "sub":
                right = Sequential(right, Scale(-1.0, channels=channels, name=name), name=name)
            return Parallel(left, right, name=name)
        if op.kind in ("add", "sub", "mul", "div"):
            constant = next(t for t in op.inputs if t in a.graph.constants)
            value = self._vector(constant, channels)
            first = op.inputs[0] == x
            if op.kind == "add":
                leaf = Scale(1.0, value, channels=channels, name=name)
            elif op.kind == "sub":
                leaf = (
                    Scale(1.0, -value, channels=channels, name=name)
                    if first
                    else Scale(-1.0, value, channels=channels, name=name)
                )
            elif op.kind == "mul":
                leaf = Scale(value, name=name)
            else:
                leaf = Scale(1.0 / value, name=name)
            return self._then(x, leaf)
        if op.kind == "neg":
            return self._then(x, Scale(-1.0, channels=channels, name=name))
        if op.kind == "pad":
            value = np.full(channels, float(attrs.get("value", 0.0)))
            return self._then(x, Pad(attrs["pads"], value, name=name))
        if op.kind == "avg_pool":
            leaf = AvgPool(
                channels,
                attrs["size"],
                stride=attrs.get("stride"),
                padding=attrs.get("pads", 0),
                count_include_pad=attrs.get("count_include_pad", True),
                name=name,
            )
            return self._then(x, leaf)
        return self.expr(x)  # identity


# --------------------------------------------------------------------------- costs


_WEIGHTED = ("conv", "linear", "avg_pool")  # the ops whose multiply-adds count


def _source_size(
    region: _Region, a: _Analysis, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    if _features(region, a):
        return (1, 1)  # features: one pixel
    shape = a.graph.shapes.get(region.source)
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        return (int(shape[2]), int(shape[3]))  # type: ignore[arg-type]
    if image_size is not None:
        return image_size
    return (_NOMINAL_SIZE, _NOMINAL_SIZE)


def _region_cost(builder: _TreeBuilder, size: tuple[int, int]) -> int:
    """Multiply-adds of the region's convs and pools, each counted once."""
    total = 0
    for op in builder.region.ops:
        if op.kind not in _WEIGHTED:
            continue
        x = builder.a.computed(op)[0]
        before = builder.expr(x)
        at = size if before is builder.source else output_size(before, *size)
        leaf = builder.expr(op.outputs[0])
        leaf = leaf.steps[-1] if isinstance(leaf, Sequential) else leaf
        total += tree_multiply_adds(leaf, *at)
    return total


def _folded_cost(conv: FoldedConv, tree: Node, size: tuple[int, int]) -> int:
    out_h, out_w = output_size(tree, *size)
    return int(conv.kernel.size * out_h * out_w)


def _cost_cuts(region: _Region, a: _Analysis, builder: _TreeBuilder) -> set[str]:
    """Where to split a region that costs more folded: between its windowed maps, else at sums."""
    windowed = set(_WEIGHTED)
    inside = {op.outputs[0]: op for op in region.ops}

    def holds_window(tensor: str, seen: set[str]) -> bool:
        op = inside.get(tensor)
        if op is None or tensor in seen:
            return False
        seen.add(tensor)
        return op.kind in windowed or any(holds_window(t, seen) for t in a.computed(op))

    cuts = {
        t
        for op in region.ops
        if op.kind in windowed
        for t in a.computed(op)
        if t in inside and holds_window(t, set())
    }
    if not cuts:
        cuts = {t for op in region.ops if op.kind in ("add", "sub") for t in a.computed(op)}
        cuts &= set(inside)
    return cuts


# --------------------------------------------------------------------------- fold


def fold_graph(
    graph: Graph,
    *,
    max_cost_ratio: float = 1.0,
    image_size: tuple[int, int] | None = None,
) -> tuple[Graph, FoldReport]:
    """Fold every region of ``graph`` that is one convolution into one ``conv`` op.

    Parameters
    ----------
    graph : Graph
        Not modified; its constants are never written.
    max_cost_ratio : float, default 1.0
        Fold a region only when the folded conv costs at most this many times
        the multiply-adds of the region's own convolutions and pools. 1.0 never
        makes the model slower (a depthwise kxk followed by a pointwise 1x1
        stays two convs); ``math.inf`` folds every region it can, for the
        fewest ops.
    image_size : (int, int), optional
        The input size for cost comparisons and counts where the graph's
        shapes are dynamic (64x64 otherwise).

    Returns
    -------
    graph : Graph
        Ops in topological order. Untouched ops are the same objects; each
        folded region is one new ``conv`` op (attrs ``stride``, ``pads``,
        ``groups``, ``dilation``, ``kernel_shape``) writing the region's output
        tensor, with new constants named after it in the dtype of the region's
        parameters (computed in float64, rounded once). Constants no op reads
        any more are dropped.
    report : FoldReport

    Raises
    ------
    ReparamError
        On a malformed graph: a tensor nothing produces, a cycle, a bad option.
    """
    if not isinstance(graph, Graph):
        raise ReparamError(
            f"fold_graph: graph must be a reparam.graph.Graph; got {type(graph).__name__}"
        )
    return _fold_graph(graph, max_cost_ratio, image_size, release=False)


def _fold_graph(
    graph: Graph,
    max_cost_ratio: float,
    image_size: tuple[int, int] | None,
    *,
    release: bool,
    func: str = "fold_graph",
) -> tuple[Graph, FoldReport]:
    """:func:`fold_graph` on a checked graph. ``release``: the caller gives up ``graph``.

    With ``release`` the parameters of each region are deleted from ``graph.constants`` (a
    dict the caller owns and will not read again) as soon as the region is folded, so the
    old and the new weights of a large model are not all held at once.
    """
    if not isinstance(max_cost_ratio, int | float) or not max_cost_ratio > 0:
        raise ReparamError(f"{func}: max_cost_ratio must be a number > 0; got {max_cost_ratio!r}")
    if image_size is not None:
        if len(image_size) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in image_size
        ):
            raise ReparamError(f"{func}: image_size must be two positive ints; got {image_size!r}")
        image_size = (int(image_size[0]), int(image_size[1]))
    a = _analyse(graph)
    before = (len(graph.ops), _stored(graph), _graph_cost(graph))
    cuts: set[str] = set()
    excluded: set[str] = set()
    refused: dict[tuple[str, str], Refusal] = {}
    cache: dict[tuple[str, ...], _Plan | None] = {}
    while True:
        plans, changed = _plan(a, cuts, excluded, refused, max_cost_ratio, image_size, cache)
        if release:
            for plan in plans:
                _release(a, plan.region)
        if not changed:
            break
    refusals = list(refused.values()) + _near_misses(a)
    return _apply(a, plans, refusals, before)


def _release(a: _Analysis, region: _Region) -> None:
    """Delete the parameters only ``region`` reads from the (caller's) constants."""
    constants = a.graph.constants
    assert isinstance(constants, dict)
    names = set(region.names)
    for op in region.ops:
        for tensor in op.inputs:
            if tensor in constants and all(r.name in names for r in a.consumers[tensor]):
                del constants[tensor]


@dataclass
class _Plan:
    region: _Region
    conv: FoldedConv
    dtype: np.dtype[Any]
    cost_before: int
    cost_after: int
    parameters_before: int


def _plan(
    a: _Analysis,
    cuts: set[str],
    excluded: set[str],
    refused: dict[tuple[str, str], Refusal],
    max_cost_ratio: float,
    image_size: tuple[int, int] | None,
    cache: dict[tuple[str, ...], _Plan | None],
) -> tuple[list[_Plan], bool]:
    """One round: the regions, each folded or cut; whether anything was cut.

    A region met in an earlier round is not folded again (``cache``): its plan, or None.
    """
    plans = []
    changed = False
    for region in _regions(a, cuts, excluded):
        if len(region.ops) < 2 or not any(op.kind in ("conv", "linear") for op in region.ops):
            continue  # a conv alone is one conv already; without a conv, nothing to gain
        if region.names in cache:
            cached = cache[region.names]
            if cached is not None:
                plans.append(cached)
            continue
        cache[region.names] = None
        try:
            builder = _TreeBuilder(region, a)
            tree = builder.tree()
            conv = fold(tree)
        except FoldError as exc:
            at = _op_of(exc.node, region)
            reason = str(exc).removeprefix("fold: ")
            refused.setdefault((region.names[0], at.name), Refusal(region.names, at.name, reason))
            new = _refusal_cuts(at, region, a) - cuts
            if new:
                cuts |= new
            else:
                excluded.add(at.name)
            changed = True
            continue
        size = _source_size(region, a, image_size)
        before = _region_cost(builder, size)
        after = _folded_cost(conv, tree, size)
        if after > max_cost_ratio * before:
            new = _cost_cuts(region, a, builder) - cuts
            kernel = conv.kernel.shape
            reason = (
                f"{_COST_PREFIX}: one {kernel[2]}x{kernel[3]} conv (groups {conv.groups}) would "
                f"cost {_count(after)} multiply-adds per image against {_count(before)} for "
                f"its parts (max_cost_ratio={max_cost_ratio:g})"
            )
            refused.setdefault(
                (region.names[0], region.ops[-1].name),
                Refusal(region.names, region.ops[-1].name, reason),
            )
            if new:
                cuts |= new
                changed = True
            continue
        params = {
            t: a.constant(t) for op in region.ops for t in op.inputs if t in a.graph.constants
        }
        dtype = np.result_type(*params.values())
        stored = sum(int(value.size) for value in params.values())
        plan = _Plan(region, conv, dtype, before, after, stored)
        cache[region.names] = plan
        plans.append(plan)
    return plans, changed


def _op_of(node: Node | None, region: _Region) -> Op:
    """Return the region's op an algebra node stands for (by name), else the region's sink."""
    name = getattr(node, "name", None)
    return next((op for op in region.ops if op.name == name), region.ops[-1])


def _refusal_cuts(at: Op, region: _Region, a: _Analysis) -> set[str]:
    """Split before the op the algebra refused (a sum: before each of its operands)."""
    inside = {op.outputs[0] for op in region.ops}
    return set(a.computed(at)) & inside


def _near_misses(a: _Analysis) -> list[Refusal]:
    """Report each nonlinearity inside a branch (between a conv and a sum): it stays apart."""
    found = []
    for op in a.graph.ops:
        if a.affine[op.name] is None or op.kind in AFFINE_KINDS:
            continue
        computed = a.computed(op)
        if len(computed) != 1 or len(op.outputs) != 1:
            continue
        before = _affine_step(a, a.producers.get(computed[0]), backward=True)
        after = _affine_step(a, op, backward=False)
        if before is None or after is None:
            continue
        found.append(
            Refusal(
                (before.name, op.name, after.name),
                op.name,
                f"{op.shown} inside the branch between {before.shown} and {after.shown}: a "
                "nonlinearity before the sum keeps its branch apart",
            )
        )
    return found


def _affine_step(a: _Analysis, start: Op | None, *, backward: bool) -> Op | None:
    """Backward: the nearest conv up a chain of affine ops; forward: the sum a chain reaches."""
    op = start
    while op is not None:
        if backward:
            if a.affine[op.name] is not None:
                return None
            if op.kind in ("conv", "linear"):
                return op
            computed = a.computed(op)
            op = a.producers.get(computed[0]) if len(computed) == 1 else None
        else:
            readers = a.consumers.get(op.outputs[0], [])
            if len(readers) != 1 or a.affine[readers[0].name] is not None:
                return None
            op = readers[0]
            if op.kind in ("add", "sub") and len(a.computed(op)) == 2:
                return op
    return None


# --------------------------------------------------------------------------- apply


def _apply(
    a: _Analysis,
    plans: list[_Plan],
    refusals: list[Refusal],
    before: tuple[int, int, int | None],
) -> tuple[Graph, FoldReport]:
    graph = a.graph
    taken = {op.name for op in graph.ops} | set(graph.constants) | set(graph.inputs)
    taken |= {t for op in graph.ops for t in op.outputs}
    replaced: dict[str, _Plan] = {}
    new_ops: dict[str, Op] = {}
    constants: dict[str, npt.NDArray[Any]] = dict(graph.constants)
    folded = []
    for plan in sorted(plans, key=lambda plan: a.order[plan.region.ops[-1].name]):
        stem = "reparam_linear" if _features(plan.region, a) else "reparam_conv"
        name = _unique(_region_name(plan.region, stem), taken)
        weight, bias = _unique(f"{name}.weight", taken), _unique(f"{name}.bias", taken)
        conv = plan.conv
        operands = (plan.region.source, weight, bias)
        if _features(plan.region, a):  # features in, features out: a linear layer
            matrix, vector = conv.as_linear()
            constants[weight] = matrix.astype(plan.dtype, copy=False)
            constants[bias] = vector.astype(plan.dtype, copy=False)
            op = Op(name, "linear", operands, (plan.region.output,), {}, label="Gemm")
        else:
            constants[weight] = conv.kernel.astype(plan.dtype, copy=False)
            constants[bias] = conv.bias.astype(plan.dtype, copy=False)
            op = Op(
                name,
                "conv",
                operands,
                (plan.region.output,),
                {
                    "stride": conv.stride,
                    "pads": conv.pads,
                    "groups": conv.groups,
                    "dilation": conv.dilation,
                    "kernel_shape": tuple(int(n) for n in conv.kernel.shape),
                },
                label="Conv",
            )
        sink = plan.region.ops[-1].name
        new_ops[sink] = op
        for member in plan.region.ops:
            replaced[member.name] = plan
        folded.append(
            FoldedRegion(
                conv=op,
                replaced=plan.region.names,
                input=plan.region.source,
                output=plan.region.output,
                parameters_before=plan.parameters_before,
                parameters_after=int(conv.kernel.size + conv.bias.size),
                multiply_adds_before=plan.cost_before,
                multiply_adds_after=plan.cost_after,
            )
        )
    ops: list[Op] = []
    for op in sorted(graph.ops, key=lambda op: a.order[op.name]):
        if op.name in new_ops:
            ops.append(new_ops[op.name])
        elif op.name not in replaced:
            ops.append(op)
    used = {t for op in ops for t in op.inputs if t}
    constants = {name: value for name, value in constants.items() if name in used}
    result = Graph(tuple(ops), graph.inputs, graph.outputs, constants, graph.shapes)
    report = FoldReport(
        folded=tuple(folded),
        refused=tuple(refusals),
        ops_before=before[0],
        ops_after=len(ops),
        parameters_before=before[1],
        parameters_after=_stored(result),
        multiply_adds_before=before[2],
        multiply_adds_after=_graph_cost(result),
    )
    return result, report


def _region_name(region: _Region, stem_name: str) -> str:
    names = list(region.names)
    shortest = min(names, key=len)
    common = next(
        (i for i, ch in enumerate(shortest) if any(n[i] != ch for n in names)), len(shortest)
    )
    prefix = shortest[:common]
    cut = max(prefix.rfind("/"), prefix.rfind("."))
    stem = prefix[: cut + 1] if cut >= 0 else ""
    return f"{stem}{stem_name}" if stem else f"{region.ops[-1].name}.{stem_name}"


def _unique(name: str, taken: set[str]) -> str:
    candidate, index = name, 1
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    taken.add(candidate)
    return candidate


def _stored(graph: Graph) -> int:
    used = {t for op in graph.ops for t in op.inputs if t in graph.constants}
    return sum(int(np.size(graph.constants[t])) for t in used)


def _graph_cost(graph: Graph) -> int | None:
    """Multiply-adds of every conv and average pool per image, from static output shapes."""
    total = 0
    for op in graph.ops:
        if op.kind not in _WEIGHTED:
            continue
        if op.kind == "linear":
            total += int(np.size(graph.constants[op.inputs[1]]))
            continue
        shape = graph.shapes.get(op.outputs[0])
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            return None
        pixels = int(shape[2]) * int(shape[3])  # type: ignore[arg-type]
        if op.kind == "conv":
            total += int(np.size(graph.constants[op.inputs[1]])) * pixels
        else:
            size = op.attrs["size"]
            total += int(shape[1]) * int(size[0]) * int(size[1]) * pixels  # type: ignore[arg-type]
    return total
