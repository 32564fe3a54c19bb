"""A network to analyse: its deploy form, and each block's train form as a tree when known.

The quantization analysis needs the fused convolutions (what a runtime
quantizes) and, to say which branch makes a channel's range, each block's
branches. A RepVGG checkpoint in train form gives both (:attr:`TrainBlock.tree
<reparam.TrainBlock.tree>`); a deploy checkpoint only the first. A QARepVGG
checkpoint (YOLOv6's ``QARepVGGBlock`` keys: ``rbr_dense.conv.weight``,
``rbr_dense.bn.*``, ``rbr_1x1.weight``, ``bn.*`` per block, ``linear.*``) is read
block by block through :mod:`reparam.families`, whose ``QARepVGGBlock`` folds
into one convolution, so it becomes a RepVGG deploy model plus its trees.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ..checkpoints.formats import read_checkpoint, shown_path
from ..checkpoints.repvgg import load
from ..core.algebra import Node
from ..core.errors import ReparamError
from ..families import from_state_dict as family_from_state_dict
from ..models.repvgg import DeployBlock, Head, RepVGG, TrainBlock

__all__ = ["Network", "as_network", "is_qarepvgg", "load_network", "qarepvgg_network"]

_QA_BLOCK = re.compile(r"^(stage0|stage[1-9]\d*\.\d+)\.(rbr_dense\.conv\.weight)$")
_QA_HEAD = ("linear.weight", "linear.bias")


class Network(NamedTuple):
    """A network for the analysis.

    Attributes
    ----------
    model : RepVGG
        Train or deploy form; the analysis quantizes its deploy form.
    trees : mapping of str to Node
        Each block's train form (branch algebra), by block name; empty when
        only the deploy form is known.
    family : str
        ``"RepVGG"`` or ``"QARepVGG"``.
    """

    model: RepVGG
    trees: Mapping[str, Node]
    family: str


def as_network(model: RepVGG | Network, *, func: str) -> Network:
    """Return ``model`` as a :class:`Network` (a RepVGG train form gives its blocks' trees).

    Raises
    ------
    ReparamError
        If ``model`` is neither a :class:`reparam.RepVGG` nor a :class:`Network`.
    """
    if isinstance(model, Network):
        return model
    if not isinstance(model, RepVGG):
        raise ReparamError(
            f"{func}: model must be a reparam.RepVGG (train or deploy form); got "
            f"{type(model).__name__}"
        )
    trees = {name: block.tree for name, block in model.blocks if isinstance(block, TrainBlock)}
    return Network(model, trees, "RepVGG")


def is_qarepvgg(keys: Any) -> bool:
    """Whether state-dict keys are QARepVGG's: a bare ``rbr_1x1.weight`` and a post-sum ``bn``."""
    names = set(keys)
    return any(key.endswith(".rbr_1x1.weight") for key in names) and any(
        key.endswith(".bn.running_var") and ".rbr_dense." not in key for key in names
    )


def _stride(name: str) -> int:
    """RepVGG's rule: stride 2 for the stem and the first block of every stage."""
    return 2 if name == "stage0" or name.endswith(".0") else 1


def qarepvgg_network(
    tensors: Mapping[str, Any], *, eps: float = 1e-5, source: str = "qarepvgg_network"
) -> Network:
    """Read a QARepVGG state dict (YOLOv6's ``QARepVGGBlock`` keys per block) into a Network.

    Parameters
    ----------
    tensors : mapping of str to array_like
        Blocks ``stage0.*`` and ``stage{s}.{i}.*`` with ``rbr_dense.conv.weight``,
        ``rbr_dense.bn.{weight,bias,running_mean,running_var}``,
        ``rbr_1x1.weight`` and ``bn.*``; the head ``linear.{weight,bias}``.
        The stride is 2 for ``stage0`` and each stage's first block, 1
        elsewhere; the groups follow from the shapes.
    eps : float, default 1e-5
        Every BatchNorm's epsilon (PyTorch's default; YOLOv6 sets 1e-3).
    source : str
        What error messages start with (e.g. ``"load: model.npz"``).

    Returns
    -------
    Network
        A RepVGG deploy model (each block folded in float64 and rounded once
        to the state's dtype), the trees, and ``family="QARepVGG"``.

    Raises
    ------
    ReparamError
        Naming the block and the key on missing, unexpected or mis-shaped
        tensors.
    """
    names = []
    for key in tensors:
        match = _QA_BLOCK.match(key)
        if match:
            names.append(match.group(1))

    def order(name: str) -> tuple[int, int]:
        stage, _, index = name.removeprefix("stage").partition(".")
        return int(stage), int(index or 0)

    names.sort(key=order)
    if not names:
        raise ReparamError(
            f"{source}: no QARepVGG block found; expected keys like 'stage0.rbr_dense.conv.weight'"
        )
    missing_head = [key for key in _QA_HEAD if key not in tensors]
    if missing_head:
        raise ReparamError(f"{source}: missing {', '.join(missing_head)}; expected the head")
    used = set(_QA_HEAD) | {key for key in tensors if key.endswith("num_batches_tracked")}
    blocks: list[tuple[str, DeployBlock]] = []
    trees: dict[str, Node] = {}
    in_channels: int | None = None
    for name in names:
        prefix = f"{name}."
        state = {
            key[len(prefix) :]: np.asarray(value)
            for key, value in tensors.items()
            if key.startswith(prefix) and not key.endswith("num_batches_tracked")
        }
        used |= {prefix + key for key in state}
        dense = state["rbr_dense.conv.weight"]
        out_channels, per_group = int(dense.shape[0]), int(dense.shape[1])
        channels = per_group if in_channels is None else in_channels
        groups = channels // per_group if per_group and channels % per_group == 0 else 0
        if groups < 1:
            raise ReparamError(
                f"{source}: {name}: rbr_dense.conv.weight {dense.shape} does not take "
                f"{channels} input channels; expected C_in // groups on axis 1"
            )
        try:
            block = family_from_state_dict(
                "QARepVGGBlock",
                state,
                eps=eps,
                in_channels=channels,
                out_channels=out_channels,
                kernel_size=int(dense.shape[2]),
                stride=_stride(name),
                padding=int(dense.shape[2]) // 2,
                groups=groups,
            )
            conv = block.reparameterize()
            blocks.append((name, DeployBlock(conv.kernel, conv.bias, _stride(name), groups)))
        except ReparamError as exc:
            raise ReparamError(f"{source}: {name}: {exc}") from None
        trees[name] = block.tree
        in_channels = out_channels
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ReparamError(
            f"{source}: unexpected keys {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            + "; expected QARepVGG blocks and linear.{weight,bias}"
        )
    dtype = blocks[0][1].kernel.dtype
    head = Head(
        np.asarray(tensors["linear.weight"]).astype(dtype),
        np.asarray(tensors["linear.bias"]).astype(dtype),
    )
    try:
        model = RepVGG(tuple(blocks), head)
    except ReparamError as exc:
        raise ReparamError(f"{source}: {exc}") from None
    return Network(model, trees, "QARepVGG")


class _RepVGGKeys(ReparamError):
    """Raised from the key check to stop reading: the file is a RepVGG checkpoint.

    (A ReparamError, which ``read_checkpoint`` passes on unchanged.)
    """


def load_network(
    path: str | os.PathLike[str], *, layout: Any = None, arch: str | None = None
) -> Network:
    """Load a RepVGG checkpoint (any file :func:`reparam.load` reads) or a QARepVGG one.

    Parameters
    ----------
    path : str or path-like
        ``.npz``, ``.safetensors``, ``.pth`` or ``.pt``.
    layout : {"official", "timm"}, optional
        For RepVGG checkpoints, as in :func:`reparam.load`.
    arch : str, optional
        For RepVGG checkpoints, as in :func:`reparam.load`.

    Returns
    -------
    Network

    Raises
    ------
    ReparamError
        As :func:`reparam.load` or :func:`qarepvgg_network`, naming ``path``.
    OSError
        If the file cannot be opened.

    Examples
    --------
    >>> from importlib import resources
    >>> path = resources.files("reparam").joinpath("data", "digits_qarepvgg.npz")
    >>> network = load_network(str(path))
    >>> network.family, network.model.form, sorted(network.trees)[:2]
    ('QARepVGG', 'deploy', ['stage0', 'stage1.0'])
    """

    def check(keys: Any) -> None:
        if not is_qarepvgg(keys):
            raise _RepVGGKeys

    try:
        contents = read_checkpoint(path, check_keys=check)
    except _RepVGGKeys:
        return as_network(load(path, layout=layout, arch=arch), func="load_network")
    return qarepvgg_network(contents.tensors, source=f"load: {shown_path(path)}")
