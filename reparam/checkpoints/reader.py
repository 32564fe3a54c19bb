"""Read any checkpoint: a whole network when its keys are one, else blocks for the walker.

The commands take any checkpoint. When its keys are a network in a
registered layout (:mod:`reparam.checkpoints.layouts`), it is read as a
:class:`~reparam.RepVGG` (the
architecture, the head and the chaining of blocks are checked, and it can be
run); otherwise it must hold blocks of a registered family, which
:mod:`reparam.checkpoints.walker` finds. Key names are checked before any
array of an ``.npz`` or ``.safetensors`` file is read, so a file that is
neither is refused without inflating it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..core.errors import ReparamError
from ..models.repvgg import Layout, RepVGG
from .formats import Tensors, read_checkpoint, shown_path
from .layouts import detect_layout, network_layout
from .repvgg import _check_keys, _from_state_dict
from .walker import block_prefixes, recognisable

__all__ = ["Checkpoint", "describe_stored", "read_any"]


class Checkpoint(NamedTuple):
    """A checkpoint as the commands see it.

    Attributes
    ----------
    tensors : dict of str to ndarray
        Every tensor, containers and prefixes removed.
    stored_dtypes : tuple of str
        The distinct floating dtypes as the file stores them (``"bfloat16"``, ...).
    network : RepVGG or None
        The whole network, when the keys are one (official or timm layout).
    """

    tensors: Tensors
    stored_dtypes: tuple[str, ...]
    network: RepVGG | None


def read_any(
    path: str | os.PathLike[str],
    *,
    layout: Layout | None = None,
    arch: str | None = None,
    eps: float = 1e-5,
    strides: Mapping[str, int] | None = None,
    network_only: bool = False,
) -> Checkpoint:
    """Read a checkpoint as a RepVGG network if its keys are one, else as tensors for the walker.

    Parameters
    ----------
    path : str or path-like
    layout, arch, eps, strides
        As :func:`reparam.checkpoints.repvgg.load_file`; ``layout`` or ``arch``
        ask for a RepVGG network.
    network_only : bool, default False
        Refuse anything but a RepVGG network (the commands that run a model).

    Raises
    ------
    ReparamError
        Naming the file: a RepVGG network with problems, or keys that are
        neither a network nor hold any registered block.
    OSError
        If the file cannot be opened.
    """
    name = shown_path(path)
    wants_network = network_only or layout is not None or arch is not None
    fits: list[bool] = []

    def check(keys: list[str]) -> None:
        if wants_network or _network_shaped(keys) or not recognisable(keys):
            _check_keys(keys, layout=layout, func="load", source=name)  # a network, or refused
            fits.append(True)
        else:
            fits.append(False)

    contents = read_checkpoint(path, check_keys=check)
    if not fits:  # .pth: the keys are only known after unpickling
        check(list(contents.tensors))
    network = None
    if fits[-1]:
        network = _from_state_dict(
            contents.tensors,
            layout=layout,
            arch=arch,
            eps=eps,
            func="load",
            source=name,
            strides=strides,
        )
    stored = {
        contents.stored[key] for key, array in contents.tensors.items() if array.dtype.kind == "f"
    }
    return Checkpoint(contents.tensors, tuple(sorted(stored)), network)


def _network_shaped(keys: list[str]) -> bool:
    """Whether the keys are a network: its layout's family's blocks only, at its block positions.

    (A checkpoint with other blocks, or blocks elsewhere, goes to the walker.)
    """
    try:
        layout = network_layout(detect_layout(keys), func="read_any")
    except ReparamError:
        return False
    return all(
        family == layout.family and layout.split(f"{prefix}.x") is not None
        for prefix, family in block_prefixes(keys).items()
    )


def describe_stored(checkpoint: Checkpoint, dtype: Any) -> str:
    """Return ``" (the file holds bfloat16)"`` when the stored dtypes are not ``dtype``."""
    name = str(dtype)
    held = checkpoint.stored_dtypes
    return "" if held in ((), (name,)) else f" (the file holds {', '.join(held)})"
