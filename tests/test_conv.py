"""conv2d: hand-computed examples, the loop definition, and relations it must satisfy."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import conv2d_loops, conv_magnitude
from strategies import ConvCase, conv_cases
from tolerances import DTYPES, assert_close

import reparam.core.conv
from reparam import conv2d
from reparam.core.conv import conv_output_size

# ------------------------------------------------------------ tier 1: by pencil

X3 = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_hand_valid_2x2_is_cross_correlation() -> None:
    # y[i, j] = 1 x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1] (no kernel flip)
    kernel = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    expected = np.array([[37.0, 47.0], [67.0, 77.0]])
    np.testing.assert_array_equal(
        conv2d(X3, kernel)[0, 0], expected, err_msg="2x2 valid correlation of 1..9"
    )


def test_hand_padding_and_stride() -> None:
    ones = np.ones((1, 1, 3, 3))
    neighbourhood_sums = np.array([[12.0, 21.0, 16.0], [27.0, 45.0, 33.0], [24.0, 39.0, 28.0]])
    np.testing.assert_array_equal(
        conv2d(X3, ones, padding=1)[0, 0], neighbourhood_sums, err_msg="3x3 box sum, padding 1"
    )
    np.testing.assert_array_equal(
        conv2d(X3, ones, padding=1, stride=2)[0, 0],
        neighbourhood_sums[::2, ::2],
        err_msg="stride 2 keeps every other output",
    )


def test_hand_dilation() -> None:
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    # taps at rows and columns 0, 2, 4: 0+2+4 + 10+12+14 + 20+22+24 = 108
    result = conv2d(x, np.ones((1, 1, 3, 3)), dilation=2)
    np.testing.assert_array_equal(result, np.full((1, 1, 1, 1), 108.0), err_msg="dilation 2")


def test_hand_groups_and_bias() -> None:
    x = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 10.0)])[None]  # channels 1 and 10
    kernel = np.array([2.0, 3.0]).reshape(2, 1, 1, 1)
    result = conv2d(x, kernel, np.array([0.5, -0.5]), groups=2)
    expected = np.stack([np.full((2, 2), 2.5), np.full((2, 2), 29.5)])[None]
    np.testing.assert_array_equal(result, expected, err_msg="depthwise 1x1 scale plus bias")


def test_hand_non_square_rectangle() -> None:
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    result = conv2d(x, np.ones((1, 1, 1, 2)), stride=(1, 2))
    expected = np.array([[1.0, 5.0], [9.0, 13.0], [17.0, 21.0]])
    np.testing.assert_array_equal(result[0, 0], expected, err_msg="1x2 kernel, stride (1, 2)")


# ------------------------------------------------------- tier 2: the definition


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases())
def test_matches_loop_definition(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    result = conv2d(x, kernel, bias, **case.kwargs())
    assert result.dtype == np.dtype(dtype), f"float in, same float out; got {result.dtype}"
    assert result.shape == case.output_shape, f"shape {result.shape} != {case.output_shape}"
    expected = conv2d_loops(x, kernel, bias, **case.kwargs())
    scale = conv_magnitude(x, kernel, bias, **case.kwargs())
    assert_close(result, expected, dtype=dtype, scale=scale, what=f"conv2d vs loops {case}")


@given(case=conv_cases())
def test_output_size_formula(case: ConvCase) -> None:
    sizes = tuple(
        conv_output_size(n, k, stride=s, padding=p, dilation=d)
        for n, k, s, p, d in zip(
            (case.height, case.width),
            case.kernel_size,
            case.stride,
            case.padding,
            case.dilation,
            strict=True,
        )
    )
    assert sizes == case.output_shape[2:], f"conv_output_size {sizes} for {case}"
    assert min(sizes) >= 1, f"a valid case has a non-empty output; got {sizes}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype: type) -> None:
    x: npt.NDArray[Any] = np.zeros((0, 4, 5, 6), dtype=dtype)
    kernel: npt.NDArray[Any] = np.ones((6, 2, 3, 3), dtype=dtype)
    result = conv2d(x, kernel, np.ones(6, dtype=dtype), padding=1, groups=2, stride=(2, 1))
    assert result.shape == (0, 6, 3, 6), f"empty batch keeps its shape; got {result.shape}"
    assert result.dtype == np.dtype(dtype), f"dtype kept for an empty batch; got {result.dtype}"


# ------------------------------------------------------------------- relations


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases())
def test_grouped_is_per_group_concatenation(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    grouped = conv2d(x, kernel, bias, **kwargs)
    kwargs["groups"] = 1
    cin, cout = case.in_per_group, case.out_per_group
    pieces = [
        conv2d(
            x[:, g * cin : (g + 1) * cin],
            kernel[g * cout : (g + 1) * cout],
            None if bias is None else bias[g * cout : (g + 1) * cout],
            **kwargs,
        )
        for g in range(case.groups)
    ]
    scale = conv_magnitude(x, kernel, bias, **case.kwargs())
    assert_close(
        grouped, np.concatenate(pieces, axis=1), dtype=dtype, scale=scale, what="per-group"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=2), data=st.data())
def test_batch_split_changes_nothing(dtype: type, case: ConvCase, data: st.DataObject) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    split = data.draw(st.integers(1, case.batch - 1), label="split")
    whole = conv2d(x, kernel, bias, **kwargs)
    parts = np.concatenate(
        [conv2d(x[:split], kernel, bias, **kwargs), conv2d(x[split:], kernel, bias, **kwargs)]
    )
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(parts, whole, dtype=dtype, scale=scale, what=f"batch split at {split}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1), buffer_bytes=st.integers(1, 8192))
def test_chunking_changes_nothing(dtype: type, case: ConvCase, buffer_bytes: int) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    whole = conv2d(x, kernel, bias, **kwargs)
    chunks: list[tuple[int, int]] = []
    original_chunk = reparam.core.conv._conv_chunk

    def spy(windows: Any, matrix: Any, *, groups: int) -> Any:
        chunks.append((windows.shape[0], windows.shape[2]))  # (images, output rows)
        return original_chunk(windows, matrix, groups=groups)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reparam.core.conv, "COLUMN_BUFFER_BYTES", buffer_bytes)
        patch.setattr(reparam.core.conv, "_conv_chunk", spy)
        chunked = conv2d(x, kernel, bias, **kwargs)
    out_rows = case.output_shape[2]
    covered = sum(images * rows for images, rows in chunks)
    assert covered == case.batch * out_rows, f"chunks {chunks} must cover each output row once"
    scale = conv_magnitude(x, kernel, bias, **kwargs)
    assert_close(chunked, whole, dtype=dtype, scale=scale, what=f"{len(chunks)} chunks")


def test_tiny_buffer_chunks_by_image_and_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 6, 5))
    kernel = rng.standard_normal((4, 2, 3, 3))
    whole = conv2d(x, kernel, padding=1)
    chunks: list[tuple[int, int]] = []
    original_chunk = reparam.core.conv._conv_chunk

    def spy(windows: Any, matrix: Any, *, groups: int) -> Any:
        chunks.append((windows.shape[0], windows.shape[2]))
        return original_chunk(windows, matrix, groups=groups)

    monkeypatch.setattr(reparam.core.conv, "_conv_chunk", spy)
    monkeypatch.setattr(reparam.core.conv, "COLUMN_BUFFER_BYTES", 1)
    by_row = conv2d(x, kernel, padding=1)
    assert chunks == [(1, 1)] * 18, f"1-byte buffer: one row of one image at a time; {chunks}"
    # one output row of one image: 5 columns x 2 channels x 9 taps x 8 bytes = 720 bytes
    chunks.clear()
    monkeypatch.setattr(reparam.core.conv, "COLUMN_BUFFER_BYTES", 720 * 6 * 2)
    by_two_images = conv2d(x, kernel, padding=1)
    assert chunks == [(2, 6), (1, 6)], f"room for two images: chunks of 2 and 1; {chunks}"
    scale = conv_magnitude(x, kernel, padding=1)
    assert_close(by_row, whole, dtype=np.float64, scale=scale, what="row chunks")
    assert_close(by_two_images, whole, dtype=np.float64, scale=scale, what="image chunks")


# ------------------------------------------------------------ dtypes and inputs


@pytest.mark.parametrize(
    ("x_dtype", "kernel_dtype", "expected"),
    [
        (np.float32, np.float32, np.float32),
        (np.float64, np.float64, np.float64),
        (np.float16, np.float16, np.float16),
        (np.float32, np.float64, np.float64),
        (np.float16, np.float32, np.float32),
    ],
)
def test_result_dtype_is_result_type(x_dtype: type, kernel_dtype: type, expected: type) -> None:
    x: npt.NDArray[Any] = np.ones((1, 2, 4, 4), dtype=x_dtype)
    kernel: npt.NDArray[Any] = np.ones((3, 2, 3, 3), dtype=kernel_dtype)
    result = conv2d(x, kernel, np.zeros(3, dtype=x_dtype))
    assert result.dtype == np.dtype(expected), f"{x_dtype} x {kernel_dtype} gave {result.dtype}"
    np.testing.assert_array_equal(result, 18.0, err_msg="all-ones conv sums 2 x 9 ones")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1))
def test_inputs_untouched_and_output_fresh(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    copies = [None if a is None else a.copy() for a in (x, kernel, bias)]
    result = conv2d(x, kernel, bias, **case.kwargs())
    for name, before, after in zip(("x", "kernel", "bias"), copies, (x, kernel, bias), strict=True):
        if after is not None:
            np.testing.assert_array_equal(after, before, err_msg=f"conv2d mutated {name}")
            assert not np.shares_memory(result, after), f"output shares memory with {name}"
    assert result.flags.writeable, "the output is a normal, writeable array"


def test_array_likes_go_in() -> None:
    torch = pytest.importorskip("torch")
    x = np.arange(18.0).reshape(1, 2, 3, 3)
    kernel = np.linspace(-1.0, 1.0, 8).reshape(2, 2, 1, 2)
    expected = conv2d(x, kernel, np.array([1.0, 2.0]))
    from_lists = conv2d(x.tolist(), kernel.tolist(), [1.0, 2.0])
    from_torch = conv2d(torch.from_numpy(x), torch.from_numpy(kernel), torch.tensor([1.0, 2.0]))
    np.testing.assert_array_equal(from_lists, expected, err_msg="nested lists")
    np.testing.assert_array_equal(from_torch, expected, err_msg="torch tensors")
    assert isinstance(from_torch, np.ndarray), f"returns NumPy; got {type(from_torch)}"


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_cases(min_batch=1))
def test_memory_layout_does_not_matter(dtype: type, case: ConvCase) -> None:
    x, kernel, bias = case.arrays(dtype)
    kwargs = case.kwargs()
    expected = conv2d(x, kernel, bias, **kwargs)
    # a reversed-width view read back in order, and Fortran-ordered copies
    flipped = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    for label, layout in (("negative strides", flipped), ("Fortran order", np.asfortranarray(x))):
        result = conv2d(layout, np.asfortranarray(kernel), bias, **kwargs)
        scale = conv_magnitude(x, kernel, bias, **kwargs)
        assert_close(result, expected, dtype=dtype, scale=scale, what=label)
