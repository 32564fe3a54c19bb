"""PyTorch -> reparam -> PyTorch: fuse a RepVGG trained in PyTorch and load the result back.

Run: ``python examples/pytorch_roundtrip.py`` (needs ``torch``; reparam itself does not).

1. A RepVGG block and a small whole RepVGG written with ``torch.nn`` layers, in eval mode, with
   the official checkpoint key names and non-trivial BatchNorm statistics.
2. reparam fuses them from plain arrays (the state dict), never importing torch itself.
3. The fused weights load into ``nn.Conv2d`` layers (``strict=True``) and give the same outputs.
4. Half precision without a GPU: a float16 block fuses to a float16 kernel computed in float64
   and rounded once, so it is as close to the exact fusion as float16 allows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reparam
from reparam.checkpoints import from_state_dict, to_state_dict

FLOAT32_TOLERANCE = 2e-5  # relative to the largest output, as in tests/tolerances.py


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, size: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, size, stride, size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Block(nn.Module):
    """The official RepVGG block: names rbr_dense, rbr_1x1, rbr_identity (train form)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        if cin == cout and stride == 1:
            self.rbr_identity = nn.BatchNorm2d(cin)
        self.rbr_dense = ConvBN(cin, cout, 3, stride, groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if hasattr(self, "rbr_identity"):
            out = out + self.rbr_identity(x)
        return torch.relu(out)


class DeployBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.rbr_reparam(x))


class TinyRepVGG(nn.Module):
    """stage0 (stem) and two stages; the first block of each stage has stride 2."""

    def __init__(self, block: type[nn.Module], widths: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.stage0 = block(3, widths[0], 2)
        self.stage1 = nn.Sequential(block(widths[0], widths[1], 2), block(widths[1], widths[1], 1))
        self.stage2 = nn.Sequential(
            block(widths[1], widths[2], 2), block(widths[2], widths[2], 1, groups=2)
        )
        self.linear = nn.Linear(widths[2], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stage0(x)))
        return self.linear(x.mean(dim=(2, 3)))


def randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm statistics that training would (not the 0/1 defaults)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.5)
    return model.eval()


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def block_round_trip() -> float:
    """One block: state dict arrays -> fuse_block -> nn.Conv2d."""
    block = randomise_batch_norms(Block(16, 16, stride=1, groups=2), seed=1)
    state = {key: value.numpy() for key, value in block.state_dict().items()}
    kernel, bias = reparam.fuse_block(
        (state["rbr_dense.conv.weight"], reparam.BatchNorm.from_torch(state, "rbr_dense.bn")),
        (state["rbr_1x1.conv.weight"], reparam.BatchNorm.from_torch(state, "rbr_1x1.bn")),
        reparam.BatchNorm.from_torch(state, "rbr_identity"),
        groups=2,
    )
    fused = DeployBlock(16, 16, stride=1, groups=2).eval()
    fused.rbr_reparam.load_state_dict(
        {"weight": torch.from_numpy(kernel), "bias": torch.from_numpy(bias)}, strict=True
    )
    x = torch.randn(2, 16, 12, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return relative_difference(fused(x), block(x))


def model_round_trip() -> float:
    """A whole network: state dict -> reparam.RepVGG -> deploy state dict -> torch, strict."""
    train = randomise_batch_norms(TinyRepVGG(Block), seed=3)
    model = from_state_dict({key: value.numpy() for key, value in train.state_dict().items()})
    deploy_state = to_state_dict(model.reparameterize())
    deploy = TinyRepVGG(DeployBlock).eval()
    deploy.load_state_dict({key: torch.from_numpy(np.array(v)) for key, v in deploy_state.items()})
    x = torch.randn(4, 3, 32, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return relative_difference(deploy(x), train(x))


def fuse_block_state(state: dict[str, np.ndarray], dtype: type) -> reparam.ConvBias:
    """Fuse a train-form block's state dict after casting every array to ``dtype``."""
    cast = {key: value.astype(dtype) for key, value in state.items()}

    def conv_bn(name: str) -> tuple[np.ndarray, reparam.BatchNorm]:
        return cast[f"{name}.conv.weight"], reparam.BatchNorm.from_torch(cast, f"{name}.bn")

    identity = reparam.BatchNorm.from_torch(cast, "rbr_identity")
    return reparam.fuse_block(conv_bn("rbr_dense"), conv_bn("rbr_1x1"), identity)


def half_precision_fusion() -> tuple[str, float]:
    """Fuse a float16 block; the kernel stays float16 and within rounding of the exact fusion."""
    block = randomise_batch_norms(Block(8, 8, stride=1), seed=5).half()
    state = {key: value.numpy() for key, value in block.state_dict().items()}

    kernel16, _ = fuse_block_state(state, np.float16)
    kernel64, _ = fuse_block_state(state, np.float64)
    ulps = np.abs(kernel16.astype(np.float64) - kernel64) / np.spacing(
        np.abs(kernel64).astype(np.float16)
    ).astype(np.float64)
    return str(kernel16.dtype), float(ulps.max())


def main() -> None:
    torch.manual_seed(0)  # the layers' own initialisation
    block_error = block_round_trip()
    model_error = model_round_trip()
    half_dtype, half_ulps = half_precision_fusion()
    print(f"block (groups 2, 3 branches): max relative difference {block_error:.2e}")
    print(f"whole tiny RepVGG, strict load: max relative difference {model_error:.2e}")
    print(
        f"float16 block: fused kernel dtype {half_dtype}, {half_ulps:.2f} ulp from float64 fusion"
    )
    assert block_error <= FLOAT32_TOLERANCE, f"block differs by {block_error}"
    assert model_error <= FLOAT32_TOLERANCE, f"model differs by {model_error}"
    assert half_dtype == "float16", f"float16 block fused to {half_dtype}"
    assert half_ulps <= 0.5, f"float16 kernel is {half_ulps} ulp from the exact fusion"


if __name__ == "__main__":
    main()
