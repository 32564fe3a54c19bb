"""QARepVGG (Chu et al., "Make RepVGG Greater Again"; YOLOv6): BN after the branch sum.

Published as ``QARepVGGBlock`` and ``QARepVGGBlockV2`` in meituan/YOLOv6
(``yolov6/layers/common.py``): ``rbr_dense`` (3x3 conv + BN), ``rbr_1x1``
(a bare 1x1 conv, no BN, no bias), the identity without BN (when
``in_channels == out_channels`` and ``stride == 1``), and ``bn`` after the
sum. V2 adds, under the same condition as the identity, an average pool of
the input (``kernel_size``, ``stride``, ``padding``, padding counted in the
divisor). YOLOv6's deploy form keeps ``bn`` after ``rbr_reparam``; reparam
folds it as well, so the deploy conv alone computes the block. YOLOv6 sets
every BatchNorm's eps to 1e-3 when it builds a model (pass ``eps=1e-3``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from ..core.algebra import AvgPool, Conv, Identity, Node, Norm, Parallel, Sequential
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
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

__all__ = ["FAMILY", "FAMILY_V2", "qarepvgg_tree"]


def qarepvgg_tree(reader: StateReader, config: Config, *, version: int = 1) -> Node:
    """Build the train form: ``bn(bn_d(conv_3x3(x)) + conv_1x1(x) [+ x] [+ avg(x)])``."""
    name = "QARepVGGBlock" if version == 1 else "QARepVGGBlockV2"
    refuse(
        config,
        name,
        deploy=(False, "the published deploy block keeps only rbr_reparam and bn"),
        use_se=(False, "squeeze-and-excitation is not linear"),
        padding_mode=("zeros", "only zero padding folds into the 1x1 branch"),
    )
    options = conv_options(config, name)
    in_channels, out_channels, size, stride, padding, groups = options
    if padding < size // 2:
        raise ReparamError(
            f"{name}: padding={padding} with kernel_size={size} leaves the 1x1 branch a negative "
            f"padding; expected padding >= {size // 2} (the published block uses 3 and 1)"
        )
    pointwise = reader.array("rbr_1x1.weight", (out_channels, in_channels // groups, 1, 1))
    branches: list[Node] = [
        conv_bn(
            reader, "rbr_dense", options.channels, kernel=(size, size),
            stride=stride, padding=padding,
        ),
        Conv(pointwise, stride=stride, padding=padding - size // 2, groups=groups, name="rbr_1x1"),
    ]  # fmt: skip
    if in_channels == out_channels and stride == 1:
        branches.append(Identity(in_channels, name="rbr_identity"))
        if version == 2:
            branches.append(
                AvgPool(in_channels, size, stride=stride, padding=padding, name="rbr_avg")
            )
    return Sequential(
        Parallel(*branches, name="branches"),
        Norm(reader.bn("bn", out_channels), name="bn"),
        name=name,
    )


_OPTIONS = {
    "in_channels": REQUIRED,
    "out_channels": REQUIRED,
    "kernel_size": 3,
    "stride": 1,
    "padding": 1,
    "dilation": 1,
    "groups": 1,
    "padding_mode": "zeros",
    "deploy": False,
    "use_se": False,
}

_HIDDEN = (
    "no tensors show whether its identity (or V2's average-pool) branch exists "
    "(C_in == C_out and stride 1), nor which version it is"
)


def infer_qarepvgg(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read what the tensors say; stride and groups decide hidden branches and must be stated."""
    out_channels, per_group, size = square_kernel(state, "rbr_dense.conv.weight")
    config = {"out_channels": out_channels, "kernel_size": size, "padding": size // 2}
    if "groups" in given:
        config["in_channels"] = per_group * int(given["groups"])
    return Inferred(config, (), (("stride", _HIDDEN), ("groups", _HIDDEN), ("family", _HIDDEN)))


FAMILY = Family(
    name="QARepVGGBlock",
    options=dict(_OPTIONS),
    build=qarepvgg_tree,
    deploy_prefix="rbr_reparam",
    source="meituan/YOLOv6 yolov6/layers/common.py",
    infer=infer_qarepvgg,
    kept=("bn",),
)

FAMILY_V2 = Family(
    name="QARepVGGBlockV2",
    options=dict(_OPTIONS),
    build=partial(qarepvgg_tree, version=2),
    deploy_prefix="rbr_reparam",
    source="meituan/YOLOv6 yolov6/layers/common.py",
    infer=infer_qarepvgg,
    kept=("bn",),
)

register_layout(
    KeyLayout(
        name="official",
        families=("QARepVGGBlock", "QARepVGGBlockV2"),
        marker="rbr_1x1.weight",
        top=("rbr_dense", "rbr_1x1", "bn"),
        deploy_prefix="rbr_reparam",
        source="meituan/YOLOv6 QARepVGGBlock, QARepVGGBlockV2 (the deploy form keeps bn)",
    )
)
