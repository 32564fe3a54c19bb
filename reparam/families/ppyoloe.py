"""PP-YOLOE's ``RepVggBlock`` (PaddleDetection): RepVGG without identity, a scalar on the 1x1.

Published as ``RepVggBlock(ch_in, ch_out, act='relu', alpha=False)`` in
PaddlePaddle/PaddleDetection (``ppdet/modeling/backbones/cspresnet.py``,
666f597): ``conv1`` (3x3 conv, padding 1, + BN), ``conv2`` (1x1 conv + BN)
and, with ``alpha=True``, a learnt scalar ``alpha`` (shape [1]) on the 1x1
branch: ``conv1(x) + alpha * conv2(x)``. Deploy ``conv`` (with bias). Paddle
names the running statistics ``_mean`` and ``_variance`` and stores no
``num_batches_tracked``; its BatchNorm eps is 1e-5.

The published forward tests ``if self.alpha:``, so an ``alpha`` of exactly 0
adds the 1x1 branch unscaled (as if there were no alpha), in the train form
and in ``convert_to_deploy`` alike; reparam reads it the same way.
timm's byobnet publishes another ``RepVggBlock`` (RepVGG's structure, read as
``RepVGGBlock``): this one is ``"ppdet.RepVggBlock"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.algebra import Node, Parallel, Scale, Sequential
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
    register_layout,
    register_name,
    square_kernel,
    whole,
)

__all__ = ["FAMILY"]

NAME = "ppdet.RepVggBlock"
PADDLE_STATISTICS = ("_mean", "_variance")


def ppyoloe_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_3x3(x)) + alpha * bn(conv_1x1(x))``."""
    channels = Channels(whole(config, "ch_in", NAME), whole(config, "ch_out", NAME), 1)
    dense = conv_bn(reader, "conv1", channels, kernel=(3, 3), stride=1, padding=1,
                    statistics=PADDLE_STATISTICS)  # fmt: skip
    pointwise = conv_bn(reader, "conv2", channels, kernel=(1, 1), stride=1, padding=0,
                        statistics=PADDLE_STATISTICS)  # fmt: skip
    if config["alpha"]:
        alpha = reader.array("alpha", (1,))
        if alpha[0] != 0:  # the published `if self.alpha:` skips the scale at exactly 0
            factor = np.broadcast_to(alpha, (channels.out_channels,))
            pointwise = Sequential(pointwise, Scale(factor, name="alpha"), name="alpha * conv2")
    return Parallel(dense, pointwise, name=NAME)


def infer_ppyoloe(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: an ``alpha`` key or not."""
    out_channels, in_channels, size = square_kernel(state, "conv1.conv.weight")
    if size != 3:
        raise ReparamError(f"conv1.conv.weight is {size}x{size}; expected 3x3")
    return Inferred({"ch_in": in_channels, "ch_out": out_channels, "alpha": "alpha" in state})


def _fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    dense, pointwise = shapes["conv1.conv.weight"], shapes["conv2.conv.weight"]
    return len(dense) == 4 and dense[2:] == (3, 3) and pointwise == (*dense[:2], 1, 1)


FAMILY = Family(
    name=NAME,
    options={"ch_in": REQUIRED, "ch_out": REQUIRED, "act": "relu", "alpha": False},
    build=ppyoloe_tree,
    deploy_prefix="conv",
    source="PaddlePaddle/PaddleDetection ppdet/modeling/backbones/cspresnet.py (666f597)",
    infer=infer_ppyoloe,
)

register_name("RepVggBlock", NAME, "RepVGGBlock")

register_layout(
    KeyLayout(
        name="paddle",
        families=(NAME,),
        marker="conv1.bn._mean",
        requires=("conv1.conv.weight", "conv2.conv.weight", "conv2.bn._variance"),
        top=("conv1", "conv2", "alpha"),
        deploy_prefix="conv",
        fits=_fits,
        deploy_named=False,
        source="PaddleDetection RepVggBlock (PP-YOLOE)",
    )
)
