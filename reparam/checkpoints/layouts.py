"""RepVGG checkpoint key layouts: the official authors' names and timm's.

A layout is a naming scheme, nothing more: these functions map a block name
(``"stage0"``, ``"stage2.3"``) and a branch leaf to a state-dict key and back.

- **official** (the RepVGG authors' code): ``stage0.rbr_dense.conv.weight``,
  ``stage0.rbr_dense.bn.{weight,bias,running_mean,running_var}``,
  ``stage{s}.{i}.rbr_1x1.*``, ``stage{s}.{i}.rbr_identity.*``,
  ``linear.{weight,bias}``; deploy ``*.rbr_reparam.{weight,bias}``.
- **timm** (``byobnet``): ``stem.*`` and ``stages.{s-1}.{i}.*`` with
  ``conv_kxk.conv.weight``, ``conv_kxk.bn.*``, ``conv_1x1.*``, ``identity.*``
  and ``head.fc.{weight,bias}``; deploy ``*.reparam_conv.{weight,bias}``.
"""

from __future__ import annotations

import re
from typing import Any

from ..core.errors import ReparamError
from ..models.repvgg import Layout
from .formats import shown

__all__ = [
    "BLOCK_KEY",
    "BN_LEAVES",
    "BRANCHES",
    "HEAD",
    "LAYOUTS",
    "Layout",
    "block_key",
    "block_prefix",
    "check_layout",
    "detect_layout",
    "leaves",
]


LAYOUTS: tuple[Layout, ...] = ("official", "timm")
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")

# Branch prefixes inside a block, per layout: dense 3x3, pointwise 1x1, identity, fused.
BRANCHES: dict[Layout, dict[str, str]] = {
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
HEAD: dict[Layout, str] = {"official": "linear", "timm": "head.fc"}
BLOCK_KEY: dict[Layout, re.Pattern[str]] = {
    "official": re.compile(r"^(?:stage0|stage(\d+)\.(\d+))\.(.+)$"),
    "timm": re.compile(r"^(?:stem|stages\.(\d+)\.(\d+))\.(.+)$"),
}


# --------------------------------------------------------------------------- key names


def leaves(layout: Layout) -> dict[str, tuple[str, str]]:
    """Map a key suffix inside a block to (branch, leaf), e.g. ``rbr_dense.bn.weight``."""
    names = BRANCHES[layout]
    table: dict[str, tuple[str, str]] = {}
    for branch in ("dense", "pointwise"):
        table[f"{names[branch]}.conv.weight"] = (branch, "kernel")
        for leaf in BN_LEAVES:
            table[f"{names[branch]}.bn.{leaf}"] = (branch, leaf)
    for leaf in BN_LEAVES:
        table[f"{names['identity']}.{leaf}"] = ("identity", leaf)
    table[f"{names['reparam']}.weight"] = ("reparam", "kernel")
    table[f"{names['reparam']}.bias"] = ("reparam", "bias")
    return table


def block_prefix(name: str, layout: Layout) -> str:
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


def block_key(name: str, branch: str, leaf: str, layout: Layout) -> str:
    """Full key of one tensor of a block, e.g. ``stage1.0.rbr_dense.bn.running_var``."""
    prefix = f"{block_prefix(name, layout)}.{BRANCHES[layout][branch]}"
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
    names = [str(key) for key in keys]
    found = set()
    for key in names:
        if key.startswith(("stage0.", "linear.")) or re.match(r"stage\d+\.\d+\.rbr_", key):
            found.add("official")
        if key.startswith(("stem.", "stages.", "head.fc.")):
            found.add("timm")
    if len(found) != 1:
        if found:
            problem = "both the official (stage0.rbr_dense...) and the timm (stem.conv_kxk...)"
            hint = "hint: --layout official|timm chooses one"
        else:
            problem = "neither the official (stage0.rbr_dense...) nor the timm (stem.conv_kxk...)"
            hint = "hint: not a RepVGG? --layout official|timm forces a layout"
        sample = ", ".join(shown(key, 30) for key in names[:2])
        more = ", ..." if len(names) > 2 else ""
        count = f"{len(names)} key{'s' if len(names) != 1 else ''}"
        got = f"{sample}{more} ({count})" if names else "no keys"
        raise ReparamError(f"detect_layout: the keys match {problem} layout; got {got}; {hint}")
    layout: Layout = "official" if "official" in found else "timm"
    return layout


def check_layout(layout: Any, *, func: str) -> Layout:
    """Return ``layout`` if it is a known layout name; raise naming ``func`` otherwise."""
    if layout not in LAYOUTS:
        raise ReparamError(f"{func}: layout must be 'official' or 'timm'; got {layout!r}")
    checked: Layout = layout
    return checked
