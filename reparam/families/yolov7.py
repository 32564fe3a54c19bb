"""YOLOv7's ``RepConv``: RepVGG's block with ``nn.Sequential`` keys.

Published in WongKinYiu/yolov7 (``models/common.py``, a207844) as
``RepConv(c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False)``:
``rbr_dense`` (``0``: kxk conv, ``1``: BN), ``rbr_1x1`` (``0``: 1x1 conv with
padding ``p - k // 2``, ``1``: BN), ``rbr_identity`` (a BatchNorm, only when
``c1 == c2`` and ``s == 1``); deploy ``rbr_reparam``. The published block
asserts ``k == 3`` and a padding of 1; any odd ``k`` with ``p >= k // 2``
folds here. ultralytics publishes another ``RepConv``
(:mod:`reparam.families.ultralytics`): this one is ``"yolov7.RepConv"``.

The published ``fuse_repvgg_block`` (what ``Model.fuse()`` calls) builds the
identity kernel with ``fill_diagonal_`` on the ``(c2, c1 // g)`` weight of a
grouped 1x1 conv: only the first ``c1 // g`` channels get their 1, so for
``g > 1`` the fused conv drops the identity of every other channel (and a
depthwise block fails, its squeezed weight being 1-D). reparam folds the
train form: the identity of channel ``i`` is ``[i, i % (c1 // g)]``. Every
BatchNorm's eps is 1e-3 (``initialize_weights``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Node, Norm, Parallel
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
    UNKNOWN_GROUPS,
    Channels,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    check_groups,
    conv_bn,
    groups_from_identity,
    refuse,
    register_layout,
    register_name,
    square_kernel,
    whole,
)

__all__ = ["FAMILY"]

NAME = "yolov7.RepConv"


def yolov7_repconv_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_k(x)) + bn(conv_1x1(x)) [+ bn(x)]``."""
    refuse(
        config,
        NAME,
        deploy=(False, "a deploy block is one conv already; read rbr_reparam directly"),
    )
    c1, c2, groups = whole(config, "c1", NAME), whole(config, "c2", NAME), whole(config, "g", NAME)
    check_groups(NAME, groups, ("c1", c1), ("c2", c2))
    size, stride = whole(config, "k", NAME), whole(config, "s", NAME)
    padding = size // 2 if config["p"] is None else whole(config, "p", NAME, minimum=0)
    if size % 2 == 0 or padding < size // 2:
        raise ReparamError(
            f"{NAME}: k={size}, p={config['p']}: the 1x1 branch is padded by p - k // 2, so the "
            "branches agree only for an odd k and p >= k // 2 (the published block asserts "
            "k == 3 and a padding of 1)"
        )
    identity = c1 == c2 and stride == 1
    if identity and padding != size // 2:
        raise ReparamError(
            f"{NAME}: the identity branch (c1 == c2, s == 1) needs p == k // 2; got k={size}, "
            f"p={padding}"
        )
    channels = Channels(c1, c2, groups)
    branches = [
        conv_bn(reader, "rbr_dense", channels, kernel=(size, size), stride=stride,
                padding=padding, conv="0", bn="1"),
        conv_bn(reader, "rbr_1x1", channels, kernel=(1, 1), stride=stride,
                padding=padding - size // 2, conv="0", bn="1"),
    ]  # fmt: skip
    if identity:
        branches.append(Norm(reader.bn("rbr_identity", c2), name="rbr_identity"))
    return Parallel(*branches, name=NAME)


def infer_yolov7_repconv(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: an identity means ``c1 == c2`` and stride 1."""
    c2, per_group, size = square_kernel(state, "rbr_dense.0.weight")
    config: dict[str, Any] = {"c2": c2, "k": size, "p": None}
    if "rbr_identity.running_var" in state:
        groups = groups_from_identity(c2, per_group, "rbr_identity")
        return Inferred(config | {"c1": c2, "g": groups, "s": 1})
    groups = int(given.get("g", 1))
    stride = 2 if per_group * groups == c2 else 1  # no identity with c1 == c2: strided
    config |= {"c1": per_group * groups, "g": groups, "s": stride}
    return Inferred(config, (UNKNOWN_GROUPS.replace("groups", "g", 1), "s: not needed to fuse"))


def _fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    dense, pointwise = shapes["rbr_dense.0.weight"], shapes["rbr_1x1.0.weight"]
    return (
        len(dense) == 4
        and dense[2] == dense[3]
        and dense[2] % 2 == 1
        and pointwise == (*dense[:2], 1, 1)
    )


FAMILY = Family(
    name=NAME,
    options={"c1": REQUIRED, "c2": REQUIRED, "k": 3, "s": 1, "p": None, "g": 1, "act": True,
             "deploy": False},
    build=yolov7_repconv_tree,
    deploy_prefix="rbr_reparam",
    source="WongKinYiu/yolov7 models/common.py RepConv (a207844)",
    infer=infer_yolov7_repconv,
    eps=1e-3,
)  # fmt: skip

register_name("RepConv", NAME)

register_layout(
    KeyLayout(
        name="yolov7",
        families=(NAME,),
        marker="rbr_dense.0.weight",
        requires=("rbr_1x1.0.weight", "rbr_dense.1.running_var"),
        top=("rbr_dense", "rbr_1x1", "rbr_identity"),
        deploy_prefix="rbr_reparam",
        fits=_fits,
        source="WongKinYiu/yolov7 RepConv",
    )
)
