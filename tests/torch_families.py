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
from typing import Any, NamedTuple

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


# --------------------------------------------------------------------------------------------
# Round two: ultralytics, YOLOv7, YOLOv9, RepViT, FastViT, RepGhost, UniRepLKNet, PP-YOLOE
# --------------------------------------------------------------------------------------------


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """ultralytics' (and YOLOv7's, ``d == 1``) padding rule: ``p``, or half the dilated span."""
    return (d * (k - 1) + 1) // 2 if p is None else p


class _UltralyticsConv(nn.Module):
    """ultralytics' ``Conv`` with ``act=False``: ``conv`` (no bias) then ``bn``."""

    def __init__(self, c1: int, c2: int, k: int, s: int, p: int | None, g: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _check_repconv(block: str, k: int, p: int, identity: bool) -> None:
    _check_odd(block, k)
    if p < k // 2 or (identity and p != k // 2):
        raise ValueError(
            f"{block}: the 1x1 branch is padded by p - k // 2 (and the identity needs p == "
            f"k // 2); got k={k}, p={p}"
        )


class UltralyticsRepConv(nn.Module):
    """ultralytics ``RepConv``, train form: ``conv1(x) + conv2(x) [+ bn(x)]`` (no activation).

    ``bn``: a BatchNorm of the input iff ``bn and c1 == c2 and s == 1`` (assigned first).
    ``conv1``: ``Conv(c1, c2, k, s, p, g)`` (conv + BN); ``conv2``: ``Conv(c1, c2, 1, s,
    p - k // 2, g)``. Published asserts ``k == 3 and p == 1``; any odd ``k`` with
    ``p >= k // 2`` is accepted here. ``d`` is stored, never used by the train convs.
    """

    has_identity_option = True

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        p: int = 1,
        g: int = 1,
        d: int = 1,
        act: bool = True,
        bn: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_unsupported(name, deploy=deploy)
        identity = self.has_identity_option and bn and c1 == c2 and s == 1
        _check_repconv(name, k, p, identity)
        self.bn = nn.BatchNorm2d(c1) if identity else None
        self.conv1 = _UltralyticsConv(c1, c2, k, s, p=p, g=g)
        self.conv2 = _UltralyticsConv(c1, c2, 1, s, p=p - k // 2, g=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x) + self.conv2(x)
        return out if self.bn is None else out + self.bn(x)


class RepConvN(UltralyticsRepConv):
    """YOLOv9 ``RepConvN``: ultralytics' ``RepConv`` whose ``bn`` is always None."""

    has_identity_option = False


class UltralyticsRepVGGDW(nn.Module):
    """ultralytics ``RepVGGDW(ed)``: ``conv(x) + conv1(x)``, depthwise 7x7 and 3x3 conv + BN."""

    def __init__(self, ed: int) -> None:
        super().__init__()
        self.conv = _UltralyticsConv(ed, ed, 7, 1, 3, g=ed)
        self.conv1 = _UltralyticsConv(ed, ed, 3, 1, 1, g=ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv1(x)


class Conv2(nn.Module):
    """ultralytics ``Conv2``: ``bn(conv(x) + cv2(x))`` (no activation).

    ``conv``: k x k (stride s, padding ``autopad(k, p, d)``, groups g, dilation d, no bias);
    ``bn`` (registered before ``cv2``); ``cv2``: 1x1 (stride s, padding ``autopad(1, p, d)``,
    groups g, dilation d). With ``p`` given the 1x1 gets the same padding, so the train form
    runs only with ``p`` None (or ``k == 1``).
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.cv2 = nn.Conv2d(c1, c2, 1, s, autopad(1, p, d), groups=g, dilation=d, bias=False)
        if 2 * autopad(k, p, d) - d * (k - 1) - 1 != 2 * autopad(1, p, d) - 1:
            raise ValueError(f"Conv2: the branches differ in size for k={k}, p={p}, d={d}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.cv2(x))


class YOLOv7RepConv(nn.Module):
    """YOLOv7 ``RepConv``: ``rbr_dense(x) + rbr_1x1(x) [+ rbr_identity(x)]`` (no activation).

    ``rbr_identity`` (assigned first): BN iff ``c1 == c2 and s == 1``. ``rbr_dense``:
    ``Sequential(Conv2d(k, s, autopad(k, p), g), BN)``; ``rbr_1x1``: ``Sequential(Conv2d(1, s,
    autopad(k, p) - k // 2, g), BN)``. Published asserts ``k == 3`` and a padding of 1.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        act: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("YOLOv7RepConv", deploy=deploy)
        padding = autopad(k, p)
        identity = c1 == c2 and s == 1
        _check_repconv("YOLOv7RepConv", k, padding, identity)
        self.rbr_identity = nn.BatchNorm2d(c1) if identity else None
        self.rbr_dense = nn.Sequential(
            nn.Conv2d(c1, c2, k, s, padding, groups=g, bias=False), nn.BatchNorm2d(c2)
        )
        self.rbr_1x1 = nn.Sequential(
            nn.Conv2d(c1, c2, 1, s, padding - k // 2, groups=g, bias=False), nn.BatchNorm2d(c2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return out if self.rbr_identity is None else out + self.rbr_identity(x)


class Conv2d_BN(nn.Sequential):  # the published class name
    """RepViT ``Conv2d_BN`` (timm ``ConvNorm``): ``c`` (conv, no bias) then ``bn``."""

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1,
        resolution: int = -10000,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class RepViTRepVGGDW(nn.Module):
    """RepViT ``RepVGGDW(ed)`` (timm ``RepVggDw(ed, kernel_size, legacy)``).

    Current: ``bn(conv(x) + conv1(x) + x)``, ``conv`` a depthwise ``Conv2d_BN`` (kernel
    ``kernel_size``, padding ``(kernel_size - 1) // 2``), ``conv1`` a depthwise 1x1 conv with
    bias, ``bn`` after the sum. Legacy (RepViT's first release, timm ``legacy=True``):
    ``conv(x) + conv1(x) + x`` with ``conv1`` a depthwise 1x1 ``Conv2d_BN`` and no ``bn``.
    """

    def __init__(self, ed: int, kernel_size: int = 3, legacy: bool = False) -> None:
        super().__init__()
        _check_odd("RepViTRepVGGDW", kernel_size)
        self.conv = Conv2d_BN(ed, ed, kernel_size, 1, (kernel_size - 1) // 2, groups=ed)
        self.conv1: nn.Module
        if legacy:
            self.conv1 = Conv2d_BN(ed, ed, 1, 1, 0, groups=ed)
            self.bn: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
            self.bn = nn.BatchNorm2d(ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class BN_Linear(nn.Sequential):  # the published class name
    """RepViT ``BN_Linear`` (timm ``NormLinear``): ``bn`` (BatchNorm1d) then ``l`` (Linear)."""

    def __init__(self, a: int, b: int, bias: bool = True, std: float = 0.02) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))


class _FastViTMobileOne(nn.Module):
    """FastViT's depthwise ``MobileOneBlock`` without activation: skip, conv branches, scale."""

    def __init__(self, dim: int, kernel_size: int, use_scale_branch: bool, branches: int) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(dim)
        self.rbr_conv = (
            nn.ModuleList(
                _conv_bn(dim, dim, kernel_size, stride=1, padding=kernel_size // 2, groups=dim)
                for _ in range(branches)
            )
            if branches > 0
            else None
        )
        self.rbr_scale = (
            _conv_bn(dim, dim, 1, stride=1, padding=0, groups=dim)
            if kernel_size > 1 and use_scale_branch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = self.rbr_scale(x) + out
        for branch in self.rbr_conv or ():
            out = out + branch(x)
        return out


class RepMixer(nn.Module):
    """FastViT ``RepMixer`` (apple keys): ``x + layer_scale * (mixer(x) - norm(x))``.

    ``norm``: a depthwise MobileOne block with its skip BN only; ``mixer``: one with skip, one
    kxk conv + BN and a 1x1 scale conv + BN. ``layer_scale`` (dim, 1, 1) iff
    ``use_layer_scale`` (timm: iff ``layer_scale_init_value`` is not None).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        use_layer_scale: bool = True,
        layer_scale_init_value: float | None = 1e-5,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("RepMixer", inference_mode=inference_mode)
        _check_odd("RepMixer", kernel_size)
        self.norm = _FastViTMobileOne(dim, kernel_size, use_scale_branch=False, branches=0)
        self.mixer = _FastViTMobileOne(dim, kernel_size, use_scale_branch=True, branches=1)
        self.use_layer_scale = use_layer_scale and layer_scale_init_value is not None
        if self.use_layer_scale:
            assert layer_scale_init_value is not None
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_layer_scale:
            return x + self.layer_scale * (self.mixer(x) - self.norm(x))
        return x + self.mixer(x) - self.norm(x)


class RepCPE(nn.Module):
    """FastViT ``RepCPE`` (timm ``RepConditionalPosEnc``, key ``pos_enc``): ``pe(x) + x``.

    ``pe``: conv ``spatial_shape`` with bias, groups ``embed_dim``, padding
    ``spatial_shape[0] // 2`` on both axes.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int = 768,
        spatial_shape: int | tuple[int, int] = (7, 7),
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("RepCPE", inference_mode=inference_mode)
        shape = (spatial_shape, spatial_shape) if isinstance(spatial_shape, int) else spatial_shape
        self.pe = nn.Conv2d(
            in_channels, embed_dim, shape, 1, shape[0] // 2, bias=True, groups=embed_dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


class RepGhostModule(nn.Module):
    """RepGhost ``RepGhostModule``: ``primary_conv``, then the sum of the cheap branches.

    ``primary_conv``: conv ``kernel_size`` (stride, padding ``kernel_size // 2``) -> BN ->
    ReLU (if ``relu``). On its output ``x1``: ``cheap_operation`` (``0``: depthwise ``dw_size``
    conv, ``1``: BN) + ``fusion_bn.0(x1)`` (iff ``reparam_bn``) + ``x1`` (iff
    ``reparam_identity``, no keys). ``reparameterizable(x1)`` is that sum; ``forward`` returns
    it for ``x`` (before the final ReLU).
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        kernel_size: int = 1,
        dw_size: int = 3,
        stride: int = 1,
        relu: bool = True,
        deploy: bool = False,
        reparam_bn: bool = True,
        reparam_identity: bool = False,
    ) -> None:
        super().__init__()
        _check_unsupported("RepGhostModule", deploy=deploy)
        _check_odd("RepGhostModule", dw_size)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU() if relu else nn.Sequential(),
        )
        fusion_conv: list[nn.Module] = []
        fusion_bn: list[nn.Module] = []
        if reparam_bn:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.BatchNorm2d(oup))
        if reparam_identity:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.Identity())
        self.fusion_conv = nn.Sequential(*fusion_conv)
        self.fusion_bn = nn.Sequential(*fusion_bn)
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(oup, oup, dw_size, 1, dw_size // 2, groups=oup, bias=False),
            nn.BatchNorm2d(oup),
        )

    def reparameterizable(self, x1: torch.Tensor) -> torch.Tensor:
        """The sum reparam folds, on the primary conv's output ``x1``."""
        out = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn, strict=True):
            out = out + bn(conv(x1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reparameterizable(self.primary_conv(x))


UNIREPLKNET_BRANCHES: dict[int, tuple[list[int], list[int]]] = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}
"""UniRepLKNet's published ``(kernel_sizes, dilates)`` per ``kernel_size``."""


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet ``DilatedReparamBlock``: ``origin_bn(lk_origin(x)) + sum dil_bn(dil_conv(x))``.

    ``lk_origin``: depthwise K x K conv, padding K // 2; ``dil_conv_k{k}_{r}``: depthwise k x k,
    dilation r, padding ``(r (k - 1) + 1) // 2``, each followed by ``dil_bn_k{k}_{r}``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        deploy: bool,
        use_sync_bn: bool = False,
        attempt_use_lk_impl: bool = True,
    ) -> None:
        super().__init__()
        _check_unsupported("DilatedReparamBlock", deploy=deploy)
        if kernel_size not in UNIREPLKNET_BRANCHES:
            raise ValueError(f"DilatedReparamBlock: no branch table for kernel_size={kernel_size}")
        self.lk_origin = nn.Conv2d(
            channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=False
        )
        self.origin_bn = nn.BatchNorm2d(channels)
        self.kernel_sizes, self.dilates = UNIREPLKNET_BRANCHES[kernel_size]
        for k, r in zip(self.kernel_sizes, self.dilates, strict=True):
            conv = nn.Conv2d(
                channels, channels, k, 1, (r * (k - 1) + 1) // 2, dilation=r, groups=channels,
                bias=False,
            )  # fmt: skip
            self.add_module(f"dil_conv_k{k}_{r}", conv)
            self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates, strict=True):
            conv = self.get_submodule(f"dil_conv_k{k}_{r}")
            out = out + self.get_submodule(f"dil_bn_k{k}_{r}")(conv(x))
        return out


class PaddleBatchNorm2D(nn.Module):
    """Paddle's ``BatchNorm2D`` at inference, with Paddle's key names.

    Parameters ``weight``, ``bias``; buffers ``_mean``, ``_variance`` (no
    ``num_batches_tracked``); ``eps`` is Paddle's ``_epsilon`` (default 1e-5).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("_mean", torch.zeros(num_features))
        self.register_buffer("_variance", torch.ones(num_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self._mean, self._variance, self.weight, self.bias, False, 0.0, self.eps
        )


class _PaddleConvBN(nn.Module):
    """PaddleDetection's ``ConvBNLayer`` with ``act=None``: ``conv`` (no bias) then ``bn``."""

    def __init__(self, ch_in: int, ch_out: int, filter_size: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, filter_size, 1, padding, bias=False)
        self.bn = PaddleBatchNorm2D(ch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class PPYOLOERepVggBlock(nn.Module):
    """PP-YOLOE ``RepVggBlock``: ``conv1(x) + alpha * conv2(x)`` (no activation), Paddle keys.

    ``conv1``: 3x3 conv (padding 1) + BN; ``conv2``: 1x1 conv + BN; ``alpha`` (shape [1],
    initialised to 1) iff ``alpha``. As published, ``if self.alpha:`` decides, so an alpha of
    exactly 0 adds ``conv2(x)`` unscaled.
    """

    def __init__(self, ch_in: int, ch_out: int, act: str = "relu", alpha: bool = False) -> None:
        super().__init__()
        self.conv1 = _PaddleConvBN(ch_in, ch_out, 3, 1)
        self.conv2 = _PaddleConvBN(ch_in, ch_out, 1, 0)
        self.alpha = nn.Parameter(torch.ones(1)) if alpha else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None and bool(self.alpha):
            return self.conv1(x) + self.alpha * self.conv2(x)
        return self.conv1(x) + self.conv2(x)


FAMILY_CLASSES: dict[str, type[nn.Module]] = {
    "RepVGGBlock": RepVGGBlock,
    "DiverseBranchBlock": DiverseBranchBlock,
    "ACBlock": ACBlock,
    "MobileOneBlock": MobileOneBlock,
    "ReparamLargeKernelConv": ReparamLargeKernelConv,
    "QARepVGGBlock": QARepVGGBlock,
    "QARepVGGBlockV2": QARepVGGBlockV2,
    "ultralytics.RepConv": UltralyticsRepConv,
    "RepConvN": RepConvN,
    "ultralytics.RepVGGDW": UltralyticsRepVGGDW,
    "Conv2": Conv2,
    "yolov7.RepConv": YOLOv7RepConv,
    "repvit.RepVGGDW": RepViTRepVGGDW,
    "Conv2d_BN": Conv2d_BN,
    "BN_Linear": BN_Linear,
    "RepMixer": RepMixer,
    "RepCPE": RepCPE,
    "RepGhostModule": RepGhostModule,
    "DilatedReparamBlock": DilatedReparamBlock,
    "ppdet.RepVggBlock": PPYOLOERepVggBlock,
}

#: The families of the first round: constructors with ``in_channels``, ``out_channels``,
#: ``kernel_size``, ``stride``, ``groups`` (the generic random configurations use these names).
ROUND_ONE = (
    "RepVGGBlock", "DiverseBranchBlock", "ACBlock", "MobileOneBlock", "ReparamLargeKernelConv",
    "QARepVGGBlock", "QARepVGGBlockV2",
)  # fmt: skip

#: Published ``epsilon`` of each family's BatchNorms where it is not PyTorch's 1e-5 (ultralytics,
#: YOLOv7 and YOLOv9 set 1e-3 in ``initialize_weights``).
PUBLISHED_EPS: dict[str, float] = {
    "ultralytics.RepConv": 1e-3,
    "RepConvN": 1e-3,
    "ultralytics.RepVGGDW": 1e-3,
    "Conv2": 1e-3,
    "yolov7.RepConv": 1e-3,
}


class Geometry(NamedTuple):
    """The single conv (or linear layer) a family's train form equals."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    dilation: int = 1
    features: bool = False  # (N, C) inputs: a fully connected layer


def geometry(name: str, kwargs: dict[str, Any]) -> Geometry:
    """The input and output channels, kernel, stride, padding, groups of a block's deploy conv."""
    kw = kwargs
    if name in ROUND_ONE:
        size = int(kw.get("kernel_size", 3))
        if name == "ReparamLargeKernelConv":
            padding = size // 2
        else:
            padding = int(kw.get("padding", 1 if name.startswith("QARepVGG") else 0))
        return Geometry(
            kw["in_channels"], kw["out_channels"], size, kw.get("stride", 1), padding,
            kw.get("groups", 1),
        )  # fmt: skip
    if name in ("ultralytics.RepConv", "RepConvN"):
        k = kw.get("k", 3)
        return Geometry(kw["c1"], kw["c2"], k, kw.get("s", 1), kw.get("p", 1), kw.get("g", 1))
    if name == "yolov7.RepConv":
        k = kw.get("k", 3)
        return Geometry(
            kw["c1"], kw["c2"], k, kw.get("s", 1), autopad(k, kw.get("p")), kw.get("g", 1)
        )
    if name == "Conv2":
        k, d = kw.get("k", 3), kw.get("d", 1)
        return Geometry(
            kw["c1"], kw["c2"], k, kw.get("s", 1), autopad(k, kw.get("p"), d), kw.get("g", 1), d
        )
    if name == "ultralytics.RepVGGDW":
        return Geometry(kw["ed"], kw["ed"], 7, 1, 3, kw["ed"])
    if name == "repvit.RepVGGDW":
        k = kw.get("kernel_size", 3)
        return Geometry(kw["ed"], kw["ed"], k, 1, (k - 1) // 2, kw["ed"])
    if name == "Conv2d_BN":
        return Geometry(
            kw["a"], kw["b"], kw.get("ks", 1), kw.get("stride", 1), kw.get("pad", 0),
            kw.get("groups", 1), kw.get("dilation", 1),
        )  # fmt: skip
    if name == "BN_Linear":
        return Geometry(kw["a"], kw["b"], 1, 1, 0, 1, features=True)
    if name == "RepMixer":
        k = kw.get("kernel_size", 3)
        return Geometry(kw["dim"], kw["dim"], k, 1, k // 2, kw["dim"])
    if name == "RepCPE":
        shape = kw.get("spatial_shape", (7, 7))
        k = shape if isinstance(shape, int) else shape[0]
        return Geometry(kw["in_channels"], kw["in_channels"], k, 1, k // 2, kw["in_channels"])
    if name == "RepGhostModule":
        k = kw.get("dw_size", 3)
        return Geometry(kw["oup"], kw["oup"], k, 1, k // 2, kw["oup"])
    if name == "DilatedReparamBlock":
        k = kw["kernel_size"]
        return Geometry(kw["channels"], kw["channels"], k, 1, k // 2, kw["channels"])
    if name == "ppdet.RepVggBlock":
        return Geometry(kw["ch_in"], kw["ch_out"], 3, 1, 1, 1)
    raise KeyError(f"geometry: unknown family {name}")


def deploy_padding(name: str, kwargs: dict[str, Any]) -> int:
    """Padding of the single conv each family's train form equals (kernel is ``kernel_size``)."""
    return geometry(name, kwargs).padding


def block_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The part of a module reparam folds, on its input (RepGhost's sum after its primary conv)."""
    part = getattr(module, "reparameterizable", None)
    return part(x) if part is not None else module(x)


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


def _paddle_bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n in ("weight", "bias", "_mean", "_variance")]


def _ultralytics_repconv_keys(
    c1: int, c2: int, k: int = 3, s: int = 1, bn: bool = False, **_: Any
) -> list[str]:
    # conv.py: self.bn (BatchNorm2d or None) first, then conv1 and conv2 (Conv: conv, bn).
    keys = _bn_keys("bn") if bn and c1 == c2 and s == 1 else []
    return keys + _conv_bn_keys("conv1") + _conv_bn_keys("conv2")


def _repconvn_keys(**_: Any) -> list[str]:
    # yolov9 common.py: self.bn = None, conv1, conv2.
    return _conv_bn_keys("conv1") + _conv_bn_keys("conv2")


def _ultralytics_repvggdw_keys(**_: Any) -> list[str]:
    # block.py: conv = Conv(ed, ed, 7, ...), conv1 = Conv(ed, ed, 3, ...).
    return _conv_bn_keys("conv") + _conv_bn_keys("conv1")


def _conv2_keys(**_: Any) -> list[str]:
    # conv.py: Conv.__init__ (conv, bn), then cv2 (bias=False).
    return ["conv.weight", *_bn_keys("bn"), "cv2.weight"]


def _yolov7_repconv_keys(c1: int, c2: int, s: int = 1, **_: Any) -> list[str]:
    # common.py: rbr_identity first (BatchNorm2d iff c2 == c1 and s == 1), rbr_dense, rbr_1x1
    # (each nn.Sequential(Conv2d, BatchNorm2d)).
    keys = _bn_keys("rbr_identity") if c1 == c2 and s == 1 else []
    for branch in ("rbr_dense", "rbr_1x1"):
        keys += [f"{branch}.0.weight", *_bn_keys(f"{branch}.1")]
    return keys


def _repvit_repvggdw_keys(legacy: bool = False, **_: Any) -> list[str]:
    # repvit.py: conv (Conv2d_BN: c, bn), conv1 (Conv2d with bias; legacy: Conv2d_BN), bn (legacy:
    # none; timm nn.Identity).
    keys = ["conv.c.weight", *_bn_keys("conv.bn")]
    if legacy:
        return [*keys, "conv1.c.weight", *_bn_keys("conv1.bn")]
    return [*keys, "conv1.weight", "conv1.bias", *_bn_keys("bn")]


def _conv2d_bn_keys(**_: Any) -> list[str]:
    return ["c.weight", *_bn_keys("bn")]


def _bn_linear_keys(bias: bool = True, **_: Any) -> list[str]:
    return [*_bn_keys("bn"), "l.weight", *(["l.bias"] if bias else [])]


def _repmixer_keys(
    kernel_size: int = 3,
    use_layer_scale: bool = True,
    layer_scale_init_value: float | None = 1e-5,
    **_: Any,
) -> list[str]:
    # fastvit.py: layer_scale is a parameter of RepMixer itself, so it comes first; norm is a
    # MobileOneBlock with rbr_skip only; mixer has rbr_skip, rbr_conv.0, rbr_scale (k > 1).
    keys = ["layer_scale"] if use_layer_scale and layer_scale_init_value is not None else []
    keys += _bn_keys("norm.rbr_skip") + _bn_keys("mixer.rbr_skip")
    keys += _conv_bn_keys("mixer.rbr_conv.0")
    return keys + (_conv_bn_keys("mixer.rbr_scale") if kernel_size > 1 else [])


def _repcpe_keys(**_: Any) -> list[str]:
    return ["pe.weight", "pe.bias"]


def _repghost_keys(reparam_bn: bool = True, **_: Any) -> list[str]:
    # repghost.py: primary_conv (0 conv, 1 BN, 2 ReLU), fusion_conv (no keys), fusion_bn
    # (0: BN iff reparam_bn; the identity option adds an nn.Identity), cheap_operation (0, 1).
    keys = ["primary_conv.0.weight", *_bn_keys("primary_conv.1")]
    keys += _bn_keys("fusion_bn.0") if reparam_bn else []
    return [*keys, "cheap_operation.0.weight", *_bn_keys("cheap_operation.1")]


def _dilated_keys(kernel_size: int, **_: Any) -> list[str]:
    # unireplknet.py: lk_origin (no bias), origin_bn, then dil_conv_k{k}_{r}, dil_bn_k{k}_{r}
    # for the published table of kernel_size.
    tables = {
        17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)), 15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
        13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)), 11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
        9: ((5, 5, 3, 3), (1, 2, 3, 4)), 7: ((5, 3, 3), (1, 2, 3)), 5: ((3, 3), (1, 2)),
    }  # fmt: skip
    keys = ["lk_origin.weight", *_bn_keys("origin_bn")]
    for k, r in zip(*tables[kernel_size], strict=True):
        keys += [f"dil_conv_k{k}_{r}.weight", *_bn_keys(f"dil_bn_k{k}_{r}")]
    return keys


def _ppyoloe_keys(alpha: bool = False, **_: Any) -> list[str]:
    # cspresnet.py: alpha is a parameter of the block itself (first in the state dict); conv1,
    # conv2 are ConvBNLayer (conv, bn with Paddle's _mean, _variance).
    keys = ["alpha"] if alpha else []
    for branch in ("conv1", "conv2"):
        keys += [f"{branch}.conv.weight", *_paddle_bn_keys(f"{branch}.bn")]
    return keys


PUBLISHED_KEYS: dict[str, Callable[..., list[str]]] = {
    "RepVGGBlock": _repvgg_keys,
    "DiverseBranchBlock": _dbb_keys,
    "ACBlock": _acb_keys,
    "MobileOneBlock": _mobileone_keys,
    "ReparamLargeKernelConv": _replk_keys,
    "QARepVGGBlock": _qarepvgg_keys,
    "QARepVGGBlockV2": _qarepvgg_keys,
    "ultralytics.RepConv": _ultralytics_repconv_keys,
    "RepConvN": _repconvn_keys,
    "ultralytics.RepVGGDW": _ultralytics_repvggdw_keys,
    "Conv2": _conv2_keys,
    "yolov7.RepConv": _yolov7_repconv_keys,
    "repvit.RepVGGDW": _repvit_repvggdw_keys,
    "Conv2d_BN": _conv2d_bn_keys,
    "BN_Linear": _bn_linear_keys,
    "RepMixer": _repmixer_keys,
    "RepCPE": _repcpe_keys,
    "RepGhostModule": _repghost_keys,
    "DilatedReparamBlock": _dilated_keys,
    "ppdet.RepVggBlock": _ppyoloe_keys,
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
    "ultralytics.RepConv": [
        _kw(c1=4, c2=4),
        _kw(c1=4, c2=4, bn=True),
        _kw(c1=4, c2=8, s=2, bn=True),
        _kw(c1=4, c2=4, g=2, bn=True),
        _kw(c1=4, c2=4, g=4, bn=True, d=2),
        _kw(c1=3, c2=5),
    ],
    "RepConvN": [
        _kw(c1=4, c2=4),
        _kw(c1=4, c2=6, s=2, g=2),
        _kw(c1=4, c2=4, g=4, bn=True),
    ],
    "ultralytics.RepVGGDW": [_kw(ed=4), _kw(ed=3)],
    "Conv2": [
        _kw(c1=4, c2=4),
        _kw(c1=4, c2=6, s=2),
        _kw(c1=4, c2=4, g=2),
        _kw(c1=4, c2=4, g=4, d=2),
        _kw(c1=4, c2=6, k=5, g=2),
        _kw(c1=4, c2=6, k=1),
    ],
    "yolov7.RepConv": [
        _kw(c1=4, c2=4),
        _kw(c1=4, c2=8, s=2),
        _kw(c1=4, c2=4, g=2),
        _kw(c1=4, c2=4, g=4),
        _kw(c1=4, c2=6, p=1),
    ],
    "repvit.RepVGGDW": [_kw(ed=4), _kw(ed=4, legacy=True), _kw(ed=3, kernel_size=3)],
    "Conv2d_BN": [
        _kw(a=4, b=6),
        _kw(a=4, b=4, ks=3, pad=1, groups=4),
        _kw(a=4, b=8, ks=3, stride=2, pad=1, groups=2),
        _kw(a=4, b=4, ks=3, pad=2, dilation=2),
        _kw(a=4, b=6, ks=3, stride=2),
    ],
    "BN_Linear": [_kw(a=4, b=6), _kw(a=4, b=3, bias=False)],
    "RepMixer": [
        _kw(dim=4),
        _kw(dim=4, use_layer_scale=False),
        _kw(dim=4, kernel_size=5),
        _kw(dim=3, kernel_size=1),
    ],
    "RepCPE": [
        _kw(in_channels=4, embed_dim=4),
        _kw(in_channels=4, embed_dim=4, spatial_shape=3),
        _kw(in_channels=3, embed_dim=3, spatial_shape=(5, 5)),
    ],
    "RepGhostModule": [
        _kw(inp=3, oup=4),
        _kw(inp=3, oup=4, reparam_identity=True),
        _kw(inp=3, oup=4, reparam_bn=False, reparam_identity=True),
        _kw(inp=4, oup=4, reparam_bn=False),
        _kw(inp=3, oup=4, kernel_size=3, stride=2, relu=False, dw_size=5),
    ],
    "DilatedReparamBlock": [
        _kw(channels=2, kernel_size=size, deploy=False) for size in (5, 7, 9, 11, 13, 15, 17)
    ],
    "ppdet.RepVggBlock": [
        _kw(ch_in=4, ch_out=4),
        _kw(ch_in=4, ch_out=6, alpha=True),
        _kw(ch_in=3, ch_out=5, act=None),
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
    "ultralytics.RepConv": [
        _kw(c1=4, c2=4, k=5, p=2, bn=True),
        _kw(c1=4, c2=6, k=3, p=2),
        _kw(c1=4, c2=4, k=7, p=3, g=2, bn=True),
        _kw(c1=4, c2=8, k=5, s=2, p=2, g=4),
    ],
    "RepConvN": [_kw(c1=4, c2=4, k=5, p=2, g=2)],
    "yolov7.RepConv": [_kw(c1=4, c2=4, k=5, g=2), _kw(c1=4, c2=6, k=3, p=2)],
    "repvit.RepVGGDW": [_kw(ed=4, kernel_size=5), _kw(ed=4, kernel_size=7, legacy=True)],
}
"""Generalisations the published constructors reject (they assert kernel 3, padding 1)."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every conv and BatchNorm non-trivial values, deterministically; eval mode.

    Conv and linear weights (and biases) ~ N(0, 1 / fan_in); BN gamma ~ U[0.5, 1.5], beta ~
    N(0, 0.2^2), running mean ~ N(0, 0.2^2), running var ~ U[0.5, 2] (Paddle's BatchNorm too); a
    block's own parameters (layer scales, alpha) ~ U[0.5, 1.5] with a random sign. Values are
    drawn in float64 from a generator seeded with ``seed`` and cast to each tensor's dtype, so a
    float32 and a float64 copy of the same module get the same values up to rounding. Returns
    ``module``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * std)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                normal(m.weight, fan_in**-0.5)
                if m.bias is not None:
                    normal(m.bias, fan_in**-0.5)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                if m.affine:
                    uniform(m.weight, 0.5, 1.5)
                    normal(m.bias, 0.2)
                assert m.running_mean is not None and m.running_var is not None
                normal(m.running_mean, 0.2)
                uniform(m.running_var, 0.5, 2.0)
            elif isinstance(m, PaddleBatchNorm2D):
                uniform(m.weight, 0.5, 1.5)
                normal(m.bias, 0.2)
                normal(m._mean, 0.2)
                uniform(m._variance, 0.5, 2.0)
            else:  # a block's own parameters: layer scales, PP-YOLOE's alpha
                for parameter in m.parameters(recurse=False):
                    uniform(parameter, 0.5, 1.5)
                    sign = torch.rand(parameter.shape, generator=gen) < 0.5
                    parameter.mul_(1 - 2 * sign.to(parameter.dtype))
    return module.eval()


def set_bn_eps_(module: nn.Module, eps: float) -> nn.Module:
    """Set every BatchNorm's eps (YOLOv6 models use 1e-3); eps is not in the state dict."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | PaddleBatchNorm2D):
            m.eps = eps
    return module


def numpy_state(module: nn.Module, dtype: DTypeLike = np.float64) -> dict[str, NDArray[Any]]:
    """``module.state_dict()`` as NumPy arrays: floats cast to ``dtype``, integers as int64."""
    state: dict[str, NDArray[Any]] = {}
    for key, value in module.state_dict().items():
        array = value.detach().cpu().numpy()
        state[key] = array.astype(dtype if value.is_floating_point() else np.int64)
    return state
