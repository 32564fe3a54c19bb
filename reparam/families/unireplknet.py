"""UniRepLKNet's dilated re-parameterisation (Ding et al., CVPR 2024): dilated small kernels.

Published as ``DilatedReparamBlock(channels, kernel_size, deploy,
use_sync_bn=False, attempt_use_lk_impl=True)`` in AILab-CVC/UniRepLKNet
(``unireplknet.py``, b5677d8): ``lk_origin`` (depthwise KxK conv, padding
``K // 2``, no bias) then ``origin_bn``, plus, for each kernel size ``k`` and
dilation ``r`` of the published table for ``K``, ``dil_conv_k{k}_{r}``
(depthwise, dilation ``r``, padding ``(r (k - 1) + 1) // 2``) then
``dil_bn_k{k}_{r}``. Deploy ``lk_origin`` (with bias): every dilated kernel
written out undilated (``r - 1`` zeros between taps) in the large kernel's
centre. ``deploy`` has no default in the published constructor; it must be
False here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.algebra import Conv, Node, Norm, Parallel, Sequential
from ..core.errors import ReparamError
from .base import (
    REQUIRED,
    Config,
    Family,
    Inferred,
    KeyLayout,
    StateReader,
    refuse,
    register_layout,
    square_kernel,
    whole,
)

__all__ = ["BRANCHES", "FAMILY"]

NAME = "DilatedReparamBlock"

#: The published ``(kernel_sizes, dilates)`` per ``kernel_size``.
BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def dilated_tree(reader: StateReader, config: Config) -> Node:
    """Build the train form: ``bn(conv_K(x)) + sum_(k, r) bn(conv_k,dilation r(x))``."""
    refuse(config, NAME, deploy=(False, "a deploy block is one conv already; read lk_origin"))
    channels = whole(config, "channels", NAME)
    size = whole(config, "kernel_size", NAME)
    if size not in BRANCHES:
        raise ReparamError(
            f"{NAME}: kernel_size={size} has no published branch table; expected one of "
            + ", ".join(map(str, sorted(BRANCHES)))
        )
    weight = reader.array("lk_origin.weight", (channels, 1, size, size))
    branches: list[Node] = [
        Sequential(
            Conv(weight, padding=size // 2, groups=channels, name="lk_origin"),
            Norm(reader.bn("origin_bn", channels), name="origin_bn"),
            name="lk_origin",
        )
    ]
    for kernel, rate in zip(*BRANCHES[size], strict=True):
        conv, bn = f"dil_conv_k{kernel}_{rate}", f"dil_bn_k{kernel}_{rate}"
        branch = reader.array(f"{conv}.weight", (channels, 1, kernel, kernel))
        padding = (rate * (kernel - 1) + 1) // 2
        branches.append(
            Sequential(
                Conv(branch, padding=padding, groups=channels, dilation=rate, name=conv),
                Norm(reader.bn(bn, channels), name=bn),
                name=conv,
            )
        )
    return Parallel(*branches, name=NAME)


def infer_dilated(state: Mapping[str, Any], given: Mapping[str, Any]) -> Inferred:
    """Read the configuration off the tensors: channels and the large kernel's size."""
    channels, _, size = square_kernel(state, "lk_origin.weight")
    return Inferred({"channels": channels, "kernel_size": size, "deploy": False})


FAMILY = Family(
    name=NAME,
    options={"channels": REQUIRED, "kernel_size": REQUIRED, "deploy": REQUIRED,
             "use_sync_bn": False, "attempt_use_lk_impl": True},
    build=dilated_tree,
    deploy_prefix="lk_origin",
    source="AILab-CVC/UniRepLKNet unireplknet.py (b5677d8)",
    infer=infer_dilated,
)  # fmt: skip

_DILATED = tuple(
    dict.fromkeys(
        f"{kind}_k{kernel}_{rate}"
        for kernels, rates in BRANCHES.values()
        for kernel, rate in zip(kernels, rates, strict=True)
        for kind in ("dil_conv", "dil_bn")
    )
)

register_layout(
    KeyLayout(
        name="official",
        families=(NAME,),
        marker="origin_bn.running_var",
        requires=("lk_origin.weight",),
        top=("lk_origin", "origin_bn", *_DILATED),
        deploy_prefix="lk_origin",
        fits=lambda shapes: len(shapes["lk_origin.weight"]) == 4,
        deploy_marker="lk_origin.bias",
        deploy_named=False,
        source="AILab-CVC/UniRepLKNet DilatedReparamBlock",
    )
)
