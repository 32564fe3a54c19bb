"""RepLKNet's large-kernel conv (Ding et al., CVPR 2022): a large and a small kernel, with BNs.

Published as ``ReparamLargeKernelConv`` in DingXiaoH/RepLKNet-pytorch
(``replknet.py``): ``lkb_origin`` (KxK conv + BN, padding ``K // 2``) and,
unless ``small_kernel`` is None, ``small_conv`` (kxk conv + BN, padding
``k // 2``). Used depthwise with K up to 31. Deploy key: ``lkb_reparam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Node, Parallel
from ..core.conv import centred_padding
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
    refuse,
    register_layout,
    square_kernel,
    whole,
)

__all__ = ["FAMILY", "replknet_tree"]

NAME = "ReparamLargeKernelConv"


def replknet_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_K(x)) [+ bn(conv_k(x))]``."""
    refuse(
        config,
        NAME,
        small_kernel_merged=(False, "a merged block is one conv already; read lkb_reparam"),
    )
    options = conv_options(config, NAME)
    size, stride = options.kernel_size, options.stride
    common = options.channels
    branches = [
        conv_bn(reader, "lkb_origin", common, kernel=(size, size), stride=stride,
            padding=centred_padding(size),
        )
    ]  # fmt: skip
    if config["small_kernel"] is not None:
        small = whole(config, "small_kernel", NAME)
        if small > size or (size - small) % 2:
            raise ReparamError(
                f"{NAME}: small_kernel={small} must be at most kernel_size={size} and differ "
                "from it by an even number, so that it sits in the large kernel's centre"
            )
        branches.append(
            conv_bn(reader, "small_conv", common, kernel=(small, small), stride=stride,
                padding=centred_padding(small),
            )
        )  # fmt: skip
    return Parallel(*branches, name=NAME)


def infer_replknet(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: both kernel sizes from their shapes."""
    out_channels, per_group, size = square_kernel(state, "lkb_origin.conv.weight")
    small = None
    if "small_conv.conv.weight" in state:
        small = square_kernel(state, "small_conv.conv.weight")[2]
    groups = int(given.get("groups", 1))
    config = {
        "in_channels": per_group * groups,
        "out_channels": out_channels,
        "kernel_size": size,
        "stride": 1,
        "groups": groups,
        "small_kernel": small,
    }
    return Inferred(config, (UNKNOWN_GROUPS, "stride: not needed to fuse"))


FAMILY = Family(
    name=NAME,
    options={
        "in_channels": REQUIRED,
        "out_channels": REQUIRED,
        "kernel_size": REQUIRED,
        "stride": REQUIRED,
        "groups": REQUIRED,
        "small_kernel": REQUIRED,
        "small_kernel_merged": False,
    },
    build=replknet_tree,
    deploy_prefix="lkb_reparam",
    source="DingXiaoH/RepLKNet-pytorch replknet.py",
    infer=infer_replknet,
)

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="lkb_origin.conv.weight",
        top=("lkb_origin", "small_conv"),
        deploy_prefix="lkb_reparam",
        source="DingXiaoH/RepLKNet-pytorch ReparamLargeKernelConv",
    )
)
