"""The newer laws of the branch algebra: Scale, Linear, a BatchNorm before a map, dilation.

Each law in three tiers. Tier 1, by pencil: integer weights (every sum of
their products is exact in float64, so "equal" means bit for bit) and the
published blocks that need the law (FastViT's RepMixer, PP-YOLOE's alpha,
LeViT's BN_Linear and Linear_BN, UniRepLKNet's DilatedReparamBlock). Tier 2,
properties: random trees with scales, linear layers, dilated kernels and BNs
before maps fold to one conv that computes what the train form computes
(float32 and float64, relative to the tree's magnitude), and the strategy that
draws them reaches every kind it promises. Tier 3: a dilated conv against
PyTorch and against the loop conv of ``tests/reference.py``. Every refusal is
a :class:`~reparam.core.algebra.FoldError` whose ``node`` is the node where
the tree stops being one convolution.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from reference import conv2d_loops, conv_magnitude
from strategies import ConvCase, bn_stats, conv_cases, random_array, seeds
from strategies_algebra import (
    ConvSpec,
    LinearSpec,
    NormSpec,
    PadSpec,
    ParallelSpec,
    ScaleSpec,
    SequentialSpec,
    Spec,
    TreeCase,
    build,
    cast_tree,
    leaves,
    scale_specs,
    tree_cases,
)
from tolerances import DTYPES, TOLERANCE, assert_close

from reparam import BatchNorm, ConvBias, ReparamError, fuse_bn, pad_kernel
from reparam.core.algebra import (
    AvgPool,
    Conv,
    FoldedConv,
    FoldError,
    Identity,
    Linear,
    Node,
    Norm,
    Pad,
    Parallel,
    ReLU,
    Scale,
    Sequential,
    evaluate,
    fold,
    magnitude,
    multiply_adds,
    num_parameters,
    output_size,
)

Array = npt.NDArray[np.float64]


# --------------------------------------------------------------------- helpers


def small_integers(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Non-zero integers in [-3, 3] as float64: every sum of their products is exact."""
    values = rng.integers(1, 4, size=shape) * rng.choice([-1, 1], size=shape)
    result: Array = values.astype(np.float64)
    return result


def integer_bn(gamma: list[float], beta: list[float], mean: list[float]) -> BatchNorm:
    """var 1 and eps 0: scale ``gamma`` and output at zero ``beta - mean gamma``, exactly."""
    ones = np.ones(len(gamma))
    return BatchNorm(np.array(gamma), np.array(beta), np.array(mean), ones, eps=0.0)


def random_bn(rng: np.random.Generator, channels: int) -> BatchNorm:
    return BatchNorm(
        rng.uniform(0.5, 2.0, channels),
        rng.normal(size=channels),
        rng.normal(size=channels),
        rng.uniform(0.5, 2.0, channels),
    )


def zeros_between_taps(kernel: npt.ArrayLike, rate: tuple[int, int]) -> Array:
    """The kernel at dilation 1 that a kernel at dilation ``rate`` is: r - 1 zeros between taps."""
    w = np.asarray(kernel, dtype=np.float64)
    k_h, k_w = w.shape[2:]
    out = np.zeros((*w.shape[:2], rate[0] * (k_h - 1) + 1, rate[1] * (k_w - 1) + 1))
    for u in range(k_h):
        for v in range(k_w):
            out[:, :, rate[0] * u, rate[1] * v] = w[:, :, u, v]
    return out


def fold_error(tree: Node) -> FoldError:
    """The FoldError ``fold`` raises for ``tree`` (the test fails if it folds)."""
    with pytest.raises(FoldError) as info:
        fold(tree)
    return info.value


def assert_folds(tree: Node, x: npt.NDArray[Any], *, dtype: npt.DTypeLike, what: str) -> None:
    """``fold(tree)(x) == evaluate(tree, x)`` relative to the tree's magnitude."""
    scale = float(np.max(magnitude(tree, x), initial=0.0))
    assert_close(fold(tree)(x), evaluate(tree, x), dtype=dtype, scale=scale, what=what)


# ============================================================== Scale: by pencil


def test_scale_after_a_conv_multiplies_its_rows_by_hand() -> None:
    rng = np.random.default_rng(1)
    kernel = small_integers(rng, (3, 2, 2, 3))
    bias = np.array([1.0, -2.0, 3.0])
    tree = Sequential(Conv(kernel, bias, padding=1), Scale([2.0, -1.0, 0.0], [0.5, 1.0, -3.0]))
    folded = fold(tree)
    np.testing.assert_array_equal(
        folded.kernel,
        kernel * np.array([2.0, -1.0, 0.0])[:, None, None, None],
        err_msg="row o of the kernel times scale[o]: negative and zero scales included",
    )
    # 2 * 1 + 0.5, -1 * -2 + 1, 0 * 3 - 3
    np.testing.assert_array_equal(folded.bias, [2.5, 3.0, -3.0], err_msg="scale * b + bias")
    assert folded.pads == ((1, 1), (1, 1)), f"a scale after the conv keeps its padding; {folded}"
    x = small_integers(rng, (2, 2, 4, 5))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_a_number_is_the_vector_of_equal_entries() -> None:
    rng = np.random.default_rng(2)
    conv = Conv(small_integers(rng, (3, 3, 3, 3)), small_integers(rng, (3,)), padding=1)
    number = fold(Sequential(conv, Scale(-2.0, 0.5, channels=3)))
    vector = fold(Sequential(conv, Scale([-2.0, -2.0, -2.0], [0.5, 0.5, 0.5])))
    np.testing.assert_array_equal(number.kernel, vector.kernel, err_msg="kernel")
    np.testing.assert_array_equal(number.bias, vector.bias, err_msg="bias")
    np.testing.assert_array_equal(number.kernel, -2.0 * conv.kernel, err_msg="-2 W")
    x = small_integers(rng, (1, 3, 4, 4))
    np.testing.assert_array_equal(
        evaluate(Scale(-2.0, 0.5, channels=3), x), -2.0 * x + 0.5, err_msg="x * scale + bias"
    )


def test_a_negated_branch_subtracts_its_kernel() -> None:
    rng = np.random.default_rng(3)
    a, b = small_integers(rng, (2, 2, 3, 3)), small_integers(rng, (2, 2, 1, 1))
    bias_a, bias_b = np.array([1.0, 2.0]), np.array([5.0, -1.0])
    tree = Parallel(
        Conv(a, bias_a, padding=1),
        Sequential(Conv(b, bias_b), Scale(-1.0, channels=2)),
    )
    folded = fold(tree)
    expected = a.copy()
    expected[:, :, 1, 1] -= b[:, :, 0, 0]
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="A minus B at the centre")
    np.testing.assert_array_equal(folded.bias, [-4.0, 3.0], err_msg="1 - 5, 2 + 1")
    x = small_integers(rng, (2, 2, 5, 4))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_a_zero_scale_removes_a_branch_and_keeps_its_bias() -> None:
    rng = np.random.default_rng(4)
    a, b = small_integers(rng, (2, 2, 3, 3)), small_integers(rng, (2, 2, 3, 3))
    tree = Parallel(
        Conv(a, padding=1),
        Sequential(Conv(b, np.ones(2), padding=1), Scale(0.0, [1.0, -1.0])),
    )
    folded = fold(tree)
    np.testing.assert_array_equal(folded.kernel, a, err_msg="0 * B adds nothing")
    np.testing.assert_array_equal(folded.bias, [1.0, -1.0], err_msg="0 * 1 + the scale's bias")


def test_a_bias_free_scale_before_a_padded_conv_folds() -> None:
    # zero at zero input: the conv's zero padding is the scale's output on a zero border
    rng = np.random.default_rng(5)
    kernel = small_integers(rng, (3, 2, 3, 3))
    tree = Sequential(Scale([2.0, -3.0]), Conv(kernel, padding=1))
    folded = fold(tree)
    np.testing.assert_array_equal(
        folded.kernel, kernel * np.array([2.0, -3.0])[None, :, None, None], err_msg="columns"
    )
    assert folded.pads == ((1, 1), (1, 1)), f"the padding moves to the input; {folded.pads}"
    x = small_integers(rng, (1, 2, 4, 4))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_fastvit_repmixer_layer_scale_of_mixer_minus_norm() -> None:
    # apple/ml-fastvit RepMixer: x + layer_scale * (mixer(x) - norm(x)), mixer a
    # MobileOneBlock (dw kxk conv + BN, dw 1x1 conv + BN, skip BN), norm a skip BN.
    # Its reparameterize(): w = id + gamma (w_mixer - w_norm), b = gamma (b_mixer - b_norm).
    rng = np.random.default_rng(6)
    channels, k = 4, 3
    dw_k, dw_1 = rng.normal(size=(channels, 1, k, k)), rng.normal(size=(channels, 1, 1, 1))
    bn_k, bn_1, bn_skip, bn_norm = (random_bn(rng, channels) for _ in range(4))
    gamma = rng.normal(size=channels)
    mixer = Parallel(
        Sequential(Conv(dw_k, padding=k // 2, groups=channels), Norm(bn_k)),
        Sequential(Conv(dw_1, groups=channels), Norm(bn_1)),
        Norm(bn_skip),
    )
    minus_norm = Sequential(Norm(bn_norm), Scale(-1.0, channels=channels))
    tree = Parallel(Identity(channels), Sequential(Parallel(mixer, minus_norm), Scale(gamma)))
    folded = fold(tree)

    def bn_as_kernel(bn: BatchNorm) -> ConvBias:
        return fuse_bn(np.ones((channels, 1, 1, 1)), bn)

    parts = [fuse_bn(dw_k, bn_k), fuse_bn(dw_1, bn_1), bn_as_kernel(bn_skip)]
    w_mixer = sum(pad_kernel(w, k) for w, _ in parts)
    b_mixer = sum(b for _, b in parts)
    w_norm, b_norm = bn_as_kernel(bn_norm)
    identity = pad_kernel(np.ones((channels, 1, 1, 1)), k)
    expected = identity + gamma[:, None, None, None] * (w_mixer - pad_kernel(w_norm, k))
    terms = sum(np.abs(pad_kernel(w, k)) for w, _ in [*parts, (w_norm, b_norm)])
    assert_close(
        folded.kernel,
        expected,
        dtype=np.float64,
        scale=1.0 + float(np.max(np.abs(gamma)) * np.max(terms)),
        what="FastViT: id + gamma (w_mixer - w_norm)",
    )
    bias_terms = sum(np.abs(b) for _, b in [*parts, (w_norm, b_norm)])
    assert_close(
        folded.bias,
        gamma * (b_mixer - b_norm),
        dtype=np.float64,
        scale=float(np.max(np.abs(gamma) * bias_terms)),
        what="FastViT: gamma (b_mixer - b_norm)",
    )
    assert (folded.groups, folded.pads) == (channels, ((1, 1), (1, 1))), f"depthwise; {folded}"
    assert_folds(tree, rng.normal(size=(2, channels, 6, 5)), dtype=np.float64, what="RepMixer")


def test_pp_yoloe_alpha_times_the_1x1_branch() -> None:
    # PaddleDetection's RepVggBlock(alpha=True): y = conv1(x) + alpha * conv2(x), conv1 a
    # 3x3 ConvBN, conv2 a 1x1 ConvBN, alpha one number; fused: k3 + alpha pad(k1), b3 + alpha b1.
    rng = np.random.default_rng(7)
    channels, alpha = 3, -0.75
    w3, w1 = (
        rng.normal(size=(channels, channels, 3, 3)),
        rng.normal(size=(channels, channels, 1, 1)),
    )
    bn3, bn1 = random_bn(rng, channels), random_bn(rng, channels)
    tree = Parallel(
        Sequential(Conv(w3, padding=1), Norm(bn3)),
        Sequential(Conv(w1), Norm(bn1), Scale(alpha, channels=channels)),
    )
    folded = fold(tree)
    (k3, b3), (k1, b1) = fuse_bn(w3, bn3), fuse_bn(w1, bn1)
    scale = float(np.max(np.abs(k3)) + abs(alpha) * np.max(np.abs(k1)))
    assert_close(
        folded.kernel,
        k3 + alpha * pad_kernel(k1, 3),
        dtype=np.float64,
        scale=scale,
        what="k3 + alpha pad(k1)",
    )
    scale = float(np.max(np.abs(b3) + abs(alpha) * np.abs(b1)))
    assert_close(folded.bias, b3 + alpha * b1, dtype=np.float64, scale=scale, what="b3 + alpha b1")
    assert num_parameters(tree) == 81 + 9 + 2 * 6 + 1, "alpha is one parameter"
    assert_folds(tree, rng.normal(size=(1, channels, 5, 6)), dtype=np.float64, what="PP-YOLOE")


def test_a_python_float_scale_keeps_float32() -> None:
    rng = np.random.default_rng(8)
    kernel = rng.normal(size=(2, 2, 3, 3)).astype(np.float32)
    tree = Sequential(Conv(kernel, padding=1), Scale(0.1, -0.5, channels=2))
    folded = fold(tree)
    x = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    assert folded.kernel.dtype == folded.bias.dtype == np.float32, (
        f"a number takes the data's dtype, as a Python float does; got {folded.kernel.dtype}"
    )
    assert evaluate(tree, x).dtype == np.float32, "x * 0.1 in float32 stays float32"
    assert evaluate(Scale(0.1, channels=2), x).dtype == np.float32, "a scale alone too"
    assert_folds(tree, x, dtype=np.float32, what="float32 with a Python-float scale")


def test_a_float64_vector_scale_promotes_like_numpy() -> None:
    kernel = np.ones((2, 2, 1, 1), dtype=np.float32)
    tree = Sequential(Conv(kernel), Scale(np.array([0.5, 2.0])))
    x = np.ones((1, 2, 2, 2), dtype=np.float32)
    assert fold(tree).kernel.dtype == np.float64, "np.result_type(float32, float64)"
    assert evaluate(tree, x).dtype == np.float64, "evaluate promotes the same way"


@pytest.mark.parametrize(
    ("args", "kwargs", "phrase"),
    [
        ((np.inf,), {"channels": 2}, "scale must be finite"),
        (([1.0, np.nan],), {}, "scale must be finite"),
        ((1.0, -np.inf), {"channels": 2}, "bias must be finite"),
        (([1.0, 2.0], [1.0, 2.0, 3.0]), {}, "disagree on the channel count; got scale 2, bias 3"),
        (([1.0, 2.0],), {"channels": 3}, "disagree on the channel count; got scale 2, channels 3"),
        ((1.0,), {}, "the channels are unknown"),
        ((1.0, 0.5), {}, "the channels are unknown"),
        ((np.ones((2, 2)),), {}, "must be a number or a vector of one value per channel"),
        ((1.0,), {"channels": 0}, "channels must be >= 1"),
        (("two",), {"channels": 2}, "scale must have a floating dtype"),
    ],
)
def test_scale_errors_name_the_problem(
    args: tuple[Any, ...], kwargs: dict[str, Any], phrase: str
) -> None:
    with pytest.raises(ReparamError) as info:
        Scale(*args, name="gamma", **kwargs)
    message = str(info.value)
    assert message.startswith("Scale 'gamma': "), f"names the leaf: {message}"
    assert phrase in message, message


def test_scale_on_the_wrong_channels_is_refused_by_evaluate() -> None:
    with pytest.raises(ReparamError, match="the scale has 2 channels") as info:
        evaluate(Scale([1.0, 2.0]), np.ones((1, 3, 2, 2)))
    assert "expected (N, 2, H, W)" in str(info.value), str(info.value)


# ============================================================= Linear: by pencil


def test_linear_on_features_is_x_times_weight_transposed_plus_bias() -> None:
    rng = np.random.default_rng(10)
    weight, bias = small_integers(rng, (4, 3)), small_integers(rng, (4,))
    features = small_integers(rng, (5, 3))
    layer = Linear(weight, bias)
    expected = features @ weight.T + bias
    np.testing.assert_array_equal(evaluate(layer, features), expected, err_msg="x W^T + b")
    np.testing.assert_array_equal(fold(layer)(features), expected, err_msg="the folded conv")
    assert (layer.in_channels, layer.out_channels) == (3, 4), "channels from the weight"
    assert magnitude(layer, features).shape == (5, 4), "magnitude keeps features as features"


def test_linear_on_an_image_is_the_1x1_conv_at_every_pixel() -> None:
    rng = np.random.default_rng(11)
    weight, bias = small_integers(rng, (4, 3)), small_integers(rng, (4,))
    x = small_integers(rng, (2, 3, 4, 5))
    layer = Linear(weight, bias)
    expected = np.einsum("oc,nchw->nohw", weight, x) + bias[:, None, None]
    np.testing.assert_array_equal(evaluate(layer, x), expected, err_msg="per pixel")
    np.testing.assert_array_equal(
        evaluate(layer, x), evaluate(Conv(weight[:, :, None, None], bias), x), err_msg="1x1 conv"
    )
    np.testing.assert_array_equal(fold(layer).kernel, weight[:, :, None, None], err_msg="kernel")
    assert multiply_adds(layer, 4, 5) == 12 * 20, "C_out C_in per pixel"
    assert num_parameters(layer) == 16, "weight and bias"


def _bn_linear(weight: Array, bias: Array, bn: BatchNorm) -> tuple[Array, Array]:
    """LeViT's BN_Linear.fuse (timm's NormLinear): the BN before the Linear."""
    s = bn.gamma / np.sqrt(bn.var + bn.eps)
    shift = bn.beta - bn.mean * s
    return weight * s[None, :], shift @ weight.T + bias


def _linear_bn(weight: Array, bias: Array, bn: BatchNorm) -> tuple[Array, Array]:
    """LeViT's Linear_BN.fuse (timm's LinearNorm): the BN after the Linear."""
    s = bn.gamma / np.sqrt(bn.var + bn.eps)
    return weight * s[:, None], bn.beta + (bias - bn.mean) * s


@pytest.mark.parametrize(
    ("shape", "bn_first", "with_bias"),
    [
        ("BN_Linear", True, True),
        ("NormLinear", True, True),
        ("Linear_BN", False, False),
        ("LinearNorm", False, False),
        ("Linear_BN with a bias", False, True),
    ],
)
def test_batchnorm1d_and_linear_fold_to_the_published_fuse(
    shape: str, bn_first: bool, with_bias: bool
) -> None:
    rng = np.random.default_rng(12)
    c_in, c_out = 5, 3
    weight = rng.normal(size=(c_out, c_in))
    bias = rng.normal(size=c_out) if with_bias else np.zeros(c_out)
    bn = random_bn(rng, c_in if bn_first else c_out)
    layer = Linear(weight, bias if with_bias else None)
    tree = Sequential(Norm(bn), layer) if bn_first else Sequential(layer, Norm(bn))
    got_weight, got_bias = fold(tree).as_linear()
    want_weight, want_bias = (_bn_linear if bn_first else _linear_bn)(weight, bias, bn)
    scale = float(np.max(np.abs(weight)) * np.max(np.abs(bn.scale())))
    assert_close(got_weight, want_weight, dtype=np.float64, scale=scale, what=f"{shape} weight")
    # the bias is the output at zero input: its terms are the magnitude there
    bias_scale = float(np.max(magnitude(tree, np.zeros((1, c_in)))))
    assert_close(got_bias, want_bias, dtype=np.float64, scale=bias_scale, what=f"{shape} bias")
    features = rng.normal(size=(7, c_in))
    train = evaluate(tree, features)
    assert train.shape == (7, c_out), f"(N, C) in, (N, C) out; got {train.shape}"
    assert_folds(tree, features, dtype=np.float64, what=f"{shape} on features")
    scale = float(np.max(magnitude(tree, features)))
    assert_close(
        features @ got_weight.T + got_bias,
        train,
        dtype=np.float64,
        scale=scale,
        what=f"{shape}: x W^T + b with the fused pair",
    )


def test_as_linear_round_trips_a_linear_layer_exactly() -> None:
    rng = np.random.default_rng(13)
    weight, bias = small_integers(rng, (4, 3)), small_integers(rng, (4,))
    folded = fold(Linear(weight, bias))
    got_weight, got_bias = folded.as_linear()
    np.testing.assert_array_equal(got_weight, weight, err_msg="weight back")
    np.testing.assert_array_equal(got_bias, bias, err_msg="bias back")
    assert not np.shares_memory(got_weight, folded.kernel), "a fresh array, not a view"
    assert not np.shares_memory(got_bias, folded.bias), "a fresh array, not a view"


def test_as_linear_writes_groups_out_with_zeros_between_them() -> None:
    rng = np.random.default_rng(14)
    kernel = small_integers(rng, (4, 2, 1, 1))
    weight, bias = fold(Conv(kernel, groups=2)).as_linear()
    expected = np.zeros((4, 4))
    expected[:2, :2] = kernel[:2, :, 0, 0]
    expected[2:, 2:] = kernel[2:, :, 0, 0]
    np.testing.assert_array_equal(weight, expected, err_msg="block diagonal")
    np.testing.assert_array_equal(bias, np.zeros(4), err_msg="no bias: zeros")
    x = small_integers(rng, (3, 4))
    np.testing.assert_array_equal(
        evaluate(Linear(weight, bias), x), evaluate(Conv(kernel, groups=2), x), err_msg="same map"
    )


@pytest.mark.parametrize(
    "conv",
    [
        Conv(np.ones((2, 2, 3, 3))),
        Conv(np.ones((2, 2, 3, 3)), padding=1),
        Conv(np.ones((2, 2, 1, 1)), stride=2),
        Conv(np.ones((2, 2, 1, 1)), padding=1),
        Conv(np.ones((2, 2, 1, 1)), padding=((0, -1), (0, 0))),
    ],
    ids=["3x3", "3x3 padded", "1x1 stride 2", "1x1 padded", "1x1 cropping"],
)
def test_as_linear_refuses_what_is_not_a_fully_connected_layer(conv: Conv) -> None:
    with pytest.raises(ReparamError) as info:
        fold(conv).as_linear()
    message = str(info.value)
    assert message.startswith("FoldedConv.as_linear: a fully connected layer is a 1x1"), message
    assert f"stride {conv.stride}, pads {conv.padding}" in message, message


def test_features_through_a_map_that_makes_more_pixels_are_refused() -> None:
    tree = Sequential(Linear(np.ones((2, 3))), Conv(np.ones((2, 2, 1, 1)), padding=1))
    features = np.ones((4, 3))
    with pytest.raises(ReparamError, match="turns one pixel into 3x3") as info:
        evaluate(tree, features)
    assert str(info.value).startswith("evaluate: x holds (N, C) features"), str(info.value)
    with pytest.raises(ReparamError, match=r"FoldedConv: x holds \(N, C\) features"):
        fold(tree)(features)
    with pytest.raises(ReparamError, match=r"magnitude: x holds \(N, C\) features"):
        magnitude(tree, features)


def test_a_padded_3x3_on_features_is_its_centre_tap() -> None:
    # one pixel stays one pixel: every tap but the centre reads the zero border
    rng = np.random.default_rng(15)
    kernel, bias = small_integers(rng, (2, 3, 3, 3)), small_integers(rng, (2,))
    features = small_integers(rng, (4, 3))
    expected = features @ kernel[:, :, 1, 1].T + bias
    got = evaluate(Conv(kernel, bias, padding=1), features)
    np.testing.assert_array_equal(got, expected, err_msg="the centre tap only")


@pytest.mark.parametrize(
    ("weight", "bias", "phrase"),
    [
        (np.ones(3), None, "weight must be 2-D; got shape (3,)"),
        (np.ones((4, 3)), np.ones(3), "bias has the wrong length; got 3, expected 4"),
        (np.ones((4, 3), dtype=int), None, "weight must have a floating dtype"),
    ],
)
def test_linear_errors_name_the_argument(weight: Any, bias: Any, phrase: str) -> None:
    with pytest.raises(ReparamError) as info:
        Linear(weight, bias, name="head")
    message = str(info.value)
    assert message.startswith("Linear 'head': ") and phrase in message, message


# =================================================== a BatchNorm before a map


def test_norm_before_a_1x1_conv_by_hand() -> None:
    bn = integer_bn(gamma=[2.0, -1.0, 3.0], beta=[1.0, 0.0, -2.0], mean=[1.0, 2.0, -1.0])
    at_zero = bn.output_at_zero()
    np.testing.assert_array_equal(at_zero, [-1.0, 2.0, 1.0], err_msg="beta - mean gamma")
    weight = np.array([[1.0, 2.0, -1.0], [0.0, -3.0, 2.0]])
    tree = Sequential(Norm(bn), Conv(weight[:, :, None, None], np.array([1.0, -1.0])))
    folded = fold(tree)
    # columns times the BN scale (2, -1, 3); bias b + W c = (1 + (-1 + 4 - 1), -1 + (-6 + 2))
    np.testing.assert_array_equal(
        folded.kernel[:, :, 0, 0], [[2.0, -2.0, -3.0], [0.0, 3.0, 6.0]], err_msg="W s"
    )
    np.testing.assert_array_equal(folded.bias, [3.0, -5.0], err_msg="b + W c")
    x = small_integers(np.random.default_rng(20), (2, 3, 3, 4))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


@pytest.mark.parametrize(
    ("size", "stride", "groups", "pads"),
    [
        ((3, 3), (1, 1), 1, ((0, 0), (0, 0))),
        ((3, 3), (2, 2), 1, ((0, 0), (0, 0))),
        ((3, 2), (2, 1), 2, ((0, 0), (0, 0))),
        ((3, 3), (1, 2), 4, ((0, 0), (0, 0))),
        ((5, 3), (1, 1), 2, ((-1, 0), (0, -1))),  # crops move across the BN too
    ],
)
def test_norm_before_an_unpadded_conv_is_exact(
    size: tuple[int, int], stride: tuple[int, int], groups: int, pads: Any
) -> None:
    rng = np.random.default_rng(21)
    channels = 4
    bn = integer_bn(
        gamma=[2.0, -1.0, 3.0, 0.0], beta=[1.0, 0.0, -2.0, 4.0], mean=[1.0, 2.0, -1.0, 0.0]
    )
    c = bn.output_at_zero()
    kernel = small_integers(rng, (4, channels // groups, *size))
    bias = small_integers(rng, (4,))
    conv = Conv(kernel, bias, stride=stride, padding=pads, groups=groups)
    folded = fold(Sequential(Norm(bn), conv))
    per_group, out_per_group = channels // groups, 4 // groups
    inputs = (np.arange(4)[:, None] // out_per_group) * per_group + np.arange(per_group)
    expected_kernel = kernel * bn.gamma[inputs][:, :, None, None]
    expected_bias = bias + np.einsum("oihw,oi->o", kernel, c[inputs])
    np.testing.assert_array_equal(folded.kernel, expected_kernel, err_msg="W[o, i] s[input]")
    np.testing.assert_array_equal(folded.bias, expected_bias, err_msg="b + sum W c")
    assert (folded.stride, folded.groups, folded.pads) == (stride, groups, conv.padding), (
        f"the conv's geometry is kept; got {folded}"
    )
    x = small_integers(rng, (2, channels, 7, 6))
    tree = Sequential(Norm(bn), conv)
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_norm_before_a_linear_is_the_bn_linear_fuse_exactly() -> None:
    bn = integer_bn(gamma=[2.0, -1.0], beta=[1.0, 3.0], mean=[0.0, 1.0])  # c = (1, 4)
    tree = Sequential(Norm(bn), Linear(np.array([[1.0, 2.0]]), np.array([0.5])))
    weight, bias = fold(tree).as_linear()
    np.testing.assert_array_equal(weight, [[2.0, -2.0]], err_msg="W s")
    np.testing.assert_array_equal(bias, [9.5], err_msg="0.5 + 1 * 1 + 2 * 4")


@pytest.mark.parametrize(
    "conv",
    [
        Conv(np.ones((2, 2, 3, 3)), padding=1, name="dense"),
        Conv(np.ones((2, 2, 1, 1)), padding=1, name="pointwise padded"),
        Conv(np.ones((2, 1, 3, 3)), padding=2, dilation=2, groups=2, name="dilated dw"),
        Conv(np.ones((2, 2, 2, 2)), padding=((1, 0), (0, 0)), name="one side"),
        Conv(np.ones((2, 2, 3, 3)), padding=((1, -1), (1, 1)), stride=2, name="pad and crop"),
    ],
    ids=lambda conv: conv.name,
)
def test_norm_before_a_padded_conv_is_refused_at_the_conv(conv: Conv) -> None:
    bn = integer_bn(gamma=[1.0, 2.0], beta=[0.5, 0.0], mean=[0.0, 1.0])  # c = (0.5, -2)
    error = fold_error(Sequential(Norm(bn, name="bn"), conv))
    message = str(error)
    assert error.node is conv, f"the map whose padding cannot move; got {error.node!r}"
    assert f"Conv '{conv.name}' pads with zeros after Norm 'bn'" in message, message
    assert "output at zero input is 0.5 at channel 0" in message, message


def test_norm_before_a_padded_conv_folds_when_its_output_at_zero_is_zero() -> None:
    # the condition is the output at zero input, not the presence of a BN
    bn = integer_bn(gamma=[2.0, -1.0], beta=[2.0, -3.0], mean=[1.0, 3.0])
    np.testing.assert_array_equal(bn.output_at_zero(), [0.0, 0.0], err_msg="beta = mean gamma")
    kernel = small_integers(np.random.default_rng(22), (3, 2, 3, 3))
    tree = Sequential(Norm(bn), Conv(kernel, padding=1))
    folded = fold(tree)
    np.testing.assert_array_equal(
        folded.kernel, kernel * np.array([2.0, -1.0])[None, :, None, None], err_msg="W s"
    )
    x = small_integers(np.random.default_rng(23), (1, 2, 4, 5))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def naive_fold(bn: BatchNorm, conv: Conv) -> Conv:
    """The conv a naive converter writes: the BN folded into the input side of a padded conv."""
    s, c = bn.scale(np.float64), bn.output_at_zero().astype(np.float64)
    bias = np.einsum("oihw,i->o", conv.kernel, c) + (0.0 if conv.bias is None else conv.bias)
    return Conv(conv.kernel * s[None, :, None, None], bias, padding=conv.padding)


def test_the_border_error_of_a_norm_folded_into_a_padded_conv_by_hand() -> None:
    # f(x) = 2x - 0.5 (c = -0.5), then a 3x3 of ones with zero padding 1. The naive conv
    # reads c where the train form reads 0: the error is +0.5 per padded tap, 5 at a
    # corner, 3 on an edge, none inside.
    bn = integer_bn(gamma=[2.0], beta=[0.5], mean=[0.5])
    conv = Conv(np.ones((1, 1, 3, 3)), padding=1)
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    error = evaluate(Sequential(Norm(bn), conv), x) - evaluate(naive_fold(bn, conv), x)
    expected = np.array(
        [
            [2.5, 1.5, 1.5, 1.5, 2.5],
            [1.5, 0.0, 0.0, 0.0, 1.5],
            [1.5, 0.0, 0.0, 0.0, 1.5],
            [2.5, 1.5, 1.5, 1.5, 2.5],
        ]
    )
    np.testing.assert_array_equal(error[0, 0], expected, err_msg="-c times the padded taps")


@pytest.mark.parametrize("padding", [1, 2])
def test_the_border_error_is_zero_inside_and_non_zero_on_every_border_pixel(padding: int) -> None:
    rng = np.random.default_rng(24 + padding)
    channels, size = 3, 2 * padding + 1
    s = rng.uniform(0.5, 2.0, channels)
    mean = rng.normal(size=channels)
    at_zero = rng.uniform(0.5, 1.5, channels)  # one sign: no cancellation on the ring
    bn = BatchNorm(s, at_zero + mean * s, mean, np.ones(channels), eps=0.0)
    conv = Conv(
        rng.uniform(0.5, 1.5, (2, channels, size, size)), rng.normal(size=2), padding=padding
    )
    train = Sequential(Norm(bn), conv)
    assert fold_error(train).node is conv, "refused at the conv: the error below is why"
    x = rng.normal(size=(1, channels, 7, 8))
    error = evaluate(train, x) - evaluate(naive_fold(bn, conv), x)
    # the naive conv reads c on the border ring of the padded input; the train form reads 0
    ring = np.zeros((1, channels, 7 + 2 * padding, 8 + 2 * padding))
    ring[..., :padding, :] = ring[..., -padding:, :] = 1.0
    ring[..., :, :padding] = ring[..., :, -padding:] = 1.0
    expected = -conv2d_loops(ring * bn.output_at_zero()[None, :, None, None], conv.kernel)
    scale = float(np.max(magnitude(train, x)))
    assert_close(error, expected, dtype=np.float64, scale=scale, what="-conv(ring of c, W)")
    border = np.ones((7, 8), dtype=bool)
    border[padding:-padding, padding:-padding] = False
    inside = error[..., ~border]
    assert_close(
        inside,
        np.zeros_like(inside),
        dtype=np.float64,
        scale=scale,
        what="inside, the zero pad is never read",
    )
    assert np.all(np.abs(error[..., border]) > 0.1), "every border pixel is wrong"


# ====================================================================== dilation


@pytest.mark.parametrize(
    ("size", "rate", "padding", "stride", "groups"),
    [
        ((3, 3), (2, 2), 2, 1, 1),
        ((3, 3), (3, 1), (3, 1), 1, 2),
        ((2, 2), (2, 2), 1, 1, 1),
        ((2, 3), (3, 2), 0, 2, 2),
        ((1, 3), (4, 2), (0, 2), (1, 2), 1),
    ],
)
def test_a_dilated_conv_is_the_undilated_kernel_with_zeros_between_taps(
    size: tuple[int, int], rate: tuple[int, int], padding: Any, stride: Any, groups: int
) -> None:
    rng = np.random.default_rng(30)
    kernel, bias = small_integers(rng, (4, 4 // groups, *size)), small_integers(rng, (4,))
    kwargs: dict[str, Any] = {"padding": padding, "stride": stride, "groups": groups}
    conv = Conv(kernel, bias, dilation=rate, **kwargs)
    x = small_integers(rng, (2, 4, 9, 8))
    by_definition = conv2d_loops(x, kernel, bias, dilation=rate, **kwargs)
    written_out = conv2d_loops(x, zeros_between_taps(kernel, conv.dilation), bias, **kwargs)
    np.testing.assert_array_equal(by_definition, written_out, err_msg="the law, by loops")
    np.testing.assert_array_equal(evaluate(conv, x), by_definition, err_msg="evaluate")
    folded = fold(conv)
    assert folded.dilation == conv.dilation, f"one conv keeps its dilation; {folded.dilation}"
    np.testing.assert_array_equal(folded.kernel, kernel, err_msg="the taps, not written out")
    np.testing.assert_array_equal(folded(x), by_definition, err_msg="the fold")
    # summed with an undilated branch of the same span, the kernel is written out
    span = zeros_between_taps(kernel, conv.dilation).shape[2:]
    undilated = fold(Parallel(conv, Conv(np.zeros((4, 4 // groups, *span)), **kwargs)))
    assert undilated.dilation == (1, 1), f"rates r and 1: written out; {undilated.dilation}"
    np.testing.assert_array_equal(
        undilated.kernel, zeros_between_taps(kernel, conv.dilation), err_msg="zeros between"
    )


def test_dilation_along_an_axis_of_one_tap_is_dropped() -> None:
    assert Conv(np.ones((1, 1, 1, 3)), dilation=2).dilation == (1, 2), "1 x 3 at 2: (1, 2)"
    assert Conv(np.ones((1, 1, 1, 1)), dilation=(3, 5)).dilation == (1, 1), "a 1x1: (1, 1)"
    conv = Conv(np.ones((2, 1, 3, 3)), dilation=2, groups=2)
    assert output_size(conv, 7, 6) == (3, 2), "span 5: 7 - 5 + 1, 6 - 5 + 1"
    assert multiply_adds(conv, 7, 6) == 18 * 6, "taps, not span: 18 weights at 6 pixels"


def test_a_sum_of_one_dilation_keeps_it() -> None:
    rng = np.random.default_rng(31)
    c = 2
    w3, w5, w1 = (small_integers(rng, (c, c, k, k)) for k in (3, 5, 1))
    tree = Parallel(
        Conv(w3, padding=2, dilation=2),
        Conv(w5, padding=4, dilation=2),
        Conv(w1),
        Identity(c),
    )
    folded = fold(tree)
    assert folded.dilation == (2, 2), f"every branch on the grid of 2: kept; {folded.dilation}"
    assert folded.kernel.shape == (c, c, 5, 5), f"5 taps at 2, not 9; {folded.kernel.shape}"
    assert folded.pads == ((4, 4), (4, 4)), f"the widest branch's padding; {folded.pads}"
    expected = w5.copy()
    expected[:, :, 1:4, 1:4] += w3
    expected[:, :, 2, 2] += w1[:, :, 0, 0] + np.eye(c)
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="centred on the grid")
    x = small_integers(rng, (1, c, 9, 9))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_a_window_off_the_grid_is_written_out() -> None:
    # a 3x1 at dilation 2 (rows 0, 2, 4 of its window) and a 1x1 reading row 1 of it
    rng = np.random.default_rng(32)
    tall, dot = small_integers(rng, (1, 1, 3, 1)), small_integers(rng, (1, 1, 1, 1))
    tree = Parallel(
        Conv(tall, padding=((2, 2), (0, 0)), dilation=(2, 1)),
        Conv(dot, padding=((1, -1), (0, 0))),
    )
    folded = fold(tree)
    assert folded.dilation == (1, 1), f"row 1 is not on the grid of 2; {folded.dilation}"
    expected = np.zeros((1, 1, 5, 1))
    expected[:, :, ::2] = tall
    expected[:, :, 1] += dot[:, :, 0]
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="rows 0, 2, 4 and row 1")
    x = small_integers(rng, (1, 1, 6, 3))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def test_an_even_kernel_at_dilation_2_is_the_corners_of_a_3x3() -> None:
    # RepNeXt-style: a 2x2 at dilation 2 spans 3 pixels, so padding 1 centres it
    rng = np.random.default_rng(33)
    c = 3
    dense, corners = small_integers(rng, (c, 1, 3, 3)), small_integers(rng, (c, 1, 2, 2))
    tree = Parallel(
        Conv(dense, padding=1, groups=c), Conv(corners, padding=1, dilation=2, groups=c)
    )
    folded = fold(tree)
    expected = dense.copy()
    expected[:, :, ::2, ::2] += corners
    assert folded.dilation == (1, 1), f"rates 1 and 2: written out; {folded.dilation}"
    np.testing.assert_array_equal(folded.kernel, expected, err_msg="the 2x2 on the corners")
    x = small_integers(rng, (2, c, 5, 6))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


def dilated_reparam_block(
    rng: np.random.Generator, channels: int, big: int, sizes: list[int], rates: list[int]
) -> tuple[Parallel, list[tuple[Array, Array, int]]]:
    """UniRepLKNet's DilatedReparamBlock: a dw big x big conv + BN and dw dilated convs + BN.

    Returns the tree and, per branch, the BN-folded kernel, bias and dilation.
    """
    branches: list[Node] = []
    fused = []
    for k, r in [(big, 1), *zip(sizes, rates, strict=True)]:
        kernel, bn = rng.normal(size=(channels, 1, k, k)), random_bn(rng, channels)
        conv = Conv(kernel, padding=r * (k - 1) // 2, dilation=r, groups=channels)
        branches.append(Sequential(conv, Norm(bn)))
        w, b = fuse_bn(kernel, bn)
        fused.append((w, b, r))
    return Parallel(*branches), fused


@pytest.mark.parametrize(
    ("big", "sizes", "rates"),
    [
        (13, [5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
        (17, [5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    ],
    ids=["K=13", "K=17"],
)
def test_unireplknet_dilated_reparam_block(big: int, sizes: list[int], rates: list[int]) -> None:
    rng = np.random.default_rng(big)
    channels = 2
    tree, fused = dilated_reparam_block(rng, channels, big, sizes, rates)
    folded = fold(tree)
    assert folded.kernel.shape == (channels, 1, big, big), f"one {big}x{big}; {folded}"
    assert folded.dilation == (1, 1), f"several rates: written out; {folded.dilation}"
    assert folded.padding == (big // 2, big // 2), f"padding K // 2; {folded.pads}"
    expected, terms = np.zeros((channels, 1, big, big)), np.zeros((channels, 1, big, big))
    for w, _, r in fused:
        span = r * (w.shape[2] - 1) + 1
        start = (big - span) // 2
        window = slice(start, start + span, r)
        expected[:, :, window, window] += w
        terms[:, :, window, window] += np.abs(w)
    assert_close(
        folded.kernel,
        expected,
        dtype=np.float64,
        scale=float(terms.max()),
        what="sum of the zero-inserted kernels, centred",
    )
    biases = [b for _, b, _ in fused]
    assert_close(
        folded.bias,
        sum(biases),
        dtype=np.float64,
        scale=float(np.max(sum(np.abs(b) for b in biases))),
        what="biases add",
    )
    assert_folds(tree, rng.normal(size=(1, channels, 9, 8)), dtype=np.float64, what="block")


@pytest.mark.parametrize("rate", [2, 3, 5])
def test_unireplknet_conversion_by_transposed_conv_is_the_zero_insertion(rate: int) -> None:
    # UniRepLKNet's convert_dilated_to_nondilated: conv_transpose2d(kernel, ones(1,1,1,1),
    # stride=r), per input channel; the same array as r - 1 zeros between the taps.
    torch = pytest.importorskip("torch")
    kernel = np.random.default_rng(rate).normal(size=(3, 1, 3, 3))
    theirs = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(kernel), torch.ones(1, 1, 1, 1, dtype=torch.float64), stride=rate
    ).numpy()
    np.testing.assert_array_equal(zeros_between_taps(kernel, (rate, rate)), theirs, err_msg="r")
    # a zero 1x1 reading pixel (1, 1) of the window, off the grid of r: written out
    off_grid = Conv(np.zeros((3, 1, 1, 1)), groups=3, padding=((1, -1), (1, -1)))
    written_out = fold(Parallel(Conv(kernel, padding=rate, dilation=rate, groups=3), off_grid))
    assert written_out.dilation == (1, 1), f"off the grid: written out; {written_out.dilation}"
    np.testing.assert_array_equal(written_out.kernel, theirs, err_msg="fold's written-out kernel")


def test_a_dilated_conv_then_norm_or_scale_keeps_its_dilation() -> None:
    rng = np.random.default_rng(34)
    kernel = small_integers(rng, (2, 3, 3, 3))
    bn = integer_bn(gamma=[2.0, -1.0], beta=[1.0, 0.0], mean=[0.0, 1.0])
    for tree in (
        Sequential(Conv(kernel, padding=2, dilation=2), Norm(bn)),
        Sequential(Conv(kernel, padding=2, dilation=2), Scale([2.0, -1.0])),
    ):
        folded = fold(tree)
        assert folded.dilation == (2, 2), f"a channelwise map keeps the dilation; {tree}"
        assert folded.kernel.shape == (2, 3, 3, 3), f"3 taps, not 5; {folded.kernel.shape}"
        np.testing.assert_array_equal(
            folded.kernel, kernel * np.array([2.0, -1.0])[:, None, None, None], err_msg="W s"
        )
        x = small_integers(rng, (1, 3, 6, 7))
        np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")
    before = Sequential(
        Norm(integer_bn([2.0, 1.0, -1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 1.0])),
        Conv(kernel, dilation=(1, 2)),
    )
    folded = fold(before)
    assert folded.dilation == (1, 2), f"a BN before an unpadded dilated conv too; {folded}"
    x = small_integers(rng, (1, 3, 6, 7))
    np.testing.assert_array_equal(folded(x), evaluate(before, x), err_msg="integers: exact")


def composed_by_loops(first: Conv, second: Conv) -> tuple[Array, Array]:
    """Two dense (groups 1, no padding between) convs, written out undilated, composed by loops.

    ``K[o, i, s1 v + u] = sum_m W2[o, m, v] W1[m, i, u]``,
    ``b = b2 + sum_{m, v} W2[o, m, v] b1[m]``.
    """
    w1 = zeros_between_taps(first.kernel, first.dilation)
    w2 = zeros_between_taps(second.kernel, second.dilation)
    (a_h, a_w), (c_h, c_w), (s_h, s_w) = w1.shape[2:], w2.shape[2:], first.stride
    kernel = np.zeros((w2.shape[0], w1.shape[1], a_h + s_h * (c_h - 1), a_w + s_w * (c_w - 1)))
    for y in range(c_h):
        for x in range(c_w):
            for u in range(a_h):
                for v in range(a_w):
                    kernel[:, :, s_h * y + u, s_w * x + v] += w2[:, :, y, x] @ w1[:, :, u, v]
    b1 = np.zeros(w1.shape[0]) if first.bias is None else first.bias
    b2 = np.zeros(w2.shape[0]) if second.bias is None else second.bias
    return kernel, b2 + np.einsum("omyx,m->o", w2, b1)


@pytest.mark.parametrize(
    ("first_rate", "first_stride", "second_rate"),
    [(2, 1, 3), (2, 2, 2), ((1, 3), (2, 1), (2, 1))],
)
def test_two_dilated_convs_compose_written_out(
    first_rate: Any, first_stride: Any, second_rate: Any
) -> None:
    rng = np.random.default_rng(35)
    first = Conv(
        small_integers(rng, (3, 2, 3, 3)),
        small_integers(rng, (3,)),
        padding=2,
        dilation=first_rate,
        stride=first_stride,
    )
    second = Conv(
        small_integers(rng, (2, 3, 3, 2)), small_integers(rng, (2,)), dilation=second_rate
    )
    tree = Sequential(first, second)
    folded = fold(tree)
    kernel, bias = composed_by_loops(first, second)
    assert folded.dilation == (1, 1), f"a general map writes both out; {folded.dilation}"
    np.testing.assert_array_equal(folded.kernel, kernel, err_msg="taps at s1 v + u, undilated")
    np.testing.assert_array_equal(folded.bias, bias, err_msg="b2 + sum W2 b1")
    assert folded.pads == first.padding, f"the first conv's padding; {folded.pads}"
    x = small_integers(rng, (1, 2, 14, 15))
    np.testing.assert_array_equal(folded(x), evaluate(tree, x), err_msg="integers: exact")


# ======================================================== FoldError.node, per kind


def _refusals() -> list[tuple[str, Node, Node, str]]:
    """(kind, tree, the node the refusal names, a phrase of the message)."""
    three = np.ones((1, 1, 3, 3))
    cases: list[tuple[str, Node, Node, str]] = []

    padded = Conv(three, padding=1, name="padded")
    cases.append(
        (
            "BN before a padded conv",
            Sequential(Norm(integer_bn([1.0], [1.0], [0.0])), padded),
            padded,
            "pads with zeros after",
        )
    )
    pad = Pad(1, name="pad")
    cases.append(
        (
            "padding after a kxk map",
            Sequential(Conv(three), pad, Conv(three)),
            pad,
            "padding after such a map is not padding of its input",
        )
    )
    second = Conv(three, padding=1, name="second")
    cases.append(
        (
            "a padded conv after a kxk map",
            Sequential(Conv(three), second),
            second,
            "padding after such a map",
        )
    )
    crop_pad = Pad(1, name="after crop")
    cases.append(
        (
            "padding after a crop",
            Sequential(Conv(np.ones((1, 1, 1, 1)), padding=-1), crop_pad),
            crop_pad,
            "cropping then padding",
        )
    )
    strides = Parallel(Conv(three, padding=1, stride=2), Conv(three, padding=1), name="strides")
    cases.append(("branches of different strides", strides, strides, "different strides"))
    sizes = Parallel(Conv(three, padding=1), Conv(three, padding=(1, 0)), name="sizes")
    cases.append(("branches of different sizes", sizes, sizes, "different output sizes"))
    valued = Parallel(Sequential(Pad(1, [1.0]), Conv(three)), Conv(three, padding=1), name="v")
    cases.append(("a branch pads with values", valued, valued, "pads its input with non-zero"))
    relu = ReLU(name="act")
    cases.append(
        (
            "a nonlinearity",
            Parallel(Identity(1), Sequential(Conv(three, padding=1), relu)),
            relu,
            "is not linear",
        )
    )
    pool = AvgPool(1, 3, stride=1, padding=1, count_include_pad=False, name="pool")
    cases.append(
        (
            "a pool excluding padding",
            Sequential(Conv(three, padding=1), pool),
            pool,
            "count_include_pad=False",
        )
    )
    at_input = Pad(1, [2.0], name="valued")
    cases.append(
        (
            "non-zero padding at the input",
            Sequential(at_input, Conv(three)),
            at_input,
            "pads its input with non-zero values",
        )
    )
    inner = Conv(np.ones((1, 1, 1, 1)), padding=1, name="inner")
    nested = Parallel(Identity(1), Sequential(Scale(2.0, 1.0, channels=1), inner))
    cases.append(
        ("a biased scale before a padded 1x1, nested", nested, inner, "output at zero input is 1")
    )
    return cases


REFUSALS = _refusals()


@pytest.mark.parametrize(("kind", "tree", "node", "phrase"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_fold_error_names_the_node_where_the_tree_stops_being_one_conv(
    kind: str, tree: Node, node: Node, phrase: str
) -> None:
    error = fold_error(tree)
    assert type(error) is FoldError, f"{kind}: a FoldError, not a subclass; got {type(error)}"
    assert issubclass(FoldError, ReparamError), "one exception hierarchy: a ReparamError"
    assert error.node is node, f"{kind}: expected {node!r}, got {error.node!r}"
    assert str(error).startswith("fold: ") and phrase in str(error), f"{kind}: {error}"


def test_fold_error_node_defaults_to_none() -> None:
    assert FoldError("message").node is None, "constructed without a node: None"


# ============================================= properties: random trees that fold


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=tree_cases(depth=2, extended=True))
def test_trees_with_scales_linears_and_dilations_fold_to_what_they_compute(
    dtype: type, case: TreeCase
) -> None:
    tree, x = case.make(dtype)
    folded = fold(tree)
    assert isinstance(folded, FoldedConv), f"fold returns a FoldedConv; got {type(folded)}"
    deploy, train = folded(x), evaluate(tree, x)
    assert train.dtype == np.dtype(dtype), f"evaluate keeps {dtype}; got {train.dtype}"
    scale = float(np.max(magnitude(tree, x), initial=0.0))
    assert_close(deploy, train, dtype=dtype, scale=scale, what=f"fold vs evaluate {case}")


def _has_arrays(spec: Spec) -> bool:
    """Whether the built tree holds arrays of the build dtype (a number scale holds none)."""
    return any(
        isinstance(leaf, ConvSpec | LinearSpec | NormSpec | PadSpec)
        or (
            isinstance(leaf, ScaleSpec)
            and any(isinstance(value, tuple) for value in (leaf.scale, leaf.bias))
        )
        for leaf in leaves(spec)
    )


@given(case=tree_cases(depth=2, extended=True))
def test_float32_fold_of_extended_trees_is_the_float64_fold_rounded_once(case: TreeCase) -> None:
    tree, _x = case.make(np.float32)
    folded, wide = fold(tree), fold(cast_tree(tree, np.float64))
    expected = np.float32 if _has_arrays(case.tree) else np.float64
    assert folded.kernel.dtype == folded.bias.dtype == expected, (
        f"float32 arrays in, float32 out (number scales take the data's dtype); got "
        f"{folded.kernel.dtype} for {case}"
    )
    np.testing.assert_array_equal(folded.kernel, wide.kernel.astype(expected), "kernel")
    np.testing.assert_array_equal(folded.bias, wide.bias.astype(expected), "bias")
    assert (folded.stride, folded.pads, folded.groups, folded.dilation) == (
        wide.stride,
        wide.pads,
        wide.groups,
        wide.dilation,
    ), "the geometry does not depend on the dtype"


@given(case=tree_cases(depth=2, extended=True))
def test_extended_output_size_and_magnitude_agree_with_evaluate(case: TreeCase) -> None:
    tree, x = case.make(np.float64)
    train = evaluate(tree, x)
    size = output_size(tree, case.height, case.width)
    assert train.shape[2:] == size, f"output_size {size}, evaluate {train.shape}"
    bound = magnitude(tree, x)
    slack = TOLERANCE[np.dtype(np.float64)] * float(np.max(bound, initial=0.0))
    assert np.all(np.abs(train) <= bound + slack), "|evaluate| <= magnitude, elementwise"


@st.composite
def heads(draw: st.DrawFn) -> tuple[Spec, int, int]:
    """A classifier head: stages of [BN or scale] Linear [BN] [scale], maybe plus a skip."""
    channels = [draw(st.integers(1, 5))]
    steps: list[Spec] = []
    for _ in range(draw(st.integers(1, 3))):
        c_in, c_out = channels[-1], draw(st.integers(1, 5))
        if draw(st.booleans()):
            steps.append(NormSpec(draw(bn_stats(c_in))))
        elif draw(st.booleans()):
            steps.append(draw(scale_specs(c_in)))
        steps.append(LinearSpec(c_out, c_in, draw(st.booleans()), draw(seeds)))
        if draw(st.booleans()):
            steps.append(NormSpec(draw(bn_stats(c_out))))
        if draw(st.booleans()):
            steps.append(draw(scale_specs(c_out)))
        channels.append(c_out)
    spec: Spec = SequentialSpec(tuple(steps))
    if channels[0] == channels[-1] and draw(st.booleans()):
        spec = ParallelSpec((spec, draw(scale_specs(channels[0]))))
    return spec, channels[0], draw(seeds)


@pytest.mark.parametrize("dtype", DTYPES)
@given(head=heads(), batch=st.integers(1, 4))
def test_heads_on_features_fold_to_one_fully_connected_layer(
    dtype: type, head: tuple[Spec, int, int], batch: int
) -> None:
    spec, channels, seed = head
    tree = build(spec, dtype)
    features = random_array(np.random.default_rng(seed), (batch, channels), dtype)
    train = evaluate(tree, features)
    assert train.ndim == 2, f"(N, C) in, (N, C) out; got {train.shape}"
    scale = float(np.max(magnitude(tree, features), initial=0.0))
    weight, bias = fold(tree).as_linear()
    assert_close(fold(tree)(features), train, dtype=dtype, scale=scale, what=f"conv {spec}")
    deploy = features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    assert_close(deploy, train, dtype=dtype, scale=scale, what=f"x W^T + b {spec}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(max_batch=2))
def test_a_dilated_conv_matches_torch_and_its_written_out_kernel(
    dtype: type, case: ConvCase
) -> None:
    torch = pytest.importorskip("torch")
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    conv = Conv(kernel, bias, **kwargs)
    as_tensor = [
        None if a is None else torch.from_numpy(a.astype(np.float64)) for a in (x, kernel, bias)
    ]
    oracle = torch.nn.functional.conv2d(*as_tensor, **kwargs).numpy()
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(evaluate(conv, x), oracle, dtype=dtype, scale=scale, what=f"evaluate {case}")
    assert_close(fold(conv)(x), oracle, dtype=dtype, scale=scale, what=f"fold {case}")
    undilated = {**kwargs, "dilation": 1}
    written: Any = zeros_between_taps(kernel, conv.dilation).astype(dtype)
    assert_close(
        evaluate(Conv(written, bias, **undilated), x),
        oracle,
        dtype=dtype,
        scale=scale,
        what=f"zeros between the taps {case}",
    )


# ============================================================ the strategy itself


def _finds(condition: Callable[[TreeCase], bool]) -> TreeCase:
    return find(
        tree_cases(depth=2, extended=True),
        condition,
        settings=settings(
            max_examples=2000,
            database=None,
            derandomize=True,  # deterministic, so a coverage gap cannot flake
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )


def _scales(case: TreeCase) -> list[ScaleSpec]:
    return [leaf for leaf in leaves(case.tree) if isinstance(leaf, ScaleSpec)]


def _convs(case: TreeCase) -> list[ConvSpec]:
    return [leaf for leaf in leaves(case.tree) if isinstance(leaf, ConvSpec)]


def _sequences(spec: Spec) -> list[SequentialSpec]:
    if isinstance(spec, ParallelSpec):
        return [s for branch in spec.branches for s in _sequences(branch)]
    if isinstance(spec, SequentialSpec):
        return [spec, *(s for step in spec.steps for s in _sequences(step))]
    return []


def _map_after_channelwise(case: TreeCase) -> bool:
    """A BN, or a scale with a bias, directly before a conv or linear layer."""
    for sequence in _sequences(case.tree):
        for before, after in itertools.pairwise(sequence.steps):
            at_zero = isinstance(before, NormSpec) or (
                isinstance(before, ScaleSpec) and before.bias is not None
            )
            if at_zero and isinstance(after, ConvSpec | LinearSpec):
                return True
    return False


def _values(spec: ScaleSpec) -> list[float]:
    scale = spec.scale if isinstance(spec.scale, tuple) else (spec.scale,)
    return list(scale)


EXTENDED_COVERAGE: dict[str, Callable[[TreeCase], bool]] = {
    "a number scale": lambda c: any(isinstance(s.scale, float) for s in _scales(c)),
    "a per-channel scale": lambda c: any(isinstance(s.scale, tuple) for s in _scales(c)),
    "a negative scale": lambda c: any(min(_values(s)) < 0 for s in _scales(c)),
    "a zero scale": lambda c: any(0.0 in _values(s) for s in _scales(c)),
    "a scale with a bias": lambda c: any(s.bias is not None for s in _scales(c)),
    "a linear layer": lambda c: any(isinstance(leaf, LinearSpec) for leaf in leaves(c.tree)),
    "a dilated conv": lambda c: any(max(conv.dilation) > 1 for conv in _convs(c)),
    "a dilation of 3": lambda c: any(3 in conv.dilation for conv in _convs(c)),
    "a BN or biased scale before a map": _map_after_channelwise,
    "a fold that keeps a dilation": lambda c: fold(c.make(np.float64)[0]).dilation != (1, 1),
    "a strided dilated conv": lambda c: any(
        max(conv.dilation) > 1 and max(conv.stride) > 1 for conv in _convs(c)
    ),
}


@pytest.mark.parametrize("name", EXTENDED_COVERAGE)
def test_extended_tree_cases_reach(name: str) -> None:
    found = _finds(EXTENDED_COVERAGE[name])
    assert EXTENDED_COVERAGE[name](found), f"find() returned a case without {name}"


@given(case=tree_cases(depth=2))
def test_default_tree_cases_draw_none_of_the_new_kinds(case: TreeCase) -> None:
    kinds = {type(leaf).__name__ for leaf in leaves(case.tree)}
    assert not kinds & {"ScaleSpec", "LinearSpec"}, f"the older tests' trees: {case}"
    assert all(conv.dilation == (1, 1) for conv in _convs(case)), f"undilated: {case}"


@given(case=tree_cases(depth=2, extended=True))
def test_extended_tree_cases_are_valid(case: TreeCase) -> None:
    for spec in _scales(case):
        for value in (spec.scale, spec.bias):
            assert not isinstance(value, tuple) or len(value) == spec.channels, f"{spec}"
    for conv in _convs(case):
        assert min(conv.dilation) >= 1 and max(conv.dilation) <= 3, f"rates 1 to 3: {conv}"
    tree, x = case.make(np.float64)
    assert min(evaluate(tree, x).shape[2:]) >= 1, f"an input that fits: {case}"
