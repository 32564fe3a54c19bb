"""Tests of the strategies themselves: every drawn case is valid, and the awkward ones occur."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from strategies import (
    MAX_SIDE,
    BlockCase,
    BNStats,
    ConvCase,
    block_cases,
    bn_stats,
    conv_cases,
)

from reparam import conv2d, fuse_block

T = TypeVar("T")


@given(case=conv_cases())
def test_conv_cases_are_valid(case: ConvCase) -> None:
    assert case.in_channels % case.groups == 0, f"groups divide C_in: {case}"
    assert case.out_channels % case.groups == 0, f"groups divide C_out: {case}"
    assert max(case.height, case.width) <= MAX_SIDE, f"small images only: {case}"
    for axis, side in enumerate((case.height, case.width)):
        span = case.dilation[axis] * (case.kernel_size[axis] - 1) + 1
        padded = side + 2 * case.padding[axis]
        assert span <= padded, f"the dilated kernel fits the padded input on axis {axis}: {case}"
    x, kernel, bias = case.arrays(np.float64)
    assert x.shape == case.x_shape and kernel.shape == case.kernel_shape, f"{case}"
    assert bias is None or bias.shape == (case.out_channels,), f"bias shape {case}"
    result = conv2d(x, kernel, bias, **case.kwargs())  # accepted: no ReparamError
    assert result.shape == case.output_shape, f"{result.shape} != {case.output_shape}"


@given(case=conv_cases())
def test_conv_case_data_is_reproducible(case: ConvCase) -> None:
    first, second = case.arrays(np.float32), case.arrays(np.float32)
    for a, b in zip(first, second, strict=True):
        if a is not None and b is not None:
            np.testing.assert_array_equal(a, b, err_msg="the seed fixes the data")
    x = first[0]
    assert x.dtype == np.float32, f"arrays(dtype) honours the dtype; got {x.dtype}"


@given(stats=st.integers(1, 9).flatmap(bn_stats))
def test_bn_stats_are_valid(stats: BNStats) -> None:
    channels = len(stats.gamma)
    for name in ("beta", "mean", "var"):
        assert len(getattr(stats, name)) == channels, f"{name} has {channels} values: {stats}"
    assert all(abs(g) <= 100.0 for g in stats.gamma), f"|gamma| <= 100: {stats.gamma}"
    assert all(v >= 0.0 for v in stats.var), f"variances are non-negative: {stats.var}"
    assert stats.eps in (1e-5, 1e-3, 0.0), f"eps from the common defaults: {stats.eps}"
    if stats.eps == 0.0:
        assert min(stats.var) >= 1e-8, f"eps 0 only with positive var: {stats}"
    for dtype in (np.float32, np.float64):
        bn = stats.make(dtype)  # accepted: no ReparamError
        assert bn.channels == channels, f"{bn!r} from {stats}"


@given(case=block_cases())
def test_block_cases_are_valid(case: BlockCase) -> None:
    if case.identity_bn is not None:
        assert case.stride == 1, f"identity only at stride 1: {case}"
        assert case.in_channels == case.out_channels, f"identity only when C_in == C_out: {case}"
    assert (case.pointwise_bn is None) == (case.pointwise_size is None), f"{case}"
    assert case.pointwise_size is None or case.pointwise_size <= case.dense_size, f"{case}"
    assert case.dense_size in (3, 5), f"dense 3x3 or 5x5: {case}"
    x, dense, pointwise = case.arrays(np.float64)
    kernel, bias = fuse_block(
        (dense, case.dense_bn.make()),
        None if pointwise is None else (pointwise, case.pointwise_bn.make()),  # type: ignore[union-attr]
        None if case.identity_bn is None else case.identity_bn.make(),
        groups=case.groups,
    )
    y = conv2d(
        x, kernel, bias, stride=case.stride, padding=case.dense_size // 2, groups=case.groups
    )
    expected_sides = tuple((side - 1) // case.stride + 1 for side in (case.height, case.width))
    assert y.shape == (case.batch, case.out_channels, *expected_sides), f"{y.shape} for {case}"


def _finds(strategy: st.SearchStrategy[T], condition: Callable[[T], bool]) -> T:
    return find(
        strategy,
        condition,
        settings=settings(
            max_examples=2000,
            database=None,
            derandomize=True,  # deterministic, so a coverage gap cannot flake
            phases=[Phase.generate],  # the first hit is enough: no shrinking
            suppress_health_check=list(HealthCheck),
        ),
    )


CONV_COVERAGE: dict[str, Callable[[ConvCase], bool]] = {
    "batch 0": lambda c: c.batch == 0,
    "batch 1": lambda c: c.batch == 1,
    "depthwise": lambda c: c.groups > 1 and c.in_per_group == 1,
    "grouped, several channels per group": lambda c: c.groups > 1 and c.in_per_group > 1,
    "stride 3": lambda c: 3 in c.stride,
    "unequal strides": lambda c: c.stride[0] != c.stride[1],
    "dilation 2": lambda c: 2 in c.dilation,
    "even kernel": lambda c: c.kernel_size[0] % 2 == 0,
    "non-square kernel": lambda c: c.kernel_size[0] != c.kernel_size[1],
    "non-square image": lambda c: c.height != c.width,
    "padding 2": lambda c: 2 in c.padding,
    "kernel as large as the padded input": lambda c: (
        c.dilation[0] * (c.kernel_size[0] - 1) + 1 == c.height + 2 * c.padding[0]
    ),
    "bias": lambda c: c.with_bias,
}


@pytest.mark.parametrize("name", CONV_COVERAGE)
def test_conv_cases_reach(name: str) -> None:
    found = _finds(conv_cases(), CONV_COVERAGE[name])
    assert CONV_COVERAGE[name](found), f"find() returned a case without {name}"


BN_COVERAGE: dict[str, Callable[[BNStats], bool]] = {
    "negative gamma": lambda s: min(s.gamma) < 0,
    "|gamma| of 100": lambda s: max(abs(g) for g in s.gamma) == 100.0,
    "zero gamma": lambda s: 0.0 in s.gamma,
    "tiny var": lambda s: min(s.var) < 1e-6 and s.eps == 0.0,
    "large var": lambda s: max(s.var) > 100.0,
    "zero var": lambda s: 0.0 in s.var,
    "Keras eps": lambda s: s.eps == 1e-3,
}


@pytest.mark.parametrize("name", BN_COVERAGE)
def test_bn_stats_reach(name: str) -> None:
    found = _finds(st.integers(1, 4).flatmap(bn_stats), BN_COVERAGE[name])
    assert BN_COVERAGE[name](found), f"find() returned stats without {name}"


BLOCK_COVERAGE: dict[str, Callable[[BlockCase], bool]] = {
    "identity": lambda b: b.identity_bn is not None,
    "all three branches, grouped": lambda b: (
        b.identity_bn is not None and b.pointwise_size is not None and b.groups > 1
    ),
    "stride 2 with pointwise": lambda b: b.stride == 2 and b.pointwise_size is not None,
    "dense 5 with pointwise 3": lambda b: b.dense_size == 5 and b.pointwise_size == 3,
    "dense 5 with pointwise 1": lambda b: b.dense_size == 5 and b.pointwise_size == 1,
    "dense only": lambda b: b.pointwise_size is None and b.identity_bn is None,
    "C_in != C_out": lambda b: b.in_channels != b.out_channels,
}


@pytest.mark.parametrize("name", BLOCK_COVERAGE)
def test_block_cases_reach(name: str) -> None:
    found: Any = _finds(block_cases(), BLOCK_COVERAGE[name])
    assert BLOCK_COVERAGE[name](found), f"find() returned a block without {name}"
