"""The branch algebra: a train-form block as a tree of linear maps, and its one-conv fold.

A block is data. Leaves are the maps a train-form block is made of:

- :class:`Conv` (kernel, optional bias, stride, padding per side, groups,
  dilation; a negative padding crops),
- :class:`Linear` (a fully connected layer: a 1x1 convolution applied at every
  pixel, or to ``(N, C)`` features),
- :class:`Norm` (an inference BatchNorm),
- :class:`Scale` (``x * scale + bias`` with a scalar or a per-channel scale,
  negative values included: a layer scale, a negated branch, a constant added),
- :class:`AvgPool` (size, stride, padding, ``count_include_pad``),
- :class:`Identity`,
- :class:`Pad` (padding with a value per channel, as Diverse Branch Block's
  ``BNAndPadLayer`` does),
- :class:`ReLU` (so that trees with a nonlinearity can be evaluated, and
  refused by :func:`fold` with the reason),

and two combinators, :class:`Parallel` (the branches' sum) and
:class:`Sequential` (composition, first step first). One walk of the tree
gives

- :func:`evaluate`: the train form's output, the reference that every fusion
  is proven against;
- :func:`fold`: the single equivalent convolution (:class:`FoldedConv`), or a
  :class:`~reparam.ReparamError` saying exactly why the tree is not one conv;
- :func:`magnitude`: the magnitude of the summed terms, for tolerances;
- :func:`num_parameters` and :func:`multiply_adds`.

The laws :func:`fold` applies, each derived in the docs:

- every leaf is an affine map ``conv(pad(x), W) + b``: a BatchNorm is the
  depthwise 1x1 kernel ``gamma / sqrt(var + eps)`` with bias
  ``beta - mean * gamma / sqrt(var + eps)``, a scale the depthwise 1x1 kernel
  ``scale`` with its bias, an average pool the depthwise ``1 / (kH kW)``
  kernel, the identity the depthwise kernel 1, a linear layer the 1x1 kernel
  ``W[:, :, None, None]``;
- *dilation*: a kernel of ``k`` taps at dilation ``r`` is the undilated kernel
  of ``r (k - 1) + 1`` taps with ``r - 1`` zeros between its taps; branches of
  one dilation whose windows line up on its grid stay dilated, others are
  written out undilated and summed at the centre;
- *parallel*: kernels placed so that their input windows line up (centred for
  odd kernels, shifted where a branch pads asymmetrically or crops) and
  summed, biases summed; branches of different groups are summed at the
  greatest common divisor of their groups;
- *sequential*: ``W[o, i, s1 v + u] = sum_m W2[o, m, v] W1[m, i, u]`` within
  each group, ``b = b2 + sum_{m, v} W2[o, m, v] b1[m]``, strides multiply;
- *padding value*: padding can move from between two maps to the input only
  across a pointwise map (1x1, stride 1), and only when it pads with that
  map's output at zero input (zero padding before a map with a bias does not
  qualify: that is the border error of reimplementations of DBB); a crop moves
  across any map (scaled by its stride).

A refusal is a :class:`FoldError` whose :attr:`~FoldError.node` is the node
at which the tree stops being one convolution (the map whose padding cannot
move, the sum whose branches disagree, the nonlinearity), so that a caller
can split the tree there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from .checks import FloatArray, as_float_array, int_pair, positive_int
from .conv import Pads, avg_pool2d, conv2d, conv_output_size, normalize_padding, pad_input
from .errors import ReparamError
from .norm import batch_norm
from .params import BatchNorm, ConvBias

__all__ = [
    "AvgPool",
    "Conv",
    "FoldError",
    "FoldedConv",
    "Identity",
    "Linear",
    "Node",
    "Norm",
    "Pad",
    "Parallel",
    "ReLU",
    "Scale",
    "Sequential",
    "evaluate",
    "fold",
    "magnitude",
    "multiply_adds",
    "num_parameters",
    "output_size",
]

_ZERO_PADS: Pads = ((0, 0), (0, 0))


def _frozen(array: FloatArray) -> FloatArray:
    copy = np.array(array, copy=True, order="C")
    copy.setflags(write=False)
    return copy


def _label(name: str, kind: str) -> str:
    return f"{kind} {name!r}" if name else kind


# --------------------------------------------------------------------------- leaves


@dataclass(frozen=True, eq=False)
class Conv:
    """A convolution leaf: ``conv2d(x, kernel, bias, stride, padding, groups)``.

    Parameters
    ----------
    kernel : array_like, shape (C_out, C_in // groups, kH, kW)
        Any sizes, odd or even, square or not.
    bias : array_like, shape (C_out,), optional
    stride : int or (int, int), default 1
    padding : int, (int, int) or ((int, int), (int, int)), default 0
        Zero padding per side; a negative side crops the input.
    groups : int, default 1
    dilation : int or (int, int), default 1
        Spacing between the kernel's taps: ``k`` taps at dilation ``r`` span
        ``r (k - 1) + 1`` input pixels.
    name : str, default ""
        Shown in error messages (e.g. the state-dict prefix ``"rbr_dense.conv"``).

    Raises
    ------
    ReparamError
        On a malformed kernel, bias, stride, padding, groups or dilation.
    """

    kernel: FloatArray
    bias: FloatArray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: Pads = _ZERO_PADS
    groups: int = 1
    dilation: tuple[int, int] = (1, 1)
    name: str = ""

    def __init__(
        self,
        kernel: npt.ArrayLike,
        bias: npt.ArrayLike | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | Pads = 0,
        groups: int = 1,
        dilation: int | tuple[int, int] = 1,
        name: str = "",
    ) -> None:
        func = f"Conv {name!r}" if name else "Conv"
        weights = as_float_array(kernel, func=func, name="kernel", ndim=4)
        groups = positive_int(groups, func=func, name="groups")
        if weights.shape[0] % groups:
            raise ReparamError(
                f"{func}: groups={groups} does not divide C_out={weights.shape[0]}; expected a "
                "divisor"
            )
        object.__setattr__(self, "kernel", _frozen(weights))
        if bias is not None:
            vector = as_float_array(bias, func=func, name="bias", ndim=1)
            if vector.shape[0] != weights.shape[0]:
                raise ReparamError(
                    f"{func}: bias has the wrong length; got {vector.shape[0]}, expected "
                    f"{weights.shape[0]} (kernel.shape[0])"
                )
            object.__setattr__(self, "bias", _frozen(vector))
        else:
            object.__setattr__(self, "bias", None)
        object.__setattr__(self, "stride", int_pair(stride, func=func, name="stride", minimum=1))
        object.__setattr__(self, "padding", normalize_padding(padding, func=func))
        object.__setattr__(self, "groups", groups)
        spacing = int_pair(dilation, func=func, name="dilation", minimum=1)
        # a single tap has no spacing: dilation along an axis of one tap changes nothing
        taps = weights.shape[2:]
        object.__setattr__(
            self, "dilation", (spacing[0] if taps[0] > 1 else 1, spacing[1] if taps[1] > 1 else 1)
        )
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int:
        """``C_in = kernel.shape[1] * groups``."""
        return int(self.kernel.shape[1] * self.groups)

    @property
    def out_channels(self) -> int:
        """``C_out = kernel.shape[0]``."""
        return int(self.kernel.shape[0])


@dataclass(frozen=True, eq=False)
class Linear:
    """A fully connected layer ``x @ weight.T + bias``, applied to the channels of every pixel.

    On an ``(N, C, H, W)`` batch it is the 1x1 convolution with kernel
    ``weight[:, :, None, None]``; :func:`evaluate` and :class:`FoldedConv` also
    take ``(N, C)`` features, as a classifier head sees them (PyTorch's
    ``nn.Linear``, ONNX's ``Gemm`` with ``transB=1``).

    Parameters
    ----------
    weight : array_like, shape (C_out, C_in)
    bias : array_like, shape (C_out,), optional
    name : str, default ""

    Raises
    ------
    ReparamError
        On a weight that is not 2-D or a bias of the wrong length.
    """

    weight: FloatArray
    bias: FloatArray | None
    name: str

    def __init__(
        self, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None, *, name: str = ""
    ) -> None:
        func = f"Linear {name!r}" if name else "Linear"
        matrix = as_float_array(weight, func=func, name="weight", ndim=2)
        object.__setattr__(self, "weight", _frozen(matrix))
        vector = None
        if bias is not None:
            vector = as_float_array(bias, func=func, name="bias", ndim=1)
            if vector.shape[0] != matrix.shape[0]:
                raise ReparamError(
                    f"{func}: bias has the wrong length; got {vector.shape[0]}, expected "
                    f"{matrix.shape[0]} (weight.shape[0])"
                )
            vector = _frozen(vector)
        object.__setattr__(self, "bias", vector)
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int:
        """``weight.shape[1]``."""
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        """``weight.shape[0]``."""
        return int(self.weight.shape[0])

    def as_conv(self) -> Conv:
        """Return the same map as a 1x1 :class:`Conv`."""
        return Conv(self.weight[:, :, None, None], self.bias, name=self.name)


@dataclass(frozen=True, eq=False)
class Scale:
    """A channelwise affine map ``x * scale + bias``, per channel or one number for all.

    A layer scale (``gamma * branch``), a negated branch (``scale=-1``), a
    division by a constant (``scale=1 / c``), a constant added or subtracted
    (``scale=1, bias=c``): each is the depthwise 1x1 kernel ``scale`` with bias
    ``bias``.

    Parameters
    ----------
    scale : float or array_like, shape (C,)
        Any finite values, negative and zero included. A number (0-d) takes
        the dtype of the data, as a Python float does under NumPy's promotion.
    bias : float or array_like, shape (C,), optional
    channels : int, optional
        Required when neither ``scale`` nor ``bias`` is a per-channel vector.
    name : str, default ""

    Raises
    ------
    ReparamError
        On a non-finite value, vectors of different lengths, or no way to
        know the channels.

    Examples
    --------
    >>> import numpy as np
    >>> negated = Sequential(Conv(np.ones((2, 2, 1, 1))), Scale(-1.0, channels=2))
    >>> tree = Parallel(Identity(2), negated)
    >>> fold(tree).kernel[:, :, 0, 0]
    array([[ 0., -1.],
           [-1.,  0.]])
    """

    scale: FloatArray
    bias: FloatArray | None
    channels: int
    name: str

    def __init__(
        self,
        scale: float | npt.ArrayLike,
        bias: float | npt.ArrayLike | None = None,
        *,
        channels: int | None = None,
        name: str = "",
    ) -> None:
        func = f"Scale {name!r}" if name else "Scale"
        arrays = {"scale": _scalar_or_vector(scale, func=func, name="scale")}
        if bias is not None:
            arrays["bias"] = _scalar_or_vector(bias, func=func, name="bias")
        lengths = {key: int(a.shape[0]) for key, a in arrays.items() if a.ndim == 1}
        if channels is not None:
            channels = positive_int(channels, func=func, name="channels")
            lengths["channels"] = channels
        if not lengths:
            raise ReparamError(
                f"{func}: the channels are unknown; give channels=C with a scalar scale and bias"
            )
        if len(set(lengths.values())) != 1:
            raise ReparamError(
                f"{func}: scale, bias and channels disagree on the channel count; got "
                + ", ".join(f"{key} {value}" for key, value in lengths.items())
            )
        object.__setattr__(self, "scale", _frozen(arrays["scale"]))
        object.__setattr__(self, "bias", _frozen(arrays["bias"]) if "bias" in arrays else None)
        object.__setattr__(self, "channels", next(iter(lengths.values())))
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int:
        """``channels``."""
        return self.channels

    out_channels = in_channels

    def vectors(self) -> tuple[FloatArray, FloatArray]:
        """Return ``(scale, bias)`` as float64 vectors of length ``channels``."""
        scale = np.broadcast_to(self.scale.astype(np.float64), (self.channels,)).copy()
        bias = np.zeros(self.channels)
        if self.bias is not None:
            bias += self.bias.astype(np.float64)
        return scale, bias


def _scalar_or_vector(value: Any, *, func: str, name: str) -> FloatArray:
    array = np.asarray(value)
    if array.dtype.kind in "iub":
        array = array.astype(np.float64)
    checked = as_float_array(array, func=func, name=name)
    if checked.ndim > 1:
        raise ReparamError(
            f"{func}: {name} must be a number or a vector of one value per channel; got shape "
            f"{checked.shape}"
        )
    if not np.isfinite(checked).all():
        raise ReparamError(f"{func}: {name} must be finite; got {checked}")
    return checked


@dataclass(frozen=True, eq=False)
class Norm:
    """An inference BatchNorm leaf over ``bn.channels`` channels."""

    bn: BatchNorm
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.bn, BatchNorm):
            raise ReparamError(
                f"Norm: bn must be a reparam.BatchNorm; got {type(self.bn).__name__}"
            )

    @property
    def in_channels(self) -> int:
        """The BatchNorm's channels."""
        return self.bn.channels

    out_channels = in_channels


@dataclass(frozen=True, eq=False)
class Identity:
    """The identity map on ``channels`` channels (a branch that passes its input through)."""

    channels: int
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "channels", positive_int(self.channels, func="Identity", name="channels")
        )

    @property
    def in_channels(self) -> int:
        """``channels``."""
        return self.channels

    out_channels = in_channels


@dataclass(frozen=True, eq=False)
class AvgPool:
    """Average pooling of each of ``channels`` channels.

    Parameters
    ----------
    channels : int
    size : int or (int, int)
    stride : int or (int, int), optional
        The window size by default (PyTorch's convention).
    padding : int, (int, int) or ((int, int), (int, int)), default 0
        Zero padding per side.
    count_include_pad : bool, default True
        PyTorch's default: the divisor is always ``kH * kW``.
    name : str, default ""
    """

    channels: int
    size: tuple[int, int]
    stride: tuple[int, int]
    padding: Pads
    count_include_pad: bool
    name: str

    def __init__(
        self,
        channels: int,
        size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] | Pads = 0,
        count_include_pad: bool = True,
        name: str = "",
    ) -> None:
        func = "AvgPool"
        object.__setattr__(self, "channels", positive_int(channels, func=func, name="channels"))
        window = int_pair(size, func=func, name="size", minimum=1)
        object.__setattr__(self, "size", window)
        step = window if stride is None else int_pair(stride, func=func, name="stride", minimum=1)
        object.__setattr__(self, "stride", step)
        pads = normalize_padding(padding, func=func)
        if min(pads[0] + pads[1]) < 0:
            raise ReparamError(f"{func}: padding must be >= 0; got {padding!r}")
        object.__setattr__(self, "padding", pads)
        object.__setattr__(self, "count_include_pad", bool(count_include_pad))
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int:
        """``channels``."""
        return self.channels

    out_channels = in_channels


@dataclass(frozen=True, eq=False)
class Pad:
    """Pad the spatial axes with one value per channel (zeros when ``value`` is None).

    Parameters
    ----------
    padding : int, (int, int) or ((int, int), (int, int))
        Per side, each >= 0.
    value : array_like, shape (C,), optional
        The value of each channel's border. Diverse Branch Block pads after a
        BatchNorm with the BatchNorm's output at zero input,
        ``beta - mean * gamma / sqrt(var + eps)`` (see
        :meth:`reparam.BatchNorm.output_at_zero`).
    name : str, default ""
    """

    padding: Pads
    value: FloatArray | None
    name: str

    def __init__(
        self,
        padding: int | tuple[int, int] | Pads,
        value: npt.ArrayLike | None = None,
        *,
        name: str = "",
    ) -> None:
        func = "Pad"
        pads = normalize_padding(padding, func=func)
        if min(pads[0] + pads[1]) < 0:
            raise ReparamError(f"{func}: padding must be >= 0; got {padding!r}")
        object.__setattr__(self, "padding", pads)
        vector = None if value is None else as_float_array(value, func=func, name="value", ndim=1)
        if vector is not None and not np.isfinite(vector).all():
            raise ReparamError(f"{func}: value must be finite; got {vector}")
        object.__setattr__(self, "value", None if vector is None else _frozen(vector))
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int | None:
        """The value's length, or None (any channels) for zero padding."""
        return None if self.value is None else int(self.value.shape[0])

    out_channels = in_channels


@dataclass(frozen=True, eq=False)
class ReLU:
    """``max(x, 0)``: evaluated, never folded (a block with it inside is not one conv)."""

    name: str = ""

    in_channels = None
    out_channels = None


# --------------------------------------------------------------------------- combinators


def _known(value: int | None) -> bool:
    return value is not None


@dataclass(frozen=True, eq=False)
class Parallel:
    """The sum of branches that read the same input: ``sum_b branch_b(x)``."""

    branches: tuple[Node, ...]
    name: str

    def __init__(self, *branches: Node, name: str = "") -> None:
        func = f"Parallel {name!r}" if name else "Parallel"
        if not branches:
            raise ReparamError(f"{func}: no branches given; expected at least one")
        _check_nodes(branches, func=func)
        ins = {b.in_channels for b in branches if _known(b.in_channels)}
        outs = {b.out_channels for b in branches if _known(b.out_channels)}
        if len(ins) > 1 or len(outs) > 1:
            raise ReparamError(
                f"{func}: branches must share their input and output channels; got "
                + ", ".join(f"{_describe(b)} {b.in_channels}->{b.out_channels}" for b in branches)
            )
        object.__setattr__(self, "branches", tuple(branches))
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int | None:
        """Channels of the shared input (None when no branch fixes them)."""
        return next((b.in_channels for b in self.branches if _known(b.in_channels)), None)

    @property
    def out_channels(self) -> int | None:
        """Channels of the sum."""
        return next((b.out_channels for b in self.branches if _known(b.out_channels)), None)


@dataclass(frozen=True, eq=False)
class Sequential:
    """Composition, first step first: ``steps[-1](... steps[0](x))``."""

    steps: tuple[Node, ...]
    name: str

    def __init__(self, *steps: Node, name: str = "") -> None:
        func = f"Sequential {name!r}" if name else "Sequential"
        if not steps:
            raise ReparamError(f"{func}: no steps given; expected at least one")
        _check_nodes(steps, func=func)
        channels: int | None = None
        previous: Node | None = None
        for step in steps:
            if _known(step.in_channels) and _known(channels) and step.in_channels != channels:
                raise ReparamError(
                    f"{func}: steps do not chain; {_describe(step)} takes {step.in_channels} "
                    f"channels but {_describe(previous)} gives {channels}"
                )
            if _known(step.out_channels):
                channels = step.out_channels
                previous = step
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "name", name)

    @property
    def in_channels(self) -> int | None:
        """Channels of the first step that fixes them."""
        return next((s.in_channels for s in self.steps if _known(s.in_channels)), None)

    @property
    def out_channels(self) -> int | None:
        """Channels of the last step that fixes them."""
        return next((s.out_channels for s in reversed(self.steps) if _known(s.out_channels)), None)


Node: TypeAlias = (
    Conv | Linear | Norm | Scale | Identity | AvgPool | Pad | ReLU | Parallel | Sequential
)
_NODE_TYPES = (Conv, Linear, Norm, Scale, Identity, AvgPool, Pad, ReLU, Parallel, Sequential)


def _check_nodes(nodes: tuple[Any, ...], *, func: str) -> None:
    for index, node in enumerate(nodes):
        if not isinstance(node, _NODE_TYPES):
            raise ReparamError(
                f"{func}: item {index} is a {type(node).__name__}; expected a node of the "
                "algebra (Conv, Linear, Norm, Scale, Identity, AvgPool, Pad, ReLU, Parallel, "
                "Sequential)"
            )


def _describe(node: Any) -> str:
    return _label(getattr(node, "name", ""), type(node).__name__)


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, Parallel):
        for branch in node.branches:
            yield from _walk(branch)
    elif isinstance(node, Sequential):
        for step in node.steps:
            yield from _walk(step)


def _arrays(node: Node) -> list[FloatArray]:
    found: list[FloatArray] = []
    for leaf in _walk(node):
        if isinstance(leaf, Conv):
            found.append(leaf.kernel)
            if leaf.bias is not None:
                found.append(leaf.bias)
        elif isinstance(leaf, Linear):
            found.append(leaf.weight)
            if leaf.bias is not None:
                found.append(leaf.bias)
        elif isinstance(leaf, Scale):  # a number takes the data's dtype, as a Python float does
            found += [a for a in (leaf.scale, leaf.bias) if a is not None and a.ndim == 1]
        elif isinstance(leaf, Norm):
            found += [leaf.bn.gamma, leaf.bn.beta, leaf.bn.mean, leaf.bn.var]
        elif isinstance(leaf, Pad) and leaf.value is not None:
            found.append(leaf.value)
    return found


def _check_tree(tree: Any, *, func: str) -> Node:
    if not isinstance(tree, _NODE_TYPES):
        raise ReparamError(f"{func}: tree must be a node of the algebra; got {type(tree).__name__}")
    checked: Node = tree
    return checked


# --------------------------------------------------------------------------- evaluate


def evaluate(tree: Node, x: npt.ArrayLike) -> FloatArray:
    """Run the train form: apply the tree to an NCHW batch, leaf by leaf.

    Parameters
    ----------
    tree : Node
    x : array_like, shape (N, C_in, H, W) or (N, C_in)
        Features ``(N, C_in)`` are pixels of a 1x1 image (a classifier head).

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out) or (N, C_out)
        In ``np.result_type`` of ``x`` and the tree's arrays, computed as a
        framework would: each leaf in that dtype.

    Raises
    ------
    ReparamError
        If ``x`` does not fit the tree (channels, a window larger than the
        padded input) or branches give different output shapes.

    Examples
    --------
    >>> import numpy as np
    >>> tree = Parallel(Conv(np.ones((1, 1, 3, 3)), padding=1), Identity(1))
    >>> evaluate(tree, np.ones((1, 1, 1, 1)))
    array([[[[2.]]]])
    """
    func = "evaluate"
    node = _check_tree(tree, func=func)
    inputs, features = _as_batch(x, func=func)
    return _as_output(_evaluate(node, inputs, absolute=False), features, func=func)


def magnitude(tree: Node, x: npt.ArrayLike) -> FloatArray:
    """Return the magnitude of the terms summed into each output: the tree on ``|x|``, ``|W|``.

    Floating-point error in any evaluation order is proportional to this, so
    tolerances are relative to it (see ``tests/tolerances.py``).

    Parameters
    ----------
    tree : Node
    x : array_like, shape (N, C_in, H, W) or (N, C_in)

    Returns
    -------
    ndarray, shape (N, C_out, H_out, W_out) or (N, C_out), float64
        Every leaf applied to absolute values: ``conv(|x|, |W|) + |b|``,
        ``|x| |s| + |mean s| + |beta|`` for a BatchNorm (``s`` its scale),
        pooled ``|x|``, a pad of ``|value|``; branch magnitudes add.
    """
    func = "magnitude"
    node = _check_tree(tree, func=func)
    inputs, features = _as_batch(x, func=func)
    result = _evaluate(node, np.abs(inputs.astype(np.float64)), absolute=True)
    return _as_output(result, features, func=func)


def _as_batch(x: npt.ArrayLike, *, func: str) -> tuple[FloatArray, bool]:
    """Return ``x`` as an NCHW batch, and whether it came as ``(N, C)`` features."""
    inputs = as_float_array(x, func=func, name="x")
    if inputs.ndim == 2:
        return inputs[:, :, None, None], True
    if inputs.ndim != 4:
        raise ReparamError(
            f"{func}: x must be 4-D (N, C, H, W) or 2-D features (N, C); got shape "
            f"{inputs.shape} ({inputs.ndim}-D)"
        )
    return inputs, False


def _as_output(result: FloatArray, features: bool, *, func: str) -> FloatArray:
    """Undo :func:`_as_batch`: features stay features when the map keeps one pixel."""
    if not features:
        return result
    if result.shape[2:] != (1, 1):
        raise ReparamError(
            f"{func}: x holds (N, C) features, but the map turns one pixel into "
            f"{result.shape[2]}x{result.shape[3]}; give an (N, C, H, W) batch"
        )
    flat: FloatArray = result[:, :, 0, 0].copy()
    return flat


def _evaluate(node: Node, x: FloatArray, *, absolute: bool) -> FloatArray:
    try:
        return _evaluate_node(node, x, absolute=absolute)
    except ReparamError as exc:
        if exc.location is not None:  # the innermost node that failed named itself already
            raise
        raise exc.located(f"in {_describe(node)}") from None


def _evaluate_node(node: Node, x: FloatArray, *, absolute: bool) -> FloatArray:
    if isinstance(node, Conv):
        kernel, bias = node.kernel, node.bias
        if absolute:
            kernel = np.abs(kernel)
            bias = None if bias is None else np.abs(bias)
        return conv2d(
            x,
            kernel,
            bias,
            stride=node.stride,
            padding=node.padding,
            groups=node.groups,
            dilation=node.dilation,
        )
    if isinstance(node, Linear):
        return _evaluate_node(node.as_conv(), x, absolute=absolute)
    if isinstance(node, Scale):
        _check_channels(node.channels, x, what="scale")
        scale, bias = node.scale, node.bias
        if absolute:
            scale = np.abs(scale)
            bias = None if bias is None else np.abs(bias)
        # a number (0-d) multiplies as a Python float: it takes the data's dtype
        scaled: FloatArray = x * (scale.item() if scale.ndim == 0 else scale[:, None, None])
        if bias is not None:
            scaled = scaled + (bias.item() if bias.ndim == 0 else bias[:, None, None])
        return scaled
    if isinstance(node, Norm):
        if not absolute:
            return batch_norm(x, node.bn)
        scale = np.abs(node.bn.scale())
        offset = np.abs(node.bn.mean * scale) + np.abs(node.bn.beta)
        _check_channels(node.bn.channels, x, what="BatchNorm")
        result: FloatArray = x * scale[:, None, None] + offset[:, None, None]
        return result
    if isinstance(node, Identity):
        _check_channels(node.channels, x, what="identity")
        return np.array(x, copy=True)
    if isinstance(node, AvgPool):
        _check_channels(node.channels, x, what="average pool")
        return avg_pool2d(
            x,
            node.size,
            stride=node.stride,
            padding=node.padding,
            count_include_pad=node.count_include_pad,
        )
    if isinstance(node, Pad):
        if node.value is not None:
            _check_channels(int(node.value.shape[0]), x, what="pad value")
        value = node.value
        if value is not None:
            value = np.abs(value) if absolute else value
            x = x.astype(np.result_type(x, value), copy=False)
        return pad_input(x, node.padding, None if value is None else value.astype(np.float64))
    if isinstance(node, ReLU):
        return x.copy() if absolute else np.maximum(x, 0)
    if isinstance(node, Sequential):
        out = x
        for step in node.steps:
            out = _evaluate(step, out, absolute=absolute)
        return out
    outputs = [_evaluate(branch, x, absolute=absolute) for branch in node.branches]
    shapes = {out.shape for out in outputs}
    if len(shapes) != 1:
        raise ReparamError(
            "branches give different output shapes; got "
            + ", ".join(
                f"{_describe(b)} {out.shape}" for b, out in zip(node.branches, outputs, strict=True)
            )
        )
    total = np.zeros(outputs[0].shape, dtype=np.result_type(*outputs))
    for out in outputs:
        total += out
    return total


def _check_channels(channels: int, x: FloatArray, *, what: str) -> None:
    if x.shape[1] != channels:
        raise ReparamError(
            f"the {what} has {channels} channels; got an input of shape {x.shape}, expected "
            f"(N, {channels}, H, W)"
        )


# --------------------------------------------------------------------------- fold


@dataclass(frozen=True, eq=False)
class FoldedConv:
    """One convolution with bias: what a whole tree folds into.

    Attributes
    ----------
    kernel : ndarray, shape (C_out, C_in // groups, kH, kW)
        A fresh array, shared with nothing.
    bias : ndarray, shape (C_out,)
    stride : (int, int)
    pads : ((int, int), (int, int))
        Zero padding per side ``((top, bottom), (left, right))``; negative crops.
    groups : int
    dilation : (int, int), default (1, 1)
        Kept when every convolution of the tree shares it and their taps line
        up on its grid; otherwise the kernel is written out undilated.

    Notes
    -----
    ``conv(x)`` applies it; ``kernel, bias = conv`` unpacks like
    :class:`~reparam.ConvBias`; :attr:`padding` is the ``(ph, pw)`` pair that
    deep-learning frameworks take, defined when the padding is symmetric;
    :meth:`as_linear` gives the fully connected layer when the conv is one.
    """

    kernel: FloatArray
    bias: FloatArray
    stride: tuple[int, int]
    pads: Pads
    groups: int
    dilation: tuple[int, int] = (1, 1)

    @property
    def padding(self) -> tuple[int, int]:
        """``(ph, pw)``, each side of an axis padded alike (as ``torch.nn.Conv2d`` takes it).

        Raises
        ------
        ReparamError
            If the padding is asymmetric or crops (use :attr:`pads` then).
        """
        (top, bottom), (left, right) = self.pads
        if top != bottom or left != right or min(top, left) < 0:
            raise ReparamError(
                f"FoldedConv.padding: the padding is not one non-negative value per axis; got "
                f"pads={self.pads} (use .pads, or conv2d(x, kernel, bias, padding=pads))"
            )
        return (top, left)

    @property
    def in_channels(self) -> int:
        """``kernel.shape[1] * groups``."""
        return int(self.kernel.shape[1] * self.groups)

    @property
    def out_channels(self) -> int:
        """``kernel.shape[0]``."""
        return int(self.kernel.shape[0])

    def __call__(self, x: npt.ArrayLike) -> FloatArray:
        """Apply the convolution to ``x`` of shape (N, C_in, H, W) or features (N, C_in)."""
        func = "FoldedConv"
        inputs, features = _as_batch(x, func=func)
        result = conv2d(
            inputs,
            self.kernel,
            self.bias,
            stride=self.stride,
            padding=self.pads,
            groups=self.groups,
            dilation=self.dilation,
        )
        return _as_output(result, features, func=func)

    def as_linear(self) -> tuple[FloatArray, FloatArray]:
        """Return ``(weight, bias)`` of the fully connected layer this convolution is.

        Returns
        -------
        weight : ndarray, shape (C_out, C_in)
            Zero between groups when ``groups > 1``.
        bias : ndarray, shape (C_out,)

        Raises
        ------
        ReparamError
            If the kernel is not 1x1 at stride 1 without padding.
        """
        if self.kernel.shape[2:] != (1, 1) or self.stride != (1, 1) or self.pads != _ZERO_PADS:
            raise ReparamError(
                "FoldedConv.as_linear: a fully connected layer is a 1x1 convolution at stride 1 "
                f"without padding; got a {self.kernel.shape[2]}x{self.kernel.shape[3]} kernel, "
                f"stride {self.stride}, pads {self.pads}"
            )
        weight = _regroup(self.kernel, self.groups, 1)[:, :, 0, 0].copy()
        return weight, self.bias.copy()

    def __iter__(self) -> Iterator[FloatArray]:
        """Unpack as ``kernel, bias``."""
        return iter((self.kernel, self.bias))

    def as_conv_bias(self) -> ConvBias:
        """Return the ``(kernel, bias)`` pair."""
        return ConvBias(self.kernel, self.bias)

    def astype(self, dtype: npt.DTypeLike) -> FoldedConv:
        """Return a copy whose arrays have ``dtype``."""
        return FoldedConv(
            self.kernel.astype(dtype),
            self.bias.astype(dtype),
            self.stride,
            self.pads,
            self.groups,
            self.dilation,
        )


@dataclass
class _Affine:
    """A folded subtree in float64: ``conv(pad(x, value), kernel, stride, groups, dilation) + b``.

    ``scale`` is set instead of ``kernel`` for a channelwise map (a depthwise
    1x1 kernel at stride 1: BatchNorm, identity, scale), so composing with it
    costs one multiplication per kernel entry instead of a matrix product.
    ``entry`` is the leaf that reads the subtree's input: a refusal to compose
    after this subtree names the entry of what follows it.
    """

    bias: FloatArray
    groups: int
    in_channels: int
    stride: tuple[int, int] = (1, 1)
    pads: Pads = _ZERO_PADS
    pad_value: FloatArray | None = None
    kernel: FloatArray | None = None
    scale: FloatArray | None = None
    name: str = field(default="")
    dilation: tuple[int, int] = (1, 1)
    entry: Node | None = None
    owned: bool = False  # ``kernel`` is a float64 array the fold made: a sum may add into it

    @property
    def out_channels(self) -> int:
        return int(self.bias.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """Taps of the kernel (at its dilation)."""
        if self.kernel is None:
            return (1, 1)
        return (int(self.kernel.shape[2]), int(self.kernel.shape[3]))

    @property
    def span(self) -> tuple[int, int]:
        """Input pixels the kernel covers per axis: ``r (k - 1) + 1``."""
        return (
            self.dilation[0] * (self.size[0] - 1) + 1,
            self.dilation[1] * (self.size[1] - 1) + 1,
        )

    @property
    def pointwise(self) -> bool:
        return self.size == (1, 1) and self.stride == (1, 1)

    def undilated(self) -> _Affine:
        """Return the same map with its kernel written out at dilation 1 (zeros between taps)."""
        if self.dilation == (1, 1) or self.kernel is None:
            return self
        rate_h, rate_w = self.dilation
        kernel = np.zeros((*self.kernel.shape[:2], *self.span), dtype=self.kernel.dtype)
        kernel[:, :, ::rate_h, ::rate_w] = self.kernel
        return replace(self, kernel=kernel, dilation=(1, 1))

    def full_kernel(self, groups: int) -> FloatArray:
        """Write the kernel out at ``groups`` (which must divide ``self.groups``)."""
        if self.scale is not None:
            channels = self.out_channels
            per_group = channels // groups
            kernel = np.zeros((channels, per_group, 1, 1))
            rows = np.arange(channels)
            kernel[rows, rows % per_group, 0, 0] = self.scale
            return kernel
        assert self.kernel is not None
        return _regroup(self.kernel, self.groups, groups)


def _regroup(kernel: FloatArray, groups: int, target: int) -> FloatArray:
    """Write a kernel of ``groups`` groups as one of ``target`` groups (``target | groups``).

    A grouped convolution is a convolution of fewer groups whose kernel is
    zero between the finer groups: output channel ``o`` of fine group ``j``
    reads the ``C_in / groups`` inputs of ``j``, which sit at offset
    ``(j mod (groups / target)) * C_in / groups`` inside its coarse group.
    """
    if groups == target:
        return kernel
    out_channels, per_group = kernel.shape[:2]
    ratio = groups // target
    fine_group = np.arange(out_channels) // (out_channels // groups)
    position = fine_group % ratio
    result = np.zeros((out_channels, per_group * ratio, *kernel.shape[2:]), dtype=kernel.dtype)
    for slot in range(ratio):
        rows = position == slot
        result[rows, slot * per_group : (slot + 1) * per_group] = kernel[rows]
    return result


class FoldError(ReparamError):
    """:func:`fold` refused a tree: it is not one convolution.

    Attributes
    ----------
    node : Node or None
        Where the tree stops being one convolution: the map whose padding
        cannot move to the input (split the tree before it), the
        :class:`Parallel` whose branches cannot be summed, the nonlinearity,
        the pool that excludes padding from its divisor.
    """

    __module__ = "reparam"  # shown in tracebacks as reparam.FoldError, where users import it

    def __init__(self, message: str, *, node: Node | None = None) -> None:
        super().__init__(message)
        self.node = node


class _FoldError(FoldError):
    """Raised inside the fold; the public entry point adds the function name."""


def fold(tree: Node) -> FoldedConv:
    """Fold a tree into the one convolution with bias that computes the same.

    Parameters
    ----------
    tree : Node

    Returns
    -------
    FoldedConv
        Kernel and bias in ``np.result_type`` of the tree's arrays (float32
        stays float32; a tree without arrays gives float64). All arithmetic
        runs in float64 and is rounded once.

    Raises
    ------
    FoldError
        A :class:`~reparam.ReparamError` naming the node and the reason the
        tree is not one convolution: a nonlinearity, branches with different
        strides or output sizes, a padding between two maps that cannot move
        to the input (after a kxk or strided map, or with a value other than
        the previous map's output at zero input: zero padding after a
        BatchNorm changes the border), an average pool that excludes padding
        from its divisor, or a non-zero padding value left at the input. Its
        ``node`` attribute is that node.

    Examples
    --------
    >>> import numpy as np
    >>> tree = Parallel(Conv(np.ones((1, 1, 3, 3)), padding=1), Identity(1))
    >>> conv = fold(tree)
    >>> conv.kernel[0, 0]
    array([[1., 1., 1.],
           [1., 2., 1.],
           [1., 1., 1.]])
    >>> conv.padding
    (1, 1)
    """
    func = "fold"
    node = _check_tree(tree, func=func)
    try:
        folded = _fold(node)
    except _FoldError as exc:
        raise FoldError(f"{func}: {exc}", node=exc.node) from None
    if folded.pad_value is not None:
        raise FoldError(
            f"{func}: the tree pads its input with non-zero values {folded.pad_value}; a "
            "convolution pads with zeros",
            node=folded.entry,
        )
    arrays = _arrays(node)
    dtype = np.result_type(*arrays) if arrays else np.dtype(np.float64)
    kernel = folded.full_kernel(folded.groups)
    return FoldedConv(
        kernel.astype(dtype),
        folded.bias.astype(dtype),
        folded.stride,
        folded.pads,
        folded.groups,
        folded.dilation,
    )


def _fold(node: Node) -> _Affine:
    if isinstance(node, Conv):
        bias = np.zeros(node.out_channels) if node.bias is None else node.bias.astype(np.float64)
        return _Affine(
            bias=bias,
            groups=node.groups,
            in_channels=node.in_channels,
            stride=node.stride,
            pads=node.padding,
            kernel=node.kernel,  # promoted to float64 by the first arithmetic on it
            name=_describe(node),
            dilation=node.dilation,
            entry=node,
        )
    if isinstance(node, Linear):
        return replace(_fold(node.as_conv()), name=_describe(node), entry=node)
    if isinstance(node, Norm | Scale | Identity):
        scale, shift = _channelwise(node)
        channels = int(shift.shape[0])
        return _Affine(shift, channels, channels, scale=scale, name=_describe(node), entry=node)
    if isinstance(node, AvgPool):
        return _fold_pool(node)
    if isinstance(node, Pad):
        return _fold_pad(node)
    if isinstance(node, ReLU):
        raise _FoldError(
            f"{_describe(node)} is not linear; a tree with a nonlinearity inside is not one "
            "convolution",
            node=node,
        )
    if isinstance(node, Sequential):
        folded: _Affine | None = None
        for step in node.steps:
            if isinstance(step, Pad):
                known = node.in_channels if folded is None else folded.out_channels
                current = _fold_pad(step, known)
            else:
                current = _fold(step)
            folded = current if folded is None else _compose(folded, current)
        assert folded is not None
        return folded
    return _sum([_fold(branch) for branch in node.branches], node)


def _channelwise(node: Norm | Scale | Identity) -> tuple[FloatArray, FloatArray]:
    """Return ``(scale, bias)`` in float64 of a map that scales and shifts each channel."""
    if isinstance(node, Norm):
        scale = node.bn.scale(np.float64)
        return scale, node.bn.beta.astype(np.float64) - node.bn.mean.astype(np.float64) * scale
    if isinstance(node, Scale):
        return node.vectors()
    return np.ones(node.channels), np.zeros(node.channels)


def _fold_pool(node: AvgPool) -> _Affine:
    if not node.count_include_pad and any(side > 0 for axis in node.padding for side in axis):
        raise _FoldError(
            f"{_describe(node)} has count_include_pad=False and padding {node.padding}: its "
            "border divides by fewer pixels than the window, which no convolution does",
            node=node,
        )
    channels = node.channels
    kernel = np.full((channels, 1, *node.size), 1.0 / (node.size[0] * node.size[1]))
    return _Affine(
        np.zeros(channels),
        channels,
        channels,
        stride=node.stride,
        pads=node.padding,
        kernel=kernel,
        name=_describe(node),
        entry=node,
    )


def _fold_pad(node: Pad, channels: int | None = None) -> _Affine:
    size = node.in_channels if node.in_channels is not None else channels
    if size is None:
        raise _FoldError(
            f"{_describe(node)} pads with zeros and nothing before it fixes the channels; "
            "give the Pad a value vector, or put it after a map with known channels",
            node=node,
        )
    return _Affine(
        np.zeros(size),
        size,
        size,
        pads=node.padding,
        pad_value=None
        if node.value is None or not node.value.any()
        else node.value.astype(np.float64),
        scale=np.ones(size),
        name=_describe(node),
        entry=node,
    )


def _at_zero(first: _Affine) -> FloatArray:
    """Return what ``first`` outputs, per channel, in its padded border."""
    if first.pad_value is None:
        return first.bias
    if first.scale is not None:
        at_zero: FloatArray = first.scale * first.pad_value + first.bias
        return at_zero
    assert first.kernel is not None
    per_group = first.kernel.shape[1]
    out_per_group = first.out_channels // first.groups
    group = np.arange(first.out_channels) // out_per_group
    inputs = first.pad_value[group[:, None] * per_group + np.arange(per_group)[None, :]]
    at_zero = np.einsum("oihw,oi->o", first.kernel, inputs) + first.bias
    return at_zero


def _move_pads(first: _Affine, second: _Affine) -> Pads:
    """Return the padding of ``first``'s input once ``second``'s moves in front of it."""
    positive = any(side > 0 for axis in second.pads for side in axis)
    if positive:
        if not first.pointwise:
            raise _FoldError(
                f"{second.name} pads by {second.pads} after {first.name}, a "
                f"{first.size[0]}x{first.size[1]} map at stride {first.stride}; padding after "
                "such a map is not padding of its input, so the sequence is not one convolution",
                node=second.entry,
            )
        produced = _at_zero(first)
        wanted = np.zeros(first.out_channels) if second.pad_value is None else second.pad_value
        # equal up to float32 rounding: a value stored in a float32 checkpoint (DBB's
        # BNAndPadLayer), or cancelled by a float32 subtraction in an exported graph, and
        # then folded in float64 (1e-6 absolute near zero: below that the border moves by less)
        bound = 1e-6 * (1.0 + np.abs(produced))
        mismatch = np.flatnonzero(np.abs(wanted - produced) > bound)
        if mismatch.size:
            channel = int(mismatch[0])
            what = "zeros" if second.pad_value is None else "the given values"
            raise _FoldError(
                f"{second.name} pads with {what} after {first.name}, whose output at zero "
                f"input is {produced[channel]:.6g} at channel {channel} (padding value "
                f"{wanted[channel]:.6g}): the border would differ from the one conv. Split the "
                f"sequence before {second.name}, or pad with the previous map's output at zero "
                "input (as Diverse Branch Block's BNAndPadLayer does) for it to be one convolution",
                node=second.entry,
            )
    pads = []
    for axis, stride in enumerate(first.stride):
        sides = []
        for side in range(2):
            before, after = first.pads[axis][side], second.pads[axis][side]
            if after > 0 and before < 0:
                raise _FoldError(
                    f"{second.name} pads after {first.name} crops; cropping then padding is not "
                    "one padding",
                    node=second.entry,
                )
            sides.append(before + after * (stride if after < 0 else 1))
        pads.append((sides[0], sides[1]))
    return ((pads[0][0], pads[0][1]), (pads[1][0], pads[1][1]))


def _compose(first: _Affine, second: _Affine) -> _Affine:
    """``second`` applied to the output of ``first``, as one affine map."""
    if first.out_channels != second.in_channels:
        raise _FoldError(
            f"{second.name} takes {second.in_channels} channels but {first.name} gives "
            f"{first.out_channels}",
            node=second.entry,
        )
    pads = _move_pads(first, second)
    name = f"{first.name} then {second.name}"
    pad_value = first.pad_value
    if second.scale is not None and second.stride == (1, 1):
        scale = second.scale
        bias = scale * first.bias + second.bias
        if first.scale is not None:
            return _Affine(
                bias, first.groups, first.in_channels, first.stride, pads, pad_value,
                scale=first.scale * scale, name=name, entry=first.entry,
            )  # fmt: skip
        assert first.kernel is not None
        kernel = first.kernel * scale[:, None, None, None]
        return _Affine(
            bias, first.groups, first.in_channels, first.stride, pads, pad_value, kernel,
            name=name, dilation=first.dilation, entry=first.entry, owned=True,
        )  # fmt: skip
    if first.scale is not None and first.stride == (1, 1):
        second_kernel = second.full_kernel(second.groups)
        per_group = second_kernel.shape[1]
        out_per_group = second.out_channels // second.groups
        group = np.arange(second.out_channels) // out_per_group
        channel = group[:, None] * per_group + np.arange(per_group)[None, :]
        kernel = second_kernel * first.scale[channel][:, :, None, None]
        bias = second.bias + np.einsum("oihw,oi->o", second_kernel, first.bias[channel])
        return _Affine(
            bias, second.groups, first.in_channels, second.stride, pads, pad_value, kernel,
            name=name, dilation=second.dilation, entry=first.entry, owned=True,
        )  # fmt: skip
    return _compose_general(first.undilated(), second.undilated(), pads, name)


def _compose_general(first: _Affine, second: _Affine, pads: Pads, name: str) -> _Affine:
    """Per group: ``W[o, i, s1 v + u] = sum_m W2[o, m, v] W1[m, i, u]``; strides multiply.

    Both kernels are undilated (a dilated kernel is written out with zeros first).
    """
    groups = math.gcd(first.groups, second.groups)
    inner = first.full_kernel(groups).astype(np.float64, copy=False)  # (M, I/G, a_h, a_w)
    outer = second.full_kernel(groups).astype(np.float64, copy=False)  # (O, M/G, b_h, b_w)
    (a_h, a_w), (b_h, b_w) = inner.shape[2:], outer.shape[2:]
    s_h, s_w = first.stride
    size_h, size_w = a_h + s_h * (b_h - 1), a_w + s_w * (b_w - 1)
    middle = inner.shape[0] // groups
    inner_g = inner.reshape(groups, middle, *inner.shape[1:])
    outer_g = outer.reshape(groups, outer.shape[0] // groups, *outer.shape[1:])
    kernel = np.zeros((groups, outer_g.shape[1], inner.shape[1], size_h, size_w))
    for u in range(a_h):
        for v in range(a_w):
            # sum over internal channels m for this tap of the first kernel
            part = np.einsum("gomyx,gmi->goiyx", outer_g, inner_g[:, :, :, u, v])
            kernel[
                :, :, :, u : u + s_h * (b_h - 1) + 1 : s_h, v : v + s_w * (b_w - 1) + 1 : s_w
            ] += part
    first_bias = first.bias.reshape(groups, middle)
    bias = second.bias + np.einsum("gomyx,gm->go", outer_g, first_bias).reshape(-1)
    stride = (s_h * second.stride[0], s_w * second.stride[1])
    return _Affine(
        bias,
        groups,
        first.in_channels,
        stride,
        pads,
        first.pad_value,
        kernel.reshape(-1, *kernel.shape[2:]),
        name=name,
        entry=first.entry,
        owned=True,
    )


def _sum(parts: list[_Affine], node: Parallel) -> _Affine:
    """Align the branches' windows, write them at the common groups and dilation, and add."""
    where = _describe(node)
    strides = {part.stride for part in parts}
    if len(strides) != 1:
        raise _FoldError(
            f"{where}: branches have different strides "
            + ", ".join(f"{p.name} {p.stride}" for p in parts)
            + "; only branches of one stride sum to one convolution",
            node=node,
        )
    values = [p.pad_value for p in parts]
    if any(v is not None for v in values):
        raise _FoldError(
            f"{where}: a branch pads its input with non-zero values; branches sum to one "
            "convolution only when each pads with zeros (or its padding moves, see Pad)",
            node=node,
        )
    extents = []
    for axis in range(2):
        spans = {p.pads[axis][0] + p.pads[axis][1] - p.span[axis] for p in parts}
        if len(spans) != 1:
            raise _FoldError(
                f"{where}: branches give different output sizes ("
                + ", ".join(f"{p.name}: {p.span[axis]} taps, padding {p.pads[axis]}" for p in parts)
                + f" along {'height' if axis == 0 else 'width'}); each needs "
                "padding_before + padding_after - kernel_span to agree",
                node=node,
            )
        before = max(p.pads[axis][0] for p in parts)
        size = max(before - p.pads[axis][0] + p.span[axis] for p in parts)
        extents.append((before, size, spans.pop() + size - before))
    rate = _common_dilation(parts, (extents[0][0], extents[1][0]))
    if rate == (1, 1):
        parts = [part.undilated() for part in parts]
    groups = math.gcd(*(p.groups for p in parts))
    first = parts[0]
    per_group = first.in_channels // groups
    taps = [(extents[axis][1] - 1) // rate[axis] + 1 for axis in range(2)]
    shape = (first.out_channels, per_group, *taps)
    offsets = [
        ((extents[0][0] - p.pads[0][0]) // rate[0], (extents[1][0] - p.pads[1][0]) // rate[1])
        for p in parts
    ]
    # add into a branch's own float64 kernel when it spans the whole sum (no new array)
    start = next(
        (
            i
            for i, p in enumerate(parts)
            if p.owned
            and p.kernel is not None
            and p.kernel.dtype == np.float64
            and p.groups == groups
            and p.kernel.shape == shape
            and offsets[i] == (0, 0)
        ),
        None,
    )
    kernel = np.zeros(shape) if start is None else parts[start].kernel
    assert kernel is not None
    bias = np.zeros(first.out_channels)
    for index, (part, (top, left)) in enumerate(zip(parts, offsets, strict=True)):
        if index != start:
            height, width = part.size
            kernel[:, :, top : top + height, left : left + width] += part.full_kernel(groups)
        bias += part.bias
    pads = ((extents[0][0], extents[0][2]), (extents[1][0], extents[1][2]))
    return _Affine(
        bias, groups, first.in_channels, first.stride, pads, None, kernel, name=where,
        dilation=rate, entry=node, owned=True,
    )  # fmt: skip


def _common_dilation(parts: list[_Affine], before: tuple[int, int]) -> tuple[int, int]:
    """Return the dilation the sum keeps: the branches' one rate, if every tap is on its grid.

    A kernel of one tap along an axis fits any rate; otherwise branches of
    different rates, or windows offset by other than a multiple of the rate,
    are summed undilated: ``(1, 1)``.
    """
    rate = []
    for axis in range(2):
        rates = {p.dilation[axis] for p in parts if p.size[axis] > 1}
        common = rates.pop() if len(rates) == 1 else 1
        if len(rates) > 0 or any((before[axis] - p.pads[axis][0]) % common for p in parts):
            return (1, 1)
        rate.append(common)
    return (rate[0], rate[1])


# --------------------------------------------------------------------------- counts


def output_size(tree: Node, height: int, width: int) -> tuple[int, int]:
    """Spatial output size for an input of ``height x width``.

    Raises
    ------
    ReparamError
        If a window does not fit, or branches disagree.
    """
    func = "output_size"
    node = _check_tree(tree, func=func)
    height = positive_int(height, func=func, name="height")
    width = positive_int(width, func=func, name="width")
    return _output_size(node, (height, width))


def _output_size(node: Node, size: tuple[int, int]) -> tuple[int, int]:
    if isinstance(node, Conv | AvgPool):
        taps = node.kernel.shape[2:] if isinstance(node, Conv) else node.size
        rates = node.dilation if isinstance(node, Conv) else (1, 1)
        result = tuple(
            conv_output_size(n, k, stride=s, padding=p, dilation=r)
            for n, k, s, p, r in zip(size, taps, node.stride, node.padding, rates, strict=True)
        )
    elif isinstance(node, Pad):
        result = tuple(n + p[0] + p[1] for n, p in zip(size, node.padding, strict=True))
    elif isinstance(node, Sequential):
        result = size
        for step in node.steps:
            result = _output_size(step, result)
    elif isinstance(node, Parallel):
        sizes = {_output_size(branch, size) for branch in node.branches}
        if len(sizes) != 1:
            raise ReparamError(
                f"output_size: branches of {_describe(node)} give different sizes {sorted(sizes)}"
            )
        result = sizes.pop()
    else:
        result = size
    if min(result) < 1:
        raise ReparamError(
            f"output_size: {_describe(node)} leaves no output for an input of {size}"
        )
    return (int(result[0]), int(result[1]))


def num_parameters(tree: Node) -> int:
    """Trainable parameters: kernels, linear weights, biases, scales, BatchNorm gamma and beta.

    Running statistics do not count; a scale counts its entries as given (a
    number counts one).

    Examples
    --------
    >>> import numpy as np
    >>> num_parameters(Sequential(Conv(np.ones((4, 2, 3, 3))), Norm(BatchNorm(*np.ones((4, 4))))))
    80
    """
    total = 0
    for leaf in _walk(_check_tree(tree, func="num_parameters")):
        if isinstance(leaf, Conv):
            total += leaf.kernel.size + (0 if leaf.bias is None else leaf.bias.size)
        elif isinstance(leaf, Linear):
            total += leaf.weight.size + (0 if leaf.bias is None else leaf.bias.size)
        elif isinstance(leaf, Scale):
            total += leaf.scale.size + (0 if leaf.bias is None else leaf.bias.size)
        elif isinstance(leaf, Norm):
            total += 2 * leaf.bn.channels
    return int(total)


def multiply_adds(tree: Node, height: int, width: int) -> int:
    """Multiply-adds of the convolutions for one ``height x width`` image.

    Each convolution counts ``kernel.size * H_out * W_out``; an average pool
    counts its additions, ``C * kH * kW * H_out * W_out``; BatchNorms and
    identities count nothing (the convention of the RepVGG paper); a linear
    layer counts ``C_out * C_in`` per pixel; scales count nothing.
    """
    func = "multiply_adds"
    node = _check_tree(tree, func=func)
    height = positive_int(height, func=func, name="height")
    width = positive_int(width, func=func, name="width")
    return _multiply_adds(node, (height, width))


def _multiply_adds(node: Node, size: tuple[int, int]) -> int:
    if isinstance(node, Conv):
        out_h, out_w = _output_size(node, size)
        return int(node.kernel.size * out_h * out_w)
    if isinstance(node, Linear):
        return int(node.weight.size * size[0] * size[1])
    if isinstance(node, AvgPool):
        out_h, out_w = _output_size(node, size)
        return node.channels * node.size[0] * node.size[1] * out_h * out_w
    if isinstance(node, Sequential):
        total = 0
        for step in node.steps:
            total += _multiply_adds(step, size)
            size = _output_size(step, size)
        return total
    if isinstance(node, Parallel):
        return sum(_multiply_adds(branch, size) for branch in node.branches)
    return 0
