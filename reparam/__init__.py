"""reparam: exact structural reparameterization in pure NumPy.

Layers, each importing only the ones before it:

- :mod:`reparam.core`: errors, parameter containers, kernels, the branch
  algebra and the reference ops (NumPy only; all that ``import reparam``
  loads, with :mod:`reparam.models`);
- :mod:`reparam.families`: the published block families, one module each;
- :mod:`reparam.engine`: the fast deploy path (loaded on first use);
- :mod:`reparam.models`: RepVGG networks and their published architectures;
- :mod:`reparam.checkpoints`: file formats and key layouts;
- :mod:`reparam.export`: ONNX;
- :mod:`reparam.analysis`: analyses before deployment (``reparam.quant``:
  INT8 quantization);
- :mod:`reparam.cli`: the ``reparam`` command.

``reparam.load``, ``reparam.save``, ``reparam.quant`` and the subpackages
after ``models`` are imported on first access, so ``import reparam`` stays
light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core import (
    BatchNorm,
    ConvBias,
    FoldError,
    ReparamError,
    batch_norm,
    conv2d,
    fuse_block,
    fuse_bn,
    hwio_to_oihw,
    identity_kernel,
    nchw_to_nhwc,
    nhwc_to_nchw,
    oihw_to_hwio,
    pad_kernel,
    sum_branches,
)
from .models import (
    ARCHITECTURES,
    Architecture,
    BlockSpec,
    DeployBlock,
    Head,
    RepVGG,
    TrainBlock,
    block_specs,
)

if TYPE_CHECKING:
    from . import analysis, checkpoints, engine, export, families
    from .analysis import quant
    from .checkpoints import load, save

__version__ = "0.2.0"

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BatchNorm",
    "BlockSpec",
    "ConvBias",
    "DeployBlock",
    "FoldError",
    "Head",
    "RepVGG",
    "ReparamError",
    "TrainBlock",
    "analysis",
    "batch_norm",
    "block_specs",
    "checkpoints",
    "conv2d",
    "engine",
    "export",
    "families",
    "fuse_block",
    "fuse_bn",
    "hwio_to_oihw",
    "identity_kernel",
    "load",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "oihw_to_hwio",
    "pad_kernel",
    "quant",
    "save",
    "sum_branches",
]

_LAZY_SUBPACKAGES = ("analysis", "checkpoints", "engine", "export", "families")
_LAZY_MODULES = {"quant": "analysis.quant"}
_LAZY_FUNCTIONS = {"load": "checkpoints", "save": "checkpoints"}


def __getattr__(name: str) -> Any:
    """Import a subpackage, ``quant``, or ``load`` / ``save``, on first access (PEP 562)."""
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{_LAZY_MODULES[name]}")
    if name in _LAZY_FUNCTIONS:
        package = importlib.import_module(f"{__name__}.{_LAZY_FUNCTIONS[name]}")
        return getattr(package, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
