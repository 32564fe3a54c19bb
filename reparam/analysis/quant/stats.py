"""Weight statistics of each folded kernel, and which branch of the train form makes its range.

Per fused convolution (and the head): each output channel's range
``max |w|``, the spread of those ranges (max over median), the kurtosis, the
weight SQNR with one scale per tensor and per channel. When the chain knows a
block's train form, each channel's range is attributed to the branches of its
sum through the algebra: the tree is folded once per branch with every other
branch scaled by zero, which places that branch's kernel exactly where the
fold places it in the fused kernel (same alignment, groups and post-sum maps),
and the fused kernel is the sum of those placed kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ...core.algebra import (
    AvgPool,
    Conv,
    Linear,
    Node,
    Parallel,
    Scale,
    Sequential,
    fold,
)
from ...core.checks import FloatArray
from ...core.errors import ReparamError
from .chain import Chain, Quantizable, chain_of
from .scheme import Float64Array, per_row, quantize_weight, weight_scale

__all__ = ["WeightStats", "branch_label", "chain_stats", "sqnr_db", "weight_stats"]


def sqnr_db(reference: npt.ArrayLike, approximation: npt.ArrayLike) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum r^2 / sum (r - a)^2)`` in dB.

    Parameters
    ----------
    reference, approximation : array_like, same shape

    Returns
    -------
    float
        ``inf`` when they are equal (no noise); computed in float64.

    Examples
    --------
    >>> round(sqnr_db([3.0, 4.0], [3.0, 4.5]), 2)  # 25 / 0.25 = 100
    20.0
    """
    signal = np.asarray(reference, dtype=np.float64)
    noise = signal - np.asarray(approximation, dtype=np.float64)
    noise_energy = float(np.sum(noise * noise))
    if noise_energy == 0.0:
        return math.inf
    signal_energy = float(np.sum(signal * signal))
    return -math.inf if signal_energy == 0.0 else 10.0 * math.log10(signal_energy / noise_energy)


class WeightStats(NamedTuple):
    """Statistics of one fused kernel.

    Attributes
    ----------
    name : str
    kernel_shape : tuple of int
    channel_max : ndarray, shape (C_out,)
        ``max |w|`` of each output channel (the range each channel needs).
    range_spread : float
        ``max(channel_max) / median(channel_max)``: how many times the
        per-tensor step is larger than what the median channel needs.
    kurtosis : float
        Excess kurtosis of the kernel's entries (0 for a Gaussian; large
        when a few outliers set the range).
    weight_sqnr_per_tensor_db, weight_sqnr_per_channel_db : float
        SQNR of the int8 kernel, one scale per tensor or per output channel.
    branches : tuple of str
        The branches of the train form's sum (see :func:`branch_label`:
        ``"3x3"``, ``"1x1"``, ``"identity"``, ``"avg pool"``, ...), empty when
        it is unknown.
    shares : ndarray, shape (C_out, len(branches))
        Per output channel, each branch's share of the channel's range: at
        the tap with the largest ``|w|``, ``|w_b| / sum_b |w_b|``.
    worst_channel : int
        The channel with the largest range (it sets the per-tensor scale).
    position : int
        The layer's place in the network (0 for the first block; the head last).
    """

    name: str
    kernel_shape: tuple[int, ...]
    channel_max: Float64Array
    range_spread: float
    kurtosis: float
    weight_sqnr_per_tensor_db: float
    weight_sqnr_per_channel_db: float
    branches: tuple[str, ...]
    shares: Float64Array
    worst_channel: int
    position: int

    @property
    def dominant_branch(self) -> str | None:
        """The branch with the largest share of the worst channel's range (None if unknown)."""
        if not self.branches:
            return None
        return self.branches[int(np.argmax(self.shares[self.worst_channel]))]


def _leaves(node: Node) -> Iterator[Node]:
    if isinstance(node, Parallel):
        for branch in node.branches:
            yield from _leaves(branch)
    elif isinstance(node, Sequential):
        for step in node.steps:
            yield from _leaves(step)
    else:
        yield node


def branch_label(branch: Node) -> str:
    """Name a branch by the maps it is made of: its convolutions and pools, in order.

    ``"3x3"`` (a conv, with or without a BatchNorm), ``"1x1-3x3"`` (two in
    sequence), ``"avg pool"``, ``"1x1-avg pool"``; a branch of channelwise maps
    only (BatchNorm, scale, the identity) is ``"identity"``.

    Examples
    --------
    >>> import numpy as np
    >>> from reparam.core.algebra import Identity
    >>> branch_label(Sequential(Conv(np.ones((2, 2, 1, 1))), Conv(np.ones((2, 2, 3, 3)))))
    '1x1-3x3'
    >>> branch_label(Identity(2))
    'identity'
    """
    parts = []
    for leaf in _leaves(branch):
        if isinstance(leaf, Conv):
            parts.append(f"{leaf.kernel.shape[2]}x{leaf.kernel.shape[3]}")
        elif isinstance(leaf, Linear):
            parts.append("1x1")
        elif isinstance(leaf, AvgPool):
            parts.append("avg pool")
    return "-".join(parts) or "identity"


def _sum_of(tree: Node) -> tuple[tuple[Node, ...], Callable[[tuple[Node, ...]], Node]]:
    """Return the branches of the tree's outer sum, and how to rebuild the tree with others.

    The sum is the tree itself or a step of it (QARepVGG: the sum, then a
    BatchNorm); a tree without a sum is one branch.
    """
    if isinstance(tree, Parallel):
        return tree.branches, lambda branches: Parallel(*branches, name=tree.name)
    steps = tree.steps if isinstance(tree, Sequential) else ()
    index = next((i for i, step in enumerate(steps) if isinstance(step, Parallel)), None)
    total = None if index is None else steps[index]
    if index is None or not isinstance(total, Parallel):
        return (tree,), lambda branches: branches[0]
    before, after = steps[:index], steps[index + 1 :]

    def rebuild(branches: tuple[Node, ...]) -> Node:
        summed = Parallel(*branches, name=total.name)
        return Sequential(*before, summed, *after, name=getattr(tree, "name", ""))

    return total.branches, rebuild


def _attribution(tree: Node, kernel: FloatArray) -> tuple[tuple[str, ...], Float64Array]:
    """Each branch's label and its share of each output channel's range in ``kernel``."""
    out_channels = kernel.shape[0]
    nothing: tuple[tuple[str, ...], Float64Array] = ((), np.zeros((out_channels, 0)))
    branches, rebuild = _sum_of(tree)
    channels = next((b.out_channels for b in branches if b.out_channels is not None), None)
    if channels is None:
        return nothing
    labels: list[str] = []
    placed: list[Float64Array] = []
    for index, branch in enumerate(branches):
        alone = [
            other if j == index else Sequential(other, Scale(0.0, channels=channels))
            for j, other in enumerate(branches)
        ]
        try:
            folded = fold(rebuild(tuple(alone)))
        except ReparamError:
            return nothing
        if folded.kernel.shape != kernel.shape:
            return nothing
        label = branch_label(branch)
        while label in labels:
            label += "'"
        labels.append(label)
        placed.append(folded.kernel.astype(np.float64).reshape(out_channels, -1))
    fused = kernel.astype(np.float64).reshape(out_channels, -1)
    taps = np.argmax(np.abs(fused), axis=1)
    rows = np.arange(out_channels)
    at_max = np.abs(np.stack([flat[rows, taps] for flat in placed], axis=1))  # (C_out, B)
    total = at_max.sum(axis=1, keepdims=True)
    shares = np.divide(at_max, total, out=np.zeros_like(at_max), where=total > 0)
    return tuple(labels), shares


def _weight_sqnr(weight: FloatArray, *, per_channel: bool) -> float:
    scale = weight_scale(weight, per_channel=per_channel)
    restored = quantize_weight(weight, scale).astype(np.float64) * per_row(
        scale.astype(np.float64), weight.ndim
    )
    return sqnr_db(weight, restored)


def _kurtosis(values: FloatArray) -> float:
    centred = values.astype(np.float64).ravel() - float(np.mean(values, dtype=np.float64))
    variance = float(np.mean(centred**2))
    if variance == 0.0:
        return math.nan
    return float(np.mean(centred**4)) / variance**2 - 3.0


def _stats(name: str, weight: FloatArray, tree: Node | None, position: int) -> WeightStats:
    channel_max = np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).max(axis=1)
    median = float(np.median(channel_max))
    spread = float(channel_max.max()) / median if median > 0 else math.inf
    branches: tuple[str, ...] = ()
    shares = np.zeros((weight.shape[0], 0))
    if tree is not None:
        branches, shares = _attribution(tree, weight)
    return WeightStats(
        name,
        tuple(int(n) for n in weight.shape),
        channel_max,
        spread,
        _kurtosis(weight),
        _weight_sqnr(weight, per_channel=False),
        _weight_sqnr(weight, per_channel=True),
        branches,
        shares,
        int(np.argmax(channel_max)),
        position,
    )


def chain_stats(chain: Chain) -> tuple[WeightStats, ...]:
    """:func:`weight_stats` of a checked chain: its convs, then the head."""
    found = [
        _stats(item.shown, item.conv.kernel, item.tree, position)
        for position, item in enumerate(chain.convs)
    ]
    found.append(_stats("head", chain.head_weight, None, len(found)))
    return tuple(found)


def weight_stats(model: Quantizable) -> tuple[WeightStats, ...]:
    """Statistics of every fused kernel (the blocks, then the head), as exported in float32.

    Parameters
    ----------
    model : RepVGG, Network, Graph or Chain
        A train form (or a Network with trees) also gives each channel's
        branch attribution.

    Returns
    -------
    tuple of WeightStats

    Raises
    ------
    ReparamError
        If ``model`` is not a network the analysis reads, or holds non-finite values.

    Examples
    --------
    >>> import numpy as np, reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> stats = weight_stats(reparam.RepVGG.create(tiny, num_classes=3))
    >>> [(s.name, s.branches) for s in stats]  # doctest: +NORMALIZE_WHITESPACE
    [('stage0', ('3x3', '1x1')), ('stage1.0', ('3x3', '1x1')),
     ('stage1.1', ('3x3', '1x1', 'identity')), ('head', ())]
    >>> bool(np.allclose(stats[2].shares.sum(axis=1), 1.0))
    True
    """
    return chain_stats(chain_of(model, func="weight_stats"))
