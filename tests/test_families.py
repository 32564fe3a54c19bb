"""Every published block family: reparam's train form equals the torch.nn block, and its fold.

For each family and configuration (the published ones and the generalisations
in ``torch_families.EXTRA_CONFIGS``), random weights and BatchNorm statistics:

1. ``reparam.families.from_state_dict(name, state, **config)(x)`` equals the
   block built from ``torch.nn`` layers (``tests/torch_families.py``);
2. the folded conv equals the train form, in float64 and float32;
3. the folded conv, loaded into one ``torch.nn.Conv2d``, equals the torch
   train form (the deploy form a user ships);
4. malformed input (unknown block, option, key, shape) is one ReparamError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import DTYPES, TOLERANCE, assert_close
from torch_families import (
    EXTRA_CONFIGS,
    FAMILY_CLASSES,
    PUBLISHED_CONFIGS,
    ROUND_ONE,
    block_forward,
    geometry,
    numpy_state,
    randomize_,
    set_bn_eps_,
)

import reparam
from reparam import ReparamError
from reparam.families import FAMILIES, from_state_dict

CASES = [
    pytest.param(name, config, id=f"{name}-{index}{'-extra' if extra else ''}")
    for extra, table in ((False, PUBLISHED_CONFIGS), (True, EXTRA_CONFIGS))
    for name, configs in table.items()
    for index, config in enumerate(configs)
]

# The worst relative difference seen per family (printed with -s; reported in the closing note).
WORST: dict[str, dict[str, float]] = {}


def _torch_block(name: str, config: dict[str, Any], seed: int, eps: float) -> torch.nn.Module:
    module = FAMILY_CLASSES[name](**config)
    randomize_(module, seed)
    set_bn_eps_(module, eps)
    return module.double().eval()


def _input(
    config: dict[str, Any], seed: int, height: int = 11, width: int = 8, *, name: str = ""
) -> np.ndarray:
    """A batch for the block: (2, C_in, H, W), or (2, C_in) features for a linear block."""
    rng = np.random.default_rng(seed)
    if name:
        shape = geometry(name, config)
        if shape.features:
            return rng.standard_normal((2, shape.in_channels))
        return rng.standard_normal((2, shape.in_channels, height, width))
    return rng.standard_normal((2, config["in_channels"], height, width))


def _record(name: str, dtype: Any, error: float) -> None:
    key = np.dtype(dtype).name
    WORST.setdefault(name, {})
    WORST[name][key] = max(WORST[name].get(key, 0.0), error)


def test_every_published_class_is_registered() -> None:
    assert set(FAMILIES) == set(FAMILY_CLASSES), f"registered {sorted(FAMILIES)}"


@pytest.mark.parametrize(("name", "config"), CASES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_train_form_equals_torch_and_fold(name: str, config: dict[str, Any], eps: float) -> None:
    module = _torch_block(name, config, seed=7, eps=eps)
    state = numpy_state(module, np.float64)
    x = _input(config, seed=3, name=name)
    with torch.no_grad():
        expected = block_forward(module, torch.from_numpy(x)).numpy()
    block = from_state_dict(name, state, eps=eps, **config)
    train = block(x)
    scale = float(block.magnitude(x).max())
    assert_close(train, expected, dtype=np.float64, scale=scale, what=f"{name} train vs torch")
    conv = block.reparameterize()
    deploy = conv(x)
    assert_close(deploy, train, dtype=np.float64, scale=scale, what=f"{name} fold vs train")
    _record(name, np.float64, float(np.abs(deploy - train).max()) / scale)
    # the deploy conv a user ships: one torch Conv2d (or Linear) with the fused weights
    shape = geometry(name, config)
    size = shape.kernel_size
    assert conv.kernel.shape[2:] == (size, size), f"{name}: fused kernel {conv.kernel.shape}"
    assert conv.padding == (shape.padding,) * 2, f"{name}: {conv.padding}"
    assert conv.dilation == (shape.dilation,) * 2, f"{name}: {conv.dilation}"
    if shape.features:
        weight, bias = block.deploy_state().values()
        shipped = torch.nn.functional.linear(
            torch.from_numpy(x), torch.tensor(weight), torch.tensor(bias)
        ).numpy()
    else:
        shipped = torch.nn.functional.conv2d(
            torch.from_numpy(x),
            torch.tensor(conv.kernel),
            torch.tensor(conv.bias),
            stride=conv.stride,
            padding=conv.padding,
            groups=conv.groups,
            dilation=conv.dilation,
        ).numpy()
    assert_close(shipped, expected, dtype=np.float64, scale=scale, what=f"{name} torch deploy")


@pytest.mark.parametrize(("name", "config"), CASES)
def test_float32_in_float32_out(name: str, config: dict[str, Any]) -> None:
    module = _torch_block(name, config, seed=11, eps=1e-5)
    state64 = numpy_state(module, np.float64)
    state32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state64.items()}
    x = _input(config, seed=5, name=name).astype(np.float32)
    block = from_state_dict(name, state32, **config)
    conv = block.reparameterize()
    assert conv.kernel.dtype == np.float32 and conv.bias.dtype == np.float32
    train = block(x)
    assert train.dtype == np.float32, f"{name}: train form gave {train.dtype}"
    scale = float(block.magnitude(x).max())
    assert_close(conv(x), train, dtype=np.float32, scale=scale, what=f"{name} float32")
    _record(name, np.float32, float(np.abs(conv(x) - train).max()) / scale)
    # computed in float64 and rounded once: the float64 fold of the same float32 values
    exact = from_state_dict(
        name, {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in state32.items()},
        **config,
    ).reparameterize()  # fmt: skip
    np.testing.assert_array_equal(conv.kernel, exact.kernel.astype(np.float32))
    np.testing.assert_array_equal(conv.bias, exact.bias.astype(np.float32))


@settings(max_examples=25)
@given(
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, "depthwise"]),
    kernel=st.sampled_from([1, 3, 5, 7, 13, 31]),
    per_group=st.integers(1, 3),
    height=st.integers(0, 5),
    width=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(sorted(ROUND_ONE)),  # round two: tests/test_families_round2.py
    dtype=st.sampled_from(DTYPES),
)
def test_random_configurations_fold(
    stride: int,
    groups: int | str,
    kernel: int,
    per_group: int,
    height: int,
    width: int,
    seed: int,
    name: str,
    dtype: Any,
) -> None:
    channels = 2 * per_group if groups != "depthwise" else per_group * 2
    group_count = channels if groups == "depthwise" else int(groups)
    config: dict[str, Any] = {
        "in_channels": channels,
        "out_channels": channels,
        "kernel_size": kernel,
        "stride": stride,
        "groups": group_count,
    }
    if name == "ReparamLargeKernelConv":
        config["small_kernel"] = 1 if kernel == 1 else 3
    else:
        config["padding"] = kernel // 2
    module = _torch_block(name, config, seed=seed, eps=1e-5)
    state = numpy_state(module, dtype)
    x = _input(config, seed, kernel + height, kernel + 2 + width).astype(dtype)  # non-square
    block = from_state_dict(name, state, **config)
    train = block(x)
    with torch.no_grad():
        expected = module(torch.from_numpy(x.astype(np.float64))).numpy()
    scale = float(block.magnitude(x).max())
    assert_close(train, expected, dtype=dtype, scale=scale, what=f"{name} train vs torch")
    assert_close(block.reparameterize()(x), train, dtype=dtype, scale=scale, what=f"{name} fold")


def test_large_depthwise_kernel_31() -> None:
    config = {"in_channels": 4, "out_channels": 4, "kernel_size": 31, "stride": 2, "groups": 4,
              "small_kernel": 5}  # fmt: skip
    module = _torch_block("ReparamLargeKernelConv", config, seed=1, eps=1e-5)
    block = from_state_dict("ReparamLargeKernelConv", numpy_state(module), **config)
    x = _input(config, seed=2, height=37, width=33)
    scale = float(block.magnitude(x).max())
    train = block(x)
    assert_close(block.reparameterize()(x), train, dtype=np.float64, scale=scale, what="K=31")
    _record(
        "ReparamLargeKernelConv",
        np.float64,
        float(np.abs(block.reparameterize()(x) - train).max()) / scale,
    )


# ------------------------------------------------------------------ errors


def _repvgg_state() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    config = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1}
    return numpy_state(_torch_block("RepVGGBlock", config, 0, 1e-5)), config


def test_unknown_block_names_the_choices() -> None:
    with pytest.raises(ReparamError, match=r"unknown block 'RepVGG'.*DiverseBranchBlock"):
        from_state_dict("RepVGG", {}, in_channels=1)


def test_unknown_option_is_named() -> None:
    state, config = _repvgg_state()
    with pytest.raises(ReparamError, match=r"unknown option kernel;"):
        from_state_dict("RepVGGBlock", state, kernel=3, **config)


def test_missing_required_option() -> None:
    state, _ = _repvgg_state()
    with pytest.raises(ReparamError, match="missing required option kernel_size"):
        from_state_dict("RepVGGBlock", state, in_channels=4, out_channels=4)


def test_missing_unexpected_and_misshaped_keys_in_one_error() -> None:
    state, config = _repvgg_state()
    del state["rbr_1x1.bn.running_var"]
    state["rbr_dense.conv.weight"] = state["rbr_dense.conv.weight"][:, :, :2]
    state["se.down.weight"] = np.ones(3)
    with pytest.raises(ReparamError) as info:
        from_state_dict("RepVGGBlock", state, **config)
    message = str(info.value)
    assert "3 problems" in message, message
    assert "missing key rbr_1x1.bn.running_var" in message, message
    assert "shape mismatch: rbr_dense.conv.weight has shape (4, 4, 2, 3)" in message, message
    assert "unexpected key se.down.weight" in message, message


def test_non_finite_weights_name_the_tensor() -> None:
    state, config = _repvgg_state()
    state["rbr_1x1.conv.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ReparamError, match=r"rbr_1x1\.conv\.weight has 1 non-finite values"):
        from_state_dict("RepVGGBlock", state, **config)


def test_bad_batchnorm_values_name_the_tensor() -> None:
    state, config = _repvgg_state()
    state["rbr_identity.running_var"][2] = -1.0
    with pytest.raises(ReparamError, match=r"rbr_identity: BatchNorm: var must be >= 0"):
        from_state_dict("RepVGGBlock", state, **config)


def test_unsupported_options_say_why() -> None:
    state, config = _repvgg_state()
    with pytest.raises(ReparamError, match=r"use_se=True is not supported.*not linear"):
        from_state_dict("RepVGGBlock", state, use_se=True, **config)
    with pytest.raises(ReparamError, match="does not run; expected padding=1"):
        from_state_dict("MobileOneBlock", {}, in_channels=2, out_channels=2, kernel_size=3)


def test_eps_must_be_valid() -> None:
    state, config = _repvgg_state()
    with pytest.raises(ReparamError, match="eps must be a finite number"):
        from_state_dict("RepVGGBlock", state, eps=-1.0, **config)


def test_inputs_are_not_mutated() -> None:
    state, config = _repvgg_state()
    before = {k: v.copy() for k, v in state.items()}
    block = from_state_dict("RepVGGBlock", state, **config)
    x = _input(config, 0)
    x_before = x.copy()
    block(x)
    block.reparameterize()(x)
    for key, value in before.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    np.testing.assert_array_equal(x, x_before)


def test_deploy_state_uses_published_names() -> None:
    names = {
        "RepVGGBlock": "rbr_reparam", "DiverseBranchBlock": "dbb_reparam", "ACBlock": "fused_conv",
        "MobileOneBlock": "reparam_conv", "ReparamLargeKernelConv": "lkb_reparam",
        "QARepVGGBlock": "rbr_reparam", "QARepVGGBlockV2": "rbr_reparam",
    }  # fmt: skip
    for name, prefix in names.items():
        config = PUBLISHED_CONFIGS[name][0]
        block = from_state_dict(name, numpy_state(_torch_block(name, config, 0, 1e-5)), **config)
        assert set(block.deploy_state()) == {f"{prefix}.weight", f"{prefix}.bias"}, name


def test_reparam_families_is_reachable_from_the_top() -> None:
    assert reparam.families.from_state_dict is from_state_dict
    assert TOLERANCE[np.dtype(np.float64)] == 1e-10
