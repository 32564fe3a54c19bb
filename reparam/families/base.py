"""What every family module shares: the registry, the block object, and a checked state reader.

A family is one published block class. Its module says, once, how the
block's published state-dict keys and constructor arguments become a tree of
the branch algebra (:mod:`reparam.core.algebra`); everything else (running
the train form, folding, counting, the deploy keys) walks that tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..core.algebra import (
    FoldedConv,
    Node,
    Sequential,
    evaluate,
    fold,
    magnitude,
    multiply_adds,
)
from ..core.algebra import num_parameters as tree_parameters
from ..core.checks import FloatArray
from ..core.errors import ReparamError
from ..core.params import BatchNorm

__all__ = [
    "FAMILIES",
    "PUBLISHED_NAMES",
    "REQUIRED",
    "Channels",
    "ConvOptions",
    "Family",
    "FamilyBlock",
    "StateReader",
    "register_family",
    "register_layout",
    "register_name",
]


class _Required:
    """Marks a constructor argument without a default."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a constructor argument the published class requires.
REQUIRED: Any = _Required()

Config = dict[str, Any]
Builder = Callable[["StateReader", Config], Node]


class Inferred(NamedTuple):
    """What a block's tensors say about its constructor arguments.

    Attributes
    ----------
    config : dict
        Arguments the shapes determine, or that do not change the fused conv
        (each of those is named in ``notes``).
    notes : tuple of str
        Values assumed because the tensors do not fix them and the fused conv
        does not depend on them (e.g. groups without an identity branch).
    ambiguous : tuple of (str, str)
        ``(option, why)`` for values the fusion needs but the tensors do not
        determine; they must be stated by the user.
    """

    config: dict[str, Any]
    notes: tuple[str, ...] = ()
    ambiguous: tuple[tuple[str, str], ...] = ()


#: ``infer(state, given)``: ``given`` holds the options the user stated (e.g. groups).
Inferrer = Callable[[Mapping[str, Any], Mapping[str, Any]], Inferred]


@dataclass(frozen=True)
class KeyLayout:
    """One naming of a family's state-dict keys, as some published code writes them.

    Attributes
    ----------
    name : str
        E.g. ``"official"``, ``"timm"``, ``"apple"``.
    families : tuple of str
        The families whose blocks use these keys (the first is the default;
        a user picks another with the ``family`` option, e.g. QARepVGG V2).
    marker : str
        A key every train-form block of this layout has (``"rbr_dense.conv.weight"``).
    top : tuple of str
        The first key segments that belong to the block (other keys under the
        block's prefix, such as ``se.*``, are not part of it).
    renames : tuple of (str, str)
        First segments renamed to the family's published names
        (timm's ``conv_kxk`` -> ``rbr_dense``).
    deploy_prefix : str
        Where this layout's deploy module keeps the fused conv.
    absent : tuple of str
        Keys that must not be present (they mark another layout).
    source : str
        Whose code uses these names.
    requires : tuple of str
        Further keys every train-form block of this layout has (where the
        marker alone is a name other modules use too).
    fits : callable, optional
        ``fits(shapes) -> bool`` on the shapes of the block's keys (published
        names): whether the tensors have this family's structure at all. A
        module with the same key names and another structure (ultralytics'
        ``LightConv`` has ``RepConv``'s names, a 1x1 then a depthwise kxk) is
        then not taken for a block of the family.
    deploy_marker : str
        The key whose presence marks the deploy form beside train-form keys
        (``{deploy_prefix}.weight`` by default; ``conv.bias`` where the train
        form has a ``conv.weight`` of its own).
    deploy_named : bool, default True
        Whether ``{deploy_prefix}.weight`` alone names a deployed block (not so
        for a generic name such as ``conv``).
    """

    name: str
    families: tuple[str, ...]
    marker: str
    top: tuple[str, ...]
    deploy_prefix: str
    renames: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()
    source: str = ""
    requires: tuple[str, ...] = ()
    fits: Callable[[Mapping[str, tuple[int, ...]]], bool] | None = None
    deploy_marker: str = ""
    deploy_named: bool = True

    def published(self, key: str) -> str:
        """Return the family's published name of a local key in this layout.

        A rename's old name may span several segments (timm's
        ``mixer.conv_kxk`` -> ``mixer.rbr_conv``); the longest match wins.
        """
        for old, new in sorted(self.renames, key=lambda pair: -len(pair[0])):
            if key == old or key.startswith(old + "."):
                return new + key[len(old) :]
        return key

    def local(self, key: str) -> str:
        """Return this layout's name of a published local key (the inverse of :meth:`published`)."""
        for old, new in sorted(self.renames, key=lambda pair: -len(pair[1])):
            if key == new or key.startswith(new + "."):
                return old + key[len(new) :]
        return key

    def matches(self, local_keys: set[str]) -> bool:
        """Whether a block's local keys (relative to its prefix) are of this layout."""
        return (
            self.marker in local_keys
            and all(key in local_keys for key in self.requires)
            and not any(key in local_keys for key in self.absent)
        )

    def fits_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether the block's tensor shapes (by local key) have the family's structure."""
        if self.fits is None:
            return True
        published = {self.published(key): shape for key, shape in shapes.items()}
        try:
            return bool(self.fits(published))
        except (KeyError, IndexError, ValueError):
            return False

    @property
    def deploy_key(self) -> str:
        """The key that marks a block of this layout in deploy form (see ``deploy_marker``)."""
        if self.deploy_marker:
            return self.deploy_marker
        return f"{self.deploy_prefix}.weight" if self.deploy_prefix else "weight"


#: Every registered key layout, most specific first (the walker takes the first match).
KEY_LAYOUTS: list[KeyLayout] = []


def register_layout(layout: KeyLayout) -> KeyLayout:
    """Add a key layout to :data:`KEY_LAYOUTS` (checked by the walker in registration order)."""
    KEY_LAYOUTS.append(layout)
    return layout


@dataclass(frozen=True)
class Family:
    """One published block class: how to read it and where its fused conv goes.

    Attributes
    ----------
    name : str
        The published class name, e.g. ``"DiverseBranchBlock"``.
    options : dict of str to default
        The published constructor's keyword arguments and their defaults
        (:data:`REQUIRED` where it has none).
    build : callable
        ``build(reader, config) -> Node``: reads the state through ``reader``
        and returns the train-form tree.
    deploy_prefix : str
        The published deploy module's name (``"rbr_reparam"``, ...): the fused
        conv is stored as ``{deploy_prefix}.weight`` and ``.bias``.
    source : str
        Where the block is published.
    infer : callable
        ``infer(state, given) -> Inferred``: the constructor arguments a
        block's state dict (published names) determines, given the options
        the user stated.
    kept : tuple of str
        Train-form modules the published deploy form keeps beside the fused
        conv (QARepVGG keeps its post-sum ``bn``); their tensors are written
        unchanged and the conv is fused without them.
    eps : float, default 1e-5
        The BatchNorm epsilon the published models are built with (PyTorch's
        default; ultralytics, YOLOv7 and YOLOv9 set 1e-3 when they build a
        model). :func:`reparam.families.from_state_dict` uses it unless told
        otherwise.
    aliases : tuple of (str, str)
        ``(name, option)``: another publication's name of an option (timm's
        ``in_dim`` for RepViT's ``a``); either name may be given, not both.
    linear : bool, default False
        The published deploy module is a fully connected layer
        (``weight`` of shape (C_out, C_in)), not a conv.
    """

    name: str
    options: dict[str, Any]
    build: Builder
    deploy_prefix: str
    source: str
    infer: Inferrer | None = None
    kept: tuple[str, ...] = ()
    eps: float = 1e-5
    aliases: tuple[tuple[str, str], ...] = ()
    linear: bool = False


#: Every registered family, by published class name.
FAMILIES: dict[str, Family] = {}

#: Other published class names: a name of another publication of one family (timm's
#: ``ConvNorm`` is RepViT's ``Conv2d_BN``), or a name two repositories publish with different
#: structures (``RepConv``), which then lists the registered names to choose from.
PUBLISHED_NAMES: dict[str, tuple[str, ...]] = {}


def register_name(name: str, *families: str) -> None:
    """Record another published class name of one family, or of several (then ambiguous).

    Raises
    ------
    ReparamError
        If the name is registered as a family itself.
    """
    if name in FAMILIES:
        raise ReparamError(f"register_name: {name!r} is a registered family")
    PUBLISHED_NAMES[name] = tuple(dict.fromkeys(PUBLISHED_NAMES.get(name, ()) + families))


def register_family(family: Family) -> Family:
    """Add a family to :data:`FAMILIES` (one entry per published class name).

    Raises
    ------
    ReparamError
        If the name is taken.
    """
    if family.name in FAMILIES:
        raise ReparamError(f"register_family: {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


class StateReader:
    """Reads a block's state dict, checking every key against the shape the config implies.

    Problems (missing, mis-shaped or non-floating tensors, bad BatchNorm
    values) are collected rather than raised one at a time; :meth:`finish`
    reports them, and every key that was never read, in one
    :class:`~reparam.ReparamError`. Missing arrays read as zeros meanwhile,
    so building can go on to find the other problems.

    Parameters
    ----------
    family : str
        For messages.
    state : mapping of str to array_like
        The block's own keys (no prefix); ``num_batches_tracked`` is ignored.
    eps : float
        BatchNorm epsilon (not stored in state dicts).
    key_names : callable, optional
        ``key_names(key) -> str``: how messages name a key (the checkpoint's
        full name of a block's key, e.g. ``neck.3.conv_1x1.bn.running_var``);
        the key itself by default.
    """

    def __init__(
        self,
        family: str,
        state: Mapping[str, Any],
        *,
        eps: float,
        key_names: Callable[[str], str] | None = None,
    ) -> None:
        if not isinstance(state, Mapping):
            raise ReparamError(
                f"{family}: state must be a mapping of key names to arrays; got "
                f"{type(state).__name__}"
            )
        self.family = family
        self.eps = eps
        self._name = key_names or str
        self._state = {str(key): value for key, value in state.items()}
        self._used: set[str] = set()
        self._problems: list[str] = []
        floating = [
            np.asarray(value).dtype
            for key, value in self._state.items()
            if not key.endswith("num_batches_tracked")
            and np.issubdtype(np.asarray(value).dtype, np.floating)
        ]
        self.dtype: np.dtype[Any] = np.result_type(*floating) if floating else np.dtype(np.float64)

    def array(self, key: str, shape: tuple[int, ...]) -> FloatArray:
        """Return the array at ``key``, which must have ``shape`` (zeros, recorded, when not)."""
        self._used.add(key)
        if key not in self._state:
            self._problems.append(f"missing key {self._name(key)} (expected shape {shape})")
            return np.zeros(shape, dtype=self.dtype)
        try:
            value = np.asarray(self._state[key])
        except Exception as exc:  # e.g. a tensor that needs .detach() first
            self._problems.append(f"{self._name(key)} cannot be read as an array ({exc})")
            return np.zeros(shape, dtype=self.dtype)
        if not np.issubdtype(value.dtype, np.floating):
            self._problems.append(
                f"{self._name(key)} has dtype {value.dtype}; expected a floating dtype"
            )
            return np.zeros(shape, dtype=self.dtype)
        if value.shape != shape:
            self._problems.append(
                f"shape mismatch: {self._name(key)} has shape {value.shape}, expected {shape}"
            )
            return np.zeros(shape, dtype=self.dtype)
        bad = int(np.count_nonzero(~np.isfinite(value)))
        if bad:
            self._problems.append(
                f"{self._name(key)} has {bad:,} non-finite values (NaN or inf) of {value.size:,}"
            )
            return np.zeros(shape, dtype=self.dtype)
        return value

    def has(self, key: str) -> bool:
        """Whether the state holds ``key`` (for blocks whose structure its keys tell)."""
        return key in self._state

    def bn(
        self,
        prefix: str,
        channels: int,
        *,
        affine: bool = True,
        statistics: tuple[str, str] = ("running_mean", "running_var"),
    ) -> BatchNorm:
        """Return the BatchNorm stored under ``prefix`` (weight, bias, running statistics).

        ``affine=False`` reads a BatchNorm without ``weight`` and ``bias``
        (gamma 1, beta 0), as PyTorch stores ``BatchNorm2d(affine=False)``.
        ``statistics`` names the running mean and variance (Paddle's
        ``_mean``, ``_variance``).
        """
        shape = (channels,)
        mean = self.array(f"{prefix}.{statistics[0]}", shape)
        var = self.array(f"{prefix}.{statistics[1]}", shape)
        if affine:
            gamma = self.array(f"{prefix}.weight", shape)
            beta = self.array(f"{prefix}.bias", shape)
        else:
            gamma, beta = np.ones(shape, dtype=mean.dtype), np.zeros(shape, dtype=mean.dtype)
        try:
            return BatchNorm(gamma, beta, mean, var, eps=self.eps)
        except ReparamError as exc:
            self._problems.append(f"{self._name(prefix)}: {exc}")
            ones = np.ones(shape, dtype=self.dtype)
            return BatchNorm(ones, ones * 0, ones * 0, ones, eps=self.eps)

    def problem(self, text: str) -> None:
        """Record a problem found while building."""
        self._problems.append(text)

    def finish(self) -> None:
        """Raise one error listing every problem and every key that was not read.

        Raises
        ------
        ReparamError
            ``"{family}: 2 problems in the state dict: missing key ...; unexpected key ..."``.
        """
        unexpected = [
            f"unexpected key {self._name(key)}"
            for key in self._state
            if key not in self._used and not key.endswith("num_batches_tracked")
        ]
        problems = self._problems + unexpected
        if problems:
            shown = problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
            raise ReparamError(
                f"{self.family}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the "
                "state dict: " + "; ".join(shown),
                problems=tuple(problems),
            )


@dataclass(frozen=True, eq=False)
class FamilyBlock:
    """A published block read from its state dict: its train form as a tree.

    Calling it runs the train form (output before the block's activation);
    :meth:`reparameterize` folds it into one convolution. Made by
    :func:`reparam.families.from_state_dict`.

    Attributes
    ----------
    family : Family
    config : dict
        Every constructor argument, defaults filled in.
    tree : Node
        The train form in the branch algebra.
    eps : float
        The BatchNorm epsilon used.
    """

    family: Family
    config: dict[str, Any]
    tree: Node
    eps: float
    _fold_cache: dict[str, FoldedConv] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The published class name."""
        return self.family.name

    def __call__(self, x: npt.ArrayLike) -> FloatArray:
        """Run the train form on an NCHW batch, or on (N, C) features for a linear block.

        The output is taken before the block's activation.
        """
        try:
            return evaluate(self.tree, x)
        except ReparamError as exc:
            raise ReparamError(f"{self.name}: {exc}") from None

    def reparameterize(self) -> FoldedConv:
        """Return the single convolution with bias that computes the same (cached).

        Raises
        ------
        ReparamError
            If the configuration does not fold (the message says why).
        """
        if "conv" not in self._fold_cache:
            try:
                self._fold_cache["conv"] = fold(self.tree)
            except ReparamError as exc:
                raise ReparamError(f"{self.name}: {exc}") from None
        return self._fold_cache["conv"]

    def deploy_conv(self) -> FoldedConv:
        """Return the conv the published deploy module holds.

        The whole fold (:meth:`reparameterize`), except for families whose
        deploy form keeps a train-form module (``Family.kept``, QARepVGG's
        post-sum ``bn``): then the fold of everything before it.
        """
        if not self.family.kept:
            return self.reparameterize()
        steps = self.tree.steps if isinstance(self.tree, Sequential) else (self.tree,)
        inner = [step for step in steps if step.name not in self.family.kept]
        try:
            return fold(inner[0] if len(inner) == 1 else Sequential(*inner))
        except ReparamError as exc:
            raise ReparamError(f"{self.name}: {exc}") from None

    def deploy_state(self, deploy_prefix: str | None = None) -> dict[str, FloatArray]:
        """Return the deploy conv under the published deploy module's key names.

        Parameters
        ----------
        deploy_prefix : str, optional
            The deploy module's name; the family's own by default (another key
            layout may name it differently, e.g. timm's ``reparam_conv``).
            ``""`` where the deploy module replaces the block itself (RepViT's
            fused blocks are stored as ``weight`` and ``bias``).
        """
        conv = self.deploy_conv()
        prefix = self.family.deploy_prefix if deploy_prefix is None else deploy_prefix
        dot = f"{prefix}." if prefix else ""
        weight, bias = conv.as_linear() if self.family.linear else (conv.kernel, conv.bias)
        return {f"{dot}weight": weight, f"{dot}bias": bias}

    def magnitude(self, x: npt.ArrayLike) -> FloatArray:
        """Return the magnitude of the summed terms (:func:`reparam.core.algebra.magnitude`)."""
        return magnitude(self.tree, x)

    @property
    def num_parameters(self) -> int:
        """Train-form parameters: kernels, biases, BatchNorm gamma and beta."""
        return tree_parameters(self.tree)

    def multiply_adds(self, height: int, width: int) -> int:
        """Train-form multiply-adds for one ``height x width`` image."""
        return multiply_adds(self.tree, height, width)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"{self.name}({shown})"


def resolve_config(family: Family, config: Mapping[str, Any]) -> Config:
    """Fill in defaults, and refuse unknown or missing constructor arguments.

    Raises
    ------
    ReparamError
        Naming the unknown options (and listing the known ones) or the
        missing required ones.
    """
    aliases = dict(family.aliases)
    config = dict(config)
    for alias, option in aliases.items():
        if alias in config:
            if option in config:
                raise ReparamError(
                    f"{family.name}: {alias} and {option} name one option (two publications' "
                    "names); give one"
                )
            config[option] = config.pop(alias)
    unknown = sorted(set(config) - set(family.options))
    if unknown:
        raise ReparamError(
            f"{family.name}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; expected some of {', '.join([*family.options, *aliases])}"
        )
    resolved = {key: config.get(key, default) for key, default in family.options.items()}
    missing = [key for key, value in resolved.items() if value is REQUIRED]
    if missing:
        raise ReparamError(
            f"{family.name}: missing required option{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (the published constructor has no default)"
        )
    return resolved


def iter_families() -> Iterator[Family]:
    """Iterate over the registered families in registration order."""
    return iter(FAMILIES.values())


# --------------------------------------------------------------------------- building helpers


def whole(config: Config, key: str, family: str, *, minimum: int = 1) -> int:
    """``config[key]`` as an int >= ``minimum``, or an error naming the option."""
    value = config[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ReparamError(f"{family}: {key} must be an integer; got {value!r}")
    if value < minimum:
        raise ReparamError(f"{family}: {key} must be >= {minimum}; got {value}")
    return int(value)


class ConvOptions(NamedTuple):
    """The constructor options every family shares, checked."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int

    @property
    def channels(self) -> Channels:
        """``(in_channels, out_channels, groups)`` for :func:`conv_bn`."""
        return Channels(self.in_channels, self.out_channels, self.groups)


def conv_options(config: Config, family: str) -> ConvOptions:
    """Check the shared options (positive ints, groups dividing both channel counts).

    ``padding`` is read where the family has it, else ``kernel_size // 2``.
    """
    in_channels = whole(config, "in_channels", family)
    out_channels = whole(config, "out_channels", family)
    size = whole(config, "kernel_size", family)
    stride = whole(config, "stride", family)
    padding = whole(config, "padding", family, minimum=0) if "padding" in config else size // 2
    groups = whole(config, "groups", family)
    check_groups(family, groups, ("in_channels", in_channels), ("out_channels", out_channels))
    return ConvOptions(in_channels, out_channels, size, stride, padding, groups)


def refuse(config: Config, family: str, **unsupported: tuple[Any, str]) -> None:
    """Refuse options whose value is not the one reparam can fold.

    ``unsupported`` maps an option to ``(the foldable value, why)``.
    """
    for key, (allowed, why) in unsupported.items():
        if config[key] != allowed:
            raise ReparamError(
                f"{family}: {key}={config[key]!r} is not supported; expected {allowed!r} ({why})"
            )


def check_groups(family: str, groups: int, *channels: tuple[str, int]) -> None:
    """Refuse ``groups`` that do not divide each named channel count."""
    for name, count in channels:
        if count % groups:
            raise ReparamError(
                f"{family}: groups={groups} does not divide {name}={count}; expected a divisor"
            )


class Channels(NamedTuple):
    """A convolution's input and output channels and groups."""

    in_channels: int
    out_channels: int
    groups: int


def conv_bn(
    reader: StateReader,
    prefix: str,
    channels: Channels,
    *,
    kernel: tuple[int, int],
    stride: int,
    padding: Any,
    conv: str = "conv",
    bn: str = "bn",
    affine: bool = True,
    statistics: tuple[str, str] = ("running_mean", "running_var"),
) -> Node:
    """Build the ``{prefix}.conv`` (no bias) then ``{prefix}.bn`` pair most families use.

    ``conv`` and ``bn`` name the two modules (``"0"`` and ``"1"`` in an
    ``nn.Sequential``); ``statistics`` the BatchNorm's running statistics.
    """
    from ..core.algebra import Conv, Norm, Sequential

    in_channels, out_channels, groups = channels
    dot = f"{prefix}." if prefix else ""
    weight = reader.array(f"{dot}{conv}.weight", (out_channels, in_channels // groups, *kernel))
    return Sequential(
        Conv(weight, stride=stride, padding=padding, groups=groups, name=f"{dot}{conv}"),
        Norm(
            reader.bn(f"{dot}{bn}", out_channels, affine=affine, statistics=statistics),
            name=f"{dot}{bn}",
        ),
        name=prefix,
    )


def shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """Return the shape of ``state[key]`` (empty when missing: the build reports it)."""
    value = state.get(key)
    return tuple(np.shape(value)) if value is not None else ()


def square_kernel(state: Mapping[str, Any], key: str) -> tuple[int, int, int]:
    """``(C_out, C_in // groups, k)`` of a square conv weight, or an error naming the key."""
    found = shape(state, key)
    if len(found) != 4 or found[2] != found[3]:
        raise ReparamError(
            f"{key} has shape {found or '(missing)'}; expected a square conv weight "
            "(C_out, C_in // groups, k, k)"
        )
    return found[0], found[1], found[2]


def groups_from_identity(out_channels: int, per_group: int, key: str) -> int:
    """Return the groups, when an identity branch makes ``C_in == C_out``."""
    if per_group == 0 or out_channels % per_group:
        raise ReparamError(
            f"{key}: an identity branch needs C_in == C_out, but C_out={out_channels} is not a "
            f"multiple of C_in // groups={per_group}"
        )
    return out_channels // per_group


UNKNOWN_GROUPS = "groups: not in the tensors and not needed to fuse; 1 assumed"
