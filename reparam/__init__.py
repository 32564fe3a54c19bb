"""reparam: exact structural reparameterization (RepVGG) in pure NumPy."""

from .conv import conv2d
from .errors import ReparamError
from .fusion import fuse_block, fuse_bn, sum_branches
from .kernels import identity_kernel, pad_kernel
from .layouts import hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw, oihw_to_hwio
from .norm import batch_norm
from .params import BatchNorm, ConvBias

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "ConvBias",
    "ReparamError",
    "batch_norm",
    "conv2d",
    "fuse_block",
    "fuse_bn",
    "hwio_to_oihw",
    "identity_kernel",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "oihw_to_hwio",
    "pad_kernel",
    "sum_branches",
]
