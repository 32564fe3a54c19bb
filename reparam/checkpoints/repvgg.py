"""RepVGG checkpoints: a flat state dict (or a file) to a :class:`RepVGG` and back.

The key names come from :mod:`reparam.checkpoints.layouts` (official or
timm, detected from the keys), the files from
:mod:`reparam.checkpoints.formats`. The architecture follows from the tensors
alone: each block's branches and groups (``C_in / kernel.shape[1]``) come
from its shapes, and the stride is 2 for the stem and the first block of
every stage, 1 elsewhere (the rule of every published RepVGG).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError
from ..core.params import BatchNorm
from ..models.architectures import (
    BlockSpec,
    NamedSpecs,
    architecture_differences,
    block_specs,
    canonical_architecture,
    match_architecture,
)
from ..models.repvgg import Block, DeployBlock, Head, RepVGG, TrainBlock
from .formats import (
    CHECKPOINT_SUFFIXES,
    Tensors,
    check_suffix,
    listing,
    read_checkpoint,
    shown,
    shown_path,
    write_tensors,
)
from .layouts import (
    BLOCK_KEY,
    BN_LEAVES,
    BRANCHES,
    HEAD,
    Layout,
    block_key,
    block_prefix,
    check_layout,
    detect_layout,
    leaves,
)

__all__ = ["LoadedCheckpoint", "from_state_dict", "load", "load_file", "save", "to_state_dict"]


# --------------------------------------------------------------------------- state dict -> model


def _parse_keys(
    tensors: Mapping[str, Any], layout: Layout, problems: list[str]
) -> tuple[dict[tuple[int, int], dict[str, dict[str, Any]]], dict[str, Any]]:
    """Group tensors by block ((stage, index), stem = (0, 0)) and branch; collect the head."""
    leaf_table = leaves(layout)
    head_prefix = HEAD[layout] + "."
    pattern = BLOCK_KEY[layout]
    blocks: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    head: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(head_prefix) and key[len(head_prefix) :] in ("weight", "bias"):
            head[key[len(head_prefix) :]] = value
            continue
        match = pattern.match(key)
        if match is None or match.group(3) not in leaf_table:
            problems.append(f"unexpected key {shown(key, 60)}")
            continue
        stage_text, index_text, rest = match.groups()
        if stage_text is None:
            position = (0, 0)
        else:
            stage = int(stage_text) + (1 if layout == "timm" else 0)
            position = (stage, int(index_text))
            if stage == 0:
                problems.append(f"unexpected key {shown(key, 60)} (the stem has no index)")
                continue
        branch, leaf = leaf_table[rest]
        blocks.setdefault(position, {}).setdefault(branch, {})[leaf] = value
    return blocks, head


def _block_name(position: tuple[int, int]) -> str:
    return "stage0" if position == (0, 0) else f"stage{position[0]}.{position[1]}"


def _gaps(present: list[int]) -> tuple[list[int], int]:
    """Find the first few numbers missing from 0..max(present), and how many are missing."""
    first: list[int] = []
    expected = 0
    for number in sorted(set(present)):
        first += range(expected, min(number, expected + 5 - len(first)))
        expected = number + 1
    return first[:5], expected - len(set(present))


def _check_positions(
    positions: list[tuple[int, int]], layout: Layout, problems: list[str]
) -> list[tuple[int, int]]:
    """Blocks in order; missing stem, stages or blocks are problems."""
    if (0, 0) not in positions:
        problems.append(f"missing block {block_prefix('stage0', layout)} (the stem)")
    stages = [stage for stage, _ in positions if stage > 0]
    missing_stages, count = _gaps([0, *stages])
    for stage in missing_stages:
        name = block_prefix(f"stage{stage}.0", layout).rsplit(".", 1)[0]
        problems.append(f"missing stage {name} (stages are numbered without gaps)")
    if count > len(missing_stages):
        problems.append(f"{count - len(missing_stages)} more stages missing")
    for stage in sorted(set(stages)):
        missing, count = _gaps([index for s, index in positions if s == stage])
        for index in missing:
            name = block_prefix(f"stage{stage}.{index}", layout)
            problems.append(f"missing block {name} (blocks are numbered from 0 without gaps)")
        if count > len(missing):
            problems.append(f"{count - len(missing)} more blocks missing in stage {stage}")
    return sorted(positions)


def _as_array(value: Any, key: str, problems: list[str]) -> npt.NDArray[Any] | None:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        problems.append(f"{key} has dtype {array.dtype}; expected a floating dtype")
        return None
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        problems.append(f"{key} has {bad:,} non-finite values (NaN or inf) of {array.size:,}")
        return None
    return array


def _check_variance(var: npt.NDArray[Any], key: str, block: str, problems: list[str]) -> bool:
    negative = np.flatnonzero(var < 0)
    if negative.size:
        index = int(negative[0])
        problems.append(
            f"{key} (block {block}) has {negative.size} negative variance"
            f"{'s' if negative.size > 1 else ''}, {float(var[index]):g} at channel {index}"
        )
        return False
    return True


def _branch_arrays(
    name: str,
    branch: str,
    parts: dict[str, Any],
    leaves: tuple[str, ...],
    layout: Layout,
    problems: list[str],
) -> dict[str, npt.NDArray[Any]] | None:
    """All leaves of a branch, or None (with problems recorded) when some are missing or bad."""
    missing = [leaf for leaf in leaves if leaf not in parts]
    for leaf in missing:
        problems.append(f"missing key {block_key(name, branch, leaf, layout)}")
    arrays = {
        leaf: _as_array(parts[leaf], block_key(name, branch, leaf, layout), problems)
        for leaf in leaves
        if leaf in parts
    }
    if missing or any(array is None for array in arrays.values()):
        return None
    checked = {leaf: array for leaf, array in arrays.items() if array is not None}
    if "running_var" in checked and not _check_variance(
        checked["running_var"],
        block_key(name, branch, "running_var", layout),
        block_prefix(name, layout),
        problems,
    ):
        return None
    return checked


def _expect_shape(
    array: npt.NDArray[Any],
    expected: tuple[int, ...],
    key: str,
    problems: list[str],
    *,
    kind: str = "shape mismatch",
) -> bool:
    if array.shape != expected:
        problems.append(f"{kind}: {key} has shape {array.shape}, expected {expected}")
        return False
    return True


class _BlockArrays(NamedTuple):
    """Checked arrays of one block, before they become a TrainBlock or DeployBlock."""

    name: str
    form: str  # "train", "deploy", or "invalid" (problems were recorded)
    arrays: dict[str, dict[str, Any]]
    spec: BlockSpec


def _check_block(
    name: str,
    branches: dict[str, dict[str, Any]],
    in_channels: int | None,
    stride: int,
    layout: Layout,
    problems: list[str],
) -> _BlockArrays | None:
    """Check one block's tensors; return them with the block's spec, or None on problems."""
    form = "deploy" if "reparam" in branches else "train"
    if form == "deploy" and set(branches) - {"reparam"}:
        others = ", ".join(sorted(set(branches) - {"reparam"}))
        problems.append(
            f"{block_prefix(name, layout)} mixes the deploy conv "
            f"({BRANCHES[layout]['reparam']}) with train-form branches ({others})"
        )
        return None
    main_branch = "reparam" if form == "deploy" else "dense"
    main_leaves = ("kernel", "bias") if form == "deploy" else ("kernel", *BN_LEAVES)
    main = _branch_arrays(
        name, main_branch, branches.get(main_branch, {}), main_leaves, layout, problems
    )
    pointwise = identity = None
    if "pointwise" in branches:
        pointwise = _branch_arrays(
            name, "pointwise", branches["pointwise"], ("kernel", *BN_LEAVES), layout, problems
        )
    if "identity" in branches:
        identity = _branch_arrays(
            name, "identity", branches["identity"], BN_LEAVES, layout, problems
        )
    if main is None:
        return None
    kernel = main["kernel"]
    kernel_key = block_key(name, main_branch, "kernel", layout)
    if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3] or kernel.shape[2] % 2 == 0:
        problems.append(
            f"shape mismatch: {kernel_key} has shape {kernel.shape}, expected (C_out, "
            "C_in // groups, K, K) with K odd"
        )
        return None
    out_channels, per_group = kernel.shape[:2]
    channels_in = per_group if in_channels is None else in_channels
    if channels_in % per_group or out_channels % (channels_in // per_group):
        problems.append(
            f"shape mismatch: {kernel_key} has shape {kernel.shape}, but the block's input has "
            f"{channels_in} channels; expected kernel.shape[1] to divide {channels_in} into "
            f"groups that also divide C_out={out_channels}"
        )
        return None
    groups = channels_in // per_group
    spec = BlockSpec(channels_in, out_channels, stride, groups)
    ok = True
    for leaf in main_leaves[1:]:
        ok &= _expect_shape(
            main[leaf], (out_channels,), block_key(name, main_branch, leaf, layout), problems
        )
    if pointwise is not None:
        ok &= _expect_shape(
            pointwise["kernel"],
            (out_channels, per_group, 1, 1),
            block_key(name, "pointwise", "kernel", layout),
            problems,
            kind="branches disagree",
        )
        for leaf in BN_LEAVES:
            ok &= _expect_shape(
                pointwise[leaf],
                (out_channels,),
                block_key(name, "pointwise", leaf, layout),
                problems,
            )
    if identity is not None:
        if not spec.has_identity and (in_channels is not None or name == "stage0"):
            problems.append(
                f"branches disagree: {block_prefix(name, layout)} has an identity branch but "
                f"maps {channels_in} -> {out_channels} channels with stride {stride}; an identity "
                "needs C_in == C_out and stride 1"
            )
            ok = False
        for leaf in BN_LEAVES:
            ok &= _expect_shape(
                identity[leaf],
                (out_channels,),
                block_key(name, "identity", leaf, layout),
                problems,
            )
    missing_branch = ("pointwise" in branches and pointwise is None) or (
        "identity" in branches and identity is None
    )
    if not ok or missing_branch:
        return _BlockArrays(name, "invalid", {}, spec)
    return _BlockArrays(
        name,
        form,
        {"main": main, "pointwise": pointwise or {}, "identity": identity or {}},
        spec,
    )


def _build_block(checked: _BlockArrays, dtype: np.dtype[Any], eps: float, layout: Layout) -> Block:
    """Build one block; an error of the model layer is re-raised naming the tensors' block."""

    def bn(branch: str, arrays: dict[str, Any]) -> BatchNorm:
        gamma, beta, mean, var = (np.asarray(arrays[leaf], dtype=dtype) for leaf in BN_LEAVES)
        try:
            return BatchNorm(gamma, beta, mean, var, eps=eps)
        except ReparamError as exc:
            where = block_key(checked.name, branch, "weight", layout).removesuffix(".weight")
            raise ReparamError(
                f"from_state_dict: {where}.* (block {block_prefix(checked.name, layout)}): {exc}"
            ) from None

    main = checked.arrays["main"]
    spec = checked.spec
    try:
        if checked.form == "deploy":
            return DeployBlock(
                np.asarray(main["kernel"], dtype=dtype),
                np.asarray(main["bias"], dtype=dtype),
                spec.stride,
                spec.groups,
            )
        pointwise = checked.arrays["pointwise"]
        identity = checked.arrays["identity"]
        return TrainBlock(
            np.asarray(main["kernel"], dtype=dtype),
            bn("dense", main),
            np.asarray(pointwise["kernel"], dtype=dtype) if pointwise else None,
            bn("pointwise", pointwise) if pointwise else None,
            bn("identity", identity) if identity else None,
            spec.stride,
            spec.groups,
        )
    except ReparamError as exc:
        if str(exc).startswith("from_state_dict:"):
            raise
        raise ReparamError(
            f"from_state_dict: block {block_prefix(checked.name, layout)}: {exc}"
        ) from None


def _model_dtype(arrays: list[npt.NDArray[Any]]) -> np.dtype[Any]:
    """float64 if any tensor is float64, else float32 (float16 is computed in float32)."""
    if any(array.dtype.itemsize >= 8 for array in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def from_state_dict(
    tensors: Mapping[str, Any],
    *,
    layout: Layout | None = None,
    arch: str | None = None,
    eps: float = 1e-5,
    strides: Mapping[str, int] | None = None,
) -> RepVGG:
    """Build a model from a flat mapping of names to arrays.

    Parameters
    ----------
    tensors : mapping of str to array_like
        A state dict in the official or the timm layout, train or deploy
        form; ``num_batches_tracked`` entries are ignored.
    layout : {"official", "timm"}, optional
        Detected from the keys by default.
    arch : str, optional
        A published architecture the weights must have (e.g. ``"RepVGG-A0"``);
        by default it is inferred when the shapes match one.
    eps : float, default 1e-5
        The BatchNorm epsilon (1e-5 in both layouts' frameworks).
    strides : mapping of str to int, optional
        Strides by block prefix in the checkpoint's names (``"stages.2.0"``,
        ``fnmatch`` patterns allowed). The tensors never hold strides: by
        default a block with an identity branch has stride 1 and otherwise
        the published rule applies (2 for the stem and the first block of
        each stage).

    Returns
    -------
    RepVGG
        float64 if any tensor is float64, otherwise float32.

    Raises
    ------
    ReparamError
        One error listing every missing or unexpected key, shape mismatch,
        branch disagreement and architecture difference.

    Examples
    --------
    >>> import numpy as np
    >>> tensors = {"stage0.rbr_reparam.weight": np.ones((4, 3, 3, 3)),
    ...            "stage0.rbr_reparam.bias": np.zeros(4),
    ...            "linear.weight": np.ones((2, 4)), "linear.bias": np.zeros(2)}
    >>> from_state_dict(tensors)
    RepVGG(custom, form=deploy, blocks=1, classes=2, dtype=float64, layout=official)
    """
    return _from_state_dict(
        tensors,
        layout=layout,
        arch=arch,
        eps=eps,
        source="from_state_dict: the state dict",
        strides=strides,
    )


def _problems_error(
    problems: list[str], keys: Any, layout: Layout, *, forced: bool, source: str
) -> ReparamError:
    """One line: the first problems that fit, how many more, and a hint when one applies."""
    hint = ""
    if forced:
        try:
            detected = detect_layout(keys)
        except ReparamError:
            detected = layout
        if detected != layout:
            hint = f"; hint: the keys are in the {detected} layout (see --layout)"
    if not hint and any(p.startswith(("missing", "unexpected")) for p in problems):
        hint = "; hint: check --layout and that the checkpoint is complete"
    if not hint and problems[0].startswith("architecture:"):
        hint = "; hint: without --arch any consistent RepVGG loads"
    found = listing([shown(problem, 110) for problem in problems], budget=100)
    return ReparamError(f"{source} does not fit a RepVGG ({layout} layout): {found}{hint}")


def _layout_of(keys: Any, layout: Layout | None, *, source: str) -> Layout:
    """Return the forced layout, or the one detected from the keys (errors name ``source``)."""
    if layout is not None:
        return check_layout(layout, func=source.split(":")[0])
    try:
        return detect_layout(keys)
    except ReparamError as exc:
        raise ReparamError(f"{source}: {str(exc).removeprefix('detect_layout: ')}") from None


def _check_keys(keys: list[str], *, layout: Layout | None, source: str) -> None:
    """Refuse a checkpoint from its key names alone, before any tensor is read."""
    chosen = _layout_of(keys, layout, source=source)
    problems: list[str] = []
    parsed, _ = _parse_keys(dict.fromkeys(keys), chosen, problems)
    _check_positions(list(parsed), chosen, problems)
    if problems:
        raise _problems_error(problems, keys, chosen, forced=layout is not None, source=source)


def _stride(
    name: str, branches: Mapping[str, Any], layout: Layout, strides: Mapping[str, int] | None
) -> int:
    """Return a block's stride: stated, else 1 with an identity branch, else the RepVGG rule.

    The tensors never say the stride. An identity branch only exists at
    stride 1; elsewhere the published rule applies (2 for the stem and the
    first block of a stage, 1 for the rest), unless ``strides`` (keyed by the
    block's prefix in the checkpoint's layout, ``fnmatch`` patterns allowed)
    says otherwise, e.g. for a timm stage configured with ``s=1``.
    """
    prefix = block_prefix(name, layout)
    for pattern, stride in (strides or {}).items():
        if pattern == prefix or fnmatch.fnmatchcase(prefix, pattern):
            return int(stride)
    if "identity" in branches:
        return 1
    return 2 if name == "stage0" or name.endswith(".0") else 1


def _from_state_dict(
    tensors: Mapping[str, Any],
    *,
    layout: Layout | None,
    arch: str | None,
    eps: float,
    source: str,
    strides: Mapping[str, int] | None = None,
) -> RepVGG:
    func = "from_state_dict"
    chosen = _layout_of(tensors.keys(), layout, source=source)
    expected_arch = None if arch is None else canonical_architecture(arch)
    problems: list[str] = []
    parsed, head = _parse_keys(tensors, chosen, problems)
    positions = _check_positions(list(parsed), chosen, problems)
    checked: list[_BlockArrays] = []
    in_channels: int | None = None
    for position in positions:
        name = _block_name(position)
        stride = _stride(name, parsed[position], chosen, strides)
        block = _check_block(name, parsed[position], in_channels, stride, chosen, problems)
        if block is None:
            in_channels = None
            continue
        checked.append(block)
        in_channels = block.spec.out_channels
    forms = {block.form for block in checked} - {"invalid"}
    if len(forms) > 1:
        train = [b.name for b in checked if b.form == "train"]
        deploy = [b.name for b in checked if b.form == "deploy"]
        problems.append(
            f"mixed forms: train-form blocks ({', '.join(train[:3])}...) and deploy-form blocks "
            f"({', '.join(deploy[:3])}...) in one checkpoint"
        )
    head_arrays = _branch_head(head, chosen, in_channels, problems)
    specs: NamedSpecs = tuple((block.name, block.spec) for block in checked)
    if expected_arch is not None and not problems:
        differences = architecture_differences(specs, expected_arch)
        if differences:
            found_arch = match_architecture(specs) or f"a custom RepVGG of {len(specs)} blocks"
            expected_blocks = len(block_specs(expected_arch))
            problems.append(
                f"architecture: the weights are {found_arch}, not {expected_arch} "
                f"({expected_blocks} blocks)"
            )
        # blocks that differ first, then missing or extra ones
        differences.sort(key=lambda line: line.startswith(("missing", "unexpected")))
        problems += [f"architecture: {line}" for line in differences]
    if problems:
        forced = layout is not None
        raise _problems_error(problems, tensors.keys(), chosen, forced=forced, source=source)
    if head_arrays is None:  # pragma: no cover - a missing head is one of the problems above
        raise ReparamError(f"{func}: the checkpoint has no usable head")
    every = [a for block in checked for group in block.arrays.values() for a in group.values()]
    dtype = _model_dtype([np.asarray(a) for a in every] + list(head_arrays))
    blocks = tuple((block.name, _build_block(block, dtype, eps, chosen)) for block in checked)
    weight, bias = (np.asarray(a, dtype=dtype) for a in head_arrays)
    return RepVGG(blocks, Head(weight, bias), arch=match_architecture(specs), layout=chosen)


def _branch_head(
    head: dict[str, Any], layout: Layout, features: int | None, problems: list[str]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    prefix = HEAD[layout]
    for leaf in ("weight", "bias"):
        if leaf not in head:
            problems.append(f"missing key {prefix}.{leaf}")
    if len(head) != 2:
        return None
    weight = _as_array(head["weight"], f"{prefix}.weight", problems)
    bias = _as_array(head["bias"], f"{prefix}.bias", problems)
    if weight is None or bias is None:
        return None
    if weight.ndim != 2 or (features is not None and weight.shape[1] != features):
        expected = f"(num_classes, {features if features is not None else 'C'})"
        problems.append(
            f"shape mismatch: {prefix}.weight has shape {weight.shape}, expected {expected}"
        )
        return None
    if bias.shape != weight.shape[:1]:
        problems.append(
            f"shape mismatch: {prefix}.bias has shape {bias.shape}, expected {weight.shape[:1]}"
        )
        return None
    return weight, bias


# --------------------------------------------------------------------------- model -> state dict


def to_state_dict(model: RepVGG, *, layout: Layout | None = None) -> Tensors:
    """Name every array of a model in a checkpoint layout.

    Parameters
    ----------
    model : RepVGG
        Train or deploy form.
    layout : {"official", "timm"}, optional
        The model's own layout by default.

    Returns
    -------
    dict of str to ndarray
        Train form: every branch's kernel and BatchNorm (running statistics
        included, ``num_batches_tracked`` omitted: PyTorch fills it in).
        Deploy form: ``rbr_reparam`` / ``reparam_conv`` weight and bias.
        The arrays are the model's own read-only arrays (no copy).

    Examples
    --------
    >>> import numpy as np
    >>> from reparam import Architecture
    >>> model = RepVGG.create(Architecture((4,), (1,)), num_classes=2).reparameterize()
    >>> sorted(to_state_dict(model, layout="timm"))
    ['head.fc.bias', 'head.fc.weight', 'stem.reparam_conv.bias', 'stem.reparam_conv.weight']
    """
    chosen = model.layout if layout is None else check_layout(layout, func="to_state_dict")
    tensors: Tensors = {}
    for name, block in model.blocks:
        if isinstance(block, DeployBlock):
            tensors[block_key(name, "reparam", "kernel", chosen)] = block.kernel
            tensors[block_key(name, "reparam", "bias", chosen)] = block.bias
            continue
        branches: list[tuple[str, Any, BatchNorm | None]] = [
            ("dense", block.dense_kernel, block.dense_bn),
            ("pointwise", block.pointwise_kernel, block.pointwise_bn),
            ("identity", None, block.identity_bn),
        ]
        for branch, kernel, bn in branches:
            if bn is None:
                continue
            if kernel is not None:
                tensors[block_key(name, branch, "kernel", chosen)] = kernel
            for leaf, array in zip(BN_LEAVES, (bn.gamma, bn.beta, bn.mean, bn.var), strict=True):
                tensors[block_key(name, branch, leaf, chosen)] = array
    tensors[f"{HEAD[chosen]}.weight"] = model.head.weight
    tensors[f"{HEAD[chosen]}.bias"] = model.head.bias
    return tensors


class LoadedCheckpoint(NamedTuple):
    """A model read from a file, and what the file held.

    Attributes
    ----------
    model : RepVGG
    stored_dtypes : tuple of str
        The distinct dtypes of the floating tensors as stored in the file
        (e.g. ``("bfloat16",)``), sorted; the model computes in float32 or
        float64 whatever they were.
    """

    model: RepVGG
    stored_dtypes: tuple[str, ...]


def load_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    layout: Layout | None = None,
    eps: float = 1e-5,
    strides: Mapping[str, int] | None = None,
) -> LoadedCheckpoint:
    """Load a RepVGG checkpoint and say what the file held; see :func:`load`.

    The key names are checked before any tensor of an ``.npz`` or
    ``.safetensors`` file is read, so a file that is not a RepVGG checkpoint
    (or a zip bomb with other names) is refused without reading its arrays.
    Errors start with ``load:`` and name ``path``.
    """
    name = shown_path(path)
    contents = read_checkpoint(
        path,
        check_keys=lambda keys: _check_keys(keys, layout=layout, source=f"load: {name}"),
    )
    model = _from_state_dict(
        contents.tensors,
        layout=layout,
        arch=arch,
        eps=eps,
        source=f"load: {name}",
        strides=strides,
    )
    floating = {
        contents.stored[key]
        for key, array in contents.tensors.items()
        if np.issubdtype(array.dtype, np.floating)
    }
    return LoadedCheckpoint(model, tuple(sorted(floating)))


def load(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    layout: Layout | None = None,
    eps: float = 1e-5,
) -> RepVGG:
    """Load a RepVGG checkpoint (train or deploy form) as a NumPy model.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors`` (float64, float32, float16 or bfloat16;
        bfloat16 is widened exactly to float32), ``.pth`` or ``.pt``.
        Containers (``state_dict``, ``model_state_dict``, ``model``) and key
        prefixes (``module.``, ``_orig_mod.``) are removed.
    arch : str, optional
        A published architecture the weights must have; inferred otherwise.
    layout : {"official", "timm"}, optional
        Detected from the keys by default.
    eps : float, default 1e-5
        BatchNorm epsilon.

    Returns
    -------
    RepVGG

    Raises
    ------
    ReparamError
        See :func:`reparam.checkpoints.read_checkpoint` and
        :func:`from_state_dict`; also when a tensor holds NaN or inf (naming
        it and how many), or a running variance is negative (naming the
        tensor and its block). Every message is one line naming ``path``.
    OSError
        If the file cannot be opened.
    """
    return load_file(path, arch=arch, layout=layout, eps=eps).model


def save(model: RepVGG, path: str | os.PathLike[str], *, layout: Layout | None = None) -> None:
    """Write a model's weights atomically in its layout (or ``layout``); format by suffix.

    Parameters
    ----------
    model : RepVGG
        Train or deploy form.
    path : str or path-like
        ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.
    layout : {"official", "timm"}, optional
        The layout the model came from by default.

    Raises
    ------
    ReparamError
        On an unknown suffix or a missing optional package (nothing is written).
    OSError
        If writing fails; no partial file is left behind.
    """
    check_suffix(Path(path), func="save", allowed=CHECKPOINT_SUFFIXES)
    write_tensors(path, to_state_dict(model, layout=layout))
