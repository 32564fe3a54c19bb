"""Checks of the torch train forms in ``torch_families`` (the oracle for ``reparam.families``).

Three kinds of check, none of which uses reparam:

* layout: each module's state-dict keys, in order, equal the published layout written
  separately in ``PUBLISHED_KEYS``;
* fold law: each train form, evaluated on probe inputs, is exactly one k x k convolution with
  bias (stride and padding of the deploy conv). The kernel is measured from the module's
  responses to unit impulses, the bias from its response to zeros, which must be spatially
  uniform (this fails if, e.g., DBB's BNAndPad padded with zeros). Then the module must equal
  ``F.conv2d`` with that kernel on random non-square inputs, borders included, and the kernel
  must be zero outside its groups;
* helpers: ``randomize_`` is deterministic and in range, ``numpy_state`` keeps the layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_families import (
    EXTRA_CONFIGS,
    FAMILY_CLASSES,
    PUBLISHED_CONFIGS,
    PUBLISHED_KEYS,
    BNAndPadLayer,
    IdentityBasedConv1x1,
    block_forward,
    geometry,
    numpy_state,
    randomize_,
    set_bn_eps_,
)

CASES = [
    pytest.param(name, kwargs, id=f"{name}-{i}{'x' if extra else ''}")
    for extra, table in ((False, PUBLISHED_CONFIGS), (True, EXTRA_CONFIGS))
    for name, configs in table.items()
    for i, kwargs in enumerate(configs)
]

# float64 train form vs the measured conv: both are sums of O(1) terms
RTOL64, ATOL64 = 1e-12, 1e-12


def _build(name: str, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    return randomize_(FAMILY_CLASSES[name](**kwargs).double(), seed)


def _geometry(name: str, kwargs: dict[str, Any]) -> tuple[int, int, int, int]:
    """``(C_in, C_out, span, stride)``: a dilated kernel measured as its undilated span."""
    shape = geometry(name, kwargs)
    span = shape.dilation * (shape.kernel_size - 1) + 1
    return shape.in_channels, shape.out_channels, span, shape.stride


@torch.no_grad()
def measure_conv(
    module: nn.Module, cin: int, k: int, stride: int, padding: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel (dense over input channels) and bias of the conv ``module`` equals, by probing.

    For a conv, a unit impulse at input (r, q) of channel c moves output (y, x) by
    ``kernel[:, c, r + padding - stride * y, q + padding - stride * x]``; ``stride ** 2``
    impulse phases per channel reach every kernel tap.
    """
    size = 2 * k + 2 * stride + 1
    zero = torch.zeros(1, cin, size, size, dtype=torch.float64)
    base = block_forward(module, zero)
    bias = base[0, :, 0, 0].clone()
    np.testing.assert_allclose(
        base.numpy(),
        np.broadcast_to(bias.numpy()[None, :, None, None], base.shape),
        rtol=RTOL64,
        atol=ATOL64,
        err_msg="response to zeros is not spatially uniform: the padding is not BN-consistent",
    )
    phases = [(c, a, b) for c in range(cin) for a in range(stride) for b in range(stride)]
    probes = torch.zeros(len(phases), cin, size, size, dtype=torch.float64)
    for n, (c, a, b) in enumerate(phases):
        probes[n, c, k + a, k + b] = 1.0
    response = block_forward(module, probes) - base
    kernel = torch.full((base.shape[1], cin, k, k), float("nan"), dtype=torch.float64)
    for n, (c, a, b) in enumerate(phases):
        for dy in range((k + a + padding) % stride, k, stride):
            y = (k + a + padding - dy) // stride
            for dx in range((k + b + padding) % stride, k, stride):
                x = (k + b + padding - dx) // stride
                kernel[:, c, dy, dx] = response[n, :, y, x]
    assert not kernel.isnan().any(), "probe missed kernel taps"
    return kernel, bias


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_keys_are_the_published_layout(name: str, kwargs: dict[str, Any]) -> None:
    module = FAMILY_CLASSES[name](**kwargs)
    expected = PUBLISHED_KEYS[name](**kwargs)
    assert list(module.state_dict()) == expected, f"{name}({kwargs}) key layout"


@torch.no_grad()
def measure_linear(module: nn.Module, cin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the fully connected layer ``module`` equals, on (N, C_in) features."""
    bias = module(torch.zeros(1, cin, dtype=torch.float64))[0]
    weight = (module(torch.eye(cin, dtype=torch.float64)) - bias).T
    return weight[:, :, None, None], bias


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_train_form_is_one_conv(name: str, kwargs: dict[str, Any]) -> None:
    cin, cout, k, stride = _geometry(name, kwargs)
    shape = geometry(name, kwargs)
    groups, padding = shape.groups, shape.padding
    module = _build(name, kwargs)
    if shape.features:
        kernel, bias = measure_linear(module, cin)
    else:
        kernel, bias = measure_conv(module, cin, k, stride, padding)

    in_group = torch.arange(cin) // (cin // groups)
    out_group = torch.arange(cout) // (cout // groups)
    outside = out_group[:, None] != in_group[None, :]
    assert torch.all(kernel[outside] == 0), f"{name}({kwargs}): kernel leaks across groups"
    taps = kernel[:, :, :: shape.dilation, :: shape.dilation]  # a dilated kernel's own taps
    assert torch.all(taps != 0, dim=(2, 3))[~outside].any(), "probe measured an empty kernel"

    size = () if shape.features else (11, 8)
    x = torch.randn(2, cin, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = block_forward(module, x)
    if shape.features:
        expected = F.linear(x, kernel[:, :, 0, 0], bias)
    else:
        expected = F.conv2d(x, kernel, bias, stride=stride, padding=padding)
    assert actual.shape == expected.shape, f"{name}({kwargs}): output shape"
    np.testing.assert_allclose(
        actual.numpy(),
        expected.numpy(),
        rtol=RTOL64,
        atol=ATOL64,
        err_msg=f"{name}({kwargs}) differs from its measured single conv",
    )


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_float32_copy_agrees(name: str, kwargs: dict[str, Any]) -> None:
    cin, _, _, _ = _geometry(name, kwargs)
    module64 = _build(name, kwargs, seed=3)
    module32 = randomize_(FAMILY_CLASSES[name](**kwargs), 3)
    size = () if geometry(name, kwargs).features else (9, 12)
    x = torch.randn(1, cin, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out64 = block_forward(module64, x)
        out32 = block_forward(module32, x.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), out64.numpy(), rtol=1e-4, atol=1e-5)


def test_randomize_is_deterministic_and_in_range() -> None:
    kwargs = PUBLISHED_CONFIGS["DiverseBranchBlock"][1]
    first = numpy_state(randomize_(FAMILY_CLASSES["DiverseBranchBlock"](**kwargs), 7))
    again = numpy_state(randomize_(FAMILY_CLASSES["DiverseBranchBlock"](**kwargs), 7))
    other = numpy_state(randomize_(FAMILY_CLASSES["DiverseBranchBlock"](**kwargs), 8))
    for key, value in first.items():
        np.testing.assert_array_equal(value, again[key], err_msg=f"{key} differs for one seed")
        if key.endswith("num_batches_tracked"):
            continue
        assert not np.array_equal(value, other[key]), f"{key} equal for two seeds"
        if key.endswith(".running_var"):
            assert value.min() >= 0.5 and value.max() <= 2.0, f"{key} out of [0.5, 2]"
        if key.endswith("bn.weight") or key.endswith("avgbn.weight"):
            assert value.min() >= 0.5 and value.max() <= 1.5, f"{key} out of [0.5, 1.5]"


def test_randomize_sets_eval_mode() -> None:
    module = FAMILY_CLASSES["RepVGGBlock"](4, 4, 3, padding=1).train()
    assert not randomize_(module, 0).training
    assert not any(m.training for m in module.modules())


def test_numpy_state_dtypes() -> None:
    module = randomize_(FAMILY_CLASSES["MobileOneBlock"](4, 4, 3, padding=1, groups=4), 0)
    state = numpy_state(module, dtype=np.float32)
    assert list(state) == list(module.state_dict())
    for key, value in state.items():
        expected = np.int64 if key.endswith("num_batches_tracked") else np.float32
        assert value.dtype == expected, f"{key}: {value.dtype}"
    assert state["rbr_skip.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(
        numpy_state(module)["rbr_conv.0.conv.weight"],
        module.rbr_conv[0].conv.weight.detach().double().numpy(),
    )


def test_bn_and_pad_fills_the_border_with_bn_of_zero() -> None:
    layer = randomize_(BNAndPadLayer(2, 3).double(), 0)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        at_zero = layer.bn(torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    assert out.shape == (1, 3, 8, 9)
    border = torch.ones(8, 9, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    np.testing.assert_allclose(
        out[0][:, border].numpy(),
        at_zero[0, :, 0, :].expand(3, int(border.sum())).numpy(),
        rtol=1e-15,
        atol=1e-15,
    )
    np.testing.assert_array_equal(out[:, :, 2:-2, 2:-2].numpy(), layer.bn(x).detach().numpy())


def test_identity_based_conv_adds_an_unstored_identity() -> None:
    conv = IdentityBasedConv1x1(4, groups=2).double()
    assert list(conv.state_dict()) == ["weight"]
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_array_equal(conv(x).numpy(), x.numpy())  # weight starts at zero
        conv.weight.fill_(0.5)
        expected = F.conv2d(x, torch.full((4, 2, 1, 1), 0.5, dtype=torch.float64), groups=2) + x
        np.testing.assert_allclose(conv(x).numpy(), expected.numpy(), rtol=1e-15, atol=1e-15)


def test_dbb_depthwise_internal_width_defaults_to_twice_the_input() -> None:
    module = FAMILY_CLASSES["DiverseBranchBlock"](4, 4, 3, padding=1, groups=4)
    state = module.state_dict()
    assert state["dbb_1x1_kxk.conv1.weight"].shape == (8, 1, 1, 1)
    assert state["dbb_1x1_kxk.conv2.weight"].shape == (4, 2, 3, 3)
    assert "dbb_1x1.conv.weight" not in state


def test_bn_eps_changes_the_output() -> None:
    kwargs = PUBLISHED_CONFIGS["QARepVGGBlockV2"][0]
    module = _build("QARepVGGBlockV2", kwargs)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = module(x)
        after = set_bn_eps_(module, 1e-3)(x)
    assert module.bn.eps == 1e-3 and module.rbr_dense.bn.eps == 1e-3
    assert not torch.allclose(before, after, rtol=1e-6, atol=0), "eps had no effect"


@pytest.mark.parametrize(
    ("name", "kwargs", "error"),
    [
        ("RepVGGBlock", {"kernel_size": 3, "padding": 1, "use_se": True}, NotImplementedError),
        ("RepVGGBlock", {"kernel_size": 3, "padding": 1, "deploy": True}, NotImplementedError),
        ("RepVGGBlock", {"kernel_size": 3}, ValueError),  # published default padding=0
        ("MobileOneBlock", {"kernel_size": 3, "padding": 1, "use_se": True}, NotImplementedError),
        ("MobileOneBlock", {"kernel_size": 3, "padding": 0}, ValueError),
        ("DiverseBranchBlock", {"kernel_size": 3, "padding": 0}, ValueError),
        ("DiverseBranchBlock", {"kernel_size": 3, "padding": 1, "dilation": 2}, ValueError),
        ("ACBlock", {"kernel_size": 3, "padding": 1, "dilation": 2}, ValueError),
        ("QARepVGGBlock", {"padding": 2}, ValueError),
        (
            "ReparamLargeKernelConv",
            {"kernel_size": 5, "stride": 1, "groups": 1, "small_kernel": 7},
            ValueError,
        ),
        (
            "ReparamLargeKernelConv",
            {
                "kernel_size": 5,
                "stride": 1,
                "groups": 1,
                "small_kernel": 3,
                "small_kernel_merged": True,
            },
            NotImplementedError,
        ),
    ],
)
def test_unsupported_configurations_raise(
    name: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        FAMILY_CLASSES[name](4, 4, **kwargs)
