"""Train forms of the published re-parameterisable blocks, rebuilt from plain torch.nn layers.

Test support, not a test file. Each class here reproduces the *train form* of one published block
with the published constructor keywords (same names, same defaults) and the published state-dict
keys (``num_batches_tracked`` included), so that a state dict produced here has exactly the layout
of a published checkpoint. ``forward`` returns the block's output *before* its final nonlinearity
(no ReLU, no SE). The code was written from a reading of the published repositories (semantics
only, described in the class docstrings below):

==========================  ====================================================================
``RepVGGBlock``             DingXiaoH/RepVGG ``repvgg.py`` (YOLOv6's RepVGGBlock: same keys)
``DiverseBranchBlock``      DingXiaoH/DiverseBranchBlock ``diversebranchblock.py``
``ACBlock``                 DingXiaoH/ACNet ``acnet/acb.py`` (+ ``last_bn`` of the deprecated one)
``MobileOneBlock``          apple/ml-mobileone ``mobileone.py``
``ReparamLargeKernelConv``  DingXiaoH/RepLKNet-pytorch ``replknet.py``
``QARepVGGBlock``           meituan/YOLOv6 ``yolov6/layers/common.py``
``QARepVGGBlockV2``         meituan/YOLOv6 ``yolov6/layers/common.py``
==========================  ====================================================================

Only the train form is built: ``deploy=True`` (or ``inference_mode``, ``small_kernel_merged``) and
SE blocks raise ``NotImplementedError``. Configurations in which the published train form cannot
run (its branches produce maps of different sizes, e.g. ``dilation != 1`` in DBB or ACB) raise
``ValueError`` here instead of failing inside ``forward``.

Also provided: ``FAMILY_CLASSES`` (published name -> class), ``PUBLISHED_KEYS`` (published name ->
function of the constructor keywords returning the published key list, written independently of
the classes), ``PUBLISHED_CONFIGS`` / ``EXTRA_CONFIGS`` (keyword sets the published constructors
accept / generalisations only these classes accept), ``randomize_``, ``set_bn_eps_`` and
``numpy_state``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import DTypeLike, NDArray
from torch import nn

__all__ = [
    "EXTRA_CONFIGS",
    "FAMILY_CLASSES",
    "PUBLISHED_CONFIGS",
    "PUBLISHED_KEYS",
    "ACBlock",
    "BNAndPadLayer",
    "DiverseBranchBlock",
    "IdentityBasedConv1x1",
    "MobileOneBlock",
    "QARepVGGBlock",
    "QARepVGGBlockV2",
    "RepVGGBlock",
    "ReparamLargeKernelConv",
    "deploy_padding",
    "numpy_state",
    "randomize_",
    "set_bn_eps_",
]


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------


def _conv_bn(
    cin: int, cout: int, kernel: int, *, stride: int, padding: int, groups: int
) -> nn.Sequential:
    """``conv`` (no bias) then ``bn``: the ``{conv,bn}`` pair every family uses."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(cout)))


def _bn_at_zero(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel value of ``bn`` (eval mode) at input 0, written as DBB writes it."""
    assert bn.running_mean is not None and bn.running_var is not None
    std = torch.sqrt(bn.running_var + bn.eps)
    if bn.affine:
        return bn.bias - bn.running_mean * bn.weight / std
    return -bn.running_mean / std


def _check_unsupported(block: str, **flags: bool) -> None:
    for name, value in flags.items():
        if value:
            raise NotImplementedError(f"{block}: {name}=True is not modelled (train form only)")


def _check_odd(block: str, kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{block}: kernel_size must be odd and >= 1; got {kernel_size}")


class BNAndPadLayer(nn.Module):
    """DBB's ``BNAndPadLayer``: BatchNorm, then pad ``pad_pixels`` per side with BN(0).

    Key layout: ``bn.*``. The border value is the BN's per-channel output at zero input
    (``beta - mean * gamma / sqrt(var + eps)``), not zero, so that the following k x k conv sees
    the same value the merged 1x1 -> kxk conv would.
    """

    def __init__(self, pad_pixels: int, num_features: int, affine: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=affine)
        self.pad_pixels = pad_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p == 0:
            return out
        n, c, h, w = out.shape
        value = _bn_at_zero(self.bn).to(out.dtype).view(1, c, 1, 1)
        padded = value.expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = out
        return padded


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's ``IdentityBasedConv1x1``: a grouped 1x1 conv whose effective kernel is ``weight + I``.

    ``I[i, i % (channels // groups), 0, 0] = 1``. The identity is built at run time in the
    weight's dtype and is not part of the state dict (key layout: ``weight`` only). The weight is
    initialised to zero, as published.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, stride=1, padding=0, groups=groups, bias=False)
        nn.init.zeros_(self.weight)

    def identity(self) -> torch.Tensor:
        """The identity added to ``weight``, shape (channels, channels // groups, 1, 1)."""
        channels, per_group = self.weight.shape[:2]
        eye = torch.zeros_like(self.weight)
        rows = torch.arange(channels)
        eye[rows, rows % per_group, 0, 0] = 1.0
        return eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.identity(), None, 1, 0, 1, self.groups)


# --------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """RepVGG block, train form: ``BN(conv_k(x)) + BN(conv_1x1(x)) [+ BN(x)]``.

    Published code asserts ``kernel_size == 3`` and ``padding == 1`` (the default ``padding=0``
    is therefore unusable there). Here any odd kernel with ``padding >= kernel_size // 2`` is
    accepted (the 1x1 branch is padded by ``padding - kernel_size // 2``); the identity branch
    (a BatchNorm on the input, iff ``in == out`` and ``stride == 1``) needs
    ``padding == kernel_size // 2``. ``dilation`` and ``padding_mode`` only reach the published
    deploy conv, never the train convs, so they are accepted and ignored.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("RepVGGBlock", deploy=deploy, use_se=use_se)
        _check_odd("RepVGGBlock", kernel_size)
        padding_11 = padding - kernel_size // 2
        if padding_11 < 0:
            raise ValueError(
                f"RepVGGBlock: padding must be >= kernel_size // 2; got padding={padding}, "
                f"kernel_size={kernel_size}"
            )
        has_identity = in_channels == out_channels and stride == 1
        if has_identity and padding_11 != 0:
            raise ValueError(
                "RepVGGBlock: the identity branch needs padding == kernel_size // 2; "
                f"got padding={padding}, kernel_size={kernel_size}"
            )
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.rbr_dense = _conv_bn(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups
        )
        self.rbr_1x1 = _conv_bn(
            in_channels, out_channels, 1, stride=stride, padding=padding_11, groups=groups
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return out


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block, train form (sum of four branches, no nonlinearity).

    With ``p = padding`` (must equal ``kernel_size // 2``), ``dw = groups >= out_channels``:

    * ``dbb_origin``: conv k x k (stride, p, groups) -> BN.
    * ``dbb_1x1`` (not dw): conv 1x1 (stride, groups) -> BN.
    * ``dbb_avg``: not dw: conv 1x1 (stride 1, groups) -> BNAndPad(p) -> AvgPool(k, stride, 0)
      -> ``avgbn``; dw: AvgPool(k, stride, p, zero padding counted) -> ``avgbn``.
    * ``dbb_1x1_kxk``: ``idconv1`` (internal == in) or ``conv1`` 1x1 (groups) -> ``bn1``
      BNAndPad(p) -> ``conv2`` k x k (stride, padding 0, groups) -> ``bn2``.

    ``internal_channels_1x1_3x3`` defaults to ``in_channels`` (``2 * in_channels`` when dw).
    ``nonlinear`` is accepted and not applied (output before the nonlinearity).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        internal_channels_1x1_3x3: int | None = None,
        deploy: bool = False,
        nonlinear: nn.Module | None = None,
        single_init: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("DiverseBranchBlock", deploy=deploy)
        if padding != kernel_size // 2:
            raise ValueError(
                f"DiverseBranchBlock: padding must equal kernel_size // 2; got padding={padding}, "
                f"kernel_size={kernel_size}"
            )
        if dilation != 1:
            raise ValueError(
                f"DiverseBranchBlock: dilation reaches only dbb_origin, so the branches differ "
                f"in size; got dilation={dilation}, expected 1"
            )
        depthwise = groups >= out_channels
        if depthwise and in_channels != out_channels:
            raise ValueError(
                "DiverseBranchBlock: the depthwise form (groups >= out_channels) pools the input, "
                f"so it needs in_channels == out_channels; got {in_channels} and {out_channels}"
            )
        p = padding
        self.dbb_origin = _conv_bn(
            in_channels, out_channels, kernel_size, stride=stride, padding=p, groups=groups
        )
        avg_layers: OrderedDict[str, nn.Module] = OrderedDict()
        if not depthwise:
            avg_layers["conv"] = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
            avg_layers["bn"] = BNAndPadLayer(p, out_channels)
            avg_layers["avg"] = nn.AvgPool2d(kernel_size, stride=stride, padding=0)
        else:
            avg_layers["avg"] = nn.AvgPool2d(kernel_size, stride=stride, padding=p)
        avg_layers["avgbn"] = nn.BatchNorm2d(out_channels)
        self.dbb_avg = nn.Sequential(avg_layers)
        if not depthwise:
            self.dbb_1x1 = _conv_bn(
                in_channels, out_channels, 1, stride=stride, padding=0, groups=groups
            )
        else:
            self.dbb_1x1 = None
        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = 2 * in_channels if depthwise else in_channels
        first: nn.Module
        if internal == in_channels:
            first_name, first = "idconv1", IdentityBasedConv1x1(in_channels, groups=groups)
        else:
            first_name = "conv1"
            first = nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False)
        self.dbb_1x1_kxk = nn.Sequential(
            OrderedDict(
                [
                    (first_name, first),
                    ("bn1", BNAndPadLayer(p, internal)),
                    (
                        "conv2",
                        nn.Conv2d(
                            internal,
                            out_channels,
                            kernel_size,
                            stride=stride,
                            groups=groups,
                            bias=False,
                        ),
                    ),
                    ("bn2", nn.BatchNorm2d(out_channels)),
                ]
            )
        )
        if single_init:
            with torch.no_grad():
                for bn in (self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2):
                    bn.weight.zero_()
                if self.dbb_1x1 is not None:
                    self.dbb_1x1.bn.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        return out + self.dbb_1x1_kxk(x)


class ACBlock(nn.Module):
    """Asymmetric Convolution Block, train form: ``square + ver + hor`` (then ``last_bn``).

    ``c = padding - kernel_size // 2``. ``square``: conv k x k (stride, padding, groups) -> BN.
    ``ver``: conv k x 1, padding (H, W) = (padding, c) -> BN. ``hor``: conv 1 x k, padding
    (c, padding) -> BN. A negative ``c`` crops ``-c`` columns (ver) / rows (hor) of the input on
    each side. BNs are affine iff ``use_affine``. ``use_last_bn`` (from the deprecated published
    version; the current one has no such argument) adds an affine BatchNorm ``last_bn`` after the
    sum. ``reduce_gamma`` / ``gamma_init`` only change the initial BN gammas.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_affine: bool = True,
        reduce_gamma: bool = False,
        use_last_bn: bool = False,
        gamma_init: float | None = None,
    ) -> None:
        super().__init__()
        _check_unsupported("ACBlock", deploy=deploy)
        _check_odd("ACBlock", kernel_size)
        if dilation != 1:
            raise ValueError(f"ACBlock: branch sizes differ unless dilation == 1; got {dilation}")
        if padding_mode != "zeros":
            raise NotImplementedError(f"ACBlock: padding_mode {padding_mode!r} is not modelled")
        if reduce_gamma and (gamma_init is not None or use_last_bn):
            raise ValueError("ACBlock: reduce_gamma excludes gamma_init and use_last_bn")
        k = kernel_size
        c = padding - k // 2
        self.crop = max(-c, 0)
        self.square_conv = nn.Conv2d(
            in_channels,
            out_channels,
            (k, k),
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.ver_conv = nn.Conv2d(
            in_channels,
            out_channels,
            (k, 1),
            stride=stride,
            padding=(padding, max(c, 0)),
            groups=groups,
            bias=False,
        )
        self.hor_conv = nn.Conv2d(
            in_channels,
            out_channels,
            (1, k),
            stride=stride,
            padding=(max(c, 0), padding),
            groups=groups,
            bias=False,
        )
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.last_bn = nn.BatchNorm2d(out_channels) if use_last_bn else None
        gamma = 1.0 / 3 if reduce_gamma else gamma_init
        if gamma is not None and use_affine:
            with torch.no_grad():
                for bn in (self.square_bn, self.ver_bn, self.hor_bn):
                    bn.weight.fill_(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ver_in, hor_in = x, x
        if self.crop > 0:
            h, w = x.shape[2:]
            ver_in = x[:, :, :, self.crop : w - self.crop]
            hor_in = x[:, :, self.crop : h - self.crop, :]
        out = (
            self.square_bn(self.square_conv(x))
            + self.ver_bn(self.ver_conv(ver_in))
            + self.hor_bn(self.hor_conv(hor_in))
        )
        if self.last_bn is not None:
            out = self.last_bn(out)
        return out


class MobileOneBlock(nn.Module):
    """MobileOne block, train form: ``scale + skip + sum_i conv_i`` (no SE, no ReLU).

    ``rbr_conv.{i}``: conv k x k (stride, padding, groups) -> BN, for ``num_conv_branches``
    branches. ``rbr_scale`` (iff ``kernel_size > 1``): conv 1x1 (stride, padding 0, groups) -> BN.
    ``rbr_skip``: BN on the input iff ``in == out`` and ``stride == 1``. With a scale or skip
    branch the train form only runs when ``padding == kernel_size // 2``. ``dilation`` reaches
    only the published inference conv, so it is accepted and ignored.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        inference_mode: bool = False,
        use_se: bool = False,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        _check_unsupported("MobileOneBlock", inference_mode=inference_mode, use_se=use_se)
        _check_odd("MobileOneBlock", kernel_size)
        if num_conv_branches < 1:
            raise ValueError(
                f"MobileOneBlock: num_conv_branches must be >= 1; got {num_conv_branches}"
            )
        has_skip = in_channels == out_channels and stride == 1
        has_scale = kernel_size > 1
        if (has_skip or has_scale) and padding != kernel_size // 2:
            raise ValueError(
                "MobileOneBlock: with a scale or skip branch, padding must equal "
                f"kernel_size // 2; got padding={padding}, kernel_size={kernel_size}"
            )
        self.rbr_skip = nn.BatchNorm2d(in_channels) if has_skip else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                groups=groups,
            )
            for _ in range(num_conv_branches)
        )
        self.rbr_scale = (
            _conv_bn(in_channels, out_channels, 1, stride=stride, padding=0, groups=groups)
            if has_scale
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Published order: (scale + skip), then each conv branch in turn.
        terms = [branch(x) for branch in (self.rbr_scale, self.rbr_skip) if branch is not None]
        terms += [branch(x) for branch in self.rbr_conv]
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet large-kernel conv, train form: ``lkb_origin(x) [+ small_conv(x)]``.

    ``lkb_origin``: conv K x K (stride, padding K // 2, groups) -> BN. ``small_conv`` (iff
    ``small_kernel`` is not None): conv s x s (stride, padding s // 2, groups) -> BN. The
    published block applies no activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: int | None,
        small_kernel_merged: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("ReparamLargeKernelConv", small_kernel_merged=small_kernel_merged)
        _check_odd("ReparamLargeKernelConv", kernel_size)
        self.lkb_origin = _conv_bn(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
        )
        if small_kernel is None:
            self.small_conv = None
        else:
            _check_odd("ReparamLargeKernelConv", small_kernel)
            if small_kernel > kernel_size:
                raise ValueError(
                    f"ReparamLargeKernelConv: small_kernel {small_kernel} exceeds "
                    f"kernel_size {kernel_size}"
                )
            self.small_conv = _conv_bn(
                in_channels,
                out_channels,
                small_kernel,
                stride=stride,
                padding=small_kernel // 2,
                groups=groups,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out


class QARepVGGBlock(nn.Module):
    """QARepVGG block (YOLOv6), train form: ``bn(BN(conv_k(x)) + conv_1x1(x) [+ x])``.

    ``rbr_dense``: conv k x k (stride, padding, groups) -> BN. ``rbr_1x1``: a bare conv 1x1
    (stride, padding 0, groups, no bias, no BN). Identity (no BN, no keys) iff ``in == out`` and
    ``stride == 1``. ``bn``: BatchNorm after the sum. Published code asserts ``kernel_size == 3``
    and ``padding == 1``; any odd kernel with ``padding == kernel_size // 2`` is accepted here.
    YOLOv6 models set every BN's eps to 1e-3 (see ``set_bn_eps_``).
    """

    _with_avg = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_unsupported(name, deploy=deploy, use_se=use_se)
        _check_odd(name, kernel_size)
        if padding != kernel_size // 2:
            raise ValueError(
                f"{name}: padding must equal kernel_size // 2 (the 1x1 branch is unpadded); "
                f"got padding={padding}, kernel_size={kernel_size}"
            )
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_dense = _conv_bn(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups
        )
        self.rbr_1x1 = nn.Conv2d(
            in_channels, out_channels, 1, stride=stride, groups=groups, bias=False
        )
        self.rbr_avg = (
            nn.AvgPool2d(kernel_size, stride=stride, padding=padding)
            if self._with_avg and self.has_identity
            else None
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + x
        if self.rbr_avg is not None:
            out = out + self.rbr_avg(x)
        return self.bn(out)


class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGG block V2 (YOLOv6): QARepVGGBlock plus an average-pool branch before ``bn``.

    ``rbr_avg``: AvgPool2d(kernel_size, stride, padding) with zero padding counted (divisor
    always k * k), present iff the identity is (``in == out`` and ``stride == 1``). No keys.
    """

    _with_avg = True


FAMILY_CLASSES: dict[str, type[nn.Module]] = {
    "RepVGGBlock": RepVGGBlock,
    "DiverseBranchBlock": DiverseBranchBlock,
    "ACBlock": ACBlock,
    "MobileOneBlock": MobileOneBlock,
    "ReparamLargeKernelConv": ReparamLargeKernelConv,
    "QARepVGGBlock": QARepVGGBlock,
    "QARepVGGBlockV2": QARepVGGBlockV2,
}


def deploy_padding(name: str, kwargs: dict[str, Any]) -> int:
    """Padding of the single conv each family's train form equals (kernel is ``kernel_size``)."""
    if name == "ReparamLargeKernelConv":
        return int(kwargs["kernel_size"]) // 2
    defaults = {"QARepVGGBlock": 1, "QARepVGGBlockV2": 1}
    return int(kwargs.get("padding", defaults.get(name, 0)))


# --------------------------------------------------------------------------------------------
# Published key layouts, written from the published constructors (not from the classes above)
# --------------------------------------------------------------------------------------------


def _bn_keys(prefix: str, affine: bool = True) -> list[str]:
    stats = ["running_mean", "running_var", "num_batches_tracked"]
    names = (["weight", "bias"] if affine else []) + stats
    return [f"{prefix}.{n}" for n in names]


def _conv_bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.conv.weight", *_bn_keys(f"{prefix}.bn")]


def _repvgg_keys(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, **_: Any
) -> list[str]:
    # repvgg.py: rbr_identity is assigned first (BN or None), then rbr_dense, rbr_1x1.
    keys = _bn_keys("rbr_identity") if in_channels == out_channels and stride == 1 else []
    return keys + _conv_bn_keys("rbr_dense") + _conv_bn_keys("rbr_1x1")


def _dbb_keys(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    internal_channels_1x1_3x3: int | None = None,
    **_: Any,
) -> list[str]:
    # diversebranchblock.py: dbb_origin, dbb_avg (conv, bn=BNAndPadLayer, avg, avgbn),
    # dbb_1x1 (only if groups < out_channels), dbb_1x1_kxk (idconv1|conv1, bn1, conv2, bn2).
    keys = _conv_bn_keys("dbb_origin")
    if groups < out_channels:
        keys += ["dbb_avg.conv.weight", *_bn_keys("dbb_avg.bn.bn"), *_bn_keys("dbb_avg.avgbn")]
        keys += _conv_bn_keys("dbb_1x1")
        internal = in_channels if internal_channels_1x1_3x3 is None else internal_channels_1x1_3x3
    else:
        keys += _bn_keys("dbb_avg.avgbn")
        internal = (
            2 * in_channels if internal_channels_1x1_3x3 is None else internal_channels_1x1_3x3
        )
    first = "idconv1" if internal == in_channels else "conv1"
    keys += [f"dbb_1x1_kxk.{first}.weight", *_bn_keys("dbb_1x1_kxk.bn1.bn")]
    keys += ["dbb_1x1_kxk.conv2.weight", *_bn_keys("dbb_1x1_kxk.bn2")]
    return keys


def _acb_keys(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    use_affine: bool = True,
    use_last_bn: bool = False,
    **_: Any,
) -> list[str]:
    # acb.py: square_conv, square_bn, ver_conv, hor_conv, ver_bn, hor_bn; deprecated: last_bn
    # (always affine) after them.
    keys = ["square_conv.weight", *_bn_keys("square_bn", use_affine)]
    keys += ["ver_conv.weight", "hor_conv.weight"]
    keys += _bn_keys("ver_bn", use_affine) + _bn_keys("hor_bn", use_affine)
    return keys + (_bn_keys("last_bn") if use_last_bn else [])


def _mobileone_keys(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    num_conv_branches: int = 1,
    **_: Any,
) -> list[str]:
    # mobileone.py: rbr_skip (BN or None), rbr_conv (ModuleList of conv_bn), rbr_scale (k > 1).
    keys = _bn_keys("rbr_skip") if in_channels == out_channels and stride == 1 else []
    for i in range(num_conv_branches):
        keys += _conv_bn_keys(f"rbr_conv.{i}")
    return keys + (_conv_bn_keys("rbr_scale") if kernel_size > 1 else [])


def _replk_keys(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    groups: int,
    small_kernel: int | None,
    **_: Any,
) -> list[str]:
    # replknet.py: lkb_origin, then small_conv iff small_kernel is not None.
    return _conv_bn_keys("lkb_origin") + (
        [] if small_kernel is None else _conv_bn_keys("small_conv")
    )


def _qarepvgg_keys(in_channels: int, out_channels: int, **_: Any) -> list[str]:
    # common.py: rbr_dense (ConvModule), rbr_1x1 (bare conv, no bias), identity and avg have no
    # keys, bn (after the sum) registered last.
    return [*_conv_bn_keys("rbr_dense"), "rbr_1x1.weight", *_bn_keys("bn")]


PUBLISHED_KEYS: dict[str, Callable[..., list[str]]] = {
    "RepVGGBlock": _repvgg_keys,
    "DiverseBranchBlock": _dbb_keys,
    "ACBlock": _acb_keys,
    "MobileOneBlock": _mobileone_keys,
    "ReparamLargeKernelConv": _replk_keys,
    "QARepVGGBlock": _qarepvgg_keys,
    "QARepVGGBlockV2": _qarepvgg_keys,
}
"""Published name -> ``f(**constructor_kwargs)`` giving the train-form keys in published order."""


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def _kw(**kwargs: Any) -> dict[str, Any]:
    return kwargs


PUBLISHED_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "RepVGGBlock": [
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1),
        _kw(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
        _kw(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
        _kw(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    ],
    "DiverseBranchBlock": [
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1),
        _kw(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
        _kw(in_channels=4, out_channels=4, kernel_size=5, stride=2, padding=2, groups=4),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=1, internal_channels_1x1_3x3=8),
        _kw(
            in_channels=4,
            out_channels=6,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=2,
            internal_channels_1x1_3x3=2,
        ),
        _kw(
            in_channels=4,
            out_channels=4,
            kernel_size=3,
            padding=1,
            groups=4,
            internal_channels_1x1_3x3=4,
        ),
        _kw(in_channels=4, out_channels=6, kernel_size=1),
        _kw(in_channels=4, out_channels=4, kernel_size=7, padding=3, groups=2),
        _kw(in_channels=2, out_channels=2, kernel_size=13, padding=6, groups=2),
    ],
    "ACBlock": [
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        _kw(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=0),
        _kw(in_channels=4, out_channels=6, kernel_size=5, padding=1),
        _kw(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=0),
        _kw(in_channels=4, out_channels=6, kernel_size=5, padding=3),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=1, use_affine=False),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=1, use_last_bn=True),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=1, reduce_gamma=True),
        _kw(in_channels=4, out_channels=4, kernel_size=7, stride=2, padding=3),
        _kw(in_channels=4, out_channels=6, kernel_size=1),
        _kw(in_channels=2, out_channels=2, kernel_size=13, padding=6, groups=2),
    ],
    "MobileOneBlock": [
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, num_conv_branches=2),
        _kw(
            in_channels=4,
            out_channels=4,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=4,
            num_conv_branches=3,
        ),
        _kw(in_channels=4, out_channels=6, kernel_size=1, num_conv_branches=2),
        _kw(in_channels=4, out_channels=4, kernel_size=1, num_conv_branches=2),
        _kw(in_channels=3, out_channels=8, kernel_size=3, stride=2, padding=1),
        _kw(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=5, padding=2),
        _kw(in_channels=4, out_channels=6, kernel_size=7, stride=2, padding=3),
        _kw(in_channels=2, out_channels=2, kernel_size=13, padding=6, groups=2),
    ],
    "ReparamLargeKernelConv": [
        _kw(in_channels=4, out_channels=4, kernel_size=13, stride=1, groups=4, small_kernel=5),
        _kw(in_channels=4, out_channels=4, kernel_size=13, stride=1, groups=4, small_kernel=None),
        _kw(in_channels=4, out_channels=6, kernel_size=7, stride=2, groups=2, small_kernel=3),
        _kw(in_channels=4, out_channels=4, kernel_size=5, stride=1, groups=1, small_kernel=5),
        _kw(in_channels=4, out_channels=4, kernel_size=9, stride=2, groups=4, small_kernel=1),
    ],
    "QARepVGGBlock": [
        _kw(in_channels=4, out_channels=4),
        _kw(in_channels=4, out_channels=8, stride=2),
        _kw(in_channels=4, out_channels=4, groups=2),
        _kw(in_channels=4, out_channels=4, groups=4),
        _kw(in_channels=4, out_channels=6),
    ],
    "QARepVGGBlockV2": [
        _kw(in_channels=4, out_channels=4),
        _kw(in_channels=4, out_channels=8, stride=2),
        _kw(in_channels=4, out_channels=4, groups=2),
        _kw(in_channels=4, out_channels=4, groups=4),
        _kw(in_channels=4, out_channels=6),
    ],
}
"""Keyword sets each published constructor accepts and whose train form runs."""

EXTRA_CONFIGS: dict[str, list[dict[str, Any]]] = {
    "RepVGGBlock": [
        _kw(in_channels=4, out_channels=4, kernel_size=5, padding=2),
        _kw(in_channels=4, out_channels=4, kernel_size=7, padding=3, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=1),
        _kw(in_channels=4, out_channels=6, kernel_size=3, padding=2),
        _kw(in_channels=2, out_channels=4, kernel_size=13, stride=2, padding=6, groups=2),
    ],
    "QARepVGGBlock": [
        _kw(in_channels=4, out_channels=4, kernel_size=5, padding=2),
        _kw(in_channels=4, out_channels=4, kernel_size=1, padding=0),
    ],
    "QARepVGGBlockV2": [
        _kw(in_channels=4, out_channels=4, kernel_size=5, padding=2, groups=2),
        _kw(in_channels=4, out_channels=4, kernel_size=1, padding=0),
        _kw(in_channels=2, out_channels=2, kernel_size=13, padding=6, groups=2),
    ],
}
"""Generalisations the published constructors reject (they assert kernel 3, padding 1)."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every conv and BatchNorm non-trivial values, deterministically; eval mode.

    Conv weights (and biases) ~ N(0, 1 / fan_in); BN gamma ~ U[0.5, 1.5], beta ~ N(0, 0.2^2),
    running mean ~ N(0, 0.2^2), running var ~ U[0.5, 2]. Values are drawn in float64 from a
    generator seeded with ``seed`` and cast to each tensor's dtype, so a float32 and a float64
    copy of the same module get the same values up to rounding. Returns ``module``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                normal(m.weight, fan_in**-0.5)
                if m.bias is not None:
                    normal(m.bias, fan_in**-0.5)
            elif isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    uniform(m.weight, 0.5, 1.5)
                    normal(m.bias, 0.2)
                assert m.running_mean is not None and m.running_var is not None
                normal(m.running_mean, 0.2)
                uniform(m.running_var, 0.5, 2.0)
    return module.eval()


def set_bn_eps_(module: nn.Module, eps: float) -> nn.Module:
    """Set every BatchNorm's eps (YOLOv6 models use 1e-3); eps is not in the state dict."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
    return module


def numpy_state(module: nn.Module, dtype: DTypeLike = np.float64) -> dict[str, NDArray[Any]]:
    """``module.state_dict()`` as NumPy arrays: floats cast to ``dtype``, integers as int64."""
    state: dict[str, NDArray[Any]] = {}
    for key, value in module.state_dict().items():
        array = value.detach().cpu().numpy()
        state[key] = array.astype(dtype if value.is_floating_point() else np.int64)
    return state
