"""The branch algebra (reparam.core.algebra), law by law.

Tier 1, by pencil: each law of ``fold`` on a hand-sized example with exact
values (integer weights, so every sum is exact in float64): sequential
composition per group, strides multiplying, BN-valued padding, the average
pool as a kernel, asymmetric crops, the post-sum BN, the BN's eps, and the
refusals, each with the phrase that says why. Tier 2, properties: random
trees fold to one conv that computes what the train form computes (float32 and
float64, relative to the tree's magnitude), float32 folds are the float64 fold
rounded once, the counts and output sizes agree with evaluation, and
``conv2d``'s per-side padding, crops and pad values and ``avg_pool2d`` agree
with nested loops (and PyTorch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import random_array, seeds
from strategies_algebra import TreeCase, cast_tree, tree_cases
from tolerances import DTYPES, TOLERANCE, assert_close

from reparam import BatchNorm, ReparamError
from reparam.core.algebra import (
    AvgPool,
    Conv,
    FoldedConv,
    Identity,
    Node,
    Norm,
    Pad,
    Parallel,
    ReLU,
    Sequential,
    evaluate,
    fold,
    magnitude,
    multiply_adds,
    num_parameters,
    output_size,
)
from reparam.core.conv import avg_pool2d, conv2d

Array = npt.NDArray[np.float64]
Pads = tuple[tuple[int, int], tuple[int, int]]


# ------------------------------------------------------------------ references


def conv2d_pads_loops(
    x: npt.ArrayLike,
    kernel: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: tuple[int, int] = (1, 1),
    pads: Pads = ((0, 0), (0, 0)),
    groups: int = 1,
    pad_value: npt.ArrayLike | None = None,
) -> Array:
    """``tests/reference.py``'s loop conv, with per-side padding, crops and a pad value.

    ``y[n, o, i, j] = b[o] + sum_{c, u, v} x~[n, g*Cg + c, i*sh + u - top, j*sw + v - left]
    * W[o, c, u, v]`` where ``x~`` is ``x`` inside the image and the pad value
    of its channel outside (zero by default). A negative ``top`` or ``left``
    only shifts the read; the output size is
    ``(H + top + bottom - kH) // sh + 1``.
    """
    xs: list[Any] = np.asarray(x, dtype=np.float64).tolist()
    w_array = np.asarray(kernel, dtype=np.float64)
    ws: list[Any] = w_array.tolist()
    n_batch, c_in, height, width = np.shape(x)
    c_out, c_per_group, k_h, k_w = w_array.shape
    o_per_group = c_out // groups
    (top, bottom), (left, right) = pads
    s_h, s_w = stride
    out_h = (height + top + bottom - k_h) // s_h + 1
    out_w = (width + left + right - k_w) // s_w + 1
    bs = [0.0] * c_out if bias is None else np.asarray(bias, dtype=np.float64).tolist()
    values = [0.0] * c_in if pad_value is None else np.asarray(pad_value, np.float64).tolist()
    y = np.zeros((n_batch, c_out, out_h, out_w), dtype=np.float64)
    for n in range(n_batch):
        for o in range(c_out):
            group = o // o_per_group
            for i in range(out_h):
                for j in range(out_w):
                    total = bs[o]
                    for c in range(c_per_group):
                        channel = group * c_per_group + c
                        for u in range(k_h):
                            row = i * s_h + u - top
                            for v in range(k_w):
                                col = j * s_w + v - left
                                inside = 0 <= row < height and 0 <= col < width
                                pixel = xs[n][channel][row][col] if inside else values[channel]
                                total += pixel * ws[o][c][u][v]
                    y[n, o, i, j] = total
    return y


def avg_pool2d_loops(
    x: npt.ArrayLike,
    size: tuple[int, int],
    *,
    stride: tuple[int, int],
    pads: Pads,
    count_include_pad: bool,
) -> Array:
    """Mean of each window: over all ``kH kW`` taps, or over the real pixels only."""
    xs: list[Any] = np.asarray(x, dtype=np.float64).tolist()
    n_batch, channels, height, width = np.shape(x)
    (top, bottom), (left, right) = pads
    out_h = (height + top + bottom - size[0]) // stride[0] + 1
    out_w = (width + left + right - size[1]) // stride[1] + 1
    y = np.zeros((n_batch, channels, out_h, out_w))
    for n in range(n_batch):
        for c in range(channels):
            for i in range(out_h):
                for j in range(out_w):
                    total, count = 0.0, 0
                    for u in range(size[0]):
                        for v in range(size[1]):
                            row, col = i * stride[0] + u - top, j * stride[1] + v - left
                            if 0 <= row < height and 0 <= col < width:
                                total += xs[n][c][row][col]
                                count += 1
                    y[n, c, i, j] = total / (size[0] * size[1] if count_include_pad else count)
    return y


def dense_kernel(kernel: npt.ArrayLike, groups: int) -> Array:
    """A grouped kernel written out as the ``groups=1`` kernel (zeros between groups)."""
    w = np.asarray(kernel, dtype=np.float64)
    c_out, per_group = w.shape[:2]
    dense = np.zeros((c_out, per_group * groups, *w.shape[2:]))
    for o in range(c_out):
        group = o // (c_out // groups)
        for c in range(per_group):
            dense[o, group * per_group + c] = w[o, c]
    return dense


def integer_array(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Small non-zero integers as float64: every sum of their products is exact."""
    values = rng.integers(1, 4, size=shape) * rng.choice([-1, 1], size=shape)
    return values.astype(np.float64)


def unit_bn(
    channels: int, *, gamma: float = 1.0, beta: float = 0.0, mean: float = 0.0
) -> BatchNorm:
    """A BatchNorm with var 1 and eps 0: scale ``gamma``, output at zero ``beta - mean gamma``."""
    ones = np.ones(channels)
    return BatchNorm(gamma * ones, beta * ones, mean * ones, ones, eps=0.0)


def refusal(tree: Node) -> str:
    """The message ``fold`` refuses ``tree`` with (the test fails if it folds)."""
    with pytest.raises(ReparamError) as info:
        fold(tree)
    return str(info.value)


def assert_folds(tree: Node, x: npt.NDArray[Any], *, dtype: npt.DTypeLike, what: str) -> None:
    """``fold(tree)(x) == evaluate(tree, x)`` relative to the tree's magnitude."""
    folded = fold(tree)
    scale = float(np.max(magnitude(tree, x), initial=0.0))
    assert_close(folded(x), evaluate(tree, x), dtype=dtype, scale=scale, what=what)


# ---------------------------------------------------- tier 1: sequential per group


def composed_by_loops(first: Conv, second: Conv) -> tuple[Array, Array, tuple[int, int]]:
    """The dense kernel, bias and stride of ``second`` after ``first``, by the definition.

    ``K[o, i, s1 v + u] = sum_m W2[o, m, v] W1[m, i, u]`` over dense (``groups=1``)
    kernels, ``b = b2 + sum_{m, v} W2[o, m, v] b1[m]``, strides multiply.
    """
    w1, w2 = dense_kernel(first.kernel, first.groups), dense_kernel(second.kernel, second.groups)
    b1 = np.zeros(w1.shape[0]) if first.bias is None else first.bias
    b2 = np.zeros(w2.shape[0]) if second.bias is None else second.bias
    (a_h, a_w), (c_h, c_w) = w1.shape[2:], w2.shape[2:]
    s_h, s_w = first.stride
    kernel = np.zeros((w2.shape[0], w1.shape[1], a_h + s_h * (c_h - 1), a_w + s_w * (c_w - 1)))
    bias = np.array(b2, dtype=np.float64)
    for o in range(w2.shape[0]):
        for m in range(w1.shape[0]):
            for y in range(c_h):
                for x in range(c_w):
                    bias[o] += w2[o, m, y, x] * b1[m]
                    for i in range(w1.shape[1]):
                        for u in range(a_h):
                            for v in range(a_w):
                                kernel[o, i, s_h * y + u, s_w * x + v] += (
                                    w2[o, m, y, x] * w1[m, i, u, v]
                                )
    stride = (s_h * second.stride[0], s_w * second.stride[1])
    return kernel, bias, stride


@pytest.mark.parametrize(
    ("first_groups", "second_groups", "expected_groups"),
    [(4, 2, 2), (2, 4, 2), (4, 4, 4), (1, 4, 1)],
)
def test_sequential_1x1_then_kxk_per_group_is_the_loop_composition(
    first_groups: int, second_groups: int, expected_groups: int
) -> None:
    rng = np.random.default_rng(11)
    cin, mid, cout = 8, 8, 4
    first = Conv(
        integer_array(rng, (mid, cin // first_groups, 1, 1)),
        integer_array(rng, (mid,)),
        groups=first_groups,
    )
    second = Conv(
        integer_array(rng, (cout, mid // second_groups, 3, 5)),
        integer_array(rng, (cout,)),
        groups=second_groups,
        stride=(2, 1),
        padding=((0, -1), (0, 0)),
    )
    folded = fold(Sequential(first, second))
    kernel, bias, stride = composed_by_loops(first, second)
    assert folded.groups == expected_groups, (
        f"groups {first_groups} then {second_groups} compose at gcd {expected_groups}; "
        f"got {folded.groups}"
    )
    np.testing.assert_array_equal(
        dense_kernel(folded.kernel, folded.groups), kernel, err_msg="W = sum_m W2 W1 per group"
    )
    np.testing.assert_array_equal(folded.bias, bias, err_msg="b = b2 + sum_{m,v} W2 b1")
    assert folded.stride == stride == (2, 1), f"the stride is the kxk's; got {folded.stride}"
    assert folded.pads == ((0, -1), (0, 0)), f"the crop moves in front; got {folded.pads}"
    x = integer_array(rng, (2, cin, 7, 6))
    np.testing.assert_array_equal(
        folded(x), evaluate(Sequential(first, second), x), err_msg="integers: exact"
    )


def test_sequential_strided_first_dilates_the_second_and_strides_multiply() -> None:
    rng = np.random.default_rng(12)
    first = Conv(
        integer_array(rng, (6, 2, 3, 2)),
        integer_array(rng, (6,)),
        stride=(2, 3),
        padding=((1, 0), (2, 1)),
        groups=2,
    )
    second = Conv(
        integer_array(rng, (3, 2, 2, 3)),
        integer_array(rng, (3,)),
        stride=(1, 2),
        padding=((-1, 0), (0, -1)),
        groups=3,
    )
    folded = fold(Sequential(first, second))
    kernel, bias, stride = composed_by_loops(first, second)
    assert kernel.shape[2:] == (3 + 2 * 1, 2 + 3 * 2), f"k1 + s1 (k2 - 1) taps; {kernel.shape}"
    np.testing.assert_array_equal(
        dense_kernel(folded.kernel, folded.groups), kernel, err_msg="taps at s1 v + u"
    )
    np.testing.assert_array_equal(folded.bias, bias, err_msg="b = b2 + sum W2 b1")
    assert folded.stride == stride == (2, 6), f"strides multiply; got {folded.stride}"
    # a crop of c after stride s1 is a crop of s1 c in front: top 1 - 2, right 1 - 3
    assert folded.pads == ((-1, 0), (2, -2)), f"crops scale by the stride; got {folded.pads}"
    x = integer_array(rng, (1, 4, 9, 15))
    np.testing.assert_array_equal(folded(x), evaluate(Sequential(first, second), x), err_msg="x")


# ------------------------------------------------------- tier 1: padding value


def dbb_branch(value: npt.ArrayLike | None) -> Sequential:
    """1x1 conv (weight 2) -> BN (scale 1.5, output at zero -1) -> Pad(1, value) -> 3x3 ones."""
    bn = BatchNorm(np.array([3.0]), np.array([0.5]), np.array([1.0]), np.array([4.0]), eps=0.0)
    return Sequential(
        Conv(np.full((1, 1, 1, 1), 2.0)),
        Norm(bn),
        Pad(1, value),
        Conv(np.ones((1, 1, 3, 3))),
    )


def test_bn_valued_padding_moves_to_the_input() -> None:
    assert dbb_branch(None).steps[1].bn.output_at_zero().item() == -1.0, "0.5 - 1 * 1.5"
    folded = fold(dbb_branch([-1.0]))
    np.testing.assert_array_equal(folded.kernel, np.full((1, 1, 3, 3), 3.0), err_msg="2 * 1.5")
    np.testing.assert_array_equal(folded.bias, [-9.0], err_msg="9 taps of the border value -1")
    assert folded.pads == ((1, 1), (1, 1)), f"the Pad moves to the input; got {folded.pads}"
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(folded(x), evaluate(dbb_branch([-1.0]), x), err_msg="exact")


def test_bn_valued_padding_must_be_the_output_at_zero() -> None:
    message = refusal(dbb_branch([-1.0 + 1e-3]))
    assert "output at zero input is -1" in message, message
    message = refusal(dbb_branch([1.0]))  # a sign error in the pad value
    assert "output at zero input is -1" in message, message


def test_zero_padding_after_norm_is_refused_and_wrong_on_the_border_ring_only() -> None:
    # DBB's issue #9: zero padding after a BN whose output at zero input is not zero
    rng = np.random.default_rng(9)
    mid = 3
    w1 = rng.standard_normal((mid, 2, 1, 1))
    bn = BatchNorm(
        rng.uniform(0.5, 2.0, mid), np.array([1.0, -2.0, 0.5]), rng.standard_normal(mid),
        rng.uniform(0.5, 2.0, mid),
    )  # fmt: skip
    w2 = rng.uniform(0.5, 1.5, (2, mid, 3, 3))
    tree = Sequential(Conv(w1), Norm(bn), Pad(1), Conv(w2))
    message = refusal(tree)
    assert "pads with zeros after" in message and "output at zero input is" in message, message
    # the fold as if zero padding were right: the border value bn0 moved to the input
    bn0 = bn.output_at_zero()
    assert np.all(bn0 != 0), f"the example needs a non-zero border value; {bn0}"
    as_if = fold(Sequential(Conv(w1), Norm(bn), Pad(1, bn0), Conv(w2)))
    x = rng.standard_normal((1, 2, 5, 6))
    difference = evaluate(tree, x) - as_if(x)
    scale = float(np.max(magnitude(tree, x)))
    assert_close(difference[:, :, 1:-1, 1:-1], np.zeros((1, 2, 3, 4)), dtype=np.float64,
                 scale=scale, what="inside the ring the zero pad is never read")  # fmt: skip
    # on the ring: minus the taps of W2 that read the border, times bn0 (computed by hand)
    ring = np.zeros((1, mid, 7, 8))
    ring[:, :, [0, -1], :] = 1.0
    ring[:, :, :, [0, -1]] = 1.0
    expected = -conv2d_pads_loops(ring * bn0[None, :, None, None], w2)
    assert_close(difference, expected, dtype=np.float64, scale=scale, what="the border error")
    ring_mask = np.ones((5, 6), dtype=bool)
    ring_mask[1:-1, 1:-1] = False
    assert np.all(np.abs(expected[..., ring_mask]) > 1e-3 * scale), "every ring pixel differs"


def test_pad_holding_the_1x1_conv_bias_moves_to_the_input() -> None:
    bias = np.array([2.0, -1.0])
    tree = Sequential(
        Conv(np.ones((2, 1, 1, 1)), bias, groups=2),
        Pad(((1, 0), (0, 2)), bias),
        Conv(np.ones((1, 2, 2, 2))),
    )
    folded = fold(tree)
    np.testing.assert_array_equal(folded.kernel, np.ones((1, 2, 2, 2)), err_msg="1x1 ones")
    np.testing.assert_array_equal(folded.bias, [4.0 * (2.0 - 1.0)], err_msg="4 taps of bias")
    assert folded.pads == ((1, 0), (0, 2)), f"asymmetric Pad moves as is; {folded.pads}"
    x = np.arange(12.0).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="exact")


# ------------------------------------------------------- tier 1: average pool


def test_avg_pool_is_one_over_k_squared_on_the_group_diagonal() -> None:
    pool = AvgPool(4, (2, 3), stride=1, padding=((1, 0), (1, 1)))
    folded = fold(pool)
    assert folded.groups == 4, f"a pool is depthwise; got groups {folded.groups}"
    np.testing.assert_array_equal(folded.kernel, np.full((4, 1, 2, 3), 1.0 / 6.0), err_msg="1/6")
    # next to a conv of 2 groups it is written at 2 groups: 1/6 where o and i coincide
    tree = Parallel(pool, Conv(np.zeros((4, 2, 2, 3)), groups=2, padding=((1, 0), (1, 1))))
    folded = fold(tree)
    expected = np.zeros((4, 2, 2, 3))
    for o in range(4):
        expected[o, o % 2] = 1.0 / 6.0
    assert folded.groups == 2, f"gcd(4, 2) = 2; got {folded.groups}"
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="per-group channel diagonal")
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 5))
    assert_close(folded(x), avg_pool2d(x, (2, 3), stride=1, padding=((1, 0), (1, 1))),
                 dtype=np.float64, scale=float(np.abs(x).max()), what="the pool")  # fmt: skip


def test_avg_pool_default_stride_is_its_size() -> None:
    folded = fold(AvgPool(1, 3))
    assert folded.stride == (3, 3), f"PyTorch's default stride is the window; {folded.stride}"


def test_avg_pool_excluding_padding_folds_without_padding() -> None:
    folded = fold(AvgPool(2, 2, count_include_pad=False))
    np.testing.assert_array_equal(folded.kernel, np.full((2, 1, 2, 2), 0.25), err_msg="no pad")


# ------------------------------------------------------ tier 1: asymmetric crops


def test_acnet_1xk_with_a_crop_sits_in_the_centre_row() -> None:
    rng = np.random.default_rng(3)
    square = integer_array(rng, (2, 2, 5, 5))
    row = integer_array(rng, (2, 2, 1, 5))
    column = integer_array(rng, (2, 2, 3, 1))
    tree = Parallel(
        Conv(square, padding=1),  # span 2 - 5 = -3 per axis
        Conv(row, padding=((-1, -1), (1, 1))),  # rows: p = -1 < 0 = k // 2: crops
        Conv(column, padding=((0, 0), (-1, -1))),
    )
    folded = fold(tree)
    expected = square.copy()
    expected[:, :, 2:3, :] += row
    expected[:, :, 1:4, 2:3] += column
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="1x5 at row 2, 3x1 at column 2")
    assert folded.pads == ((1, 1), (1, 1)), f"the widest padding wins; got {folded.pads}"
    x = integer_array(rng, (1, 2, 6, 7))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="exact")


def test_one_sided_crop_shifts_the_small_kernel() -> None:
    main = np.arange(9.0).reshape(1, 1, 3, 3)
    tree = Parallel(
        Conv(main, padding=((1, 0), (1, 1))),  # span -2 in height
        Conv(np.full((1, 1, 1, 3), 100.0), padding=((0, -1), (1, 1))),
    )
    folded = fold(tree)
    expected = main.copy()
    expected[0, 0, 1, :] += 100.0  # reads row i: the main conv's tap u = 1
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="row 1, not row 0 or 2")
    assert folded.pads == ((1, 0), (1, 1)), f"got {folded.pads}"
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="exact")


# ----------------------------------------------------- tier 1: BN after the sum


def test_post_sum_bn_scales_every_branch() -> None:
    # QARepVGG: BN(conv3x3(x) + conv1x1(x) + x), scale 2, output at zero 1 - 3 * 2 = -5
    rng = np.random.default_rng(4)
    dense = integer_array(rng, (2, 2, 3, 3))
    point = integer_array(rng, (2, 2, 1, 1))
    bn = unit_bn(2, gamma=2.0, beta=1.0, mean=3.0)
    tree = Sequential(
        Parallel(Conv(dense, padding=1), Conv(point), Identity(2)), Norm(bn, name="post")
    )
    folded = fold(tree)
    expected = dense.copy()
    expected[:, :, 1, 1] += point[:, :, 0, 0] + np.eye(2)
    np.testing.assert_array_equal(folded.kernel, 2.0 * expected, err_msg="(3x3 + 1x1 + I) * 2")
    np.testing.assert_array_equal(folded.bias, [-5.0, -5.0], err_msg="beta - mean * scale")
    x = integer_array(rng, (2, 2, 4, 3))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="exact")


@pytest.mark.parametrize(("eps", "other"), [(1e-3, 1e-5), (1e-5, 1e-3)])
def test_bn_eps_is_the_one_given(eps: float, other: float) -> None:
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((3, 1, 3, 3))
    gamma, beta, mean = rng.standard_normal((3, 3))
    var = np.array([1e-3, 2e-3, 5e-4])  # comparable to eps: the eps shows
    folded = fold(Sequential(Conv(kernel, padding=1), Norm(BatchNorm(gamma, beta, mean, var, eps))))
    for used, should_match in ((eps, True), (other, False)):
        scale = gamma / np.sqrt(var + used)
        expected = kernel * scale[:, None, None, None]
        error = float(np.max(np.abs(folded.kernel - expected)))
        allowed = TOLERANCE[np.dtype(np.float64)] * float(np.max(np.abs(expected)))
        assert (error <= allowed) == should_match, (
            f"fold with eps={eps} vs the formula with eps={used}: error {error:.3g}, "
            f"allowed {allowed:.3g}, expected {'a match' if should_match else 'a difference'}"
        )


# ----------------------------------------------------------- tier 1: refusals


def test_relu_inside_is_refused() -> None:
    tree = Sequential(Conv(np.ones((1, 1, 3, 3))), ReLU(name="act"), Conv(np.ones((1, 1, 1, 1))))
    message = refusal(tree)
    assert "'act'" in message and "is not linear" in message, message
    y = evaluate(tree, -np.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(y, np.zeros((1, 1, 1, 1)), err_msg="evaluate applies the ReLU")


def test_padding_after_a_kxk_conv_is_refused() -> None:
    tree = Sequential(
        Conv(np.ones((1, 1, 3, 3)), name="dense"), Conv(np.ones((1, 1, 3, 3)), padding=1)
    )
    message = refusal(tree)
    assert "'dense'" in message and "padding after such a map is not padding" in message, message
    message = refusal(Sequential(Conv(np.ones((1, 1, 1, 1)), stride=2), Pad(1)))
    assert "padding after such a map is not padding" in message, f"strided 1x1: {message}"


def test_branches_with_different_strides_are_refused() -> None:
    tree = Parallel(
        Conv(np.ones((1, 1, 3, 3)), padding=1, stride=2), Conv(np.ones((1, 1, 3, 3)), padding=1)
    )
    assert "different strides" in refusal(tree), refusal(tree)


def test_branches_with_different_output_sizes_are_refused() -> None:
    tree = Parallel(
        Conv(np.ones((1, 1, 3, 3)), padding=1), Conv(np.ones((1, 1, 3, 3)), padding=(1, 0))
    )
    message = refusal(tree)
    assert "different output sizes" in message and "along width" in message, message


def test_avg_pool_excluding_padding_with_padding_is_refused() -> None:
    message = refusal(AvgPool(2, 3, stride=1, padding=1, count_include_pad=False))
    assert "count_include_pad=False" in message, message


def test_non_zero_padding_at_the_input_is_refused() -> None:
    message = refusal(Sequential(Pad(1, [1.0]), Conv(np.ones((1, 1, 3, 3)))))
    assert "pads its input with non-zero values" in message, message


def test_crop_then_pad_is_refused() -> None:
    tree = Sequential(Conv(np.ones((1, 1, 1, 1)), padding=-1), Pad(1))
    assert "cropping then padding" in refusal(tree), refusal(tree)


def test_zero_valued_pad_at_the_input_is_zero_padding() -> None:
    # BUG: a Pad whose value vector is all zeros (a BN whose output at zero input is 0)
    # is zero padding, as conv2d(pad_value=zeros) treats it, yet fold refuses it.
    tree = Sequential(Pad(1, np.zeros(2)), Conv(np.ones((1, 2, 3, 3))))
    folded = fold(tree)
    x = np.arange(8.0).reshape(1, 2, 2, 2)
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="zeros pad like zeros")


# ------------------------------------------------------ tier 2: random trees


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=tree_cases(depth=2))
def test_fold_computes_what_the_train_form_computes(dtype: type, case: TreeCase) -> None:
    tree, x = case.make(dtype)
    folded = fold(tree)
    assert isinstance(folded, FoldedConv), f"fold returns a FoldedConv; got {type(folded)}"
    deploy, train = folded(x), evaluate(tree, x)
    assert train.dtype == np.dtype(dtype), f"evaluate keeps {dtype}; got {train.dtype}"
    scale = float(np.max(magnitude(tree, x), initial=0.0))
    assert_close(deploy, train, dtype=dtype, scale=scale, what=f"fold vs evaluate {case}")


@given(case=tree_cases(depth=2))
def test_float32_fold_is_the_float64_fold_rounded_once(case: TreeCase) -> None:
    tree, _x = case.make(np.float32)
    folded = fold(tree)
    wide = fold(cast_tree(tree, np.float64))
    has_arrays = any(isinstance(leaf, Conv | Norm | Pad) for leaf in _leaves(tree))
    expected_dtype = np.float32 if has_arrays else np.float64
    assert folded.kernel.dtype == folded.bias.dtype == expected_dtype, (
        f"float32 in, float32 out; got {folded.kernel.dtype}, {folded.bias.dtype}"
    )
    np.testing.assert_array_equal(folded.kernel, wide.kernel.astype(expected_dtype), "kernel")
    np.testing.assert_array_equal(folded.bias, wide.bias.astype(expected_dtype), "bias")
    assert (folded.stride, folded.pads, folded.groups) == (wide.stride, wide.pads, wide.groups), (
        "the geometry does not depend on the dtype"
    )


def test_float32_sequence_is_composed_in_float64() -> None:
    # Two float32 1x1 convs whose composed kernel is a (1 + u) - (1 + 2u) (u = 2**-23):
    # exactly u**2 = 2**-46 in float64 (rounded once: still 2**-46); 0 if the products
    # are rounded to float32 first.
    u = 2.0**-23
    w1 = np.array([1.0 + u, 1.0], dtype=np.float32).reshape(2, 1, 1, 1)
    w2 = np.array([1.0 + u, -(1.0 + 2 * u)], dtype=np.float32).reshape(1, 2, 1, 1)
    folded = fold(Sequential(Conv(w1), Conv(w2)))
    assert folded.kernel.dtype == np.float32, f"float32 in, float32 out; {folded.kernel.dtype}"
    np.testing.assert_array_equal(
        folded.kernel.ravel(), np.array([2.0**-46], dtype=np.float32), err_msg="u**2, not 0"
    )


def _leaves(node: Node) -> list[Node]:
    if isinstance(node, Parallel):
        return [leaf for branch in node.branches for leaf in _leaves(branch)]
    if isinstance(node, Sequential):
        return [leaf for step in node.steps for leaf in _leaves(step)]
    return [node]


@given(case=tree_cases(depth=2))
def test_output_size_is_the_shape_evaluate_and_the_fold_give(case: TreeCase) -> None:
    tree, x = case.make(np.float64)
    size = output_size(tree, case.height, case.width)
    train = evaluate(tree, x)
    assert train.shape[2:] == size, f"output_size {size}, evaluate {train.shape}"
    assert fold(tree)(x).shape == train.shape, "the fold keeps the output shape"


@given(case=tree_cases(depth=1))
def test_magnitude_bounds_every_output(case: TreeCase) -> None:
    tree, x = case.make(np.float64)
    bound = magnitude(tree, x)
    train = evaluate(tree, x)
    assert bound.shape == train.shape, f"magnitude shape {bound.shape} vs {train.shape}"
    slack = TOLERANCE[np.dtype(np.float64)] * float(np.max(bound, initial=0.0))
    assert np.all(np.abs(train) <= bound + slack), "|evaluate| <= magnitude, elementwise"


# -------------------------------------------------------------------- counting


def test_counts_by_hand() -> None:
    bn = unit_bn(4)
    tree = Parallel(
        Sequential(
            Conv(np.ones((4, 2, 3, 3)), np.ones(4), padding=1, stride=2, groups=2), Norm(bn)
        ),
        Sequential(Conv(np.ones((4, 4, 1, 1)), stride=2), Norm(bn)),
        Sequential(AvgPool(4, 3, stride=2, padding=1), Norm(bn)),
    )
    # 72 + 4 (3x3 and bias) + 8 (BN) + 16 (1x1) + 8 (BN) + 0 (pool) + 8 (BN)
    assert num_parameters(tree) == 116, f"got {num_parameters(tree)}"
    # 7x6 input at stride 2: 4x3 outputs; 3x3: 72 * 12, 1x1: 16 * 12, pool: 4 * 9 * 12
    assert output_size(tree, 7, 6) == (4, 3), f"got {output_size(tree, 7, 6)}"
    assert multiply_adds(tree, 7, 6) == 72 * 12 + 16 * 12 + 36 * 12, multiply_adds(tree, 7, 6)
    sequence = Sequential(Conv(np.ones((3, 2, 1, 1))), Conv(np.ones((5, 3, 3, 3)), padding=-1))
    # 1x1 on 6x6 (36 outputs), then 3x3 cropping 1 per side: 6 - 2 - 2 = 2x2 outputs
    assert output_size(sequence, 6, 6) == (2, 2), f"got {output_size(sequence, 6, 6)}"
    assert multiply_adds(sequence, 6, 6) == 6 * 36 + 135 * 4, multiply_adds(sequence, 6, 6)
    assert num_parameters(Identity(3)) == 0, "an identity has no parameters"


def test_output_size_refuses_a_window_that_does_not_fit() -> None:
    with pytest.raises(ReparamError, match="leaves no output"):
        output_size(Conv(np.ones((1, 1, 5, 5))), 3, 7)


# ----------------------------------------------- conv2d's padding and pad value


@st.composite
def padded_convs(draw: st.DrawFn) -> dict[str, Any]:
    """A grouped conv with per-side padding (negative crops) and maybe a pad value."""
    groups = draw(st.integers(1, 3))
    per_in, per_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sizes, pads, sides = [], [], []
    for _axis in range(2):
        k = draw(st.integers(1, 5))
        before, after = draw(st.integers(-2, 3)), draw(st.integers(-2, 3))
        sizes.append(k)
        pads.append((before, after))
        crop = max(0, -before) + max(0, -after)  # no crop wider than the input (see the bug)
        sides.append(draw(st.integers(max(1, k - before - after, crop), 9)))
    value = draw(st.sampled_from(["none", "scalar", "vector"]))
    return {
        "groups": groups,
        "x_shape": (draw(st.integers(1, 2)), groups * per_in, sides[0], sides[1]),
        "kernel_shape": (groups * per_out, per_in, sizes[0], sizes[1]),
        "stride": (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        "pads": (pads[0], pads[1]),
        "bias": draw(st.booleans()),
        "value": value,
        "seed": draw(seeds),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=padded_convs())
def test_conv2d_per_side_padding_and_pad_value_match_loops(
    dtype: type, case: dict[str, Any]
) -> None:
    rng = np.random.default_rng(case["seed"])
    x = random_array(rng, case["x_shape"], dtype)
    kernel = random_array(rng, case["kernel_shape"], dtype)
    bias = random_array(rng, (kernel.shape[0],), dtype) if case["bias"] else None
    channels = x.shape[1]
    value: Any = {
        "none": None,
        "scalar": 1.5,
        "vector": random_array(rng, (channels,), np.float64),
    }[case["value"]]
    full = None if value is None else np.broadcast_to(np.asarray(value, np.float64), (channels,))
    kwargs = {"stride": case["stride"], "groups": case["groups"]}
    got = conv2d(x, kernel, bias, padding=case["pads"], pad_value=value, **kwargs)
    expected = conv2d_pads_loops(x, kernel, bias, pads=case["pads"], pad_value=full, **kwargs)
    abs_bias = None if bias is None else np.abs(bias)
    abs_value = None if full is None else np.abs(full)
    scale = conv2d_pads_loops(np.abs(x), np.abs(kernel), abs_bias, pads=case["pads"],
                              pad_value=abs_value, **kwargs).max()  # fmt: skip
    assert got.dtype == np.dtype(dtype), f"conv2d keeps {dtype}; got {got.dtype}"
    assert_close(got, expected, dtype=dtype, scale=float(scale), what=f"conv2d {case}")


def test_conv2d_pad_value_and_crop_by_hand() -> None:
    x = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)  # [[1, 2, 3], [4, 5, 6]]
    y = conv2d(x, np.ones((1, 1, 1, 2)), padding=((1, 0), (-1, 0)), pad_value=[10.0])
    np.testing.assert_array_equal(y[0, 0], [[20.0], [5.0], [11.0]], err_msg="top row of 10s")
    y = conv2d(x, np.ones((1, 1, 2, 1)), padding=((0, 0), (2, -2)))
    np.testing.assert_array_equal(y[0, 0], [[0.0, 0.0, 5.0]], err_msg="shift right by 2")


def test_conv2d_crop_wider_than_the_input_reads_the_padding() -> None:
    # BUG: a crop of more columns than the input has, padded on the other side, reads only
    # the border: by the definition (and conv_output_size) one output pixel of value 0.
    # pad_input clamps the crop to the input, so the padded input is too wide and the
    # im2col result does not fit the output buffer (a bare NumPy ValueError).
    x = np.ones((1, 1, 1, 1))
    expected = conv2d_pads_loops(x, np.ones((1, 1, 1, 1)), pads=((0, 0), (-2, 2)))
    np.testing.assert_array_equal(expected, np.zeros((1, 1, 1, 1)), err_msg="the definition")
    got = conv2d(x, np.ones((1, 1, 1, 1)), padding=((0, 0), (-2, 2)))
    np.testing.assert_array_equal(got, expected, err_msg="conv2d reads the border only")


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"padding": ((1, 2, 3), (0, 0))}, "padding must be an int, a pair"),
        ({"padding": (1, 2, 3)}, "padding must be an int, a pair"),
        ({"padding": 1.5}, "padding must be an int, a pair"),
        ({"padding": 1, "pad_value": [1.0, 2.0, 3.0]}, "pad_value must be a scalar or one value"),
        ({"padding": ((-3, 0), (0, 0))}, "kernel is larger than the padded input"),
        ({"padding": ((0, 0), (-1, -1))}, "kernel is larger than the padded input"),
    ],
)
def test_conv2d_argument_errors_name_the_argument(kwargs: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ReparamError, match="conv2d") as info:
        conv2d(np.ones((1, 2, 3, 3)), np.ones((1, 2, 2, 2)), **kwargs)
    assert phrase in str(info.value), str(info.value)


# -------------------------------------------------------------------- avg_pool2d


@st.composite
def pools(draw: st.DrawFn) -> dict[str, Any]:
    sizes, pads, sides = [], [], []
    for _axis in range(2):
        k = draw(st.integers(1, 4))
        pad = draw(st.integers(0, k // 2))  # PyTorch allows at most half the window
        sizes.append(k)
        pads.append(pad)
        sides.append(draw(st.integers(max(1, k - 2 * pad), 7)))
    return {
        "shape": (draw(st.integers(1, 2)), draw(st.integers(1, 3)), sides[0], sides[1]),
        "size": (sizes[0], sizes[1]),
        "stride": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "padding": (pads[0], pads[1]),
        "count_include_pad": draw(st.booleans()),
        "seed": draw(seeds),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=pools())
def test_avg_pool2d_matches_torch_and_loops(dtype: type, case: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    x = random_array(np.random.default_rng(case["seed"]), case["shape"], dtype)
    kwargs = {k: case[k] for k in ("stride", "padding", "count_include_pad")}
    got = avg_pool2d(x, case["size"], **kwargs)
    oracle = torch.nn.functional.avg_pool2d(torch.from_numpy(x), case["size"], **kwargs).numpy()
    (ph, pw) = case["padding"]
    loops = avg_pool2d_loops(x, case["size"], stride=case["stride"], pads=((ph, ph), (pw, pw)),
                             count_include_pad=case["count_include_pad"])  # fmt: skip
    assert got.dtype == np.dtype(dtype), f"avg_pool2d keeps {dtype}; got {got.dtype}"
    scale = float(np.max(np.abs(x)))
    assert_close(got, oracle, dtype=dtype, scale=scale, what=f"vs torch {case}")
    assert_close(got, loops, dtype=dtype, scale=scale, what=f"vs loops {case}")


@given(data=st.data(), count_include_pad=st.booleans(), seed=seeds)
def test_avg_pool2d_per_side_padding_matches_loops(
    data: st.DataObject, count_include_pad: bool, seed: int
) -> None:
    sizes, pads, sides = [], [], []
    for _axis in range(2):
        k = data.draw(st.integers(1, 4), label="size")
        # a pad of at most k - 1 per side: every window holds a real pixel (no 0 / 0)
        before, after = (data.draw(st.integers(0, k - 1), label="pad") for _ in range(2))
        sizes.append(k)
        pads.append((before, after))
        sides.append(data.draw(st.integers(max(1, k - before - after), 6), label="side"))
    stride = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="stride")
    x = np.random.default_rng(seed).standard_normal((1, 2, *sides))
    size, padding = (sizes[0], sizes[1]), (pads[0], pads[1])
    got = avg_pool2d(x, size, stride=stride, padding=padding, count_include_pad=count_include_pad)
    loops = avg_pool2d_loops(
        x, size, stride=stride, pads=padding, count_include_pad=count_include_pad
    )
    assert_close(got, loops, dtype=np.float64, scale=float(np.abs(x).max()), what="per side")


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"size": 4}, "pooling window (size) is larger than the padded input"),
        ({"size": 2, "padding": (1, 2, 3)}, "padding must be an int, a pair"),
        ({"size": 0}, "size"),
        ({"size": 2, "stride": 0}, "stride"),
    ],
)
def test_avg_pool2d_argument_errors(kwargs: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ReparamError, match="avg_pool2d") as info:
        avg_pool2d(np.ones((1, 1, 3, 3)), **kwargs)
    assert phrase in str(info.value), str(info.value)
