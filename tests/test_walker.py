"""Whole checkpoints of every family: found by their keys, fused, the rest passed through.

Checkpoints are assembled from torch.nn train-form blocks (tests/torch_families.py) at random
prefixes, mixed with tensors that have nothing to fuse (a head, a shortcut conv and its BN with
``num_batches_tracked``, an SE module inside a block), converted by the real command line, and
loaded back with ``strict=True`` into a torch model whose blocks are the families' deploy modules.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn
from torch_families import (
    FAMILY_CLASSES,
    PUBLISHED_CONFIGS,
    PUBLISHED_EPS,
    block_forward,
    geometry,
    numpy_state,
    randomize_,
    set_bn_eps_,
)

import reparam
from reparam import ReparamError
from reparam.checkpoints import read_tensors, write_tensors
from reparam.checkpoints.walker import convert_state_dict, parse_override
from reparam.families import FAMILIES, KEY_LAYOUTS

MAX_LINE = 300

# timm's byobnet names for the RepVGG and MobileOne blocks: (official -> timm) first segments
TIMM = {
    "RepVGGBlock": {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity"},
    "MobileOneBlock": {"rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity"},
}


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reparam", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and len(lines[0]) <= MAX_LINE, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]}"
    return lines[0]


class _Deploy(nn.Module):
    """A family's deploy module: one conv with bias (and QARepVGG's kept post-sum BN).

    ``kept`` holds train-form modules outside the fused part, passed through unchanged
    (RepGhost's ``primary_conv``); ``forward`` runs the fused part only.
    """

    def __init__(
        self, conv_name: str, conv: nn.Module, keeps_bn: bool, kept: dict[str, nn.Module]
    ) -> None:
        super().__init__()
        self.conv_name = conv_name
        self.add_module(conv_name, conv)
        for name, module in kept.items():
            self.add_module(name, module)
        out = conv.weight.shape[0]
        self.bn = nn.BatchNorm2d(out) if keeps_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self.conv_name)(x)
        return out if self.bn is None else self.bn(out)


def _deploy_twin(name: str, config: dict[str, Any], layout: str, train: nn.Module) -> nn.Module:
    """The published deploy form of a block: the fused conv under its deploy name."""
    shape = geometry(name, config)
    conv: nn.Module
    if shape.features:
        conv = nn.Linear(shape.in_channels, shape.out_channels)
    else:
        conv = nn.Conv2d(
            shape.in_channels, shape.out_channels, shape.kernel_size, stride=shape.stride,
            padding=shape.padding, groups=shape.groups, dilation=shape.dilation,
        )  # fmt: skip
    family = FAMILIES[name]
    conv_name = "reparam_conv" if layout == "timm" else family.deploy_prefix
    if not conv_name:  # the fused module replaces the block (RepViT)
        return conv
    top = next(lay.top for lay in KEY_LAYOUTS if name in lay.families)
    kept = {
        child: copy.deepcopy(module)
        for child, module in train.named_children()
        if child not in top and child not in family.kept and module.state_dict()
    }
    return _Deploy(conv_name, conv, bool(family.kept), kept)


class _SE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, 2, 1)
        self.up = nn.Conv2d(2, channels, 1)


def _holder(modules: dict[str, nn.Module]) -> nn.Module:
    """A module tree with each given module at its dotted path."""
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def _extras(seed: int) -> dict[str, nn.Module]:
    """Tensors with nothing to fuse: a head, a shortcut with its BN."""
    torch.manual_seed(seed)
    shortcut = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
    randomize_(shortcut, seed)
    return {"head.fc": nn.Linear(8, 10), "downsample": shortcut}


def _rename(state: dict[str, np.ndarray], prefix: str, table: dict[str, str]) -> dict[str, Any]:
    renamed = {}
    for key, value in state.items():
        local = key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None
        if local is not None and local.split(".", 1)[0] in table:
            head, _, rest = local.partition(".")
            key = f"{prefix}.{table[head]}.{rest}"
        renamed[key] = value
    return renamed


CASES = [
    (name, index, layout)
    for name in FAMILY_CLASSES
    for index in range(len(PUBLISHED_CONFIGS[name]))
    for layout in ("published", *(("timm",) if name in TIMM else ()))
    # RepGhost without fusion_bn has nothing but its identity to fold, and no key to tell it
    if not (name == "RepGhostModule" and not PUBLISHED_CONFIGS[name][index].get("reparam_bn", True))
]

#: What the tensors cannot say, stated per block as the command line's --set (value from config).
STATED = {
    "QARepVGGBlock": {"stride": 1, "groups": 1, "family": None},
    "QARepVGGBlockV2": {"stride": 1, "groups": 1, "family": None},
    "RepGhostModule": {"reparam_identity": False},
}


@settings(max_examples=12, deadline=None)
@given(
    picks=st.lists(st.sampled_from(CASES), min_size=2, max_size=4),
    depth=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_cli_converts_mixed_checkpoints_that_load_strictly(
    tmp_path_factory: pytest.TempPathFactory,
    picks: list[tuple[str, int, str]],
    depth: int,
    seed: int,
    dtype: Any,
) -> None:
    tmp = tmp_path_factory.mktemp("walk")
    rng = np.random.default_rng(seed)
    train: dict[str, nn.Module] = _extras(seed)
    deploy: dict[str, nn.Module] = _extras(seed)
    sets: list[str] = []
    blocks: list[tuple[str, str, dict[str, Any], str]] = []
    for number, (name, index, layout) in enumerate(picks):
        config = dict(PUBLISHED_CONFIGS[name][index])
        path = ".".join(["model", *(f"m{rng.integers(9)}" for _ in range(depth)), f"b{number}"])
        module = FAMILY_CLASSES[name](**config)
        randomize_(module, seed + number)
        eps = PUBLISHED_EPS.get(name, 1e-5)
        set_bn_eps_(module, eps)
        sets.append(f"{path}.eps={eps}")  # stated: right whatever the command line's default
        train[path] = module
        deploy[path] = _deploy_twin(name, config, layout, module)
        for option, default in STATED.get(name, {}).items():
            value = name if option == "family" else config.get(option, default)
            sets.append(f"{path}.{option}={value}")
        blocks.append((path, name, config, layout))
    # an SE module inside a block's prefix, not part of it (an nn.Sequential block would run it)
    host = next((p for p, *_ in blocks if not isinstance(train[p], nn.Sequential)), "model")
    train[f"{host}.se"] = _SE(4)
    deploy[f"{host}.se"] = _SE(4)
    train_model = _holder(train).double().eval()
    state = numpy_state(train_model, dtype)
    for path, name, _, layout in blocks:
        if layout == "timm":
            state = _rename(state, path, TIMM[name])
    source, target = tmp / "train.npz", tmp / "deploy.safetensors"
    write_tensors(source, state)
    result = _cli("convert", source, target, *(f"--set={item}" for item in sets))
    assert result.returncode == 0, result.stderr
    assert f"blocks found:  {len(blocks)}" in result.stdout, result.stdout
    converted = read_tensors(target)
    for key in ("head.fc.weight", "downsample.1.num_batches_tracked", f"{host}.se.up.bias"):
        np.testing.assert_array_equal(converted[key], state[key], err_msg=f"{key} changed")
    floats = {k: v.dtype for k, v in converted.items() if v.dtype.kind == "f"}
    assert set(floats.values()) == {np.dtype(dtype)}, f"dtypes {set(floats.values())}"
    deploy_model = _holder(deploy).double().eval()
    deploy_model.load_state_dict(
        {key: torch.tensor(value) for key, value in converted.items()}, strict=True
    )
    for path, name, config, _ in blocks:
        shape = geometry(name, config)
        size = () if shape.features else (9, 11)
        x = torch.from_numpy(rng.standard_normal((2, shape.in_channels, *size)))
        with torch.no_grad():
            expected = block_forward(train_model.get_submodule(path), x).numpy()
            got = deploy_model.get_submodule(path)(x).numpy()
        assert_close(got, expected, dtype=dtype, what=f"{name} at {path}")


def _repvgg_state(prefix: str, seed: int = 0, **config: Any) -> dict[str, np.ndarray]:
    settings_ = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, **config}
    module = randomize_(FAMILY_CLASSES["RepVGGBlock"](**settings_), seed)
    return {f"{prefix}.{k}": v for k, v in numpy_state(module).items()}


def test_incomplete_block_is_an_error_naming_prefix_and_key(tmp_path: Path) -> None:
    state = _repvgg_state("neck.3") | {"head.weight": np.ones((2, 4))}
    del state["neck.3.rbr_1x1.bn.running_var"]
    state["neck.3.rbr_dense.conv.weight"] = state["neck.3.rbr_dense.conv.weight"][:, :, :2]
    source = tmp_path / "bad.npz"
    write_tensors(source, state)
    _error(
        _cli("convert", source, tmp_path / "out.npz"),
        "neck.3: ",
        "rbr_dense.conv.weight has shape (4, 4, 2, 3)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"], "something was written"
    state = _repvgg_state("neck.3")
    del state["neck.3.rbr_1x1.bn.running_var"]
    with pytest.raises(ReparamError, match=r"missing key neck\.3\.rbr_1x1\.bn\.running_var"):
        convert_state_dict(state)


def test_qarepvgg_ambiguity_says_which_block_and_how_to_state_it(tmp_path: Path) -> None:
    module = randomize_(FAMILY_CLASSES["QARepVGGBlock"](in_channels=4, out_channels=4), 3)
    state = {f"neck.0.{k}": v for k, v in numpy_state(module).items()}
    source = tmp_path / "qa.npz"
    write_tensors(source, state)
    line = _error(
        _cli("convert", source, tmp_path / "out.npz"),
        "neck.0: QARepVGGBlock:",
        "no tensors show whether its identity",
        "--set 'neck.0.stride=...'",
    )
    assert "groups" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.npz"], "something was written"
    overrides = tmp_path / "qa.json"
    overrides.write_text('{"neck.*": {"stride": 1, "groups": 1, "family": "QARepVGGBlockV2"}}')
    target = tmp_path / "out.npz"
    result = _cli("convert", source, target, "--overrides", overrides)
    assert result.returncode == 0, result.stderr
    assert "QARepVGGBlockV2 (official keys): 1 (neck.0)" in result.stdout, result.stdout
    assert {"neck.0.rbr_reparam.weight", "neck.0.bn.running_var"} <= set(read_tensors(target))


def test_overrides_parse_and_refuse_malformed_text() -> None:
    assert parse_override("*.eps=0.001") == ("*", "eps", 0.001)
    assert parse_override("a.b.use_affine=false") == ("a.b", "use_affine", False)
    with pytest.raises(ReparamError, match=r"expected PREFIX\.option=value"):
        parse_override("stride1")


def test_eps_is_stated_for_yolov6_checkpoints() -> None:
    state = _repvgg_state("backbone.stem")
    deploy_default, _ = convert_state_dict(state)
    deploy_yolo, _ = convert_state_dict(state, eps=1e-3)
    deploy_set, _ = convert_state_dict(state, overrides={"backbone.*": {"eps": 1e-3}})
    key = "backbone.stem.rbr_reparam.weight"
    np.testing.assert_array_equal(deploy_yolo[key], deploy_set[key])
    assert not np.allclose(deploy_default[key], deploy_yolo[key], rtol=1e-6, atol=0), "eps unused"


def test_info_and_verify_on_a_mixed_checkpoint(tmp_path: Path) -> None:
    state = _repvgg_state("a.0") | _repvgg_state("a.1", 1, out_channels=8, stride=2)
    dbb = randomize_(FAMILY_CLASSES["DiverseBranchBlock"](4, 4, 3, padding=1, groups=2), 2)
    state |= {f"b.{k}": v for k, v in numpy_state(dbb).items()} | {"fc.weight": np.ones((3, 8))}
    source = tmp_path / "mixed.npz"
    write_tensors(source, state)
    info = _cli("info", source)
    assert info.returncode == 0, info.stderr
    assert "RepVGGBlock (official keys): 2 (a.0, a.1)" in info.stdout, info.stdout
    assert "DiverseBranchBlock (official keys): 1 (b)" in info.stdout, info.stdout
    assert "passed through: 1 tensors (fc.weight)" in info.stdout, info.stdout
    verify = _cli("verify", source)
    assert verify.returncode == 0 and "blocks checked: 3" in verify.stdout, verify.stdout
    state["b.dbb_1x1_kxk.bn1.bn.running_var"] = np.full(4, np.nan)
    write_tensors(source, state)
    _error(_cli("verify", source), "b.dbb_1x1_kxk.bn1.bn.running_var has 4 non-finite values")


def test_nothing_to_fuse_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "plain.npz"
    write_tensors(source, {"fc.weight": np.ones((2, 2)), "conv.weight": np.ones((2, 2, 3, 3))})
    _error(_cli("convert", source, tmp_path / "out.npz"), "plain.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.npz"]


def test_timm_network_with_a_stride_1_stage_converts_and_runs(tmp_path: Path) -> None:
    """A ByobNet RepVGG whose third stage keeps its resolution (s=1): 32 -> 32 with an identity."""
    specs = (
        ("stage0", reparam.BlockSpec(3, 16, 2, 1)),
        ("stage1.0", reparam.BlockSpec(16, 32, 2, 1)),
        ("stage2.0", reparam.BlockSpec(32, 32, 1, 1)),  # stage start, stride 1, identity
        ("stage2.1", reparam.BlockSpec(32, 32, 1, 1)),
        ("stage3.0", reparam.BlockSpec(32, 48, 1, 2)),  # stage start, stride 1, no identity
    )
    model = reparam.RepVGG.from_specs(specs, num_classes=5, dtype=np.float64)
    source, target = tmp_path / "timm.safetensors", tmp_path / "deploy.npz"
    reparam.save(model, source, layout="timm")
    info = _cli("info", source, "--set", "stages.2.0.stride=1")
    assert info.returncode == 0 and "2 at stage0, stage1.0;" in info.stdout, info.stdout
    result = _cli("convert", source, target, "--set", "stages.2.0.stride=1")
    assert result.returncode == 0, result.stderr
    assert "stages.1.0.reparam_conv.weight" in read_tensors(target)
    x = np.random.default_rng(0).standard_normal((2, 3, 24, 20))
    np.save(tmp_path / "x.npy", x)
    # the deploy form has no identity branch left to tell: both stride-1 stage starts are stated
    run = _cli(
        "run", target, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy",
        "--set", "stages.1.0.stride=1", "--set", "stages.2.0.stride=1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert_close(np.load(tmp_path / "y.npy"), model(x), dtype=np.float64, what="stride-1 stage")
    loaded = reparam.checkpoints.load(source)  # without the statement, the identity decides
    assert [s.stride for _, s in loaded.specs] == [2, 2, 1, 1, 2], "rule and identity"
