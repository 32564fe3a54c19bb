"""Checkpoints: formats, the two key layouts, structure inference and all-at-once errors."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

import reparam
import reparam.checkpoints as rio
from reparam import Architecture, BlockSpec, ReparamError, RepVGG, TrainBlock
from reparam.checkpoints import (
    detect_layout,
    from_state_dict,
    read_tensors,
    to_state_dict,
    write_tensors,
)

TINY = Architecture(widths=(4, 8, 8, 12), depths=(1, 2, 3, 1), groups=2, grouped_layers=(2, 4))
SUFFIXES = (".npz", ".safetensors", ".pth")


def _tiny(dtype: Any = np.float32, seed: int = 0) -> RepVGG:
    return RepVGG.create(TINY, num_classes=5, seed=seed, dtype=dtype)


def _same_weights(a: RepVGG, b: RepVGG, what: str) -> None:
    assert a.form == b.form and a.specs == b.specs, f"{what}: structure {a} vs {b}"
    for (name, x), (_, y) in zip(a.blocks, b.blocks, strict=True):
        for i, (u, v) in enumerate(zip(x.arrays, y.arrays, strict=True)):
            np.testing.assert_array_equal(u, v, err_msg=f"{what}: {name} array {i}")
    np.testing.assert_array_equal(a.head.weight, b.head.weight, err_msg=f"{what}: head")


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("layout", ["official", "timm"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_round_trip(tmp_path: Path, suffix: str, layout: str, form: str) -> None:
    model = _tiny()
    if form == "deploy":
        model = model.reparameterize()
    path = tmp_path / f"weights{suffix}"
    reparam.save(model, path, layout=layout)  # type: ignore[arg-type]
    loaded = reparam.load(path)
    assert loaded.layout == layout and loaded.form == form, f"got {loaded}"
    _same_weights(model, loaded, f"{form} {layout} {suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "stray files"


def test_published_architecture_is_inferred_whatever_the_classes(tmp_path: Path) -> None:
    model = RepVGG.create("A0", num_classes=10)
    path = tmp_path / "a0.npz"
    reparam.save(model, path)
    loaded = reparam.load(path)
    assert loaded.arch == "RepVGG-A0" and loaded.num_classes == 10, f"got {loaded}"
    assert reparam.load(path, arch="a0").arch == "RepVGG-A0", "explicit arch"
    deploy = tmp_path / "a0_deploy.safetensors"
    reparam.save(model.reparameterize(), deploy)
    assert reparam.load(deploy).arch == "RepVGG-A0", "deploy form: arch from shapes"


def test_wrong_arch_lists_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "a0.npz"
    reparam.save(RepVGG.create("A0", num_classes=10), path)
    with pytest.raises(ReparamError) as info:
        reparam.load(path, arch="RepVGG-A1")
    message = str(info.value)
    assert "the weights are RepVGG-A0, not RepVGG-A1" in message, message
    assert "and 22 more" in message and "\n" not in message, message  # 22 differing blocks


def test_key_names_official_and_timm() -> None:
    model = RepVGG.create("A0", num_classes=10)
    official = to_state_dict(model)
    for key in (
        "stage0.rbr_dense.conv.weight",
        "stage0.rbr_1x1.bn.running_var",
        "stage1.1.rbr_identity.running_mean",
        "stage3.13.rbr_dense.bn.bias",
        "linear.weight",
    ):
        assert key in official, f"missing official key {key}"
    assert "stage1.0.rbr_identity.weight" not in official, "identity on a strided block"
    timm = to_state_dict(model, layout="timm")
    for key in (
        "stem.conv_kxk.conv.weight",
        "stem.conv_1x1.bn.weight",
        "stages.0.1.identity.running_var",
        "stages.2.13.conv_kxk.bn.bias",
        "head.fc.bias",
    ):
        assert key in timm, f"missing timm key {key}"
    assert len(official) == len(timm), "both layouts name every array once"
    deploy = to_state_dict(model.reparameterize(), layout="timm")
    assert "stages.3.0.reparam_conv.weight" in deploy, sorted(deploy)[:4]
    assert "stage4.0.rbr_reparam.bias" in to_state_dict(model.reparameterize()), "official"


def test_layout_detection() -> None:
    assert detect_layout(["stage0.rbr_dense.conv.weight"]) == "official", "official"
    assert detect_layout(["stages.0.0.conv_kxk.conv.weight", "head.fc.weight"]) == "timm", "timm"
    with pytest.raises(ReparamError, match="no network layout"):
        detect_layout(["features.0.weight"])
    with pytest.raises(ReparamError, match="both"):
        detect_layout(["stage0.rbr_dense.conv.weight", "head.fc.weight"])


def test_forced_layout(tmp_path: Path) -> None:
    tensors = to_state_dict(_tiny(), layout="timm")
    assert from_state_dict(tensors, layout="timm").layout == "timm", "forced timm"
    with pytest.raises(ReparamError, match=re.escape("unexpected key stem.conv_kxk.conv.weight")):
        from_state_dict(tensors, layout="official")


# ------------------------------------------------------------------- structure from tensors


def test_any_number_of_stages_and_depths() -> None:
    specs = (
        ("stage0", BlockSpec(2, 6, 2, 1)),
        *((f"stage1.{i}", BlockSpec(6, 6, 2 if i == 0 else 1, 1)) for i in range(3)),
        ("stage2.0", BlockSpec(6, 9, 2, 3)),
        ("stage3.0", BlockSpec(9, 9, 2, 1)),
        ("stage3.1", BlockSpec(9, 9, 1, 3)),
        ("stage4.0", BlockSpec(9, 4, 2, 1)),
        ("stage5.0", BlockSpec(4, 8, 2, 4)),
        ("stage5.1", BlockSpec(8, 8, 1, 2)),
    )
    model = RepVGG.from_specs(specs, num_classes=3, dtype=np.float64)
    loaded = from_state_dict(to_state_dict(model))
    assert loaded.specs == specs, f"inferred {loaded.specs}"
    assert loaded.arch is None, "a custom model matched a published one"
    x = np.random.default_rng(0).standard_normal((2, 2, 33, 33))
    assert_close(loaded.reparameterize()(x), model(x), dtype=np.float64, what="6 stages")


def test_blocks_without_1x1_or_identity_branches() -> None:
    model = _tiny(np.float64)
    tensors = {k: v for k, v in to_state_dict(model).items() if "rbr_1x1" not in k}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("stage2.1.rbr_identity")}
    loaded = from_state_dict(tensors)
    stage2_1 = dict(loaded.blocks)["stage2.1"]
    assert isinstance(stage2_1, TrainBlock), "train form"
    assert stage2_1.pointwise_kernel is None and stage2_1.identity_bn is None, "branches"
    x = np.random.default_rng(1).standard_normal((1, 3, 10, 10))
    assert_close(loaded.reparameterize()(x), loaded(x), dtype=np.float64, what="dense only")


def test_num_batches_tracked_is_ignored_and_eps_can_be_set() -> None:
    tensors: dict[str, Any] = dict(to_state_dict(_tiny()))
    tensors["stage0.rbr_dense.bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    model = from_state_dict(tensors, eps=1e-3)
    block = model.blocks[0][1]
    assert isinstance(block, TrainBlock) and block.dense_bn.eps == 1e-3, "eps override"
    assert from_state_dict(tensors).blocks[0][1].dense_bn.eps == 1e-5, "default eps"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [(np.float64, np.float64), (np.float32, np.float32), (np.float16, np.float32)],
)
def test_model_dtype_follows_the_checkpoint(stored: Any, expected: Any) -> None:
    tensors = {k: v.astype(stored) for k, v in to_state_dict(_tiny()).items()}
    assert from_state_dict(tensors).dtype == np.dtype(expected), f"{stored} checkpoint"


# ------------------------------------------------------------------- containers


def test_pytorch_containers_and_ddp_prefix(tmp_path: Path) -> None:
    model = _tiny()
    tensors = {f"module.{k}": torch.from_numpy(v.copy()) for k, v in to_state_dict(model).items()}
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "state_dict": tensors}, path)
    _same_weights(model, reparam.load(path), "state_dict + module.")
    torch.save({"model": {k.removeprefix("module."): v for k, v in tensors.items()}}, path)
    _same_weights(model, reparam.load(path), "model container")


def test_npz_with_ddp_prefix(tmp_path: Path) -> None:
    model = _tiny()
    path = tmp_path / "ddp.npz"
    np.savez(path, **{f"module.{k}": v for k, v in to_state_dict(model).items()})
    _same_weights(model, reparam.load(path), "npz module.")


def test_non_tensor_entries_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"stage0.rbr_dense.conv.weight": torch.ones(2, 1, 3, 3), "note": "hi"}, path)
    with pytest.raises(ReparamError, match="not tensors: note"):
        read_tensors(path)
    with pytest.raises(ReparamError, match="unexpected key note"):  # refused by name first
        reparam.load(path)


# ------------------------------------------------------------------- errors: all at once


_DEFECTS: dict[str, tuple[tuple[str, Any], str]] = {
    "missing key": (
        ("stage1.0.rbr_dense.bn.running_var", None),
        "missing key stage1.0.rbr_dense.bn.running_var",
    ),
    "missing head": (("linear.bias", None), "missing key linear.bias"),
    "unexpected key": (
        ("stage1.1.rbr_dense.extra", np.ones(3, np.float32)),
        "unexpected key stage1.1.rbr_dense.extra",
    ),
    "shape mismatch": (
        ("stage2.0.rbr_dense.bn.weight", np.ones(3, np.float32)),
        "shape mismatch: stage2.0.rbr_dense.bn.weight has shape (3,), expected (8,)",
    ),
    "branches disagree": (
        ("stage1.1.rbr_1x1.conv.weight", np.ones((8, 4, 3, 3), np.float32)),
        "shape mismatch: stage1.1.rbr_1x1.conv.weight has shape (8, 4, 3, 3), "
        "expected (8, 4, 1, 1)",
    ),
}


def _with_defects(*names: str) -> dict[str, Any]:
    tensors: dict[str, Any] = dict(to_state_dict(_tiny()))
    for name in names:
        (key, value), _ = _DEFECTS[name]
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


@pytest.mark.parametrize("defect", sorted(_DEFECTS))
def test_each_problem_is_named(defect: str) -> None:
    with pytest.raises(ReparamError) as info:
        from_state_dict(_with_defects(defect))
    needle = _DEFECTS[defect][1]
    assert needle in str(info.value), f"{needle!r} not in:\n{info.value}"


def test_all_problems_are_counted_in_one_line() -> None:
    """Five problems at once: the first that fit are listed, the others counted."""
    with pytest.raises(ReparamError) as info:
        from_state_dict(_with_defects(*_DEFECTS))
    message = str(info.value)
    listed = [name for name, (_, needle) in _DEFECTS.items() if needle in message]
    assert listed, f"no problem listed:\n{message}"
    assert f"and {len(_DEFECTS) - len(listed)} more" in message, message
    assert "\n" not in message and len(message) <= 300, message


def test_identity_branch_means_stride_1_unless_stated_otherwise() -> None:
    """An identity branch only exists at stride 1: a stage may start without a stride (timm s=1)."""
    tensors: dict[str, Any] = dict(to_state_dict(_tiny()))
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        tensors[f"stage2.0.rbr_identity.{leaf}"] = np.ones(8, np.float32)
    model = from_state_dict(tensors)
    assert dict(model.specs)["stage2.0"].stride == 1, "identity branch => stride 1"
    assert dict(model.specs)["stage1.0"].stride == 2, "no identity at a stage start: the rule"
    with pytest.raises(  # a stated stride 2: the RepVGG block has no identity branch to read
        ReparamError, match=re.escape("unexpected key stage2.0.rbr_identity.weight")
    ):
        from_state_dict(tensors, strides={"stage2.0": 2})
    stated = from_state_dict(to_state_dict(_tiny()), strides={"stage1.*": 1})
    assert {n: s.stride for n, s in stated.specs if n.startswith("stage1")} == {
        "stage1.0": 1,
        "stage1.1": 1,
    }


def test_missing_blocks_and_stages() -> None:
    tensors = to_state_dict(_tiny())
    gap = {k: v for k, v in tensors.items() if not k.startswith("stage2.1.")}
    with pytest.raises(ReparamError, match=re.escape("missing block stage2.1")):
        from_state_dict(gap)
    no_stem = {k: v for k, v in tensors.items() if not k.startswith("stage0.")}
    with pytest.raises(ReparamError, match="missing block stage0"):
        from_state_dict(no_stem)
    timm = to_state_dict(_tiny(), layout="timm")
    no_stage = {k: v for k, v in timm.items() if not k.startswith("stages.1.")}
    with pytest.raises(ReparamError, match=r"missing stage stages\.1"):
        from_state_dict(no_stage)


def test_mixed_forms_in_one_checkpoint() -> None:
    model = _tiny()
    train = to_state_dict(model)
    deploy = to_state_dict(model.reparameterize())
    mixed = {k: v for k, v in train.items() if not k.startswith("stage0.")}
    mixed.update({k: v for k, v in deploy.items() if k.startswith("stage0.")})
    with pytest.raises(ReparamError, match="mixed forms"):
        from_state_dict(mixed)


def test_integer_tensors_are_rejected() -> None:
    tensors: dict[str, Any] = dict(to_state_dict(_tiny()))
    tensors["linear.weight"] = np.ones((5, 12), np.int64)
    with pytest.raises(ReparamError, match=re.escape("linear.weight has dtype int64")):
        from_state_dict(tensors)


# ------------------------------------------------------------------- files and atomic writes


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ReparamError, match=r"unknown file format.*\.npz, \.safetensors"):
        reparam.save(_tiny(), tmp_path / "weights.bin")
    assert list(tmp_path.iterdir()) == [], "something was written"
    with pytest.raises(ReparamError, match="unknown file format"):
        reparam.load(tmp_path / "weights.h5")


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No such file"):
        reparam.load(tmp_path / "absent.npz")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ReparamError, match=r"cannot parse .*broken\.safetensors as a safetensors"):
        reparam.load(path)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "deploy.npz"
    target.write_bytes(b"old contents")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for suffix in SUFFIXES:
        path = target.with_suffix(suffix)
        with pytest.raises(OSError, match="No space left"):
            reparam.save(_tiny(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.npz"], "temporary files left"
    assert target.read_bytes() == b"old contents", "the old file was damaged"


def test_write_that_fails_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write_array(stream: Any, array: Any, **options: Any) -> None:
        stream.write(b"\x93NUMPY partial")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(OSError, match="Input/output error"):
        write_tensors(tmp_path / "x.npz", {"a": np.ones(3)})
    assert list(tmp_path.iterdir()) == [], "partial file left"


def test_missing_optional_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ReparamError, match="pip install safetensors"):
        reparam.save(_tiny(), tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ReparamError, match="pip install torch"):
        reparam.save(_tiny(), tmp_path / "w.pth")
    (tmp_path / "w.pt").write_bytes(b"not read")
    with pytest.raises(ReparamError, match="need PyTorch to read"):
        reparam.load(tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"], "files were written"


def test_read_tensors_returns_plain_arrays(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_tensors(path, {"a": np.arange(6.0).reshape(2, 3)})
    tensors = read_tensors(path)
    np.testing.assert_array_equal(tensors["a"], np.arange(6.0).reshape(2, 3), err_msg="values")


def test_save_array_is_npy_only(tmp_path: Path) -> None:
    rio.save_array(tmp_path / "y.npy", np.ones(3))
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.ones(3), err_msg="npy")
    with pytest.raises(ReparamError, match=r"expected one of \.npy"):
        rio.save_array(tmp_path / "y.txt", np.ones(3))


def test_block_names_must_have_keys() -> None:
    model = RepVGG.from_specs([("first", BlockSpec(3, 4, 2, 1))], num_classes=2)
    with pytest.raises(ReparamError, match="block name 'first' has no key in the timm layout"):
        to_state_dict(model, layout="timm")


@st.composite
def _named_specs(draw: st.DrawFn) -> tuple[tuple[str, BlockSpec], ...]:
    """Any block sequence that follows the stride rule: stem, then stages of 1-3 blocks."""
    channels = draw(st.integers(1, 4))
    specs = [("stage0", BlockSpec(channels, draw(st.integers(1, 6)), 2, 1))]
    channels = specs[0][1].out_channels
    for stage in range(1, draw(st.integers(1, 4)) + 1):
        for index in range(draw(st.integers(1, 3))):
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
            widths = st.integers(1, 3).map(lambda k, g=groups: g * k)
            if index:  # later blocks often keep the width (and get an identity branch)
                widths = st.one_of(st.just(channels), widths)
            width = draw(widths)
            specs.append(
                (f"stage{stage}.{index}", BlockSpec(channels, width, 1 + (index == 0), groups))
            )
            channels = width
    return tuple(specs)


@given(specs=_named_specs(), layout=st.sampled_from(["official", "timm"]), deploy=st.booleans())
def test_structure_is_inferred_from_the_tensors(
    specs: tuple[tuple[str, BlockSpec], ...], layout: str, deploy: bool
) -> None:
    model = RepVGG.from_specs(specs, num_classes=3, dtype=np.float64)
    if deploy:
        model = model.reparameterize()
    loaded = from_state_dict(to_state_dict(model, layout=layout))  # type: ignore[arg-type]
    assert loaded.specs == specs, f"inferred {loaded.specs}, built {specs}"
    assert loaded.form == model.form and loaded.layout == layout, f"got {loaded}"


# ------------------------------------------------------------------- one reader, every layout


def _qarepvgg_path() -> str:
    from importlib import resources

    return str(resources.files("reparam").joinpath("data", "digits_qarepvgg.npz"))


def test_qarepvgg_network_is_read_by_the_same_reader(tmp_path: Path) -> None:
    """YOLOv6's QARepVGGBlock keys in RepVGG's network: a train model of the family's trees."""
    model = reparam.load(_qarepvgg_path())
    assert (model.layout, model.family, model.form) == ("qarepvgg", "QARepVGGBlock", "train")
    stored = dict(np.load(_qarepvgg_path()))
    written = to_state_dict(model)
    assert list(written) == list(stored), "the trees name every tensor as the file does"
    for key, array in stored.items():
        np.testing.assert_array_equal(written[key], array, err_msg=key)
    block = dict(model.blocks)["stage1.1"]
    assert isinstance(block, TrainBlock) and block.pointwise_bn is None, "a bare 1x1 conv"
    # each block folds as the family folds it (the post-sum bn included)
    state = {k.removeprefix("stage1.1."): v for k, v in stored.items() if k.startswith("stage1.1.")}
    family = reparam.families.from_state_dict(
        "QARepVGGBlock", state, in_channels=32, out_channels=32, stride=1, groups=1
    ).reparameterize()
    deploy = block.reparameterize()
    np.testing.assert_array_equal(deploy.kernel, family.kernel, err_msg="kernel")
    np.testing.assert_array_equal(deploy.bias, family.bias, err_msg="bias")
    path = tmp_path / "qa.safetensors"
    reparam.save(model, path)
    _same_weights(model, reparam.load(path), "QARepVGG round trip")


def test_a_layout_names_one_family(tmp_path: Path) -> None:
    qa = reparam.load(_qarepvgg_path())
    with pytest.raises(ReparamError, match=r"to_state_dict: block stage0 is a QARepVGGBlock; the "):
        to_state_dict(qa, layout="official")
    assert "stage0.rbr_reparam.weight" in to_state_dict(qa.reparameterize(), layout="official")
    with pytest.raises(ReparamError, match=r"save: block name 'first' has no key"):
        reparam.save(RepVGG.from_specs([("first", BlockSpec(3, 4, 2, 1))]), tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_a_new_network_layout_is_one_registry_entry() -> None:
    """QARepVGG blocks under timm's network names: one entry, then detected, read and written."""
    entry = rio.NetworkLayout(
        "qa-timm", "QARepVGGBlock", "official", "stem", "stages.{s}.{i}", 0, "head.fc"
    )
    qa = reparam.load(_qarepvgg_path())
    rio.register_network_layout(entry)
    try:
        tensors = to_state_dict(qa, layout="qa-timm")
        assert {"stem.rbr_1x1.weight", "stages.1.1.bn.running_var", "head.fc.bias"} <= set(
            tensors
        ), sorted(tensors)[:6]
        assert detect_layout(tensors) == "qa-timm", "detected from the keys"
        loaded = from_state_dict(tensors)
        assert loaded.layout == "qa-timm" and loaded.specs == qa.specs, f"got {loaded}"
        _same_weights(qa, loaded, "the new layout")
        with pytest.raises(ReparamError, match="'qa-timm' is registered already"):
            rio.register_network_layout(entry)
    finally:
        del rio.NETWORK_LAYOUTS["qa-timm"]


def test_published_deploy_form_that_keeps_its_bn_is_folded() -> None:
    """YOLOv6's deploy QARepVGG keeps bn after rbr_reparam: the reader folds it in."""
    qa = reparam.load(_qarepvgg_path()).astype(np.float64)
    tensors: dict[str, Any] = {"linear.weight": qa.head.weight, "linear.bias": qa.head.bias}
    for name, block in qa.blocks:
        assert isinstance(block, TrainBlock) and isinstance(
            block.tree, reparam.core.algebra.Sequential
        )
        branches, norm = block.tree.steps
        assert isinstance(norm, reparam.core.algebra.Norm), "the post-sum bn"
        kernel, bias = reparam.core.algebra.fold(branches)
        tensors |= {f"{name}.rbr_reparam.weight": kernel, f"{name}.rbr_reparam.bias": bias}
        bn = norm.bn
        arrays = (bn.gamma, bn.beta, bn.mean, bn.var)
        tensors |= {f"{name}.bn.{k}": v for k, v in zip(_BN, arrays, strict=True)}
    loaded = from_state_dict(tensors)
    assert loaded.form == "deploy" and loaded.layout == "qarepvgg", f"got {loaded}"
    x = np.random.default_rng(3).standard_normal((2, 1, 16, 16))
    assert_close(loaded(x), qa(x), dtype=np.float64, what="deploy with kept bn vs train form")


_BN = ("weight", "bias", "running_mean", "running_var")


def test_deploy_blocks_keep_their_padding() -> None:
    """The padding is the block's: K // 2 by default, another one runs as given."""
    model = _tiny(np.float64)
    deploy = model.reparameterize()
    assert all(block.padding == 1 for _, block in deploy.blocks), "3x3: padding 1"
    kernel, bias = np.ones((2, 3, 3, 3)), np.zeros(2)
    valid = reparam.DeployBlock(kernel, bias, padding=0)
    assert valid(np.ones((1, 3, 5, 5))).shape == (1, 2, 3, 3), "padding 0: 5 -> 3"
    net = RepVGG((("stage0", valid),), reparam.Head(np.ones((1, 2)), np.zeros(1)))
    assert net._fast_stack is None, "the engine runs centred 3x3 convs only"
    assert net.multiply_adds(5, 5) == 54 * 9 + 2, "counted with its own padding"
    with pytest.raises(ReparamError, match="padding must be an integer >= 0"):
        reparam.DeployBlock(kernel, bias, padding=-1)
