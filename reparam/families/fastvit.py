"""FastViT's re-parameterisable token mixer and positional encoding (Vasu et al., ICCV 2023).

Published in apple/ml-fastvit (``models/fastvit.py``, 8af5928) and in timm
(``timm/models/fastvit.py``, 1.0.31):

- ``RepMixer(dim, kernel_size=3, use_layer_scale=True,
  layer_scale_init_value=1e-5, inference_mode=False)``:
  ``x + gamma * (mixer(x) - norm(x))``, where ``mixer`` is a depthwise
  ``MobileOneBlock`` (skip BN ``rbr_skip``, kxk conv + BN ``rbr_conv.0``,
  1x1 conv + BN ``rbr_scale``) and ``norm`` one with its skip BN only;
  ``gamma`` is the per-channel ``layer_scale`` (shape (dim, 1, 1); without
  it, ``x + mixer(x) - norm(x)``). timm names them ``mixer.identity``,
  ``mixer.conv_kxk.0``, ``mixer.conv_scale``, ``norm.identity`` and
  ``layer_scale.gamma``, and drops the layer scale with
  ``layer_scale_init_value=None``. Deploy ``reparam_conv``.
- ``RepCPE(in_channels, embed_dim=768, spatial_shape=(7, 7),
  inference_mode=False)`` (timm ``RepConditionalPosEnc(dim, dim_out=None,
  ...)``): ``x + pe(x)``, ``pe`` a depthwise conv with bias (timm's key
  ``pos_enc``), padded by ``spatial_shape[0] // 2`` on both axes, so only a
  square odd shape keeps the size of ``x``; ``embed_dim`` must be
  ``in_channels`` (``None`` here means that; the published default 768 runs
  only when ``in_channels`` is 768). Deploy ``reparam_conv``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.algebra import Conv, Identity, Node, Norm, Parallel, Scale, Sequential
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
    register_name,
    square_kernel,
    whole,
)

__all__ = ["FAMILY_REPCPE", "FAMILY_REPMIXER"]

REPMIXER = "RepMixer"
REPCPE = "RepCPE"
SOURCE = "apple/ml-fastvit models/fastvit.py (8af5928); timm fastvit.py (1.0.31)"


def repmixer_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``x + gamma * (mixer(x) - norm(x))``."""
    refuse(
        config,
        REPMIXER,
        inference_mode=(False, "an inference block is one conv already; read reparam_conv"),
    )
    channels = whole(config, "dim", REPMIXER)
    size = whole(config, "kernel_size", REPMIXER)
    if size % 2 == 0:
        raise ReparamError(
            f"{REPMIXER}: kernel_size={size}: the mixer pads by kernel_size // 2, so only an odd "
            "kernel keeps the size of x; expected an odd kernel_size"
        )
    depthwise = Channels(channels, channels, channels)
    mixer: list[Node] = [Norm(reader.bn("mixer.rbr_skip", channels), name="mixer.rbr_skip")]
    if size > 1:
        mixer.append(
            conv_bn(reader, "mixer.rbr_scale", depthwise, kernel=(1, 1), stride=1, padding=0)
        )
    mixer.append(
        conv_bn(reader, "mixer.rbr_conv.0", depthwise, kernel=(size, size), stride=1,
                padding=size // 2)
    )  # fmt: skip
    norm = Norm(reader.bn("norm.rbr_skip", channels), name="norm.rbr_skip")
    negated = Sequential(norm, Scale(-1.0, channels=channels, name="minus"), name="- norm(x)")
    difference: Node = Parallel(*mixer, negated, name="mixer(x) - norm(x)")
    if config["use_layer_scale"] and config["layer_scale_init_value"] is not None:
        gamma = reader.array("layer_scale", (channels, 1, 1)).reshape(channels)
        difference = Sequential(difference, Scale(gamma, name="layer_scale"), name="scaled")
    return Parallel(Identity(channels, name="x"), difference, name=REPMIXER)


def infer_repmixer(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: a ``layer_scale`` key or not."""
    channels, _, size = square_kernel(state, "mixer.rbr_conv.0.conv.weight")
    scaled = "layer_scale" in state
    config = {"dim": channels, "kernel_size": size, "use_layer_scale": scaled}
    return Inferred(config)


def _repmixer_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    kernel = shapes["mixer.rbr_conv.0.conv.weight"]
    return len(kernel) == 4 and kernel[1] == 1 and kernel[2] == kernel[3]


def _spatial(config: Config) -> int:
    value = config["spatial_shape"]
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise ReparamError(
            f"{REPCPE}: spatial_shape must be an int or a pair of positive ints; got {value!r}"
        )
    if pair[0] != pair[1] or pair[0] % 2 == 0:
        raise ReparamError(
            f"{REPCPE}: spatial_shape={value!r}: pe is padded by spatial_shape[0] // 2 on both "
            "axes, so only a square odd shape keeps the size of x for the sum; expected e.g. "
            "(7, 7)"
        )
    return int(pair[0])


def repcpe_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``x + pe(x)``."""
    refuse(
        config,
        REPCPE,
        inference_mode=(False, "an inference block is one conv already; read reparam_conv"),
    )
    channels = whole(config, "in_channels", REPCPE)
    if config["embed_dim"] is None:
        config["embed_dim"] = channels
    embed = whole(config, "embed_dim", REPCPE)
    if embed != channels:
        raise ReparamError(
            f"{REPCPE}: embed_dim={embed} with in_channels={channels}: x + pe(x) needs "
            "embed_dim == in_channels"
        )
    size = _spatial(config)
    weight = reader.array("pe.weight", (channels, 1, size, size))
    bias = reader.array("pe.bias", (channels,))
    return Parallel(
        Conv(weight, bias, padding=size // 2, groups=channels, name="pe"),
        Identity(channels, name="x"),
        name=REPCPE,
    )


def infer_repcpe(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: depthwise, so channels and shape are all."""
    channels, _, size = square_kernel(state, "pe.weight")
    config = {"in_channels": channels, "embed_dim": channels, "spatial_shape": (size, size)}
    return Inferred(config)


def _repcpe_fits(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    kernel = shapes["pe.weight"]
    return (
        len(kernel) == 4
        and kernel[1] == 1
        and kernel[2] == kernel[3]
        and kernel[2] % 2 == 1
        and shapes["pe.bias"] == kernel[:1]
    )


FAMILY_REPMIXER = Family(
    name=REPMIXER,
    options={"dim": REQUIRED, "kernel_size": 3, "use_layer_scale": True,
             "layer_scale_init_value": 1e-5, "inference_mode": False},
    build=repmixer_tree,
    deploy_prefix="reparam_conv",
    source=SOURCE,
    infer=infer_repmixer,
)  # fmt: skip

FAMILY_REPCPE = Family(
    name=REPCPE,
    options={"in_channels": REQUIRED, "embed_dim": None, "spatial_shape": (7, 7),
             "inference_mode": False},
    build=repcpe_tree,
    deploy_prefix="reparam_conv",
    source=SOURCE,
    infer=infer_repcpe,
    aliases=(("dim", "in_channels"), ("dim_out", "embed_dim")),
)  # fmt: skip

register_name("RepConditionalPosEnc", REPCPE)

register_layout(
    KeyLayout(
        name="apple",
        families=(REPMIXER,),
        marker="mixer.rbr_conv.0.conv.weight",
        requires=("norm.rbr_skip.running_var", "mixer.rbr_skip.running_var"),
        top=("norm", "mixer", "layer_scale"),
        deploy_prefix="reparam_conv",
        fits=_repmixer_fits,
        source="apple/ml-fastvit RepMixer",
    )
)
register_layout(
    KeyLayout(
        name="timm",
        families=(REPMIXER,),
        marker="mixer.conv_kxk.0.conv.weight",
        requires=("norm.identity.running_var", "mixer.identity.running_var"),
        top=("norm", "mixer", "layer_scale"),
        deploy_prefix="reparam_conv",
        renames=(
            ("norm.identity", "norm.rbr_skip"),
            ("mixer.identity", "mixer.rbr_skip"),
            ("mixer.conv_kxk", "mixer.rbr_conv"),
            ("mixer.conv_scale", "mixer.rbr_scale"),
            ("layer_scale.gamma", "layer_scale"),
        ),
        fits=_repmixer_fits,
        source="timm fastvit RepMixer",
    )
)
register_layout(
    KeyLayout(
        name="apple",
        families=(REPCPE,),
        marker="pe.weight",
        requires=("pe.bias",),
        top=("pe",),
        deploy_prefix="reparam_conv",
        fits=_repcpe_fits,
        source="apple/ml-fastvit RepCPE",
    )
)
register_layout(
    KeyLayout(
        name="timm",
        families=(REPCPE,),
        marker="pos_enc.weight",
        requires=("pos_enc.bias",),
        top=("pos_enc",),
        deploy_prefix="reparam_conv",
        renames=(("pos_enc", "pe"),),
        fits=_repcpe_fits,
        source="timm fastvit RepConditionalPosEnc",
    )
)
