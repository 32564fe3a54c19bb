"""ACNet's asymmetric convolution block (Ding et al., ICCV 2019): kxk + kx1 + 1xk, each with BN.

Published as ``ACBlock`` in DingXiaoH/ACNet (``acnet/acb.py``). With
``c = padding - kernel_size // 2``, the kx1 branch (``ver_conv``) pads
``(padding, c)`` and the 1xk branch (``hor_conv``) ``(c, padding)``
(height, width); when ``c < 0`` they crop the input by ``-c`` instead,
which the algebra writes as a negative padding. ``use_affine=False`` gives
BatchNorms without weight and bias. ``use_last_bn`` (older versions) adds a
BatchNorm after the sum, which the published converter drops; here it folds.
Deploy key: ``fused_conv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Node, Norm, Parallel, Sequential
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
)

__all__ = ["FAMILY", "acnet_tree"]

NAME = "ACBlock"


def acnet_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_kxk) + bn(conv_kx1) + bn(conv_1xk)`` [then ``last_bn``]."""
    refuse(
        config,
        NAME,
        deploy=(False, "a deploy block is one conv already; read fused_conv directly"),
        dilation=(1, "the published branches differ in size with dilation"),
        padding_mode=("zeros", "only zero padding folds"),
    )
    options = conv_options(config, NAME)
    out_channels, size, stride, padding = options[1:5]
    affine = bool(config["use_affine"])
    side = padding - size // 2
    common = options.channels
    square, ver, hor = (
        (padding, padding),
        ((padding, padding), (side, side)),
        ((side, side), (padding, padding)),
    )
    tree: Node = Parallel(
        conv_bn(reader, "", common, kernel=(size, size), stride=stride, padding=square,
                conv="square_conv", bn="square_bn", affine=affine),
        conv_bn(reader, "", common, kernel=(size, 1), stride=stride, padding=ver,
                conv="ver_conv", bn="ver_bn", affine=affine),
        conv_bn(reader, "", common, kernel=(1, size), stride=stride, padding=hor,
                conv="hor_conv", bn="hor_bn", affine=affine),
        name=NAME,
    )  # fmt: skip
    if config["use_last_bn"]:
        tree = Sequential(tree, Norm(reader.bn("last_bn", out_channels), name="last_bn"))
    return tree


def infer_acnet(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors (the fused kernel does not depend on padding)."""
    out_channels, per_group, size = square_kernel(state, "square_conv.weight")
    groups = int(given.get("groups", 1))
    config = {
        "in_channels": per_group * groups,
        "out_channels": out_channels,
        "kernel_size": size,
        "padding": size // 2,
        "groups": groups,
        "use_affine": "square_bn.weight" in state,
        "use_last_bn": "last_bn.running_var" in state,
    }
    padding = "padding: kernel_size // 2 assumed (the fused kernel is the same for any)"
    return Inferred(config, (UNKNOWN_GROUPS, padding))


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
        "use_affine": True,
        "reduce_gamma": False,
        "use_last_bn": False,
        "gamma_init": None,
    },
    build=acnet_tree,
    deploy_prefix="fused_conv",
    source="DingXiaoH/ACNet acnet/acb.py (use_last_bn: the deprecated acnet_builder.py version)",
    infer=infer_acnet,
)

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="square_conv.weight",
        top=("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn", "last_bn"),
        deploy_prefix="fused_conv",
        source="DingXiaoH/ACNet ACBlock",
    )
)
