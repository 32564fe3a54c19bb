"""Diverse Branch Block (Ding et al., CVPR 2021): four branches, two of them sequences.

Published as ``DiverseBranchBlock`` in DingXiaoH/DiverseBranchBlock
(``diversebranchblock.py``). With ``p = kernel_size // 2`` (the published
block asserts ``padding == p``) and ``D = internal_channels_1x1_3x3``:

- ``dbb_origin``: kxk conv + BN;
- ``dbb_1x1``: 1x1 conv + BN (only when ``groups < out_channels``);
- ``dbb_avg``: 1x1 conv, BN, pad by ``p`` with the BN's output at zero input
  (``dbb_avg.bn`` is a ``BNAndPadLayer``, keys ``dbb_avg.bn.bn.*``), kxk
  average pool, BN (``avgbn``); in the depthwise form (``groups >=
  out_channels``) only the pool, zero-padded by ``p`` on the input, and BN;
- ``dbb_1x1_kxk``: 1x1 conv to ``D`` channels (``idconv1``, whose identity is
  added at run time and not stored, when ``D == in_channels``; ``conv1``
  otherwise), BN padded with its output at zero input (``bn1.bn``), kxk conv
  with padding 0 (``conv2``), BN (``bn2``).

``D`` defaults to ``in_channels``, or ``2 * in_channels`` in the depthwise
form. Every conv of the block has its groups. Deploy key: ``dbb_reparam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import AvgPool, Conv, Identity, Node, Norm, Pad, Parallel, Sequential
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    check_groups,
    conv_bn,
    conv_options,
    refuse,
    register_layout,
    shape,
    square_kernel,
    whole,
)

__all__ = ["FAMILY", "dbb_tree"]

NAME = "DiverseBranchBlock"


def _bn_and_pad(reader: StateReader, prefix: str, channels: int, padding: int) -> list[Node]:
    """``BNAndPadLayer``: a BN, then padding with the BN's output at zero input."""
    bn = reader.bn(f"{prefix}.bn", channels)
    steps: list[Node] = [Norm(bn, name=f"{prefix}.bn")]
    if padding > 0:
        steps.append(Pad(padding, bn.output_at_zero(), name=f"{prefix} (pad with BN(0))"))
    return steps


def dbb_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: the sum of the four (depthwise: three) branches."""
    refuse(
        config,
        NAME,
        deploy=(False, "a deploy block is one conv already; read dbb_reparam directly"),
        nonlinear=(None, "the output is taken before the block's nonlinearity"),
        dilation=(1, "the published branches differ in size with dilation"),
    )
    options = conv_options(config, NAME)
    in_channels, out_channels, size, stride, padding, groups = options
    if size % 2 == 0 or padding != size // 2:
        raise ReparamError(
            f"{NAME}: expected an odd kernel_size and padding == kernel_size // 2 (the published "
            f"block asserts it); got kernel_size={size}, padding={padding}"
        )
    depthwise = groups >= out_channels
    internal = config["internal_channels_1x1_3x3"]
    internal = (2 * in_channels if depthwise else in_channels) if internal is None else internal
    config["internal_channels_1x1_3x3"] = internal
    internal = whole(config, "internal_channels_1x1_3x3", NAME)
    check_groups(NAME, groups, ("internal_channels_1x1_3x3", internal))
    if depthwise and in_channels != out_channels:
        raise ReparamError(
            f"{NAME}: the depthwise form (groups >= out_channels) pools the input itself, so it "
            f"needs in_channels == out_channels; got {in_channels} and {out_channels}"
        )
    common = options.channels
    branches: list[Node] = [
        conv_bn(reader, "dbb_origin", common, kernel=(size, size), stride=stride, padding=padding)
    ]
    if not depthwise:
        branches.append(conv_bn(reader, "dbb_1x1", common, kernel=(1, 1), stride=stride, padding=0))
        squeeze = reader.array("dbb_avg.conv.weight", (out_channels, in_channels // groups, 1, 1))
        pool = [
            Conv(squeeze, groups=groups, name="dbb_avg.conv"),
            *_bn_and_pad(reader, "dbb_avg.bn", out_channels, padding),
            AvgPool(out_channels, size, stride=stride, name="dbb_avg.avg"),
        ]
    else:
        pool = [AvgPool(in_channels, size, stride=stride, padding=padding, name="dbb_avg.avg")]
    avgbn = reader.bn("dbb_avg.avgbn", out_channels)
    branches.append(Sequential(*pool, Norm(avgbn, name="dbb_avg.avgbn"), name="dbb_avg"))

    first: Node
    if internal == in_channels:
        weight = reader.array(
            "dbb_1x1_kxk.idconv1.weight", (in_channels, in_channels // groups, 1, 1)
        )
        first = Parallel(
            Conv(weight, groups=groups, name="dbb_1x1_kxk.idconv1"),
            Identity(in_channels, name="dbb_1x1_kxk.idconv1 (identity added at run time)"),
            name="dbb_1x1_kxk.idconv1",
        )
    else:
        weight = reader.array("dbb_1x1_kxk.conv1.weight", (internal, in_channels // groups, 1, 1))
        first = Conv(weight, groups=groups, name="dbb_1x1_kxk.conv1")
    second = reader.array(
        "dbb_1x1_kxk.conv2.weight", (out_channels, internal // groups, size, size)
    )
    branches.append(
        Sequential(
            first,
            *_bn_and_pad(reader, "dbb_1x1_kxk.bn1", internal, padding),
            Conv(second, stride=stride, groups=groups, name="dbb_1x1_kxk.conv2"),
            Norm(reader.bn("dbb_1x1_kxk.bn2", out_channels), name="dbb_1x1_kxk.bn2"),
            name="dbb_1x1_kxk",
        )
    )
    return Parallel(*branches, name=NAME)


def infer_dbb(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: the 1x1 -> kxk pair fixes the groups."""
    out_channels, per_group, size = square_kernel(state, "dbb_origin.conv.weight")
    first = "dbb_1x1_kxk.idconv1.weight"
    if first not in state:
        first = "dbb_1x1_kxk.conv1.weight"
    internal = (shape(state, first) or (0,))[0]
    second = shape(state, "dbb_1x1_kxk.conv2.weight")
    if len(second) != 4 or second[1] == 0 or internal % second[1]:
        raise ReparamError(
            f"dbb_1x1_kxk.conv2.weight has shape {second or '(missing)'}; expected "
            f"(C_out, internal // groups, k, k) with internal = {internal} from {first}"
        )
    groups = internal // second[1]
    config = {
        "in_channels": per_group * groups,
        "out_channels": out_channels,
        "kernel_size": size,
        "padding": size // 2,
        "groups": groups,
        "internal_channels_1x1_3x3": internal,
        "stride": 1,
    }
    return Inferred(config, ("stride: not needed to fuse",))


FAMILY = Family(
    name=NAME,
    options={
        "in_channels": REQUIRED,
        "out_channels": REQUIRED,
        "kernel_size": REQUIRED,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "internal_channels_1x1_3x3": None,
        "deploy": False,
        "nonlinear": None,
        "single_init": False,
    },
    build=dbb_tree,
    deploy_prefix="dbb_reparam",
    source="DingXiaoH/DiverseBranchBlock diversebranchblock.py",
    infer=infer_dbb,
)

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="dbb_origin.conv.weight",
        top=("dbb_origin", "dbb_1x1", "dbb_1x1_kxk", "dbb_avg"),
        deploy_prefix="dbb_reparam",
        source="DingXiaoH/DiverseBranchBlock DiverseBranchBlock",
    )
)
