"""The published block families, one module each, read from their own state-dict keys.

>>> import numpy as np, reparam
>>> rng = np.random.default_rng(0)
>>> bn = lambda c: {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(size=c),
...                 "running_mean": rng.normal(size=c), "running_var": rng.uniform(0.5, 2, c)}
>>> state = {f"lkb_origin.conv.weight": rng.normal(size=(4, 1, 13, 13)),
...          f"small_conv.conv.weight": rng.normal(size=(4, 1, 5, 5))}
>>> state |= {f"{p}.bn.{k}": v for p in ("lkb_origin", "small_conv") for k, v in bn(4).items()}
>>> block = reparam.families.from_state_dict(
...     "ReparamLargeKernelConv", state, in_channels=4, out_channels=4, kernel_size=13,
...     stride=1, groups=4, small_kernel=5)
>>> conv = block.reparameterize()
>>> conv.kernel.shape, conv.padding, conv.groups
((4, 1, 13, 13), (6, 6), 4)
>>> x = rng.normal(size=(2, 4, 16, 20))
>>> bool(np.abs(block(x) - conv(x)).max() < 1e-12 * np.abs(block.magnitude(x)).max())
True

A new family is one module that builds its tree and registers a
:class:`~reparam.families.base.Family`, plus one line in ``_MODULES`` below.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..core.errors import ReparamError
from .base import (
    FAMILIES,
    KEY_LAYOUTS,
    PUBLISHED_NAMES,
    REQUIRED,
    Family,
    FamilyBlock,
    Inferred,
    KeyLayout,
    StateReader,
    register_family,
    register_layout,
    resolve_config,
)

__all__ = [
    "FAMILIES",
    "KEY_LAYOUTS",
    "PUBLISHED_NAMES",
    "REQUIRED",
    "Family",
    "FamilyBlock",
    "Inferred",
    "KeyLayout",
    "family_named",
    "from_state_dict",
    "register_family",
    "register_layout",
]

#: The family modules; each defines ``FAMILY`` (and may define more, e.g. ``FAMILY_V2``).
_MODULES = (
    "repvgg", "dbb", "acnet", "mobileone", "replknet", "qarepvgg",
    "ultralytics", "yolov7", "repvit", "fastvit", "repghost", "unireplknet", "ppyoloe",
)  # fmt: skip

for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    for _attribute in sorted(dir(_loaded)):
        if _attribute.startswith("FAMILY") and isinstance(getattr(_loaded, _attribute), Family):
            register_family(getattr(_loaded, _attribute))


def family_named(name: str) -> Family:
    """Return the family a published class name names.

    Raises
    ------
    ReparamError
        For an unknown name, or one that two repositories publish with
        different structures (``RepConv``): the message lists the registered
        names to choose from.
    """
    family = FAMILIES.get(name)
    if family is not None:
        return family
    choices = PUBLISHED_NAMES.get(name, ())
    if len(choices) == 1 and choices[0] in FAMILIES:
        return FAMILIES[choices[0]]
    if choices:
        raise ReparamError(
            f"families.from_state_dict: {name!r} is published by several repositories with "
            f"different structures; expected one of {', '.join(choices)}"
        )
    raise ReparamError(
        f"families.from_state_dict: unknown block {name!r}; expected one of "
        + ", ".join([*FAMILIES, *(n for n, c in PUBLISHED_NAMES.items() if len(c) == 1)])
    )


def from_state_dict(
    name: str,
    state: Mapping[str, Any],
    *,
    eps: float | None = None,
    key_names: Callable[[str], str] | None = None,
    **config: Any,
) -> FamilyBlock:
    """Read one published block from its own state dict and constructor arguments.

    Parameters
    ----------
    name : str
        The published class name: ``"RepVGGBlock"``, ``"DiverseBranchBlock"``,
        ``"ACBlock"``, ``"MobileOneBlock"``, ``"ReparamLargeKernelConv"``,
        ``"QARepVGGBlock"``, ``"QARepVGGBlockV2"``, ... (see :data:`FAMILIES`);
        qualified by the repository where two publish one name with different
        structures (``"ultralytics.RepConv"``, ``"yolov7.RepConv"``); another
        publication's name of a family is accepted too (timm's ``"ConvNorm"``,
        see :data:`PUBLISHED_NAMES`).
    state : mapping of str to array_like
        The block's state-dict entries without a prefix (``rbr_dense.conv.weight``,
        ...); ``num_batches_tracked`` may be present and is ignored. Arrays or
        CPU tensors.
    eps : float, optional
        Every BatchNorm's epsilon; by default the one the family's published
        models are built with (:attr:`Family.eps`: PyTorch's 1e-5, or 1e-3 for
        the ultralytics, YOLOv7 and YOLOv9 blocks). YOLOv6 models use 1e-3 too.
    key_names : callable, optional
        How errors name a key of ``state`` (a checkpoint's full key name);
        the key itself by default.
    **config
        The published constructor's keyword arguments (``in_channels``,
        ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``groups``
        and the family's own).

    Returns
    -------
    FamilyBlock
        ``block(x)`` runs the train form on an NCHW batch (output before the
        block's activation); ``block.reparameterize()`` returns the one
        :class:`~reparam.core.algebra.FoldedConv` (``.kernel``, ``.bias``,
        ``.stride``, ``.padding``, ``.groups``; callable). float32 state gives a
        float32 conv, computed in float64 and rounded once.

    Raises
    ------
    ReparamError
        One error for an unknown name, an unknown or missing option, or all
        the missing, unexpected and mis-shaped keys of the state together
        (each one in its ``problems``).
    """
    family = family_named(name)
    if eps is None:
        eps = family.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ReparamError(f"{family.name}: eps must be a finite number >= 0; got {eps!r}")
    resolved = resolve_config(family, config)
    reader = StateReader(family.name, state, eps=float(eps), key_names=key_names)
    tree = family.build(reader, resolved)
    reader.finish()
    return FamilyBlock(family, resolved, tree, float(eps))
