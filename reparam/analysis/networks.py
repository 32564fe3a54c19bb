"""A network to analyse, as the quantization analysis takes it: a model and its blocks' trees.

Every network :func:`reparam.load` reads (RepVGG in the official or timm
layout, QARepVGG, train or deploy form) is a :class:`~reparam.RepVGG`; each
train-form block carries its tree (:attr:`reparam.TrainBlock.tree`) and its
family (:attr:`reparam.TrainBlock.family`). :class:`Network` is that view for
the analysis: ``as_network(reparam.load(path))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..core.algebra import Node
from ..core.errors import ReparamError
from ..models.repvgg import RepVGG, TrainBlock

__all__ = ["Network", "as_network"]


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
        ``"RepVGG"`` or ``"QARepVGG"``: the block family without ``Block``.
    """

    model: RepVGG
    trees: Mapping[str, Node]
    family: str


def as_network(model: RepVGG | Network, *, func: str) -> Network:
    """Return ``model`` as a :class:`Network`: its train blocks' trees and their family.

    Raises
    ------
    ReparamError
        If ``model`` is neither a :class:`reparam.RepVGG` nor a :class:`Network`.

    Examples
    --------
    >>> from importlib import resources
    >>> import reparam
    >>> path = resources.files("reparam").joinpath("data", "digits_qarepvgg.npz")
    >>> network = as_network(reparam.load(str(path)), func="example")
    >>> network.family, network.model.form, sorted(network.trees)[:2]
    ('QARepVGG', 'train', ['stage0', 'stage1.0'])
    """
    if isinstance(model, Network):
        return model
    if not isinstance(model, RepVGG):
        raise ReparamError(
            f"{func}: model must be a reparam.RepVGG (train or deploy form); got "
            f"{type(model).__name__}"
        )
    trees = {name: block.tree for name, block in model.blocks if isinstance(block, TrainBlock)}
    family = (model.family or "RepVGGBlock").removesuffix("Block")
    return Network(model, trees, family)
