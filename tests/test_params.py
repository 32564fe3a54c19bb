"""BatchNorm (the container), ConvBias and batch_norm (applying a BatchNorm)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import batch_norm_loops, bn_scale
from strategies import BNStats, bn_stats, random_array, seeds
from tolerances import DTYPES, assert_close

from reparam import BatchNorm, ConvBias, batch_norm

# ------------------------------------------------------------ tier 1: by pencil


def test_hand_batch_norm() -> None:
    # gamma 2, beta 1, mean 3, var 4: (5 - 3) * 2 / 2 + 1 = 3; channel 2: (x - 0) * -1 / 1 + 0
    bn = BatchNorm([2.0, -1.0], [1.0, 0.0], [3.0, 0.0], [4.0, 1.0], eps=0.0)
    x = np.array([[[5.0, 7.0], [2.0, -4.0]]])  # (N=1, C=2, L=2)
    np.testing.assert_array_equal(
        batch_norm(x, bn), [[[3.0, 5.0], [-2.0, 4.0]]], err_msg="per-channel affine map"
    )


def test_unpacks_like_a_tuple() -> None:
    bn = BatchNorm(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), eps=1e-3)
    gamma, beta, mean, var, eps = bn
    assert eps == 1e-3, f"eps unpacks last; got {eps}"
    for array, name in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var")):
        assert array.shape == (3,), f"{name} unpacks with shape (3,); got {array.shape}"
    assert bn.channels == 3, f"channels {bn.channels}"
    assert "channels=3" in repr(bn), f"repr names the channel count: {bn!r}"
    kernel, bias = ConvBias(np.ones((1, 1, 1, 1)), np.zeros(1))
    assert kernel.shape == (1, 1, 1, 1) and bias.shape == (1,), "ConvBias unpacks as a pair"


# --------------------------------------------------------------- the container


def test_arrays_are_read_only_copies() -> None:
    arrays = [np.array([1.0, 2.0]), np.array([0.5, 0.5]), np.array([0.0, 1.0]), np.ones(2)]
    before = [a.copy() for a in arrays]
    bn = BatchNorm(arrays[0], arrays[1], arrays[2], arrays[3])
    for name in ("gamma", "beta", "mean", "var"):
        stored = getattr(bn, name)
        assert not stored.flags.writeable, f"{name} must be read-only"
        with pytest.raises(ValueError, match="read-only"):
            stored[0] = 42.0
        for original in arrays:
            assert not np.shares_memory(stored, original), f"{name} shares the caller's memory"
    arrays[0][0] = 99.0
    assert bn.gamma[0] == 1.0, "changing the caller's array later does not reach the BatchNorm"
    for original, copy in zip(arrays[1:], before[1:], strict=True):
        np.testing.assert_array_equal(original, copy, err_msg="BatchNorm mutated an input")
    with pytest.raises(AttributeError, match="cannot assign to field 'eps'"):
        bn.eps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((np.float32,) * 4, np.float32),
        ((np.float16,) * 4, np.float16),
        ((np.float32, np.float32, np.float64, np.float32), np.float64),
        ((np.float16, np.float32, np.float16, np.float16), np.float32),
    ],
)
def test_common_dtype(dtypes: tuple[type, ...], expected: type) -> None:
    arrays: list[npt.NDArray[Any]] = [np.ones(2, dtype=d) for d in dtypes]
    bn = BatchNorm(arrays[0], arrays[1], arrays[2], arrays[3])
    assert bn.dtype == np.dtype(expected), f"{dtypes} stored as {bn.dtype}"
    for name in ("gamma", "beta", "mean", "var"):
        assert getattr(bn, name).dtype == np.dtype(expected), f"{name} has the common dtype"


@pytest.mark.parametrize("eps", [np.float64(1e-5), np.float32(1e-3), 1e-5, 0, np.int64(0)])
def test_eps_is_a_python_float(eps: Any) -> None:
    ones = np.ones(2, dtype=np.float32)
    bn = BatchNorm(ones, ones, ones, ones, eps=eps)
    assert type(bn.eps) is float, f"eps stored as a Python float; got {type(bn.eps)}"
    assert bn.eps == float(eps), f"eps value kept; got {bn.eps}"
    y = batch_norm(np.ones((1, 2, 2, 2), dtype=np.float32), bn)
    assert y.dtype == np.float32, f"np.float64 eps must not upcast float32; got {y.dtype}"


def test_astype_keeps_eps_and_validates() -> None:
    bn = BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.full(2, 0.25), eps=1e-3)
    narrow = bn.astype(np.float32)
    assert narrow.dtype == np.float32 and narrow.eps == 1e-3, f"astype gave {narrow!r}"
    assert not narrow.var.flags.writeable, "astype returns a frozen BatchNorm too"


@pytest.mark.parametrize("dtype", DTYPES)
@given(stats=st.integers(1, 6).flatmap(bn_stats))
def test_strategy_stats_build_and_round_trip(dtype: type, stats: BNStats) -> None:
    bn = stats.make(dtype)
    for name in ("gamma", "beta", "mean", "var"):
        expected: npt.NDArray[Any] = np.array(getattr(stats, name), dtype=dtype)
        np.testing.assert_array_equal(getattr(bn, name), expected, err_msg=f"{name} stored")
    assert bn.eps == stats.eps, f"eps {bn.eps} != {stats.eps}"


def test_array_likes_go_in() -> None:
    torch = pytest.importorskip("torch")
    from_lists = BatchNorm([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [1.0, 4.0])
    gamma, beta, mean, var = (torch.tensor(v) for v in ([1, 2.0], [0, 0.0], [1, 1.0], [1, 4.0]))
    from_torch = BatchNorm(gamma, beta, mean, var)
    assert from_torch.dtype == np.float32, f"torch float32 stays float32; got {from_torch.dtype}"
    np.testing.assert_array_equal(from_lists.var, [1.0, 4.0], err_msg="lists accepted")
    y = batch_norm(torch.ones(1, 2, 1, 1), from_torch)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32, f"got {type(y)} {y.dtype}"


# ------------------------------------------------------------------ batch_norm


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 5)).flatmap(
        lambda nc: st.tuples(st.just(nc), st.lists(st.integers(1, 4), max_size=2))
    ),
    seed=seeds,
    data=st.data(),
)
def test_batch_norm_matches_definition(
    dtype: type, shape: tuple[tuple[int, int], list[int]], seed: int, data: st.DataObject
) -> None:
    (n, c), trailing = shape
    bn = data.draw(bn_stats(c), label="bn").make(dtype)
    x = random_array(np.random.default_rng(seed), (n, c, *trailing), dtype, scale=10.0)
    before = x.copy()
    result = batch_norm(x, bn)
    assert result.dtype == np.dtype(dtype), f"batch_norm keeps {dtype}; got {result.dtype}"
    assert not np.shares_memory(result, x), "batch_norm returns a new array"
    np.testing.assert_array_equal(x, before, err_msg="batch_norm mutated x")
    axes = (slice(None), *([None] * len(trailing)))
    magnitude = (
        np.abs(bn_scale(bn))[axes]
        * (np.abs(x.astype(np.float64)) + np.abs(bn.mean.astype(np.float64))[axes])
        + np.abs(bn.beta.astype(np.float64))[axes]
    )
    scale = float(np.max(magnitude, initial=0.0))
    assert_close(result, batch_norm_loops(x, bn), dtype=dtype, scale=scale, what="batch_norm")


def test_float32_batch_norm_factor_is_computed_in_float64_and_rounded_once() -> None:
    """The documented contract, bit for bit: ``gamma / sqrt(var + eps)`` in float64, rounded once.

    The statistics are chosen so that computing the factor in float32 arithmetic
    (two roundings more) gives a different float32 factor on some channels, so a
    regression to float32 arithmetic, in ``batch_norm`` or in ``BatchNorm.scale``,
    fails here; the 2e-5 tolerance of the definition test above cannot see 1 ulp.
    """
    rng = np.random.default_rng(0)
    channels, eps = 16, 1e-5
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
    mean = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
    var = rng.uniform(0.1, 4.0, channels).astype(np.float32)
    bn = BatchNorm(gamma, beta, mean, var, eps=eps)
    x = random_array(rng, (2, channels, 3, 5), np.float32, scale=10.0)

    once = (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    in_float32 = gamma / np.sqrt(var + np.float32(eps))
    assert in_float32.dtype == np.float32, "the counterexample must be float32 arithmetic"
    differing = np.flatnonzero(once != in_float32)
    assert differing.size > 0, "no channel tells float64 rounded once from float32 arithmetic"

    scale = bn.scale(np.float32)
    assert scale.dtype == np.float32, f"BatchNorm.scale(float32) dtype {scale.dtype}"
    np.testing.assert_array_equal(
        scale,
        once,
        err_msg="BatchNorm.scale is not gamma / sqrt(var + eps) in float64 rounded once",
    )
    np.testing.assert_array_equal(bn.scale(), once, err_msg="BatchNorm.scale() in its own dtype")

    def apply(factor: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # one float32 rounding per operation: (x - mean), times the factor, plus beta
        axes = (slice(None), None, None)
        result: npt.NDArray[np.float32] = (x - mean[axes]) * factor[axes] + beta[axes]
        return result

    expected, float32_path = apply(once), apply(in_float32)
    assert expected.dtype == np.float32, f"the expected output is float32; got {expected.dtype}"
    assert not np.array_equal(expected[:, differing], float32_path[:, differing]), (
        f"the factors differ on channels {differing} but the outputs do not: the test cannot fail"
    )
    result = batch_norm(x, bn)
    assert result.dtype == np.float32, f"float32 stays float32; got {result.dtype}"
    np.testing.assert_array_equal(
        result, expected, err_msg="batch_norm's float32 factor is not the float64 one rounded once"
    )
