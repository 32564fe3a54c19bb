"""Export a RepVGG's deploy form as an ONNX graph, built straight from the NumPy weights.

The graph is what the deploy form computes: per block a ``Conv`` (with its
bias, padding ``K // 2``, the block's stride and groups) and a ``Relu``; then
``GlobalAveragePool``, ``Flatten`` and a ``Gemm`` for the head. Batch size,
height and width are dynamic. Only the ``onnx`` package is needed (imported
lazily); no deep-learning framework is involved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from ..checkpoints.formats import write_atomic
from ..checkpoints.layouts import HEAD, block_key
from ..core.errors import ReparamError
from ..models.repvgg import DeployBlock, RepVGG

__all__ = ["DEFAULT_OPSET", "check_opset", "export_onnx", "to_onnx"]

#: The opset written unless another is asked for: Conv, Relu, GlobalAveragePool,
#: Flatten and Gemm are unchanged since opset 13, which every current runtime reads.
DEFAULT_OPSET = 17
_MIN_OPSET = 13


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise ReparamError(
            "export: the onnx package is not installed; expected it for ONNX export "
            "(hint: pip install onnx)"
        ) from None
    return onnx


def check_opset(opset: Any, *, func: str = "to_onnx") -> int:
    """Check that ``opset`` can be written, before any work is done.

    Parameters
    ----------
    opset : int
        An ONNX operator set version.
    func : str, default "to_onnx"
        The name errors start with.

    Returns
    -------
    int
        ``opset``, at least 13 and at most what the installed ``onnx`` knows.

    Raises
    ------
    ReparamError
        If ``onnx`` is not installed or ``opset`` is out of range.
    """
    onnx = _import_onnx()
    newest = int(onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest:
        raise ReparamError(
            f"{func}: opset out of range; got {opset!r}, expected an int from {_MIN_OPSET} to "
            f"{newest}"
        )
    return opset


def to_onnx(model: RepVGG, *, opset: int = DEFAULT_OPSET, dtype: npt.DTypeLike = np.float32) -> Any:
    """Build the deploy-form ONNX model of ``model`` (converted first if train form).

    Parameters
    ----------
    model : RepVGG
        Train or deploy form; a train-form model is reparameterized first.
    opset : int, default 17
        The ONNX operator set version, at least 13 and at most what the
        installed ``onnx`` knows.
    dtype : float32 or float64, default float32
        The graph's element type. The model is fused in its own precision
        first, then cast. float32 is what runtimes implement (onnxruntime's
        CPU provider has no float64 ``Conv``).

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker.check_model``. Input ``input`` of shape
        ``(batch, C_in, height, width)``, output ``logits`` of shape
        ``(batch, num_classes)``, in ``dtype``. Initializers carry the
        deploy checkpoint's key names of the model's layout.

    Raises
    ------
    ReparamError
        If ``onnx`` is missing, ``model`` is not a RepVGG, ``opset`` is out of
        range, or ``dtype`` is not float32 or float64.
    """
    onnx = _import_onnx()
    helper = onnx.helper
    if not isinstance(model, RepVGG):
        raise ReparamError(f"to_onnx: model must be a reparam.RepVGG; got {type(model).__name__}")
    check_opset(opset)
    deploy = model.reparameterize().astype(dtype)
    elem_type = helper.np_dtype_to_tensor_dtype(deploy.dtype)
    initializers = []
    nodes = []
    current = "input"
    for name, block in deploy.blocks:
        if not isinstance(block, DeployBlock):  # pragma: no cover - reparameterize() guarantees it
            raise ReparamError(f"to_onnx: {name} is not a deploy block after conversion")
        weight_key = block_key(name, "reparam", "weight", deploy.layout)
        bias_key = block_key(name, "reparam", "bias", deploy.layout)
        initializers += [
            onnx.numpy_helper.from_array(np.ascontiguousarray(block.kernel), weight_key),
            onnx.numpy_helper.from_array(np.ascontiguousarray(block.bias), bias_key),
        ]
        size = block.kernel.shape[2]
        pad = size // 2
        conv_out, relu_out = f"{name}.conv", f"{name}.relu"
        nodes.append(
            helper.make_node(
                "Conv",
                [current, weight_key, bias_key],
                [conv_out],
                name=f"{name}/Conv",
                kernel_shape=[size, size],
                pads=[pad, pad, pad, pad],
                strides=[block.stride, block.stride],
                group=block.groups,
            )
        )
        nodes.append(helper.make_node("Relu", [conv_out], [relu_out], name=f"{name}/Relu"))
        current = relu_out
    head_weight, head_bias = f"{HEAD[deploy.layout]}.weight", f"{HEAD[deploy.layout]}.bias"
    initializers += [
        onnx.numpy_helper.from_array(np.ascontiguousarray(deploy.head.weight), head_weight),
        onnx.numpy_helper.from_array(np.ascontiguousarray(deploy.head.bias), head_bias),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1),
        helper.make_node(
            "Gemm", ["features", head_weight, head_bias], ["logits"], name="head", transB=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        deploy.arch or "RepVGG",
        [
            helper.make_tensor_value_info(
                "input", elem_type, ["batch", deploy.in_channels, "height", "width"]
            )
        ],
        [helper.make_tensor_value_info("logits", elem_type, ["batch", deploy.num_classes])],
        initializer=initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="reparam",
        doc_string=f"deploy form of {deploy.arch or 'a custom RepVGG'}, exported by reparam",
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(
    model: RepVGG,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dtype: npt.DTypeLike = np.float32,
) -> None:
    """Write ``to_onnx(model, opset=opset, dtype=dtype)`` to ``path`` atomically.

    Parameters
    ----------
    model : RepVGG
        Train or deploy form.
    path : str or path-like
        The ``.onnx`` file to write atomically (umask permissions for a new
        file, the old mode for a replaced one); nothing is left behind on
        failure.
    opset : int, default 17
    dtype : float32 or float64, default float32

    Raises
    ------
    ReparamError
        As :func:`to_onnx`, or if ``path`` does not end in ``.onnx``.
    OSError
        If writing fails, naming ``path``.
    """
    target = Path(path)
    if target.suffix != ".onnx":
        raise ReparamError(
            f"export_onnx: path must end in .onnx; got {str(target)!r}, expected e.g. model.onnx"
        )
    data = to_onnx(model, opset=opset, dtype=dtype).SerializeToString()

    def write(stream: IO[bytes]) -> None:
        stream.write(data)

    write_atomic(target, write)
