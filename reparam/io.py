"""Checkpoints: read and write RepVGG weights in the official and the timm key layouts.

Formats, chosen by the file suffix: ``.npz`` (NumPy, no pickle),
``.safetensors`` (needs the ``safetensors`` package) and ``.pth`` / ``.pt``
(needs PyTorch; read with ``weights_only=True``). Two key layouts are
understood and detected from the keys:

- **official** (the RepVGG authors' code): ``stage0.rbr_dense.conv.weight``,
  ``stage0.rbr_dense.bn.{weight,bias,running_mean,running_var}``,
  ``stage{s}.{i}.rbr_1x1.*``, ``stage{s}.{i}.rbr_identity.*``,
  ``linear.{weight,bias}``; deploy ``*.rbr_reparam.{weight,bias}``.
- **timm** (``byobnet``): ``stem.*`` and ``stages.{s-1}.{i}.*`` with
  ``conv_kxk.conv.weight``, ``conv_kxk.bn.*``, ``conv_1x1.*``, ``identity.*``
  and ``head.fc.{weight,bias}``; deploy ``*.reparam_conv.{weight,bias}``.

The architecture follows from the tensors alone: each block's branches and
groups (``C_in / kernel.shape[1]``) come from its shapes, and the stride is 2
for the stem and the first block of every stage, 1 elsewhere (the rule of
every published RepVGG). Every file is written atomically: a temporary file
in the same directory, ``fsync``, then :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import errno
import io as _io
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .errors import ReparamError
from .params import BatchNorm
from .repvgg import (
    Block,
    BlockSpec,
    DeployBlock,
    Head,
    Layout,
    NamedSpecs,
    RepVGG,
    TrainBlock,
    architecture_differences,
    canonical_architecture,
    match_architecture,
)

__all__ = [
    "LAYOUTS",
    "detect_layout",
    "from_state_dict",
    "load",
    "read_tensors",
    "save",
    "save_array",
    "to_state_dict",
    "write_tensors",
]

Tensors = dict[str, npt.NDArray[Any]]

LAYOUTS: tuple[Layout, ...] = ("official", "timm")
CHECKPOINT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt")
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")

# Branch prefixes inside a block, per layout: dense 3x3, pointwise 1x1, identity, fused.
_BRANCHES: dict[Layout, dict[str, str]] = {
    "official": {
        "dense": "rbr_dense",
        "pointwise": "rbr_1x1",
        "identity": "rbr_identity",
        "reparam": "rbr_reparam",
    },
    "timm": {
        "dense": "conv_kxk",
        "pointwise": "conv_1x1",
        "identity": "identity",
        "reparam": "reparam_conv",
    },
}
_HEAD: dict[Layout, str] = {"official": "linear", "timm": "head.fc"}
_BLOCK_KEY: dict[Layout, re.Pattern[str]] = {
    "official": re.compile(r"^(?:stage0|stage(\d+)\.(\d+))\.(.+)$"),
    "timm": re.compile(r"^(?:stem|stages\.(\d+)\.(\d+))\.(.+)$"),
}


# --------------------------------------------------------------------------- key names


def _leaves(layout: Layout) -> dict[str, tuple[str, str]]:
    """Map a key suffix inside a block to (branch, leaf), e.g. ``rbr_dense.bn.weight``."""
    names = _BRANCHES[layout]
    table: dict[str, tuple[str, str]] = {}
    for branch in ("dense", "pointwise"):
        table[f"{names[branch]}.conv.weight"] = (branch, "kernel")
        for leaf in _BN_LEAVES:
            table[f"{names[branch]}.bn.{leaf}"] = (branch, leaf)
    for leaf in _BN_LEAVES:
        table[f"{names['identity']}.{leaf}"] = ("identity", leaf)
    table[f"{names['reparam']}.weight"] = ("reparam", "kernel")
    table[f"{names['reparam']}.bias"] = ("reparam", "bias")
    return table


def _block_prefix(name: str, layout: Layout) -> str:
    """``stage0`` -> ``stem``, ``stage2.3`` -> ``stages.1.3`` for timm."""
    if re.fullmatch(r"stage0|stage[1-9]\d*\.\d+", name) is None:
        raise ReparamError(
            f"save: block name {name!r} has no key in the {layout} layout; expected 'stage0' or "
            "'stage{s}.{i}' with s >= 1 (hint: name blocks like block_specs does)"
        )
    if layout == "official":
        return name
    if name == "stage0":
        return "stem"
    stage, index = name.removeprefix("stage").split(".")
    return f"stages.{int(stage) - 1}.{index}"


def _block_key(name: str, branch: str, leaf: str, layout: Layout) -> str:
    """Full key of one tensor of a block, e.g. ``stage1.0.rbr_dense.bn.running_var``."""
    prefix = f"{_block_prefix(name, layout)}.{_BRANCHES[layout][branch]}"
    if branch == "reparam":
        return f"{prefix}.{'weight' if leaf == 'kernel' else leaf}"
    if leaf == "kernel":
        return f"{prefix}.conv.weight"
    if branch == "identity":
        return f"{prefix}.{leaf}"
    return f"{prefix}.bn.{leaf}"


def detect_layout(keys: Any) -> Layout:
    """Tell the key layout of a state dict from its keys.

    Parameters
    ----------
    keys : iterable of str
        Keys of a state dict (a ``module.`` prefix already removed).

    Returns
    -------
    {"official", "timm"}

    Raises
    ------
    ReparamError
        If the keys look like neither layout, or like both.

    Examples
    --------
    >>> detect_layout(["stem.conv_kxk.conv.weight", "head.fc.weight"])
    'timm'
    """
    found = set()
    for key in keys:
        if key.startswith(("stage0.", "linear.")) or re.match(r"stage\d+\.\d+\.rbr_", key):
            found.add("official")
        if key.startswith(("stem.", "stages.", "head.fc.")):
            found.add("timm")
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ReparamError(
            f"detect_layout: the keys match {what} of the official (stage0.rbr_dense...) and the "
            "timm (stem.conv_kxk...) layouts; hint: pass layout='official' or layout='timm'"
        )
    layout: Layout = "official" if "official" in found else "timm"
    return layout


def _check_layout(layout: Any, *, func: str) -> Layout:
    if layout not in LAYOUTS:
        raise ReparamError(f"{func}: layout must be 'official' or 'timm'; got {layout!r}")
    checked: Layout = layout
    return checked


# --------------------------------------------------------------------------- state dict -> model


def _parse_keys(
    tensors: Mapping[str, Any], layout: Layout, problems: list[str]
) -> tuple[dict[tuple[int, int], dict[str, dict[str, Any]]], dict[str, Any]]:
    """Group tensors by block ((stage, index), stem = (0, 0)) and branch; collect the head."""
    leaves = _leaves(layout)
    head_prefix = _HEAD[layout] + "."
    pattern = _BLOCK_KEY[layout]
    blocks: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    head: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(head_prefix) and key[len(head_prefix) :] in ("weight", "bias"):
            head[key[len(head_prefix) :]] = value
            continue
        match = pattern.match(key)
        if match is None or match.group(3) not in leaves:
            problems.append(f"unexpected key {key}")
            continue
        stage_text, index_text, rest = match.groups()
        if stage_text is None:
            position = (0, 0)
        else:
            stage = int(stage_text) + (1 if layout == "timm" else 0)
            position = (stage, int(index_text))
            if stage == 0:
                problems.append(f"unexpected key {key} (the stem is one block without an index)")
                continue
        branch, leaf = leaves[rest]
        blocks.setdefault(position, {}).setdefault(branch, {})[leaf] = value
    return blocks, head


def _block_name(position: tuple[int, int]) -> str:
    return "stage0" if position == (0, 0) else f"stage{position[0]}.{position[1]}"


def _check_positions(
    positions: list[tuple[int, int]], layout: Layout, problems: list[str]
) -> list[tuple[int, int]]:
    """Blocks in order; missing stem, stages or blocks are problems."""
    if (0, 0) not in positions:
        problems.append(f"missing block {_block_prefix('stage0', layout)} (the stem)")
    stages = sorted({stage for stage, _ in positions if stage > 0})
    for stage in range(1, (stages[-1] if stages else 0) + 1):
        indices = sorted(index for s, index in positions if s == stage)
        if not indices:
            name = _block_prefix(f"stage{stage}.0", layout).rsplit(".", 1)[0]
            problems.append(f"missing stage {name} (stages are numbered without gaps)")
            continue
        for index in range(indices[-1] + 1):
            if index not in indices:
                name = _block_prefix(f"stage{stage}.{index}", layout)
                problems.append(f"missing block {name} (blocks are numbered from 0 without gaps)")
    return sorted(positions)


def _as_array(value: Any, key: str, problems: list[str]) -> npt.NDArray[Any] | None:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        problems.append(f"{key} has dtype {array.dtype}; expected a floating dtype")
        return None
    return array


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
        problems.append(f"missing key {_block_key(name, branch, leaf, layout)}")
    arrays = {
        leaf: _as_array(parts[leaf], _block_key(name, branch, leaf, layout), problems)
        for leaf in leaves
        if leaf in parts
    }
    if missing or any(array is None for array in arrays.values()):
        return None
    return {leaf: array for leaf, array in arrays.items() if array is not None}


def _expect_shape(
    array: npt.NDArray[Any],
    expected: tuple[int, ...],
    key: str,
    problems: list[str],
    *,
    kind: str = "shape mismatch",
    note: str = "",
) -> bool:
    if array.shape != expected:
        problems.append(f"{kind}: {key} has shape {array.shape}, expected {expected}{note}")
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
            f"{_block_prefix(name, layout)} mixes the deploy conv "
            f"({_BRANCHES[layout]['reparam']}) with train-form branches ({others})"
        )
        return None
    main_branch = "reparam" if form == "deploy" else "dense"
    main_leaves = ("kernel", "bias") if form == "deploy" else ("kernel", *_BN_LEAVES)
    main = _branch_arrays(
        name, main_branch, branches.get(main_branch, {}), main_leaves, layout, problems
    )
    pointwise = identity = None
    if "pointwise" in branches:
        pointwise = _branch_arrays(
            name, "pointwise", branches["pointwise"], ("kernel", *_BN_LEAVES), layout, problems
        )
    if "identity" in branches:
        identity = _branch_arrays(
            name, "identity", branches["identity"], _BN_LEAVES, layout, problems
        )
    if main is None:
        return None
    kernel = main["kernel"]
    kernel_key = _block_key(name, main_branch, "kernel", layout)
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
            main[leaf], (out_channels,), _block_key(name, main_branch, leaf, layout), problems
        )
    if pointwise is not None:
        ok &= _expect_shape(
            pointwise["kernel"],
            (out_channels, per_group, 1, 1),
            _block_key(name, "pointwise", "kernel", layout),
            problems,
            kind="branches disagree",
            note=f" to match {kernel_key} {kernel.shape}",
        )
        for leaf in _BN_LEAVES:
            ok &= _expect_shape(
                pointwise[leaf],
                (out_channels,),
                _block_key(name, "pointwise", leaf, layout),
                problems,
            )
    if identity is not None:
        if not spec.has_identity and (in_channels is not None or name == "stage0"):
            problems.append(
                f"branches disagree: {_block_prefix(name, layout)} has an identity branch but "
                f"maps {channels_in} -> {out_channels} channels with stride {stride}; an identity "
                "needs C_in == C_out and stride 1"
            )
            ok = False
        for leaf in _BN_LEAVES:
            ok &= _expect_shape(
                identity[leaf],
                (out_channels,),
                _block_key(name, "identity", leaf, layout),
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


def _build_block(checked: _BlockArrays, dtype: np.dtype[Any], eps: float) -> Block:
    def bn(arrays: dict[str, Any]) -> BatchNorm:
        gamma, beta, mean, var = (np.asarray(arrays[leaf], dtype=dtype) for leaf in _BN_LEAVES)
        return BatchNorm(gamma, beta, mean, var, eps=eps)

    main = checked.arrays["main"]
    spec = checked.spec
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
        bn(main),
        np.asarray(pointwise["kernel"], dtype=dtype) if pointwise else None,
        bn(pointwise) if pointwise else None,
        bn(identity) if identity else None,
        spec.stride,
        spec.groups,
    )


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
    func = "from_state_dict"
    chosen = detect_layout(tensors.keys()) if layout is None else _check_layout(layout, func=func)
    expected_arch = None if arch is None else canonical_architecture(arch)
    problems: list[str] = []
    parsed, head = _parse_keys(tensors, chosen, problems)
    positions = _check_positions(list(parsed), chosen, problems)
    checked: list[_BlockArrays] = []
    in_channels: int | None = None
    for position in positions:
        name = _block_name(position)
        stride = 2 if position[1] == 0 else 1
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
        problems += [
            f"architecture: {line}" for line in architecture_differences(specs, expected_arch)
        ]
    if problems:
        raise ReparamError(
            f"{func}: the checkpoint does not fit a RepVGG ({chosen} layout); "
            f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  "
            + "\n  ".join(problems)
            + "\nhint: check that this is a RepVGG checkpoint and its key layout (layout= in "
            "Python, --layout on the command line), and that it was not truncated or edited"
        )
    if head_arrays is None:  # pragma: no cover - a missing head is one of the problems above
        raise ReparamError(f"{func}: the checkpoint has no usable head")
    every = [a for block in checked for group in block.arrays.values() for a in group.values()]
    dtype = _model_dtype([np.asarray(a) for a in every] + list(head_arrays))
    blocks = tuple((block.name, _build_block(block, dtype, eps)) for block in checked)
    weight, bias = (np.asarray(a, dtype=dtype) for a in head_arrays)
    return RepVGG(blocks, Head(weight, bias), arch=match_architecture(specs), layout=chosen)


def _branch_head(
    head: dict[str, Any], layout: Layout, features: int | None, problems: list[str]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    prefix = _HEAD[layout]
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
    >>> from reparam.repvgg import Architecture
    >>> model = RepVGG.create(Architecture((4,), (1,)), num_classes=2).reparameterize()
    >>> sorted(to_state_dict(model, layout="timm"))
    ['head.fc.bias', 'head.fc.weight', 'stem.reparam_conv.bias', 'stem.reparam_conv.weight']
    """
    chosen = model.layout if layout is None else _check_layout(layout, func="to_state_dict")
    tensors: Tensors = {}
    for name, block in model.blocks:
        if isinstance(block, DeployBlock):
            tensors[_block_key(name, "reparam", "kernel", chosen)] = block.kernel
            tensors[_block_key(name, "reparam", "bias", chosen)] = block.bias
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
                tensors[_block_key(name, branch, "kernel", chosen)] = kernel
            for leaf, array in zip(_BN_LEAVES, (bn.gamma, bn.beta, bn.mean, bn.var), strict=True):
                tensors[_block_key(name, branch, leaf, chosen)] = array
    tensors[f"{_HEAD[chosen]}.weight"] = model.head.weight
    tensors[f"{_HEAD[chosen]}.bias"] = model.head.bias
    return tensors


# --------------------------------------------------------------------------- files


def _suffix(path: Path, *, func: str, allowed: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ReparamError(
            f"{func}: unknown file format {path.name!r}; got suffix {suffix or '(none)'!r}, "
            f"expected one of {', '.join(allowed)}"
        )
    return suffix


def _import_safetensors(func: str) -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise ReparamError(
            f"{func}: reading and writing .safetensors needs the safetensors package; "
            "hint: pip install safetensors (or use .npz)"
        ) from None
    return safetensors.numpy


def _import_torch(func: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ReparamError(
            f"{func}: .pth/.pt checkpoints are PyTorch pickles and need PyTorch to read; "
            "hint: pip install torch, or convert the checkpoint to .safetensors or .npz"
        ) from None
    return torch


def _unwrap(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a ``module.`` prefix."""
    current: Mapping[str, Any] = tensors
    while True:
        for wrapper in ("state_dict", "model"):
            inner = current.get(wrapper)
            if isinstance(inner, Mapping):
                current = inner
                break
        else:
            break
    if current and all(str(key).startswith("module.") for key in current):
        return {str(key).removeprefix("module."): value for key, value in current.items()}
    return {str(key): value for key, value in current.items()}


def _read_pytorch(path: Path, func: str) -> dict[str, Any]:
    torch = _import_torch(func)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ReparamError(
            f"{func}: {path.name} holds a {type(raw).__name__}; expected a state dict (a mapping "
            "of names to tensors)"
        )
    converted: dict[str, Any] = {}
    for key, value in _unwrap(raw).items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            converted[key] = tensor.numpy()
        else:
            converted[key] = value
    return converted


def read_tensors(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Read a flat state dict of arrays from ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.

    Parameters
    ----------
    path : str or path-like
        The checkpoint; the suffix decides the format.

    Returns
    -------
    dict of str to ndarray
        Containers (``state_dict``, ``model``) and a ``module.`` prefix removed.

    Raises
    ------
    ReparamError
        On an unknown suffix, a missing optional package, an entry that is not
        an array, or a file that cannot be parsed.
    OSError
        If the file cannot be opened (e.g. it does not exist).
    """
    func = "load"
    file = Path(path)
    suffix = _suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    if not file.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(file))
    try:
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                raw: dict[str, Any] = {key: archive[key] for key in archive.files}
        elif suffix == ".safetensors":
            raw = dict(_import_safetensors(func).load_file(str(file)))
        else:
            raw = _read_pytorch(file, func)
    except (ReparamError, OSError):
        raise
    except Exception as exc:  # every parser has its own exception types
        raise ReparamError(
            f"{func}: cannot read {file.name} as {suffix} ({type(exc).__name__}: {exc}); "
            "hint: check that the file is complete and has the right suffix"
        ) from exc
    tensors = _unwrap(raw)
    bad = [key for key, value in tensors.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise ReparamError(
            f"{func}: {file.name} has entries that are not tensors: {', '.join(bad[:5])}; "
            "expected a state dict of tensors only"
        )
    return {key: value for key, value in tensors.items() if isinstance(value, np.ndarray)}


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary file next to ``path``, then rename it."""
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, npt.ArrayLike]) -> None:
    """Write a flat state dict atomically; the suffix decides the format.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors`` or ``.pth`` / ``.pt`` (the last needs
        PyTorch and writes a dict of tensors for ``load_state_dict``).
    tensors : mapping of str to array_like

    Raises
    ------
    ReparamError
        On an unknown suffix or a missing optional package (nothing is written).
    OSError
        If writing fails; no partial file is left behind.
    """
    func = "save"
    file = Path(path)
    suffix = _suffix(file, func=func, allowed=CHECKPOINT_SUFFIXES)
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    if suffix == ".npz":

        def write(stream: IO[bytes]) -> None:
            np.savez(stream, **arrays)  # type: ignore[arg-type]

    elif suffix == ".safetensors":
        payload = _import_safetensors(func).save(arrays)

        def write(stream: IO[bytes]) -> None:
            stream.write(payload)

    else:
        torch = _import_torch(func)
        state = {key: torch.from_numpy(np.array(value)) for key, value in arrays.items()}

        def write(stream: IO[bytes]) -> None:
            buffer = _io.BytesIO()
            torch.save(state, buffer)
            stream.write(buffer.getvalue())

    _write_atomic(file, write)


def save_array(path: str | os.PathLike[str], array: npt.ArrayLike) -> None:
    """Write one array to a ``.npy`` file atomically.

    Parameters
    ----------
    path : str or path-like
        Destination ending in ``.npy``.
    array : array_like
        Any shape, e.g. logits of shape (N, num_classes); saved without pickle.

    Raises
    ------
    ReparamError
        If the suffix is not ``.npy``.
    OSError
        If writing fails; no partial file is left behind.
    """
    file = Path(path)
    _suffix(file, func="save_array", allowed=(".npy",))
    data = np.asarray(array)
    _write_atomic(file, lambda stream: np.save(stream, data, allow_pickle=False))


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
        ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.
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
        See :func:`read_tensors` and :func:`from_state_dict`.
    OSError
        If the file cannot be read.
    """
    return from_state_dict(read_tensors(path), layout=layout, arch=arch, eps=eps)


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
    _suffix(Path(path), func="save", allowed=CHECKPOINT_SUFFIXES)
    write_tensors(path, to_state_dict(model, layout=layout))
