"""reparam.graph.fold_torch on PyTorch modules: trace, fold, rebuild, compare.

Every module here is in eval mode with random weights *and* random BatchNorm statistics
(running mean ~ N(0, 1), running variance in [0.5, 2], gamma and beta random), so a branch the
fold drops or counts twice moves the output far beyond rounding. Each case checks

1. the folded module computes what the module computes, within tests/tolerances.py's tolerance
   relative to an honest magnitude (:func:`magnitude`), at the example's batch size and at
   another batch and image size;
2. the convolutions and BatchNorms it runs, counted while it runs (every aten convolution and
   batch norm dispatched), against numbers counted by hand from the published deploy form or
   from the block's structure and written into the test;
3. where a region stops, the report's reason.

The train forms of the published blocks come from tests/torch_families.py (its registry,
``FAMILY_CLASSES``, with every published and extra configuration); users' own blocks are written
here as ordinary modules.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import BFLOAT16_TOLERANCE, TOLERANCE, assert_close
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch_families import (
    EXTRA_CONFIGS,
    FAMILY_CLASSES,
    PUBLISHED_CONFIGS,
    ACBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    QARepVGGBlock,
    RepVGGBlock,
    geometry,
)

from reparam import ReparamError
from reparam.graph import fold_torch

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny convolutions: one thread (two threads' hand-offs cost 20x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and statistics, drawn in float64 from one generator; eval mode.

    Conv and linear weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.1^2); BatchNorm gamma in
    [0.5, 1.5], beta ~ N(0, 1), running mean ~ N(0, 1), running variance in [0.5, 2]; every other
    parameter (layer scales, branch weights) in [0.5, 1.5], so none hides a branch.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, kind: str, scale: float = 1.0) -> None:
        if kind == "normal":
            value = torch.randn(t.shape, generator=gen, dtype=torch.float64) * scale
        else:
            lo, hi = (0.5, 1.5) if kind == "gamma" else (0.5, 2.0)
            value = lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64)
        t.copy_(value)

    with torch.no_grad():
        seen: set[int] = set()
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                draw(m.weight, "normal", m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    draw(m.bias, "normal", 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    draw(m.weight, "gamma")
                    draw(m.bias, "normal")
                draw(m.running_mean, "normal")
                draw(m.running_var, "var")
            else:
                continue
            seen.update(id(p) for p in m.parameters(recurse=False))
        for p in module.parameters():
            if id(p) not in seen:
                draw(p, "gamma")
    return module.eval()


def magnitude(module: nn.Module, *inputs: torch.Tensor) -> float:
    """The largest absolute value among the terms the module sums, in float64.

    The floating-point error of a sum is proportional to the sum of the absolute values of
    its terms, not to the result (which may cancel). Every conv, BatchNorm and linear layer is
    run on the absolute value of its actual input with the absolute values of its parameters
    (and a BatchNorm's running mean negated, so that ``x - mean`` adds too): that is the sum of
    the absolute values of its terms. Every other sum (branches added in ``forward``) adds
    outputs of submodules, whose absolute values are recorded too, as is the module's output.
    Error made in one layer reaches the output through the network's actual gain, which
    BatchNorm keeps O(1) here; compounding the absolute values of every layer instead (one
    all-positive copy of a whole network) would overstate it by orders of magnitude.
    """
    largest = [0.0]

    def record(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            largest[0] = max(largest[0], float(value.detach().double().abs().max()))

    def local(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        record(out)
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0].detach().double().abs()

        def a(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().double().abs()

        if isinstance(m, nn.Conv2d):
            record(F.conv2d(x, a(m.weight), a(m.bias), m.stride, m.padding, m.dilation, m.groups))
        elif isinstance(m, nn.Linear):
            record(F.linear(x, a(m.weight), a(m.bias)))
        elif isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            assert m.running_var is not None
            scale = (m.running_var.double() + m.eps).rsqrt()
            if m.affine:
                scale = scale * m.weight.detach().double().abs()
            shift = m.running_mean.double().abs() * scale
            if m.affine:
                shift = shift + m.bias.detach().double().abs()
            record(x * scale[:, None, None] + shift[:, None, None])

    handles = [m.register_forward_hook(local) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


class CountOps(TorchDispatchMode):
    """Count the aten convolutions and batch norms a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if "convolution" in name:
            self.counts["conv"] += 1
        elif "batch_norm" in name:
            self.counts["batch_norm"] += 1
        return func(*args, **(kwargs or {}))


def run_counting(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Counter[str]]:
    with torch.no_grad(), CountOps() as counter:
        out = module(x)
    return out, counter.counts


def check_same(
    module: nn.Module, folded: nn.Module, x: torch.Tensor, *, what: str, other: bool = True
) -> None:
    """Folded vs module at ``x`` and, with ``other``, at another batch and image size."""
    dtype = np.dtype(str(x.dtype).removeprefix("torch."))
    shape = list(x.shape)
    inputs = [x]
    if other:
        shape[0] += 2
        shape[2:] = [s + 3 for s in shape[2:]]
        inputs.append(torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(x.dtype))
    for i, xi in enumerate(inputs):
        with torch.no_grad():
            expected, actual = module(xi), folded(xi)
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert_close(
            actual.numpy(),
            expected.numpy(),
            dtype=dtype,
            scale=magnitude(module, xi),
            what=f"{what} (input {tuple(xi.shape)})" + (" [other size]" if i else ""),
        )


def batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def conv_bn(c_in: int, c_out: int, k: int, *, stride: int = 1, groups: int = 1,
            padding: int | None = None) -> nn.Sequential:  # fmt: skip
    conv = nn.Conv2d(c_in, c_out, k, stride, k // 2 if padding is None else padding,
                     groups=groups, bias=False)  # fmt: skip
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c_out)))


# --------------------------------------------------------------------------------------------
# (a) The published families, alone
# --------------------------------------------------------------------------------------------

#: Convolutions and BatchNorms of each published deploy form, counted by hand from the
#: published code (FACTS.md's tables): every deploy block is one conv with a bias
#: (``rbr_reparam``, ``dbb_reparam``, ``fused_conv``, ``reparam_conv``, ``lkb_reparam``,
#: ultralytics' and YOLOv7's ``conv``/``rbr_reparam``, RepViT's fused conv, UniRepLKNet's
#: ``lk_origin``),
#: except: QARepVGG and ultralytics' Conv2 keep their BN after the sum; RepGhost keeps its
#: primary conv and that conv's BN beside the fused cheap conv; RepViT's BN_Linear is a Linear.
DEPLOY: dict[str, tuple[int, int]] = {
    "RepVGGBlock": (1, 0),
    "DiverseBranchBlock": (1, 0),
    "ACBlock": (1, 0),
    "MobileOneBlock": (1, 0),
    "ReparamLargeKernelConv": (1, 0),
    "QARepVGGBlock": (1, 1),
    "QARepVGGBlockV2": (1, 1),
    "ultralytics.RepConv": (1, 0),
    "RepConvN": (1, 0),
    "ultralytics.RepVGGDW": (1, 0),
    "Conv2": (1, 1),
    "yolov7.RepConv": (1, 0),
    "repvit.RepVGGDW": (1, 0),
    "Conv2d_BN": (1, 0),
    "BN_Linear": (0, 0),
    "RepMixer": (1, 0),
    "RepCPE": (1, 0),
    "RepGhostModule": (2, 1),
    "DilatedReparamBlock": (1, 0),
    "ppdet.RepVggBlock": (1, 0),
}
FAMILY_CASES = [
    pytest.param(name, kwargs, id=f"{name}-{i}")
    for name in FAMILY_CLASSES
    for i, kwargs in enumerate(PUBLISHED_CONFIGS[name] + EXTRA_CONFIGS.get(name, []))
]


def family_input(name: str, kwargs: dict[str, Any], dtype: Any) -> torch.Tensor:
    """A random input of the block (``geometry`` describes the fused part; RepGhost's whole
    module starts with its primary conv on ``inp`` channels)."""
    shape = geometry(name, kwargs)
    channels = kwargs["inp"] if name == "RepGhostModule" else shape.in_channels
    size = (2, channels) if shape.features else (2, channels, 9, 10)
    return torch.randn(size, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_every_registered_family_has_a_deploy_count() -> None:
    assert set(DEPLOY) == set(FAMILY_CLASSES), "a family without a hand count"


@pytest.mark.parametrize(("name", "kwargs"), FAMILY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_each_family_block_folds_to_its_deploy_form(
    name: str, kwargs: dict[str, Any], dtype: Any
) -> None:
    module = randomize(FAMILY_CLASSES[name](**kwargs), seed=len(name)).to(dtype)
    x = family_input(name, kwargs, dtype)
    folded, report = fold_torch(module, x)
    _, after = run_counting(folded, x)
    # as many convs as the deploy form, and no BatchNorm (where the deploy form keeps one, the
    # fold folds it too)
    assert after["conv"] == DEPLOY[name][0], (after, str(report))
    assert after["batch_norm"] == 0 <= DEPLOY[name][1], (after, str(report))
    assert batch_norms(folded) == 0, "a BatchNorm module left in the folded module"
    assert {p.dtype for p in folded.parameters()} <= {dtype}
    check_same(module, folded, x, what=f"{name} {kwargs}")


# --------------------------------------------------------------------------------------------
# (a) The families in a small network
# --------------------------------------------------------------------------------------------


class Squeeze(nn.Module):
    """Squeeze-and-excitation: avgpool -> conv -> relu -> conv -> sigmoid -> mul."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(self.pool(x)))))


class FamilyNet(nn.Module):
    """A stem, blocks of five families with ReLU and SiLU, SE, a residual, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)  # written in place: the fold must follow the write
        self.dw = MobileOneBlock(8, 8, 3, padding=1, groups=8, num_conv_branches=2)
        self.pw = MobileOneBlock(8, 16, 1, num_conv_branches=2)
        self.se = Squeeze(16)
        self.inner = RepVGGBlock(16, 16, 3, padding=1)
        self.dbb = DiverseBranchBlock(16, 16, 3, padding=1)
        self.acb = ACBlock(16, 16, 3, padding=0)  # crops its 3x1 and 1x3 branches' input
        self.qa = QARepVGGBlock(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = F.silu(self.dw(x))
        x = self.se(F.silu(self.pw(x)))
        x = x + F.relu(self.inner(x))  # a residual around a nonlinear block
        x = self.act(self.dbb(x))
        x = F.relu(self.acb(x))
        x = F.relu(self.qa(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


#: FamilyNet's convs by hand: stem 1, dw 1, pw 1, SE 2 (reduce and expand are already single
#: convs and stay as they are), inner 1, dbb 1, acb 1, qa 1.
FAMILY_NET_CONVS = 9
#: ... and before: stem 2, dw 2 + 1 (two kxk branches, the 1x1 scale), pw 2, SE 2, inner 2,
#: dbb 5 (origin, 1x1, avg's 1x1, 1x1 -> kxk's two), acb 3, qa 2.
FAMILY_NET_TRAIN_CONVS = 21


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_network_of_families_keeps_its_nonlinearities_and_head(dtype: Any) -> None:
    module = randomize(FamilyNet(), seed=3).to(dtype)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    _, before = run_counting(module, x)
    folded, report = fold_torch(module, x)
    _, after = run_counting(folded, x)
    assert before["conv"] == FAMILY_NET_TRAIN_CONVS, before
    assert after["conv"] == FAMILY_NET_CONVS, (after, str(report))
    assert after["batch_norm"] == 0 and batch_norms(folded) == 0, after
    assert len(report.folded) == 7, str(report)
    # SE's convs, the head and the nonlinearities are the module's own objects
    assert folded.get_submodule("se.reduce") is module.se.reduce
    assert folded.get_submodule("head") is module.head
    assert folded.get_submodule("act") is module.act
    for region in report.folded:  # the report names the convs as the module holds them
        assert isinstance(folded.get_submodule(region.conv.name), nn.Conv2d), region.conv.name
    check_same(module, folded, x, what="FamilyNet")


# --------------------------------------------------------------------------------------------
# (b) Users' own blocks
# --------------------------------------------------------------------------------------------

C = 4


class RepVGG5x5(nn.Module):
    """RepVGG with an extra 5x5 branch."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.one, self.five = conv_bn(C, C, 3), conv_bn(C, C, 1), conv_bn(C, C, 5)
        self.identity = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x) + self.one(x) + self.five(x) + self.identity(x))


class Scaled(nn.Module):
    """``alpha * bn(conv(x)) + bn(conv1x1(x))`` with a Python number or a parameter alpha."""

    def __init__(self, parameter: bool) -> None:
        super().__init__()
        self.dense, self.one = conv_bn(C, C, 3), conv_bn(C, C, 1)
        self.alpha: Any = nn.Parameter(torch.tensor(0.7)) if parameter else 0.7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.alpha * self.dense(x) + self.one(x))


class Negated(nn.Module):
    """Negated and scaled branches, a constant added: ``a - b + (-a) / 2 - b / 3 + 1.5``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return F.relu(a - b + (-a) * 0.5 + torch.neg(b) / 3 + 1.5)


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(C)
        self.conv = conv_bn(C, C, 3, groups=C)
        self.scale = conv_bn(C, C, 1, groups=C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x) + self.skip(x) + self.conv(x)


class RepMixer(nn.Module):
    """FastViT's RepMixer written plainly: ``x + gamma * (mixer(x) - norm(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.mixer = Mixer()
        self.gamma = nn.Parameter(torch.ones(C, 1, 1))  # randomize: in [0.5, 1.5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class PostSumBN(nn.Module):
    """Biased convs and the identity summed, then one BatchNorm (QARepVGG-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.one = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.dense(x) + self.one(x) + x))


class AvgPoolBranch(nn.Module):
    """A conv branch, a pooled branch with a BN, a functional pool."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = conv_bn(C, C, 3)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.bn(self.pool(x)) + F.avg_pool2d(x, 3, 1, 1)


class ReluInside(nn.Module):
    """``bn(conv3(relu(bn(conv1(x))))) + bn(conv1(x))``: a ReLU inside a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.other = conv_bn(C, C, 1), conv_bn(C, C, 3), conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.relu(self.first(x))) + self.other(x)


class SequentialBorder(nn.Module):
    """1x1 -> BN -> padded 3x3 -> BN: the 3x3 pads the BN's output with zeros, not BN(0)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = conv_bn(C, C, 1), conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class DepthwisePointwise(nn.Module):
    """Depthwise 3x3 -> BN -> pointwise 1x1 -> BN: one 3x3 conv would cost more."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.pw = conv_bn(C, C, 3, groups=C), conv_bn(C, 2 * C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class Arithmetic(nn.Module):
    """``torch.add(a, b, alpha=...)``, ``.sub(p, alpha=...)``, ``.mul``, ``/`` by a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 1)
        self.shift = nn.Parameter(torch.zeros(C, 1, 1))
        self.divisor = nn.Parameter(torch.ones(1, C, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.add(self.a(x), self.b(x), alpha=0.25).sub(self.shift, alpha=2).mul(2.0)
        return y / self.divisor


class InPlaceSum(nn.Module):
    """``y = a(x); y += b(x); relu_(y)``: in-place sums and activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += self.b(x)
        return F.relu(y, inplace=True)


class WriteAfterRead(nn.Module):
    """The region's input is written in place after the convs read it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2.0
        y = self.a.conv(h)
        h.relu_()  # the conv read h before this write; the folded conv must too
        return self.a.bn(y) + self.b(x) + h


class AsymmetricPad(nn.Module):
    """``padding='same'`` with a 4x3 kernel, a 1x3 'same' conv, an asymmetric ZeroPad2d.

    The two convs fold into one 4x3 kernel padded ((1, 2), (1, 1)): rows -1..2 around each
    output pixel (an even kernel's 'same' pads 1 above, 2 below), columns -1..1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.even = nn.Conv2d(C, C, (4, 3), padding="same", bias=False)
        self.wide = nn.Conv2d(C, C, (1, 3), padding="same")
        self.pad = nn.ZeroPad2d((0, 1, 1, 0))
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.even(x) + self.wide(x)) + self.pad(x)[:, :, :-1, 1:]


#: (block, convs after, BatchNorms after, a reason the report gives, or None), counted by hand.
USER_CASES: list[tuple[Callable[[], nn.Module], int, int, str | None]] = [
    (RepVGG5x5, 1, 0, None),
    (lambda: Scaled(parameter=False), 1, 0, None),
    (lambda: Scaled(parameter=True), 1, 0, None),
    (Negated, 1, 0, None),
    (RepMixer, 1, 0, None),
    (PostSumBN, 1, 0, None),
    (AvgPoolBranch, 1, 0, None),
    # first 1x1 (+BN) alone before the ReLU, then second 3x3 (+BN) on the ReLU's output and
    # other 1x1 (+BN) on x: two sources, so two convs, and the Add stays
    (ReluInside, 3, 0, "a nonlinearity before the sum keeps its branch apart"),
    (SequentialBorder, 2, 0, "the border would differ"),
    (DepthwisePointwise, 2, 0, "left apart for cost"),
    (Arithmetic, 1, 0, None),
    (InPlaceSum, 1, 0, None),
    # a (3x3 on h) and b (1x1 on x) read different tensors: two convs
    (WriteAfterRead, 2, 0, None),
    (AsymmetricPad, 1, 0, None),
]


@pytest.mark.parametrize(
    ("factory", "convs", "bns", "reason"),
    [pytest.param(*case, id=f"{i}") for i, case in enumerate(USER_CASES)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_users_blocks_fold_as_far_as_they_are_one_conv(
    factory: Callable[[], nn.Module], convs: int, bns: int, reason: str | None, dtype: Any
) -> None:
    module = randomize(factory(), seed=5).to(dtype)
    name = type(module).__name__
    x = torch.randn(2, C, 9, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    with warnings.catch_warnings():  # padding="same" with an even kernel warns, by design
        warnings.filterwarnings("ignore", "Using padding='same'", UserWarning)
        folded, report = fold_torch(module, x)
        _, after = run_counting(folded, x)
        check_same(module, folded, x, what=name)
    assert after["conv"] == convs, (name, after, str(report))
    assert after["batch_norm"] == bns and batch_norms(folded) == bns, (name, after)
    reasons = [r.reason for r in report.refused]
    if reason is None:
        assert not reasons, (name, reasons)
    else:
        assert any(reason in r for r in reasons), (name, reasons)


def test_an_asymmetric_fold_pads_before_its_conv() -> None:
    module = randomize(AsymmetricPad(), seed=6)
    x = torch.randn(1, C, 8, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using padding='same'", UserWarning)
        folded, report = fold_torch(module, x)
    ((region,),) = [report.folded]
    assert region.conv.attrs["pads"] == ((1, 2), (1, 1)), region.conv.attrs
    pads = [n for n in folded.graph.nodes if n.target is F.pad]
    assert len(pads) == 1 and pads[0].args[1] == (1, 1, 1, 2), folded.code  # (l, r, t, b)
    assert folded.get_submodule(region.conv.name).padding == (0, 0)


class TwoInputs(nn.Module):
    """Two inputs, a block on each, summed: two convs (two sources), the sum stays."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = RepVGG5x5(), conv_bn(C, C, 3)
        self.right_one = conv_bn(C, C, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.left(x) + F.batch_norm(  # a functional BN with the module's statistics
            self.right(y) + self.right_one(y),
            self.right.bn.running_mean,
            self.right.bn.running_var,
            training=False,
        )


def test_a_module_with_two_inputs_folds_each_side() -> None:
    module = randomize(TwoInputs(), seed=19)
    gen = torch.Generator().manual_seed(20)
    x, y = torch.randn(2, C, 8, 8, generator=gen), torch.randn(2, C, 8, 8, generator=gen)
    folded, report = fold_torch(module, (x, y))
    with torch.no_grad(), CountOps() as counter:
        actual = folded(x, y)
        expected = module(x, y)
    # during the two calls: the module runs 3 + 2 convs, 4 + 3 BNs; the folded one 2 convs
    assert counter.counts == {"conv": 5 + 2, "batch_norm": 7}, (counter.counts, str(report))
    assert len(report.folded) == 2, str(report)
    scale = magnitude(module, x, y)
    assert_close(actual.numpy(), expected.numpy(), dtype=np.float32, scale=scale, what="TwoInputs")


def test_max_cost_ratio_inf_merges_a_depthwise_separable_pair() -> None:
    module = randomize(DepthwisePointwise(), seed=7)
    x = torch.randn(2, C, 9, 8)
    folded, _ = fold_torch(module, x, max_cost_ratio=math.inf)
    _, after = run_counting(folded, x)
    assert after["conv"] == 1, after
    check_same(module, folded, x, what="DepthwisePointwise, max_cost_ratio=inf")


# --------------------------------------------------------------------------------------------
# (c) What fx cannot trace
# --------------------------------------------------------------------------------------------


class ShapeBranch(nn.Module):
    """Control flow on a size: fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(C, C, 3, padding=1)
        self.mixer = RepMixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = F.relu(self.block(x))
        return self.mixer(x) * 2.0


class ValueBranch(nn.Module):
    """Control flow on a value: neither fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.block(x)
        return x


def test_control_flow_on_sizes_is_traced_by_torch_export() -> None:
    module = randomize(ShapeBranch(), seed=8)
    x = torch.randn(1, C, 8, 8)  # a batch of one: torch.export would fix it at one
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(module)
    folded, report = fold_torch(module, x)
    _, after = run_counting(folded, x)
    assert after == {"conv": 2}, (after, str(report))  # the block, the mixer
    assert len(report.folded) == 2, str(report)
    check_same(module, folded, x, what="ShapeBranch (torch.export)")  # and at batch 3, 11x11
    assert not folded.train(False).training  # a plain GraphModule (exporters call train)


def test_control_flow_on_values_is_refused_with_the_line() -> None:
    module = randomize(ValueBranch(), seed=9)
    with pytest.raises(ReparamError, match=r"test_graph_torch\.py:\d+ \(if x\.sum\(\) > 0:\)"):
        fold_torch(module, torch.randn(2, C, 8, 8))


# --------------------------------------------------------------------------------------------
# (d) Half precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float16, TOLERANCE[np.dtype(np.float16)]), (torch.bfloat16, BFLOAT16_TOLERANCE)],
    ids=["float16", "bfloat16"],
)
def test_half_precision_modules_keep_their_dtype(dtype: Any, tolerance: float) -> None:
    reference = randomize(FamilyNet(), seed=10).double()
    module = copy.deepcopy(reference).to(dtype)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11)).to(dtype)
    folded, report = fold_torch(module, x)
    _, after = run_counting(folded, x)
    # DBB pads with its BN's output at zero as the module computes it, in half precision: that
    # differs from the BN's exact output at zero by more than the fold's 1e-6 allows, so DBB's
    # two padded branches stay apart (3 convs more, its avg branch's BN stays)
    assert after == {"conv": FAMILY_NET_CONVS + 3, "batch_norm": 1}, (after, str(report))
    assert any(
        r.at.startswith("dbb.") and "the border would differ" in r.reason for r in report.refused
    ), str(report)
    assert {p.dtype for p in folded.parameters()} == {dtype}
    with torch.no_grad():
        actual, train = folded(x), module(x)
        expected = reference(x.double())
    assert actual.dtype == dtype
    scale = magnitude(reference, x.double())
    for got, what in ((actual, "folded"), (train, "train form")):
        error = float((got.double() - expected).abs().max())
        assert error <= tolerance * scale, (
            f"{what} {dtype}: {error:.3g} > {tolerance} x {scale:.3g}"
        )


def test_bfloat16_weights_are_rounded_once() -> None:
    from reparam.graph.torch import _round_bfloat16

    values = np.array([1 + 2**-8, 1 + 2**-8 + 2**-30, 1 + 3 * 2**-8, -(1 + 2**-9 + 2**-40), 3e-39])
    rounded = torch.from_numpy(_round_bfloat16(values)).to(torch.bfloat16).double().numpy()
    # a tie rounds to even; just above a tie rounds up (through float32 it would tie to even)
    expected = [1.0, 1 + 2**-7, 1 + 2**-6, -1.0, np.ldexp(np.rint(3e-39 / 2**-133), -133)]
    np.testing.assert_array_equal(rounded, expected)


# --------------------------------------------------------------------------------------------
# (e) The module is untouched; the result is a module like any other
# --------------------------------------------------------------------------------------------


def _snapshot(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    attributes = {name: sorted(vars(m)) for name, m in module.named_modules()}
    return state, attributes


@pytest.mark.parametrize("factory", [FamilyNet, ShapeBranch], ids=["fx", "export"])
def test_the_module_is_left_as_it_was(factory: Callable[[], nn.Module]) -> None:
    module = randomize(factory(), seed=12)
    state, attributes = _snapshot(module)
    modules = dict(module.named_modules())
    fold_torch(module, torch.randn(1, 3 if factory is FamilyNet else C, 16, 16))
    after_state, after_attributes = _snapshot(module)
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert after_state[key].dtype == value.dtype and torch.equal(after_state[key], value), key
    assert after_attributes == attributes, "fold_torch added or removed attributes"
    assert dict(module.named_modules()) == modules
    assert batch_norms(module) > 0 and not module.training


def test_state_dict_round_trip_and_save() -> None:
    x = torch.randn(2, 3, 16, 16)
    folded, _ = fold_torch(randomize(FamilyNet(), seed=13), x)
    other, _ = fold_torch(randomize(FamilyNet(), seed=14), x)
    with torch.no_grad():
        assert not torch.allclose(folded(x), other(x)), "two seeds give the same network"
    buffer = io.BytesIO()
    torch.save(folded.state_dict(), buffer)
    buffer.seek(0)
    result = other.load_state_dict(torch.load(buffer), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(other(x), folded(x), rtol=0, atol=0)
    assert not any("bn" in key for key in folded.state_dict()), list(folded.state_dict())
    buffer = io.BytesIO()
    torch.save(folded, buffer)  # the whole module (traced by fx) pickles too
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("factory", "channels", "convs", "dynamo"),
    [
        pytest.param(FamilyNet, 3, FAMILY_NET_CONVS, False, id="torchscript-opset17"),
        pytest.param(FamilyNet, 3, FAMILY_NET_CONVS, True, id="dynamo-opset18"),
        pytest.param(ShapeBranch, C, 2, False, id="torch.export-traced, torchscript-opset17"),
    ],
)
def test_onnx_export_of_the_folded_module_runs_in_onnxruntime(
    factory: Callable[[], nn.Module], channels: int, convs: int, dynamo: bool, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = randomize(factory(), seed=15)
    x = torch.randn(1, channels, 16, 16)
    folded, _ = fold_torch(module, x)
    path = tmp_path / "folded.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # both exporters warn about themselves (deprecation, pytree internals), and TorchScript
        # tracing warns at the asserts on sizes of torch.export's guard function
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if dynamo:
            torch.onnx.export(
                folded, (x,), str(path), dynamo=True, opset_version=18, verbose=False,
                input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
            )  # fmt: skip
        else:
            # a GraphModule has a .graph, so the TorchScript exporter needs output_names
            torch.onnx.export(
                folded, (x,), str(path), dynamo=False, opset_version=17,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )  # fmt: skip
    model = onnx.load(str(path))
    kinds = Counter(node.op_type for node in model.graph.node)
    assert kinds["Conv"] == convs and not kinds["BatchNormalization"], kinds
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, channels, 16, 16)
    (actual,) = session.run(None, {"input": x5.numpy()})
    with torch.no_grad():
        expected = module(x5).numpy()
    assert_close(actual, expected, dtype=np.float32, scale=magnitude(module, x5), what="ONNX")


# --------------------------------------------------------------------------------------------
# Errors and imports
# --------------------------------------------------------------------------------------------


def test_a_module_in_training_mode_is_refused() -> None:
    module = randomize(FamilyNet(), seed=16)
    module.dbb.train()
    with pytest.raises(ReparamError, match=r"training mode.*'dbb'.*call module\.eval\(\)"):
        fold_torch(module, torch.randn(1, 3, 16, 16))


def test_bad_arguments_are_refused() -> None:
    module = randomize(RepVGG5x5(), seed=17)
    with pytest.raises(ReparamError, match="example_inputs must be a tensor or a tuple"):
        fold_torch(module, np.zeros((1, C, 8, 8)))
    with pytest.raises(ReparamError, match="max_cost_ratio must be a number > 0"):
        fold_torch(module, torch.randn(1, C, 8, 8), max_cost_ratio=0)
    with pytest.raises(ReparamError, match=r"module must be a torch\.nn\.Module"):
        fold_torch(lambda x: x, torch.randn(1, C, 8, 8))  # type: ignore[arg-type]


class Noisy(nn.Module):
    """Adds noise drawn at each call: fx would fix one draw into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(C, C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + torch.rand(1, C, 1, 1)


def test_a_trace_that_is_not_the_module_is_refused() -> None:
    with pytest.raises(ReparamError, match="trace of Noisy does not compute what the module"):
        fold_torch(randomize(Noisy(), seed=18), torch.randn(1, C, 8, 8))


def test_import_reparam_graph_does_not_import_torch() -> None:
    code = (
        "import sys, reparam, reparam.graph\n"
        "from reparam.graph import fold_torch\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert callable(fold_torch)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
