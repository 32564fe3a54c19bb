"""The second round of families: ultralytics, YOLOv7/v9, RepViT, FastViT, RepGhost, UniRepLKNet,
PP-YOLOE (issue 20, sections 2 and 3).

The torch transcriptions in ``tests/torch_families.py`` are the oracle (each was checked against
the published class itself: same weights, keys one for one, outputs bit for bit). The
parametrized laws of ``tests/test_families.py`` and ``tests/test_torch_families.py`` run on every
published configuration here too; this file adds

1. random configurations by Hypothesis, per family, drawn by construction (groups, then channels,
   kernel, stride, dilation, padding, then an input that fits): train form equals torch, fold
   equals train, in float64 and float32;
2. the deploy form under the published deploy names, loaded strictly into the published deploy
   module (a conv, or RepViT's bare conv / linear layer), equals the torch train form;
3. the published BatchNorm eps of each family as its default, names and option aliases;
4. the traps: YOLOv7's grouped identity, RepViT's two formats, Paddle's alpha at zero;
5. the walker on a checkpoint mixing every new block with old ones and foreign tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import DTYPES, assert_close
from torch import nn
from torch_families import (
    EXTRA_CONFIGS,
    FAMILY_CLASSES,
    PUBLISHED_CONFIGS,
    PUBLISHED_EPS,
    PUBLISHED_KEYS,
    ROUND_ONE,
    block_forward,
    geometry,
    numpy_state,
    randomize_,
    set_bn_eps_,
)

from reparam import ReparamError
from reparam.checkpoints.walker import convert_state_dict, find_blocks, recognisable
from reparam.families import FAMILIES, PUBLISHED_NAMES, from_state_dict

ROUND_TWO = tuple(name for name in FAMILY_CLASSES if name not in ROUND_ONE)

#: The published deploy module of each block, read from the published code (not from reparam):
#: the fused conv's name, "" where the fused module replaces the block (RepViT's fuse()).
DEPLOY_NAMES = {
    "ultralytics.RepConv": "conv",  # fuse_convs: self.conv = nn.Conv2d(..., bias=True)
    "RepConvN": "conv",
    "ultralytics.RepVGGDW": "conv",  # fuse: self.conv = fuse_conv_and_bn(...)
    "Conv2": "conv",  # fuse_convs, then BaseModel.fuse: fuse_conv_and_bn
    "yolov7.RepConv": "rbr_reparam",
    "repvit.RepVGGDW": "",  # replace_batchnorm: setattr(net, name, child.fuse())
    "Conv2d_BN": "",
    "BN_Linear": "",  # an nn.Linear
    "RepMixer": "reparam_conv",
    "RepCPE": "reparam_conv",
    "RepGhostModule": "cheap_operation",  # switch_to_deploy: self.cheap_operation = nn.Conv2d
    "DilatedReparamBlock": "lk_origin",  # merge_dilated_branches: self.lk_origin = merged_conv
    "ppdet.RepVggBlock": "conv",  # convert_to_deploy: self.conv = nn.Conv2D
}

CASES = [
    pytest.param(name, config, id=f"{name}-{index}{'-extra' if extra else ''}")
    for extra, table in ((False, PUBLISHED_CONFIGS), (True, EXTRA_CONFIGS))
    for name in ROUND_TWO
    for index, config in enumerate(table.get(name, []))
]


def _torch_block(name: str, config: dict[str, Any], seed: int, eps: float | None = None) -> Any:
    module = FAMILY_CLASSES[name](**config)
    randomize_(module, seed)
    set_bn_eps_(module, PUBLISHED_EPS.get(name, 1e-5) if eps is None else eps)
    return module.double().eval()


def _input(name: str, config: dict[str, Any], seed: int, height: int = 11, width: int = 8) -> Any:
    shape = geometry(name, config)
    rng = np.random.default_rng(seed)
    if shape.features:
        return rng.standard_normal((2, shape.in_channels))
    return rng.standard_normal((2, shape.in_channels, height, width))


def _torch(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        result: np.ndarray = block_forward(module, torch.from_numpy(x)).numpy()
    return result


def _fused_module(name: str, config: dict[str, Any]) -> nn.Module:
    """The published deploy conv (or RepViT's linear layer) of a block, float64."""
    shape = geometry(name, config)
    if shape.features:
        return nn.Linear(shape.in_channels, shape.out_channels).double()
    return nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel_size, stride=shape.stride,
        padding=shape.padding, dilation=shape.dilation, groups=shape.groups,
    ).double()  # fmt: skip


class _Deployed(nn.Module):
    """A published deploy module holding its fused conv under the published name.

    RepGhost's also keeps its ``primary_conv``; ``forward`` runs the fused conv.
    """

    def __init__(self, conv_name: str, fused: nn.Module, kept: dict[str, nn.Module]) -> None:
        super().__init__()
        self.conv_name = conv_name
        self.add_module(conv_name, fused)
        for child, module in kept.items():
            self.add_module(child, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused: nn.Module = self.get_submodule(self.conv_name)
        out: torch.Tensor = fused(x)
        return out


def _deploy_module(name: str, config: dict[str, Any], train: nn.Module) -> nn.Module:
    """The published deploy form: the fused module under its published name (or in place)."""
    fused = _fused_module(name, config)
    if not DEPLOY_NAMES[name]:
        return fused
    kept = {"primary_conv": train.primary_conv} if name == "RepGhostModule" else {}
    return _Deployed(DEPLOY_NAMES[name], fused, kept)


# ------------------------------------------------------------------ the registry


def test_every_round_two_family_is_registered_with_transcription_and_deploy_name() -> None:
    assert set(ROUND_TWO) <= set(FAMILIES), sorted(set(ROUND_TWO) - set(FAMILIES))
    assert set(DEPLOY_NAMES) == set(ROUND_TWO), sorted(set(DEPLOY_NAMES) ^ set(ROUND_TWO))
    for name in ROUND_TWO:
        assert PUBLISHED_CONFIGS[name], f"{name}: no published configuration"
        assert name in PUBLISHED_KEYS, f"{name}: no published key list"
        assert FAMILIES[name].deploy_prefix == DEPLOY_NAMES[name], name


# ------------------------------------------------------------------ deploy form, published eps


@pytest.mark.parametrize(("name", "config"), CASES)
def test_deploy_state_loads_into_the_published_deploy_module(
    name: str, config: dict[str, Any]
) -> None:
    """The fused weights under the published deploy names equal the torch train form."""
    module = _torch_block(name, config, seed=13)
    x = _input(name, config, seed=4)
    expected = _torch(module, x)
    block = from_state_dict(name, numpy_state(module), **config)  # the family's published eps
    state = block.deploy_state()
    dot = f"{DEPLOY_NAMES[name]}." if DEPLOY_NAMES[name] else ""
    assert set(state) == {f"{dot}weight", f"{dot}bias"}, f"{name}: {sorted(state)}"
    deploy = _deploy_module(name, config, module)
    missing, unexpected = deploy.load_state_dict(
        {key: torch.tensor(value) for key, value in state.items()}, strict=False
    )
    assert not unexpected, f"{name}: {unexpected}"
    assert all(key.startswith("primary_conv.") for key in missing), f"{name}: {missing}"
    with torch.no_grad():
        got = deploy(torch.from_numpy(x)).numpy()
    assert_close(got, expected, dtype=np.float64, scale=float(block.magnitude(x).max()),
                 what=f"{name} published deploy module")  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_EPS))
def test_yolo_blocks_default_to_their_published_eps(name: str) -> None:
    config = PUBLISHED_CONFIGS[name][0]
    assert FAMILIES[name].eps == 1e-3, f"{name}: {FAMILIES[name].eps}"
    module = _torch_block(name, config, seed=2, eps=1e-3)
    state = numpy_state(module)
    x = _input(name, config, seed=1)
    expected = _torch(module, x)
    default = from_state_dict(name, state, **config)
    assert default.eps == 1e-3, default.eps
    scale = float(default.magnitude(x).max())
    assert_close(default(x), expected, dtype=np.float64, scale=scale, what=f"{name} default eps")
    stated = from_state_dict(name, state, eps=1e-5, **config)  # an explicit eps wins
    assert stated.eps == 1e-5
    assert np.abs(stated(x) - expected).max() > 1e-6 * scale, f"{name}: eps=1e-5 had no effect"


def test_other_families_keep_pytorchs_eps() -> None:
    for name in ROUND_TWO:
        expected = PUBLISHED_EPS.get(name, 1e-5)
        assert FAMILIES[name].eps == expected, f"{name}: {FAMILIES[name].eps} != {expected}"
    assert FAMILIES["RepVGGBlock"].eps == 1e-5 and FAMILIES["QARepVGGBlock"].eps == 1e-5


# ------------------------------------------------------------------ random configurations


def _grouped(draw: Any, *, depthwise: bool = False) -> tuple[int, int, int]:
    """``(in, out, groups)`` by construction: groups, then channels per group."""
    groups = draw(st.integers(1, 3))
    if depthwise:
        return groups, groups, groups
    return groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3)), groups


@st.composite
def _configs(draw: Any, name: str) -> dict[str, Any]:
    odd = st.sampled_from([1, 3, 5, 7])
    if name in ("ultralytics.RepConv", "RepConvN", "yolov7.RepConv"):
        c1, c2, g = _grouped(draw, depthwise=draw(st.booleans()))
        k, s = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2]))
        identity = c1 == c2 and s == 1
        p = k // 2 + (0 if identity else draw(st.integers(0, 1)))
        if name == "yolov7.RepConv":
            return {"c1": c1, "c2": c2, "k": k, "s": s, "p": p, "g": g}
        return {"c1": c1, "c2": c2, "k": k, "s": s, "p": p, "g": g, "bn": draw(st.booleans())}
    if name == "ultralytics.RepVGGDW":
        return {"ed": draw(st.integers(1, 5))}
    if name == "Conv2":
        c1, c2, g = _grouped(draw)
        k, s, d = draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 2)), draw(st.integers(1, 3))
        return {"c1": c1, "c2": c2, "k": k, "s": s, "g": g, "d": d}
    if name == "repvit.RepVGGDW":
        return {"ed": draw(st.integers(1, 5)), "kernel_size": draw(odd),
                "legacy": draw(st.booleans())}  # fmt: skip
    if name == "Conv2d_BN":
        a, b, groups = _grouped(draw)
        return {"a": a, "b": b, "ks": draw(st.integers(1, 4)), "stride": draw(st.integers(1, 2)),
                "pad": draw(st.integers(0, 3)), "dilation": draw(st.integers(1, 2)),
                "groups": groups}  # fmt: skip
    if name == "BN_Linear":
        return {"a": draw(st.integers(1, 6)), "b": draw(st.integers(1, 6)),
                "bias": draw(st.booleans())}  # fmt: skip
    if name == "RepMixer":
        return {"dim": draw(st.integers(1, 5)), "kernel_size": draw(odd),
                "use_layer_scale": draw(st.booleans())}  # fmt: skip
    if name == "RepCPE":
        channels = draw(st.integers(1, 5))
        return {"in_channels": channels, "embed_dim": channels, "spatial_shape": draw(odd)}
    if name == "RepGhostModule":
        return {"inp": draw(st.integers(1, 4)), "oup": draw(st.integers(1, 5)),
                "dw_size": draw(odd), "reparam_bn": draw(st.booleans()),
                "reparam_identity": draw(st.booleans())}  # fmt: skip
    if name == "DilatedReparamBlock":
        return {
            "channels": draw(st.integers(1, 4)),
            "kernel_size": draw(st.sampled_from([5, 7, 9, 11, 13, 15, 17])),
            "deploy": False,
        }
    assert name == "ppdet.RepVggBlock", name
    return {"ch_in": draw(st.integers(1, 5)), "ch_out": draw(st.integers(1, 5)),
            "alpha": draw(st.booleans())}  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from(ROUND_TWO),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
    extra_h=st.integers(0, 4),
    extra_w=st.integers(0, 4),
)
def test_random_configurations_equal_torch_and_fold(
    data: Any, name: str, seed: int, dtype: Any, extra_h: int, extra_w: int
) -> None:  # fmt: skip
    config = data.draw(_configs(name), label="config")
    module = _torch_block(name, config, seed)
    shape = geometry(name, config)
    span = shape.dilation * (shape.kernel_size - 1) + 1
    side = max(span - 2 * shape.padding, 1) + shape.stride  # an input the windows fit
    x = _input(name, config, seed, side + extra_h, side + 1 + extra_w).astype(dtype)  # non-square
    state = numpy_state(module, dtype)
    block = from_state_dict(name, state, **config)
    train = block(x)
    assert train.dtype == dtype, f"{name}: train form in {train.dtype}"
    scale = float(block.magnitude(x).max())
    expected = _torch(module, x.astype(np.float64))
    assert_close(train, expected, dtype=dtype, scale=scale, what=f"{name} {config} train vs torch")
    conv = block.reparameterize()
    assert conv.kernel.dtype == dtype, f"{name}: fused kernel in {conv.kernel.dtype}"
    assert_close(conv(x), train, dtype=dtype, scale=scale, what=f"{name} {config} fold vs train")


# ------------------------------------------------------------------ names and options


@pytest.mark.parametrize(
    ("name", "choices"),
    [
        ("RepConv", ("ultralytics.RepConv", "yolov7.RepConv")),
        ("RepVGGDW", ("ultralytics.RepVGGDW", "repvit.RepVGGDW")),
        ("RepVggBlock", ("ppdet.RepVggBlock", "RepVGGBlock")),
    ],
)
def test_a_name_two_repositories_publish_is_an_error_listing_both(
    name: str, choices: tuple[str, ...]
) -> None:
    with pytest.raises(ReparamError, match="several repositories") as info:
        from_state_dict(name, {})
    for choice in choices:
        assert choice in str(info.value), str(info.value)
    assert PUBLISHED_NAMES[name] == choices


@pytest.mark.parametrize(
    ("alias", "name", "config", "published"),
    [
        ("ConvNorm", "Conv2d_BN", {"in_dim": 4, "out_dim": 6}, {"a": 4, "b": 6}),
        ("NormLinear", "BN_Linear", {"in_dim": 4, "out_dim": 6}, {"a": 4, "b": 6}),
        ("RepVggDw", "repvit.RepVGGDW", {"ed": 4, "kernel_size": 3, "legacy": False}, {"ed": 4}),
        ("RepConditionalPosEnc", "RepCPE", {"dim": 4, "dim_out": 4},
         {"in_channels": 4, "embed_dim": 4}),
        ("RepGhostModule", "RepGhostModule", {"in_chs": 3, "out_chs": 4, "reparam": True},
         {"inp": 3, "oup": 4}),
    ],
)  # fmt: skip
def test_timm_names_of_classes_and_options(
    alias: str, name: str, config: dict[str, Any], published: dict[str, Any]
) -> None:
    module = _torch_block(name, published, seed=3)
    state = numpy_state(module)
    block = from_state_dict(alias, state, **config)
    assert block.name == name
    x = _input(name, published, seed=2)
    scale = float(block.magnitude(x).max())
    assert_close(block(x), _torch(module, x), dtype=np.float64, scale=scale, what=alias)


def test_both_names_of_one_option_is_an_error() -> None:
    with pytest.raises(ReparamError, match="in_dim and a name one option"):
        from_state_dict("Conv2d_BN", {}, a=4, in_dim=4, b=4)
    with pytest.raises(ReparamError, match=r"unknown option kernel_size;.*in_dim"):
        from_state_dict("Conv2d_BN", {}, a=4, b=4, kernel_size=3)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("ultralytics.RepConv", {"c1": 4, "c2": 4, "deploy": True}, "deploy=True is not supported"),
        ("yolov7.RepConv", {"c1": 4, "c2": 4, "deploy": True}, "deploy=True is not supported"),
        ("DilatedReparamBlock", {"channels": 4, "kernel_size": 13},
         "missing required option deploy"),
        ("DilatedReparamBlock", {"channels": 4, "kernel_size": 13, "deploy": True},
         "deploy=True is not supported"),
        ("DilatedReparamBlock", {"channels": 4, "kernel_size": 3, "deploy": False},
         "kernel_size=3 has no published branch table"),
        ("RepMixer", {"dim": 4, "inference_mode": True}, "inference_mode=True is not supported"),
        ("RepCPE", {"in_channels": 4, "spatial_shape": (7, 5)}, "only a square odd shape"),
        ("RepCPE", {"in_channels": 4, "embed_dim": 768}, "needs embed_dim == in_channels"),
        ("ultralytics.RepConv", {"c1": 4, "c2": 4, "p": 2, "bn": True}, "needs p == k // 2"),
        ("ultralytics.RepConv", {"c1": 4, "c2": 4, "k": 4, "p": 2}, "only for an odd k"),
        ("Conv2", {"c1": 4, "c2": 4, "p": 1}, "give different output sizes"),
        ("RepGhostModule", {"inp": 4, "oup": 4, "dw_size": 4}, "expected an odd dw_size"),
        ("repvit.RepVGGDW", {"ed": 4, "kernel_size": 4}, "expected an odd kernel_size"),
    ],
)  # fmt: skip
def test_published_flags_and_shapes_that_do_not_run_are_refused(
    name: str, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ReparamError, match=message):
        from_state_dict(name, {}, **config)


def test_repcpe_embed_dim_defaults_to_in_channels() -> None:
    """The published default 768 runs only when in_channels is 768; None means in_channels."""
    module = _torch_block("RepCPE", {"in_channels": 4, "embed_dim": 4}, seed=1)
    block = from_state_dict("RepCPE", numpy_state(module), in_channels=4)
    assert block.config["embed_dim"] == 4, block.config


# ------------------------------------------------------------------ the traps


def _yolov7_published_fuse(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv7's ``fuse_repvgg_block`` as published (for the comparison only, in float64).

    Its identity kernel is a grouped 1x1 weight ``(c2, c1 // g)`` filled by ``fill_diagonal_``:
    only rows ``i < c1 // g`` get their 1.
    """

    def fold(conv: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return conv * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def pad(kernel: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(kernel, [1, 1, 1, 1])

    with torch.no_grad():
        dense_k, dense_b = fold(module.rbr_dense[0].weight, module.rbr_dense[1])
        small_k, small_b = fold(module.rbr_1x1[0].weight, module.rbr_1x1[1])
        eye = torch.zeros(module.rbr_1x1[0].weight.shape[:2], dtype=torch.float64)
        eye.fill_diagonal_(1.0)
        ident_k, ident_b = fold(eye[:, :, None, None], module.rbr_identity)
        kernel = dense_k + pad(small_k) + pad(ident_k)
        return kernel.numpy(), (dense_b + small_b + ident_b).numpy()


@pytest.mark.parametrize("groups", [1, 2])
def test_yolov7_grouped_identity_is_built_right(groups: int) -> None:
    """The published fuse drops the identity of channels >= c1 // g; reparam keeps it."""
    config = {"c1": 4, "c2": 4, "g": groups}
    module = _torch_block("yolov7.RepConv", config, seed=5)
    block = from_state_dict("yolov7.RepConv", numpy_state(module), **config)
    conv = block.reparameterize()
    x = _input("yolov7.RepConv", config, seed=6)
    scale = float(block.magnitude(x).max())
    assert_close(conv(x), _torch(module, x), dtype=np.float64, scale=scale, what="reparam fold")
    published_kernel, published_bias = _yolov7_published_fuse(module)
    np.testing.assert_allclose(published_bias, conv.bias, rtol=0, atol=1e-12)
    difference = np.abs(published_kernel - conv.kernel).max()
    if groups == 1:
        assert difference < 1e-12, f"groups 1: published and reparam differ by {difference}"
    else:  # the missing identity: gamma / std of the identity BN, at least 0.5 / sqrt(2)
        assert difference > 0.3, f"groups 2: the published bug did not show ({difference})"


def test_repvit_formats_are_told_apart_by_their_keys() -> None:
    current = numpy_state(_torch_block("repvit.RepVGGDW", {"ed": 4}, seed=1))
    legacy = numpy_state(_torch_block("repvit.RepVGGDW", {"ed": 4, "legacy": True}, seed=1))
    assert from_state_dict("repvit.RepVGGDW", current, ed=4).config["legacy"] is False
    assert from_state_dict("repvit.RepVGGDW", legacy, ed=4).config["legacy"] is True
    with pytest.raises(ReparamError, match=r"legacy=False, but the keys are of the other format"):
        from_state_dict("repvit.RepVGGDW", legacy, ed=4, legacy=False)
    with pytest.raises(ReparamError, match=r"legacy=True, but .*conv1.weight and bn \(current\)"):
        from_state_dict("repvit.RepVGGDW", current, ed=4, legacy=True)


@pytest.mark.parametrize("alpha", [0.0, -0.75, 1.3])
def test_paddle_alpha_scales_the_1x1_branch_except_at_zero(alpha: float) -> None:
    config = {"ch_in": 3, "ch_out": 4, "alpha": True}
    module = _torch_block("ppdet.RepVggBlock", config, seed=8)
    with torch.no_grad():
        module.alpha.fill_(alpha)
    block = from_state_dict("ppdet.RepVggBlock", numpy_state(module), **config)
    x = _input("ppdet.RepVggBlock", config, seed=9)
    scale = float(block.magnitude(x).max())
    expected = _torch(module, x)
    assert_close(block(x), expected, dtype=np.float64, scale=scale, what=f"alpha {alpha}")
    assert_close(block.reparameterize()(x), expected, dtype=np.float64, scale=scale, what="fold")
    with torch.no_grad():
        dense = module.conv1(torch.from_numpy(x)).numpy()
        pointwise = module.conv2(torch.from_numpy(x)).numpy()
    factor = 1.0 if alpha == 0 else alpha  # the published `if self.alpha:`
    assert_close(expected, dense + factor * pointwise, dtype=np.float64, scale=scale,
                 what="the transcription's alpha")  # fmt: skip


def test_repghost_reads_the_whole_modules_state_and_checks_the_primary_conv() -> None:
    config = {"inp": 3, "oup": 4}
    state = numpy_state(_torch_block("RepGhostModule", config, seed=1))
    assert "primary_conv.0.weight" in state
    from_state_dict("RepGhostModule", state, **config)
    part = {k: v for k, v in state.items() if not k.startswith("primary_conv.")}
    from_state_dict("RepGhostModule", part, **config)
    with pytest.raises(ReparamError, match=r"primary_conv.0.weight has shape \(4, 3, 1, 1\)"):
        from_state_dict("RepGhostModule", state, inp=3, oup=4, kernel_size=3)


# ------------------------------------------------------------------ the walker


def _block_state(
    name: str, config: dict[str, Any], prefix: str, seed: int
) -> tuple[dict[str, Any], nn.Module]:
    """A block's state dict under ``prefix``, and the torch module it came from."""
    module = _torch_block(name, config, seed)
    return {f"{prefix}.{key}": value for key, value in numpy_state(module).items()}, module


TIMM_RENAMES = {
    "RepMixer": [("norm.rbr_skip", "norm.identity"), ("mixer.rbr_skip", "mixer.identity"),
                 ("mixer.rbr_conv", "mixer.conv_kxk"), ("mixer.rbr_scale", "mixer.conv_scale"),
                 ("layer_scale", "layer_scale.gamma")],
    "RepCPE": [("pe", "pos_enc")],
}  # fmt: skip


def _timm(state: dict[str, Any], prefix: str, name: str) -> dict[str, Any]:
    renamed = {}
    for key, value in state.items():
        local = key[len(prefix) + 1 :]
        for old, new in TIMM_RENAMES[name]:
            if local == old or local.startswith(old + "."):
                key = f"{prefix}.{new}{local[len(old) :]}"
                break
        renamed[key] = value
    return renamed


def _foreign(rng: np.random.Generator) -> dict[str, Any]:
    """Tensors with nothing to fuse, some named like the new families' keys."""

    def bn(prefix: str, n: int) -> dict[str, Any]:
        return {f"{prefix}.weight": rng.uniform(0.5, 1.5, n), f"{prefix}.bias": rng.normal(size=n),
                f"{prefix}.running_mean": rng.normal(size=n),
                f"{prefix}.running_var": rng.uniform(0.5, 2, n),
                f"{prefix}.num_batches_tracked": np.array(7)}  # fmt: skip

    state = {"head.fc.weight": rng.normal(size=(10, 8)), "head.fc.bias": rng.normal(size=10)}
    # ultralytics LightConv: RepConv's key names, but a 1x1 then a depthwise 3x3 (a sequence)
    state |= {"neck.light.conv1.conv.weight": rng.normal(size=(6, 4, 1, 1)),
              **bn("neck.light.conv1.bn", 6),
              "neck.light.conv2.conv.weight": rng.normal(size=(6, 1, 3, 3)),
              **bn("neck.light.conv2.bn", 6)}  # fmt: skip
    # a plain ultralytics Conv, and its fused form (conv.weight + conv.bias, no bn)
    state |= {"neck.plain.conv.weight": rng.normal(size=(4, 4, 3, 3)), **bn("neck.plain.bn", 4)}
    state |= {"neck.fused.conv.weight": rng.normal(size=(4, 4, 3, 3)),
              "neck.fused.conv.bias": rng.normal(size=4)}  # fmt: skip
    # GhostNet's GhostModule: a cheap operation without fusion_bn (a concatenation)
    state |= {"ghost.cheap_operation.0.weight": rng.normal(size=(4, 1, 3, 3)),
              **bn("ghost.cheap_operation.1", 4)}  # fmt: skip
    return state


def test_walker_converts_every_new_block_among_old_ones_and_foreign_tensors() -> None:
    rng = np.random.default_rng(0)
    state: dict[str, Any] = _foreign(rng)
    foreign = dict(state)
    blocks: list[tuple[str, str, dict[str, Any], Any, str]] = []
    picks = [(name, config, "published") for name in ROUND_TWO
             for config in PUBLISHED_CONFIGS[name][:2]]  # fmt: skip
    picks += [("RepMixer", {"dim": 4}, "timm"), ("RepCPE", {"in_channels": 4, "embed_dim": 4},
              "timm"), ("RepVGGBlock", PUBLISHED_CONFIGS["RepVGGBlock"][0], "published"),
              ("DiverseBranchBlock", PUBLISHED_CONFIGS["DiverseBranchBlock"][2], "published"),
              ("QARepVGGBlock", PUBLISHED_CONFIGS["QARepVGGBlock"][0], "published")]  # fmt: skip
    overrides: dict[str, dict[str, Any]] = {}
    for number, (name, config, layout) in enumerate(picks):
        prefix = f"model.{number}.m"
        part, module = _block_state(name, config, prefix, seed=number)
        if layout == "timm":
            part = _timm(part, prefix, name)
        state |= part
        blocks.append((prefix, name, config, module, layout))
        if name == "QARepVGGBlock":
            overrides[prefix] = {"stride": 1, "groups": 1, "family": "QARepVGGBlock"}
        if name == "RepGhostModule":
            overrides[prefix] = {"reparam_identity": config.get("reparam_identity", False)}
        if name == "RepConvN":
            overrides[prefix] = {"family": "RepConvN"}
    deploy, report = convert_state_dict(state, overrides=overrides)
    found = {block.prefix: block for block in report.blocks}
    assert sorted(found) == sorted(prefix for prefix, *_ in blocks), sorted(found)
    for prefix, name, config, module, layout in blocks:
        block = found[prefix]
        assert block.family == name, f"{prefix}: {block.family} != {name}"
        conv_name = "reparam_conv" if layout == "timm" else FAMILIES[name].deploy_prefix
        dot = f"{prefix}.{conv_name}." if conv_name else f"{prefix}."
        weight, bias = deploy[f"{dot}weight"], deploy[f"{dot}bias"]
        if name in ROUND_ONE:  # its fold under its names: checked by tests/test_walker.py
            assert weight.shape[0] == geometry(name, config).out_channels, prefix
            continue
        fused = _fused_module(name, config)
        fused.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias)})
        x = _input(name, config, seed=3)
        with torch.no_grad():
            got = fused(torch.from_numpy(x)).numpy()
        # the walker read the groups off the tensors where it could (1 assumed elsewhere: the
        # fused tensors do not depend on it); the magnitude needs the block as built
        truth = from_state_dict(name, numpy_state(module), **config)
        scale = float(truth.magnitude(x).max())
        assert_close(got, _torch(module, x), dtype=np.float64, scale=scale, what=f"{prefix} {name}")
    # everything else bit for bit: the foreign tensors, RepGhost's primary conv, QARepVGG's bn
    owned = {key for block in report.blocks for key in block.keys}
    kept = {key for block in report.blocks for key in block.kept_keys()}
    assert set(report.passed) == (set(state) - owned) | kept, sorted(report.passed)
    assert set(foreign) <= set(report.passed), sorted(set(foreign) - set(report.passed))
    for key in report.passed:
        np.testing.assert_array_equal(deploy[key], state[key], err_msg=f"{key} changed")
    expected_keys = set(report.passed) | {key for b in report.blocks for key in b.deploy_tensors()}
    assert set(deploy) == expected_keys, sorted(set(deploy) ^ expected_keys)


def test_walker_uses_each_familys_eps_unless_stated() -> None:
    ultra, _ = _block_state("ultralytics.RepConv", {"c1": 4, "c2": 4, "bn": True}, "a", 1)
    repvgg, _ = _block_state("RepVGGBlock", PUBLISHED_CONFIGS["RepVGGBlock"][0], "b", 2)
    state = ultra | repvgg
    blocks, _ = find_blocks(state)
    assert {b.prefix: b.block.eps for b in blocks} == {"a": 1e-3, "b": 1e-5}
    blocks, _ = find_blocks(state, eps=1e-4)  # the command line's --eps: every block
    assert {b.prefix: b.block.eps for b in blocks} == {"a": 1e-4, "b": 1e-4}
    blocks, _ = find_blocks(state, eps=1e-4, overrides={"a": {"eps": 1e-2}})  # --set a.eps=
    assert {b.prefix: b.block.eps for b in blocks} == {"a": 1e-2, "b": 1e-4}


def test_walker_finds_the_outer_block_not_the_ones_inside() -> None:
    """RepViT's RepVGGDW holds Conv2d_BN modules; FastViT's RepMixer holds MobileOne blocks."""
    repvit, _ = _block_state("repvit.RepVGGDW", {"ed": 4, "legacy": True}, "t.0", 1)
    mixer, _ = _block_state("RepMixer", {"dim": 4}, "t.1", 2)
    conv_bn, _ = _block_state("Conv2d_BN", {"a": 4, "b": 4, "ks": 3, "pad": 1}, "t.2", 3)
    blocks, _ = find_blocks(repvit | mixer | conv_bn)
    assert [(b.prefix, b.family) for b in blocks] == [
        ("t.0", "repvit.RepVGGDW"), ("t.1", "RepMixer"), ("t.2", "Conv2d_BN")
    ]  # fmt: skip


def test_walker_names_timm_keys_in_errors() -> None:
    state, _ = _block_state("RepMixer", {"dim": 4}, "stages.0.mixer", 1)
    state = _timm(state, "stages.0.mixer", "RepMixer")
    del state["stages.0.mixer.mixer.conv_kxk.0.bn.running_var"]
    with pytest.raises(ReparamError, match=r"missing key stages\.0\.mixer\.mixer\.conv_kxk\.0\.bn"):
        convert_state_dict(state)


def test_generic_deploy_names_do_not_mark_a_block() -> None:
    assert not recognisable(["model.0.conv.weight", "model.0.conv.bias", "model.0.weight"])
    assert recognisable(["stage1.0.rbr_reparam.weight", "stage1.0.rbr_reparam.bias"])
    assert recognisable(["m.0.conv1.conv.weight", "m.0.conv2.conv.weight",
                         "m.0.conv1.bn.running_var"])  # fmt: skip
