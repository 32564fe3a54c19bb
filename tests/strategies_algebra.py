"""Hypothesis strategies for the branch algebra: train-form trees that fold, by construction.

A tree is drawn as a *spec* (plain frozen dataclasses, so a failing example
prints readably) and built into ``reparam.core.algebra`` nodes in a given dtype
by :func:`build`. Shapes are drawn in dependency order:

1. the tree's *signature*: a base number of groups, channels per group in and
   out, the stride and the *span* ``pad_before + pad_after - kernel_size`` per
   axis (branches of a sum line up exactly when they share stride and span);
2. for every branch, its kind, then its groups (a divisor of both channel
   counts), kernel sizes, and paddings chosen so that the branch has the
   signature's span (a negative padding crops);
3. a spatial size that fits: ``H >= -span`` makes every window of every leaf
   fit (the output then has ``(H + span) // stride + 1 >= 1`` rows).

Padding between two maps is only drawn where it folds: after a pointwise map,
either as a :class:`~reparam.core.algebra.Pad` holding the previous map's
output at zero input (DBB's ``BNAndPadLayer``) or as zeros when that output is
zero; after a kxk map only crops. Arrays come from a drawn seed (NumPy), BN
statistics from :func:`strategies.bn_stats` (tiny variances, large or negative
gamma, eps 0, 1e-5 or 1e-3).

``tree_cases(extended=True)`` also draws the newer leaves and laws: dilated
kernels (a kernel of ``k`` taps at dilation ``r`` takes the place of one of
``r (k - 1) + 1`` taps, so the signature's span is kept), :class:`Scale`
(a number or one value per channel, negative and zero included; after any
branch, and bias-free before a padded map), :class:`Linear` (where a 1x1 map
at stride 1 fits), and a BatchNorm or a biased scale *before* a map that does
not pad. The default draws are the ones the older tests were written for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from strategies import BNStats, bn_stats, random_array, seeds

from reparam.core.algebra import (
    AvgPool,
    Conv,
    Identity,
    Linear,
    Node,
    Norm,
    Pad,
    Parallel,
    ReLU,
    Scale,
    Sequential,
    evaluate,
)

MAX_SIDE = 9
MAX_KERNEL = 7
MAX_BASE_GROUPS = 3
MAX_DILATION = 3
Pads: TypeAlias = tuple[tuple[int, int], tuple[int, int]]
Pair: TypeAlias = tuple[int, int]


# ------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    in_channels: int
    groups: int
    size: Pair
    stride: Pair
    pads: Pads
    bias: bool
    seed: int
    dilation: Pair = (1, 1)


@dataclass(frozen=True)
class LinearSpec:
    out_channels: int
    in_channels: int
    bias: bool
    seed: int


@dataclass(frozen=True)
class ScaleSpec:
    """``x * scale + bias``; a float is a Python number (it takes the data's dtype)."""

    channels: int
    scale: float | tuple[float, ...]
    bias: float | tuple[float, ...] | None


@dataclass(frozen=True)
class NormSpec:
    stats: BNStats


@dataclass(frozen=True)
class IdentitySpec:
    channels: int


@dataclass(frozen=True)
class PoolSpec:
    channels: int
    size: Pair
    stride: Pair
    pads: Pads


@dataclass(frozen=True)
class PadSpec:
    """Padding whose value is the output at zero input of the steps before it."""

    pads: Pads


@dataclass(frozen=True)
class SequentialSpec:
    steps: tuple[Spec, ...]


@dataclass(frozen=True)
class ParallelSpec:
    branches: tuple[Spec, ...]


Spec: TypeAlias = (
    ConvSpec
    | LinearSpec
    | ScaleSpec
    | NormSpec
    | IdentitySpec
    | PoolSpec
    | PadSpec
    | SequentialSpec
    | ParallelSpec
)


def cast_tree(node: Node, dtype: npt.DTypeLike) -> Node:
    """The same tree with every array (kernels, biases, BN statistics, pad values) in ``dtype``.

    A scale given as a number stays a number: it takes the data's dtype anyway.
    """
    if isinstance(node, Conv):
        bias = None if node.bias is None else node.bias.astype(dtype)
        return Conv(
            node.kernel.astype(dtype),
            bias,
            stride=node.stride,
            padding=node.padding,
            groups=node.groups,
            dilation=node.dilation,
            name=node.name,
        )
    if isinstance(node, Linear):
        bias = None if node.bias is None else node.bias.astype(dtype)
        return Linear(node.weight.astype(dtype), bias, name=node.name)
    if isinstance(node, Scale):
        scale, bias = (
            None if a is None else a.astype(dtype) if a.ndim == 1 else a
            for a in (node.scale, node.bias)
        )
        return Scale(scale, bias, channels=node.channels, name=node.name)
    if isinstance(node, Norm):
        return Norm(node.bn.astype(dtype), name=node.name)
    if isinstance(node, Pad):
        value = None if node.value is None else node.value.astype(dtype)
        return Pad(node.padding, value, name=node.name)
    if isinstance(node, Parallel):
        return Parallel(*(cast_tree(b, dtype) for b in node.branches), name=node.name)
    if isinstance(node, Sequential):
        return Sequential(*(cast_tree(s, dtype) for s in node.steps), name=node.name)
    assert isinstance(node, Identity | AvgPool | ReLU), f"unknown node {node!r}"
    return node


def output_at_zero(steps: list[Node], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """What ``steps`` output for a zero input, per channel: computed in float64, rounded once.

    Only used after pointwise steps, whose output at zero input is the same at
    every pixel (padded border included).
    """
    prefix = cast_tree(Sequential(*steps), np.float64)
    channels = prefix.in_channels
    assert channels is not None, "a Pad follows steps with known channels"
    out = evaluate(prefix, np.zeros((1, channels, 1, 1)))
    return np.asarray(out[0, :, 0, 0].astype(dtype))


def build(spec: Spec, dtype: npt.DTypeLike) -> Node:
    """The tree a spec describes, with its arrays in ``dtype`` (the same values for any dtype)."""
    if isinstance(spec, ConvSpec):
        rng = np.random.default_rng(spec.seed)
        shape = (spec.out_channels, spec.in_channels // spec.groups, *spec.size)
        kernel = random_array(rng, shape, dtype)
        bias = random_array(rng, (spec.out_channels,), dtype) if spec.bias else None
        return Conv(
            kernel,
            bias,
            stride=spec.stride,
            padding=spec.pads,
            groups=spec.groups,
            dilation=spec.dilation,
        )
    if isinstance(spec, LinearSpec):
        rng = np.random.default_rng(spec.seed)
        weight = random_array(rng, (spec.out_channels, spec.in_channels), dtype)
        bias = random_array(rng, (spec.out_channels,), dtype) if spec.bias else None
        return Linear(weight, bias)
    if isinstance(spec, ScaleSpec):
        return Scale(
            _number_or_array(spec.scale, dtype),
            None if spec.bias is None else _number_or_array(spec.bias, dtype),
            channels=spec.channels,
        )
    if isinstance(spec, NormSpec):
        return Norm(spec.stats.make(dtype))
    if isinstance(spec, IdentitySpec):
        return Identity(spec.channels)
    if isinstance(spec, PoolSpec):
        return AvgPool(spec.channels, spec.size, stride=spec.stride, padding=spec.pads)
    if isinstance(spec, ParallelSpec):
        return Parallel(*(build(b, dtype) for b in spec.branches))
    assert isinstance(spec, SequentialSpec), f"a PadSpec only lives in a sequence: {spec}"
    steps: list[Node] = []
    for step in spec.steps:
        if isinstance(step, PadSpec):
            steps.append(Pad(step.pads, output_at_zero(steps, dtype)))
        else:
            steps.append(build(step, dtype))
    return Sequential(*steps)


def _number_or_array(
    value: float | tuple[float, ...], dtype: npt.DTypeLike
) -> float | npt.NDArray[Any]:
    """A number stays a Python float (it takes the data's dtype); a tuple becomes an array."""
    return value if isinstance(value, float) else np.array(value, dtype=dtype)


def leaves(spec: Spec) -> list[Spec]:
    """Every leaf spec of a tree, depth first."""
    if isinstance(spec, ParallelSpec):
        return [leaf for branch in spec.branches for leaf in leaves(branch)]
    if isinstance(spec, SequentialSpec):
        return [leaf for step in spec.steps for leaf in leaves(step)]
    return [spec]


@dataclass(frozen=True)
class TreeCase:
    """A tree spec and an input that fits it."""

    tree: Spec
    batch: int
    in_channels: int
    height: int
    width: int
    x_scale: float
    seed: int

    def make(self, dtype: npt.DTypeLike) -> tuple[Node, npt.NDArray[Any]]:
        """``(tree, x)`` with every array in ``dtype``."""
        rng = np.random.default_rng(self.seed)
        shape = (self.batch, self.in_channels, self.height, self.width)
        return build(self.tree, dtype), random_array(rng, shape, dtype, self.x_scale)


# -------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Signature:
    """What every branch of one sum shares."""

    base: int  # every channel count is a multiple of it
    in_channels: int
    out_channels: int
    stride: Pair
    span: Pair
    extended: bool = False  # also draw dilations, Scale, Linear and a BN before a map


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _groups(draw: st.DrawFn, a: int, b: int) -> int:
    return draw(st.sampled_from(_divisors(math.gcd(a, b))))


def _pads(before: Pair, after: Pair) -> Pads:
    return ((before[0], after[0]), (before[1], after[1]))


def _maybe_norm(draw: st.DrawFn, channels: int) -> list[Spec]:
    return [NormSpec(draw(bn_stats(channels)))] if draw(st.booleans()) else []


def _flush(value: float) -> float:
    """Magnitudes below 1e-6 become 0 (as in ``strategies.bn_stats``: no float32 subnormals)."""
    return 0.0 if abs(value) < 1e-6 else value


scale_values = st.one_of(
    st.sampled_from([-1.0, 0.0, 1.0, 0.5, -2.0]),
    st.floats(-4.0, 4.0).map(_flush),
)


@st.composite
def scale_specs(draw: st.DrawFn, channels: int, *, bias: bool = True) -> ScaleSpec:
    """A scale (a number, or one per channel; negative and zero included) and maybe a bias."""

    def values() -> float | tuple[float, ...]:
        if draw(st.booleans()):
            return draw(scale_values)
        return tuple(draw(st.lists(scale_values, min_size=channels, max_size=channels)))

    scale = values()
    offset = values() if bias and draw(st.booleans()) else None
    return ScaleSpec(channels, scale, offset)


def _maybe_scale(draw: st.DrawFn, sig: Signature, channels: int) -> list[Spec]:
    """A layer scale after a branch (PP-YOLOE's alpha, FastViT's gamma), in extended trees."""
    return [draw(scale_specs(channels))] if sig.extended and draw(st.booleans()) else []


def _pre_map(draw: st.DrawFn, channels: int) -> Spec:
    """A channelwise map whose output at zero input may be non-zero: a BN or a biased scale."""
    if draw(st.booleans()):
        return NormSpec(draw(bn_stats(channels)))
    return draw(scale_specs(channels))


def taps(draw: st.DrawFn, low: int, high: int) -> Pair:
    """``(k, r)``: ``k`` taps at dilation ``r`` spanning ``low <= r (k - 1) + 1 <= high``."""
    assert 1 <= low <= high, f"a span between {low} and {high}"
    rates = [
        r for r in range(1, MAX_DILATION + 1) if -(-(low - 1) // r) <= (high - 1) // r
    ]  # some multiple of r lies in [low - 1, high - 1]
    rate = draw(st.sampled_from(rates))
    gaps = draw(st.integers(-(-(low - 1) // rate), (high - 1) // rate))
    return gaps + 1, rate


def _span(k: int, r: int) -> int:
    return r * (k - 1) + 1


def _conv_leaf(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """One conv of the signature (any kernel 1..7 per axis; the padding may crop either side).

    In extended trees the kernel may be dilated (its span, not its taps, is at
    most 7) and is often padded to its centre, so that branches of one
    dilation line up on its grid; a layer scale may follow.
    """
    sizes, rates, before, after = [], [], [], []
    for axis in range(2):
        if sig.extended:
            k, r = taps(draw, 1, MAX_KERNEL)
            span = _span(k, r)
            centred = max(-2, (sig.span[axis] + span) // 2)
            b = draw(st.one_of(st.just(centred), st.integers(-2, span)))
        else:
            k, r = draw(st.integers(1, MAX_KERNEL)), 1
            span = k
            b = draw(st.integers(-2, k))
        sizes.append(k)
        rates.append(r)
        before.append(b)
        after.append(sig.span[axis] + span - b)
    groups = _groups(draw, sig.in_channels, sig.out_channels)
    conv = ConvSpec(
        sig.out_channels,
        sig.in_channels,
        groups,
        (sizes[0], sizes[1]),
        sig.stride,
        _pads((before[0], before[1]), (after[0], after[1])),
        draw(st.booleans()),
        draw(seeds),
        (rates[0], rates[1]),
    )
    return [
        conv,
        *_maybe_norm(draw, sig.out_channels),
        *_maybe_scale(draw, sig, sig.out_channels),
    ]


def _norm_then_map(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """A BN (or a biased scale) before a conv that does not pad: crops only, any stride, groups.

    Needs ``span <= -1`` on both axes: the conv's span is at most ``-span``
    (no padding) and at least ``-span - 4`` (crops of at most 2 a side).
    """
    sizes, rates, before, after = [], [], [], []
    for axis in range(2):
        k, r = taps(draw, max(1, -sig.span[axis] - 4), -sig.span[axis])
        total = sig.span[axis] + _span(k, r)  # before + after, in [-4, 0]
        b = draw(st.integers(max(-2, total), min(0, total + 2)))
        sizes.append(k)
        rates.append(r)
        before.append(b)
        after.append(total - b)
    conv = ConvSpec(
        sig.out_channels,
        sig.in_channels,
        _groups(draw, sig.in_channels, sig.out_channels),
        (sizes[0], sizes[1]),
        sig.stride,
        _pads((before[0], before[1]), (after[0], after[1])),
        draw(st.booleans()),
        draw(seeds),
        (rates[0], rates[1]),
    )
    return [
        _pre_map(draw, sig.in_channels),
        conv,
        *_maybe_norm(draw, sig.out_channels),
        *_maybe_scale(draw, sig, sig.out_channels),
    ]


def _linear(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """BN_Linear / Linear_BN shapes: maybe a BN or scale, a Linear, maybe a BN, maybe a scale."""
    pre = [_pre_map(draw, sig.in_channels)] if draw(st.booleans()) else []
    linear = LinearSpec(sig.out_channels, sig.in_channels, draw(st.booleans()), draw(seeds))
    return [
        *pre,
        linear,
        *_maybe_norm(draw, sig.out_channels),
        *_maybe_scale(draw, sig, sig.out_channels),
    ]


def _pool_leaf(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """An average pool (count_include_pad=True, zero padding >= 0) of the signature."""
    sizes, before, after = [], [], []
    for axis in range(2):
        k = draw(st.integers(max(1, -sig.span[axis]), MAX_KERNEL))
        total = sig.span[axis] + k
        b = draw(st.integers(0, total))
        sizes.append(k)
        before.append(b)
        after.append(total - b)
    pool = PoolSpec(
        sig.in_channels,
        (sizes[0], sizes[1]),
        sig.stride,
        _pads((before[0], before[1]), (after[0], after[1])),
    )
    return [pool, *_maybe_norm(draw, sig.out_channels)]


def _pointwise_then_window(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """DBB's 1x1 -> kxk (or 1x1 -> avg): a 1x1 conv, maybe a BN, maybe a Pad, then a window.

    The padding each side needs goes to the 1x1 conv, to a Pad holding the
    output at zero input, or (when that output is zero) to the window's own
    zero padding; a negative side is a crop by the window.
    """
    pool = sig.in_channels == sig.out_channels and draw(st.booleans())
    middle = sig.out_channels if pool else sig.base * draw(st.integers(1, 2))
    has_bias = draw(st.booleans())
    norm = _maybe_norm(draw, middle)
    zero_at_zero = not has_bias and not norm
    mode = draw(st.sampled_from(["first", "pad", *(["window"] if zero_at_zero else [])]))
    sizes, rates = [], []
    sides: dict[str, list[list[int]]] = {"first": [], "pad": [], "window": []}
    for axis in range(2):
        low = max(1, -sig.span[axis]) if pool else 1
        if sig.extended and not pool:
            k, r = taps(draw, low, MAX_KERNEL)
        else:
            k, r = draw(st.integers(low, MAX_KERNEL)), 1
        rates.append(r)
        top = sig.span[axis] + _span(k, r)
        total_before = draw(st.integers(0 if pool else min(-2, top), top))
        totals = (total_before, top - total_before)
        for part in sides.values():
            part.append([0, 0])
        for side, total in enumerate(totals):
            if total < 0:
                sides["window"][axis][side] = total
                continue
            first = total if mode == "first" else draw(st.integers(0, total))
            sides["first"][axis][side] = first
            if mode != "first":
                sides[mode][axis][side] = total - first
        sizes.append(k)

    def pads(name: str) -> Pads:
        (t, b), (left, r) = sides[name]
        return ((t, b), (left, r))

    steps: list[Spec] = [
        ConvSpec(
            middle,
            sig.in_channels,
            _groups(draw, sig.in_channels, middle),
            (1, 1),
            (1, 1),
            pads("first"),
            has_bias,
            draw(seeds),
        ),
        *norm,
    ]
    if mode == "pad":
        steps.append(PadSpec(pads("pad")))
    if pool:
        steps.append(PoolSpec(middle, (sizes[0], sizes[1]), sig.stride, pads("window")))
    else:
        steps.append(
            ConvSpec(
                sig.out_channels,
                middle,
                _groups(draw, middle, sig.out_channels),
                (sizes[0], sizes[1]),
                sig.stride,
                pads("window"),
                draw(st.booleans()),
                draw(seeds),
                (rates[0], rates[1]),
            )
        )
    return [*steps, *_maybe_norm(draw, sig.out_channels)]


def _two_convs(draw: st.DrawFn, sig: Signature) -> list[Spec]:
    """Conv k1 (stride s1, any padding) -> maybe BN -> conv k2 (stride s2, crops only).

    Folds to one kernel of ``k1 + s1 (k2 - 1)`` taps at stride ``s1 s2``, padded by
    ``p1 + s1 c`` (``c`` the crop): the padding of the first conv is drawn to
    give the signature's span. In extended trees either conv may be dilated
    (``k1`` and ``k2`` are then the spans ``r (k - 1) + 1``, at most 5).
    """
    middle = sig.base * draw(st.integers(1, 2))
    first_stride, second_stride, k1s, k2s, crops, first_pads = [], [], [], [], [], []
    r1s, r2s = [], []
    for axis in range(2):
        s = sig.stride[axis]
        s1 = draw(st.sampled_from([1, s])) if s > 1 else 1
        if sig.extended:
            (k1, r1), (k2, r2) = taps(draw, 1, 5), taps(draw, 1, 5)
        else:
            (k1, r1), (k2, r2) = (draw(st.integers(1, 5)), 1), (draw(st.integers(1, 3)), 1)
        crop = (draw(st.integers(-1, 0)), draw(st.integers(-1, 0)))
        size = _span(k1, r1) + s1 * (_span(k2, r2) - 1)
        before = draw(st.integers(-1, _span(k1, r1)))
        after = sig.span[axis] + size - s1 * (crop[0] + crop[1]) - before
        first_stride.append(s1)
        second_stride.append(s // s1)
        k1s.append(k1)
        k2s.append(k2)
        r1s.append(r1)
        r2s.append(r2)
        crops.append(crop)
        first_pads.append((before, after))
    first = ConvSpec(
        middle,
        sig.in_channels,
        _groups(draw, sig.in_channels, middle),
        (k1s[0], k1s[1]),
        (first_stride[0], first_stride[1]),
        (first_pads[0], first_pads[1]),
        draw(st.booleans()),
        draw(seeds),
        (r1s[0], r1s[1]),
    )
    second = ConvSpec(
        sig.out_channels,
        middle,
        _groups(draw, middle, sig.out_channels),
        (k2s[0], k2s[1]),
        (second_stride[0], second_stride[1]),
        (crops[0], crops[1]),
        draw(st.booleans()),
        draw(seeds),
        (r2s[0], r2s[1]),
    )
    return [first, *_maybe_norm(draw, middle), second, *_maybe_norm(draw, sig.out_channels)]


def _sequence(steps: list[Spec]) -> Spec:
    return steps[0] if len(steps) == 1 else SequentialSpec(tuple(steps))


@st.composite
def branches(draw: st.DrawFn, sig: Signature, depth: int) -> Spec:
    """One branch with the signature; ``depth > 0`` allows a nested sum inside."""
    same = sig.in_channels == sig.out_channels
    kinds = ["conv", "pointwise_then_window", "two_convs"]
    if same and sig.stride == (1, 1) and sig.span == (-1, -1):
        kinds += ["identity", "identity", "norm"]  # RepVGG's identity branch: often
    if same:
        kinds.append("pool")
    if depth > 0:
        kinds += ["sum_then_norm", "sum_then_pointwise", "pointwise_then_sum"]
    if sig.extended:
        kinds.append("prescale_then_conv")
        if same and sig.stride == (1, 1) and sig.span == (-1, -1):
            kinds.append("scale")
        if sig.stride == (1, 1) and sig.span == (-1, -1):
            kinds.append("linear")
        if max(sig.span) <= -1:
            kinds.append("norm_then_map")
        if depth > 0:
            kinds.append("sum_then_scale")  # a layer scale on a sum (FastViT's gamma)
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return _sequence(_conv_leaf(draw, sig))
    if kind == "pointwise_then_window":
        return _sequence(_pointwise_then_window(draw, sig))
    if kind == "two_convs":
        return _sequence(_two_convs(draw, sig))
    if kind == "identity":
        return IdentitySpec(sig.in_channels)
    if kind == "norm":
        return NormSpec(draw(bn_stats(sig.in_channels)))
    if kind == "pool":
        return _sequence(_pool_leaf(draw, sig))
    if kind == "prescale_then_conv":  # bias-free, so zero at zero: the conv's padding moves
        return _sequence([draw(scale_specs(sig.in_channels, bias=False)), *_conv_leaf(draw, sig)])
    if kind == "scale":
        return draw(scale_specs(sig.in_channels))
    if kind == "linear":
        return _sequence(_linear(draw, sig))
    if kind == "norm_then_map":
        return _sequence(_norm_then_map(draw, sig))
    if kind == "sum_then_scale":
        inner = draw(sums(sig, depth - 1))
        return SequentialSpec((inner, draw(scale_specs(sig.out_channels))))
    if kind == "sum_then_norm":  # QARepVGG: BN after the sum
        inner = draw(sums(sig, depth - 1))
        return SequentialSpec((inner, NormSpec(draw(bn_stats(sig.out_channels)))))
    middle = sig.base * draw(st.integers(1, 2))
    as_linear = sig.extended and draw(st.booleans())  # a Linear is a 1x1 conv without groups
    if kind == "sum_then_pointwise":
        inner = draw(sums(_with(sig, out_channels=middle), depth - 1))
        if as_linear:
            linear = LinearSpec(sig.out_channels, middle, draw(st.booleans()), draw(seeds))
            return SequentialSpec((inner, linear))
        pointwise = ConvSpec(
            sig.out_channels,
            middle,
            _groups(draw, middle, sig.out_channels),
            (1, 1),
            (1, 1),
            ((0, 0), (0, 0)),
            draw(st.booleans()),
            draw(seeds),
        )
        return SequentialSpec((inner, pointwise))
    # pointwise_then_sum: a bias-free 1x1 (zero at zero input), so the sum's padding moves
    if as_linear:
        linear = LinearSpec(middle, sig.in_channels, False, draw(seeds))
        return SequentialSpec((linear, draw(sums(_with(sig, in_channels=middle), depth - 1))))
    pointwise = ConvSpec(
        middle,
        sig.in_channels,
        _groups(draw, sig.in_channels, middle),
        (1, 1),
        (1, 1),
        ((0, 0), (0, 0)),
        False,
        draw(seeds),
    )
    inner = draw(sums(_with(sig, in_channels=middle), depth - 1))
    return SequentialSpec((pointwise, inner))


def _with(sig: Signature, **changes: Any) -> Signature:
    return replace(sig, **changes)


@st.composite
def sums(draw: st.DrawFn, sig: Signature, depth: int) -> Spec:
    """A Parallel of 1 to 3 branches (2 when nested) sharing the signature."""
    count = draw(st.integers(1, 3 if depth > 0 else 2))
    return ParallelSpec(tuple(draw(branches(sig, depth)) for _ in range(count)))


def _side_crops(pads: Pads) -> Pair:
    return (
        max(0, -pads[0][0]) + max(0, -pads[0][1]),
        max(0, -pads[1][0]) + max(0, -pads[1][1]),
    )


def crop_bound(spec: Spec) -> Pair:
    """The most rows and columns any leaf, or any folded sequence, crops from its input.

    A sequence's crops add up as ``fold`` moves them to the input (a crop after
    a stride-``s`` map is ``s`` times as many input pixels); a sum's folded crop
    is at most its branches' (its padding per side is the branches' largest).
    """
    if isinstance(spec, ParallelSpec):
        bounds = [crop_bound(branch) for branch in spec.branches]
        return (max(b[0] for b in bounds), max(b[1] for b in bounds))
    if not isinstance(spec, SequentialSpec):
        return _side_crops(spec.pads) if isinstance(spec, ConvSpec | PoolSpec) else (0, 0)
    running = [[0, 0], [0, 0]]
    stride = [1, 1]
    bound = [0, 0]
    for step in spec.steps:
        inner = crop_bound(step)
        bound = [max(bound[a], inner[a]) for a in range(2)]
        if isinstance(step, ConvSpec | PoolSpec | PadSpec):
            for axis in range(2):
                for side in range(2):
                    p = step.pads[axis][side]
                    running[axis][side] += p * stride[axis] if p < 0 else p
            if not isinstance(step, PadSpec):
                stride = [stride[a] * step.stride[a] for a in range(2)]
        (t, b), (left, r) = running
        folded = _side_crops(((t, b), (left, r)))
        bound = [max(bound[a], folded[a]) for a in range(2)]
    return (bound[0], bound[1])


spans = st.one_of(st.just(-1), st.integers(-6, 1))
strides = st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)])


@st.composite
def tree_cases(
    draw: st.DrawFn, *, depth: int = 1, max_batch: int = 2, extended: bool = False
) -> TreeCase:
    """A tree that folds (a sum, or a nested sum up to ``depth``) and an input that fits.

    ``extended`` adds dilated kernels, scales, linear layers and BNs before
    maps that do not pad (see the module docstring).
    """
    base = draw(st.integers(1, MAX_BASE_GROUPS))
    per_in = draw(st.integers(1, 2))
    per_out = draw(st.sampled_from([per_in, per_in, 1, 2]))
    stride = draw(strides)
    span = draw(st.tuples(spans, spans)) if draw(st.booleans()) else (-1, -1)
    sig = Signature(base, base * per_in, base * per_out, stride, span, extended)
    tree = draw(st.one_of(sums(sig, depth), branches(sig, depth)))
    # every window fits when H >= -span; no crop removes more than the whole input
    # (a separate bug: conv2d mis-sizes such crops, see test_algebra.py)
    crops = crop_bound(tree)
    return TreeCase(
        tree=tree,
        batch=draw(st.integers(1, max_batch)),
        in_channels=sig.in_channels,
        height=draw(st.integers(max(1, -span[0], crops[0]), MAX_SIDE)),
        width=draw(st.integers(max(1, -span[1], crops[1]), MAX_SIDE)),
        x_scale=draw(st.sampled_from([1.0, 1e-3, 1e3])),
        seed=draw(seeds),
    )
