"""Tier 3: other people's implementations (PyTorch, SciPy) as independent oracles."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import conv2d_loops, conv2d_scipy, conv_bn_magnitude, conv_magnitude
from strategies import BlockCase, ConvCase, block_cases, bn_stats, conv_cases
from tolerances import DTYPES, assert_close

from reparam import BatchNorm, batch_norm, conv2d, fuse_block, fuse_bn

torch = pytest.importorskip("torch")
functional = torch.nn.functional


def tensor(array: Any) -> Any:
    """A float64 torch tensor holding exactly the values of ``array`` (in its own memory)."""
    return None if array is None else torch.from_numpy(np.array(array, dtype=np.float64))


def torch_bn(x: Any, bn: BatchNorm) -> Any:
    """PyTorch's inference BatchNorm (running statistics) in float64."""
    return functional.batch_norm(
        x, tensor(bn.mean), tensor(bn.var), tensor(bn.gamma), tensor(bn.beta), False, 0.0, bn.eps
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases())
def test_conv2d_matches_torch(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    result = conv2d(x, kernel, bias, **kwargs)
    # torch in float64 on the same (rounded) inputs: the exact answer up to 1e-16
    expected = functional.conv2d(tensor(x), tensor(kernel), tensor(bias), **kwargs).numpy()
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(result, expected, dtype=dtype, scale=scale, what=f"conv2d vs torch {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases())
def test_conv2d_matches_scipy(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    result = conv2d(x, kernel, bias, **kwargs)
    expected = conv2d_scipy(x, kernel, bias, **kwargs)
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(result, expected, dtype=dtype, scale=scale, what=f"conv2d vs scipy {case}")


@given(case=conv_cases(max_batch=2))
def test_the_two_references_agree(case: ConvCase) -> None:
    x, kernel, bias = case.arrays(np.float64)
    kwargs = case.kwargs()
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(
        conv2d_scipy(x, kernel, bias, **kwargs),
        conv2d_loops(x, kernel, bias, **kwargs),
        dtype=np.float64,
        scale=scale,
        what="scipy reference vs loop reference",
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(channels=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fuse_bn_matches_torch_fusion(
    dtype: type, channels: int, seed: int, data: st.DataObject
) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    bn = data.draw(bn_stats(channels), label="bn").make(dtype)
    rng = np.random.default_rng(seed)
    kernel: npt.NDArray[Any] = rng.standard_normal((channels, 2, 3, 3)).astype(dtype)
    conv_bias: npt.NDArray[Any] = rng.standard_normal(channels).astype(dtype)
    fused_kernel, fused_bias = fuse_bn(kernel, bn, conv_bias=conv_bias)
    with torch.no_grad():
        torch_kernel, torch_bias = fuse_conv_bn_weights(
            tensor(kernel),
            tensor(conv_bias),
            tensor(bn.mean),
            tensor(bn.var),
            bn.eps,
            tensor(bn.gamma),
            tensor(bn.beta),
        )
    # the bias is beta + s * (c - mean): its terms are |beta| + |s| (|c| + |mean|)
    abs_terms = conv_bn_magnitude(np.zeros((channels, 1, 1)), bn, conv_bias)
    assert_close(fused_kernel, torch_kernel.numpy(), dtype=dtype, what="kernel vs torch fusion")
    assert_close(
        fused_bias, torch_bias.numpy(), dtype=dtype, scale=float(abs_terms.max()), what="bias"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1, max_batch=2), data=st.data())
def test_batch_norm_matches_torch(dtype: type, case: ConvCase, data: st.DataObject) -> None:
    x, _kernel, _bias = case.arrays(dtype)
    bn = data.draw(bn_stats(case.in_channels), label="bn").make(dtype)
    expected = torch_bn(tensor(x), bn).numpy()
    scale = float(np.max(conv_bn_magnitude(np.abs(x.astype(np.float64)), bn)))
    assert_close(batch_norm(x, bn), expected, dtype=dtype, scale=scale, what="batch_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=block_cases())
def test_fused_block_matches_torch_train_block(dtype: type, case: BlockCase) -> None:
    x, dense_kernel, pointwise_kernel = case.arrays(dtype)
    dense_bn = case.dense_bn.make(dtype)
    size, groups, stride = case.dense_size, case.groups, case.stride
    # the train form, entirely in PyTorch (float64)
    tx = tensor(x)
    conv = functional.conv2d(
        tx, tensor(dense_kernel), stride=stride, padding=size // 2, groups=groups
    )
    train = torch_bn(conv, dense_bn)
    magnitude = conv_bn_magnitude(
        conv2d_scipy(
            np.abs(x), np.abs(dense_kernel), stride=stride, padding=size // 2, groups=groups
        ),
        dense_bn,
    )
    pointwise = None
    if pointwise_kernel is not None and case.pointwise_bn is not None:
        pointwise_bn = case.pointwise_bn.make(dtype)
        pointwise = (pointwise_kernel, pointwise_bn)
        padding = size // 2 - (size - pointwise_kernel.shape[-1]) // 2
        conv = functional.conv2d(
            tx, tensor(pointwise_kernel), stride=stride, padding=padding, groups=groups
        )
        train = train + torch_bn(conv, pointwise_bn)
        abs_conv = conv2d_scipy(
            np.abs(x), np.abs(pointwise_kernel), stride=stride, padding=padding, groups=groups
        )
        magnitude = magnitude + conv_bn_magnitude(abs_conv, pointwise_bn)
    identity = None if case.identity_bn is None else case.identity_bn.make(dtype)
    if identity is not None:
        train = train + torch_bn(tx, identity)
        magnitude = magnitude + conv_bn_magnitude(np.abs(x.astype(np.float64)), identity)
    kernel, bias = fuse_block((dense_kernel, dense_bn), pointwise, identity, groups=groups)
    deploy = conv2d(x, kernel, bias, stride=stride, padding=size // 2, groups=groups)
    scale = float(np.max(magnitude))
    assert_close(deploy, train.numpy(), dtype=dtype, scale=scale, what=f"deploy vs torch {case}")
