"""The fast deploy path: a RepVGG deploy stack run with reused NHWC buffers and Winograd.

Loaded lazily: ``import reparam`` does not import it; a deploy-form model
imports it on its first fast forward pass.
"""

from .stack import ALGORITHMS, DeployStack, choose_algorithm, winograd_matrices

__all__ = ["ALGORITHMS", "DeployStack", "choose_algorithm", "winograd_matrices"]
