"""Networks built from blocks: RepVGG, its published architectures, train and deploy forms."""

from .architectures import (
    ARCHITECTURES,
    Architecture,
    BlockSpec,
    block_specs,
    canonical_architecture,
)
from .repvgg import DeployBlock, Head, RepVGG, TrainBlock

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BlockSpec",
    "DeployBlock",
    "Head",
    "RepVGG",
    "TrainBlock",
    "block_specs",
    "canonical_architecture",
]
