"""The network the analysis quantizes: a chain of folded convolutions, each followed by a ReLU.

What a runtime quantizes is the deploy form as ``reparam export`` writes it:
Conv + ReLU per block (each conv float32, folded in the model's precision and
then cast), GlobalAveragePool, and a Gemm head. A :class:`Chain` is exactly
that, plus each block's train form as a tree of the algebra when it is known
(it says which branch makes a channel's range, :mod:`.stats`).

:func:`chain_of` is the one place that reads a network: everything else in
:mod:`reparam.analysis.quant` works on the chain it returns.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from ...checkpoints.layouts import block_prefix
from ...core.algebra import FoldedConv, Node
from ...core.conv import conv2d
from ...core.errors import ReparamError
from ...graph.ir import Graph, Op
from ...models.repvgg import DeployBlock, RepVGG, TrainBlock
from ..networks import Network, as_network
from .scheme import Float64Array

__all__ = ["Chain", "ChainConv", "Quantizable", "chain_of", "in_channels_of"]


class ChainConv(NamedTuple):
    """One folded convolution of a :class:`Chain` (a ReLU follows it).

    Attributes
    ----------
    name : str
        The block's name in the model (``"stage2.1"``), as the exported
        graph names its Conv (``"stage2.1/Conv"``).
    conv : FoldedConv
        float32 kernel, shape (C_out, C_in // groups, kH, kW), and bias, shape
        (C_out,); stride, pads, groups and dilation.
    tree : Node or None
        The block's train form, whose fold is ``conv`` (in the model's
        precision); None when only the deploy form is known.
    shown : str
        How reports name the block: as its checkpoint spells it
        (``"stages.1.1"`` in timm's layout).
    """

    name: str
    conv: FoldedConv
    tree: Node | None
    shown: str


@dataclass(frozen=True, eq=False)
class Chain:
    """A network as the analysis sees it: folded convs with ReLUs, a global pool, a linear head.

    Parameters
    ----------
    convs : tuple of ChainConv
        In order, each taking the previous one's output channels.
    head_weight : ndarray of float32, shape (classes, C)
    head_bias : ndarray of float32, shape (classes,)
    family : str, default "custom"
        Shown in reports (``"RepVGG"``, ``"QARepVGG"``).

    Notes
    -----
    Build one with :func:`chain_of`, which also checks it.
    """

    convs: tuple[ChainConv, ...]
    head_weight: npt.NDArray[np.float32]
    head_bias: npt.NDArray[np.float32]
    family: str = "custom"

    @property
    def names(self) -> tuple[str, ...]:
        """The convs' names, in order."""
        return tuple(item.name for item in self.convs)

    @property
    def in_channels(self) -> int:
        """Channels of the input images."""
        return self.convs[0].conv.in_channels

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(name, weight shape)`` of each conv, then ``("head", (classes, C))``."""
        found = [(item.name, tuple(item.conv.kernel.shape)) for item in self.convs]
        return (*found, ("head", tuple(self.head_weight.shape)))

    @functools.cached_property
    def float64(self) -> tuple[tuple[Float64Array, Float64Array], ...]:
        """Each conv's ``(kernel, bias)``, then the head's ``(weight, bias)``, in float64."""
        pairs = [(item.conv.kernel, item.conv.bias) for item in self.convs]
        pairs.append((self.head_weight, self.head_bias))
        return tuple(
            (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in pairs
        )

    def convolve(
        self, index: int, x: Float64Array, kernel: Float64Array, bias: Float64Array
    ) -> Float64Array:
        """Run conv ``index``'s geometry on ``x`` with ``kernel`` and ``bias`` (no ReLU)."""
        conv = self.convs[index].conv
        out = conv2d(
            x,
            kernel,
            bias,
            stride=conv.stride,
            padding=conv.pads,
            groups=conv.groups,
            dilation=conv.dilation,
        )
        return np.asarray(out, dtype=np.float64)  # float64 in, float64 out: no copy

    def layer(self, index: int, x: Float64Array) -> Float64Array:
        """Run conv ``index`` and its ReLU in float64."""
        kernel, bias = self.float64[index]
        result: Float64Array = np.maximum(self.convolve(index, x, kernel, bias), 0.0)
        return result

    def head(self, pooled: Float64Array) -> Float64Array:
        """Logits from pooled features of shape (N, C), in float64."""
        weight, bias = self.float64[-1]
        logits: Float64Array = pooled @ weight.T + bias
        return logits

    def activations(self, x: npt.NDArray[Any], *, func: str) -> list[Float64Array]:
        """Float64 activations: the input, each conv's output (after ReLU), pooled, logits."""
        out = [np.asarray(x, dtype=np.float64)]
        for index, name in enumerate(self.names):
            try:
                out.append(self.layer(index, out[-1]))
            except ReparamError as exc:
                raise ReparamError(f"{func}: {name}: {exc}") from None
        out.append(out[-1].mean(axis=(2, 3)))
        out.append(self.head(out[-1]))
        return out

    def finish(self, index: int, x: Float64Array) -> Float64Array:
        """Run the float64 network from the output of layer ``index`` (the head last) on."""
        if index == len(self.convs):
            return x
        for later in range(index + 1, len(self.convs)):
            x = self.layer(later, x)
        return self.head(x.mean(axis=(2, 3)))


#: What the analysis takes: a RepVGG (train or deploy form), a Network, a graph, or a Chain.
Quantizable: TypeAlias = RepVGG | Network | Graph | Chain


def _shown(name: str, model: RepVGG) -> str:
    """Spell a block name as its checkpoint does (``stages.1.0`` in timm's layout)."""
    try:
        return block_prefix(name, model.layout)
    except ReparamError:  # a custom name that no layout spells
        return name


def _deploy_conv(block: DeployBlock) -> FoldedConv:
    """Return the deploy block as a float32 folded conv (with the block's own padding)."""
    pad = block.padding
    return FoldedConv(
        block.kernel.astype(np.float32),
        block.bias.astype(np.float32),
        (block.stride, block.stride),
        ((pad, pad), (pad, pad)),
        block.groups,
    )


def _from_network(network: Network) -> Chain:
    """Read a RepVGG model (and the trees a Network adds) into a chain."""
    model = network.model
    trees = dict(network.trees)
    for name, block in model.blocks:
        if isinstance(block, TrainBlock):
            trees.setdefault(name, block.tree)
    deploy = model.reparameterize()  # fused in the model's precision, then cast: as to_onnx
    convs = []
    for name, block in deploy.blocks:
        if not isinstance(block, DeployBlock):  # pragma: no cover - reparameterize() guarantees it
            raise ReparamError(f"{name} is not a deploy block after conversion")
        convs.append(ChainConv(name, _deploy_conv(block), trees.get(name), _shown(name, model)))
    return Chain(
        tuple(convs),
        np.asarray(deploy.head.weight, dtype=np.float32),
        np.asarray(deploy.head.bias, dtype=np.float32),
        network.family,
    )


_GRAPH_SHAPE = (
    "expected a chain of Conv+Relu, then GlobalAveragePool, Flatten and Gemm (as reparam export "
    "writes; a train-form graph is folded first with reparam.graph.fold_graph)"
)


def _from_graph(graph: Graph, *, func: str) -> Chain:
    """Read a folded graph of plain convs (``Conv``, ``Relu``, ..., pool, ``Gemm``) into a chain."""
    consumers = graph.consumers()

    def fail(problem: str) -> ReparamError:
        return ReparamError(f"{func}: the graph {problem}; {_GRAPH_SHAPE}")

    def next_op(tensor: str) -> Op:
        users = consumers.get(tensor, [])
        if len(users) != 1:
            raise fail(f"reads tensor {tensor!r} {len(users)} times")
        return users[0]

    def constant(op: Op, index: int) -> npt.NDArray[Any] | None:
        name = op.inputs[index] if index < len(op.inputs) else ""
        return None if not name else graph.constant(name)

    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise fail(f"has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, not 1 and 1")
    convs: list[ChainConv] = []
    op = next_op(graph.inputs[0])
    while op.kind == "conv":
        kernel, bias = constant(op, 1), constant(op, 2)
        if kernel is None:
            raise fail(f"{op.shown} has no constant kernel")
        if bias is None:
            bias = np.zeros(kernel.shape[0])
        attrs = op.attrs
        conv = FoldedConv(
            kernel.astype(np.float32),
            bias.astype(np.float32),
            attrs["stride"],
            attrs["pads"],
            attrs["groups"],
            attrs["dilation"],
        )
        relu = next_op(op.outputs[0])
        if relu.label != "Relu":
            raise fail(f"has {relu.shown} after {op.shown}, not a Relu")
        name = op.name.removesuffix("/Conv")
        convs.append(ChainConv(name, conv, None, name))
        op = next_op(relu.outputs[0])
    if not convs or op.label != "GlobalAveragePool":
        raise fail(f"has {op.shown} where a Conv or the GlobalAveragePool belongs")
    op = next_op(op.outputs[0])
    if op.label in ("Flatten", "Reshape"):
        op = next_op(op.outputs[0])
    weight, bias = (constant(op, 1), constant(op, 2)) if op.kind == "linear" else (None, None)
    if weight is None or op.outputs[0] not in graph.outputs:
        raise fail(f"has {op.shown} where the Gemm head, the graph's output, belongs")
    if bias is None:
        bias = np.zeros(weight.shape[0])
    return Chain(tuple(convs), weight.astype(np.float32), bias.astype(np.float32), "graph")


def _check(chain: Chain, *, func: str) -> Chain:
    """Refuse a chain that cannot be quantized or does not hold together."""
    if not chain.convs:
        raise ReparamError(f"{func}: the chain has no convolution; expected at least one")
    channels = chain.convs[0].conv.in_channels
    for item in chain.convs:
        conv = item.conv
        if conv.kernel.dtype != np.float32 or conv.bias.dtype != np.float32:
            raise ReparamError(
                f"{func}: {item.name}: the chain's convs are what the exported graph holds; got "
                f"{conv.kernel.dtype} and {conv.bias.dtype}, expected float32"
            )
        if conv.in_channels != channels:
            raise ReparamError(
                f"{func}: {item.name}: input channels do not chain; got C_in={conv.in_channels}, "
                f"expected {channels}"
            )
        bad = int(np.count_nonzero(~np.isfinite(conv.kernel))) + int(
            np.count_nonzero(~np.isfinite(conv.bias))
        )
        if bad:
            raise ReparamError(
                f"{func}: {item.name} cannot be quantized: its fused float32 kernel and bias "
                f"hold {bad} non-finite values"
            )
        channels = conv.out_channels
    weight, bias = chain.head_weight, chain.head_bias
    if weight.ndim != 2 or weight.shape[1] != channels or bias.shape != weight.shape[:1]:
        raise ReparamError(
            f"{func}: the head does not fit; got weight {weight.shape} and bias {bias.shape}, "
            f"expected (classes, {channels}) and (classes,)"
        )
    if weight.dtype != np.float32 or bias.dtype != np.float32:
        raise ReparamError(
            f"{func}: the head is float32 in the exported graph; got {weight.dtype} and "
            f"{bias.dtype}"
        )
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ReparamError(f"{func}: the head cannot be quantized: it holds non-finite values")
    repeated = sorted(name for name, count in Counter(chain.names).items() if count > 1)
    if repeated:
        raise ReparamError(f"{func}: conv names must be unique; got {repeated} repeated")
    return chain


def _network(model: Any, *, func: str) -> Network:
    if isinstance(model, Network):
        return model
    if isinstance(model, RepVGG):
        return as_network(model, func=func)
    raise ReparamError(
        f"{func}: model must be a reparam.RepVGG (train or deploy form), a "
        f"reparam.analysis.Network, a reparam.graph.Graph or a reparam.quant.Chain; got "
        f"{type(model).__name__}"
    )


def chain_of(model: Quantizable, *, func: str = "chain_of") -> Chain:
    """Return the chain of folded convs that ``model`` deploys as, checked.

    Parameters
    ----------
    model : RepVGG, Network, Graph or Chain
        A RepVGG in train form (each block's tree is kept) or deploy form, a
        :class:`~reparam.analysis.Network` (a deploy model and its trees), a
        folded graph of plain convs (:func:`reparam.graph.read_graph` of what
        ``reparam export`` writes, or :func:`reparam.graph.fold_graph` of a
        train-form graph: ``Conv`` + ``Relu`` per block, then
        ``GlobalAveragePool``, ``Flatten``, ``Gemm``; no trees), or a chain
        (checked and returned).
    func : str, default "chain_of"
        What error messages start with.

    Returns
    -------
    Chain
        float32 convs (folded in the model's precision, then cast, as
        ``reparam export`` writes them) and the head.

    Raises
    ------
    ReparamError
        If ``model`` is none of these, a graph is not such a chain (naming the
        op), or a kernel, bias or the head holds non-finite values.

    Examples
    --------
    >>> import reparam
    >>> tiny = reparam.Architecture(widths=(4, 8), depths=(1, 2))
    >>> chain = chain_of(reparam.RepVGG.create(tiny, num_classes=3))
    >>> [(c.name, c.conv.kernel.shape, c.conv.pads) for c in chain.convs][:2]
    [('stage0', (4, 3, 3, 3), ((1, 1), (1, 1))), ('stage1.0', (8, 4, 3, 3), ((1, 1), (1, 1)))]
    >>> chain.family, chain.convs[0].tree is not None
    ('RepVGG', True)
    """
    if isinstance(model, Chain):
        return _check(model, func=func)
    if isinstance(model, Graph):
        return _check(_from_graph(model, func=func), func=func)
    network = _network(model, func=func)
    return _check(_from_network(network), func=func)


def in_channels_of(model: Quantizable, *, func: str = "in_channels_of") -> int:
    """Return the channels of the images ``model`` takes, without folding it.

    Raises
    ------
    ReparamError
        If ``model`` is not a RepVGG, Network, Graph or Chain.
    """
    if isinstance(model, Chain):
        return model.in_channels
    if isinstance(model, Graph):
        return chain_of(model, func=func).in_channels
    return _network(model, func=func).model.in_channels
