"""RepVGG architectures as data: the published configurations, block specs and counts.

The published configurations are plain data (:data:`ARCHITECTURES`); a
network's blocks are described by :class:`BlockSpec` (channels, stride,
groups), which is what a checkpoint's tensors determine.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypeAlias

from ..core.checks import positive_int
from ..core.conv import conv_output_size
from ..core.errors import ReparamError

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BlockSpec",
    "Form",
    "NamedSpecs",
    "architecture_differences",
    "block_specs",
    "canonical_architecture",
    "match_architecture",
    "spec_multiply_adds",
    "spec_parameters",
]

Form: TypeAlias = Literal["train", "deploy"]


# --------------------------------------------------------------------------- configurations


class Architecture(NamedTuple):
    """The shape of a RepVGG: widths and depths per stage, and where groups apply.

    Attributes
    ----------
    widths : tuple of int
        Output channels of each stage, the stem (``stage0``) first.
    depths : tuple of int
        Blocks per stage, the stem first (always 1: the stem is one block).
    groups : int, default 1
        Groups of the grouped layers (2 for ``g2``, 4 for ``g4``).
    grouped_layers : tuple of int, default ()
        Which blocks are grouped, counting the blocks after the stem from 1.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    groups: int = 1
    grouped_layers: tuple[int, ...] = ()


def _published(depths: tuple[int, ...], a: float, b: float, groups: int = 1) -> Architecture:
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    grouped = tuple(range(2, 27, 2)) if groups > 1 else ()
    return Architecture(widths, (1, *depths), groups, grouped)


_DEPTHS_A = (2, 4, 14, 1)
_DEPTHS_B = (4, 6, 16, 1)

#: Every published RepVGG (Ding et al., 2021), by name.
ARCHITECTURES: dict[str, Architecture] = {
    "RepVGG-A0": _published(_DEPTHS_A, 0.75, 2.5),
    "RepVGG-A1": _published(_DEPTHS_A, 1.0, 2.5),
    "RepVGG-A2": _published(_DEPTHS_A, 1.5, 2.75),
    "RepVGG-B0": _published(_DEPTHS_B, 1.0, 2.5),
    "RepVGG-B1": _published(_DEPTHS_B, 2.0, 4.0),
    "RepVGG-B1g2": _published(_DEPTHS_B, 2.0, 4.0, 2),
    "RepVGG-B1g4": _published(_DEPTHS_B, 2.0, 4.0, 4),
    "RepVGG-B2": _published(_DEPTHS_B, 2.5, 5.0),
    "RepVGG-B2g4": _published(_DEPTHS_B, 2.5, 5.0, 4),
    "RepVGG-B3": _published(_DEPTHS_B, 3.0, 5.0),
    "RepVGG-B3g4": _published(_DEPTHS_B, 3.0, 5.0, 4),
}


def canonical_architecture(name: str) -> str:
    """Return the published name for ``name``, accepting ``"A0"``, ``"repvgg_a0"``, ...

    Parameters
    ----------
    name : str
        An architecture name in any common spelling (case-insensitive).

    Returns
    -------
    str
        The key into :data:`ARCHITECTURES`, e.g. ``"RepVGG-A0"``.

    Raises
    ------
    ReparamError
        If the name is not a published configuration.

    Examples
    --------
    >>> canonical_architecture("repvgg_b1g4")
    'RepVGG-B1g4'
    """
    key = str(name).lower().replace("_", "-")
    key = key.removeprefix("repvgg-").removeprefix("repvgg")
    for published in ARCHITECTURES:
        if published.lower().removeprefix("repvgg-") == key:
            return published
    raise ReparamError(
        f"architecture: unknown name; got {name!r}, expected one of "
        + ", ".join(ARCHITECTURES)
        + " (or A0, b1g4, repvgg_a0, ...)"
    )


class BlockSpec(NamedTuple):
    """The shape of one block: what a checkpoint's tensors determine.

    Attributes
    ----------
    in_channels, out_channels : int
        Channels in and out.
    stride : int
        1 or 2 (the same for both convolutions).
    groups : int
        Groups of both convolutions.
    """

    in_channels: int
    out_channels: int
    stride: int
    groups: int

    @property
    def has_identity(self) -> bool:
        """Whether the train form has an identity branch (same channels, stride 1)."""
        return self.in_channels == self.out_channels and self.stride == 1


NamedSpecs: TypeAlias = tuple[tuple[str, BlockSpec], ...]


def _check_architecture(arch: Architecture) -> None:
    func = "block_specs"
    if len(arch.widths) != len(arch.depths) or not arch.widths:
        raise ReparamError(
            f"{func}: widths and depths must have one entry per stage; got "
            f"{len(arch.widths)} widths and {len(arch.depths)} depths"
        )
    if arch.depths[0] != 1:
        raise ReparamError(f"{func}: the stem (stage0) is one block; got depth {arch.depths[0]}")
    for value in (*arch.widths, *arch.depths, arch.groups):
        positive_int(value, func=func, name="widths, depths and groups")


def block_specs(arch: str | Architecture, *, in_channels: int = 3) -> NamedSpecs:
    """List the blocks of an architecture with their names.

    Parameters
    ----------
    arch : str or Architecture
        A published name (see :data:`ARCHITECTURES`) or a custom architecture.
    in_channels : int, default 3
        Channels of the input images.

    Returns
    -------
    tuple of (str, BlockSpec)
        ``("stage0", spec)``, then ``("stage{s}.{i}", spec)`` for every block
        of stages ``s >= 1``. The stem and the first block of every stage
        have stride 2.

    Raises
    ------
    ReparamError
        On an unknown name, or widths and depths that do not describe stages.

    Examples
    --------
    >>> specs = block_specs("A0")
    >>> len(specs), specs[0], specs[-1][0]
    (22, ('stage0', BlockSpec(in_channels=3, out_channels=48, stride=2, groups=1)), 'stage4.0')
    """
    config = ARCHITECTURES[canonical_architecture(arch)] if isinstance(arch, str) else arch
    _check_architecture(config)
    channels = positive_int(in_channels, func="block_specs", name="in_channels")
    specs: list[tuple[str, BlockSpec]] = [("stage0", BlockSpec(channels, config.widths[0], 2, 1))]
    channels = config.widths[0]
    layer = 0
    for stage, (width, depth) in enumerate(
        zip(config.widths[1:], config.depths[1:], strict=True), start=1
    ):
        for index in range(depth):
            layer += 1
            groups = config.groups if layer in config.grouped_layers else 1
            spec = BlockSpec(channels, width, 2 if index == 0 else 1, groups)
            specs.append((f"stage{stage}.{index}", spec))
            channels = width
    return tuple(specs)


def spec_parameters(specs: NamedSpecs, *, num_classes: int, form: Form = "train") -> int:
    """Count parameters from block specs, without building any array.

    Counts convolution and linear weights, biases and BatchNorm gamma and
    beta, not the running statistics (the convention of the RepVGG paper).
    The train form has a 1x1 branch in every block and an identity branch
    where :attr:`BlockSpec.has_identity`.

    Parameters
    ----------
    specs : tuple of (str, BlockSpec)
        As returned by :func:`block_specs`.
    num_classes : int
        Outputs of the linear head.
    form : {"train", "deploy"}
        Which form to count.

    Returns
    -------
    int

    Examples
    --------
    >>> round(spec_parameters(block_specs("A0"), num_classes=1000, form="deploy") / 1e6, 2)
    8.31
    """
    total = 0
    for _, spec in specs:
        per_kernel = spec.out_channels * (spec.in_channels // spec.groups)
        if form == "deploy":
            total += per_kernel * 9 + spec.out_channels
        else:
            total += per_kernel * 9 + 2 * spec.out_channels  # 3x3 conv + BN
            total += per_kernel + 2 * spec.out_channels  # 1x1 conv + BN
            total += 2 * spec.out_channels if spec.has_identity else 0
    features = specs[-1][1].out_channels
    return total + features * num_classes + num_classes


def spec_multiply_adds(
    specs: NamedSpecs, *, num_classes: int, height: int, width: int, form: Form = "deploy"
) -> int:
    """Count the convolution and linear multiply-adds of one image, from block specs.

    Parameters
    ----------
    specs : tuple of (str, BlockSpec)
        As returned by :func:`block_specs`.
    num_classes : int
        Outputs of the linear head.
    height, width : int
        Input image size.
    form : {"train", "deploy"}
        ``"train"`` adds the 1x1 branches; BatchNorm and ReLU are not counted.

    Returns
    -------
    int

    Examples
    --------
    >>> specs = block_specs("A0")
    >>> round(spec_multiply_adds(specs, num_classes=1000, height=224, width=224) / 1e9, 2)
    1.36
    """
    total = 0
    for _, spec in specs:
        height = conv_output_size(height, 3, stride=spec.stride, padding=1, dilation=1)
        width = conv_output_size(width, 3, stride=spec.stride, padding=1, dilation=1)
        taps = 9 + (1 if form == "train" else 0)
        total += spec.out_channels * (spec.in_channels // spec.groups) * taps * height * width
    return total + specs[-1][1].out_channels * num_classes


def match_architecture(specs: NamedSpecs) -> str | None:
    """Return the published architecture with exactly these blocks, or None.

    Parameters
    ----------
    specs : tuple of (str, BlockSpec)
        Named blocks, e.g. inferred from a checkpoint. The head is not part
        of the match, so any number of classes fits.

    Returns
    -------
    str or None
        A key of :data:`ARCHITECTURES`.

    Examples
    --------
    >>> match_architecture(block_specs("B1g2"))
    'RepVGG-B1g2'
    """
    for name in ARCHITECTURES:
        if block_specs(name) == tuple(specs):
            return name
    return None


def architecture_differences(specs: NamedSpecs, arch: str) -> list[str]:
    """Describe how ``specs`` differ from a published architecture (empty when equal).

    Parameters
    ----------
    specs : tuple of (str, BlockSpec)
        The blocks found, e.g. in a checkpoint.
    arch : str
        A published architecture name.

    Returns
    -------
    list of str
        One line per difference: missing or extra blocks, then blocks whose
        channels, stride or groups differ.
    """
    expected = dict(block_specs(arch))
    found = dict(specs)
    lines = [f"missing block {name}" for name in expected if name not in found]
    lines += [f"unexpected block {name}" for name in found if name not in expected]
    for name, spec in found.items():
        want = expected.get(name)
        if want is not None and want != spec:
            lines.append(f"{name}: got {_describe(spec)}, expected {_describe(want)}")
    return lines


def _describe(spec: BlockSpec) -> str:
    return (
        f"{spec.in_channels}->{spec.out_channels} channels, stride {spec.stride}, "
        f"groups {spec.groups}"
    )
