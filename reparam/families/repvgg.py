"""RepVGG's block (Ding et al., CVPR 2021): kxk conv+BN, 1x1 conv+BN, identity BN.

Published as ``RepVGGBlock`` in DingXiaoH/RepVGG (``repvgg.py``); YOLOv6's
``RepVGGBlock`` has the same keys. Train keys: ``rbr_dense.{conv,bn}``,
``rbr_1x1.{conv,bn}``, ``rbr_identity`` (a BatchNorm, only when
``in_channels == out_channels`` and ``stride == 1``); deploy ``rbr_reparam``.
A block without any key of its 1x1 or identity branch (the paper's
ablations) is read without that branch.
The 1x1 branch pads by ``padding - kernel_size // 2``. The published block
asserts ``kernel_size == 3`` and ``padding == 1``; any odd kernel with
``padding == kernel_size // 2`` folds here. ``dilation`` never reaches the
published train convs (only the deploy conv), so it is accepted and unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Node
from ..core.errors import ReparamError
from ..core.fusion import repvgg_tree
from .base import (
    REQUIRED,
    UNKNOWN_GROUPS,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    conv_options,
    groups_from_identity,
    refuse,
    register_layout,
    square_kernel,
)

__all__ = ["FAMILY", "repvgg_block_tree"]

NAME = "RepVGGBlock"
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_BRANCH_KEYS = ("conv.weight", *(f"bn.{key}" for key in _BN_KEYS))


def repvgg_block_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_kxk(x)) + bn(conv_1x1(x)) [+ bn(x)]``."""
    refuse(
        config,
        NAME,
        deploy=(False, "a deploy block is one conv already; read rbr_reparam directly"),
        use_se=(False, "squeeze-and-excitation is not linear"),
        padding_mode=("zeros", "only zero padding folds into the 1x1 branch"),
    )
    options = conv_options(config, NAME)
    in_channels, out_channels, size, stride, padding = options[:5]
    if padding < size // 2:
        raise ReparamError(
            f"{NAME}: padding={padding} with kernel_size={size} leaves the 1x1 branch a negative "
            f"padding; expected padding >= {size // 2} (the published block uses 3 and 1)"
        )
    per_group = in_channels // options.groups
    dense = reader.array("rbr_dense.conv.weight", (out_channels, per_group, size, size))
    small = None  # a block without a 1x1 branch (an ablation of the paper) has none of its keys
    if any(reader.has(f"rbr_1x1.{key}") for key in _BRANCH_KEYS):
        weight = reader.array("rbr_1x1.conv.weight", (out_channels, per_group, 1, 1))
        small = (weight, reader.bn("rbr_1x1.bn", out_channels))
    identity = None  # only where it can exist, and only when some of its keys are there
    if (
        in_channels == out_channels
        and stride == 1
        and any(reader.has(f"rbr_identity.{key}") for key in _BN_KEYS)
    ):
        identity = reader.bn("rbr_identity", out_channels)
    return repvgg_tree(
        (dense, reader.bn("rbr_dense.bn", out_channels)),
        small,
        identity,
        stride=stride,
        groups=options.groups,
        padding=padding,
        names=("rbr_dense", "rbr_1x1", "rbr_identity"),
        name=NAME,
    )


def infer_repvgg(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: an identity branch means stride 1, C_in == C_out."""
    out_channels, per_group, size = square_kernel(state, "rbr_dense.conv.weight")
    config = {"out_channels": out_channels, "kernel_size": size, "padding": size // 2}
    if "rbr_identity.running_var" in state:
        groups = groups_from_identity(out_channels, per_group, "rbr_identity")
        config |= {"in_channels": out_channels, "groups": groups, "stride": 1}
        return Inferred(config)
    groups = int(given.get("groups", 1))
    stride = 2 if per_group * groups == out_channels else 1  # no identity, C_in == C_out: strided
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
        "padding_mode": "zeros",
        "deploy": False,
        "use_se": False,
    },
    build=repvgg_block_tree,
    deploy_prefix="rbr_reparam",
    source="DingXiaoH/RepVGG repvgg.py (YOLOv6 yolov6/layers/common.py: same keys)",
    infer=infer_repvgg,
)

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="rbr_dense.conv.weight",
        top=("rbr_dense", "rbr_1x1", "rbr_identity"),
        deploy_prefix="rbr_reparam",
        absent=("rbr_1x1.weight",),
        source="DingXiaoH/RepVGG RepVGGBlock; YOLOv6 RepVGGBlock",
    )
)
register_layout(
    KeyLayout(
        name="timm",
        families=(NAME,),
        marker="conv_kxk.conv.weight",
        top=("conv_kxk", "conv_1x1", "identity"),
        deploy_prefix="reparam_conv",
        renames=(("conv_kxk", "rbr_dense"), ("conv_1x1", "rbr_1x1"), ("identity", "rbr_identity")),
        source="timm byobnet RepVggBlock",
    )
)
