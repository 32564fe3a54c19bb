"""onnxruntime's quantization parameters, read from its QDQ model of a ``reparam export`` graph.

``onnxruntime.quantization.quantize_static`` (QDQ format) writes the float
graph with a QuantizeLinear/DequantizeLinear pair on every quantized
activation and a DequantizeLinear on every weight (int8) and bias (int32)
initializer. The model is read through the graph layer's ONNX adapter
(:func:`reparam.graph.read_graph`): its ops, producers and consumers say which
scale and zero point belong to which Conv; the integer tensors are its
constants.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from ...checkpoints.formats import shown_path
from ...core.errors import ReparamError
from ...graph.ir import Graph, Op
from ...graph.onnx import OnnxSource, read_graph
from .scheme import ActivationQuant, LayerQuant, QParams

__all__ = ["qparams_from_onnx"]

_F32 = np.float32
_QOPERATORS = ("QLinearConv", "QGemm", "QLinearGlobalAveragePool")
_EXPECTED = "expected a QDQ model from onnxruntime's quantize_static of a reparam export graph"


class _QDQ:
    """A read QDQ graph: where each tensor comes from and goes, and its constants."""

    def __init__(self, graph: Graph, source: OnnxSource, name: str) -> None:
        self.graph = graph
        self.source = source
        self.name = name
        self.producers = graph.producers()
        self.consumers = graph.consumers()

    def fail(self, problem: str) -> ReparamError:
        return ReparamError(f"qparams_from_onnx: {self.name}: {problem}; {_EXPECTED}")

    def node(self, op: Op) -> Any:
        """Return the ONNX node of ``op`` (the adapter keeps no attribute of an opaque op)."""
        return self.source.ops[op.name][1]

    def constant(self, tensor: str) -> npt.NDArray[Any]:
        value = self.graph.constant(tensor)
        if value is None:
            raise self.fail(f"{tensor!r} is not an initializer")
        return value

    def dequantizer(self, tensor: str, what: str) -> tuple[tuple[str, ...], Any]:
        """Return the inputs of the DequantizeLinear that computes ``tensor``, and its node.

        A DequantizeLinear of initializers is an op of the graph, or, where the adapter
        computed it as a parameter, a constant computed by that node.
        """
        op = self.producers.get(tensor)
        if op is not None and op.label == "DequantizeLinear":
            return op.inputs, self.source.ops[op.name][1]
        node = self.source.constant_nodes.get(tensor)
        if node is not None and node.op_type == "DequantizeLinear":
            return tuple(node.input), node
        raise self.fail(f"{what} {tensor!r} does not come from a DequantizeLinear")

    def activation(self, scale: str, zero_point: str) -> ActivationQuant:
        zp = self.constant(zero_point)
        if zp.size != 1 or zp.dtype not in (np.int8, np.uint8):
            raise self.fail(f"zero point {zero_point!r} is {zp.dtype} of shape {zp.shape}")
        return ActivationQuant(
            float(_F32(self.constant(scale).reshape(()))),
            int(zp.reshape(())),
            zp.dtype == np.int8,
        )

    def input_of(self, tensor: str) -> ActivationQuant:
        inputs, _ = self.dequantizer(tensor, "the input of")
        return self.activation(inputs[1], inputs[2])

    def output_of(self, op: Op) -> ActivationQuant:
        tensor = op.outputs[0]
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].label == "Relu":
            tensor = users[0].outputs[0]
            users = self.consumers.get(tensor, [])
        quantizers = [user for user in users if user.label == "QuantizeLinear"]
        if len(quantizers) != 1:
            raise self.fail(f"the output of {op.name} is not quantized once")
        return self.activation(quantizers[0].inputs[1], quantizers[0].inputs[2])

    def layer(self, op: Op, label: str) -> LayerQuant:
        if len(op.inputs) < 3 or not op.inputs[2]:
            raise self.fail(f"{op.name} has no bias")
        inputs, node = self.dequantizer(op.inputs[1], "the weight of")
        weight = self.graph.constant(inputs[0])
        if weight is None or weight.dtype != np.int8:
            raise self.fail(f"the weight of {op.name} is not an int8 initializer")
        zero = self.constant(inputs[2]) if len(inputs) > 2 and inputs[2] else np.zeros(1)
        if np.any(zero != 0):
            raise self.fail(f"the weight of {op.name} is not symmetric (zero point != 0)")
        scale = self.constant(inputs[1]).astype(np.float32).reshape(-1)
        axis = _integer_attribute(node, "axis", 1)
        if scale.size > 1 and (scale.size != weight.shape[0] or axis != 0):
            raise self.fail(f"the weight scales of {op.name} are not per output channel")
        bias_inputs, _ = self.dequantizer(op.inputs[2], "the bias of")
        bias = self.graph.constant(bias_inputs[0])
        if bias is None or bias.dtype != np.int32:
            raise self.fail(f"the bias of {op.name} is not an int32 initializer")
        return LayerQuant(
            label, weight, scale, bias, self.input_of(op.inputs[0]), self.output_of(op)
        )


def _integer_attribute(node: Any, name: str, default: int) -> int:
    """Return an integer attribute of an ONNX node, or ``default`` when it is absent."""
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _full_scale(quant: LayerQuant) -> LayerQuant:
    """Per-channel parameters with one scale per output channel (a single one repeated)."""
    scale = np.broadcast_to(quant.weight_scale, quant.weight.shape[:1]).astype(np.float32)
    return quant._replace(weight_scale=scale)


def qparams_from_onnx(path: str | os.PathLike[str]) -> QParams:
    """Read onnxruntime's quantization parameters from a QDQ model of a ``reparam export`` graph.

    Parameters
    ----------
    path : str or path-like
        An ``.onnx`` file written by ``onnxruntime.quantization.quantize_static``
        (QDQ format, int8 or uint8 activations, symmetric int8 weights) from
        the graph ``reparam export`` writes.

    Returns
    -------
    QParams
        Integer weights and biases as stored, every scale and zero point;
        layer names from the Conv nodes (``"stage2.1"``).

    Raises
    ------
    ReparamError
        If ``onnx`` is missing, the file cannot be read, or the graph is not
        such a model (naming the node and what was expected).
    """
    func = "qparams_from_onnx"
    try:
        graph, source = read_graph(path, func=func)
    except OSError as exc:
        raise ReparamError(
            f"{func}: cannot read {shown_path(path)}: {exc.strerror or exc}"
        ) from None
    qdq = _QDQ(graph, source, source.name)
    layers: list[LayerQuant] = []
    pool: ActivationQuant | None = None
    head: LayerQuant | None = None
    for op in graph.ops:
        if op.label == "Conv":
            label = qdq.node(op).name.removesuffix("/Conv") or f"conv{len(layers)}"
            layers.append(qdq.layer(op, label))
        elif op.label == "GlobalAveragePool":
            pool = qdq.output_of(op)
        elif op.label == "Gemm":
            if _integer_attribute(qdq.node(op), "transB", 0) != 1:
                raise qdq.fail("the Gemm does not have transB=1")
            head = qdq.layer(op, "head")
        elif op.label in _QOPERATORS:
            raise qdq.fail(f"{op.label} found (QOperator format)")
    if not layers or pool is None or head is None:
        raise qdq.fail("no Conv, GlobalAveragePool or Gemm found")
    per_channel = any(item.weight_scale.size > 1 for item in (*layers, head))
    if per_channel:
        layers = [_full_scale(item) for item in layers]
        head = _full_scale(head)
    return QParams(tuple(layers), pool, head, per_channel)
