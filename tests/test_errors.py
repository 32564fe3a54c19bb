"""Every malformed input raises ReparamError, and the message names what is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reparam import (
    BatchNorm,
    ReparamError,
    batch_norm,
    conv2d,
    fuse_block,
    fuse_bn,
    identity_kernel,
    pad_kernel,
    sum_branches,
)


def bn(channels: int, **overrides: Any) -> BatchNorm:
    """A valid BatchNorm with some fields replaced."""
    fields: dict[str, Any] = {
        "gamma": np.ones(channels),
        "beta": np.zeros(channels),
        "mean": np.zeros(channels),
        "var": np.ones(channels),
        "eps": 1e-5,
    }
    fields.update(overrides)
    return BatchNorm(**fields)


K3 = np.ones((4, 2, 3, 3))  # C_out 4, C_in // groups 2
K1 = np.ones((4, 2, 1, 1))
X = np.ones((1, 2, 5, 5))


def test_reparam_error_is_a_value_error() -> None:
    assert issubclass(ReparamError, ValueError), "except ValueError must keep working"
    with pytest.raises(ValueError, match="conv2d"):
        conv2d(np.ones((2, 5, 5)), K3)


# Each case: (call, regex the message must match). The regex names the function and the
# argument, and usually the offending value.
CASES: dict[str, tuple[Callable[[], object], str]] = {
    # wrong rank
    "conv2d x rank": (
        lambda: conv2d(np.ones((2, 5, 5)), K3),
        r"conv2d: x must be 4-D.*\(2, 5, 5\)",
    ),
    "conv2d kernel rank": (lambda: conv2d(X, np.ones((4, 2, 3))), r"conv2d: kernel must be 4-D"),
    "fuse_bn kernel rank": (
        lambda: fuse_bn(np.ones((4, 2)), bn(4)),
        r"fuse_bn: kernel must be 4-D",
    ),
    "pad_kernel rank": (lambda: pad_kernel(np.ones((3, 3)), 5), r"pad_kernel: kernel must be 4-D"),
    "BatchNorm rank": (
        lambda: bn(2, gamma=np.ones((2, 1))),
        r"BatchNorm: gamma must be 1-D; got shape \(2, 1\)",
    ),
    "batch_norm rank": (
        lambda: batch_norm(np.ones(3), bn(3)),
        r"batch_norm: x must have a channel",
    ),
    "sum_branches bias rank": (
        lambda: sum_branches((K3, np.ones((4, 1)))),
        r"sum_branches: branch 0 bias must be 1-D",
    ),
    "fuse_block dense rank": (
        lambda: fuse_block((np.ones((4, 2, 3)), bn(4))),
        r"fuse_block: dense kernel must be 4-D",
    ),
    "fuse_block pointwise rank": (
        lambda: fuse_block((K3, bn(4)), (np.ones((4, 2, 1)), bn(4))),
        r"fuse_block: pointwise kernel must be 4-D",
    ),
    # dense kernel shape
    "dense even": (
        lambda: fuse_block((np.ones((4, 2, 2, 2)), bn(4))),
        r"fuse_block: dense kernel must be square with an odd size; got spatial size 2x2",
    ),
    "dense non-square": (
        lambda: fuse_block((np.ones((4, 2, 3, 1)), bn(4))),
        r"fuse_block: dense kernel must be square.*3x1",
    ),
    "pointwise even": (
        lambda: fuse_block((K3, bn(4)), (np.ones((4, 2, 2, 2)), bn(4))),
        r"fuse_block: pointwise kernel must have odd sizes.*2x2",
    ),
    # BatchNorm length vs channels
    "fuse_bn bn channels": (
        lambda: fuse_bn(K3, bn(3)),
        r"fuse_bn: bn has 3 channels; got 3, expected 4",
    ),
    "fuse_block dense bn channels": (
        lambda: fuse_block((K3, bn(5))),
        r"fuse_block: dense BatchNorm has 5 channels.*expected 4",
    ),
    "fuse_block pointwise bn channels": (
        lambda: fuse_block((K3, bn(4)), (K1, bn(2))),
        r"fuse_block: pointwise BatchNorm has 2 channels.*expected 4",
    ),
    "fuse_block identity bn channels": (
        lambda: fuse_block((np.ones((4, 4, 3, 3)), bn(4)), identity=bn(3)),
        r"fuse_block: identity BatchNorm has 3 channels.*expected 4",
    ),
    "batch_norm channels": (
        lambda: batch_norm(X, bn(3)),
        r"batch_norm: bn has 3 channels but x has 2",
    ),
    "fuse_bn not a BatchNorm": (
        lambda: fuse_bn(K3, (np.ones(4),) * 4),  # type: ignore[arg-type]
        r"fuse_bn: bn must be a reparam\.BatchNorm; got tuple",
    ),
    "batch_norm not a BatchNorm": (
        lambda: batch_norm(X, None),  # type: ignore[arg-type]
        r"batch_norm: bn must be a reparam\.BatchNorm; got NoneType",
    ),
    # BatchNorm values
    "negative var": (
        lambda: bn(3, var=np.array([1.0, -0.5, 1.0])),
        r"BatchNorm: var must be >= 0.*-0\.5 at channel 1",
    ),
    "var + eps zero": (
        lambda: bn(2, var=np.array([1.0, 0.0]), eps=0.0),
        r"BatchNorm: var \+ eps must be > 0; got var=0\.0 and eps=0\.0 at channel 1",
    ),
    "nan gamma": (
        lambda: bn(2, gamma=np.array([1.0, np.nan])),
        r"BatchNorm: gamma must be finite; got nan at channel 1",
    ),
    "inf beta": (
        lambda: bn(2, beta=np.array([np.inf, 1.0])),
        r"BatchNorm: beta must be finite; got inf at channel 0",
    ),
    "-inf mean": (lambda: bn(2, mean=np.array([0.0, -np.inf])), r"BatchNorm: mean must be finite"),
    "inf var": (lambda: bn(2, var=np.array([np.inf, 1.0])), r"BatchNorm: var must be finite"),
    "unequal lengths": (
        lambda: bn(3, mean=np.zeros(2)),
        r"BatchNorm: gamma, beta, mean and var must have one length.*mean=2",
    ),
    "negative eps": (lambda: bn(2, eps=-1e-5), r"BatchNorm: eps must be finite and >= 0"),
    "nan eps": (lambda: bn(2, eps=float("nan")), r"BatchNorm: eps must be finite"),
    "string eps": (lambda: bn(2, eps="1e-5"), r"BatchNorm: eps must be a real number"),
    "bool eps": (lambda: bn(2, eps=True), r"BatchNorm: eps must be a real number"),
    # groups
    "conv2d groups vs C_in": (
        lambda: conv2d(np.ones((1, 4, 5, 5)), np.ones((3, 1, 3, 3)), groups=3),
        r"conv2d: groups=3 does not divide C_in \(x\.shape\[1\]\)=4",
    ),
    "conv2d groups vs C_out": (
        lambda: conv2d(np.ones((1, 4, 5, 5)), np.ones((3, 2, 3, 3)), groups=2),
        r"conv2d: groups=2 does not divide C_out \(kernel\.shape\[0\]\)=3",
    ),
    "conv2d groups zero": (lambda: conv2d(X, K3, groups=0), r"conv2d: groups must be >= 1"),
    "conv2d groups float": (
        lambda: conv2d(X, K3, groups=1.0),  # type: ignore[arg-type]
        r"conv2d: groups must be an integer",
    ),
    "identity_kernel groups": (
        lambda: identity_kernel(6, groups=4),
        r"identity_kernel: groups=4 does not divide channels=6",
    ),
    "fuse_block groups": (
        lambda: fuse_block((np.ones((3, 1, 3, 3)), bn(3)), groups=2),
        r"fuse_block: groups=2 does not divide C_out=3",
    ),
    # branches that disagree
    "identity in != out": (
        lambda: fuse_block((K3, bn(4)), identity=bn(4)),
        r"fuse_block: an identity branch needs C_in == C_out; got C_in=2",
    ),
    "identity in != out grouped": (
        lambda: fuse_block((K3, bn(4)), identity=bn(4), groups=4),
        r"fuse_block: an identity branch needs C_in == C_out; got C_in=8",
    ),
    "pointwise larger": (
        lambda: fuse_block((K3, bn(4)), (np.ones((4, 2, 5, 5)), bn(4))),
        r"fuse_block: pointwise kernel is larger than the dense kernel; got 5x5",
    ),
    "pointwise (out, in) mismatch": (
        lambda: fuse_block((K3, bn(4)), (np.ones((4, 1, 1, 1)), bn(4))),
        r"fuse_block: pointwise kernel must share \(C_out, C_in // groups\).*\(4, 1\)",
    ),
    "dense not a pair": (
        lambda: fuse_block(K3),  # type: ignore[arg-type]
        r"fuse_block: dense must be a pair \(kernel, BatchNorm\)",
    ),
    "sum_branches shapes": (
        lambda: sum_branches((K3, np.zeros(4)), (np.ones((4, 1, 3, 3)), np.zeros(4))),
        r"sum_branches: branch kernels must have one shape; got branch 0 \(4, 2, 3, 3\) "
        r"and branch 1 \(4, 1, 3, 3\)",
    ),
    "sum_branches 1x1 beside 3x3": (
        lambda: sum_branches((K3, np.zeros(4)), (K1, np.zeros(4))),
        r"sum_branches: branch kernels must have one shape.*pad_kernel\(kernel, \(3, 3\)\)",
    ),
    "sum_branches none": (lambda: sum_branches(), r"sum_branches: no branches given"),
    "sum_branches not a pair": (
        lambda: sum_branches(K3),  # type: ignore[arg-type]
        r"sum_branches: branch 0 must be a pair \(kernel, bias\)",
    ),
    # conv2d geometry
    "conv2d channel mismatch": (
        lambda: conv2d(np.ones((1, 4, 5, 5)), K3),
        r"conv2d: x has 4 channels but the kernel expects C_in // groups = 2",
    ),
    "stride zero": (lambda: conv2d(X, K3, stride=0), r"conv2d: stride must be >= 1; got 0"),
    "stride pair": (lambda: conv2d(X, K3, stride=(1, 0)), r"conv2d: stride must be >= 1"),
    "stride float": (
        lambda: conv2d(X, K3, stride=1.5),  # type: ignore[arg-type]
        r"conv2d: stride must be an int or a pair of ints; got 1\.5",
    ),
    "stride triple": (
        lambda: conv2d(X, K3, stride=(1, 1, 1)),  # type: ignore[arg-type]
        r"conv2d: stride must be an int or a pair",
    ),
    "dilation zero": (lambda: conv2d(X, K3, dilation=0), r"conv2d: dilation must be >= 1"),
    # a negative padding crops (ACNet's branches need it); a crop that leaves too little is refused
    "padding malformed": (
        lambda: conv2d(X, K3, padding=(1, 2, 3)),
        r"conv2d: padding must be an int, a pair \(ph, pw\) or \(\(top, bottom\)",
    ),
    "crop too deep": (
        lambda: conv2d(X, K3, padding=-2),
        r"conv2d: kernel is larger than the padded input",
    ),
    "kernel too large": (
        lambda: conv2d(np.ones((1, 2, 2, 5)), K3),
        r"conv2d: kernel is larger than the padded input.*3x3.*2x5",
    ),
    "dilated kernel too large": (
        lambda: conv2d(X, K3, dilation=3),
        r"conv2d: kernel is larger than the padded input; got a kernel spanning 7x7",
    ),
    "conv2d bias length": (
        lambda: conv2d(X, K3, np.zeros(3)),
        r"conv2d: bias has the wrong length; got 3, expected 4",
    ),
    "conv2d bias rank": (lambda: conv2d(X, K3, np.zeros((4, 1))), r"conv2d: bias must be 1-D"),
    "fuse_bn conv_bias length": (
        lambda: fuse_bn(K3, bn(4), conv_bias=np.zeros(5)),
        r"fuse_bn: conv_bias has the wrong length; got 5, expected 4",
    ),
    "sum_branches bias length": (
        lambda: sum_branches((K3, np.zeros(4)), (K3, np.zeros(2))),
        r"sum_branches: branch 1 bias has the wrong length; got 2, expected 4",
    ),
    # pad_kernel and identity_kernel sizes
    "pad_kernel too small": (
        lambda: pad_kernel(K3, 1),
        r"pad_kernel: size is smaller than the kernel; got kernel height 3 and size 1",
    ),
    "pad_kernel parity": (
        lambda: pad_kernel(K1, 2),
        r"pad_kernel: cannot centre a kernel of height 1 in 2",
    ),
    "pad_kernel width parity": (
        lambda: pad_kernel(K1, (3, 4)),
        r"pad_kernel: cannot centre a kernel of width 1 in 4",
    ),
    "pad_kernel size zero": (lambda: pad_kernel(K1, 0), r"pad_kernel: size must be >= 1"),
    "identity even size": (
        lambda: identity_kernel(4, size=2),
        r"identity_kernel: size must be odd.*got 2",
    ),
    "identity channels zero": (
        lambda: identity_kernel(0),
        r"identity_kernel: channels must be >= 1",
    ),
    "identity integer dtype": (
        lambda: identity_kernel(4, dtype=np.int32),
        r"identity_kernel: dtype must be floating; got int32",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_input_raises_with_a_message(case: str) -> None:
    call, pattern = CASES[case]
    with pytest.raises(ReparamError, match=pattern):
        call()


NON_FLOAT = [np.int64, np.int32, np.bool_, np.complex128, np.uint8]

# Each entry puts a non-floating array into one argument; the message names that argument.
DTYPE_CASES: dict[str, tuple[Callable[[Any], object], str]] = {
    "conv2d x": (lambda t: conv2d(X.astype(t), K3), r"conv2d: x must have a floating dtype"),
    "conv2d kernel": (
        lambda t: conv2d(X, K3.astype(t)),
        r"conv2d: kernel must have a floating dtype",
    ),
    "conv2d bias": (
        lambda t: conv2d(X, K3, np.zeros(4, dtype=t)),
        r"conv2d: bias must have a floating dtype",
    ),
    "fuse_bn kernel": (
        lambda t: fuse_bn(K3.astype(t), bn(4)),
        r"fuse_bn: kernel must have a floating dtype",
    ),
    "fuse_bn conv_bias": (
        lambda t: fuse_bn(K3, bn(4), conv_bias=np.zeros(4, dtype=t)),
        r"fuse_bn: conv_bias must have a floating dtype",
    ),
    "BatchNorm var": (
        lambda t: bn(2, var=np.ones(2, dtype=t)),
        r"BatchNorm: var must have a floating dtype",
    ),
    "BatchNorm gamma": (
        lambda t: bn(2, gamma=np.ones(2, dtype=t)),
        r"BatchNorm: gamma must have a floating dtype",
    ),
    "batch_norm x": (
        lambda t: batch_norm(X.astype(t), bn(2)),
        r"batch_norm: x must have a floating dtype",
    ),
    "pad_kernel kernel": (
        lambda t: pad_kernel(K1.astype(t), 3),
        r"pad_kernel: kernel must have a floating dtype",
    ),
    "sum_branches kernel": (
        lambda t: sum_branches((K3.astype(t), np.zeros(4))),
        r"sum_branches: branch 0 kernel must have a floating dtype",
    ),
    "fuse_block dense": (
        lambda t: fuse_block((K3.astype(t), bn(4))),
        r"fuse_block: dense kernel must have a floating dtype",
    ),
    "fuse_block pointwise": (
        lambda t: fuse_block((K3, bn(4)), (K1.astype(t), bn(4))),
        r"fuse_block: pointwise kernel must have a floating dtype",
    ),
}


@pytest.mark.parametrize("dtype", NON_FLOAT, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", DTYPE_CASES)
def test_non_floating_dtype_raises(case: str, dtype: type) -> None:
    call, pattern = DTYPE_CASES[case]
    with pytest.raises(ReparamError, match=pattern + re.escape(f"; got {np.dtype(dtype)}")):
        call(dtype)


def test_tensor_needing_detach_gets_a_hint() -> None:
    torch = pytest.importorskip("torch")
    weights = torch.ones(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ReparamError, match=r"conv2d: kernel cannot be converted.*detach\(\)"):
        conv2d(X, weights)


@given(
    groups=st.integers(2, 5),
    channels=st.integers(1, 12),
)
def test_any_non_divisor_groups_is_rejected(groups: int, channels: int) -> None:
    per_group = max(1, channels // groups)
    kernel = np.ones((groups * per_group, per_group, 1, 1))
    x = np.ones((1, channels, 2, 2))
    if channels % groups == 0:
        result = conv2d(x, kernel, groups=groups)
        assert result.shape == (1, groups * per_group, 2, 2), f"divisor accepted: {result.shape}"
    else:
        with pytest.raises(ReparamError, match=rf"conv2d: groups={groups} does not divide C_in"):
            conv2d(x, kernel, groups=groups)


@given(size=st.integers(1, 5), extra=st.integers(-3, 4))
def test_pad_kernel_accepts_exactly_centrable_sizes(size: int, extra: int) -> None:
    kernel = np.ones((1, 1, size, size))
    target = size + extra
    if target < 1:
        with pytest.raises(ReparamError, match="pad_kernel: size must be >= 1"):
            pad_kernel(kernel, target)
    elif extra < 0:
        with pytest.raises(ReparamError, match="pad_kernel: size is smaller than the kernel"):
            pad_kernel(kernel, target)
    elif extra % 2:
        with pytest.raises(ReparamError, match="pad_kernel: cannot centre"):
            pad_kernel(kernel, target)
    else:
        padded = pad_kernel(kernel, target)
        assert padded.shape == (1, 1, target, target), f"padded to {padded.shape}"


def test_errors_are_located_once_by_the_innermost_node() -> None:
    """evaluate names the node that failed, once, and says so in ``location`` (no text parsing)."""
    from reparam.core.algebra import Conv, Parallel, Sequential, evaluate

    tree = Sequential(Parallel(Conv(np.ones((2, 3, 3, 3)), name="inner"), name="sum"), name="outer")
    with pytest.raises(ReparamError) as info:
        evaluate(tree, np.ones((1, 3, 1, 1)))  # a 3x3 window on a 1x1 image without padding
    assert info.value.location == "in Conv 'inner'", info.value.location
    assert str(info.value).startswith("in Conv 'inner': "), str(info.value)
    assert "'sum'" not in str(info.value) and "'outer'" not in str(info.value), str(info.value)
    again = info.value.located("stage0")
    assert str(again) == f"stage0: {info.value}" and again.location == "stage0"
