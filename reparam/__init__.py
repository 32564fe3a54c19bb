"""reparam: exact structural reparameterization (RepVGG) in pure NumPy."""

from .conv import conv2d
from .errors import ReparamError
from .fusion import fuse_block, fuse_bn, sum_branches
from .io import load, save
from .kernels import identity_kernel, pad_kernel
from .layouts import hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw, oihw_to_hwio
from .norm import batch_norm
from .params import BatchNorm, ConvBias
from .repvgg import (
    ARCHITECTURES,
    Architecture,
    BlockSpec,
    DeployBlock,
    Head,
    RepVGG,
    TrainBlock,
    block_specs,
)

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BatchNorm",
    "BlockSpec",
    "ConvBias",
    "DeployBlock",
    "Head",
    "RepVGG",
    "ReparamError",
    "TrainBlock",
    "batch_norm",
    "block_specs",
    "conv2d",
    "fuse_block",
    "fuse_bn",
    "hwio_to_oihw",
    "identity_kernel",
    "load",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "oihw_to_hwio",
    "pad_kernel",
    "save",
    "sum_branches",
]
