"""Whole checkpoints of every family: find each block by its keys, fuse it, pass the rest through.

A real checkpoint holds re-parameterizable blocks among tensors that have
nothing to fuse: a detector's heads, a ResNet's stem and shortcuts, SE
modules, classifiers. The walker needs neither the model's code nor PyTorch:

1. every key that ends in a registered layout's marker (``rbr_dense.conv.weight``,
   ``conv_kxk.0.conv.weight``, ``dbb_origin.conv.weight``, ...) names a block
   prefix; the block's keys are those under the prefix whose first segment
   belongs to the layout (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``). Where
   a marker is a name other modules use too, the layout also requires further
   keys and checks the tensors' shapes (ultralytics' ``LightConv`` has
   ``RepConv``'s names and another structure); a block inside another block
   (RepViT's ``Conv2d_BN`` in its ``RepVGGDW``) is part of the outer one;
2. the block's configuration comes from its tensors (kernel sizes, groups
   where an identity branch or DBB's 1x1 -> kxk pair fixes them); what the
   fusion needs but the tensors cannot say is an error naming the block,
   unless the user states it (``overrides``: ``{"backbone.*": {"stride": 1}}``);
3. each block is fused by :mod:`reparam.families` into the key names its own
   published deploy module loads (``{prefix}.rbr_reparam.weight`` and
   ``.bias``, ...); every other tensor is copied through unchanged.

A block that is recognisably a family's but incomplete or mis-shaped is an
error naming the prefix and the keys; it is never passed through as "other".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.errors import ReparamError
from ..families import FAMILIES, KEY_LAYOUTS, FamilyBlock, KeyLayout, from_state_dict
from .formats import listing, shown

__all__ = [
    "ConversionReport",
    "FoundBlock",
    "Overrides",
    "block_prefixes",
    "convert_state_dict",
    "find_blocks",
    "parse_override",
    "recognisable",
]

#: Per-prefix options: ``{pattern: {option: value}}``; a pattern is an exact block prefix
#: or an ``fnmatch`` pattern (``"backbone.*"``, ``"*"``); later patterns win.
Overrides = Mapping[str, Mapping[str, Any]]

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class FoundBlock:
    """One block found in a checkpoint.

    Attributes
    ----------
    prefix : str
        Its module path (``"backbone.stage2.3"``; ``""`` at the top level).
    layout : KeyLayout
        The key names it was recognised by.
    block : FamilyBlock
        The block read from its tensors (train form, fold, counts).
    keys : tuple of str
        The checkpoint keys it consists of.
    notes : tuple of str
        Values assumed because the tensors do not fix them and the fusion does
        not need them.
    """

    prefix: str
    layout: KeyLayout
    block: FamilyBlock
    keys: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The published class name."""
        return self.block.name

    @property
    def name(self) -> str:
        """The prefix, or ``(top level)``."""
        return self.prefix or "(top level)"

    def deploy_tensors(self) -> dict[str, npt.NDArray[Any]]:
        """Return the fused conv under the layout's deploy key names, with the prefix."""
        dot = f"{self.prefix}." if self.prefix else ""
        state = self.block.deploy_state(self.layout.deploy_prefix)
        return {f"{dot}{key}": value for key, value in state.items()}

    def kept_keys(self) -> tuple[str, ...]:
        """Keys of train-form modules the published deploy form keeps (written unchanged)."""
        dot = f"{self.prefix}." if self.prefix else ""
        kept = self.block.family.kept
        return tuple(key for key in self.keys if key[len(dot) :].split(".", 1)[0] in kept)


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_state_dict` found and did.

    Attributes
    ----------
    blocks : tuple of FoundBlock
        Every block fused, in checkpoint order.
    passed : tuple of str
        Keys copied through unchanged (QARepVGG's kept ``bn`` included).
    deployed : tuple of str
        Prefixes whose blocks are in deploy form already.
    parameters_before, parameters_after : int
        Floating entries of the input and of the output, running statistics
        excluded.
    """

    blocks: tuple[FoundBlock, ...]
    passed: tuple[str, ...]
    deployed: tuple[str, ...] = ()
    parameters_before: int = 0
    parameters_after: int = 0

    def by_family(self) -> dict[str, list[FoundBlock]]:
        """Blocks grouped by ``"Family (layout keys)"``, in order of first appearance."""
        grouped: dict[str, list[FoundBlock]] = {}
        for found in self.blocks:
            grouped.setdefault(f"{found.family} ({found.layout.name} keys)", []).append(found)
        return grouped

    def lines(self, *, limit: int = 6) -> list[str]:
        """Return a human-readable summary, a few prefixes per family."""
        out = [f"blocks found:  {len(self.blocks)}"]
        for label, found in self.by_family().items():
            names = [block.name for block in found]
            shown_names = ", ".join(names[:limit]) + (
                f", ... ({len(names) - limit} more)" if len(names) > limit else ""
            )
            out.append(f"  {label}: {len(found)} ({shown_names})")
        if self.deployed:
            out.append(f"already in deploy form: {len(self.deployed)} blocks")
        passed = [shown(key, 60) for key in self.passed]
        out.append(
            f"passed through: {len(self.passed)} tensors"
            + (f" ({listing(passed, budget=160)})" if passed else "")
        )
        out.append(
            f"parameters:    {self.parameters_before:,} -> {self.parameters_after:,} "
            "(running statistics not counted)"
        )
        return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``PREFIX.option=value`` (the command line's ``--set``) into its three parts.

    The value is read as an int, a float, ``true``/``false``, ``none``, or
    else kept as a string.

    Examples
    --------
    >>> parse_override("backbone.*.stride=1")
    ('backbone.*', 'stride', 1)
    >>> parse_override("neck.0.family=QARepVGGBlockV2")
    ('neck.0', 'family', 'QARepVGGBlockV2')
    """
    where, equals, raw = text.partition("=")
    prefix, dot, option = where.rpartition(".")
    if not equals or not option or not option.isidentifier():
        raise ReparamError(
            f"--set: expected PREFIX.option=value (e.g. 'backbone.*.stride=1' or '*.eps=0.001'); "
            f"got {shown(text, 60)!r}"
        )
    return (prefix if dot else "*"), option, _value(raw.strip())


def _value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _options_for(prefix: str, overrides: Overrides) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for pattern, options in overrides.items():
        if pattern == prefix or fnmatch.fnmatchcase(prefix, pattern):
            chosen.update(options)
    return chosen


def _local(key: str, prefix: str) -> str | None:
    if not prefix:
        return key
    return key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None


def _prefixes(keys: Iterable[str]) -> dict[str, list[KeyLayout]]:
    """Block prefixes in key order, each with the layouts whose marker it carries."""
    found: dict[str, list[KeyLayout]] = {}
    for key in keys:
        for layout in KEY_LAYOUTS:
            if key == layout.marker or key.endswith("." + layout.marker):
                prefix = key[: -len(layout.marker)].rstrip(".")
                found.setdefault(prefix, []).append(layout)
    return found


def recognisable(keys: Iterable[str]) -> bool:
    """Whether any key names a block of a registered family, train or deploy form.

    Cheap (key names only), so a file can be refused before its arrays are read.
    Deploy names count only where they name a block by themselves
    (``rbr_reparam.weight``, not ultralytics' generic ``conv.weight``).
    """
    names = [str(key) for key in keys]
    if _prefixes(names):
        return True
    return bool(_deployed(names))


def block_prefixes(keys: Iterable[str]) -> dict[str, str]:
    """Return the train-form blocks the key names show: prefix -> family (names only).

    The families' shape rules (:attr:`KeyLayout.fits`) need the tensors and are
    not applied here.
    """
    names = [str(key) for key in keys]
    return {prefix: layout.families[0] for prefix, layout, _ in _locate(names)}


def _recognise(
    prefix: str,
    layouts: list[KeyLayout],
    keys: list[str],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> KeyLayout | None:
    """Return the first layout whose names (and, given shapes, structure) the keys have."""
    local = {name for key in keys if (name := _local(key, prefix)) is not None}
    for layout in layouts:
        if not layout.matches(local):
            continue
        if shapes is None or layout.fits is None:
            return layout
        own = {
            name: shapes[key]
            for key in keys
            if (name := _local(key, prefix)) is not None and name.split(".", 1)[0] in layout.top
        }
        if layout.fits_shapes(own):
            return layout
    return None


def _locate(
    keys: list[str], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[tuple[str, KeyLayout, list[str]]]:
    """Every block the keys show, ``(prefix, layout, its keys)``, blocks inside blocks dropped.

    A block nested in another (RepViT's ``Conv2d_BN`` inside its ``RepVGGDW``,
    MobileOne's block inside FastViT's ``RepMixer``) is part of the outer one.

    Raises
    ------
    ReparamError
        If two blocks claim some keys without one containing the other.
    """
    located = []
    for prefix, candidates in _prefixes(keys).items():
        layout = _recognise(prefix, candidates, keys, shapes)
        if layout is None:
            continue
        block_keys = [
            key
            for key in keys
            if (local := _local(key, prefix)) is not None and local.split(".", 1)[0] in layout.top
        ]
        located.append((prefix, layout, block_keys))
    claimed = {prefix: set(block_keys) for prefix, _, block_keys in located}
    kept = []
    for prefix, layout, block_keys in located:
        # a block's keys lie under its prefix, so only a block at an enclosing prefix can share
        # them: "a.b.c" is checked against "a.b", "a" and the top level ""
        parts = prefix.split(".") if prefix else []
        enclosing = [".".join(parts[:end]) for end in range(len(parts) - 1, -1, -1)]
        inside = False
        for outer in (name for name in enclosing if name in claimed):
            shared = claimed[prefix] & claimed[outer]
            if shared and not claimed[prefix] <= claimed[outer]:
                raise ReparamError(
                    f"checkpoint: the blocks at {prefix} and {outer or '(top level)'} share "
                    "keys without one containing the other"
                )
            inside |= bool(shared)
        if not inside:
            kept.append((prefix, layout, block_keys))
    return kept


def _deployed(keys: list[str]) -> list[str]:
    """Prefixes of blocks in deploy form, by the layouts whose deploy name marks a block."""
    found: list[str] = []
    for layout in KEY_LAYOUTS:
        if not layout.deploy_named:
            continue
        suffix = layout.deploy_key
        for key in keys:
            if key == suffix or key.endswith("." + suffix):
                prefix = key[: -len(suffix)].rstrip(".")
                if prefix not in found:
                    found.append(prefix)
    return found


def _count(arrays: Iterable[tuple[str, npt.NDArray[Any]]]) -> int:
    return sum(
        int(array.size)
        for key, array in arrays
        if np.issubdtype(np.asarray(array).dtype, np.floating) and not key.endswith(_STATISTICS)
    )


def _non_finite(state: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, value in state.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                problems.append(
                    f"{key} has {bad:,} non-finite values (NaN or inf) of {array.size:,}"
                )
    return problems


def find_blocks(
    state: Mapping[str, Any], *, overrides: Overrides | None = None, eps: float | None = None
) -> tuple[list[FoundBlock], list[str]]:
    """Find and read every block of every registered family in a flat state dict.

    Parameters
    ----------
    state : mapping of str to array_like
        A whole checkpoint (containers and ``module.`` prefixes removed).
    overrides : mapping of pattern to options, optional
        Constructor options per block prefix (``fnmatch`` patterns allowed),
        for what the tensors cannot say: ``stride``, ``groups``, ``eps``,
        ``family`` (``QARepVGGBlockV2``), any published option.
    eps : float, optional
        BatchNorm epsilon of every block without an ``eps`` override; by
        default each family's published one (1e-5; 1e-3 for the ultralytics,
        YOLOv7 and YOLOv9 blocks). YOLOv6 models use 1e-3.

    Returns
    -------
    (list of FoundBlock, list of str)
        The blocks in checkpoint order, and the prefixes of blocks already in
        deploy form.

    Raises
    ------
    ReparamError
        One error naming every block that is incomplete, mis-shaped or
        ambiguous (with the option to state), and every non-finite tensor.
    """
    overrides = overrides or {}
    keys = [str(key) for key in state]
    problems = _non_finite(state)
    found: list[FoundBlock] = []
    shapes = {key: tuple(np.shape(value)) for key, value in state.items()}
    for prefix, layout, block_keys in _locate(keys, shapes):
        dot = f"{prefix}." if prefix else ""
        if f"{dot}{layout.deploy_key}" in state:
            problems.append(
                f"{prefix or '(top level)'} mixes the deploy conv ({layout.deploy_key}) with "
                "train-form branches"
            )
            continue
        try:
            found.append(_read_block(prefix, layout, block_keys, state, overrides, eps))
        except ReparamError as exc:
            problems.append(str(exc.located(prefix or "(top level)")))
    fused = {block.prefix for block in found}
    deployed = [prefix for prefix in _deployed(keys) if prefix not in fused]
    if problems:
        raise ReparamError(
            f"checkpoint: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
            + listing([shown(p, 240) for p in problems], budget=240)
        )
    return found, deployed


def _read_block(
    prefix: str,
    layout: KeyLayout,
    keys: list[str],
    state: Mapping[str, Any],
    overrides: Overrides,
    eps: float | None,
) -> FoundBlock:
    stated = _options_for(prefix, overrides)
    name = str(stated.get("family", layout.families[0]))
    # a repository-qualified family may be stated by its class name alone (RepConv)
    name = next((f for f in layout.families if f.rpartition(".")[2] == name), name)
    if name not in layout.families:
        raise ReparamError(
            f"family={name!r} does not use these keys; expected one of "
            + ", ".join(layout.families)
        )
    given = {key: value for key, value in stated.items() if key not in ("family", "eps")}
    family = FAMILIES[name]
    local = {layout.published(_local(key, prefix) or key): state[key] for key in keys}
    if family.infer is None:  # pragma: no cover - every registered family infers
        raise ReparamError(f"{name} cannot read its configuration from tensors")
    inferred = family.infer(local, given)
    missing = [(option, why) for option, why in inferred.ambiguous if option not in stated]
    if missing:
        choices = {"family": "|".join(layout.families)}
        options = " ".join(
            f"--set '{prefix or '*'}.{option}={choices.get(option, '...')}'"
            for option, _ in missing
        )
        raise ReparamError(f"{name}: {missing[0][1]}; state it with {options}")
    config = inferred.config | given
    dot = f"{prefix}." if prefix else ""
    block = from_state_dict(
        name,
        local,
        eps=stated.get("eps", eps),
        key_names=lambda key: f"{dot}{layout.local(key)}",  # the checkpoint's own names
        **config,
    )
    notes = tuple(note for note in inferred.notes if note.split(":")[0] not in given)
    return FoundBlock(prefix, layout, block, tuple(keys), notes)


def convert_state_dict(
    state: Mapping[str, Any], *, overrides: Overrides | None = None, eps: float | None = None
) -> tuple[dict[str, npt.NDArray[Any]], ConversionReport]:
    """Fuse every block of every registered family; copy every other tensor through.

    Parameters
    ----------
    state : mapping of str to array_like
        A whole checkpoint, train form (e.g. from
        :func:`reparam.checkpoints.read_tensors`).
    overrides, eps
        See :func:`find_blocks`.

    Returns
    -------
    (dict of str to ndarray, ConversionReport)
        The deploy state dict, in the input's order and dtypes (each block's
        fused conv where its first key stood), and what was found.

    Raises
    ------
    ReparamError
        As :func:`find_blocks`; also when no block is found at all.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> bn = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.zeros(4),
    ...       "running_var": np.ones(4)}
    >>> state = {"head.weight": rng.normal(size=(10, 4)),
    ...          "body.rbr_dense.conv.weight": rng.normal(size=(4, 4, 3, 3)),
    ...          "body.rbr_1x1.conv.weight": rng.normal(size=(4, 4, 1, 1))}
    >>> state |= {f"body.{b}.bn.{k}": v for b in ("rbr_dense", "rbr_1x1") for k, v in bn.items()}
    >>> state |= {f"body.rbr_identity.{k}": v for k, v in bn.items()}
    >>> deploy, report = convert_state_dict(state)
    >>> sorted(deploy)
    ['body.rbr_reparam.bias', 'body.rbr_reparam.weight', 'head.weight']
    >>> [(f.family, f.prefix) for f in report.blocks], report.passed
    ([('RepVGGBlock', 'body')], ('head.weight',))
    """
    blocks, deployed = find_blocks(state, overrides=overrides, eps=eps)
    if not blocks:
        what = (
            f"its {len(deployed)} blocks are in deploy form already"
            if deployed
            else "no key ends like a registered block (rbr_dense.conv.weight, "
            "conv_kxk.conv.weight, dbb_origin.conv.weight, square_conv.weight, "
            "rbr_conv.0.conv.weight, lkb_origin.conv.weight, ...)"
        )
        raise ReparamError(f"checkpoint: nothing to fuse; {what}")
    owner = {key: found for found in blocks for key in found.keys}
    kept = {key for found in blocks for key in found.kept_keys()}
    result: dict[str, npt.NDArray[Any]] = {}
    passed: list[str] = []
    written: set[int] = set()
    for key, value in state.items():
        found = owner.get(key)
        if found is None or key in kept:
            result[key] = np.asarray(value)
            passed.append(key)
        elif id(found) not in written:
            result.update(found.deploy_tensors())
            written.add(id(found))
    report = ConversionReport(
        tuple(blocks),
        tuple(passed),
        tuple(deployed),
        _count((k, np.asarray(v)) for k, v in state.items()),
        _count(result.items()),
    )
    return result, report
