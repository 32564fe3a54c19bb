"""RepVGG as a NumPy model, in its train form and its deploy form.

A model is an immutable :class:`RepVGG` holding named blocks (``"stage0"``,
``"stage3.7"``), a linear head, its form (``"train"`` or ``"deploy"``), the
architecture name when it is a published one, the checkpoint layout it came
from and its dtype. Converting returns a new model; nothing is mutated.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from ..core.algebra import Parallel, evaluate, fold, num_parameters
from ..core.checks import FloatArray, as_float_array, positive_int
from ..core.conv import conv2d, conv_output_size
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

__all__ = ["Block", "DeployBlock", "Head", "RepVGG", "TrainBlock"]

Layout: TypeAlias = Literal["official", "timm"]
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- blocks


def _frozen(value: Any, *, func: str, name: str, ndim: int) -> FloatArray:
    """Return a read-only array: kept as is when already read-only, otherwise copied."""
    array = as_float_array(value, func=func, name=name, ndim=ndim)
    if array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
        array.setflags(write=False)
    return array


def _check_kernel(kernel: FloatArray, *, func: str, name: str) -> None:
    height, width = kernel.shape[2:]
    if height != width or height % 2 == 0:
        raise ReparamError(
            f"{func}: {name} must be square with an odd size; got {height}x{width}, expected "
            "KxK with K odd (e.g. 3x3)"
        )


def _check_stride_groups(stride: Any, groups: Any, out_channels: int, *, func: str) -> None:
    positive_int(stride, func=func, name="stride")
    positive_int(groups, func=func, name="groups")
    if out_channels % groups:
        raise ReparamError(
            f"{func}: groups={groups} does not divide C_out={out_channels}; expected a divisor"
        )


@dataclass(frozen=True, eq=False)
class TrainBlock:
    """One train-form block: ``relu(bn_d(conv3x3(x)) + bn_p(conv1x1(x)) + bn_i(x))``.

    Attributes
    ----------
    dense_kernel : ndarray, shape (C_out, C_in // groups, K, K)
        The 3x3 (K odd) convolution, used with padding ``K // 2``.
    dense_bn : BatchNorm
        Its BatchNorm over ``C_out``.
    pointwise_kernel : ndarray, shape (C_out, C_in // groups, k, k'), or None
        The small branch (1x1 in RepVGG; any odd sizes up to K, centred as
        :func:`reparam.fuse_block` centres it), if the block has one.
    pointwise_bn : BatchNorm or None
        Its BatchNorm (given exactly when ``pointwise_kernel`` is).
    identity_bn : BatchNorm or None
        The identity branch; only when ``C_in == C_out`` and ``stride == 1``.
    stride : int
        Stride of both convolutions.
    groups : int
        Groups of both convolutions.

    Raises
    ------
    ReparamError
        On malformed arrays or branches that do not fit together.
    """

    dense_kernel: FloatArray
    dense_bn: BatchNorm
    pointwise_kernel: FloatArray | None = None
    pointwise_bn: BatchNorm | None = None
    identity_bn: BatchNorm | None = None
    stride: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        func = "TrainBlock"
        dense = _frozen(self.dense_kernel, func=func, name="dense_kernel", ndim=4)
        _check_kernel(dense, func=func, name="dense_kernel")
        out_channels, per_group = dense.shape[:2]
        _check_stride_groups(self.stride, self.groups, out_channels, func=func)
        object.__setattr__(self, "dense_kernel", dense)
        object.__setattr__(self, "stride", int(self.stride))
        object.__setattr__(self, "groups", int(self.groups))
        if (self.pointwise_kernel is None) != (self.pointwise_bn is None):
            raise ReparamError(
                f"{func}: pointwise_kernel and pointwise_bn go together; got only one of them"
            )
        if self.pointwise_kernel is not None:
            pointwise = _frozen(self.pointwise_kernel, func=func, name="pointwise_kernel", ndim=4)
            small_h, small_w = pointwise.shape[2:]
            size = dense.shape[2]
            if (
                pointwise.shape[:2] != (out_channels, per_group)
                or small_h > size
                or small_w > size
                or small_h % 2 == 0
                or small_w % 2 == 0
            ):
                raise ReparamError(
                    f"{func}: pointwise_kernel disagrees with dense_kernel {dense.shape}; got "
                    f"{pointwise.shape}, expected {(out_channels, per_group)} and odd sizes of at "
                    f"most {size}x{size} (1x1 in RepVGG), as fuse_block accepts"
                )
            object.__setattr__(self, "pointwise_kernel", pointwise)
        for name in ("dense_bn", "pointwise_bn", "identity_bn"):
            bn = getattr(self, name)
            if bn is not None and (not isinstance(bn, BatchNorm) or bn.channels != out_channels):
                got = f"{bn.channels} channels" if isinstance(bn, BatchNorm) else type(bn).__name__
                raise ReparamError(
                    f"{func}: {name} must be a BatchNorm over C_out={out_channels}; got {got}"
                )
        if self.identity_bn is not None and not self.spec.has_identity:
            raise ReparamError(
                f"{func}: an identity branch needs C_in == C_out and stride 1; got C_in="
                f"{self.spec.in_channels}, C_out={out_channels}, stride {self.stride}"
            )

    @property
    def spec(self) -> BlockSpec:
        """Channels, stride and groups of this block."""
        out_channels, per_group = self.dense_kernel.shape[:2]
        return BlockSpec(per_group * self.groups, out_channels, self.stride, self.groups)

    @property
    def arrays(self) -> tuple[FloatArray, ...]:
        """Every array of the block, running statistics included."""
        found: list[FloatArray] = [self.dense_kernel]
        if self.pointwise_kernel is not None:
            found.append(self.pointwise_kernel)
        for bn in (self.dense_bn, self.pointwise_bn, self.identity_bn):
            if bn is not None:
                found += [bn.gamma, bn.beta, bn.mean, bn.var]
        return tuple(found)

    @property
    def num_parameters(self) -> int:
        """Kernel sizes plus BatchNorm gamma and beta (running statistics excluded)."""
        return num_parameters(self.tree)

    @functools.cached_property
    def tree(self) -> Parallel:
        """The block's branches as a tree of the algebra (:func:`reparam.core.fusion.repvgg_tree`).

        Evaluating it runs the train form before the ReLU; folding it is the
        deploy form. It is the one representation the block's computations walk.
        """
        pointwise = None
        if self.pointwise_kernel is not None and self.pointwise_bn is not None:
            pointwise = (self.pointwise_kernel, self.pointwise_bn)
        return repvgg_tree(
            (self.dense_kernel, self.dense_bn),
            pointwise,
            self.identity_bn,
            stride=self.stride,
            groups=self.groups,
        )

    def __call__(self, x: FloatArray) -> FloatArray:
        """Apply the block to ``x`` of shape (N, C_in, H, W): ``relu`` of the branches' sum."""
        out = evaluate(self.tree, x)
        return np.maximum(out, 0, out=out)

    def reparameterize(self) -> DeployBlock:
        """Fuse the branches into one convolution: :func:`reparam.core.algebra.fold` of the tree."""
        kernel, bias = fold(self.tree)
        kernel.setflags(write=False)
        bias.setflags(write=False)
        return DeployBlock(kernel, bias, self.stride, self.groups)

    def astype(self, dtype: npt.DTypeLike) -> TrainBlock:
        """Return a copy with every array in ``dtype``."""
        return TrainBlock(
            self.dense_kernel.astype(dtype),
            self.dense_bn.astype(dtype),
            None if self.pointwise_kernel is None else self.pointwise_kernel.astype(dtype),
            None if self.pointwise_bn is None else self.pointwise_bn.astype(dtype),
            None if self.identity_bn is None else self.identity_bn.astype(dtype),
            self.stride,
            self.groups,
        )


@dataclass(frozen=True, eq=False)
class DeployBlock:
    """One deploy-form block: ``relu(conv3x3(x) + bias)`` with padding ``K // 2``.

    Attributes
    ----------
    kernel : ndarray, shape (C_out, C_in // groups, K, K)
        The fused kernel (K odd, 3 in RepVGG).
    bias : ndarray, shape (C_out,)
        The fused bias.
    stride : int
        Convolution stride.
    groups : int
        Convolution groups.

    Raises
    ------
    ReparamError
        On malformed arrays.
    """

    kernel: FloatArray
    bias: FloatArray
    stride: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        func = "DeployBlock"
        kernel = _frozen(self.kernel, func=func, name="kernel", ndim=4)
        _check_kernel(kernel, func=func, name="kernel")
        bias = _frozen(self.bias, func=func, name="bias", ndim=1)
        if bias.shape != kernel.shape[:1]:
            raise ReparamError(
                f"{func}: bias has the wrong length; got {bias.shape[0]}, expected "
                f"{kernel.shape[0]} (kernel.shape[0])"
            )
        _check_stride_groups(self.stride, self.groups, kernel.shape[0], func=func)
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "stride", int(self.stride))
        object.__setattr__(self, "groups", int(self.groups))

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

    def __call__(self, x: FloatArray) -> FloatArray:
        """Apply the block to ``x`` of shape (N, C_in, H, W)."""
        padding = self.kernel.shape[2] // 2
        out = conv2d(
            x, self.kernel, self.bias, stride=self.stride, padding=padding, groups=self.groups
        )
        return np.maximum(out, 0, out=out)

    def reparameterize(self) -> DeployBlock:
        """Return this block: a deploy block is already fused."""
        return self

    def astype(self, dtype: npt.DTypeLike) -> DeployBlock:
        """Return a copy with every array in ``dtype``."""
        return DeployBlock(
            self.kernel.astype(dtype), self.bias.astype(dtype), self.stride, self.groups
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
    return ReparamError(f"{name} (stride {block.stride}, groups {block.groups}): {exc}")


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


def _random_block(rng: np.random.Generator, spec: BlockSpec, dtype: np.dtype[Any]) -> TrainBlock:
    per_group = spec.in_channels // spec.groups
    return TrainBlock(
        _he_normal(rng, (spec.out_channels, per_group, 3, 3), per_group * 9, dtype),
        _random_bn(rng, spec.out_channels, dtype),
        _he_normal(rng, (spec.out_channels, per_group, 1, 1), per_group, dtype),
        _random_bn(rng, spec.out_channels, dtype),
        _random_bn(rng, spec.out_channels, dtype) if spec.has_identity else None,
        spec.stride,
        spec.groups,
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
    layout : {"official", "timm"}, default "official"
        The checkpoint key layout :meth:`save` writes.

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
        if self.layout not in ("official", "timm"):
            raise ReparamError(f"{func}: layout must be 'official' or 'timm'; got {self.layout!r}")
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
            what its deploy form will cost (same kernel shapes as the 3x3
            branch).

        Returns
        -------
        int
        """
        func = "RepVGG.multiply_adds"
        height = positive_int(height, func=func, name="height")
        width = positive_int(width, func=func, name="width")
        form = self.form if form is None else form
        if form == "train" and self.form == "deploy":
            raise ReparamError(f"{func}: a deploy model has no train form to count")
        total = 0
        for _, block in self.blocks:
            kernel = block.kernel if isinstance(block, DeployBlock) else block.dense_kernel
            size = kernel.shape[2]
            height = conv_output_size(
                height, size, stride=block.stride, padding=size // 2, dilation=1
            )
            width = conv_output_size(
                width, size, stride=block.stride, padding=size // 2, dilation=1
            )
            taps = kernel.size
            if (
                form == "train"
                and isinstance(block, TrainBlock)
                and block.pointwise_kernel is not None
            ):
                taps += block.pointwise_kernel.size
            total += taps * height * width
        return total + self.head.weight.size

    # ---- computation

    @functools.cached_property
    def _fast_stack(self) -> DeployStack | None:
        """The fast deploy path, built on first use; None where it does not apply."""
        blocks = [block for _, block in self.blocks]
        if not all(
            isinstance(block, DeployBlock)
            and block.kernel.shape[2:] == (3, 3)
            and block.stride in (1, 2)
            for block in blocks
        ):
            return None
        from ..engine.stack import DeployStack  # the engine loads on first fast call

        return DeployStack(blocks)

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
