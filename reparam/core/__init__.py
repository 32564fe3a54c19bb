"""The core: errors, parameter containers, kernels, the branch algebra, the reference ops.

NumPy only. Everything ``import reparam`` loads lives here.
"""

from .algebra import FoldError
from .axes import hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw, oihw_to_hwio
from .conv import conv2d, conv_output_size
from .errors import ReparamError
from .fusion import fuse_block, fuse_bn, sum_branches
from .kernels import identity_kernel, pad_kernel
from .norm import batch_norm
from .params import BatchNorm, ConvBias

__all__ = [
    "BatchNorm",
    "ConvBias",
    "FoldError",
    "ReparamError",
    "batch_norm",
    "conv2d",
    "conv_output_size",
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
