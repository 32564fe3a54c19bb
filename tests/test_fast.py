"""The fast deploy path (reparam.engine) against the reference conv2d + bias + ReLU stack.

Every algorithm (im2col, Winograd F(2x2, 3x3) and F(4x4, 3x3)) must equal the
reference, layer after layer, for strides 1 and 2, groups 1/2/4, batch sizes
from 1, images from 1x1 up (odd, non-square, not a multiple of the Winograd
tile), in float32 and float64, within the project tolerance.
"""

from __future__ import annotations

import math
import mmap
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import random_array, seeds
from tolerances import DTYPES, assert_close

from reparam import ReparamError, conv2d
from reparam.engine import ALGORITHMS, DeployStack, choose_algorithm, winograd_matrices
from reparam.engine import stack as fast
from reparam.engine import workers as engine_workers

Layer = tuple[npt.NDArray[Any], npt.NDArray[Any], int, int]


@dataclass(frozen=True)
class StackCase:
    """A valid stack: per layer (groups, stride, algorithm), the chained channels, an input."""

    channels: tuple[int, ...]  # C_0 (input), C_1, ..., C_L
    groups: tuple[int, ...]
    strides: tuple[int, ...]
    algorithms: tuple[str, ...] | None
    batch: int
    height: int
    width: int
    seed: int

    def layers(self, dtype: npt.DTypeLike) -> list[Layer]:
        rng = np.random.default_rng(self.seed)
        result = []
        for i, (groups, stride) in enumerate(zip(self.groups, self.strides, strict=True)):
            fan_in = 9 * self.channels[i] // groups
            shape = (self.channels[i + 1], self.channels[i] // groups, 3, 3)
            kernel = random_array(rng, shape, dtype, scale=math.sqrt(2.0 / fan_in))
            bias = random_array(rng, (self.channels[i + 1],), dtype, scale=0.3)
            result.append((kernel, bias, stride, groups))
        return result

    def x(self, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        rng = np.random.default_rng(self.seed + 1)
        shape = (self.batch, self.channels[0], self.height, self.width)
        return random_array(rng, shape, dtype)


@st.composite
def stack_cases(
    draw: st.DrawFn,
    *,
    max_layers: int = 3,
    strides: tuple[int, ...] = (1, 2),
    group_choices: tuple[int, ...] = (1, 2, 4),
    algorithms: tuple[str, ...] | None = None,
) -> StackCase:
    """Groups first, then channels that every adjacent group count divides, then sizes."""
    depth = draw(st.integers(1, max_layers))
    groups = tuple(draw(st.sampled_from(group_choices)) for _ in range(depth))
    bounds = (1, *groups, 1)  # C_i must be divisible by the groups of both layers it touches
    channels = tuple(
        math.lcm(bounds[i], bounds[i + 1]) * draw(st.integers(1, 3)) for i in range(depth + 1)
    )
    layer_strides = tuple(draw(st.sampled_from(strides)) for _ in range(depth))
    if algorithms is None:
        names = draw(st.none() | st.tuples(*[st.sampled_from(ALGORITHMS)] * depth))
    else:
        names = tuple(draw(st.sampled_from(algorithms)) for _ in range(depth))
    return StackCase(
        channels=channels,
        groups=groups,
        strides=layer_strides,
        algorithms=names,
        batch=draw(st.integers(1, 3)),
        height=draw(st.integers(1, 11)),
        width=draw(st.integers(1, 11)),
        seed=draw(seeds),
    )


def reference_stack(x: npt.NDArray[Any], layers: list[Layer]) -> tuple[npt.NDArray[Any], float]:
    """The reference in float64, ``relu(conv2d(x) + b)`` per layer, and the scale of its terms.

    The scale is the largest value of the same stack run on ``|x|`` with ``|W|`` and
    ``|b|``: the largest absolute value of the terms summed, through every layer,
    which is what a forward rounding error is proportional to (outputs that
    cancel to nearly zero still carry the rounding error of their terms).
    """
    out = x.astype(np.float64)
    terms = np.abs(out)
    for kernel, bias, stride, groups in layers:
        k64, b64 = kernel.astype(np.float64), bias.astype(np.float64)
        conv = {"stride": stride, "padding": 1, "groups": groups}
        out = np.maximum(conv2d(out, k64, b64, **conv), 0)
        terms = conv2d(terms, np.abs(k64), np.abs(b64), **conv)
    return out, float(np.max(terms))


def check_against_reference(
    case: StackCase, dtype: npt.DTypeLike, what: str, threads: int | None = None
) -> None:
    layers, x = case.layers(dtype), case.x(dtype)
    expected, scale = reference_stack(x, layers)
    stack = DeployStack(layers, algorithms=case.algorithms, threads=threads)
    actual = stack(x)
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert_close(actual, expected, dtype=dtype, scale=scale, what=f"{what}: {case}")


@given(case=stack_cases())
def test_the_strategy_builds_valid_chains(case: StackCase) -> None:
    for i, groups in enumerate(case.groups):
        assert case.channels[i] % groups == 0, f"groups {groups} must divide C_in: {case}"
        assert case.channels[i + 1] % groups == 0, f"groups {groups} must divide C_out: {case}"
    assert 1 <= case.height <= 11 and 1 <= case.width <= 11, f"sizes: {case}"


# ----------------------------------------------------------------- the transforms


@pytest.mark.parametrize("tile", [2, 4])
@given(seed=seeds)
def test_winograd_matrices_compute_a_correlation(tile: int, seed: int) -> None:
    bt, g, at = winograd_matrices(tile)
    rng = np.random.default_rng(seed)
    d, k = rng.standard_normal(tile + 2), rng.standard_normal(3)
    expected = np.array([d[i : i + 3] @ k for i in range(tile)])
    assert_close(
        at @ ((g @ k) * (bt @ d)),
        expected,
        dtype=np.float64,
        scale=np.abs(d).max() * np.abs(k).sum(),
        what=f"1-D F({tile}, 3)",
    )


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matrices_shapes(tile: int) -> None:
    bt, g, at = winograd_matrices(tile)
    side = tile + 2
    assert (bt.shape, g.shape, at.shape) == ((side, side), (side, 3), (tile, side)), "shapes"
    assert np.all(at[:, 1] == 1.0), "the bias trick needs column 1 of A^T to be all ones"


def test_winograd_matrices_reject_other_tiles() -> None:
    with pytest.raises(ReparamError, match="winograd_matrices: unsupported tile; got 3"):
        winograd_matrices(3)


@pytest.mark.parametrize(
    ("algorithm", "quantum"),
    [("winograd2", None), ("winograd4", 2.0**-10)],
    ids=["winograd2", "winograd4"],
)
def test_float32_winograd_weights_are_the_float64_transform_rounded_once(
    algorithm: str, quantum: float | None
) -> None:
    """``U = G k G^T`` is computed in float64 from the float32 kernel and rounded once, bit for bit.

    The same transform in float32 arithmetic differs on these kernels (checked
    below), so a stack that transforms in float32, or rounds in between, fails
    here, while its outputs would still pass the 2e-5 equivalence tests.

    Bit for bit is well defined on these kernels. F(2x2, 3x3)'s ``G`` holds 0,
    +-1/2 and 1, so the float64 transform of float32 kernels is exact. F(4x4,
    3x3)'s holds 1/6, 1/12 and 1/24: each entry of ``U`` is ``m / (9 * 2**a)``;
    with kernels on a grid of ``2**-10`` (at most 13 significant bits) no entry is
    zero or within 1/18 of a float32 ulp of a rounding tie, far beyond float64's
    error, so every float64 summation order rounds to the same float32. (With
    full 24-bit kernels about 1 entry in 200 is an exact float32 tie, and the
    float64 summation order, not the contract, decides it.)
    """
    tile = 2 if algorithm == "winograd2" else 4
    side = tile + 2
    rng = np.random.default_rng(21)
    kernel = random_array(rng, (6, 5, 3, 3), np.float64)  # (O, I, 3, 3)
    if quantum is not None:
        kernel = np.round(kernel / quantum) * quantum
    kernel = kernel.astype(np.float32)
    bias = random_array(rng, (6,), np.float32)
    _, g, _ = winograd_matrices(tile)
    # independently of the engine: one einsum instead of two tensordots, laid out (t*t, I, O)
    u64 = np.einsum("ak,oikl,bl->abio", g, kernel.astype(np.float64), g)
    expected = u64.astype(np.float32).reshape(side * side, 5, 6)
    g32 = g.astype(np.float32)
    in_float32 = np.einsum("ak,oikl,bl->abio", g32, kernel, g32).reshape(side * side, 5, 6)
    assert in_float32.dtype == np.float32, "the counterexample must be float32 arithmetic"
    assert not np.array_equal(in_float32, expected), (
        f"F({tile}x{tile}, 3x3): float32 arithmetic gives the same weights; the test cannot fail"
    )

    stack = DeployStack([(kernel, bias, 1, 1)], algorithms=[algorithm], input_size=(8, 8))
    assert stack.algorithms(8, 8) == [algorithm], f"the stack must use {algorithm}"
    weights = stack._layer_weights(0, algorithm, np.dtype(np.float32))
    assert weights.dtype == np.float32, f"float32 weights for a float32 stack; got {weights.dtype}"
    np.testing.assert_array_equal(
        weights, expected, err_msg=f"{algorithm} weights are not G k G^T in float64 rounded once"
    )


# ----------------------------------------------------------------- equivalence


# threads=1 (BLAS's own threads only) and the default (the stack's threads where threadpoolctl
# can pin BLAS: 2 on a 2-core machine) are both proven against the reference
@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=stack_cases())
def test_stack_equals_reference(dtype: npt.DTypeLike, threads: int | None, case: StackCase) -> None:
    check_against_reference(case, dtype, f"stack, threads={threads}", threads)


@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=stack_cases(strides=(1,), group_choices=(1,), max_layers=2))
def test_each_algorithm_equals_reference(
    algorithm: str, dtype: npt.DTypeLike, threads: int | None, case: StackCase
) -> None:
    forced = StackCase(**{**case.__dict__, "algorithms": (algorithm,) * len(case.groups)})
    check_against_reference(forced, dtype, f"{algorithm}, threads={threads}", threads)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (9, 9), (8, 8), (13, 6)])
def test_tiles_that_do_not_divide_the_image(
    algorithm: str, dtype: npt.DTypeLike, size: tuple[int, int]
) -> None:
    case = StackCase(
        channels=(3, 8, 8, 6),
        groups=(1, 1, 1),
        strides=(1, 1, 1),
        algorithms=(algorithm,) * 3,
        batch=2,
        height=size[0],
        width=size[1],
        seed=7,
    )
    check_against_reference(case, dtype, f"{algorithm} at {size}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_and_strided_layers(dtype: npt.DTypeLike, groups: int, stride: int) -> None:
    case = StackCase(
        channels=(4, 8, 8),
        groups=(groups, groups),
        strides=(stride, 1),
        algorithms=None,
        batch=1,
        height=9,
        width=7,
        seed=3,
    )
    check_against_reference(case, dtype, f"groups {groups}, stride {stride}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_layers_stay_inside_the_tolerance(dtype: npt.DTypeLike) -> None:
    """F(4x4, 3x3)'s float32 error grows with the channels summed: 192 is A0's widest."""
    case = StackCase(
        channels=(192, 192, 192),
        groups=(1, 1),
        strides=(1, 1),
        algorithms=("winograd4", "winograd4"),
        batch=1,
        height=14,
        width=14,
        seed=11,
    )
    check_against_reference(case, dtype, "192 channels, F(4x4, 3x3)")


# ----------------------------------------------------------------- relations


@given(
    case=stack_cases(),
    chunk_bytes=st.sampled_from([1, 4096, 2**20]),
    layer_bytes=st.sampled_from([1, 4096, 2**20]),
)
def test_chunking_changes_nothing(case: StackCase, chunk_bytes: int, layer_bytes: int) -> None:
    layers, x = case.layers(np.float64), case.x(np.float64)
    whole = DeployStack(layers, algorithms=case.algorithms)(x)
    chunked = DeployStack(
        layers, algorithms=case.algorithms, max_chunk_bytes=chunk_bytes, layer_bytes=layer_bytes
    )(x)
    assert_close(chunked, whole, dtype=np.float64, what=f"chunks {chunk_bytes}, {layer_bytes}")


@given(case=stack_cases())
def test_images_are_independent(case: StackCase) -> None:
    layers, x = case.layers(np.float64), case.x(np.float64)
    stack = DeployStack(layers, algorithms=case.algorithms)
    batch = stack(x)
    for i in range(x.shape[0]):
        assert_close(stack(x[i : i + 1])[0], batch[i], dtype=np.float64, what=f"image {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=stack_cases())
def test_pool_is_the_mean_of_the_features(dtype: npt.DTypeLike, case: StackCase) -> None:
    layers, x = case.layers(dtype), case.x(dtype)
    stack = DeployStack(layers, algorithms=case.algorithms)
    features = stack(x)
    pooled = stack(x, pool=True)
    assert pooled.shape == features.shape[:2], f"pooled shape {pooled.shape}"
    assert_close(pooled, features.astype(np.float64).mean(axis=(2, 3)), dtype=dtype, what="pool")


def test_repeated_calls_and_shapes_reuse_buffers_correctly() -> None:
    case = StackCase((3, 8, 8), (1, 1), (2, 1), None, 2, 9, 9, seed=5)
    layers = case.layers(np.float64)
    stack = DeployStack(layers)
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 9, 9), (1, 3, 6, 10), (2, 3, 9, 9), (3, 3, 9, 9)]:
        x = rng.standard_normal(shape)
        expected, scale = reference_stack(x, layers)
        assert_close(
            stack(x),
            expected,
            dtype=np.float64,
            scale=scale,
            what=f"input {shape} after other shapes",
        )


# ----------------------------------------------------------------- dtypes, inputs, memory


def test_result_dtype_follows_conv2d() -> None:
    case = StackCase((3, 4), (1,), (1,), None, 1, 5, 5, seed=1)
    stack32 = DeployStack(case.layers(np.float32))
    assert stack32(case.x(np.float16)).dtype == np.float32, "float16 input: float32 compute"
    assert stack32(case.x(np.float32)).dtype == np.float32, "float32 stays float32"
    result = stack32(case.x(np.float64))
    assert result.dtype == np.float64, "float64 input promotes, like conv2d"
    expected = np.maximum(conv2d(case.x(np.float64), *case.layers(np.float32)[0][:2], padding=1), 0)
    assert_close(result, expected, dtype=np.float64, what="float64 input, float32 weights")


def test_empty_batch() -> None:
    case = StackCase((3, 4, 5), (1, 1), (2, 1), None, 1, 7, 6, seed=1)
    stack = DeployStack(case.layers(np.float32))
    assert stack(np.zeros((0, 3, 7, 6), np.float32)).shape == (0, 5, 4, 3), "empty NCHW"
    assert stack(np.zeros((0, 3, 7, 6), np.float32), pool=True).shape == (0, 5), "empty pooled"


def test_nothing_is_mutated_and_weights_are_copied() -> None:
    case = StackCase((3, 8, 8), (1, 1), (1, 1), ("winograd4", "im2col"), 2, 9, 9, seed=2)
    layers, x = case.layers(np.float64), case.x(np.float64)
    x_before = x.copy()
    stack = DeployStack(layers, algorithms=case.algorithms)
    first = stack(x)
    np.testing.assert_array_equal(x, x_before, err_msg="the input was modified")
    layers[0][0][...] = 0.0  # the caller changes its kernel after building the stack
    np.testing.assert_array_equal(stack(x), first, err_msg="the stack shares the caller's kernel")
    second = stack(x)
    second[...] = -1.0  # the result is a new array, not a view of a reused buffer
    np.testing.assert_array_equal(stack(x), first, err_msg="results alias internal buffers")


def test_accepts_deploy_block_objects() -> None:
    @dataclass
    class Block:
        kernel: npt.NDArray[Any]
        bias: npt.NDArray[Any]
        stride: int
        groups: int

    case = StackCase((4, 8), (2,), (2,), None, 1, 6, 6, seed=4)
    layers = case.layers(np.float64)
    from_blocks = DeployStack([Block(*layer) for layer in layers])
    np.testing.assert_array_equal(
        from_blocks(case.x(np.float64)),
        DeployStack(layers)(case.x(np.float64)),
        err_msg="blocks and tuples must build the same stack",
    )


def test_extra_memory_does_not_grow_with_the_batch() -> None:
    case = StackCase((3, 16, 16, 16), (1, 1, 1), (2, 1, 1), None, 1, 32, 32, seed=6)
    stack = DeployStack(case.layers(np.float32), max_chunk_bytes=2**20)
    rng = np.random.default_rng(0)
    extra = {}
    for batch in (4, 16):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        stack(x[:1])  # buffers exist already: measure one call's temporaries
        tracemalloc.start()
        result = stack(x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        extra[batch] = peak - result.nbytes
    assert extra[16] <= extra[4] * 1.1 + 65536, f"peak extra bytes grow with the batch: {extra}"


def test_default_algorithms() -> None:
    common: dict[str, int] = {"in_channels": 48, "out_channels": 48, "height": 56, "width": 56}
    assert choose_algorithm(stride=1, groups=1, **common) == "winograd4", "stride 1, 56x56"
    small = {**common, "height": 14, "width": 14}
    assert choose_algorithm(stride=1, groups=1, **small) == "winograd2", "stride 1, 14x14"
    assert choose_algorithm(stride=2, groups=1, **common) == "im2col", "stride 2"
    assert choose_algorithm(stride=1, groups=2, **common) == "im2col", "grouped"
    tiny = {**common, "height": 2, "width": 2}
    assert choose_algorithm(stride=1, groups=1, **tiny) == "im2col", "tiny image"
    # many images make enough 4x4 tiles (16 per 14x14 image, 128 needed) for F(4x4, 3x3)
    assert choose_algorithm(stride=1, groups=1, images=8, **small) == "winograd4", "8 x 14x14"
    assert choose_algorithm(stride=1, groups=1, images=7, **small) == "winograd2", "7 x 14x14"
    wide = {**small, "in_channels": 512, "out_channels": 512}
    assert choose_algorithm(stride=1, groups=1, images=64, **wide) == "winograd2", "> 256 ch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_chunk_of_small_images_uses_f4_and_equals_reference(dtype: npt.DTypeLike) -> None:
    """Eight 14x14 images: F(4x4, 3x3) for the chunk, F(2x2, 3x3) for one image; both exact."""
    case = StackCase((16, 16, 16), (1, 1), (1, 1), None, 8, 14, 14, seed=21)
    layers, x = case.layers(dtype), case.x(dtype)
    stack = DeployStack(layers, input_size=14)
    assert stack.algorithms(14, 14, 8) == ["winograd4"] * 2, "8 images of 14x14: F(4x4, 3x3)"
    assert stack.algorithms(14, 14) == ["winograd2"] * 2, "one 14x14 image: F(2x2, 3x3)"
    used = [name for name, _ in stack.profile(x)]
    assert used == ["winograd4"] * 2, f"a call on 8 images must run F(4x4, 3x3); ran {used}"
    expected, scale = reference_stack(x, layers)
    assert_close(stack(x), expected, dtype=dtype, scale=scale, what="8 images")
    one, one_scale = reference_stack(x[:1], layers)
    assert_close(stack(x[:1]), one, dtype=dtype, scale=one_scale, what="then 1 image")
    assert_close(stack(x), expected, dtype=dtype, scale=scale, what="then 8 again")


def test_requested_winograd_falls_back_where_it_does_not_apply() -> None:
    case = StackCase((4, 8, 8), (2, 1), (1, 2), ("winograd4", "winograd2"), 1, 8, 8, seed=9)
    stack = DeployStack(case.layers(np.float64), algorithms=case.algorithms)
    assert stack.algorithms(8, 8) == ["im2col", "im2col"], "grouped / strided use im2col"


def test_profile_times_every_layer() -> None:
    """Each layer's entry is the time of that layer's own work, summed over the chunks.

    A fake clock advances by one unit each time a prepared call of a layer runs,
    and at no other time: a layer's entry must then be exactly the number of its
    calls that ran (timing the wrong span, attributing time to the wrong layer,
    not summing the chunks or not running the work all change it).
    """
    case = StackCase((3, 8, 8), (1, 1), (2, 1), ("im2col", "winograd2"), 2, 8, 8, seed=9)
    stack = DeployStack(
        case.layers(np.float32), algorithms=case.algorithms, max_chunk_bytes=1, threads=1
    )
    x = case.x(np.float32)

    timings = stack.profile(x)  # the real clock
    assert [name for name, _ in timings] == ["im2col", "winograd2"], f"{timings}"
    assert all(math.isfinite(seconds) and seconds > 0.0 for _, seconds in timings), f"{timings}"

    now = [0.0]
    ran = [0, 0]
    prepared = DeployStack._tasks

    def counted(
        self: DeployStack, plan: Any, index: int, start: int, stop: int
    ) -> list[list[Callable[[], None]]]:
        def tick(task: Callable[[], None]) -> None:
            task()
            now[0] += 1.0
            ran[index] += 1

        return [
            [partial(tick, task) for task in phase]
            for phase in prepared(self, plan, index, start, stop)
        ]

    clock = SimpleNamespace(perf_counter=lambda: now[0])
    with mock.patch.object(fast, "time", clock), mock.patch.object(DeployStack, "_tasks", counted):
        timings = stack.profile(x)
    assert ran[0] >= 2 and ran[1] >= 2, f"one chunk per image, every layer runs in each: {ran}"
    assert timings == [("im2col", float(ran[0])), ("winograd2", float(ran[1]))], (
        f"each layer's time must be exactly its own calls ({ran}); got {timings}"
    )


# ----------------------------------------------------------------- errors


def _layer(out_channels: int = 4, in_per_group: int = 3, stride: int = 1, groups: int = 1) -> Layer:
    kernel = np.ones((out_channels, in_per_group, 3, 3))
    return (kernel, np.zeros(out_channels), stride, groups)


@pytest.mark.parametrize(
    ("layers", "kwargs", "message"),
    [
        ([], {}, "layers is empty; got 0 layers"),
        ([(np.ones((4, 3, 1, 1)), np.zeros(4), 1, 1)], {}, "layer 0 kernel must be 3x3"),
        ([_layer(stride=3)], {}, "layer 0 stride must be 1 or 2; got 3"),
        ([_layer(groups=3)], {}, "layer 0 groups=3 does not divide C_out=4"),
        ([(np.ones((4, 3, 3, 3)), np.zeros(5), 1, 1)], {}, "layer 0 bias has the wrong length"),
        ([_layer(), _layer(in_per_group=5)], {}, "layer 1 does not chain; got C_in = 5"),
        ([_layer()], {"algorithms": ["fft"]}, "unknown algorithm for layer 0; got 'fft'"),
        ([_layer()], {"algorithms": []}, "algorithms has the wrong length; got 0"),
        (
            [(np.ones((4, 3, 3, 3), int), np.zeros(4), 1, 1)],
            {},
            "layer 0 kernel must have a floating dtype",
        ),
        ([(np.ones((4, 3, 3, 3)),)], {}, "layer 0 must be a \\(kernel, bias, stride, groups\\)"),
        ([_layer()], {"max_chunk_bytes": 0}, "max_chunk_bytes must be >= 1"),
        ([_layer()], {"layer_bytes": 0}, "layer_bytes must be >= 1"),
        ([_layer()], {"threads": 0}, "threads must be >= 1"),
        ([_layer()], {"input_size": (0, 5)}, "input_size must be >= 1"),
    ],
)
def test_malformed_layers(layers: list[Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ReparamError, match=f"DeployStack: {message}"):
        DeployStack(layers, **kwargs)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.ones((1, 4, 5, 5)), "x has the wrong number of channels; got x.shape\\[1\\]=4"),
        (np.ones((3, 5, 5)), "x must be 4-D"),
        (np.ones((1, 3, 0, 5)), "x has no pixels"),
        (np.ones((1, 3, 5, 5), int), "x must have a floating dtype"),
    ],
)
def test_malformed_inputs(x: npt.NDArray[Any], message: str) -> None:
    with pytest.raises(ReparamError, match=f"DeployStack: {message}"):
        DeployStack([_layer()])(x)


# ----------------------------------------------------------------- the model


def test_repvgg_deploy_model_through_the_stack() -> None:
    repvgg = pytest.importorskip("reparam.models.repvgg")
    model = repvgg.RepVGG.create("A0", num_classes=10, seed=0, dtype=np.float32)
    deploy = model.reparameterize()
    stack = DeployStack(block for _, block in deploy.blocks)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 24)).astype(np.float32)
    exact = deploy.astype(np.float64)  # the same float32 weights, computed in float64
    features = stack(x, pool=True)
    assert features.dtype == np.float32, f"dtype {features.dtype}"
    expected = exact.features(x.astype(np.float64))
    assert_close(features, expected, dtype=np.float32, what="A0 pooled features")
    assert_close(
        deploy.head(features),
        exact(x.astype(np.float64)),
        dtype=np.float32,
        what="A0 logits from the stack's features",
    )


def test_tune_keeps_an_allowed_algorithm_per_layer_and_stays_correct() -> None:
    case = StackCase((3, 8, 8, 8), (1, 2, 1), (2, 1, 1), None, 2, 12, 10, seed=12)
    layers, x = case.layers(np.float32), case.x(np.float32)
    stack = DeployStack(layers)
    chosen = stack.tune(x, repeats=1)
    assert len(chosen) == 3, f"one algorithm per layer: {chosen}"
    assert chosen[:2] == ["im2col", "im2col"], f"strided and grouped layers: {chosen}"
    assert chosen[2] in ALGORITHMS, f"{chosen}"
    assert stack.algorithms(12, 10) == chosen, "the tuned choice is kept"
    expected, scale = reference_stack(x, layers)
    assert_close(stack(x), expected, dtype=np.float32, scale=scale, what=f"tuned {chosen}")


def test_scratch_bytes_do_not_depend_on_the_batch_beyond_one_chunk() -> None:
    case = StackCase((3, 8, 8), (1, 1), (2, 1), None, 1, 32, 32, seed=1)
    stack = DeployStack(case.layers(np.float32), max_chunk_bytes=2**18)
    one = stack.scratch_bytes(32, 32, batch=1)
    many = [stack.scratch_bytes(32, 32, batch=b) for b in (8, 64, 1000)]
    assert len(set(many)) == 1, f"scratch bytes grow with the batch: {many}"
    assert many[0] <= max(2**18, one), f"scratch {many[0]} exceeds max_chunk_bytes and one image"


@given(case=stack_cases(), threads=st.integers(2, 4))
def test_threads_change_nothing(case: StackCase, threads: int) -> None:
    layers, x = case.layers(np.float32), case.x(np.float32)
    single = DeployStack(layers, algorithms=case.algorithms, threads=1)(x)
    with mock.patch.object(engine_workers, "PARALLEL_ELEMENTS", 0):  # split even the tiniest copies
        multi = DeployStack(layers, algorithms=case.algorithms, threads=threads)(x)
    # the copies are exact; the bands of rows change only the matrix products' row counts
    assert_close(multi, single, dtype=np.float32, what=f"{threads} threads")


def test_weights_for_the_prepared_size_are_computed_once_when_built() -> None:
    case = StackCase((3, 8, 8, 8), (1, 1, 2), (2, 1, 1), None, 1, 32, 30, seed=8)
    stack = DeployStack(case.layers(np.float32), input_size=(32, 30))
    built = stack.weight_bytes
    assert built > 0, "the stack prepares its weights when it is built"
    stack(case.x(np.float32))
    assert stack.weight_bytes == built, "a call at the prepared size computed more weights"
    stack(case.x(np.float32)[:, :, :5, :5])  # another size may need another layout, once
    grown = stack.weight_bytes
    stack(case.x(np.float32)[:, :, :5, :5])
    assert stack.weight_bytes == grown, "weights for a size are computed only once"


@pytest.mark.skipif(not hasattr(mmap, "MAP_ANONYMOUS"), reason="no anonymous mappings here")
def test_large_buffers_from_a_fresh_mapping() -> None:
    """A call's buffers all lie in one fresh anonymous mapping, kept for later calls of that shape.

    Not recycled heap memory from ``np.empty`` (see ``_fresh_memory``): the
    mapping is spied on, and every padded buffer and scratch array of the call's
    plan must lie inside the one mapping the call made.
    """
    case = StackCase((3, 16, 16, 16), (1, 1, 2), (2, 1, 1), None, 3, 96, 80, seed=13)
    layers, x = case.layers(np.float32), case.x(np.float32)
    stack = DeployStack(layers, input_size=(96, 80))  # its weights are mapped now, not below
    needed = stack.scratch_bytes(96, 80, batch=3)
    assert needed >= 2 * 2**20, f"the case must need large buffers; {needed} bytes"
    real_mmap = mmap.mmap
    made: list[tuple[tuple[Any, ...], dict[str, Any], mmap.mmap]] = []

    def spy(*args: Any, **kwargs: Any) -> mmap.mmap:
        mapping = real_mmap(*args, **kwargs)
        made.append((args, kwargs, mapping))
        return mapping

    expected, scale = reference_stack(x, layers)
    with mock.patch.object(mmap, "mmap", spy):
        assert_close(stack(x), expected, dtype=np.float32, scale=scale, what="96x80, mapped")
        assert_close(stack(x), expected, dtype=np.float32, scale=scale, what="second call")
    assert len(made) == 1, f"one mapping for the shape, reused by the second call; got {len(made)}"
    args, kwargs, mapping = made[0]
    assert args[:2] == (-1, len(mapping)) and len(mapping) >= needed, (
        f"an anonymous mapping of at least {needed} bytes; got mmap{args}"
    )
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    assert kwargs.get("flags") == flags, f"private anonymous flags {flags}; got {kwargs}"
    start = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    (plan,) = stack._plans.values()
    arrays = [*plan.buffers, *(slot for arena in plan.arenas for slot in arena.slots.values())]
    for i, array in enumerate(arrays):
        first, last = array.ctypes.data, array.ctypes.data + array.nbytes
        assert start <= first and last <= start + len(mapping), (
            f"array {i} of the plan ({array.shape}) lies outside the mapping"
        )


# ----------------------------------------------------------------- issue 12: threads, weights once


@st.composite
def wide_layer_cases(draw: st.DrawFn) -> tuple[StackCase, int]:
    """A stem, then one layer with more output channels than 4x its output pixels, and threads.

    By construction the second layer reads its kernel in place (``im2col_kernel``):
    tiny, odd and non-square images (1 to 5 pixels a side), strides 1 and 2.
    """
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.sampled_from((1, 2)))
    oh, ow = (height - 1) // stride + 1, (width - 1) // stride + 1
    wide = draw(st.integers(4 * oh * ow + 1, 4 * oh * ow + 12))
    middle = draw(st.integers(1, 6))
    case = StackCase(
        channels=(draw(st.integers(1, 5)), middle, wide),
        groups=(1, 1),
        strides=(1, stride),
        algorithms=("im2col", "im2col"),
        batch=draw(st.integers(1, 3)),
        height=height,
        width=width,
        seed=draw(seeds),
    )
    return case, draw(st.integers(1, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@given(drawn=wide_layer_cases())
def test_kernel_order_im2col_equals_reference(
    dtype: npt.DTypeLike, drawn: tuple[StackCase, int]
) -> None:
    """The im2col variant reading the kernel in place, split by rows or by channels."""
    case, threads = drawn
    layers, x = case.layers(dtype), case.x(dtype)
    for layer in layers:
        layer[0].setflags(write=False)  # as a deploy model's kernels: shared, not copied
    stack = DeployStack(layers, algorithms=case.algorithms, threads=threads)
    with mock.patch.object(engine_workers, "PARALLEL_ELEMENTS", 0):  # split even tiny layers
        actual = stack(x)
    key = (1, "im2col_kernel", np.dtype(dtype))
    assert key in stack._weights, f"layer 1 must read its kernel in place: {case}"
    assert np.shares_memory(stack._weights[key], layers[1][0]), (
        "im2col_kernel weights must be the caller's read-only kernel, not a copy"
    )
    expected, scale = reference_stack(x, layers)
    assert_close(actual, expected, dtype=dtype, scale=scale, what=f"{threads} threads: {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=stack_cases(strides=(1, 2)), threads=st.integers(2, 3))
def test_threads_with_one_blas_thread_equal_reference(
    dtype: npt.DTypeLike, case: StackCase, threads: int
) -> None:
    """Row bands (and channel splits) on the stack's threads, BLAS pinned to one thread."""
    layers, x = case.layers(dtype), case.x(dtype)
    stack = DeployStack(layers, algorithms=case.algorithms, threads=threads)
    with mock.patch.object(engine_workers, "PARALLEL_ELEMENTS", 0):
        actual = stack(x)
    expected, scale = reference_stack(x, layers)
    assert_close(actual, expected, dtype=dtype, scale=scale, what=f"{threads} threads: {case}")


def test_blas_is_pinned_to_one_thread_during_a_threaded_call_and_restored() -> None:
    controller = engine_workers.blas_controller()
    if controller is None:
        pytest.skip("threadpoolctl is not installed: threads > 1 runs as 1")
    seen: list[int] = []
    case = StackCase((3, 8, 8), (1, 1), (2, 1), ("im2col", "winograd2"), 2, 12, 10, seed=3)
    stack = DeployStack(case.layers(np.float32), algorithms=case.algorithms, threads=2)
    real = np.matmul

    def blas_threads() -> list[int]:  # BLAS only: OpenMP pools (torch's, in this process) differ
        return [info["num_threads"] for info in controller.info() if info["user_api"] == "blas"]

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.extend(blas_threads())
        return real(*args, **kwargs)

    before = blas_threads()
    with mock.patch.object(np, "matmul", spy):
        stack(case.x(np.float32))
    assert seen and set(seen) == {1}, f"BLAS must run on one thread inside the call; saw {seen}"
    after = blas_threads()
    assert after == before, f"BLAS threads must be restored: {before} -> {after}"


def test_read_only_kernels_are_shared_and_writeable_ones_copied() -> None:
    case = StackCase((3, 8, 8), (1, 1), (2, 1), None, 1, 16, 16, seed=4)
    layers = case.layers(np.float32)
    frozen = layers[0][0].copy()
    frozen.setflags(write=False)
    writeable = layers[1][0].copy()
    stack = DeployStack([(frozen, layers[0][1], 2, 1), (writeable, layers[1][1], 1, 1)])
    assert stack._layers[0].kernel is frozen, "a read-only kernel must be shared, not copied"
    assert not np.shares_memory(stack._layers[1].kernel, writeable), "a writeable one is copied"
    x = case.x(np.float32)
    before = stack(x)
    writeable *= 2.0  # the caller changes its array: the stack must not see it
    assert_close(stack(x), before, dtype=np.float32, what="after the caller mutated its kernel")


def test_weights_are_prepared_without_a_second_copy() -> None:
    """Preparing the weights allocates them once: no consolidation copy of all of them.

    tracemalloc sees the float64 intermediates of one layer at a time (the
    weights themselves live in one mapping it does not see, or in NumPy
    arrays it does); the peak must stay well below twice the weights.
    """
    layers = [(np.ones((64, 64, 3, 3), np.float32) * 0.01, np.zeros(64, np.float32), 1, 1)] * 8
    tracemalloc.start()
    stack = DeployStack(layers, input_size=(32, 32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    one_layer_f64 = 36 * 64 * 64 * 8 * 2  # G k (t, O, I, 3) and G k G^T (t, O, I, t), float64
    assert stack.weight_bytes == 8 * 36 * 64 * 64 * 4, f"F(4x4) weights: {stack.weight_bytes}"
    assert peak <= one_layer_f64 + stack.weight_bytes // 4, (
        f"preparing {stack.weight_bytes} bytes of weights peaked at {peak} traced bytes"
    )


def test_identical_layers_share_two_buffers() -> None:
    """A run of identical layers alternates between two padded buffers, still exact."""
    case = StackCase((4,) + (6,) * 6, (1,) * 6, (1,) * 6, ("winograd2",) * 6, 2, 9, 7, seed=5)
    layers, x = case.layers(np.float64), case.x(np.float64)
    stack = DeployStack(layers, algorithms=case.algorithms)
    actual = stack(x)
    (plan,) = stack._plans.values()
    distinct = {buffer.ctypes.data for buffer in plan.buffers}
    # the input (4 channels), two alternating for the five 6-channel inputs, the output
    assert len(distinct) == 4, f"7 buffers of 3 geometries need 4 arrays; got {len(distinct)}"
    expected, scale = reference_stack(x, layers)
    assert_close(actual, expected, dtype=np.float64, scale=scale, what="shared buffers")


def test_default_threads_follow_blas_and_a_call_restores_blas() -> None:
    """threads=None takes BLAS's own thread count (at most DEFAULT_MAX_THREADS), or 1."""
    from reparam.engine import stack as stack_module
    from reparam.engine import workers

    layers = [_layer()]
    stack = DeployStack(layers)
    if workers.blas_controller() is None:
        assert stack._workers.threads == 1, "without threadpoolctl the stack must not thread"
        return
    expected = min(workers.blas_threads(), stack_module.DEFAULT_MAX_THREADS)
    assert stack._workers.threads == expected, (
        f"default threads: got {stack._workers.threads}, expected {expected} (BLAS has "
        f"{workers.blas_threads()})"
    )
    with workers.blas_controller().limit(limits=1, user_api="blas"):
        assert DeployStack(layers)._workers.threads == 1, "BLAS on 1 thread: the stack takes 1"


def test_workers_run_every_task_and_raise_what_a_helper_raised() -> None:
    from reparam.engine.workers import Workers

    pool = Workers(3)
    seen: list[int] = []
    pool.run([lambda: seen.append(0), lambda: seen.append(1), lambda: seen.append(2)])
    assert sorted(seen) == [0, 1, 2], f"each task must run once; ran {seen}"

    def fail() -> None:
        raise ArithmeticError("from a helper thread")

    with pytest.raises(ArithmeticError, match="from a helper thread"):
        pool.run([lambda: seen.append(3), fail])
    assert seen[-1] == 3, "the calling thread's task must still run"
    pool.run([lambda: seen.append(4), lambda: seen.append(5)])  # the helpers still serve
    assert sorted(seen[-2:]) == [4, 5], f"after an error the helpers must keep working; {seen}"


_FORK_SCRIPT = """
import os, signal, numpy as np
from reparam.engine import DeployStack
rng = np.random.default_rng(5)
layers = [(rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8), 2, 1),
          (rng.standard_normal((8, 8, 3, 3)), rng.standard_normal(8), 1, 1)]
x = rng.standard_normal((2, 3, 12, 12))
stack = DeployStack(layers, threads=2)
expected = stack(x)  # the parent's helper threads are running now
pid = os.fork()
if pid == 0:  # the child exits 0 only if its call finishes and agrees
    code = 1
    try:
        signal.alarm(20)  # a hang would otherwise block the test
        code = 0 if np.array_equal(stack(x), expected) else 1
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
raise SystemExit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 3)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_runs_a_threaded_stack_without_the_parents_threads() -> None:
    """Helper threads do not survive a fork: the child must start its own, not wait forever.

    In a fresh interpreter (this process may hold other libraries' threads, which fork warns
    about), a stack runs on two threads, the process forks, and the child calls the stack.
    """
    done = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"the forked child's call failed or hung (exit {done.returncode}): {done.stderr[-800:]}"
    )


def test_the_models_head_runs_with_blas_pinned_like_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """model(x) runs its head inside the stack's BLAS scope: no BLAS helper left spinning."""
    from reparam.engine import workers
    from reparam.models import repvgg

    if workers.blas_controller() is None:
        pytest.skip("threadpoolctl is not installed: the stack leaves the threads to BLAS")
    deploy = repvgg.RepVGG.create("A0", num_classes=10, seed=0, dtype=np.float32).reparameterize()
    if deploy._fast_stack._workers.threads == 1:
        pytest.skip("BLAS has one thread here: nothing is pinned")
    seen: list[int] = []
    original = repvgg.Head.__call__

    def spy(self: Any, features: npt.NDArray[Any]) -> npt.NDArray[Any]:
        seen.append(workers.blas_threads())
        return original(self, features)

    monkeypatch.setattr(repvgg.Head, "__call__", spy)
    deploy(np.zeros((1, 3, 32, 32), np.float32))
    assert seen == [1], f"the head must run with BLAS on one thread; BLAS had {seen}"
    assert workers.blas_threads() > 1, "BLAS's threads must be restored after the call"
