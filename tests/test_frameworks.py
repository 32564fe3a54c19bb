"""Framework conventions: BatchNorm constructors and layout converters.

The frameworks' own arrays (PyTorch state dicts, Keras weight lists, Flax
variable dicts) go in; nothing in reparam imports a framework.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import DTYPES, assert_close

import reparam
from reparam import BatchNorm, ReparamError


def _torch_bn(channels: int, seed: int) -> torch.nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=generator) * 2)
        bn.bias.copy_(torch.randn(channels, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    return bn.eval()


@given(channels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_from_torch_matches_batchnorm2d(channels: int, seed: int) -> None:
    module = _torch_bn(channels, seed)
    state = {f"block.bn.{key}": value for key, value in module.state_dict().items()}
    bn = BatchNorm.from_torch(state, "block.bn", eps=module.eps)
    x = torch.randn(2, channels, 3, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = module(x).numpy()
    actual = reparam.batch_norm(x, bn)
    assert actual.dtype == np.float32, f"float32 state dict gave {actual.dtype}"
    assert_close(actual, expected, dtype=np.float32, what="from_torch + batch_norm vs torch")


def test_from_torch_prefix_with_or_without_dot() -> None:
    state = {f"bn.{k}": v for k, v in _torch_bn(3, 0).state_dict().items()}
    with_dot = BatchNorm.from_torch(state, "bn.")
    without_dot = BatchNorm.from_torch(state, "bn")
    np.testing.assert_array_equal(with_dot.var, without_dot.var, err_msg="prefix with a dot")


def test_from_torch_missing_key_lists_it() -> None:
    state = {"bn.weight": np.ones(2), "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2)}
    with pytest.raises(ReparamError, match=r"from_torch: missing 'bn.running_var'"):
        BatchNorm.from_torch(state, "bn")


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_keras_list_and_mapping_agree(dtype: type) -> None:
    rng = np.random.default_rng(1)
    gamma, beta, mean = (rng.standard_normal(4).astype(dtype) for _ in range(3))
    var = rng.uniform(0.1, 2, 4).astype(dtype)
    from_list = BatchNorm.from_keras([gamma, beta, mean, var])
    mapping = {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var}
    from_mapping = BatchNorm.from_keras(mapping)
    assert from_list.eps == from_mapping.eps == 1e-3, "Keras' default epsilon is 1e-3"
    assert from_list.dtype == np.dtype(dtype), f"dtype changed to {from_list.dtype}"
    for field in ("gamma", "beta", "mean", "var"):
        np.testing.assert_array_equal(
            getattr(from_list, field), getattr(from_mapping, field), err_msg=field
        )


def test_from_keras_without_scale_or_center_uses_ones_and_zeros() -> None:
    bn = BatchNorm.from_keras({"moving_mean": np.zeros(3), "moving_variance": np.ones(3)})
    np.testing.assert_array_equal(bn.gamma, np.ones(3), err_msg="scale=False means gamma 1")
    np.testing.assert_array_equal(bn.beta, np.zeros(3), err_msg="center=False means beta 0")


def test_from_keras_wrong_list_length() -> None:
    with pytest.raises(ReparamError, match=r"from_keras: weights must be .*got 2 arrays"):
        BatchNorm.from_keras([np.ones(2), np.zeros(2)])


def test_from_flax_reads_params_and_batch_stats() -> None:
    params = {"scale": np.array([2.0, 3.0]), "bias": np.array([1.0, -1.0])}
    stats = {"mean": np.array([0.5, 0.0]), "var": np.array([4.0, 1.0])}
    bn = BatchNorm.from_flax(params, stats, epsilon=0.0)
    # by hand: 2 * (1 - 0.5) / 2 + 1 = 1.5 and 3 * (1 - 0) / 1 - 1 = 2
    actual = reparam.batch_norm(np.ones((1, 2, 1, 1)), bn)[0, :, 0, 0]
    np.testing.assert_array_equal(actual, [1.5, 2.0], err_msg="Flax BN by hand")
    assert BatchNorm.from_flax(params, stats).eps == 1e-5, "Flax's default epsilon is 1e-5"


def test_from_flax_missing_var() -> None:
    with pytest.raises(ReparamError, match=r"from_flax: missing 'var'"):
        BatchNorm.from_flax({}, {"mean": np.zeros(2)})


@given(shape=st.tuples(*(st.integers(1, 4) for _ in range(4))), seed=st.integers(0, 2**16))
def test_layout_round_trips_are_exact_copies(shape: tuple[int, ...], seed: int) -> None:
    array = np.random.default_rng(seed).standard_normal(shape)
    for forward, backward in (
        (reparam.oihw_to_hwio, reparam.hwio_to_oihw),
        (reparam.nchw_to_nhwc, reparam.nhwc_to_nchw),
    ):
        moved = forward(array)
        assert moved.flags.c_contiguous, f"{forward.__name__} result not contiguous"
        assert not np.shares_memory(moved, array), f"{forward.__name__} returned a view"
        np.testing.assert_array_equal(backward(moved), array, err_msg=forward.__name__)


def test_hwio_index_convention() -> None:
    oihw = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    hwio = reparam.oihw_to_hwio(oihw)
    assert hwio.shape == (4, 5, 3, 2), f"HWIO shape {hwio.shape}"
    assert hwio[1, 2, 0, 1] == oihw[1, 0, 1, 2], "HWIO[u, v, i, o] must be OIHW[o, i, u, v]"


@given(seed=st.integers(0, 2**16), groups=st.sampled_from([1, 2, 4]))
def test_conv_in_nhwc_hwio_through_converters(seed: int, groups: int) -> None:
    """A Keras-style conv (NHWC, HWIO) computed by converting at the edges equals torch's."""
    rng = np.random.default_rng(seed)
    x_nhwc = rng.standard_normal((2, 5, 6, 4))
    kernel_hwio = rng.standard_normal((3, 3, 4 // groups, 8))
    y_nhwc = reparam.nchw_to_nhwc(
        reparam.conv2d(
            reparam.nhwc_to_nchw(x_nhwc),
            reparam.hwio_to_oihw(kernel_hwio),
            padding=1,
            groups=groups,
        )
    )
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x_nhwc).permute(0, 3, 1, 2),
        torch.from_numpy(kernel_hwio).permute(3, 2, 0, 1),
        padding=1,
        groups=groups,
    ).permute(0, 2, 3, 1)
    assert_close(y_nhwc, expected.numpy(), dtype=np.float64, what="NHWC/HWIO conv")


def test_converters_reject_wrong_rank() -> None:
    with pytest.raises(ReparamError, match=r"hwio_to_oihw: kernel must be 4-D"):
        reparam.hwio_to_oihw(np.zeros((3, 3, 4)))
