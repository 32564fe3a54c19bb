"""A NumPy interpreter for reparam.graph's IR, and a small builder of IR graphs for tests.

``run(graph, x)`` computes every op the obvious way (the reference
``conv2d`` with its per-side pads and dilation, NumPy broadcasting for the
arithmetic, ``np.pad`` for Pad, the reference average pool; opaque ops by their
label: Relu, Sigmoid, Mul of two computed tensors), so a folded graph can be
compared with its train form without ONNX or PyTorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from reparam.core.conv import avg_pool2d, conv2d
from reparam.graph.ir import Graph, Op

Array = npt.NDArray[Any]


def run(graph: Graph, x: Array, *, absolute: bool = False) -> dict[str, Array]:
    """Every tensor of ``graph`` for the input ``x`` (one graph input).

    With ``absolute=True`` every parameter and the input are replaced by their
    absolute values and nonlinearities by the identity: the magnitude of the terms
    summed into each value, which floating-point error is proportional to.
    """
    values: dict[str, Array] = {graph.inputs[0]: np.abs(x) if absolute else x}
    for name, constant in graph.constants.items():
        values[name] = np.abs(constant) if absolute else np.asarray(constant)
    for op in _ordered(graph):
        values[op.outputs[0]] = _op(op, [values[t] if t else None for t in op.inputs], absolute)
    return values


def _ordered(graph: Graph) -> list[Op]:
    done = set(graph.inputs) | set(graph.constants)
    pending = list(graph.ops)
    result = []
    while pending:
        for op in pending:
            if all(not t or t in done for t in op.inputs):
                result.append(op)
                done.update(op.outputs)
                pending.remove(op)
                break
        else:
            raise AssertionError("cycle")
    return result


def _op(op: Op, args: list[Array | None], absolute: bool) -> Array:
    a = op.attrs
    if op.kind == "conv":
        return conv2d(
            args[0], args[1], args[2] if len(args) > 2 else None,
            stride=a["stride"], padding=a["pads"], groups=a["groups"], dilation=a["dilation"],
        )  # fmt: skip
    if op.kind == "linear":
        x, weight = args[0], args[1]
        assert x is not None and weight is not None
        out = x @ weight.T
        return out if len(args) < 3 or args[2] is None else out + args[2]
    if op.kind == "batch_norm":
        x, gamma, beta, mean, var = args
        assert x is not None and gamma is not None and beta is not None
        assert mean is not None and var is not None
        scale = gamma / np.sqrt(var + a["eps"])
        shift = np.abs(mean * scale) + beta if absolute else beta - mean * scale
        axes = (slice(None),) + (None,) * (x.ndim - 2)  # channels on axis 1: NCHW or NC
        return x * scale[axes] + shift[axes]
    first, second = args[0], args[1] if len(args) > 1 else None
    assert first is not None
    if op.kind == "add" or (op.kind == "sub" and absolute):
        assert second is not None
        return first + second
    if op.kind == "sub":
        assert second is not None
        return first - second
    if op.kind == "mul" or (op.label == "Mul" and op.kind == "opaque"):
        assert second is not None
        return first * second
    if op.kind == "div":
        assert second is not None
        return first / second
    if op.kind == "neg":
        return first if absolute else -first
    if op.kind == "pad":
        (top, bottom), (left, right) = a["pads"]
        value = abs(a["value"]) if absolute else a["value"]
        return np.pad(first, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)
    if op.kind == "avg_pool":
        return avg_pool2d(
            first, a["size"], stride=a["stride"], padding=a["pads"],
            count_include_pad=a["count_include_pad"],
        )  # fmt: skip
    if op.label == "Flatten":
        return first.reshape(first.shape[0], -1)
    if op.kind == "identity" or absolute:
        return first
    if op.label == "Relu":
        return np.maximum(first, 0)
    if op.label == "Sigmoid":
        return 1 / (1 + np.exp(-first))
    raise AssertionError(f"no reference for {op.shown}")


class Builder:
    """Build an IR graph op by op, with random parameters from one generator."""

    def __init__(self, seed: int, dtype: npt.DTypeLike = np.float64) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.ops: list[Op] = []
        self.constants: dict[str, Array] = {}
        self.count = 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def _const(self, value: Array) -> str:
        name = self._name("p")
        self.constants[name] = np.asarray(value, dtype=self.dtype)
        return name

    def _add(self, kind: str, inputs: tuple[str, ...], label: str, **attrs: Any) -> str:
        out = self._name("t")
        self.ops.append(Op(self._name(f"{label}_"), kind, inputs, (out,), attrs, label=label))
        return out

    def conv(
        self, x: str, c_in: int, c_out: int, k: int | tuple[int, int], *, stride: int = 1,
        pad: int | None = None, groups: int = 1, dilation: int = 1, bias: bool = False,
    ) -> str:  # fmt: skip
        kh, kw = (k, k) if isinstance(k, int) else k
        ph, pw = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2) if pad is None else (pad, pad)
        weight = self._const(self.rng.standard_normal((c_out, c_in // groups, kh, kw)))
        inputs = (x, weight) + ((self._const(self.rng.standard_normal(c_out)),) if bias else ())
        return self._add(
            "conv", inputs, "Conv", stride=(stride, stride), pads=((ph, ph), (pw, pw)),
            groups=groups, dilation=(dilation, dilation),
        )  # fmt: skip

    def bn(self, x: str, c: int) -> str:
        rng = self.rng
        params = (
            rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c),
            rng.uniform(0.5, 2, c),
        )  # fmt: skip
        return self._add(
            "batch_norm", (x, *(self._const(p) for p in params)), "BatchNormalization", eps=1e-5
        )

    def linear(self, x: str, c_in: int, c_out: int, *, bias: bool = True) -> str:
        weight = self._const(self.rng.standard_normal((c_out, c_in)))
        inputs = (x, weight) + ((self._const(self.rng.standard_normal(c_out)),) if bias else ())
        return self._add("linear", inputs, "Gemm")

    def binary(self, kind: str, a: str, b: str) -> str:
        return self._add(kind, (a, b), kind.capitalize())

    def by_constant(self, kind: str, x: str, value: Array, *, first: bool = True) -> str:
        c = self._const(value)
        return self._add(kind, (x, c) if first else (c, x), kind.capitalize())

    def unary(self, kind: str, x: str, label: str, **attrs: Any) -> str:
        return self._add(kind, (x,), label, **attrs)

    def graph(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Graph:
        return Graph(tuple(self.ops), inputs, outputs, dict(self.constants))
