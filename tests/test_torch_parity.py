"""PyTorch as the oracle: a RepVGG written here from torch.nn layers, in the official layout.

The torch model is independent of reparam: its structure is computed below from widths and
depths, its forward is torch's. reparam must load its state dict, give the same logits in both
forms, and write deploy weights that the torch deploy model accepts with ``strict=True``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from tolerances import assert_close
from torch import nn

import reparam
from reparam.checkpoints import to_state_dict

# (widths stem first, depths stem first, groups, grouped layers counting blocks after the stem)
TINY = ((6, 8, 12, 16), (1, 2, 3, 2), 2, (2, 4, 6))
A0 = ((48, 48, 96, 192, 1280), (1, 2, 4, 14, 1), 1, ())


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(cout)))


class TorchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, *, deploy: bool) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
            return
        self.rbr_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.rbr_dense = _conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return torch.relu(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return torch.relu(out)


class TorchRepVGG(nn.Module):
    def __init__(self, config: Any, *, num_classes: int, deploy: bool, in_channels: int = 3):
        super().__init__()
        widths, depths, groups, grouped = config
        self.stage0 = TorchBlock(in_channels, widths[0], 2, 1, deploy=deploy)
        self.names = ["stage0"]
        channels, layer = widths[0], 0
        for stage in range(1, len(widths)):
            blocks = []
            for index in range(depths[stage]):
                layer += 1
                g = groups if layer in grouped else 1
                stride = 2 if index == 0 else 1
                blocks.append(TorchBlock(channels, widths[stage], stride, g, deploy=deploy))
                channels = widths[stage]
            setattr(self, f"stage{stage}", nn.Sequential(*blocks))
            self.names.append(f"stage{stage}")
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def _torch_model(config: Any, dtype: torch.dtype, seed: int = 0) -> TorchRepVGG:
    """Random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TorchRepVGG(config, num_classes=10, deploy=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return np.float64 if dtype == torch.float64 else np.float32


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        result: np.ndarray = model(torch.from_numpy(x)).numpy()
    return result


CASES = [
    pytest.param(TINY, torch.float64, 20, id="tiny-float64"),
    pytest.param(TINY, torch.float32, 20, id="tiny-float32"),
    pytest.param(A0, torch.float64, 32, id="A0-float64"),
    pytest.param(A0, torch.float32, 32, id="A0-float32"),
]


@pytest.mark.parametrize(("config", "dtype", "size"), CASES)
def test_both_forms_match_torch(tmp_path: Path, config: Any, dtype: torch.dtype, size: int) -> None:
    net = _torch_model(config, dtype)
    path = tmp_path / "train.pth"
    torch.save(net.state_dict(), path)
    np_dtype = _numpy_dtype(dtype)
    x = np.random.default_rng(1).standard_normal((2, 3, size, size + 3)).astype(np_dtype)
    expected = _logits(net, x)

    model = reparam.load(path)
    assert model.form == "train" and model.dtype == np.dtype(np_dtype), f"loaded {model}"
    assert model.arch == ("RepVGG-A0" if config is A0 else None), f"arch {model.arch}"
    assert_close(model(x), expected, dtype=np_dtype, what="train form vs torch")
    assert_close(model.reparameterize()(x), expected, dtype=np_dtype, what="deploy vs torch")


@pytest.mark.parametrize(("config", "dtype", "size"), CASES)
def test_deploy_weights_load_into_torch_strictly(
    tmp_path: Path, config: Any, dtype: torch.dtype, size: int
) -> None:
    net = _torch_model(config, dtype)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    np_dtype = _numpy_dtype(dtype)
    x = np.random.default_rng(2).standard_normal((2, 3, size, size)).astype(np_dtype)
    expected = _logits(net, x)
    deploy = reparam.load(path).reparameterize()

    reparam.save(deploy, tmp_path / "deploy.safetensors")
    reparam.save(deploy, tmp_path / "deploy.pth")
    state_dicts = {
        "safetensors": safetensors.torch.load_file(tmp_path / "deploy.safetensors"),
        "pth": torch.load(tmp_path / "deploy.pth", weights_only=True),
        "dict": {k: torch.from_numpy(np.array(v)) for k, v in to_state_dict(deploy).items()},
    }
    for source, state in state_dicts.items():
        torch_deploy = TorchRepVGG(config, num_classes=10, deploy=True).to(dtype).eval()
        torch_deploy.load_state_dict(state, strict=True)
        assert_close(
            _logits(torch_deploy, x), expected, dtype=np_dtype, what=f"torch deploy ({source})"
        )


def test_train_weights_written_by_reparam_load_into_torch(tmp_path: Path) -> None:
    net = _torch_model(TINY, torch.float64)
    path = tmp_path / "train.pth"
    torch.save(net.state_dict(), path)
    reparam.save(reparam.load(path), tmp_path / "again.pth")
    other = TorchRepVGG(TINY, num_classes=10, deploy=False).double().eval()
    other.load_state_dict(torch.load(tmp_path / "again.pth", weights_only=True), strict=True)
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16))
    assert_close(_logits(other, x), _logits(net, x), dtype=np.float64, what="train round trip")


def _to_timm(key: str) -> str:
    """The official -> timm renaming, written independently of reparam.checkpoints."""
    key = re.sub(r"^stage0\.", "stem.", key)
    key = re.sub(r"^stage(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    key = re.sub(r"^linear\.", "head.fc.", key)
    for old, new in (
        ("rbr_dense", "conv_kxk"),
        ("rbr_1x1", "conv_1x1"),
        ("rbr_identity", "identity"),
        ("rbr_reparam", "reparam_conv"),
    ):
        key = key.replace(f".{old}.", f".{new}.")
    return key


def _from_timm(key: str) -> str:
    key = re.sub(r"^stem\.", "stage0.", key)
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
    key = re.sub(r"^head\.fc\.", "linear.", key)
    return key.replace(".reparam_conv.", ".rbr_reparam.")


def test_timm_layout_round_trip(tmp_path: Path) -> None:
    net = _torch_model(TINY, torch.float32)
    timm_state = {_to_timm(k): v.contiguous() for k, v in net.state_dict().items()}
    assert "stages.0.1.identity.running_var" in timm_state, sorted(timm_state)
    path = tmp_path / "timm_train.safetensors"
    safetensors.torch.save_file(timm_state, path)
    x = np.random.default_rng(4).standard_normal((2, 3, 17, 17)).astype(np.float32)
    expected = _logits(net, x)

    model = reparam.load(path)
    assert model.layout == "timm" and model.form == "train", f"loaded {model}"
    assert_close(model(x), expected, dtype=np.float32, what="timm train vs torch")
    deploy = model.reparameterize()
    reparam.save(deploy, tmp_path / "timm_deploy.safetensors")
    saved = safetensors.numpy.load_file(tmp_path / "timm_deploy.safetensors")
    torch_deploy = TorchRepVGG(TINY, num_classes=10, deploy=True).eval()
    expected_keys = {_to_timm(k) for k in torch_deploy.state_dict()}
    assert set(saved) == expected_keys, f"keys differ: {set(saved) ^ expected_keys}"
    official = {_from_timm(k): torch.from_numpy(v) for k, v in saved.items()}
    torch_deploy.load_state_dict(official, strict=True)
    assert_close(_logits(torch_deploy, x), expected, dtype=np.float32, what="timm deploy in torch")
