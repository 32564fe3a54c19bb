"""fuse_bn, sum_branches and fuse_block: folded forms compute what the train forms do."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import bn_scale, conv2d_scipy, conv_bn_magnitude, conv_magnitude
from strategies import BlockCase, ConvCase, block_cases, bn_stats, conv_cases, random_array, seeds
from tolerances import DTYPES, assert_close

from reparam import (
    BatchNorm,
    ConvBias,
    batch_norm,
    conv2d,
    fuse_block,
    fuse_bn,
    identity_kernel,
    pad_kernel,
    sum_branches,
)

# ------------------------------------------------------------ tier 1: by pencil


def test_hand_fold_of_scalars() -> None:
    # s = 2 / sqrt(4) = 1: kernel 3 * 1 = 3, bias 1 + 1 * (0.5 - 3) = -1.5
    bn = BatchNorm(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]), eps=0.0)
    kernel, bias = fuse_bn(np.full((1, 1, 1, 1), 3.0), bn, conv_bias=np.array([0.5]))
    assert kernel.item() == 3.0, f"kernel times gamma / sqrt(var + eps); got {kernel.item()}"
    assert bias.item() == -1.5, f"beta + s * (conv_bias - mean); got {bias.item()}"
    # s = -3 / sqrt(8 + 1) = -1: kernel [[1, -2]] -> [[-1, 2]], bias 0 - (-1) * 5 = 5
    bn = BatchNorm(np.array([-3.0]), np.array([0.0]), np.array([5.0]), np.array([8.0]), eps=1.0)
    kernel, bias = fuse_bn(np.array([[[[1.0, -2.0]]]]), bn)
    np.testing.assert_array_equal(kernel, [[[[-1.0, 2.0]]]], err_msg="negative gamma flips")
    np.testing.assert_array_equal(bias, [5.0], err_msg="bias -s * mean")


def test_hand_block_fold() -> None:
    unit = BatchNorm(np.ones(1), np.zeros(1), np.zeros(1), np.ones(1), eps=0.0)
    double = BatchNorm(np.full(1, 2.0), np.full(1, 1.0), np.zeros(1), np.ones(1), eps=0.0)
    dense = np.arange(9.0).reshape(1, 1, 3, 3)
    kernel, bias = fuse_block((dense, unit), (np.full((1, 1, 1, 1), 10.0), double), unit)
    expected = dense.copy()
    expected[0, 0, 1, 1] += 2.0 * 10.0 + 1.0  # 4 + 20 (pointwise, doubled) + 1 (identity)
    np.testing.assert_array_equal(kernel, expected, err_msg="centre collects 1x1 and identity")
    np.testing.assert_array_equal(bias, [1.0], err_msg="only the doubled BN has a beta")


def test_hand_sum_branches() -> None:
    first = (np.full((2, 1, 3, 3), 1.0), np.array([1.0, 2.0]))
    second = ConvBias(np.full((2, 1, 3, 3), 0.5), np.array([-1.0, 0.25]))
    kernel, bias = sum_branches(first, second)
    np.testing.assert_array_equal(kernel, np.full((2, 1, 3, 3), 1.5), err_msg="kernels add")
    np.testing.assert_array_equal(bias, [0.0, 2.25], err_msg="biases add")


# ---------------------------------------------------------------------- fuse_bn


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1), data=st.data())
def test_fuse_bn_matches_conv_then_batch_norm(
    dtype: type, case: ConvCase, data: st.DataObject
) -> None:
    x, kernel, conv_bias = case.arrays(dtype)
    bn = data.draw(bn_stats(case.out_channels), label="bn").make(dtype)
    kwargs = case.kwargs()
    fused_kernel, fused_bias = fuse_bn(kernel, bn, conv_bias=conv_bias)
    assert fused_kernel.dtype == fused_bias.dtype == np.dtype(dtype), "fuse_bn keeps the dtype"
    deploy = conv2d(x, fused_kernel, fused_bias, **kwargs)
    train = batch_norm(conv2d(x, kernel, conv_bias, **kwargs), bn)
    abs_conv = conv2d_scipy(np.abs(x), np.abs(kernel), **kwargs)
    scale = float(np.max(conv_bn_magnitude(abs_conv, bn, conv_bias)))
    assert_close(deploy, train, dtype=dtype, scale=scale, what=f"fuse_bn {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(max_batch=1), data=st.data())
def test_fuse_bn_is_the_formula(dtype: type, case: ConvCase, data: st.DataObject) -> None:
    _x, kernel, conv_bias = case.arrays(dtype)
    stats = data.draw(bn_stats(case.out_channels), label="bn")
    fused_kernel, fused_bias = fuse_bn(kernel, stats.make(dtype), conv_bias=conv_bias)
    bn = stats.make(dtype)
    for o in range(case.out_channels):
        s = float(bn.gamma[o]) / float(np.sqrt(float(bn.var[o]) + bn.eps))
        c = 0.0 if conv_bias is None else float(conv_bias[o])
        bias = float(bn.beta[o]) + s * (c - float(bn.mean[o]))
        bias_scale = abs(float(bn.beta[o])) + abs(s) * (abs(c) + abs(float(bn.mean[o])))
        assert_close(fused_kernel[o], kernel[o].astype(np.float64) * s, dtype=dtype, what="W s")
        assert_close(fused_bias[o], bias, dtype=dtype, scale=bias_scale, what="beta + s (c - m)")


# ------------------------------------------------------------------ sum_branches


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1), count=st.integers(1, 4), seed=seeds)
def test_sum_branches_is_the_sum_of_convs(
    dtype: type, case: ConvCase, count: int, seed: int
) -> None:
    x, _kernel, _bias = case.arrays(dtype)
    rng = np.random.default_rng(seed)
    branches = [
        (
            random_array(rng, case.kernel_shape, dtype),
            random_array(rng, (case.out_channels,), dtype),
        )
        for _ in range(count)
    ]
    kwargs = case.kwargs()
    kernel, bias = sum_branches(*branches)
    assert kernel.dtype == bias.dtype == np.dtype(dtype), "sum_branches keeps the dtype"
    fused = conv2d(x, kernel, bias, **kwargs)
    separate = sum(conv2d(x, k, b, **kwargs) for k, b in branches)
    scale = sum(conv_magnitude(x, k, b, **kwargs) for k, b in branches)
    assert_close(fused, separate, dtype=dtype, scale=scale, what=f"{count} branches")


# -------------------------------------------------------------------- fuse_block


def train_block(
    x: npt.NDArray[Any],
    dense: tuple[npt.NDArray[Any], BatchNorm],
    pointwise: tuple[npt.NDArray[Any], BatchNorm] | None,
    identity: BatchNorm | None,
    *,
    stride: int,
    groups: int,
) -> npt.NDArray[Any]:
    """The train-form RepVGG block (without the ReLU): one term per branch, summed."""
    size = dense[0].shape[-1]
    padding = size // 2
    y = batch_norm(conv2d(x, dense[0], stride=stride, padding=padding, groups=groups), dense[1])
    if pointwise is not None:
        small = pointwise[0].shape[-1]
        small_padding = padding - (size - small) // 2
        conv = conv2d(x, pointwise[0], stride=stride, padding=small_padding, groups=groups)
        y = y + batch_norm(conv, pointwise[1])
    if identity is not None:
        y = y + batch_norm(x, identity)
    return y


def block_magnitude(
    x: npt.NDArray[Any],
    dense: tuple[npt.NDArray[Any], BatchNorm],
    pointwise: tuple[npt.NDArray[Any], BatchNorm] | None,
    identity: BatchNorm | None,
    *,
    stride: int,
    groups: int,
) -> float:
    """``max`` over outputs of the summed absolute values of every term of the block."""
    abs_x = np.abs(x.astype(np.float64))
    size = dense[0].shape[-1]
    kwargs = {"stride": stride, "groups": groups}
    total = conv_bn_magnitude(
        conv2d_scipy(abs_x, np.abs(dense[0]), padding=size // 2, **kwargs), dense[1]
    )
    if pointwise is not None:
        padding = size // 2 - (size - pointwise[0].shape[-1]) // 2
        abs_conv = conv2d_scipy(abs_x, np.abs(pointwise[0]), padding=padding, **kwargs)
        total = total + conv_bn_magnitude(abs_conv, pointwise[1])
    if identity is not None:
        total = total + conv_bn_magnitude(abs_x, identity)
    return float(np.max(total, initial=0.0))


def block_parts(
    case: BlockCase, dtype: npt.DTypeLike
) -> tuple[
    npt.NDArray[Any],
    tuple[npt.NDArray[Any], BatchNorm],
    tuple[npt.NDArray[Any], BatchNorm] | None,
    BatchNorm | None,
]:
    """``(x, dense, pointwise, identity)`` of a drawn block in ``dtype``."""
    x, dense_kernel, pointwise_kernel = case.arrays(dtype)
    dense = (dense_kernel, case.dense_bn.make(dtype))
    pointwise = None
    if pointwise_kernel is not None and case.pointwise_bn is not None:
        pointwise = (pointwise_kernel, case.pointwise_bn.make(dtype))
    identity = None if case.identity_bn is None else case.identity_bn.make(dtype)
    return x, dense, pointwise, identity


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=block_cases())
def test_fused_block_equals_train_form(dtype: type, case: BlockCase) -> None:
    x, dense, pointwise, identity = block_parts(case, dtype)
    kernel, bias = fuse_block(dense, pointwise, identity, groups=case.groups)
    assert kernel.dtype == bias.dtype == np.dtype(dtype), f"fuse_block keeps {dtype}"
    assert kernel.shape == dense[0].shape, f"fused kernel shape {kernel.shape}"
    size = dense[0].shape[-1]
    deploy = conv2d(x, kernel, bias, stride=case.stride, padding=size // 2, groups=case.groups)
    train = train_block(x, dense, pointwise, identity, stride=case.stride, groups=case.groups)
    scale = block_magnitude(x, dense, pointwise, identity, stride=case.stride, groups=case.groups)
    assert_close(deploy, train, dtype=dtype, scale=scale, what=f"train vs deploy {case}")


@given(case=block_cases(max_batch=1))
def test_fuse_block_dense_only_is_fuse_bn(case: BlockCase) -> None:
    _x, dense, _pointwise, _identity = block_parts(case, np.float64)
    kernel, bias = fuse_block(dense, groups=case.groups)
    expected_kernel, expected_bias = fuse_bn(*dense)
    np.testing.assert_array_equal(kernel, expected_kernel, err_msg="one branch: just the fold")
    np.testing.assert_array_equal(bias, expected_bias, err_msg="one branch: just the fold")


# float16 statistics must stay representable: var >= 1e-2, |gamma| <= 10
float16_bn = functools.partial(bn_stats, max_gamma=10.0, min_log_var=-2.0, max_log_var=2.0)


@given(case=block_cases(max_batch=1, bn=float16_bn))
def test_float16_block_is_float64_fusion_rounded_once(case: BlockCase) -> None:
    _x, dense, pointwise, identity = block_parts(case, np.float16)
    kernel, bias = fuse_block(dense, pointwise, identity, groups=case.groups)
    assert kernel.dtype == bias.dtype == np.float16, f"float16 stays float16; {kernel.dtype}"

    def widen(pair: tuple[Any, BatchNorm] | None) -> tuple[Any, BatchNorm] | None:
        return None if pair is None else (pair[0].astype(np.float64), pair[1].astype(np.float64))

    wide_dense = widen(dense)
    assert wide_dense is not None, "the dense branch always exists"
    wide = fuse_block(
        wide_dense,
        widen(pointwise),
        None if identity is None else identity.astype(np.float64),
        groups=case.groups,
    )
    # the float16 fusion is the float64 one on the same values, rounded once: bit for bit
    for got, exact, name in zip((kernel, bias), wide, ("kernel", "bias"), strict=True):
        np.testing.assert_array_equal(
            got, exact.astype(np.float16), err_msg=f"float16 {name} is not float64 rounded once"
        )


def test_float16_identity_block_stays_float16() -> None:
    # a known failure elsewhere: the identity kernel built in float32 upcasts the block
    ones = np.ones(4, dtype=np.float16)
    bn = BatchNorm(ones, ones, ones, ones)
    kernel, bias = fuse_block((np.zeros((4, 2, 3, 3), dtype=np.float16), bn), identity=bn, groups=2)
    assert kernel.dtype == bias.dtype == np.float16, f"got {kernel.dtype}, {bias.dtype}"


# ------------------------------------------------- dtypes, mutation, array-likes


def _bn(channels: int, dtype: npt.DTypeLike, eps: Any = 1e-5) -> BatchNorm:
    rng = np.random.default_rng(channels)
    stats = [rng.standard_normal(channels) for _ in range(3)] + [rng.uniform(0.5, 2, channels)]
    gamma, beta, mean, var = (a.astype(dtype) for a in stats)
    return BatchNorm(gamma, beta, mean, var, eps=eps)


@pytest.mark.parametrize("eps", [1e-5, np.float64(1e-5), np.float32(1e-3), 0])
def test_float32_stays_float32_whatever_the_eps(eps: Any) -> None:
    bn = _bn(4, np.float32, eps=eps)
    kernel = np.ones((4, 2, 3, 3), dtype=np.float32)
    x = np.ones((1, 4, 5, 5), dtype=np.float32)
    results = {
        "fuse_bn": fuse_bn(kernel, bn, conv_bias=np.ones(4, dtype=np.float32)),
        "fuse_block": fuse_block((kernel, bn), (kernel[:, :, :1, :1].copy(), bn), bn, groups=2),
        "sum_branches": sum_branches((kernel, np.ones(4, dtype=np.float32))),
        "conv2d": (conv2d(x, kernel, np.ones(4, dtype=np.float32), groups=2),),
        "batch_norm": (batch_norm(x, bn),),
        "pad_kernel": (pad_kernel(kernel, 5),),
        "identity_kernel": (identity_kernel(4, groups=2, dtype=bn.dtype),),
    }
    for name, arrays in results.items():
        for array in arrays:
            assert array.dtype == np.float32, f"{name} with eps {eps!r} returned {array.dtype}"


def test_inputs_untouched_and_outputs_fresh() -> None:
    rng = np.random.default_rng(7)
    kernel = rng.standard_normal((4, 2, 3, 3))
    pointwise = rng.standard_normal((4, 2, 1, 1))
    bias = rng.standard_normal(4)
    bn = _bn(4, np.float64)
    inputs = {"kernel": kernel, "pointwise": pointwise, "bias": bias, **vars(bn)}
    inputs.pop("eps")
    before = {name: np.array(value, copy=True) for name, value in inputs.items()}
    outputs = {
        "fuse_bn": fuse_bn(kernel, bn, conv_bias=bias),
        "sum_branches": sum_branches((kernel, bias)),
        "fuse_block": fuse_block((kernel, bn), (pointwise, bn), bn, groups=2),
    }
    for name, value in inputs.items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was mutated")
    for function, pair in outputs.items():
        for output in pair:
            for name, value in inputs.items():
                assert not np.shares_memory(output, value), f"{function} output shares {name}"
            assert output.flags.writeable, f"{function} returns writeable arrays"


def test_array_likes_go_in() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((2, 1, 3, 3))
    small = rng.standard_normal((2, 1, 1, 1))
    bn = _bn(2, np.float64)
    expected = fuse_block((kernel, bn), (small, bn), groups=2)
    from_lists = fuse_block((kernel.tolist(), bn), (small.tolist(), bn), groups=2)
    tensor = torch.from_numpy(kernel)
    from_torch = fuse_block((tensor, bn), (torch.from_numpy(small), bn), groups=2)
    for got, label in ((from_lists, "lists"), (from_torch, "torch")):
        np.testing.assert_array_equal(got.kernel, expected.kernel, err_msg=f"{label} kernel")
        np.testing.assert_array_equal(got.bias, expected.bias, err_msg=f"{label} bias")
    folded = fuse_bn(tensor, bn, conv_bias=[0.0, 1.0])
    np.testing.assert_array_equal(
        folded.kernel, fuse_bn(kernel, bn).kernel, err_msg="fuse_bn takes a tensor"
    )
    summed = sum_branches(
        (kernel.tolist(), [1.0, 2.0]), (tensor, torch.ones(2, dtype=torch.float64))
    )
    np.testing.assert_array_equal(summed.bias, [2.0, 3.0], err_msg="sum_branches takes lists")
    assert isinstance(summed.kernel, np.ndarray), f"returns NumPy; got {type(summed.kernel)}"


def test_conv_bias_scale_uses_bn_scale() -> None:
    bn = _bn(3, np.float64)
    kernel = np.ones((3, 1, 1, 1))
    folded_kernel, _ = fuse_bn(kernel, bn)
    np.testing.assert_allclose(
        folded_kernel[:, 0, 0, 0], bn_scale(bn), rtol=1e-15, err_msg="1x1 ones give the scale"
    )
