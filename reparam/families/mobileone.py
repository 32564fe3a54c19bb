"""MobileOne's block (Vasu et al., CVPR 2023): k parallel conv+BN, a 1x1 scale branch, identity.

Published as ``MobileOneBlock`` in apple/ml-mobileone (``mobileone.py``).
``rbr_conv.{i}`` for ``i < num_conv_branches`` (kxk conv + BN at the
block's padding), ``rbr_scale`` (1x1 conv + BN at padding 0, only when
``kernel_size > 1``), ``rbr_skip`` (a BatchNorm, only when
``in_channels == out_channels`` and ``stride == 1``). The published
converter pads the scale kernel by ``kernel_size // 2`` whatever ``padding``
is, so the block is only consistent with ``padding == kernel_size // 2``.
Deploy key: ``reparam_conv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Node, Norm, Parallel
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
    UNKNOWN_GROUPS,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    conv_bn,
    conv_options,
    groups_from_identity,
    refuse,
    register_layout,
    square_kernel,
    whole,
)

__all__ = ["FAMILY", "mobileone_tree"]

NAME = "MobileOneBlock"


def mobileone_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``scale + skip + sum_i conv_i``."""
    refuse(
        config,
        NAME,
        inference_mode=(False, "an inference block is one conv already; read reparam_conv"),
        use_se=(False, "squeeze-and-excitation is not linear"),
    )
    options = conv_options(config, NAME)
    in_channels, out_channels, size, stride, padding = options[:5]
    count = whole(config, "num_conv_branches", NAME, minimum=0)
    if size > 1 and padding != size // 2:
        raise ReparamError(
            f"{NAME}: padding={padding} with kernel_size={size}: the scale branch (1x1, padding "
            f"0) gives a different output size, so the published block does not run; expected "
            f"padding={size // 2}"
        )
    common = options.channels
    branches: list[Node] = []
    if size > 1:
        branches.append(
            conv_bn(reader, "rbr_scale", common, kernel=(1, 1), stride=stride, padding=0)
        )
    if in_channels == out_channels and stride == 1:
        branches.append(Norm(reader.bn("rbr_skip", out_channels), name="rbr_skip"))
    branches += [
        conv_bn(
            reader, f"rbr_conv.{index}", common, kernel=(size, size), stride=stride, padding=padding
        )
        for index in range(count)
    ]
    if not branches:
        raise ReparamError(f"{NAME}: this configuration has no branch (num_conv_branches=0)")
    return Parallel(*branches, name=NAME)


def infer_mobileone(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: the branches counted, the skip fixes the groups."""
    out_channels, per_group, size = square_kernel(state, "rbr_conv.0.conv.weight")
    count = 0
    while f"rbr_conv.{count}.conv.weight" in state:
        count += 1
    config = {
        "out_channels": out_channels,
        "kernel_size": size,
        "padding": size // 2,
        "num_conv_branches": count,
    }
    if "rbr_skip.running_var" in state:
        groups = groups_from_identity(out_channels, per_group, "rbr_skip")
        return Inferred(config | {"in_channels": out_channels, "groups": groups, "stride": 1})
    groups = int(given.get("groups", 1))
    stride = 2 if per_group * groups == out_channels else 1
    config |= {"in_channels": per_group * groups, "groups": groups, "stride": stride}
    return Inferred(config, (UNKNOWN_GROUPS, "stride: not needed to fuse"))


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
        "inference_mode": False,
        "use_se": False,
        "num_conv_branches": 1,
    },
    build=mobileone_tree,
    deploy_prefix="reparam_conv",
    source="apple/ml-mobileone mobileone.py",
    infer=infer_mobileone,
)

register_layout(
    KeyLayout(
        name="apple",
        families=(NAME,),
        marker="rbr_conv.0.conv.weight",
        top=("rbr_conv", "rbr_scale", "rbr_skip"),
        deploy_prefix="reparam_conv",
        source="apple/ml-mobileone MobileOneBlock",
    )
)
register_layout(
    KeyLayout(
        name="timm",
        families=(NAME,),
        marker="conv_kxk.0.conv.weight",
        top=("conv_kxk", "conv_scale", "identity"),
        deploy_prefix="reparam_conv",
        renames=(("conv_kxk", "rbr_conv"), ("conv_scale", "rbr_scale"), ("identity", "rbr_skip")),
        source="timm byobnet MobileOneBlock",
    )
)
