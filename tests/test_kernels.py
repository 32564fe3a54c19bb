"""pad_kernel and identity_kernel: by pencil, and through the convolution they feed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import conv_magnitude
from strategies import MAX_GROUPS, MAX_PER_GROUP, MAX_SIDE, random_array, seeds
from tolerances import DTYPES, assert_close

from reparam import conv2d, identity_kernel, pad_kernel

# ------------------------------------------------------------ tier 1: by pencil


def test_hand_identity_kernel_four_channels_two_groups() -> None:
    kernel = identity_kernel(4, groups=2, size=3)
    assert kernel.shape == (4, 2, 3, 3), f"shape (C, C/g, 3, 3); got {kernel.shape}"
    centre = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(kernel[:, :, 1, 1], centre, err_msg="ones at i mod (C/g)")
    assert kernel.sum() == 4.0, f"exactly one 1 per output channel; sum {kernel.sum()}"


def test_hand_identity_kernel_depthwise() -> None:
    kernel = identity_kernel(3, groups=3, size=1, dtype=np.float32)
    np.testing.assert_array_equal(kernel, np.ones((3, 1, 1, 1)), err_msg="depthwise: all ones")
    assert kernel.dtype == np.float32, f"dtype= respected; got {kernel.dtype}"


def test_hand_pad_kernel_non_square() -> None:
    row = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    padded = pad_kernel(row, 3)
    expected = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(padded[0, 0], expected, err_msg="1x3 centred in 3x3")
    padded_pair = pad_kernel(row, (3, 5))
    assert padded_pair.shape == (1, 1, 3, 5), f"size as a pair; got {padded_pair.shape}"
    np.testing.assert_array_equal(padded_pair[0, 0, 1, 1:4], [1.0, 2.0, 3.0], err_msg="centred")


# -------------------------------------------------------------------- pad_kernel


@dataclass(frozen=True)
class PadCase:
    """A conv with a small kernel, the size to pad it to and the padding that matches."""

    batch: int
    groups: int
    in_per_group: int
    out_per_group: int
    sides: tuple[int, int]
    small: tuple[int, int]
    large: tuple[int, int]
    small_padding: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int]
    seed: int

    @property
    def large_padding(self) -> tuple[int, int]:
        """The padded kernel reaches ``d * (K - k) / 2`` further on each side."""
        h, w = (
            q + d * (big - k) // 2
            for q, d, big, k in zip(
                self.small_padding, self.dilation, self.large, self.small, strict=True
            )
        )
        return h, w


@st.composite
def pad_cases(draw: st.DrawFn) -> PadCase:
    """Odd or even k padded to K = k + 0, 2 or 4 per axis (so 1x3 -> 3x3 and 1x1 -> 5x3)."""
    groups = draw(st.integers(1, MAX_GROUPS))
    in_per_group = draw(st.integers(1, MAX_PER_GROUP))
    out_per_group = draw(st.integers(1, MAX_PER_GROUP))
    small, large, small_padding, sides, dilation = [], [], [], [], []
    for _axis in range(2):
        k = draw(st.integers(1, 3))
        extra = draw(st.integers(0, 2))
        d = draw(st.integers(1, 2))
        q = draw(st.integers(0, 2))
        sides.append(draw(st.integers(max(1, d * (k - 1) + 1 - 2 * q), MAX_SIDE)))
        small.append(k)
        large.append(k + 2 * extra)
        small_padding.append(q)
        dilation.append(d)
    return PadCase(
        batch=draw(st.integers(1, 2)),
        groups=groups,
        in_per_group=in_per_group,
        out_per_group=out_per_group,
        sides=(sides[0], sides[1]),
        small=(small[0], small[1]),
        large=(large[0], large[1]),
        small_padding=(small_padding[0], small_padding[1]),
        dilation=(dilation[0], dilation[1]),
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        seed=draw(seeds),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=pad_cases())
def test_padded_kernel_with_more_padding_is_the_same_conv(dtype: type, case: PadCase) -> None:
    rng = np.random.default_rng(case.seed)
    in_channels = case.groups * case.in_per_group
    out_channels = case.groups * case.out_per_group
    x = random_array(rng, (case.batch, in_channels, *case.sides), dtype)
    small = random_array(rng, (out_channels, case.in_per_group, *case.small), dtype)
    common: dict[str, Any] = {
        "stride": case.stride,
        "dilation": case.dilation,
        "groups": case.groups,
    }
    padded = pad_kernel(small, case.large)
    assert padded.dtype == np.dtype(dtype), f"pad_kernel keeps dtype; got {padded.dtype}"
    assert padded.shape == (*small.shape[:2], *case.large), f"padded shape {padded.shape}"
    result = conv2d(x, padded, padding=case.large_padding, **common)
    expected = conv2d(x, small, padding=case.small_padding, **common)
    scale = conv_magnitude(x, small, padding=case.small_padding, **common)
    assert_close(result, expected, dtype=dtype, scale=scale, what=f"pad_kernel {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=pad_cases())
def test_padded_kernel_holds_the_kernel_in_its_centre(dtype: type, case: PadCase) -> None:
    rng = np.random.default_rng(case.seed)
    small = random_array(rng, (case.out_per_group, case.in_per_group, *case.small), dtype)
    before = small.copy()
    padded = pad_kernel(small, case.large)
    (top, left) = ((big - k) // 2 for big, k in zip(case.large, case.small, strict=True))
    window = (slice(None), slice(None), slice(top, top + case.small[0]))
    centre = padded[(*window, slice(left, left + case.small[1]))]
    np.testing.assert_array_equal(centre, small, err_msg="the kernel sits unchanged in the centre")
    ring = padded.copy()
    ring[(*window, slice(left, left + case.small[1]))] = 0
    np.testing.assert_array_equal(ring, 0, err_msg="everything around the kernel is zero")
    np.testing.assert_array_equal(small, before, err_msg="pad_kernel mutated its input")
    assert not np.shares_memory(padded, small), "pad_kernel must return a new array"


def test_pad_kernel_to_own_size_is_a_copy() -> None:
    kernel = np.ones((2, 1, 3, 3), dtype=np.float32)
    same = pad_kernel(kernel, 3)
    np.testing.assert_array_equal(same, kernel, err_msg="padding to the same size changes nothing")
    assert not np.shares_memory(same, kernel), "even a no-op pad returns a new array"


# --------------------------------------------------------------- identity_kernel


@st.composite
def identity_cases(draw: st.DrawFn) -> tuple[int, int, int, tuple[int, ...], int]:
    """(channels, groups, size, x shape, seed): any groups dividing the channels."""
    groups = draw(st.integers(1, MAX_GROUPS))
    channels = groups * draw(st.integers(1, MAX_PER_GROUP))
    size = draw(st.sampled_from([1, 3, 5]))
    shape = (draw(st.integers(0, 2)), channels, draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    return channels, groups, size, shape, draw(seeds)


@pytest.mark.parametrize("dtype", (*DTYPES, np.float16))
@given(case=identity_cases())
def test_identity_kernel_conv_returns_input_exactly(
    dtype: type, case: tuple[int, int, int, tuple[int, ...], int]
) -> None:
    channels, groups, size, shape, seed = case
    x = random_array(np.random.default_rng(seed), shape, dtype, scale=100.0)
    eye = identity_kernel(channels, groups=groups, size=size, dtype=dtype)
    assert eye.dtype == np.dtype(dtype), f"identity kernel dtype {eye.dtype}, wanted {dtype}"
    result = conv2d(x, eye, padding=size // 2, groups=groups)
    # multiplying by 1 and adding zeros is exact in every floating format
    np.testing.assert_array_equal(result, x, err_msg=f"identity conv changed x ({case})")
    assert result.dtype == np.dtype(dtype), f"result dtype {result.dtype}"


@given(case=identity_cases())
def test_identity_kernel_structure(case: tuple[int, int, int, tuple[int, ...], int]) -> None:
    channels, groups, size, _shape, _seed = case
    eye = identity_kernel(channels, groups=groups, size=size)
    per_group = channels // groups
    assert eye.shape == (channels, per_group, size, size), f"shape {eye.shape}"
    expected = np.zeros_like(eye)
    for out in range(channels):
        expected[out, out % per_group, size // 2, size // 2] = 1.0
    np.testing.assert_array_equal(eye, expected, err_msg=f"one 1 per output channel ({case})")


def test_array_likes_go_in() -> None:
    torch = pytest.importorskip("torch")
    kernel = np.arange(6.0).reshape(2, 1, 1, 3)
    expected = pad_kernel(kernel, 3)
    np.testing.assert_array_equal(pad_kernel(kernel.tolist(), 3), expected, err_msg="lists")
    from_torch = pad_kernel(torch.from_numpy(kernel), 3)
    np.testing.assert_array_equal(from_torch, expected, err_msg="torch tensor")
    assert isinstance(from_torch, np.ndarray), f"returns NumPy; got {type(from_torch)}"
