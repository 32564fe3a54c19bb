"""RepViT's blocks (Wang et al., CVPR 2024): ``RepVGGDW``, ``Conv2d_BN``, ``BN_Linear``.

Published in THU-MIG/RepViT (``model/repvit.py``, 298f420) and in timm
(``timm/models/repvit.py``, 1.0.31) as ``RepVggDw``, ``ConvNorm``,
``NormLinear``, with the same keys. Each fused block *replaces* the module
(``replace_batchnorm`` / timm's ``reparameterize_model`` put the result of
``fuse()`` in its place), so the deploy keys are the block's own
``weight`` and ``bias``.

- ``RepVGGDW(ed)`` (timm ``RepVggDw(ed, kernel_size, legacy=False)``), in two
  incompatible formats told apart by their keys:

  * current: ``conv`` (a ``Conv2d_BN``: depthwise kxk conv ``c`` + ``bn``),
    ``conv1`` (a depthwise 1x1 conv *with bias*, no BN) and ``bn`` after the
    sum with the identity: ``bn(conv(x) + conv1(x) + x)``;
  * legacy (RepViT's first release; timm ``legacy=True``, used by
    ``repvit_m1``): ``conv`` and ``conv1`` both ``Conv2d_BN``, no BN after the
    sum: ``conv(x) + conv1(x) + x``.

  RepViT publishes this ``RepVGGDW``, ultralytics another: this one is
  ``"repvit.RepVGGDW"``. timm's fuse pads the 1x1 by one pixel, so it holds
  for ``kernel_size == 3`` only; any odd kernel folds here.
- ``Conv2d_BN(a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, ...)``
  (timm ``ConvNorm(in_dim, out_dim, ...)``): ``c`` (conv) then ``bn``.
- ``BN_Linear(a, b, bias=True, std=0.02)`` (timm ``NormLinear(in_dim,
  out_dim, ...)``): ``bn`` (``BatchNorm1d``) then ``l`` (``nn.Linear``); the
  deploy module is an ``nn.Linear`` (``weight`` of shape (b, a)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Conv, Identity, Linear, Node, Norm, Parallel, Sequential
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
    register_layout,
    register_name,
    shape,
    square_kernel,
    whole,
)

__all__ = ["FAMILY_BN_LINEAR", "FAMILY_CONV2D_BN", "FAMILY_REPVGGDW"]

REPVGGDW = "repvit.RepVGGDW"
CONV2D_BN = "Conv2d_BN"
BN_LINEAR = "BN_Linear"
SOURCE = "THU-MIG/RepViT model/repvit.py (298f420); timm repvit.py (1.0.31)"


def repvggdw_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv(x) + conv1(x) + x)`` (legacy: without ``bn``)."""
    channels = whole(config, "ed", REPVGGDW)
    size = whole(config, "kernel_size", REPVGGDW)
    if size % 2 == 0:
        raise ReparamError(
            f"{REPVGGDW}: kernel_size={size}: the conv is padded by (kernel_size - 1) // 2, so "
            "only an odd kernel keeps the size of the identity; expected an odd kernel_size"
        )
    legacy = reader.has("conv1.c.weight")
    stated = config["legacy"]
    if stated is not None and bool(stated) != legacy:
        found = "conv1.c.weight (legacy)" if legacy else "conv1.weight and bn (current)"
        raise ReparamError(
            f"{REPVGGDW}: legacy={stated!r}, but the keys are of the other format: {found}"
        )
    config["legacy"] = legacy
    depthwise = Channels(channels, channels, channels)
    mixer = conv_bn(reader, "conv", depthwise, kernel=(size, size), stride=1,
                    padding=(size - 1) // 2, conv="c")  # fmt: skip
    identity = Identity(channels, name="identity")
    if legacy:
        pointwise = conv_bn(reader, "conv1", depthwise, kernel=(1, 1), stride=1, padding=0,
                            conv="c")  # fmt: skip
        return Parallel(mixer, pointwise, identity, name=f"{REPVGGDW} (legacy)")
    weight = reader.array("conv1.weight", (channels, 1, 1, 1))
    bias = reader.array("conv1.bias", (channels,))
    return Sequential(
        Parallel(
            mixer,
            Conv(weight, bias, groups=channels, name="conv1"),
            identity,
            name="conv + conv1 + x",
        ),
        Norm(reader.bn("bn", channels), name="bn"),
        name=REPVGGDW,
    )


def infer_repvggdw(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: the keys tell the format."""
    channels, _, size = square_kernel(state, "conv.c.weight")
    return Inferred({"ed": channels, "kernel_size": size, "legacy": "conv1.c.weight" in state})


def _repvggdw_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    mixer = shapes["conv.c.weight"]
    depthwise = len(mixer) == 4 and mixer[1] == 1 and mixer[2] == mixer[3]
    pointwise = shapes.get("conv1.c.weight", shapes.get("conv1.weight"))
    current = "conv1.weight" in shapes and "bn.running_var" in shapes
    legacy = "conv1.c.weight" in shapes
    return depthwise and pointwise == (mixer[0], 1, 1, 1) and (current or legacy)


def conv2d_bn_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(c(x))``."""
    in_channels, out_channels = whole(config, "a", CONV2D_BN), whole(config, "b", CONV2D_BN)
    groups = whole(config, "groups", CONV2D_BN)
    check_groups(CONV2D_BN, groups, ("a", in_channels), ("b", out_channels))
    size = whole(config, "ks", CONV2D_BN)
    weight = reader.array("c.weight", (out_channels, in_channels // groups, size, size))
    return Sequential(
        Conv(
            weight,
            stride=whole(config, "stride", CONV2D_BN),
            padding=whole(config, "pad", CONV2D_BN, minimum=0),
            groups=groups,
            dilation=whole(config, "dilation", CONV2D_BN),
            name="c",
        ),
        Norm(reader.bn("bn", out_channels), name="bn"),
        name=CONV2D_BN,
    )


def infer_conv2d_bn(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors (stride, padding, dilation do not change them)."""
    out_channels, per_group, size = square_kernel(state, "c.weight")
    groups = int(given.get("groups", 1))
    config = {"a": per_group * groups, "b": out_channels, "ks": size, "groups": groups}
    return Inferred(config, (UNKNOWN_GROUPS, "stride, pad, dilation: not needed to fuse"))


def bn_linear_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``l(bn(x))`` (BatchNorm1d, then the fully connected layer)."""
    in_features, out_features = whole(config, "a", BN_LINEAR), whole(config, "b", BN_LINEAR)
    weight = reader.array("l.weight", (out_features, in_features))
    bias = reader.array("l.bias", (out_features,)) if config["bias"] else None
    return Sequential(
        Norm(reader.bn("bn", in_features), name="bn"),
        Linear(weight, bias, name="l"),
        name=BN_LINEAR,
    )


def infer_bn_linear(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: the weight's shape, a bias or not."""
    found = shape(state, "l.weight")
    if len(found) != 2:
        raise ReparamError(
            f"l.weight has shape {found or '(missing)'}; expected a linear weight (b, a)"
        )
    return Inferred({"a": found[1], "b": found[0], "bias": "l.bias" in state})


FAMILY_REPVGGDW = Family(
    name=REPVGGDW,
    options={"ed": REQUIRED, "kernel_size": 3, "legacy": None},
    build=repvggdw_tree,
    deploy_prefix="",
    source=SOURCE,
    infer=infer_repvggdw,
)

FAMILY_CONV2D_BN = Family(
    name=CONV2D_BN,
    options={"a": REQUIRED, "b": REQUIRED, "ks": 1, "stride": 1, "pad": 0, "dilation": 1,
             "groups": 1, "bn_weight_init": 1, "resolution": -10000},
    build=conv2d_bn_tree,
    deploy_prefix="",
    source=SOURCE,
    infer=infer_conv2d_bn,
    aliases=(("in_dim", "a"), ("out_dim", "b")),
)  # fmt: skip

FAMILY_BN_LINEAR = Family(
    name=BN_LINEAR,
    options={"a": REQUIRED, "b": REQUIRED, "bias": True, "std": 0.02},
    build=bn_linear_tree,
    deploy_prefix="",
    source=SOURCE,
    infer=infer_bn_linear,
    aliases=(("in_dim", "a"), ("out_dim", "b")),
    linear=True,
)

register_name("RepVGGDW", REPVGGDW)
register_name("RepVggDw", REPVGGDW)
register_name("ConvNorm", CONV2D_BN)
register_name("NormLinear", BN_LINEAR)

register_layout(
    KeyLayout(
        name="repvit",
        families=(REPVGGDW,),
        marker="conv.c.weight",
        requires=("conv.bn.running_var",),
        top=("conv", "conv1", "bn"),
        deploy_prefix="",
        fits=_repvggdw_fits,
        deploy_named=False,
        source="THU-MIG/RepViT RepVGGDW (both formats); timm RepVggDw",
    )
)
register_layout(
    KeyLayout(
        name="repvit",
        families=(CONV2D_BN,),
        marker="c.weight",
        requires=("bn.running_var",),
        top=("c", "bn"),
        deploy_prefix="",
        fits=lambda shapes: len(shapes["c.weight"]) == 4,
        deploy_named=False,
        source="THU-MIG/RepViT Conv2d_BN; timm repvit ConvNorm",
    )
)
register_layout(
    KeyLayout(
        name="repvit",
        families=(BN_LINEAR,),
        marker="l.weight",
        requires=("bn.running_var",),
        top=("bn", "l"),
        deploy_prefix="",
        fits=lambda shapes: len(shapes["l.weight"]) == 2,
        deploy_named=False,
        source="THU-MIG/RepViT BN_Linear; timm repvit NormLinear",
    )
)
