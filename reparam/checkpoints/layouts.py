"""Network layouts: where a network's blocks and head sit in a state dict, one registry entry each.

A network layout names the blocks of a chain (``"stage0"``, ``"stage2.3"``)
in a checkpoint, says which published block family each block is and which
of that family's key layouts (:data:`reparam.families.KEY_LAYOUTS`) names
the keys inside a block, and where the linear head is. Everything inside a
block is the family's: its keys, its checks, its tree.

- **official** (the RepVGG authors' code): blocks ``stage0`` and
  ``stage{s}.{i}``, ``RepVGGBlock`` keys (``rbr_dense.conv.weight``, ...,
  deploy ``rbr_reparam``), head ``linear``.
- **timm** (``byobnet``): blocks ``stem`` and ``stages.{s-1}.{i}``,
  ``RepVggBlock`` keys (``conv_kxk``, ``conv_1x1``, ``identity``, deploy
  ``reparam_conv``), head ``head.fc``.
- **qarepvgg**: RepVGG's block names and head with YOLOv6's
  ``QARepVGGBlock`` keys (``rbr_dense.{conv,bn}``, a bare ``rbr_1x1.weight``,
  ``bn`` after the sum), as ``scripts/train_digits.py`` writes them.

A new network layout is one :func:`register_network_layout` call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ReparamError
from ..families import FAMILIES, KEY_LAYOUTS, KeyLayout
from ..models.repvgg import Layout
from .formats import shown
from .walker import block_prefixes

__all__ = [
    "HEAD",
    "LAYOUTS",
    "NETWORK_LAYOUTS",
    "Layout",
    "NetworkLayout",
    "block_key",
    "block_prefix",
    "check_layout",
    "detect_layout",
    "network_layout",
    "register_network_layout",
]

_MODEL_NAME = re.compile(r"stage0|stage([1-9]\d*)\.(\d+)")


@dataclass(frozen=True)
class NetworkLayout:
    """Where a chain of one family's blocks and a linear head sit in a state dict.

    Attributes
    ----------
    name : str
        ``"official"``, ``"timm"``, ...
    family : str
        The published block class of every block (a :data:`reparam.families.FAMILIES` key).
    keys : str
        The name of the family's key layout (a :class:`reparam.families.KeyLayout`)
        that names the keys inside a block.
    stem : str
        The first block's prefix (the model's ``"stage0"``).
    stage : str
        The other blocks' prefix, with ``{s}`` (the stage) and ``{i}`` (the
        block in the stage), e.g. ``"stages.{s}.{i}"``.
    first_stage : int
        The number ``{s}`` of the model's ``stage1``.
    head : str
        The linear head's prefix (``weight`` and ``bias`` under it).
    source : str
        Whose code writes these names.
    """

    name: str
    family: str
    keys: str
    stem: str
    stage: str
    first_stage: int
    head: str
    source: str = ""

    @property
    def key_layout(self) -> KeyLayout:
        """The family's key layout that names the keys inside a block."""
        for layout in KEY_LAYOUTS:
            if layout.name == self.keys and self.family in layout.families:
                return layout
        raise ReparamError(  # pragma: no cover - checked when registered
            f"NetworkLayout: {self.family} has no {self.keys!r} key layout"
        )

    @property
    def deploy_prefix(self) -> str:
        """The deploy module's name inside a block (``rbr_reparam``, ``reparam_conv``)."""
        return self.key_layout.deploy_prefix

    @property
    def example(self) -> str:
        """A key of this layout, for messages: ``stage0.rbr_dense...``."""
        return f"{self.stem}.{self.key_layout.marker.split('.')[0]}..."

    @property
    def _stage_pattern(self) -> re.Pattern[str]:
        escaped = re.escape(self.stage).replace(r"\{s\}", r"(\d+)").replace(r"\{i\}", r"(\d+)")
        return re.compile(rf"{escaped}\.(.+)")

    def prefix(self, name: str, *, func: str) -> str:
        """Return the checkpoint prefix of a model block name: ``stage2.3`` -> ``stages.1.3``.

        Raises
        ------
        ReparamError
            Naming ``func``, if ``name`` is not ``stage0`` or ``stage{s}.{i}`` with ``s >= 1``.
        """
        match = _MODEL_NAME.fullmatch(name)
        if match is None:
            raise ReparamError(
                f"{func}: block name {name!r} has no key in the {self.name} layout; expected "
                "'stage0' or 'stage{s}.{i}' with s >= 1 (hint: name blocks like block_specs does)"
            )
        if match.group(1) is None:
            return self.stem
        stage = int(match.group(1)) - 1 + self.first_stage
        return self.stage.format(s=stage, i=int(match.group(2)))

    def split(self, key: str) -> tuple[tuple[int, int], str] | None:
        """Return ``((stage, index), key inside the block)`` of a block key, or None.

        The stem is ``(0, 0)``; stages count from 1 as the model's names do.
        A stage key whose stage would be the stem's 0 is not a block key.
        """
        if key.startswith(self.stem + "."):
            return (0, 0), key[len(self.stem) + 1 :]
        match = self._stage_pattern.fullmatch(key)
        if match is None:
            return None
        stage = int(match.group(1)) + 1 - self.first_stage
        if stage < 1:
            return None
        return (stage, int(match.group(2))), match.group(3)

    def owns(self, local: str) -> bool:
        """Whether a key inside a block belongs to the family's block (train or deploy form)."""
        first = local.split(".", 1)[0]
        return first in self.key_layout.top or first == self.deploy_prefix


#: Every registered network layout, by name (the command line's ``--layout`` choices).
NETWORK_LAYOUTS: dict[str, NetworkLayout] = {}


def register_network_layout(layout: NetworkLayout) -> NetworkLayout:
    """Add a network layout to :data:`NETWORK_LAYOUTS`.

    Raises
    ------
    ReparamError
        If the name is taken, or the family or its key layout is not registered.
    """
    if layout.name in NETWORK_LAYOUTS:
        raise ReparamError(f"register_network_layout: {layout.name!r} is registered already")
    if layout.family not in FAMILIES:
        raise ReparamError(f"register_network_layout: unknown family {layout.family!r}")
    if not any(k.name == layout.keys and layout.family in k.families for k in KEY_LAYOUTS):
        raise ReparamError(
            f"register_network_layout: {layout.family} has no {layout.keys!r} key layout"
        )
    NETWORK_LAYOUTS[layout.name] = layout
    return layout


register_network_layout(
    NetworkLayout(
        "official", "RepVGGBlock", "official", "stage0", "stage{s}.{i}", 1, "linear",
        source="DingXiaoH/RepVGG repvgg.py",
    )
)  # fmt: skip
register_network_layout(
    NetworkLayout(
        "timm", "RepVGGBlock", "timm", "stem", "stages.{s}.{i}", 0, "head.fc",
        source="timm byobnet (repvgg_a0 ... repvgg_b3g4)",
    )
)  # fmt: skip
register_network_layout(
    NetworkLayout(
        "qarepvgg", "QARepVGGBlock", "official", "stage0", "stage{s}.{i}", 1, "linear",
        source="YOLOv6 QARepVGGBlock keys in RepVGG's network (scripts/train_digits.py)",
    )
)  # fmt: skip

#: The registered layouts' names.
LAYOUTS: tuple[Layout, ...] = tuple(NETWORK_LAYOUTS)
#: The head's prefix per layout (``"linear"``, ``"head.fc"``).
HEAD: dict[Layout, str] = {name: layout.head for name, layout in NETWORK_LAYOUTS.items()}


def network_layout(layout: Any, *, func: str) -> NetworkLayout:
    """Return the registered layout named ``layout``; raise naming ``func`` otherwise."""
    found = NETWORK_LAYOUTS.get(layout) if isinstance(layout, str) else None
    if found is None:
        choices = ", ".join(repr(name) for name in NETWORK_LAYOUTS)
        raise ReparamError(f"{func}: layout must be one of {choices}; got {layout!r}")
    return found


def check_layout(layout: Any, *, func: str) -> Layout:
    """Return ``layout`` if it is a registered layout name; raise naming ``func`` otherwise."""
    return network_layout(layout, func=func).name


def block_prefix(name: str, layout: Layout, *, func: str = "block_prefix") -> str:
    """``stage0`` -> ``stem``, ``stage2.3`` -> ``stages.1.3`` for timm; errors name ``func``."""
    return network_layout(layout, func=func).prefix(name, func=func)


def block_key(name: str, branch: str, leaf: str, layout: Layout) -> str:
    """Full key of a deploy block's conv: ``block_key("stage1.0", "reparam", "weight", "timm")``.

    Only ``branch="reparam"`` (the folded conv) is a name of the network
    layout; the train form's keys are the family's (see
    :func:`reparam.checkpoints.repvgg.to_state_dict`).
    """
    chosen = network_layout(layout, func="block_key")
    if branch != "reparam":
        raise ReparamError(
            f"block_key: expected branch 'reparam' (the folded conv); got {branch!r}"
        )
    suffix = "weight" if leaf == "kernel" else leaf
    return f"{chosen.prefix(name, func='block_key')}.{chosen.deploy_prefix}.{suffix}"


def _claims(layout: NetworkLayout, keys: list[str], families: dict[str, str]) -> set[str]:
    """Return the keys ``layout`` explains: its head, and its family's block keys at its places.

    ``families`` maps the train-form block prefixes the walker recognises to their
    families; a block it recognises as another family's is not this layout's.
    """
    claimed = set()
    for key in keys:
        if key.startswith(layout.head + ".") and key.count(".") == layout.head.count(".") + 1:
            claimed.add(key)
            continue
        found = layout.split(key)
        if found is None or not layout.owns(found[1]):
            continue
        prefix = key[: len(key) - len(found[1]) - 1]
        if families.get(prefix, layout.family) == layout.family:
            claimed.add(key)
    return claimed


def detect_layout(keys: Iterable[Any], *, func: str = "detect_layout") -> Layout:
    """Tell the network layout of a state dict from its key names.

    The layout that explains the most keys wins; the others must explain no
    key it does not (a deploy form, whose keys do not tell the family, goes
    to the first registered of the layouts that explain it all).

    Parameters
    ----------
    keys : iterable of str
        Keys of a state dict (a ``module.`` prefix already removed).
    func : str, default "detect_layout"
        What the error message starts with (``"load: model.npz"``).

    Returns
    -------
    str
        A :data:`NETWORK_LAYOUTS` name.

    Raises
    ------
    ReparamError
        If the keys look like no layout, or like two.

    Examples
    --------
    >>> detect_layout(["stem.conv_kxk.conv.weight", "head.fc.weight"])
    'timm'
    >>> detect_layout(["stage0.rbr_dense.conv.weight", "stage0.rbr_1x1.weight", "linear.bias"])
    'qarepvgg'
    """
    names = [str(key) for key in keys if not str(key).endswith("num_batches_tracked")]
    families = block_prefixes(names)
    claims = {name: _claims(layout, names, families) for name, layout in NETWORK_LAYOUTS.items()}
    found = [name for name, claimed in claims.items() if claimed]
    best = max(found, key=lambda name: len(claims[name]), default=None)
    others = [name for name in found if claims[name] - claims[best or name]]
    if best is not None and not others:
        return best
    if best is not None:
        first, second = NETWORK_LAYOUTS[best], NETWORK_LAYOUTS[others[0]]
        problem = (
            f"both the {first.name} ({first.example}) and the {second.name} ({second.example}) "
            "layout"
        )
        hint = f"hint: --layout {first.name}|{second.name} chooses one"
    else:
        examples = ", ".join(f"{name} {layout.example}" for name, layout in NETWORK_LAYOUTS.items())
        problem = f"no network layout ({examples})"
        hint = "hint: not a RepVGG? --layout forces one"
    sample = ", ".join(shown(key, 30) for key in names[:2])
    more = ", ..." if len(names) > 2 else ""
    count = f"{len(names)} key{'s' if len(names) != 1 else ''}"
    got = f"{sample}{more} ({count})" if names else "no keys"
    raise ReparamError(f"{func}: the keys match {problem}; got {got}; {hint}")
