"""Small PyTorch models in train form, and their ONNX export, for whole-graph folding tests.

Test support, not a test file (``test_graph_models.py`` and ``benchmarks/bench_graph.py`` use
it). Every model here is built in eval mode with random weights *and* random BatchNorm
statistics (:func:`randomize_calibrated_`), so a branch the fold drops or double-counts changes
the output well beyond float32 rounding, and every layer scale is near 1 (never timm's 1e-5,
which would hide a missing branch). Three groups:

* the train-form blocks of every registered family (``torch_families.FAMILY_CLASSES``), alone
  (:data:`FAMILY_CONFIGS`) and inside small networks (:class:`FamilyNet`: a stem, two blocks
  of each family of a group (:data:`NETWORK_GROUPS`), a squeeze-and-excitation module, a
  residual around a nonlinear block, a classifier head);
* a RepVGG network (:class:`RepVGGNet`, RepVGG-A0's depths at small widths);
* blocks users write themselves (:data:`USER_BLOCKS`): extra branches, scaled and negated
  branches, FastViT's RepMixer written plainly, a BatchNorm after the sum, an average-pool
  branch, a ReLU inside a branch, and two sequences the fold must leave as two convolutions.

:func:`export` writes a module as ONNX with either of PyTorch's exporters.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_families import (
    FAMILY_CLASSES,
    PUBLISHED_EPS,
    ROUND_ONE,
    BNAndPadLayer,
    geometry,
    randomize_,
    set_bn_eps_,
)

__all__ = [
    "A0_DEPTHS",
    "FAMILY_CONFIGS",
    "FEATURE_FAMILIES",
    "NETWORK_GROUPS",
    "SMALL_WIDTHS",
    "USER_BLOCKS",
    "AvgPoolBranchBlock",
    "DepthwisePointwise",
    "ExportableBNAndPad",
    "FamilyNet",
    "MobileOneNet",
    "NegatedBranchBlock",
    "PlainRepMixer",
    "PostSumBNBlock",
    "ReluInsideBlock",
    "RepVGG5x5Block",
    "RepVGGNet",
    "ScaledBranchBlock",
    "SequentialBorder",
    "Squeeze",
    "build_family_block",
    "build_family_net",
    "build_repvgg_net",
    "build_user_block",
    "export",
    "family_block",
    "make_exportable_",
    "randomize_calibrated_",
    "torch_families_repvgg",
]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export(module: nn.Module, x: torch.Tensor, path: str | Path, *, dynamo: bool) -> Path:
    """Write ``module`` (eval mode) as ONNX at ``path``, with a dynamic batch axis.

    ``dynamo=False``: the TorchScript exporter, opset 17, constant folding on (it folds each
    Conv whose only reader is a BatchNormalization into the Conv). ``dynamo=True``: the
    ``torch.export`` exporter, opset 18 (it cannot down-convert to 17 here), with its default
    ONNX optimizer; it writes the weights as external data next to the graph
    (``path.onnx.data``). The input is named ``input`` and the output ``output``; axis 0 of
    both is the symbolic ``batch``, so a graph exported at batch 1 runs at any batch.

    Both exporters warn about themselves (the TorchScript one is deprecated; torch.export
    uses a deprecated pytree API; TorchScript cannot constant-fold the reversed ``Slice`` its
    ``Pad`` builds, and warns when tracing PP-YOLOE's ``if self.alpha:``, which holds for the
    traced weights): those warnings are silenced here, since pytest turns warnings into errors
    and they say nothing about the fold.
    """
    path = Path(path)
    module = module.eval()
    reuse = _reused_exporter_tables() if dynamo else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), reuse:
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        if dynamo:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                verbose=False,
            )
        else:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
    return path


_CACHE: dict[Any, Any] = {}


@contextlib.contextmanager
def _reused_exporter_tables() -> Iterator[None]:
    """Within the block, torch.onnx's dynamo exporter builds two tables once, not per call.

    For test speed only (each saves 0.5-1 s of a small model's 2 s export here). On every
    call ``torch.onnx.export(dynamo=True)`` rebuilds its registry of ATen -> ONNX functions,
    parsing the source of ~500 ONNX Script functions, and ``torch.export`` lists every
    composite-implicit op of every namespace to decide which to keep. An export without
    ``custom_translation_table`` only reads the registry, and no op is registered between the
    exports of a test session, so the graphs are the same. Both hooks are private (torch
    2.13): where one is missing, it is left alone and exports just take longer.
    """
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        patched.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        build = registry_class.__dict__["from_torchlib"].__func__

        def from_torchlib(cls: type, opset_version: int = 18) -> Any:
            key = ("registry", opset_version)
            if key not in _CACHE:
                _CACHE[key] = build(cls, opset_version=opset_version)
            return _CACHE[key]

        patch(registry_class, "from_torchlib", classmethod(from_torchlib))
    except (ImportError, AttributeError, KeyError):
        pass
    try:
        import torch.export.decomp_utils as decomp_utils
        import torch.export.exported_program as exported_program

        collect = exported_program.__dict__["_collect_all_valid_cia_ops"]

        def collect_once() -> Any:
            if "cia" not in _CACHE:
                _CACHE["cia"] = frozenset(collect())
            return _CACHE["cia"]

        for module in (exported_program, decomp_utils):
            if "_collect_all_valid_cia_ops" in module.__dict__:
                patch(module, "_collect_all_valid_cia_ops", collect_once)
    except (ImportError, AttributeError, KeyError):
        pass
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def randomize_calibrated_(module: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """Random weights and statistics that keep activations O(1); eval mode. Returns ``module``.

    1. :func:`torch_families.randomize_`: conv and linear weights ~ N(0, 1 / fan_in), BN gamma
       in [0.5, 1.5], beta ~ N(0, 0.2^2), a block's own parameters (layer scales, branch
       weights) ~ +-U[0.5, 1.5] (never timm's 1e-5, which would hide a missing branch);
    2. calibration: each PyTorch BatchNorm's running statistics become those of its input on
       ``x`` (one train-mode pass with ``momentum=None``), so a deep network's activations stay
       O(1) (random statistics alone made MobileOne-S0's reach 1e14);
    3. perturbation: each running variance times U[0.5, 2], each mean shifted by
       N(0, 0.2^2) x its standard deviation, so no BatchNorm is the identity on its input.

    Paddle's BatchNorm keeps the random statistics of step 1. Every draw comes from
    generators seeded with ``seed``.
    """
    randomize_(module, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    with torch.no_grad():
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: after one batch, that batch's statistics
        module.train()
        module(x)
        module.eval()
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
            assert bn.running_mean is not None and bn.running_var is not None
            std = torch.sqrt(bn.running_var)
            shift = torch.randn(bn.running_mean.shape, generator=gen) * 0.2 * std
            bn.running_mean.add_(shift)
            bn.running_var.mul_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=gen))
    return module.eval()


class ExportableBNAndPad(nn.Module):
    """DBB's ``BNAndPadLayer`` written with ops the fold reads: ``pad(bn(x) - v, p) + v``.

    ``v`` is the BatchNorm's per-channel output at zero input (a buffer, computed from the
    layer's statistics when this module is made). Equal to ``BNAndPadLayer`` everywhere: the
    border is ``0 + v = v`` and the interior ``bn(x) - v + v``. The published layer writes the
    border by slice assignment into an expanded tensor, which both exporters turn into
    ``Expand``/``ScatterND`` over ``Shape`` ops: not an affine op of the fold's list.
    """

    def __init__(self, layer: BNAndPadLayer) -> None:
        super().__init__()
        self.bn = layer.bn
        self.pad_pixels = layer.pad_pixels
        bn = layer.bn
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            value = -bn.running_mean / std
            if bn.affine:
                value = bn.bias + value * bn.weight
        self.register_buffer("at_zero", value.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_pixels
        if p == 0:
            return self.bn(x)
        return F.pad(self.bn(x) - self.at_zero, (p, p, p, p)) + self.at_zero


def make_exportable_(module: nn.Module) -> nn.Module:
    """Replace every ``BNAndPadLayer`` inside ``module`` by an :class:`ExportableBNAndPad`.

    Call it after the statistics are final (the border value is read from them). Returns
    ``module``.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BNAndPadLayer):
                setattr(parent, name, ExportableBNAndPad(child))
    return module


# --------------------------------------------------------------------------------------------
# Registered families: alone and in a network
# --------------------------------------------------------------------------------------------

#: One configuration per registered family (``torch_families.FAMILY_CLASSES``), each 4 channels
#: in and out at stride 1 (so blocks chain in a network): identity branches, groups, dilation,
#: a 13x13 kernel, layer scales and PP-YOLOE's alpha. BatchNorm eps as published
#: (``PUBLISHED_EPS``, YOLOv6's 1e-3 for QARepVGG).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "RepVGGBlock": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2),
    "DiverseBranchBlock": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1),
    "ACBlock": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, use_last_bn=True),
    "MobileOneBlock": dict(
        in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, num_conv_branches=2
    ),
    "ReparamLargeKernelConv": dict(
        in_channels=4, out_channels=4, kernel_size=13, stride=1, groups=4, small_kernel=5
    ),
    "QARepVGGBlock": dict(in_channels=4, out_channels=4),
    "QARepVGGBlockV2": dict(in_channels=4, out_channels=4),
    "ultralytics.RepConv": dict(c1=4, c2=4, bn=True),
    "RepConvN": dict(c1=4, c2=4, g=2),
    "ultralytics.RepVGGDW": dict(ed=4),
    "Conv2": dict(c1=4, c2=4, g=2),
    "yolov7.RepConv": dict(c1=4, c2=4),
    "repvit.RepVGGDW": dict(ed=4),
    "Conv2d_BN": dict(a=4, b=4, ks=3, pad=2, dilation=2),
    "BN_Linear": dict(a=4, b=4),
    "RepMixer": dict(dim=4),
    "RepCPE": dict(in_channels=4, embed_dim=4),
    "RepGhostModule": dict(inp=4, oup=4),
    "DilatedReparamBlock": dict(channels=4, kernel_size=7, deploy=False),
    "ppdet.RepVggBlock": dict(ch_in=4, ch_out=4, alpha=True),
}

#: Families whose block reads features (N, C), not images: ``BN_Linear`` is a network's head.
FEATURE_FAMILIES = ("BN_Linear",)

#: The families inside each test network (:class:`FamilyNet`), two blocks of each.
NETWORK_GROUPS: dict[str, tuple[str, ...]] = {
    "round-one": ROUND_ONE,
    "yolo": ("ultralytics.RepConv", "RepConvN", "ultralytics.RepVGGDW", "Conv2", "yolov7.RepConv"),
    "ppyoloe": ("ppdet.RepVggBlock",),  # apart: torch.export cannot trace its `if self.alpha:`
    "vit": ("repvit.RepVGGDW", "Conv2d_BN", "RepMixer", "RepCPE", "BN_Linear"),
    "misc": ("RepGhostModule", "DilatedReparamBlock"),
}

#: YOLOv6 sets every BatchNorm's eps to 1e-3 (FACTS.md), as ``PUBLISHED_EPS`` records for the
#: YOLO families of the second round.
_EPS = {"QARepVGGBlock": 1e-3, "QARepVGGBlockV2": 1e-3, **PUBLISHED_EPS}


def family_block(name: str) -> nn.Module:
    """Family ``name``'s train-form block with :data:`FAMILY_CONFIGS`' keywords (not randomized)."""
    block = FAMILY_CLASSES[name](**FAMILY_CONFIGS[name])
    if name in _EPS:
        set_bn_eps_(block, _EPS[name])
    return block


def build_family_block(name: str, *, seed: int = 0, size: int = 16) -> tuple[nn.Module, tuple]:
    """A family's train-form block alone, randomized and calibrated, and its input shape.

    The shape is (C, H, W), or (C,) for a feature family. DBB's ``BNAndPadLayer`` is replaced
    by :class:`ExportableBNAndPad` (same function).
    """
    torch.manual_seed(seed)
    block = family_block(name)
    channels = geometry(name, FAMILY_CONFIGS[name]).in_channels
    shape = (channels,) if name in FEATURE_FAMILIES else (channels, size, size)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(seed))
    randomize_calibrated_(block, x, seed)
    return make_exportable_(block), shape


class Squeeze(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(conv2(relu(conv1(avgpool(x)))))``, 1x1 convs."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * scale


class _ResidualNonlinear(nn.Module):
    """``act(x + bn2(conv2(act(bn1(conv1(x))))))``: a residual around a nonlinear block."""

    def __init__(self, channels: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = act()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


class FamilyNet(nn.Module):
    """A small network around blocks of some families.

    ``stem`` (conv 3x3 stride 2 + BN + act) -> each of ``blocks`` followed by an act ->
    ``se`` (:class:`Squeeze`) -> ``residual`` (a residual around conv+BN -> act -> conv+BN)
    -> global average pool -> flatten -> ``head``: ``head_blocks`` (feature blocks such as
    RepViT's ``BN_Linear``; no act between them, which on so few features can leave every
    unit of a ReLU dead and the output constant) then a linear layer.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        channels: int,
        act: Callable[[], nn.Module],
        head_blocks: Sequence[nn.Module] = (),
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
                bn=nn.BatchNorm2d(channels),
                act=act(),
            )
        )
        self.blocks = nn.ModuleList(blocks)
        self.acts = nn.ModuleList(act() for _ in blocks)
        self.se = Squeeze(channels, channels)
        self.residual = _ResidualNonlinear(channels, act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(*head_blocks, nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block, act in zip(self.blocks, self.acts, strict=True):
            x = act(block(x))
        x = self.residual(self.se(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build_family_net(group: str, *, seed: int = 0, size: int = 16) -> tuple[nn.Module, tuple]:
    """:class:`FamilyNet` around two blocks of each family of ``NETWORK_GROUPS[group]``.

    Image families' blocks follow the stem in the group's order; feature families' blocks
    form the head. Groups alternate between ReLU and SiLU (by their position in
    ``NETWORK_GROUPS``). Returns the network and its input shape (3, H, W).
    """
    names = NETWORK_GROUPS[group]
    act = nn.ReLU if list(NETWORK_GROUPS).index(group) % 2 == 0 else nn.SiLU
    torch.manual_seed(seed)
    blocks = [family_block(n) for n in names if n not in FEATURE_FAMILIES for _ in range(2)]
    heads = [family_block(n) for n in names if n in FEATURE_FAMILIES for _ in range(2)]
    net = FamilyNet(blocks, channels=4, act=act, head_blocks=heads)
    shape = (3, size, size)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(seed))
    randomize_calibrated_(net, x, seed)
    with torch.no_grad():  # keep the SE's ReLU open (else the SE is a constant scale)
        gen = torch.Generator().manual_seed(seed + 2)
        net.se.reduce.bias.copy_(0.5 + 0.5 * torch.rand(net.se.reduce.bias.shape, generator=gen))
    return make_exportable_(net), shape


# --------------------------------------------------------------------------------------------
# RepVGG
# --------------------------------------------------------------------------------------------


class RepVGGNet(nn.Module):
    """RepVGG in train form: a stem block, stages of blocks, each followed by a ReLU; a head.

    Blocks are ``torch_families.RepVGGBlock`` (3x3, padding 1); the first block of each stage
    (and the stem) has stride 2. Module names follow the official checkpoints (``stage0``,
    ``stage{s}.{i}``, ``linear``), so an official state dict loads (``num_batches_tracked``
    aside). Deploy form: one conv per block.
    """

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        groups: Callable[[int], int] = lambda layer: 1,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or depths[0] != 1:
            raise ValueError(f"RepVGGNet: one stem block, then stages; got {widths}, {depths}")
        channels = in_channels
        layer = 0
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for i in range(depth):
                blocks.append(
                    torch_families_repvgg(
                        channels, width, stride=2 if i == 0 else 1, groups=groups(layer)
                    )
                )
                channels = width
                layer += 1
            if stage == 0:
                self.stage0 = blocks[0]
            else:
                setattr(self, f"stage{stage}", nn.Sequential(*blocks))
        self.depth = layer
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, child in self.named_children():
            if name == "stage0":
                x = torch.relu(child(x))
            elif name.startswith("stage"):
                for block in child:
                    x = torch.relu(block(x))
        return self.linear(torch.flatten(self.pool(x), 1))


def torch_families_repvgg(cin: int, cout: int, *, stride: int, groups: int) -> nn.Module:
    """``torch_families.RepVGGBlock(cin, cout, 3, stride, padding=1, groups=groups)``."""
    return FAMILY_CLASSES["RepVGGBlock"](cin, cout, 3, stride=stride, padding=1, groups=groups)


#: RepVGG-A0's depths (FACTS.md: stem, then [2, 4, 14, 1]) at small widths: 22 blocks.
A0_DEPTHS = (1, 2, 4, 14, 1)
SMALL_WIDTHS = (8, 8, 16, 16, 32)


def build_repvgg_net(*, seed: int = 0, size: int = 32) -> tuple[nn.Module, tuple]:
    """:class:`RepVGGNet` with RepVGG-A0's depths and widths (8, 8, 16, 16, 32); (3, H, W)."""
    torch.manual_seed(seed)
    net = RepVGGNet(SMALL_WIDTHS, A0_DEPTHS)
    shape = (3, size, size)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(seed))
    return randomize_calibrated_(net, x, seed), shape


class MobileOneNet(nn.Module):
    """MobileOne in train form (apple/ml-mobileone's layout), blocks from ``torch_families``.

    ``stage0``: a block 3 -> ``stem`` (3x3, stride 2, one conv branch). Each stage
    ``stage{s}`` (s from 1): per unit a depthwise 3x3 block (stride 2 in the first unit,
    ``branches`` conv branches, scale branch, skip where it exists) then a pointwise 1x1
    block to the stage's width (``branches`` conv branches, skip where it exists); a ReLU
    after every block. Then global average pool and ``linear``. MobileOne-S0:
    ``stem=48, widths=(48, 128, 256, 1024), depths=(2, 8, 10, 1), branches=4``. Deploy form:
    one conv per block.
    """

    def __init__(
        self,
        stem: int,
        widths: Sequence[int],
        depths: Sequence[int],
        *,
        branches: int,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        block = FAMILY_CLASSES["MobileOneBlock"]
        self.stage0 = block(3, stem, 3, stride=2, padding=1)
        channels = stem
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
            units: list[nn.Module] = []
            for unit in range(depth):
                stride = 2 if unit == 0 else 1
                units.append(
                    block(
                        channels,
                        channels,
                        3,
                        stride=stride,
                        padding=1,
                        groups=channels,
                        num_conv_branches=branches,
                    )
                )
                units.append(block(channels, width, 1, num_conv_branches=branches))
                channels = width
            setattr(self, f"stage{stage}", nn.Sequential(*units))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stage0(x))
        for name, child in self.named_children():
            if name.startswith("stage") and name != "stage0":
                for unit in child:
                    x = torch.relu(unit(x))
        return self.linear(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------
# Blocks users write
# --------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, *, padding: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, k, padding=padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout),
        )
    )


class RepVGG5x5Block(nn.Module):
    """A RepVGG block with an extra 5x5 branch: ``bn(c5(x)) + bn(c3(x)) + bn(c1(x)) + bn(x)``.

    Deploy form: one 5x5 conv with bias.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense5 = _conv_bn(channels, channels, 5, padding=2)
        self.dense3 = _conv_bn(channels, channels, 3, padding=1)
        self.point = _conv_bn(channels, channels, 1, padding=0)
        self.identity = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense5(x) + self.dense3(x) + self.point(x) + self.identity(x)


class ScaledBranchBlock(nn.Module):
    """PP-YOLOE's RepVggBlock shape: ``bn(conv3(x)) + alpha * bn(conv1(x))``, scalar ``alpha``.

    Deploy form: one 3x3 conv with bias.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, padding=1)
        self.point = _conv_bn(cin, cout, 1, padding=0)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.alpha * self.point(x)


class NegatedBranchBlock(nn.Module):
    """A difference of branches: ``bn1(conv3(x)) - bn2(conv1(x))``. Deploy form: one 3x3 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, padding=1)
        self.point = _conv_bn(cin, cout, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) - self.point(x)


class PlainRepMixer(nn.Module):
    """FastViT's RepMixer written plainly: ``x + gamma * (mixer(x) - norm(x))``.

    ``mixer(x) = bn(dwconv3x3(x)) + bn(dwconv1x1(x)) + bn(x)`` (a depthwise MobileOne block
    without activation), ``norm = bn``, ``gamma`` a layer scale of shape (C, 1, 1). Deploy
    form: one depthwise 3x3 conv with bias.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mixer_conv = _conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.mixer_scale = _conv_bn(channels, channels, 1, padding=0, groups=channels)
        self.mixer_skip = nn.BatchNorm2d(channels)
        self.norm = nn.BatchNorm2d(channels)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixer_conv(x) + self.mixer_scale(x) + self.mixer_skip(x)
        return x + self.gamma * (mixed - self.norm(x))


class PostSumBNBlock(nn.Module):
    """A BatchNorm after the sum: ``bn(conv3(x) + conv1(x))``, the 3x3 with a bias.

    Deploy form: one 3x3 conv with bias.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dense = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.point = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.dense(x) + self.point(x))


class AvgPoolBranchBlock(nn.Module):
    """An average-pool branch: ``bn1(conv3(x)) + bn2(avgpool3x3(x))`` (stride 1, padding 1,
    zero padding counted). Deploy form: one 3x3 conv with bias.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = _conv_bn(channels, channels, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.bn(self.pool(x))


class ReluInsideBlock(nn.Module):
    """A branch with a ReLU inside: ``bn2(conv3(relu(bn1(conv1(x))))) + conv1b(x)``.

    The ReLU keeps its branch apart: ``conv1 + bn1`` is one conv, ``conv3 + bn2`` another,
    ``conv1b`` a third, and the sum of two convs of different inputs stays an ``Add``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv1b = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv3(inner)) + self.conv1b(x)


class SequentialBorder(nn.Module):
    """``bn2(conv3x3(bn1(conv1x1(x))))``, the 3x3 zero-padded: not one conv at the border.

    Inside the image the sequence is one 3x3 conv; on the border the 3x3 conv reads zeros
    where the one conv would read ``bn1``'s output at zero input (its bias). So it stays two
    convs (each with its BatchNorm folded in). The middle width (8) makes the fused 3x3 conv
    cheaper than its parts (4*8 + 8*4*9 against 4*4*9 multiply-adds per pixel), so cost alone
    would not keep it apart.
    """

    def __init__(self, cin: int = 4, mid: int = 8, cout: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv3(self.bn1(self.conv1(x))))


class DepthwisePointwise(nn.Module):
    """``bn2(pointwise1x1(bn1(depthwise3x3(x))))``: one 3x3 conv, but a costlier one.

    Fused, it is a dense 3x3 conv: 9 * C * C_out multiply-adds per pixel against
    9 * C + C * C_out for the parts, so the fold leaves two convs.
    """

    def __init__(self, channels: int = 8, cout: int = 8) -> None:
        super().__init__()
        self.depthwise = _conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.pointwise = _conv_bn(channels, cout, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


#: name -> (build the user block, its input shape (C, H, W)).
USER_BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "repvgg_5x5": (lambda: RepVGG5x5Block(4), (4, 16, 16)),
    "scaled_branch": (lambda: ScaledBranchBlock(4, 6), (4, 16, 16)),
    "negated_branch": (lambda: NegatedBranchBlock(4, 6), (4, 16, 16)),
    "repmixer": (lambda: PlainRepMixer(4), (4, 16, 16)),
    "post_sum_bn": (lambda: PostSumBNBlock(4, 6), (4, 16, 16)),
    "avgpool_branch": (lambda: AvgPoolBranchBlock(4), (4, 16, 16)),
    "relu_inside": (lambda: ReluInsideBlock(4), (4, 16, 16)),
    "sequential_border": (lambda: SequentialBorder(4, 8, 4), (4, 16, 16)),
    "depthwise_pointwise": (lambda: DepthwisePointwise(8, 8), (8, 16, 16)),
}


def build_user_block(name: str, *, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The user block ``name`` of :data:`USER_BLOCKS`, randomized and calibrated; (C, H, W)."""
    build, shape = USER_BLOCKS[name]
    torch.manual_seed(seed)
    module = build()
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(seed))
    return randomize_calibrated_(module, x, seed), shape


def deploy_form(net: Any) -> Any:
    """The deploy form by the published recipe: each RepVGG or MobileOne block of ``net`` fused
    by ``reparam.families`` into one conv + ReLU, then the pool and the head (benchmarks)."""
    from torch_families import MobileOneBlock, RepVGGBlock

    from reparam.families import from_state_dict

    layers: list[nn.Module] = []
    for block in (m for m in net.modules() if isinstance(m, RepVGGBlock | MobileOneBlock)):
        if isinstance(block, RepVGGBlock):
            conv, name, extra = block.rbr_dense.conv, "RepVGGBlock", {}
        else:
            conv, name = block.rbr_conv[0].conv, "MobileOneBlock"
            extra = {"num_conv_branches": len(block.rbr_conv)}
        state = {k: v.detach().numpy() for k, v in block.state_dict().items()}
        fused = from_state_dict(
            name,
            state,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size[0],
            stride=conv.stride[0],
            padding=conv.padding[0],
            groups=conv.groups,
            **extra,
        ).reparameterize()
        (top, bottom), (left, right) = fused.pads
        if top != bottom or left != right:
            raise SystemExit(f"asymmetric padding {fused.pads}")
        deploy = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            fused.kernel.shape[2:],
            stride=fused.stride,
            padding=(top, left),
            groups=fused.groups,
        )
        with torch.no_grad():
            deploy.weight.copy_(torch.from_numpy(np.array(fused.kernel, dtype=np.float32)))
            deploy.bias.copy_(torch.from_numpy(np.array(fused.bias, dtype=np.float32)))
        layers += [deploy, nn.ReLU()]
    head = nn.Linear(net.linear.in_features, net.linear.out_features)
    head.load_state_dict(net.linear.state_dict())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
