"""The ONNX adapter: read a model, fold it, write it back; onnxruntime is the oracle.

Models are built two ways: node by node with ``onnx.helper`` (every kind, every
attribute form, every malformed file), and by exporting small PyTorch modules
with both exporters (TorchScript, opset 17, and ``torch.export``, opset 18 with
external data). Every folded model must pass ``onnx.checker`` (full check) and
reproduce the source's outputs in onnxruntime within the float32 tolerance.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tolerances import assert_close

import reparam.graph.onnx as adapter
from reparam import ReparamError
from reparam.graph import Op, fold_graph, fold_onnx, read_graph, save_onnx, write_graph

RNG_SEED = 0


# --------------------------------------------------------------------------- building models


def _value(name: str, shape: Sequence[int | str | None], elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(
    nodes: list[Any],
    initializers: list[Any],
    *,
    inputs: Sequence[Any] | None = None,
    outputs: Sequence[Any] | None = None,
    opset: int = 17,
    shape: Sequence[int | str | None] = (1, 4, 8, 8),
    elem: int = TensorProto.FLOAT,
    **graph_kwargs: Any,
) -> Any:
    """A model with input ``x`` and output ``y`` of ``shape`` unless told otherwise."""
    graph = helper.make_graph(
        nodes,
        "test",
        list(inputs) if inputs is not None else [_value("x", shape, elem)],
        list(outputs) if outputs is not None else [_value("y", shape, elem)],
        initializer=initializers,
        **graph_kwargs,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _array(rng: np.random.Generator, *shape: int, dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _bn(rng: np.random.Generator, prefix: str, c: int, dtype: Any = np.float32) -> list[Any]:
    """Initializers of a BatchNormalization with statistics far from the identity."""
    values = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.uniform(-1, 1, c),
        "mean": rng.uniform(-1, 1, c),
        "var": rng.uniform(0.5, 2, c),
    }
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}.{k}") for k, v in values.items()]


def _bn_node(prefix: str, x: str, y: str, **attrs: Any) -> Any:
    names = [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=f"{prefix}/bn", **attrs)


def _repvgg_block(
    rng: np.random.Generator, prefix: str, x: str, y: str, c: int = 4, dtype: Any = np.float32
) -> tuple[list[Any], list[Any]]:
    """conv3x3-BN + conv1x1-BN + BN(x), summed, then Relu: nodes and initializers."""
    inits = [
        numpy_helper.from_array(_array(rng, c, c, 3, 3, dtype=dtype), f"{prefix}.w3"),
        numpy_helper.from_array(_array(rng, c, c, 1, 1, dtype=dtype), f"{prefix}.w1"),
        *_bn(rng, f"{prefix}.bn3", c, dtype),
        *_bn(rng, f"{prefix}.bn1", c, dtype),
        *_bn(rng, f"{prefix}.bni", c, dtype),
    ]
    nodes = [
        helper.make_node(
            "Conv", [x, f"{prefix}.w3"], [f"{prefix}/c3"], name=f"{prefix}/conv3", pads=[1] * 4
        ),
        _bn_node(f"{prefix}.bn3", f"{prefix}/c3", f"{prefix}/b3"),
        helper.make_node("Conv", [x, f"{prefix}.w1"], [f"{prefix}/c1"], name=f"{prefix}/conv1"),
        _bn_node(f"{prefix}.bn1", f"{prefix}/c1", f"{prefix}/b1"),
        _bn_node(f"{prefix}.bni", x, f"{prefix}/bi"),
        helper.make_node(
            "Add", [f"{prefix}/b3", f"{prefix}/b1"], [f"{prefix}/s1"], name=f"{prefix}/add1"
        ),
        helper.make_node(
            "Add", [f"{prefix}/s1", f"{prefix}/bi"], [f"{prefix}/sum"], name=f"{prefix}/add2"
        ),
        helper.make_node("Relu", [f"{prefix}/sum"], [y], name=f"{prefix}/relu"),
    ]
    return nodes, inits


def _two_blocks(
    *, shape: Sequence[int | str | None] = (1, 4, 8, 8), dtype: Any = np.float32, **kw: Any
) -> Any:
    rng = np.random.default_rng(RNG_SEED)
    nodes_a, inits_a = _repvgg_block(rng, "a", "x", "h", dtype=dtype)
    nodes_b, inits_b = _repvgg_block(rng, "b", "h", "y", dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model(nodes_a + nodes_b, inits_a + inits_b, shape=shape, elem=elem, **kw)


# --------------------------------------------------------------------------- running models


def _run(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


def _input(shape: Sequence[int], dtype: Any = np.float32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(dtype)


def _assert_same_outputs(
    source: Any, folded: Any, feeds: dict[str, np.ndarray], dtype: Any, what: str
) -> None:
    expected = _run(source, feeds)
    actual = _run(folded, feeds)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
        assert_close(got, want, dtype=dtype, what=what)


def _ops(model: Any) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _check(model: Any) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


# --------------------------------------------------------------------------- layering


def test_graph_imports_without_onnx() -> None:
    """``import reparam.graph`` needs no onnx; calling the adapter then says how to get it."""
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "import reparam.graph as g\n"
        "assert 'onnx' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
        "try:\n"
        "    g.fold_onnx('model.onnx')\n"
        "except g.onnx.ReparamError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "reparam[onnx]"' in result.stdout, result.stdout


# --------------------------------------------------------------------------- folding, helper-built


def test_repvgg_blocks_fold_to_one_conv_each() -> None:
    model = _two_blocks(shape=("batch", 4, 8, 8))
    folded, report = fold_onnx(model)
    _check(folded)
    assert _ops(folded) == ["Conv", "Relu", "Conv", "Relu"], _ops(folded)
    assert len(report.folded) == 2, report
    # the region outputs keep their names; Relu nodes are the originals, unchanged
    convs = [node for node in folded.graph.node if node.op_type == "Conv"]
    assert [c.output[0] for c in convs] == ["a/sum", "b/sum"], convs
    relus = [node for node in folded.graph.node if node.op_type == "Relu"]
    assert relus == [n for n in model.graph.node if n.op_type == "Relu"], "Relu nodes changed"
    # every old initializer is gone; every new one is read
    names = {t.name for t in folded.graph.initializer}
    read = {t for node in folded.graph.node for t in node.input}
    assert names == read & names and names.isdisjoint({t.name for t in model.graph.initializer})
    feeds = {"x": _input((3, 4, 8, 8))}
    _assert_same_outputs(model, folded, feeds, np.float32, "two RepVGG blocks")


def test_conv_attributes_of_the_new_node() -> None:
    model = _two_blocks()
    folded, report = fold_onnx(model)
    conv = next(node for node in folded.graph.node if node.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs == {
        "kernel_shape": [3, 3],
        "strides": [1, 1],
        "pads": [1, 1, 1, 1],
        "group": 1,
        "dilations": [1, 1],
    }, attrs
    assert conv.name == report.folded[0].conv.name


def test_read_graph_kinds_and_attributes() -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(_array(rng, 4, 2, 3, 3), "w"),
        numpy_helper.from_array(_array(rng, 4), "b"),
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64), "pads"),
        numpy_helper.from_array(np.array(0.5, np.float32), "pad_value"),
        numpy_helper.from_array(_array(rng, 1, 4, 1, 1), "scale"),
        numpy_helper.from_array(np.array(0.25, np.float32), "ratio"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "pad_value"], ["p"], name="pad"),
        helper.make_node(
            "Conv",
            ["p", "w", "b"],
            ["c"],
            name="conv",
            group=2,
            strides=[2, 1],
            dilations=[1, 2],
            pads=[0, 1, 2, 3],
        ),
        helper.make_node("Mul", ["scale", "c"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "scale"], ["d"], name="div"),
        helper.make_node("Div", ["scale", "d"], ["e"], name="inverse"),
        helper.make_node("Neg", ["d"], ["n"], name="neg"),
        helper.make_node("Sub", ["n", "e"], ["s"], name="sub"),
        helper.make_node(
            "AveragePool",
            ["s"],
            ["ap"],
            name="pool",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        helper.make_node("Dropout", ["ap", "ratio"], ["dr"], name="dropout"),
        helper.make_node("Identity", ["dr"], ["y"], name="identity"),
    ]
    graph, _ = read_graph(
        _model(
            nodes, inits, shape=(1, 4, 8, 8), opset=13, outputs=[_value("y", (1, 4, None, None))]
        )
    )
    ops = {op.name: op for op in graph.ops}
    kinds = {name: op.kind for name, op in ops.items()}
    assert kinds == {
        "pad": "pad",
        "conv": "conv",
        "mul": "mul",
        "div": "div",
        "inverse": "opaque",
        "neg": "neg",
        "sub": "sub",
        "pool": "avg_pool",
        "dropout": "identity",
        "identity": "identity",
    }, kinds
    assert ops["pad"].attrs == {"pads": ((1, 3), (2, 0)), "value": 0.5}
    assert ops["pad"].inputs == ("x",)
    assert ops["conv"].attrs == {
        "stride": (2, 1),
        "pads": ((0, 2), (1, 3)),
        "groups": 2,
        "dilation": (1, 2),
    }, ops["conv"].attrs
    assert ops["pool"].attrs == {
        "size": (3, 3),
        "stride": (1, 1),
        "pads": ((1, 1), (1, 1)),
        "count_include_pad": True,
    }
    assert ops["mul"].inputs == ("scale", "c") and ops["dropout"].inputs == ("ap",)
    assert graph.shapes["c"] == (1, 4, 6, 10), graph.shapes["c"]  # H 8+1+3 -> 6, W 8+2 -> 10
    assert all(op.label == node.op_type for op, node in zip(graph.ops, nodes, strict=True))


@pytest.mark.parametrize(
    ("node", "extra", "why"),
    [
        (helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), [], "reflect mode"),
        (helper.make_node("Pad", ["x", "chan"], ["y"]), [], "pads the channel axis"),
        (helper.make_node("Pad", ["x", "neg"], ["y"]), [], "negative pads"),
        (
            helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], ceil_mode=1),
            [],
            "ceil_mode",
        ),
        (
            helper.make_node(
                "AveragePool", ["x"], ["y"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"
            ),
            [],
            "auto_pad SAME",
        ),
        (helper.make_node("Mul", ["x", "x"], ["y"]), [], "product of two tensors"),
        (
            helper.make_node(
                "BatchNormalization", ["x", "g", "g", "g", "g"], ["y", "m", "v"], training_mode=1
            ),
            [],
            "training mode",
        ),
        (helper.make_node("Dropout", ["x", "", "true"], ["y"]), [], "training dropout"),
        (
            helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1]),
            [],
            "kernel_shape disagrees with the weight",
        ),
        (helper.make_node("Relu", ["x"], ["y"]), [], "a nonlinearity"),
        (
            helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example"),
            [helper.make_opsetid("com.example", 1)],
            "another domain",
        ),
    ],
)
def test_unsupported_forms_are_opaque(node: Any, extra: list[Any], why: str) -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "chan"),
        numpy_helper.from_array(np.array([0, 0, -1, 0, 0, 0, 0, 0], np.int64), "neg"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w"),
        numpy_helper.from_array(_array(rng, 4), "b"),
    ]
    model = _model([node], inits, outputs=[_value("y", (1, None, None, None))])
    model.opset_import.extend(extra)
    graph, _ = read_graph(model)
    assert [op.kind for op in graph.ops] == ["opaque"], f"{why}: {graph.ops}"
    assert graph.ops[0].label == node.op_type


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad_is_made_explicit(auto_pad: str) -> None:
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_array(rng, 4, 4, 4, 3), "w"), *_bn(rng, "bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2], auto_pad=auto_pad),
        _bn_node("bn", "c", "y"),
    ]
    model = _model(nodes, inits, shape=(2, 4, 9, 8), outputs=[_value("y", (2, 4, None, None))])
    graph, _ = read_graph(model)
    conv = graph.ops[0]
    expected = {  # out = ceil(n / 2); total = (out - 1) * 2 + k - n
        "SAME_UPPER": ((1, 2), (0, 1)),
        "SAME_LOWER": ((2, 1), (1, 0)),
        "VALID": ((0, 0), (0, 0)),
    }[auto_pad]
    assert conv.kind == "conv" and conv.attrs["pads"] == expected, conv.attrs
    folded, report = fold_onnx(model)
    assert _ops(folded) == ["Conv"] and len(report.folded) == 1, _ops(folded)
    _check(folded)
    _assert_same_outputs(model, folded, {"x": _input((2, 4, 9, 8))}, np.float32, auto_pad)


def test_conv_same_padding_on_a_dynamic_size_is_opaque() -> None:
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")]
    graph, _ = read_graph(_model(nodes, inits, shape=("n", 4, "h", "w")))
    assert graph.ops[0].kind == "opaque", graph.ops[0]


def test_pad_avg_pool_and_scales_fold_with_opset_18_axes() -> None:
    """A DBB-style branch: 1x1 conv, zero pad on two axes, 3x3 average pool, BN; plus 3x3."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(_array(rng, 4, 4, 1, 1), "w1"),
        numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w3"),
        numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array([3, 2], np.int64), "axes"),  # W then H
        numpy_helper.from_array(rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.uniform(-1, 1, (1, 4, 1, 1)).astype(np.float32), "shift"),
        *_bn(rng, "bn", 4),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Pad", ["c1", "pads", "", "axes"], ["p"], name="pad"),
        helper.make_node("AveragePool", ["p"], ["pooled"], name="pool", kernel_shape=[3, 3]),
        _bn_node("bn", "pooled", "ap"),
        helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c3", "scale"], ["m"], name="mul"),
        helper.make_node("Sub", ["ap", "shift"], ["s"], name="sub"),
        helper.make_node("Add", ["s", "m"], ["y"], name="sum"),
    ]
    model = _model(nodes, inits, opset=18)
    folded, report = fold_onnx(model)
    _check(folded)
    assert _ops(folded) == ["Conv"], f"{_ops(folded)}\n{report}"
    _assert_same_outputs(model, folded, {"x": _input((1, 4, 8, 8))}, np.float32, "DBB branch")


def test_identity_alias_of_a_constant_is_a_constant() -> None:
    """The TorchScript exporter shares identical initializers behind Identity nodes."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w3"),
        numpy_helper.from_array(_array(rng, 4, 4, 1, 1), "w1"),
        numpy_helper.from_array(np.zeros(4, np.float32), "zeros"),
        numpy_helper.from_array(np.arange(4, dtype=np.float32), "unused"),
    ]
    nodes = [
        helper.make_node("Identity", ["zeros"], ["bias3"], name="alias3"),
        helper.make_node("Identity", ["bias3"], ["bias1"], name="alias1"),
        helper.make_node("Conv", ["x", "w3", "bias3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1", "bias1"], ["c1"], name="conv1"),
        helper.make_node("Add", ["c3", "c1"], ["y"], name="sum"),
        helper.make_node("Relu", ["bias1"], ["r"], name="reads_the_alias"),
    ]
    model = _model(nodes, inits, outputs=[_value("y", (1, 4, 8, 8)), _value("r", (4,))])
    graph, _ = read_graph(model)
    assert [op.name for op in graph.ops] == ["conv3", "conv1", "sum", "reads_the_alias"]
    assert graph.constants["bias1"] is graph.constants["zeros"]
    folded, _ = fold_onnx(model)
    _check(folded)
    # the Relu still reads the alias: both Identity nodes and "zeros" stay; the weights go
    assert _ops(folded) == ["Identity", "Identity", "Conv", "Relu"], _ops(folded)
    names = [t.name for t in folded.graph.initializer]
    assert "zeros" in names and "w3" not in names and "unused" not in names, names
    _assert_same_outputs(model, folded, {"x": _input((1, 4, 8, 8))}, np.float32, "alias")


def test_constant_nodes_are_constants() -> None:
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w")
    scale = numpy_helper.from_array(rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32), "v")
    nodes = [
        helper.make_node("Constant", [], ["w"], name="weight", value=weight),
        helper.make_node("Constant", [], ["s"], name="scale", value=scale),
        helper.make_node("Constant", [], ["half"], name="half", value_float=0.5),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "half"], ["y"], name="mul_half"),
    ]
    model = _model(nodes, [])
    graph, _ = read_graph(model)
    assert [op.kind for op in graph.ops] == ["conv", "mul", "mul"]
    assert set(graph.constants) == {"w", "s", "half"}
    folded, _ = fold_onnx(model)
    _check(folded)
    assert _ops(folded) == ["Conv"], _ops(folded)
    _assert_same_outputs(model, folded, {"x": _input((1, 4, 8, 8))}, np.float32, "Constant")


def test_parameters_computed_from_constants_are_evaluated() -> None:
    """What the TorchScript exporter leaves unfolded: F.pad's pads, a weight built in forward."""
    rng = np.random.default_rng(9)
    base = _array(rng, 4, 4, 3, 3)
    delta = _array(rng, 4, 4, 3, 3)
    inits = [
        numpy_helper.from_array(base, "base"),
        numpy_helper.from_array(delta, "delta"),
        numpy_helper.from_array(np.array([1, 1], np.int32), "half_pads"),
        numpy_helper.from_array(np.array([0, 0], np.int32), "no_pads"),
    ]
    nodes = [
        helper.make_node(
            "Add", ["base", "delta"], ["w"], name="weight"
        ),  # a weight built in forward
        helper.make_node(
            "Concat",
            ["no_pads", "half_pads", "no_pads", "half_pads"],
            ["p32"],
            name="concat",
            axis=0,
        ),
        helper.make_node("Cast", ["p32"], ["p64"], name="cast", to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "p64"], ["padded"], name="pad"),  # pads H and W by 1
        helper.make_node("Conv", ["padded", "w"], ["y"], name="conv"),
    ]
    model = _model(nodes, inits)
    graph, _ = read_graph(model)
    assert [op.kind for op in graph.ops] == ["pad", "conv"], graph.ops
    np.testing.assert_array_equal(graph.constants["w"], base + delta)
    folded, _ = fold_onnx(model)
    _check(folded)
    assert _ops(folded) == ["Conv"], _ops(folded)  # the computations went with the Pad
    assert {t.name for t in folded.graph.initializer}.isdisjoint({"base", "delta", "no_pads"})
    _assert_same_outputs(model, folded, {"x": _input((1, 4, 8, 8))}, np.float32, "computed")


def test_a_computed_constant_still_read_is_written_once() -> None:
    """A Split of one initializer gives two weights; the convs left standing keep the Split."""
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array(_array(rng, 8, 4, 3, 3), "both"),
        numpy_helper.from_array(np.array([4, 4], np.int64), "split"),
        *_bn(rng, "bn", 4),
    ]
    nodes = [
        helper.make_node("Split", ["both", "split"], ["wa", "wb"], name="split", axis=0),
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        _bn_node("bn", "a", "y"),
        # SAME padding on a dynamic size stays opaque: these read both outputs of the Split
        helper.make_node("Conv", ["x", "wb"], ["z"], name="conv_b", auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["x", "wa"], ["z2"], name="conv_c", auto_pad="SAME_UPPER"),
    ]
    model = _model(
        nodes,
        inits,
        inputs=[_value("x", ("n", 4, "h", "w"))],
        outputs=[_value(name, ("n", 4, "h", "w")) for name in ("y", "z", "z2")],
    )
    graph, _ = read_graph(model)
    assert [op.kind for op in graph.ops] == ["conv", "batch_norm", "opaque", "opaque"], graph.ops
    folded, _ = fold_onnx(model)
    _check(folded)
    assert _ops(folded) == ["Split", "Conv", "Conv", "Conv"], _ops(folded)
    _assert_same_outputs(model, folded, {"x": _input((2, 4, 7, 9))}, np.float32, "Split")


def test_random_or_huge_computations_are_not_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    inits = [numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "shape")]
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise"),
        helper.make_node("RandomNormal", [], ["w"], name="random", shape=[4, 4, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["big"],
            name="big",
            value=numpy_helper.from_array(np.ones(1, np.float32)),
        ),
        helper.make_node("Mul", ["c", "big"], ["y"], name="mul"),
    ]
    monkeypatch.setattr(adapter, "_MAX_EVALUATED", 100)  # the 1x4x8x8 ones count as huge here
    graph, _ = read_graph(_model(nodes, inits))
    kinds = {op.name: op.kind for op in graph.ops}
    assert kinds == {
        "noise": "opaque",
        "random": "opaque",
        "conv": "opaque",
        "big": "opaque",
        "mul": "opaque",
    }, kinds
    assert "w" not in graph.constants and "big" not in graph.constants


def test_a_tensor_read_inside_a_subgraph_is_not_private() -> None:
    """An If branch reading a conv's output from outside keeps that output alive."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(_array(rng, 4, 4, 3, 3), "w"), *_bn(rng, "bn", 4)]
    branch = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["out"])], "then", [], [_value("out", (1, 4, 8, 8))]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["out"])], "else", [], [_value("out", (1, 4, 8, 8))]
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn_node("bn", "c", "y"),
        helper.make_node("If", ["flag"], ["z"], name="if", then_branch=branch, else_branch=other),
    ]
    model = _model(
        nodes,
        inits,
        inputs=[_value("x", (1, 4, 8, 8)), _value("flag", (), TensorProto.BOOL)],
        outputs=[_value("y", (1, 4, 8, 8)), _value("z", (1, 4, 8, 8))],
    )
    graph, _ = read_graph(model)
    assert graph.ops[-1].kind == "opaque" and set(graph.ops[-1].inputs) == {"flag", "c", "y"}
    folded, _ = fold_onnx(model)
    _check(folded)
    assert "Conv" in _ops(folded) and "BatchNormalization" in _ops(folded), _ops(folded)
    for flag in (True, False):
        feeds = {"x": _input((1, 4, 8, 8)), "flag": np.array(flag)}
        _assert_same_outputs(model, folded, feeds, np.float32, f"If {flag}")


def test_names_metadata_dynamic_batch_and_value_info_are_kept() -> None:
    model = _two_blocks(shape=("batch", 4, 8, 8), doc_string="graph doc")
    model.producer_name, model.producer_version = "test-exporter", "9.1"
    model.doc_string, model.model_version, model.domain = "model doc", 7, "org.example"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.graph.value_info.extend(
        [_value("h", ("batch", 4, 8, 8)), _value("a/c3", ("batch", 4, 8, 8))]
    )
    # a node without a name, and two with the same name, keep theirs in the file
    model.graph.node[0].name = model.graph.node[7].name = "same"  # a/conv3, a/relu
    model.graph.node[15].name = ""  # b/relu
    graph, _ = read_graph(model)
    names = [op.name for op in graph.ops]
    assert names[0] == "Conv_0" and names[7] == "Relu_7" and names[15] == "Relu_15", names
    assert len(set(names)) == len(names), names
    folded, _ = fold_onnx(model)
    _check(folded)
    assert (folded.producer_name, folded.producer_version) == ("test-exporter", "9.1")
    assert (folded.doc_string, folded.model_version, folded.domain) == (
        "model doc",
        7,
        "org.example",
    )
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "tests", "license": "MIT"}
    assert folded.graph.doc_string == "graph doc" and folded.graph.name == "test"
    assert list(folded.opset_import) == list(model.opset_import)
    assert folded.graph.input == model.graph.input and folded.graph.output == model.graph.output
    assert [v.name for v in folded.graph.value_info] == ["h"], "value_info of a folded tensor kept"
    assert [n.name for n in folded.graph.node if n.op_type == "Relu"] == ["same", ""]
    batch = folded.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch", batch
    # onnxruntime refuses the source's repeated names; the folded model has one "same" left
    clean = _two_blocks(shape=("batch", 4, 8, 8))
    _assert_same_outputs(clean, folded, {"x": _input((5, 4, 8, 8))}, np.float32, "batch 5")


def test_initializers_listed_as_inputs() -> None:
    """Old exporters list initializers among the graph inputs; the dropped ones leave both."""
    model = _two_blocks()
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
    )
    graph, _ = read_graph(model)
    assert graph.inputs == ("x",), graph.inputs
    folded, _ = fold_onnx(model)
    _check(folded)
    assert [i.name for i in folded.graph.input] == ["x"], [i.name for i in folded.graph.input]
    _assert_same_outputs(model, folded, {"x": _input((1, 4, 8, 8))}, np.float32, "inputs")


def test_float16_stays_float16() -> None:
    model = _two_blocks(dtype=np.float16)
    folded, report = fold_onnx(model)
    _check(folded)
    assert len(report.folded) == 2
    types = {t.data_type for t in folded.graph.initializer}
    assert types == {TensorProto.FLOAT16}, types
    x = _input((1, 4, 8, 8), np.float16)
    expected = _run(model, {"x": x})[0].astype(np.float32)
    actual = _run(folded, {"x": x})[0]
    assert actual.dtype == np.float16
    # float16 rounds each op of the source; the fold rounds the weights once
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


def test_bfloat16_stays_bfloat16_rounded_once() -> None:
    rng = np.random.default_rng(7)
    w3 = rng.standard_normal((4, 4, 3, 3)).astype(ml_dtypes.bfloat16)
    w1 = rng.standard_normal((4, 4, 1, 1)).astype(ml_dtypes.bfloat16)
    inits = [
        helper.make_tensor(
            "w3", TensorProto.BFLOAT16, w3.shape, w3.view(np.uint16).tobytes(), raw=True
        ),
        helper.make_tensor(
            "w1", TensorProto.BFLOAT16, w1.shape, w1.view(np.uint16).tobytes(), raw=True
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Add", ["c3", "c1"], ["y"], name="sum"),
    ]
    model = _model(nodes, inits, opset=22, elem=TensorProto.BFLOAT16)
    graph, _ = read_graph(model)
    assert graph.constants["w3"].dtype == np.float64  # widened exactly, rounded once on writing
    np.testing.assert_array_equal(graph.constants["w3"], w3.astype(np.float32))
    folded, report = fold_onnx(model)
    _check(folded)
    tensors = {t.name: t for t in folded.graph.initializer}
    weight = tensors[report.folded[0].conv.inputs[1]]
    assert weight.data_type == TensorProto.BFLOAT16
    kernel = w3.astype(np.float64)
    kernel[:, :, 1:2, 1:2] += w1.astype(np.float64)
    expected = kernel.astype(ml_dtypes.bfloat16)  # the exact sum, rounded once
    actual = np.frombuffer(weight.raw_data, np.uint16).reshape(kernel.shape)
    np.testing.assert_array_equal(actual, expected.view(np.uint16), err_msg="bfloat16 kernel")


def test_bfloat16_rounding_is_to_nearest_even() -> None:
    values = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20), 3.4e38, np.inf, -np.inf, np.nan],
        np.float32,
    )
    bits = adapter._bfloat16_bits(values)
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(bits[:-1], expected[:-1])
    assert np.isnan(bits.view(ml_dtypes.bfloat16)[-1].astype(np.float32))


def test_max_cost_ratio_decides_depthwise_then_pointwise() -> None:
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array(_array(rng, 8, 1, 3, 3), "dw"),
        numpy_helper.from_array(_array(rng, 16, 8, 1, 1), "pw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "pw"], ["y"], name="pw"),
    ]
    model = _model(nodes, inits, shape=(1, 8, 8, 8), outputs=[_value("y", (1, 16, 8, 8))])
    kept, report = fold_onnx(model)
    assert _ops(kept) == ["Conv", "Conv"], report
    assert any(r.reason.startswith("left apart for cost") for r in report.refused), report
    merged, report = fold_onnx(model, max_cost_ratio=float("inf"))
    assert _ops(merged) == ["Conv"] and len(report.folded) == 1, report
    _check(merged)
    _assert_same_outputs(model, merged, {"x": _input((1, 8, 8, 8))}, np.float32, "dw+pw")


def test_write_graph_refuses_an_op_it_does_not_know() -> None:
    graph, source = read_graph(_two_blocks())
    folded, report = fold_graph(graph)
    stranger = Op("stranger", "identity", ("x",), ("x2",))
    bad = type(folded)((*folded.ops, stranger), folded.inputs, folded.outputs, folded.constants)
    with pytest.raises(ReparamError, match="write_graph: identity 'stranger' is neither a node"):
        write_graph(bad, report, source)


# --------------------------------------------------------------------------- PyTorch exports


class _Block(torch.nn.Module):
    """RepVGG-style: 3x3 conv-BN, identity BN, a DBB 1x1-average-BN branch, a zero-bias 1x1."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(c)
        self.conv1 = torch.nn.Conv2d(c, c, 1, bias=False)
        self.pool = torch.nn.AvgPool2d(3, 1, 1)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.bni = torch.nn.BatchNorm2d(c)
        self.conv0 = torch.nn.Conv2d(c, c, 1)
        self.conv0.bias.data.zero_()  # equal zero biases: TorchScript shares them via Identity
        for bn in (self.bn3, self.bn1, self.bni):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(x)) + self.bn1(self.pool(self.conv1(x))) + self.bni(x)
        return torch.relu(y + self.conv0(x))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stem.bias.data.zero_()
        self.blocks = torch.nn.Sequential(_Block(8), torch.nn.Dropout(0.2), _Block(8))
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _export(path: Path, *, dynamo: bool) -> Path:
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        else:
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}},
            )
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "torchscript": _export(root / "torchscript.onnx", dynamo=False),
        "dynamo": _export(root / "dynamo.onnx", dynamo=True),
    }


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pytorch_exports_fold(exports: dict[str, Path], exporter: str) -> None:
    path = exports[exporter]
    source = onnx.load(str(path))
    folded, report = fold_onnx(path)
    _check(folded)
    # the stem, then one conv per block; the head stays as it was
    assert _ops(folded)[:5] == ["Conv", "Relu", "Conv", "Relu", "Conv"], f"{_ops(folded)}\n{report}"
    assert {"BatchNormalization", "AveragePool", "Add"}.isdisjoint(_ops(folded)), _ops(folded)
    blocks = [r for r in report.folded if len(r.replaced) > 1]
    assert len(blocks) == 2 and all(len(r.replaced) >= 7 for r in blocks), report
    assert [i.name for i in folded.graph.input] == ["image"]
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch not dynamic"
    for batch in (1, 3):
        feeds = {"image": _input((batch, 3, 16, 16))}
        _assert_same_outputs(source, folded, feeds, np.float32, f"{exporter} batch {batch}")


def test_dynamo_export_keeps_weights_in_external_data(exports: dict[str, Path]) -> None:
    """The case the external-data reader exists for: read from the path, data next to it."""
    path = exports["dynamo"]
    assert Path(f"{path}.data").is_file(), "torch.onnx.export(dynamo=True) wrote no .data file"
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    with pytest.raises(ReparamError, match="does not say where its file is"):
        read_graph(raw)
    folded, _ = fold_onnx(path)
    assert all(t.data_location != TensorProto.EXTERNAL for t in folded.graph.initializer)


def test_torchscript_export_reads_identity_aliases(exports: dict[str, Path]) -> None:
    raw = onnx.load(str(exports["torchscript"]))
    initializers = {t.name for t in raw.graph.initializer}
    aliases = [n for n in raw.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    assert aliases, "the exporter shared no initializer (the test would check nothing)"
    graph, _ = read_graph(raw)
    assert {a.output[0] for a in aliases} <= set(graph.constants)
    assert not any(op.label == "Identity" for op in graph.ops)


# --------------------------------------------------------------------------- saving


def test_save_onnx_round_trip(tmp_path: Path) -> None:
    model = _two_blocks()
    folded, _ = fold_onnx(model)
    path = tmp_path / "deploy.onnx"
    save_onnx(folded, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.onnx"]
    again = onnx.load(str(path))
    assert again == folded
    _assert_same_outputs(model, str(path), {"x": _input((1, 4, 8, 8))}, np.float32, "saved")


def test_save_onnx_writes_external_data_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2 GiB limit, lowered so a small model crosses it."""
    model = _two_blocks()
    folded, _ = fold_onnx(model)
    monkeypatch.setattr(adapter, "PROTOBUF_LIMIT", adapter._HEADROOM + 100)
    monkeypatch.setattr(adapter, "EXTERNAL_THRESHOLD", 64)
    path = tmp_path / "deploy.onnx"
    save_onnx(folded, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.onnx", "deploy.onnx.data"]
    shell = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in shell.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external, "no initializer went to the .data file"
    loaded = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    for a, b in zip(loaded.graph.initializer, folded.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # and reparam reads its own external data back
    graph, _ = read_graph(path)
    assert set(graph.constants) == {t.name for t in folded.graph.initializer}
    _assert_same_outputs(model, str(path), {"x": _input((1, 4, 8, 8))}, np.float32, "external")


def test_save_onnx_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folded, _ = fold_onnx(_two_blocks())
    monkeypatch.setattr(adapter, "PROTOBUF_LIMIT", adapter._HEADROOM + 100)
    monkeypatch.setattr(adapter, "EXTERNAL_THRESHOLD", 64)
    calls = []

    def failing(tensor: Any, onnx_module: Any) -> bytes:
        calls.append(tensor.name)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return bytes(tensor.raw_data)

    monkeypatch.setattr(adapter, "_raw_bytes", failing)
    with pytest.raises(OSError, match="No space left"):
        save_onnx(folded, tmp_path / "deploy.onnx")
    assert len(calls) == 2, "the failure came before any data was written"
    assert list(tmp_path.iterdir()) == [], "a partial or temporary file was left"


# --------------------------------------------------------------------------- malformed input


def _write(path: Path, model: Any) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    data = _two_blocks().SerializeToString()
    cases = {
        "truncated.onnx": data[: len(data) // 2],
        "text.onnx": b"this is not a model\n" * 10,
        "empty.onnx": b"",
        "zip.onnx": b"PK\x03\x04" + bytes(40),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ReparamError) as caught:
            read_graph(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"read_graph: {tmp_path / name} is not an ONNX model"), message
        assert "\n" not in message


def test_old_opset_is_refused() -> None:
    with pytest.raises(ReparamError, match=r"uses opset 12 of the default domain; expected 13"):
        fold_onnx(_two_blocks(opset=12))


def test_tensor_nothing_produces() -> None:
    model = _two_blocks()
    model.graph.node[3].input[0] = "ghost"
    with pytest.raises(ReparamError, match=r"reads tensor 'ghost', which no node"):
        fold_onnx(model)


def test_cycle() -> None:
    nodes = [
        helper.make_node("Relu", ["x2"], ["x1"], name="one"),
        helper.make_node("Relu", ["x1"], ["x2"], name="two"),
        helper.make_node("Add", ["x", "x2"], ["y"], name="sum"),
    ]
    with pytest.raises(ReparamError, match=r"cycle through nodes 'one', 'two'"):
        fold_onnx(_model(nodes, []))


def test_tensor_produced_twice() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="one"),
        helper.make_node("Neg", ["x"], ["y"], name="two"),
    ]
    with pytest.raises(ReparamError, match=r"tensor 'y' is produced twice"):
        fold_onnx(_model(nodes, []))


def _with_external(tmp_path: Path, location: str, length: int | None = None) -> Path:
    """A model whose 3x3 weight lives in ``location`` (relative to the model's directory)."""
    model = _two_blocks()
    tensor = model.graph.initializer[0]
    data = bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0"}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    target = directory / location
    if target.resolve().is_relative_to(directory.resolve()):
        target.write_bytes(data)
    return _write(directory / "train.onnx", model)


def test_external_data_is_read(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin", length=4 * 4 * 4 * 3 * 3)
    graph, _ = read_graph(path)
    expected = numpy_helper.to_array(_two_blocks().graph.initializer[0])
    np.testing.assert_array_equal(graph.constants["a.w3"], expected)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "../outside.bin"])
def test_external_data_outside_the_directory_is_refused(
    tmp_path: Path, location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(4096))  # would satisfy the tensor, were it read
    path = _with_external(tmp_path, location)
    opened: list[str] = []
    real_open = open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ReparamError, match="outside the model's directory; refused") as caught:
        read_graph(path)
    assert location in str(caught.value)
    assert opened == [str(path)], f"files opened besides the model: {opened}"


def test_external_data_through_a_symlink_out_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(4096))
    path = _with_external(tmp_path, "link.bin")
    (path.parent / "link.bin").unlink()
    (path.parent / "link.bin").symlink_to(outside)
    with pytest.raises(ReparamError, match=r"'link\.bin', outside the model's directory"):
        read_graph(path)


def test_external_data_shorter_than_its_tensor(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin")
    data = (path.parent / "weights.bin").read_bytes()
    (path.parent / "weights.bin").write_bytes(data[:100])
    with pytest.raises(ReparamError, match=r"holds 100 bytes at offset 0 .* expected 576"):
        read_graph(path)


def test_external_data_length_that_disagrees_with_the_shape(tmp_path: Path) -> None:
    path = _with_external(tmp_path, "weights.bin", length=100)
    with pytest.raises(ReparamError, match=r"declares 100 bytes of external data; expected 576"):
        read_graph(path)


def test_model_argument_of_the_wrong_type() -> None:
    with pytest.raises(ReparamError, match=r"model must be an onnx\.ModelProto or a path; got int"):
        read_graph(3)
