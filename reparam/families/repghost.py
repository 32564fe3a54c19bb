"""RepGhost's re-parameterisable part (Chen et al., 2022): a depthwise conv + BN, a BN, identity.

Published as ``RepGhostModule(inp, oup, kernel_size=1, dw_size=3, stride=1,
relu=True, deploy=False, reparam_bn=True, reparam_identity=False)`` in
ChengpengChen/RepGhost (``model/repghost.py``, 3c7d87e) and in timm
(``timm/models/repghost.py``, 1.0.31: ``in_chs``, ``out_chs``, ``reparam``
for ``reparam_bn``, no identity option), with the same keys.

The module runs ``x1 = primary_conv(x)`` (a conv + BN + ReLU, kept as it is
at deploy), then ``cheap_operation(x1)`` (``0``: depthwise ``dw_size`` conv,
``1``: BN) **plus** ``fusion_bn.0(x1)`` (a BatchNorm, with ``reparam_bn``)
**plus** ``x1`` (with ``reparam_identity``, no keys): a sum, not GhostNet's
concatenation. That sum is the block read here; its input is ``x1``, with
``oup`` channels. The whole module's state may be given: ``primary_conv.*``
is checked and left out. Deploy ``cheap_operation`` (conv with bias). The published
converter pads the 1x1 kernels by one pixel, so it holds for ``dw_size == 3``
only (every published model); any odd ``dw_size`` folds here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Identity, Node, Norm, Parallel
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
    Channels,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    conv_bn,
    refuse,
    register_layout,
    square_kernel,
    whole,
)

__all__ = ["FAMILY"]

NAME = "RepGhostModule"

_IDENTITY = (
    "the identity branch (reparam_identity) has no tensors; the published default and every "
    "released RepGhostNet have none (reparam_identity=false)"
)


def repghost_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form on the primary conv's output: ``bn(dwconv(x1)) [+ bn(x1)] [+ x1]``."""
    refuse(config, NAME, deploy=(False, "a deploy block is one conv already"))
    whole(config, "inp", NAME)
    channels = whole(config, "oup", NAME)
    size = whole(config, "dw_size", NAME)
    if size % 2 == 0:
        raise ReparamError(
            f"{NAME}: dw_size={size}: the cheap operation pads by dw_size // 2, so only an odd "
            "kernel keeps the size of the other branches; expected an odd dw_size"
        )
    if reader.has("primary_conv.0.weight"):  # the whole module's state: check, not folded
        size_in = whole(config, "kernel_size", NAME)
        reader.array("primary_conv.0.weight", (channels, config["inp"], size_in, size_in))
        reader.bn("primary_conv.1", channels)
    depthwise = Channels(channels, channels, channels)
    branches: list[Node] = [
        conv_bn(reader, "cheap_operation", depthwise, kernel=(size, size), stride=1,
                padding=size // 2, conv="0", bn="1")
    ]  # fmt: skip
    if config["reparam_bn"]:
        branches.append(Norm(reader.bn("fusion_bn.0", channels), name="fusion_bn.0"))
    if config["reparam_identity"]:
        branches.append(Identity(channels, name="identity"))
    return Parallel(*branches, name=NAME)


def infer_repghost(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors; an identity branch has none and must be stated."""
    channels, _, size = square_kernel(state, "cheap_operation.0.weight")
    config = {"inp": channels, "oup": channels, "dw_size": size,
              "reparam_bn": "fusion_bn.0.running_var" in state}  # fmt: skip
    notes = ("inp: the primary conv's input, not part of the fused conv",)
    return Inferred(config, notes, (("reparam_identity", _IDENTITY),))


def _fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    kernel = shapes["cheap_operation.0.weight"]
    return len(kernel) == 4 and kernel[1] == 1 and kernel[2] == kernel[3]


FAMILY = Family(
    name=NAME,
    options={"inp": REQUIRED, "oup": REQUIRED, "kernel_size": 1, "dw_size": 3, "stride": 1,
             "relu": True, "deploy": False, "reparam_bn": True, "reparam_identity": False},
    build=repghost_tree,
    deploy_prefix="cheap_operation",
    source="ChengpengChen/RepGhost model/repghost.py (3c7d87e); timm repghost.py (1.0.31)",
    infer=infer_repghost,
    aliases=(("in_chs", "inp"), ("out_chs", "oup"), ("reparam", "reparam_bn")),
)  # fmt: skip

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="cheap_operation.0.weight",
        requires=("cheap_operation.1.running_var", "fusion_bn.0.running_var"),
        top=("cheap_operation", "fusion_bn"),
        deploy_prefix="cheap_operation",
        fits=_fits,
        source="ChengpengChen/RepGhost RepGhostModule; timm repghost RepGhostModule",
    )
)
