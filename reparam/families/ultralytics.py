"""The ultralytics blocks (YOLOv8 ... YOLO11, RT-DETR, YOLOv10) and YOLOv9's ``RepConvN``.

Published in the ``ultralytics`` wheel (8.4.190 read: ``nn/modules/conv.py``,
``nn/modules/block.py``) and WongKinYiu/yolov9 (``models/common.py``, 5b1ea9a):

- ``RepConv(c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False)``:
  ``conv1`` (kxk conv + BN, padding ``p``), ``conv2`` (1x1 conv + BN,
  padding ``p - k // 2``), and ``bn`` (a BatchNorm of the input, only when
  ``bn and c1 == c2 and s == 1``); deploy ``conv`` (with bias). The
  published block asserts ``k == 3 and p == 1``; any odd ``k`` with
  ``p >= k // 2`` folds here. ``d`` never reaches the train convs.
  YOLOv7 publishes another ``RepConv`` (:mod:`reparam.families.yolov7`): this
  one is ``"ultralytics.RepConv"``.
- ``RepConvN`` (YOLOv9): the same constructor and keys; ``bn`` is accepted and
  ignored (the published block never builds the identity BatchNorm).
- ``RepVGGDW(ed)`` (YOLOv10's CIB): ``conv`` (depthwise 7x7 conv + BN) plus
  ``conv1`` (depthwise 3x3 conv + BN); deploy ``conv``. RepViT publishes
  another ``RepVGGDW``: this one is ``"ultralytics.RepVGGDW"``.
- ``Conv2(c1, c2, k=3, s=1, p=None, g=1, d=1, act=True)``: a kxk conv
  (``conv``, dilation ``d``) and a 1x1 conv (``cv2``) summed, then one
  BatchNorm (``bn``); deploy ``conv`` (with bias, dilation ``d``).

Every BatchNorm's eps is 1e-3: ``initialize_weights`` sets it when a model is
built (the family default). Each block's output is taken before its
activation (``act``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Conv, Node, Norm, Parallel, Sequential
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

__all__ = ["FAMILY_CONV2", "FAMILY_REPCONV", "FAMILY_REPCONVN", "FAMILY_REPVGGDW", "autopad"]

YOLO_EPS = 1e-3
REPCONV = "ultralytics.RepConv"
REPCONVN = "RepConvN"
REPVGGDW = "ultralytics.RepVGGDW"
CONV2 = "Conv2"


def autopad(kernel: int, padding: int | None, dilation: int = 1) -> int:
    """Return ultralytics' ``autopad``: ``padding``, or half the dilated span when None."""
    if padding is not None:
        return padding
    return (dilation * (kernel - 1) + 1) // 2


def _channels(config: Config, name: str) -> Channels:
    c1, c2 = whole(config, "c1", name), whole(config, "c2", name)
    groups = whole(config, "g", name)
    check_groups(name, groups, ("c1", c1), ("c2", c2))
    return Channels(c1, c2, groups)


def repconv_tree(reader: StateReader, config: Config, *, name: str = REPCONV) -> Node:
    """Build the train form: ``bn(conv_k(x)) + bn(conv_1x1(x)) [+ bn(x)]``."""
    refuse(config, name, deploy=(False, "a deploy block is one conv already; read conv directly"))
    channels = _channels(config, name)
    size, stride = whole(config, "k", name), whole(config, "s", name)
    padding = whole(config, "p", name, minimum=0)
    if size % 2 == 0 or padding < size // 2:
        raise ReparamError(
            f"{name}: k={size}, p={padding}: the 1x1 branch is padded by p - k // 2, so the "
            f"branches agree only for an odd k and p >= k // 2 (the published block asserts "
            "k == 3 and p == 1)"
        )
    identity = name == REPCONV and bool(config["bn"]) and channels[0] == channels[1] and stride == 1
    if identity and padding != size // 2:
        raise ReparamError(
            f"{name}: the identity BatchNorm (bn=True) needs p == k // 2; got k={size}, p={padding}"
        )
    branches = [
        conv_bn(reader, "conv1", channels, kernel=(size, size), stride=stride, padding=padding),
        conv_bn(reader, "conv2", channels, kernel=(1, 1), stride=stride,
                padding=padding - size // 2),
    ]  # fmt: skip
    if identity:
        branches.append(Norm(reader.bn("bn", channels.out_channels), name="bn"))
    return Parallel(*branches, name=name)


def infer_repconv(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: the identity BatchNorm fixes the groups."""
    c2, per_group, size = square_kernel(state, "conv1.conv.weight")
    config: dict[str, Any] = {"c2": c2, "k": size, "p": size // 2}
    if "bn.running_var" in state:
        groups = groups_from_identity(c2, per_group, "bn")
        return Inferred(config | {"c1": c2, "g": groups, "s": 1, "bn": True})
    groups = int(given.get("g", 1))
    config |= {"c1": per_group * groups, "g": groups, "s": 1, "bn": False}
    return Inferred(config, (UNKNOWN_GROUPS.replace("groups", "g", 1), "s: not needed to fuse"))


def _repconv_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a kxk (k >= 3, odd) and a 1x1 share their shape: not ``LightConv`` (1x1, dw kxk)."""
    dense, pointwise = shapes["conv1.conv.weight"], shapes["conv2.conv.weight"]
    return (
        len(dense) == 4
        and dense[2] == dense[3] >= 3
        and dense[2] % 2 == 1
        and pointwise == (*dense[:2], 1, 1)
    )


def repvggdw_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(dwconv_7x7(x)) + bn(dwconv_3x3(x))``."""
    channels = whole(config, "ed", REPVGGDW)
    depthwise = Channels(channels, channels, channels)
    return Parallel(
        conv_bn(reader, "conv", depthwise, kernel=(7, 7), stride=1, padding=3),
        conv_bn(reader, "conv1", depthwise, kernel=(3, 3), stride=1, padding=1),
        name=REPVGGDW,
    )


def infer_repvggdw(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: ``ed`` is the channel count."""
    return Inferred({"ed": square_kernel(state, "conv.conv.weight")[0]})


def _repvggdw_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    large, small = shapes["conv.conv.weight"], shapes["conv1.conv.weight"]
    return large == (large[0], 1, 7, 7) and small == (large[0], 1, 3, 3)


def conv2_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_k(x) + conv_1x1(x))``."""
    channels = _channels(config, CONV2)
    c1, c2, groups = channels
    size, stride = whole(config, "k", CONV2), whole(config, "s", CONV2)
    dilation = whole(config, "d", CONV2)
    given = None if config["p"] is None else whole(config, "p", CONV2, minimum=0)
    padding, small_padding = autopad(size, given, dilation), autopad(1, given, dilation)
    span = dilation * (size - 1) + 1
    if 2 * padding - span != 2 * small_padding - 1:
        raise ReparamError(
            f"{CONV2}: k={size}, p={given}, d={dilation}: the kxk conv (padding {padding}, span "
            f"{span}) and the 1x1 conv (padding {small_padding}) give different output sizes, so "
            "the published block does not run; expected an odd k and p=None"
        )
    kernel = reader.array("conv.weight", (c2, c1 // groups, size, size))
    pointwise = reader.array("cv2.weight", (c2, c1 // groups, 1, 1))
    return Sequential(
        Parallel(
            Conv(kernel, stride=stride, padding=padding, groups=groups, dilation=dilation,
                 name="conv"),
            Conv(pointwise, stride=stride, padding=small_padding, groups=groups, name="cv2"),
            name="conv + cv2",
        ),
        Norm(reader.bn("bn", c2), name="bn"),
        name=CONV2,
    )  # fmt: skip


def infer_conv2(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors (groups, stride, dilation do not change them)."""
    c2, per_group, size = square_kernel(state, "conv.weight")
    groups = int(given.get("g", 1))
    config = {"c1": per_group * groups, "c2": c2, "k": size, "p": None, "g": groups}
    notes = (UNKNOWN_GROUPS.replace("groups", "g", 1), "s, d: not needed to fuse")
    return Inferred(config, notes)


def _conv2_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    kernel, pointwise = shapes["conv.weight"], shapes["cv2.weight"]
    return (
        len(kernel) == 4
        and kernel[2] == kernel[3]
        and kernel[2] % 2 == 1
        and pointwise == (*kernel[:2], 1, 1)
    )


_REPCONV_OPTIONS = {
    "c1": REQUIRED,
    "c2": REQUIRED,
    "k": 3,
    "s": 1,
    "p": 1,
    "g": 1,
    "d": 1,
    "act": True,
    "bn": False,
    "deploy": False,
}

FAMILY_REPCONV = Family(
    name=REPCONV,
    options=dict(_REPCONV_OPTIONS),
    build=repconv_tree,
    deploy_prefix="conv",
    source="ultralytics 8.4.190 ultralytics/nn/modules/conv.py RepConv",
    infer=infer_repconv,
    eps=YOLO_EPS,
)


def _repconvn_tree(reader: StateReader, config: Config) -> Node:
    return repconv_tree(reader, config, name=REPCONVN)


def _infer_repconvn(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    config, notes, ambiguous = infer_repconv(state, given)
    return Inferred(config | {"bn": False}, notes, ambiguous)


FAMILY_REPCONVN = Family(
    name=REPCONVN,
    options=dict(_REPCONV_OPTIONS),
    build=_repconvn_tree,
    deploy_prefix="conv",
    source="WongKinYiu/yolov9 models/common.py RepConvN (5b1ea9a)",
    infer=_infer_repconvn,
    eps=YOLO_EPS,
)

FAMILY_REPVGGDW = Family(
    name=REPVGGDW,
    options={"ed": REQUIRED},
    build=repvggdw_tree,
    deploy_prefix="conv",
    source="ultralytics 8.4.190 ultralytics/nn/modules/block.py RepVGGDW",
    infer=infer_repvggdw,
    eps=YOLO_EPS,
)

FAMILY_CONV2 = Family(
    name=CONV2,
    options={"c1": REQUIRED, "c2": REQUIRED, "k": 3, "s": 1, "p": None, "g": 1, "d": 1,
             "act": True},
    build=conv2_tree,
    deploy_prefix="conv",
    source="ultralytics 8.4.190 ultralytics/nn/modules/conv.py Conv2",
    infer=infer_conv2,
    eps=YOLO_EPS,
)  # fmt: skip

register_name("RepConv", REPCONV)
register_name("RepVGGDW", REPVGGDW)

register_layout(
    KeyLayout(
        name="ultralytics",
        families=(REPCONV, REPCONVN),
        marker="conv1.conv.weight",
        requires=("conv2.conv.weight", "conv1.bn.running_var"),
        top=("conv1", "conv2", "bn"),
        deploy_prefix="conv",
        fits=_repconv_fits,
        deploy_named=False,
        source="ultralytics RepConv; YOLOv9 RepConvN (same keys, no identity)",
    )
)
register_layout(
    KeyLayout(
        name="ultralytics",
        families=(REPVGGDW,),
        marker="conv.conv.weight",
        requires=("conv1.conv.weight", "conv.bn.running_var"),
        absent=("conv2.conv.weight",),
        top=("conv", "conv1"),
        deploy_prefix="conv",
        fits=_repvggdw_fits,
        deploy_named=False,
        source="ultralytics RepVGGDW",
    )
)
register_layout(
    KeyLayout(
        name="ultralytics",
        families=(CONV2,),
        marker="cv2.weight",
        requires=("conv.weight", "bn.running_var"),
        top=("conv", "cv2", "bn"),
        deploy_prefix="conv",
        fits=_conv2_fits,
        deploy_marker="conv.bias",
        deploy_named=False,
        source="ultralytics Conv2",
    )
)
