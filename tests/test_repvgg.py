"""The RepVGG model: published configurations, counts, and train == deploy for every one."""

from __future__ import annotations

from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

import reparam
import reparam.models.repvgg as repvgg
from reparam import (
    ARCHITECTURES,
    Architecture,
    BlockSpec,
    DeployBlock,
    ReparamError,
    RepVGG,
    TrainBlock,
    block_specs,
)
from reparam.engine import DeployStack
from reparam.models.architectures import (
    architecture_differences,
    canonical_architecture,
    match_architecture,
    spec_multiply_adds,
    spec_parameters,
)

# Published in the RepVGG paper (train / deploy parameters in millions, deploy GMACs at 224).
PUBLISHED = {
    "RepVGG-A0": (9.11, 8.31, 1.36),
    "RepVGG-A1": (14.09, 12.79, 2.36),
    "RepVGG-A2": (28.21, 25.50, 5.12),
    "RepVGG-B0": (15.82, 14.34, 3.06),
    "RepVGG-B1": (57.42, 51.83, 11.82),
    "RepVGG-B1g2": (45.78, 41.36, 8.81),
    "RepVGG-B1g4": (39.97, 36.13, 7.31),
    "RepVGG-B2": (89.02, 80.32, 18.38),
    "RepVGG-B2g4": (61.76, 55.78, 11.33),
    "RepVGG-B3": (123.09, 110.96, 26.21),
    "RepVGG-B3g4": (83.83, 75.63, 16.06),
}

TINY = Architecture(widths=(4, 8, 8, 12), depths=(1, 2, 3, 1), groups=2, grouped_layers=(2, 4))


def test_every_published_configuration_is_listed() -> None:
    assert set(ARCHITECTURES) == set(PUBLISHED), f"configurations: {sorted(ARCHITECTURES)}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_paper(name: str) -> None:
    train, deploy, _ = PUBLISHED[name]
    specs = block_specs(name)
    got_train = round(spec_parameters(specs, num_classes=1000, form="train") / 1e6, 2)
    got_deploy = round(spec_parameters(specs, num_classes=1000, form="deploy") / 1e6, 2)
    assert (got_train, got_deploy) == (train, deploy), (
        f"{name}: got {got_train}/{got_deploy} M, published {train}/{deploy} M"
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_multiply_adds_match_the_paper(name: str) -> None:
    expected = PUBLISHED[name][2]
    specs = block_specs(name)
    got = round(spec_multiply_adds(specs, num_classes=1000, height=224, width=224) / 1e9, 2)
    assert got == expected, f"{name}: {got} GMACs at 224x224, published {expected}"


@pytest.mark.parametrize("arch", ["RepVGG-A0", TINY])
def test_counts_from_specs_equal_counts_from_arrays(arch: str | Architecture) -> None:
    model = RepVGG.create(arch, num_classes=1000)
    deploy = model.reparameterize()
    specs = model.specs
    assert model.num_parameters == spec_parameters(specs, num_classes=1000, form="train"), (
        "train parameters: arrays and specs disagree"
    )
    assert deploy.num_parameters == spec_parameters(specs, num_classes=1000, form="deploy"), (
        "deploy parameters: arrays and specs disagree"
    )
    for form, counted in (("train", model), ("deploy", deploy)):
        expected = spec_multiply_adds(specs, num_classes=1000, height=224, width=160, form=form)
        assert counted.multiply_adds(224, 160) == expected, f"{form} multiply-adds disagree"
    assert model.multiply_adds(224, 160, form="deploy") == deploy.multiply_adds(224, 160), (
        "a train model's deploy-form count must equal the deploy model's"
    )


def test_block_structure_of_a_grouped_configuration() -> None:
    specs = block_specs("B1g2")
    names = [name for name, _ in specs]
    assert names[:3] == ["stage0", "stage1.0", "stage1.1"], f"names start {names[:3]}"
    assert names[-1] == "stage4.0" and len(names) == 1 + 4 + 6 + 16 + 1, f"names {names}"
    layers = [spec for _, spec in specs[1:]]
    grouped = [i for i, spec in enumerate(layers, start=1) if spec.groups == 2]
    assert grouped == list(range(2, 27, 2)), f"grouped layers {grouped}"
    strided = [name for name, spec in specs if spec.stride == 2]
    assert strided == ["stage0", "stage1.0", "stage2.0", "stage3.0", "stage4.0"], strided
    assert specs[0][1] == BlockSpec(3, 64, 2, 1), f"stem {specs[0][1]}"
    assert specs[-1][1].out_channels == 2048, f"last width {specs[-1][1]}"


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("A0", "RepVGG-A0"), ("repvgg_b1g4", "RepVGG-B1g4"), ("RepVGG-B3", "RepVGG-B3")],
)
def test_architecture_names_accept_common_spellings(spelling: str, expected: str) -> None:
    assert canonical_architecture(spelling) == expected, f"{spelling!r}"


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ReparamError, match=r"unknown name.*RepVGG-A0"):
        block_specs("RepVGG-C9")


def test_match_and_differences() -> None:
    assert match_architecture(block_specs("B2g4")) == "RepVGG-B2g4", "B2g4 not recognised"
    assert match_architecture(block_specs(TINY)) is None, "a custom model matched a published one"
    differences = architecture_differences(block_specs("A1"), "RepVGG-A0")
    assert any("stage0: got 3->64" in line for line in differences), differences
    assert architecture_differences(block_specs("A1"), "RepVGG-A1") == [], "A1 vs itself"


# ------------------------------------------------------------------- train == deploy


def _logits_agree(model: RepVGG, x: np.ndarray, what: str) -> None:
    deploy = model.reparameterize()
    assert deploy.form == "deploy" and model.form == "train", f"{what}: forms"
    train_logits = model(x)
    deploy_logits = deploy(x)
    assert train_logits.dtype == model.dtype == deploy_logits.dtype, f"{what}: dtype changed"
    assert_close(deploy_logits, train_logits, dtype=model.dtype, what=what)
    np.testing.assert_array_equal(
        deploy_logits.argmax(axis=1), train_logits.argmax(axis=1), err_msg=f"{what}: top-1"
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_deploy_logits_equal_train_logits(name: str, dtype: type) -> None:
    model = RepVGG.create(name, num_classes=10, seed=1, dtype=dtype)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(dtype)
    _logits_agree(model, x, f"{name} {np.dtype(dtype)}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_square_inputs_and_odd_sizes(dtype: type) -> None:
    model = RepVGG.create("A0", num_classes=7, seed=3, dtype=dtype)
    x = np.random.default_rng(4).standard_normal((3, 3, 40, 23)).astype(dtype)
    assert model(x).shape == (3, 7), "logits shape for a 40x23 input"
    _logits_agree(model, x, f"A0 40x23 {np.dtype(dtype)}")


@st.composite
def architectures(draw: st.DrawFn) -> tuple[Architecture, int]:
    """Small custom architectures: 1-4 stages after the stem, grouped layers drawn by index."""
    groups = draw(st.sampled_from([1, 2, 3]))
    stages = draw(st.integers(1, 4))
    widths = tuple(groups * draw(st.integers(1, 3)) for _ in range(stages + 1))
    depths = (1, *(draw(st.integers(1, 3)) for _ in range(stages)))
    layers = sum(depths[1:])
    grouped = tuple(draw(st.sets(st.integers(1, layers), max_size=layers)))
    in_channels = draw(st.integers(1, 3))
    return Architecture(widths, depths, groups, grouped), in_channels


@given(
    case=architectures(),
    seed=st.integers(0, 2**16),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    batch=st.integers(1, 3),
)
def test_any_block_sequence_converts_within_the_tolerance(
    case: tuple[Architecture, int], seed: int, height: int, width: int, batch: int
) -> None:
    """Train and deploy logits agree within the float64 tolerance (1e-10 of their magnitude).

    Not bit for bit: the fused kernel sums the branches' terms in another order.
    """
    arch, in_channels = case
    model = RepVGG.create(arch, num_classes=3, seed=seed, dtype=np.float64, in_channels=in_channels)
    x = np.random.default_rng(seed).standard_normal((batch, in_channels, height, width))
    _logits_agree(model, x, f"{arch} {height}x{width}")


def test_batch_elements_are_independent() -> None:
    model = RepVGG.create(TINY, num_classes=5, dtype=np.float64).reparameterize()
    x = np.random.default_rng(5).standard_normal((4, 3, 9, 11))
    together = model(x)
    for i in range(4):
        assert_close(model(x[i : i + 1])[0], together[i], dtype=np.float64, what=f"image {i}")


def test_empty_batch_gives_empty_logits() -> None:
    model = RepVGG.create(TINY, num_classes=5)
    assert model(np.zeros((0, 3, 8, 8), np.float32)).shape == (0, 5), "empty batch"


def test_input_is_cast_to_the_model_dtype() -> None:
    model = RepVGG.create(TINY, num_classes=5, dtype=np.float32)
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 8))
    logits = model(x)
    assert logits.dtype == np.float32, f"float64 input gave {logits.dtype}"
    np.testing.assert_array_equal(logits, model(x.astype(np.float32)), err_msg="cast first")


def test_float64_copy_of_a_float32_model_agrees() -> None:
    model = RepVGG.create(TINY, num_classes=5, dtype=np.float32)
    wide = model.astype(np.float64)
    x = np.random.default_rng(7).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert wide.dtype == np.float64, f"astype gave {wide.dtype}"
    assert_close(model(x), wide(x), dtype=np.float32, what="float32 vs float64 copy")


# ------------------------------------------------------------------- immutability, seeds


def test_conversion_mutates_nothing_and_returns_new_objects() -> None:
    model = RepVGG.create(TINY, num_classes=5, dtype=np.float64)
    before = [array.copy() for _, block in model.blocks for array in block.arrays]
    deploy = model.reparameterize()
    after = [array for _, block in model.blocks for array in block.arrays]
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        np.testing.assert_array_equal(old, new, err_msg=f"array {i} changed by conversion")
    assert deploy is not model and model.form == "train", "conversion changed the model"
    assert deploy.reparameterize() is deploy, "deploy.reparameterize() must return itself"
    assert deploy.arch == model.arch and deploy.layout == model.layout, "metadata lost"
    kernel = deploy.blocks[0][1]
    assert isinstance(kernel, DeployBlock) and not kernel.kernel.flags.writeable, "writable kernel"
    with pytest.raises(ValueError, match="read-only"):
        model.head.weight[0, 0] = 1.0


def test_blocks_copy_writable_inputs() -> None:
    kernel = np.ones((2, 2, 3, 3))
    block = DeployBlock(kernel, np.zeros(2))
    kernel[0, 0, 0, 0] = 5.0
    assert block.kernel[0, 0, 0, 0] == 1.0, "DeployBlock kept a reference to the caller's array"


def test_create_is_seeded() -> None:
    first = RepVGG.create(TINY, seed=3)
    again = RepVGG.create(TINY, seed=3)
    other = RepVGG.create(TINY, seed=4)
    for (name, a), (_, b), (_, c) in zip(first.blocks, again.blocks, other.blocks, strict=True):
        for x, y, z in zip(a.arrays, b.arrays, c.arrays, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{name}: same seed, other weights")
            assert not np.array_equal(x, z), f"{name}: other seed, same weights"


def test_create_gives_non_trivial_batch_norms() -> None:
    block = RepVGG.create("A0", seed=0).blocks[5][1]
    assert isinstance(block, TrainBlock) and block.identity_bn is not None, (
        "stage2.2 has an identity"
    )
    for bn in (block.dense_bn, block.pointwise_bn, block.identity_bn):
        assert bn is not None, "every branch of this block has a BatchNorm"
        assert np.std(bn.gamma) > 0.1 and np.all(bn.var >= 1.0), f"BN stats too trivial: {bn}"
        assert np.std(bn.mean) > 0.05 and np.std(bn.beta) > 0.05, f"BN mean/beta trivial: {bn}"


# ------------------------------------------------------------------- fusion of large blocks


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_block_fusion_uses_each_batchnorms_eps(eps: float, dtype: type) -> None:
    """A RepVGG-B-sized block (192 -> 192, groups 2) fuses with the eps of its BatchNorms.

    The expected kernel is written out here, independently of reparam: each
    BN's factor ``gamma / sqrt(var + eps)`` in float64, the 1x1 kernel and the
    identity added at the centre tap. Dropping eps anywhere (a kernel error of
    about 1% at eps 1e-3 with these variances) fails it.
    """
    rng = np.random.default_rng(5)
    channels, groups = 192, 2
    per_group = channels // groups

    def bn() -> reparam.BatchNorm:
        return reparam.BatchNorm(
            rng.uniform(0.5, 1.5, channels).astype(dtype),
            rng.normal(0, 0.2, channels).astype(dtype),
            rng.normal(0, 0.2, channels).astype(dtype),
            rng.uniform(0.05, 0.2, channels).astype(dtype),  # small: eps matters
            eps=eps,
        )

    dense = rng.standard_normal((channels, per_group, 3, 3)).astype(dtype)
    pointwise = rng.standard_normal((channels, per_group, 1, 1)).astype(dtype)
    bns = [bn(), bn(), bn()]
    block = TrainBlock(dense, bns[0], pointwise, bns[1], bns[2], 1, groups)
    fused = block.reparameterize()

    def factor(norm: reparam.BatchNorm) -> np.ndarray:
        return norm.gamma.astype(np.float64) / np.sqrt(norm.var.astype(np.float64) + eps)

    def shift(norm: reparam.BatchNorm) -> np.ndarray:
        return norm.beta.astype(np.float64) - norm.mean.astype(np.float64) * factor(norm)

    kernel = dense.astype(np.float64) * factor(bns[0])[:, None, None, None]
    kernel[:, :, 1, 1] += pointwise[:, :, 0, 0].astype(np.float64) * factor(bns[1])[:, None]
    rows = np.arange(channels)
    kernel[rows, rows % per_group, 1, 1] += factor(bns[2])
    bias = shift(bns[0]) + shift(bns[1]) + shift(bns[2])
    assert fused.kernel.dtype == np.dtype(dtype), f"dtype {fused.kernel.dtype}"
    assert_close(fused.kernel, kernel, dtype=dtype, what=f"kernel at eps {eps}")
    assert_close(fused.bias, bias, dtype=dtype, what=f"bias at eps {eps}")


def test_core_errors_are_reraised_with_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    model = RepVGG.create(TINY, num_classes=5)

    def failing(*args: object, **kwargs: object) -> None:
        raise ReparamError("fold: something is wrong; got X, expected Y")

    monkeypatch.setattr(repvgg, "fold", failing)
    with pytest.raises(ReparamError, match=r"^stage0 \(stride 2, groups 1\): fold: "):
        model.reparameterize()


def test_forward_errors_name_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    model = RepVGG.create(TINY, num_classes=5)

    def failing(*args: object, **kwargs: object) -> None:
        raise ReparamError("conv2d: broken")

    monkeypatch.setattr(repvgg, "evaluate", failing)
    with pytest.raises(ReparamError, match=r"^stage0 \(stride 2, groups 1\): conv2d: broken"):
        model(np.zeros((1, 3, 8, 8), np.float32))


def test_blocks_that_do_not_chain_are_named() -> None:
    model = RepVGG.create(TINY, num_classes=5)
    blocks = list(model.blocks)
    del blocks[1]  # stage1.0 maps 4 -> 8; without it stage1.1 gets 4 channels
    with pytest.raises(ReparamError, match=r"stage1\.1 \(stride 1, groups 2\): .*C_in=8.*4"):
        RepVGG(tuple(blocks), model.head)


def test_wrong_input_channels() -> None:
    model = RepVGG.create(TINY, num_classes=5)
    with pytest.raises(ReparamError, match=r"x has 1 channels.*expected \(N, 3, H, W\)"):
        model(np.zeros((1, 1, 8, 8), np.float32))


def test_identity_branch_needs_same_channels_and_stride_one() -> None:
    model = RepVGG.create(TINY, num_classes=5)
    block = model.blocks[2][1]  # stage1.1 has an identity
    assert isinstance(block, TrainBlock) and block.identity_bn is not None, "fixture"
    # the algebra's checks of the block's tree: channels that differ, outputs of different sizes
    with pytest.raises(ReparamError, match=r"^TrainBlock: .*branches must share their input"):
        TrainBlock(block.dense_kernel, block.dense_bn, identity_bn=block.identity_bn, groups=1)
    with pytest.raises(ReparamError, match=r"^TrainBlock: output_size: branches .* give different"):
        TrainBlock(
            block.dense_kernel, block.dense_bn, identity_bn=block.identity_bn, stride=2, groups=2
        )
    TrainBlock(block.dense_kernel, block.dense_bn, identity_bn=block.identity_bn, groups=2)


def test_mixed_forms_and_dtypes_are_rejected() -> None:
    model = RepVGG.create(TINY, num_classes=5)
    deploy = model.reparameterize()
    mixed = (model.blocks[0], *deploy.blocks[1:])
    with pytest.raises(ReparamError, match="must all be TrainBlock or all DeployBlock"):
        RepVGG(mixed, model.head)
    with pytest.raises(ReparamError, match="share one dtype"):
        RepVGG(model.blocks, model.head.astype(np.float64))
    with pytest.raises(ReparamError, match="float32 or float64"):
        RepVGG.create(TINY, dtype=np.float16)


def test_reexports() -> None:
    for name in ("RepVGG", "load", "save", "BlockSpec", "TrainBlock", "DeployBlock", "Head"):
        assert name in reparam.__all__, f"reparam.{name} is not exported"


def test_block_names_must_be_unique() -> None:
    model = RepVGG.create(Architecture((4, 4), (1, 1)), num_classes=2)
    stem = model.blocks[0][1]
    block = model.blocks[1][1]
    with pytest.raises(ReparamError, match=r"unique; got \['stage0'\] repeated"):
        RepVGG((("stage0", stem), ("stage0", block)), model.head)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("arch", ["RepVGG-A0", "RepVGG-B1g2"])
def test_deploy_fast_path_equals_reference_path(arch: str, dtype: type) -> None:
    deploy = RepVGG.create(arch, num_classes=10, seed=4, dtype=dtype).reparameterize()
    x = np.random.default_rng(4).standard_normal((3, 3, 40, 24))
    calls: list[tuple[int, ...]] = []
    run_stack = DeployStack.__call__

    def spy(self: DeployStack, inputs: Any, **kwargs: Any) -> Any:
        calls.append(np.shape(inputs))
        return run_stack(self, inputs, **kwargs)

    with mock.patch.object(DeployStack, "__call__", spy):
        fast = deploy(x)
        assert calls == [x.shape], f"{arch}: model(x) must run the DeployStack once; got {calls}"
        reference = deploy(x, fast=False)
        assert calls == [x.shape], f"{arch}: fast=False must not run the DeployStack; got {calls}"
    assert fast.dtype == reference.dtype == np.dtype(dtype), f"dtypes {fast.dtype}"
    assert_close(fast, reference, dtype=dtype, what=f"{arch} fast path vs reference")


def test_fast_path_only_for_3x3_deploy_blocks() -> None:
    tiny = Architecture(widths=(4, 8), depths=(1, 2))
    model = RepVGG.create(tiny, num_classes=3, seed=0)
    assert model._fast_stack is None, "the train form runs the honest three-branch reference"
    assert model.reparameterize()._fast_stack is not None, "a 3x3 deploy form is fast"
    rng = np.random.default_rng(8)
    kernel, bias = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal(4)
    weight, head_bias = rng.standard_normal((2, 4)), rng.standard_normal(2)
    wide = DeployBlock(kernel.astype(np.float32), bias.astype(np.float32))
    head = reparam.Head(weight.astype(np.float32), head_bias.astype(np.float32))
    five = RepVGG((("stage0", wide),), head)
    assert five._fast_stack is None, "5x5 kernels fall back to the reference conv2d"
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    # the fallback's result, written out in float64 from the same float32 arrays: relu(conv2d
    # with padding K // 2 = 2), the mean over the pixels, the head; and the same on |.| for the
    # magnitude of the terms summed (the float32 rounding error is relative to it)
    k64, b64 = wide.kernel.astype(np.float64), wide.bias.astype(np.float64)
    w64, c64 = head.weight.astype(np.float64), head.bias.astype(np.float64)
    x64 = x.astype(np.float64)
    features = np.maximum(reparam.conv2d(x64, k64, b64, padding=2), 0).mean(axis=(2, 3))
    expected = features @ w64.T + c64
    terms = reparam.conv2d(np.abs(x64), np.abs(k64), np.abs(b64), padding=2).mean(axis=(2, 3))
    scale = float(np.max(terms @ np.abs(w64).T + np.abs(c64)))
    logits = five(x)
    assert logits.dtype == np.float32, f"a float32 model gives float32 logits; got {logits.dtype}"
    assert_close(logits, expected, dtype=np.float32, scale=scale, what="5x5 model, fast=True")


def test_train_block_takes_what_fuse_block_takes() -> None:
    """A 1x3 small branch: TrainBlock and fuse_block agree, and the block's forms agree."""
    rng = np.random.default_rng(2)

    def bn() -> reparam.BatchNorm:
        return reparam.BatchNorm(*rng.uniform(0.5, 1.5, (4, 4)))

    dense, small = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 1, 3))
    bns = (bn(), bn(), bn())
    block = TrainBlock(dense, bns[0], small, bns[1], bns[2], 1, 2)
    kernel, bias = reparam.fuse_block((dense, bns[0]), (small, bns[1]), bns[2], groups=2)
    deploy = block.reparameterize()
    np.testing.assert_array_equal(deploy.kernel, kernel)
    np.testing.assert_array_equal(deploy.bias, bias)
    x = rng.standard_normal((2, 4, 6, 5))
    scale = float(np.abs(reparam.core.algebra.magnitude(block.tree, x)).max())
    assert_close(deploy(x), block(x), dtype=np.float64, scale=scale, what="1x3 branch")
    with pytest.raises(ReparamError, match=r"^TrainBlock: output_size: branches .* give different"):
        TrainBlock(dense, bns[0], rng.standard_normal((4, 2, 1, 2)), bns[1], None, 1, 2)
