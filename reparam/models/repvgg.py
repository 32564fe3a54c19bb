"""RepVGG-style networks in NumPy: a chain of blocks, each a tree of the branch algebra, or folded.

A model is an immutable :class:`RepVGG` holding named blocks (``"stage0"``,
``"stage3.7"``), a linear head, the architecture name when it is a published
one, the checkpoint layout it came from and its dtype. A train-form block
(:class:`TrainBlock`) is a tree of :mod:`reparam.core.algebra` (the branches
of a published block family: RepVGG's ``RepVGGBlock``, YOLOv6's
``QARepVGGBlock``) followed by a ReLU; running it, counting it, folding it,
casting it and initialising it at random all walk that tree. A deploy-form
block (:class:`DeployBlock`) is the one convolution the tree folds into, with
its stride, groups and padding. Converting returns a new model; nothing is
mutated.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from ..core.algebra import (
    Conv,
    Linear,
    Node,
    Norm,
    Parallel,
    Sequential,
    evaluate,
    fold,
    multiply_adds,
    num_parameters,
    output_size,
)
from ..core.checks import FloatArray, as_float_array, positive_int
from ..core.conv import centred_padding, conv2d, conv_output_size
from ..core.errors import ReparamError
from ..core.fusion import repvgg_tree
from ..core.params import BatchNorm
from .architectures import (
    Architecture,
    BlockSpec,
    Form,
    NamedSpecs,
    block_specs,
    canonical_architecture,
    match_architecture,
)

if TYPE_CHECKING:
    from ..engine.stack import DeployStack

__all__ = ["Block", "DeployBlock", "Head", "RepVGG", "TrainBlock", "tree_leaves"]

#: The name of a registered network layout (:data:`reparam.checkpoints.layouts.NETWORK_LAYOUTS`).
Layout: TypeAlias = str
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: The published ``RepVGGBlock`` and its branches' module names (DingXiaoH/RepVGG).
REPVGG_BLOCK = "RepVGGBlock"
_BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")
#: The published architectures' kernel sizes: 3x3 dense, 1x1 pointwise.
_KERNEL_SIZES = (3, 1)


# --------------------------------------------------------------------------- trees


def tree_leaves(node: Node) -> Iterator[Node]:
    """Iterate over the leaves of a tree, first branch (first step) first."""
    if isinstance(node, Parallel):
        for branch in node.branches:
            yield from tree_leaves(branch)
    elif isinstance(node, Sequential):
        for step in node.steps:
            yield from tree_leaves(step)
    else:
        yield node


def _map_leaves(node: Node, change: Callable[[Node], Node]) -> Node:
    """Return the tree with every leaf replaced by ``change(leaf)`` (in ``tree_leaves`` order)."""
    if isinstance(node, Parallel):
        return Parallel(*(_map_leaves(branch, change) for branch in node.branches), name=node.name)
    if isinstance(node, Sequential):
        return Sequential(*(_map_leaves(step, change) for step in node.steps), name=node.name)
    return change(node)


def _with_arrays(leaf: Conv, kernel: FloatArray, bias: FloatArray | None) -> Conv:
    """Return ``leaf`` with other arrays, the same geometry and name."""
    return Conv(
        kernel,
        bias,
        stride=leaf.stride,
        padding=leaf.padding,
        groups=leaf.groups,
        dilation=leaf.dilation,
        name=leaf.name,
    )


def _cast(leaf: Node, dtype: np.dtype[Any]) -> Node:
    if isinstance(leaf, Conv):
        bias = None if leaf.bias is None else leaf.bias.astype(dtype)
        return _with_arrays(leaf, leaf.kernel.astype(dtype), bias)
    if isinstance(leaf, Norm):
        return Norm(leaf.bn.astype(dtype), name=leaf.name)
    if _leaf_arrays(leaf):
        raise ReparamError(f"astype: cannot cast a {type(leaf).__name__} leaf of a network block")
    return leaf


def _leaf_arrays(leaf: Node) -> list[FloatArray]:
    if isinstance(leaf, Conv):
        return [leaf.kernel] + ([] if leaf.bias is None else [leaf.bias])
    if isinstance(leaf, Linear):
        return [leaf.weight] + ([] if leaf.bias is None else [leaf.bias])
    if isinstance(leaf, Norm):
        return [leaf.bn.gamma, leaf.bn.beta, leaf.bn.mean, leaf.bn.var]
    return [value for value in vars(leaf).values() if isinstance(value, np.ndarray)]


# --------------------------------------------------------------------------- blocks


def _frozen(value: Any, *, func: str, name: str, ndim: int) -> FloatArray:
    """Return a read-only array: kept as is when already read-only, otherwise copied."""
    array = as_float_array(value, func=func, name=name, ndim=ndim)
    if array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
        array.setflags(write=False)
    return array


def _check_stride_groups(stride: Any, groups: Any, out_channels: int, *, func: str) -> None:
    positive_int(stride, func=func, name="stride")
    positive_int(groups, func=func, name="groups")
    if out_channels % groups:
        raise ReparamError(
            f"{func}: groups={groups} does not divide C_out={out_channels}; expected a divisor"
        )


@dataclass(frozen=True, eq=False, init=False)
class TrainBlock:
    """One train-form block: ``relu(tree(x))``, the tree being a published family's branches.

    ``TrainBlock(dense_kernel, dense_bn, pointwise_kernel, pointwise_bn,
    identity_bn, stride, groups)`` builds RepVGG's block,
    ``relu(bn_d(conv_KxK(x)) + bn_p(conv_1x1(x)) + bn_i(x))``, as the tree of
    :func:`reparam.core.fusion.repvgg_tree` with the published module names
    (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``); :meth:`from_tree` takes any
    family's tree (a checkpoint reader's, e.g. YOLOv6's ``QARepVGGBlock``).

    Parameters
    ----------
    dense_kernel : array_like, shape (C_out, C_in // groups, K, K)
        The KxK convolution (3x3 in RepVGG), padded by ``K // 2``.
    dense_bn : BatchNorm
        Its BatchNorm over ``C_out``.
    pointwise_kernel : array_like, shape (C_out, C_in // groups, k, k'), optional
        The small branch (1x1 in RepVGG; any odd sizes up to K, centred as
        :func:`reparam.fuse_block` centres it).
    pointwise_bn : BatchNorm, optional
        Its BatchNorm (given exactly when ``pointwise_kernel`` is).
    identity_bn : BatchNorm, optional
        The identity branch; only when ``C_in == C_out`` and ``stride == 1``.
    stride : int, default 1
        Stride of both convolutions.
    groups : int, default 1
        Groups of both convolutions.

    Attributes
    ----------
    tree : Node
        The branches (before the ReLU): what running, folding and counting walk.
    stride, groups : int
        Of the block's convolutions (and of the conv it folds into).
    family : str
        The published block class, e.g. ``"RepVGGBlock"`` or ``"QARepVGGBlock"``.

    Raises
    ------
    ReparamError
        On malformed arrays or branches that do not fit together (the
        algebra's checks: channels that differ, outputs of different sizes).
    """

    tree: Node
    stride: int
    groups: int
    family: str

    def __init__(
        self,
        dense_kernel: npt.ArrayLike,
        dense_bn: BatchNorm,
        pointwise_kernel: npt.ArrayLike | None = None,
        pointwise_bn: BatchNorm | None = None,
        identity_bn: BatchNorm | None = None,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        func = "TrainBlock"
        if (pointwise_kernel is None) != (pointwise_bn is None):
            raise ReparamError(
                f"{func}: pointwise_kernel and pointwise_bn go together; got only one of them"
            )
        stride = positive_int(stride, func=func, name="stride")
        groups = positive_int(groups, func=func, name="groups")
        pointwise = None
        if pointwise_kernel is not None and pointwise_bn is not None:
            pointwise = (pointwise_kernel, pointwise_bn)
        try:
            tree = repvgg_tree(
                (dense_kernel, dense_bn),
                pointwise,
                identity_bn,
                stride=stride,
                groups=groups,
                names=_BRANCHES,
                name=REPVGG_BLOCK,
            )
        except ReparamError as exc:
            raise exc.located(func) from None
        self._set(tree, stride, groups, REPVGG_BLOCK, func=func)

    @classmethod
    def from_tree(cls, tree: Node, *, stride: int, groups: int, family: str) -> TrainBlock:
        """Make a block of any family's tree (e.g. :attr:`reparam.families.FamilyBlock.tree`).

        Parameters
        ----------
        tree : Node
            The branches before the block's ReLU.
        stride, groups : int
            The block's (its published constructor's arguments).
        family : str
            The published block class.

        Raises
        ------
        ReparamError
            If ``tree`` is not a tree of the algebra or its branches disagree.
        """
        block = cls.__new__(cls)
        block._set(tree, stride, groups, family, func="TrainBlock.from_tree")
        return block

    def _set(self, tree: Node, stride: int, groups: int, family: str, *, func: str) -> None:
        try:  # the algebra checks that the branches agree: walk the tree on a small input
            extent = max(
                (
                    max(leaf.kernel.shape[2:])
                    for leaf in tree_leaves(tree)
                    if isinstance(leaf, Conv)
                ),
                default=1,
            )
            output_size(tree, 2 * extent, 2 * extent)
        except ReparamError as exc:
            raise exc.located(func) from None
        object.__setattr__(self, "tree", tree)
        object.__setattr__(self, "stride", positive_int(stride, func=func, name="stride"))
        object.__setattr__(self, "groups", positive_int(groups, func=func, name="groups"))
        object.__setattr__(self, "family", str(family))

    # ---- the published RepVGGBlock's branches, by their module names

    @functools.cached_property
    def _named(self) -> dict[str, Node]:
        return {leaf.name: leaf for leaf in tree_leaves(self.tree) if getattr(leaf, "name", "")}

    def _conv(self, *names: str) -> FloatArray | None:
        leaf = next((self._named[name] for name in names if name in self._named), None)
        return leaf.kernel if isinstance(leaf, Conv) else None

    def _norm(self, name: str) -> BatchNorm | None:
        leaf = self._named.get(name)
        return leaf.bn if isinstance(leaf, Norm) else None

    @property
    def dense_kernel(self) -> FloatArray:
        """The KxK kernel (``rbr_dense.conv``), shape (C_out, C_in // groups, K, K)."""
        kernel = self._conv(f"{_BRANCHES[0]}.conv")
        if kernel is None:
            raise ReparamError(f"TrainBlock: a {self.family} has no {_BRANCHES[0]}.conv branch")
        return kernel

    @property
    def dense_bn(self) -> BatchNorm:
        """The KxK branch's BatchNorm (``rbr_dense.bn``)."""
        bn = self._norm(f"{_BRANCHES[0]}.bn")
        if bn is None:
            raise ReparamError(f"TrainBlock: a {self.family} has no {_BRANCHES[0]}.bn branch")
        return bn

    @property
    def pointwise_kernel(self) -> FloatArray | None:
        """The small branch's kernel (``rbr_1x1``), or None."""
        return self._conv(f"{_BRANCHES[1]}.conv", _BRANCHES[1])

    @property
    def pointwise_bn(self) -> BatchNorm | None:
        """The small branch's BatchNorm (``rbr_1x1.bn``), or None (QARepVGG's has none)."""
        return self._norm(f"{_BRANCHES[1]}.bn")

    @property
    def identity_bn(self) -> BatchNorm | None:
        """The identity branch's BatchNorm (``rbr_identity``), or None."""
        return self._norm(_BRANCHES[2])

    # ---- what every consumer walks

    @property
    def spec(self) -> BlockSpec:
        """Channels, stride and groups of this block."""
        in_channels, out_channels = self.tree.in_channels, self.tree.out_channels
        if in_channels is None or out_channels is None:  # pragma: no cover - a family's tree
            raise ReparamError(f"TrainBlock: the {self.family} tree does not fix its channels")
        return BlockSpec(in_channels, out_channels, self.stride, self.groups)

    @property
    def arrays(self) -> tuple[FloatArray, ...]:
        """Every array of the tree, leaf by leaf, running statistics included."""
        return tuple(array for leaf in tree_leaves(self.tree) for array in _leaf_arrays(leaf))

    @property
    def num_parameters(self) -> int:
        """Kernels, biases, BatchNorm gamma and beta (the algebra's ``num_parameters``)."""
        return num_parameters(self.tree)

    def multiply_adds(self, height: int, width: int) -> int:
        """Train-form multiply-adds for one ``height x width`` input (the algebra's count)."""
        return multiply_adds(self.tree, height, width)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the output's ``(height, width)`` for an input of ``height x width``."""
        return output_size(self.tree, height, width)

    def __call__(self, x: FloatArray) -> FloatArray:
        """Apply the block to ``x`` of shape (N, C_in, H, W): ``relu`` of the tree."""
        out = evaluate(self.tree, x)
        return np.maximum(out, 0, out=out)

    def reparameterize(self) -> DeployBlock:
        """Fold the tree into one convolution: :func:`reparam.core.algebra.fold`."""
        conv = fold(self.tree)
        (stride, stride_w), (padding, padding_w) = conv.stride, conv.padding
        if (stride, padding) != (stride_w, padding_w):
            raise ReparamError(
                f"TrainBlock.reparameterize: the {self.family} folds into a conv with stride "
                f"{conv.stride} and padding {conv.padding}; expected one value per axis"
            )
        kernel, bias = conv
        kernel.setflags(write=False)
        bias.setflags(write=False)
        return DeployBlock(kernel, bias, stride, conv.groups, padding)

    def astype(self, dtype: npt.DTypeLike) -> TrainBlock:
        """Return a copy with every array in ``dtype``."""
        resolved: np.dtype[Any] = np.dtype(dtype)
        tree = _map_leaves(self.tree, lambda leaf: _cast(leaf, resolved))
        return TrainBlock.from_tree(
            tree, stride=self.stride, groups=self.groups, family=self.family
        )

    def __repr__(self) -> str:
        spec = self.spec
        return (
            f"TrainBlock({self.family}, {spec.in_channels} -> {spec.out_channels}, "
            f"stride={self.stride}, groups={self.groups})"
        )


@dataclass(frozen=True, eq=False)
class DeployBlock:
    """One deploy-form block: ``relu(conv(x, kernel, stride, padding, groups) + bias)``.

    Attributes
    ----------
    kernel : ndarray, shape (C_out, C_in // groups, K, K)
        The fused kernel (3x3 in RepVGG).
    bias : ndarray, shape (C_out,)
        The fused bias.
    stride : int
        Convolution stride.
    groups : int
        Convolution groups.
    padding : int, optional
        Zero padding on every side; by default the centred padding ``K // 2``
        (:func:`reparam.core.conv.centred_padding`, then ``K`` must be odd),
        which is what a RepVGG block folds into.

    Raises
    ------
    ReparamError
        On malformed arrays.
    """

    kernel: FloatArray
    bias: FloatArray
    stride: int = 1
    groups: int = 1
    padding: int = None  # type: ignore[assignment]  # resolved in __post_init__

    def __post_init__(self) -> None:
        func = "DeployBlock"
        kernel = _frozen(self.kernel, func=func, name="kernel", ndim=4)
        bias = _frozen(self.bias, func=func, name="bias", ndim=1)
        if bias.shape != kernel.shape[:1]:
            raise ReparamError(
                f"{func}: bias has the wrong length; got {bias.shape[0]}, expected "
                f"{kernel.shape[0]} (kernel.shape[0])"
            )
        _check_stride_groups(self.stride, self.groups, kernel.shape[0], func=func)
        if self.padding is None:
            height, width = kernel.shape[2:]
            if height != width or height % 2 == 0:
                raise ReparamError(
                    f"{func}: kernel must be square with an odd size to be centred; got "
                    f"{height}x{width}, expected KxK with K odd (e.g. 3x3), or give padding="
                )
            padding = centred_padding(height)
        elif (
            isinstance(self.padding, (bool, np.bool_))
            or not isinstance(self.padding, (int, np.integer))
            or self.padding < 0
        ):
            raise ReparamError(f"{func}: padding must be an integer >= 0; got {self.padding!r}")
        else:
            padding = int(self.padding)
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "stride", int(self.stride))
        object.__setattr__(self, "groups", int(self.groups))
        object.__setattr__(self, "padding", padding)

    @property
    def spec(self) -> BlockSpec:
        """Channels, stride and groups of this block."""
        out_channels, per_group = self.kernel.shape[:2]
        return BlockSpec(per_group * self.groups, out_channels, self.stride, self.groups)

    @property
    def arrays(self) -> tuple[FloatArray, ...]:
        """The kernel and the bias."""
        return (self.kernel, self.bias)

    @property
    def num_parameters(self) -> int:
        """Kernel size plus bias size."""
        return int(self.kernel.size + self.bias.size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Return the output's ``(height, width)`` for an input of ``height x width``."""
        size_h, size_w = self.kernel.shape[2:]
        return (
            conv_output_size(height, size_h, stride=self.stride, padding=self.padding),
            conv_output_size(width, size_w, stride=self.stride, padding=self.padding),
        )

    def multiply_adds(self, height: int, width: int) -> int:
        """Multiply-adds of the convolution for one ``height x width`` input."""
        out_h, out_w = self.output_size(height, width)
        return int(self.kernel.size * out_h * out_w)

    def __call__(self, x: FloatArray) -> FloatArray:
        """Apply the block to ``x`` of shape (N, C_in, H, W)."""
        out = conv2d(
            x, self.kernel, self.bias, stride=self.stride, padding=self.padding, groups=self.groups
        )
        return np.maximum(out, 0, out=out)

    def reparameterize(self) -> DeployBlock:
        """Return this block: a deploy block is already fused."""
        return self

    def astype(self, dtype: npt.DTypeLike) -> DeployBlock:
        """Return a copy with every array in ``dtype``."""
        return DeployBlock(
            self.kernel.astype(dtype),
            self.bias.astype(dtype),
            self.stride,
            self.groups,
            self.padding,
        )


Block: TypeAlias = TrainBlock | DeployBlock


@dataclass(frozen=True, eq=False)
class Head:
    """The classifier after global average pooling: ``logits = features @ weight.T + bias``.

    Attributes
    ----------
    weight : ndarray, shape (num_classes, C)
    bias : ndarray, shape (num_classes,)
    """

    weight: FloatArray
    bias: FloatArray

    def __post_init__(self) -> None:
        func = "Head"
        weight = _frozen(self.weight, func=func, name="weight", ndim=2)
        bias = _frozen(self.bias, func=func, name="bias", ndim=1)
        if bias.shape != weight.shape[:1]:
            raise ReparamError(
                f"{func}: bias has the wrong length; got {bias.shape[0]}, expected "
                f"{weight.shape[0]} (weight.shape[0])"
            )
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    def __call__(self, features: FloatArray) -> FloatArray:
        """Logits of shape (N, num_classes) from pooled features of shape (N, C)."""
        logits: FloatArray = features @ self.weight.T + self.bias
        return logits

    def astype(self, dtype: npt.DTypeLike) -> Head:
        """Return a copy in ``dtype``."""
        return Head(self.weight.astype(dtype), self.bias.astype(dtype))


# --------------------------------------------------------------------------- the model


def _located(name: str, block: Block, exc: ReparamError) -> ReparamError:
    """Name the block in its error, once: the model is the boundary."""
    return exc.located(f"{name} (stride {block.stride}, groups {block.groups})")


def _random_bn(rng: np.random.Generator, channels: int, dtype: np.dtype[Any]) -> BatchNorm:
    """Non-trivial inference statistics, so every fold has something to do."""
    return BatchNorm(
        rng.uniform(0.5, 1.5, channels).astype(dtype),  # gamma
        rng.normal(0.0, 0.2, channels).astype(dtype),  # beta
        rng.normal(0.0, 0.2, channels).astype(dtype),  # running mean
        rng.uniform(1.0, 3.0, channels).astype(dtype),  # running var
    )


def _he_normal(
    rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype: np.dtype[Any]
) -> FloatArray:
    """He-normal weights with the variance ``2 / fan_in`` split over two branches.

    A block sums a 3x3 and a 1x1 branch (plus the identity), so each gets half
    of He's variance, ``1 / fan_in``; activations then keep an O(1) scale
    through the 28 blocks of RepVGG-B3 instead of growing by ~1.4x per block.
    """
    kernel = rng.standard_normal(shape, dtype=dtype)
    kernel *= dtype.type(math.sqrt(1.0 / fan_in))
    return kernel


def _randomised(leaf: Node, rng: np.random.Generator, dtype: np.dtype[Any]) -> Node:
    """Return a leaf with random weights (a conv's fan-in from its own kernel)."""
    if isinstance(leaf, Conv):
        fan_in = int(np.prod(leaf.kernel.shape[1:]))
        return _with_arrays(leaf, _he_normal(rng, leaf.kernel.shape, fan_in, dtype), None)
    if isinstance(leaf, Norm):
        return Norm(_random_bn(rng, leaf.bn.channels, dtype), name=leaf.name)
    return leaf


def _random_block(rng: np.random.Generator, spec: BlockSpec, dtype: np.dtype[Any]) -> TrainBlock:
    """Build RepVGG's block for ``spec`` (3x3, 1x1), each leaf of its tree drawn at random."""
    per_group = spec.in_channels // spec.groups
    unit = BatchNorm(*np.ones((4, spec.out_channels), dtype=dtype))
    dense, small = _KERNEL_SIZES
    template = TrainBlock(
        np.zeros((spec.out_channels, per_group, dense, dense), dtype=dtype),
        unit,
        np.zeros((spec.out_channels, per_group, small, small), dtype=dtype),
        unit,
        unit if spec.has_identity else None,
        spec.stride,
        spec.groups,
    )
    tree = _map_leaves(template.tree, lambda leaf: _randomised(leaf, rng, dtype))
    return TrainBlock.from_tree(
        tree, stride=spec.stride, groups=spec.groups, family=template.family
    )


def _model_dtype(dtype: npt.DTypeLike, *, func: str) -> np.dtype[Any]:
    resolved: np.dtype[Any] = np.dtype(dtype)
    if resolved not in SUPPORTED_DTYPES:
        raise ReparamError(f"{func}: dtype must be float32 or float64; got {resolved}")
    return resolved


@dataclass(frozen=True, eq=False)
class RepVGG:
    """A RepVGG network in NumPy, in its train form or its deploy form.

    Parameters
    ----------
    blocks : sequence of (str, TrainBlock) or of (str, DeployBlock)
        Named blocks in order (``"stage0"``, ``"stage1.0"``, ...); all of one
        form, each taking the previous block's output channels.
    head : Head
        The linear classifier over the last block's channels.
    arch : str, optional
        The published architecture name, when known.
    layout : str, default "official"
        The registered network layout :func:`reparam.save` writes
        (``"official"``, ``"timm"``, ``"qarepvgg"``; see
        :data:`reparam.checkpoints.layouts.NETWORK_LAYOUTS`).

    Attributes
    ----------
    form : {"train", "deploy"}
        Derived from the block types.
    dtype : numpy.dtype
        float32 or float64, shared by every array. Inputs are cast to it.

    Raises
    ------
    ReparamError
        On mixed forms, mixed dtypes, or blocks whose channels do not chain.

    Examples
    --------
    >>> import numpy as np
    >>> tiny = Architecture(widths=(4, 8), depths=(1, 2))
    >>> model = RepVGG.create(tiny, num_classes=3, dtype=np.float64)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    >>> deploy = model.reparameterize()
    >>> model.form, deploy.form, model(x).shape
    ('train', 'deploy', (2, 3))
    >>> bool(np.allclose(model(x), deploy(x), rtol=0, atol=1e-12))
    True
    """

    blocks: tuple[tuple[str, Block], ...]
    head: Head
    arch: str | None = None
    layout: Layout = "official"

    def __post_init__(self) -> None:
        func = "RepVGG"
        blocks = tuple((str(name), block) for name, block in self.blocks)
        if not blocks:
            raise ReparamError(f"{func}: a model needs at least one block; got none")
        names = [name for name, _ in blocks]
        if len(set(names)) != len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ReparamError(f"{func}: block names must be unique; got {repeated} repeated")
        kinds = {type(block) for _, block in blocks}
        if not kinds <= {TrainBlock, DeployBlock} or len(kinds) != 1:
            raise ReparamError(
                f"{func}: blocks must all be TrainBlock or all DeployBlock; got "
                + ", ".join(sorted(kind.__name__ for kind in kinds))
            )
        if not isinstance(self.head, Head):
            raise ReparamError(f"{func}: head must be a reparam.Head; got {type(self.head)}")
        if not isinstance(self.layout, str) or not self.layout:
            raise ReparamError(
                f"{func}: layout must be the name of a network layout (e.g. 'official'); got "
                f"{self.layout!r}"
            )
        dtypes = {a.dtype for _, block in blocks for a in block.arrays}
        dtypes |= {self.head.weight.dtype, self.head.bias.dtype}
        if len(dtypes) != 1:
            raise ReparamError(
                f"{func}: every array must share one dtype; got {sorted(map(str, dtypes))} "
                "(hint: convert with model.astype(np.float32))"
            )
        _model_dtype(dtypes.pop(), func=func)
        for (previous, before), (name, block) in itertools.pairwise(blocks):
            if block.spec.in_channels != before.spec.out_channels:
                raise _located(
                    name,
                    block,
                    ReparamError(
                        f"{func}: input channels do not chain; got C_in={block.spec.in_channels}"
                        f", expected {before.spec.out_channels} (the output of {previous})"
                    ),
                )
        features = blocks[-1][1].spec.out_channels
        if self.head.weight.shape[1] != features:
            raise ReparamError(
                f"{func}: head weight has {self.head.weight.shape[1]} inputs; got "
                f"{self.head.weight.shape}, expected (num_classes, {features})"
            )
        object.__setattr__(self, "blocks", blocks)

    # ---- construction

    @classmethod
    def create(
        cls,
        arch: str | Architecture,
        *,
        num_classes: int = 1000,
        seed: int = 0,
        dtype: npt.DTypeLike = np.float32,
        in_channels: int = 3,
    ) -> RepVGG:
        """Build a randomly initialised train-form model.

        Parameters
        ----------
        arch : str or Architecture
            A published name (``"RepVGG-A0"``, ``"A0"``, ...) or a custom
            :class:`Architecture`.
        num_classes : int, default 1000
            Outputs of the head.
        seed : int, default 0
            Seed of ``numpy.random.default_rng``; the same seed gives the
            same model.
        dtype : float32 or float64, default float32
        in_channels : int, default 3
            Channels of the input images.

        Returns
        -------
        RepVGG
            Kernels ~ N(0, 1 / fan_in) (He's variance, halved because two
            convolution branches are summed), so activations and logits stay
            O(1) even in RepVGG-B3; every BatchNorm has gamma in [0.5, 1.5],
            beta and running mean ~ N(0, 0.2), running variance in [1, 3].

        Raises
        ------
        ReparamError
            On an unknown name or a malformed architecture.
        """
        name = canonical_architecture(arch) if isinstance(arch, str) else None
        specs = block_specs(arch, in_channels=in_channels)
        model = cls.from_specs(specs, num_classes=num_classes, seed=seed, dtype=dtype)
        return cls(model.blocks, model.head, arch=name or match_architecture(specs))

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[tuple[str, BlockSpec]],
        *,
        num_classes: int = 1000,
        seed: int = 0,
        dtype: npt.DTypeLike = np.float32,
    ) -> RepVGG:
        """Build a randomly initialised train-form model from any named block specs.

        Parameters
        ----------
        specs : iterable of (str, BlockSpec)
            Named blocks, e.g. from :func:`block_specs` or written by hand.
        num_classes : int, default 1000
        seed : int, default 0
        dtype : float32 or float64, default float32

        Returns
        -------
        RepVGG
            See :meth:`create` for the initialisation.
        """
        func = "RepVGG.from_specs"
        resolved = _model_dtype(dtype, func=func)
        classes = positive_int(num_classes, func=func, name="num_classes")
        rng = np.random.default_rng(seed)
        blocks = tuple((name, _random_block(rng, spec, resolved)) for name, spec in specs)
        if not blocks:
            raise ReparamError(f"{func}: specs is empty; expected at least one block")
        features = blocks[-1][1].spec.out_channels
        head = Head(
            _he_normal(rng, (classes, features), features, resolved),
            rng.normal(0.0, 0.1, classes).astype(resolved),
        )
        return cls(blocks, head)

    # ---- properties

    @property
    def form(self) -> Form:
        """``"train"`` (three branches per block) or ``"deploy"`` (one conv per block)."""
        return "train" if isinstance(self.blocks[0][1], TrainBlock) else "deploy"

    @property
    def family(self) -> str | None:
        """The published block class of the train form (``"RepVGGBlock"``, ``"QARepVGGBlock"``).

        None for a deploy form (folded convolutions) or blocks of several families.
        """
        families = {block.family for _, block in self.blocks if isinstance(block, TrainBlock)}
        return families.pop() if len(families) == 1 else None

    @property
    def dtype(self) -> np.dtype[Any]:
        """float32 or float64."""
        return self.head.weight.dtype

    @property
    def specs(self) -> NamedSpecs:
        """Named block specs (channels, stride, groups)."""
        return tuple((name, block.spec) for name, block in self.blocks)

    @property
    def in_channels(self) -> int:
        """Channels the model expects on axis 1 of its input."""
        return self.blocks[0][1].spec.in_channels

    @property
    def num_classes(self) -> int:
        """Outputs of the head."""
        return int(self.head.weight.shape[0])

    @property
    def num_parameters(self) -> int:
        """Weights, biases and BatchNorm gamma and beta of this form (no running statistics)."""
        blocks = sum(block.num_parameters for _, block in self.blocks)
        return blocks + self.head.weight.size + self.head.bias.size

    def multiply_adds(self, height: int, width: int, *, form: Form | None = None) -> int:
        """Multiply-adds of the convolutions and the head for one ``height x width`` image.

        Parameters
        ----------
        height, width : int
            Input size.
        form : {"train", "deploy"}, optional
            The model's own form by default. A train model can also report
            what its deploy form will cost (each block folded to count its
            convolution).

        Returns
        -------
        int
            The train form counts every branch of every tree
            (:func:`reparam.core.algebra.multiply_adds`), the deploy form one
            convolution per block, both plus the head's weights.
        """
        func = "RepVGG.multiply_adds"
        height = positive_int(height, func=func, name="height")
        width = positive_int(width, func=func, name="width")
        form = self.form if form is None else form
        if form == "train" and self.form == "deploy":
            raise ReparamError(f"{func}: a deploy model has no train form to count")
        total = 0
        for name, block in self.blocks:
            try:
                counted = block.reparameterize() if form == "deploy" else block
                total += counted.multiply_adds(height, width)
                height, width = counted.output_size(height, width)
            except ReparamError as exc:
                raise _located(name, block, exc) from None
        return total + self.head.weight.size

    # ---- computation

    @functools.cached_property
    def _fast_stack(self) -> DeployStack | None:
        """The fast deploy path, built on first use; None where the engine does not take it.

        The engine runs centred convolutions (:class:`reparam.engine.DeployStack`
        says which kernels and strides); a block padded otherwise runs on the
        reference path.
        """
        blocks = [block for _, block in self.blocks]
        if not all(
            isinstance(block, DeployBlock)
            and block.padding == centred_padding(block.kernel.shape[2])
            for block in blocks
        ):
            return None
        from ..engine.stack import DeployStack  # the engine loads on first fast call

        try:
            return DeployStack(blocks)
        except ReparamError:  # a layer the engine does not take: the reference path
            return None

    def features(self, x: npt.ArrayLike, *, fast: bool = True) -> FloatArray:
        """Run the blocks and global average pooling.

        Parameters
        ----------
        x : array_like, shape (N, C_in, H, W)
            Floating input, cast to the model's dtype; any ``N``, ``H``, ``W``.
        fast : bool, default True
            Deploy form only: run the blocks on :class:`reparam.engine.DeployStack`
            (activations kept channels-last in reused buffers, Winograd for
            stride-1 layers), which equals the reference within the float32
            tolerance. ``False`` runs the reference :func:`reparam.conv2d`
            block by block. The train form always runs its three branches
            through the reference, as a framework would.

        Returns
        -------
        ndarray, shape (N, C)
            Pooled features of the last block.

        Raises
        ------
        ReparamError
            If ``x`` is not a floating 4-D array with ``C_in`` channels.
        """
        func = "RepVGG"
        inputs = as_float_array(x, func=func, name="x", ndim=4)
        if inputs.shape[1] != self.in_channels:
            raise ReparamError(
                f"{func}: x has {inputs.shape[1]} channels; got shape {inputs.shape}, expected "
                f"(N, {self.in_channels}, H, W)"
            )
        out: FloatArray = inputs.astype(self.dtype, copy=False)  # never written
        stack = self._fast_stack if fast else None
        if stack is not None:
            return stack(out, pool=True)
        for name, block in self.blocks:
            try:
                out = block(out)
            except ReparamError as exc:
                raise _located(name, block, exc) from exc
        pooled: FloatArray = out.mean(axis=(2, 3))
        return pooled

    def __call__(self, x: npt.ArrayLike, *, fast: bool = True) -> FloatArray:
        """Logits of shape (N, num_classes) for ``x`` of shape (N, C_in, H, W).

        The input is cast to the model's dtype (float32 or float64). See
        :meth:`features` for ``fast``.
        """
        stack = self._fast_stack if fast else None
        if stack is None:
            return self.head(self.features(x, fast=fast))
        with stack.blas_scope():  # the head's product too: no BLAS thread left spinning
            return self.head(self.features(x, fast=fast))

    def reparameterize(self) -> RepVGG:
        """Return the deploy form: every block fused into one convolution with bias.

        A deploy model is returned unchanged (it is immutable). Nothing is
        mutated; the head's read-only arrays are shared.

        Raises
        ------
        ReparamError
            Naming the block, e.g. ``"stage3.7 (stride 1, groups 2): ..."``.
        """
        if self.form == "deploy":
            return self
        fused: list[tuple[str, Block]] = []
        for name, block in self.blocks:
            try:
                fused.append((name, block.reparameterize()))
            except ReparamError as exc:
                raise _located(name, block, exc) from exc
        return RepVGG(tuple(fused), self.head, arch=self.arch, layout=self.layout)

    def astype(self, dtype: npt.DTypeLike) -> RepVGG:
        """Return a copy with every array in ``dtype`` (float32 or float64)."""
        resolved = _model_dtype(dtype, func="RepVGG.astype")
        blocks = tuple((name, block.astype(resolved)) for name, block in self.blocks)
        return RepVGG(blocks, self.head.astype(resolved), arch=self.arch, layout=self.layout)

    def __repr__(self) -> str:
        arch = self.arch or "custom"
        return (
            f"RepVGG({arch}, form={self.form}, blocks={len(self.blocks)}, "
            f"classes={self.num_classes}, dtype={self.dtype}, layout={self.layout})"
        )
