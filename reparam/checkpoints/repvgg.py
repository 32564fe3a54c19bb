"""RepVGG-style networks: a flat state dict (or a file) to a :class:`RepVGG` and back.

One reader for every registered network layout
(:mod:`reparam.checkpoints.layouts`: RepVGG's official and timm names,
QARepVGG): the layout says where each block and the head are; each block is
read by its family (:func:`reparam.families.from_state_dict`, which checks its
keys, shapes and values and builds its tree); the layout orders the blocks
and checks that they chain. A block's groups follow from the chain
(``C_in / kernel.shape[1]``), its stride from the tensors where they fix it
(a RepVGG identity branch means stride 1), else from the rule of every
published RepVGG: 2 for the stem and the first block of every stage, 1
elsewhere. Files come from :mod:`reparam.checkpoints.formats`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..core.algebra import Conv, Norm, Sequential, fold
from ..core.conv import centred_padding
from ..core.errors import ReparamError
from ..families import FAMILIES
from ..families import from_state_dict as read_family_block
from ..families.base import StateReader
from ..models.architectures import (
    NamedSpecs,
    architecture_differences,
    block_specs,
    canonical_architecture,
    match_architecture,
)
from ..models.repvgg import Block, DeployBlock, Head, Layout, RepVGG, TrainBlock, tree_leaves
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
from .layouts import NETWORK_LAYOUTS, NetworkLayout, detect_layout, network_layout

__all__ = ["LoadedCheckpoint", "from_state_dict", "load", "load_file", "save", "to_state_dict"]

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


# --------------------------------------------------------------------------- state dict -> model


def _parse_keys(
    tensors: Mapping[str, Any], layout: NetworkLayout, problems: list[str]
) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[str, Any]]:
    """Group tensors by block ((stage, index), stem = (0, 0)) with their keys inside the block.

    Keys that are not the head and not inside a block of the layout's family
    are problems.
    """
    head_prefix = layout.head + "."
    blocks: dict[tuple[int, int], dict[str, Any]] = {}
    head: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(head_prefix) and key[len(head_prefix) :] in ("weight", "bias"):
            head[key[len(head_prefix) :]] = value
            continue
        found = layout.split(key)
        if found is None or not layout.owns(found[1]):
            problems.append(f"unexpected key {shown(key, 60)}")
            continue
        position, local = found
        blocks.setdefault(position, {})[local] = value
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
    positions: list[tuple[int, int]], layout: NetworkLayout, problems: list[str], *, func: str
) -> list[tuple[int, int]]:
    """Blocks in order; missing stem, stages or blocks are problems."""
    if (0, 0) not in positions:
        problems.append(f"missing block {layout.prefix('stage0', func=func)} (the stem)")
    stages = [stage for stage, _ in positions if stage > 0]
    missing_stages, count = _gaps([0, *stages])
    for stage in missing_stages:
        name = layout.prefix(f"stage{stage}.0", func=func).rsplit(".", 1)[0]
        problems.append(f"missing stage {name} (stages are numbered without gaps)")
    if count > len(missing_stages):
        problems.append(f"{count - len(missing_stages)} more stages missing")
    for stage in sorted(set(stages)):
        missing, count = _gaps([index for s, index in positions if s == stage])
        for index in missing:
            name = layout.prefix(f"stage{stage}.{index}", func=func)
            problems.append(f"missing block {name} (blocks are numbered from 0 without gaps)")
        if count > len(missing):
            problems.append(f"{count - len(missing)} more blocks missing in stage {stage}")
    return sorted(positions)


def _model_dtype(values: Any) -> np.dtype[Any]:
    """float64 if any floating tensor is float64, else float32 (float16 is computed in float32)."""
    wide = any(
        np.issubdtype(np.asarray(value).dtype, np.floating)
        and np.asarray(value).dtype.itemsize >= 8
        for value in values
    )
    return np.dtype(np.float64 if wide else np.float32)


def _as_dtype(value: Any, dtype: np.dtype[Any]) -> Any:
    """Return a floating tensor in the model's dtype, anything else as it is (for the family)."""
    array = np.asarray(value)
    return array.astype(dtype, copy=False) if np.issubdtype(array.dtype, np.floating) else value


def _stated_stride(prefix: str, strides: Mapping[str, int] | None) -> int | None:
    """Return the stride ``strides`` states for a block prefix (``fnmatch`` patterns allowed)."""
    for pattern, stride in (strides or {}).items():
        if pattern == prefix or fnmatch.fnmatchcase(prefix, pattern):
            return int(stride)
    return None


class _Read(NamedTuple):
    """One block as read: the block (None when it has problems) and its output channels."""

    block: Block | None
    out_channels: int | None


class _Context(NamedTuple):
    """What every block of one read shares."""

    layout: NetworkLayout
    dtype: np.dtype[Any]
    eps: float
    strides: Mapping[str, int] | None
    func: str


def _read_block(
    name: str,
    local: dict[str, Any],
    in_channels: int | None,
    context: _Context,
    problems: list[str],
) -> _Read:
    """Read one block (train form through its family, or the deploy conv); record problems."""
    layout = context.layout
    prefix = layout.prefix(name, func=context.func)
    key_layout = layout.key_layout
    firsts = {key.split(".", 1)[0] for key in local}
    deploy = layout.deploy_prefix in firsts
    kept = FAMILIES[layout.family].kept
    train = sorted(firsts - {layout.deploy_prefix} - (set(kept) if deploy else set()))
    if deploy and train:
        problems.append(
            f"{prefix} mixes the deploy conv ({layout.deploy_prefix}) with train-form branches "
            f"({', '.join(train)})"
        )
        return _Read(None, None)
    state = {
        key_layout.published(key): _as_dtype(value, context.dtype) for key, value in local.items()
    }
    main = f"{layout.deploy_prefix}.weight" if deploy else key_layout.published(key_layout.marker)
    shape = tuple(np.shape(state[main])) if main in state else ()
    expected = "(C_out, C_in // groups, K, K) with K odd"
    if main not in state:
        problems.append(f"missing key {prefix}.{key_layout.local(main)} (expected {expected})")
        return _Read(None, None)
    if len(shape) != 4 or shape[2] != shape[3] or shape[2] % 2 == 0:
        problems.append(
            f"shape mismatch: {prefix}.{key_layout.local(main)} has shape {shape}, expected "
            + expected
        )
        return _Read(None, None)
    out_channels, per_group = shape[:2]
    channels_in = per_group if in_channels is None else in_channels
    if channels_in % per_group or out_channels % (channels_in // per_group):
        problems.append(
            f"shape mismatch: {prefix}.{key_layout.local(main)} has shape {shape}, but the "
            f"block's input has {channels_in} channels; expected kernel.shape[1] to divide "
            f"{channels_in} into groups that also divide C_out={out_channels}"
        )
        return _Read(None, out_channels)
    groups = channels_in // per_group
    names = {key_layout.published(key): f"{prefix}.{key}" for key in local}

    def named(key: str) -> str:
        return names.get(key, f"{prefix}.{key_layout.local(key)}")

    try:
        if deploy:
            block: Block = _read_deploy(state, shape, groups, prefix, kept, context, named)
        else:
            block = _read_train(state, channels_in, groups, prefix, context, named)
    except ReparamError as exc:
        problems += exc.problems or [str(exc.located(prefix))]
        return _Read(None, out_channels)
    return _Read(block, out_channels)


def _read_train(
    state: dict[str, Any],
    in_channels: int,
    groups: int,
    prefix: str,
    context: _Context,
    named: Callable[[str], str],
) -> TrainBlock:
    """Read a train-form block through its family; the stride from the tensors, else the rule."""
    family = FAMILIES[context.layout.family]
    if family.infer is None:  # pragma: no cover - every registered family infers
        raise ReparamError(f"{family.name} cannot read its configuration from tensors")
    inferred = family.infer(state, {"groups": groups})
    assumed = {note.split(":", 1)[0] for note in inferred.notes}
    assumed |= {option for option, _ in inferred.ambiguous}
    stride = _stated_stride(prefix, context.strides)
    if stride is None and "stride" in inferred.config and "stride" not in assumed:
        stride = int(inferred.config["stride"])  # e.g. an identity branch: stride 1
    if stride is None:  # the published rule
        stride = 2 if prefix == context.layout.stem or _first_of_stage(prefix, context) else 1
    config = inferred.config | {"in_channels": in_channels, "groups": groups, "stride": stride}
    block = read_family_block(family.name, state, eps=context.eps, key_names=named, **config)
    return TrainBlock.from_tree(block.tree, stride=stride, groups=groups, family=family.name)


def _first_of_stage(prefix: str, context: _Context) -> bool:
    found = context.layout.split(f"{prefix}.x")
    return found is not None and found[0][1] == 0


def _read_deploy(
    state: dict[str, Any],
    shape: tuple[int, ...],
    groups: int,
    prefix: str,
    kept: tuple[str, ...],
    context: _Context,
    named: Callable[[str], str],
) -> DeployBlock:
    """Read a deploy block's conv (and fold in what the published deploy form keeps after it)."""
    layout = context.layout
    stride = _stated_stride(prefix, context.strides)
    if stride is None:
        stride = 2 if prefix == layout.stem or _first_of_stage(prefix, context) else 1
    reader = StateReader(
        f"{prefix}.{layout.deploy_prefix}", state, eps=context.eps, key_names=named
    )
    kernel = reader.array(f"{layout.deploy_prefix}.weight", shape)
    bias = reader.array(f"{layout.deploy_prefix}.bias", shape[:1])
    after = [
        Norm(reader.bn(name, shape[0]), name=name)
        for name in kept
        if any(key.startswith(name + ".") for key in state)
    ]
    reader.finish()
    if not after:
        return DeployBlock(kernel, bias, stride, groups)
    conv = Conv(kernel, bias, stride=stride, padding=centred_padding(shape[2]), groups=groups)
    folded = fold(Sequential(conv, *after))
    return DeployBlock(folded.kernel, folded.bias, stride, folded.groups, folded.padding[0])


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
        A state dict in a registered network layout (``"official"``,
        ``"timm"``, ``"qarepvgg"``), train or deploy form;
        ``num_batches_tracked`` entries are ignored.
    layout : str, optional
        Detected from the keys by default (:func:`detect_layout`).
    arch : str, optional
        A published architecture the weights must have (e.g. ``"RepVGG-A0"``);
        by default it is inferred when the shapes match one.
    eps : float, default 1e-5
        The BatchNorm epsilon (PyTorch's default, with which the official and
        timm models are built; YOLOv6 builds its models with 1e-3).
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
        func="from_state_dict",
        source="the state dict",
        strides=strides,
    )


def _problems_error(
    problems: list[str], keys: Any, layout: NetworkLayout, *, forced: bool, source: str
) -> ReparamError:
    """One line: the first problems that fit, how many more, and a hint when one applies."""
    hint = ""
    if forced:
        try:
            detected = detect_layout(keys)
        except ReparamError:
            detected = layout.name
        if detected != layout.name:
            hint = f"; hint: the keys are in the {detected} layout (see --layout)"
    if not hint and any(p.startswith(("missing", "unexpected")) for p in problems):
        hint = "; hint: check --layout and that the checkpoint is complete"
    if not hint and problems[0].startswith("architecture:"):
        hint = "; hint: without --arch any consistent RepVGG loads"
    found = listing([shown(problem, 110) for problem in problems], budget=100)
    return ReparamError(
        f"{source} does not fit a RepVGG ({layout.name} layout): {found}{hint}",
        problems=tuple(problems),
    )


def _layout_of(keys: Any, layout: Layout | None, *, func: str, source: str) -> NetworkLayout:
    """Return the forced layout, or the one detected from the keys (errors name ``source``)."""
    if layout is not None:
        return network_layout(layout, func=func)
    return network_layout(detect_layout(keys, func=source), func=func)


def _check_keys(keys: list[str], *, layout: Layout | None, func: str, source: str) -> None:
    """Refuse a checkpoint from its key names alone, before any tensor is read."""
    where = f"{func}: {source}"
    chosen = _layout_of(keys, layout, func=func, source=where)
    problems: list[str] = []
    parsed, _ = _parse_keys(dict.fromkeys(keys), chosen, problems)
    _check_positions(list(parsed), chosen, problems, func=func)
    if problems:
        raise _problems_error(problems, keys, chosen, forced=layout is not None, source=where)


def _from_state_dict(
    tensors: Mapping[str, Any],
    *,
    layout: Layout | None,
    arch: str | None,
    eps: float,
    func: str,
    source: str,
    strides: Mapping[str, int] | None = None,
) -> RepVGG:
    where = f"{func}: {source}"
    chosen = _layout_of(tensors.keys(), layout, func=func, source=where)
    expected_arch = None if arch is None else canonical_architecture(arch)
    problems: list[str] = []
    parsed, head = _parse_keys(tensors, chosen, problems)
    positions = _check_positions(list(parsed), chosen, problems, func=func)
    context = _Context(chosen, _model_dtype(tensors.values()), eps, strides, func)
    blocks: list[tuple[str, Block]] = []
    in_channels: int | None = None
    for position in positions:
        name = _block_name(position)
        read = _read_block(name, parsed[position], in_channels, context, problems)
        if read.block is not None:
            blocks.append((name, read.block))
        in_channels = read.out_channels
    train = [name for name, block in blocks if isinstance(block, TrainBlock)]
    deploy = [name for name, block in blocks if isinstance(block, DeployBlock)]
    if train and deploy:
        problems.append(
            f"mixed forms: train-form blocks ({', '.join(train[:3])}...) and deploy-form blocks "
            f"({', '.join(deploy[:3])}...) in one checkpoint"
        )
    head_arrays = _branch_head(head, chosen, in_channels, problems)
    specs: NamedSpecs = tuple((name, block.spec) for name, block in blocks)
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
        raise _problems_error(problems, tensors.keys(), chosen, forced=forced, source=where)
    if head_arrays is None:  # pragma: no cover - a missing head is one of the problems above
        raise ReparamError(f"{func}: the checkpoint has no usable head")
    weight, bias = (np.asarray(a, dtype=context.dtype) for a in head_arrays)
    return RepVGG(
        tuple(blocks), Head(weight, bias), arch=match_architecture(specs), layout=chosen.name
    )


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


def _branch_head(
    head: dict[str, Any], layout: NetworkLayout, features: int | None, problems: list[str]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    prefix = layout.head
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


def _tree_state(block: TrainBlock) -> dict[str, npt.NDArray[Any]]:
    """Every array of a block's tree under its published key (each leaf is named by its module)."""
    state: dict[str, npt.NDArray[Any]] = {}
    for leaf in tree_leaves(block.tree):
        if isinstance(leaf, Conv):
            state[f"{leaf.name}.weight"] = leaf.kernel
            if leaf.bias is not None:
                state[f"{leaf.name}.bias"] = leaf.bias
        elif isinstance(leaf, Norm):
            bn = leaf.bn
            for key, array in zip(_BN_LEAVES, (bn.gamma, bn.beta, bn.mean, bn.var), strict=True):
                state[f"{leaf.name}.{key}"] = array
    return state


def _state_dict(model: RepVGG, layout: Layout | None, *, func: str) -> Tensors:
    chosen = network_layout(model.layout if layout is None else layout, func=func)
    tensors: Tensors = {}
    for name, block in model.blocks:
        prefix = chosen.prefix(name, func=func)
        if isinstance(block, DeployBlock):
            tensors[f"{prefix}.{chosen.deploy_prefix}.weight"] = block.kernel
            tensors[f"{prefix}.{chosen.deploy_prefix}.bias"] = block.bias
            continue
        if block.family != chosen.family:
            others = [n for n, other in NETWORK_LAYOUTS.items() if other.family == block.family]
            raise ReparamError(
                f"{func}: block {name} is a {block.family}; the {chosen.name} layout names "
                f"{chosen.family} blocks (hint: layout={'|'.join(others) or '...'})"
            )
        for key, array in _tree_state(block).items():
            tensors[f"{prefix}.{chosen.key_layout.local(key)}"] = array
    tensors[f"{chosen.head}.weight"] = model.head.weight
    tensors[f"{chosen.head}.bias"] = model.head.bias
    return tensors


def to_state_dict(model: RepVGG, *, layout: Layout | None = None) -> Tensors:
    """Name every array of a model in a network layout.

    Parameters
    ----------
    model : RepVGG
        Train or deploy form.
    layout : str, optional
        The model's own layout by default (``"official"``, ``"timm"``, ...).

    Returns
    -------
    dict of str to ndarray
        Train form: every leaf of every block's tree under its published
        module name, in the layout's names (running statistics included,
        ``num_batches_tracked`` omitted: PyTorch fills it in). Deploy form:
        ``rbr_reparam`` / ``reparam_conv`` weight and bias. The arrays are
        the model's own read-only arrays (no copy).

    Raises
    ------
    ReparamError
        For an unknown layout, a block name the layout cannot name, or
        train-form blocks of another family than the layout's.

    Examples
    --------
    >>> import numpy as np
    >>> from reparam import Architecture
    >>> model = RepVGG.create(Architecture((4,), (1,)), num_classes=2).reparameterize()
    >>> sorted(to_state_dict(model, layout="timm"))
    ['head.fc.bias', 'head.fc.weight', 'stem.reparam_conv.bias', 'stem.reparam_conv.weight']
    """
    return _state_dict(model, layout, func="to_state_dict")


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
        check_keys=lambda keys: _check_keys(keys, layout=layout, func="load", source=name),
    )
    model = _from_state_dict(
        contents.tensors,
        layout=layout,
        arch=arch,
        eps=eps,
        func="load",
        source=name,
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
    layout : str, optional
        A registered network layout (``"official"``, ``"timm"``,
        ``"qarepvgg"``); detected from the keys by default.
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
    layout : str, optional
        The layout the model came from by default.

    Raises
    ------
    ReparamError
        On an unknown suffix or a missing optional package (nothing is written).
    OSError
        If writing fails; no partial file is left behind.
    """
    check_suffix(Path(path), func="save", allowed=CHECKPOINT_SUFFIXES)
    write_tensors(path, _state_dict(model, layout, func="save"))
